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
per layer).
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_attention_inputs, check_float_tensor, check_int, check_same_placement
from .encoding import PositionalEncoding
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
    """
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
    mask = _visible(q.shape[2], k.shape[2], causal, key_mask, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _shaw_core(q, k, v, rel_k, rel_v, _index(q_pos, k_pos, max_distance), mask, scale)


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

    def attend(self, q, k, v, q_pos, k_pos, *, causal, scale, bias=None, key_mask=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        mask = _visible(q.shape[2], k.shape[2], causal, key_mask, q.device)
        index = _index(q_pos, k_pos, self.max_distance)
        return _shaw_core(q, k, v, self.rel_k, self.rel_v, index, mask, scale)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_distance={self.max_distance}"
