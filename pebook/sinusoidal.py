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

from ._checks import (
    check_even,
    check_float_dtype,
    check_float_tensor,
    check_int,
    check_int_tensor,
    check_positive_float,
)
from .encoding import PositionalEncoding

__all__ = [
    "sinusoidal_frequencies",
    "sinusoidal_encoding",
    "sinusoidal_shift_matrix",
    "sinusoidal_dot_profile",
    "fit_shift_map",
    "SinusoidalPE",
]

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
    positions = torch.arange(offset, offset + n_positions, device=device)
    return _rows(positions, omega).to(dtype)


def _rows(positions: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``PE(p)`` for every entry of ``positions`` (any shape): shape ``(*positions.shape, 2·len(omega))``."""
    angles = positions.to(torch.float64)[..., None] * omega
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


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


def sinusoidal_dot_profile(offsets: torch.Tensor, dim: int, base: float = DEFAULT_SINUSOIDAL_BASE) -> torch.Tensor:
    """``PE(p) · PE(p + k) = Σ_i cos(k ω_i)`` for every offset ``k`` in ``offsets``, in float64.

    For the encoding of Vaswani et al. (2017, §3.5), expanding each feature pair with
    ``sin a sin b + cos a cos b = cos(b - a)`` removes ``p``: the dot product of two encodings depends only on their
    offset ``k``, and since cosine is even it is the same for ``k`` and ``-k``. Consequently
    ``|PE(p) - PE(p + k)|² = dim - 2 Σ_i cos(k ω_i)`` also depends on ``k`` alone.

    ``offsets`` is an integer tensor of any shape (negative offsets allowed); the result has the
    same shape and device, dtype float64.
    """
    check_int_tensor("offsets", offsets)
    omega = sinusoidal_frequencies(dim, base, device=offsets.device)
    return torch.cos(offsets.to(torch.float64)[..., None] * omega).sum(-1)


def fit_shift_map(table: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Best linear map ``M`` with ``table[p + k] ≈ M @ table[p]`` for all rows ``p``, by least squares.

    Tests the property Vaswani et al. (2017, §3.5) chose the sinusoidal encoding for: "for any
    fixed offset k, PE_{pos+k} can be represented as a linear function of PE_{pos}". For the
    sinusoidal table the fit is exact (relative residual at rounding level, and ``M`` is
    :func:`sinusoidal_shift_matrix` wherever the table has full numerical rank); for a table
    without that structure the residual stays large, so no fixed ``M_k`` exists.

    ``table`` is a ``(n_positions, dim)`` floating tensor, row ``p`` the encoding of position
    ``p``; it needs ``n_positions - k >= dim`` rows so that the system is not underdetermined.
    Solved in float64 on the CPU with the SVD-based ``gelsd`` driver (robust to the
    near-collinear low-frequency columns). Returns ``(M, residual)``: ``M`` of shape
    ``(dim, dim)`` in float64 on ``table``'s device, and ``residual = ‖Y - X Mᵀ‖_F / ‖Y‖_F`` with
    ``X = table[:-k]`` and ``Y = table[k:]``.
    """
    check_float_tensor("table", table, ndim=2)
    n, dim = table.shape
    k = check_int("k", k, minimum=1)
    if n - k < dim:
        raise ValueError(
            f"k={k} leaves only n_positions - k = {n - k} row pairs for a ({dim}, {dim}) map; "
            f"table needs at least dim + k = {dim + k} rows, got {n}"
        )
    t = table.detach().to("cpu", torch.float64)
    x, y = t[:-k], t[k:]
    solution = torch.linalg.lstsq(x, y, driver="gelsd").solution  # y ≈ x @ solution
    residual = ((y - x @ solution).norm() / y.norm()).item() if y.norm() > 0 else 0.0
    return solution.T.contiguous().to(table.device), residual


class SinusoidalPE(PositionalEncoding):
    """Registry entry ``"sinusoidal"``: ``PE(position_ids)`` added to the token embeddings (§3.5).

    Option ``sinusoidal_base`` (10000). Angles in float64, cast to the embeddings' dtype.
    """

    name = "sinusoidal"
    place = "input"

    def __init__(self, *, dim: int, sinusoidal_base: float = DEFAULT_SINUSOIDAL_BASE):
        super().__init__()
        self.dim = check_even("dim", dim)
        self.sinusoidal_base = check_positive_float("sinusoidal_base", sinusoidal_base, greater_than=1.0)

    def embed(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # float64 frequencies made where the positions are: no state to cast or move
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float64, device=position_ids.device) / self.dim
        return _rows(position_ids, self.sinusoidal_base ** (-exponents)).to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, sinusoidal_base={self.sinusoidal_base:g}"
