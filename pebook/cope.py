"""CoPE: contextual position encoding, positions counted from the content.

Golovneva, Wang, Weston & Sukhbaatar (2024), "Contextual Position Encoding: Learning to Count
What's Important", arXiv:2405.18719, §3. A query decides, key by key, whether a token counts
(a gate), and the position of key ``j`` seen from query ``i`` is the number of counted tokens
from ``j`` to ``i``, a fractional number:

    g_ij = σ(q_iᵀ k_j)
    p_ij = Σ_{t=j}^{i} g_it
    e[p_ij] = (p_ij - ⌊p_ij⌋) e[⌈p_ij⌉] + (1 - p_ij + ⌊p_ij⌋) e[⌊p_ij⌋]
    a_ij = softmax_j(q_iᵀ (k_j + e[p_ij]))

with a learned table ``e[0], …, e[p_max]`` and positions clamped at ``p_max``. With every gate
equal to 1, ``p_ij = i - j + 1`` and CoPE is a relative position embedding (a key term as in
Shaw et al. 2018). The paper computes the attention without the ``(L, L, d)`` tensor of ``e[p_ij]``:
since the interpolation is linear in the table, ``q_iᵀ e[p_ij]`` is the same interpolation of the integer
logits ``z_i[p] = q_iᵀ e[p]``, an ``(L, p_max + 1)`` product followed by two gathers
(:func:`interpolate`).

Conventions of the reference code (github.com/facebookresearch/RAM, ``projects/cope/src/cope/
context_position.py``, ``ContextPosSelfAttn``), followed here:

* the gates use the scaled dot product, ``g_ij = σ(q_iᵀ k_j / √d)``, and gates of keys the query
  does not see (the causal mask, padding) are 0, so they are not counted;
* the ``1/√d`` (pebook's ``scale``) multiplies the whole logit ``q_iᵀ (k_j + e[p_ij])``, as in
  Shaw et al.'s key term; the listing in the paper adds ``q_iᵀ e[p_ij]`` after the scaling, which
  the reference code offers as ``--cope-nodiv``;
* positions are clamped at ``p_max`` (the reference's ``npos - 1``; its default ``npos`` is the
  training length + 1, as position 0 is possible); option ``cope_max_position``;
* one table per layer, shared by the heads (each head has its own gates, from its own q and k).

Two choices are pebook's, because the library's protocol asks questions the paper does not:

* **Which tokens lie between key j and query i** is read from the position ids, like every
  other encoding's positions: ``p_ij = Σ_t g_it`` over the keys ``t`` that query ``i`` sees with
  ``k_pos_j ≤ k_pos_t ≤ q_pos_i`` (tied ids all count). With the default ids (storage order) it is
  the paper's sum exactly, the reference's masked reverse cumulative sum; wrong ids move tokens for CoPE
  as they do for RoPE, and a KV cache decodes as the full forward pass, since the count for a new
  query reads only that query and the cached keys, which are stored unmodified.
* **Without a causal mask** (the paper is causal only) the paper's sum is taken literally: for a key
  after the query the sum ``Σ_{t=j}^{i}`` is empty, so ``p_ij = 0`` and every later key gets
  ``e[0]``. Keys before the query are counted as in the causal case.

Initialisation: the reference starts the table at zero (CoPE then adds nothing until trained);
pebook draws it from ``N(0, 1/head_dim)``, as Shaw's tables, so that a fresh layer depends on order.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_attention_inputs, check_bool, check_float_tensor, check_int, check_same_placement
from .encoding import PositionalEncoding, check_attn_implementation
from .masking import (
    check_attention_mask,
    check_causal_lengths,
    default_positions,
    padded_causal_mask,
    storage_causal_mask,
    window_causal_mask,
)

__all__ = ["contextual_positions", "interpolate", "cope_attention", "CoPE"]


def _count(gates: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The position sum with tokens ordered by their ids: ``p_ij = Σ_{t: k_pos_j ≤ k_pos_t ≤ q_pos_i} g_it``.

    ``gates`` ``(batch, heads, q_len, k_len)``, 0 for hidden keys; positions ``(batch, len)``.
    Sorting the keys by position turns the sum into a reverse cumulative sum (the reference's
    ``flip().cumsum().flip()``, which it is for the default ids), read at the first key of each
    key's position, so that tied positions all count: ``O(L²)``, not the ``O(L³)`` of the sum.
    """
    not_after_query = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    gates = gates * not_after_query
    sorted_pos, order = k_pos.sort(dim=-1, stable=True)
    sorted_gates = gates.gather(-1, order[:, None, None, :].expand_as(gates))
    from_rank = sorted_gates.flip(-1).cumsum(-1).flip(-1)  # Σ over the ranks r' ≥ r
    first_rank = torch.searchsorted(sorted_pos, k_pos.contiguous(), side="left")
    return from_rank.gather(-1, first_rank[:, None, None, :].expand_as(gates))


def _interpolate(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The interpolation of ``e`` on the last dimension of ``values`` (no checks)."""
    floor = positions.floor()
    weight = positions - floor  # differentiable in the positions, hence in the gates
    below = values.gather(-1, floor.long())
    above = values.gather(-1, positions.ceil().long())
    return weight * above + (1 - weight) * below


def contextual_positions(
    gates: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    key_position_ids: torch.Tensor | None = None,
    max_position: float | None = None,
) -> torch.Tensor:
    """CoPE's positions ``p_ij`` (eq. 4) from the gates ``g_ij`` ``(batch, heads, q_len, k_len)``.

    Gates of keys a query does not see must already be 0 (they are not counted). Key ``j`` of
    query ``i`` is at the sum of the gates of the keys ``t`` with ``k_pos_j ≤ k_pos_t ≤ q_pos_i``:
    with the default ids (keys ``0 … k_len - 1``, queries the last ``q_len`` of them) that is
    ``Σ_{t=j}^{i} g_it``, and 0 for a key after the query. ``max_position`` clamps (``p_max``).
    """
    check_float_tensor("gates", gates, ndim=4)
    b, _, lq, lk = gates.shape
    q_pos, k_pos = default_positions(b, lq, lk, gates.device, position_ids, key_position_ids)
    positions = _count(gates, q_pos, k_pos)
    if max_position is not None:
        positions = positions.clamp(max=max_position)
    return positions


def interpolate(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The interpolation of ``e`` along the last dimension: ``values[..., p]`` at fractional positions ``p``.

    ``values`` ``(..., n)`` holds a quantity at the integer positions ``0 … n - 1`` (the logits
    ``q_iᵀ e[p]``); ``positions`` ``(..., m)`` (same leading dimensions) lie in ``[0, n - 1]``.
    Returns ``(..., m)``: ``(p - ⌊p⌋) values[⌈p⌉] + (1 - p + ⌊p⌋) values[⌊p⌋]``, exact at integers.
    """
    check_float_tensor("values", values)
    check_float_tensor("positions", positions, ndim=values.dim())
    check_same_placement(values=values, positions=positions)
    if positions.shape[:-1] != values.shape[:-1]:
        raise ValueError(
            f"positions must have the leading dimensions {tuple(values.shape[:-1])} of values, "
            f"got shape {tuple(positions.shape)}"
        )
    n = values.shape[-1]
    if positions.numel() and not bool(((positions >= 0) & (positions <= n - 1)).all()):
        raise ValueError(
            f"positions must lie in [0, {n - 1}] (values holds positions 0 … {n - 1}), got the range "
            f"[{positions.min().item():g}, {positions.max().item():g}]"
        )
    return _interpolate(values, positions.to(values.dtype))


def _visible(q_len, k_len, causal, key_mask, window, device):
    """Which key each query sees, as :func:`pebook.encoding.sdpa` masks them (``None``: all)."""
    if window is not None and k_len > window:
        mask = window_causal_mask(q_len, k_len, window, device)
        return mask if key_mask is None else padded_causal_mask(key_mask, q_len, causal) & mask
    if key_mask is not None:
        return padded_causal_mask(key_mask, q_len, causal)
    return storage_causal_mask(q_len, k_len, device) if causal else None


def _cope_core(q, k, v, table, q_pos, k_pos, visible, scale):
    """Gates, positions, interpolation, logits: via the ``(L, p_max + 1)`` integer logits; no checks."""
    groups = q.shape[1] // k.shape[1]  # grouped-query attention: one key/value head per group
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    work = torch.promote_types(q.dtype, torch.float32)  # gates, counts and softmax in >= float32
    content = (q @ k.transpose(-1, -2)).to(work)  # q_i · k_j
    gates = torch.sigmoid(content * scale)  # the gates, on the scaled dot product
    if visible is not None:
        gates = gates.masked_fill(~visible, 0.0)
    positions = _count(gates, q_pos, k_pos).clamp(max=table.shape[0] - 1)
    position_logits = _interpolate((q @ table.T).to(work), positions)  # q_i · e[p_ij], interpolated
    logits = (content + position_logits) * scale  # q_i · (k_j + e[p_ij]), scaled
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1).to(v.dtype) @ v


def cope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_embeddings: torch.Tensor,
    causal: bool = True,
    *,
    position_ids: torch.Tensor | None = None,
    key_position_ids: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention with CoPE (eqs. 3-6): ``softmax_j(scale · q_iᵀ (k_j + e[p_ij])) v``.

    ``q``: ``(batch, heads, q_len, head_dim)``; ``k``, ``v``: ``(batch, kv_heads, k_len,
    head_dim)`` with ``kv_heads`` dividing ``heads``; ``position_embeddings``: the table ``e``,
    ``(p_max + 1, head_dim)``, shared by the heads. Positions as in :func:`contextual_positions`
    (default: keys ``0 … k_len - 1``, queries the last ``q_len`` of them); the causal mask follows
    storage order. ``scale`` defaults to ``1/√head_dim`` and applies to the gates' dot product and
    to the whole logit. ``key_mask`` ``(batch, k_len)`` (bool, or 1 for a token and 0 for padding)
    hides padding keys; ``window`` (causal only) lets each query see its last ``window`` keys.
    Hidden keys are neither attended to nor counted.
    """
    b, _, lq, lk, d = check_attention_inputs(q, k, v)
    check_float_tensor("position_embeddings", position_embeddings, ndim=2)
    if position_embeddings.shape[1] != d or position_embeddings.shape[0] < 1:
        raise ValueError(
            f"position_embeddings must have shape (p_max + 1, head_dim={d}), got {tuple(position_embeddings.shape)}"
        )
    if position_embeddings.dtype != q.dtype:
        raise TypeError(f"position_embeddings has dtype {position_embeddings.dtype} but q has dtype {q.dtype}")
    check_same_placement(q=q, position_embeddings=position_embeddings)
    check_causal_lengths(check_bool("causal", causal), lq, lk)
    if window is not None:
        window = check_int("window", window, minimum=1)
        if not causal:
            raise ValueError(f"window={window} needs causal attention, got causal=False")
    q_pos, k_pos = default_positions(b, lq, lk, q.device, position_ids, key_position_ids)
    if key_mask is not None:
        key_mask = check_attention_mask(
            "key_mask", key_mask, b, lk, q.device, what="k_len", left_padded=False, values=key_mask.device.type == "cpu"
        )
    scale = d**-0.5 if scale is None else scale
    visible = _visible(lq, lk, causal, key_mask, window, q.device)
    return _cope_core(q, k, v, position_embeddings, q_pos, k_pos, visible, scale)


class CoPE(PositionalEncoding):
    """Registry entry ``"cope"``: contextual positions, one learned table ``e`` per layer.

    Option ``cope_max_position`` (``p_max``, 64): the table has ``p_max + 1`` rows of
    ``head_dim``, shared by the heads, drawn from ``N(0, 1/head_dim)``; larger positions are
    clamped to ``p_max``. See the module docstring for the conventions.
    """

    name = "cope"
    place = "contextual"
    attn_implementations = ("sdpa",)  # the counted positions need the whole gate matrix
    example_options = {"cope_max_position": 5}  # shorter than the tests' sequences: clamping is exercised

    def __init__(self, *, head_dim: int, cope_max_position: int = 64):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        self.max_position = check_int("cope_max_position", cope_max_position, minimum=1)
        self.position_embeddings = nn.Parameter(torch.randn(self.max_position + 1, self.head_dim) * self.head_dim**-0.5)

    def declared_parameters(self):
        return {"position_embeddings": ((self.max_position + 1, self.head_dim), True)}

    def attend(
        self, q, k, v, q_pos, k_pos, *, causal, scale, bias=None, key_mask=None, window=None, attn_implementation="sdpa"
    ):
        if check_attn_implementation(attn_implementation) not in self.attn_implementations:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not supported by the cope encoding (its positions "
                f"depend on the content, which a FlexAttention score_mod cannot count); use one of "
                f"{self.attn_implementations}"
            )
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        visible = _visible(q.shape[2], k.shape[2], causal, key_mask, window, q.device)
        return _cope_core(q, k, v, self.position_embeddings, q_pos, k_pos, visible, scale)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, cope_max_position={self.max_position}"
