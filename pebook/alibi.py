"""Attention with Linear Biases (ALiBi).

Press, Smith & Lewis (2022), "Train Short, Test Long: Attention with Linear Biases Enables
Input Length Extrapolation", arXiv:2108.12409, §3. No position is added to the input and
nothing is learned: head ``h`` adds the fixed penalty ``-m_h · (i - j)`` to the logit of query
``i`` and key ``j`` before the softmax,

    softmax(q_i Kᵀ / sqrt(d) + m_h · [-(i-1), …, -2, -1, 0])                      (§3)

with the head slopes a geometric sequence: for ``n`` heads (a power of two) it starts at
``2^(-8/n)`` with that same ratio, e.g. ``1/2, 1/4, …, 1/256`` for 8 heads. For other head
counts the reference code takes the ``2^⌊log2 n⌋`` slopes of the closest power of two, then
every other slope of the next power of two.

Without a causal mask (an encoder) the signed bias would *reward* keys after the query; the
bidirectional form in use is the symmetric ``-m_h · |i - j|`` (MosaicBERT, Portes et al. 2023,
arXiv:2312.17482), which :class:`ALiBi` applies when ``causal=False``.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_bool, check_float_dtype, check_float_tensor, check_int, check_positive_float
from .encoding import LogitBias

__all__ = ["alibi_slopes", "alibi_bias", "alibi_distance_weights", "alibi_effective_window", "ALiBi"]


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (h + 1) for h in range(n)]


def alibi_slopes(n_heads: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Head slopes ``m_h`` of the reference ``get_slopes`` (Press et al. 2022), shape ``(n_heads,)``."""
    n_heads = check_int("n_heads", n_heads, minimum=1)
    check_float_dtype("dtype", dtype)
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = _power_of_two_slopes(closest)
    if closest < n_heads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=dtype, device=device)


def alibi_bias(
    q_len: int, k_len: int, slopes: torch.Tensor, offset: int = 0, *, symmetric: bool = False
) -> torch.Tensor:
    """Additive bias ``-m_h · (i - j)``, shape ``(heads, q_len, k_len)``, dtype and device of ``slopes``.

    Query ``i`` is at absolute position ``offset + i``, key ``j`` at position ``j``. Under a
    causal mask only ``j <= i`` is used, where the bias is ``-m_h`` times the distance.
    ``symmetric=True`` gives the bidirectional ``-m_h · |i - j|``.
    """
    q_len = check_int("q_len", q_len, minimum=0)
    k_len = check_int("k_len", k_len, minimum=0)
    offset = check_int("offset", offset, minimum=0)
    check_float_tensor("slopes", slopes, ndim=1)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    device = slopes.device
    q_pos = torch.arange(offset, offset + q_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    return _alibi_score(
        slopes, torch.arange(slopes.numel(), device=device)[:, None, None], q_pos[:, None], k_pos, symmetric
    )


def _alibi_score(slopes, head, q_pos, k_pos, symmetric: bool) -> torch.Tensor:
    distance = q_pos - k_pos
    if symmetric:
        distance = distance.abs()
    return -slopes[head] * distance.to(slopes.dtype)


def alibi_distance_weights(slopes: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Attention weights of one query over ``n_keys`` keys when every content score is equal.

    Shape ``(heads, n_keys)``, dtype and device of ``slopes``; column ``d`` is the key at
    distance ``d`` behind the query (``d = 0`` is the query's own position). With the content
    term ``q·k`` the same for every key, softmax is invariant to it, and what is left of
    Press, Smith & Lewis (2022, arXiv:2108.12409, §3) is the bias alone:

        w_h(d) = exp(-m_h d) / Σ_{d'=0}^{n_keys-1} exp(-m_h d')

    a geometric decay: ``w_h(d + 1) / w_h(d) = exp(-m_h)``.
    """
    check_float_tensor("slopes", slopes, ndim=1)
    n_keys = check_int("n_keys", n_keys, minimum=1)
    distance = torch.arange(n_keys, device=slopes.device).to(slopes.dtype)
    return torch.softmax(-slopes[:, None] * distance, dim=-1)


def alibi_effective_window(slopes: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Distance ``ln(1/fraction) / m_h`` at which a head's weight falls to ``fraction`` of the nearest key's.

    Shape ``(heads,)``, dtype and device of ``slopes``. Follows from the geometric decay of
    :func:`alibi_distance_weights`: ``w_h(d) / w_h(0) = exp(-m_h d)`` (Press, Smith & Lewis
    2022, arXiv:2108.12409, §3, with equal content scores). The first integer distance whose
    weight is at most ``fraction`` times the nearest one is the ceiling of this value.
    """
    check_float_tensor("slopes", slopes, ndim=1)
    if not bool((slopes > 0).all()):
        raise ValueError(f"slopes must all be > 0 (a head with slope <= 0 has no finite window), got {slopes.tolist()}")
    fraction = check_positive_float("fraction", fraction)
    if fraction >= 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    return math.log(1.0 / fraction) / slopes


class ALiBi(LogitBias):
    """Registry entry ``"alibi"``: the fixed bias ``-m_h (i - j)``, or ``-m_h |i - j|`` when not causal.

    Nothing is learned; the slopes are a buffer kept in float32 under ``.half()``. ``slopes`` may
    be given to override :func:`alibi_slopes`.
    """

    name = "alibi"
    shared_across_layers = True  # fixed: one bias serves every layer
    full_precision_buffers = ("slopes",)

    def __init__(self, *, n_heads: int, causal: bool = True, slopes: torch.Tensor | None = None):
        super().__init__()
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        self.causal = check_bool("causal", causal)
        if slopes is None:
            slopes = alibi_slopes(self.n_heads)
        check_float_tensor("slopes", slopes, ndim=1)
        if slopes.numel() != self.n_heads:
            raise ValueError(f"slopes must have one entry per head ({self.n_heads}), got {slopes.numel()}")
        self.register_buffer("slopes", slopes.detach().clone(), persistent=False)

    def declared_parameters(self):
        return {"slopes": ((self.n_heads,), False)}

    depends_on = "distance"

    def distance_key(self, distance):
        return distance.abs() if not self.causal else distance

    def key_score(self, head, key):  # _alibi_score's operations, from the distance on
        return -self.slopes[head] * key.to(self.slopes.dtype)

    def linear_slopes(self):
        """The slopes when causal: the bias is then linear in the distance (:mod:`pebook.banded`)."""
        return self.slopes if self.causal else None

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, causal={self.causal}"
