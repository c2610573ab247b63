"""RoPE frequency rules for running a model at a longer context than it was trained at.

A RoPE model trained at context length ``L`` (``original_max_positions``) has only ever seen the
angles ``m·θ_i`` for ``0 <= m < L``. To run it at ``L' = s·L`` (``factor = s``) one changes the
frequencies ``θ_i = base^(-2i/d)`` (RoFormer eq. 15), and optionally the attention temperature.
Each rule below is a small pure function returning ``(inv_freq, attention_factor)``, in the spirit
of ``ROPE_INIT_FUNCTIONS`` in Hugging Face ``transformers`` (``modeling_rope_utils.py``):

=================  ===========================================================  ==================
rule               new frequencies ``θ'_i``                                     source
=================  ===========================================================  ==================
``"default"``      ``θ_i``                                                      Su et al. 2021
``"linear"``       ``θ_i / s`` (positions ``m → m/s``)                          Chen et al. 2023
``"ntk"``          ``base' = base · s^(d/(d-2))``                               bloc97 2023
``"dynamic_ntk"``  ``"ntk"`` with ``s = max(1, seq_len / L)``                   emozilla 2023
``"yarn"``         ``(1-γ(r_i)) θ_i/s + γ(r_i) θ_i``, ``r_i = L/λ_i``          Peng et al. 2023
=================  ===========================================================  ==================

``inv_freq`` has shape ``(d/2,)`` and is computed in float64 and rounded once to ``dtype``.
``attention_factor`` multiplies the rotated queries and keys (as ``transformers`` multiplies its
cos/sin caches), so the logits are scaled by its square; only YaRN changes it.
:func:`rope_scaling_frequencies` dispatches by name; :meth:`pebook.TinyLM.set_rope_frequencies`
installs the result in a model. :func:`wavelength_table` gives the "wavelength view" the rules are
designed around: pair ``i`` turns once every ``λ_i = 2π/θ_i`` positions and makes
``r_i = L/λ_i`` turns within the training context.

Citations give the section and write each formula out rather than quote equation numbers: the
YaRN paper's numbering has not been stable across its arXiv versions (its errata for the early
preprint refer to the temperature formula as eq. 27).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from numbers import Real
from typing import NamedTuple

import torch

from ._checks import check_even, check_float_dtype, check_float_tensor, check_int, check_positive_float
from .rope import DEFAULT_ROPE_BASE, rope_frequencies

__all__ = [
    "ROPE_SCALING_RULES",
    "YARN_RAMPS",
    "WavelengthTable",
    "default_frequencies",
    "dynamic_ntk_frequencies",
    "linear_frequencies",
    "ntk_frequencies",
    "rope_scaling_frequencies",
    "wavelength_table",
    "yarn_attention_factor",
    "yarn_frequencies",
    "yarn_ramp",
]

YARN_RAMPS = ("paper", "transformers")
_DTYPES = (torch.float32, torch.float64)
_F64 = torch.float64


# ------------------------------------------------------------------------------------ checks


def _check_factor(factor) -> float:
    """``factor = s = L'/L >= 1``: these rules extend a context, they never shrink it."""
    if isinstance(factor, bool) or not isinstance(factor, Real):
        raise TypeError(f"factor must be a real number, got {factor!r} of type {type(factor).__name__}")
    factor = float(factor)
    if not math.isfinite(factor) or factor < 1.0:
        raise ValueError(
            f"factor must be a finite number >= 1 (the context extension s = L_target / L_train), got {factor!r}"
        )
    return factor


def _check_common(dim: int, base: float, dtype: torch.dtype, *, min_dim: int = 2) -> tuple[int, float]:
    dim = check_even("dim", dim)
    if dim < min_dim:
        raise ValueError(
            f"dim must be >= {min_dim} for NTK-aware scaling (with dim = 2 the only pair has θ_0 = 1 "
            f"whatever the base, and base' = base · s^(d/(d-2)) divides by zero), got {dim}"
        )
    base = check_positive_float("base", base, greater_than=1.0)
    check_float_dtype("dtype", dtype, allowed=_DTYPES)
    return dim, base


# ------------------------------------------------------------------------------------ rules


def default_frequencies(
    dim: int, base: float = DEFAULT_ROPE_BASE, *, dtype: torch.dtype = torch.float32, device=None
) -> tuple[torch.Tensor, float]:
    """Unscaled RoPE: ``θ_i = base^(-2i/d)``, attention factor 1.

    Su, Lu, Pan, Murtadha, Wen & Liu (2021), RoFormer, arXiv:2104.09864, eq. (15); the same as
    :func:`pebook.rope_frequencies`. The baseline every other rule is compared with.
    """
    dim, base = _check_common(dim, base, dtype)
    return rope_frequencies(dim, base, dtype=_F64, device=device).to(dtype), 1.0


def linear_frequencies(
    dim: int, base: float = DEFAULT_ROPE_BASE, *, factor: float, dtype: torch.dtype = torch.float32, device=None
) -> tuple[torch.Tensor, float]:
    """Position interpolation: ``θ'_i = θ_i / s``, attention factor 1.

    Chen, Wong, Chen & Tian (2023), "Extending Context Window of Large Language Models via
    Positional Interpolation", arXiv:2306.15595, §2.3: ``f'(x, m) = f(x, m·L/L')``, i.e. every
    position is divided by ``s = L'/L`` so that ``L'`` positions fit into the trained range
    ``[0, L)``. Since the angle is ``m·θ_i``, dividing positions by ``s`` is dividing every
    frequency by ``s`` (what ``transformers``' ``"linear"`` rule does; found at the same time by
    kaiokendev for SuperHOT). Every wavelength becomes ``s`` times longer, the fast pairs included.
    """
    dim, base = _check_common(dim, base, dtype)
    factor = _check_factor(factor)
    inv_freq = rope_frequencies(dim, base, dtype=_F64, device=device) / factor
    return inv_freq.to(dtype), 1.0


def _ntk_inv_freq(dim: int, base: float, scale: float, device) -> torch.Tensor:
    """``θ'_i = base'^(-2i/d)`` with ``base' = base · s^(d/(d-2))``, float64."""
    return rope_frequencies(dim, base * scale ** (dim / (dim - 2)), dtype=_F64, device=device)


def ntk_frequencies(
    dim: int, base: float = DEFAULT_ROPE_BASE, *, factor: float, dtype: torch.dtype = torch.float32, device=None
) -> tuple[torch.Tensor, float]:
    """NTK-aware scaling: change the base, ``base' = base · s^(d/(d-2))``, attention factor 1.

    bloc97 (2023), "NTK-Aware Scaled RoPE", r/LocalLLaMA (a Reddit post, no paper); formalised
    in Peng et al. (2023), YaRN, arXiv:2309.00071, §3.1 ("NTK-aware" interpolation: ``g(m) = m``,
    ``h(θ_d) = b'^(-2d/|D|)``, ``b' = b · s^(|D|/(|D|-2))``). The same base change is used by
    ``transformers``' ``_compute_dynamic_ntk_parameters``.

    The exponent is chosen so that the *slowest* pair ``i = d/2 - 1`` is interpolated exactly,
    ``θ'_{d/2-1} = base^(-(d-2)/d) · s^(-1) = θ_{d/2-1} / s``, while the fastest pair ``θ_0 = 1``
    is not changed at all: high frequencies are extrapolated, low ones interpolated, with a
    geometric blend in between. Needs ``dim >= 4``.
    """
    dim, base = _check_common(dim, base, dtype, min_dim=4)
    factor = _check_factor(factor)
    return _ntk_inv_freq(dim, base, factor, device).to(dtype), 1.0


def dynamic_ntk_frequencies(
    dim: int,
    base: float = DEFAULT_ROPE_BASE,
    *,
    seq_len: int,
    original_max_positions: int,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[torch.Tensor, float]:
    """Dynamic NTK: NTK-aware scaling with ``s = max(1, seq_len / L)``, recomputed per length.

    emozilla (2023), "Dynamically Scaled RoPE", r/LocalLLaMA; Peng et al. (2023), YaRN,
    arXiv:2309.00071, §3.3: at the current sequence length ``l'`` use ``s = max(1, l'/L)``, so
    that inside the trained context (``seq_len <= L``) the model is exactly the original one and
    beyond it the scale grows with the input instead of being fixed in advance. The frequencies
    are those of :func:`ntk_frequencies` with that ``s``. Needs ``dim >= 4``.

    ``transformers``' ``"dynamic"`` rule has an extra knob ``factor = f``:
    ``s = f · l'/L - (f - 1)`` (emozilla's code). With ``f = 1`` it is this rule; pebook keeps the
    paper's form, so that a sweep over rules with one ``factor`` gives every rule the same ``s``
    at ``seq_len = factor · L``.
    """
    dim, base = _check_common(dim, base, dtype, min_dim=4)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    original_max_positions = check_int("original_max_positions", original_max_positions, minimum=1)
    scale = max(1.0, seq_len / original_max_positions)
    return _ntk_inv_freq(dim, base, scale, device).to(dtype), 1.0


def yarn_ramp(rotations: torch.Tensor, alpha: float = 1.0, beta: float = 32.0) -> torch.Tensor:
    """YaRN's ramp ``γ(r)``: 0 for ``r < α``, 1 for ``r > β``, ``(r - α)/(β - α)`` in between.

    Peng et al. (2023), arXiv:2309.00071, §3.2 ("NTK-by-parts"). ``r = L/λ`` is the number of
    turns a pair makes within the training context. ``γ = 1`` keeps a pair as trained (it turned
    many times, every angle was seen), ``γ = 0`` interpolates it fully (less than ``α`` turns).
    Returns ``γ`` with the shape, device and floating dtype of ``rotations``.
    """
    check_float_tensor("rotations", rotations)
    alpha = check_positive_float("alpha", alpha)
    beta = check_positive_float("beta", beta)
    if beta <= alpha:
        raise ValueError(f"beta must be > alpha (the ramp rises from r = α to r = β), got alpha={alpha}, beta={beta}")
    return ((rotations - alpha) / (beta - alpha)).clamp(0.0, 1.0)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's attention temperature as a factor on ``q`` and ``k``: ``sqrt(1/t) = 0.1 ln(s) + 1``.

    Peng et al. (2023), arXiv:2309.00071, §3.4: the logits are divided by ``t``,
    ``softmax(q_mᵀ k_n / (t sqrt(|D|)))``, with ``sqrt(1/t) = 0.1 ln(s) + 1`` (the paper's errata
    corrects an early preprint that wrote ``sqrt(t)``). Multiplying both rotated ``q`` and ``k``
    by ``sqrt(1/t)`` does this (``transformers``' ``get_mscale``). 1 at ``s = 1``.
    """
    return 0.1 * math.log(_check_factor(factor)) + 1.0


def _transformers_gamma(dim: int, base: float, original_max_positions: int, beta_fast: float, beta_slow: float, device):
    """``γ_i`` of the reference code (jquesnelle/yarn; ``transformers``' ``_compute_yarn_parameters``,
    ``truncate=True``): a ramp that is linear in the *pair index* between the rounded dims where
    ``r = β`` and ``r = α``."""

    def correction_dim(rotations: float) -> float:  # the (real) pair index i with r_i = rotations
        return dim * math.log(original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as in the reference: avoids 0/0
    ramp = ((torch.arange(dim // 2, dtype=_F64, device=device) - low) / (high - low)).clamp(0.0, 1.0)
    return 1.0 - ramp  # ramp is the interpolation weight; γ the weight of the unchanged θ_i


def yarn_frequencies(
    dim: int,
    base: float = DEFAULT_ROPE_BASE,
    *,
    factor: float,
    original_max_positions: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    ramp: str = "paper",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[torch.Tensor, float]:
    """YaRN: NTK-by-parts frequencies plus an attention temperature.

    Peng, Quesnelle, Fan & Shippole (2023), "YaRN: Efficient Context Window Extension of Large
    Language Models", arXiv:2309.00071. With ``λ_i = 2π/θ_i`` (§2.3) and ``s = factor``:

        r_i = L / λ_i                                        turns within the training context (§3.2)
        γ(r) = 0 if r < α;  1 if r > β;  (r - α)/(β - α)    the ramp, :func:`yarn_ramp` (§3.2)
        θ'_i = (1 - γ(r_i)) · θ_i / s + γ(r_i) · θ_i        "NTK-by-parts" interpolation (§3.2)
        sqrt(1/t) = 0.1 ln(s) + 1                            attention factor (§3.4)

    so pairs that turn more than ``β`` times in ``L`` positions are kept (extrapolated), pairs
    that turn less than ``α`` times are interpolated like :func:`linear_frequencies`, and the
    others are blended. ``beta_fast = β = 32`` and ``beta_slow = α = 1`` are the paper's values
    for LLaMA and ``transformers``' names and defaults. YaRN (§3.4) is these frequencies together
    with the attention factor.

    ``ramp`` chooses how ``γ`` is computed between the two boundaries:

    * ``"paper"`` (default): ``γ(r_i)`` exactly as above, linear in ``r``.
    * ``"transformers"``: the authors' reference code (``jquesnelle/yarn``) and ``transformers``'
      ``_compute_yarn_parameters``: the pair indices where ``r = β`` and ``r = α``
      (``find_correction_dim``) are rounded outwards (``floor`` / ``ceil``, clamped to
      ``[0, d - 1]``) and ``γ`` falls *linearly in the pair index* between them, i.e. linearly in
      ``log r``. Use it to reproduce checkpoints configured with
      ``rope_scaling={"rope_type": "yarn", ...}``.

    The two agree on every pair outside the ramp (``γ = 0`` where ``r_i <= α``, ``γ = 1`` where
    ``r_i >= β``) and in general differ inside it, with two exceptions due to the reference's
    clamping: it keeps pair 0 unchanged even when that pair turns fewer than ``β`` times in ``L``
    positions (``L < 2πβ``, about 201 for ``β = 32``: small models), where the paper's
    ``γ(r_0) < 1`` partly interpolates it; and in degenerate settings (a training length of a few
    positions, or a base so small that every pair turns more than ``β`` times) its range comes out
    reversed, ``high < low``, and it keeps, respectively interpolates, every pair.
    """
    dim, base = _check_common(dim, base, dtype)
    factor = _check_factor(factor)
    original_max_positions = check_int("original_max_positions", original_max_positions, minimum=1)
    beta_fast = check_positive_float("beta_fast", beta_fast)
    beta_slow = check_positive_float("beta_slow", beta_slow)
    if beta_fast <= beta_slow:
        raise ValueError(
            f"beta_fast must be > beta_slow (β > α: pairs with more than β turns are kept, fewer than α "
            f"interpolated), got beta_fast={beta_fast}, beta_slow={beta_slow}"
        )
    if ramp not in YARN_RAMPS:
        raise ValueError(f"ramp must be one of {YARN_RAMPS}, got {ramp!r}")
    theta = rope_frequencies(dim, base, dtype=_F64, device=device)
    if ramp == "paper":
        rotations = original_max_positions * theta / (2 * math.pi)  # r_i = L / λ_i
        gamma = yarn_ramp(rotations, alpha=beta_slow, beta=beta_fast)
    else:
        gamma = _transformers_gamma(dim, base, original_max_positions, beta_fast, beta_slow, device)
    # (1 - γ) θ/s + γ θ, written so that γ = 0 gives θ/s (linear), and γ = 1 or s = 1 give θ, exactly
    interpolated = theta / factor
    inv_freq = torch.where(gamma >= 1, theta, interpolated + gamma * (theta - interpolated))
    return inv_freq.to(dtype), yarn_attention_factor(factor)


ROPE_SCALING_RULES: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "default": default_frequencies,
    "linear": linear_frequencies,
    "ntk": ntk_frequencies,
    "dynamic_ntk": dynamic_ntk_frequencies,
    "yarn": yarn_frequencies,
}

_COMMON_MEANING = {
    "factor": "the context extension s = L_target / L_train",
    "original_max_positions": "the training context length L",
    "seq_len": "the current sequence length",
}


def rope_scaling_frequencies(
    rule: str,
    dim: int,
    base: float = DEFAULT_ROPE_BASE,
    *,
    factor: float = 1.0,
    original_max_positions: int | None = None,
    seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
    **rule_options,
) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)`` of the rule named ``rule`` (a key of :data:`ROPE_SCALING_RULES`).

    ``factor``, ``original_max_positions`` and ``seq_len`` go to the rules that use them:
    ``factor`` to ``"linear"``, ``"ntk"`` and ``"yarn"``; ``original_max_positions`` to
    ``"dynamic_ntk"`` and ``"yarn"`` (where it is required); ``seq_len`` to ``"dynamic_ntk"``
    (required). A rule ignores the ones it does not use, so one call pattern sweeps every rule
    (as ``transformers`` ignores ``seq_len`` for its static rules); they are validated all the
    same. ``rule_options`` are the rule's own keyword options (``"yarn"``: ``beta_fast``,
    ``beta_slow``, ``ramp``); anything else is an error.
    """
    if not isinstance(rule, str) or rule not in ROPE_SCALING_RULES:
        raise ValueError(f"rule must be one of {tuple(ROPE_SCALING_RULES)}, got {rule!r}")
    common = {
        "factor": _check_factor(factor),
        "original_max_positions": None
        if original_max_positions is None
        else check_int("original_max_positions", original_max_positions, minimum=1),
        "seq_len": None if seq_len is None else check_int("seq_len", seq_len, minimum=1),
    }
    fn = ROPE_SCALING_RULES[rule]
    params = inspect.signature(fn).parameters
    kwargs = {}
    for name, value in common.items():
        if name in params:
            if value is None:
                raise ValueError(f"rule {rule!r} needs {name} ({_COMMON_MEANING[name]}), got None")
            kwargs[name] = value
    options = tuple(
        name
        for name, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in common and name not in ("dtype", "device")
    )
    unknown = [name for name in rule_options if name not in options]
    if unknown:
        allowed = ", ".join(options) if options else "none"
        raise TypeError(f"rule {rule!r} has no option {unknown[0]!r}; its options are: {allowed}")
    return fn(dim, base, dtype=dtype, device=device, **kwargs, **rule_options)


# ------------------------------------------------------------------------------------ wavelength view


class WavelengthTable(NamedTuple):
    """Per pair ``i`` (float64 tensors of shape ``(d/2,)``, ``completes_period`` bool)."""

    pair: torch.Tensor  #: ``i = 0 … d/2 - 1`` (int64)
    inv_freq: torch.Tensor  #: ``θ_i = base^(-2i/d)``
    wavelength: torch.Tensor  #: ``λ_i = 2π / θ_i`` positions per turn
    rotations: torch.Tensor  #: ``r_i = L / λ_i`` turns within the training length (YaRN's r(d))
    completes_period: torch.Tensor  #: ``λ_i <= L`` (``r_i >= 1``)


def wavelength_table(dim: int, base: float = DEFAULT_ROPE_BASE, *, train_length: int, device=None) -> WavelengthTable:
    """The wavelength view of RoPE at training length ``L = train_length``.

    Pair ``i`` turns by ``θ_i`` per position, a full turn every ``λ_i = 2π/θ_i`` positions
    (YaRN §2.3), and ``r_i = L/λ_i`` times within the training context (YaRN §3.2). A pair with
    ``λ_i <= L`` (``completes_period``) has been seen at every angle during training, so a
    longer input shows it nothing new; a pair with ``λ_i > L`` has only seen the arc
    ``[0, (L-1)·θ_i]``, and longer inputs take it to angles never trained on. (The largest trained
    offset is ``L - 1``, so strictly the full circle needs ``λ_i <= L - 1``; the table follows
    YaRN's ``r = L/λ`` and its boundary ``r = α = 1``.)
    """
    dim = check_even("dim", dim)
    base = check_positive_float("base", base, greater_than=1.0)
    train_length = check_int("train_length", train_length, minimum=1)
    theta = rope_frequencies(dim, base, dtype=_F64, device=device)
    wavelength = 2 * math.pi / theta
    rotations = train_length / wavelength
    return WavelengthTable(
        pair=torch.arange(dim // 2, device=device),
        inv_freq=theta,
        wavelength=wavelength,
        rotations=rotations,
        completes_period=wavelength <= train_length,
    )
