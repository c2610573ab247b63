"""pebook.sinusoidal: Vaswani et al. 2017, §3.5.

Reference: ``ref.sinusoidal_table`` / ``ref.frequencies`` (conftest), element-wise Python floats.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import sinusoidal_encoding, sinusoidal_frequencies, sinusoidal_shift_matrix

F64 = torch.float64
dims = st.sampled_from([2, 4, 8, 16, 64])
bases = st.sampled_from([10000.0, 500.0, 1.5])


# ---------------------------------------------------------------- (1) float64 reference


@pytest.mark.parametrize("dim,base", [(2, 10000.0), (8, 10000.0), (64, 10000.0), (6, 100.0), (16, 1.0001)])
def test_frequencies_match_formula(device, ref, dim, base):
    omega = sinusoidal_frequencies(dim, base, device=device)
    assert omega.dtype == F64 and omega.device.type == device.type and omega.shape == (dim // 2,)
    torch.testing.assert_close(omega.cpu(), ref.frequencies(dim, base), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dim,base", [(2, 10000.0), (8, 10000.0), (128, 10000.0), (16, 7.0)])
def test_wavelengths_run_geometrically_from_2pi_to_2pi_base_pow(device, dim, base):
    wavelengths = 2 * math.pi / sinusoidal_frequencies(dim, base, device=device).cpu()
    assert wavelengths[0].item() == pytest.approx(2 * math.pi, rel=1e-15)
    assert wavelengths[-1].item() == pytest.approx(2 * math.pi * base ** ((dim - 2) / dim), rel=1e-13)
    if dim > 2:
        ratios = wavelengths[1:] / wavelengths[:-1]
        torch.testing.assert_close(ratios, torch.full_like(ratios, base ** (2 / dim)), rtol=1e-13, atol=0)


@given(dim=st.integers(1, 256).map(lambda h: 2 * h), base=st.floats(1.001, 1e6))
def test_frequencies_form_a_geometric_sequence_from_one(device, dim, base):
    omega = sinusoidal_frequencies(dim, base, device=device).cpu()
    assert omega[0].item() == 1.0  # base^0, exactly
    assert (omega > 0).all() and (omega <= 1).all()
    if dim > 2:
        assert (omega.diff() < 0).all()
        ratios = omega[1:] / omega[:-1]
        torch.testing.assert_close(ratios, torch.full_like(ratios, base ** (-2 / dim)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("k,dim,base", [(1, 2, 10000.0), (5, 8, 10000.0), (-7, 6, 100.0), (123456, 16, 10000.0)])
def test_shift_matrix_matches_formula(device, k, dim, base):
    """Block i of M_k is [[cos kω_i, sin kω_i], [-sin kω_i, cos kω_i]] (Python floats, loops)."""
    expected = torch.zeros(dim, dim, dtype=F64)
    for i in range(dim // 2):
        angle = k * base ** (-2 * i / dim)
        c, s = math.cos(angle), math.sin(angle)
        expected[2 * i, 2 * i], expected[2 * i, 2 * i + 1] = c, s
        expected[2 * i + 1, 2 * i], expected[2 * i + 1, 2 * i + 1] = -s, c
    got = sinusoidal_shift_matrix(k, dim, base, dtype=F64, device=device)
    assert got.shape == (dim, dim) and got.device.type == device.type
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-10)  # |k·ω| up to 1.2e5: 1e-11 rounding
    assert sinusoidal_shift_matrix(k, dim, base, device=device).dtype == torch.float32


@pytest.mark.parametrize(
    "n,dim,base,offset",
    [(1, 2, 10000.0, 0), (50, 16, 10000.0, 0), (20, 8, 10000.0, 37), (10, 6, 100.0, 1000), (0, 4, 10000.0, 3)],
)
def test_table_matches_formula_float64(device, ref, n, dim, base, offset):
    table = sinusoidal_encoding(n, dim, base, offset, dtype=F64, device=device)
    assert table.shape == (n, dim) and table.dtype == F64 and table.device.type == device.type
    torch.testing.assert_close(table.cpu(), ref.sinusoidal_table(n, dim, base, offset), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_table_other_dtypes_are_the_float64_table_rounded(device, ref, dtype):
    # Angles are formed in float64, so even at position ~10^6 the float32 table is the true value
    # rounded once (a float32 angle p·ω would be off by up to p·2^-24 ≈ 0.06 rad there).
    offset = 1_000_000
    table = sinusoidal_encoding(5, 16, offset=offset, dtype=dtype, device=device)
    assert table.dtype == dtype
    expected = ref.sinusoidal_table(5, 16, 10000.0, offset)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(table.cpu().to(F64), expected, rtol=0, atol=eps)  # half an ulp plus slack


def test_table_offset_is_a_slice_of_the_longer_table(device):
    full = sinusoidal_encoding(30, 8, dtype=F64, device=device)
    part = sinusoidal_encoding(10, 8, offset=20, dtype=F64, device=device)
    torch.testing.assert_close(part, full[20:], rtol=0, atol=1e-15)


# ---------------------------------------------------------------- (2) properties


@given(dim=dims, base=bases, p=st.integers(0, 20_000), data=st.data())
def test_shift_is_a_linear_map(device, dim, base, p, data):
    """PE(p + k) = M_k PE(p) for every p and every k with p + k >= 0 (float64)."""
    k = data.draw(st.integers(-p, 20_000), label="k")
    pe_p = sinusoidal_encoding(1, dim, base, p, dtype=F64, device=device)[0]
    pe_pk = sinusoidal_encoding(1, dim, base, p + k, dtype=F64, device=device)[0]
    m_k = sinusoidal_shift_matrix(k, dim, base, dtype=F64, device=device)
    assert m_k.device.type == device.type
    # float64 angles of size ~4e4 carry ~1e-11 absolute rounding
    torch.testing.assert_close(m_k @ pe_p, pe_pk, rtol=0, atol=1e-9)


@given(dim=dims, base=bases, k=st.integers(-(10**6), 10**6))
def test_shift_matrix_is_orthogonal_and_inverse_is_transpose(device, dim, base, k):
    m_k = sinusoidal_shift_matrix(k, dim, base, dtype=F64, device=device)
    eye = torch.eye(dim, dtype=F64, device=device)
    torch.testing.assert_close(m_k @ m_k.T, eye, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        sinusoidal_shift_matrix(-k, dim, base, dtype=F64, device=device), m_k.T, rtol=0, atol=1e-15
    )


@given(dim=dims, base=bases, a=st.integers(-5000, 5000), b=st.integers(-5000, 5000))
def test_shift_matrices_compose(device, dim, base, a, b):
    m = lambda s: sinusoidal_shift_matrix(s, dim, base, dtype=F64, device=device)  # noqa: E731
    torch.testing.assert_close(m(a) @ m(b), m(a + b), rtol=0, atol=1e-11)


def test_shift_by_zero_is_identity(device):
    assert torch.equal(
        sinusoidal_shift_matrix(0, 12, dtype=F64, device=device), torch.eye(12, dtype=F64, device=device)
    )


@given(dim=dims, base=bases, p=st.integers(0, 5000), q=st.integers(0, 5000), k=st.integers(0, 5000))
def test_dot_product_depends_only_on_distance(device, dim, base, p, q, k):
    """PE(p)·PE(p+k) = Σ_i cos(k ω_i): the same for every p, and the same for k and -k
    (symmetric, so the dot product cannot tell before from after)."""
    pe = lambda pos: sinusoidal_encoding(1, dim, base, pos, dtype=F64, device=device)[0]  # noqa: E731
    forward = pe(p) @ pe(p + k)
    elsewhere = pe(q) @ pe(q + k)
    expected = sum(math.cos(k * base ** (-2 * i / dim)) for i in range(dim // 2))
    assert forward.item() == pytest.approx(expected, abs=1e-9)
    assert elsewhere.item() == pytest.approx(expected, abs=1e-9)
    if p >= k:  # looking back by k gives the same value as looking ahead by k
        assert (pe(p) @ pe(p - k)).item() == pytest.approx(expected, abs=1e-9)


@given(dim=dims, p=st.integers(0, 10**6))
def test_every_position_has_unit_pairs(device, dim, p):
    """Each (sin, cos) pair lies on the unit circle, so |PE(p)|² = d/2 for every p."""
    pe = sinusoidal_encoding(1, dim, offset=p, dtype=F64, device=device)[0]
    pairs = pe.reshape(-1, 2)
    torch.testing.assert_close((pairs**2).sum(-1), torch.ones(dim // 2, dtype=F64, device=device), rtol=0, atol=1e-14)


# ---------------------------------------------------------------- (3) frozen snapshots


def test_snapshot_first_positions(device):
    """Vaswani §3.5 by hand: PE(0) = (0, 1, 0, 1), PE(1, 0) = sin 1, PE(1, 1) = cos 1,
    PE(1, 2) = sin(1/100), PE(1, 3) = cos(1/100) for d = 4 (10000^(2/4) = 100). Decimal values from
    the float64 reference, rounded to 12 places; sin 1 = 0.841470984808, cos 1 = 0.540302305868 are
    standard tables."""
    table = sinusoidal_encoding(3, 4, dtype=F64, device=device).cpu()
    expected = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0],
            [0.841470984808, 0.540302305868, 0.009999833334, 0.999950000417],
            [0.909297426826, -0.416146836547, 0.019998666693, 0.999800006667],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(table, expected, rtol=0, atol=5e-13)


def test_snapshot_shift_matrix(device):
    """M_1 for d = 2: [[cos 1, sin 1], [-sin 1, cos 1]] (the rotation derived in §3.5's remark)."""
    m1 = sinusoidal_shift_matrix(1, 2, dtype=F64, device=device).cpu()
    expected = torch.tensor([[0.540302305868, 0.841470984808], [-0.841470984808, 0.540302305868]], dtype=F64)
    torch.testing.assert_close(m1, expected, rtol=0, atol=5e-13)


def test_snapshot_longest_wavelength_of_the_paper_model(device):
    """d_model = 512 (the paper's base model): the longest wavelength is 2π · 10000^(510/512)
    ≈ 60 611.48 (the paper says the wavelengths form a progression from 2π to 10000·2π)."""
    omega = sinusoidal_frequencies(512, device=device)
    assert (2 * math.pi / omega[-1]).item() == pytest.approx(60611.477, abs=1e-3)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("dim", [3, 7, 513])
def test_odd_dim_is_rejected(device, dim):
    with pytest.raises(ValueError, match=rf"dim must be even.*got {dim}$"):
        sinusoidal_encoding(4, dim, device=device)
    with pytest.raises(ValueError, match=rf"dim must be even.*got {dim}$"):
        sinusoidal_shift_matrix(1, dim, device=device)
    with pytest.raises(ValueError, match=rf"dim must be even.*got {dim}$"):
        sinusoidal_frequencies(dim, device=device)


@pytest.mark.parametrize("dim", [0, -2])
def test_non_positive_dim_is_rejected(device, dim):
    with pytest.raises(ValueError, match=rf"dim must be an int >= 2, got {dim}$"):
        sinusoidal_encoding(4, dim, device=device)


@pytest.mark.parametrize("base", [1.0, 0.5, 0.0, -10.0, float("inf"), float("nan")])
def test_base_must_exceed_one(device, base):
    with pytest.raises(ValueError, match=rf"base must be a finite number > 1, got {base!r}"):
        sinusoidal_encoding(4, 8, base, device=device)
    with pytest.raises(ValueError, match=rf"base must be a finite number > 1, got {base!r}"):
        sinusoidal_shift_matrix(1, 8, base, device=device)


def test_negative_n_positions_and_offset_are_rejected(device):
    with pytest.raises(ValueError, match=r"n_positions must be an int >= 0, got -1$"):
        sinusoidal_encoding(-1, 8, device=device)
    with pytest.raises(ValueError, match=r"offset must be an int >= 0, got -3$"):
        sinusoidal_encoding(2, 8, offset=-3, device=device)


@pytest.mark.parametrize(
    "name,kwargs", [("n_positions", dict(n_positions=True)), ("offset", dict(offset=False)), ("dim", dict(dim=True))]
)
def test_bools_are_not_ints(device, name, kwargs):
    args = dict(n_positions=2, dim=8) | kwargs
    with pytest.raises(TypeError, match=rf"{name} must be an int, got (True|False) of type bool"):
        sinusoidal_encoding(**args, device=device)
    if name == "dim":
        with pytest.raises(TypeError, match=r"dim must be an int, got True of type bool"):
            sinusoidal_shift_matrix(1, True, device=device)


def test_shift_k_must_be_an_int(device):
    with pytest.raises(TypeError, match=r"k must be an int, got 1.5 of type float"):
        sinusoidal_shift_matrix(1.5, 8, device=device)
    with pytest.raises(TypeError, match=r"k must be an int, got True of type bool"):
        sinusoidal_shift_matrix(True, 8, device=device)


def test_non_float_dtype_is_rejected(device):
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype, got torch.int64"):
        sinusoidal_encoding(2, 8, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype, got torch.int32"):
        sinusoidal_shift_matrix(1, 8, dtype=torch.int32, device=device)
