"""FlexAttention path for logit-bias encodings.

FlexAttention (Dong, Feng, Guessous, Liang & He 2024, "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels", arXiv:2412.05496; ``torch.nn.attention.flex_attention``)
computes ``softmax(q kᵀ · scale + bias) v`` tile by tile, calling a pointwise
``score_mod(score, b, h, q_idx, kv_idx)`` on each logit and skipping the tiles a ``BlockMask``
marks empty, so no ``(q_len, k_len)`` tensor is ever built. A :class:`pebook.LogitBias` is
written as exactly such a pointwise function (:meth:`~pebook.LogitBias.score`), so every logit
bias runs here unchanged:

* an encoding whose bias depends on the distance ``q_pos - k_pos`` alone (``depends_on =
  "distance"``: ALiBi, T5, KERPLE) is evaluated once per call on the distances that occur, a
  ``(heads, n_distances)`` table (``O(heads · L)`` for positions ``0 … L - 1``, rounded up to a power of two), and the
  ``score_mod`` reads it: ``score + table[h, q_pos[b, q_idx] - k_pos[b, kv_idx] - d_min]``, or
  ``table[h, start[b] + q_idx - kv_idx]`` when every row of positions counts up by one;
* any other (FIRE, whose normaliser depends on the query position) runs its own
  :meth:`~pebook.LogitBias.flex_score` in the ``score_mod``.

The storage-order causal mask and the sliding window are a ``BlockMask`` built once per
``(q_len, k_len, causal, window, device)`` and cached (its size is ``O((L / 128)²)`` blocks).
Extra memory is the table, the positions and the block mask: ``O(L)`` for the bias, against the
``(heads, L, L)`` of the materialised path.

``torch.compile(flex_attention, dynamic=False)`` is built once per process, on first use; it
compiles one kernel per shape (a few seconds each on a CPU; torch 2.13's CPU kernel fails to
compile with dynamic shapes), which one encoding kind shares across modules (the ``score_mod``
captures tensors, not modules), and after ``torch._dynamo.config.recompile_limit`` shapes torch
runs FlexAttention uncompiled. The
materialised SDPA path (:meth:`pebook.LogitBias.masked_bias`) stays the reference and the
fallback:

* where compiling fails (no compiler, an unsupported device or dtype), with one
  :class:`FlexAttentionFallbackWarning`, for the rest of the process on that device type and
  dtype;
* on the CPU when a gradient is needed: FlexAttention has no CPU backward (torch 2.13);
* an encoding whose bias is constant beyond a band (T5: :meth:`pebook.LogitBias.constant_beyond`)
  or linear in the distance (causal ALiBi: :meth:`pebook.LogitBias.linear_slopes`) runs
  :mod:`pebook.banded` instead, where :func:`pebook.banded.banded_refusal` allows;
* with a ``key_mask`` (padded batches: the padding would need a per-call ``BlockMask`` of
  ``O(batch · L²)`` evaluations, as costly as the mask it replaces) and for a single query
  (decoding: the bias of one query is one row, already ``O(L)``, and every new length would
  be a new kernel shape).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from .banded import banded_logit_bias_attention, banded_refusal

__all__ = ["FlexAttentionFallbackWarning", "flex_available", "flex_logit_bias_attention"]

#: block masks kept, most recent first out
_BLOCK_MASK_CACHE_SIZE = 8
_BLOCK_MASKS: OrderedDict = OrderedDict()
# the compiled flex_attention (built on first use), and the errors that disabled it, per (device type, dtype)
_STATE: dict = {"compiled": None, "failed": {}}


class FlexAttentionFallbackWarning(UserWarning):
    """FlexAttention could not be compiled: attention falls back to the materialised SDPA path."""


def flex_available(device="cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether the compiled FlexAttention path is in use for this device type and dtype (``False``
    after a compile failure there)."""
    return (torch.device(device).type, dtype) not in _STATE["failed"]


def _compiled_flex():
    if _STATE["compiled"] is None:
        from torch.nn.attention.flex_attention import flex_attention

        # static shapes: torch 2.13's CPU template fails to compile once dimensions turn dynamic
        _STATE["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _STATE["compiled"]


def _block_mask(q_len: int, k_len: int, causal: bool, window: int | None, device):
    """The storage-order causal (and window) ``BlockMask``, or one that hides nothing, cached.

    One ``mask_mod`` for every case, its limits held in tensors, so that a compiled kernel
    serves them all: query ``i`` (the key at storage row ``i + shift``) sees keys ``j`` with
    ``i + shift - band < j <= i + shift``.
    """
    key = (q_len, k_len, causal, window, torch.device(device))
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key]
    from torch.nn.attention.flex_attention import create_block_mask

    if causal:
        shift, band = k_len - q_len, k_len + 1 if window is None else window
    else:  # nothing hidden
        shift, band = k_len, q_len + 2 * k_len + 1
    shift = torch.tensor(shift, device=device)
    band = torch.tensor(band, device=device)

    def visible(b, h, q_idx, kv_idx):
        row = q_idx + shift
        return (kv_idx <= row) & (kv_idx > row - band)

    mask = create_block_mask(visible, None, None, q_len, k_len, device=device)
    _BLOCK_MASKS[key] = mask
    while len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def _score_mod(encoding, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """The ``score_mod`` of ``encoding`` at these positions (see the module docstring)."""
    encoding.prepare_()
    if encoding.depends_on == "distance":
        lowest = int(q_pos.min()) - int(k_pos.max())
        highest = int(q_pos.max()) - int(k_pos.min())
        # a power of two of distances (the rest never read), so that few table shapes reach the compiler
        n_distances = 1 << (highest - lowest).bit_length()
        distances = torch.arange(lowest, lowest + n_distances, device=q_pos.device)
        heads = torch.arange(encoding.n_heads, device=q_pos.device)[:, None]
        table = encoding.key_score(heads, encoding.distance_key(distances[None, :]))  # (heads, n_distances)
        if _consecutive(q_pos) and _consecutive(k_pos):  # each row counts up by one (the default ids)
            start = q_pos[:, 0] - k_pos[:, 0] - lowest  # the table column of (q_idx, kv_idx) = (0, 0), per row

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + table[h, start[b] + q_idx - kv_idx].to(score.dtype)

            return score_mod
        rows = q_pos - lowest  # so that rows[b, i] - k_pos[b, j] indexes the table

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, rows[b, q_idx] - k_pos[b, kv_idx]].to(score.dtype)

        return score_mod
    bias = encoding.flex_score()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias(h, q_pos[b, q_idx], k_pos[b, kv_idx]).to(score.dtype)

    return score_mod


def _consecutive(pos: torch.Tensor) -> bool:
    """Every row of ``(batch, len)`` positions is ``start, start + 1, …`` (then the distance is ``q_idx - kv_idx``
    plus a per-row constant, and the ``score_mod`` reads no positions)."""
    return pos.shape[-1] < 2 or bool((pos[:, 1:] - pos[:, :-1] == 1).all())


def _needs_grad(encoding, *tensors) -> bool:
    return torch.is_grad_enabled() and (
        any(t.requires_grad for t in tensors) or any(p.requires_grad for p in encoding.parameters())
    )


def flex_logit_bias_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    encoding,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    scale,
    key_mask: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + bias) v`` with ``encoding``'s bias as a FlexAttention ``score_mod``.

    Arguments as :meth:`pebook.PositionalEncoding.attend` (already validated): ``q``
    ``(batch, heads, q_len, d)``, ``k``, ``v`` with ``kv_heads`` dividing ``heads``
    (grouped-query attention, ``enable_gqa``), ``q_pos`` / ``k_pos`` ``(batch, len)``, the
    causal mask in storage order, ``scale`` ``None`` for ``1/√d``. ``encoding`` is a
    :class:`pebook.LogitBias`. Where the module docstring says so, the materialised SDPA path
    runs instead (bit for bit ``attn_implementation="sdpa"``).
    """

    def materialised():
        return encoding.attend(q, k, v, q_pos, k_pos, causal=causal, scale=scale, key_mask=key_mask, window=window)

    lq, lk = q.shape[-2], k.shape[-2]
    needs_grad = _needs_grad(encoding, q, k, v)
    refusal = banded_refusal(
        q, k, encoding, q_pos, k_pos, causal=causal, key_mask=key_mask, window=window, needs_grad=needs_grad
    )
    if refusal is None:  # T5 (constant beyond a band), causal ALiBi (linear): fused attention, no compile
        return banded_logit_bias_attention(q, k, v, encoding, causal=causal, scale=scale)
    cpu_backward = q.device.type == "cpu" and needs_grad
    kind = (q.device.type, q.dtype)
    if kind in _STATE["failed"] or key_mask is not None or lq == 1 or cpu_backward:
        return materialised()
    window = window if window is not None and lk > window else None
    try:
        flex = _compiled_flex()
        block_mask = _block_mask(lq, lk, causal or window is not None, window, q.device)
        return flex(
            q,
            k,
            v,
            score_mod=_score_mod(encoding, q_pos, k_pos),
            block_mask=block_mask,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
    except Exception as error:  # noqa: BLE001 - any compile failure means: use the reference path
        _STATE["failed"] = {**_STATE["failed"], kind: error}
        warnings.warn(
            f"FlexAttention could not be compiled ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            f"attn_implementation='flex_attention' falls back to the materialised SDPA path on {kind[0]} in "
            f"{kind[1]} for the rest of this process",
            FlexAttentionFallbackWarning,
            stacklevel=3,
        )
        return materialised()
