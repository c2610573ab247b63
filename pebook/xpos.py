"""xPos: rotary position embedding with an exponential decay per feature pair.

Sun, Dong, Patra, Ma, Huang, Benhaim, Chaudhary, Song & Wei (2022), "A Length-Extrapolatable
Transformer", arXiv:2212.10554 (ACL 2023), §3. Read feature pair ``i`` of a query or key as the
complex number ``x^(i)`` (as RoPE does, :mod:`pebook.rope`), with ``θ_i = base^(-2i/d)``. xPos
multiplies the pair by RoPE's rotation and by a real scale, up for queries and down for keys:

    f_q(q, n)^(i) = q^(i) · ζ_i^{ n/B} · e^{i n θ_i}      (query at position n)
    f_k(k, m)^(i) = k^(i) · ζ_i^{-m/B} · e^{i m θ_i}      (key at position m)
    ζ_i = (2i/d + γ) / (1 + γ) = (i/(d/2) + γ) / (1 + γ),    i = 0 … d/2 - 1,  γ = 0.4

so that

    ⟨f_q(q, n), f_k(k, m)⟩ = Re Σ_i q^(i) conj(k^(i)) ζ_i^{(n-m)/B} e^{i (n - m) θ_i}

depends on the positions only through ``n - m``, and each pair's RoPE term is damped by
``ζ_i^{(n-m)/B} < 1`` for a key before the query (``ζ_i ∈ (0, 1)``: the low-index, fast-rotating
pairs decay fastest). ``B`` is the scale base, 512. (The paper's other proposal, blockwise causal
attention at inference, is an attention pattern and not part of this encoding.)

Conventions, from the paper and Microsoft's reference code (torchscale, ``torchscale/component/
xpos_relative_position.py``, class ``XPOS(head_dim, scale_base=512)``):

* ``ζ_i``: torchscale's buffer ``(arange(0, d, 2) + 0.4 d) / (1.4 d)``, the paper's formula with
  ``γ = 0.4`` (option ``xpos_gamma``). ``B = 512`` is torchscale's ``scale_base``
  (option ``xpos_scale_base``).
* Frequencies ``θ_i = 10000^(-2i/d)`` and interleaved pairs ``(2i, 2i+1)``
  (torchscale's ``rotate_every_two`` / ``duplicate_interleave``), so the default
  ``rope_layout`` is ``"interleaved"``; ``"half"`` pairs ``(i, i + d/2)`` as RoPE allows.
* Queries are scaled up (torchscale ``downscale=False``), keys down (``downscale=True``).
* Positions: torchscale centres the scale's exponent on the sequence (positions ``-L/2 … L/2-1``
  for ``L`` tokens, the rotation still at ``0 … L-1``) so that ``ζ^{±p/B}`` stays small. The
  shift is the same for the queries and keys of one call and cancels in every score, but it
  depends on the sequence length, so a key cached at one length would be wrong at the next.
  pebook uses absolute positions for both factors: a key's transform is fixed once it is cached,
  and a KV cache decodes exactly as the full forward pass.

Numerical range. With absolute positions the key scale ``ζ_0^{-m/B}`` grows without bound
(``ζ_0 = γ / (1 + γ) ≈ 0.286``; ``e^{1.25 m / B}``) and the query scale shrinks towards zero.
Each scale is computed in float64 (``exp((p/B) · ln ζ_i)``) and rounded once to the working
precision, so a score ``(q ζ^{n/B}) · (k ζ^{-m/B})`` carries only float rounding as long as the
scales stay far inside the float range. :func:`xpos_max_position` is the largest position whose
scales all lie in ``[2^-E, 2^E]``, leaving ``2^±(E_max - E)`` of room for the query and key values:
``E = 64`` for float32 and bfloat16 (18130 positions for ``B = 512``), ``E = 511`` for float64
(144759), ``E = 7`` for float16 (1983). :class:`XPos` refuses positions beyond the limit of its
precision (float32 unless the module is float64; a ``.half()`` module computes its scales in
float32 but stores float16 queries and keys, so keep it below the float16 limit).
"""

from __future__ import annotations

import math

import torch

from ._checks import check_even, check_float_dtype, check_int, check_positive_float
from .encoding import PositionalEncoding
from .rope import DEFAULT_ROPE_BASE, ROPE_LAYOUTS, _check_rope_inputs, _rotate, _rotate_fast, rope_frequencies

__all__ = [
    "DEFAULT_XPOS_SCALE_BASE",
    "DEFAULT_XPOS_GAMMA",
    "XPOS_ROLES",
    "xpos_zeta",
    "xpos_scales",
    "xpos_max_position",
    "apply_xpos",
    "XPos",
]

DEFAULT_XPOS_SCALE_BASE = 512.0
DEFAULT_XPOS_GAMMA = 0.4
XPOS_ROLES = ("query", "key")

# E: the scales ζ^{±p/B} are kept within [2^-E, 2^E], half of each format's normal exponent range
_SCALE_EXPONENT_LIMIT = {torch.float16: 7, torch.bfloat16: 64, torch.float32: 64, torch.float64: 511}


def xpos_zeta(dim: int, gamma: float = DEFAULT_XPOS_GAMMA, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """The ``dim/2`` decay bases ``ζ_i = (2i/dim + γ) / (1 + γ)``, each in ``(0, 1)``; float64 by default."""
    dim = check_even("dim", dim)
    gamma = check_positive_float("gamma", gamma)
    check_float_dtype("dtype", dtype, allowed=(torch.float32, torch.float64))
    pair_fraction = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim  # 2i/d
    return ((pair_fraction + gamma) / (1 + gamma)).to(dtype)


def _scales(positions: torch.Tensor, log_zeta: torch.Tensor, scale_base: float) -> torch.Tensor:
    """``ζ_i^{p/B} = exp((p/B) ln ζ_i)`` in float64: ``positions.shape + (d/2,)``."""
    return (positions.to(torch.float64)[..., None] * (log_zeta / scale_base)).exp()


def xpos_scales(
    positions: torch.Tensor,
    dim: int,
    scale_base: float = DEFAULT_XPOS_SCALE_BASE,
    gamma: float = DEFAULT_XPOS_GAMMA,
) -> torch.Tensor:
    """The per-pair scales ``ζ_i^{p/B}`` at each of ``positions`` (any shape, integer or floating).

    A query at ``n`` is scaled by ``xpos_scales(n)``, a key at ``m`` by ``xpos_scales(-m)``.
    Returns float64 of shape ``positions.shape + (dim/2,)`` on the positions' device.
    """
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of positions, got {type(positions).__name__}")
    if positions.dtype == torch.bool or positions.dtype.is_complex:
        raise TypeError(f"positions must be an integer or floating tensor, got dtype {positions.dtype}")
    scale_base = check_positive_float("scale_base", scale_base)
    return _scales(positions, xpos_zeta(dim, gamma, device=positions.device).log(), scale_base)


def xpos_max_position(
    scale_base: float = DEFAULT_XPOS_SCALE_BASE, gamma: float = DEFAULT_XPOS_GAMMA, dtype=torch.float32
) -> int:
    """The largest position ``p`` whose scales ``ζ_i^{±p/B}`` all lie in ``[2^-E, 2^E]`` for ``dtype``.

    The smallest base ``ζ_0 = γ / (1 + γ)`` decides: ``p = ⌊E · ln 2 · B / ln((1 + γ) / γ)⌋`` with
    ``E`` = 7 (float16), 64 (bfloat16, float32) or 511 (float64); it does not depend on ``dim``.
    """
    scale_base = check_positive_float("scale_base", scale_base)
    gamma = check_positive_float("gamma", gamma)
    check_float_dtype("dtype", dtype, allowed=tuple(_SCALE_EXPONENT_LIMIT))
    return math.floor(_SCALE_EXPONENT_LIMIT[dtype] * math.log(2) * scale_base / math.log((1 + gamma) / gamma))


def _transform(x, positions, inv_freq, layout: str, log_zeta, scale_base: float | None, role: str) -> torch.Tensor:
    """:func:`apply_xpos` without argument checks: scale each pair, then rotate it as RoPE does.

    The scale and the rotation commute (one real factor per pair). ``x`` is scaled in the working
    precision (float32, or float64 if ``x`` or ``inv_freq`` is) and cast to ``x.dtype`` at the end.
    """
    if scale_base is None:  # decay switched off: RoPE, exactly as pebook.RoPE rotates
        return _rotate_fast(x, positions, inv_freq, layout, x.shape[-1])
    dtype = torch.float64 if torch.float64 in (x.dtype, inv_freq.dtype) else torch.float32
    signed = positions if role == "query" else -positions.to(torch.float64)
    scales = _scales(signed, log_zeta, scale_base).to(dtype)  # (seq, d/2) or (batch, seq, d/2)
    if positions.dim() == 2:
        scales = scales[:, None]  # (batch, 1, seq, d/2): every head of a sequence alike
    per_feature = scales.repeat_interleave(2, dim=-1) if layout == "interleaved" else torch.cat((scales, scales), -1)
    return _rotate(x.to(dtype) * per_feature, positions, inv_freq, layout, x.shape[-1]).to(x.dtype)


def apply_xpos(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    role: str,
    scale_base: float = DEFAULT_XPOS_SCALE_BASE,
    gamma: float = DEFAULT_XPOS_GAMMA,
    layout: str = "interleaved",
) -> torch.Tensor:
    """``f_q`` (``role="query"``) or ``f_k`` (``role="key"``) of xPos on ``x`` ``(..., seq, head_dim)``.

    Pair ``i`` at position ``p`` is rotated by ``p θ_i`` (:func:`pebook.apply_rope` with ``layout``,
    ``inv_freq`` = ``θ``, ``head_dim/2`` entries) and scaled by ``ζ_i^{p/B}`` (query) or
    ``ζ_i^{-p/B}`` (key). ``positions``: ``(seq,)``, or ``(batch, seq)`` for ``x`` of shape
    ``(batch, heads, seq, head_dim)``. Returns a tensor of ``x``'s shape, dtype and device. Keep
    positions within :func:`xpos_max_position` of the working precision.
    """
    if role not in XPOS_ROLES:
        raise ValueError(f"role must be one of {XPOS_ROLES}, got {role!r}")
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    _check_rope_inputs(x, positions, inv_freq)
    scale_base = check_positive_float("scale_base", scale_base)
    log_zeta = xpos_zeta(x.shape[-1], gamma, device=x.device).log()
    return _transform(x, positions, inv_freq, layout, log_zeta, scale_base, role)


class XPos(PositionalEncoding):
    """Registry entry ``"xpos"``: queries and keys rotated as RoPE and scaled by ``ζ^{±p/B}``.

    Options ``rope_base`` (10000) and ``rope_layout`` (``"interleaved"``, torchscale's pairs; or
    ``"half"``) as for :class:`pebook.RoPE`; ``xpos_scale_base`` ``B`` (512; ``None`` switches the
    decay off, leaving exactly RoPE) and ``xpos_gamma`` ``γ`` (0.4). :meth:`rotate_queries` is
    ``f_q``, :meth:`rotate` is ``f_k`` (what a KV cache stores). ``inv_freq`` stays in float32
    under ``.half()``; positions beyond :attr:`max_position` are refused.
    """

    name = "xpos"
    place = "qk"
    full_precision_buffers = ("inv_freq",)
    example_options = {"xpos_scale_base": 16.0}  # a short base, so the decay shows over a few tokens

    def __init__(
        self,
        *,
        head_dim: int,
        rope_base: float = DEFAULT_ROPE_BASE,
        rope_layout: str = "interleaved",
        xpos_scale_base: float | None = DEFAULT_XPOS_SCALE_BASE,
        xpos_gamma: float = DEFAULT_XPOS_GAMMA,
    ):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        if self.head_dim % 2:
            raise ValueError(f"xpos needs an even head_dim (features rotate in pairs), got head_dim={self.head_dim}")
        if rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}")
        self.rope_layout = rope_layout
        self.scale_base = None if xpos_scale_base is None else check_positive_float("xpos_scale_base", xpos_scale_base)
        self.gamma = check_positive_float("xpos_gamma", xpos_gamma)
        rope_base = check_positive_float("rope_base", rope_base, greater_than=1.0)
        self.register_buffer("inv_freq", rope_frequencies(self.head_dim, rope_base), persistent=False)

    def declared_parameters(self):
        return {"inv_freq": ((self.head_dim // 2,), False)}

    def _precision(self) -> torch.dtype:
        """The working precision of the scales: float64 for a float64 module, else float32."""
        return torch.float64 if self.inv_freq.dtype == torch.float64 else torch.float32

    @property
    def max_position(self) -> int | None:
        """The last position this module places (:func:`xpos_max_position`); ``None``: no limit."""
        return None if self.scale_base is None else xpos_max_position(self.scale_base, self.gamma, self._precision())

    def check_positions(self, last_position: int) -> None:
        limit, precision = self.max_position, self._precision()
        if limit is not None and last_position > limit:
            raise ValueError(
                f"position {last_position} is beyond this xpos encoding's max_position={limit}: the key scale "
                f"ζ_0^(-p/B) with xpos_scale_base B={self.scale_base:g} would exceed 2^"
                f"{_SCALE_EXPONENT_LIMIT[precision]} in {precision} (see pebook.xpos.xpos_max_position); "
                "use a larger xpos_scale_base"
            )

    def _apply_role(self, x: torch.Tensor, position_ids: torch.Tensor, role: str) -> torch.Tensor:
        log_zeta = xpos_zeta(self.head_dim, self.gamma, device=x.device).log()
        return _transform(x, position_ids, self.inv_freq, self.rope_layout, log_zeta, self.scale_base, role)

    def rotate_queries(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``f_q``: rotate by ``n θ_i`` and scale pair ``i`` by ``ζ_i^{n/B}``."""
        return self._apply_role(x, position_ids, "query")

    def rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``f_k``: rotate by ``m θ_i`` and scale pair ``i`` by ``ζ_i^{-m/B}`` (the keys a cache stores)."""
        return self._apply_role(x, position_ids, "key")

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, layout={self.rope_layout!r}, scale_base={self.scale_base}, gamma={self.gamma}"
        )
