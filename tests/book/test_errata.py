"""Executable evidence for the Errata chapter.

Each test proves one or more rows of the errata table (ids such as ``E000-05`` in the docstrings):
either by running a code listing quoted from the source documents (pebook/book/seed_listings/*.txt, via
:func:`pebook.book.errata.run_listing`) and asserting what really happens, or by evaluating a claimed
formula or property next to the correct one from pebook. CPU only, seeded, explicit tolerances.
"""

from __future__ import annotations

import functools
import io
import math
import re
from contextlib import redirect_stdout

import pytest
import torch

from pebook import (
    ALiBi,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    TinyLM,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_rope_complex,
    causal_mask,
    positional_attention,
    relative_position_index,
    rope_frequencies,
    seed_everything,
    shaw_attention,
    sinusoidal_encoding,
    sinusoidal_frequencies,
    sinusoidal_shift_matrix,
)
from pebook.book.errata import LISTING_SUFFIX, LISTINGS_DIR, ListingRun, list_listings, run_listing

CPU_ONLY = not torch.cuda.is_available()
# The line of listing 000_1 that overwrites nn.MultiheadAttention with nn.Linear.
LINEAR_OVERWRITE = "        self.self_attn = nn.Linear(d_model, d_model)\n"


@pytest.fixture(autouse=True)
def _seed():
    seed_everything(0)


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with stdout captured (listing 003_2 prints inside forward); return (result, stdout)."""
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        result = fn(*args, **kwargs)
    return result, buffer.getvalue()


@functools.lru_cache(maxsize=1)
def _repaired_000() -> ListingRun:
    """Listing 000_1 with OUR two repairs (``import math`` injected, the nn.Linear overwrite deleted).

    Run once (seed 0, inside run_listing) and shared: the tests only read its namespace.
    """
    run = run_listing("000_1", overrides={"math": math}, patches={LINEAR_OVERWRITE: ""})
    assert run.ok, run.error
    return run


# --------------------------------------------------------------------------- errata.py itself


def test_list_listings_and_run_listing_contract():
    """run_listing's contract: the seven quoted listings, exact patches only, unambiguous names."""
    assert list_listings() == [
        "000_1_transformer_model",
        "001_1_relative_positional_encoding",
        "002_1_imports",
        "002_2_positional_encoding_truncated",
        "003_1_sinusoidal_positional_encoding",
        "003_2_relative_attention_score",
        "003_3_rotary_attention",
    ]
    with pytest.raises(ValueError, match="occurs 0 times"):
        run_listing("000_1", patches={"no such text": ""})
    with pytest.raises(ValueError, match="matches"):
        run_listing("00")  # ambiguous prefix
    assert run_listing("000_1").path == LISTINGS_DIR / f"000_1_transformer_model{LISTING_SUFFIX}"


def test_listings_are_quoted_data_not_package_code():
    """The listings are .txt files in a plain folder (no __init__.py, no .py): quoted data, never imported."""
    assert LISTING_SUFFIX == ".txt"
    files = sorted(p.name for p in LISTINGS_DIR.iterdir() if p.is_file())
    assert files == [f"{name}.txt" for name in list_listings()]
    assert not list(LISTINGS_DIR.glob("*.py"))
    with pytest.raises(ModuleNotFoundError):
        __import__("pebook.book.seed_listings.003_3_rotary_attention")
    # one of them is not even valid Python: it is truncated in its source document
    with pytest.raises(SyntaxError):
        compile((LISTINGS_DIR / "002_2_positional_encoding_truncated.txt").read_text(encoding="utf-8"), "002_2", "exec")


# --------------------------------------------------------------------------- document 000


def test_000_listing_crashes_name_error_math():
    """E000-20: the listing never imports math."""
    run = run_listing("000_1")
    assert run.error_type == "NameError"
    assert "name 'math' is not defined" in run.error_message
    assert "math.log(10000.0)" in run.error_source
    assert "PositionalEncoding" in run.namespace and "model" not in run.namespace


def test_000_listing_next_crash_self_attn_overwritten_by_linear():
    """E000-21: after adding ``import math`` the nn.Linear that replaced nn.MultiheadAttention is called with q, k, v,
    attn_mask."""
    run = run_listing("000_1", overrides={"math": math})
    assert run.error_type == "TypeError"
    assert "unexpected keyword argument 'attn_mask'" in run.error_message
    assert run.error_source == "attn_out = self.self_attn(src, src, src, attn_mask=src_mask)"
    layer = run.namespace["EncoderLayer"](16, 2)
    assert isinstance(layer.self_attn, torch.nn.Linear)  # the MultiheadAttention is gone


def test_000_listing_prints_nothing_and_real_output_is_3d():
    """E000-23, E000-24, E000-27: the script has no print(); once repaired its output is (10, 20, 512), not one printed
    row."""
    run = _repaired_000()
    assert run.stdout == ""
    out = run.namespace["src"]
    assert tuple(out.shape) == (10, 20, 512) and out.numel() == 102_400


# First printed lines of 000 §5.4 "运行结果展示", quoted verbatim (the block is truncated in the source).
FABRICATED_000 = """
tensor([[ 2.1058, -1.3422,  0.2443,  0.4227, -0.1804,  0.5488, -0.7789, -1.4227,  1.8048,
          1.4048, -1.3107,  1.5073,  1.4227,  0.5269,  0.5922,  1.2921,  0.3644,  0.3389,
          1.3527, -0.1119,  0.4166,  0.4270, -1.4631,  0.5380,  0.3810,  0.6777,  1.3723,
          1.5626, -1.4614, -0.2081,  0.5269,  0.5922,  1.2921,  0.3644,  0.3389,  1.3527,
          -0.1119,  0.4166,  0.4270, -1.4631,  0.5380,  0.3810,  0.6777,  1.3723,  1.5626,
          -1.4614, -0.2081,  0.5269,  0.5922,  1.2921,  0.3644,  0.3389,  1.3527,
          -0.1119,  0.4166,  0.4270, -1.4631,  0.5380,  0.3810,  0.6777,  1.3723,  1.5626,
"""


def test_000_printed_output_is_a_repeating_pattern_unlike_real_output():
    """E000-27: from the 14th value on, the 'output' repeats with period 17; the real output does not."""
    values = [float(x) for x in re.findall(r"-?\d+\.\d+", FABRICATED_000)]
    assert len(values) == 62
    assert all(values[i] == values[i + 17] for i in range(13, len(values) - 17))
    real = _repaired_000().namespace["src"].flatten()
    assert (real[13:30] - real[30:47]).abs().max() > 0.1


def test_000_doc_formula_is_not_vaswani():
    """E000-05, V002-1, V004-1: PE_i = sin(i/10000^(2l/d)) + cos(i/10000^(2(l+1)/d)) vs Vaswani's PE(pos, 2i), PE(pos,
    2i+1)."""
    i, l, d = 1, 0, 4
    doc = math.sin(i / 10000 ** (2 * l / d)) + math.cos(i / 10000 ** (2 * (l + 1) / d))
    assert doc == pytest.approx(1.841421, abs=1e-6)  # > 1: cannot be a sine or cosine value
    pe = sinusoidal_encoding(2, d, dtype=torch.float64)[1]
    assert pe[0].item() == pytest.approx(math.sin(1.0), abs=1e-12)  # 0.841471
    assert pe[1].item() == pytest.approx(math.cos(1.0), abs=1e-12)  # 0.540302, same frequency as pe[0]
    assert abs(doc - pe[0].item()) > 0.5 and abs(doc - pe[1].item()) > 0.5


def _doc_pe(n: int, d: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)[:, None]
    l = torch.arange(d, dtype=torch.float64)[None, :]
    return torch.sin(i / 10000 ** (2 * l / d)) + torch.cos(i / 10000 ** (2 * (l + 1) / d))


def test_000_same_frequency_pairs_make_shifts_linear_doc_formula_does_not():
    """E000-07, E000-18, E002-12: sin and cos of the SAME frequency give PE(p+k) = M_k PE(p); the doc's mixed
    frequencies do not."""
    k, d = 3, 8
    for table, bound in ((sinusoidal_encoding(400, d, dtype=torch.float64), 1e-10), (_doc_pe(400, d), None)):
        x, y = table[:-k], table[k:]
        fit = torch.linalg.lstsq(x, y).solution
        residual = ((x @ fit - y).norm() / y.norm()).item()
        if bound is not None:
            assert residual < bound
        else:
            assert residual > 0.2  # measured 0.31: no linear map shifts the doc's encoding
    pe = sinusoidal_encoding(50, d, dtype=torch.float64)
    m = sinusoidal_shift_matrix(k, d, dtype=torch.float64)
    torch.testing.assert_close(pe[: 50 - k] @ m.T, pe[k:], atol=1e-12, rtol=0)


def test_000_derivation_line1_latex_is_unbalanced():
    """E000-14: line 1 of the §4.2 display (quoted verbatim) opens three braces and closes two."""
    line1 = r"PE_{i} &= \sin(i / 10000^{2l / d}) + \cos(i / 10000^{2(l+1) / d) \\"
    assert line1.count("{") == 3 and line1.count("}") == 2


@pytest.mark.parametrize("i,l,d", [(1, 0, 4), (5, 1, 8), (10, 0, 4), (0, 0, 4)])
def test_000_identity_chain_is_false(i, l, d):
    """E000-15, E000-16, E000-17: the four lines of the §4.2 'derivation' are pairwise different numbers."""
    a, b = i / 10000 ** (2 * l / d), i / 10000 ** (2 * (l + 1) / d)
    line1 = math.sin(a) + math.cos(b)
    line2_as_typeset = math.sin(a) + math.sin(i / 10000 ** (2 * (l + 1) / d + math.pi / 2))  # pi/2 in the exponent
    line2_charitable = math.sin(a) + math.sin(b + math.pi / 2)  # the true identity cos x = sin(x + pi/2)
    line3 = 2 * math.sin(a) * math.cos(b)
    line4 = math.sin(a + b)
    assert line2_charitable == pytest.approx(line1, abs=1e-12)
    for wrong in (line2_as_typeset, line3, line4):
        assert abs(wrong - line1) > 0.15  # smallest gap over these points: 0.159 (line 3 at i=1, l=0, d=4)
    if i != 0:  # at i = 0 lines 2-4 are all 0 while line 1 is 1
        assert abs(line3 - line4) > 0.4


def test_000_identity_chain_values_at_i1_l0_d4():
    """E000-15, E000-16, E000-17: the numbers quoted in the inventory."""
    a, b = 1.0, 0.01
    assert math.sin(a) + math.cos(b) == pytest.approx(1.841421, abs=1e-6)
    assert 2 * math.sin(a) * math.cos(b) == pytest.approx(1.682858, abs=1e-6)
    assert math.sin(a + b) == pytest.approx(0.846832, abs=1e-6)


def test_000_sin_and_cos_both_have_period_2pi_and_pe_wavelengths():
    """E000-06, E000-13, E002-10, E002-11, E004-02: cos has period 2π (not 4π); PE column pair i has wavelength
    2π·10000^(2i/d)."""
    x = torch.linspace(-10, 10, 101, dtype=torch.float64)
    torch.testing.assert_close(torch.cos(x + 2 * math.pi), torch.cos(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.sin(x + 2 * math.pi), torch.sin(x), atol=1e-12, rtol=0)
    assert (torch.cos(x + math.pi) - torch.cos(x)).abs().max() > 1.9  # π is not a period: 2π is the smallest
    d = 16
    wavelengths = 2 * math.pi / sinusoidal_frequencies(d)
    expected = 2 * math.pi * 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(wavelengths, expected, atol=1e-9, rtol=1e-12)
    assert wavelengths[0].item() == pytest.approx(2 * math.pi)


def test_000_sinusoidal_pe_has_no_parameters_learned_table_has_L_times_d():
    """E000-10, E001-07: sinusoidal PE adds zero parameters; only a learned table costs max_positions·dim."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    none, sinus = MultiHeadAttention(64, 4, "none"), MultiHeadAttention(64, 4, "sinusoidal")
    assert count(sinus) == count(none)
    assert count(LearnedPositionalEmbedding(512, 64)) == 512 * 64


def test_000_no_high_frequency_vanishing():
    """E000-11: every PE vector has norm sqrt(d/2) at every position; the highest-frequency column keeps amplitude 1."""
    d = 64
    pe = sinusoidal_encoding(100_000, d, dtype=torch.float64)
    torch.testing.assert_close(pe.norm(dim=1), torch.full((100_000,), math.sqrt(d / 2), dtype=torch.float64))
    late = pe[-1000:, 0]  # the fastest sinusoid, far along the sequence
    assert late.abs().max() > 0.999


def test_000_causal_mask_prevents_leakage_at_any_length():
    """E000-12: 'information leakage' is about the causal mask, not sequence length: future tokens never change past
    logits."""
    model = TinyLM(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_positions=64, encoding="sinusoidal").eval()
    for length in (16, 64):
        tokens = torch.randint(0, 50, (1, length))
        changed = tokens.clone()
        changed[0, length // 2 :] = (changed[0, length // 2 :] + 1) % 50
        with torch.no_grad():
            a, b = model(tokens), model(changed)
        torch.testing.assert_close(a[:, : length // 2], b[:, : length // 2], atol=1e-6, rtol=0)
        assert (a[:, length // 2 :] - b[:, length // 2 :]).abs().max() > 1e-3


def test_000_listing_has_no_causal_mask():
    """E000-12, E000-23: the 'language model' of listing 000_1 (repaired) lets position 0 see the last token."""
    ns = _repaired_000().namespace
    model = ns["TransformerModel"](32, 4, 2).eval()
    tokens = torch.randint(1, 1000, (10, 1))  # (seq, batch): the listing is sequence-first
    changed = tokens.clone()
    changed[-1] = (changed[-1] + 1) % 1000
    with torch.no_grad():
        assert (model(tokens)[0] - model(changed)[0]).abs().max() > 1e-3


def test_000_listing_residual_branch_starts_after_layernorm():
    """E000-22: src = LN(src); src = src + attn(src) throws the un-normalised input away: layer(3x) == layer(x)."""
    layer = _repaired_000().namespace["EncoderLayer"](32, 4).eval()
    x = torch.randn(6, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(3 * x), layer(x), atol=1e-4, rtol=0)
        reference = torch.nn.TransformerEncoderLayer(32, 4, dropout=0.0, norm_first=True).eval()
        assert (reference(3 * x) - reference(x)).abs().max() > 1.0  # a true pre-LN layer keeps the residual


def test_000_listing_pe_is_added_and_is_vaswani_contradicting_its_own_formula():
    """E000-09, E000-19, V000-1: the code adds (not concatenates) the correct Vaswani table, contradicting §3.1's
    formula."""
    ns = _repaired_000().namespace
    pos = ns["PositionalEncoding"](16, dropout=0.0, max_len=200)
    torch.testing.assert_close(pos.pe[:, 0, :], sinusoidal_encoding(200, 16), atol=1e-4, rtol=0)
    x = torch.zeros(7, 3, 16)
    assert pos(x).shape == x.shape  # addition: the width stays d_model
    assert (pos.pe[:50, 0, :] - _doc_pe(50, 16).float()).abs().max() > 0.5


# --------------------------------------------------------------------------- document 001


def test_001_listing_crashes_on_cuda():
    """E001-20, E001-29: the listing hard-codes CUDA (the book is built with CUDA hidden)."""
    run = run_listing("001_1")
    if CPU_ONLY:
        assert run.error_type == "AssertionError"
        assert "Torch not compiled with CUDA enabled" in run.error_message
        assert run.error_source == "model.to(torch.device('cuda'))"
    else:  # on a CUDA machine the next bug is reached directly
        assert run.error_type == "RuntimeError"


def test_001_listing_next_crash_linear_on_integer_offsets():
    """E001-21, E001-29: with 'cuda' -> 'cpu' (our change) nn.Linear(512, 512) is applied to an int64 (128,
    128) tensor."""
    run = run_listing("001_1", cuda_to_cpu=True)
    assert run.modifications == ("CUDA device strings replaced by 'cpu'",)
    assert run.error_type == "RuntimeError"
    assert "must have the same dtype" in run.error_message and "Long" in run.error_message
    assert run.error_source == "attn_emb = self.attn(rel_pos)"
    module = run.namespace["RelativePositionalEncoding"](512, 128)
    with pytest.raises(RuntimeError, match=r"128x128 and 512x512"):
        module(run.namespace["relative_pos"].float(), torch.arange(128))


def test_001_listing_offsets_are_i_minus_j_plus_1():
    """E001-24: the driver builds i - j + 1 (diagonal 1, sign reversed) while the text defines Δ = j - i."""
    ns = run_listing("001_1", cuda_to_cpu=True).namespace
    rel = ns["relative_pos"]
    i, j = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    assert torch.equal(rel, i - j + 1)
    assert torch.all(rel.diagonal() == 1) and not torch.equal(rel, j - i)


def test_001_listing_mask_is_all_ones_and_doubles_the_embedding():
    """E001-10, E001-11, E001-13, E001-22, E001-23, E001-26, E001-27: attn_mask[max_len-max_len:] = 1 fills the whole
    mask, so output = 2·emb(pos) + Linear(rel_pos)."""
    cls = run_listing("001_1", cuda_to_cpu=True).namespace["RelativePositionalEncoding"]
    module = cls(8, 8)  # d_model == max_len is the only shape for which forward runs at all
    rel, pos = torch.randn(8, 8), torch.arange(8)
    with torch.no_grad():
        torch.testing.assert_close(module(rel, pos), 2 * module.emb(pos) + module.attn(rel), atol=1e-6, rtol=0)
    assert {n for n, _ in module.named_children()} == {"emb", "attn"}  # no query, key, value or attention
    with pytest.raises(RuntimeError, match="must match the size"):
        cls(16, 8)(torch.randn(8, 16), pos)  # (8, 16) * (8, 8) mask
    with pytest.raises(IndexError):
        module(torch.randn(9, 8), torch.arange(9))  # 'any length' (§9 Q3): not beyond max_len


def test_001_zero_grad_does_not_initialise_parameters():
    """E001-25: model.zero_grad() (commented 初始化模型参数) leaves every parameter unchanged."""
    cls = run_listing("001_1", cuda_to_cpu=True).namespace["RelativePositionalEncoding"]
    module = cls(8, 8)
    before = [p.detach().clone() for p in module.parameters()]
    module(torch.randn(8, 8), torch.arange(8)).sum().backward()
    module.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert all(p.grad is None or torch.all(p.grad == 0) for p in module.parameters())


def test_001_linear_map_of_a_scalar_offset_is_affine():
    """E001-12: Linear(Δ) + Bias of a scalar Δ is Δ·w + b, so q·e(Δ) is linear (monotone) in Δ, unlike a
    learned table."""
    linear = torch.nn.Linear(1, 16)
    deltas = torch.arange(-5, 6, dtype=torch.float32)[:, None]
    with torch.no_grad():
        e = linear(deltas)
        torch.testing.assert_close(e[2:] - 2 * e[1:-1] + e[:-2], torch.zeros(9, 16), atol=1e-5, rtol=0)
        score = e @ torch.randn(16)
        steps = score[1:] - score[:-1]
        assert torch.all(steps > 0) or torch.all(steps < 0)  # can never peak at Δ = 0
    table = torch.randn(11, 16)  # Shaw et al.: one free vector per clipped offset
    assert (table[2:] - 2 * table[1:-1] + table[:-2]).abs().max() > 0.5


def test_001_worked_example_does_not_compute():
    """E001-16, E001-17, E001-18: (0..5) + (0.2, 0.4, 0.6) is a shape error; the stated result matches no broadcasting
    rule."""
    pe, emb = torch.tensor([0.0, 1, 2, 3, 4, 5]), torch.tensor([0.2, 0.4, 0.6])
    with pytest.raises(RuntimeError, match="must match the size"):
        pe + emb
    stated = torch.tensor([0.2, 1.4, 2.6, 3.6, 4.6, 5.0])
    implied = stated - pe  # what was added: (0.2, 0.4, 0.6, 0.6, 0.6, 0.0)
    torch.testing.assert_close(implied, torch.tensor([0.2, 0.4, 0.6, 0.6, 0.6, 0.0]), atol=1e-6, rtol=0)
    for rule in (emb.repeat(2), torch.cat([emb, torch.zeros(3)]), torch.cat([emb, emb[-1:].repeat(3)])):
        assert (implied - rule).abs().max() > 0.1
    assert 4 - 1 == 3  # the one correct step, Δ = 4 - 1


def test_001_absolute_pe_is_linear_in_length_relative_naive_is_quadratic():
    """E001-07, E001-14, E001-30: absolute PE is L·d bounded numbers; a naive relative gather is L²·d."""
    d, k = 64, 16
    for length in (128, 1024):
        table = sinusoidal_encoding(length, d)
        assert table.numel() == length * d and table.abs().max() <= 1.0
        index = relative_position_index(length, length, k)
        assert torch.randn(2 * k + 1, d)[index].numel() == length * length * d


def test_001_without_position_attention_is_permutation_equivariant():
    """E000-02, E000-03, E001-01, E001-06, E001-09, E004-01: positions fix order-blindness, not length: with no PE,
    permuting tokens permutes outputs."""
    attn = MultiHeadAttention(32, 4, "none", causal=False).eval()
    x, perm = torch.randn(1, 9, 32), torch.randperm(9)
    with torch.no_grad():
        torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm], atol=1e-5, rtol=0)
        rnn = torch.nn.GRU(32, 32, batch_first=True)
        assert (rnn(x[:, perm])[1] - rnn(x)[1]).abs().max() > 1e-3  # an RNN is order-sensitive


# --------------------------------------------------------------------------- document 002


def test_002_listings_truncated_and_import_only():
    """E002-13, E002-14, E002-15: §5.2 stops mid-call (SyntaxError); §5.1 only imports things nothing uses."""
    run = run_listing("002_2")
    assert run.error_type == "SyntaxError" and run.error_message == "'(' was never closed"
    assert run.error_source == "pe = torch.zeros(max_len,"
    imports = run_listing("002_1")
    assert imports.ok
    assert {k for k in imports.namespace if not k.startswith("__")} == {
        "math",
        "torch",
        "nn",
        "TransformerEncoder",
        "TransformerEncoderLayer",
    }


def test_002_softmax_of_a_single_score_is_one():
    """E002-09: α_ij = softmax(ẽ_ij) of one scalar is always 1; the softmax runs over j."""
    for value in (-3.0, 0.0, 7.5):
        assert torch.softmax(torch.tensor([value]), dim=0).item() == 1.0
    scores = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(torch.softmax(scores, 0), scores.exp() / scores.exp().sum())


def test_002_scale_is_one_over_sqrt_dk_against_saturated_softmax():
    """E002-07: q·k has variance d_k for unit-variance entries; 1/sqrt(d_k) restores 1 and un-saturates the softmax."""
    d_k, n = 256, 4000
    q, k = torch.randn(n, d_k), torch.randn(n, d_k)
    dots = (q * k).sum(-1)
    assert dots.var().item() == pytest.approx(d_k, rel=0.1)
    assert (dots / math.sqrt(d_k)).var().item() == pytest.approx(1.0, rel=0.1)
    logits = torch.randn(512, d_k) @ torch.randn(d_k, 16)
    unscaled, scaled = torch.softmax(logits, -1), torch.softmax(logits / math.sqrt(d_k), -1)
    # unscaled rows are nearly one-hot (mean max weight ≈ 0.92: saturated, tiny gradients); scaled ≈ 0.25
    assert unscaled.max(-1).values.mean() > 0.75 and scaled.max(-1).values.mean() < 0.45


def test_002_cross_entropy_uses_the_true_class_probability():
    """E002-08: with one-hot y_i the loss is -Σ_i log ŷ_{i, y_i} (an inner product y_iᵀ log ŷ_i)."""
    logits, target = torch.randn(5, 11), torch.randint(0, 11, (5,))
    log_probs = logits.log_softmax(-1)
    onehot = torch.nn.functional.one_hot(target, 11).float()
    expected = -(onehot * log_probs).sum(-1).mean()
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, target), expected)
    assert (onehot[0] * log_probs[0]).shape == (11,)  # 'y_i log ŷ_i' elementwise is a vector, not a loss


@pytest.mark.parametrize("encoding", ["rope", "alibi", "sinusoidal"])
def test_002_inference_with_kv_cache_equals_full_forward(encoding):
    """E002-01, E003-19: token-by-token decoding with a KV cache reproduces the full forward pass."""
    model = TinyLM(vocab_size=40, dim=32, n_layers=2, n_heads=4, max_positions=32, encoding=encoding).eval()
    tokens = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        logits, cache = model(tokens[:, :5], return_kv=True)
        steps = [logits]
        for t in range(5, 12):
            logits, cache = model(tokens[:, t : t + 1], past_kvs=cache, return_kv=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- document 003


def test_003_absolute_listing_is_correct_up_to_max_len():
    """E003-02, V003-1: listing 003_1 equals Vaswani's table, and fails beyond max_len."""
    cls = run_listing("003_1").namespace["PositionalEncoding"]
    module = cls(16, max_len=100, dropout=0.0)
    out = module(torch.zeros(2, 100, 16))
    torch.testing.assert_close(out[0], sinusoidal_encoding(100, 16), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="must match the size"):
        module(torch.zeros(1, 101, 16))


def test_003_low_index_dimensions_have_short_wavelengths():
    """E003-04: wavelengths GROW with the pair index i: low i = short period (2π), high i = long (≈2π·10000)."""
    lam = 2 * math.pi / sinusoidal_frequencies(512)
    assert torch.all(lam[1:] > lam[:-1])
    assert lam[0].item() == pytest.approx(2 * math.pi)
    assert lam[-1].item() == pytest.approx(2 * math.pi * 10000 ** (510 / 512), rel=1e-9)  # ≈ 60 611 positions


def test_003_pe_difference_depends_on_both_positions_its_norm_on_the_offset():
    """E003-06: PE(i) - PE(j) is not a function of i - j (its norm and PE(i)·PE(j) are)."""
    pe = sinusoidal_encoding(20, 16, dtype=torch.float64)
    assert ((pe[5] - pe[3]) - (pe[12] - pe[10])).abs().max() > 0.5
    assert (pe[5] - pe[3]).norm().item() == pytest.approx((pe[12] - pe[10]).norm().item(), abs=1e-12)
    assert (pe[5] @ pe[3]).item() == pytest.approx((pe[12] @ pe[10]).item(), abs=1e-12)


def test_003_relative_listing_is_shaw_key_term_only():
    """E001-03, E001-10, E003-09, E003-15, V003-3: softmax(listing scores) @ V equals Shaw et al. with a^V = 0, and
    differs once the value term is used."""
    cls = run_listing("003_2").namespace["RelativeAttentionScore"]
    length, d, k = 7, 8, 3
    module = cls(d, max_len=k)
    q, key, v = torch.randn(2, length, d), torch.randn(2, length, d), torch.randn(2, length, d)
    with torch.no_grad():
        scores, _ = _quiet(module, q, key)
        ours = scores.softmax(-1) @ v
        rel_k = module.relative_embeddings.weight
        keys_only = shaw_attention(
            q[:, None], key[:, None], v[:, None], rel_k, torch.zeros_like(rel_k), k, causal=False
        )
        both = shaw_attention(q[:, None], key[:, None], v[:, None], rel_k, torch.randn_like(rel_k), k, causal=False)
    torch.testing.assert_close(ours, keys_only[:, 0], atol=1e-5, rtol=0)
    assert (ours - both[:, 0]).abs().max() > 0.1


def test_003_relative_listing_prints_and_gathers_an_L_by_L_by_d_tensor():
    """E003-07, E003-08, E003-10: forward prints the offset matrix on every call and materialises (L, L, d)
    embeddings."""
    cls = run_listing("003_2").namespace["RelativeAttentionScore"]
    module, shapes = cls(8, max_len=2), []
    module.relative_embeddings.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    x = torch.randn(1, 5, 8)
    _, printed = _quiet(module, x, x)
    assert printed.startswith("tensor([[ 0,  1,  2,  3,  4],") and printed.count("tensor(") == 1
    assert shapes == [(5, 5, 8)]
    assert module.relative_embeddings.num_embeddings == 2 * 2 + 1  # the comment says 2*max_len - 1 (+1)


def test_003_printed_clipping_example_is_consistent():
    """E001-03, E003-11, E004-07, V003-2: the labelled matrices printed in the text agree with clamp(j - i,
    -2, 2) + 2."""
    r = torch.arange(5)
    rel = r[None, :] - r[:, None]
    clipped = rel.clamp(-2, 2)
    assert clipped.tolist() == [
        [0, 1, 2, 2, 2],
        [-1, 0, 1, 2, 2],
        [-2, -1, 0, 1, 2],
        [-2, -2, -1, 0, 1],
        [-2, -2, -2, -1, 0],
    ]
    assert torch.equal(clipped + 2, relative_position_index(5, 5, 2))


def test_003_relative_listing_far_embeddings_never_trained_at_max_len_equal_to_train_len():
    """E003-12, V003-4: trained on L = max_relative_position, offsets ±k never occur, so rows 0 and 2k get zero
    gradient."""
    k, d = 6, 8
    module = run_listing("003_2").namespace["RelativeAttentionScore"](d, max_len=k)
    x = torch.randn(3, k, d)  # training sequences of length L = k, as in '512 and 512'
    scores, _ = _quiet(module, x, x)
    scores.square().sum().backward()
    grad = module.relative_embeddings.weight.grad.abs().sum(-1)
    assert grad[0].item() == 0.0 and grad[2 * k].item() == 0.0
    assert torch.all(grad[1 : 2 * k] > 0)


def test_003_relative_clipping_is_not_a_local_attention_window():
    """E003-13: beyond ±k the position term is constant, but far keys are still attended to."""
    k, d, length = 2, 8, 9
    module = run_listing("003_2").namespace["RelativeAttentionScore"](d, max_len=k)
    q, key = torch.randn(1, length, d), torch.randn(1, length, d)
    with torch.no_grad():
        scores, _ = _quiet(module, q, key)
        position = scores * math.sqrt(d) - q @ key.transpose(1, 2)
    torch.testing.assert_close(position[0, 0, 2:], position[0, 0, 2].expand(length - 2), atol=1e-5, rtol=0)
    assert scores.softmax(-1)[0, 0, -1].item() > 1e-4  # offset 8 > k still gets attention weight


def _listing_rope(enc, v: torch.Tensor, m: int) -> torch.Tensor:
    x = torch.zeros(1, 1, m + 1, v.numel())
    x[0, 0, m] = v
    return enc(x)[0, 0, m]


def test_003_rope_listing_score_is_not_a_function_of_m_minus_n():
    """E003-17: the listing's q·k changes when both positions shift; pebook's RoPE does not."""
    enc = run_listing("003_3").namespace["RotaryPositionalEncoding"](8, max_len=64)
    q, k = torch.randn(8), torch.randn(8)
    inv_freq = rope_frequencies(8)
    listing, correct = [], []
    for m, n in ((3, 1), (13, 11), (33, 31)):
        listing.append(float(_listing_rope(enc, q, m) @ _listing_rope(enc, k, n)))
        rq = apply_rope(q[None], torch.tensor([m]), inv_freq, "interleaved")
        rk = apply_rope(k[None], torch.tensor([n]), inv_freq, "interleaved")
        correct.append(float(rq[0] @ rk[0]))
    assert max(listing) - min(listing) > 0.5  # measured -2.34, -0.59, -1.01
    assert max(correct) - min(correct) < 1e-5


def test_003_rope_listing_is_not_a_rotation():
    """E003-17: each pair's two outputs use different angles (cat(freqs, freqs) indexed with 0::2 / 1::2)."""
    enc = run_listing("003_3").namespace["RotaryPositionalEncoding"](8, max_len=64)
    v = torch.randn(8)
    norms = torch.stack([_listing_rope(enc, v, m).norm() for m in range(1, 40)])
    assert (norms - v.norm()).abs().max() > 0.05  # a rotation would keep the norm
    cos = enc.cos_cached[0, 0]
    assert (cos[:, 0::2] - cos[:, 1::2]).abs().max() > 0.5  # x1 and x2 of a pair see different angles
    correct = apply_rope(v[None].expand(39, 8), torch.arange(1, 40), rope_frequencies(8), "interleaved")
    torch.testing.assert_close(correct.norm(dim=-1), v.norm().expand(39), atol=1e-5, rtol=0)


def test_003_rope_listing_has_no_position_offset_and_a_hard_length_limit():
    """E003-18, E003-19, E003-20: one new token is always 'position 0' (a pure permutation), and seq_len > max_len
    crashes."""
    enc = run_listing("003_3").namespace["RotaryPositionalEncoding"](8, max_len=64)
    x = torch.randn(1, 1, 1, 8)
    torch.testing.assert_close(enc(x), torch.cat([x[..., 0::2], x[..., 1::2]], -1), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="must match the size"):
        enc(torch.randn(1, 1, 65, 8))
    mha = run_listing("003_3").namespace["RoPEMultiHeadAttention"](16, 2, max_len=8)
    with pytest.raises(RuntimeError, match="must match the size"):
        mha(torch.randn(1, 9, 16))


def test_003_complex_form_needs_the_conjugate():
    """E003-16, E004-13: Re[(q e^{imθ})(k e^{inθ})] depends on m + n; with conj(k e^{inθ}) it depends on m - n."""
    q, k, theta = complex(0.3, -1.2), complex(0.8, 0.5), 0.7
    rot = lambda z, m: z * complex(math.cos(m * theta), math.sin(m * theta))  # noqa: E731
    without = [(rot(q, m) * rot(k, n)).real for m, n in ((3, 1), (4, 2))]
    with_conj = [(rot(q, m) * rot(k, n).conjugate()).real for m, n in ((3, 1), (4, 2))]
    assert abs(without[0] - without[1]) > 0.1
    assert with_conj[0] == pytest.approx(with_conj[1], abs=1e-12)


def test_003_rope_angles_beyond_training_length_are_unseen():
    """E000-01, E003-21, E004-18, E004-21: past L_train the slow RoPE pairs rotate to angles never seen in training."""
    d, train = 64, 2048
    theta = rope_frequencies(d, dtype=torch.float64)
    slow = 2 * math.pi / theta > train  # pairs that never complete a turn within the training length
    assert int(slow.sum()) == 11
    seen_max = (train - 1) * theta[-1]
    assert seen_max.item() == pytest.approx(0.2727, abs=1e-3)
    assert ((2 * train - 1) * theta[-1] - seen_max).item() > 0.27  # new angle, no wrap-around yet
    # Position interpolation (Chen et al. 2023) scales positions by L/L', back into [0, L):
    assert ((2 * train - 1) * (train / (2 * train)) * theta[-1]).item() < train * theta[-1].item()


def test_003_rope_long_term_decay_is_not_monotone():
    """E003-22: the q = k = 1 score falls with distance but rises again in places (an upper-bound trend only)."""
    d = 128
    inv_freq = rope_frequencies(d, dtype=torch.float64)
    q = torch.ones(400, d, dtype=torch.float64)
    rotated = apply_rope(q, torch.arange(400), inv_freq)
    score = rotated @ rotated[0]
    assert score[0].item() == pytest.approx(d) and score[300].item() < 0.5 * d
    assert score[50].item() > score[40].item() + 3 and score[100].item() > score[80].item() + 3
    random_q, random_k = torch.randn(2000, d, dtype=torch.float64), torch.randn(2000, d, dtype=torch.float64)
    near = (
        apply_rope(random_q, torch.full((2000,), 1), inv_freq) * apply_rope(random_k, torch.zeros(2000), inv_freq)
    ).sum(-1)
    assert abs(near.mean().item()) < 1.0  # random q, k: no built-in preference for near keys


def test_003_rope_adds_no_parameters():
    """V003-6: RoPE attention has exactly the parameters of attention without positions."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(MultiHeadAttention(64, 4, "rope")) == count(MultiHeadAttention(64, 4, "none"))


# --------------------------------------------------------------------------- document 004


def test_004_sinusoidal_pe_is_absolute_every_position_unique():
    """E003-03, E003-05, E004-03, E004-14: sinusoidal PE identifies each absolute position: all 100 000 rows distinct
    (distance ≥ 1.47)."""
    pe = sinusoidal_encoding(100_000, 64, dtype=torch.float64)
    # ||PE(p) - PE(q)|| depends only on p - q, so the distances to row 0 cover every pair
    distances = (pe[1:] - pe[0]).norm(dim=1)
    assert distances.min().item() > 1.4


def test_004_sinusoidal_pe_carries_relative_information():
    """E000-18, E002-12, E004-06, E004-10, E004-16: PE(p)·PE(q) depends only on p - q, and PE(p + k) = M_k PE(p) with
    M_k a rotation."""
    pe = sinusoidal_encoding(64, 32, dtype=torch.float64)
    gram = pe @ pe.T
    for offset in (1, 5, 17):
        diag = gram.diagonal(offset)
        assert (diag - diag[0]).abs().max() < 1e-9
    m = sinusoidal_shift_matrix(5, 32, dtype=torch.float64)
    torch.testing.assert_close(m @ m.T, torch.eye(32, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.linalg.det(m).item() == pytest.approx(1.0, abs=1e-9)


def test_004_rope_uses_the_sinusoidal_frequencies_so_cannot_fix_their_periodicity():
    """E004-10, E004-15: RoPE's θ_i equal the sinusoidal ω_i, and neither encoding repeats (see the 100
    000-row test)."""
    torch.testing.assert_close(rope_frequencies(128, dtype=torch.float64), sinusoidal_frequencies(128), atol=0, rtol=0)


def test_004_rope_rotates_queries_and_keys_deterministically():
    """E004-09, E004-12, E004-13, E004-17, V003-7: RoPE rotates q and k (norm kept, scores depend on m - n); no
    randomness, no 'augmentation'."""
    inv_freq = rope_frequencies(16)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    rq = lambda m: apply_rope(q, torch.tensor([m]), inv_freq)  # noqa: E731
    rk = lambda n: apply_rope(k, torch.tensor([n]), inv_freq)  # noqa: E731
    assert float(rq(9) @ rk(4).T) == pytest.approx(float(rq(105) @ rk(100).T), abs=1e-4)
    assert rq(9).norm().item() == pytest.approx(q.norm().item(), abs=1e-5)
    assert torch.equal(rq(9), rq(9))
    torch.testing.assert_close(
        apply_rope_complex(q, torch.tensor([9]), inv_freq), apply_rope(q, torch.tensor([9]), inv_freq, "interleaved")
    )


def test_004_learned_absolute_embedding_cannot_extrapolate():
    """E000-01, E004-21, E004-22: a learned absolute table has no row for an unseen position."""
    table = LearnedPositionalEmbedding(512, 16)
    assert table(512).shape == (512, 16)
    with pytest.raises(ValueError, match="beyond this learned table"):
        table(513)


def test_004_alibi_is_an_additive_bias_not_a_multiplier():
    """E004-30, E004-31: ALiBi adds -m·(i - j) to the logits; multiplying the weights by the bias matrix is not a
    distribution."""
    heads, length = 2, 6
    bias = alibi_bias(length, length, alibi_slopes(heads))
    assert bias.shape == (heads, length, length)  # one (L, L) matrix per head, different slopes
    allowed = causal_mask(length, length)
    scores = torch.randn(heads, length, length)
    alibi = (scores + bias).masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(alibi.sum(-1), torch.ones(heads, length), atol=1e-6, rtol=0)
    multiplied = scores.masked_fill(~allowed, float("-inf")).softmax(-1) * bias
    assert torch.all(multiplied.diagonal(dim1=-2, dim2=-1) == 0)  # the token itself gets weight 0
    assert (multiplied.sum(-1)[:, 1:] < 0).all()  # negative 'weights'


def test_004_alibi_has_no_parameters_and_fixed_slopes():
    """E004-27, E004-28, E004-32: no projection, no learned bias: slopes are the fixed 1/2 … 1/256."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(MultiHeadAttention(64, 8, "alibi")) == count(MultiHeadAttention(64, 8, "none"))
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-k for k in range(1, 9)]), atol=0, rtol=0)


def test_004_alibi_biases_attention_towards_recent_tokens():
    """E004-29: with equal content scores, ALiBi weights fall by a factor e^{m} per step of distance."""
    heads, length = 4, 8
    slopes = alibi_slopes(heads)
    q = k = torch.zeros(1, heads, length, 4)
    v = torch.eye(length).expand(1, heads, length, length).contiguous()  # output rows = attention weights
    weights = positional_attention(q, k, v, ALiBi(n_heads=heads, slopes=slopes))[0]
    last = weights[:, -1]  # the last query sees all 8 keys
    ratio = last[:, 1:] / last[:, :-1]
    torch.testing.assert_close(ratio, slopes.exp()[:, None].expand(heads, length - 1), atol=1e-4, rtol=1e-4)
