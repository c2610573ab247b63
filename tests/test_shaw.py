"""pebook.shaw: Shaw, Uszkoreit & Vaswani 2018, eqs. (3)-(6).

Reference: ``ref.shaw`` (conftest) materialises a^K and a^V as (L_q, L_k, d) tensors from a
loop-built clip(j - i, -k, k) index and evaluates eqs. (3)-(4) with broadcasting; its autograd
gradients are the reference gradients.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pebook import relative_position_index, shaw_attention, shaw_attention_naive

F64 = torch.float64
SHAW_FUNCTIONS = pytest.mark.parametrize("fn", [shaw_attention, shaw_attention_naive], ids=["efficient", "naive"])

# (b, h, q_len, k_len, d, max_distance, causal, offset)
CASES = [
    (2, 3, 6, 6, 8, 2, True, None),  # self-attention
    (2, 3, 6, 6, 8, 2, False, None),  # bidirectional
    (1, 2, 2, 7, 4, 3, True, None),  # KV cache: queries are the last 2 of 7 positions (offset 5)
    (1, 2, 3, 7, 4, 1, True, 2),  # explicit offset, keys after the queries are masked
    (1, 2, 3, 7, 4, 1, False, 2),  # explicit offset, bidirectional
    (2, 1, 3, 5, 6, 0, False, 1),  # max_distance = 0: one shared vector, position-blind
    (1, 2, 5, 5, 4, 50, True, None),  # max_distance far beyond the sequence: no clipping
    (1, 1, 4, 3, 4, 2, False, 0),  # more queries than keys (cross attention shape)
]
CASE_IDS = ["self", "bidir", "kv-cache", "offset-causal", "offset-bidir", "k0", "k-large", "lq>lk"]


def inputs(b, h, lq, lk, d, max_distance, *, device, dtype=F64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, h, lq, d), (b, h, lk, d), (b, h, lk, d), (2 * max_distance + 1, d), (2 * max_distance + 1, d)]
    out = [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dtype) for s in shapes]
    return [t.requires_grad_(requires_grad) for t in out]


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


@SHAW_FUNCTIONS
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_float64(device, ref, fn, case):
    b, h, lq, lk, d, md, causal, offset = case
    q, k, v, rk, rv = inputs(b, h, lq, lk, d, md, device=device)
    out = fn(q, k, v, rk, rv, md, causal, offset)
    assert out.shape == (b, h, lq, d) and out.dtype == F64 and out.device.type == device.type
    torch.testing.assert_close(out, ref.shaw(q, k, v, rk, rv, md, causal, offset), rtol=1e-12, atol=1e-12)


@SHAW_FUNCTIONS
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_is_close_to_float64_reference(device, ref, tol32, fn, case):
    b, h, lq, lk, d, md, causal, offset = case
    q, k, v, rk, rv = inputs(b, h, lq, lk, d, md, device=device, dtype=torch.float32)
    out = fn(q, k, v, rk, rv, md, causal, offset)
    assert out.dtype == torch.float32
    expected = ref.shaw(*(t.double() for t in (q, k, v, rk, rv)), md, causal, offset)
    torch.testing.assert_close(out.double(), expected, **tol32)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_reference_gradients(device, ref, case):
    b, h, lq, lk, d, md, causal, offset = case
    leaves = inputs(b, h, lq, lk, d, md, device=device, requires_grad=True)
    upstream = torch.randn(b, h, lq, d, generator=torch.Generator().manual_seed(1), dtype=F64).to(device)
    got = torch.autograd.grad((shaw_attention(*leaves, md, causal, offset) * upstream).sum(), leaves)
    want = torch.autograd.grad((ref.shaw(*leaves, md, causal, offset) * upstream).sum(), leaves)
    for name, g, w in zip(["q", "k", "v", "rel_k", "rel_v"], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.mark.parametrize("causal,offset", [(True, None), (False, 1)])
def test_gradcheck_finite_differences(device, causal, offset):
    leaves = inputs(1, 2, 3, 4, 3, 1, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: shaw_attention(*t, 1, causal, offset), leaves, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- (2) properties


@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    lq=st.integers(1, 7),
    extra=st.integers(0, 5),
    d=st.sampled_from([1, 2, 4]),
    md=st.integers(0, 8),
    causal=st.booleans(),
    use_offset=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_efficient_and_naive_match_reference_everywhere(device, ref, b, h, lq, extra, d, md, causal, use_offset, seed):
    lk = lq + extra
    offset = None if not use_offset else extra // 2
    q, k, v, rk, rv = inputs(b, h, lq, lk, d, md, device=device, seed=seed)
    expected = ref.shaw(q, k, v, rk, rv, md, causal, offset)
    torch.testing.assert_close(shaw_attention(q, k, v, rk, rv, md, causal, offset), expected, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(
        shaw_attention_naive(q, k, v, rk, rv, md, causal, offset), expected, rtol=1e-11, atol=1e-12
    )


def _attention_rows(q, k, rel_k, md, causal):
    """Attention weights α (q_len, k_len) read off shaw_attention: with v_j = e_j and rel_v = 0,
    eq. (3) gives z_i = Σ_j α_ij e_j, i.e. the row α_i itself."""
    lk, d = k.shape[-2], k.shape[-1]
    v = torch.eye(lk, d, dtype=F64, device=k.device).expand(1, 1, lk, d)
    out = shaw_attention(q, k, v, rel_k, torch.zeros_like(rel_k), md, causal, offset=0)
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
def test_offset_queries_equal_the_tail_of_a_full_block(device, lq, o, extra, md, causal, seed):
    """Queries at offset o give the rows o… of a block of o + lq queries over the same keys."""
    lk = o + lq + extra
    q_full, k, v, rk, rv = inputs(1, 2, o + lq, lk, 4, md, device=device, seed=seed)
    full = shaw_attention(q_full, k, v, rk, rv, md, causal, offset=0)
    tail = shaw_attention(q_full[:, :, o:], k, v, rk, rv, md, causal, offset=o)
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


@given(L=st.integers(1, 6), extra=st.integers(0, 6), causal=st.booleans(), seed=st.integers(0, 2**31))
def test_rows_for_unseen_distances_get_exactly_zero_gradient(device, L, extra, causal, seed):
    """Train at length L with k = L - 1 + extra: offsets |j - i| >= L never occur, so their rows of
    w^K and w^V get a gradient of exactly 0 (and, under a causal mask, so do all j - i > 0)."""
    md = L - 1 + extra
    q, k, v, rk, rv = inputs(2, 2, L, L, 4, md, device=device, seed=seed, requires_grad=True)
    upstream = torch.randn(2, 2, L, 4, generator=torch.Generator().manual_seed(seed + 1), dtype=F64).to(device)
    g_k, g_v = torch.autograd.grad((shaw_attention(q, k, v, rk, rv, md, causal) * upstream).sum(), (rk, rv))
    offsets = torch.arange(-md, md + 1, device=device)
    unseen = (offsets.abs() >= L) | ((offsets > 0) if causal else torch.zeros_like(offsets, dtype=torch.bool))
    assert torch.equal(g_k[unseen], torch.zeros_like(g_k[unseen]))
    assert torch.equal(g_v[unseen], torch.zeros_like(g_v[unseen]))
    # the rows that are used do learn (so the zeros above are not vacuous); w^K's row for offset
    # 0 has no gradient when L = 1: a single key gets weight 1 whatever its logit.
    seen = ~unseen if L > 1 else torch.zeros_like(unseen)
    assert (g_v[~unseen].abs().sum(-1) > 1e-8).all()
    assert (g_k[seen].abs().sum(-1) > 1e-8).all()


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
        ValueError, match=r"k must have shape \(batch=1, heads=2, k_len, head_dim=8\).*got \(1, 2, 5, 7\)"
    ):
        fn(q, k[..., :7], v, rk, rv, 2)
    with pytest.raises(ValueError, match=r"k must have shape .*got \(1, 3, 5, 8\)"):
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
    with pytest.raises(ValueError, match=r"offset must be an int >= 0, got -2$"):
        fn(q, k, v, rk, rv, 2, True, -2)
    with pytest.raises(TypeError, match=r"max_distance must be an int, got True of type bool"):
        fn(q, k, v, rk[:3], rv[:3], True)
    with pytest.raises(TypeError, match=r"offset must be an int, got 1.0 of type float"):
        fn(q, k, v, rk, rv, 2, True, 1.0)
    # offset=None means "the queries are the last q_len keys", impossible with more queries
    with pytest.raises(ValueError, match=r"q_len=5 must be <= k_len=3"):
        fn(*inputs(1, 2, 5, 3, 8, 2, device=device), 2)


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
