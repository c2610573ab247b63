"""The benchmark runs end to end and measures what it claims (ratios only, never absolute times).

Only the memory tests start worker processes (a CPU peak is measured in a fresh process); the
tests of the table and of the command line run in this process, with the CPU memory measurement
replaced by a stub.
"""

import subprocess

import pytest
import torch

from pebook.book import bench


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fail on any attempt to start a process; CPU peaks come from a stub (bytes ∝ L, reference = 100 × fast)."""
    references = {reference for _, reference in bench.PAIRS.values()}

    def refuse(*args, **kwargs):
        raise AssertionError(f"the format test must not start a subprocess: {args}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)

    def peak_stub(function, seq_len, head_dim, max_distance):
        return seq_len * (1000 if function in references else 10)

    monkeypatch.setattr(bench, "_peak_in_worker", peak_stub)
    monkeypatch.setattr(bench, "MIN_SECONDS", 0.0)  # time each call `repeats` times, no more


def test_shaw_peak_memory_is_far_below_the_naive_formula():
    # naive: two (L, L, d) float32 tensors = 2 * 512 * 512 * 64 * 4 B = 128 MiB; fast: O(L^2 + L(2k+1))
    fast, naive = bench.measure_pair(
        "shaw_attention", "shaw_attention_naive", 512, head_dim=64, max_distance=32, device="cpu", repeats=1
    )
    assert naive.peak_extra_bytes >= 2 * 512 * 512 * 64 * 4
    assert naive.peak_extra_bytes >= 10 * fast.peak_extra_bytes
    assert fast.seconds > 0 and naive.seconds > 0


def test_format_table_shows_each_pair_with_its_ratios():
    m = bench.Measurement
    results = [
        (m("shaw_attention", 64, "cpu", 0.002, 3 * 2**20), m("shaw_attention_naive", 64, "cpu", 0.010, 30 * 2**20)),
        (m("apply_rope", 64, "cpu", 0.001, None), m("apply_rope_complex", 64, "cpu", 0.003, None)),
    ]
    header, rule, shaw, rope = bench.format_table(results).splitlines()
    assert "time ×" in header and "memory ×" in header and set(rule) == {"-"} and len(rule) == len(header)
    assert shaw.split() == [
        "64",
        "shaw_attention",
        "2.00",
        "3.0",
        "shaw_attention_naive",
        "10.00",
        "30.0",
        "5.0",
        "10.0",
    ]
    assert rope.split() == ["64", "apply_rope", "1.00", "n/a", "apply_rope_complex", "3.00", "n/a", "3.0", "n/a"]


def test_table_reports_both_pairs_with_ratios(no_subprocess):
    results = bench.run_benchmark((16, 32), head_dim=8, max_distance=4, device="cpu", repeats=1, progress=False)
    assert [(a.function, b.function) for a, b in results] == list(bench.PAIRS.values()) * 2
    assert [a.seq_len for a, _ in results] == [16, 16, 32, 32]
    assert all(b.peak_extra_bytes == 100 * a.peak_extra_bytes for a, b in results)  # the stub's ratio
    table = bench.format_table(results).splitlines()
    assert "memory ×" in table[0] and len(table) == 2 + len(results)
    assert [row.split()[0] for row in table[2:]] == ["16", "16", "32", "32"]
    assert all(row.split()[-1] == "100.0" for row in table[2:])


def test_command_line_prints_the_table(no_subprocess, capsys):
    args = ["--device", "cpu", "--lengths", "16", "--head-dim", "8", "--max-distance", "4", "--repeats", "1"]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("pebook.book.bench on cpu") and "head_dim=8, Shaw k=4" in printed[0]
    assert [row.split()[1] for row in printed[3:5]] == ["shaw_attention", "apply_rope"]
    assert printed[-1] == "At L=16: the naive Shaw formula needs 100.0× the peak extra memory of shaw_attention."


def test_unknown_function_is_rejected():
    with pytest.raises(ValueError, match="function must be one of .*'nope'"):
        bench.measure_pair("nope", "apply_rope", 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_memory_is_measured_by_the_allocator():
    fast, naive = bench.measure_pair("shaw_attention", "shaw_attention_naive", 512, device="cuda", repeats=1)
    assert naive.peak_extra_bytes >= 10 * fast.peak_extra_bytes > 0
