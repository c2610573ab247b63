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

so the extra memory per head is ``O(L·(2k+1) + L²)`` instead of ``O(L²·d)``.
"""

from __future__ import annotations

import torch

from ._checks import check_attention_inputs, check_float_tensor, check_int, check_same_placement
from .masking import causal_mask

__all__ = ["relative_position_index", "reachable_offsets", "shaw_attention", "shaw_attention_naive"]


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
    q_len: int, k_len: int, max_distance: int, causal: bool = True, offset: int | None = None, *, device=None
) -> torch.Tensor:
    """Which rows of the ``(2k + 1, d)`` tables ``w^K, w^V`` a ``q_len × k_len`` attention can use.

    Returns a boolean tensor of shape ``(2 * max_distance + 1,)``; entry ``r`` is True when at
    least one visible (query, key) pair has ``clip(j - i, -k, k) + k == r`` (Shaw, Uszkoreit &
    Vaswani 2018, arXiv:1803.02155, §3.2). Positions follow :func:`shaw_attention`: query ``i``
    at ``offset + i`` (``offset=None``: ``k_len - q_len``), key ``j`` at ``j``; with ``causal``
    only keys ``j <= offset + i`` are visible. A row that is not reachable receives a gradient
    of exactly zero from that attention: training at these lengths leaves it at its initial
    value (up to weight decay, which only shrinks it).
    """
    q_len = check_int("q_len", q_len, minimum=0)
    k_len = check_int("k_len", k_len, minimum=0)
    max_distance = check_int("max_distance", max_distance, minimum=0)
    if offset is None:
        offset = k_len - q_len
        if offset < 0:
            raise ValueError(
                f"with offset=None the queries are the last q_len keys, so q_len={q_len} must be <= k_len={k_len}"
            )
    offset = check_int("offset", offset, minimum=0)
    index = relative_position_index(q_len, k_len, max_distance, offset, device=device)
    if causal:
        index = index[causal_mask(q_len, k_len, offset, device=device)]
    reachable = torch.zeros(2 * max_distance + 1, dtype=torch.bool, device=device)
    reachable[index.flatten()] = True
    return reachable


def _check_shaw_inputs(q, k, v, rel_k, rel_v, max_distance, offset):
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
    offset = lk - lq if offset is None else check_int("offset", offset, minimum=0)
    if offset < 0:
        raise ValueError(f"with offset=None the queries are the last q_len keys, so q_len={lq} must be <= k_len={lk}")
    return b, h, lq, lk, d, max_distance, offset


def shaw_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    max_distance: int,
    causal: bool = True,
    offset: int | None = None,
    mask_offset: int | None = None,
) -> torch.Tensor:
    """Attention with Shaw et al.'s key and value terms (§3.1-3.2), in ``O(L·(2k+1) + L²)`` memory.

    ``q``: ``(batch, heads, q_len, head_dim)``; ``k``, ``v``: ``(batch, heads, k_len, head_dim)``;
    ``rel_k``, ``rel_v``: ``(2*max_distance + 1, head_dim)``. Query ``i`` is at absolute
    position ``offset + i``; ``offset=None`` means ``k_len - q_len`` (the queries are the last
    positions, as when decoding with a KV cache). ``mask_offset`` (default: ``offset``) places
    the queries for the causal mask only; it differs from ``offset`` only to reproduce a
    position bug. Returns ``(batch, heads, q_len, head_dim)``.
    """
    b, h, lq, lk, d, max_distance, offset = _check_shaw_inputs(q, k, v, rel_k, rel_v, max_distance, offset)
    mask_offset = offset if mask_offset is None else check_int("mask_offset", mask_offset, minimum=0)
    index = relative_position_index(lq, lk, max_distance, offset, device=q.device).expand(b, h, lq, lk)

    logits = q @ k.transpose(-1, -2)  # content term q_i · k_j
    logits += (q @ rel_k.T).gather(-1, index)  # q_i · a^K_ij from an (L, 2k+1) product
    logits *= d**-0.5
    if causal:
        logits.masked_fill_(~causal_mask(lq, lk, mask_offset, device=q.device), float("-inf"))
    weights = logits.softmax(dim=-1)

    weight_per_offset = weights.new_zeros(b, h, lq, 2 * max_distance + 1).scatter_add_(-1, index, weights)
    return weights @ v + weight_per_offset @ rel_v


def shaw_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    max_distance: int,
    causal: bool = True,
    offset: int | None = None,
) -> torch.Tensor:
    """Shaw et al.'s §3.1-3.2 written directly, materialising ``(q_len, k_len, head_dim)`` tensors.

    For teaching and benchmarks only: its memory grows as ``L²·d``. Use :func:`shaw_attention`.
    """
    b, h, lq, lk, d, max_distance, offset = _check_shaw_inputs(q, k, v, rel_k, rel_v, max_distance, offset)
    index = relative_position_index(lq, lk, max_distance, offset, device=q.device)
    a_k, a_v = rel_k[index], rel_v[index]  # (lq, lk, d) each
    logits = (q @ k.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", q, a_k)) * d**-0.5
    if causal:
        logits = logits.masked_fill(~causal_mask(lq, lk, offset, device=q.device), float("-inf"))
    weights = logits.softmax(dim=-1)
    return weights @ v + torch.einsum("bhij,ijd->bhid", weights, a_v)
