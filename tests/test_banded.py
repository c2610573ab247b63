"""pebook.banded: T5's bias as a band plus far constants (issue 13, item 1).

Raffel et al. 2020 (arXiv:1910.10683, §2.1): every distance of ``max_distance`` or more falls in
the last bucket of its direction, so T5 attention is a band of the nearest offsets (a bias per
offset) plus plain fused attention over the far keys with one constant per head and direction.
``attn_implementation="flex_attention"`` takes this path on the CPU (float32/float64, consecutive
positions, no padding, no window, more than one query, no gradient); elsewhere the previous path
runs, bit for bit.

Tolerances: float64 agrees with the float64 reference (conftest ``ref.positional_attention``) and
with the default SDPA path to 1e-12: the path is exact, the log-sum-exp merge only reorders sums.
float32 uses the FlexAttention tolerance of tests/test_flex.py (2e-5): a few float32 roundings of
O(1) terms plus one ``exp`` of a difference of log-sum-exps.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import pebook
from pebook import banded, flex

F64 = torch.float64
FLEX32 = dict(rtol=2e-5, atol=2e-5)
EXACT = dict(rtol=1e-12, atol=1e-12)


def t5(device, *, causal=True, heads=4, num_buckets=32, t5_max_distance=128, seed=0):
    torch.manual_seed(seed)
    enc = pebook.T5PE(n_heads=heads, causal=causal, num_buckets=num_buckets, t5_max_distance=t5_max_distance)
    with torch.no_grad():
        enc.relative_bias.bias.weight.normal_()  # O(1) biases, distinct per bucket
    return enc.to(device)


def qkv(b, h, kv, lq, lk, d, *, device, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, h, lq, d), (b, kv, lk, d), (b, kv, lk, d)]
    return [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dtype) for s in shapes]


def positions(b, lq, lk, device, start=0):
    """Consecutive keys from ``start`` (per row: ``start + 7·row``), the queries the last of them."""
    k_pos = torch.arange(lk, device=device)[None] + start + 7 * torch.arange(b, device=device)[:, None]
    return k_pos[:, lk - lq :], k_pos


def fast(q, k, v, enc, **kwargs):
    with torch.no_grad():
        return pebook.positional_attention(q, k, v, enc, attn_implementation="flex_attention", **kwargs)


def default(q, k, v, enc, **kwargs):
    with torch.no_grad():
        return pebook.positional_attention(q, k, v, enc, **kwargs)


def takes_banded(q, k, enc, q_pos, k_pos, **kwargs):
    return banded.banded_refusal(q, k, enc, q_pos, k_pos, **kwargs) is None


# (b, heads, kv_heads, q_len, k_len, d): around t5_max_distance = 128 (band width 112 causal), a
# cache (q_len < k_len), grouped-query heads, lengths with several blocks and a partial last one
CASES = [
    (2, 4, 4, 16, 16, 8),  # L < W: all keys in the band
    (1, 4, 2, 127, 127, 8),
    (1, 4, 4, 128, 128, 8),  # L = t5_max_distance
    (2, 4, 2, 129, 129, 8),
    (1, 2, 2, 700, 700, 4),  # L >> 128: inner blocks, a partial last block
    (1, 4, 1, 50, 300, 8),  # cache: 50 queries after 250 keys
    (2, 2, 2, 300, 301, 4),  # cache of one key
]
IDS = ["L16", "L127-gqa", "L128", "L129-gqa", "L700", "cache50of300-mqa", "cache300of301"]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_equals_the_reference_and_the_sdpa_path(device, ref, case, causal):
    b, h, kv, lq, lk, d = case
    enc = t5(device, causal=causal, heads=h)
    q, k, v = qkv(*case, device=device)
    q_pos, k_pos = positions(b, lq, lk, device, start=3)
    if device.type == "cpu":
        assert takes_banded(q, k, enc, q_pos, k_pos)
    kwargs = dict(causal=causal, position_ids=q_pos, key_position_ids=k_pos)
    out = fast(q, k, v, enc, **kwargs)
    torch.testing.assert_close(out, default(q, k, v, enc, **kwargs), **EXACT)
    torch.testing.assert_close(out, ref.positional_attention(q, k, v, enc, **kwargs), **EXACT)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=["L16", "L129-gqa", "cache"])
def test_float32_within_the_flex_tolerance(device, ref, case, causal):
    b, h, kv, lq, lk, d = case
    enc = t5(device, causal=causal, heads=h)
    q, k, v = qkv(*case, device=device, dtype=torch.float32)
    out = fast(q, k, v, enc, causal=causal)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.positional_attention(q, k, v, enc, causal=causal), **FLEX32)


@pytest.mark.parametrize(("num_buckets", "t5_max_distance"), [(32, 128), (8, 20), (16, 10), (64, 300), (4, 3)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_bucket_options(device, ref, num_buckets, t5_max_distance, causal):
    enc = t5(device, causal=causal, num_buckets=num_buckets, t5_max_distance=t5_max_distance)
    q, k, v = qkv(1, 4, 4, 200, 200, 4, device=device)
    out = fast(q, k, v, enc, causal=causal)
    torch.testing.assert_close(out, ref.positional_attention(q, k, v, enc, causal=causal), **EXACT)


@pytest.mark.parametrize(("num_buckets", "t5_max_distance"), [(32, 128), (8, 20), (16, 10), (64, 300), (4, 3)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_band_width_is_where_the_last_bucket_starts(ref, num_buckets, t5_max_distance, causal):
    """Distances ``>= W`` (both directions) share one bucket per direction, ``W - 1`` does not (or W = 1)."""
    enc = t5("cpu", causal=causal, num_buckets=num_buckets, t5_max_distance=t5_max_distance)
    width = banded.banded_width(enc)
    assert 1 <= width <= t5_max_distance
    distance = torch.arange(-10 * t5_max_distance, 10 * t5_max_distance + 1)
    buckets = ref.t5_bucket(-distance, not causal, num_buckets, t5_max_distance)
    least = []
    for sign in (1, -1):
        far = buckets[(sign * distance) >= width]
        assert (far == far[0]).all()
        least.append(bool(buckets[distance == sign * (width - 1)] != far[0]))
    assert width == 1 or any(least)  # the least such W


def test_snapshot():
    """Frozen values: the band widths of the default T5 and one output element."""
    assert banded.banded_width(pebook.T5PE(n_heads=1)) == 113
    assert banded.banded_width(pebook.T5PE(n_heads=1, causal=False)) == 91
    enc = t5("cpu", heads=2)
    q, k, v = qkv(1, 2, 2, 300, 300, 4, device="cpu")
    out = fast(q, k, v, enc)
    assert out[0, 1, 299].tolist() == pytest.approx(SNAPSHOT, abs=1e-12)


SNAPSHOT = [-0.013119181212160042, -0.10697767572902603, 0.1530674372277641, 0.021238932384623092]


# ---------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    kv=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    lq=st.integers(2, 90),
    extra=st.integers(0, 40),
    start=st.integers(0, 1000),
    options=st.sampled_from([(8, 6), (8, 20), (16, 10), (4, 3)]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_the_sdpa_path_everywhere(device, b, kv, groups, lq, extra, start, options, causal, seed):
    enc = t5(device, causal=causal, heads=kv * groups, num_buckets=options[0], t5_max_distance=options[1], seed=seed)
    q, k, v = qkv(b, kv * groups, kv, lq, lq + extra, 4, device=device, seed=seed)
    q_pos, k_pos = positions(b, lq, lq + extra, device, start)
    kwargs = dict(causal=causal, position_ids=q_pos, key_position_ids=k_pos)
    torch.testing.assert_close(fast(q, k, v, enc, **kwargs), default(q, k, v, enc, **kwargs), **EXACT)


@settings(max_examples=20, deadline=None)
@given(lq=st.integers(2, 60), extra=st.integers(0, 20), causal=st.booleans(), seed=st.integers(0, 99))
def test_a_constant_table_gives_plain_attention(device, ref, lq, extra, causal, seed):
    """With every bucket equal the bias is a row constant: softmax(q kᵀ/√d) v."""
    enc = t5(device, causal=causal, num_buckets=8, t5_max_distance=12)
    with torch.no_grad():
        enc.relative_bias.bias.weight.fill_(0.7)
    q, k, v = qkv(1, 4, 4, lq, lq + extra, 4, device=device, seed=seed)
    torch.testing.assert_close(fast(q, k, v, enc, causal=causal), ref.attention(q, k, v, causal=causal), **EXACT)


# ---------------------------------------------------------------- memory


class _Largest(TorchDispatchMode):
    """Records the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest, self.largest_op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.largest_op = t.numel(), func
        return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_no_L_by_L_tensor(causal):
    """Every tensor created holds O(L) elements per head (L = 1024, one head, d = 8): at most the
    q, k, v sized outputs and a band mask of block × (block + 2W), far below L² (the default path)."""
    L, d = 1024, 8
    enc = t5("cpu", causal=causal, heads=1)
    q, k, v = qkv(1, 1, 1, L, L, d, device="cpu")
    banded._MASKS.clear()
    with _Largest() as recorder, torch.no_grad():
        pebook.positional_attention(q, k, v, enc, causal=causal, attn_implementation="flex_attention")
    bound = 2 * L * (d + 1) + (2 * 113) * (4 * 113)
    assert bound < L * L // 8
    assert recorder.largest <= bound, f"{recorder.largest} elements from {recorder.largest_op}"


# ---------------------------------------------------------------- fallbacks: the previous path, bit for bit


@pytest.fixture
def no_banded(monkeypatch):
    """The flex path as it was before pebook.banded (the banded path refused everywhere)."""

    def previous(q, k, v, encoding, q_pos, k_pos, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(flex, "banded_refusal", lambda *a, **kw: "off")
            with torch.no_grad():
                return flex.flex_logit_bias_attention(q, k, v, encoding, q_pos, k_pos, **kwargs)

    return previous


def test_fallback_under_a_gradient_is_the_sdpa_path(device):
    enc = t5(device)
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 4, 16, 16, 8, device=device, dtype=torch.float32))
    q_pos, k_pos = positions(2, 16, 16, device)
    assert banded.banded_refusal(q, k, enc, q_pos, k_pos, needs_grad=True) is not None
    out = pebook.positional_attention(q, k, v, enc, attn_implementation="flex_attention")
    expected = pebook.positional_attention(q, k, v, enc)
    if device.type == "cpu":
        assert torch.equal(out, expected)
        wrt = [q, k, v, enc.relative_bias.bias.weight]
        for a, e in zip(torch.autograd.grad(out.sum(), wrt), torch.autograd.grad(expected.sum(), wrt)):
            assert torch.equal(a, e)


@pytest.mark.parametrize("kind", ["key_mask", "single_query"])
def test_fallback_to_sdpa_with_padding_or_one_query(device, kind):
    enc = t5(device)
    lq = 1 if kind == "single_query" else 16
    q, k, v = qkv(2, 4, 4, lq, 16, 8, device=device, dtype=torch.float32)
    key_mask = None
    if kind == "key_mask":
        key_mask = torch.ones(2, 16, dtype=torch.bool, device=device)
        key_mask[1, :3] = False
    q_pos, k_pos = positions(2, lq, 16, device)
    assert banded.banded_refusal(q, k, enc, q_pos, k_pos, key_mask=key_mask) is not None
    out = fast(q, k, v, enc, key_mask=key_mask)
    if device.type == "cpu":
        assert torch.equal(out, default(q, k, v, enc, key_mask=key_mask))


@pytest.mark.parametrize("kind", ["positions", "window", "bfloat16"])
def test_fallback_to_the_compiled_flex_path(device, no_banded, kind):
    enc = t5(device)
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    q, k, v = qkv(2, 4, 4, 16, 16, 8, device=device, dtype=dtype)
    q_pos, k_pos = positions(2, 16, 16, device)
    window = 5 if kind == "window" else None
    if kind == "positions":
        q_pos = k_pos = k_pos * 2  # gaps: not consecutive
    reason = banded.banded_refusal(q, k, enc, q_pos, k_pos, window=window)
    assert reason is not None and (kind[:5] in reason or kind == "bfloat16" and "dtype" in reason)
    with torch.no_grad():
        out = enc.attend(
            q, k, v, q_pos, k_pos, causal=True, scale=None, window=window, attn_implementation="flex_attention"
        )
    assert torch.equal(out, no_banded(q, k, v, enc, q_pos, k_pos, causal=True, scale=None, window=window))


def test_encodings_that_are_neither_banded_nor_linear_are_refused(device):
    q, k, _ = qkv(1, 4, 4, 16, 16, 8, device=device)
    pos = torch.arange(16, device=device)[None]
    kerple = pebook.ENCODINGS["kerple"](n_heads=4).to(device)
    assert kerple.constant_beyond() is None and kerple.linear_slopes() is None
    assert banded.banded_width(kerple) is None
    assert "neither constant beyond a distance nor linear" in banded.banded_refusal(q, k, kerple, pos, pos)


def test_cuda_is_refused_for_now(device):
    if device.type == "cpu":
        pytest.skip("CPU")
    q, k, _ = qkv(1, 4, 4, 16, 16, 8, device=device)
    pos = torch.arange(16, device=device)[None]
    assert "cuda" in banded.banded_refusal(q, k, t5(device), pos, pos)


def test_direct_call_on_a_refused_encoding_names_it():
    q, k, v = qkv(1, 4, 4, 16, 16, 8, device="cpu")
    with pytest.raises(ValueError, match="encoding.*constant_beyond.*linear_slopes.*ALiBi"):
        banded.banded_logit_bias_attention(q, k, v, pebook.ALiBi(n_heads=4, causal=False), causal=False, scale=None)


# ---------------------------------------------------------------- causal ALiBi: the extra feature
#
# softmax_j(s_ij - m (i - j)) = softmax_j(s_ij + m (j - c)): one more query feature m / scale and
# key feature j - c (c the centre of a block of queries) make ALiBi bias-free causal attention.
# float64: 1e-12 against the float64 reference (and against the SDPA path when the slopes are
# powers of two, so that the SDPA path's float32 products m·(i - j) are exact). float32: within
# the FlexAttention tolerance (2e-5) of the float64 reference; the added term m (j - c) of the keys
# that matter is at most max(m)·block/2 <= 64 plus the distances at which exp(-m·distance) stays
# above float32 resolution, so its rounding is that of a materialised bias of that size.


def alibi(device, heads=8, slopes=None):
    return pebook.ALiBi(n_heads=heads, slopes=slopes).to(device)


ALIBI_CASES = [
    (2, 8, 8, 16, 16, 8),
    (1, 8, 2, 255, 255, 8),  # GQA
    (1, 8, 8, 256, 256, 4),  # one block
    (2, 8, 8, 257, 257, 4),  # a block and one query
    (1, 8, 1, 700, 700, 4),  # MQA, three blocks
    (1, 8, 8, 50, 700, 8),  # cache: 50 queries after 650 keys
    (1, 12, 12, 300, 300, 4),  # 12 heads: slopes up to 2^-0.5, smaller blocks
]
ALIBI_IDS = ["L16", "L255-gqa", "L256", "L257", "L700-mqa", "cache50of700", "12heads"]


@pytest.mark.parametrize("case", ALIBI_CASES, ids=ALIBI_IDS)
def test_alibi_float64_equals_the_reference(device, ref, case):
    b, h, kv, lq, lk, d = case
    enc = alibi(device, h)
    q, k, v = qkv(*case, device=device)
    q_pos, k_pos = positions(b, lq, lk, device, start=5)
    if device.type == "cpu":
        assert takes_banded(q, k, enc, q_pos, k_pos)
    kwargs = dict(position_ids=q_pos, key_position_ids=k_pos)
    out = fast(q, k, v, enc, **kwargs)
    torch.testing.assert_close(out, ref.positional_attention(q, k, v, enc, **kwargs), **EXACT)
    if h == 8:  # power-of-two slopes: the SDPA path's float32 bias is exact
        torch.testing.assert_close(out, default(q, k, v, enc, **kwargs), **EXACT)


@pytest.mark.parametrize("case", [ALIBI_CASES[3], ALIBI_CASES[5], ALIBI_CASES[6]], ids=["L257", "cache", "12heads"])
def test_alibi_float32_within_the_flex_tolerance(device, ref, case):
    enc = alibi(device, case[1])
    q, k, v = qkv(*case, device=device, dtype=torch.float32)
    out = fast(q, k, v, enc)
    torch.testing.assert_close(out.double(), ref.positional_attention(q, k, v, enc), **FLEX32)


def test_alibi_float32_at_realistic_size(ref):
    """B=1, H=8, D=64, L=1024, logits of O(1) spread: the largest error stays well inside 2e-5."""
    enc = alibi("cpu")
    q, k, v = qkv(1, 8, 8, 1024, 1024, 64, device="cpu", dtype=torch.float32)
    out = fast(q, k, v, enc)
    torch.testing.assert_close(out.double(), ref.positional_attention(q, k, v, enc), **FLEX32)


@settings(max_examples=30, deadline=None)
@given(
    lq=st.integers(2, 80),
    extra=st.integers(0, 40),
    largest=st.floats(0.0, 4.0),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_alibi_any_nonnegative_slopes(device, ref, lq, extra, largest, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    slopes = torch.rand(4, generator=gen) * largest
    enc = alibi(device, 4, slopes)
    q, k, v = qkv(1, 4, 4 // groups, lq, lq + extra, 4, device=device, seed=seed)
    out = fast(q, k, v, enc)
    torch.testing.assert_close(out, ref.positional_attention(q, k, v, enc), **EXACT)


def test_alibi_zero_slopes_give_plain_attention(ref):
    enc = alibi("cpu", 4, torch.zeros(4))
    q, k, v = qkv(1, 4, 4, 300, 310, 4, device="cpu")
    torch.testing.assert_close(fast(q, k, v, enc), ref.attention(q, k, v, causal=True), **EXACT)


@pytest.mark.parametrize("kind", ["bidirectional", "not_causal", "negative", "steep"])
def test_alibi_refusals_fall_back_bit_for_bit(device, no_banded, kind):
    slopes = {"negative": torch.tensor([0.5, -0.1, 0.2, 0.1]), "steep": torch.full((4,), 9.0)}.get(kind)
    enc = pebook.ALiBi(n_heads=4, causal=kind != "bidirectional", slopes=slopes).to(device)
    causal = kind not in ("bidirectional", "not_causal")
    q, k, v = qkv(2, 4, 4, 16, 16, 8, device=device, dtype=torch.float32)
    q_pos, k_pos = positions(2, 16, 16, device)
    assert banded.banded_refusal(q, k, enc, q_pos, k_pos, causal=causal) is not None
    with torch.no_grad():
        out = enc.attend(q, k, v, q_pos, k_pos, causal=causal, scale=None, attn_implementation="flex_attention")
    assert torch.equal(out, no_banded(q, k, v, enc, q_pos, k_pos, causal=causal, scale=None))


def test_alibi_no_L_by_L_tensor():
    """The extra-feature path creates q, k, v sized tensors (one more feature) and no mask."""
    L, d = 1024, 8
    enc = alibi("cpu", 1, torch.tensor([0.25]))
    q, k, v = qkv(1, 1, 1, L, L, d, device="cpu")
    with _Largest() as recorder, torch.no_grad():
        pebook.positional_attention(q, k, v, enc, attn_implementation="flex_attention")
    assert recorder.largest <= L * (d + 1), f"{recorder.largest} elements from {recorder.largest_op}"
