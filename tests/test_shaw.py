"""pebook.shaw: Shaw, Uszkoreit & Vaswani 2018, eqs. (3)-(6), and the registry's ``ShawPE``.

Reference: ``ref.shaw`` (conftest) materialises a^K and a^V as (L_q, L_k, d) tensors from a
loop-built clip(j - i, -k, k) index and evaluates eqs. (3)-(4) with broadcasting; its autograd
gradients are the reference gradients. It places query i at ``offset + i`` for both the index and
the mask; pebook places tokens by ``position_ids`` and masks in storage order, so
:func:`shaw_positions_ref` below does the same with a loop-built index per sequence, and is
itself checked against ``ref.shaw`` where the two conventions coincide.
``reachable_offsets`` is checked against a loop over every visible (query, key) pair, and its
defining property against the gradients of ``shaw_attention``.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import pebook
from pebook import ShawPE, reachable_offsets, relative_position_index, shaw_attention, shaw_attention_naive

F64 = torch.float64
SHAW_FUNCTIONS = pytest.mark.parametrize("fn", [shaw_attention, shaw_attention_naive], ids=["efficient", "naive"])

# (b, h, q_len, k_len, d, max_distance, causal, first): the queries are at first … first + q_len - 1
# (None: the default, the last q_len of the k_len keys); the causal mask is in storage order
CASES = [
    (2, 3, 6, 6, 8, 2, True, None),  # self-attention
    (2, 3, 6, 6, 8, 2, False, None),  # bidirectional
    (1, 2, 2, 7, 4, 3, True, None),  # KV cache: queries are the last 2 of 7 positions (5, 6)
    (1, 2, 3, 7, 4, 1, True, 2),  # position ids that are not the storage order (the "restart" bug)
    (1, 2, 3, 7, 4, 1, False, 2),  # explicit positions, bidirectional
    (2, 1, 3, 5, 6, 0, False, 1),  # max_distance = 0: one shared vector, position-blind
    (1, 2, 5, 5, 4, 50, True, None),  # max_distance far beyond the sequence: no clipping
    (1, 1, 4, 3, 4, 2, False, 0),  # more queries than keys (cross attention shape)
]
CASE_IDS = ["self", "bidir", "kv-cache", "ids-causal", "ids-bidir", "k0", "k-large", "lq>lk"]


def inputs(b, h, lq, lk, d, max_distance, *, device, dtype=F64, seed=0, requires_grad=False, kv_heads=None):
    gen = torch.Generator().manual_seed(seed)
    kv = h if kv_heads is None else kv_heads
    shapes = [(b, h, lq, d), (b, kv, lk, d), (b, kv, lk, d), (2 * max_distance + 1, d), (2 * max_distance + 1, d)]
    out = [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dtype) for s in shapes]
    return [t.requires_grad_(requires_grad) for t in out]


def query_ids(lq, first, device):
    """``position_ids`` of a case: ``None`` (the default) or first … first + lq - 1."""
    return None if first is None else torch.arange(first, first + lq, device=device)


def shaw_positions_ref(q, k, v, rel_k, rel_v, max_distance, causal=True, q_pos=None, k_pos=None, scale=None):
    """Eqs. (3)-(6) with query i of sequence b at q_pos[b][i] and key j at k_pos[b][j] (defaults:
    keys 0 … k_len - 1, queries the last q_len of them), the causal mask in storage order (query i
    sees keys j <= k_len - q_len + i), key/value head h // (heads / kv_heads) for query head h.
    a^K, a^V materialised per sequence from a loop-built index; differentiable."""
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    group = h // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q_pos = [list(range(lk - lq, lk))] * b if q_pos is None else q_pos.expand(b, lq).tolist()
    k_pos = [list(range(lk))] * b if k_pos is None else k_pos.expand(b, lk).tolist()
    scale = 1 / math.sqrt(d) if scale is None else scale
    mask = ref_mask(lq, lk).to(q.device)
    out = []
    for s in range(b):
        index = torch.tensor(
            [[max(-max_distance, min(max_distance, kp - qp)) + max_distance for kp in k_pos[s]] for qp in q_pos[s]],
            dtype=torch.long,
            device=q.device,
        ).reshape(lq, lk)
        a_k, a_v = rel_k[index], rel_v[index]  # (lq, lk, d)
        e = (q[s][:, :, None, :] * (k[s][:, None, :, :] + a_k)).sum(-1) * scale  # eq. (4)
        if causal:
            e = e.masked_fill(~mask, float("-inf"))
        alpha = e.softmax(-1)
        out.append((alpha[..., None] * (v[s][:, None, :, :] + a_v)).sum(-2))  # eq. (3)
    return torch.stack(out)


def ref_mask(lq, lk):
    return torch.tensor([[j <= lk - lq + i for j in range(lk)] for i in range(lq)], dtype=torch.bool).reshape(lq, lk)


def ids_of(lq, first, device):
    """The case's query positions as a tensor for the reference (None: the default)."""
    ids = query_ids(lq, first, device)
    return None if ids is None else ids[None]


# ---------------------------------------------------------------- relative_position_index


@pytest.mark.parametrize(
    "q_len,k_len,k,offset", [(5, 5, 2, 0), (2, 9, 3, 7), (3, 8, 1, 2), (4, 4, 0, 0), (3, 3, 10, 0), (0, 4, 1, 0)]
)
def test_relative_index_matches_reference(device, ref, q_len, k_len, k, offset):
    index = relative_position_index(q_len, k_len, k, offset, device=device)
    assert index.dtype == torch.int64 and index.device.type == device.type
    assert torch.equal(index.cpu(), ref.relative_index(q_len, k_len, k, offset))


@given(q_len=st.integers(0, 10), k_len=st.integers(0, 10), k=st.integers(0, 12), offset=st.integers(0, 10))
def test_relative_index_properties(device, ref, q_len, k_len, k, offset):
    index = relative_position_index(q_len, k_len, k, offset, device=device).cpu()
    assert torch.equal(index, ref.relative_index(q_len, k_len, k, offset))
    if q_len and k_len:
        assert index.min() >= 0 and index.max() <= 2 * k
    if q_len > 1 and k_len > 1:  # Toeplitz: depends on j - i only
        assert torch.equal(index[1:, 1:], index[:-1, :-1])
    # the offset picks the tail rows of the index of a longer query block
    assert torch.equal(index, relative_position_index(offset + q_len, k_len, k, device=device).cpu()[offset:])


# ---------------------------------------------------------------- (1) float64 reference


def test_positions_reference_agrees_with_the_papers_reference(device, ref):
    """Guard the guard: where query i sits at offset + i for both the index and the mask (default
    positions; or no mask), shaw_positions_ref is ref.shaw."""
    q, k, v, rk, rv = inputs(2, 2, 3, 6, 4, 2, device=device, seed=3)
    for causal, first in ((True, None), (False, None), (False, 1), (False, 4)):
        offset = None if first is None else first
        expected = ref.shaw(q, k, v, rk, rv, 2, causal, offset)
        got = shaw_positions_ref(q, k, v, rk, rv, 2, causal, ids_of(3, first, device))
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


@SHAW_FUNCTIONS
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_float64(device, ref, fn, case):
    b, h, lq, lk, d, md, causal, first = case
    q, k, v, rk, rv = inputs(b, h, lq, lk, d, md, device=device)
    out = fn(q, k, v, rk, rv, md, causal, position_ids=query_ids(lq, first, device))
    assert out.shape == (b, h, lq, d) and out.dtype == F64 and out.device.type == device.type
    expected = shaw_positions_ref(q, k, v, rk, rv, md, causal, ids_of(lq, first, device))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if first is None or not causal:  # the paper's convention: ref.shaw directly
        torch.testing.assert_close(out, ref.shaw(q, k, v, rk, rv, md, causal, first), rtol=1e-12, atol=1e-12)


@SHAW_FUNCTIONS
@pytest.mark.parametrize("causal", [True, False])
def test_batched_position_ids_match_reference(device, fn, causal):
    """Per-sequence, unordered, repeated and far-apart (clipped) query and key positions."""
    q, k, v, rk, rv = inputs(3, 2, 4, 6, 4, 3, device=device, seed=5)
    q_pos = torch.tensor([[5, 5, 0, 9], [0, 1, 2, 3], [40, 2, 7, 7]], device=device)
    k_pos = torch.tensor([[0, 1, 2, 3, 4, 5], [3, 2, 1, 0, 9, 8], [0, 0, 50, 6, 7, 8]], device=device)
    out = fn(q, k, v, rk, rv, 3, causal, position_ids=q_pos, key_position_ids=k_pos)
    expected = shaw_positions_ref(q, k, v, rk, rv, 3, causal, q_pos, k_pos)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # (len,) ids are shared by the batch
    shared = fn(q, k, v, rk, rv, 3, causal, position_ids=q_pos[0], key_position_ids=k_pos[1])
    torch.testing.assert_close(
        shared, shaw_positions_ref(q, k, v, rk, rv, 3, causal, q_pos[:1], k_pos[1:2]), rtol=1e-12, atol=1e-12
    )


@SHAW_FUNCTIONS
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_key_value_heads_equal_repeated_heads(device, fn, kv_heads):
    """GQA / MQA: k, v with fewer heads give exactly the attention with each head repeated
    for its group of query heads (repeat_interleave, as SDPA's enable_gqa)."""
    q, k, v, rk, rv = inputs(2, 4, 3, 5, 4, 2, device=device, seed=6, kv_heads=kv_heads)
    grouped = fn(q, k, v, rk, rv, 2, True)
    repeat = 4 // kv_heads
    repeated = fn(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), rk, rv, 2, True)
    torch.testing.assert_close(grouped, repeated, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(grouped, shaw_positions_ref(q, k, v, rk, rv, 2, True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.1, 3.0])
def test_scale_replaces_one_over_sqrt_d(device, scale):
    q, k, v, rk, rv = inputs(1, 2, 4, 4, 8, 2, device=device, seed=7)
    out = shaw_attention(q, k, v, rk, rv, 2, scale=scale)
    torch.testing.assert_close(out, shaw_positions_ref(q, k, v, rk, rv, 2, scale=scale), rtol=1e-12, atol=1e-12)
    assert torch.equal(shaw_attention(q, k, v, rk, rv, 2, scale=8**-0.5), shaw_attention(q, k, v, rk, rv, 2))


@SHAW_FUNCTIONS
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_is_close_to_float64_reference(device, tol32, fn, case):
    b, h, lq, lk, d, md, causal, first = case
    q, k, v, rk, rv = inputs(b, h, lq, lk, d, md, device=device, dtype=torch.float32)
    out = fn(q, k, v, rk, rv, md, causal, position_ids=query_ids(lq, first, device))
    assert out.dtype == torch.float32
    expected = shaw_positions_ref(*(t.double() for t in (q, k, v, rk, rv)), md, causal, ids_of(lq, first, device))
    torch.testing.assert_close(out.double(), expected, **tol32)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_reference_gradients(device, case):
    b, h, lq, lk, d, md, causal, first = case
    leaves = inputs(b, h, lq, lk, d, md, device=device, requires_grad=True)
    upstream = torch.randn(b, h, lq, d, generator=torch.Generator().manual_seed(1), dtype=F64).to(device)
    ids = query_ids(lq, first, device)
    got = torch.autograd.grad((shaw_attention(*leaves, md, causal, position_ids=ids) * upstream).sum(), leaves)
    expected = shaw_positions_ref(*leaves, md, causal, ids_of(lq, first, device))
    want = torch.autograd.grad((expected * upstream).sum(), leaves)
    for name, g, w in zip(["q", "k", "v", "rel_k", "rel_v"], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.mark.parametrize("causal,first", [(True, None), (False, 1)])
def test_gradcheck_finite_differences(device, causal, first):
    leaves = inputs(1, 2, 3, 4, 3, 1, device=device, requires_grad=True)
    ids = query_ids(3, first, device)
    assert torch.autograd.gradcheck(
        lambda *t: shaw_attention(*t, 1, causal, position_ids=ids), leaves, eps=1e-6, atol=1e-7
    )


# ---------------------------------------------------------------- ShawPE


def test_module_attends_with_its_tables(device, rand):
    """ShawPE(head_dim, max_distance) holds w^K, w^V of 2k + 1 rows (N(0, 1/head_dim)) and attends
    exactly as shaw_attention with them, in positional_attention and through attend()."""
    torch.manual_seed(0)
    enc = ShawPE(head_dim=8, max_distance=3).double().to(device)
    assert enc.rel_k.shape == enc.rel_v.shape == (7, 8) and enc.place == "key_value"
    assert enc.declared_parameters() == {"rel_k": ((7, 8), True), "rel_v": ((7, 8), True)}
    q, k, v = rand(2, 4, 3, 8, seed=0, device=device), *(rand(2, 2, 6, 8, seed=s, device=device) for s in (1, 2))
    q_pos = torch.tensor([[3, 4, 5], [9, 0, 2]], device=device)
    k_pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 10]], device=device)
    for causal in (True, False):
        expected = shaw_attention(q, k, v, enc.rel_k, enc.rel_v, 3, causal, position_ids=q_pos, key_position_ids=k_pos)
        out = pebook.positional_attention(q, k, v, enc, causal=causal, position_ids=q_pos, key_position_ids=k_pos)
        torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(
            enc.attend(q, k, v, q_pos, k_pos, causal=causal, scale=None), expected, rtol=1e-14, atol=1e-14
        )
    scaled = enc.attend(q, k, v, q_pos, k_pos, causal=False, scale=1.0)
    torch.testing.assert_close(
        scaled,
        shaw_positions_ref(q, k, v, enc.rel_k, enc.rel_v, 3, False, q_pos, k_pos, scale=1.0),
        rtol=1e-12,
        atol=1e-12,
    )


def test_module_init_scale():
    """Rows from N(0, 1/head_dim): 2 × 257 × 64 draws, fixed seed, sample std within 3 % (the
    relative standard error is about 0.4 %)."""
    torch.manual_seed(0)
    enc = ShawPE(head_dim=64, max_distance=128)
    for table in (enc.rel_k, enc.rel_v):
        assert table.detach().std().item() == pytest.approx(64**-0.5, rel=0.03)


# ---------------------------------------------------------------- (2) properties


@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    lq=st.integers(1, 7),
    extra=st.integers(0, 5),
    d=st.sampled_from([1, 2, 4]),
    md=st.integers(0, 8),
    causal=st.booleans(),
    given_ids=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_efficient_and_naive_match_reference_everywhere(device, b, h, lq, extra, d, md, causal, given_ids, seed):
    lk = lq + extra
    q, k, v, rk, rv = inputs(b, h, lq, lk, d, md, device=device, seed=seed)
    q_pos = k_pos = None
    if given_ids:  # arbitrary per-sequence positions
        gen = torch.Generator().manual_seed(seed)
        q_pos = torch.randint(0, 3 * lk, (b, lq), generator=gen).to(device)
        k_pos = torch.randint(0, 3 * lk, (b, lk), generator=gen).to(device)
    expected = shaw_positions_ref(q, k, v, rk, rv, md, causal, q_pos, k_pos)
    for fn in (shaw_attention, shaw_attention_naive):
        out = fn(q, k, v, rk, rv, md, causal, position_ids=q_pos, key_position_ids=k_pos)
        torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-12)


@given(
    lq=st.integers(1, 5),
    extra=st.integers(0, 4),
    shift=st.integers(1, 1000),
    md=st.integers(0, 5),
    causal=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_shifting_all_positions_changes_nothing(device, lq, extra, shift, md, causal, seed):
    """Only k_pos - q_pos enters (eqs. 5-6): adding a constant to every position is invisible."""
    lk = lq + extra
    q, k, v, rk, rv = inputs(2, 2, lq, lk, 4, md, device=device, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = (
        torch.randint(0, 20, (2, lq), generator=gen).to(device),
        torch.randint(0, 20, (2, lk), generator=gen).to(device),
    )
    out = shaw_attention(q, k, v, rk, rv, md, causal, position_ids=q_pos, key_position_ids=k_pos)
    moved = shaw_attention(q, k, v, rk, rv, md, causal, position_ids=q_pos + shift, key_position_ids=k_pos + shift)
    assert torch.equal(out, moved)


def _attention_rows(q, k, rel_k, md, causal):
    """Attention weights α (q_len, k_len) read off shaw_attention: with v_j = e_j and rel_v = 0,
    eq. (3) gives z_i = Σ_j α_ij e_j, i.e. the row α_i itself."""
    lk, d = k.shape[-2], k.shape[-1]
    v = torch.eye(lk, d, dtype=F64, device=k.device).expand(1, 1, lk, d)
    out = shaw_attention(q, k, v, rel_k, torch.zeros_like(rel_k), md, causal)  # positions 0 … L-1
    return out[0, 0, :, :lk]


@given(L=st.integers(2, 8), md=st.integers(0, 10), causal=st.booleans(), seed=st.integers(0, 2**31))
def test_logits_depend_on_content_and_relative_position_only(device, L, md, causal, seed):
    """Translation invariance. Prepend one token to the queries and keys (so every old token moves
    one position right). In a relative scheme e'_{i+1,j+1} = e_ij for every pair, so the attention
    rows agree up to their normalisation: log α'_{i+1,j+1} - log α_ij is the same for all j that
    query i can see. Any absolute-position dependence breaks it."""
    d = 16
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 1, L + 1, d, generator=gen, dtype=F64).to(device) for _ in range(2))
    rel_k = torch.randn(2 * md + 1, d, generator=gen, dtype=F64).to(device)
    alpha = _attention_rows(q[:, :, 1:], k[:, :, 1:], rel_k, md, causal)  # tokens at positions 0..L-1
    shifted = _attention_rows(q, k, rel_k, md, causal)[1:, 1:]  # the same tokens at positions 1..L
    visible = torch.ones(L, L, dtype=torch.bool) if not causal else torch.ones(L, L).tril().bool()
    visible = visible.to(device)
    assert torch.equal(alpha > 0, visible) and torch.equal(shifted > 0, visible)
    diff = (shifted.log() - alpha.log()).masked_fill(~visible, 0.0)
    per_row = diff[:, :1].expand_as(diff).masked_fill(~visible, 0.0)  # key 0 is visible to every query
    torch.testing.assert_close(diff, per_row, rtol=0, atol=1e-10)


@given(
    lq=st.integers(1, 6),
    o=st.integers(0, 6),
    extra=st.integers(0, 4),
    md=st.integers(0, 4),
    causal=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_last_queries_equal_the_tail_of_a_full_block(device, lq, o, extra, md, causal, seed):
    """Decoding with a cache: the last lq queries over the same keys (default positions, storage
    mask) give the rows o… of a block of o + lq queries."""
    lk = o + lq + extra
    q_full, k, v, rk, rv = inputs(1, 2, o + lq, lk, 4, md, device=device, seed=seed)
    full = shaw_attention(q_full, k, v, rk, rv, md, causal)
    tail = shaw_attention(q_full[:, :, o:], k, v, rk, rv, md, causal)
    torch.testing.assert_close(tail, full[:, :, o:], rtol=1e-12, atol=1e-12)


@given(
    L=st.integers(1, 7),
    md=st.integers(0, 5),
    bigger=st.integers(1, 6),
    causal=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_clipping_shares_the_end_rows(device, L, md, bigger, causal, seed):
    """Clipping at k is the same as a table for k' > k whose extra rows repeat the end rows:
    every offset beyond ±k really uses w_{±k} (eqs. 5-6)."""
    q, k, v, rk, rv = inputs(1, 2, L, L, 4, md, device=device, seed=seed)
    big = md + bigger
    rows = torch.tensor([min(max(r, -md), md) + md for r in range(-big, big + 1)], device=device)
    out_small = shaw_attention(q, k, v, rk, rv, md, causal)
    out_big = shaw_attention(q, k, v, rk[rows], rv[rows], big, causal)
    torch.testing.assert_close(out_big, out_small, rtol=1e-12, atol=1e-12)


def test_zero_tables_give_plain_attention(device, ref):
    q, k, v, rk, rv = inputs(2, 2, 5, 5, 4, 3, device=device)
    zeros = torch.zeros_like(rk)
    for causal in (True, False):
        expected = ref.attention(q, k, v, causal=causal)
        torch.testing.assert_close(shaw_attention(q, k, v, zeros, zeros, 3, causal), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- memory


class _StorageRecorder(TorchDispatchMode):
    """Records the storage size (in elements) of every tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_op = None
        self.n_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.n_ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                elements = t.untyped_storage().nbytes() // t.element_size()
                if elements > self.largest:
                    self.largest, self.largest_op = elements, str(func)
        return out


def _largest_allocation(fn, device, L=64, d=16, md=8):
    q, k, v, rk, rv = inputs(1, 1, L, L, d, md, device=device, dtype=torch.float32, requires_grad=True)
    recorder = _StorageRecorder()
    with recorder:
        out = fn(q, k, v, rk, rv, md, True)
        out.sum().backward()
    return recorder, out.detach()


def test_efficient_shaw_never_materialises_L_L_d(device):
    """Every tensor created in the forward and backward pass of shaw_attention holds fewer than
    L·L·d elements (L = 64, d = 16), while shaw_attention_naive does create (L, L, d) tensors
    (which shows the recorder sees them)."""
    L, d = 64, 16
    efficient, out_efficient = _largest_allocation(shaw_attention, device, L, d)
    naive, out_naive = _largest_allocation(shaw_attention_naive, device, L, d)
    assert efficient.n_ops > 5 and naive.n_ops > 5
    assert naive.largest >= L * L * d, naive.largest_op
    assert efficient.largest < L * L * d, f"{efficient.largest} elements from {efficient.largest_op}"
    assert efficient.largest <= 2 * L * L  # the (L, L) logits are the largest thing it needs
    torch.testing.assert_close(out_efficient, out_naive, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- (3) frozen snapshots


def test_snapshot_relative_index(device):
    """Three queries at positions 1, 2, 3 over keys 0…4 with k = 1, written out by hand from
    clip(j - i, -1, 1) + 1."""
    expected = [[0, 1, 2, 2, 2], [0, 0, 1, 2, 2], [0, 0, 0, 1, 2]]
    assert relative_position_index(3, 5, 1, 1, device=device).tolist() == expected


def test_snapshot_hand_computed_output(device, ref):
    """A 3-token causal example with k = 1 and d = 2, evaluated by hand from eqs. (3)-(6):

    q = [[1,0],[0,1],[1,1]], k = [[1,1],[0,1],[1,0]], v = [[1,2],[3,4],[5,6]],
    w^K = [[.5,0],[0,0],[0,.5]], w^V = [[1,0],[0,0],[0,1]] (rows for j - i = -1, 0, +1).
    z_0 = v_0 = (1, 2). Query 1: e = (1, 1)/√2, α = (½, ½), z_1 = ½(2, 2) + ½(3, 4) = (2.5, 3).
    Query 2: e = (2.5, 1.5, 1)/√2, α = softmax(e) = (0.54368632, 0.26807470, 0.18823897),
    z_2 = α · [(2, 2), (4, 4), (5, 6)] = (3.10086633, 3.28910530) (8 decimals, numpy).
    """
    t = lambda rows: torch.tensor(rows, dtype=F64, device=device)  # noqa: E731
    q, k, v = t([[1, 0], [0, 1], [1, 1]]), t([[1, 1], [0, 1], [1, 0]]), t([[1, 2], [3, 4], [5, 6]])
    rk, rv = t([[0.5, 0], [0, 0], [0, 0.5]]), t([[1, 0], [0, 0], [0, 1]])
    expected = t([[1.0, 2.0], [2.5, 3.0], [3.10086633, 3.28910530]])
    for fn in (shaw_attention, shaw_attention_naive):
        out = fn(q[None, None], k[None, None], v[None, None], rk, rv, 1)[0, 0]
        torch.testing.assert_close(out, expected, rtol=0, atol=5e-9)
    torch.testing.assert_close(
        ref.shaw(q[None, None], k[None, None], v[None, None], rk, rv, 1)[0, 0], expected, rtol=0, atol=5e-9
    )
    # the attention weights themselves, read off with v = I: pad d to 3 >= k_len with a zero
    # feature, and scale q by sqrt(3/2) so that q·k/sqrt(3) is still the d = 2 logit
    pad = lambda x: torch.cat((x, torch.zeros(3, 1, dtype=F64, device=device)), 1)  # noqa: E731
    alpha = _attention_rows(pad(q)[None, None] * math.sqrt(1.5), pad(k)[None, None], pad(rk), 1, True)
    torch.testing.assert_close(alpha[2], t([0.54368632, 0.26807470, 0.18823897]), rtol=0, atol=5e-9)
    assert math.isclose(alpha[1, 0].item(), 0.5, abs_tol=1e-15)


# ---------------------------------------------------------------- bad input


@SHAW_FUNCTIONS
def test_rel_k_of_wrong_shape_is_rejected(device, fn):
    q, k, v, rk, rv = inputs(1, 2, 3, 3, 8, 2, device=device)
    with pytest.raises(
        ValueError,
        match=r"rel_k must have shape \(2\*max_distance\+1, head_dim\) = \(5, 8\) "
        r"for max_distance=2, got \(4, 8\)",
    ):
        fn(q, k, v, rk[:4], rv, 2)
    with pytest.raises(ValueError, match=r"rel_v must have shape .* = \(5, 8\) .* got \(5, 7\)"):
        fn(q, k, v, rk, rv[:, :7], 2)
    with pytest.raises(ValueError, match=r"rel_k must have shape .* = \(3, 8\) for max_distance=1, got \(5, 8\)"):
        fn(q, k, v, rk, rv, 1)  # tables for k = 2, but max_distance says 1
    with pytest.raises(ValueError, match=r"rel_k must have 2 dimensions, got shape \(1, 5, 8\)"):
        fn(q, k, v, rk[None], rv, 2)


@SHAW_FUNCTIONS
def test_integer_inputs_are_rejected(device, fn):
    q, k, v, rk, rv = inputs(1, 2, 3, 3, 8, 2, device=device)
    with pytest.raises(TypeError, match=r"q must be a floating-point tensor, got dtype torch.int64"):
        fn(q.long(), k, v, rk, rv, 2)
    with pytest.raises(TypeError, match=r"rel_k must be a floating-point tensor, got dtype torch.int32"):
        fn(q, k, v, rk.int(), rv, 2)
    with pytest.raises(TypeError, match=r"rel_v must be a floating-point tensor, got dtype torch.bool"):
        fn(q, k, v, rk, rv > 0, 2)


@SHAW_FUNCTIONS
def test_mismatched_shapes_and_dtypes_are_rejected(device, fn):
    q, k, v, rk, rv = inputs(1, 2, 3, 5, 8, 2, device=device)
    with pytest.raises(
        ValueError,
        match=r"k must have shape \(batch=1, kv_heads, k_len, head_dim=8\) with kv_heads dividing the 2 query heads "
        r"of q \(1, 2, 3, 8\), got \(1, 2, 5, 7\)$",
    ):
        fn(q, k[..., :7], v, rk, rv, 2)
    with pytest.raises(
        ValueError, match=r"k must have shape .*kv_heads dividing the 2 query heads.*got \(1, 3, 5, 8\)$"
    ):
        fn(q, torch.cat((k, k[:, :1]), 1), v, rk, rv, 2)
    with pytest.raises(
        ValueError, match=r"v must have shape \(batch, heads, k_len\) = \(1, 2, 5\) like k, got \(1, 2, 4, 8\)"
    ):
        fn(q, k, v[:, :, :4], rk, rv, 2)
    with pytest.raises(ValueError, match=r"q must have 4 dimensions, got shape \(2, 3, 8\)"):
        fn(q[0], k, v, rk, rv, 2)
    with pytest.raises(TypeError, match=r"k has dtype torch.float32 but q has dtype torch.float64"):
        fn(q, k.float(), v, rk, rv, 2)
    with pytest.raises(TypeError, match=r"v has dtype torch.float32 but q has dtype torch.float64"):
        fn(q, k, v.float(), rk, rv, 2)
    with pytest.raises(TypeError, match=r"rel_v has dtype torch.float32 but q has dtype torch.float64"):
        fn(q, k, v, rk, rv.float(), 2)


@SHAW_FUNCTIONS
def test_bad_integers_are_rejected(device, fn):
    q, k, v, rk, rv = inputs(1, 2, 3, 5, 8, 2, device=device)
    with pytest.raises(ValueError, match=r"max_distance must be an int >= 0, got -1$"):
        fn(q, k, v, rk[:1], rv[:1], -1)
    with pytest.raises(TypeError, match=r"max_distance must be an int, got True of type bool"):
        fn(q, k, v, rk[:3], rv[:3], True)
    # by default the queries are the last q_len keys, impossible with more queries than keys
    with pytest.raises(ValueError, match=r"without position_ids .* q_len=5 must be <= k_len=3$"):
        fn(*inputs(1, 2, 5, 3, 8, 2, device=device), 2)
    # and with position ids, a causal mask in storage order would leave the first query no key
    with pytest.raises(
        ValueError,
        match=r"causal attention needs q_len <= k_len \(the queries are the last q_len of the k_len stored keys\), "
        r"got q_len=5, k_len=3$",
    ):
        fn(*inputs(1, 2, 5, 3, 8, 2, device=device), 2, position_ids=torch.arange(5, device=device))


@SHAW_FUNCTIONS
def test_bad_position_ids_are_rejected(device, fn):
    q, k, v, rk, rv = inputs(2, 2, 3, 5, 8, 2, device=device)
    with pytest.raises(ValueError, match=r"position_ids must have shape \(3,\) or \(2, 3\), got \(2, 4\)$"):
        fn(q, k, v, rk, rv, 2, position_ids=torch.zeros(2, 4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"key_position_ids must have shape \(5,\) or \(2, 5\), got \(3,\)$"):
        fn(q, k, v, rk, rv, 2, key_position_ids=torch.arange(3, device=device))
    with pytest.raises(TypeError, match=r"position_ids must be an integer tensor, got dtype torch.float64$"):
        fn(q, k, v, rk, rv, 2, position_ids=torch.zeros(3, dtype=F64, device=device))
    if device.type == "cpu":  # checked on the CPU only (on a GPU it would synchronise)
        with pytest.raises(ValueError, match=r"key_position_ids must be >= 0, got a minimum of -2$"):
            fn(q, k, v, rk, rv, 2, key_position_ids=torch.tensor([0, 1, -2, 3, 4]))


@pytest.mark.cuda
@SHAW_FUNCTIONS
@pytest.mark.parametrize("moved", ["k", "v", "rel_k", "rel_v"])
def test_mixed_devices_are_rejected(cuda_device, fn, moved):
    args = dict(zip(["q", "k", "v", "rel_k", "rel_v"], inputs(1, 2, 3, 3, 8, 2, device=cuda_device), strict=True))
    args[moved] = args[moved].cpu()
    with pytest.raises(
        ValueError, match=rf"{moved} is on cpu but q is on cuda(:0)?; all inputs must be on the same device"
    ):
        fn(**args, max_distance=2)


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((-1, 3, 2), r"q_len must be an int >= 0, got -1$"),
        ((3, -3, 2), r"k_len must be an int >= 0, got -3$"),
        ((3, 3, -2), r"max_distance must be an int >= 0, got -2$"),
        ((3, 3, 2, -1), r"offset must be an int >= 0, got -1$"),
    ],
)
def test_relative_index_rejects_negative_arguments(device, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        relative_position_index(*args, device=device)


def test_relative_index_rejects_bools(device):
    with pytest.raises(TypeError, match=r"max_distance must be an int, got True of type bool"):
        relative_position_index(3, 3, True, device=device)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(head_dim=0), ValueError, r"head_dim must be an int >= 1, got 0$"),
        (dict(head_dim=8, max_distance=-1), ValueError, r"max_distance must be an int >= 0, got -1$"),
        (dict(head_dim=8, max_distance=2.0), TypeError, r"max_distance must be an int, got 2.0 of type float$"),
    ],
)
def test_module_rejects_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ShawPE(**kwargs)


# ---------------------------------------------------------------- reachable_offsets


def reachable_ref(q_len, k_len, max_distance, causal=True, offset=0):
    """Loop over every (query, key) pair: query i at offset + i, key j at j; mark row
    clip(j - i, -k, k) + k of every visible pair (Shaw et al. 2018, §3.2)."""
    used = [False] * (2 * max_distance + 1)
    for i in range(q_len):
        for j in range(k_len):
            if causal and j > offset + i:
                continue
            used[max(-max_distance, min(max_distance, j - (offset + i))) + max_distance] = True
    return torch.tensor(used, dtype=torch.bool)


@pytest.mark.parametrize(
    "q_len,k_len,k,causal,offset",
    [
        (8, 8, 16, True, 0),
        (8, 8, 16, False, 0),
        (8, 8, 3, True, 0),
        (2, 9, 4, True, 7),  # the last 2 of 9 positions (decoding with a cache)
        (2, 9, 4, True, 0),
        (3, 6, 2, False, 1),
        (0, 5, 2, True, 0),
        (4, 4, 0, False, 0),
        (5, 3, 2, True, 0),  # more queries than keys
    ],
)
def test_reachable_matches_reference(device, q_len, k_len, k, causal, offset):
    got = reachable_offsets(q_len, k_len, k, causal, offset, device=device)
    assert got.dtype == torch.bool and got.shape == (2 * k + 1,) and got.device.type == device.type
    assert torch.equal(got.cpu(), reachable_ref(q_len, k_len, k, causal, offset))


def test_reachable_offset_defaults_to_zero(device):
    """offset is the position of the first query, 0 unless given (not "the last q_len keys")."""
    assert torch.equal(reachable_offsets(2, 9, 4, device=device), reachable_offsets(2, 9, 4, True, 0, device=device))
    # queries at 0, 1 over keys 0 … 8, causal: offsets j - i in {-1, 0} only
    assert reachable_offsets(2, 9, 4, device=device).tolist() == [False] * 3 + [True] * 2 + [False] * 4


def test_reachable_snapshots(device):
    offsets = torch.arange(-16, 17)
    # length 8, k = 16: the chapter's example
    assert torch.equal(reachable_offsets(8, 8, 16, causal=True, device=device).cpu(), (offsets <= 0) & (offsets > -8))
    assert torch.equal(reachable_offsets(8, 8, 16, causal=False, device=device).cpu(), offsets.abs() < 8)
    # k below the length: every row up to the end row is reached
    assert reachable_offsets(8, 8, 4, causal=True, device=device).tolist() == [True] * 5 + [False] * 4
    assert reachable_offsets(0, 0, 2, device=device).tolist() == [False] * 5


@given(
    lq=st.integers(1, 7),
    extra=st.integers(0, 5),
    md=st.integers(0, 10),
    causal=st.booleans(),
    use_offset=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_unreachable_rows_get_exactly_zero_gradient(device, lq, extra, md, causal, use_offset, seed):
    """The defining property: rows not reachable receive a gradient of exactly 0 from
    shaw_attention, and every reachable row of w^V receives a non-zero one (its gradient is
    Σ_i A_ir · upstream_i with A_ir > 0). Rows of w^K learn too when every query sees at least
    two keys in different rows (k >= 1): a logit shift common to all of a query's keys leaves its
    softmax unchanged, e.g. a lone key, or k = 0, one row for every offset. The queries are the last lq of
    lk keys (the storage order), or, without a mask, at any offset."""
    lk = lq + extra
    offset = extra // 2 if use_offset and not causal else extra
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 4, generator=gen, dtype=F64).to(device) for n in (lq, lk, lk))
    rel_k, rel_v = (torch.randn(2 * md + 1, 4, generator=gen, dtype=F64).to(device).requires_grad_() for _ in range(2))
    upstream = torch.randn(1, 2, lq, 4, generator=gen, dtype=F64).to(device)
    ids = torch.arange(offset, offset + lq, device=device)
    out = shaw_attention(q, k, v, rel_k, rel_v, md, causal, position_ids=ids)
    g_k, g_v = torch.autograd.grad((out * upstream).sum(), (rel_k, rel_v))
    reachable = reachable_offsets(lq, lk, md, causal, offset, device=device)
    assert torch.equal(g_k[~reachable], torch.zeros_like(g_k[~reachable]))
    assert torch.equal(g_v[~reachable], torch.zeros_like(g_v[~reachable]))
    assert (g_v[reachable].abs().sum(-1) > 0).all()
    if md >= 1 and (extra >= 1 if causal else lk >= 2):
        assert (g_k[reachable].abs().sum(-1) > 1e-8).all()


@given(L=st.integers(1, 12), md=st.integers(0, 15))
def test_reachable_offsets_are_the_clipped_offsets_seen(device, L, md):
    """Self-attention at length L reads offsets -(L-1)..L-1 (only <= 0 when causal), clipped to ±k."""
    offsets = torch.arange(-md, md + 1)
    bidirectional = reachable_offsets(L, L, md, causal=False, device=device).cpu()
    causal = reachable_offsets(L, L, md, causal=True, device=device).cpu()
    assert torch.equal(bidirectional, offsets.abs() <= L - 1)
    assert torch.equal(causal, (offsets <= 0) & (offsets >= -(L - 1)))


@pytest.mark.parametrize(
    "args,kwargs,error,pattern",
    [
        ((-1, 3, 2), {}, ValueError, r"q_len must be an int >= 0, got -1$"),
        ((3, -3, 2), {}, ValueError, r"k_len must be an int >= 0, got -3$"),
        ((3, 3, -2), {}, ValueError, r"max_distance must be an int >= 0, got -2$"),
        ((3, 3, 2), {"offset": -1}, ValueError, r"offset must be an int >= 0, got -1$"),
        ((3, 3, True), {}, TypeError, r"max_distance must be an int, got True of type bool"),
        ((3.0, 3, 2), {}, TypeError, r"q_len must be an int, got 3.0 of type float"),
        ((3, 3, 2), {"offset": 1.0}, TypeError, r"offset must be an int, got 1.0 of type float"),
    ],
)
def test_reachable_rejects_bad_arguments(device, args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        reachable_offsets(*args, device=device, **kwargs)
