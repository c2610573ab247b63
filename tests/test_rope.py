"""pebook.rope: rotary position embedding (Su et al. 2021, RoFormer, §3.2-3.4).

References (conftest): ``ref.rope`` multiplies each row by the explicit d×d block-diagonal
rotation matrix R^d_{Θ,m} of RoFormer eq. (15), with the blocks placed on the layout's feature
pairs; ``ref.rope_rotate_half`` is transformers' Llama/GPT-NeoX formula
``x·cos + rotate_half(x)·sin`` with ``cos = cat(freqs, freqs).cos()``.
"""

import cmath
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import (
    DEFAULT_ROPE_BASE,
    apply_rope,
    apply_rope_complex,
    rope_angles,
    rope_frequencies,
    rope_layout_permutation,
)

F64 = torch.float64
LAYOUTS = ["half", "interleaved"]
dims = st.sampled_from([2, 4, 8, 16, 32])


def rotate(x, positions, inv_freq, layout):
    """pebook's rotation by name: 'complex' (apply_rope_complex) or an apply_rope layout."""
    if layout == "complex":
        return apply_rope_complex(x, positions, inv_freq)
    return apply_rope(x, positions, inv_freq, layout)


def pair_layout(layout):
    return "interleaved" if layout == "complex" else layout


def score_formula(q, k, m, n, theta, layout):
    """RoFormer eq. (16): ⟨f(q, m), f(k, n)⟩ = Re Σ_i q^(i) conj(k^(i)) e^{i(m-n)θ_i}, with q^(i) the
    complex number formed by feature pair i, in Python complex arithmetic."""
    dim = q.numel()
    if layout == "half":
        pairs = [(i, i + dim // 2) for i in range(dim // 2)]
    else:
        pairs = [(2 * i, 2 * i + 1) for i in range(dim // 2)]
    total = 0j
    for i, (a, b) in enumerate(pairs):
        qi, ki = complex(q[a], q[b]), complex(k[a], k[b])
        total += qi * ki.conjugate() * cmath.exp(1j * (m - n) * float(theta[i]))
    return total.real


# ---------------------------------------------------------------- frequencies and angles


@pytest.mark.parametrize("dim,base", [(2, 10000.0), (8, 10000.0), (64, 10000.0), (128, 500000.0), (6, 2.0)])
def test_frequencies_match_formula(device, ref, dim, base):
    f64 = rope_frequencies(dim, base, dtype=F64, device=device)
    f32 = rope_frequencies(dim, base, device=device)
    assert f32.dtype == torch.float32 and f64.device.type == device.type and f64.shape == (dim // 2,)
    expected = ref.frequencies(dim, base)
    torch.testing.assert_close(f64.cpu(), expected, rtol=1e-14, atol=0)
    # float32: the float64 value rounded once (relative error at most 2^-24)
    torch.testing.assert_close(f32.cpu().double(), expected, rtol=2.0**-24, atol=0)


def test_angles_are_positions_times_frequencies(device):
    inv_freq = rope_frequencies(8, dtype=F64, device=device)
    positions = torch.tensor([0, 3, 4100], device=device)
    angles = rope_angles(positions, inv_freq, F64)
    assert angles.shape == (3, 4) and angles.dtype == F64
    expected = torch.tensor([[p * 10000.0 ** (-2 * i / 8) for i in range(4)] for p in (0, 3, 4100)], dtype=F64)
    torch.testing.assert_close(angles.cpu(), expected, rtol=1e-15, atol=0)
    assert rope_angles(positions, inv_freq).dtype == torch.float32


# ---------------------------------------------------------------- (1) float64 reference


@pytest.mark.parametrize("layout", ["complex", "interleaved", "half"])
@pytest.mark.parametrize("shape", [(7, 8), (2, 3, 5, 16), (1, 2)])
def test_rotation_matches_rotation_matrix(device, ref, rand, layout, shape):
    x = rand(*shape, seed=1, device=device)
    positions = torch.tensor([0, 1, 2, 5, 17, 100, 4096][: shape[-2]], device=device)
    theta = ref.frequencies(shape[-1])
    out = rotate(x, positions, theta.to(device), layout)
    assert out.shape == x.shape and out.dtype == F64 and out.device.type == device.type
    expected = ref.rope(x, positions.tolist(), theta, pair_layout(layout))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_half_layout_matches_transformers_rotate_half(device, ref, rand):
    x = rand(2, 4, 9, 16, seed=2, device=device)
    positions = torch.arange(3, 12, device=device)
    inv_freq = ref.frequencies(16).to(device)
    expected = ref.rope_rotate_half(x, positions, inv_freq)
    torch.testing.assert_close(apply_rope(x, positions, inv_freq, "half"), expected, rtol=0, atol=1e-12)
    assert apply_rope(x, positions, inv_freq).equal(apply_rope(x, positions, inv_freq, "half"))  # default layout


@pytest.mark.parametrize("layout", ["complex", "interleaved", "half"])
def test_float32_matches_reference(device, ref, rand, tol32, layout):
    x = rand(3, 12, 32, seed=3, device=device, dtype=torch.float32)
    positions = torch.arange(12, device=device)  # angles <= 11 rad: float32 angle error < 1e-6
    out = rotate(x, positions, rope_frequencies(32, device=device), layout)
    assert out.dtype == torch.float32
    expected = ref.rope(x.double(), positions.tolist(), ref.frequencies(32), pair_layout(layout))
    torch.testing.assert_close(out.double(), expected, **tol32)


def test_complex_equals_interleaved(device, rand):
    for dtype, atol in ((F64, 1e-13), (torch.float32, 1e-5)):
        x = rand(2, 3, 50, 16, seed=4, device=device, dtype=dtype)
        positions = torch.arange(1000, 1050, device=device)
        inv_freq = rope_frequencies(16, dtype=dtype, device=device)
        torch.testing.assert_close(
            apply_rope_complex(x, positions, inv_freq),
            apply_rope(x, positions, inv_freq, "interleaved"),
            rtol=0,
            atol=atol,
        )


@given(dim=dims, seed=st.integers(0, 2**31), start=st.integers(0, 10**5))
def test_half_is_interleaved_after_the_permutation(device, dim, seed, start):
    x = torch.randn(3, 5, dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device)
    positions = torch.arange(start, start + 5, device=device)
    inv_freq = rope_frequencies(dim, dtype=F64, device=device)
    perm = rope_layout_permutation(dim, device=device)
    inv = perm.argsort()
    half = apply_rope(x, positions, inv_freq, "half")
    via_interleaved = apply_rope(x[..., perm], positions, inv_freq, "interleaved")[..., inv]
    torch.testing.assert_close(half, via_interleaved, rtol=1e-14, atol=1e-14)  # a few ulps at most
    # and the two layouts really are different functions (a checkpoint cannot switch silently)
    if dim > 2 and start > 0:
        assert (half - apply_rope(x, positions, inv_freq, "interleaved")).abs().max() > 1e-3


# ---------------------------------------------------------------- (2) properties


@given(
    dim=dims,
    layout=st.sampled_from(["complex", "interleaved", "half"]),
    seed=st.integers(0, 2**31),
    m=st.integers(0, 10_000),
    n=st.integers(0, 10_000),
    s=st.integers(-10_000, 10_000),
)
def test_scores_depend_only_on_relative_position(device, dim, layout, seed, m, n, s):
    """⟨f(q, m), f(k, n)⟩ = ⟨f(q, m+s), f(k, n+s)⟩ and equals RoFormer eq. (16) (float64)."""
    s = max(s, -min(m, n))
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(dim, generator=gen, dtype=F64).to(device) for _ in range(2))
    inv_freq = rope_frequencies(dim, dtype=F64, device=device)
    at = lambda x, p: rotate(x[None], torch.tensor([p], device=device), inv_freq, layout)[0]  # noqa: E731
    score = at(q, m) @ at(k, n)
    shifted = at(q, m + s) @ at(k, n + s)
    scale = (q.norm() * k.norm()).item()
    assert abs(score.item() - shifted.item()) <= 1e-10 * scale
    expected = score_formula(q.cpu(), k.cpu(), m, n, inv_freq.cpu(), layout)
    assert abs(score.item() - expected) <= 1e-10 * scale


@given(
    dim=dims,
    layout=st.sampled_from(["complex", "interleaved", "half"]),
    seed=st.integers(0, 2**31),
    positions=st.lists(st.integers(0, 10**6), min_size=1, max_size=6),
)
def test_rotation_preserves_every_pair_norm(device, ref, dim, layout, seed, positions):
    """Each feature pair is rotated, never scaled: pair norms and the vector norm are unchanged."""
    x = torch.randn(2, len(positions), dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device)
    out = rotate(x, torch.tensor(positions, device=device), rope_frequencies(dim, dtype=F64, device=device), layout)
    pairs = torch.tensor(ref.rope_pairs(dim, pair_layout(layout)), device=device)  # (dim/2, 2)
    pair_norm = lambda t: t[..., pairs].pow(2).sum(-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)


@given(
    dim=dims,
    layout=st.sampled_from(["complex", "interleaved", "half"]),
    seed=st.integers(0, 2**31),
    m=st.lists(st.integers(0, 5000), min_size=4, max_size=4),
    n=st.lists(st.integers(0, 5000), min_size=4, max_size=4),
)
def test_rotations_compose(device, dim, layout, seed, m, n):
    """Rotating by n and then by m is rotating by m + n: R_m R_n = R_{m+n}."""
    x = torch.randn(4, dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device)
    inv_freq = rope_frequencies(dim, dtype=F64, device=device)
    m_t, n_t = torch.tensor(m, device=device), torch.tensor(n, device=device)
    twice = rotate(rotate(x, n_t, inv_freq, layout), m_t, inv_freq, layout)
    torch.testing.assert_close(twice, rotate(x, m_t + n_t, inv_freq, layout), rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["complex", "interleaved", "half"])
def test_positions_act_row_by_row(device, rand, layout):
    """Row r is rotated by positions[r] alone: an offset block equals the tail of the full block,
    position 0 is the identity, and fractional positions (position interpolation) compose."""
    x = rand(2, 10, 8, seed=5, device=device)
    inv_freq = rope_frequencies(8, dtype=F64, device=device)
    full = rotate(x, torch.arange(10, device=device), inv_freq, layout)
    tail = rotate(x[:, 6:], torch.arange(6, 10, device=device), inv_freq, layout)
    torch.testing.assert_close(tail, full[:, 6:], rtol=1e-14, atol=1e-14)
    single = rotate(x[:, 3:4], torch.tensor([3], device=device), inv_freq, layout)
    torch.testing.assert_close(single, full[:, 3:4], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rotate(x, torch.zeros(10, device=device), inv_freq, layout), x, rtol=0, atol=0)
    half_step = torch.full((10,), 0.5, dtype=F64, device=device)
    twice = rotate(rotate(x, half_step, inv_freq, layout), half_step, inv_freq, layout)
    torch.testing.assert_close(twice, rotate(x, torch.ones(10, device=device), inv_freq, layout), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["complex", "interleaved", "half"])
def test_low_precision_input_keeps_its_dtype_and_float32_accuracy(device, rand, dtype, layout):
    x = rand(2, 16, 32, seed=6, device=device, dtype=dtype)
    positions = torch.arange(16, device=device)
    inv_freq = rope_frequencies(32, device=device)
    out = rotate(x, positions, inv_freq, layout)
    assert out.dtype == dtype and out.shape == x.shape
    in_float32 = rotate(x.float(), positions, inv_freq, layout)
    # the only extra error is the final rounding to the input dtype: half an ulp, relative
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), in_float32, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_bf16_angles_would_ruin_large_positions(device, ref, rand, layout):
    """At position 4100 bfloat16 cannot even represent the position (it rounds to 4096, an angle
    error of 4 rad for θ_0 = 1). pebook forms angles in float32, so its bf16 result is within bf16
    output rounding of the float64 truth, while a naive all-bf16 computation is wrong by O(1)."""
    dim = 64
    x = rand(1, dim, seed=7, device=device, dtype=torch.bfloat16)
    positions = torch.tensor([4100], device=device)
    truth = ref.rope(x.double(), [4100], ref.frequencies(dim), layout)
    ours = apply_rope(x, positions, rope_frequencies(dim, device=device), layout)

    angles = positions.to(torch.bfloat16)[:, None] * rope_frequencies(dim, device=device).to(torch.bfloat16)[None, :]
    assert positions.to(torch.bfloat16).item() == 4096.0
    cos, sin = angles.cos(), angles.sin()
    if layout == "half":
        x1, x2 = x.chunk(2, -1)
        naive = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        naive = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)

    err_ours = (ours.double() - truth).abs().max().item()
    err_naive = (naive.double() - truth).abs().max().item()
    assert err_ours < 0.03  # bf16 has 8 significant bits: |x| <= 4 rounds by at most 2^-6
    assert err_naive > 0.5
    assert err_naive > 30 * err_ours


def rope_with_mixed_layouts(x, positions, inv_freq):
    """A bug seen in the wild: interleaved pairing (x[..., 0::2], x[..., 1::2]) combined with the
    half-split cos/sin cache cat(freqs, freqs) and rotate_half's concatenation of halves."""
    freqs = torch.outer(positions.to(F64), inv_freq.to(F64))
    emb = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def test_mixed_layout_bug_loses_relative_position_while_pebook_keeps_it(device, rand):
    dim = 16
    q, k = rand(dim, seed=8, device=device), rand(dim, seed=9, device=device)
    inv_freq = rope_frequencies(dim, dtype=F64, device=device)
    pairs = [(5, 2), (10, 7), (40, 37), (100, 97), (1000, 997)]  # all with m - n = 3

    def scores(fn):
        out = []
        for m, n in pairs:
            qm = fn(q[None], torch.tensor([m], device=device), inv_freq)[0]
            kn = fn(k[None], torch.tensor([n], device=device), inv_freq)[0]
            out.append((qm @ kn).item())
        return torch.tensor(out)

    scale = (q.norm() * k.norm()).item()
    for layout in LAYOUTS:
        ours = scores(lambda x, p, f, layout=layout: apply_rope(x, p, f, layout))
        assert (ours.max() - ours.min()).item() < 1e-10 * scale
    buggy = scores(rope_with_mixed_layouts)
    assert (buggy.max() - buggy.min()).item() > 0.05 * scale
    # ...and the buggy map is not even a rotation: it changes norms
    rotated = rope_with_mixed_layouts(q[None], torch.tensor([7], device=device), inv_freq)[0]
    assert abs(rotated.norm().item() - q.norm().item()) > 1e-3


# ---------------------------------------------------------------- (3) frozen snapshots


def test_snapshot_llama_frequencies_and_first_rotation(device):
    """Meta's Llama ``precompute_freqs_cis`` for dim = 8, θ = 10000 gives frequencies
    1/10000^(0/8, 2/8, 4/8, 6/8) = (1, 0.1, 0.01, 0.001). Rotating e_0 = (1, 0, …) by position 1
    (interleaved, RoFormer eq. 13) gives (cos 1, sin 1, 0, …); in the half layout the partner of
    feature 0 is feature d/2 = 4."""
    assert DEFAULT_ROPE_BASE == 10000.0
    f = rope_frequencies(8, dtype=F64, device=device)
    torch.testing.assert_close(f.cpu(), torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=F64), rtol=1e-15, atol=0)
    e0 = torch.zeros(1, 8, dtype=F64, device=device)
    e0[0, 0] = 1.0
    one = torch.tensor([1], device=device)
    c, s = 0.540302305868, 0.841470984808
    for layout, partner in (("interleaved", 1), ("half", 4)):
        expected = torch.zeros(8, dtype=F64)
        expected[0], expected[partner] = c, s
        torch.testing.assert_close(apply_rope(e0, one, f, layout)[0].cpu(), expected, rtol=0, atol=5e-13)
    # second pair (features 2, 3) turns at θ_1 = 0.1: e_2 at position 10 -> (cos 1, sin 1) there
    e2 = torch.zeros(1, 8, dtype=F64, device=device)
    e2[0, 2] = 1.0
    got = apply_rope_complex(e2, torch.tensor([10], device=device), f)[0].cpu()
    torch.testing.assert_close(got[2:4], torch.tensor([c, s], dtype=F64), rtol=0, atol=5e-13)


@pytest.mark.parametrize("dim", [2, 4, 8, 64])
def test_layout_permutation_matches_definition(device, dim):
    """perm = [0, d/2, 1, d/2 + 1, …]: slot 2i holds feature i and slot 2i+1 feature i + d/2."""
    expected = []
    for i in range(dim // 2):
        expected += [i, i + dim // 2]
    perm = rope_layout_permutation(dim, device=device)
    assert perm.device.type == device.type and perm.tolist() == expected
    assert sorted(perm.tolist()) == list(range(dim))  # a permutation


@given(dim=st.integers(1, 256).map(lambda h: 2 * h), base=st.floats(1.001, 1e7))
def test_frequencies_are_decreasing_and_start_at_one(device, dim, base):
    f = rope_frequencies(dim, base, dtype=F64, device=device).cpu()
    assert f[0].item() == 1.0 and (f > 0).all() and (f <= 1).all()
    if dim > 2:
        assert (f.diff() < 0).all()
        torch.testing.assert_close(
            f[1:] / f[:-1], torch.full((dim // 2 - 1,), base ** (-2 / dim), dtype=F64), rtol=1e-12, atol=0
        )


def test_snapshot_layout_permutation(device):
    assert rope_layout_permutation(6, device=device).tolist() == [0, 3, 1, 4, 2, 5]
    assert rope_layout_permutation(2, device=device).tolist() == [0, 1]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("dim", [3, 9, 127])
def test_odd_dim_is_rejected(device, dim):
    with pytest.raises(ValueError, match=rf"dim must be even.*got {dim}$"):
        rope_frequencies(dim, device=device)
    with pytest.raises(ValueError, match=rf"dim must be even.*got {dim}$"):
        rope_layout_permutation(dim, device=device)


@pytest.mark.parametrize("base", [1.0, 0.99, 0.0, -2.0])
def test_base_must_exceed_one(device, base):
    with pytest.raises(ValueError, match=rf"base must be a finite number > 1, got {base!r}"):
        rope_frequencies(8, base, device=device)


def test_frequency_dtype_must_be_float32_or_float64(device):
    with pytest.raises(TypeError, match=r"dtype must be one of torch.float32, torch.float64, got torch.bfloat16"):
        rope_frequencies(8, dtype=torch.bfloat16, device=device)
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype, got torch.int64"):
        rope_frequencies(8, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match=r"dtype must be one of torch.float32, torch.float64, got torch.float16"):
        rope_angles(torch.arange(3, device=device), rope_frequencies(8, device=device), torch.float16)


@pytest.mark.parametrize("fn", [apply_rope, apply_rope_complex], ids=["apply_rope", "apply_rope_complex"])
def test_bad_tensors_are_rejected(device, fn):
    x = torch.randn(2, 4, 8, device=device)
    pos = torch.arange(4, device=device)
    f = rope_frequencies(8, device=device)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        fn(x.long(), pos, f)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., seq, head_dim\), got shape \(8,\)"):
        fn(x[0, 0], pos[:1], f)
    with pytest.raises(ValueError, match=r"positions has 5 entries but x has seq=4 rows"):
        fn(x, torch.arange(5, device=device), f)
    with pytest.raises(ValueError, match=r"positions has 3 entries but x has seq=4 rows"):
        fn(x, pos[:3], f)
    with pytest.raises(ValueError, match=r"positions must be 1-D .* got shape \(1, 4\)"):
        fn(x, pos[None], f)
    with pytest.raises(TypeError, match=r"positions must be an integer or floating tensor, got dtype torch.bool"):
        fn(x, pos > 1, f)
    with pytest.raises(TypeError, match=r"positions must be a 1-D torch.Tensor of positions, got list"):
        fn(x, [0, 1, 2, 3], f)
    with pytest.raises(ValueError, match=r"head_dim=8\) must equal 2 \* len\(inv_freq\) = 6"):
        fn(x, pos, f[:3])
    with pytest.raises(ValueError, match=r"head_dim=8\) must equal 2 \* len\(inv_freq\) = 10"):
        fn(x, pos, rope_frequencies(10, device=device))
    with pytest.raises(ValueError, match=r"head_dim=7\) must equal 2 \* len\(inv_freq\) = 6"):
        fn(x[..., :7], pos, f[:3])
    with pytest.raises(TypeError, match=r"inv_freq must be a floating-point tensor, got dtype torch.int64"):
        fn(x, pos, f.long())
    with pytest.raises(ValueError, match=r"inv_freq must have 1 dimensions, got shape \(1, 4\)"):
        fn(x, pos, f[None])
    with pytest.raises(
        TypeError, match=r"inv_freq.dtype must be one of torch.float32, torch.float64, got torch.bfloat16"
    ):
        fn(x, pos, f.bfloat16())


def test_unknown_layout_is_rejected(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"layout must be one of \('half', 'interleaved'\), got 'neox'"):
        apply_rope(x, torch.arange(4, device=device), rope_frequencies(8, device=device), "neox")


@pytest.mark.cuda
@pytest.mark.parametrize("fn", [apply_rope, apply_rope_complex], ids=["apply_rope", "apply_rope_complex"])
def test_mixed_devices_are_rejected(cuda_device, fn):
    x = torch.randn(4, 8, device=cuda_device)
    pos, f = torch.arange(4), rope_frequencies(8)
    with pytest.raises(ValueError, match=r"positions is on cpu but x is on cuda(:0)?"):
        fn(x, pos, f.to(cuda_device))
    with pytest.raises(ValueError, match=r"inv_freq is on cpu but x is on cuda(:0)?"):
        fn(x, pos.to(cuda_device), f)


def test_score_formula_is_a_valid_reference(ref, rand):
    """Self-check of the eq. (16) helper against the matrix reference (guards the guard)."""
    q, k = rand(8, seed=10, device="cpu"), rand(8, seed=11, device="cpu")
    theta = ref.frequencies(8)
    for layout in ("interleaved", "half"):
        direct = ref.rope(q[None], [7], theta, layout)[0] @ ref.rope(k[None], [3], theta, layout)[0]
        assert math.isclose(direct.item(), score_formula(q, k, 7, 3, theta, layout), abs_tol=1e-12)
