"""The cached materialised bias (LogitBias.masked_bias) and the default SDPA path: bit for bit the old code.

Committed experiment results are re-checked against live training runs, so the default
``attn_implementation="sdpa"`` path must not change a bit: every test here compares with
``torch.equal`` against a frozen copy of the code as it was before the cache (``_old_sdpa``,
``_old_attend``, ``OLD_SCORES``), for every logit-bias encoding of the registry, forward and
backward. The cache itself: built once while nothing changes (a spy counts the builds), rebuilt
for other positions, another length, other parameters or buffers, never stale.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from registry_cases import BIAS_ENCODINGS, example_options

import pebook
from pebook.alibi import _alibi_score
from pebook.kerple import KERPLE_EPS, _kernel
from pebook.masking import padded_causal_mask, storage_causal_mask, window_causal_mask
from pebook.t5 import _bucket

H, D = 4, 8


# -- the code before the cache, frozen ----------------------------------------------------------------


def _old_sdpa(q, k, v, *, causal, scale, bias=None, key_mask=None, window=None):
    """pebook.encoding.sdpa as it was (commit 6ee1398)."""
    gqa = k.shape[1] != q.shape[1]
    lq, lk = q.shape[-2], k.shape[-2]
    if window is not None and lk > window:
        mask = window_causal_mask(lq, lk, window, q.device)
        if key_mask is not None:
            mask = padded_causal_mask(key_mask, lq, causal) & mask
    elif key_mask is not None:
        mask = padded_causal_mask(key_mask, lq, causal)
    elif bias is None and (not causal or lq == lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    else:
        mask = storage_causal_mask(lq, lk, q.device) if causal else None
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    bias = bias.to(q.dtype)
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)


def _old_alibi(enc, head, q_pos, k_pos):
    return _alibi_score(enc.slopes, head, q_pos, k_pos, symmetric=not enc.causal)


def _old_t5(enc, head, q_pos, k_pos):
    rb = enc.relative_bias
    return rb.bias.weight[_bucket(k_pos - q_pos, rb.bidirectional, rb.num_buckets, rb.max_distance), head]


def _old_kerple(enc, head, q_pos, k_pos):
    enc.project_parameters_()
    dtype = torch.promote_types(enc.r1.dtype, torch.float32)
    r1 = enc.r1.clamp(min=KERPLE_EPS).to(dtype)
    r2 = enc.r2.clamp(min=KERPLE_EPS, max=enc.r2_max).to(dtype)
    return _kernel(enc.variant, (q_pos - k_pos).abs().to(dtype), r1[head], r2[head])


#: the score functions as they were, for the encodings whose score was rewritten as distance_key/key_score
OLD_SCORES = {"alibi": _old_alibi, "t5": _old_t5, "kerple": _old_kerple}


def _old_logit_bias(enc, q_pos, k_pos):
    if enc.name not in OLD_SCORES:  # unchanged (FIRE's own logit_bias)
        return enc.logit_bias(q_pos, k_pos)
    heads = torch.arange(enc.n_heads, device=q_pos.device).view(1, -1, 1, 1)
    return OLD_SCORES[enc.name](enc, heads, q_pos[:, None, :, None], k_pos[:, None, None, :])


def _old_attend(enc, q, k, v, q_pos, k_pos, *, causal, scale, key_mask=None, window=None):
    bias = _old_logit_bias(enc, q_pos, k_pos)
    return _old_sdpa(q, k, v, causal=causal, scale=scale, bias=bias, key_mask=key_mask, window=window)


# -- helpers ------------------------------------------------------------------------------------------


def _encoding(name, device, causal=True, **extra):
    cls = pebook.ENCODINGS[name]
    options = example_options(name)
    if "causal" in pebook.encoding_options(name) or "causal" in cls.__init__.__code__.co_varnames:
        options["causal"] = causal
    torch.manual_seed(0)
    enc = cls(n_heads=H, **options, **extra).to(device)
    with torch.no_grad():  # learned parameters away from their initial values
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if hasattr(enc, "project_parameters_"):
            enc.project_parameters_()
    return enc


def _qkv(rand, device, b=2, lq=6, lk=6, kv_heads=H, grad=False):
    q = rand(b, H, lq, D, seed=1, device=device, dtype=torch.float32)
    k = rand(b, kv_heads, lk, D, seed=2, device=device, dtype=torch.float32)
    v = rand(b, kv_heads, lk, D, seed=3, device=device, dtype=torch.float32)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _positions(kind, b, lq, lk, device):
    if kind == "default":
        k_pos = torch.arange(lk, device=device).expand(b, lk)
        return k_pos[:, lk - lq :], k_pos
    if kind == "offset":  # per-row positions, shifted
        k_pos = torch.arange(lk, device=device)[None] + torch.tensor([[3], [0]], device=device)[:b]
        return k_pos[:, lk - lq :], k_pos
    # unordered, repeated ids
    k_pos = torch.tensor([[5, 1, 1, 7, 2, 9, 4, 0][:lk], [0, 2, 4, 6, 8, 10, 12, 14][:lk]], device=device)[:b]
    return k_pos[:, lk - lq :], k_pos


CASES = [  # (q_len, k_len, causal, window, padded)
    (6, 6, True, None, False),
    (6, 6, False, None, False),
    (3, 6, True, None, False),
    (1, 6, True, None, False),
    (6, 6, True, 3, False),
    (2, 6, True, 4, True),
    (6, 6, False, None, True),
]


def _key_mask(padded, b, lk, device):
    if not padded:
        return None
    mask = torch.ones(b, lk, dtype=torch.bool, device=device)
    mask[0, :2] = False
    return mask


# -- bit for bit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
@pytest.mark.parametrize("lq, lk, causal, window, padded", CASES)
@pytest.mark.parametrize("kind", ["default", "offset", "unordered"])
def test_cached_path_is_bit_for_bit_the_old_one(name, lq, lk, causal, window, padded, kind, device, rand):
    enc = _encoding(name, device, causal)
    q, k, v = _qkv(rand, device, lq=lq, lk=lk, kv_heads=2)
    q_pos, k_pos = _positions(kind, 2, lq, lk, device)
    key_mask = _key_mask(padded, 2, lk, device)
    opts = dict(causal=causal, scale=None, key_mask=key_mask, window=window)
    with torch.no_grad():
        old = _old_attend(enc, q, k, v, q_pos, k_pos, **opts)
        for _ in range(2):  # built, then served from the cache
            assert torch.equal(enc.attend(q, k, v, q_pos, k_pos, **opts), old)


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
@pytest.mark.parametrize("lq, lk, causal, window, padded", CASES[:5])
def test_cached_path_gradients_are_bit_for_bit_the_old_ones(name, lq, lk, causal, window, padded, device, rand):
    enc = _encoding(name, device, causal)
    tensors = _qkv(rand, device, lq=lq, lk=lk, grad=True)
    q_pos, k_pos = _positions("default", 2, lq, lk, device)
    opts = dict(causal=causal, scale=0.5, window=window)
    wrt = [*tensors, *(p for p in enc.parameters() if p.requires_grad)]
    cot = rand(2, H, lq, D, seed=9, device=device, dtype=torch.float32)
    old = _old_attend(enc, *tensors, q_pos, k_pos, **opts)
    old_grads = torch.autograd.grad(old, wrt, cot, allow_unused=True)
    for _ in range(2):  # a training step per call: the same values and gradients each time
        new = enc.attend(*tensors, q_pos, k_pos, **opts)
        assert torch.equal(new, old)
        for a, b in zip(torch.autograd.grad(new, wrt, cot, allow_unused=True), old_grads):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
def test_logit_bias_is_bit_for_bit_the_old_score(name, device):
    enc = _encoding(name, device, causal=False)
    q_pos, k_pos = _positions("unordered", 2, 8, 8, device)
    assert torch.equal(enc.logit_bias(q_pos, k_pos), _old_logit_bias(enc, q_pos, k_pos))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kv_heads", [H, 1])
@pytest.mark.parametrize("lk", [1, 2, 7])
def test_sdpa_single_query_skips_the_mask_bit_for_bit(with_bias, kv_heads, lk, device, rand):
    q, k, v = _qkv(rand, device, lq=1, lk=lk, kv_heads=kv_heads)
    bias = rand(2, H, 1, lk, seed=5, device=device, dtype=torch.float32) if with_bias else None
    new = pebook.encoding.sdpa(q, k, v, causal=True, scale=None, bias=bias)
    assert torch.equal(new, _old_sdpa(q, k, v, causal=True, scale=None, bias=bias))


def test_tiny_lm_default_path_is_unchanged_by_the_option(device):
    """attn_implementation="sdpa" given explicitly is the default model, bit for bit."""
    tokens = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    for name in BIAS_ENCODINGS:
        torch.manual_seed(0)
        a = pebook.TinyLM(11, 16, 2, H, 16, name, **example_options(name)).to(device)
        torch.manual_seed(0)
        b = pebook.TinyLM(11, 16, 2, H, 16, name, attn_implementation="sdpa", **example_options(name)).to(device)
        assert torch.equal(a(tokens), b(tokens))


# -- the cache: hits and invalidation ------------------------------------------------------------------


def _spy(monkeypatch, enc):
    """Count the builds: calls of logit_bias (full bias) and of distance_key (the parameter-free grid)."""
    calls = {"n": 0}
    for method in ("logit_bias", "distance_key"):
        original = getattr(enc, method)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(enc, method, counted)
    return calls


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
@pytest.mark.parametrize("grad", [False, True])
def test_bias_built_once_while_nothing_changes(name, grad, monkeypatch, device, rand):
    enc = _encoding(name, device)
    calls = _spy(monkeypatch, enc)
    q, k, v = _qkv(rand, device)
    q_pos, k_pos = _positions("default", 2, 6, 6, device)
    with torch.set_grad_enabled(grad):
        enc.attend(q, k, v, q_pos, k_pos, causal=True, scale=None)
        built = calls["n"]
        assert built >= 1
        for _ in range(3):
            enc.attend(q, k, v, q_pos, k_pos, causal=True, scale=None)
            enc.attend(q, k, v, q_pos.clone(), k_pos.clone(), causal=True, scale=None)  # equal values hit too
    learned = any(p.requires_grad for p in enc.parameters())
    if grad and learned and enc.depends_on != "distance":
        assert calls["n"] == 7 * built  # the bias needs the parameters' graph at every call: recomputed
    else:
        assert calls["n"] == built


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
def test_cache_rebuilds_for_other_positions_lengths_and_in_place_changes(name, device, rand):
    enc = _encoding(name, device, causal=False)
    q, k, v = _qkv(rand, device)
    q_pos, k_pos = _positions("default", 2, 6, 6, device)
    q_pos, k_pos = q_pos.clone(), k_pos.clone()
    opts = dict(causal=False, scale=None)

    def check(q, k, v, q_pos, k_pos):
        with torch.no_grad():
            assert torch.equal(
                enc.attend(q, k, v, q_pos, k_pos, **opts), _old_attend(enc, q, k, v, q_pos, k_pos, **opts)
            )

    check(q, k, v, q_pos, k_pos)
    check(q, k, v, q_pos + 1, k_pos)  # other query positions
    check(q, k, v, q_pos, k_pos.flip(-1))  # other key positions
    q_pos.mul_(2)  # the cached tensor itself, changed in place
    check(q, k, v, q_pos, k_pos)
    q4, k4, v4 = _qkv(rand, device, lq=4, lk=4)
    check(q4, k4, v4, q_pos[:, :4], k_pos[:, :4])  # another length


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
def test_cache_never_serves_a_stale_bias_after_parameters_or_buffers_change(name, device, rand):
    enc = _encoding(name, device)
    q, k, v = _qkv(rand, device)
    q_pos, k_pos = _positions("default", 2, 6, 6, device)
    with torch.no_grad():
        before = enc.attend(q, k, v, q_pos, k_pos, causal=True, scale=None)
        tensors = [*enc.parameters(), *(b for b in enc.buffers() if b.is_floating_point())]
        for t in tensors:
            t.data.mul_(1.5)  # through .data: no version bump, the values still decide
        after = enc.attend(q, k, v, q_pos, k_pos, causal=True, scale=None)
        assert not torch.equal(after, before)
        assert torch.equal(after, _old_attend(enc, q, k, v, q_pos, k_pos, causal=True, scale=None))


def test_alibi_set_of_slopes_rebuilds(device, rand):
    enc = pebook.ALiBi(n_heads=H).to(device)
    q, k, v = _qkv(rand, device)
    q_pos, k_pos = _positions("default", 2, 6, 6, device)
    with torch.no_grad():
        enc.attend(q, k, v, q_pos, k_pos, causal=True, scale=None)
        enc.slopes = torch.linspace(0.1, 1.0, H, device=device)
        new = enc.attend(q, k, v, q_pos, k_pos, causal=True, scale=None)
        assert torch.equal(new, _old_attend(enc, q, k, v, q_pos, k_pos, causal=True, scale=None))


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
def test_training_steps_see_new_parameters_and_gradients_flow(name, device, rand):
    enc = _encoding(name, device)
    learned = [p for p in enc.parameters() if p.requires_grad]
    if not learned:
        pytest.skip(f"{name} learns nothing")
    q, k, v = _qkv(rand, device)
    q_pos, k_pos = _positions("default", 2, 6, 6, device)
    opt = torch.optim.SGD(learned, lr=0.5)
    outputs = []
    for _ in range(2):
        out = enc.attend(q, k, v, q_pos, k_pos, causal=True, scale=None)
        outputs.append(out.detach())
        opt.zero_grad()
        (out * torch.arange(D, device=device)).sum().backward()
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in learned)
        opt.step()
    assert not torch.equal(outputs[0], outputs[1])
    with torch.no_grad():  # and the no-grad cache after training sees the trained values
        served = enc.attend(q, k, v, q_pos, k_pos, causal=True, scale=None)
        assert torch.equal(served, _old_attend(enc, q, k, v, q_pos, k_pos, causal=True, scale=None))


def test_shared_positions_give_one_bias_row_for_the_batch(device):
    enc = pebook.ALiBi(n_heads=H).to(device)
    pos = torch.arange(6, device=device).expand(3, 6)
    bias = enc.masked_bias(pos, pos, dtype=torch.float32, causal=True)
    assert bias.shape == (1, H, 6, 6)
    assert bool(torch.isinf(bias[0, :, 0, 1:]).all()) and bool(torch.isfinite(bias[0, :, -1]).all())
    rows = torch.stack([torch.arange(6, device=device), torch.arange(6, device=device) + 2])
    assert enc.masked_bias(rows, rows, dtype=torch.float32, causal=True).shape == (2, H, 6, 6)


def test_moving_the_module_drops_the_cache(rand):
    enc = pebook.ALiBi(n_heads=H)
    pos = torch.arange(6).expand(1, 6)
    enc.masked_bias(pos, pos, dtype=torch.float32, causal=True)
    assert enc._bias_cache
    enc.double()
    assert not getattr(enc, "_bias_cache", None)
    enc.masked_bias(pos, pos, dtype=torch.float64, causal=True)
    enc.clear_bias_cache()
    assert not getattr(enc, "_bias_cache", None)


def test_default_positions_are_one_tensor_per_shape():
    from pebook.attention import default_ids

    a = default_ids(2, 5, 3, "cpu")
    assert a is default_ids(2, 5, 3, "cpu")
    assert torch.equal(a, torch.arange(2, 7).expand(3, 5))
    assert default_ids(2, 6, 3, "cpu") is not a


@given(
    lq=st.integers(1, 5),
    extra=st.integers(0, 3),
    offset=st.integers(0, 40),
    causal=st.booleans(),
    name=st.sampled_from(BIAS_ENCODINGS),
)
def test_property_cached_equals_uncached_for_any_positions(lq, extra, offset, causal, name, device, rand):
    """Invariant: whatever positions, lengths and calls came before, the cached path equals the old one."""
    lk = lq + extra
    enc = _encoding(name, device, causal)
    q, k, v = _qkv(rand, device, b=1, lq=lq, lk=lk)
    k_pos = torch.arange(offset, offset + lk, device=device)[None]
    q_pos = k_pos[:, lk - lq :]
    with torch.no_grad():
        for positions in ((q_pos, k_pos), (q_pos + 1, k_pos + 1), (q_pos, k_pos)):
            old = _old_attend(enc, q, k, v, *positions, causal=causal, scale=None)
            assert torch.equal(enc.attend(q, k, v, *positions, causal=causal, scale=None), old)


# -- the option's errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["flash", "SDPA", None, 1])
def test_bad_attn_implementation_is_refused_everywhere(bad):
    match = re.escape(f"attn_implementation must be one of {pebook.ATTENTION_IMPLEMENTATIONS}, got")
    q = k = v = torch.zeros(1, H, 3, D)
    with pytest.raises(ValueError, match=match):
        pebook.positional_attention(q, k, v, pebook.ALiBi(n_heads=H), attn_implementation=bad)
    with pytest.raises(ValueError, match=match):
        pebook.MultiHeadAttention(16, H, "alibi", attn_implementation=bad)
    with pytest.raises(ValueError, match=match):
        pebook.TinyLM(11, 16, 1, H, 8, "t5", attn_implementation=bad)
    pos = torch.arange(3)[None]
    with pytest.raises(ValueError, match=match):
        pebook.ALiBi(n_heads=H).attend(q, k, v, pos, pos, causal=True, scale=None, attn_implementation=bad)


def test_cope_refuses_flex_attention_clearly():
    with pytest.raises(ValueError, match=r"attn_implementation='flex_attention' is not supported by the cope"):
        pebook.MultiHeadAttention(16, H, "cope", attn_implementation="flex_attention")
    cope = pebook.ENCODINGS["cope"](head_dim=D)
    q = k = v = torch.zeros(1, H, 3, D)
    pos = torch.arange(3)[None]
    with pytest.raises(ValueError, match=r"not supported by the cope encoding"):
        cope.attend(q, k, v, pos, pos, causal=True, scale=None, attn_implementation="flex_attention")


def test_the_cache_is_bounded_in_entries_and_bytes(monkeypatch, rand):
    enc = pebook.ALiBi(n_heads=H)
    for length in (3, 4, 5):
        pos = torch.arange(length)[None]
        enc.masked_bias(pos, pos, dtype=torch.float32, causal=True)
    assert len(enc._bias_cache) == pebook.encoding.BIAS_CACHE_SIZE
    monkeypatch.setattr(pebook.encoding, "BIAS_CACHE_BYTES", 100)  # a (1, 4, 6, 6) float32 bias is 576 bytes
    enc.clear_bias_cache()
    pos = torch.arange(6)[None]
    bias = enc.masked_bias(pos, pos, dtype=torch.float32, causal=True)
    assert not enc._bias_cache
    assert torch.equal(
        bias, enc.logit_bias(pos, pos).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -torch.inf)
    )
