"""pebook.xpos: xPos, RoPE with a per-pair exponential decay (Sun et al. 2022, arXiv:2212.10554, §3).

References (this module, float64, written from the paper's equations; none calls pebook):
``zeta_ref`` is ζ_i = (2i/d + γ)/(1 + γ); ``xpos_ref`` transforms each row pair by pair in Python
complex arithmetic, x^(i) · ζ_i^{±p/B} · e^{i p θ_i} (+ for a query at n, - for a key at m), with
θ_i = base^(-2i/d) and the layout's feature pairs; ``score_ref`` is the paper's score
Re Σ_i q^(i) conj(k^(i)) ζ_i^{(n-m)/B} e^{i(n-m)θ_i}. ``torchscale_scores_ref`` writes out the
reference code's convention (torchscale ``XPOS``: interleaved pairs, the scale's exponent centred
on the sequence) to show that pebook's absolute positions give the same scores. The generic tests
(attention, TinyLM, GQA, KV cache, half precision) pick ``"xpos"`` up from the registry.
"""

import cmath
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook
from pebook.xpos import XPos, apply_xpos, xpos_max_position, xpos_scales, xpos_zeta

F64 = torch.float64
LAYOUTS = ["interleaved", "half"]
ROLES = ["query", "key"]
dims = st.sampled_from([2, 4, 8, 16])


def pairs_of(dim, layout):
    """Feature pairs: (2i, 2i+1) interleaved (paper, torchscale), (i, i + d/2) half-split."""
    if layout == "interleaved":
        return [(2 * i, 2 * i + 1) for i in range(dim // 2)]
    return [(i, i + dim // 2) for i in range(dim // 2)]


def zeta_ref(dim, gamma=0.4):
    """ζ_i = (i/(d/2) + γ) / (1 + γ), i = 0 … d/2 - 1."""
    return [(i / (dim / 2) + gamma) / (1 + gamma) for i in range(dim // 2)]


def theta_ref(dim, base=10000.0):
    return [base ** (-2 * i / dim) for i in range(dim // 2)]


def xpos_ref(x, positions, role, scale_base=512.0, gamma=0.4, layout="interleaved", base=10000.0, theta=None):
    """f_q (role "query") or f_k ("key") of each row of x (..., seq, d) at positions (seq,), float64;
    ``theta`` overrides base^(-2i/d) (a module's float32 frequencies)."""
    dim = x.shape[-1]
    sign = 1 if role == "query" else -1
    zeta, theta = zeta_ref(dim, gamma), theta_ref(dim, base) if theta is None else theta
    rows = x.detach().to("cpu", F64).reshape(-1, x.shape[-2], dim)
    out = rows.clone()
    for r in range(rows.shape[0]):
        for s, p in enumerate(positions):
            for i, (a, b) in enumerate(pairs_of(dim, layout)):
                z = complex(rows[r, s, a], rows[r, s, b]) * zeta[i] ** (sign * p / scale_base)
                z *= cmath.exp(1j * p * theta[i])
                out[r, s, a], out[r, s, b] = z.real, z.imag
    return out.reshape(x.shape).to(x.device)


def score_ref(q, k, n, m, scale_base=512.0, gamma=0.4, layout="interleaved", base=10000.0, theta=None):
    """The paper's score Re Σ_i q^(i) conj(k^(i)) ζ_i^{(n-m)/B} e^{i(n-m)θ_i} of vectors q, k (d,)."""
    dim = q.numel()
    zeta, theta = zeta_ref(dim, gamma), theta_ref(dim, base) if theta is None else theta
    total = 0j
    for i, (a, b) in enumerate(pairs_of(dim, layout)):
        qi, ki = complex(q[a], q[b]), complex(k[a], k[b])
        total += qi * ki.conjugate() * zeta[i] ** ((n - m) / scale_base) * cmath.exp(1j * (n - m) * theta[i])
    return total.real


def torchscale_scores_ref(q, k, scale_base, theta):
    """Scores q'_n · k'_m of torchscale's XPOS for one sequence q, k (L, d): rotation at 0 … L-1
    (interleaved pairs), scale ζ^{±(p + min_pos)/B} with the centred ``min_pos = -L // 2``."""
    length, dim = q.shape
    zeta = zeta_ref(dim)
    min_pos = -length // 2

    def transform(x, sign):
        out = x.clone()
        for p in range(length):
            for i, (a, b) in enumerate(pairs_of(dim, "interleaved")):
                z = complex(x[p, a], x[p, b]) * zeta[i] ** (sign * (p + min_pos) / scale_base)
                z *= cmath.exp(1j * p * theta[i])
                out[p, a], out[p, b] = z.real, z.imag
        return out

    return transform(q.double().cpu(), 1) @ transform(k.double().cpu(), -1).T


def xpos_scores(enc, q, k, q_pos, k_pos):
    """pebook's scores rotate_queries(q) · rotate(k) for (seq, d) rows."""
    return enc.rotate_queries(q[None, None], q_pos)[0, 0] @ enc.rotate(k[None, None], k_pos)[0, 0].T


# ---------------------------------------------------------------- (1) float64 reference


@pytest.mark.parametrize("dim,gamma", [(2, 0.4), (8, 0.4), (64, 0.4), (6, 1.0), (16, 0.05)])
def test_zeta_matches_formula(device, dim, gamma):
    zeta = xpos_zeta(dim, gamma, device=device)
    assert zeta.dtype == F64 and zeta.shape == (dim // 2,) and zeta.device.type == device.type
    torch.testing.assert_close(zeta.cpu(), torch.tensor(zeta_ref(dim, gamma), dtype=F64), rtol=1e-15, atol=0)
    assert bool(((zeta > 0) & (zeta < 1)).all())  # every pair decays
    assert xpos_zeta(dim, gamma, dtype=torch.float32).dtype == torch.float32


def test_zeta_is_torchscale_buffer_and_frozen_values(device):
    """torchscale XPOS's buffer (arange(0, d, 2) + 0.4 d) / (1.4 d) is the paper's ζ with γ = 0.4;
    d = 8 by hand: 0.4/1.4, 0.65/1.4, 0.9/1.4, 1.15/1.4."""
    d = 8
    torchscale = (torch.arange(0, d, 2, dtype=F64) + 0.4 * d) / (1.4 * d)
    frozen = torch.tensor([0.2857142857142857, 0.4642857142857143, 0.6428571428571429, 0.8214285714285714], dtype=F64)
    torch.testing.assert_close(xpos_zeta(d, device=device).cpu(), torchscale, rtol=1e-15, atol=0)
    torch.testing.assert_close(xpos_zeta(d, device=device).cpu(), frozen, rtol=1e-15, atol=0)


def test_scales_match_formula(device):
    positions = torch.tensor([[0, 3], [-512, 1000]], device=device)
    got = xpos_scales(positions, 4, scale_base=512.0)
    assert got.shape == (2, 2, 2) and got.dtype == F64 and got.device.type == device.type
    zeta = zeta_ref(4)
    expected = torch.tensor([[[z ** (p / 512) for z in zeta] for p in row] for row in positions.tolist()], dtype=F64)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(got[1, 0].cpu(), 1 / torch.tensor(zeta, dtype=F64), rtol=1e-14, atol=0)  # ζ^{-1}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("shape", [(7, 8), (2, 3, 5, 16), (1, 2)])
def test_apply_xpos_matches_reference(device, rand, role, layout, shape):
    x = rand(*shape, seed=1, device=device)
    positions = torch.tensor([0, 1, 2, 5, 17, 100, 4096][: shape[-2]], device=device)
    inv_freq = torch.tensor(theta_ref(shape[-1]), dtype=F64, device=device)
    out = apply_xpos(x, positions, inv_freq, role, layout=layout)
    assert out.shape == x.shape and out.dtype == F64 and out.device.type == device.type
    expected = xpos_ref(x, positions.tolist(), role, layout=layout)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("role", ROLES)
def test_batched_position_ids_place_each_sequence(device, rand, role):
    x = rand(3, 2, 4, 8, seed=2, device=device)
    ids = torch.tensor([[0, 1, 2, 3], [9, 9, 0, 700], [7, 3, 1, 0]], device=device)
    out = apply_xpos(x, ids, pebook.rope_frequencies(8, dtype=F64, device=device), role, scale_base=64.0)
    for b in range(3):
        torch.testing.assert_close(out[b], xpos_ref(x[b], ids[b].tolist(), role, 64.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_hooks_are_f_q_and_f_k(device, rand, layout):
    """rotate_queries is f_q, rotate is f_k (what a KV cache stores), with the module's options."""
    enc = XPos(head_dim=8, rope_layout=layout, xpos_scale_base=16.0, xpos_gamma=0.5, rope_base=100.0).double()
    enc = enc.to(device)
    x = rand(2, 3, 6, 8, seed=3, device=device)
    pos = torch.arange(4, 10, device=device)
    assert enc.inv_freq.tolist() == [float(torch.tensor(t, dtype=torch.float32)) for t in theta_ref(8, 100.0)]
    kwargs = dict(scale_base=16.0, gamma=0.5, layout=layout, theta=enc.inv_freq.tolist())  # float32 θ, as RoPE
    expected_q, expected_k = (xpos_ref(x, pos.tolist(), role, **kwargs) for role in ROLES)
    torch.testing.assert_close(enc.rotate_queries(x, pos), expected_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(enc.rotate(x, pos), expected_k, rtol=1e-12, atol=1e-12)


def test_float32_matches_reference(device, rand, tol32):
    x = rand(3, 12, 32, seed=4, device=device, dtype=torch.float32)
    positions = torch.arange(12, device=device)
    enc = XPos(head_dim=32, xpos_scale_base=8.0).to(device)
    for role, hook in (("query", enc.rotate_queries), ("key", enc.rotate)):
        out = hook(x, positions)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), xpos_ref(x.double(), positions.tolist(), role, 8.0), **tol32)


def test_frozen_snapshots(device):
    """By hand: d = 2, q = k = (1, 0), n = 2, m = 0, B = 1: ζ_0 = 0.4/1.4 = 2/7 and θ_0 = 1, so the
    score is (2/7)² cos 2 = -0.0339711703303790. And f_q, f_k of x = (1, 2, 3, 4) at p = 3, B = 512
    (interleaved), from xpos_ref, to 13 digits."""
    enc = XPos(head_dim=2, xpos_scale_base=1.0).double().to(device)
    one = torch.tensor([[1.0, 0.0]], dtype=F64, device=device)
    score = xpos_scores(enc, one, one, torch.tensor([2], device=device), torch.tensor([0], device=device))
    assert score.item() == pytest.approx((2 / 7) ** 2 * math.cos(2), rel=1e-14)
    assert score.item() == pytest.approx(-0.0339711703303790, rel=1e-13)

    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64, device=device)
    inv_freq = pebook.rope_frequencies(4, dtype=F64, device=device)
    three = torch.tensor([3], device=device)
    frozen_q = [-1.2629279982272388, -1.825416385349918, 2.8712252592567595, 4.077616565424357]
    frozen_k = [-1.2816055774314, -1.852412666345988, 2.886130235082475, 4.098784105706419]
    torch.testing.assert_close(apply_xpos(x, three, inv_freq, "query")[0].cpu(), torch.tensor(frozen_q, dtype=F64))
    torch.testing.assert_close(apply_xpos(x, three, inv_freq, "key")[0].cpu(), torch.tensor(frozen_k, dtype=F64))


# ---------------------------------------------------------------- (2) properties


@given(
    dim=dims,
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31),
    n=st.integers(0, 3000),
    m=st.integers(0, 3000),
)
def test_score_is_the_papers_formula(device, dim, layout, seed, n, m):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, dim, generator=gen, dtype=F64).to(device)
    enc = XPos(head_dim=dim, rope_layout=layout).double().to(device)
    got = xpos_scores(enc, q, k, torch.tensor([n], device=device), torch.tensor([m], device=device)).item()
    expected = score_ref(q[0].cpu(), k[0].cpu(), n, m, layout=layout, theta=enc.inv_freq.tolist())
    scale = float(q.abs().max() * k.abs().max()) * dim * max(1.0, zeta_ref(dim)[0] ** ((n - m) / 512))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12 * scale)


@given(
    dim=dims,
    seed=st.integers(0, 2**31),
    n=st.integers(0, 300),
    m=st.integers(0, 300),
    shift=st.integers(1, 5000),
)
def test_score_depends_only_on_the_distance(device, dim, seed, n, m, shift):
    """Translation invariance: moving query and key by the same shift leaves q'·k' unchanged
    (up to float64 rounding of the scales ζ^{±p/B}, which grow with the shift)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, dim, generator=gen, dtype=F64).to(device)
    enc = XPos(head_dim=dim).double().to(device)
    at = lambda a, b: xpos_scores(enc, q, k, torch.tensor([a], device=device), torch.tensor([b], device=device))  # noqa: E731
    base, shifted = at(n, m).item(), at(n + shift, m + shift).item()
    scale = float(q.abs().max() * k.abs().max()) * dim
    assert shifted == pytest.approx(base, rel=1e-9, abs=1e-12 * scale)


@given(
    dim=dims,
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31),
    m=st.integers(0, 1000),
    distance=st.integers(1, 2000),
    data=st.data(),
)
def test_each_pair_decays_relative_to_rope(device, dim, layout, seed, m, distance, data):
    """With only pair i of q and k nonzero, the xPos score is ζ_i^{(n-m)/B} times the RoPE score
    (pebook.RoPE, same layout), so a key before the query (n > m) scores strictly less in
    magnitude, and the further back the less."""
    i = data.draw(st.integers(0, dim // 2 - 1), label="pair")
    a, b = pairs_of(dim, layout)[i]
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.zeros(2, 1, dim, dtype=F64)
    q[0, [a, b]], k[0, [a, b]] = torch.randn(2, generator=gen, dtype=F64), torch.randn(2, generator=gen, dtype=F64)
    q, k = q.to(device), k.to(device)
    xpos = XPos(head_dim=dim, rope_layout=layout, xpos_scale_base=64.0).double().to(device)
    rope = pebook.RoPE(head_dim=dim, rope_layout=layout).double().to(device)
    n = m + distance
    pos = lambda p: torch.tensor([p], device=device)  # noqa: E731
    decayed = xpos_scores(xpos, q, k, pos(n), pos(m)).item()
    further = xpos_scores(xpos, q, k, pos(n + 1), pos(m)).item()
    plain = (rope.rotate(q[None, None], pos(n)) * rope.rotate(k[None, None], pos(m))).sum().item()
    factor = zeta_ref(dim)[i] ** (distance / 64)
    assert decayed == pytest.approx(factor * plain, rel=1e-9, abs=1e-12)
    assert abs(decayed) <= factor * abs(plain) * (1 + 1e-9) and factor < 1
    assert abs(further / zeta_ref(dim)[i] ** ((distance + 1) / 64)) <= float(q.norm() * k.norm()) * (1 + 1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_the_scale_it_is_rope(device, rand, layout):
    """xpos_scale_base=None switches the decay off: exactly pebook.RoPE with the same layout."""
    x = rand(2, 3, 7, 16, seed=5, device=device, dtype=torch.float32)
    ids = torch.arange(100, 107, device=device)
    xpos = XPos(head_dim=16, rope_layout=layout, xpos_scale_base=None).to(device)
    rope = pebook.RoPE(head_dim=16, rope_layout=layout).to(device)
    assert torch.equal(xpos.rotate(x, ids), rope.rotate(x, ids))
    assert torch.equal(xpos.rotate_queries(x, ids), rope.rotate(x, ids))
    assert xpos.max_position is None
    xpos.check_positions(10**9)  # no limit without a scale
    # with the scale the same inputs move (queries and keys oppositely)
    scaled = XPos(head_dim=16, rope_layout=layout, xpos_scale_base=16.0).to(device)
    assert not torch.allclose(scaled.rotate(x, ids), rope.rotate(x, ids))
    assert not torch.allclose(scaled.rotate_queries(x, ids), scaled.rotate(x, ids))


def test_torchscale_centred_positions_give_the_same_scores(device, rand):
    """torchscale centres the scale's exponent on the sequence; the shift cancels in q'·k', so its
    scores equal pebook's with absolute positions (which a KV cache needs)."""
    for length in (1, 6, 9):
        q, k = rand(length, 8, seed=6, device=device), rand(length, 8, seed=7, device=device)
        enc = XPos(head_dim=8, xpos_scale_base=4.0).double().to(device)
        pos = torch.arange(length, device=device)
        ours = xpos_scores(enc, q, k, pos, pos)
        expected = torchscale_scores_ref(q, k, 4.0, enc.inv_freq.tolist())
        torch.testing.assert_close(ours.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_positional_attention_uses_f_q_for_queries_and_f_k_for_keys(device, rand):
    """pebook.positional_attention with XPos = softmax(score_ref / √d) v, scores from the paper."""
    b, h, lq, lk, d = 1, 2, 3, 5, 4
    q, k, v = rand(b, h, lq, d, seed=8, device=device), *(rand(b, h, lk, d, seed=s, device=device) for s in (9, 10))
    enc = XPos(head_dim=d, xpos_scale_base=2.0).double().to(device)
    out = pebook.positional_attention(q, k, v, enc)
    theta = enc.inv_freq.tolist()
    scores = torch.tensor(
        [
            [
                [score_ref(q[0, hh, i].cpu(), k[0, hh, j].cpu(), lk - lq + i, j, 2.0, theta=theta) for j in range(lk)]
                for i in range(lq)
            ]
            for hh in range(h)
        ],
        dtype=F64,
    )
    visible = torch.tensor([[j <= lk - lq + i for j in range(lk)] for i in range(lq)])
    weights = torch.softmax((scores / math.sqrt(d)).masked_fill(~visible, float("-inf")), dim=-1)
    torch.testing.assert_close(out[0].cpu(), weights @ v[0].cpu(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- (3) numerical range


def test_max_position_snapshots():
    """⌊E · ln 2 · B / ln(3.5)⌋ for γ = 0.4: E = 64 (float32, bfloat16), 7 (float16), 511 (float64)."""
    assert xpos_max_position() == xpos_max_position(dtype=torch.bfloat16) == 18130
    assert xpos_max_position(dtype=torch.float16) == 1983
    assert xpos_max_position(dtype=torch.float64) == 144759
    assert xpos_max_position(16.0) == 566
    assert XPos(head_dim=4).max_position == 18130 and XPos(head_dim=4).double().max_position == 144759
    assert XPos(head_dim=4).half().max_position == 18130  # inv_freq stays float32: the scales are float32


@pytest.mark.parametrize("scale_base,gamma", [(512.0, 0.4), (16.0, 0.4), (100.0, 1.0)])
def test_max_position_is_the_last_position_inside_the_range(scale_base, gamma):
    limit = xpos_max_position(scale_base, gamma)
    smallest = xpos_scales(torch.tensor([limit, limit + 1]), 64, scale_base, gamma)[:, 0]  # ζ_0^{p/B}
    assert 2.0**-64 <= smallest[0] and smallest[1] < 2.0**-64  # the query scale; the key's is its inverse
    largest_key = xpos_scales(torch.tensor([-limit]), 64, scale_base, gamma).max()
    assert largest_key <= 2.0**64


def test_float32_is_exact_near_max_position(device, rand):
    """Near the float32 limit (18130 for B = 512) the key scales reach ~2^64 and the query scales
    ~2^-64, yet each float32 score is Σ_i ζ_i^{(n-m)/B} s_i to float32 rounding, s_i the pair-i
    term of float32 RoPE at the same positions: the scales add no error of their own (the angles
    p·θ_i carry RoPE's float32 rounding either way)."""
    enc = XPos(head_dim=16).to(device)
    rope = pebook.RoPE(head_dim=16, rope_layout="interleaved").to(device)
    limit = enc.max_position
    q, k = rand(1, 1, 1, 16, seed=11, device=device).float(), rand(1, 1, 8, 16, seed=12, device=device).float()
    q_pos, k_pos = torch.tensor([limit], device=device), torch.arange(limit - 7, limit + 1, device=device)
    keys = enc.rotate(k, k_pos)
    assert bool(torch.isfinite(keys).all()) and float(keys.abs().max()) > 2.0**60  # the keys really are huge
    got = (enc.rotate_queries(q, q_pos) @ keys.transpose(-1, -2))[0, 0, 0].double()
    pair_terms = (rope.rotate(q, q_pos) * rope.rotate(k, k_pos)).double().unflatten(-1, (8, 2)).sum(-1)[0, 0]
    decay = torch.tensor([[z ** ((7 - j) / 512) for z in zeta_ref(16)] for j in range(8)], dtype=F64, device=device)
    expected = (pair_terms * decay).sum(-1)
    magnitude = (pair_terms * decay).abs().sum(-1)
    assert bool(((got - expected).abs() <= 1e-6 * magnitude).all())


def test_positions_beyond_max_position_are_refused(device):
    mha = pebook.MultiHeadAttention(16, 2, "xpos", xpos_scale_base=16.0).to(device)
    x = torch.zeros(1, 1, 16, device=device)
    mha(x, position_ids=torch.tensor([[566]], device=device))  # the last position it places
    if device.type == "cpu":  # position ids are checked on the host only (no GPU synchronisation)
        with pytest.raises(ValueError, match=r"position 567 is beyond this xpos encoding's max_position=566"):
            mha(x, position_ids=torch.tensor([[567]], device=device))
    model = pebook.TinyLM(11, 16, 1, 2, 8, "xpos", xpos_scale_base=16.0).to(device)
    with pytest.raises(ValueError, match=r"max_position=566.*use a larger xpos_scale_base"):
        model(torch.zeros(1, 568, dtype=torch.long, device=device))  # default positions 0 … 567
    model.double()(
        torch.zeros(1, 1, dtype=torch.long, device=device), position_ids=torch.tensor([[4523]], device=device)
    )


# ---------------------------------------------------------------- (4) registry and bad input


def test_registry_entry_and_options():
    assert pebook.ENCODINGS["xpos"] is XPos and XPos.place == "qk"
    assert pebook.encoding_options("xpos") == {
        "rope_base": 10000.0,
        "rope_layout": "interleaved",
        "xpos_scale_base": 512.0,
        "xpos_gamma": 0.4,
    }
    enc = pebook.build_encoding("xpos", dim=16, n_heads=2, head_dim=8, causal=True, xpos_scale_base=32.0)
    assert enc.scale_base == 32.0 and enc.declared_parameters() == {"inv_freq": ((4,), False)}
    assert enc.num_learned_parameters() == 0


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(head_dim=7), ValueError, r"xpos needs an even head_dim .* got head_dim=7"),
        (dict(head_dim=0), ValueError, r"head_dim must be an int >= 1, got 0"),
        (dict(head_dim=8, xpos_scale_base=0.0), ValueError, r"xpos_scale_base must be a finite number > 0, got 0.0"),
        (
            dict(head_dim=8, xpos_scale_base=math.inf),
            ValueError,
            r"xpos_scale_base must be a finite number > 0, got inf",
        ),
        (dict(head_dim=8, xpos_scale_base="512"), TypeError, r"xpos_scale_base must be a real number, got '512'"),
        (dict(head_dim=8, xpos_gamma=-0.4), ValueError, r"xpos_gamma must be a finite number > 0, got -0.4"),
        (dict(head_dim=8, rope_layout="neox"), ValueError, r"rope_layout must be one of \('half', 'interleaved'\)"),
        (dict(head_dim=8, rope_base=1.0), ValueError, r"rope_base must be a finite number > 1, got 1.0"),
    ],
)
def test_bad_construction_is_rejected(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        XPos(**kwargs)


def test_bad_function_arguments_are_rejected(device):
    x = torch.zeros(3, 4, device=device)
    pos = torch.arange(3, device=device)
    inv_freq = pebook.rope_frequencies(4, device=device)
    with pytest.raises(ValueError, match=r"role must be one of \('query', 'key'\), got 'value'"):
        apply_xpos(x, pos, inv_freq, "value")
    with pytest.raises(ValueError, match=r"layout must be one of \('half', 'interleaved'\), got 'neox'"):
        apply_xpos(x, pos, inv_freq, "key", layout="neox")
    with pytest.raises(ValueError, match=r"scale_base must be a finite number > 0, got -1.0"):
        apply_xpos(x, pos, inv_freq, "key", scale_base=-1.0)
    with pytest.raises(ValueError, match=r"positions has 2 entries but x has seq=3 rows"):
        apply_xpos(x, pos[:2], inv_freq, "query")
    with pytest.raises(ValueError, match=r"dim must be even .* got 3"):
        xpos_zeta(3)
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0, got 0.0"):
        xpos_zeta(4, 0.0)
    with pytest.raises(TypeError, match=r"positions must be a torch.Tensor of positions, got list"):
        xpos_scales([0, 1], 4)
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype, got torch.int32"):
        xpos_max_position(dtype=torch.int32)
