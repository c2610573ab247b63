"""Multi-head attention with any of the book's positional encodings.

Where each encoding enters the computation:

* ``"sinusoidal"``, ``"learned"`` — added to the *input* of attention (Vaswani et al. 2017;
  Gehring et al. 2017). In :class:`MultiHeadAttention` they are added to ``x`` before the
  projections, as in a one-layer model; :class:`pebook.TinyLM` adds them once, to the token
  embeddings, and builds its layers with ``"none"``.
* ``"t5"``, ``"alibi"`` — an additive bias on the *logits* (Raffel et al. 2020; Press et al. 2022).
* ``"rope"`` — a *rotation* of queries and keys (Su et al. 2021).
* ``"shaw"`` — a key term on the logits and a value term on the output (Shaw et al. 2018).
* ``"none"`` — no position at all (NoPE).

Every path except Shaw's runs on ``torch.nn.functional.scaled_dot_product_attention``.
Tensors inside attention are ``(batch, heads, seq, head_dim)``; query ``i`` sits at absolute
position ``offset + i`` and key ``j`` at position ``j``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_attention_inputs, check_float_tensor, check_int, check_positive_float
from .alibi import alibi_bias, alibi_slopes
from .learned import LearnedPositionalEmbedding
from .masking import causal_mask, query_positions
from .rope import DEFAULT_ROPE_BASE, ROPE_LAYOUTS, apply_rope, rope_frequencies
from .shaw import shaw_attention
from .sinusoidal import DEFAULT_SINUSOIDAL_BASE, sinusoidal_encoding
from .t5 import T5RelativeBias, t5_relative_bucket

__all__ = ["ENCODINGS", "ABSOLUTE_ENCODINGS", "check_encoding", "positional_attention", "MultiHeadAttention"]

ENCODINGS = ("none", "sinusoidal", "learned", "shaw", "t5", "rope", "alibi")
ABSOLUTE_ENCODINGS = ("sinusoidal", "learned")

# keyword parameters each encoding takes in positional_attention: name -> required?
_ENCODING_PARAMS = {
    "none": {},
    "sinusoidal": {},
    "learned": {},
    "rope": {"inv_freq": True, "layout": False},
    "alibi": {"slopes": True},
    "t5": {"bias_table": True, "max_distance": False},
    "shaw": {"rel_k": True, "rel_v": True, "max_distance": True},
}


def check_encoding(encoding) -> str:
    """Return ``encoding`` if it is one of :data:`ENCODINGS`, else raise ``ValueError``."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    return encoding


def _check_params(encoding: str, params: dict) -> None:
    allowed = _ENCODING_PARAMS[encoding]
    unexpected = sorted(set(params) - set(allowed))
    if unexpected:
        raise TypeError(
            f"encoding={encoding!r} takes no parameter {unexpected[0]!r}; it takes {sorted(allowed) or 'none'}"
        )
    missing = [name for name, required in allowed.items() if required and params.get(name) is None]
    if missing:
        raise TypeError(f"encoding={encoding!r} needs the keyword argument {missing[0]!r}")


def _sdpa(q, k, v, bias, causal: bool, offset: int) -> torch.Tensor:
    """Scaled dot-product attention with an optional ``(heads, q_len, k_len)`` bias and an offset causal mask."""
    lq, lk = q.shape[-2], k.shape[-2]
    if bias is None and (not causal or (offset == 0 and lq == lk)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if causal:
        allowed = causal_mask(lq, lk, offset, device=q.device)
        mask = allowed if bias is None else bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
    else:
        mask = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def positional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    encoding: str = "none",
    *,
    causal: bool = True,
    offset: int | None = None,
    keys_encoded: bool = False,
    mask_offset: int | None = None,
    **params,
) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` (all ``(batch, heads, seq, head_dim)``) with one encoding.

    ``offset`` is the absolute position of the first query (``None``: ``k_len - q_len``, the
    queries are the last positions). Parameters per encoding:

    * ``"rope"``: ``inv_freq`` (:func:`pebook.rope_frequencies`), ``layout`` (``"half"``).
      ``q`` is rotated at positions ``offset + i`` and ``k`` at ``j`` unless
      ``keys_encoded=True`` (keys already rotated, as in a RoPE KV cache).
    * ``"alibi"``: ``slopes`` (:func:`pebook.alibi_slopes`).
    * ``"t5"``: ``bias_table`` of shape ``(num_buckets, heads)``, ``max_distance`` (128); the
      buckets are bidirectional iff ``causal=False``.
    * ``"shaw"``: ``rel_k``, ``rel_v`` of shape ``(2*max_distance + 1, head_dim)``, ``max_distance``.
    * ``"none"``, ``"sinusoidal"``, ``"learned"``: nothing (absolute encodings enter at the input).

    ``mask_offset`` (default: ``offset``) places the queries for the causal mask only; giving it a
    different value than ``offset`` reproduces the bug of encoding new tokens at wrong positions.
    """
    encoding = check_encoding(encoding)
    _check_params(encoding, params)
    _, h, lq, lk, _ = check_attention_inputs(q, k, v)
    offset = lk - lq if offset is None else check_int("offset", offset, minimum=0)
    if offset < 0:
        raise ValueError(f"with offset=None the queries are the last keys, so q_len={lq} must be <= k_len={lk}")
    mask_offset = offset if mask_offset is None else check_int("mask_offset", mask_offset, minimum=0)

    if encoding == "shaw":
        return shaw_attention(
            q, k, v, params["rel_k"], params["rel_v"], params["max_distance"], causal, offset, mask_offset
        )
    bias = None
    if encoding == "rope":
        inv_freq, layout = params["inv_freq"], params.get("layout", "half")
        q = apply_rope(q, query_positions(lq, offset, device=q.device), inv_freq, layout)
        if not keys_encoded:
            k = apply_rope(k, torch.arange(lk, device=k.device), inv_freq, layout)
    elif encoding == "alibi":
        slopes = params["slopes"]
        check_float_tensor("slopes", slopes, ndim=1)
        if slopes.numel() != h:
            raise ValueError(f"slopes must have one entry per head ({h}), got {slopes.numel()}")
        bias = alibi_bias(lq, lk, slopes.to(q.device), offset)
    elif encoding == "t5":
        table = params["bias_table"]
        check_float_tensor("bias_table", table, ndim=2)
        if table.shape[1] != h:
            raise ValueError(f"bias_table must have shape (num_buckets, heads={h}), got {tuple(table.shape)}")
        relative = torch.arange(lk, device=q.device)[None, :] - query_positions(lq, offset, device=q.device)[:, None]
        max_distance = params.get("max_distance")
        buckets = t5_relative_bucket(relative, not causal, table.shape[0], 128 if max_distance is None else max_distance)
        bias = table.to(q.device)[buckets].permute(2, 0, 1)
    return _sdpa(q, k, v, bias, causal, mask_offset)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention whose positional encoding is chosen by name.

    ``encoding`` is one of :data:`ENCODINGS`. Options: ``max_positions`` (size of the learned
    table, required for ``"learned"``), ``max_distance`` (Shaw's clipping distance ``k``, 16),
    ``num_buckets`` / ``t5_max_distance`` (32 / 128), ``rope_base`` / ``rope_layout``
    (10000 / ``"half"``), ``sinusoidal_base`` (10000).

    ``forward(x, past_kv=None)`` takes ``x`` of shape ``(batch, seq, dim)``. With ``past_kv`` —
    the ``(k, v)`` pair returned by an earlier call with ``return_kv=True`` — the new tokens
    are at positions ``past_len …`` and attend to the cached keys too. RoPE keys are cached
    already rotated.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        encoding: str = "none",
        *,
        causal: bool = True,
        max_positions: int | None = None,
        max_distance: int = 16,
        num_buckets: int = 32,
        t5_max_distance: int = 128,
        rope_base: float = DEFAULT_ROPE_BASE,
        rope_layout: str = "half",
        sinusoidal_base: float = DEFAULT_SINUSOIDAL_BASE,
        bias: bool = True,
    ):
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.head_dim = dim // n_heads
        self.encoding = check_encoding(encoding)
        self.causal = bool(causal)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

        if encoding == "sinusoidal":
            sinusoidal_encoding(1, dim, sinusoidal_base)  # validates dim and base now, not at forward
            self.sinusoidal_base = sinusoidal_base
        elif encoding == "learned":
            if max_positions is None:
                raise TypeError("encoding='learned' needs max_positions (the size of the table)")
            self.position_embedding = LearnedPositionalEmbedding(max_positions, dim)
        elif encoding == "shaw":
            self.max_distance = check_int("max_distance", max_distance, minimum=0)
            scale = self.head_dim**-0.5
            self.rel_k = nn.Parameter(torch.randn(2 * self.max_distance + 1, self.head_dim) * scale)
            self.rel_v = nn.Parameter(torch.randn(2 * self.max_distance + 1, self.head_dim) * scale)
        elif encoding == "t5":
            self.t5_bias = T5RelativeBias(n_heads, num_buckets, t5_max_distance, bidirectional=not causal)
        elif encoding == "rope":
            if rope_layout not in ROPE_LAYOUTS:
                raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}")
            if self.head_dim % 2:
                raise ValueError(f"rope needs an even head_dim, got dim={dim} / n_heads={n_heads} = {self.head_dim}")
            self.rope_layout = rope_layout
            self.register_buffer("inv_freq", rope_frequencies(self.head_dim, rope_base), persistent=False)
            self.rope_attention_factor = 1.0
        elif encoding == "alibi":
            self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def set_rope_frequencies(self, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> None:
        """Replace the RoPE frequencies (e.g. by a context-extension rule) and the attention factor.

        ``attention_factor`` multiplies the rotated queries and keys, so the logits are scaled by
        its square (YaRN's temperature ``1/t = factor²``; 1.0 leaves attention unchanged).
        """
        if self.encoding != "rope":
            raise ValueError(f"set_rope_frequencies needs encoding='rope', this layer has encoding={self.encoding!r}")
        check_float_tensor("inv_freq", inv_freq, ndim=1)
        if inv_freq.numel() != self.head_dim // 2:
            raise ValueError(f"inv_freq must have head_dim/2 = {self.head_dim // 2} entries, got {inv_freq.numel()}")
        self.rope_attention_factor = check_positive_float("attention_factor", attention_factor)
        self.inv_freq = inv_freq.to(self.inv_freq.device, self.inv_freq.dtype)

    def _encoding_params(self) -> dict:
        if self.encoding == "shaw":
            return {"rel_k": self.rel_k, "rel_v": self.rel_v, "max_distance": self.max_distance}
        if self.encoding == "t5":
            return {"bias_table": self.t5_bias.bias.weight, "max_distance": self.t5_bias.max_distance}
        if self.encoding == "rope":
            return {"inv_freq": self.inv_freq, "layout": self.rope_layout}
        if self.encoding == "alibi":
            return {"slopes": self.slopes}
        return {}

    def _check_past(self, x: torch.Tensor, past_kv) -> int:
        if past_kv is None:
            return 0
        if not (isinstance(past_kv, tuple) and len(past_kv) == 2):
            raise TypeError("past_kv must be the (k, v) tuple returned with return_kv=True")
        past_k, past_v = past_kv
        expected = (x.shape[0], self.n_heads, self.head_dim)
        for name, t in (("past_kv[0]", past_k), ("past_kv[1]", past_v)):
            check_float_tensor(name, t, ndim=4)
            if (t.shape[0], t.shape[1], t.shape[3]) != expected or t.device != x.device:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} on {t.device}, but this layer needs "
                    f"(batch={expected[0]}, heads={expected[1]}, past_len, head_dim={expected[2]}) on {x.device}"
                )
        if past_k.shape[2] != past_v.shape[2]:
            raise ValueError(f"past keys ({past_k.shape[2]}) and values ({past_v.shape[2]}) differ in length")
        return past_k.shape[2]

    def forward(
        self,
        x: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_kv: bool = False,
        position_offset: int | None = None,
    ):
        """``x``: ``(batch, seq, dim)`` → ``(batch, seq, dim)`` (and the ``(k, v)`` cache if ``return_kv``).

        ``position_offset`` is the position the encoding gives the first new token; ``None``, the
        correct value, is the cache length. Any other value reproduces the classic decoding bug
        (e.g. positions restarting at 0 after the prompt); the causal mask is unaffected.
        """
        check_float_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, seq, dim={self.dim}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        past_len = self._check_past(x, past_kv)
        start = past_len if position_offset is None else check_int("position_offset", position_offset, minimum=0)

        if self.encoding == "sinusoidal":
            x = x + sinusoidal_encoding(t, self.dim, self.sinusoidal_base, start, dtype=x.dtype, device=x.device)
        elif self.encoding == "learned":
            x = x + self.position_embedding(t, start)

        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        params = self._encoding_params()
        if self.encoding == "rope":  # rotate the new queries and keys at their positions, then cache the keys
            positions = query_positions(t, start, device=x.device)
            q = apply_rope(q, positions, self.inv_freq, self.rope_layout) * self.rope_attention_factor
            k = apply_rope(k, positions, self.inv_freq, self.rope_layout) * self.rope_attention_factor
            params = {}
        if past_kv is not None:
            k, v = torch.cat((past_kv[0], k), dim=2), torch.cat((past_kv[1], v), dim=2)
        out = positional_attention(
            q,
            k,
            v,
            "none" if self.encoding == "rope" else self.encoding,
            causal=self.causal,
            offset=start,
            mask_offset=past_len,
            **params,
        )
        out = self.out(out.transpose(1, 2).reshape(b, t, self.dim))
        return (out, (k, v)) if return_kv else out
