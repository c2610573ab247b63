"""T5's bucketed relative position bias.

Raffel, Shazeer, Roberts, Lee, Narang, Matena, Zhou, Li & Liu (2020), "Exploring the Limits of
Transfer Learning with a Unified Text-to-Text Transformer", arXiv:1910.10683, §2.1. Each head
learns one scalar per bucket of the relative position ``j - i``, added to the attention logits.
Half the buckets (per direction when bidirectional) are exact small offsets; the rest cover
offsets up to ``max_distance`` on a logarithmic scale, and every larger offset shares the last
bucket. The bucketing follows the reference ``_relative_position_bucket`` of Mesh TensorFlow
(also in ``transformers``' ``T5Attention``).

T5 computes the bias once, in the first layer, and every layer reuses it: one table per stack
(§2.1: "we share the position embedding parameters across all layers"). Per-layer tables are the
UMT5 variant. T5 also does not scale the logits by ``1/√d`` (it folds that into the
initialisation of the query weights); :class:`pebook.MultiHeadAttention` takes ``scale=1.0``
for that.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_bool, check_int, check_int_tensor
from .encoding import LogitBias

__all__ = ["t5_relative_bucket", "T5RelativeBias", "T5PE"]


def t5_relative_bucket(
    relative_position: torch.Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """Bucket index in ``[0, num_buckets)`` for each relative position ``j - i``.

    Bidirectional: buckets ``[0, n/2)`` are for ``j - i <= 0`` and ``[n/2, n)`` for ``j - i > 0``.
    Unidirectional (causal): all ``n`` buckets are for ``j - i <= 0``; positive offsets map to 0.
    Within a direction, with ``m`` buckets, distances ``< m/2`` are exact and distances from
    ``m/2`` to ``max_distance`` are spread logarithmically over the other ``m/2`` buckets.
    """
    check_int_tensor("relative_position", relative_position)
    if not relative_position.dtype.is_signed:
        raise TypeError(
            f"relative_position must be a signed integer tensor (offsets j - i can be negative), "
            f"got dtype {relative_position.dtype}"
        )
    num_buckets = check_int("num_buckets", num_buckets, minimum=2)
    max_distance = check_int("max_distance", max_distance, minimum=1)
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    if bidirectional and num_buckets % 2:
        raise ValueError(f"num_buckets must be even when bidirectional=True, got {num_buckets}")
    max_exact = per_direction // 2
    if max_exact < 1 or max_distance <= max_exact:
        raise ValueError(
            f"max_distance must exceed the {max_exact} exact buckets (num_buckets={num_buckets}, "
            f"bidirectional={bidirectional}), got max_distance={max_distance}"
        )
    return _bucket(relative_position, bidirectional, num_buckets, max_distance)


def _bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """:func:`t5_relative_bucket` without argument checks (pointwise: usable in a ``score_mod``)."""
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_direction // 2
    if bidirectional:
        direction = (relative_position > 0).long() * per_direction
        distance = relative_position.abs()
    else:
        direction = 0
        distance = (-relative_position).clamp(min=0)
    distance = distance.long()
    is_small = distance < max_exact
    # log-spaced buckets for max_exact <= distance < max_distance; the clamp keeps log() finite
    # float32, as in the reference implementation, so bucket edges match it exactly
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    if_large = max_exact + (log_ratio * (per_direction - max_exact)).long()
    if_large = if_large.clamp(max=per_direction - 1)
    return direction + torch.where(is_small, distance, if_large)


class T5RelativeBias(nn.Module):
    """Learned per-head scalar bias for each T5 bucket: ``forward(q_len, k_len, offset)`` → ``(heads, q_len, k_len)``.

    Query ``i`` is at absolute position ``offset + i`` and key ``j`` at ``j``. The bias is added to
    the attention logits; it is the same for every pair with the same bucket (Toeplitz).
    """

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = False):
        super().__init__()
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        self.num_buckets = check_int("num_buckets", num_buckets, minimum=2)
        self.max_distance = check_int("max_distance", max_distance, minimum=1)
        self.bidirectional = bool(bidirectional)
        # validate the bucket arguments once, at construction time
        t5_relative_bucket(torch.zeros(1, dtype=torch.long), self.bidirectional, self.num_buckets, self.max_distance)
        self.bias = nn.Embedding(self.num_buckets, self.n_heads)

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        q_len = check_int("q_len", q_len, minimum=0)
        k_len = check_int("k_len", k_len, minimum=0)
        offset = check_int("offset", offset, minimum=0)
        device = self.bias.weight.device
        relative = (
            torch.arange(k_len, device=device)[None, :] - torch.arange(offset, offset + q_len, device=device)[:, None]
        )
        buckets = t5_relative_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.bias(buckets).permute(2, 0, 1)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
            f"bidirectional={self.bidirectional}"
        )


class T5PE(LogitBias):
    """Registry entry ``"t5"``: ``table[bucket(k_pos - q_pos), head]`` added to the logits.

    Shared by all layers of a model (Raffel et al. 2020, §2.1). Buckets are bidirectional iff
    ``causal=False``. Options ``num_buckets`` (32) and ``t5_max_distance`` (128).
    """

    name = "t5"
    shared_across_layers = True

    def __init__(self, *, n_heads: int, causal: bool = True, num_buckets: int = 32, t5_max_distance: int = 128):
        super().__init__()
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        self.causal = check_bool("causal", causal)
        t5_max_distance = check_int("t5_max_distance", t5_max_distance, minimum=1)  # named as the option
        self.relative_bias = T5RelativeBias(n_heads, num_buckets, t5_max_distance, bidirectional=not causal)

    def declared_parameters(self):
        return {"relative_bias.bias.weight": ((self.relative_bias.num_buckets, self.n_heads), True)}

    depends_on = "distance"

    def distance_key(self, distance):
        """The bucket of the relative position ``k_pos - q_pos = -distance``."""
        rb = self.relative_bias
        return _bucket(-distance, rb.bidirectional, rb.num_buckets, rb.max_distance)

    def key_score(self, head, key):
        return self.relative_bias.bias.weight[key, head]

    def constant_beyond(self):
        """Offsets of ``max_distance`` or more share the last bucket of their direction (:mod:`pebook.banded`)."""
        return self.relative_bias.max_distance
