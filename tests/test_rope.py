"""pebook.rope: rotary position embedding (Su et al. 2021, RoFormer, §3.2-3.4), the registry's
``RoPE`` module, and RoFormer's long-term-decay bound (§3.4.3).

References (conftest): ``ref.rope`` multiplies each row by the explicit d×d block-diagonal
rotation matrix R^d_{Θ,m} of RoFormer eq. (15), with the blocks placed on the layout's feature
pairs; ``ref.rope_rotate_half`` is transformers' Llama/GPT-NeoX formula
``x·cos + rotate_half(x)·sin`` with ``cos = cat(freqs, freqs).cos()``. Partial rotary
(``rotary_dim``, GPT-NeoX's ``rotary_pct``, GPT-J's ``rotary_dim``) rotates the first
``rotary_dim`` features by ``ref.rope`` and passes the rest through. The decay bound's reference
is written from the paper's definitions in Python complex arithmetic: S_j = Σ_{k<j} e^{i r θ_k} and
the plotted "relative upper bound" (1/(d/2)) Σ_{j=1}^{d/2} |S_j| of RoFormer Fig. 2.
"""

import cmath
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import (
    DEFAULT_ROPE_BASE,
    RoPE,
    apply_rope,
    apply_rope_complex,
    rope_angles,
    rope_decay_bound,
    rope_frequencies,
    rope_layout_permutation,
)

F64 = torch.float64
LAYOUTS = ["half", "interleaved"]
dims = st.sampled_from([2, 4, 8, 16, 32])
decay_dims = st.sampled_from([2, 4, 8, 16, 64, 128])


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


def decay_bound_ref(r: float, dim: int, base: float = 10000.0) -> float:
    """(1/(d/2)) Σ_{j=1}^{d/2} |S_j|, S_j = Σ_{k<j} e^{i r θ_k}, by explicit loops."""
    thetas = [base ** (-2 * k / dim) for k in range(dim // 2)]
    total, partial = 0.0, 0j
    for theta in thetas:
        partial += cmath.exp(1j * r * theta)  # S_{j} after adding term k = j - 1
        total += abs(partial)
    return total / (dim // 2)


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


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(8, 4), (16, 8), (12, 2), (8, 8)])
def test_partial_rotary_rotates_the_first_features_only(device, ref, rand, layout, head_dim, rotary_dim):
    """rotary_dim r: features 0 … r-1 are rotated by R^r_{Θ,m} with Θ for dimension r (pairs
    (i, i + r/2) or (2i, 2i+1) within them); features r … d-1 pass through untouched."""
    x = rand(2, 3, 5, head_dim, seed=11, device=device)
    positions = torch.tensor([0, 1, 7, 100, 4097], device=device)
    theta = ref.frequencies(rotary_dim)
    out = apply_rope(x, positions, theta.to(device), layout, rotary_dim=rotary_dim)
    assert out.shape == x.shape and out.dtype == F64
    expected = ref.rope(x[..., :rotary_dim], positions.tolist(), theta, layout)
    torch.testing.assert_close(out[..., :rotary_dim], expected, rtol=0, atol=1e-12)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("layout", ["complex", "interleaved", "half"])
def test_batched_position_ids_rotate_each_sequence_at_its_positions(device, ref, rand, layout):
    """(batch, seq) position ids for x (batch, heads, seq, head_dim): sequence b, row s is rotated by
    position_ids[b, s], for every head."""
    x = rand(3, 2, 4, 8, seed=12, device=device)
    ids = torch.tensor([[0, 1, 2, 3], [9, 9, 0, 5000], [7, 3, 1, 0]], device=device)
    theta = ref.frequencies(8)
    out = rotate(x, ids, theta.to(device), layout)
    expected = torch.stack([ref.rope(x[b], ids[b].tolist(), theta, pair_layout(layout)) for b in range(3)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # partial rotary with batched positions
    part = apply_rope(x, ids, ref.frequencies(4).to(device), pair_layout(layout), 4)
    for b in range(3):
        torch.testing.assert_close(
            part[b, ..., :4],
            ref.rope(x[b, ..., :4], ids[b].tolist(), ref.frequencies(4), pair_layout(layout)),
            rtol=0,
            atol=1e-12,
        )
    assert torch.equal(part[..., 4:], x[..., 4:])


@pytest.mark.parametrize(
    "dim,base", [(2, 10000.0), (8, 10000.0), (64, 10000.0), (128, 10000.0), (128, 500000.0), (6, 3.0)]
)
def test_decay_bound_matches_reference(device, dim, base):
    distances = torch.tensor([0, 1, 2, 3, 10, 57, 100, 1000, 4095, -7], device=device)
    got = rope_decay_bound(distances, dim, base)
    assert got.dtype == F64 and got.shape == distances.shape and got.device.type == device.type
    expected = torch.tensor([decay_bound_ref(float(r), dim, base) for r in distances.tolist()], dtype=F64)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_decay_bound_at_fractional_distances_and_any_shape(device):
    distances = torch.tensor([[0.5, 2.25], [10.0, 1e4]], dtype=F64, device=device)
    got = rope_decay_bound(distances, 16)
    assert got.shape == (2, 2)
    expected = torch.tensor([[decay_bound_ref(r, 16) for r in row] for row in distances.tolist()], dtype=F64)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)
    # float32 distances give the same float64 result (they are converted, not computed in float32)
    torch.testing.assert_close(rope_decay_bound(distances.float(), 16), got, rtol=0, atol=1e-12)


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


@given(
    layout=st.sampled_from(LAYOUTS),
    half_rotary=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    m=st.integers(0, 10_000),
    n=st.integers(0, 10_000),
    s=st.integers(0, 10_000),
)
def test_partial_rotary_scores_stay_relative(device, layout, half_rotary, seed, m, n, s):
    """With rotary_dim < head_dim the score is the relative RoPE score of the rotated features
    plus the plain dot product of the others: still a function of m - n only."""
    dim, rotary_dim = 8, 2 * half_rotary
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, dim, generator=gen, dtype=F64).to(device) for _ in range(2))
    inv_freq = rope_frequencies(rotary_dim, dtype=F64, device=device)
    at = lambda x, p: apply_rope(x, torch.tensor([p], device=device), inv_freq, layout, rotary_dim)[0]  # noqa: E731
    score, shifted = at(q, m) @ at(k, n), at(q, m + s) @ at(k, n + s)
    assert abs(score.item() - shifted.item()) <= 1e-10 * (q.norm() * k.norm()).item()
    rest = q[0, rotary_dim:] @ k[0, rotary_dim:]
    rotated = at(q[:, :rotary_dim], m) @ at(k[:, :rotary_dim], n)
    assert math.isclose(score.item(), (rotated + rest).item(), abs_tol=1e-12 * (1 + (q.norm() * k.norm()).item()))


@given(seed=st.integers(0, 2**31), data=st.data())
def test_batched_positions_equal_per_sequence_calls(device, seed, data):
    ids = data.draw(st.lists(st.lists(st.integers(0, 10**5), min_size=3, max_size=3), min_size=1, max_size=3))
    x = torch.randn(len(ids), 2, 3, 8, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device)
    inv_freq = rope_frequencies(8, dtype=F64, device=device)
    for layout in LAYOUTS:
        batched = apply_rope(x, torch.tensor(ids, device=device), inv_freq, layout)
        for b, row in enumerate(ids):
            assert torch.equal(batched[b], apply_rope(x[b], torch.tensor(row, device=device), inv_freq, layout))


@given(dim=dims, seed=st.integers(0, 2**31), r=st.integers(-20_000, 20_000))
def test_abel_bound_holds_for_rope_scores(device, dim, seed, r):
    """RoFormer eq. (37): |Σ_i h_i e^{i r θ_i}| ≤ max_i |h_{i+1} - h_i| · Σ_j |S_j| with
    h_i = q^(i) conj(k^(i)), h_{d/2} = 0; and Re Σ_i h_i e^{i r θ_i} is pebook's RoPE score."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(dim, generator=gen, dtype=F64).to(device) for _ in range(2))
    h = torch.view_as_complex(q.view(-1, 2)) * torch.view_as_complex(k.view(-1, 2)).conj()
    theta = rope_frequencies(dim, dtype=F64, device=device)
    total = (h * torch.polar(torch.ones_like(theta), r * theta)).sum()
    dh = torch.cat((h, h.new_zeros(1))).diff()
    bound = rope_decay_bound(torch.tensor([r], device=device), dim)[0]
    assert total.abs().item() <= dh.abs().max().item() * bound.item() * (dim // 2) * (1 + 1e-12) + 1e-12
    m, n = (r, 0) if r >= 0 else (0, -r)
    qm = apply_rope(q[None], torch.tensor([m], device=device), theta, "interleaved")[0]
    kn = apply_rope(k[None], torch.tensor([n], device=device), theta, "interleaved")[0]
    assert math.isclose((qm @ kn).item(), total.real.item(), abs_tol=1e-9 * (1 + q.norm().item() * k.norm().item()))


@given(dim=dims, r=st.floats(-1e5, 1e5, allow_nan=False), base=st.floats(1.5, 1e6))
def test_decay_bound_is_even_and_between_trivial_bounds(device, dim, r, base):
    """|S_j(-r)| = |conj S_j(r)| makes the bound even in r; 1 ≤ |S_1| and |S_j| ≤ j give
    1/(d/2) ≤ bound ≤ (d/2 + 1)/2 = bound(0)."""
    values = rope_decay_bound(torch.tensor([r, -r, 0.0], dtype=F64, device=device), dim, base).tolist()
    assert math.isclose(values[0], values[1], rel_tol=1e-12, abs_tol=1e-12)
    assert 1 / (dim // 2) - 1e-12 <= values[0] <= values[2] + 1e-12
    assert math.isclose(values[2], (dim // 2 + 1) / 2, rel_tol=1e-14)


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


def test_snapshot_decay_bound_small_dims(device):
    """d = 2: one partial sum of modulus 1 at every distance. d = 4, base 10000: θ = (1, 0.01),
    so the bound is (|S_1| + |S_2|)/2 = (1 + |e^{ir} + e^{0.01 ir}|)/2 = (1 + 2|cos(0.495 r)|)/2."""
    r = torch.tensor([0.0, 1.0, 3.0, 100.0, math.pi / 0.99], dtype=F64, device=device)
    torch.testing.assert_close(rope_decay_bound(r, 2).cpu(), torch.ones(5, dtype=F64), rtol=0, atol=1e-15)
    expected = (1 + 2 * (0.495 * r.cpu()).cos().abs()) / 2
    torch.testing.assert_close(rope_decay_bound(r, 4).cpu(), expected, rtol=0, atol=1e-12)
    assert abs(rope_decay_bound(r, 4)[-1].item() - 0.5) < 1e-12  # S_2 = 0 at r = π / 0.99


def test_snapshot_roformer_curve(device):
    """d = 128, base 10000 (the chapter's figure): (d/2 + 1)/2 = 32.5 at r = 0, maximal there,
    decaying on the whole but not monotonically."""
    distances = torch.arange(0, 1025, device=device)
    bound = rope_decay_bound(distances, 128).cpu()
    assert bound[0].item() == pytest.approx(32.5, rel=1e-14)
    assert int(bound.argmax()) == 0
    torch.testing.assert_close(
        bound[[10, 100, 1000]], torch.tensor([17.9541, 10.2273, 4.4708], dtype=F64), rtol=0, atol=1e-4
    )
    assert bound[1000] < bound[0] / 6
    assert int((bound[1:] > bound[:-1]).sum()) > 100


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
    with pytest.raises(
        ValueError,
        match=r"2-D positions \(position_ids\) must have shape \(batch, seq\) = \(2, 4\) for x of shape "
        r"\(batch, heads, seq, head_dim\), got positions \(1, 4\) and x \(2, 4, 8\)$",
    ):
        fn(x, pos[None], f)  # (batch, seq) positions need head-major 4-D x
    with pytest.raises(
        ValueError, match=r"2-D positions .* = \(2, 4\) .* got positions \(1, 4\) and x \(2, 3, 4, 8\)$"
    ):
        fn(x[:, None].expand(2, 3, 4, 8), pos[None], f)  # batch mismatch
    with pytest.raises(ValueError, match=r"positions must be \(seq,\) or \(batch, seq\), got shape \(1, 1, 4\)$"):
        fn(x, pos[None, None], f)
    with pytest.raises(TypeError, match=r"positions must be an integer or floating tensor, got dtype torch.bool"):
        fn(x, pos > 1, f)
    with pytest.raises(TypeError, match=r"positions must be a torch.Tensor of positions, got list"):
        fn(x, [0, 1, 2, 3], f)
    with pytest.raises(ValueError, match=r"\(rotary_dim=8; head_dim=8\) must equal 2 \* len\(inv_freq\) = 6$"):
        fn(x, pos, f[:3])
    with pytest.raises(ValueError, match=r"head_dim=8\) must equal 2 \* len\(inv_freq\) = 10$"):
        fn(x, pos, rope_frequencies(10, device=device))
    with pytest.raises(
        ValueError, match=r"x must have an even head_dim \(x.shape\[-1\]; features rotate in pairs\), got 7$"
    ):
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


def test_decay_bound_rejects_bad_input(device):
    good = torch.arange(4, device=device)
    with pytest.raises(TypeError, match=r"distances must be a torch.Tensor of relative distances, got list"):
        rope_decay_bound([0, 1, 2], 8)
    with pytest.raises(TypeError, match=r"distances must be an integer or floating tensor, got dtype torch.bool"):
        rope_decay_bound(good > 1, 8)
    with pytest.raises(TypeError, match=r"distances must be an integer or floating tensor, got dtype torch.complex64"):
        rope_decay_bound(good.to(torch.complex64), 8)
    with pytest.raises(ValueError, match=r"dim must be even.*got 7$"):
        rope_decay_bound(good, 7)
    with pytest.raises(TypeError, match=r"dim must be an int, got 8.0"):
        rope_decay_bound(good, 8.0)
    with pytest.raises(ValueError, match=r"base must be a finite number > 1, got 1.0"):
        rope_decay_bound(good, 8, 1.0)


@pytest.mark.parametrize(
    "rotary_dim,error,pattern",
    [
        (3, ValueError, r"rotary_dim must be even and at most head_dim=8, got 3$"),
        (10, ValueError, r"rotary_dim must be even and at most head_dim=8, got 10$"),
        (0, ValueError, r"rotary_dim must be an int >= 2, got 0$"),
        (4.0, TypeError, r"rotary_dim must be an int, got 4.0 of type float$"),
        (6, ValueError, r"the rotated features \(rotary_dim=6; head_dim=8\) must equal 2 \* len\(inv_freq\) = 4$"),
    ],
)
def test_bad_rotary_dim_is_rejected(device, rotary_dim, error, pattern):
    x = torch.randn(1, 2, 3, 8, device=device)
    with pytest.raises(error, match=pattern):
        apply_rope(x, torch.arange(3, device=device), rope_frequencies(4, device=device), rotary_dim=rotary_dim)


# ---------------------------------------------------------------- the RoPE module


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_module_rotates_with_its_frequencies(device, ref, rand, layout, rotary_dim):
    enc = RoPE(head_dim=8, rope_base=500.0, rope_layout=layout, rotary_dim=rotary_dim).to(device)
    r = 8 if rotary_dim is None else rotary_dim
    assert enc.inv_freq.dtype == torch.float32 and enc.inv_freq.device.type == device.type
    torch.testing.assert_close(enc.inv_freq.cpu().double(), ref.frequencies(r, 500.0), rtol=2.0**-24, atol=0)
    assert enc.declared_parameters() == {"inv_freq": ((r // 2,), False)} and enc.num_learned_parameters() == 0
    x = rand(2, 3, 4, 8, seed=13, device=device)
    ids = torch.tensor([[0, 1, 2, 3], [50, 7, 7, 0]], device=device)
    assert torch.equal(enc.rotate(x, ids), apply_rope(x, ids, enc.inv_freq, layout, r))


def test_set_frequencies_installs_a_rule_and_its_attention_factor(device, rand):
    enc = RoPE(head_dim=8).to(device)
    new = rope_frequencies(8, 40000.0, dtype=F64, device=device)
    enc.set_frequencies(new, attention_factor=1.5)
    assert enc.inv_freq.dtype == torch.float32 and enc.inv_freq.device.type == device.type  # kept dtype, rounded once
    assert torch.equal(enc.inv_freq, new.float()) and enc.attention_factor == 1.5
    x = rand(1, 2, 3, 8, seed=14, device=device, dtype=torch.float32)
    ids = torch.tensor([[4, 5, 6]], device=device)
    # the factor multiplies the rotated q and k, so the logits by its square (YaRN's 1/t)
    torch.testing.assert_close(enc.rotate(x, ids), 1.5 * apply_rope(x, ids, new.float()), rtol=1e-6, atol=1e-7)
    enc.set_frequencies(new.float())
    assert enc.attention_factor == 1.0 and torch.equal(enc.rotate(x, ids), apply_rope(x, ids, new.float()))


@pytest.mark.parametrize(
    "inv_freq,factor,error,pattern",
    [
        (torch.ones(3), 1.0, ValueError, r"inv_freq must have rotary_dim/2 = 4 entries, got 3$"),
        (
            torch.ones(4, dtype=torch.long),
            1.0,
            TypeError,
            r"inv_freq must be a floating-point tensor, got dtype torch.int64$",
        ),
        (
            torch.ones(4, dtype=torch.bfloat16),
            1.0,
            TypeError,
            r"inv_freq.dtype must be one of torch.float32, torch.float64, got torch.bfloat16$",
        ),
        (torch.ones(1, 4), 1.0, ValueError, r"inv_freq must have 1 dimensions, got shape \(1, 4\)$"),
        ([1.0] * 4, 1.0, TypeError, r"inv_freq must be a torch.Tensor, got list$"),
        (torch.ones(4), 0.0, ValueError, r"attention_factor must be a finite number > 0, got 0.0$"),
        (torch.ones(4), float("inf"), ValueError, r"attention_factor must be a finite number > 0, got inf$"),
    ],
)
def test_set_frequencies_rejects_bad_input(inv_freq, factor, error, pattern):
    enc = RoPE(head_dim=8)
    before = enc.inv_freq.clone()
    with pytest.raises(error, match=pattern):
        enc.set_frequencies(inv_freq, factor)
    assert torch.equal(enc.inv_freq, before) and enc.attention_factor == 1.0  # nothing half-installed


@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
def test_half_module_keeps_float32_frequencies_and_float32_accuracy(device, rand, cast):
    """.half() / .to(bfloat16) keep inv_freq in float32, so at position 4100 (where the position
    itself is not representable in bfloat16) the rotated half-precision q is the float32 result
    rounded once to the half dtype."""
    enc = RoPE(head_dim=64).to(device)
    low = RoPE(head_dim=64).to(device).to(cast)
    assert low.inv_freq.dtype == torch.float32 and torch.equal(low.inv_freq, enc.inv_freq)
    x = rand(1, 2, 3, 64, seed=15, device=device, dtype=cast)
    ids = torch.tensor([[0, 4100, 30000]], device=device)
    out = low.rotate(x, ids)
    assert out.dtype == cast
    in_float32 = enc.rotate(x.float(), ids)
    torch.testing.assert_close(out.float(), in_float32, rtol=torch.finfo(cast).eps, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(head_dim=3), ValueError, r"rope needs an even head_dim \(features rotate in pairs\), got head_dim=3$"),
        (
            dict(head_dim=8, rotary_dim=10),
            ValueError,
            r"rope needs an even rotary_dim <= head_dim=8, got rotary_dim=10$",
        ),
        (dict(head_dim=8, rotary_dim=5), ValueError, r"rope needs an even rotary_dim <= head_dim=8, got rotary_dim=5$"),
        (dict(head_dim=8, rotary_dim=0), ValueError, r"rotary_dim must be an int >= 2, got 0$"),
        (dict(head_dim=8, rotary_dim=True), TypeError, r"rotary_dim must be an int, got True of type bool$"),
        (
            dict(head_dim=8, rope_layout="neox"),
            ValueError,
            r"rope_layout must be one of \('half', 'interleaved'\), got 'neox'$",
        ),
        (dict(head_dim=8, rope_base=1.0), ValueError, r"rope_base must be a finite number > 1, got 1.0$"),
        (dict(head_dim=8, rope_base="1e4"), TypeError, r"rope_base must be a real number, got '1e4' of type str$"),
        (dict(head_dim=0), ValueError, r"head_dim must be an int >= 1, got 0$"),
    ],
)
def test_module_rejects_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        RoPE(**kwargs)
