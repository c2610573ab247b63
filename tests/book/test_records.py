"""pebook.book.experiments._records: the helpers every experiment's results share."""

from __future__ import annotations

import json

import pytest

from pebook.book.experiments._records import jsonable, order_ranges, parse_ints, read_data_file, seed_range


def test_seed_range_and_ordering():
    assert seed_range([]) is None
    assert seed_range([1.0, 3.0, 2.0]) == (2.0, 1.0, 3.0, 3)
    low, high, overlapping = seed_range([1.0, 1.2]), seed_range([1.3, 1.4]), seed_range([1.1, 1.5])
    assert order_ranges(low, high) == "<" and order_ranges(high, low) == ">"
    assert order_ranges(low, overlapping) == "~" and order_ranges(high, overlapping) == "~"


def test_parse_ints_and_jsonable():
    assert parse_ints("0,1, 2") == (0, 1, 2)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_ints("0,a")
    assert jsonable({"a": (1, 2)}) == {"a": [1, 2]}


def test_read_data_file_reads_the_shipped_results():
    assert read_data_file("retrieval_chapter.json")["preset"] == "chapter"
    with pytest.raises(FileNotFoundError):
        read_data_file("no_such_results.json")
    assert json.loads(json.dumps(read_data_file("length_extrapolation_chapter.json")))["schema"]
