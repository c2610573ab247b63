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

from collections import OrderedDict
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .masking import padded_causal_mask, storage_causal_mask, window_causal_mask

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "PLACES",
    "PositionalEncoding",
    "LogitBias",
    "check_attn_implementation",
    "sdpa",
]

PLACES = ("none", "input", "qk", "logits", "key_value", "contextual")

#: how attention is computed, named as ``transformers``' ``attn_implementation``: ``"sdpa"`` (the
#: default: the bias materialised and handed to ``torch.nn.functional.scaled_dot_product_attention``)
#: or ``"flex_attention"`` (``torch.nn.attention.flex_attention``, the bias as a ``score_mod``;
#: :mod:`pebook.flex`). Encodings with nothing to add to the scores run SDPA under either.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "flex_attention")

#: most recent (length, dtype, mask, …) combinations whose bias one encoding module keeps, and
#: the most bytes it keeps (a larger bias is computed at each call, as without the cache)
BIAS_CACHE_SIZE = 2
BIAS_CACHE_BYTES = 2**30


def check_attn_implementation(attn_implementation) -> str:
    """Return ``attn_implementation`` if it is one of :data:`ATTENTION_IMPLEMENTATIONS`, else raise ``ValueError``."""
    if not isinstance(attn_implementation, str) or attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn_implementation!r}")
    return attn_implementation


def sdpa(
    q, k, v, *, causal: bool, scale, bias=None, key_mask=None, window: int | None = None, bias_masked: bool = False
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + bias) v``, with the storage-order causal mask if ``causal``.

    ``k`` and ``v`` may have fewer heads than ``q`` (a divisor: grouped-query attention);
    ``bias`` is ``(batch or 1, heads, q_len, k_len)`` in any float dtype. With ``causal`` the
    queries are the last ``q_len`` of the ``k_len`` keys. ``key_mask`` ``(batch, k_len)`` bool,
    False for padding keys, hides them (:func:`pebook.masking.padded_causal_mask`). ``window``
    (causal only): sliding-window attention, each query sees only the last ``window`` keys up to
    itself (:func:`pebook.masking.window_causal_mask`; Mistral 7B, arXiv:2310.06825). Runs on
    ``torch.nn.functional.scaled_dot_product_attention``; a mask is built only when SDPA's own
    ``is_causal`` flag cannot express it (a bias, padding, fewer queries than keys, or a window
    shorter than the keys). A single causal query (decoding) sees every key: no mask is built.
    ``bias_masked``: the causal (and window) mask is already folded into ``bias`` as ``-inf``
    (:meth:`LogitBias.masked_bias`); only a ``key_mask`` is then applied on top.
    """
    gqa = k.shape[1] != q.shape[1]
    lq, lk = q.shape[-2], k.shape[-2]
    if bias_masked and key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale, enable_gqa=gqa)
    if window is not None and lk > window:
        mask = window_causal_mask(lq, lk, window, q.device)
        if key_mask is not None:
            mask = padded_causal_mask(key_mask, lq, causal) & mask
    elif key_mask is not None:
        mask = padded_causal_mask(key_mask, lq, causal)
    elif bias is None and (not causal or lq == lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    elif lq == 1:  # one query, the last key: the causal mask is all True (the window case is above)
        mask = None
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
    #: the ``attn_implementation`` values the encoding's :meth:`attend` takes
    attn_implementations: ClassVar[tuple[str, ...]] = ATTENTION_IMPLEMENTATIONS

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

    def attend(
        self,
        q,
        k,
        v,
        q_pos,
        k_pos,
        *,
        causal,
        scale,
        bias=None,
        key_mask=None,
        window=None,
        attn_implementation="sdpa",
    ) -> torch.Tensor:
        """Attention of ``q`` over ``k, v`` (``(batch, heads, seq, head_dim)``, keys possibly with
        fewer heads), causal in storage order if ``causal``. ``bias``: a precomputed
        :meth:`logit_bias` (a model shares one across layers). ``key_mask``: ``None`` (no
        padding) or ``(batch, k_len)`` bool, False for the padding keys, which no query may see
        (:func:`pebook.masking.padded_causal_mask`). ``window``: ``None`` or a sliding window
        (each query sees its last ``window`` keys, itself included; see :func:`sdpa`). An
        encoding that overrides this hook supports a ``sliding_window`` only if its own
        ``attend`` takes ``window``; attention refuses the option otherwise.
        ``attn_implementation``: one of :data:`ATTENTION_IMPLEMENTATIONS`. An encoding that adds
        nothing to the scores (none, RoPE, xPos, input encodings) runs SDPA under both: SDPA
        without a bias is the floor FlexAttention would only match."""
        check_attn_implementation(attn_implementation)
        if bias is None:
            bias = self.logit_bias(q_pos, k_pos)
        return sdpa(q, k, v, causal=causal, scale=scale, bias=bias, key_mask=key_mask, window=window)

    # -- half precision ---------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_bias_cache", None)  # cached biases follow no device or dtype change
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

    An encoding whose bias depends on the positions only through their difference ``q_pos -
    k_pos`` (ALiBi, T5, KERPLE) sets :attr:`depends_on` to ``"distance"`` and writes it in two
    steps: :meth:`distance_key`, free of parameters (ALiBi's signed or absolute distance, T5's
    bucket), and :meth:`key_score`, the learned or fixed value at that key. Then the
    parameter-free grid is cached (:meth:`masked_bias`) and FlexAttention reads a per-distance
    table of ``O(heads · L)`` (:mod:`pebook.flex`).

    :meth:`masked_bias` is the bias SDPA receives by default: 4-D, in the attention dtype, the
    causal (and window) mask folded in as ``-inf``, cached per (lengths, device, dtype, mask)
    and positions. It is rebuilt only when something it depends on changed: other positions
    (another tensor, or one modified in place, with other values), another length, or, when no
    gradient is needed, other parameter or buffer values. When gradients flow into the
    parameters it is recomputed from the cached parameter-free part at every call, with the
    operations of :meth:`logit_bias`, so values and gradients are bit for bit those of the
    uncached path.
    """

    place = "logits"
    n_heads: int
    #: ``"positions"`` (:meth:`score` needs both, e.g. FIRE) or ``"distance"`` (only ``q_pos - k_pos``)
    depends_on: ClassVar[str] = "positions"
    # Subclasses define score(head, q_pos, k_pos) -> Tensor: the bias added to the logit of
    # `head` for a query at q_pos and a key at k_pos (pointwise, broadcasting), or, with
    # depends_on = "distance", distance_key(distance) and key_score(head, key).

    def score(self, head, q_pos, k_pos):
        """The bias of ``head`` for queries at ``q_pos`` and keys at ``k_pos`` (pointwise, broadcasting)."""
        return self.key_score(head, self.distance_key(q_pos - k_pos))

    def distance_key(self, distance: torch.Tensor) -> torch.Tensor:
        """``depends_on == "distance"``: the parameter-free key of ``distance = q_pos - k_pos``."""
        raise NotImplementedError(f"the {self.name} encoding does not depend on the distance alone")

    def key_score(self, head, key: torch.Tensor) -> torch.Tensor:
        """``depends_on == "distance"``: the bias of ``head`` at the key of :meth:`distance_key`."""
        raise NotImplementedError(f"the {self.name} encoding does not depend on the distance alone")

    def prepare_(self) -> None:
        """Called before each bias is computed (KERPLE projects its parameters into range)."""

    def constant_beyond(self) -> int | None:
        """``depends_on == "distance"``: a distance ``W`` from which :meth:`distance_key` is constant
        in each direction (``q_pos - k_pos >= W``, and ``<= -W``), or ``None`` (the default). Such a
        bias runs ``attn_implementation="flex_attention"`` as a band plus fused attention
        (:mod:`pebook.banded`) where that applies."""
        return None

    def linear_slopes(self) -> torch.Tensor | None:
        """The ``(heads,)`` slopes ``m_h`` if the bias is ``-m_h · (q_pos - k_pos)`` (causal ALiBi), else
        ``None`` (the default); ``attn_implementation="flex_attention"`` then runs :mod:`pebook.banded`."""
        return None

    def flex_score(self):
        """A pointwise ``(head, q_pos, k_pos) -> bias`` for a compiled FlexAttention ``score_mod``.

        Default: :meth:`score`. An encoding whose :meth:`score` reduces over a dimension (FIRE's
        MLP) overrides it with a reduction-free form, which FlexAttention's compiled kernel needs.
        """
        return self.score

    def logit_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``score`` on the grid: shape ``(batch, heads, q_len, k_len)`` (batch of the positions)."""
        self.prepare_()
        heads = torch.arange(self.n_heads, device=q_pos.device).view(1, -1, 1, 1)
        return self.score(heads, q_pos[:, None, :, None], k_pos[:, None, None, :])

    def score_mod(self, q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool = False):
        """A FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` adding :meth:`score`.

        ``q_pos``, ``k_pos``: ``(batch, len)`` positions of queries and keys. With ``causal`` the
        storage-order causal mask (queries are the last ``q_len`` keys) is folded in as ``-inf``.
        """
        self.prepare_()
        shift = k_pos.shape[-1] - q_pos.shape[-1]

        def score_mod(score, b, h, q_idx, kv_idx):
            biased = score + self.score(h, q_pos[b, q_idx], k_pos[b, kv_idx]).to(score.dtype)
            if causal:
                biased = torch.where(kv_idx <= q_idx + shift, biased, -float("inf"))
            return biased

        return score_mod

    # -- the cached materialised bias ---------------------------------------------------------------

    def masked_bias(self, q_pos, k_pos, *, dtype, causal: bool, window: int | None = None) -> torch.Tensor:
        """:meth:`logit_bias` in ``dtype`` with the causal (or window) mask folded in as ``-inf``, cached.

        Equal, bit for bit, to ``logit_bias(q_pos, k_pos).to(dtype).masked_fill(~mask, -inf)``,
        which is what :func:`sdpa` computes; ``(1, heads, q_len, k_len)`` when no gradient is
        needed and every row has the same positions (SDPA broadcasts it over the batch). See the
        class docstring for when it is rebuilt.
        """
        self.prepare_()
        lq, lk = q_pos.shape[-1], k_pos.shape[-1]
        window = window if window is not None and lk > window else None  # as sdpa applies it
        learned = [p for p in self.parameters() if p.requires_grad]
        full = not (torch.is_grad_enabled() and learned)
        key = (lq, lk, q_pos.shape[0], q_pos.device, dtype, causal, window, full)
        cache = self.__dict__.setdefault("_bias_cache", OrderedDict())
        entry = cache.get(key)
        state = _tensor_state(self) if full else None
        if entry is None or not _same_positions(entry, q_pos, k_pos) or not _same_state(entry["state"], state):
            entry = {"q_pos": q_pos, "k_pos": k_pos, "versions": (q_pos._version, k_pos._version), "state": state}
            mask = None
            if window is not None:
                mask = window_causal_mask(lq, lk, window, q_pos.device)
            elif causal and lq > 1:  # one query sees every key
                mask = storage_causal_mask(lq, lk, q_pos.device)
            entry["mask"] = None if mask is None else ~mask
            if full:
                shared = q_pos.shape[0] == 1 or (_rows_equal(q_pos) and _rows_equal(k_pos))
                rows = slice(0, 1) if shared else slice(None)
                with torch.no_grad():
                    entry["bias"] = self._fold(self.logit_bias(q_pos[rows], k_pos[rows]), dtype, entry["mask"])
            elif self.depends_on == "distance":
                entry["key"] = self.distance_key(q_pos[:, None, :, None] - k_pos[:, None, None, :])
            cache.pop(key, None)
            if _entry_bytes(entry) <= BIAS_CACHE_BYTES:
                cache[key] = entry
            while len(cache) > BIAS_CACHE_SIZE or sum(map(_entry_bytes, cache.values())) > BIAS_CACHE_BYTES:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        if full:
            return entry["bias"]
        if self.depends_on == "distance":
            heads = torch.arange(self.n_heads, device=q_pos.device).view(1, -1, 1, 1)
            bias = self.key_score(heads, entry["key"])
        else:
            bias = self.logit_bias(q_pos, k_pos)
        return self._fold(bias, dtype, entry["mask"])

    @staticmethod
    def _fold(bias, dtype, hidden):
        bias = bias.to(dtype)
        return bias if hidden is None else bias.masked_fill(hidden, float("-inf"))

    def clear_bias_cache(self) -> None:
        """Drop every cached bias (never needed for correctness: the cache checks what it depends on)."""
        self.__dict__.pop("_bias_cache", None)

    def attend(
        self,
        q,
        k,
        v,
        q_pos,
        k_pos,
        *,
        causal,
        scale,
        bias=None,
        key_mask=None,
        window=None,
        attn_implementation="sdpa",
    ) -> torch.Tensor:
        """:meth:`PositionalEncoding.attend` with the bias from :meth:`masked_bias` (``"sdpa"``) or
        as a FlexAttention ``score_mod`` (``"flex_attention"``, :func:`pebook.flex.flex_logit_bias_attention`).
        A given ``bias`` is used as is, with SDPA."""
        if check_attn_implementation(attn_implementation) == "flex_attention" and bias is None:
            from .flex import flex_logit_bias_attention

            return flex_logit_bias_attention(
                q, k, v, self, q_pos, k_pos, causal=causal, scale=scale, key_mask=key_mask, window=window
            )
        if bias is not None:
            return sdpa(q, k, v, causal=causal, scale=scale, bias=bias, key_mask=key_mask, window=window)
        bias = self.masked_bias(q_pos, k_pos, dtype=q.dtype, causal=causal, window=window)
        return sdpa(q, k, v, causal=causal, scale=scale, bias=bias, key_mask=key_mask, window=window, bias_masked=True)


def _entry_bytes(entry: dict) -> int:
    kept = (entry.get("bias"), entry.get("key"), entry["mask"])
    return sum(t.numel() * t.element_size() for t in kept if t is not None)


def _rows_equal(pos: torch.Tensor) -> bool:
    """Every row of ``(batch, len)`` positions is the first (a stride-0 batch, or equal values)."""
    return pos.stride(0) == 0 or bool((pos == pos[:1]).all())


def _same_positions(entry: dict, q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """The cached entry was built for these positions: the same unmodified tensors, or equal values."""
    for new, old, version in zip((q_pos, k_pos), (entry["q_pos"], entry["k_pos"]), entry["versions"]):
        if old._version != version:  # the cached tensor changed in place: its values are not the ones used
            return False
        if new is not old and not torch.equal(new, old):
            return False
    return True


def _tensor_state(module: nn.Module) -> tuple:
    """Copies of the module's parameters and buffers (a few per-head scalars or a small table)."""
    return tuple(t.detach().clone() for t in (*module.parameters(), *module.buffers()))


def _same_state(old, new) -> bool:
    if old is None or new is None:
        return old is new
    return len(old) == len(new) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(old, new)
    )
