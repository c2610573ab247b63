"""pebook.book.experiments._records: the helpers every experiment's results share."""

from __future__ import annotations

import json

import pytest
import torch

from pebook.book.experiments._records import (
    experiment_parser,
    jsonable,
    load_data_file,
    order_ranges,
    parse_experiment_args,
    parse_ints,
    read_data_file,
    seed_range,
)


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


def test_experiment_parser_shares_the_command_line_and_applies_threads(monkeypatch):
    parser = experiment_parser(
        "demo", "Demo.\n\nMore.", {"a": {}, "b": {}}, default_preset="b", subset=("--things", "h"), out_help="o"
    )
    args = parse_experiment_args(parser, ["--things", "x,y", "--seeds", "0,1"])
    assert (args.preset, args.things, args.seeds, args.out, args.threads, args.no_progress) == (
        "b",
        "x,y",
        "0,1",
        None,
        None,
        False,
    )
    assert not hasattr(args, "merge_into") and parser.prog == "python -m pebook.book.experiments.demo"
    with pytest.raises(SystemExit):
        parse_experiment_args(parser, ["--preset", "c"])  # not a preset
    merging = experiment_parser("demo", "D.", {"a": {}}, default_preset="a", subset=None, out_help="o", merge_help="m")
    set_threads = []
    monkeypatch.setattr(torch, "set_num_threads", set_threads.append)
    assert parse_experiment_args(merging, ["--merge-into", "f.json", "--threads", "3"]).merge_into == "f.json"
    assert set_threads == [3]

    seen = []
    results = load_data_file("retrieval_chapter.json", seen.append)
    assert seen == [results] and results["preset"] == "chapter"
