"""attn_implementation="flex_attention": every logit bias as a compiled FlexAttention score_mod.

Checked against the float64 reference of the layer (``ref.positional_attention``, the bias from
the papers' equations through each encoding's own reference-tested ``logit_bias``) for every
logit-bias encoding of the registry, causal and not, with grouped-query heads, fewer queries than
keys at per-row positions, and a sliding window; against the SDPA path bit for bit where FlexAttention
hands over to it (padding, a single query, gradients on the CPU, a failed compile). Compiling
costs seconds per kernel shape on this CPU, so every test uses the same few shapes (one
compiled function serves them all).

Tolerance: FlexAttention's float32 kernel sums the softmax in tiles, online; against float64
the error is a few float32 roundings of O(1) values, within ``FLEX32`` below.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from registry_cases import BIAS_ENCODINGS, example_options

import pebook
from pebook import flex

B, H, L, D = 2, 4, 16, 8
FLEX32 = dict(rtol=2e-5, atol=2e-5)


def _encoding(name, device, causal=True):
    cls = pebook.ENCODINGS[name]
    options = example_options(name)
    if "causal" in pebook.encoding_options(name) or "causal" in cls.__init__.__code__.co_varnames:
        options["causal"] = causal
    torch.manual_seed(0)
    enc = cls(n_heads=H, **options).to(device)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc


def _qkv(rand, device, lq=L, lk=L, kv_heads=H):
    q = rand(B, H, lq, D, seed=1, device=device, dtype=torch.float32)
    k = rand(B, kv_heads, lk, D, seed=2, device=device, dtype=torch.float32)
    v = rand(B, kv_heads, lk, D, seed=3, device=device, dtype=torch.float32)
    return q, k, v


def _flex(q, k, v, enc, **kwargs):
    with torch.no_grad():
        return pebook.positional_attention(q, k, v, enc, attn_implementation="flex_attention", **kwargs)


@pytest.fixture(autouse=True)
def _flex_state():
    """Each test starts with the compiled function of the process and no recorded compile failure
    (another test file may have made one on purpose), and restores both afterwards."""
    saved = dict(flex._STATE)
    flex._STATE["failed"] = {}
    yield
    flex._STATE.update(saved)


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
@pytest.mark.parametrize("causal", [True, False])
def test_flex_equals_the_float64_reference(name, causal, device, rand, ref):
    enc = _encoding(name, device, causal)
    q, k, v = _qkv(rand, device)
    out = _flex(q, k, v, enc, causal=causal)
    assert flex.flex_available(device)
    torch.testing.assert_close(out.double(), ref.positional_attention(q, k, v, enc, causal=causal), **FLEX32)


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
def test_flex_fewer_queries_at_row_positions_and_grouped_heads(name, device, rand, ref):
    enc = _encoding(name, device)
    q, k, v = _qkv(rand, device, lq=5, kv_heads=2)
    k_pos = torch.arange(L, device=device)[None] + torch.tensor([[0], [7]], device=device)
    q_pos = k_pos[:, -5:]
    out = _flex(q, k, v, enc, position_ids=q_pos, key_position_ids=k_pos)
    assert flex.flex_available(device)
    expected = ref.positional_attention(q, k, v, enc, position_ids=q_pos, key_position_ids=k_pos)
    torch.testing.assert_close(out.double(), expected, **FLEX32)


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
def test_flex_sliding_window_equals_sdpa(name, device, rand):
    enc = _encoding(name, device)
    q, k, v = _qkv(rand, device)
    pos = torch.arange(L, device=device).expand(B, L)
    with torch.no_grad():
        out = enc.attend(q, k, v, pos, pos, causal=True, scale=None, window=5, attn_implementation="flex_attention")
        expected = enc.attend(q, k, v, pos, pos, causal=True, scale=None, window=5)
    assert flex.flex_available(device)
    torch.testing.assert_close(out, expected, **FLEX32)


def test_flex_never_materialises_the_bias(monkeypatch, device, rand):
    """O(L) memory: the bias is a (heads, n_distances) table, never logit_bias or masked_bias."""
    enc = _encoding("alibi", device)
    for method in ("logit_bias", "masked_bias"):
        monkeypatch.setattr(enc, method, lambda *a, **k: pytest.fail("materialised"))
    pos = torch.arange(L, device=device).expand(B, L)
    mod = flex._score_mod(enc, pos, pos)
    captured = [c.cell_contents for c in mod.__closure__ if isinstance(c.cell_contents, torch.Tensor)]
    assert (H, 2 * L) in [tuple(t.shape) for t in captured]  # 2L - 1 distances, rounded up to a power of two
    assert max(t.numel() for t in captured) <= H * 2 * L
    _flex(*_qkv(rand, device), enc)
    assert flex.flex_available(device)


def test_tiny_lm_on_flex_equals_tiny_lm_on_sdpa(device):
    tokens = torch.randint(0, 11, (B, L), generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    sdpa_model = pebook.TinyLM(11, H * D, 2, H, L, "alibi").to(device)
    torch.manual_seed(0)
    flex_model = pebook.TinyLM(11, H * D, 2, H, L, "alibi", attn_implementation="flex_attention").to(device)
    assert flex_model.attn_implementation == "flex_attention" and not flex_model._shared_bias
    with torch.no_grad():
        torch.testing.assert_close(flex_model(tokens), sdpa_model(tokens), **FLEX32)
    assert flex.flex_available(device)


@pytest.mark.parametrize("name", ["none", "rope"])
def test_encodings_without_a_bias_keep_sdpa_bit_for_bit(name, device, rand):
    enc = pebook.ENCODINGS[name](head_dim=D) if name == "rope" else pebook.ENCODINGS[name]()
    q, k, v = _qkv(rand, device)
    with torch.no_grad():
        assert torch.equal(_flex(q, k, v, enc), pebook.positional_attention(q, k, v, enc))


# -- where the SDPA path takes over, bit for bit -------------------------------------------------------------


def test_padding_and_single_queries_run_the_sdpa_path(device, rand):
    enc = _encoding("t5", device)
    q, k, v = _qkv(rand, device)
    key_mask = torch.ones(B, L, dtype=torch.bool, device=device)
    key_mask[0, :3] = False
    with torch.no_grad():
        padded = _flex(q, k, v, enc, key_mask=key_mask)
        assert torch.equal(padded, pebook.positional_attention(q, k, v, enc, key_mask=key_mask))
        one = q[:, :, -1:]
        assert torch.equal(_flex(one, k, v, enc), pebook.positional_attention(one, k, v, enc))


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
def test_gradients_flow_through_the_flex_option(name, device, rand):
    """On the CPU FlexAttention has no backward (torch 2.13): the SDPA path runs, bit for bit; on CUDA
    the gradients through FlexAttention match SDPA's."""
    enc = _encoding(name, device)
    q, k, v = (t.requires_grad_() for t in _qkv(rand, device))
    wrt = [q, k, v, *(p for p in enc.parameters() if p.requires_grad)]
    out = pebook.positional_attention(q, k, v, enc, attn_implementation="flex_attention")
    grads = torch.autograd.grad(out.sum(), wrt)
    expected = pebook.positional_attention(q, k, v, enc)
    expected_grads = torch.autograd.grad(expected.sum(), wrt)
    exact = device.type == "cpu"
    for a, b in zip((out, *grads), (expected, *expected_grads)):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_failed_compile_warns_once_and_falls_back_to_sdpa(monkeypatch, device, rand):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(flex._STATE, "compiled", broken)
    monkeypatch.setitem(flex._STATE, "failed", {})
    enc = _encoding("kerple", device)  # compiled (ALiBi and T5 run pebook.banded on the CPU)
    q, k, v = _qkv(rand, device)
    with pytest.warns(pebook.FlexAttentionFallbackWarning, match="no compiler here.*falls back"):
        out = _flex(q, k, v, enc)
    assert not flex.flex_available(device)
    with torch.no_grad():
        assert torch.equal(out, pebook.positional_attention(q, k, v, enc))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        _flex(q, k, v, enc)


def test_torch_compile_failing_at_build_also_falls_back(monkeypatch, device, rand):
    def no_compile(*args, **kwargs):
        raise RuntimeError("torch.compile unavailable")

    monkeypatch.setattr(torch, "compile", no_compile)
    monkeypatch.setitem(flex._STATE, "compiled", None)
    monkeypatch.setitem(flex._STATE, "failed", {})
    enc = _encoding("kerple", device)
    q, k, v = _qkv(rand, device)
    with pytest.warns(pebook.FlexAttentionFallbackWarning, match="torch.compile unavailable"):
        out = _flex(q, k, v, enc)
    with torch.no_grad():
        assert torch.equal(out, pebook.positional_attention(q, k, v, enc))


def test_block_masks_are_cached():
    a = flex._block_mask(L, L, True, None, "cpu")
    assert flex._block_mask(L, L, True, None, "cpu") is a
    assert flex._block_mask(L, L, False, None, "cpu") is not a


def test_flex_logit_bias_attention_directly(device, rand, ref):
    """The function behind the option, called with validated arguments and its own scale."""
    enc = _encoding("kerple", device)
    q, k, v = _qkv(rand, device)
    pos = torch.arange(L, device=device).expand(B, L)
    with torch.no_grad():
        out = pebook.flex_logit_bias_attention(q, k, v, enc, pos, pos, causal=True, scale=0.3)
    torch.testing.assert_close(out.double(), ref.positional_attention(q, k, v, enc, scale=0.3), **FLEX32)
    assert "flex_attention" in pebook.ATTENTION_IMPLEMENTATIONS
