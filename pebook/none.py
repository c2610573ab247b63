"""No positional encoding (NoPE): attention sees a set of tokens, not a sequence.

Without any encoding, self-attention is permutation-equivariant (Vaswani et al. 2017,
arXiv:1706.03762, §3.5 motivates its encodings by this). With a causal mask a decoder can still
infer position from how many tokens it sees (Haviv et al. 2022, "Transformer Language Models
without Positional Encodings Still Learn Positional Information", arXiv:2203.16634).
"""

from __future__ import annotations

from .encoding import PositionalEncoding

__all__ = ["NoPE"]


class NoPE(PositionalEncoding):
    """The encoding that adds nothing: plain ``softmax(q kᵀ/√d) v``."""

    name = "none"
    place = "none"
