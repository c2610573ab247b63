"""pebook.alibi helpers used by the ALiBi chapter: the attention weights of a query under equal
content scores (``alibi_distance_weights``) and the distance at which they fall to a fraction of
the nearest key's (``alibi_effective_window``). Press, Smith & Lewis (2022, arXiv:2108.12409), §3.

References: the weights element by element in Python floats from
w_h(d) = exp(-m_h d) / Σ_d' exp(-m_h d'), and the weights read off real attention
(``ref.attention`` with the ALiBi bias, zero queries and one-hot values).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import alibi_slopes
from pebook.alibi import alibi_distance_weights, alibi_effective_window

F64 = torch.float64


def distance_weights_ref(slopes, n_keys: int) -> torch.Tensor:
    """w_h(d) = exp(-m_h d) / Σ_{d'} exp(-m_h d'), d = 0 … n_keys-1, in Python floats."""
    rows = []
    for m in slopes:
        m = float(m)
        numerators = [math.exp(-m * d) for d in range(n_keys)]
        total = math.fsum(numerators)
        rows.append([x / total for x in numerators])
    return torch.tensor(rows, dtype=F64).reshape(len(slopes), n_keys)


# ---------------------------------------------------------------- (1) reference


@pytest.mark.parametrize("n_heads,n_keys", [(1, 1), (4, 7), (8, 64), (12, 300), (6, 2048)])
def test_distance_weights_match_reference(device, n_heads, n_keys):
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    weights = alibi_distance_weights(slopes, n_keys)
    assert weights.shape == (n_heads, n_keys) and weights.dtype == F64 and weights.device.type == device.type
    expected = distance_weights_ref(slopes.tolist(), n_keys)
    torch.testing.assert_close(weights.cpu(), expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("n_heads,n_keys", [(4, 9), (8, 33)])
def test_distance_weights_are_the_weights_of_real_alibi_attention(device, ref, rand, n_heads, n_keys):
    """q = 0 makes every q·k equal; values = identity turn the output into the weights themselves."""
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    q = torch.zeros(1, n_heads, n_keys, 8, dtype=F64, device=device)
    k = rand(1, n_heads, n_keys, 8, seed=0, device=device)
    v = torch.eye(n_keys, dtype=F64, device=device).expand(1, n_heads, n_keys, n_keys)
    bias = ref.alibi_bias(n_keys, n_keys, slopes.tolist()).to(device)
    attention_weights = ref.attention(q, k, v, bias=bias)[0, :, -1, :]  # last query, keys j = 0 … n-1
    by_distance = attention_weights.flip(-1)  # column d: key j = n - 1 - d
    torch.testing.assert_close(alibi_distance_weights(slopes, n_keys), by_distance, rtol=1e-12, atol=1e-14)


def test_effective_window_matches_reference(device):
    slopes = alibi_slopes(8, dtype=F64, device=device)
    window = alibi_effective_window(slopes)
    assert window.shape == (8,) and window.dtype == F64 and window.device.type == device.type
    expected = torch.tensor([math.log(100.0) * 2.0**h for h in range(1, 9)], dtype=F64)
    torch.testing.assert_close(window.cpu(), expected, rtol=1e-14, atol=0)
    half = alibi_effective_window(slopes, fraction=0.5).cpu()
    torch.testing.assert_close(half, math.log(2.0) / slopes.cpu(), rtol=1e-14, atol=0)


def test_helpers_follow_the_slopes_dtype(device):
    for dtype in (torch.float32, F64):
        slopes = alibi_slopes(4, dtype=dtype, device=device)
        assert alibi_distance_weights(slopes, 5).dtype == dtype
        assert alibi_effective_window(slopes).dtype == dtype


# ---------------------------------------------------------------- (2) properties


@given(n_heads=st.integers(1, 40), n_keys=st.integers(1, 400))
def test_distance_weights_decay_geometrically(device, n_heads, n_keys):
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    weights = alibi_distance_weights(slopes, n_keys)
    torch.testing.assert_close(weights.sum(-1), torch.ones(n_heads, dtype=F64, device=device), rtol=0, atol=1e-12)
    assert (weights > 0).all()
    if n_keys > 1:  # w(d+1) / w(d) = exp(-m_h) at every distance
        ratio = weights[:, 1:] / weights[:, :-1]
        torch.testing.assert_close(ratio, torch.exp(-slopes)[:, None].expand_as(ratio), rtol=1e-12, atol=0)
        assert (weights[:, 1:] < weights[:, :-1]).all()  # strictly decreasing with distance


@given(n_heads=st.integers(1, 40), fraction=st.floats(1e-6, 0.9))
def test_window_is_where_the_weights_cross_the_fraction(device, n_heads, fraction):
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    window = alibi_effective_window(slopes, fraction)
    # exp(-m · window) = fraction
    torch.testing.assert_close(torch.exp(-slopes * window), torch.full_like(window, fraction), rtol=1e-12, atol=0)
    # the first integer distance with w(d) <= fraction · w(0) is ceil(window), read off the weights
    n_keys = int(window.max().ceil().item()) + 2
    relative = alibi_distance_weights(slopes, n_keys) / alibi_distance_weights(slopes, n_keys)[:, :1]
    first = (relative <= fraction).to(torch.int64).argmax(-1)
    near_integer = (window - window.round()).abs() < 1e-9  # too close to call in floating point
    assert torch.equal(first[~near_integer], window.ceil().to(torch.int64)[~near_integer])


# ---------------------------------------------------------------- (3) frozen snapshots


def test_snapshot_slope_one_half(device):
    """m = 1/2 over 3 keys: e^{-d/2} / (1 + e^{-1/2} + e^{-1})."""
    weights = alibi_distance_weights(torch.tensor([0.5], dtype=F64, device=device), 3)[0].cpu()
    total = 1 + math.exp(-0.5) + math.exp(-1)
    torch.testing.assert_close(weights, torch.tensor([1 / total, math.exp(-0.5) / total, math.exp(-1) / total],
                                                     dtype=F64), rtol=1e-15, atol=0)
    assert alibi_effective_window(torch.tensor([0.5], dtype=F64, device=device)).item() == pytest.approx(
        2 * math.log(100.0), rel=1e-15)


# ---------------------------------------------------------------- bad input


def test_distance_weights_reject_bad_input(device):
    slopes = alibi_slopes(4, device=device)
    with pytest.raises(ValueError, match=r"n_keys must be an int >= 1, got 0$"):
        alibi_distance_weights(slopes, 0)
    with pytest.raises(TypeError, match=r"n_keys must be an int, got 3.0 of type float"):
        alibi_distance_weights(slopes, 3.0)
    with pytest.raises(TypeError, match=r"slopes must be a floating-point tensor, got dtype torch.int64"):
        alibi_distance_weights(torch.ones(4, dtype=torch.long, device=device), 3)
    with pytest.raises(ValueError, match=r"slopes must have 1 dimensions, got shape \(2, 2\)"):
        alibi_distance_weights(torch.ones(2, 2, device=device), 3)
    with pytest.raises(TypeError, match=r"slopes must be a torch.Tensor, got list"):
        alibi_distance_weights([0.5], 3)


def test_effective_window_rejects_bad_input(device):
    slopes = alibi_slopes(4, device=device)
    for fraction in (1.0, 2.0):
        with pytest.raises(ValueError, match=rf"fraction must be in \(0, 1\), got {fraction}"):
            alibi_effective_window(slopes, fraction)
    for fraction in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"fraction must be a finite number > 0, got"):
            alibi_effective_window(slopes, fraction)
    with pytest.raises(TypeError, match=r"fraction must be a real number, got '0.1' of type str"):
        alibi_effective_window(slopes, "0.1")
    with pytest.raises(ValueError, match=r"slopes must all be > 0 .*got \[0.5, 0.0\]"):
        alibi_effective_window(torch.tensor([0.5, 0.0], device=device))
    with pytest.raises(TypeError, match=r"slopes must be a floating-point tensor, got dtype torch.int64"):
        alibi_effective_window(torch.ones(4, dtype=torch.long, device=device))
