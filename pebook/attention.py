"""Multi-head attention with any registered positional encoding.

Where each encoding enters is declared by the encoding itself (:mod:`pebook.encoding`): the
input (sinusoidal, learned), a rotation of q and k (RoPE), a logit bias (ALiBi, T5) or a key and
value term (Shaw). This module knows none of them by name; it reads :data:`pebook.ENCODINGS`.

Layouts of real models: ``n_kv_heads`` (grouped-query attention, Ainslie et al. 2023,
arXiv:2305.13245; multi-query attention with 1, Shazeer 2019, arXiv:1911.02150), partial rotary
(``rotary_dim``, GPT-NeoX / GPT-J), and ``scale`` (T5 uses 1, not ``1/√d``). Tensors inside
attention are ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ._checks import check_attention_inputs, check_bool, check_float_tensor, check_int, check_positions
from .cache import KVCache, check_cache, extend_key_mask, window_cache
from .encoding import PositionalEncoding, check_attn_implementation
from .masking import (
    check_attention_mask,
    check_causal_lengths,
    continued_positions,
    default_positions,
    mask_positions,
)
from .registry import ENCODINGS, build_encoding, check_encoding

__all__ = ["ENCODINGS", "positional_attention", "MultiHeadAttention"]


def _check_scale(scale):
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0 or None (for 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def _check_encoding_fits(position: PositionalEncoding, heads: int, head_dim: int, causal: bool, dim=None) -> None:
    """An encoding module built for another layer shape (heads, head size, width, causality) is refused."""
    wanted = {"n_heads": heads, "head_dim": head_dim, "causal": causal, "dim": dim}
    for name, value in wanted.items():
        built = getattr(position, name, value)
        if value is not None and built != value:
            raise ValueError(
                f"the {position.name} encoding was built with {name}={built!r}, but this attention has {value!r}"
            )


def attend_options(position: PositionalEncoding, attn_implementation) -> dict:
    """The keyword arguments that pass ``attn_implementation`` to ``position.attend``, checked once.

    ``{}`` for the default ``"sdpa"`` (so an encoding whose own ``attend`` predates the keyword
    still works); otherwise the encoding's hook must take the keyword and the value must be among
    its :attr:`~pebook.PositionalEncoding.attn_implementations`.
    """
    attn_implementation = check_attn_implementation(attn_implementation)
    if attn_implementation == "sdpa":
        return {}
    takes = "attn_implementation" in inspect.signature(position.attend).parameters
    if not takes or attn_implementation not in position.attn_implementations:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not supported by the {position.name} encoding "
            f"(it supports {position.attn_implementations if takes else ('sdpa',)})"
        )
    return {"attn_implementation": attn_implementation}


def positional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    encoding: PositionalEncoding | None = None,
    *,
    causal: bool = True,
    position_ids: torch.Tensor | None = None,
    key_position_ids: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    attn_implementation: str = "sdpa",
) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` with one positional encoding module (``None``: no position).

    ``q``: ``(batch, heads, q_len, head_dim)``; ``k``, ``v``: ``(batch, kv_heads, k_len,
    head_dim)`` with ``kv_heads`` dividing ``heads`` (grouped-query attention, as SDPA's
    ``enable_gqa``). ``encoding`` is an instance such as ``pebook.ALiBi(n_heads=8)`` or
    ``pebook.RoPE(head_dim=64)``; input encodings (sinusoidal, learned) act on the embeddings,
    not here, and are rejected. ``position_ids`` / ``key_position_ids`` (``(len,)`` or
    ``(batch, len)``) place queries and keys; by default the keys are at ``0 … k_len - 1`` and the
    queries are the last ``q_len`` of them. RoPE rotates ``q`` and ``k`` at those positions. The
    causal mask follows storage order (queries are the last ``q_len`` keys). ``scale`` defaults
    to ``1/√head_dim``. ``key_mask`` ``(batch, k_len)`` (bool, or ints 1 for a token and 0 for
    padding, as ``transformers``' ``attention_mask``) hides padding keys from every query.
    ``attn_implementation``: ``"sdpa"`` (the bias materialised, cached by the encoding) or
    ``"flex_attention"`` (a logit bias as a FlexAttention ``score_mod``, :mod:`pebook.flex`;
    other encodings keep SDPA).
    """
    b, h, lq, lk, d = check_attention_inputs(q, k, v)
    if encoding is None:
        encoding = ENCODINGS["none"]()
    if not isinstance(encoding, PositionalEncoding):
        raise TypeError(
            f"encoding must be a pebook positional encoding module (e.g. pebook.ALiBi(n_heads={h})) or None, "
            f"got {type(encoding).__name__}"
        )
    if encoding.place == "input":
        raise ValueError(
            f"the {encoding.name} encoding is added to the token embeddings, not inside attention; "
            "use MultiHeadAttention or add encoding.embed(...) to the input"
        )
    _check_encoding_fits(encoding, h, d, check_bool("causal", causal))
    options = attend_options(encoding, attn_implementation)
    scale = _check_scale(scale)
    q_pos, k_pos = default_positions(b, lq, lk, q.device, position_ids, key_position_ids)
    check_causal_lengths(causal, lq, lk)
    if key_mask is not None:
        key_mask = check_attention_mask(
            "key_mask",
            key_mask,
            b,
            lk,
            q.device,
            what="k_len",
            left_padded=False,
            values=key_mask.device.type == "cpu",
        )
    q, k = encoding.rotate_queries(q, q_pos), encoding.rotate(k, k_pos)
    return encoding.attend(q, k, v, q_pos, k_pos, causal=causal, scale=scale, key_mask=key_mask, **options)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention whose positional encoding is chosen by name (or given as a module).

    ``encoding`` is a key of :data:`pebook.ENCODINGS` (its options, e.g. ``max_distance`` for
    Shaw, ``rope_base`` / ``rope_layout`` / ``rotary_dim`` for RoPE, ``num_buckets`` /
    ``t5_max_distance`` for T5, ``max_positions`` for learned, go in ``**encoding_options``), or
    an encoding module to share with other layers (T5's one table per stack). ``n_kv_heads``
    (default ``n_heads``) must divide ``n_heads``; ``head_dim`` defaults to ``dim // n_heads``
    (T5-11B and some Llama-family configs use heads that do not fill ``dim``). ``scale``
    multiplies the logits (``None``: ``1/√head_dim``; T5 uses 1.0). ``bias``: biases in the
    projections.

    Projections: ``qkv`` maps ``dim`` to ``(n_heads + 2·n_kv_heads)·head_dim`` features (queries,
    then keys, then values, each head-major) and ``out`` maps ``n_heads·head_dim`` back to ``dim``.

    ``forward(x, position_ids=None, past_kv=None, return_kv=False)`` takes ``x`` of shape
    ``(batch, seq, dim)``; ``position_ids`` ``(batch, seq)`` default to continuing from the
    cache. With ``return_kv`` it also returns a one-layer :class:`pebook.KVCache`.

    KV-cache inference options (both off by default, and then nothing changes):

    * ``cache_rotated_keys`` (default ``True``): the cache holds keys after the encoding's
      ``"qk"`` transform, as ``transformers`` caches RoPE keys. ``False`` caches them *before*
      rotation, with their positions, and rotates every cached key at each step with the
      encoding's current frequencies: what frequencies that change during generation need
      (``transformers``' dynamic RoPE, ``_compute_dynamic_ntk_parameters`` in
      ``modeling_rope_utils``, recomputes them as the sequence grows, and a cache of rotated keys
      then keeps the old rotation) and what StreamingLLM's position shifting needs (Xiao et al.
      2023, "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453, §3.2:
      positions are assigned within the cache, so keys are cached before rotation). The cost: each
      step rotates all ``k`` cached keys, ``O(k · head_dim)`` more work per layer per step
      (against ``O(head_dim)`` for the new key alone). Only for an encoding whose ``place`` is
      ``"qk"``; others transform no key and refuse ``False``.
    * ``sliding_window`` ``W`` (default ``None``): sliding-window attention (Mistral 7B, Jiang et
      al. 2023, arXiv:2310.06825, §2): each query sees only the last ``W`` keys, itself included
      (storage rows ``i - W + 1 … i``), in the full forward pass as with the cache, and a returned
      cache keeps only the last ``W`` tokens (a rolling buffer; ``KVCache.dropped`` counts the
      evicted ones). The evicted tokens' positions are not reused: every kept key keeps its
      position, so the window is defined for every encoding whose attention hook takes the band,
      absolute ones included (their position is already in the cached key). Needs ``causal``
      attention; an encoding that overrides ``attend`` without a ``window`` argument (Shaw) is
      refused.

    ``attn_implementation`` (``transformers``' name): ``"sdpa"`` (default; the materialised
    bias, cached by the encoding) or ``"flex_attention"`` (a logit bias as a FlexAttention
    ``score_mod``, :mod:`pebook.flex`; encodings that add nothing to the scores keep SDPA, CoPE
    refuses it).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        encoding: str | PositionalEncoding = "none",
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool = True,
        scale: float | None = None,
        bias: bool = True,
        cache_rotated_keys: bool = True,
        sliding_window: int | None = None,
        attn_implementation: str = "sdpa",
        **encoding_options,
    ):
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        if head_dim is None and dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads} (or give head_dim)")
        self.n_kv_heads = self.n_heads if n_kv_heads is None else check_int("n_kv_heads", n_kv_heads, minimum=1)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        self.head_dim = dim // n_heads if head_dim is None else check_int("head_dim", head_dim, minimum=1)
        self.causal = check_bool("causal", causal)
        self.scale = _check_scale(scale)
        # projections first, then the encoding: the order in which parameters draw their initial values
        self.qkv = nn.Linear(dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        if isinstance(encoding, PositionalEncoding):
            if encoding_options:
                raise TypeError("options go to the encoding's constructor; an encoding module takes none here")
            _check_encoding_fits(encoding, self.n_heads, self.head_dim, self.causal, self.dim)
            self.position = encoding
        else:
            self.position = build_encoding(
                check_encoding(encoding),
                dim=dim,
                n_heads=self.n_heads,
                head_dim=self.head_dim,
                causal=self.causal,
                **encoding_options,
            )
        self.encoding = self.position.name
        self._attend_options = attend_options(self.position, attn_implementation)
        self.attn_implementation = attn_implementation
        self.cache_rotated_keys = check_bool("cache_rotated_keys", cache_rotated_keys)
        if not cache_rotated_keys:
            check_rotated_keys_option(self.position)
        self.sliding_window = None
        if sliding_window is not None:
            self.sliding_window = check_int("sliding_window", sliding_window, minimum=1)
            if not self.causal:
                raise ValueError(f"sliding_window={sliding_window} needs causal attention, got causal=False")
            if "window" not in inspect.signature(self.position.attend).parameters:
                raise ValueError(
                    f"sliding_window={sliding_window} is not supported by the {self.encoding} encoding: its own "
                    "attention hook (attend) takes no window argument"
                )
            self._attend_options["window"] = self.sliding_window

    def set_rope_frequencies(self, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> None:
        """Give this layer's rotary encoding new frequencies (see :mod:`pebook.rope_scaling`)."""
        if not hasattr(self.position, "set_frequencies"):
            raise ValueError(f"set_rope_frequencies needs a rotary encoding, this layer has encoding={self.encoding!r}")
        self.position.set_frequencies(inv_freq, attention_factor)

    # -- the public entry point validates; the model calls _attend, which trusts its arguments ---

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
        return_kv: bool = False,
    ):
        """``x``: ``(batch, seq, dim)`` → ``(batch, seq, dim)`` (and a one-layer KV cache if ``return_kv``)."""
        check_float_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, seq, dim={self.dim}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        past_len = dropped = 0
        if past_kv is not None:
            past_len = check_cache(
                "past_kv",
                past_kv,
                n_layers=1,
                n_kv_heads=self.n_kv_heads,
                head_dim=self.head_dim,
                batch=b,
                device=x.device,
                dtype=x.dtype,
                keys_rotated=self.cache_rotated_keys,
            )
            dropped = past_kv.dropped
        key_mask = None if past_kv is None else extend_key_mask(past_kv.mask, t)
        if position_ids is None and key_mask is not None:  # a padded cache: each row continues its own count
            if dropped:
                position_ids = continued_positions(key_mask, past_len, past_kv.positions)
            else:
                position_ids = mask_positions(key_mask)[:, -t:]
        q_pos = positions_for(self.position, b, t, dropped + past_len, position_ids, x.device)
        k_pos = q_pos if past_kv is None else torch.cat((past_kv.positions, q_pos), dim=1)
        out, kv = self._attend(x, q_pos, k_pos, None if past_kv is None else past_kv[0], key_mask=key_mask)
        if not return_kv:
            return out
        cache = window_cache(
            (kv,), k_pos, key_mask, self.sliding_window, keys_rotated=self.cache_rotated_keys, dropped=dropped
        )
        return out, cache

    def _attend(self, x, q_pos, k_pos, past=None, bias=None, key_mask=None):
        """Attention of the new tokens ``x`` at ``q_pos`` over the cached and new keys at ``k_pos``.

        Returns ``(output, (keys, values))``; keys are stored after the ``"qk"`` transform, or
        before it with ``cache_rotated_keys=False`` (then all of them, cached and new, are rotated
        here at ``k_pos``). ``key_mask``: ``None`` or ``(batch, k_len)`` bool, False for padding keys.
        """
        b, t, _ = x.shape
        embedded = self.position.embed(q_pos, x.dtype)
        if embedded is not None:
            x = x + embedded
        hd = self.head_dim
        heads = self.qkv(x).view(b, t, -1, hd).transpose(1, 2)  # (batch, q + k + v heads, seq, head_dim)
        q, k, v = heads.split((self.n_heads, self.n_kv_heads, self.n_kv_heads), dim=1)
        if (
            past is not None
            and self.cache_rotated_keys
            and self.position.place == "qk"
            and type(self.position).rotate_queries is PositionalEncoding.rotate_queries
        ):
            # a decoding step: queries and keys rotate alike, so in one call over their heads (the
            # same arithmetic per element); the keys are concatenated to the cache just below, so
            # the view does not keep the queries alive
            q, k = self.position.rotate(heads[:, : self.n_heads + self.n_kv_heads], q_pos).split(
                (self.n_heads, self.n_kv_heads), dim=1
            )
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            stored = k
        elif self.cache_rotated_keys:
            q = self.position.rotate_queries(q, q_pos)
            k = self.position.rotate(k, q_pos)
            if past is not None:
                k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            stored = k
        else:  # cache the keys as projected; rotate all of them with the current frequencies
            q = self.position.rotate_queries(q, q_pos)
            if past is not None:
                k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            stored, k = k, self.position.rotate(k, k_pos)
        out = self.position.attend(
            q,
            k,
            v,
            q_pos,
            k_pos,
            causal=self.causal,
            scale=self.scale,
            bias=bias,
            key_mask=key_mask,
            **self._attend_options,
        )
        return self.out(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)), (stored, v)

    def extra_repr(self) -> str:
        extra = "" if self.cache_rotated_keys else ", cache_rotated_keys=False"
        if self.sliding_window is not None:
            extra += f", sliding_window={self.sliding_window}"
        if self.attn_implementation != "sdpa":
            extra += f", attn_implementation={self.attn_implementation!r}"
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, causal={self.causal}, scale={self.scale}{extra}"


def check_rotated_keys_option(position: PositionalEncoding) -> None:
    """``cache_rotated_keys=False`` needs an encoding that transforms keys (``place == "qk"``)."""
    if position.place != "qk":
        raise ValueError(
            f"cache_rotated_keys=False needs an encoding that rotates queries and keys (place 'qk'); the "
            f"{position.name} encoding has place {position.place!r} and caches keys unchanged"
        )


def positions_for(position: PositionalEncoding, batch: int, seq: int, past_len: int, position_ids, device):
    """Validated ``(batch, seq)`` position ids of new tokens: given, or ``past_len …`` (the default).

    Also asks the encoding whether it can place the last position (a learned table has an end);
    for ids given on a GPU that question would need a host synchronisation and is skipped.
    """
    if position_ids is None:
        position.check_positions(past_len + seq - 1)
        return default_ids(past_len, seq, batch, device)
    ids = check_positions("position_ids", position_ids, batch, seq, device)
    if ids.device.type == "cpu" and ids.numel():
        position.check_positions(int(ids.max()))
    return ids


#: default position tensors kept (one per (start, length, batch, device)), most recent last
_DEFAULT_IDS_SIZE = 8
_DEFAULT_IDS: dict = {}


def default_ids(start: int, length: int, batch: int, device) -> torch.Tensor:
    """``start … start + length - 1`` as a ``(batch, length)`` int64 view, the same tensor each call.

    The same object for the same arguments, so a cached bias (:meth:`pebook.LogitBias.masked_bias`)
    recognises its positions without comparing them; rebuilt if modified in place.
    """
    key = (start, length, batch, torch.device(device))
    entry = _DEFAULT_IDS.pop(key, None)
    if entry is None or entry[0]._version != entry[1]:
        ids = torch.arange(start, start + length, device=device).expand(batch, length)
        entry = (ids, ids._version)
    _DEFAULT_IDS[key] = entry
    while len(_DEFAULT_IDS) > _DEFAULT_IDS_SIZE:
        del _DEFAULT_IDS[next(iter(_DEFAULT_IDS))]
    return entry[0]
