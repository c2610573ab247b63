"""The protocol every positional encoding implements: where position enters attention.

A Transformer layer computes ``softmax(q kᵀ · scale + bias) v``. Position can enter in exactly
five places, and each encoding declares which one (:attr:`PositionalEncoding.place`):

* ``"input"`` — a vector added to the token embeddings before the projections (sinusoidal,
  Vaswani et al. 2017; learned, Gehring et al. 2017). Hook: :meth:`~PositionalEncoding.embed`.
* ``"qk"`` — a transform of queries and keys, applied before keys are cached (RoPE, Su et al.
  2021). Hook: :meth:`~PositionalEncoding.rotate`, and :meth:`~PositionalEncoding.rotate_queries`
  where queries are transformed differently from keys (xPos, Sun et al. 2022).
* ``"logits"`` — an additive bias that is a function of (head, query position, key position)
  (ALiBi, Press et al. 2022; T5, Raffel et al. 2020). Hook: :meth:`LogitBias.score`, written once
  in the pointwise shape of a FlexAttention ``score_mod``; :meth:`LogitBias.logit_bias`
  materialises it as a tensor for SDPA and :meth:`LogitBias.score_mod` hands the same function to
  ``torch.nn.attention.flex_attention.flex_attention``.
* ``"key_value"`` — a key term on the logits plus a value term on the output (Shaw et al. 2018).
  Hook: :meth:`~PositionalEncoding.attend`.
* ``"contextual"`` — a position that depends on the content: each query counts the keys it
  gates in (``σ(q·k)``) between a key and itself, and a table interpolated at that fractional
  count adds a key term (CoPE, Golovneva et al. 2024). Neither a transform of q or k alone nor a
  function of the positions, so the hook is :meth:`~PositionalEncoding.attend`.

Positions are data: ``q_pos`` and ``k_pos`` are int64 tensors of shape ``(batch, len)`` (the
``position_ids`` of ``transformers``). The causal mask is a separate matter: it follows the order
in which keys were stored (query ``i`` of ``q_len`` sees the first ``k_len - q_len + i + 1``
keys), so passing wrong ``position_ids`` misplaces tokens for the encoding without touching the
mask, which is exactly the classic decoding bug.

An encoding is an ``nn.Module``; its learned parameters are ``nn.Parameter``s and its fixed
tensors buffers. :meth:`~PositionalEncoding.declared_parameters` states their shapes, so tests
and parameter counts read them from the encoding instead of knowing each one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .masking import padded_causal_mask, storage_causal_mask, window_causal_mask

__all__ = ["PLACES", "PositionalEncoding", "LogitBias", "sdpa"]

PLACES = ("none", "input", "qk", "logits", "key_value", "contextual")


def sdpa(q, k, v, *, causal: bool, scale, bias=None, key_mask=None, window: int | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + bias) v``, with the storage-order causal mask if ``causal``.

    ``k`` and ``v`` may have fewer heads than ``q`` (a divisor: grouped-query attention);
    ``bias`` is ``(batch or 1, heads, q_len, k_len)`` in any float dtype. With ``causal`` the
    queries are the last ``q_len`` of the ``k_len`` keys. ``key_mask`` ``(batch, k_len)`` bool,
    False for padding keys, hides them (:func:`pebook.masking.padded_causal_mask`). ``window``
    (causal only): sliding-window attention, each query sees only the last ``window`` keys up to
    itself (:func:`pebook.masking.window_causal_mask`; Mistral 7B, arXiv:2310.06825). Runs on
    ``torch.nn.functional.scaled_dot_product_attention``; a mask is built only when SDPA's own
    ``is_causal`` flag cannot express it (a bias, padding, fewer queries than keys, or a window
    shorter than the keys).
    """
    gqa = k.shape[1] != q.shape[1]
    lq, lk = q.shape[-2], k.shape[-2]
    if window is not None and lk > window:
        mask = window_causal_mask(lq, lk, window, q.device)
        if key_mask is not None:
            mask = padded_causal_mask(key_mask, lq, causal) & mask
    elif key_mask is not None:
        mask = padded_causal_mask(key_mask, lq, causal)
    elif bias is None and (not causal or lq == lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    else:
        mask = storage_causal_mask(lq, lk, q.device) if causal else None
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    bias = bias.to(q.dtype)
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)


class PositionalEncoding(nn.Module):
    """Base class: one positional encoding, as it plugs into attention.

    Subclasses set :attr:`name`, :attr:`place`, :attr:`example_options` and override the hook of
    their place. Their ``__init__`` takes keyword arguments only: any of the structural ones
    ``dim`` (model width), ``n_heads``, ``head_dim`` and ``causal`` that they need (the registry
    passes exactly those), plus their own options with defaults.
    """

    name: ClassVar[str]
    place: ClassVar[str] = "none"
    #: one module for all layers of a model (T5's shared bias table), instead of one per layer
    shared_across_layers: ClassVar[bool] = False
    #: small, valid options for tests and examples (e.g. a short Shaw clipping distance)
    example_options: ClassVar[dict] = {}
    #: buffers that keep float32 (or float64) precision when the module is cast to half precision
    full_precision_buffers: ClassVar[tuple[str, ...]] = ()

    def declared_parameters(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """``{name: (shape, learned)}`` of the encoding's tensors (parameters and buffers)."""
        return {}

    def num_learned_parameters(self) -> int:
        """Learned scalars this encoding adds, from :meth:`declared_parameters`."""
        total = 0
        for shape, learned in self.declared_parameters().values():
            if learned:
                n = 1
                for s in shape:
                    n *= s
                total += n
        return total

    # -- hooks, identity by default --------------------------------------------------------------

    def embed(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """``"input"`` encodings: the ``(batch, seq, dim)`` vectors added to the token embeddings."""
        return None

    def rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``"qk"`` encodings: keys ``x`` ``(batch, heads, seq, head_dim)`` moved to ``position_ids``
        (a KV cache stores them so), and queries too unless :meth:`rotate_queries` says otherwise."""
        return x

    def rotate_queries(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``"qk"`` encodings: queries moved to ``position_ids``; :meth:`rotate` unless overridden."""
        return self.rotate(x, position_ids)

    def logit_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """``"logits"`` encodings: the ``(batch or 1, heads, q_len, k_len)`` additive bias."""
        return None

    def check_positions(self, last_position: int) -> None:
        """Raise ``ValueError`` if the encoding cannot place a token at ``last_position``."""

    def attend(self, q, k, v, q_pos, k_pos, *, causal, scale, bias=None, key_mask=None, window=None) -> torch.Tensor:
        """Attention of ``q`` over ``k, v`` (``(batch, heads, seq, head_dim)``, keys possibly with
        fewer heads), causal in storage order if ``causal``. ``bias``: a precomputed
        :meth:`logit_bias` (a model shares one across layers). ``key_mask``: ``None`` (no
        padding) or ``(batch, k_len)`` bool, False for the padding keys, which no query may see
        (:func:`pebook.masking.padded_causal_mask`). ``window``: ``None`` or a sliding window
        (each query sees its last ``window`` keys, itself included; see :func:`sdpa`). An
        encoding that overrides this hook supports a ``sliding_window`` only if its own
        ``attend`` takes ``window``; attention refuses the option otherwise."""
        if bias is None:
            bias = self.logit_bias(q_pos, k_pos)
        return sdpa(q, k, v, causal=causal, scale=scale, bias=bias, key_mask=key_mask, window=window)

    # -- half precision ---------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.full_precision_buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype in (torch.float16, torch.bfloat16):  # keep the precision, follow the device
                self._buffers[name] = before.to(after.device)
        return self


class LogitBias(PositionalEncoding):
    """An additive logit bias written once as ``score(head, q_pos, k_pos)``.

    :meth:`score` is pointwise and broadcasts its three integer tensors, so the same definition
    gives the materialised bias (:meth:`logit_bias`) and a FlexAttention ``score_mod``
    (:meth:`score_mod`).
    """

    place = "logits"
    n_heads: int
    # Subclasses define score(head, q_pos, k_pos) -> Tensor: the bias added to the logit of
    # `head` for a query at q_pos and a key at k_pos (pointwise, broadcasting).

    def logit_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``score`` on the grid: shape ``(batch, heads, q_len, k_len)`` (batch of the positions)."""
        heads = torch.arange(self.n_heads, device=q_pos.device).view(1, -1, 1, 1)
        return self.score(heads, q_pos[:, None, :, None], k_pos[:, None, None, :])

    def score_mod(self, q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool = False):
        """A FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` adding :meth:`score`.

        ``q_pos``, ``k_pos``: ``(batch, len)`` positions of queries and keys. With ``causal`` the
        storage-order causal mask (queries are the last ``q_len`` keys) is folded in as ``-inf``.
        """
        shift = k_pos.shape[-1] - q_pos.shape[-1]

        def score_mod(score, b, h, q_idx, kv_idx):
            biased = score + self.score(h, q_pos[b, q_idx], k_pos[b, kv_idx]).to(score.dtype)
            if causal:
                biased = torch.where(kv_idx <= q_idx + shift, biased, -float("inf"))
            return biased

        return score_mod
