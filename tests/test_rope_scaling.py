"""pebook.rope_scaling: RoPE frequency rules for context extension.

References (below, float64, Python floats, one pair at a time; none calls pebook):

* default: θ_i = base^(-2i/d) (RoFormer eq. 15; ``ref.frequencies`` of conftest);
* linear: θ_i / s (Chen et al. 2023, §2.3: positions m → m/s);
* ntk: base' = base · s^(d/(d-2)) (bloc97 2023; YaRN §3.1);
* dynamic_ntk: ntk with s = max(1, l'/L) (YaRN §3.3); and transformers'
  ``_compute_dynamic_ntk_parameters`` quoted, which agrees at its factor = 1;
* yarn: r = L/λ, the piecewise γ(r), θ' = (1-γ)θ/s + γθ, sqrt(1/t) = 0.1 ln s + 1 (YaRN §2.3,
  §3.2, §3.4); and transformers' ``_compute_yarn_parameters`` quoted (find_correction_dim,
  floor/ceil, linear_ramp_factor) for ``ramp="transformers"``.

They live here rather than in conftest because only this module uses them.
"""

import copy
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from pebook import MultiHeadAttention, TinyLM
from pebook.rope import rope_frequencies
from pebook.rope_scaling import (
    ROPE_SCALING_RULES,
    YARN_RAMPS,
    WavelengthTable,
    default_frequencies,
    dynamic_ntk_frequencies,
    linear_frequencies,
    ntk_frequencies,
    rope_scaling_frequencies,
    wavelength_table,
    yarn_attention_factor,
    yarn_frequencies,
    yarn_ramp,
)

F64 = torch.float64
RULES = ["default", "linear", "ntk", "dynamic_ntk", "yarn"]
TIGHT = dict(rtol=1e-13, atol=0.0)  # float64 against Python-float references: pow rounding only


# ---------------------------------------------------------------- references (float64, from the sources)


def default_ref(d, base):
    return [base ** (-2 * i / d) for i in range(d // 2)]


def linear_ref(d, base, s):
    """Chen et al. 2023: f'(x, m) = f(x, m/s), so the angle (m/s)·θ_i has frequency θ_i/s."""
    return [t / s for t in default_ref(d, base)]


def ntk_ref(d, base, s):
    """bloc97 2023 / YaRN §3.1: θ'_i = b'^(-2i/d), b' = b · s^(d/(d-2))."""
    return default_ref(d, base * s ** (d / (d - 2)))


def dynamic_ntk_ref(d, base, seq_len, L):
    """YaRN §3.3: s = max(1, l'/L), then NTK-aware."""
    return ntk_ref(d, base, max(1.0, seq_len / L))


def dynamic_ntk_transformers_ref(d, base, seq_len, L, factor):
    """transformers ``_compute_dynamic_ntk_parameters`` (emozilla's formula), quoted with names adapted."""
    seq_len = seq_len if seq_len is not None and seq_len > L else L
    base = base * ((factor * seq_len / L) - (factor - 1)) ** (d / (d - 2))
    return default_ref(d, base)


def gamma_ref(r, alpha, beta):
    """YaRN §3.2, the ramp, case by case."""
    if r < alpha:
        return 0.0
    if r > beta:
        return 1.0
    return (r - alpha) / (beta - alpha)


def yarn_paper_ref(d, base, s, L, alpha=1.0, beta=32.0):
    """YaRN §2.3 and §3.2: λ = 2π/θ, r = L/λ, θ' = (1 - γ(r)) θ/s + γ(r) θ."""
    out = []
    for theta in default_ref(d, base):
        r = L / (2 * math.pi / theta)
        g = gamma_ref(r, alpha, beta)
        out.append((1 - g) * theta / s + g * theta)
    return out


def find_correction_dim(num_rotations, dim, base, max_position_embeddings):
    """transformers: the (real) pair index whose r equals num_rotations."""
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings):
    """transformers (truncate=True): rounded outwards, clamped to [0, dim - 1]."""
    low = math.floor(find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def yarn_transformers_ref(d, base, factor, L, beta_fast=32, beta_slow=1):
    """transformers ``_compute_yarn_parameters`` (truncate=True), quoted with names adapted, in float64."""

    def linear_ramp_factor(min, max, dim):  # noqa: A002 (the reference's names)
        if min == max:
            max += 0.001
        linear_func = (torch.arange(dim, dtype=F64) - min) / (max - min)
        return torch.clamp(linear_func, 0, 1)

    pos_freqs = base ** (torch.arange(0, d, 2, dtype=F64) / d)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    low, high = find_correction_range(beta_fast, beta_slow, d, base, L)
    inv_freq_extrapolation_factor = 1 - linear_ramp_factor(low, high, d // 2)
    inv_freq = (
        inv_freq_interpolation * (1 - inv_freq_extrapolation_factor)
        + inv_freq_extrapolation * inv_freq_extrapolation_factor
    )
    return inv_freq, 0.1 * math.log(factor) + 1.0


def t64(values):
    return torch.as_tensor(values, dtype=F64)


def cpu64(result):
    inv_freq, factor = result
    return inv_freq.cpu().to(F64), factor


# ---------------------------------------------------------------- (1) against the references

CASES = [(8, 10000.0, 4.0, 64), (16, 10000.0, 2.5, 100), (64, 10000.0, 8.0, 2048), (128, 500000.0, 4.0, 8192)]


@pytest.mark.parametrize("d,base,s,L", CASES)
def test_rules_match_their_formulas(device, d, base, s, L):
    def run(rule, **kw):
        return cpu64(rope_scaling_frequencies(rule, d, base, dtype=F64, device=device, **kw))

    expected = {
        "default": (default_ref(d, base), 1.0),
        "linear": (linear_ref(d, base, s), 1.0),
        "ntk": (ntk_ref(d, base, s), 1.0),
        "yarn": (yarn_paper_ref(d, base, s, L), 0.1 * math.log(s) + 1),
    }
    for rule, (freqs, factor) in expected.items():
        got, got_factor = run(rule, factor=s, original_max_positions=L)
        torch.testing.assert_close(got, t64(freqs), **TIGHT, msg=rule)
        assert got_factor == pytest.approx(factor, rel=1e-15, abs=0)
    for seq_len in (1, L // 2, L, L + 1, 3 * L):
        got, got_factor = run("dynamic_ntk", original_max_positions=L, seq_len=seq_len)
        torch.testing.assert_close(got, t64(dynamic_ntk_ref(d, base, seq_len, L)), **TIGHT)
        assert got_factor == 1.0


@pytest.mark.parametrize("d,base,s,L", CASES + [(32, 10000.0, 16.0, 4096), (128, 1e6, 4.0, 32768)])
def test_yarn_transformers_ramp_matches_transformers(device, d, base, s, L):
    got, factor = cpu64(
        yarn_frequencies(d, base, factor=s, original_max_positions=L, ramp="transformers", dtype=F64, device=device)
    )
    expected, expected_factor = yarn_transformers_ref(d, base, s, L)
    torch.testing.assert_close(got, expected, **TIGHT)
    assert factor == expected_factor


@pytest.mark.parametrize("d,base,L", [(64, 10000.0, 2048), (128, 500000.0, 8192), (16, 10000.0, 100)])
@pytest.mark.parametrize("beta_fast,beta_slow", [(32.0, 1.0), (16.0, 2.0), (64.0, 0.5)])
def test_yarn_options_reach_the_formula(device, d, base, L, beta_fast, beta_slow):
    got, _ = cpu64(
        rope_scaling_frequencies(
            "yarn",
            d,
            base,
            factor=3.0,
            original_max_positions=L,
            dtype=F64,
            device=device,
            beta_fast=beta_fast,
            beta_slow=beta_slow,
        )
    )
    torch.testing.assert_close(got, t64(yarn_paper_ref(d, base, 3.0, L, alpha=beta_slow, beta=beta_fast)), **TIGHT)
    got, _ = cpu64(
        rope_scaling_frequencies(
            "yarn",
            d,
            base,
            factor=3.0,
            original_max_positions=L,
            dtype=F64,
            device=device,
            beta_fast=beta_fast,
            beta_slow=beta_slow,
            ramp="transformers",
        )
    )
    torch.testing.assert_close(got, yarn_transformers_ref(d, base, 3.0, L, beta_fast, beta_slow)[0], **TIGHT)


@pytest.mark.parametrize("d,base,L", [(64, 10000.0, 2048), (16, 10000.0, 100)])
def test_dynamic_ntk_is_transformers_dynamic_at_factor_one(device, d, base, L):
    for seq_len in (None, 1, L, 2 * L, 7 * L + 3):
        expected = dynamic_ntk_transformers_ref(d, base, seq_len, L, factor=1.0)
        got, _ = cpu64(
            dynamic_ntk_frequencies(d, base, seq_len=seq_len or L, original_max_positions=L, dtype=F64, device=device)
        )
        torch.testing.assert_close(got, t64(expected), **TIGHT)


@pytest.mark.parametrize("rule", RULES)
def test_float32_is_the_float64_result_rounded_once(device, rule):
    kw = dict(factor=4.0, original_max_positions=64, seq_len=200, device=device)
    f32, a32 = rope_scaling_frequencies(rule, 32, **kw)
    f64, a64 = rope_scaling_frequencies(rule, 32, dtype=F64, **kw)
    assert f32.dtype == torch.float32 and f64.dtype == F64
    assert f32.shape == f64.shape == (16,) and f32.device.type == f64.device.type == device.type
    assert torch.equal(f32, f64.float()) and a32 == a64
    assert isinstance(a32, float)


def test_yarn_ramp_is_the_papers_gamma(device):
    r = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 16.5, 31.0, 32.0, 32.5, 1e6], dtype=F64, device=device)
    for alpha, beta in ((1.0, 32.0), (2.0, 16.0)):
        expected = t64([gamma_ref(x, alpha, beta) for x in r.tolist()])
        torch.testing.assert_close(yarn_ramp(r, alpha, beta).cpu(), expected, **TIGHT)
    assert yarn_ramp(r.float()).dtype == torch.float32 and yarn_ramp(r).device.type == device.type


def test_yarn_attention_factor(device):
    for s in (1.0, 2.0, 4.0, 16.0, 32.0, math.e):
        assert yarn_attention_factor(s) == pytest.approx(0.1 * math.log(s) + 1.0, rel=1e-15)
    assert yarn_attention_factor(1) == 1.0
    assert yarn_attention_factor(math.e**10) == pytest.approx(2.0, rel=1e-15)


# ---------------------------------------------------------------- (2) relations between rules


@pytest.mark.parametrize("d", [4, 8, 64, 128])
@pytest.mark.parametrize("s", [1.0, 1.5, 4.0, 32.0])
def test_relations_between_rules(device, d, s):
    kw = dict(dtype=F64, device=device)
    default = default_frequencies(d, **kw)[0]
    assert torch.equal(default, rope_frequencies(d, dtype=F64, device=device))
    assert torch.equal(linear_frequencies(d, factor=s, **kw)[0], default / s)  # PI divides every frequency
    ntk = ntk_frequencies(d, factor=s, **kw)[0]
    assert ntk[0].item() == 1.0  # the fastest pair is untouched ...
    assert ntk[-1].item() == pytest.approx(default[-1].item() / s, rel=1e-13)  # ... the slowest is exactly θ/s
    # dynamic NTK at seq_len = s·L is static NTK with factor s (s·L an integer here)
    L = 64
    dyn = dynamic_ntk_frequencies(d, seq_len=int(s * L), original_max_positions=L, **kw)[0]
    torch.testing.assert_close(dyn, ntk, **TIGHT)


@pytest.mark.parametrize("d", [4, 16, 128])
def test_factor_one_and_short_inputs_leave_rope_unchanged(device, d):
    kw = dict(dtype=F64, device=device)
    default = default_frequencies(d, **kw)[0]
    for rule in ("linear", "ntk", "yarn"):
        for ramp in YARN_RAMPS if rule == "yarn" else (None,):
            extra = {"ramp": ramp} if ramp else {}
            inv_freq, factor = rope_scaling_frequencies(rule, d, factor=1.0, original_max_positions=64, **kw, **extra)
            assert torch.equal(inv_freq, default), (rule, ramp)
            assert factor == 1.0
    for seq_len in (1, 10, 63, 64):  # dynamic NTK inside the trained context: the original model
        assert torch.equal(dynamic_ntk_frequencies(d, seq_len=seq_len, original_max_positions=64, **kw)[0], default)


@pytest.mark.parametrize("ramp", YARN_RAMPS)
@pytest.mark.parametrize("d,base,s,L", [(64, 1e4, 4.0, 2048), (128, 5e5, 8.0, 8192), (32, 1e4, 16.0, 4096)])
def test_yarn_keeps_fast_pairs_interpolates_slow_ones_and_blends_between(device, ramp, d, base, s, L):
    """Pairs with r > β are the default pairs, pairs with r < α are linear interpolation, and the
    ones in between lie strictly between the two. These are the pairs where the paper's γ(r) and
    the transformers ramp agree (r_0 >= β in every case here)."""
    kw = dict(dtype=F64, device=device)
    yarn = yarn_frequencies(d, base, factor=s, original_max_positions=L, ramp=ramp, **kw)[0].cpu()
    default = default_frequencies(d, base, **kw)[0].cpu()
    linear = linear_frequencies(d, base, factor=s, **kw)[0].cpu()
    r = wavelength_table(d, base, train_length=L).rotations
    fast, slow = r > 32, r < 1
    middle = ~fast & ~slow
    assert fast.sum() > 0 and slow.sum() > 0 and middle.sum() > 0  # the cases exercise all three regimes
    assert torch.equal(yarn[fast], default[fast])
    torch.testing.assert_close(yarn[slow], linear[slow], **TIGHT)
    assert (yarn[middle] > linear[middle]).all() and (yarn[middle] < default[middle]).all()


def test_paper_and_transformers_ramps_differ_inside_the_ramp(device):
    """Inside α < r < β the paper's γ is linear in r, the reference code's linear in the pair index
    (log r): e.g. d = 64, L = 2048, s = 4 differ there by up to ~40%."""
    kw = dict(factor=4.0, original_max_positions=2048, dtype=F64, device=device)
    paper = yarn_frequencies(64, ramp="paper", **kw)[0].cpu()
    code = yarn_frequencies(64, ramp="transformers", **kw)[0].cpu()
    r = wavelength_table(64, train_length=2048).rotations
    outside = (r >= 32) | (r <= 1)
    assert torch.equal(paper[outside], code[outside])
    gap = ((paper - code).abs() / paper)[~outside]
    assert gap.max() > 0.3 and (gap > 0).all()


def test_transformers_ramp_keeps_pair_zero_when_training_is_short(device):
    """With L < 2πβ (≈ 201 for β = 32) even θ_0 = 1 turns fewer than β times; the reference code
    clamps its lower boundary at pair 0 and keeps that pair, the paper partly interpolates it.
    d = 8, L = 64, s = 4 by hand: r_0 = 64/2π = 10.186, γ(r_0) = 9.186/31 = 0.2963."""
    kw = dict(factor=4.0, original_max_positions=64, dtype=F64, device=device)
    paper = yarn_frequencies(8, **kw)[0].cpu()
    code = yarn_frequencies(8, ramp="transformers", **kw)[0].cpu()
    assert code[0].item() == 1.0
    gamma0 = (64 / (2 * math.pi) - 1) / 31
    assert paper[0].item() == pytest.approx((1 - gamma0) / 4 + gamma0, rel=1e-14)


# ---------------------------------------------------------------- (3) properties

dims = st.sampled_from([4, 6, 8, 16, 32, 64, 128])
bases = st.floats(2.0, 1e6)
factors = st.floats(1.0, 64.0)
lengths = st.integers(1, 1 << 16)


@given(d=dims, base=bases, s=factors, L=lengths, seq_len=st.integers(1, 1 << 18), ramp=st.sampled_from(YARN_RAMPS))
def test_every_rule_slows_rotation_and_keeps_the_order_of_pairs(device, d, base, s, L, seq_len, ramp):
    """For s >= 1 no rule makes a pair turn faster than in training (θ' <= θ), all keep
    θ'_0 > θ'_1 > … > 0, and YaRN lies between linear interpolation and the default."""
    default = default_frequencies(d, base, dtype=F64, device=device)[0].cpu()
    out = {}
    for rule in RULES:
        extra = {"ramp": ramp} if rule == "yarn" else {}
        inv_freq, factor = rope_scaling_frequencies(
            rule, d, base, factor=s, original_max_positions=L, seq_len=seq_len, dtype=F64, device=device, **extra
        )
        inv_freq = out[rule] = inv_freq.cpu()
        assert (inv_freq > 0).all() and (inv_freq.diff() < 0).all(), rule
        assert (inv_freq <= default * (1 + 1e-12)).all(), rule
        assert factor >= 1.0
    assert (out["yarn"] >= out["linear"] * (1 - 1e-12)).all()
    torch.testing.assert_close(out["linear"], default / s, **TIGHT)


@given(d=dims, base=bases, s=factors)
def test_ntk_interpolates_exactly_the_slowest_pair_and_keeps_the_fastest(device, d, base, s):
    ntk = ntk_frequencies(d, base, factor=s, dtype=F64, device=device)[0].cpu()
    default = default_frequencies(d, base, dtype=F64, device=device)[0].cpu()
    assert ntk[0].item() == 1.0
    assert ntk[-1].item() == pytest.approx(default[-1].item() / s, rel=1e-12)
    # in between, the per-pair scale θ/θ' = s^(2i/(d-2)) grows geometrically from 1 to s
    i = torch.arange(d // 2, dtype=F64)
    torch.testing.assert_close(default / ntk, s ** (2 * i / (d - 2)), rtol=1e-12, atol=0)


@given(d=dims, base=bases, s=factors, L=lengths)
def test_yarn_matches_the_papers_formula_everywhere(device, d, base, s, L):
    got = yarn_frequencies(d, base, factor=s, original_max_positions=L, dtype=F64, device=device)[0].cpu()
    torch.testing.assert_close(got, t64(yarn_paper_ref(d, base, s, L)), rtol=1e-12, atol=0)


@given(d=dims, base=bases, s=factors, L=lengths)
def test_yarn_transformers_ramp_agrees_with_the_paper_outside_the_ramp(device, d, base, s, L):
    """Where the paper's γ is 0 (r <= α) or 1 (r >= β) the reference code gives the same frequency,
    except pair 0 when r_0 < β (the code clamps its boundary there, see the test above), provided
    the code's correction range is not reversed (see the next test)."""
    low, high = find_correction_range(32, 1, d, base, L)
    assume(low <= high)
    code = yarn_frequencies(d, base, factor=s, original_max_positions=L, ramp="transformers", dtype=F64, device=device)[
        0
    ].cpu()
    paper = t64(yarn_paper_ref(d, base, s, L))
    r = t64([L * t / (2 * math.pi) for t in default_ref(d, base)])
    agree = (r <= 1) | (r >= 32)
    if r[0] < 32:
        agree[0] = False
        assert code[0].item() == 1.0
    torch.testing.assert_close(code[agree], paper[agree], rtol=1e-12, atol=0)
    torch.testing.assert_close(code, yarn_transformers_ref(d, base, s, L)[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("d,base,L,keeps", [(16, 10000.0, 1, True), (64, 10000.0, 2, True), (4, 2.0, 805, False)])
def test_transformers_ramp_in_degenerate_settings(device, d, base, L, keeps):
    """The reference's range comes out reversed (high < low) when L is a few positions (ceil of a
    negative correction dim < low = 0) or when every pair turns more than β times (floor(d(β)) >
    d - 1 = the clamped high). It then keeps every pair, respectively interpolates every pair,
    the opposite of the paper's γ(r)."""
    low, high = find_correction_range(32, 1, d, base, L)
    assert high < low
    kw = dict(factor=4.0, original_max_positions=L, dtype=F64, device=device)
    default = default_frequencies(d, base, dtype=F64, device=device)[0]
    linear = linear_frequencies(d, base, factor=4.0, dtype=F64, device=device)[0]
    code, paper = yarn_frequencies(d, base, ramp="transformers", **kw)[0], yarn_frequencies(d, base, **kw)[0]
    torch.testing.assert_close(code, default if keeps else linear, **TIGHT)
    torch.testing.assert_close(paper, linear if keeps else default, **TIGHT)


@given(d=dims, base=bases, L=st.integers(1, 4096), seq_len=st.integers(1, 1 << 16))
def test_dynamic_ntk_is_ntk_at_the_current_scale(device, d, base, L, seq_len):
    dyn = dynamic_ntk_frequencies(d, base, seq_len=seq_len, original_max_positions=L, dtype=F64, device=device)[0]
    ntk = ntk_frequencies(d, base, factor=max(1.0, seq_len / L), dtype=F64, device=device)[0]
    assert torch.equal(dyn, ntk)


@given(d=dims, base=bases, L=lengths)
def test_wavelength_table_is_consistent(device, d, base, L):
    table = wavelength_table(d, base, train_length=L, device=device)
    assert isinstance(table, WavelengthTable)
    assert table.pair.tolist() == list(range(d // 2))
    theta = rope_frequencies(d, base, dtype=F64, device=device)
    assert torch.equal(table.inv_freq, theta)
    torch.testing.assert_close(table.wavelength * table.inv_freq, torch.full_like(theta, 2 * math.pi), **TIGHT)
    torch.testing.assert_close(table.rotations * table.wavelength, torch.full_like(theta, float(L)), **TIGHT)
    assert torch.equal(table.completes_period, table.wavelength <= L)
    # slow pairs come last: once a pair fails to complete a period, every later one fails too
    flags = table.completes_period.tolist()
    assert flags == sorted(flags, reverse=True)
    for field in table:
        assert field.device.type == device.type


# ---------------------------------------------------------------- (4) frozen snapshots


def test_snapshot_small_case_by_hand(device):
    """d = 8, base 10⁴: θ = (1, 0.1, 0.01, 0.001); L = 64, s = 4.
    r = 64θ/2π = (10.186, 1.0186, 0.10186, 0.010186); γ = ((r-1)/31, (r-1)/31, 0, 0)
    = (0.296320, 0.000600, 0, 0); θ' = θ(1/4 + 3γ/4). NTK: b' = 10⁴ · 4^(4/3), θ'_3 = 0.001/4.
    The transformers ramp: correction dims (-0.497, 1.008) → (0, 2), ramp (0, ½, 1, 1)."""
    kw = dict(factor=4.0, original_max_positions=64, seq_len=256, dtype=F64, device=device)
    expected = {
        "default": [1.0, 0.1, 0.01, 0.001],
        "linear": [0.25, 0.025, 0.0025, 0.00025],
        "ntk": [1.0, 0.06299605249474366, 0.003968502629920499, 0.00025],
        "dynamic_ntk": [1.0, 0.06299605249474366, 0.003968502629920499, 0.00025],
        "yarn": [0.47223991188422504, 0.025044979764003543, 0.0025, 0.00025],
    }
    for rule, values in expected.items():
        got, _ = cpu64(rope_scaling_frequencies(rule, 8, **kw))
        torch.testing.assert_close(got, t64(values), rtol=1e-14, atol=0, msg=rule)
    got, factor = cpu64(rope_scaling_frequencies("yarn", 8, ramp="transformers", **kw))
    torch.testing.assert_close(got, t64([1.0, 0.0625, 0.0025, 0.00025]), rtol=1e-14, atol=0)
    assert factor == pytest.approx(1.1386294361119891, rel=1e-15)  # 0.1 ln 4 + 1


def test_snapshot_qwen_style_yarn(device):
    """A long-context configuration (d = 128, base 10⁶, L = 32768, s = 4) as in Qwen2.5's
    ``rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}``."""
    kw = dict(factor=4.0, original_max_positions=32768, dtype=F64, device=device)
    pairs = [0, 20, 30, 40, 63]
    code = yarn_frequencies(128, 1e6, ramp="transformers", **kw)[0].cpu()[pairs]
    paper = yarn_frequencies(128, 1e6, **kw)[0].cpu()[pairs]
    torch.testing.assert_close(code, t64(SNAP_CODE), rtol=1e-12, atol=0)
    torch.testing.assert_close(paper, t64(SNAP_PAPER), rtol=1e-12, atol=0)


# pairs 0 and 20 turn more than β = 32 times in L (kept: 10⁶^(-2i/128)), pairs 40 and 63 less than
# once (θ/4); pair 30 (r = 8.03) is inside the ramp, where the two ramps differ.
SNAP_CODE = [1.0, 0.01333521432163324, 0.001064360981247002, 4.445698525097307e-05, 3.102344401879299e-07]
SNAP_PAPER = [1.0, 0.01333521432163324, 0.0006469308884699847, 4.445698525097307e-05, 3.102344401879299e-07]


def test_snapshot_wavelength_table(device):
    table = wavelength_table(8, train_length=64, device=device)
    torch.testing.assert_close(table.wavelength.cpu(), t64([2 * math.pi * 10**k for k in range(4)]), **TIGHT)
    torch.testing.assert_close(table.rotations.cpu(), t64([64 / (2 * math.pi) / 10**k for k in range(4)]), **TIGHT)
    assert table.completes_period.tolist() == [True, True, False, False]


# ---------------------------------------------------------------- (5) a model with rescaled frequencies

VOCAB, DIM, HEADS, TRAIN_LEN = 11, 32, 2, 64  # head_dim 16


def make_lm(device, encoding="rope", seed=0):
    torch.manual_seed(seed)
    return TinyLM(VOCAB, DIM, 2, HEADS, TRAIN_LEN, encoding).to(device).eval()


def tokens(t, device, seed=0):
    return torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(seed)).to(device)


def test_set_rope_frequencies_on_a_model(device):
    model = make_lm(device)
    x = tokens(4 * TRAIN_LEN, device)  # test long: four times the training length
    with torch.no_grad():
        before = model(x)
        model.set_rope_frequencies(*rope_scaling_frequencies("default", DIM // HEADS))
        assert torch.equal(model(x), before)  # the default rule is the model as built

        inv_freq, factor = rope_scaling_frequencies("yarn", DIM // HEADS, factor=4, original_max_positions=TRAIN_LEN)
        model.set_rope_frequencies(inv_freq, factor)
        after = model(x)
    assert factor > 1 and torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-3
    for block in model.blocks:
        assert torch.equal(block.attn.position.inv_freq.cpu(), inv_freq)
        assert block.attn.position.attention_factor == factor


@pytest.mark.parametrize("rule", ["linear", "ntk", "dynamic_ntk", "yarn"])
def test_attention_with_rescaled_frequencies_matches_reference(device, ref, rand, rule):
    """Rescaled RoPE attention is attention with the new θ', and the attention factor a scales the
    logits by a²: the same as scaling the q and k projections by a with a factor of 1."""
    mha = MultiHeadAttention(DIM, HEADS, "rope").to(device)
    inv_freq, factor = rope_scaling_frequencies(rule, DIM // HEADS, factor=4, original_max_positions=16, seq_len=48)
    mha.set_rope_frequencies(inv_freq, factor)
    x = rand(2, 48, DIM, seed=1, device=device, dtype=torch.float32)
    scaled = copy.deepcopy(mha)
    with torch.no_grad():
        scaled.qkv.weight[: 2 * DIM] *= factor
        scaled.qkv.bias[: 2 * DIM] *= factor
        scaled.set_rope_frequencies(inv_freq, 1.0)
        got = mha(x)
    expected = ref.mha(scaled, x)  # the layer written out, rotating with θ' and no attention factor
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_failed_set_rope_frequencies_leaves_the_model_unchanged(device):
    model = make_lm(device)
    x = tokens(20, device)
    with torch.no_grad():
        before = model(x)
        with pytest.raises(ValueError):
            model.set_rope_frequencies(rope_frequencies(DIM // HEADS), 0.0)
        with pytest.raises(ValueError):
            model.set_rope_frequencies(rope_frequencies(DIM // HEADS)[:-1])
        assert torch.equal(model(x), before)


def test_set_rope_frequencies_rejects_bad_input(device):
    model = make_lm(device)
    good = rope_frequencies(DIM // HEADS)
    with pytest.raises(ValueError, match=r"inv_freq must have rotary_dim/2 = 8 entries, got 7"):
        model.set_rope_frequencies(good[:7])
    with pytest.raises(ValueError, match=r"inv_freq must have rotary_dim/2 = 8 entries, got 16"):
        model.set_rope_frequencies(rope_frequencies(2 * DIM // HEADS))
    with pytest.raises(ValueError, match=r"inv_freq must have 1 dimensions, got shape \(1, 8\)"):
        model.set_rope_frequencies(good[None])
    with pytest.raises(TypeError, match=r"inv_freq must be a floating-point tensor, got dtype torch.int64"):
        model.set_rope_frequencies(good.long())
    with pytest.raises(TypeError, match=r"inv_freq must be a torch.Tensor, got list"):
        model.set_rope_frequencies(good.tolist())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"attention_factor must be a finite number > 0, got {bad!r}"):
            model.set_rope_frequencies(good, bad)
    with pytest.raises(TypeError, match=r"attention_factor must be a real number, got '2' of type str"):
        model.set_rope_frequencies(good, "2")
    with pytest.raises(ValueError, match=r"needs a rotary encoding, this model has encoding='alibi'"):
        make_lm(device, "alibi").set_rope_frequencies(good)
    with pytest.raises(ValueError, match=r"set_rope_frequencies needs a rotary encoding, this layer has encoding='t5'"):
        MultiHeadAttention(DIM, HEADS, "t5").set_rope_frequencies(good)


# ---------------------------------------------------------------- (6) bad input


def test_unknown_rule_names_the_allowed_ones(device):
    allowed = r"\('default', 'linear', 'ntk', 'dynamic_ntk', 'yarn'\)"
    for bad in ("ntk-aware", "Linear", "dynamic", None, 3):
        with pytest.raises(ValueError, match=rf"rule must be one of {allowed}, got {bad!r}"):
            rope_scaling_frequencies(bad, 8, device=device)
    assert list(ROPE_SCALING_RULES) == RULES


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bad", [0.5, 0.0, -2.0, float("nan"), float("inf")])
def test_factor_below_one_is_rejected(device, rule, bad):
    pattern = rf"factor must be a finite number >= 1 \(the context extension .*\), got {bad!r}"
    with pytest.raises(ValueError, match=pattern):
        rope_scaling_frequencies(rule, 8, factor=bad, original_max_positions=64, seq_len=64, device=device)


@pytest.mark.parametrize("fn", [linear_frequencies, ntk_frequencies, yarn_frequencies, yarn_attention_factor])
def test_rule_functions_check_factor_too(fn):
    kw = {"original_max_positions": 64} if fn is yarn_frequencies else {}
    call = (lambda f: fn(f)) if fn is yarn_attention_factor else (lambda f: fn(8, factor=f, **kw))
    with pytest.raises(ValueError, match=r"factor must be a finite number >= 1 .*got 0.9"):
        call(0.9)
    with pytest.raises(TypeError, match=r"factor must be a real number, got True of type bool"):
        call(True)
    with pytest.raises(TypeError, match=r"factor must be a real number, got '4' of type str"):
        call("4")


def test_required_lengths_are_named(device):
    pattern = r"rule 'yarn' needs original_max_positions \(the training context length L\), got None"
    with pytest.raises(ValueError, match=pattern):
        rope_scaling_frequencies("yarn", 8, factor=4, device=device)
    with pytest.raises(ValueError, match=r"rule 'dynamic_ntk' needs original_max_positions .*got None"):
        rope_scaling_frequencies("dynamic_ntk", 8, seq_len=100, device=device)
    with pytest.raises(ValueError, match=r"rule 'dynamic_ntk' needs seq_len \(the current sequence length\), got None"):
        rope_scaling_frequencies("dynamic_ntk", 8, original_max_positions=64, device=device)
    for name in ("original_max_positions", "seq_len"):
        for bad, error, pattern in ((0, ValueError, "an int >= 1, got 0"), (64.0, TypeError, "an int, got 64.0")):
            with pytest.raises(error, match=rf"{name} must be {pattern}"):
                rope_scaling_frequencies("dynamic_ntk", 8, **{"original_max_positions": 64, "seq_len": 64, name: bad})


def test_unused_common_arguments_are_ignored_but_checked(device):
    """One call pattern sweeps every rule: the default rule ignores factor, the static ones seq_len."""
    default = rope_frequencies(8, device=device)
    got, _ = rope_scaling_frequencies("default", 8, factor=4, original_max_positions=64, seq_len=7, device=device)
    assert torch.equal(got, default)
    with pytest.raises(ValueError, match=r"seq_len must be an int >= 1, got -1"):
        rope_scaling_frequencies("linear", 8, factor=2, seq_len=-1, device=device)


def test_rule_options_are_checked():
    with pytest.raises(TypeError, match=r"rule 'linear' has no option 'beta_fast'; its options are: none"):
        rope_scaling_frequencies("linear", 8, factor=2, beta_fast=16)
    pattern = r"rule 'yarn' has no option 'mscale'; its options are: beta_fast, beta_slow, ramp"
    with pytest.raises(TypeError, match=pattern):
        rope_scaling_frequencies("yarn", 8, factor=2, original_max_positions=64, mscale=1.0)
    with pytest.raises(ValueError, match=r"ramp must be one of \('paper', 'transformers'\), got 'hf'"):
        rope_scaling_frequencies("yarn", 8, factor=2, original_max_positions=64, ramp="hf")
    with pytest.raises(ValueError, match=r"beta_fast must be > beta_slow .*got beta_fast=1.0, beta_slow=32.0"):
        yarn_frequencies(8, factor=2, original_max_positions=64, beta_fast=1, beta_slow=32)
    with pytest.raises(ValueError, match=r"beta_slow must be a finite number > 0, got 0.0"):
        yarn_frequencies(8, factor=2, original_max_positions=64, beta_slow=0)
    with pytest.raises(ValueError, match=r"beta must be > alpha .*got alpha=2.0, beta=2.0"):
        yarn_ramp(torch.ones(3), alpha=2, beta=2)
    with pytest.raises(TypeError, match=r"rotations must be a torch.Tensor, got list"):
        yarn_ramp([1.0, 2.0])


@pytest.mark.parametrize("rule", RULES)
def test_dim_base_and_dtype_are_checked(device, rule):
    kw = dict(factor=2, original_max_positions=64, seq_len=64, device=device)
    with pytest.raises(ValueError, match=r"dim must be even .*got 7"):
        rope_scaling_frequencies(rule, 7, **kw)
    with pytest.raises(ValueError, match=r"base must be a finite number > 1, got 1.0"):
        rope_scaling_frequencies(rule, 8, 1.0, **kw)
    with pytest.raises(TypeError, match=r"dtype must be one of torch.float32, torch.float64, got torch.bfloat16"):
        rope_scaling_frequencies(rule, 8, dtype=torch.bfloat16, **kw)
    if rule in ("ntk", "dynamic_ntk"):
        with pytest.raises(ValueError, match=r"dim must be >= 4 for NTK-aware scaling .*got 2"):
            rope_scaling_frequencies(rule, 2, **kw)
    else:
        assert rope_scaling_frequencies(rule, 2, **kw)[0].shape == (1,)


def test_wavelength_table_checks_its_arguments():
    with pytest.raises(ValueError, match=r"train_length must be an int >= 1, got 0"):
        wavelength_table(8, train_length=0)
    with pytest.raises(ValueError, match=r"dim must be even .*got 5"):
        wavelength_table(5, train_length=8)
    with pytest.raises(ValueError, match=r"base must be a finite number > 1, got 0.5"):
        wavelength_table(8, 0.5, train_length=8)
