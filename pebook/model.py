"""TinyLM: a small decoder-only language model whose positional encoding is a parameter.

Pre-LN blocks (``x + attn(LN(x))``, ``x + mlp(LN(x))``, as in GPT-2, Radford et al. 2019) with
a causal mask. Absolute encodings (``"sinusoidal"``, ``"learned"``) are added once to the token
embeddings; the other encodings act inside every attention layer. The model is small enough to
train on a CPU in the book's chapters.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_float_tensor, check_int, check_int_tensor
from .attention import ABSOLUTE_ENCODINGS, MultiHeadAttention, check_encoding
from .learned import LearnedPositionalEmbedding
from .sinusoidal import DEFAULT_SINUSOIDAL_BASE, sinusoidal_encoding

__all__ = ["TransformerBlock", "TinyLM"]


class TransformerBlock(nn.Module):
    """One pre-LN decoder block: causal multi-head attention and a 4×-wide GELU MLP."""

    def __init__(self, dim: int, n_heads: int, encoding: str = "none", **attention_options):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, n_heads, encoding, causal=True, **attention_options)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, past_kv=None, return_kv: bool = False, position_offset: int | None = None):
        attended = self.attn(self.attn_norm(x), past_kv=past_kv, return_kv=return_kv, position_offset=position_offset)
        if return_kv:
            attended, kv = attended
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return (x, kv) if return_kv else x


class TinyLM(nn.Module):
    """Decoder-only language model: ``forward(tokens)`` → logits ``(batch, seq, vocab_size)``.

    ``max_positions`` is the size of the learned table for ``encoding="learned"`` (longer inputs
    raise a clear error). For every other encoding it only records the context length the
    model is meant to be trained at; longer inputs run, which is what an extrapolation
    experiment needs. Extra keyword options go to :class:`pebook.MultiHeadAttention`
    (e.g. ``max_distance`` for Shaw, ``rope_base``).

    ``forward(tokens, past_kvs=None, return_kv=False)``: with ``past_kvs`` (the per-layer list
    returned by an earlier call with ``return_kv=True``) the new tokens continue at position
    ``past_len``, which is how generation with a KV cache works.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_layers: int,
        n_heads: int,
        max_positions: int,
        encoding: str = "rope",
        **attention_options,
    ):
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.n_layers = check_int("n_layers", n_layers, minimum=1)
        self.max_positions = check_int("max_positions", max_positions, minimum=1)
        self.encoding = check_encoding(encoding)
        self.token_embedding = nn.Embedding(vocab_size, dim)
        if encoding == "learned":
            self.position_embedding = LearnedPositionalEmbedding(max_positions, dim)
        self.sinusoidal_base = attention_options.pop("sinusoidal_base", DEFAULT_SINUSOIDAL_BASE)
        if encoding == "sinusoidal":
            sinusoidal_encoding(1, dim, self.sinusoidal_base)  # validates dim and base at construction
        layer_encoding = "none" if encoding in ABSOLUTE_ENCODINGS else encoding
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, n_heads, layer_encoding, **attention_options) for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def _check_tokens(self, tokens) -> None:
        check_int_tensor("tokens", tokens, ndim=2)
        if tokens.shape[1] == 0:
            raise ValueError(f"tokens must hold at least one position, got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"tokens must lie in [0, vocab_size={self.vocab_size}), got values in "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )

    def _check_past_kvs(self, past_kvs) -> int:
        """Validate the per-layer cache structure; return the number of cached positions."""
        if past_kvs is None:
            return 0
        if not isinstance(past_kvs, (list, tuple)) or len(past_kvs) != self.n_layers:
            got = len(past_kvs) if isinstance(past_kvs, (list, tuple)) else type(past_kvs).__name__
            raise ValueError(f"past_kvs must hold one (k, v) per layer ({self.n_layers}), got {got}")
        lengths = []
        for layer, kv in enumerate(past_kvs):
            if not (isinstance(kv, tuple) and len(kv) == 2):
                raise TypeError(f"past_kvs[{layer}] must be a (k, v) tuple from return_kv=True, got {type(kv).__name__}")
            for part, tensor in zip("kv", kv):
                check_float_tensor(f"past_kvs[{layer}].{part}", tensor, ndim=4)
            lengths.append(kv[0].shape[2])
        if len(set(lengths)) > 1:
            raise ValueError(f"past_kvs: every layer's cache must hold the same number of positions, got lengths {lengths}")
        return lengths[0]

    def set_rope_frequencies(self, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> None:
        """Give every layer new RoPE frequencies and attention factor (see :mod:`pebook.rope_scaling`)."""
        if self.encoding != "rope":
            raise ValueError(f"set_rope_frequencies needs encoding='rope', this model has encoding={self.encoding!r}")
        for block in self.blocks:
            block.attn.set_rope_frequencies(inv_freq, attention_factor)

    def forward(
        self,
        tokens: torch.Tensor,
        past_kvs: list | None = None,
        return_kv: bool = False,
        position_offset: int | None = None,
    ):
        """Logits ``(batch, seq, vocab_size)`` (and the per-layer caches if ``return_kv``).

        ``position_offset``: the position the encodings give the first token; ``None`` (correct)
        means the cache length. Other values exist to reproduce the classic decoding bug.
        """
        self._check_tokens(tokens)
        past_len = self._check_past_kvs(past_kvs)
        start = past_len if position_offset is None else check_int("position_offset", position_offset, minimum=0)
        t = tokens.shape[1]
        x = self.token_embedding(tokens)
        if self.encoding == "learned":
            x = x + self.position_embedding(t, start)
        elif self.encoding == "sinusoidal":
            x = x + sinusoidal_encoding(t, self.dim, self.sinusoidal_base, offset=start, dtype=x.dtype, device=x.device)

        new_kvs = []
        for layer, block in enumerate(self.blocks):
            past = None if past_kvs is None else past_kvs[layer]
            x = block(x, past_kv=past, return_kv=return_kv, position_offset=start)
            if return_kv:
                x, kv = x
                new_kvs.append(kv)
        logits = self.lm_head(self.final_norm(x))
        return (logits, new_kvs) if return_kv else logits
