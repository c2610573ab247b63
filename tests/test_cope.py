"""pebook.cope: CoPE, Golovneva, Wang, Weston & Sukhbaatar 2024, eqs. (3)-(6), and the registry's ``CoPE``.

Reference: :func:`cope_ref` below evaluates the paper's equations element by element in float64,
with the default positions (storage order), so that the paper's position sum is the literal sum ``Σ_{t=j}^{i}``:
gates ``g_it = σ(q_i·k_t/√d)`` of the visible keys, ``p_ij`` clamped at ``p_max``, ``e[p_ij]``
interpolated as a vector (eq. 5, the ``(L, L, d)`` tensor the module never builds) and
``softmax_j(q_i·(k_j + e[p_ij])/√d) v`` (eq. 6, the whole logit scaled as in the reference code,
facebookresearch/RAM ``ContextPosSelfAttn``). Position ids that are not the storage order are
pebook's extension (tokens between key and query read from the ids); they are checked against
``ref.positional_attention`` (conftest) and by the invariance properties below.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook
from pebook.cope import CoPE, contextual_positions, cope_attention, interpolate

F64 = torch.float64


def cope_ref(q, k, v, table, *, causal=True, scale=None):
    """Eqs. (3)-(6) by loops over (sequence, head, query, key): query i is stored row
    ``k_len - q_len + i`` and sees keys ``t <= that row`` (all keys without ``causal``); key and
    value head ``h // (heads / kv_heads)`` serves query head ``h``."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    group = h // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    p_max = table.shape[0] - 1
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=F64, device=q.device)
    for s in range(b):
        for head in range(h):
            kh, vh = k[s, head // group], v[s, head // group]
            for i in range(lq):
                row = lk - lq + i  # the query's own key
                seen = range(row + 1) if causal else range(lk)
                gate = {t: 1 / (1 + math.exp(-float(q[s, head, i] @ kh[t]) * scale)) for t in seen}  # gates
                logits = []
                for j in seen:
                    p = min(sum(gate[t] for t in range(j, row + 1)), p_max)  # positions: empty for j > row
                    lo, hi = math.floor(p), math.ceil(p)
                    e_p = (p - lo) * table[hi] + (1 - p + lo) * table[lo]  # interpolation
                    logits.append(float(q[s, head, i] @ (kh[j] + e_p)) * scale)  # logit
                weights = torch.tensor(logits, dtype=F64).softmax(0).to(q.device)
                out[s, head, i] = weights @ vh[list(seen)]
    return out


def tensors(b, h, kv, lq, lk, d, p_max, *, device, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, h, lq, d), (b, kv, lk, d), (b, kv, lk, d), (p_max + 1, d)]
    return [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dtype) for s in shapes]


def causal_ones(b, h, lq, lk, device):
    """All gates 1 for the keys each query sees in storage order, 0 for the later ones."""
    rows = torch.arange(lk - lq, lk, device=device)[:, None]
    return (torch.arange(lk, device=device)[None, :] <= rows).to(F64).expand(b, h, lq, lk)


# ---------------------------------------------------------------- (1) the paper's equations


# (b, h, kv_heads, q_len, k_len, d, p_max, causal)
CASES = [
    (2, 2, 2, 6, 6, 4, 8, True),  # self-attention, no clamping
    (2, 2, 2, 6, 6, 4, 2, True),  # positions clamped at p_max = 2
    (1, 4, 2, 2, 7, 4, 5, True),  # KV cache: the last 2 of 7 queries, grouped-query heads
    (1, 2, 1, 1, 9, 8, 3, True),  # one query, multi-query attention
    (2, 2, 2, 5, 5, 4, 8, False),  # bidirectional: later keys are at position 0
    (1, 2, 2, 3, 6, 4, 1, False),  # bidirectional, rectangular, p_max = 1
]
CASE_IDS = ["self", "clamped", "kv-cache-gqa", "one-query-mqa", "bidir", "bidir-rect"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_attention_matches_the_papers_equations(device, case):
    b, h, kv, lq, lk, d, p_max, causal = case
    q, k, v, table = tensors(b, h, kv, lq, lk, d, p_max, device=device)
    expected = cope_ref(q, k, v, table, causal=causal)
    out = cope_attention(q, k, v, table, causal)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    enc = CoPE(head_dim=d, cope_max_position=p_max).double().to(device)
    with torch.no_grad():
        enc.position_embeddings.copy_(table)
    torch.testing.assert_close(
        pebook.positional_attention(q, k, v, enc, causal=causal), expected, rtol=1e-12, atol=1e-12
    )


@given(lq=st.integers(1, 5), extra=st.integers(0, 4), p_max=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_attention_matches_the_papers_equations_anywhere(device, lq, extra, p_max, seed):
    q, k, v, table = tensors(1, 2, 2, lq, lq + extra, 4, p_max, device=device, seed=seed)
    q = q * 3  # gates across (0, 1), not only near 1/2
    for causal in (True, False):
        expected = cope_ref(q, k, v, table, causal=causal, scale=0.7)
        torch.testing.assert_close(cope_attention(q, k, v, table, causal, scale=0.7), expected, rtol=1e-11, atol=1e-12)


def test_float32_matches_the_float64_equations(device, tol32):
    q, k, v, table = tensors(2, 2, 2, 4, 7, 8, 6, device=device, dtype=torch.float32, seed=3)
    out = cope_attention(q, k, v, table)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), cope_ref(q.double(), k.double(), v.double(), table.double()), **tol32)


def test_gradients_match_finite_differences(device):
    """The position is differentiable in the gates (through the interpolation weight p - ⌊p⌋),
    and the logits in q, k and the table: autograd agrees with finite differences."""
    q, k, v, table = tensors(1, 2, 1, 3, 4, 2, 4, device=device, seed=5)
    args = [t.requires_grad_() for t in (q, k, v, table)]
    assert torch.autograd.gradcheck(lambda *a: cope_attention(*a), args)
    cope_attention(*args).sum().backward()
    assert table.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


# ---------------------------------------------------------------- (2) properties


@given(b=st.integers(1, 2), lq=st.integers(1, 6), extra=st.integers(0, 4))
def test_gates_of_one_count_tokens(device, b, lq, extra):
    """All gates 1: p_ij = i - j + 1 for the keys up to the query (the token-count relative position
    of §3), 0 for the later ones; the query's own key is at 1."""
    lk = lq + extra
    p = contextual_positions(causal_ones(b, 3, lq, lk, device), position_ids=None)
    rows = torch.arange(lk - lq, lk, device=device)[:, None]
    keys = torch.arange(lk, device=device)[None, :]
    expected = torch.where(keys <= rows, rows - keys + 1, 0).to(F64).expand(b, 3, lq, lk)
    assert torch.equal(p, expected)


@pytest.mark.parametrize("p_max", [2, 20])
def test_saturated_gates_make_cope_a_relative_position_table(device, p_max):
    """With q·k/√d huge for every pair every gate is 1 in float64, and CoPE is the relative key
    embedding softmax_j((q_i·k_j + q_i·e[min(i - j + 1, p_max)])/√d) v (§3)."""
    b, h, lq, lk, d = 1, 2, 4, 6, 4
    gen = torch.Generator().manual_seed(7)
    direction = torch.ones(d, dtype=F64)
    q = (20 * direction + torch.randn(b, h, lq, d, generator=gen, dtype=F64)).to(device)
    k = (20 * direction + torch.randn(b, h, lk, d, generator=gen, dtype=F64)).to(device)
    v = torch.randn(b, h, lk, d, generator=gen, dtype=F64).to(device)
    table = torch.randn(p_max + 1, d, generator=gen, dtype=F64).to(device)
    assert (q @ k.transpose(-1, -2)).min() / math.sqrt(d) > 40  # σ(40) rounds to 1 in float64
    rows = torch.arange(lk - lq, lk, device=device)[:, None]
    distance = rows - torch.arange(lk, device=device)[None, :]
    index = (distance + 1).clamp(0, p_max)
    logits = (q @ k.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", q, table[index])) / math.sqrt(d)
    expected = logits.masked_fill(distance < 0, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(cope_attention(q, k, v, table), expected, rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**31), lq=st.integers(1, 6), extra=st.integers(0, 4), causal=st.booleans())
def test_positions_decrease_away_from_the_query(device, seed, lq, extra, causal):
    """For keys up to the query, p_ij is non-increasing in j, at most i - j + 1 (each gate is at
    most 1), and the query's own key is at its own gate; the first key counts every gate."""
    lk = lq + extra
    gen = torch.Generator().manual_seed(seed)
    gates = torch.rand(2, 2, lq, lk, generator=gen, dtype=F64).to(device)
    visible = causal_ones(2, 2, lq, lk, device) if causal else torch.ones_like(gates)
    gates = gates * visible
    p = contextual_positions(gates)
    rows = torch.arange(lk - lq, lk, device=device)
    for i, row in enumerate(rows.tolist()):
        before = p[:, :, i, : row + 1]
        assert (before[..., :-1] >= before[..., 1:]).all()
        assert (before <= torch.arange(row + 1, 0, -1, device=device, dtype=F64) + 1e-12).all()
        torch.testing.assert_close(before[..., -1], gates[:, :, i, row], rtol=0, atol=0)
        torch.testing.assert_close(before[..., 0], gates[:, :, i, : row + 1].sum(-1), rtol=1e-14, atol=1e-14)
        assert (p[:, :, i, row + 1 :] == 0).all()  # after the query: the empty sum


@given(values=st.lists(st.floats(-5, 5), min_size=2, max_size=8), fraction=st.floats(0, 1))
def test_interpolation_is_exact_at_integers_and_linear_between(device, values, fraction):
    table = torch.tensor(values, dtype=F64, device=device)[None]
    n = table.shape[-1]
    integers = torch.arange(n, dtype=F64, device=device)[None]
    assert torch.equal(interpolate(table, integers), table)  # interpolation at p = ⌊p⌋ = ⌈p⌉
    between = (torch.arange(n - 1, dtype=F64, device=device) + fraction)[None]
    expected = (1 - fraction) * table[:, :-1] + fraction * table[:, 1:]
    torch.testing.assert_close(interpolate(table, between), expected, rtol=1e-14, atol=1e-14)


def test_interpolated_logits_are_the_logits_of_the_interpolated_embeddings(device):
    """The paper's shortcut: q·e[p] interpolated from the integer logits q·e[0 … p_max] equals q
    dotted with the interpolated vector e[p] (eq. 5 is linear in the table)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(5, 8, generator=gen, dtype=F64).to(device)
    table = torch.randn(7, 8, generator=gen, dtype=F64).to(device)
    p = (torch.rand(5, 3, generator=gen, dtype=F64) * 6).to(device)
    lo, hi = p.floor().long(), p.ceil().long()
    e_p = (p - lo)[..., None] * table[hi] + (1 - p + lo)[..., None] * table[lo]
    torch.testing.assert_close(interpolate(q @ table.T, p), torch.einsum("id,ijd->ij", q, e_p), rtol=1e-13, atol=1e-13)


@given(seed=st.integers(0, 2**31), shift=st.integers(0, 1000), stretch=st.integers(1, 9))
def test_only_the_order_of_the_position_ids_matters(device, seed, shift, stretch):
    """CoPE counts tokens, not ids: an increasing relabelling of every position (shift, stretch,
    gaps) leaves the attention unchanged; reversing the key order changes it."""
    q, k, v, table = tensors(2, 2, 2, 3, 6, 4, 8, device=device, seed=seed)
    default = cope_attention(q, k, v, table)
    ids = shift + stretch * torch.arange(6, device=device) + torch.arange(6, device=device) ** 2
    relabelled = cope_attention(q, k, v, table, position_ids=ids[3:], key_position_ids=ids)
    torch.testing.assert_close(relabelled, default, rtol=1e-13, atol=1e-13)
    reversed_ids = cope_attention(q, k, v, table, position_ids=ids[3:], key_position_ids=ids.flip(0))
    assert (reversed_ids - default).abs().max() > 1e-6


def test_padding_and_the_window_are_not_counted(device):
    """Keys a query does not see have gate 0: a left-padded row equals the row alone, and a sliding
    window W equals attention over the last W keys alone, at their own positions."""
    q, k, v, table = tensors(1, 2, 2, 3, 7, 4, 8, device=device, seed=9)
    alone = cope_attention(q, k[:, :, 2:], v[:, :, 2:], table, key_position_ids=torch.arange(5, device=device))
    key_mask = torch.tensor([[False, False, True, True, True, True, True]], device=device)
    junk = torch.arange(7, device=device)  # the padding keys' ids do not matter either
    padded = cope_attention(q, k, v, table, key_mask=key_mask, key_position_ids=junk.clamp(min=2) - 2)
    torch.testing.assert_close(padded, alone, rtol=1e-13, atol=1e-13)
    windowed = cope_attention(q, k, v, table, window=3)
    for i in range(3):
        row = 4 + i
        one = cope_attention(
            q[:, :, i : i + 1],
            k[:, :, row - 2 : row + 1],
            v[:, :, row - 2 : row + 1],
            table,
            position_ids=torch.tensor([row], device=device),
            key_position_ids=torch.arange(row - 2, row + 1, device=device),
        )
        torch.testing.assert_close(windowed[:, :, i : i + 1], one, rtol=1e-13, atol=1e-13)


def test_positions_of_tied_ids_count_all_of_them(device):
    """Keys at the same id are all between each other and the query (hand-computed: keys at
    0, 2, 2, 5 with gates 1/2, 1/4, 3/4, 1 for a query at 5)."""
    gates = torch.tensor([0.5, 0.25, 0.75, 1.0], dtype=F64, device=device).view(1, 1, 1, 4)
    p = contextual_positions(
        gates, position_ids=torch.tensor([5], device=device), key_position_ids=torch.tensor([0, 2, 2, 5], device=device)
    )
    assert p.flatten().tolist() == [2.5, 2.0, 2.0, 1.0]
    assert contextual_positions(gates, max_position=1.5).flatten().tolist() == [1.5, 1.5, 1.5, 1.0]


# ---------------------------------------------------------------- (3) snapshots


def snapshot_inputs(device, p_max):
    """q·k = 0 everywhere (every gate σ(0) = 1/2), q_i = (0, 1), e[p] = (0, p²), one-hot values."""
    q = torch.tensor([0.0, 1.0], dtype=F64, device=device).expand(1, 1, 3, 2)
    k = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]], dtype=F64, device=device)[None, None]
    table = torch.tensor([[0.0, float(p * p)] for p in range(p_max + 1)], dtype=F64, device=device)
    return q, k, torch.eye(3, dtype=F64, device=device)[None, None], table


def test_snapshot_weights(device):
    """Query 2: positions 3/2, 1, 1/2, so logits e[3/2] = (1 + 4)/2, 1, (0 + 1)/2 = 2.5, 1, 0.5 and
    weights softmax(2.5, 1, 0.5); query 1: positions 1, 1/2, weights softmax(1, 0.5) (10 decimals)."""
    q, k, v, table = snapshot_inputs(device, p_max=3)
    assert contextual_positions(
        torch.full((1, 1, 3, 3), 0.5, dtype=F64, device=device) * causal_ones(1, 1, 3, 3, device)
    ).flatten().tolist() == [0.5, 0, 0, 1.0, 0.5, 0, 1.5, 1.0, 0.5]
    out = cope_attention(q, k, v, table, scale=1.0)
    expected = torch.tensor(
        [[1.0, 0.0, 0.0], [0.6224593312, 0.3775406688, 0.0], [0.7361247243, 0.1642516276, 0.0996236481]], dtype=F64
    )
    torch.testing.assert_close(out[0, 0].cpu(), expected, rtol=0, atol=1e-10)


def test_snapshot_clamped(device):
    """p_max = 1: query 2's first key at 3/2 is clamped to 1, logits 1, 1, 0.5 (10 decimals)."""
    q, k, v, table = snapshot_inputs(device, p_max=1)
    out = cope_attention(q, k, v, table, scale=1.0)
    expected = torch.tensor([0.3836517312, 0.3836517312, 0.2326965376], dtype=F64)
    torch.testing.assert_close(out[0, 0, 2].cpu(), expected, rtol=0, atol=1e-10)


def test_snapshot_module():
    enc = CoPE(head_dim=8)
    assert enc.place == "contextual" and enc.name == "cope" and not enc.shared_across_layers
    assert enc.declared_parameters() == {"position_embeddings": ((65, 8), True)}
    assert enc.num_learned_parameters() == 65 * 8
    assert repr(enc) == "CoPE(head_dim=8, cope_max_position=64)"
    assert pebook.encoding_options("cope") == {"cope_max_position": 64}
    model = pebook.TinyLM(11, 16, 2, 4, 32, "cope", cope_max_position=7)
    tables = {id(block.attn.position.position_embeddings) for block in model.blocks}
    assert len(tables) == 2  # one table per layer, as in the reference code
    assert model.blocks[0].attn.position.position_embeddings.shape == (8, 4)


# ---------------------------------------------------------------- (4) bad input


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(head_dim=4, cope_max_position=0), ValueError, r"cope_max_position must be an int >= 1, got 0$"),
        (dict(head_dim=4, cope_max_position=2.5), TypeError, r"cope_max_position must be an int, got 2.5"),
        (dict(head_dim=0), ValueError, r"head_dim must be an int >= 1, got 0$"),
    ],
)
def test_module_rejects_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        CoPE(**kwargs)


def test_attention_rejects_bad_arguments(device):
    q, k, v, table = tensors(1, 2, 2, 3, 4, 4, 3, device=device)
    with pytest.raises(
        ValueError, match=r"position_embeddings must have shape \(p_max \+ 1, head_dim=4\), got \(4, 3\)"
    ):
        cope_attention(q, k, v, table[:, :3])
    with pytest.raises(TypeError, match=r"position_embeddings has dtype torch.float32 but q has dtype torch.float64"):
        cope_attention(q, k, v, table.float())
    with pytest.raises(TypeError, match=r"causal must be True or False, got 1 of type int"):
        cope_attention(q, k, v, table, 1)
    with pytest.raises(ValueError, match=r"window=2 needs causal attention, got causal=False"):
        cope_attention(q, k, v, table, False, window=2)
    with pytest.raises(ValueError, match=r"window must be an int >= 1, got 0$"):
        cope_attention(q, k, v, table, window=0)
    with pytest.raises(ValueError, match=r"causal attention needs q_len <= k_len"):
        cope_attention(q, k[:, :, :2], v[:, :, :2], table)


def test_positions_and_interpolation_reject_bad_arguments(device):
    with pytest.raises(ValueError, match=r"gates must have 4 dimensions, got shape \(3, 3\)"):
        contextual_positions(torch.ones(3, 3, dtype=F64, device=device))
    values = torch.zeros(2, 4, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 3\] .* got the range \[0, 3.5\]"):
        interpolate(values, torch.tensor([[0.0, 3.5]] * 2, dtype=F64, device=device))
    with pytest.raises(
        ValueError, match=r"positions must have the leading dimensions \(2,\) of values, got shape \(3, 1\)"
    ):
        interpolate(values, torch.zeros(3, 1, dtype=F64, device=device))
    with pytest.raises(TypeError, match=r"positions must be a floating-point tensor, got dtype torch.int64"):
        interpolate(values, torch.zeros(2, 1, dtype=torch.long, device=device))
