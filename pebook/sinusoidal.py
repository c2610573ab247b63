"""Sinusoidal absolute positional encoding.

Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser & Polosukhin (2017), "Attention Is
All You Need", arXiv:1706.03762, §3.5:

    PE(p, 2i)   = sin(p / base^(2i/d))
    PE(p, 2i+1) = cos(p / base^(2i/d))

Features ``2i`` and ``2i+1`` share the angular frequency ``ω_i = base^(-2i/d)``, so the
wavelengths ``2π / ω_i`` run geometrically from ``2π`` to ``2π · base^((d-2)/d)``. Because
each (sin, cos) pair is a point on a circle turning at rate ``ω_i``, moving ``k`` positions
is a rotation: ``PE(p + k) = M_k PE(p)`` with ``M_k`` block-diagonal (see
:func:`sinusoidal_shift_matrix`).
"""

from __future__ import annotations

import torch

from ._checks import check_even, check_float_dtype, check_int, check_positive_float

__all__ = ["sinusoidal_frequencies", "sinusoidal_encoding", "sinusoidal_shift_matrix"]

DEFAULT_SINUSOIDAL_BASE = 10000.0


def sinusoidal_frequencies(dim: int, base: float = DEFAULT_SINUSOIDAL_BASE, *, device=None) -> torch.Tensor:
    """Angular frequencies ``ω_i = base^(-2i/dim)`` for ``i = 0 … dim/2 - 1`` in float64."""
    dim = check_even("dim", dim)
    base = check_positive_float("base", base, greater_than=1.0)
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    return base ** (-exponents)


def sinusoidal_encoding(
    n_positions: int,
    dim: int,
    base: float = DEFAULT_SINUSOIDAL_BASE,
    offset: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The ``(n_positions, dim)`` table for positions ``offset … offset + n_positions - 1``.

    Sine on even features, cosine on odd features, feature pair ``(2i, 2i+1)`` at frequency
    ``base^(-2i/dim)`` (Vaswani et al. 2017, §3.5). Angles are computed in float64 and the
    result is cast to ``dtype``, so large positions keep their accuracy.
    """
    n_positions = check_int("n_positions", n_positions, minimum=0)
    offset = check_int("offset", offset, minimum=0)
    check_float_dtype("dtype", dtype)
    omega = sinusoidal_frequencies(dim, base, device=device)
    positions = torch.arange(offset, offset + n_positions, dtype=torch.float64, device=device)
    angles = positions[:, None] * omega[None, :]
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).reshape(n_positions, dim)
    return table.to(dtype)


def sinusoidal_shift_matrix(
    k: int,
    dim: int,
    base: float = DEFAULT_SINUSOIDAL_BASE,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The ``(dim, dim)`` matrix ``M_k`` with ``PE(p + k) = M_k @ PE(p)`` for every ``p``.

    From ``sin(a + b) = sin a cos b + cos a sin b`` and ``cos(a + b) = cos a cos b - sin a sin b``
    with ``a = p ω_i`` and ``b = k ω_i``, the block acting on features ``(2i, 2i+1)`` is
    ``[[cos kω_i, sin kω_i], [-sin kω_i, cos kω_i]]``: a rotation that depends on ``k`` but not
    on ``p``. ``k`` may be negative (a shift towards the start).
    """
    k = check_int("k", k)
    check_float_dtype("dtype", dtype)
    omega = sinusoidal_frequencies(dim, base, device=device)
    cos, sin = (k * omega).cos(), (k * omega).sin()
    blocks = torch.stack((torch.stack((cos, sin), -1), torch.stack((-sin, cos), -1)), -2)
    return torch.block_diag(*blocks).to(dtype)
