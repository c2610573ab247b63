"""pebook.sinusoidal helpers of the sinusoidal chapter: the dot-product profile and the
least-squares shift map (Vaswani et al. 2017, §3.5).

Reference: ``ref.frequencies`` / ``ref.sinusoidal_table`` (conftest), element-wise Python floats.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook.sinusoidal import (
    fit_shift_map,
    sinusoidal_dot_profile,
    sinusoidal_encoding,
    sinusoidal_shift_matrix,
)

F64 = torch.float64
dims = st.sampled_from([2, 4, 8, 16, 64])
bases = st.sampled_from([10000.0, 500.0, 1.5])


# ---------------------------------------------------------------- (1) float64 reference


@pytest.mark.parametrize("dim,base", [(2, 10000.0), (8, 10000.0), (64, 10000.0), (6, 100.0)])
def test_dot_profile_matches_formula(device, ref, dim, base):
    """Σ_i cos(k ω_i), written from §3.5's frequencies with Python floats."""
    offsets = torch.tensor([[-300, -7, 0], [1, 2, 12345]], device=device)
    profile = sinusoidal_dot_profile(offsets, dim, base)
    assert profile.shape == offsets.shape and profile.dtype == F64 and profile.device.type == device.type
    omega = ref.frequencies(dim, base).tolist()
    expected = torch.tensor([[sum(math.cos(k * w) for w in omega) for k in row] for row in offsets.tolist()], dtype=F64)
    torch.testing.assert_close(profile.cpu(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim,base,offset", [(8, 10000.0, 0), (16, 10000.0, 500), (6, 100.0, 37)])
def test_dot_profile_is_the_gram_matrix_of_the_reference_table(device, ref, dim, base, offset):
    """PE(p)·PE(q) from the reference table equals the profile at q - p, for every pair."""
    table = ref.sinusoidal_table(40, dim, base, offset)
    positions = torch.arange(40)
    offsets = (positions[None, :] - positions[:, None]).to(device)
    torch.testing.assert_close(sinusoidal_dot_profile(offsets, dim, base).cpu(), table @ table.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim,base,k", [(8, 10000.0, 1), (16, 10000.0, 3), (8, 100.0, 20)])
def test_fit_recovers_the_shift_matrix(device, ref, dim, base, k):
    """On a well-conditioned table (small dim, positions spanning the slow waves) the fitted map
    is M_k itself and the residual is at rounding level."""
    table = ref.sinusoidal_table(4000, dim, base).to(device)
    m, residual = fit_shift_map(table, k)
    assert m.shape == (dim, dim) and m.dtype == F64 and m.device.type == device.type
    assert residual < 1e-12
    torch.testing.assert_close(m.cpu(), sinusoidal_shift_matrix(k, dim, base, dtype=F64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- (2) properties


@given(dim=dims, base=bases, k=st.integers(-10**6, 10**6))
def test_dot_profile_is_even_and_bounded(device, dim, base, k):
    both = sinusoidal_dot_profile(torch.tensor([k, -k], device=device), dim, base)
    assert both[0].item() == both[1].item()  # cos is even: no sense of direction
    assert abs(both[0].item()) <= dim / 2 + 1e-12


@given(dim=dims, base=bases, p=st.integers(0, 10**5), k=st.integers(0, 10**5))
def test_distance_depends_only_on_offset(device, dim, base, p, k):
    """|PE(p) - PE(p + k)|² = dim - 2 Σ_i cos(k ω_i), whatever p."""
    pe = lambda pos: sinusoidal_encoding(1, dim, base, pos, dtype=F64, device=device)[0]  # noqa: E731
    squared = ((pe(p) - pe(p + k)) ** 2).sum()
    expected = dim - 2 * sinusoidal_dot_profile(torch.tensor(k, device=device), dim, base)
    assert squared.item() == pytest.approx(expected.item(), abs=1e-9)


@given(dim=st.sampled_from([2, 4, 8]), base=st.sampled_from([10000.0, 100.0]), k=st.integers(1, 50),
       scale=st.floats(0.01, 100.0))
def test_fit_is_exact_for_the_encoding_and_scale_invariant(device, dim, base, k, scale):
    table = sinusoidal_encoding(600, dim, base, dtype=F64, device=device)
    _, residual = fit_shift_map(table, k)
    _, scaled_residual = fit_shift_map(scale * table, k)
    assert residual < 1e-10 and scaled_residual < 1e-10


@given(seed=st.integers(0, 2**31 - 1), dim=st.sampled_from([2, 8, 16]), k=st.integers(1, 10))
def test_fit_residual_is_large_for_unstructured_tables(device, rand, seed, dim, k):
    """Independent Gaussian rows: no linear map predicts row p + k from row p."""
    table = rand(20 * dim + k, dim, seed=seed, device=device)
    _, residual = fit_shift_map(table, k)
    assert residual > 0.7


def test_fit_on_a_float32_table_is_computed_in_float64(device):
    table = sinusoidal_encoding(200, 4, device=device)  # float32
    m, residual = fit_shift_map(table, 2)
    assert m.dtype == F64 and residual < 1e-6


# ---------------------------------------------------------------- (3) frozen snapshots


def test_snapshot_profile(device):
    """d = 4: ω = (1, 1/100), so Σ cos(k ω_i) at k = 1 is cos 1 + cos 0.01 = 0.540302305868 + 0.999950000417,
    and at k = 0 it is d/2 = 2."""
    profile = sinusoidal_dot_profile(torch.tensor([0, 1, -1], device=device), 4).cpu()
    expected = torch.tensor([2.0, 1.540252306285, 1.540252306285], dtype=F64)
    torch.testing.assert_close(profile, expected, rtol=0, atol=5e-13)


# ---------------------------------------------------------------- bad input


def test_profile_offsets_must_be_an_integer_tensor(device):
    with pytest.raises(TypeError, match=r"offsets must be an integer tensor, got dtype torch.float32"):
        sinusoidal_dot_profile(torch.tensor([1.0], device=device), 8)
    with pytest.raises(TypeError, match=r"offsets must be an integer tensor, got dtype torch.bool"):
        sinusoidal_dot_profile(torch.tensor([True], device=device), 8)
    with pytest.raises(TypeError, match=r"offsets must be a torch.Tensor, got list"):
        sinusoidal_dot_profile([1, 2], 8)


def test_profile_checks_dim_and_base(device):
    with pytest.raises(ValueError, match=r"dim must be even.*got 7$"):
        sinusoidal_dot_profile(torch.tensor([1], device=device), 7)
    with pytest.raises(ValueError, match=r"base must be a finite number > 1, got 1.0"):
        sinusoidal_dot_profile(torch.tensor([1], device=device), 8, 1.0)


def test_fit_rejects_bad_tables(device):
    with pytest.raises(ValueError, match=r"table must have 2 dimensions, got shape \(10,\)"):
        fit_shift_map(torch.zeros(10, device=device), 1)
    with pytest.raises(TypeError, match=r"table must be a floating-point tensor, got dtype torch.int64"):
        fit_shift_map(torch.zeros(10, 2, dtype=torch.long, device=device), 1)
    with pytest.raises(TypeError, match=r"table must be a torch.Tensor, got list"):
        fit_shift_map([[0.0, 1.0]] * 10, 1)


def test_fit_rejects_bad_offsets(device):
    table = sinusoidal_encoding(20, 8, device=device)
    with pytest.raises(ValueError, match=r"k must be an int >= 1, got 0$"):
        fit_shift_map(table, 0)
    with pytest.raises(TypeError, match=r"k must be an int, got True of type bool"):
        fit_shift_map(table, True)
    with pytest.raises(ValueError, match=r"k=13 leaves only n_positions - k = 7 row pairs.*dim \+ k = 21 rows, got 20"):
        fit_shift_map(table, 13)
