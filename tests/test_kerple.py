"""pebook.kerple: KERPLE's learned CPD kernel biases (Chi, Fan, Ramadge & Rudnicky 2022, §4).

Reference: :func:`kerple_bias_ref` below writes the two kernels of §4 element by element in Python
floats, k̃(m, n) = -r₁ log(1 + r₂|m - n|) and k̃(m, n) = -r₁ |m - n|^r₂. The reference code's
conventions (github.com/chijames/KERPLE, ``ParallelKerpleLog`` / ``ParallelKerplePower``:
parameters clamped in place to [0.01, ∞), the power exponent to [0.01, 2], before every use; a
causal ``tril(m - n)`` distance) are written out in :func:`reference_code_step` and compared with
the module over optimiser steps. ALiBi is the power variant with r₂ = 1 and r₁ = its slopes.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook
from pebook import ALiBi, alibi_bias, alibi_slopes
from pebook.kerple import KERPLE_EPS, KERPLE_MAX_POWER, Kerple, kerple_bias, kerple_kernel

F64 = torch.float64
VARIANTS = ["log", "power"]


def kerple_bias_ref(r1, r2, q_positions, k_positions, variant):
    """§4, per head h, query at m and key at n, in Python floats:
    log: -r₁ log(1 + r₂|m - n|);  power: -r₁ |m - n|^r₂."""

    def kernel(a, b, d):
        return -a * math.log(1 + b * d) if variant == "log" else -a * d**b

    rows = [
        [[kernel(float(a), float(b), abs(m - n)) for n in k_positions] for m in q_positions] for a, b in zip(r1, r2)
    ]
    return torch.tensor(rows, dtype=F64).reshape(len(rows), len(q_positions), len(k_positions))


def kerple_module(n_heads=3, variant="log", r1=None, r2=None, *, device="cpu"):
    """A float64 Kerple; ``r1`` / ``r2`` (lists) replace the random initial values."""
    torch.manual_seed(0)
    enc = Kerple(n_heads=n_heads, kerple_variant=variant).double().to(device)
    with torch.no_grad():
        if r1 is not None:
            enc.r1.copy_(torch.tensor(r1, dtype=F64))
        if r2 is not None:
            enc.r2.copy_(torch.tensor(r2, dtype=F64))
    return enc


def in_range(variant):
    """Hypothesis strategy for one head's (r1, r2) in the range the module keeps them in."""
    top = KERPLE_MAX_POWER if variant == "power" else 20.0
    return st.tuples(st.floats(KERPLE_EPS, 20.0), st.floats(KERPLE_EPS, top))


# ---------------------------------------------------------------- (1) reference


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("q_len,k_len,offset", [(5, 5, 0), (1, 9, 8), (3, 10, 4), (4, 2, 0), (0, 3, 1)])
def test_bias_matches_reference(device, variant, q_len, k_len, offset):
    r1 = torch.tensor([0.3, 1.7, 0.01], dtype=F64, device=device)
    r2 = torch.tensor([0.9, 0.01, 2.0], dtype=F64, device=device)
    bias = kerple_bias(q_len, k_len, r1, r2, offset, variant=variant)
    assert bias.shape == (3, q_len, k_len) and bias.dtype == F64 and bias.device.type == device.type
    expected = kerple_bias_ref(r1.tolist(), r2.tolist(), range(offset, offset + q_len), range(k_len), variant)
    torch.testing.assert_close(bias.cpu(), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_module_bias_at_position_ids_matches_reference(device, variant):
    """Kerple.logit_bias[b, h, i, j] = k̃(q_pos[b, i], k_pos[b, j]) for head h, at batched,
    unordered, far-apart positions (keys before and after the queries)."""
    r1, r2 = [0.5, 1.25, 0.02, 3.0], [0.7, 0.05, 1.0, 2.0]
    enc = kerple_module(4, variant, r1, r2, device=device)
    q_pos = torch.tensor([[0, 7, 300, 12], [5, 5, 1, 0]], device=device)
    k_pos = torch.tensor([[0, 1, 2, 20, 150, 299], [400, 3, 5, 9, 0, 1]], device=device)
    bias = enc.logit_bias(q_pos, k_pos)
    assert bias.shape == (2, 4, 4, 6) and bias.dtype == F64 and bias.device.type == device.type
    for b in range(2):
        expected = kerple_bias_ref(r1, r2, q_pos[b].tolist(), k_pos[b].tolist(), variant)
        torch.testing.assert_close(bias[b].detach().cpu(), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False])
def test_module_in_attention_matches_reference(device, rand, ref, variant, causal):
    """softmax(q kᵀ/√d + k̃) v over a cache (queries at 4, 5 over keys 0 … 5), with the reference bias."""
    r1, r2 = [0.5, 1.25, 0.02, 3.0], [0.7, 0.05, 1.0, 2.0]
    enc = kerple_module(4, variant, r1, r2, device=device)
    q, k, v = rand(2, 4, 2, 8, seed=0, device=device), *(rand(2, 4, 6, 8, seed=s, device=device) for s in (1, 2))
    out = pebook.positional_attention(q, k, v, enc, causal=causal)
    bias = kerple_bias_ref(r1, r2, range(4, 6), range(6), variant).to(device)
    torch.testing.assert_close(out, ref.attention(q, k, v, bias=bias, causal=causal), rtol=1e-12, atol=1e-12)


def test_power_variant_in_multi_head_attention_and_tiny_lm(device, rand, ref):
    """The registry's example options exercise the log variant in the generic tests; the power
    variant here: MultiHeadAttention (GQA) and TinyLM against the float64 layer references, and
    KV-cache decoding equal to the full forward."""
    torch.manual_seed(1)
    mha = pebook.MultiHeadAttention(16, 4, "kerple", n_kv_heads=2, kerple_variant="power").double().to(device)
    assert mha.position.variant == "power"
    x = rand(2, 6, 16, seed=3, device=device)
    torch.testing.assert_close(mha(x), ref.mha(mha, x), rtol=1e-12, atol=1e-12)

    model = pebook.TinyLM(30, 16, 2, 4, 32, encoding="kerple", kerple_variant="power").double().to(device).eval()
    assert model.encoding_module is model.blocks[1].attn.position  # one module for all layers
    tokens = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        full = model(tokens)
        torch.testing.assert_close(full, ref.tiny_lm(model, tokens), rtol=1e-10, atol=1e-10)
        logits, cache = model(tokens[:, :3], return_kv=True)
        steps = [logits]
        for t in range(3, 8):
            logits, cache = model(tokens[:, t : t + 1], past_kvs=cache, return_kv=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- ALiBi as a special case


@pytest.mark.parametrize("n_heads", [1, 2, 3, 6, 8, 12, 16])
@pytest.mark.parametrize("q_len,k_len,offset", [(5, 5, 0), (1, 9, 8), (3, 10, 4)])
def test_power_one_with_alibi_slopes_is_alibi(device, n_heads, q_len, k_len, offset):
    """-r₁|m - n|^r₂ with r₂ = 1 and r₁ = m_h is ALiBi's -m_h |m - n| bit for bit (the symmetric,
    bidirectional form), and ALiBi's signed -m_h (m - n) of §3 on the keys a causal query sees."""
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    kerple = kerple_bias(q_len, k_len, slopes, torch.ones_like(slopes), offset, variant="power")
    assert torch.equal(kerple, alibi_bias(q_len, k_len, slopes, offset, symmetric=True))
    past = torch.arange(k_len, device=device)[None, :] <= torch.arange(offset, offset + q_len, device=device)[:, None]
    assert torch.equal(kerple[:, past], alibi_bias(q_len, k_len, slopes, offset)[:, past])


@pytest.mark.parametrize("causal", [True, False])
def test_module_with_alibi_slopes_is_alibi_above_the_clamp(device, rand, causal):
    """The module clamps r₁ to >= 0.01 as the reference code does, so it is ALiBi exactly for the
    heads with m_h >= 0.01 and ALiBi with slope 0.01 for the gentler ones (6 heads: 1/256 is
    below the floor). Bidirectional: the biases are equal at any positions. Causal (keys stored
    in position order, so every visible key is at n <= m): the attention outputs are equal."""
    slopes = alibi_slopes(6, dtype=F64, device=device)
    assert (slopes < KERPLE_EPS).tolist() == [False, False, False, True, False, False]
    enc = kerple_module(6, "power", slopes.tolist(), [1.0] * 6, device=device)
    clamped = ALiBi(n_heads=6, causal=causal, slopes=slopes.clamp(min=KERPLE_EPS))
    exact = ALiBi(n_heads=6, causal=causal, slopes=slopes)
    if causal:
        k_pos = torch.tensor([[0, 3, 7, 12, 300]], device=device)
        q_pos = k_pos[:, 1:]
    else:
        q_pos = torch.tensor([[0, 7, 300, 12]], device=device)
        k_pos = torch.tensor([[3, 0, 9, 400, 7]], device=device)
        bias = enc.logit_bias(q_pos, k_pos)
        assert torch.equal(bias, clamped.logit_bias(q_pos, k_pos))
        above = slopes >= KERPLE_EPS
        assert torch.equal(bias[:, above], exact.logit_bias(q_pos, k_pos)[:, above])
        assert not torch.equal(bias[:, ~above], exact.logit_bias(q_pos, k_pos)[:, ~above])
    q = rand(1, 6, 4, 8, seed=5, device=device)
    k, v = rand(1, 6, 5, 8, seed=6, device=device), rand(1, 6, 5, 8, seed=7, device=device)
    kwargs = dict(causal=causal, position_ids=q_pos, key_position_ids=k_pos)
    with torch.no_grad():  # the same bias through the same SDPA call
        out = pebook.positional_attention(q, k, v, enc, **kwargs)
        assert torch.equal(out, pebook.positional_attention(q, k, v, clamped, **kwargs))


# ---------------------------------------------------------------- (2) properties


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data(), n_heads=st.integers(1, 4), length=st.integers(1, 8), shift=st.integers(0, 500))
def test_bias_depends_only_on_the_distance(device, variant, data, n_heads, length, shift):
    """Shift-invariant and symmetric: k̃(m + s, n + s) = k̃(m, n) = k̃(n, m); zero on the diagonal."""
    params = data.draw(st.lists(in_range(variant), min_size=n_heads, max_size=n_heads))
    enc = kerple_module(n_heads, variant, [a for a, _ in params], [b for _, b in params], device=device)
    positions = st.lists(st.integers(0, 300), min_size=length, max_size=length)
    q_pos = torch.tensor([data.draw(positions)], device=device)
    k_pos = torch.tensor([data.draw(positions)], device=device)
    bias = enc.logit_bias(q_pos, k_pos)
    assert torch.equal(enc.logit_bias(q_pos + shift, k_pos + shift), bias)
    # the same distances at transposed places: a vectorised pow may round its last bit differently
    torch.testing.assert_close(enc.logit_bias(k_pos, q_pos), bias.transpose(-1, -2), rtol=1e-12, atol=0)
    assert (enc.logit_bias(q_pos, q_pos).diagonal(dim1=-2, dim2=-1) == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
@given(params=st.data(), n_heads=st.integers(1, 4), n_keys=st.integers(2, 400))
def test_bias_decreases_with_distance(device, variant, params, n_heads, n_keys):
    """k̃ is 0 at distance 0, negative beyond, and strictly decreasing in |m - n| (r₁, r₂ > 0)."""
    drawn = params.draw(st.lists(in_range(variant), min_size=n_heads, max_size=n_heads))
    r1 = torch.tensor([a for a, _ in drawn], dtype=F64, device=device)
    r2 = torch.tensor([b for _, b in drawn], dtype=F64, device=device)
    row = kerple_bias(1, n_keys, r1, r2, n_keys - 1, variant=variant)[:, 0].flip(-1)  # distances 0 … n_keys - 1
    assert (row[:, 0] == 0).all() and (row[:, 1:] < 0).all()
    assert (row[:, 1:] < row[:, :-1]).all()


@pytest.mark.parametrize("variant", VARIANTS)
@given(params=in_range("power"), positions=st.lists(st.integers(0, 60), min_size=2, max_size=9, unique=True))
def test_kernel_is_conditionally_positive_definite(device, variant, params, positions):
    """The point of §3: K = [k̃(m_a, m_b)] is CPD, cᵀ K c >= 0 for every c with Σ c = 0, i.e.
    P K P is positive semi-definite with P = I - 11ᵀ/n (both variants; power with r₂ <= 2)."""
    r1, r2 = (torch.tensor([x], dtype=F64, device=device) for x in params)
    pos = torch.tensor(positions, device=device)
    K = kerple_kernel((pos[:, None] - pos[None, :]).abs(), r1, r2, variant)
    n = len(positions)
    P = torch.eye(n, dtype=F64, device=device) - 1.0 / n
    eigenvalues = torch.linalg.eigvalsh(P @ K @ P)
    assert eigenvalues.min() >= -1e-9 * K.abs().max()


def test_power_beyond_two_is_not_cpd():
    """Why r₂ <= 2 (§4): -|m - n|^2.5 on positions 0 … 5 has cᵀ K c < 0 for some c with Σ c = 0."""
    d = torch.arange(6, dtype=F64)
    K = -((d[:, None] - d[None, :]).abs() ** 2.5)
    P = torch.eye(6, dtype=F64) - 1.0 / 6
    assert torch.linalg.eigvalsh(P @ K @ P).min() < -1.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_is_invariant_to_a_shift_of_all_positions(device, rand, variant):
    """A relative encoding: moving every query and key by the same offset leaves attention unchanged."""
    enc = kerple_module(4, variant, device=device)
    q, k, v = rand(2, 4, 3, 8, seed=8, device=device), *(rand(2, 4, 7, 8, seed=s, device=device) for s in (9, 10))
    k_pos = torch.tensor([[0, 2, 3, 7, 8, 9, 12], [1, 2, 3, 4, 5, 6, 7]], device=device)
    q_pos = k_pos[:, -3:]
    out = pebook.positional_attention(q, k, v, enc, position_ids=q_pos, key_position_ids=k_pos)
    moved = pebook.positional_attention(q, k, v, enc, position_ids=q_pos + 1000, key_position_ids=k_pos + 1000)
    torch.testing.assert_close(moved, out, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("variant", VARIANTS)
def test_initial_values_follow_the_reference(variant):
    """Reference code: log r₁ ~ U(0, 2), r₂ ~ U(0, 1); power r₁ ~ U(0, 1), r₂ ~ U(0, 2); then clamped."""
    torch.manual_seed(3)
    enc = Kerple(n_heads=2000, kerple_variant=variant)
    tops = (2.0, 1.0) if variant == "log" else (1.0, 2.0)
    for p, top in zip((enc.r1, enc.r2), tops):
        assert p.min() >= KERPLE_EPS and p.max() < top
        assert p.max() > 0.97 * top and (p == KERPLE_EPS).any()  # fills the interval, floor included
        assert abs(p.mean().item() - top / 2) < 0.05 * top


def reference_code_step(r1, r2, variant, seq, weights):
    """One forward of the reference code's ParallelKerple{Log,Power}, float64, causal: clamp the
    stored values in place (r ≥ 0.01; the power exponent also ≤ 2), then the kernel on the
    distance matrix tril(m - n). Returns the (heads, seq, seq) bias and the loss Σ w · bias."""
    with torch.no_grad():
        r1.clamp_(min=KERPLE_EPS)
        r2.clamp_(min=KERPLE_EPS, max=KERPLE_MAX_POWER if variant == "power" else None)
    m = torch.arange(seq, dtype=F64)
    diff = torch.tril(m[:, None] - m[None, :])
    if variant == "log":
        bias = -r1[:, None, None] * torch.log(1 + r2[:, None, None] * diff)
    else:
        bias = -r1[:, None, None] * diff.pow(r2[:, None, None])
    return bias, (weights * bias).tril().sum()


@pytest.mark.parametrize("variant", VARIANTS)
def test_optimisation_follows_the_reference_codes_projection(variant):
    """SGD on a loss of the bias, with steps large enough to push parameters out of range: the
    module's parameters follow the reference code's (clamped in place before every forward), so a
    parameter pushed below 0.01 is back on the boundary and keeps a gradient (a clamp applied only
    to the values used would leave it stuck). On the causal triangle the biases agree too."""
    heads, seq = 3, 6
    enc = kerple_module(heads, variant, [0.05, 1.0, 0.5], [0.05, 1.0, 1.9])
    r1, r2 = (enc.r1.detach().clone().requires_grad_(), enc.r2.detach().clone().requires_grad_())
    # signs chosen to push head 0 below the floor and head 2's exponent above 2 (power)
    weights = torch.tensor([50.0, -1.0, -50.0], dtype=F64)[:, None, None] * torch.ones(seq, seq, dtype=F64)
    opt_module = torch.optim.SGD(enc.parameters(), lr=0.05)
    opt_reference = torch.optim.SGD([r1, r2], lr=0.05)
    pos = torch.arange(seq)[None]
    clamped = []
    for _ in range(6):
        bias = enc.logit_bias(pos, pos)[0]
        loss = (weights * bias).tril().sum()
        ref_bias, ref_loss = reference_code_step(r1, r2, variant, seq, weights)
        torch.testing.assert_close(bias.tril(), ref_bias, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(enc.r1.detach(), r1.detach(), rtol=1e-13, atol=0)
        torch.testing.assert_close(enc.r2.detach(), r2.detach(), rtol=1e-13, atol=0)
        clamped.append(bool((enc.r1 == KERPLE_EPS).any()))
        for opt, objective in ((opt_module, loss), (opt_reference, ref_loss)):
            opt.zero_grad()
            objective.backward()
        torch.testing.assert_close(enc.r1.grad, r1.grad, rtol=1e-12, atol=1e-12)
        if clamped[-1]:
            assert enc.r1.grad[0] != 0  # on the boundary, still learning
        opt_module.step()
        opt_reference.step()
    assert any(clamped)  # the projection was exercised


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameters_stay_in_range_while_training(variant):
    """Adam with a large learning rate on a TinyLM: after every forward the stored parameters are in
    [0.01, ∞) (r₂ of the power variant in [0.01, 2]) and the logits stay finite."""
    torch.manual_seed(0)
    model = pebook.TinyLM(20, 16, 1, 4, 16, encoding="kerple", kerple_variant=variant)
    enc = model.encoding_module
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    tokens = torch.randint(0, 20, (4, 12), generator=torch.Generator().manual_seed(0))
    left_range = False
    for _ in range(15):
        logits = model(tokens[:, :-1])
        assert torch.isfinite(logits).all()
        assert enc.r1.min() >= KERPLE_EPS and enc.r2.min() >= KERPLE_EPS
        if variant == "power":
            assert enc.r2.max() <= KERPLE_MAX_POWER
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        top = KERPLE_MAX_POWER if variant == "power" else math.inf
        left_range |= bool((enc.r1 < KERPLE_EPS).any() or (enc.r2 < KERPLE_EPS).any() or (enc.r2 > top).any())
    assert left_range  # the optimiser did push some value out, and the next forward brought it back


def test_score_reads_clamped_values(device):
    """Values set out of range are used clamped even by score itself (no projection has run)."""
    enc = kerple_module(2, "power", [-1.0, 0.5], [3.0, -2.0], device=device)
    head = torch.tensor([0, 1], device=device)
    got = enc.score(head, torch.tensor([4, 4], device=device), torch.tensor([0, 0], device=device))
    torch.testing.assert_close(got, torch.tensor([-0.01 * 16, -0.5 * 4**0.01], dtype=F64, device=device))
    assert enc.r1[0].item() == -1.0  # score has no side effect; logit_bias projects
    origin = torch.zeros(1, 1, dtype=torch.long, device=device)
    enc.logit_bias(origin, origin)
    assert enc.r1.tolist() == [KERPLE_EPS, 0.5] and enc.r2.tolist() == [2.0, KERPLE_EPS]


# ---------------------------------------------------------------- (3) frozen snapshots


def test_snapshot_log_matrix(device):
    """r₁ = r₂ = 1: row m holds -log(1 + |m - n|), i.e. 0, -ln 2, -ln 3 by hand."""
    one = torch.ones(1, dtype=F64, device=device)
    bias = kerple_bias(3, 3, one, one)[0].cpu()
    ln2, ln3 = math.log(2), math.log(3)
    expected = torch.tensor([[0, -ln2, -ln3], [-ln2, 0, -ln2], [-ln3, -ln2, 0]], dtype=F64)
    torch.testing.assert_close(bias, expected, rtol=1e-15, atol=0)


def test_snapshot_power_matrix(device):
    """r₁ = 1/2, r₂ = 2: -|m - n|²/2, exact in binary: 0, -0.5, -2, -4.5."""
    r1, r2 = torch.tensor([0.5], dtype=F64, device=device), torch.tensor([2.0], dtype=F64, device=device)
    bias = kerple_bias(1, 4, r1, r2, 3, variant="power")
    assert bias[0].tolist() == [[-4.5, -2.0, -0.5, 0.0]]


def test_snapshot_decoding_step(device):
    """Decoding the token at position 3 over keys 0 … 3, log variant with r₁ = 2, r₂ = 1/2:
    -2 ln(1 + d/2) for d = 3, 2, 1, 0 = -2 ln 2.5, -2 ln 2, -2 ln 1.5, 0."""
    enc = kerple_module(1, "log", [2.0], [0.5], device=device)
    bias = enc.logit_bias(torch.tensor([[3]], device=device), torch.arange(4, device=device)[None])[0, 0, 0].cpu()
    expected = torch.tensor([-2 * math.log(2.5), -2 * math.log(2.0), -2 * math.log(1.5), 0.0], dtype=F64)
    torch.testing.assert_close(bias.detach(), expected, rtol=1e-15, atol=0)


def test_snapshot_options_and_parameters():
    assert pebook.encoding_options("kerple") == {"kerple_variant": "log"}
    enc = pebook.build_encoding("kerple", dim=16, n_heads=4, head_dim=4, causal=True)
    assert enc.declared_parameters() == {"r1": ((4,), True), "r2": ((4,), True)}
    assert enc.num_learned_parameters() == 8 and Kerple.shared_across_layers
    assert repr(enc) == "Kerple(n_heads=4, kerple_variant='log')"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(n_heads=0), ValueError, r"n_heads must be an int >= 1, got 0$"),
        (dict(n_heads=2.0), TypeError, r"n_heads must be an int, got 2.0 of type float$"),
        (dict(kerple_variant="pow"), ValueError, r"kerple_variant must be one of \('log', 'power'\), got 'pow'$"),
        (dict(kerple_variant=None), ValueError, r"kerple_variant must be one of \('log', 'power'\), got None$"),
    ],
)
def test_module_rejects_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        Kerple(**({"n_heads": 2} | kwargs))


def test_layer_rejects_a_bad_variant():
    with pytest.raises(ValueError, match=r"kerple_variant must be one of \('log', 'power'\), got 'exp'$"):
        pebook.MultiHeadAttention(16, 4, "kerple", kerple_variant="exp")


def test_bias_rejects_bad_arguments(device):
    r = torch.ones(2, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"q_len must be an int >= 0, got -1$"):
        kerple_bias(-1, 3, r, r)
    with pytest.raises(ValueError, match=r"offset must be an int >= 0, got -2$"):
        kerple_bias(3, 3, r, r, -2)
    with pytest.raises(TypeError, match=r"r1 must be a floating-point tensor, got dtype torch.int64$"):
        kerple_bias(3, 3, torch.ones(2, dtype=torch.long, device=device), r)
    with pytest.raises(ValueError, match=r"r2 must have 1 dimensions, got shape \(2, 1\)$"):
        kerple_bias(3, 3, r, r[:, None])
    with pytest.raises(ValueError, match=r"r2 must have one value per head like r1 \(2,\), got \(3,\)$"):
        kerple_bias(3, 3, r, torch.ones(3, dtype=F64, device=device))
    with pytest.raises(ValueError, match=r"variant must be one of \('log', 'power'\), got 'Log'$"):
        kerple_bias(3, 3, r, r, variant="Log")


@pytest.mark.parametrize(
    "r1,r2,variant,pattern",
    [
        ([0.5, 0.0], [1.0, 1.0], "log", r"r1 must all be > 0, got \[0.5, 0.0\]$"),
        ([0.5, 1.0], [-1.0, 1.0], "log", r"r2 must all be > 0, got \[-1.0, 1.0\]$"),
        ([0.5, 1.0], [1.0, 2.5], "power", r"r2 must all be <= 2 for variant='power' .*got \[1.0, 2.5\]$"),
    ],
)
def test_kernel_rejects_parameters_out_of_range(device, r1, r2, variant, pattern):
    with pytest.raises(ValueError, match=pattern):
        kerple_bias(3, 3, torch.tensor(r1, device=device), torch.tensor(r2, device=device), variant=variant)
    kerple_bias(3, 3, torch.tensor([0.5, 1.0], device=device), torch.tensor([1.0, 2.5], device=device))  # log: no cap


def test_kernel_rejects_bad_distances(device):
    r = torch.ones(1, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"distance must be >= 0 \(it is \|m - n\|\), got a minimum of -3$"):
        kerple_kernel(torch.tensor([1, -3], device=device), r, r)
    with pytest.raises(TypeError, match=r"distance must be a torch.Tensor, got list$"):
        kerple_kernel([1, 2], r, r)


def test_kernel_rejects_mixed_devices(cuda_device):
    r = torch.ones(1, dtype=F64)
    with pytest.raises(ValueError, match=r"r1 is on cuda:0 but distance is on cpu"):
        kerple_kernel(torch.arange(3), r.to(cuda_device), r)
