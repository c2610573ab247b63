"""pebook.rope_scaling: RoPE frequency rules for context extension.

References (below, float64, Python floats, one pair at a time; none calls pebook):

* default: θ_i = base^(-2i/d) (RoFormer eq. 15; ``ref.frequencies`` of conftest);
* linear: θ_i / s (Chen et al. 2023, §2.3: positions m → m/s);
* ntk: base' = base · s^(d/(d-2)) (bloc97 2023; YaRN §3.1);
* dynamic_ntk: ntk with s = max(1, l'/L) (YaRN §3.3); and transformers'
  ``_compute_dynamic_ntk_parameters`` quoted, which agrees at its factor = 1;
* yarn_paper: r = L/λ, the piecewise γ(r), θ' = (1-γ)θ/s + γθ, sqrt(1/t) = 0.1 ln s + 1 (YaRN
  §2.3, §3.2, §3.4);
* yarn (its default ``ramp="transformers"``): transformers' ``_compute_yarn_parameters`` quoted
  (find_correction_dim, floor/ceil, linear_ramp_factor);
* dynamic (transformers' "dynamic"): the quoted ``_compute_dynamic_ntk_parameters`` above;
* llama3: Llama 3.1's ``apply_scaling`` (meta-llama/llama-models), case by case;
* longrope: θ_i / λ_i with λ the long or short factors (LongRoPE), attention sqrt(1 + ln s / ln L);
* base (ABF): θ_i = new_base^(-2i/d).

Section (7) checks ``from_hf_config`` against ``transformers`` itself (``ROPE_INIT_FUNCTIONS`` and
``LlamaRotaryEmbedding``), on the tiny configs of ``HF_CASES``.

They live here rather than in conftest because only this module uses them.
"""

import copy
import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from pebook import MultiHeadAttention, TinyLM
from pebook.rope import rope_frequencies
from pebook.rope_scaling import (
    HF_ROPE_TYPES,
    ROPE_SCALING_RULES,
    YARN_RAMPS,
    HFRule,
    WavelengthTable,
    base_frequencies,
    default_frequencies,
    dynamic_frequencies,
    dynamic_ntk_frequencies,
    from_hf_config,
    linear_frequencies,
    llama3_frequencies,
    longrope_attention_factor,
    longrope_frequencies,
    ntk_frequencies,
    rope_scaling_frequencies,
    rule_from_hf_config,
    wavelength_table,
    yarn_attention_factor,
    yarn_frequencies,
    yarn_paper_frequencies,
    yarn_ramp,
)

F64 = torch.float64
RULES = ["default", "linear", "ntk", "dynamic_ntk", "yarn", "yarn_paper"]
NEW_RULES = ["dynamic", "llama3", "longrope", "base"]  # added with from_hf_config; tested at the end
ALL_RULES = RULES + NEW_RULES
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
        "yarn": yarn_transformers_ref(d, base, s, L),  # the default ramp is the reference code's
        "yarn_paper": (yarn_paper_ref(d, base, s, L), 0.1 * math.log(s) + 1),
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
            "yarn_paper",
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
    paper = yarn_frequencies(8, ramp="paper", **kw)[0].cpu()
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
    kw = dict(factor=s, original_max_positions=L, dtype=F64, device=device)
    got = yarn_frequencies(d, base, ramp="paper", **kw)[0].cpu()
    torch.testing.assert_close(got, t64(yarn_paper_ref(d, base, s, L)), rtol=1e-12, atol=0)
    assert torch.equal(yarn_paper_frequencies(d, base, **kw)[0].cpu(), got)


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
    code, paper = yarn_frequencies(d, base, **kw)[0], yarn_frequencies(d, base, ramp="paper", **kw)[0]
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
        "yarn_paper": [0.47223991188422504, 0.025044979764003543, 0.0025, 0.00025],
    }
    for rule, values in expected.items():
        got, _ = cpu64(rope_scaling_frequencies(rule, 8, **kw))
        torch.testing.assert_close(got, t64(values), rtol=1e-14, atol=0, msg=rule)
    got, factor = cpu64(rope_scaling_frequencies("yarn", 8, **kw))  # the default ramp: transformers
    torch.testing.assert_close(got, t64([1.0, 0.0625, 0.0025, 0.00025]), rtol=1e-14, atol=0)
    assert factor == pytest.approx(1.1386294361119891, rel=1e-15)  # 0.1 ln 4 + 1


def test_snapshot_qwen_style_yarn(device):
    """A long-context configuration (d = 128, base 10⁶, L = 32768, s = 4) as in Qwen2.5's
    ``rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}``."""
    kw = dict(factor=4.0, original_max_positions=32768, dtype=F64, device=device)
    pairs = [0, 20, 30, 40, 63]
    code = yarn_frequencies(128, 1e6, ramp="transformers", **kw)[0].cpu()[pairs]
    paper = yarn_frequencies(128, 1e6, ramp="paper", **kw)[0].cpu()[pairs]
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
    allowed = (
        r"\('default', 'linear', 'ntk', 'dynamic_ntk', 'yarn', 'yarn_paper', 'dynamic', 'llama3', 'longrope', 'base'\)"
    )
    for bad in ("ntk-aware", "Linear", "dynamic-ntk", None, 3):
        with pytest.raises(ValueError, match=rf"rule must be one of {allowed}, got {bad!r}"):
            rope_scaling_frequencies(bad, 8, device=device)
    assert list(ROPE_SCALING_RULES) == ALL_RULES


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
    pattern = (
        r"rule 'yarn' has no option 'low_freq_factor'; its options are: beta_fast, beta_slow, ramp, truncate, "
        r"mscale, mscale_all_dim, attention_factor"
    )
    with pytest.raises(TypeError, match=pattern):
        rope_scaling_frequencies("yarn", 8, factor=2, original_max_positions=64, low_freq_factor=1.0)
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


# ---------------------------------------------------------------- (7) the rules added with from_hf_config

LLAMA31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)  # Llama 3.1


def llama3_ref(d, base, s, L, low, high):
    """Llama 3.1's ``apply_scaling`` (meta-llama/llama-models; transformers ``_compute_llama3_parameters``),
    one pair at a time: keep λ < L/high, divide λ > L/low by s, blend with γ = (L/λ - low)/(high - low)."""
    out = []
    for theta in default_ref(d, base):
        wavelen = 2 * math.pi / theta
        if wavelen < L / high:
            out.append(theta)
        elif wavelen > L / low:
            out.append(theta / s)
        else:
            smooth = (L / wavelen - low) / (high - low)
            out.append((1 - smooth) * theta / s + smooth * theta)
    return out


def longrope_ref(d, base, short, long, seq_len, L, s):
    """LongRoPE (Ding et al. 2024): θ_i / λ_i, λ the long factors beyond L, else the short ones;
    attention factor sqrt(1 + ln s / ln L) (1 for s <= 1), as in Phi-3 / transformers."""
    lam = long if seq_len > L else short
    return [t / x for t, x in zip(default_ref(d, base), lam)], (
        1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(L))
    )


def factors(n, start, step):
    return [start + step * i for i in range(n)]


@pytest.mark.parametrize("d,base,s,L", CASES)
@pytest.mark.parametrize("low,high", [(1.0, 4.0), (2.0, 8.0), (0.5, 32.0)])
def test_llama3_matches_the_reference_code(device, d, base, s, L, low, high):
    got, factor = cpu64(
        llama3_frequencies(
            d,
            base,
            factor=s,
            original_max_positions=L,
            low_freq_factor=low,
            high_freq_factor=high,
            dtype=F64,
            device=device,
        )
    )
    torch.testing.assert_close(got, t64(llama3_ref(d, base, s, L, low, high)), **TIGHT)
    assert factor == 1.0


@pytest.mark.parametrize("d,base,L", [(8, 10000.0, 64), (16, 10000.0, 100), (64, 500000.0, 4096)])
@pytest.mark.parametrize("s", [1.0, 4.0, 32.0])
def test_longrope_matches_the_paper(device, d, base, L, s):
    short, long = factors(d // 2, 1.0, 0.25), factors(d // 2, 2.0, 1.5)
    for seq_len in (1, L - 1, L, L + 1, 4 * L):
        got = cpu64(
            longrope_frequencies(
                d,
                base,
                factor=s,
                seq_len=seq_len,
                original_max_positions=L,
                short_factor=short,
                long_factor=long,
                dtype=F64,
                device=device,
            )
        )
        expected, expected_factor = longrope_ref(d, base, short, long, seq_len, L, s)
        torch.testing.assert_close(got[0], t64(expected), **TIGHT)
        assert got[1] == expected_factor
    assert longrope_attention_factor(s, L) == longrope_ref(d, base, short, long, 1, L, s)[1]


@pytest.mark.parametrize("d,base,L", [(8, 10000.0, 64), (64, 10000.0, 2048), (128, 500000.0, 8192)])
@pytest.mark.parametrize("f", [1.0, 2.0, 4.0, 8.0])
def test_dynamic_is_transformers_formula(device, d, base, L, f):
    for seq_len in (1, L - 1, L, L + 1, 2 * L, 7 * L + 3):
        got, factor = cpu64(
            dynamic_frequencies(d, base, factor=f, seq_len=seq_len, original_max_positions=L, dtype=F64, device=device)
        )
        torch.testing.assert_close(got, t64(dynamic_ntk_transformers_ref(d, base, seq_len, L, f)), **TIGHT)
        assert factor == 1.0
        if f == 1.0:  # the paper's dynamic NTK is its factor-1 case, bit for bit
            paper = dynamic_ntk_frequencies(
                d, base, seq_len=seq_len, original_max_positions=L, dtype=F64, device=device
            )
            assert torch.equal(got, paper[0].cpu())


@pytest.mark.parametrize("d,base,new_base", [(8, 10000.0, 500000.0), (128, 10000.0, 1e6), (64, 5e5, 5e5)])
def test_base_is_rope_with_the_new_base(device, d, base, new_base):
    got, factor = cpu64(base_frequencies(d, base, new_base=new_base, dtype=F64, device=device))
    torch.testing.assert_close(got, t64(default_ref(d, new_base)), **TIGHT)
    assert factor == 1.0


def test_new_rules_through_the_dispatcher(device):
    kw = dict(factor=4.0, original_max_positions=64, seq_len=256, dtype=F64, device=device)
    pairs = {
        "dynamic": (dynamic_frequencies, {}),
        "llama3": (llama3_frequencies, {"low_freq_factor": 2.0, "high_freq_factor": 8.0}),
        "longrope": (longrope_frequencies, {"short_factor": [1, 2, 3, 4], "long_factor": [4, 5, 6, 7]}),
        "base": (base_frequencies, {"new_base": 1e6}),
    }
    for rule, (fn, options) in pairs.items():
        got = rope_scaling_frequencies(rule, 8, **kw, **options)
        params = inspect.signature(fn).parameters
        expected = fn(8, **{k: v for k, v in kw.items() if k in params}, **options)
        assert torch.equal(got[0], expected[0]) and got[1] == expected[1], rule


@pytest.mark.parametrize("rule", NEW_RULES)
def test_new_rules_float32_is_the_float64_result_rounded_once(device, rule):
    options = {"llama3": {}, "dynamic": {}, "base": {"new_base": 5e5}}.get(
        rule, {"short_factor": factors(16, 1.0, 0.5), "long_factor": factors(16, 3.0, 0.5)}
    )
    kw = dict(factor=4.0, original_max_positions=64, seq_len=200, device=device, **options)
    f32, a32 = rope_scaling_frequencies(rule, 32, **kw)
    f64, a64 = rope_scaling_frequencies(rule, 32, dtype=F64, **kw)
    assert f32.dtype == torch.float32 and f32.shape == (16,) and f32.device.type == device.type
    assert torch.equal(f32, f64.float()) and a32 == a64 and isinstance(a32, float)


# -------------------------------- hypothesis properties of the new rules

dims = st.sampled_from([4, 8, 16, 64, 128])
bases = st.sampled_from([10000.0, 500000.0, 1e6])
scales = st.floats(1.0, 64.0)
lengths = st.integers(16, 16384)


@given(d=dims, base=bases, s=scales, L=lengths, low=st.floats(0.25, 4.0), gap=st.floats(0.5, 32.0))
def test_llama3_keeps_high_frequencies_and_divides_low_ones(device, d, base, s, L, low, gap):
    high = low + gap
    kw = dict(factor=s, original_max_positions=L, low_freq_factor=low, high_freq_factor=high, dtype=F64)
    got = llama3_frequencies(d, base, device=device, **kw)[0].cpu()
    theta = rope_frequencies(d, base, dtype=F64)
    wavelen = 2 * math.pi / theta
    fast, slow = wavelen < L / high, wavelen > L / low
    assert torch.equal(got[fast], theta[fast])  # high frequencies: untouched
    assert torch.equal(got[slow], theta[slow] / s)  # low frequencies: divided by the factor
    middle = ~fast & ~slow
    assert (got[middle] <= theta[middle] * (1 + 1e-15)).all() and (got[middle] >= theta[middle] / s * (1 - 1e-15)).all()
    # llama3 is YaRN's NTK-by-parts with the paper's ramp, α = low, β = high, and no temperature
    yarn = yarn_paper_frequencies(
        d, base, factor=s, original_max_positions=L, beta_slow=low, beta_fast=high, dtype=F64
    )[0]
    assert torch.equal(got, yarn)


def rule_options(rule, d):
    return {
        "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
        "longrope": {"short_factor": factors(d // 2, 1.0, 0.125), "long_factor": factors(d // 2, 1.0, 1.0)},
        "base": {"new_base": 2e6},
    }.get(rule, {})


@pytest.mark.parametrize("rule", NEW_RULES)
@given(d=dims, base=bases, s=scales, L=lengths, seq_len=st.integers(1, 100000))
def test_new_rules_return_positive_slower_decreasing_frequencies(device, rule, d, base, s, L, seq_len):
    got, attention = rope_scaling_frequencies(
        rule,
        d,
        base,
        factor=s,
        original_max_positions=L,
        seq_len=seq_len,
        dtype=F64,
        device=device,
        **rule_options(rule, d),
    )
    got = got.cpu()
    theta = rope_frequencies(d, base, dtype=F64)
    assert got.shape == (d // 2,) and (got > 0).all()
    assert (got <= theta * (1 + 1e-14)).all()  # every pair turns at most as fast as before
    assert (got[1:] < got[:-1]).all()  # and the order of the pairs is kept
    assert attention >= 1.0


@given(d=dims, base=bases, L=lengths, seq_len=st.integers(1, 100000))
def test_factor_one_is_plain_rope(device, d, base, L, seq_len):
    theta = rope_frequencies(d, base, dtype=F64, device=device)
    kw = dict(factor=1.0, original_max_positions=L, dtype=F64, device=device)
    assert torch.equal(linear_frequencies(d, base, factor=1.0, dtype=F64, device=device)[0], theta)
    for ramp in YARN_RAMPS:
        assert torch.equal(yarn_frequencies(d, base, ramp=ramp, **kw)[0], theta)
    assert torch.equal(llama3_frequencies(d, base, **kw)[0], theta)
    assert torch.equal(base_frequencies(d, base, new_base=base, dtype=F64, device=device)[0], theta)
    ones = [1.0] * (d // 2)
    longrope = longrope_frequencies(d, base, seq_len=seq_len, short_factor=ones, long_factor=ones, **kw)
    assert torch.equal(longrope[0], theta) and longrope[1] == 1.0
    if d >= 4:  # dynamic with factor 1 inside the context: s = seq_len/L rounded, so to float64 rounding
        torch.testing.assert_close(dynamic_frequencies(d, base, seq_len=min(seq_len, L), **kw)[0], theta, **TIGHT)
    # the three attention factors at s = 1
    assert yarn_attention_factor(1.0) == longrope_attention_factor(1.0, L) == 1.0


@given(f=st.floats(1.0, 32.0), L=st.integers(2, 8192), seq_len=st.integers(1, 8192))
def test_dynamic_is_plain_rope_inside_the_context(device, f, L, seq_len):
    assume(seq_len <= L)
    got = dynamic_frequencies(16, factor=f, seq_len=seq_len, original_max_positions=L, dtype=F64, device=device)[0]
    # s = f·L/L - (f - 1) is 1 up to the rounding of f·L/L (transformers' own formula)
    torch.testing.assert_close(got, rope_frequencies(16, dtype=F64, device=device), rtol=1e-14, atol=0)


# -------------------------------- frozen snapshots of the new rules


def test_snapshot_new_rules_by_hand(device):
    """d = 8, base 10⁴: θ = (1, 0.1, 0.01, 0.001); L = 64, s = 4; r = 64θ/2π = (10.186, 1.0186, 0.102, 0.0102).

    llama3 (low 1, high 4): pair 0 kept (r > 4), pairs 2, 3 divided by 4 (r < 1), pair 1 blended with
    γ = (1.0186 - 1)/3 = 0.006197: 0.1 (1/4 + 3γ/4) = 0.0254648. dynamic (f = 2, seq_len = 128):
    s = 2·2 - 1 = 3, θ'_i = θ_i · 3^(-i/3). longrope (short 1, 2, 4, 8; long 2, 4, 8, 16):
    θ/λ; attention sqrt(1 + ln 4 / ln 64) = sqrt(4/3). base 10⁶: θ = 10^(-6i/4)."""
    kw = dict(dtype=F64, device=device)
    got = cpu64(llama3_frequencies(8, factor=4.0, original_max_positions=64, **kw))
    torch.testing.assert_close(got[0], t64([1.0, 0.025464790894703257, 0.0025, 0.00025]), rtol=1e-14, atol=0)
    got = cpu64(dynamic_frequencies(8, factor=2.0, seq_len=128, original_max_positions=64, **kw))
    expected = [1.0, 0.1 * 3 ** (-1 / 3), 0.01 * 3 ** (-2 / 3), 0.001 / 3]
    torch.testing.assert_close(got[0], t64(expected), rtol=1e-14, atol=0)
    lr = dict(factor=4.0, original_max_positions=64, short_factor=[1, 2, 4, 8], long_factor=[2, 4, 8, 16], **kw)
    short = cpu64(longrope_frequencies(8, seq_len=64, **lr))
    long = cpu64(longrope_frequencies(8, seq_len=65, **lr))
    torch.testing.assert_close(short[0], t64([1.0, 0.05, 0.0025, 0.000125]), rtol=1e-15, atol=0)
    torch.testing.assert_close(long[0], t64([0.5, 0.025, 0.00125, 0.0000625]), rtol=1e-15, atol=0)
    assert short[1] == long[1] == pytest.approx(math.sqrt(4 / 3), rel=1e-15)
    got = cpu64(base_frequencies(8, new_base=1e6, **kw))
    torch.testing.assert_close(got[0], t64([1.0, 10**-1.5, 1e-3, 10**-4.5]), rtol=1e-14, atol=0)


def test_snapshot_llama31(device):
    """Llama 3.1 8B: d = 128, base 500 000, factor 8, low 1, high 4, L = 8192. Pairs with λ < 2048 are kept
    (pairs 0-28), λ > 8192 divided by 8 (pairs 35-63), the six between blended."""
    got = llama3_frequencies(128, 500000.0, dtype=F64, device=device, **LLAMA31)[0].cpu()
    pairs = [0, 28, 29, 32, 34, 35, 63]
    torch.testing.assert_close(got[pairs], t64(SNAP_LLAMA31), rtol=1e-12, atol=0)
    theta = rope_frequencies(128, 500000.0, dtype=F64)
    assert torch.equal(got[:29], theta[:29]) and torch.equal(got[35:], theta[35:] / 8)


SNAP_LLAMA31 = [
    1.0,
    0.003211445994752591,
    0.002166570763503359,
    0.0005248461609929547,
    0.00017850781276799646,
    9.556212353964683e-05,
    3.068925988914511e-07,
]


def test_snapshot_deepseek_style_yarn_attention_factor():
    """DeepSeek-V3: factor 40, mscale = mscale_all_dim = 1: the ratio is 1 (the softmax scale absorbs the
    temperature); mscale 1 over mscale_all_dim 0.707: (0.1 ln 40 + 1) / (0.0707 ln 40 + 1)."""
    kw = dict(factor=40.0, original_max_positions=4096, ramp="transformers")
    assert yarn_frequencies(64, mscale=1.0, mscale_all_dim=1.0, **kw)[1] == 1.0
    assert yarn_frequencies(64, mscale=1.0, mscale_all_dim=0.707, **kw)[1] == pytest.approx(
        1.0857263992561355, rel=1e-15
    )
    assert yarn_frequencies(64, attention_factor=1.5, **kw)[1] == 1.5


# ---------------------------------------------------------------- (8) from_hf_config against transformers itself


def short_long(n):
    """LongRoPE-like factor lists: short ones near 1, long ones growing towards the slow pairs."""
    return factors(n, 1.0, 0.05), [1.0 + 0.4 * i**1.5 for i in range(n)]


S8, L8 = short_long(8)  # head_dim 16
S32, L32 = short_long(32)  # head_dim 64
S4, L4 = short_long(4)  # head_dim 16, partial_rotary_factor 0.5

# (id, rope_scaling as a config.json has it, head_dim, rope_theta, max_position_embeddings, seq_lens)
HF_CASES = [
    ("default", {"rope_type": "default"}, 16, 10000.0, 128, [None]),
    ("default-128-1e6", {"rope_type": "default"}, 128, 1e6, 4096, [None]),
    ("default-legacy", {"type": "default"}, 64, 500000.0, 128, [None]),
    ("default-empty", {}, 32, 10000.0, 128, [None]),
    ("linear-2", {"rope_type": "linear", "factor": 2.0}, 16, 10000.0, 128, [None]),
    ("linear-8.5-legacy", {"type": "linear", "factor": 8.5}, 64, 10000.0, 128, [None]),
    ("linear-partial", {"rope_type": "linear", "factor": 4.0, "partial_rotary_factor": 0.5}, 64, 10000.0, 128, [None]),
    ("dynamic-1", {"rope_type": "dynamic", "factor": 1.0}, 16, 10000.0, 128, [None, 64, 128, 129, 1000]),
    ("dynamic-2", {"rope_type": "dynamic", "factor": 2.0}, 16, 10000.0, 128, [None, 1, 128, 129, 300, 4096]),
    ("dynamic-4-legacy", {"type": "dynamic", "factor": 4.0}, 128, 500000.0, 2048, [None, 2048, 2049, 16384]),
    (
        "dynamic-partial",
        {"rope_type": "dynamic", "factor": 3.0, "partial_rotary_factor": 0.5},
        64,
        1e4,
        64,
        [None, 200],
    ),
    ("yarn-4", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 16, 10000.0, 128, [None]),
    (
        "yarn-qwen",
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        128,
        1e6,
        131072,
        [None],
    ),
    (
        "yarn-16-betas",
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 2048,
            "beta_fast": 16,
            "beta_slow": 2,
        },
        64,
        10000.0,
        32768,
        [None],
    ),
    (
        "yarn-betas-float",
        {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 64.0,
            "beta_slow": 0.5,
        },
        128,
        500000.0,
        8192,
        [None],
    ),
    (
        "yarn-no-truncate",
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "truncate": False},
        64,
        10000.0,
        16384,
        [None],
    ),
    (
        "yarn-truncate",
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "truncate": True},
        64,
        10000.0,
        16384,
        [None],
    ),
    (
        "yarn-deepseek-v3",
        {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        64,
        10000.0,
        163840,
        [None],
    ),
    (
        "yarn-mscale-ratio",
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
        64,
        10000.0,
        163840,
        [None],
    ),
    (
        "yarn-mscale-alone",  # transformers ignores one of the two
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "mscale": 0.707},
        32,
        10000.0,
        4096,
        [None],
    ),
    (
        "yarn-attention-factor",
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "attention_factor": 1.25},
        32,
        10000.0,
        4096,
        [None],
    ),
    (
        "yarn-factor-null",  # factor = max_position_embeddings / original
        {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024},
        32,
        10000.0,
        6144,
        [None],
    ),
    (
        "yarn-short-training",  # L < 2πβ: the reference keeps pair 0
        {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 100},
        16,
        10000.0,
        300,
        [None],
    ),
    (
        "yarn-partial",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "partial_rotary_factor": 0.5},
        64,
        10000.0,
        1024,
        [None],
    ),
    (
        "longrope",
        {"rope_type": "longrope", "short_factor": S8, "long_factor": L8, "original_max_position_embeddings": 64},
        16,
        10000.0,
        256,
        [None, 1, 64, 65, 1000],
    ),
    (
        "longrope-phi35-legacy",
        {"type": "longrope", "short_factor": S32, "long_factor": L32, "original_max_position_embeddings": 4096},
        64,
        10000.0,
        131072,
        [None, 4096, 4097],
    ),
    (
        "longrope-factor",
        {
            "rope_type": "longrope",
            "short_factor": S8,
            "long_factor": L8,
            "original_max_position_embeddings": 64,
            "factor": 16.0,
        },
        16,
        10000.0,
        256,
        [None, 65],
    ),
    (
        "longrope-attention-factor",
        {
            "rope_type": "longrope",
            "short_factor": S8,
            "long_factor": L8,
            "original_max_position_embeddings": 64,
            "attention_factor": 1.1,
        },
        16,
        10000.0,
        256,
        [None, 65],
    ),
    (
        "longrope-partial",
        {
            "rope_type": "longrope",
            "short_factor": S4,
            "long_factor": L4,
            "original_max_position_embeddings": 64,
            "partial_rotary_factor": 0.5,
        },
        16,
        10000.0,
        256,
        [None, 65],
    ),
    (
        "llama3.1",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        128,
        500000.0,
        131072,
        [None],
    ),
    (
        "llama3-small",
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        16,
        10000.0,
        256,
        [None],
    ),
    (
        "llama3-2-8",
        {
            "rope_type": "llama3",
            "factor": 2.5,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 1024,
        },
        32,
        10000.0,
        4096,
        [None],
    ),
    (
        "llama3-factor-1",
        {
            "rope_type": "llama3",
            "factor": 1.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        16,
        10000.0,
        256,
        [None],
    ),
    (
        "llama3-partial",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
            "partial_rotary_factor": 0.75,
        },
        32,
        10000.0,
        4096,
        [None],
    ),
]
HF_RTOL = dict(rtol=1e-6, atol=0.0)  # float32 rounding: transformers rounds several times in float32, pebook once


@pytest.fixture(scope="module")
def hf():
    """transformers' LlamaConfig, ROPE_INIT_FUNCTIONS and LlamaRotaryEmbedding (skipped if not installed)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its config validation warns about the factor checks below
    yield SimpleNamespace(LlamaConfig=transformers.LlamaConfig, init=ROPE_INIT_FUNCTIONS, rotary=LlamaRotaryEmbedding)
    transformers.logging.set_verbosity(verbosity)


def hf_config(hf, rope_scaling, head_dim, theta, max_pos, *, legacy=False):
    """A tiny LlamaConfig with this rope config: as ``rope_parameters`` (5.x) or as the legacy ``rope_scaling``."""
    kw = dict(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=16,
    )
    if legacy:
        kw.update(rope_scaling=copy.deepcopy(rope_scaling), rope_theta=theta)
    else:
        kw.update(rope_parameters={**copy.deepcopy(rope_scaling), "rope_theta": theta})
    return hf.LlamaConfig(**kw)


def hf_frequencies(hf, config, device, seq_len):
    """What transformers computes: ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=...), or
    LlamaRotaryEmbedding.compute_default_rope_parameters for "default" (which has no entry there)."""
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        inv_freq, factor = hf.rotary.compute_default_rope_parameters(config)
        return inv_freq.to(device), factor
    return hf.init[rope_type](config, device, seq_len=seq_len)


@pytest.mark.parametrize("legacy", [False, True], ids=["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_from_hf_config_matches_transformers(device, hf, case, legacy):
    _, rope_scaling, head_dim, theta, max_pos, seq_lens = case
    config = hf_config(hf, rope_scaling, head_dim, theta, max_pos, legacy=legacy)
    for seq_len in seq_lens:
        expected, expected_factor = hf_frequencies(hf, config, device, seq_len)
        got, factor = from_hf_config(
            copy.deepcopy(rope_scaling), head_dim, theta, max_pos, seq_len=seq_len, device=device
        )
        assert got.dtype == torch.float32 and got.device.type == device.type and got.shape == expected.shape
        torch.testing.assert_close(got, expected.to(device), **HF_RTOL, msg=f"seq_len={seq_len}")
        assert factor == expected_factor and isinstance(factor, float), seq_len


@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_from_hf_config_matches_the_rotary_module(device, hf, case):
    """LlamaRotaryEmbedding as a model builds it (its inv_freq buffer and attention_scaling), and, for
    "dynamic" and "longrope", after a forward pass at each length (where transformers recomputes the
    frequencies with seq_len = max(position_ids) + 1)."""
    _, rope_scaling, head_dim, theta, max_pos, seq_lens = case
    rotary = hf.rotary(hf_config(hf, rope_scaling, head_dim, theta, max_pos)).to(device)
    got, factor = from_hf_config(rope_scaling, head_dim, theta, max_pos, device=device)
    torch.testing.assert_close(got, rotary.inv_freq, **HF_RTOL)
    assert factor == rotary.attention_scaling
    for seq_len in [s for s in seq_lens if s is not None]:
        x = torch.zeros(1, seq_len, head_dim, device=device)
        rotary(x, torch.arange(seq_len, device=device)[None])
        got, factor = from_hf_config(rope_scaling, head_dim, theta, max_pos, seq_len=seq_len, device=device)
        torch.testing.assert_close(got, rotary.inv_freq, **HF_RTOL, msg=f"seq_len={seq_len}")
        assert factor == rotary.attention_scaling


def test_from_hf_config_uses_a_top_level_original_max_position_embeddings(hf, device):
    """Phi-3 keeps original_max_position_embeddings next to rope_scaling; transformers prefers it."""
    transformers = pytest.importorskip("transformers")
    rope_scaling = {"type": "longrope", "short_factor": S8, "long_factor": L8, "original_max_position_embeddings": 999}
    config = transformers.Phi3Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        original_max_position_embeddings=64,
        rope_scaling=copy.deepcopy(rope_scaling),
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=16,
        pad_token_id=0,
    )
    for seq_len in (None, 64, 65):
        expected, expected_factor = hf.init["longrope"](config, device, seq_len=seq_len)
        got, factor = from_hf_config(
            rope_scaling, 16, 10000.0, 512, seq_len=seq_len, original_max_position_embeddings=64, device=device
        )
        torch.testing.assert_close(got, expected, **HF_RTOL)
        assert factor == expected_factor == math.sqrt(1 + math.log(512 / 64) / math.log(64))


@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_from_hf_config_is_its_pebook_rule(device, case):
    """from_hf_config evaluates the rule rule_from_hf_config names; float64 is the same values unrounded."""
    _, rope_scaling, head_dim, theta, max_pos, seq_lens = case
    for seq_len in seq_lens:
        rule = rule_from_hf_config(rope_scaling, head_dim, theta, max_pos, seq_len=seq_len)
        assert isinstance(rule, HFRule) and rule.rule in ROPE_SCALING_RULES
        assert rule.dim == int(head_dim * rope_scaling.get("partial_rotary_factor", 1.0)) and rule.base == theta
        via_rule = ROPE_SCALING_RULES[rule.rule](rule.dim, rule.base, dtype=F64, device=device, **rule.options)
        got = from_hf_config(rope_scaling, head_dim, theta, max_pos, seq_len=seq_len, dtype=F64, device=device)
        assert torch.equal(got[0], via_rule[0]) and got[1] == via_rule[1]
        assert torch.equal(
            from_hf_config(rope_scaling, head_dim, theta, max_pos, seq_len=seq_len)[0], got[0].float().cpu()
        )


def test_rule_from_hf_config_names_the_pebook_rule():
    yarn = rule_from_hf_config(
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 16, 1e4, 128
    )
    assert yarn == HFRule("yarn", 16, 1e4, {"factor": 4.0, "original_max_positions": 32, "ramp": "transformers"})
    dynamic = rule_from_hf_config({"type": "dynamic", "factor": 2.0}, 16, 1e4, 128)
    assert dynamic == HFRule("dynamic", 16, 1e4, {"factor": 2.0, "seq_len": 128, "original_max_positions": 128})
    base = rule_from_hf_config({"rope_type": "base", "new_base": 1e6}, 16, 1e4, 128)
    assert base == HFRule("base", 16, 1e4, {"new_base": 1e6})
    # rope_theta in the dict is the base (5.x rope_parameters); base=None takes it from there
    assert rule_from_hf_config({"rope_theta": 5e5}, 16, None, 128) == HFRule("default", 16, 5e5, {})
    assert set(HF_ROPE_TYPES) - {"base"} <= set(ROPE_SCALING_RULES)


def test_from_hf_config_base_rule(device):
    """ABF has no transformers rope_type; pebook reads {"rope_type": "base", "new_base": b}, which is the
    default rule at base b (how a transformers config writes it: rope_theta = b)."""
    got = from_hf_config({"rope_type": "base", "new_base": 1e6}, 128, 1e4, 4096, device=device)
    assert torch.equal(got[0], from_hf_config({"rope_type": "default"}, 128, 1e6, 4096, device=device)[0])
    assert got[1] == 1.0


# ---------------------------------------------------------------- (9) bad Hugging Face configs and options


def hf_call(rope_scaling, head_dim=16, base=10000.0, max_pos=128, **kw):
    return from_hf_config(rope_scaling, head_dim, base, max_pos, **kw)


LR = {"rope_type": "longrope", "short_factor": S8, "long_factor": L8, "original_max_position_embeddings": 64}
L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0}


def test_unknown_rope_type_names_the_allowed_ones():
    allowed = r"\('default', 'linear', 'dynamic', 'yarn', 'longrope', 'llama3', 'base'\)"
    for bad in ("su", "ntk", "dynamic_ntk", "Linear", "proportional", 3):
        with pytest.raises(ValueError, match=rf"rope_scaling\['rope_type'\] must be one of {allowed}, got {bad!r}"):
            hf_call({"rope_type": bad, "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_scaling\['rope_type'\] must be one of .*got 'su'"):
        hf_call({"type": "su"})
    with pytest.raises(ValueError, match=r"both 'rope_type' and the legacy 'type'.*rope_type='linear', type='dynamic'"):
        hf_call({"rope_type": "linear", "type": "dynamic", "factor": 2.0})
    with pytest.raises(TypeError, match=r"rope_scaling must be a dict .*got list"):
        hf_call([("rope_type", "linear")])


@pytest.mark.parametrize("rope_scaling", [YARN, {**LR, "original_max_position_embeddings": None}, L3])
def test_missing_original_max_position_embeddings_is_named(rope_scaling):
    rope_type = rope_scaling["rope_type"]
    pattern = (
        rf"original_max_position_embeddings is required for rope_type '{rope_type}' .*max_position_embeddings = 128"
    )
    with pytest.raises(ValueError, match=pattern):
        hf_call({k: v for k, v in rope_scaling.items() if v is not None})
    # given as the argument (a top-level config field), it is enough
    hf_call({k: v for k, v in rope_scaling.items() if v is not None}, original_max_position_embeddings=64)


@pytest.mark.parametrize(
    "rope_scaling,key",
    [
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "dynamic", "factor": None}, "factor"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 64}, "factor"),
        ({**L3, "original_max_position_embeddings": 64, "low_freq_factor": None}, "low_freq_factor"),
        (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 64},
            "high_freq_factor",
        ),
        ({k: v for k, v in LR.items() if k != "short_factor"}, "short_factor"),
        ({k: v for k, v in LR.items() if k != "long_factor"}, "long_factor"),
        ({"rope_type": "base"}, "new_base"),
    ],
)
def test_missing_required_keys_are_named(rope_scaling, key):
    with pytest.raises(
        ValueError, match=rf"rope_scaling\['{key}'\] is required for rope_type '{rope_scaling['rope_type']}'"
    ):
        hf_call(rope_scaling)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 0.5},
        {"rope_type": "dynamic", "factor": 0.9},
        {**YARN, "factor": 0.5, "original_max_position_embeddings": 64},
        {**L3, "factor": 0.5, "original_max_position_embeddings": 64},
        {**LR, "factor": 0.5},
    ],
)
def test_factor_below_one_is_rejected_in_configs(rope_scaling):
    with pytest.raises(
        ValueError,
        match=rf"rope_scaling \(rope_type '{rope_scaling['rope_type']}'\): factor must be a finite number >= 1",
    ):
        hf_call(rope_scaling)


def test_longrope_factor_lists_must_have_one_entry_per_pair():
    """transformers' _validate_longrope_rope_parameters: length int(head_dim · partial_rotary_factor) // 2."""
    with pytest.raises(ValueError, match=r"short_factor must have 8 entries \(one rescale factor per rotation pair"):
        hf_call({**LR, "short_factor": S8[:7]})
    with pytest.raises(ValueError, match=r"long_factor must have 8 entries .*got 16"):
        hf_call({**LR, "long_factor": L8 + L8})
    with pytest.raises(ValueError, match=r"short_factor must have 4 entries .*got 8"):
        hf_call({**LR, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"long_factor must hold finite numbers > 0 .*got 0.0"):
        hf_call({**LR, "long_factor": [0.0] + L8[1:]})
    with pytest.raises(TypeError, match=r"short_factor must hold real numbers, got '1' of type str"):
        hf_call({**LR, "short_factor": ["1"] + S8[1:]})
    with pytest.raises(TypeError, match=r"short_factor must be a list of numbers .*got float"):
        hf_call({**LR, "short_factor": 1.0})
    with pytest.raises(
        ValueError, match=r"no 'factor' and max_position_embeddings / original_max_position_embeddings = 32 / 64 < 1"
    ):
        hf_call(LR, max_pos=32)


def test_llama3_needs_low_below_high():
    rope_scaling = {**L3, "original_max_position_embeddings": 64}
    for low, high in ((4.0, 4.0), (4.0, 1.0)):
        with pytest.raises(
            ValueError,
            match=rf"low_freq_factor must be < high_freq_factor .*got low_freq_factor={low}, high_freq_factor={high}",
        ):
            hf_call({**rope_scaling, "low_freq_factor": low, "high_freq_factor": high})
    with pytest.raises(ValueError, match=r"low_freq_factor must be a finite number > 0, got 0.0"):
        llama3_frequencies(16, factor=2.0, original_max_positions=64, low_freq_factor=0.0)
    with pytest.raises(TypeError, match=r"high_freq_factor must be a real number, got '4' of type str"):
        llama3_frequencies(16, factor=2.0, original_max_positions=64, high_freq_factor="4")


def test_yarn_options_in_configs_are_checked():
    rope_scaling = {**YARN, "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match=r"beta_fast must be > beta_slow .*got beta_fast=1.0, beta_slow=32.0"):
        hf_call({**rope_scaling, "beta_fast": 1, "beta_slow": 32})
    with pytest.raises(TypeError, match=r"truncate must be True or False, got 'no'"):
        hf_call({**rope_scaling, "truncate": "no"})
    with pytest.raises(ValueError, match=r"attention_factor must be a finite number > 0, got -1.0"):
        hf_call({**rope_scaling, "attention_factor": -1.0})
    with pytest.raises(ValueError, match=r"mscale_all_dim must be a finite number > 0, got -0.5"):
        hf_call({**rope_scaling, "mscale": 1.0, "mscale_all_dim": -0.5})


def test_yarn_rule_options_are_checked():
    kw = dict(factor=4.0, original_max_positions=64)
    with pytest.raises(
        ValueError, match=r"mscale and mscale_all_dim must be given together .*mscale=0.7, mscale_all_dim=None"
    ):
        yarn_frequencies(16, mscale=0.7, **kw)
    with pytest.raises(ValueError, match=r"truncate=False applies only to ramp='transformers' .*got ramp='paper'"):
        yarn_frequencies(16, truncate=False, ramp="paper", **kw)
    with pytest.raises(ValueError, match=r"mscale must be a finite number > 0, got 0.0"):
        yarn_attention_factor(4.0, mscale=0.0)


def test_unknown_keys_and_bad_shared_fields_are_named():
    with pytest.raises(
        ValueError,
        match=r"rope_scaling has key 'beta_fats', which rope_type 'yarn' does not read; its keys are: .*beta_fast",
    ):
        hf_call({**YARN, "original_max_position_embeddings": 64, "beta_fats": 16})
    with pytest.raises(ValueError, match=r"rope_scaling has key 'factor', which rope_type 'default' does not read"):
        hf_call({"rope_type": "default", "factor": 2.0})
    with pytest.raises(ValueError, match=r"base=10000.0 differs from rope_scaling\['rope_theta'\]=500000.0"):
        hf_call({"rope_type": "default", "rope_theta": 500000.0})
    with pytest.raises(ValueError, match=r"base is None and rope_scaling has no 'rope_theta'"):
        hf_call({"rope_type": "default"}, base=None)
    with pytest.raises(
        ValueError,
        match=r"head_dim · partial_rotary_factor must give an even rotary dimension >= 2, got int\(16 · 0.2\) = 3",
    ):
        hf_call({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.2})
    with pytest.raises(ValueError, match=r"rope_scaling\['partial_rotary_factor'\] must be in \(0, 1\], got 1.5"):
        hf_call({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.5})
    with pytest.raises(ValueError, match=r"max_position_embeddings must be an int >= 1, got 0"):
        hf_call({"rope_type": "default"}, max_pos=0)
    with pytest.raises(ValueError, match=r"seq_len must be an int >= 1, got 0"):
        hf_call({"rope_type": "dynamic", "factor": 2.0}, seq_len=0)
    with pytest.raises(TypeError, match=r"head_dim must be an int, got 16.0"):
        hf_call({"rope_type": "default"}, head_dim=16.0)
    with pytest.raises(TypeError, match=r"dtype must be one of torch.float32, torch.float64, got torch.bfloat16"):
        hf_call({"rope_type": "default"}, dtype=torch.bfloat16)


def test_new_rule_options_are_checked(device):
    kw = dict(factor=2.0, original_max_positions=64, seq_len=64, device=device)
    with pytest.raises(
        TypeError,
        match=r"rule 'longrope' needs the option 'short_factor' \(its required options: short_factor, long_factor\)",
    ):
        rope_scaling_frequencies("longrope", 8, **kw)
    with pytest.raises(TypeError, match=r"rule 'base' needs the option 'new_base'"):
        rope_scaling_frequencies("base", 8, **kw)
    with pytest.raises(ValueError, match=r"rule 'dynamic' needs seq_len \(the current sequence length\), got None"):
        rope_scaling_frequencies("dynamic", 8, factor=2.0, original_max_positions=64, device=device)
    with pytest.raises(ValueError, match=r"rule 'llama3' needs original_max_positions .*got None"):
        rope_scaling_frequencies("llama3", 8, factor=2.0, device=device)
    with pytest.raises(
        ValueError, match=r"new_base must be >= base \(ABF raises the base\), got new_base=1000.0, base=10000.0"
    ):
        base_frequencies(8, new_base=1000.0)
    with pytest.raises(ValueError, match=r"new_base must be a finite number > 1, got 1.0"):
        base_frequencies(8, new_base=1.0)
    with pytest.raises(ValueError, match=r"dim must be >= 4 for NTK-aware scaling .*got 2"):
        dynamic_frequencies(2, factor=2.0, seq_len=100, original_max_positions=64)
    with pytest.raises(ValueError, match=r"original_max_positions must be an int >= 2, got 1"):
        longrope_attention_factor(2.0, 1)


@pytest.mark.parametrize("rule", NEW_RULES)
@pytest.mark.parametrize("bad", [0.5, 0.0, float("nan")])
def test_new_rules_reject_factor_below_one(device, rule, bad):
    options = rule_options(rule, 8)
    with pytest.raises(ValueError, match=rf"factor must be a finite number >= 1 .*got {bad!r}"):
        rope_scaling_frequencies(rule, 8, factor=bad, original_max_positions=64, seq_len=64, device=device, **options)
    if rule != "base":  # the rule functions check it too
        fn = ROPE_SCALING_RULES[rule]
        kw = {
            k: v
            for k, v in dict(seq_len=64, original_max_positions=64).items()
            if k in inspect.signature(fn).parameters
        }
        with pytest.raises(ValueError, match=r"factor must be a finite number >= 1"):
            fn(8, factor=bad, device=device, **kw, **options)


def test_longrope_accepts_tuples_and_tensors(device):
    kw = dict(factor=4.0, seq_len=100, original_max_positions=64, dtype=F64, device=device)
    as_list = longrope_frequencies(8, short_factor=[1, 2, 3, 4], long_factor=[2.0, 3.0, 4.0, 5.0], **kw)
    as_other = longrope_frequencies(8, short_factor=(1, 2, 3, 4), long_factor=torch.tensor([2.0, 3.0, 4.0, 5.0]), **kw)
    assert torch.equal(as_list[0], as_other[0]) and as_list[1] == as_other[1]
    with pytest.raises(TypeError, match=r"long_factor must be a list of numbers or a 1-D real tensor"):
        longrope_frequencies(8, short_factor=[1, 2, 3, 4], long_factor=torch.ones(2, 2), **kw)


# rule, its pebook call with default options only, the same config as transformers reads it
DEFAULTS_VS_HF = [
    ("linear", {}, {"rope_type": "linear", "factor": 4.0}),
    ("dynamic", {"seq_len": 300}, {"rope_type": "dynamic", "factor": 4.0}),
    ("yarn", {}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    # transformers requires the two band factors; pebook's defaults are Llama 3.1's, 1 and 4
    (
        "llama3",
        {},
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    ),
    (
        "longrope",
        {"seq_len": 300, "short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)]},
        {
            "rope_type": "longrope",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "short_factor": [1.0] * 8,
            "long_factor": [1.0 + i for i in range(8)],
        },
    ),
]


@pytest.mark.parametrize("rule,options,rope_scaling", DEFAULTS_VS_HF, ids=[c[0] for c in DEFAULTS_VS_HF])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rules_with_default_options_are_what_transformers_computes(device, hf, rule, options, rope_scaling, base):
    """``rope_scaling_frequencies(rule, ...)`` with no option but the required ones equals
    ``ROPE_INIT_FUNCTIONS[rule]`` for the same config: the plain rule names are transformers' rules
    (``original_max_positions`` is the config's original_max_position_embeddings, or for "linear"
    and "dynamic", which have none, its max_position_embeddings = 64)."""
    head_dim, L = 16, 64
    config = hf_config(hf, rope_scaling, head_dim, base, L if rule in ("linear", "dynamic") else 256)
    options = dict(options)
    seq_len = options.pop("seq_len", None)
    expected, expected_factor = hf_frequencies(hf, config, device, seq_len)
    got, factor = rope_scaling_frequencies(
        rule, head_dim, base, factor=4.0, original_max_positions=L, seq_len=seq_len, device=device, **options
    )
    torch.testing.assert_close(got, expected.to(device), **HF_RTOL)
    assert factor == pytest.approx(expected_factor, rel=1e-15)
    if rule == "yarn":  # and not the paper's ramp, which differs here (L = 64 < 2πβ: pair 0)
        paper, _ = rope_scaling_frequencies("yarn_paper", head_dim, base, factor=4.0, original_max_positions=L)
        assert paper[0].item() < 1.0 == got[0].item()
