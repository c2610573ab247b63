"""pebook.shaw's fast path, ``attn_implementation="flex_attention"`` (issue 13, item 2).

Shaw, Uszkoreit & Vaswani 2018 (arXiv:1803.02155), eqs. (3)-(6), computed as a band of the
``2k - 1`` offsets nearest the diagonal plus fused attention over the clipped ends (module
docstring of pebook.shaw). Checked against ``ref.shaw`` (conftest, float64, a^K and a^V
materialised) and against the default path, which must stay bit for bit what it was.

Tolerances: float64 results agree with the float64 reference to 1e-12 (the fast path makes no
approximation; the merge of the parts by log-sum-exp only reorders sums). float32 results use
``tol32`` (1e-5): a few float32 roundings of O(1) terms, and the log-sum-exp merge adds one
``exp`` of a difference of O(10) numbers, ~1e-6 relative.

Where the fast path does not apply (padding keys, positions that are not consecutive in storage
order, ``max_distance = 0``, more queries than keys, half precision, a device without a fused
attention that returns its log-sum-exp: CUDA for now) the exact path runs: those tests check
``torch.equal`` with ``"sdpa"``.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pebook import MultiHeadAttention, ShawPE, shaw_attention
from pebook.shaw import _fast_path_refusal, _index, _shaw_core, _visible

F64 = torch.float64
FAST = dict(attn_implementation="flex_attention")

# (b, heads, kv_heads, q_len, k_len, d, max_distance): lengths below, at and far above k, a KV
# cache (q_len < k_len) shorter and longer than k, grouped-query heads
CASES = [
    (2, 2, 2, 5, 5, 4, 8),  # L < k: the whole sequence is inside the band
    (1, 2, 2, 8, 8, 4, 8),  # L = k
    (2, 4, 2, 40, 40, 8, 3),  # L > 2k, GQA (2 query heads per key head)
    (1, 2, 1, 3, 30, 4, 5),  # cache: 3 queries after 27 keys, more than k behind (a mask)
    (1, 2, 2, 4, 9, 4, 6),  # cache shorter than k
    (1, 1, 1, 1, 12, 4, 2),  # one decoding step
    (1, 2, 2, 70, 70, 4, 1),  # k = 1: a band of one offset; more queries than one block
]
CASE_IDS = ["L<k", "L=k", "L>2k-gqa", "cache-long", "cache-short", "decode", "k1"]


def inputs(b, h, kv, lq, lk, d, md, *, device, dtype=F64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, h, lq, d), (b, kv, lk, d), (b, kv, lk, d), (2 * md + 1, d), (2 * md + 1, d)]
    out = [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dtype) for s in shapes]
    return [t.requires_grad_(requires_grad) for t in out]


def ref_shaw(ref, q, k, v, rk, rv, md, causal):
    """``ref.shaw`` with grouped key/value heads repeated for their query heads."""
    group = q.shape[1] // k.shape[1]
    return ref.shaw(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), rk, rv, md, causal)


def fast_path_taken(q, k, md, position_ids=None, key_mask=None):
    """Whether shaw_attention's fast path runs for these inputs (with default positions)."""
    lq, lk = q.shape[2], k.shape[2]
    q_pos = torch.arange(lk - lq, lk, device=q.device)[None] if position_ids is None else position_ids[None]
    k_pos = torch.arange(lk, device=q.device)[None]
    return _fast_path_refusal(q, k, md, q_pos, k_pos, key_mask) is None


# ---------------------------------------------------------------- float64 reference, gradients


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_and_exact_path_float64(device, ref, case, causal):
    q, k, v, rk, rv = inputs(*case, device=device)
    md = case[-1]
    assert fast_path_taken(q, k, md) == (device.type == "cpu")
    fast = shaw_attention(q, k, v, rk, rv, md, causal, **FAST)
    torch.testing.assert_close(fast, ref_shaw(ref, q, k, v, rk, rv, md, causal), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, shaw_attention(q, k, v, rk, rv, md, causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
def test_float32_is_close_to_float64_reference(device, ref, tol32, case, causal):
    q, k, v, rk, rv = inputs(*case, device=device)
    md = case[-1]
    fast = shaw_attention(*(t.float() for t in (q, k, v, rk, rv)), md, causal, **FAST)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), ref_shaw(ref, q, k, v, rk, rv, md, causal), **tol32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_reference_gradients(device, ref, case, causal):
    """The backward pass (fused kernel's backward for the clipped ends, autograd through the band)
    gives the reference's autograd gradients for q, k, v, w^K and w^V."""
    md = case[-1]
    fast_in = inputs(*case, device=device, requires_grad=True)
    ref_in = inputs(*case, device=device, requires_grad=True)
    out = shaw_attention(*fast_in, md, causal, **FAST)
    expected = ref_shaw(ref, *ref_in, md, causal)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=F64).to(device)
    got = torch.autograd.grad(out, fast_in, grad)
    want = torch.autograd.grad(expected, ref_in, grad)
    for name, g, w in zip(("q", "k", "v", "rel_k", "rel_v"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_gradcheck_finite_differences(device, causal):
    q, k, v, rk, rv = inputs(1, 2, 1, 6, 6, 3, 2, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: shaw_attention(*t, 2, causal, **FAST), (q, k, v, rk, rv))


# ---------------------------------------------------------------- properties


@given(
    b=st.integers(1, 2),
    kv=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    lq=st.integers(1, 24),
    extra=st.integers(0, 12),
    md=st.integers(1, 14),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_the_exact_path_everywhere(device, ref, b, kv, groups, lq, extra, md, causal, seed):
    q, k, v, rk, rv = inputs(b, kv * groups, kv, lq, lq + extra, 4, md, device=device, seed=seed)
    fast = shaw_attention(q, k, v, rk, rv, md, causal, **FAST)
    torch.testing.assert_close(fast, shaw_attention(q, k, v, rk, rv, md, causal), rtol=1e-12, atol=1e-12)


@given(
    lq=st.integers(1, 20), extra=st.integers(0, 8), md=st.integers(1, 10), causal=st.booleans(), seed=st.integers(0, 99)
)
def test_zero_tables_give_plain_attention(device, ref, lq, extra, md, causal, seed):
    """With a^K = a^V = 0, eqs. (3)-(4) are softmax(q kᵀ/√d) v."""
    q, k, v, rk, rv = inputs(1, 2, 2, lq, lq + extra, 4, md, device=device, seed=seed)
    zero = torch.zeros_like(rk)
    fast = shaw_attention(q, k, v, zero, zero, md, causal, **FAST)
    torch.testing.assert_close(fast, ref.attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)


@given(
    lq=st.integers(1, 16),
    extra=st.integers(0, 8),
    shift=st.integers(1, 1000),
    md=st.integers(1, 10),
    causal=st.booleans(),
    seed=st.integers(0, 99),
)
def test_shifting_all_positions_changes_nothing(device, lq, extra, shift, md, causal, seed):
    """Shaw attention sees only j - i: moving every query and key by ``shift`` keeps the output (and
    keeps the fast path: the positions stay consecutive)."""
    q, k, v, rk, rv = inputs(1, 2, 2, lq, lq + extra, 4, md, device=device, seed=seed)
    lk = lq + extra
    keys = torch.arange(shift, shift + lk, device=device)
    moved = shaw_attention(q, k, v, rk, rv, md, causal, position_ids=keys[extra:], key_position_ids=keys, **FAST)
    torch.testing.assert_close(moved, shaw_attention(q, k, v, rk, rv, md, causal, **FAST), rtol=1e-12, atol=1e-12)


def test_clipped_end_rows_reach_far_keys_only(device):
    """Changing w^K_-k, w^V_-k (row 0) moves only queries that have a key k or more behind them
    (the fused part), and the band rows move the others: the split is where the clipping is."""
    md, L = 4, 12
    q, k, v, rk, rv = inputs(1, 1, 1, L, L, 4, md, device=device)
    base = shaw_attention(q, k, v, rk, rv, md, True, **FAST)
    rk2, rv2 = rk.clone(), rv.clone()
    rk2[0] += 1.0
    rv2[0] += 1.0
    changed = (shaw_attention(q, k, v, rk2, rv2, md, True, **FAST) - base).abs().amax(-1)[0, 0] > 0
    assert changed.tolist() == [i >= md for i in range(L)]


# ---------------------------------------------------------------- frozen snapshots


def _hand_example(device):
    t = lambda rows: torch.tensor(rows, dtype=F64, device=device)[None, None]  # noqa: E731
    q, k, v = t([[1, 0], [0, 1], [1, 1]]), t([[1, 1], [0, 1], [1, 0]]), t([[1, 2], [3, 4], [5, 6]])
    rk, rv = t([[0.5, 0], [0, 0], [0, 0.5]])[0, 0], t([[1, 0], [0, 0], [0, 1]])[0, 0]
    return q, k, v, rk, rv


def test_snapshot_hand_computed_causal(device):
    """The 3-token, k = 1, d = 2 example of test_shaw.py (evaluated by hand there): the fast path
    has a band of one offset (j = i) and the fused part for j <= i - 1."""
    out = shaw_attention(*_hand_example(device), 1, True, **FAST)[0, 0]
    expected = torch.tensor([[1.0, 2.0], [2.5, 3.0], [3.10086633, 3.28910530]], dtype=F64, device=device)
    torch.testing.assert_close(out, expected, rtol=0, atol=5e-9)


def test_snapshot_hand_computed_bidirectional(device):
    """Same example without the causal mask (by hand, Python floats): query 0 has e = (1, 0, 1)/√2
    over values (1,2), (3,5), (5,7), so z_0 = (3, (2a + 5 + 7a)/(2a + 1)) with a = e^{1/√2};
    query 1 has e = (1, 1, ½)/√2 over (2,2), (3,4), (5,7); query 2 is the causal one."""
    out = shaw_attention(*_hand_example(device), 1, False, **FAST)[0, 0]
    expected = torch.tensor(
        [[3.0, 4.59888791], [3.14964796, 4.03943674], [3.10086633, 3.28910530]], dtype=F64, device=device
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=5e-9)


# ---------------------------------------------------------------- the default path, fallbacks


def _old_attend(enc, q, k, v, q_pos, k_pos, causal, scale, key_mask):
    """ShawPE.attend before issue 13, verbatim."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = _visible(q.shape[2], k.shape[2], causal, key_mask, q.device)
    index = _index(q_pos, k_pos, enc.max_distance)
    return _shaw_core(q, k, v, enc.rel_k, enc.rel_v, index, mask, scale)


@pytest.mark.parametrize("causal", [True, False])
def test_default_path_is_bit_for_bit_the_old_one(device, causal):
    torch.manual_seed(0)
    enc = ShawPE(head_dim=4, max_distance=3).to(device)
    q, k, v, _, _ = inputs(2, 4, 2, 5, 9, 4, 3, device=device, dtype=torch.float32)
    q_pos, k_pos = torch.arange(4, 9, device=device).expand(2, 5), torch.arange(9, device=device).expand(2, 9)
    key_mask = torch.tensor([[True] * 9, [True] * 7 + [False] * 2], device=device)
    for mask in (None, key_mask):
        old = _old_attend(enc, q, k, v, q_pos, k_pos, causal, None, mask)
        assert torch.equal(enc.attend(q, k, v, q_pos, k_pos, causal=causal, scale=None, key_mask=mask), old)
        assert torch.equal(
            enc.attend(q, k, v, q_pos, k_pos, causal=causal, scale=None, key_mask=mask, attn_implementation="sdpa"), old
        )
        assert torch.equal(shaw_attention(q, k, v, enc.rel_k, enc.rel_v, 3, causal, key_mask=mask), old)


def test_module_fast_path_equals_exact_path(device):
    """ShawPE.attend with the fast path, as MultiHeadAttention calls it (positions 0 … L - 1)."""
    mha = MultiHeadAttention(16, 4, "shaw", max_distance=3).to(device).double()
    x = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(1), dtype=F64).to(device)
    q, k, v = mha.qkv(x).view(2, 11, -1, 4).transpose(1, 2).split((4, 4, 4), dim=1)
    pos = torch.arange(11, device=device).expand(2, 11)
    enc = mha.position
    fast = enc.attend(q, k, v, pos, pos, causal=True, scale=None, **FAST)
    exact = enc.attend(q, k, v, pos, pos, causal=True, scale=None)
    torch.testing.assert_close(fast, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kind",
    ["padding", "restart-ids", "k0", "lq>lk", "half"],
)
def test_unsupported_inputs_take_the_exact_path(device, kind):
    """Inputs the band + clipped ends cannot take give exactly the "sdpa" result."""
    md, causal, kwargs, dtype = 2, True, {}, F64
    lq, lk = 4, 7
    if kind == "padding":
        kwargs["key_mask"] = torch.tensor([[1] * 5 + [0] * 2], device=device)
    elif kind == "restart-ids":
        kwargs["position_ids"] = torch.arange(lq, device=device)  # the queries restart at 0: not storage order
    elif kind == "k0":
        md = 0
    elif kind == "lq>lk":
        lq, lk, causal, kwargs["position_ids"] = 6, 3, False, torch.arange(6, device=device)
    else:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    q, k, v, rk, rv = inputs(1, 2, 2, lq, lk, 4, md, device=device, dtype=dtype)
    fast = shaw_attention(q, k, v, rk, rv, md, causal, **kwargs, **FAST)
    assert torch.equal(fast, shaw_attention(q, k, v, rk, rv, md, causal, **kwargs))
    q_pos = kwargs.get("position_ids", torch.arange(lk - lq, lk, device=device))[None]
    refusal = _fast_path_refusal(q, k, md, q_pos, torch.arange(lk, device=device)[None], kwargs.get("key_mask"))
    assert refusal is not None


def test_key_mask_without_padding_keeps_the_fast_path(device):
    q, k, v, rk, rv = inputs(1, 2, 2, 6, 6, 4, 2, device=device)
    ones = torch.ones(1, 6, dtype=torch.long, device=device)
    fast = shaw_attention(q, k, v, rk, rv, 2, key_mask=ones, **FAST)
    torch.testing.assert_close(fast, shaw_attention(q, k, v, rk, rv, 2), rtol=1e-12, atol=1e-12)
    pos = torch.arange(6, device=device)[None]
    assert (_fast_path_refusal(q, k, 2, pos, pos, ones.bool()) is None) == (device.type == "cpu")


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
def test_no_L_by_L_tensor_forward_or_backward(device, causal):
    """Every tensor the fast path creates, forward and backward, holds O(L·k) elements, far fewer
    than the L² of the exact path's logits (L = 512, k = 8, one head): at most L·(max(64, 2k) + 2k)."""
    L, md = 512, 8
    q, k, v, rk, rv = inputs(1, 1, 1, L, L, 8, md, device=device, requires_grad=True)
    if not fast_path_taken(q, k, md):
        pytest.skip("the fast path does not run on this device")
    with _Largest() as recorder:
        shaw_attention(q, k, v, rk, rv, md, causal, **FAST).sum().backward()
    assert recorder.largest <= L * (64 + 4 * md), f"{recorder.largest} elements from {recorder.largest_op}"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", ["flash", "SDPA", None, 1])
def test_unknown_implementation_is_rejected(device, bad):
    q, k, v, rk, rv = inputs(1, 1, 1, 3, 3, 4, 1, device=device)
    with pytest.raises(ValueError, match=r"attn_implementation must be one of \('sdpa', 'flex_attention'.*got"):
        shaw_attention(q, k, v, rk, rv, 1, attn_implementation=bad)
    enc = ShawPE(head_dim=4, max_distance=1).to(device)
    pos = torch.arange(3, device=device)[None]
    with pytest.raises(ValueError, match=rf"attn_implementation must be one of .*got {bad!r}"):
        enc.attend(q, k, v, pos, pos, causal=True, scale=None, attn_implementation=bad)


def test_scale_is_honoured(device, ref):
    q, k, v, rk, rv = inputs(1, 2, 2, 9, 9, 4, 2, device=device)
    fast = shaw_attention(q, k, v, rk, rv, 2, scale=0.3, **FAST)
    exact = shaw_attention(q, k, v, rk, rv, 2, scale=0.3)
    torch.testing.assert_close(fast, exact, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fast, shaw_attention(q, k, v, rk, rv, 2, **FAST))
    assert math.isfinite(fast.abs().max().item())
