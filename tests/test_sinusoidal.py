"""pebook.sinusoidal: Vaswani et al. 2017, §3.5: the table, its shift matrices, the dot-product
profile, the least-squares shift map, and the registry's ``SinusoidalPE``.

Reference: ``ref.sinusoidal_table`` / ``ref.frequencies`` (conftest), element-wise Python floats.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import (
    SinusoidalPE,
    fit_shift_map,
    sinusoidal_dot_profile,
    sinusoidal_encoding,
    sinusoidal_frequencies,
    sinusoidal_shift_matrix,
)

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


@pytest.mark.parametrize("dim,base", [(8, 10000.0), (6, 100.0), (2, 10000.0)])
def test_embed_at_position_ids_is_the_table_rows(device, ref, dim, base):
    """SinusoidalPE.embed at arbitrary (batch, seq) position ids (repeated, unordered, large)
    returns PE(position_ids[b, s]) from §3.5, in the requested dtype."""
    pe = SinusoidalPE(dim=dim, sinusoidal_base=base).to(device)
    ids = torch.tensor([[0, 5, 5, 1, 999], [37, 2, 0, 998, 3]], device=device)
    out = pe.embed(ids, F64)
    assert out.shape == (2, 5, dim) and out.dtype == F64 and out.device.type == device.type
    table = ref.sinusoidal_table(1000, dim, base)
    torch.testing.assert_close(out.cpu(), table[ids.cpu()], rtol=0, atol=1e-12)
    low = pe.embed(ids, torch.float16)
    assert low.dtype == torch.float16
    torch.testing.assert_close(low.cpu().double(), table[ids.cpu()], rtol=0, atol=torch.finfo(torch.float16).eps)


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


@given(dim=dims, base=bases, k=st.integers(-(10**6), 10**6))
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


@given(
    dim=st.sampled_from([2, 4, 8]),
    base=st.sampled_from([10000.0, 100.0]),
    k=st.integers(1, 50),
    scale=st.floats(0.01, 100.0),
)
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


@given(dim=dims, base=bases, ids=st.lists(st.integers(0, 10**6), min_size=1, max_size=8))
def test_embed_agrees_with_the_table_at_any_position(device, dim, base, ids):
    pe = SinusoidalPE(dim=dim, sinusoidal_base=base)
    out = pe.embed(torch.tensor([ids], device=device), F64)[0]
    expected = torch.stack([sinusoidal_encoding(1, dim, base, p, dtype=F64, device=device)[0] for p in ids])
    assert torch.equal(out, expected)


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


def test_snapshot_profile(device):
    """d = 4: ω = (1, 1/100), so Σ cos(k ω_i) at k = 1 is cos 1 + cos 0.01 = 0.540302305868 + 0.999950000417,
    and at k = 0 it is d/2 = 2."""
    profile = sinusoidal_dot_profile(torch.tensor([0, 1, -1], device=device), 4).cpu()
    expected = torch.tensor([2.0, 1.540252306285, 1.540252306285], dtype=F64)
    torch.testing.assert_close(profile, expected, rtol=0, atol=5e-13)


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


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(dim=7), ValueError, r"dim must be even .*got 7$"),
        (dict(dim=0), ValueError, r"dim must be an int >= 2, got 0$"),
        (dict(dim=True), TypeError, r"dim must be an int, got True of type bool"),
        (dict(dim=8, sinusoidal_base=1.0), ValueError, r"sinusoidal_base must be a finite number > 1, got 1.0$"),
        (
            dict(dim=8, sinusoidal_base=float("nan")),
            ValueError,
            r"sinusoidal_base must be a finite number > 1, got nan$",
        ),
        (
            dict(dim=8, sinusoidal_base="1e4"),
            TypeError,
            r"sinusoidal_base must be a real number, got '1e4' of type str$",
        ),
    ],
)
def test_bad_module_options_are_rejected(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        SinusoidalPE(**kwargs)
