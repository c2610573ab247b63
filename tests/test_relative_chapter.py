"""Helpers added for the chapters on learned and relative encodings.

* ``pebook.learned.learned_parameter_count`` — size of a learned absolute table (Gehring et al.
  2017, §3.1): ``max_positions × dim``.
* ``pebook.shaw.reachable_offsets`` — which rows of Shaw et al.'s ``(2k + 1, d)`` tables a
  ``q_len × k_len`` attention reads (Shaw, Uszkoreit & Vaswani 2018, §3.2); the reference is a
  loop over every visible (query, key) pair, and the defining property is checked against the
  gradients of ``pebook.shaw_attention`` in float64.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import LearnedPositionalEmbedding, shaw_attention
from pebook.learned import learned_parameter_count
from pebook.shaw import reachable_offsets

F64 = torch.float64


# ---------------------------------------------------------------- learned_parameter_count


@pytest.mark.parametrize(
    "max_positions,dim,expected",
    [(512, 768, 393_216), (512, 1024, 524_288), (1024, 768, 786_432), (1, 1, 1)],
    ids=["bert-base", "bert-large", "gpt2-small", "one"],
)
def test_parameter_count_snapshots(max_positions, dim, expected):
    assert learned_parameter_count(max_positions, dim) == expected


@given(max_positions=st.integers(1, 300), dim=st.integers(1, 64))
def test_parameter_count_is_the_size_of_the_table(device, max_positions, dim):
    table = LearnedPositionalEmbedding(max_positions, dim).to(device)
    count = learned_parameter_count(max_positions, dim)
    assert count == sum(p.numel() for p in table.parameters()) == max_positions * dim
    assert isinstance(count, int)


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        ((0, 8), ValueError, r"max_positions must be an int >= 1, got 0$"),
        ((8, -2), ValueError, r"dim must be an int >= 1, got -2$"),
        ((8.0, 8), TypeError, r"max_positions must be an int, got 8.0 of type float"),
        ((8, True), TypeError, r"dim must be an int, got True of type bool"),
    ],
)
def test_parameter_count_rejects_bad_arguments(args, error, pattern):
    with pytest.raises(error, match=pattern):
        learned_parameter_count(*args)


# ---------------------------------------------------------------- reachable_offsets


def reachable_ref(q_len, k_len, max_distance, causal=True, offset=None):
    """Loop over every (query, key) pair: query i at offset + i, key j at j; mark row
    clip(j - i, -k, k) + k of every visible pair (Shaw et al. 2018, §3.2)."""
    offset = k_len - q_len if offset is None else offset
    used = [False] * (2 * max_distance + 1)
    for i in range(q_len):
        for j in range(k_len):
            if causal and j > offset + i:
                continue
            used[max(-max_distance, min(max_distance, j - (offset + i))) + max_distance] = True
    return torch.tensor(used, dtype=torch.bool)


@pytest.mark.parametrize(
    "q_len,k_len,k,causal,offset",
    [(8, 8, 16, True, None), (8, 8, 16, False, None), (8, 8, 3, True, None), (2, 9, 4, True, None),
     (3, 6, 2, False, 1), (0, 5, 2, True, 0), (4, 4, 0, False, None)],
)
def test_reachable_matches_reference(device, q_len, k_len, k, causal, offset):
    got = reachable_offsets(q_len, k_len, k, causal, offset, device=device)
    assert got.dtype == torch.bool and got.shape == (2 * k + 1,) and got.device.type == device.type
    assert torch.equal(got.cpu(), reachable_ref(q_len, k_len, k, causal, offset))


def test_reachable_snapshots(device):
    offsets = torch.arange(-16, 17)
    # length 8, k = 16: the chapter's example
    assert torch.equal(reachable_offsets(8, 8, 16, causal=True, device=device).cpu(), (offsets <= 0) & (offsets > -8))
    assert torch.equal(reachable_offsets(8, 8, 16, causal=False, device=device).cpu(), offsets.abs() < 8)
    # k below the length: every row up to the end row is reached
    assert reachable_offsets(8, 8, 4, causal=True, device=device).tolist() == [True] * 5 + [False] * 4
    assert reachable_offsets(0, 0, 2, device=device).tolist() == [False] * 5


@given(
    lq=st.integers(1, 7), extra=st.integers(0, 5), md=st.integers(0, 10), causal=st.booleans(),
    use_offset=st.booleans(), seed=st.integers(0, 2**31),
)
def test_unreachable_rows_get_exactly_zero_gradient(device, lq, extra, md, causal, use_offset, seed):
    """The defining property: rows not reachable receive a gradient of exactly 0 from
    shaw_attention, and every reachable row of w^V receives a non-zero one (its gradient is
    Σ_i A_ir · upstream_i with A_ir > 0, eq. relative-value-scatter)."""
    lk = lq + extra
    offset = extra // 2 if use_offset else None
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 4, generator=gen, dtype=F64).to(device) for n in (lq, lk, lk))
    rel_k, rel_v = (torch.randn(2 * md + 1, 4, generator=gen, dtype=F64).to(device).requires_grad_() for _ in range(2))
    upstream = torch.randn(1, 2, lq, 4, generator=gen, dtype=F64).to(device)
    out = shaw_attention(q, k, v, rel_k, rel_v, md, causal, offset)
    g_k, g_v = torch.autograd.grad((out * upstream).sum(), (rel_k, rel_v))
    reachable = reachable_offsets(lq, lk, md, causal, offset, device=device)
    assert torch.equal(g_k[~reachable], torch.zeros_like(g_k[~reachable]))
    assert torch.equal(g_v[~reachable], torch.zeros_like(g_v[~reachable]))
    assert (g_v[reachable].abs().sum(-1) > 0).all()


@given(L=st.integers(1, 12), md=st.integers(0, 15))
def test_reachable_offsets_are_the_clipped_offsets_seen(device, L, md):
    """Self-attention at length L reads offsets -(L-1)..L-1 (only <= 0 when causal), clipped to ±k."""
    offsets = torch.arange(-md, md + 1)
    bidirectional = reachable_offsets(L, L, md, causal=False, device=device).cpu()
    causal = reachable_offsets(L, L, md, causal=True, device=device).cpu()
    assert torch.equal(bidirectional, offsets.abs() <= L - 1)
    assert torch.equal(causal, (offsets <= 0) & (offsets >= -(L - 1)))


@pytest.mark.parametrize(
    "args,kwargs,error,pattern",
    [
        ((-1, 3, 2), {}, ValueError, r"q_len must be an int >= 0, got -1$"),
        ((3, -3, 2), {}, ValueError, r"k_len must be an int >= 0, got -3$"),
        ((3, 3, -2), {}, ValueError, r"max_distance must be an int >= 0, got -2$"),
        ((3, 3, 2), {"offset": -1}, ValueError, r"offset must be an int >= 0, got -1$"),
        ((5, 3, 2), {}, ValueError, r"q_len=5 must be <= k_len=3"),
        ((3, 3, True), {}, TypeError, r"max_distance must be an int, got True of type bool"),
        ((3.0, 3, 2), {}, TypeError, r"q_len must be an int, got 3.0 of type float"),
        ((3, 3, 2), {"offset": 1.0}, TypeError, r"offset must be an int, got 1.0 of type float"),
    ],
)
def test_reachable_rejects_bad_arguments(device, args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        reachable_offsets(*args, device=device, **kwargs)
