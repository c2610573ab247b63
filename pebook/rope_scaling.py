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
``"yarn"``         ``(1-γ_i) θ_i/s + γ_i θ_i``, ``γ_i`` linear in the pair index     Peng et al. 2023
                   between rounded ends (the reference code, ``transformers``)
``"yarn_paper"``   as ``"yarn"`` with the paper's ``γ_i = γ(r_i)``, ``r_i = L/λ_i``  Peng et al. 2023
``"dynamic"``      ``"ntk"`` with ``s = f·max(seq_len, L)/L - (f - 1)``         emozilla 2023
``"llama3"``       ``"yarn_paper"``'s ramp with ``α, β = low/high_freq_factor``  Dubey et al. 2024
``"longrope"``     ``θ_i / λ_i``, per-pair factors ``λ_i`` (short or long set)  Ding et al. 2024
``"base"``         ``new_base^(-2i/d)`` (adjusted base frequency, "ABF")        Xiong et al. 2023
=================  ===========================================================  ==================

Where a paper and the code that checkpoints are configured for differ, the rule's plain name
is what ``transformers``' ``ROPE_INIT_FUNCTIONS`` computes for the same config (``"yarn"``,
``"dynamic"``, ``"llama3"``, ``"longrope"``, ``"linear"``), and the paper's version has its own
name: ``"yarn_paper"`` (the ramp linear in ``r``) and ``"dynamic_ntk"`` (``s = max(1, seq_len/L)``).

``inv_freq`` has shape ``(d/2,)`` and is computed in float64 and rounded once to ``dtype``.
``attention_factor`` multiplies the rotated queries and keys (as ``transformers`` multiplies its
cos/sin caches), so the logits are scaled by its square; YaRN and LongRoPE change it.
:func:`rope_scaling_frequencies` dispatches by name; :meth:`pebook.TinyLM.set_rope_frequencies`
installs the result in a model. :func:`wavelength_table` gives the "wavelength view" the rules are
designed around: pair ``i`` turns once every ``λ_i = 2π/θ_i`` positions and makes
``r_i = L/λ_i`` turns within the training context.

Which pebook rule is which ``transformers`` ``rope_type``
----------------------------------------------------------

:func:`from_hf_config` reads a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict and
returns what ``transformers`` 5.24 computes for it (``ROPE_INIT_FUNCTIONS`` and the models'
``compute_default_rope_parameters``); :func:`rule_from_hf_config` shows the pebook rule and
options it uses. ``L_hf`` is the config's ``max_position_embeddings``, ``L_orig`` its
``original_max_position_embeddings``:

==============================  ====================================================================
``transformers`` ``rope_type``   pebook rule and options
==============================  ====================================================================
``"default"``                   ``"default"``
``"linear"``                    ``"linear"`` (``factor``)
``"dynamic"``                   ``"dynamic"`` (``factor``, ``original_max_positions = L_hf``,
                                ``seq_len``; ``None`` means ``L_hf``). *Not* ``"dynamic_ntk"``,
                                which is the paper's ``s = max(1, seq_len/L)``, equal only at
                                ``factor = 1``.
``"yarn"``                      ``"yarn"`` (its default ``ramp="transformers"``, and ``truncate``,
                                ``mscale``, ``mscale_all_dim``, ``attention_factor``,
                                ``beta_fast``, ``beta_slow``, ``original_max_positions = L_orig``;
                                a null ``factor`` means ``L_hf / L_orig``). ``"yarn_paper"``
                                (``ramp="paper"``) is the paper's γ(r), not ``transformers``.
``"longrope"``                  ``"longrope"`` (``short_factor``, ``long_factor``,
                                ``original_max_positions = L_orig``, ``seq_len``: long factors
                                when ``seq_len > L_orig``, short ones otherwise and for ``None``;
                                ``factor`` defaults to ``L_hf / L_orig``)
``"llama3"``                    ``"llama3"`` (``factor``, ``low_freq_factor``,
                                ``high_freq_factor``, ``original_max_positions = L_orig``)
(none)                          ``"ntk"``: static NTK-aware scaling (``transformers`` has it only
                                inside ``"dynamic"``)
(none)                          ``"dynamic_ntk"``: the paper's dynamic scaling (see above)
(none)                          ``"yarn_paper"``: the paper's YaRN ramp (see above)
(none)                          ``"base"``: ABF. A ``transformers`` config expresses it as
                                ``"default"`` with a larger ``rope_theta`` (Code Llama: 10⁶);
                                :func:`from_hf_config` also accepts the pebook-only
                                ``{"rope_type": "base", "new_base": ...}``.
==============================  ====================================================================

"Returns what ``transformers`` computes" means: ``attention_factor`` is the same Python float, and
``inv_freq`` agrees to float32 rounding. ``transformers`` evaluates ``base ** (2i/d)`` and the
blends in float32 (several roundings); pebook evaluates them in float64 and rounds once, so a
float32 ``inv_freq`` can differ from ``transformers``' in the last bit (at most a few ulp,
relative differences ~1e-7); discrete choices (YaRN's ``floor``/``ceil`` of the correction
range, LongRoPE's short/long switch) are made by the same Python-float arithmetic and agree
exactly. ``transformers``' ``"proportional"`` type is not implemented.

Citations give the section and write each formula out rather than quote equation numbers: the
YaRN paper's numbering has not been stable across its arXiv versions (its errata for the early
preprint refer to the temperature formula as eq. 27).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import NamedTuple

import torch

from ._checks import check_bool, check_even, check_float_dtype, check_float_tensor, check_int, check_positive_float
from .rope import DEFAULT_ROPE_BASE, rope_frequencies

__all__ = [
    "FrequencySchedule",
    "HF_ROPE_TYPES",
    "ROPE_SCALING_RULES",
    "YARN_RAMPS",
    "HFRule",
    "WavelengthTable",
    "base_frequencies",
    "default_frequencies",
    "dynamic_frequencies",
    "dynamic_ntk_frequencies",
    "from_hf_config",
    "linear_frequencies",
    "llama3_frequencies",
    "longrope_attention_factor",
    "longrope_frequencies",
    "ntk_frequencies",
    "per_length_frequencies",
    "rope_scaling_frequencies",
    "rule_from_hf_config",
    "wavelength_table",
    "yarn_attention_factor",
    "yarn_frequencies",
    "yarn_paper_frequencies",
    "yarn_ramp",
]

YARN_RAMPS = ("paper", "transformers")
#: the ``rope_type`` values :func:`from_hf_config` reads (``"base"`` is pebook's own, see there)
HF_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "base")
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


def yarn_attention_factor(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature as a factor on ``q`` and ``k``: ``sqrt(1/t) = 0.1 ln(s) + 1``.

    Peng et al. (2023), arXiv:2309.00071, §3.4: the logits are divided by ``t``,
    ``softmax(q_mᵀ k_n / (t sqrt(|D|)))``, with ``sqrt(1/t) = 0.1 ln(s) + 1`` (the paper's errata
    corrects an early preprint that wrote ``sqrt(t)``). Multiplying both rotated ``q`` and ``k``
    by ``sqrt(1/t)`` does this. 1 at ``s = 1``.

    ``mscale`` generalises the constant to ``0.1 · mscale · ln(s) + 1``: ``get_mscale(scale,
    mscale)`` of ``transformers``' ``_compute_yarn_parameters`` (from DeepSeek-V2's code), which
    :func:`yarn_frequencies` divides by the same expression with ``mscale_all_dim``.
    """
    factor = _check_factor(factor)
    mscale = check_positive_float("mscale", mscale)
    return 0.1 * mscale * math.log(factor) + 1.0


def _transformers_gamma(
    dim: int,
    base: float,
    original_max_positions: int,
    beta_fast: float,
    beta_slow: float,
    device,
    truncate: bool = True,
):
    """``γ_i`` of the reference code (jquesnelle/yarn; ``transformers``' ``_compute_yarn_parameters``):
    a ramp that is linear in the *pair index* between the dims where ``r = β`` and ``r = α``,
    rounded outwards (``floor``/``ceil``) when ``truncate`` (``find_correction_range``)."""

    def correction_dim(rotations: float) -> float:  # the (real) pair index i with r_i = rotations
        return dim * math.log(original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
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
    ramp: str = "transformers",
    truncate: bool = True,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
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

    * ``"transformers"`` (default): the authors' reference code (``jquesnelle/yarn``) and
      ``transformers``' ``_compute_yarn_parameters``, which every YaRN checkpoint is configured
      for (``rope_scaling={"rope_type": "yarn", ...}``): the pair indices where ``r = β`` and
      ``r = α`` (``find_correction_dim``) are rounded outwards (``floor`` / ``ceil``, clamped to
      ``[0, d - 1]``) and ``γ`` falls *linearly in the pair index* between them, i.e. linearly in
      ``log r``.
    * ``"paper"``: ``γ(r_i)`` exactly as written above, linear in ``r``; the rule
      ``"yarn_paper"`` (:func:`yarn_paper_frequencies`).

    The two agree on every pair outside the ramp (``γ = 0`` where ``r_i <= α``, ``γ = 1`` where
    ``r_i >= β``) and in general differ inside it, with two exceptions due to the reference's
    clamping: it keeps pair 0 unchanged even when that pair turns fewer than ``β`` times in ``L``
    positions (``L < 2πβ``, about 201 for ``β = 32``: small models), where the paper's
    ``γ(r_0) < 1`` partly interpolates it; and in degenerate settings (a training length of a few
    positions, or a base so small that every pair turns more than ``β`` times) its range comes out
    reversed, ``high < low``, and it keeps, respectively interpolates, every pair.

    ``truncate`` (``ramp="transformers"`` only; ``transformers``' ``rope_parameters["truncate"]``,
    default ``True``): ``False`` skips the ``floor``/``ceil``, so the ramp runs between the real
    pair indices where ``r = β`` and ``r = α`` (still clamped to ``[0, d - 1]``).

    The attention factor is, as in ``transformers``' ``_compute_yarn_parameters``:
    ``attention_factor`` if given; else, if both ``mscale`` and ``mscale_all_dim`` are given (the
    DeepSeek-V2/V3 configurations), ``yarn_attention_factor(s, mscale) /
    yarn_attention_factor(s, mscale_all_dim)`` (1 when the two are equal); else
    :func:`yarn_attention_factor` ``(s) = 0.1 ln(s) + 1`` (§3.4). One of ``mscale`` /
    ``mscale_all_dim`` alone is an error here (``transformers`` ignores it; :func:`from_hf_config`
    does the same).

    ``yarn_frequencies(..., truncate=..., mscale=..., mscale_all_dim=..., attention_factor=...)``
    with the default ramp is ``transformers``' ``"yarn"`` rope_type.
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
    truncate = check_bool("truncate", truncate)
    if not truncate and ramp != "transformers":
        raise ValueError(
            "truncate=False applies only to ramp='transformers' (it skips the floor/ceil of the reference "
            f"code's correction range; the paper's ramp has none), got ramp={ramp!r}"
        )
    scale = _yarn_attention(factor, mscale, mscale_all_dim, attention_factor)
    theta = rope_frequencies(dim, base, dtype=_F64, device=device)
    if ramp == "paper":
        rotations = original_max_positions * theta / (2 * math.pi)  # r_i = L / λ_i
        gamma = yarn_ramp(rotations, alpha=beta_slow, beta=beta_fast)
    else:
        gamma = _transformers_gamma(dim, base, original_max_positions, beta_fast, beta_slow, device, truncate)
    return _blend(theta, factor, gamma).to(dtype), scale


def yarn_paper_frequencies(
    dim: int,
    base: float = DEFAULT_ROPE_BASE,
    *,
    factor: float,
    original_max_positions: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[torch.Tensor, float]:
    """YaRN as the paper writes it: :func:`yarn_frequencies` with ``ramp="paper"``.

    Peng et al. (2023), arXiv:2309.00071, §3.2 and §3.4: ``θ'_i = (1 - γ(r_i)) θ_i/s + γ(r_i) θ_i``
    with the ramp :func:`yarn_ramp` linear in ``r_i = L/λ_i`` between ``α = beta_slow`` and
    ``β = beta_fast``, and the attention factor ``0.1 ln(s) + 1`` (or ``attention_factor``). It
    differs from ``"yarn"`` (the reference code's ramp, linear in the pair index between rounded
    ends) inside the ramp, and for ``L < 2πβ`` on pair 0, which this version partly interpolates
    (see :func:`yarn_frequencies`). No released checkpoint is configured for it.
    """
    return yarn_frequencies(
        dim,
        base,
        factor=factor,
        original_max_positions=original_max_positions,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        ramp="paper",
        attention_factor=attention_factor,
        dtype=dtype,
        device=device,
    )


def _blend(theta: torch.Tensor, factor: float, gamma: torch.Tensor) -> torch.Tensor:
    """``(1 - γ) θ/s + γ θ``, written so that ``γ = 0`` gives ``θ/s`` and ``γ = 1`` or ``s = 1`` give
    ``θ``, exactly (float64)."""
    interpolated = theta / factor
    return torch.where(gamma >= 1, theta, interpolated + gamma * (theta - interpolated))


def _yarn_attention(factor: float, mscale, mscale_all_dim, attention_factor) -> float:
    """The attention factor of ``transformers``' ``_compute_yarn_parameters`` (see :func:`yarn_frequencies`)."""
    if attention_factor is not None:
        return check_positive_float("attention_factor", attention_factor)
    if (mscale is None) != (mscale_all_dim is None):
        raise ValueError(
            "mscale and mscale_all_dim must be given together (the attention factor is then "
            "(0.1·mscale·ln s + 1) / (0.1·mscale_all_dim·ln s + 1)) or both left None, got "
            f"mscale={mscale!r}, mscale_all_dim={mscale_all_dim!r}"
        )
    if mscale is None:
        return yarn_attention_factor(factor)
    mscale = check_positive_float("mscale", mscale)
    mscale_all_dim = check_positive_float("mscale_all_dim", mscale_all_dim)
    return float(yarn_attention_factor(factor, mscale) / yarn_attention_factor(factor, mscale_all_dim))


def dynamic_frequencies(
    dim: int,
    base: float = DEFAULT_ROPE_BASE,
    *,
    factor: float,
    seq_len: int,
    original_max_positions: int,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[torch.Tensor, float]:
    """Dynamic NTK as ``transformers`` computes it (its ``"dynamic"`` rope_type), attention factor 1.

    emozilla (2023), "Dynamically Scaled RoPE", r/LocalLLaMA; the code of ``transformers``'
    ``_compute_dynamic_ntk_parameters`` (``modeling_rope_utils.py``), with ``f = factor``,
    ``L = original_max_positions`` (``transformers`` passes its ``max_position_embeddings``) and
    ``l' = max(seq_len, L)``:

        s = f · l'/L - (f - 1),    base' = base · s^(d/(d-2)),    θ'_i = base'^(-2i/d)

    Up to ``seq_len = L`` this is plain RoPE (``s = 1``); beyond it the scale grows ``f`` times as
    fast as the sequence. With ``f = 1`` it is :func:`dynamic_ntk_frequencies` (the paper's
    ``s = max(1, l'/L)``, YaRN §3.3), which pebook keeps as a separate rule. Needs ``dim >= 4``.
    """
    dim, base = _check_common(dim, base, dtype, min_dim=4)
    factor = _check_factor(factor)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    original_max_positions = check_int("original_max_positions", original_max_positions, minimum=1)
    seq_len = max(seq_len, original_max_positions)
    # the reference's expression, term by term, so that base' is the same Python float
    new_base = base * ((factor * seq_len / original_max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return rope_frequencies(dim, new_base, dtype=_F64, device=device).to(dtype), 1.0


def llama3_frequencies(
    dim: int,
    base: float = DEFAULT_ROPE_BASE,
    *,
    factor: float,
    original_max_positions: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[torch.Tensor, float]:
    """Llama 3.1's band-wise rule: keep the fast pairs, divide the slow ones by ``s``, blend between.

    The model: Dubey et al. (2024), "The Llama 3 Herd of Models", arXiv:2407.21783 (RoPE base
    500 000, an 8K pre-training context extended to 128K). The paper does not write the rule out;
    it is ``apply_scaling`` of Meta's reference code (``meta-llama/llama-models``, Llama 3.1:
    ``scale_factor = 8``, ``low_freq_factor = 1``, ``high_freq_factor = 4``,
    ``old_context_len = 8192``), ported as ``transformers``' ``_compute_llama3_parameters``. With
    ``λ_i = 2π/θ_i``, ``s = factor``, ``L = original_max_positions``:

        λ_i < L / high_freq_factor:   θ'_i = θ_i                        (high frequencies kept)
        λ_i > L / low_freq_factor:    θ'_i = θ_i / s                    (low frequencies interpolated)
        otherwise:                    θ'_i = (1 - γ_i) θ_i/s + γ_i θ_i,
                                      γ_i = (L/λ_i - low_freq_factor) / (high_freq_factor - low_freq_factor)

    Since ``L/λ_i = r_i`` is YaRN's number of turns in the training context, this is YaRN's
    NTK-by-parts with the *paper's* ramp (:func:`yarn_paper_frequencies`) and
    ``α = low_freq_factor``, ``β = high_freq_factor``, without an attention factor (it is 1).
    Requires ``0 < low_freq_factor < high_freq_factor``.
    """
    dim, base = _check_common(dim, base, dtype)
    factor = _check_factor(factor)
    original_max_positions = check_int("original_max_positions", original_max_positions, minimum=1)
    low_freq_factor = check_positive_float("low_freq_factor", low_freq_factor)
    high_freq_factor = check_positive_float("high_freq_factor", high_freq_factor)
    if low_freq_factor >= high_freq_factor:
        raise ValueError(
            "low_freq_factor must be < high_freq_factor (pairs with wavelength above L/low_freq_factor are "
            "interpolated, below L/high_freq_factor kept), got "
            f"low_freq_factor={low_freq_factor}, high_freq_factor={high_freq_factor}"
        )
    theta = rope_frequencies(dim, base, dtype=_F64, device=device)
    rotations = original_max_positions * theta / (2 * math.pi)  # L / λ_i
    gamma = ((rotations - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return _blend(theta, factor, gamma).to(dtype), 1.0


def longrope_attention_factor(factor: float, original_max_positions: int) -> float:
    """LongRoPE's attention factor ``sqrt(1 + ln(s) / ln(L))`` (1 at ``s = 1``).

    Not an equation of the LongRoPE paper: the reference implementations' (Phi-3's
    ``Phi3LongRoPEScaledRotaryEmbedding``, ``transformers``' ``_compute_longrope_parameters``,
    where ``s = factor`` and ``L = original_max_position_embeddings``). Like YaRN's, it grows with
    ``ln s``, and it multiplies the rotated ``q`` and ``k``.
    """
    factor = _check_factor(factor)
    original_max_positions = check_int("original_max_positions", original_max_positions, minimum=2)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_positions))


def _check_factor_list(name: str, values, pairs: int) -> torch.Tensor:
    """A list of ``pairs`` finite positive rescale factors, as a float64 CPU tensor."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or not (values.dtype.is_floating_point or values.dtype in (torch.int32, torch.int64)):
            raise TypeError(
                f"{name} must be a list of numbers or a 1-D real tensor, got {values.dtype} {tuple(values.shape)}"
            )
        values = values.detach().cpu().tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a list of numbers (one per rotation pair), got {type(values).__name__}")
    if len(values) != pairs:
        raise ValueError(
            f"{name} must have {pairs} entries (one rescale factor per rotation pair: rotary dim / 2), "
            f"got {len(values)}"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"{name} must hold real numbers, got {v!r} of type {type(v).__name__}")
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must hold finite numbers > 0 (they divide θ_i), got {v!r}")
    return torch.tensor([float(v) for v in values], dtype=_F64)


def longrope_frequencies(
    dim: int,
    base: float = DEFAULT_ROPE_BASE,
    *,
    factor: float,
    seq_len: int,
    original_max_positions: int,
    short_factor,
    long_factor,
    attention_factor: float | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[torch.Tensor, float]:
    """LongRoPE: a searched rescale factor per pair, one set for short and one for long inputs.

    Ding, Zhang, Zhang, Xu, Shang, Xu, Yang & Yang (2024), "LongRoPE: Extending LLM Context Window
    Beyond 2 Million Tokens", arXiv:2402.13753: the angle of pair ``i`` at position ``n`` becomes
    ``n · θ_i / λ_i`` with non-uniform rescale factors ``λ_i`` found by evolutionary search, i.e.

        θ'_i = θ_i / λ_i,        λ = long_factor if seq_len > L else short_factor

    with ``L = original_max_positions`` (the pre-training length); the short set keeps quality
    inside ``L`` (the paper's readjustment "to recover the short context window"). This is the
    form of Phi-3 and of
    ``transformers``' ``_compute_longrope_parameters`` (the paper's extra threshold ``n̂`` of
    initial positions left unscaled is not part of it). The attention factor is
    ``attention_factor`` if given, else :func:`longrope_attention_factor` ``(factor, L)`` =
    ``sqrt(1 + ln(s)/ln(L))``. ``short_factor`` and ``long_factor`` are ``d/2`` positive numbers.
    """
    dim, base = _check_common(dim, base, dtype)
    factor = _check_factor(factor)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    original_max_positions = check_int("original_max_positions", original_max_positions, minimum=2)
    short = _check_factor_list("short_factor", short_factor, dim // 2)
    long = _check_factor_list("long_factor", long_factor, dim // 2)
    if attention_factor is None:
        attention_factor = longrope_attention_factor(factor, original_max_positions)
    else:
        attention_factor = check_positive_float("attention_factor", attention_factor)
    rescale = (long if seq_len > original_max_positions else short).to(device)
    inv_freq = rope_frequencies(dim, base, dtype=_F64, device=device) / rescale
    return inv_freq.to(dtype), attention_factor


def base_frequencies(
    dim: int,
    base: float = DEFAULT_ROPE_BASE,
    *,
    new_base: float,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[torch.Tensor, float]:
    """Adjusted base frequency ("ABF"): ``θ'_i = new_base^(-2i/d)``, attention factor 1.

    Xiong et al. (2023), "Effective Long-Context Scaling of Foundation Models", arXiv:2309.16039:
    raise RoPE's base ``b`` (10 000 → 500 000) and continue training at the longer length; Code
    Llama (Rozière et al. 2023, arXiv:2308.12950) uses 10⁶. Every pair but the first
    turns more slowly, the slow ones most. ``new_base >= base`` (the rule extends, never shrinks).
    It has no ``transformers`` rope_type: a ``transformers`` config writes it as ``"default"``
    with ``rope_theta = new_base``.
    """
    dim, base = _check_common(dim, base, dtype)
    new_base = check_positive_float("new_base", new_base, greater_than=1.0)
    if new_base < base:
        raise ValueError(f"new_base must be >= base (ABF raises the base), got new_base={new_base}, base={base}")
    return rope_frequencies(dim, new_base, dtype=_F64, device=device).to(dtype), 1.0


ROPE_SCALING_RULES: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "default": default_frequencies,
    "linear": linear_frequencies,
    "ntk": ntk_frequencies,
    "dynamic_ntk": dynamic_ntk_frequencies,
    "yarn": yarn_frequencies,
    "yarn_paper": yarn_paper_frequencies,
    "dynamic": dynamic_frequencies,
    "llama3": llama3_frequencies,
    "longrope": longrope_frequencies,
    "base": base_frequencies,
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
    ``factor`` to ``"linear"``, ``"ntk"``, ``"yarn"``, ``"yarn_paper"``, ``"dynamic"``,
    ``"llama3"`` and ``"longrope"``; ``original_max_positions`` to ``"dynamic_ntk"``, ``"yarn"``,
    ``"yarn_paper"``, ``"dynamic"``, ``"llama3"`` and ``"longrope"`` (where it is required);
    ``seq_len`` to ``"dynamic_ntk"``,
    ``"dynamic"`` and ``"longrope"`` (required). A rule ignores the ones it does not use, so one
    call pattern sweeps every rule (as ``transformers`` ignores ``seq_len`` for its static rules);
    they are validated all the same. ``rule_options`` are the rule's own keyword options
    (``"yarn"``: ``beta_fast``, ``beta_slow``, ``ramp``, ``truncate``, ``mscale``,
    ``mscale_all_dim``, ``attention_factor``; ``"yarn_paper"``: ``beta_fast``, ``beta_slow``,
    ``attention_factor``; ``"llama3"``: ``low_freq_factor``,
    ``high_freq_factor``; ``"longrope"``: ``short_factor``, ``long_factor`` (required),
    ``attention_factor``; ``"base"``: ``new_base`` (required)); anything else is an error.
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
    missing = [name for name in options if params[name].default is inspect.Parameter.empty and name not in rule_options]
    if missing:
        raise TypeError(f"rule {rule!r} needs the option {missing[0]!r} (its required options: {', '.join(missing)})")
    return fn(dim, base, dtype=dtype, device=device, **kwargs, **rule_options)


# ------------------------------------------------------------------------------------ Hugging Face configs


class HFRule(NamedTuple):
    """The pebook rule that :func:`from_hf_config` evaluates for a ``transformers`` config."""

    rule: str  #: a key of :data:`ROPE_SCALING_RULES`
    dim: int  #: the rotary dimension ``int(head_dim · partial_rotary_factor)``
    base: float  #: RoPE's base (``rope_theta``)
    options: dict  #: the rule function's keyword arguments (besides ``dtype`` and ``device``)


# keys each rope_type reads (transformers' ``_validate_*_rope_parameters``), besides the common ones
_HF_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "factor", "attention_factor"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "base": ("new_base",),
}
_HF_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
_HF_MEANING = {
    "factor": "the context extension s",
    "original_max_position_embeddings": "the pre-training context length",
    "short_factor": "one rescale factor per rotation pair, for inputs up to original_max_position_embeddings",
    "long_factor": "one rescale factor per rotation pair, for longer inputs",
    "low_freq_factor": "wavelengths above original_max_position_embeddings / low_freq_factor are interpolated",
    "high_freq_factor": "wavelengths below original_max_position_embeddings / high_freq_factor are kept",
    "new_base": "the raised RoPE base",
}


def _hf_get(rope_scaling, key: str, rope_type: str, *, required: bool = True):
    value = rope_scaling.get(key)
    if value is None and required:
        raise ValueError(
            f"rope_scaling[{key!r}] is required for rope_type {rope_type!r} ({_HF_MEANING[key]}), got None"
        )
    return value


def rule_from_hf_config(
    rope_scaling,
    head_dim: int,
    base: float | None,
    max_position_embeddings: int,
    *,
    seq_len: int | None = None,
    original_max_position_embeddings: int | None = None,
) -> HFRule:
    """The pebook rule and options that reproduce a Hugging Face RoPE config (see :func:`from_hf_config`)."""
    if rope_scaling is None:
        rope_scaling = {}
    if not isinstance(rope_scaling, Mapping):
        raise TypeError(f"rope_scaling must be a dict (a config's rope_scaling), got {type(rope_scaling).__name__}")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if "rope_type" in rope_scaling and "type" in rope_scaling and rope_scaling["type"] != rope_type:
        raise ValueError(
            "rope_scaling has both 'rope_type' and the legacy 'type', and they differ: "
            f"rope_type={rope_type!r}, type={rope_scaling['type']!r}"
        )
    if not isinstance(rope_type, str) or rope_type not in HF_ROPE_TYPES:
        raise ValueError(f"rope_scaling['rope_type'] must be one of {HF_ROPE_TYPES}, got {rope_type!r}")
    allowed = _HF_COMMON_KEYS + _HF_KEYS[rope_type]
    unknown = [key for key in rope_scaling if key not in allowed]
    if unknown:
        raise ValueError(
            f"rope_scaling has key {unknown[0]!r}, which rope_type {rope_type!r} does not read; "
            f"its keys are: {', '.join(allowed)}"
        )

    head_dim = check_int("head_dim", head_dim, minimum=2)
    partial = rope_scaling.get("partial_rotary_factor")
    partial = 1.0 if partial is None else check_positive_float("rope_scaling['partial_rotary_factor']", partial)
    if partial > 1.0:
        raise ValueError(f"rope_scaling['partial_rotary_factor'] must be in (0, 1], got {partial!r}")
    dim = int(head_dim * partial)  # as transformers truncates it
    if dim < 2 or dim % 2:
        raise ValueError(
            f"head_dim · partial_rotary_factor must give an even rotary dimension >= 2, got int({head_dim} · "
            f"{partial}) = {dim}"
        )
    theta = rope_scaling.get("rope_theta")
    if base is None and theta is None:
        raise ValueError("base is None and rope_scaling has no 'rope_theta': RoPE's base is needed")
    if base is not None and theta is not None and float(base) != float(theta):
        raise ValueError(f"base={base!r} differs from rope_scaling['rope_theta']={theta!r}; give one, or equal ones")
    base = check_positive_float("base", theta if base is None else base, greater_than=1.0)
    max_pos = check_int("max_position_embeddings", max_position_embeddings, minimum=1)
    if seq_len is not None:
        seq_len = check_int("seq_len", seq_len, minimum=1)

    original = None
    if "original_max_position_embeddings" in _HF_KEYS[rope_type]:
        # transformers gives a top-level config.original_max_position_embeddings (Phi-3) priority
        original = original_max_position_embeddings
        if original is None:
            original = rope_scaling.get("original_max_position_embeddings")
        if original is None:
            raise ValueError(
                f"original_max_position_embeddings is required for rope_type {rope_type!r} (the pre-training "
                "context length), in rope_scaling or as the argument; got None. (transformers falls back to "
                f"max_position_embeddings = {max_pos}: pass that explicitly to get the same.)"
            )
        original = check_int("original_max_position_embeddings", original, minimum=1)

    options: dict = {}
    if rope_type == "default":
        rule = "default"
    elif rope_type == "linear":
        rule, options = "linear", {"factor": _hf_get(rope_scaling, "factor", rope_type)}
    elif rope_type == "dynamic":
        rule = "dynamic"
        options = {
            "factor": _hf_get(rope_scaling, "factor", rope_type),
            "seq_len": max_pos if seq_len is None else seq_len,
            "original_max_positions": max_pos,  # transformers' dynamic rule reads max_position_embeddings
        }
    elif rope_type == "yarn":
        rule = "yarn"
        if "factor" not in rope_scaling:
            raise ValueError(
                "rope_scaling['factor'] is required for rope_type 'yarn' (the context extension s; null means "
                "max_position_embeddings / original_max_position_embeddings), got no such key"
            )
        factor = rope_scaling["factor"]
        options = {
            "factor": max_pos / original if factor is None else factor,
            "original_max_positions": original,
            "ramp": "transformers",
        }
        for key in ("beta_fast", "beta_slow", "attention_factor", "truncate"):
            if rope_scaling.get(key) is not None:
                options[key] = rope_scaling[key]
        # transformers uses mscale and mscale_all_dim only when both are set (truthy)
        if rope_scaling.get("mscale") and rope_scaling.get("mscale_all_dim"):
            options["mscale"], options["mscale_all_dim"] = rope_scaling["mscale"], rope_scaling["mscale_all_dim"]
    elif rope_type == "longrope":
        rule = "longrope"
        factor = rope_scaling.get("factor")
        if factor is None:
            factor = max_pos / original
            if factor < 1:
                raise ValueError(
                    "rope_scaling has no 'factor' and max_position_embeddings / original_max_position_embeddings = "
                    f"{max_pos} / {original} < 1; the factor must be >= 1"
                )
        options = {
            "factor": factor,
            "original_max_positions": original,
            "seq_len": original if seq_len is None else seq_len,  # None: the short factors, as at init
            "short_factor": _hf_get(rope_scaling, "short_factor", rope_type),
            "long_factor": _hf_get(rope_scaling, "long_factor", rope_type),
        }
        if rope_scaling.get("attention_factor") is not None:
            options["attention_factor"] = rope_scaling["attention_factor"]
    elif rope_type == "llama3":
        rule = "llama3"
        options = {
            "factor": _hf_get(rope_scaling, "factor", rope_type),
            "original_max_positions": original,
            "low_freq_factor": _hf_get(rope_scaling, "low_freq_factor", rope_type),
            "high_freq_factor": _hf_get(rope_scaling, "high_freq_factor", rope_type),
        }
    else:  # "base": pebook's own, no transformers counterpart
        rule, options = "base", {"new_base": _hf_get(rope_scaling, "new_base", rope_type)}
    return HFRule(rule, dim, base, options)


def from_hf_config(
    rope_scaling,
    head_dim: int,
    base: float | None,
    max_position_embeddings: int,
    *,
    seq_len: int | None = None,
    original_max_position_embeddings: int | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)`` of a Hugging Face RoPE config, as ``transformers`` 5.24 computes them.

    ``rope_scaling`` is the config's ``rope_scaling`` (or ``rope_parameters``) dict as its
    ``config.json`` has it: ``"rope_type"`` (or the legacy ``"type"``; missing means
    ``"default"``) one of :data:`HF_ROPE_TYPES` and that type's keys, e.g. Llama 3.1's
    ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}``. ``head_dim`` is the attention head size
    (``partial_rotary_factor`` in the dict rotates ``int(head_dim · partial_rotary_factor)`` of
    it), ``base`` the config's ``rope_theta`` (``None``: take ``rope_scaling["rope_theta"]``;
    both given must agree), ``max_position_embeddings`` the config's.

    ``seq_len`` is the current sequence length, as ``transformers`` passes it when it recomputes
    the frequencies during a forward pass: ``"dynamic"`` uses ``max(seq_len,
    max_position_embeddings)`` (``None``: ``max_position_embeddings``, as at initialisation);
    ``"longrope"`` uses the long factors when ``seq_len > original_max_position_embeddings`` and
    the short ones otherwise (``None``: short, as at initialisation). The static types ignore it.
    ``original_max_position_embeddings`` is a config's *top-level* field of that name (Phi-3
    keeps it there); ``transformers`` prefers it to the dict's.

    The result equals ``ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=seq_len)`` of
    ``transformers.modeling_rope_utils`` (and the models' ``compute_default_rope_parameters`` for
    ``"default"``): the attention factor exactly, ``inv_freq`` to float32 rounding (see the module
    docstring). :func:`rule_from_hf_config` gives the pebook rule and options used; the module
    docstring tabulates them. Where ``transformers`` only warns, pebook raises: an unknown
    rope_type or key, ``factor < 1``, short/long factor lists whose length is not the rotary
    dimension / 2 (``transformers``' own length check), ``low_freq_factor >= high_freq_factor``,
    ``beta_fast <= beta_slow``; and a missing ``original_max_position_embeddings`` for
    ``"yarn"``, ``"longrope"`` and ``"llama3"`` is an error rather than ``transformers``' silent
    fallback to ``max_position_embeddings``. As in ``transformers``, YaRN's ``mscale`` and
    ``mscale_all_dim`` are used only when both are set (non-zero).

    ``{"rope_type": "base", "new_base": b}`` is pebook's own (the ABF rule,
    :func:`base_frequencies`); ``transformers`` has no such type and writes ABF as ``"default"``
    with ``rope_theta = b``.
    """
    check_float_dtype("dtype", dtype, allowed=_DTYPES)
    hf = rule_from_hf_config(
        rope_scaling,
        head_dim,
        base,
        max_position_embeddings,
        seq_len=seq_len,
        original_max_position_embeddings=original_max_position_embeddings,
    )
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    try:
        return ROPE_SCALING_RULES[hf.rule](hf.dim, hf.base, dtype=dtype, device=device, **hf.options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"rope_scaling (rope_type {rope_type!r}): {error}") from error


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


# ------------------------------------------------------------------------------------ per-length schedules

#: ``seq_len -> (inv_freq, attention_factor)``: frequencies that depend on the current length
FrequencySchedule = Callable[[int], tuple[torch.Tensor, float]]


def per_length_frequencies(
    rule: str,
    dim: int,
    base: float = DEFAULT_ROPE_BASE,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
    **options,
) -> FrequencySchedule:
    """The function ``seq_len -> (inv_freq, attention_factor)`` of a rule at each sequence length.

    ``schedule(seq_len)`` is ``rope_scaling_frequencies(rule, dim, base, seq_len=seq_len,
    **options)``; give it to ``rope_frequencies`` of :func:`pebook.generate` or
    :func:`pebook.incremental_logits` to recompute the frequencies before every forward pass,
    as ``transformers``' dynamic RoPE does (``dynamic_rope_update`` calls
    ``_compute_dynamic_ntk_parameters`` of ``modeling_rope_utils`` with ``seq_len =
    max(position_ids) + 1``). Only ``"dynamic"``, ``"dynamic_ntk"`` and ``"longrope"`` depend on
    ``seq_len``; for the other rules the schedule is constant. The options (``factor``,
    ``original_max_positions``, the rule's own) are checked now, by one evaluation at
    ``seq_len = 1``.
    """
    if "seq_len" in options:
        raise TypeError("per_length_frequencies passes seq_len itself (the schedule's argument); do not give it")
    rope_scaling_frequencies(rule, dim, base, seq_len=1, dtype=dtype, device=device, **options)

    def schedule(seq_len: int) -> tuple[torch.Tensor, float]:
        return rope_scaling_frequencies(rule, dim, base, seq_len=seq_len, dtype=dtype, device=device, **options)

    return schedule
