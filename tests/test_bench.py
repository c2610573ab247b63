"""The benchmark runs end to end and measures what it claims (ratios only, never absolute times)."""

import pytest
import torch

from pebook import bench


def test_shaw_peak_memory_is_far_below_the_naive_formula():
    # naive: two (L, L, d) float32 tensors = 2 * 512 * 512 * 64 * 4 B = 128 MiB; fast: O(L^2 + L(2k+1))
    fast, naive = bench.measure_pair(
        "shaw_attention", "shaw_attention_naive", 512, head_dim=64, max_distance=32, device="cpu", repeats=1
    )
    assert naive.peak_extra_bytes >= 2 * 512 * 512 * 64 * 4
    assert naive.peak_extra_bytes >= 10 * fast.peak_extra_bytes
    assert fast.seconds > 0 and naive.seconds > 0


def test_table_reports_both_pairs_with_ratios():
    results = bench.run_benchmark((64,), head_dim=16, max_distance=8, device="cpu", repeats=1, progress=False)
    assert [(a.function, b.function) for a, b in results] == list(bench.PAIRS.values())
    table = bench.format_table(results).splitlines()
    assert "memory ×" in table[0] and len(table) == 2 + len(results)
    assert all(row.split()[0] == "64" for row in table[2:])


def test_unknown_function_is_rejected():
    with pytest.raises(ValueError, match="function must be one of .*'nope'"):
        bench.measure_pair("nope", "apply_rope", 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_memory_is_measured_by_the_allocator():
    fast, naive = bench.measure_pair("shaw_attention", "shaw_attention_naive", 512, device="cuda", repeats=1)
    assert naive.peak_extra_bytes >= 10 * fast.peak_extra_bytes > 0
