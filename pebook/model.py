"""TinyLM: a small decoder-only language model whose positional encoding is a parameter.

Pre-LN blocks (``x + attn(LN(x))``, ``x + mlp(LN(x))``, as in GPT-2, Radford et al. 2019) with
a causal mask. Where position enters is the encoding's own declaration (:mod:`pebook.encoding`):
an ``"input"`` encoding (sinusoidal, learned) is added once, to the token embeddings, and owned
by the model, as nanoGPT's ``wpe``; an encoding shared across layers (T5's table, ALiBi's fixed
slopes) is one module used by every layer, and its bias is computed once per forward; any other
encoding gets one module per layer. The model is small enough to train on a CPU in the book.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_float_tensor, check_int, check_int_tensor
from .attention import MultiHeadAttention, check_rotated_keys_option, positions_for
from .cache import KVCache, check_cache, extend_key_mask, window_cache
from .masking import check_attention_mask, continued_positions, mask_positions
from .registry import ENCODINGS, build_encoding, check_encoding, encoding_options

__all__ = ["TransformerBlock", "TinyLM"]


class TransformerBlock(nn.Module):
    """One pre-LN decoder block: causal multi-head attention and a 4×-wide GELU MLP.

    ``encoding`` and the keyword options are those of :class:`pebook.MultiHeadAttention`.
    """

    def __init__(self, dim: int, n_heads: int, encoding="none", **attention_options):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, n_heads, encoding, causal=True, **attention_options)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(batch, seq, dim)`` at positions ``0 … seq - 1`` → ``(batch, seq, dim)``."""
        check_float_tensor("x", x, ndim=3)
        if x.shape[-1] != self.attn.dim:
            raise ValueError(f"x must have shape (batch, seq, dim={self.attn.dim}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        pos = torch.arange(t, device=x.device).expand(b, t)
        return self._forward(x, pos, pos)[0]

    def _forward(self, x, q_pos, k_pos, past=None, bias=None, key_mask=None):
        attended, kv = self.attn._attend(self.attn_norm(x), q_pos, k_pos, past, bias, key_mask)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), kv


class TinyLM(nn.Module):
    """Decoder-only language model: ``forward(tokens)`` → logits ``(batch, seq, vocab_size)``.

    ``encoding`` is a key of :data:`pebook.ENCODINGS`; ``**options`` are its options (e.g.
    ``max_distance`` for Shaw, ``rope_base``, ``rotary_dim``) plus ``n_kv_heads`` and ``scale``
    of :class:`pebook.MultiHeadAttention`. ``max_positions`` is the size of the learned table for
    ``encoding="learned"`` (positions past it raise a clear error); for every other encoding it
    only records the context length the model is meant to be trained at, and longer inputs run,
    which is what an extrapolation experiment needs.

    ``forward(tokens, position_ids=None, past_kvs=None, return_kv=False, attention_mask=None)``:
    ``tokens`` is an integer tensor ``(batch, seq)`` (any integer dtype). ``position_ids``
    ``(batch, seq)`` default to continuing from the cache: positions ``past_len … past_len + seq -
    1``. With ``past_kvs`` (the :class:`pebook.KVCache` of an earlier call with
    ``return_kv=True``) the new tokens attend to the cached ones, which is how generation works.
    ``attention_mask`` (1 token, 0 padding, left-padded, as in ``transformers``) runs a batch of
    sequences of different lengths; positions then default to ``cumsum(attention_mask) - 1``.

    KV-cache inference as deployed (see :class:`pebook.MultiHeadAttention` for both):
    ``cache_rotated_keys=False`` caches keys before rotation (``"qk"`` encodings only), so that
    frequencies changed between steps (:meth:`set_rope_frequencies`, or ``rope_frequencies`` of
    :func:`pebook.generate`) apply to every cached key, at the cost of rotating all cached keys at
    every step; ``sliding_window=W`` makes every query see only the last ``W`` tokens (Mistral 7B,
    arXiv:2310.06825), with or without a cache, and keeps at most ``W`` tokens in the returned
    cache. After tokens are evicted, ``attention_mask`` still covers every token so far
    (``past_kvs.dropped + past_kvs.length + seq`` columns, as ``transformers``' does).

    ``attn_implementation`` (``transformers``' name, see :class:`pebook.MultiHeadAttention`):
    ``"sdpa"`` (default) or ``"flex_attention"``; with the latter a logit bias shared across
    layers is not materialised once per forward but read by each layer's ``score_mod``.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_layers: int,
        n_heads: int,
        max_positions: int,
        encoding: str = "rope",
        *,
        n_kv_heads: int | None = None,
        scale: float | None = None,
        cache_rotated_keys: bool = True,
        sliding_window: int | None = None,
        attn_implementation: str = "sdpa",
        **options,
    ):
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.n_layers = check_int("n_layers", n_layers, minimum=1)
        self.max_positions = check_int("max_positions", max_positions, minimum=1)
        self.encoding = check_encoding(encoding)
        check_int("n_heads", n_heads, minimum=1)
        if "max_positions" in encoding_options(encoding):
            options.setdefault("max_positions", max_positions)
        self.token_embedding = nn.Embedding(vocab_size, dim)

        cls = ENCODINGS[encoding]
        if cache_rotated_keys is False:
            check_rotated_keys_option(cls)  # before the blocks, whose own encoding may be "none"
        shape = dict(dim=dim, n_heads=n_heads, head_dim=dim // n_heads, causal=True)
        self.position = None  # an input encoding, owned by the model and added once
        if cls.place == "input":
            self.position = build_encoding(encoding, **shape, **options)
            layer_encodings = ["none"] * n_layers
            options = {}
        elif cls.shared_across_layers:
            shared = build_encoding(encoding, **shape, **options)
            layer_encodings = [shared] * n_layers
            options = {}
        else:
            layer_encodings = [encoding] * n_layers
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                n_heads,
                layer_encoding,
                n_kv_heads=n_kv_heads,
                scale=scale,
                cache_rotated_keys=cache_rotated_keys,
                sliding_window=sliding_window,
                attn_implementation=attn_implementation,
                **options,
            )
            for layer_encoding in layer_encodings
        )
        self.final_norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        attn = self.blocks[0].attn
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.cache_rotated_keys, self.sliding_window = attn.cache_rotated_keys, attn.sliding_window
        self.attn_implementation = attn.attn_implementation
        # one materialised bias for all layers, unless each layer hands its score_mod to FlexAttention
        self._shared_bias = cls.shared_across_layers and cls.place == "logits" and self.attn_implementation == "sdpa"

    @property
    def encoding_module(self):
        """The encoding module: the model's own for an input encoding, else layer 0's."""
        return self.position if self.position is not None else self.blocks[0].attn.position

    def set_rope_frequencies(self, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> None:
        """Give every layer new RoPE frequencies and attention factor (see :mod:`pebook.rope_scaling`)."""
        if not hasattr(self.encoding_module, "set_frequencies"):
            raise ValueError(f"set_rope_frequencies needs a rotary encoding, this model has encoding={self.encoding!r}")
        for block in self.blocks:
            block.attn.set_rope_frequencies(inv_freq, attention_factor)

    def check_inputs(self, tokens, position_ids=None, past_kvs=None, attention_mask=None):
        """Validate one call's arguments; return ``(tokens as int64, position_ids (batch, seq), past_len)``.

        Token ids and ``attention_mask`` values are checked on the CPU only: on a GPU that check
        would force a host synchronisation at every step. See :meth:`forward` for the arguments.
        """
        return self._check_inputs(tokens, position_ids, past_kvs, attention_mask)[:3]

    def _check_inputs(self, tokens, position_ids, past_kvs, attention_mask):
        """:meth:`check_inputs`, plus the key mask for :meth:`forward_trusted` (``None``: no padding)."""
        check_int_tensor("tokens", tokens, ndim=2)
        batch, seq = tokens.shape
        if batch == 0 or seq == 0:
            raise ValueError(f"tokens must have shape (batch >= 1, seq >= 1), got shape {tuple(tokens.shape)}")
        if tokens.device.type == "cpu" and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"tokens must lie in [0, vocab_size={self.vocab_size}), got values in "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        weight = self.token_embedding.weight
        if tokens.device != weight.device:
            raise ValueError(f"tokens is on {tokens.device} but the model is on {weight.device}; move one of them")
        past_len = dropped = 0
        if past_kvs is not None:
            past_len = check_cache(
                "past_kvs",
                past_kvs,
                n_layers=self.n_layers,
                n_kv_heads=self.n_kv_heads,
                head_dim=self.head_dim,
                batch=batch,
                device=weight.device,
                dtype=weight.dtype,
                keys_rotated=self.cache_rotated_keys,
            )
            dropped = past_kvs.dropped  # tokens a sliding window evicted: positions count them
        key_mask = None if past_kvs is None else extend_key_mask(past_kvs.mask, seq)
        if attention_mask is not None:
            on_cpu = attention_mask.device.type == "cpu" if isinstance(attention_mask, torch.Tensor) else False
            what = "past_len + seq" if past_kvs is not None else "seq"
            if dropped:
                what = "past_kvs.dropped + past_len + seq"
            full_mask = check_attention_mask(
                "attention_mask",
                attention_mask,
                batch,
                dropped + past_len + seq,
                tokens.device,
                what=what,
                values=on_cpu,
            )
            if on_cpu and (past_kvs is None or past_kvs.mask is None) and bool(full_mask.all()):
                full_mask = None  # no padding: the unpadded path, bit for bit
            if full_mask is not None and position_ids is None:
                position_ids = mask_positions(full_mask)[:, dropped + past_len :]  # each row counts its own tokens
            key_mask = full_mask if full_mask is None or not dropped else full_mask[:, dropped:]
        elif position_ids is None and key_mask is not None:  # a padded cache: each row continues its count
            if dropped:
                position_ids = continued_positions(key_mask, past_len, past_kvs.positions)
            else:
                position_ids = mask_positions(key_mask)[:, past_len:]
        q_pos = positions_for(self.encoding_module, batch, seq, dropped + past_len, position_ids, tokens.device)
        return tokens.long(), q_pos, past_len, key_mask

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_kvs: KVCache | None = None,
        return_kv: bool = False,
        attention_mask: torch.Tensor | None = None,
    ):
        """Logits ``(batch, seq, vocab_size)`` (and the new :class:`pebook.KVCache` if ``return_kv``).

        ``attention_mask`` (``transformers``' meaning): ``None`` (no padding) or ``(batch, past_len
        + seq)``, 1 for a real token and 0 for padding, covering the cached and the new tokens; it
        must be left-padded (``padding_side="left"``). Padding keys are hidden from every query,
        and the default ``position_ids`` are ``cumsum(attention_mask) - 1`` (padding at 0), so
        each row's logits at its real tokens are those of the row alone, unpadded. The returned
        cache keeps the mask: later steps need no ``attention_mask``.
        """
        tokens, q_pos, _, key_mask = self._check_inputs(tokens, position_ids, past_kvs, attention_mask)
        return self.forward_trusted(tokens, q_pos, past_kvs, return_kv, attention_mask=key_mask)

    def forward_trusted(self, tokens, q_pos, past_kvs=None, return_kv: bool = False, *, attention_mask=None):
        """:meth:`forward` for arguments already validated by :meth:`check_inputs` (no checks).

        ``attention_mask``: ``None`` or a validated bool ``(batch, past_len + seq)`` mask, False for
        padding; with ``None`` a padded cache's own mask is continued (new tokens are real).
        """
        x = self.token_embedding(tokens)
        if self.position is not None:
            x = x + self.position.embed(q_pos, x.dtype)
        dropped = 0 if past_kvs is None else past_kvs.dropped
        k_pos = q_pos if past_kvs is None else torch.cat((past_kvs.positions, q_pos), dim=1)
        key_mask = attention_mask
        if key_mask is None and past_kvs is not None:
            key_mask = extend_key_mask(past_kvs.mask, tokens.shape[1])
        bias = self.blocks[0].attn.position.logit_bias(q_pos, k_pos) if self._shared_bias else None
        new_kvs = []
        for layer, block in enumerate(self.blocks):
            past = None if past_kvs is None else past_kvs[layer]
            x, kv = block._forward(x, q_pos, k_pos, past, bias, key_mask)
            new_kvs.append(kv)
        logits = self.lm_head(self.final_norm(x))
        if not return_kv:
            return logits
        if self.sliding_window is None and self.cache_rotated_keys:
            return logits, KVCache(new_kvs, k_pos, key_mask)
        cache = window_cache(
            new_kvs, k_pos, key_mask, self.sliding_window, keys_rotated=self.cache_rotated_keys, dropped=dropped
        )
        return logits, cache
