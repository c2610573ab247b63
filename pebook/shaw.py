"""Relative position representations of Shaw, Uszkoreit & Vaswani.

Shaw, Uszkoreit & Vaswani (2018), "Self-Attention with Relative Position Representations",
arXiv:1803.02155, §3.1 (eqs. 3-4) and §3.2 (clipping). Two learned tables ``w^K, w^V`` of ``2k + 1`` vectors each
(shared by all heads) give, for query ``i`` and key ``j``,

    a^K_ij = w^K_clip(j - i, k),   a^V_ij = w^V_clip(j - i, k)                  (§3.2)
    e_ij   = q_i · (k_j + a^K_ij) / sqrt(d)                                       (4)
    z_i    = Σ_j α_ij (v_j + a^V_ij),   α = softmax_j(e)                          (3)

The direct implementation gathers ``a^K`` and ``a^V`` into two ``(L, L, d)`` tensors.
:func:`shaw_attention` never does: since ``a^K_ij`` takes only ``2k + 1`` values,

    q_i · a^K_ij = (Q W_Kᵀ)[i, idx_ij]                     an (L, 2k+1) product, then a gather
    Σ_j α_ij a^V_ij = Σ_r (Σ_{j: idx_ij = r} α_ij) w^V_r   sum the weights per offset, then (L, 2k+1) @ (2k+1, d)

so the extra memory is ``O(L·(2k+1) + L²)`` per head instead of the ``O(L²·d)`` of the
materialised tensors (which Shaw et al. §3.3 share across heads and the batch, so ``O(L²·d)``
per layer). That is the default path (``attn_implementation="sdpa"``). The opt-in fast path
(``attn_implementation="flex_attention"``, the name of the fast path in pebook; here it is not
FlexAttention) needs no ``(L, L)`` tensor: a band of the ``2k - 1`` offsets nearest the diagonal
plus a fused attention kernel for the clipped ends, ``O(L·k)`` extra memory (the section "the fast
path" below).
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_attention_inputs, check_float_tensor, check_int, check_same_placement
from .encoding import PositionalEncoding, check_attn_implementation
from .masking import (
    causal_mask,
    check_attention_mask,
    check_causal_lengths,
    default_positions,
    padded_causal_mask,
    storage_causal_mask,
)

__all__ = ["relative_position_index", "reachable_offsets", "shaw_attention", "shaw_attention_naive", "ShawPE"]


def relative_position_index(q_len: int, k_len: int, max_distance: int, offset: int = 0, *, device=None) -> torch.Tensor:
    """Row index ``clip(j - i, -k, k) + k`` into a ``(2k + 1, ·)`` table, shape ``(q_len, k_len)``.

    Query ``i`` is at absolute position ``offset + i``, key ``j`` at position ``j``; ``k`` is
    ``max_distance``. Offsets beyond ``±k`` share the end rows ``0`` and ``2k``.
    """
    q_len = check_int("q_len", q_len, minimum=0)
    k_len = check_int("k_len", k_len, minimum=0)
    max_distance = check_int("max_distance", max_distance, minimum=0)
    offset = check_int("offset", offset, minimum=0)
    query_pos = torch.arange(offset, offset + q_len, device=device)
    key_pos = torch.arange(k_len, device=device)
    relative = key_pos[None, :] - query_pos[:, None]
    return relative.clamp_(-max_distance, max_distance).add_(max_distance)  # in place: one (q_len, k_len) tensor


def reachable_offsets(
    q_len: int, k_len: int, max_distance: int, causal: bool = True, offset: int = 0, *, device=None
) -> torch.Tensor:
    """Which rows of the ``(2k + 1, d)`` tables ``w^K, w^V`` a ``q_len × k_len`` attention can use.

    Returns a boolean tensor of shape ``(2 * max_distance + 1,)``; entry ``r`` is True when at
    least one visible (query, key) pair has ``clip(j - i, -k, k) + k == r`` (Shaw, Uszkoreit &
    Vaswani 2018, arXiv:1803.02155, §3.2). Query ``i`` sits at position ``offset + i`` and key
    ``j`` at ``j``; with ``causal`` only keys ``j <= offset + i`` are visible. A row that is not
    reachable receives a gradient of exactly zero from that attention: training at these lengths
    leaves it at its initial value (up to weight decay, which only shrinks it).
    """
    q_len = check_int("q_len", q_len, minimum=0)
    k_len = check_int("k_len", k_len, minimum=0)
    max_distance = check_int("max_distance", max_distance, minimum=0)
    offset = check_int("offset", offset, minimum=0)
    index = relative_position_index(q_len, k_len, max_distance, offset, device=device)
    if causal:
        index = index[causal_mask(q_len, k_len, offset, device=device)]
    reachable = torch.zeros(2 * max_distance + 1, dtype=torch.bool, device=device)
    reachable[index.flatten()] = True
    return reachable


def _check_shaw_inputs(q, k, v, rel_k, rel_v, max_distance, position_ids, key_position_ids):
    b, h, lq, lk, d = check_attention_inputs(q, k, v)
    max_distance = check_int("max_distance", max_distance, minimum=0)
    n_rel = 2 * max_distance + 1
    for name, table in (("rel_k", rel_k), ("rel_v", rel_v)):
        check_float_tensor(name, table, ndim=2)
        if tuple(table.shape) != (n_rel, d):
            raise ValueError(
                f"{name} must have shape (2*max_distance+1, head_dim) = ({n_rel}, {d}) for "
                f"max_distance={max_distance}, got {tuple(table.shape)}"
            )
        if table.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {table.dtype} but q has dtype {q.dtype}; they must match")
    check_same_placement(q=q, rel_k=rel_k, rel_v=rel_v)
    q_pos, k_pos = default_positions(b, lq, lk, q.device, position_ids, key_position_ids)
    return max_distance, q_pos, k_pos


def _index(q_pos: torch.Tensor, k_pos: torch.Tensor, max_distance: int) -> torch.Tensor:
    """Row ``clip(j - i, -k, k) + k`` for every (query, key) pair: shape ``(batch, q_len, k_len)``."""
    relative = k_pos[:, None, :] - q_pos[:, :, None]
    return relative.clamp_(-max_distance, max_distance).add_(max_distance)


def _visible(q_len, k_len, causal, key_mask, device):
    """The mask of :func:`_shaw_core`: storage-order causal, padding keys hidden, or ``None``."""
    if key_mask is not None:
        return padded_causal_mask(key_mask, q_len, causal)
    return storage_causal_mask(q_len, k_len, device) if causal else None


def _expand_kv(q, k, v):
    """Repeat grouped key/value heads so that there is one per query head (GQA, MQA)."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _shaw_core(q, k, v, rel_k, rel_v, index, mask, scale):
    """Eqs. (3)-(4) in ``O(L·(2k+1) + L²)`` extra memory; ``index`` from :func:`_index`."""
    k, v = _expand_kv(q, k, v)
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    index = index[:, None].expand(b, h, lq, lk)
    logits = q @ k.transpose(-1, -2)  # content term q_i · k_j
    logits += (q @ rel_k.T).gather(-1, index)  # q_i · a^K_ij from an (L, 2k+1) product
    logits *= scale
    if mask is not None:
        logits.masked_fill_(~mask, float("-inf"))
    weights = logits.softmax(dim=-1)
    weight_per_offset = weights.new_zeros(b, h, lq, rel_v.shape[0]).scatter_add_(-1, index, weights)
    return weights @ v + weight_per_offset @ rel_v


# -- the fast path (attn_implementation="flex_attention"): a band plus fused attention ------------
#
# With the clipping of §3.2 every key at j - i <= -k shares one row, a^K_ij = w^K_-k and
# a^V_ij = w^V_-k (and, without the causal mask, every key at j - i >= k shares w^·_+k). Over
# those keys Shaw attention is plain attention with shifted keys and values,
#     e_ij = q_i · (k_j + w^K_-k) / √d,    z_i ∝ Σ_j exp(e_ij) (v_j + w^V_-k),
# which one fused kernel computes together with its log-sum-exp. Only the band -k < j - i < k
# needs a row per offset: its logits q_i · k_j are a banded product, computed block by block as
# dense (T, T + W - 1) products whose W diagonals are read through a strided view (the
# "skewing" of Huang et al. 2018, Music Transformer, arXiv:1809.04281, §3.4.1), plus q_i · w^K_r,
# a slice of the (L, 2k + 1) product Q W^Kᵀ. The parts are merged by their log-sum-exps (the
# split-key softmax of FlashAttention, Dao et al. 2022, arXiv:2205.14135, §3.1); the band's
# weights give the value term of eq. (3). Extra memory O(L·k) per head, no (L, L) tensor.
# The backward pass is the same split: the fused kernel's backward for the far keys, fed the
# merged output and log-sum-exp, and autograd through the band.

_MIN_BLOCK = 64  # queries per dense block of the banded product: max(this, band width), so O(L·k) memory
_FAST_DTYPES = (torch.float32, torch.float64)


def _prefix_mask(lq: int, lk: int, shift: int, like: torch.Tensor) -> torch.Tensor:
    """Additive ``(lq, lk)`` mask: query ``i`` sees keys ``j <= i + shift``."""
    keys = torch.arange(lk, device=like.device)
    visible = keys[None, :] <= torch.arange(shift, shift + lq, device=like.device)[:, None]
    return torch.zeros(lq, lk, dtype=like.dtype, device=like.device).masked_fill_(~visible, float("-inf"))


def _prefix_attention_cpu(q, k, v, scale, shift):
    """Softmax attention where query ``i`` sees keys ``j <= i + shift``: ``(out, logsumexp)``."""
    if shift == 0 and q.shape[2] == k.shape[2]:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    mask = _prefix_mask(q.shape[2], k.shape[2], shift, q)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)


def _prefix_attention_cpu_backward(grad, q, k, v, out, lse, scale, shift):
    """Gradients (q, k, v) of these keys' share of a softmax whose output and log-sum-exp are ``out, lse``."""
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if shift == 0 and q.shape[2] == k.shape[2]:
        return backward(grad, q, k, v, out, lse, 0.0, True, scale=scale)
    mask = _prefix_mask(q.shape[2], k.shape[2], shift, q)
    return backward(grad, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)


#: device type -> (forward, backward) of a fused prefix attention that returns its log-sum-exp
_PREFIX_ATTENTION = {"cpu": (_prefix_attention_cpu, _prefix_attention_cpu_backward)}


def _windows(x, first, width, block, n_blocks):
    """``(b, h, n_blocks, block + width - 1, d)`` overlapping views of ``x`` (zero-padded): window
    ``n`` holds rows ``first + n·block …`` (row indices below 0 or past the end are zeros)."""
    span = block + width - 1
    length = x.shape[2]
    pad_left = max(0, -first)
    pad_right = max(0, first + (n_blocks - 1) * block + span - length)
    padded = torch.nn.functional.pad(x, (0, 0, pad_left, pad_right))
    start = first + pad_left
    return padded[:, :, start : start + (n_blocks - 1) * block + span].unfold(2, span, block).transpose(-1, -2)


def _band_logits(q, k, first, width, block):
    """``S[..., i, w] = q_i · k_{first + i + w}`` (0 where that key does not exist).

    One dense ``(block, block + width - 1)`` product per block of queries; its diagonals
    ``dense[t, t + w]`` are the rows of a strided view with row stride ``block + width`` (the skew).
    """
    b, h, lq, d = q.shape
    n_blocks = -(-lq // block)
    span = block + width - 1
    queries = torch.nn.functional.pad(q, (0, 0, 0, n_blocks * block - lq)).view(b, h, n_blocks, block, d)
    dense = queries @ _windows(k, first, width, block, n_blocks).transpose(-1, -2)
    band = dense.as_strided((b, h, n_blocks, block, width), (*dense.stride()[:3], span + 1, 1))
    return band.reshape(b, h, n_blocks * block, width)[:, :, :lq]


def _band_values(weights, v, first, width, block):
    """``Σ_w weights[..., i, w] · v_{first + i + w}``, the transpose of :func:`_band_logits`.

    The inverse skew: rows of ``width`` padded with ``block`` zeros and read ``block + width - 1``
    at a time put ``weights[t, w]`` at ``dense[t, t + w]``.
    """
    b, h, lq, _ = weights.shape
    n_blocks = -(-lq // block)
    span = block + width - 1
    padded = torch.nn.functional.pad(weights, (0, block, 0, n_blocks * block - lq))
    dense = padded.view(b, h, n_blocks, block * (span + 1))[..., : block * span].view(b, h, n_blocks, block, span)
    return (dense @ _windows(v, first, width, block, n_blocks)).reshape(b, h, n_blocks * block, -1)[:, :, :lq]


def _band(q, k, v, rel_k, rel_v, max_distance, causal, scale):
    """Scaled logits of the band -k < j - i < k (only j <= i when causal) with their key term,
    and ``weights -> Σ_j weights_ij (v_j + a^V_ij)`` over it. Queries are the last of the keys."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    width = max_distance if causal else 2 * max_distance - 1  # band columns: rows 1 … width of the tables
    first = lk - lq + 1 - max_distance  # key of column 0 for query 0
    block = min(lq, max(_MIN_BLOCK, width))
    q = q * scale
    logits = _band_logits(q, k, first, width, block).flatten(0, 1)  # q_i · k_j
    logits = torch.baddbmm(logits, q.flatten(0, 1), rel_k[1 : 1 + width].T.expand(b * h, d, width))  # + q_i · a^K_ij
    logits = logits.view(b, h, lq, width)
    before = min(lq, max(0, -first))  # queries whose band starts before key 0
    after = max(before, min(lq, lk - first - width + 1))  # … and those whose band ends past the last key
    for rows in (slice(0, before), slice(after, lq)):
        if rows.stop > rows.start:
            key = torch.arange(first + rows.start, first + rows.stop, device=q.device)[:, None]
            key = key + torch.arange(width, device=q.device)
            logits[:, :, rows] = logits[:, :, rows].masked_fill((key < 0) | (key >= lk), float("-inf"))

    def values(weights):
        return _band_values(weights, v, first, width, block) + weights @ rel_v[1 : 1 + width]  # eq. (3)

    return logits, values


def _far_parts(q, k, v, rel_k, rel_v, max_distance, causal):
    """The clipped ends as plain attention over shifted keys and values.

    Each part: ``(rows, flip, shift, queries, keys, values, table_row)``. Left end (keys
    ``j - i <= -k``, table row 0): the queries of ``rows``, query ``t`` of them sees keys ``j <= t +
    shift`` of ``keys[:k_len - k]``. Right end (``j - i >= k``, row ``2k``, not causal): the left
    end of the sequences reversed (``flip``: the part's queries and keys run backwards).
    """
    lq, lk, kk = q.shape[2], k.shape[2], max_distance
    parts = []
    for flip, row in ((False, 0),) if causal else ((False, 0), (True, 2 * kk)):
        offset = 0 if flip else lk - lq  # position of the part's first query among the keys
        first = max(0, kk - offset)  # the first query with a key k or more behind it
        if lk <= kk or first >= lq:
            continue
        rows = slice(0, lq - first) if flip else slice(first, lq)
        keys = slice(kk, lk) if flip else slice(0, lk - kk)
        part = [_part_order(x[:, :, index], flip) for x, index in ((q, rows), (k, keys), (v, keys))]
        parts.append((rows, keys, flip, offset + first - kk, part[0], part[1] + rel_k[row], part[2] + rel_v[row], row))
    return parts


def _part_order(x, flip):
    return x.flip(2) if flip else x


class _ShawBanded(torch.autograd.Function):
    """Eqs. (3)-(4) as band + clipped ends (see above); queries are the last ``q_len`` keys."""

    @staticmethod
    def forward(ctx, q, k, v, rel_k, rel_v, max_distance, causal, scale):
        prefix_attention = _PREFIX_ATTENTION[q.device.type][0]
        logits, values = _band(q, k, v, rel_k, rel_v, max_distance, causal, scale)
        top = logits.amax(-1, keepdim=True)  # finite: every query sees its own key
        weights = logits.sub_(top).exp_()
        lse = weights.sum(-1).log_().add_(top[..., 0])
        far = []
        for rows, _, flip, shift, qs, ks, vs, _ in _far_parts(q, k, v, rel_k, rel_v, max_distance, causal):
            out_part, lse_part = prefix_attention(qs, ks, vs, scale, shift)
            far.append((rows, _part_order(out_part, flip), _part_order(lse_part, flip)))
            lse[:, :, rows] = torch.logaddexp(lse[:, :, rows], far[-1][2])
        out = values(weights.mul_(torch.exp(top[..., 0] - lse)[..., None]))
        for rows, out_part, lse_part in far:
            out[:, :, rows] += torch.exp(lse_part - lse[:, :, rows])[..., None] * out_part
        ctx.save_for_backward(q, k, v, rel_k, rel_v, out, lse)
        ctx.options = (max_distance, causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, rel_k, rel_v, out, lse = ctx.saved_tensors
        max_distance, causal, scale = ctx.options
        prefix_backward = _PREFIX_ATTENTION[q.device.type][1]
        grad = grad.contiguous()
        inputs = [x.detach().requires_grad_() for x in (q, k, v, rel_k, rel_v)]
        with torch.enable_grad():  # the band, by autograd: dL/dS = P (dP - D), D_i = grad_i · out_i
            logits, values = _band(*inputs, max_distance, causal, scale)
            weights = torch.exp(logits - lse[..., None])
            delta = (grad * out).sum(-1)
            surrogate = (grad * values(weights)).sum() - (weights.sum(-1) * delta).sum()
            dq, dk, dv, drel_k, drel_v = torch.autograd.grad(surrogate, inputs)
        for rows, keys, flip, shift, qs, ks, vs, row in _far_parts(q, k, v, rel_k, rel_v, max_distance, causal):
            grad_part, out_part, lse_part = (_part_order(x[:, :, rows], flip).contiguous() for x in (grad, out, lse))
            dq_part, dk_part, dv_part = prefix_backward(grad_part, qs, ks, vs, out_part, lse_part, scale, shift)
            dq[:, :, rows] += _part_order(dq_part, flip)
            dk[:, :, keys] += _part_order(dk_part, flip)
            dv[:, :, keys] += _part_order(dv_part, flip)
            drel_k[row] += dk_part.sum((0, 1, 2))
            drel_v[row] += dv_part.sum((0, 1, 2))
        return dq, dk, dv, drel_k, drel_v, None, None, None


def _fast_path_refusal(q, k, max_distance, q_pos, k_pos, key_mask) -> str | None:
    """Why :class:`_ShawBanded` cannot compute this attention (then the exact path does), or ``None``."""
    if q.device.type not in _PREFIX_ATTENTION:
        return f"no fused attention with a log-sum-exp on {q.device.type}"
    if q.dtype not in _FAST_DTYPES:
        return f"dtype {q.dtype} (the fast path takes {', '.join(map(str, _FAST_DTYPES))})"
    lq, lk = q.shape[2], k.shape[2]
    if max_distance == 0 or lq == 0 or lq > lk:
        return "max_distance 0, no queries, or more queries than keys"
    if key_mask is not None and not bool(key_mask.all()):
        return "padding keys (key_mask)"
    consecutive = bool((k_pos[:, 1:] - k_pos[:, :-1] == 1).all()) and torch.equal(q_pos, k_pos[:, lk - lq :])
    if not consecutive:
        return "positions that are not consecutive in storage order (the queries the last keys)"
    return None


def _shaw_exact(q, k, v, rel_k, rel_v, max_distance, q_pos, k_pos, *, causal, scale, key_mask):
    """The default path: logits and weights as full ``(q_len, k_len)`` tensors (:func:`_shaw_core`)."""
    mask = _visible(q.shape[2], k.shape[2], causal, key_mask, q.device)
    return _shaw_core(q, k, v, rel_k, rel_v, _index(q_pos, k_pos, max_distance), mask, scale)


def _shaw_fast(q, k, v, rel_k, rel_v, max_distance, q_pos, k_pos, *, causal, scale, key_mask):
    """The band + clipped ends path where it applies (:func:`_fast_path_refusal`), else the exact one."""
    if _fast_path_refusal(q, k, max_distance, q_pos, k_pos, key_mask) is not None:
        return _shaw_exact(
            q, k, v, rel_k, rel_v, max_distance, q_pos, k_pos, causal=causal, scale=scale, key_mask=key_mask
        )
    k, v = _expand_kv(q, k, v)
    return _ShawBanded.apply(q, k, v, rel_k, rel_v, max_distance, causal, scale)


#: attn_implementation -> Shaw attention; "sdpa" is the exact path every experiment ran
SHAW_IMPLEMENTATIONS = {"sdpa": _shaw_exact, "flex_attention": _shaw_fast}


def _check_implementation(attn_implementation):
    """The Shaw attention of an ``attn_implementation`` (one of :data:`pebook.encoding.ATTENTION_IMPLEMENTATIONS`)."""
    return SHAW_IMPLEMENTATIONS[check_attn_implementation(attn_implementation)]


def shaw_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    max_distance: int,
    causal: bool = True,
    *,
    position_ids: torch.Tensor | None = None,
    key_position_ids: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    attn_implementation: str = "sdpa",
) -> torch.Tensor:
    """Attention with Shaw et al.'s key and value terms (§3.1-3.2), in ``O(L·(2k+1) + L²)`` memory.

    ``q``: ``(batch, heads, q_len, head_dim)``; ``k``, ``v``: ``(batch, kv_heads, k_len,
    head_dim)`` with ``kv_heads`` dividing ``heads``; ``rel_k``, ``rel_v``: ``(2*max_distance + 1,
    head_dim)``. ``position_ids`` / ``key_position_ids`` (``(q_len,)`` or ``(batch, q_len)``, and
    likewise for keys) place queries and keys; by default the keys are at ``0 … k_len - 1`` and
    the queries are the last ``q_len`` of them. The causal mask follows that storage order.
    ``scale`` defaults to ``1/√head_dim``. ``key_mask`` ``(batch, k_len)`` (bool, or ints 1 for a
    token and 0 for padding, as ``transformers``' ``attention_mask``) hides padding keys from every
    query. Returns ``(batch, heads, q_len, head_dim)``.

    ``attn_implementation``: ``"sdpa"`` (default) materialises the ``(q_len, k_len)`` logits;
    ``"flex_attention"`` is the fast path of the band + clipped ends (module docstring), extra
    memory ``O(L·k)`` (plus a ``(q_len, k_len)`` mask when ``q_len < k_len``: decoding), equal up
    to float rounding, differentiable. It applies on the CPU in
    float32/float64 when the positions are consecutive in storage order (the queries the last
    keys), ``0 < max_distance``, and no key is padding; other calls take the ``"sdpa"`` path.
    """
    implementation = _check_implementation(attn_implementation)
    max_distance, q_pos, k_pos = _check_shaw_inputs(q, k, v, rel_k, rel_v, max_distance, position_ids, key_position_ids)
    check_causal_lengths(causal, q.shape[2], k.shape[2])
    if key_mask is not None:
        key_mask = check_attention_mask(
            "key_mask",
            key_mask,
            q.shape[0],
            k.shape[2],
            q.device,
            what="k_len",
            left_padded=False,
            values=key_mask.device.type == "cpu",
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return implementation(
        q, k, v, rel_k, rel_v, max_distance, q_pos, k_pos, causal=causal, scale=scale, key_mask=key_mask
    )


def shaw_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    max_distance: int,
    causal: bool = True,
    *,
    position_ids: torch.Tensor | None = None,
    key_position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shaw et al.'s §3.1-3.2 written directly, materialising ``(q_len, k_len, head_dim)`` tensors.

    For teaching and benchmarks only: its memory grows as ``L²·d``. Use :func:`shaw_attention`.
    """
    max_distance, q_pos, k_pos = _check_shaw_inputs(q, k, v, rel_k, rel_v, max_distance, position_ids, key_position_ids)
    check_causal_lengths(causal, q.shape[2], k.shape[2])
    k, v = _expand_kv(q, k, v)
    index = _index(q_pos, k_pos, max_distance)
    a_k, a_v = rel_k[index], rel_v[index]  # (batch, lq, lk, d) each
    logits = (q @ k.transpose(-1, -2) + torch.einsum("bhid,bijd->bhij", q, a_k)) * q.shape[-1] ** -0.5
    if causal:
        logits = logits.masked_fill(~storage_causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    weights = logits.softmax(dim=-1)
    return weights @ v + torch.einsum("bhij,bijd->bhid", weights, a_v)


class ShawPE(PositionalEncoding):
    """Registry entry ``"shaw"``: learned key and value terms ``w^K``, ``w^V`` of ``2k + 1`` rows.

    Option ``max_distance`` (the clipping distance ``k``, 16). One pair of tables per layer,
    shared by the heads (Shaw et al. §3.3), initialised from ``N(0, 1/head_dim)``.
    """

    name = "shaw"
    place = "key_value"
    example_options = {"max_distance": 3}

    def __init__(self, *, head_dim: int, max_distance: int = 16):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        self.max_distance = check_int("max_distance", max_distance, minimum=0)
        scale = self.head_dim**-0.5
        self.rel_k = nn.Parameter(torch.randn(2 * self.max_distance + 1, self.head_dim) * scale)
        self.rel_v = nn.Parameter(torch.randn(2 * self.max_distance + 1, self.head_dim) * scale)

    def declared_parameters(self):
        shape = (2 * self.max_distance + 1, self.head_dim)
        return {"rel_k": (shape, True), "rel_v": (shape, True)}

    def attend(self, q, k, v, q_pos, k_pos, *, causal, scale, bias=None, key_mask=None, attn_implementation="sdpa"):
        """See :meth:`PositionalEncoding.attend`; ``attn_implementation`` as in :func:`shaw_attention`."""
        implementation = _check_implementation(attn_implementation)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return implementation(
            q,
            k,
            v,
            self.rel_k,
            self.rel_v,
            self.max_distance,
            q_pos,
            k_pos,
            causal=causal,
            scale=scale,
            key_mask=key_mask,
        )

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_distance={self.max_distance}"
