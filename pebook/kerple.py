"""KERPLE: kernelized relative positional embedding.

Chi, Fan, Ramadge & Rudnicky (2022), "KERPLE: Kernelized Relative Positional Embedding for Length
Extrapolation", NeurIPS 2022, arXiv:2205.09921. Each head adds to the logit of query position
``m`` and key position ``n`` a learned, shift-invariant, conditionally positive definite (CPD)
kernel of the distance ``|m - n|`` (§4):

    power variant        k̃(m, n) = -r₁ · |m - n|^r₂            r₁ > 0, 0 < r₂ ≤ 2
    logarithmic variant  k̃(m, n) = -r₁ · log(1 + r₂ · |m - n|)   r₁, r₂ > 0

    a_{m,n} = softmax_n(q_mᵀ k_n / √d + k̃(m, n))

A CPD kernel becomes positive definite after adding a constant, and softmax is blind to a
constant shift of a row, which is why the bias may be CPD rather than PD (§3). Every head has
its own ``(r₁, r₂)``. The power variant with ``r₂ = 1`` is ALiBi with learned slopes ``r₁``
(Press et al. 2022); the paper finds the logarithmic variant the better extrapolator, so it is
the default here.

Conventions of the reference code (github.com/chijames/KERPLE, ``megatron/mpu/layers.py``,
``ParallelKerpleLog`` / ``ParallelKerplePower``), followed here:

* the parameters are the values themselves, one per head, initialised uniformly: log variant
  ``r₁ ~ U(0, 2)``, ``r₂ ~ U(0, 1)``; power variant ``r₁ ~ U(0, 1)``, ``r₂ ~ U(0, 2)`` (the
  reference calls them ``bias_p``, ``bias_a`` in the log variant and ``bias_a``, ``bias_p`` in
  the power one: the names swap, the roles r₁ = scale, r₂ = inner coefficient or exponent do not);
* they are kept in range by projection: before every use the stored values are clamped in place
  to ``r ≥ 0.01`` (:data:`KERPLE_EPS`), and the power exponent also to ``r₂ ≤ 2``. pebook clamps
  them on construction and in :meth:`Kerple.logit_bias` / :meth:`Kerple.score_mod` (so a value
  an optimiser step pushed out of range is back on the boundary at the next forward, with a
  gradient, as in the reference), and :meth:`Kerple.score` reads the clamped values;
* one module serves every layer (the reference builds one ``rpe_emb`` in
  ``megatron/model/gpt2_model.py`` and hands it to all layers): ``shared_across_layers``;
* the bias is added to the logits already scaled by ``1/√d``.

The floor 0.01 has a consequence for the ALiBi special case: ALiBi's gentlest slopes (``1/128``
and ``1/256`` for 8 heads) are below it, so the module (unlike :func:`kerple_bias`) represents
ALiBi exactly only for the heads with ``m_h >= 0.01``.

The reference is causal only (its distance matrix is ``tril(m - n)``, so keys after the query
get 0, then masked). The kernel itself is symmetric in ``m`` and ``n``; pebook applies the same
``|m - n|`` without a causal mask (an encoder), so the module takes no ``causal`` argument.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_float_tensor, check_int, check_same_placement
from .encoding import LogitBias

__all__ = ["KERPLE_VARIANTS", "KERPLE_EPS", "KERPLE_MAX_POWER", "kerple_kernel", "kerple_bias", "Kerple"]

KERPLE_VARIANTS = ("log", "power")
#: the reference code's floor for r₁ and r₂ (its ``self.eps``)
KERPLE_EPS = 1e-2
#: the largest exponent r₂ of the power variant for which -r₁|m - n|^r₂ is CPD (§4)
KERPLE_MAX_POWER = 2.0


def _check_variant(name: str, variant) -> str:
    if variant not in KERPLE_VARIANTS:
        raise ValueError(f"{name} must be one of {KERPLE_VARIANTS}, got {variant!r}")
    return variant


def _kernel(variant: str, distance: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """The bias kernel of §4 at ``distance = |m - n|`` (pointwise: usable in a ``score_mod``)."""
    if variant == "log":
        return -r1 * torch.log1p(r2 * distance)
    return -r1 * distance.pow(r2)


def kerple_kernel(distance: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, variant: str = "log") -> torch.Tensor:
    """``-r₁ log(1 + r₂ d)`` (``variant="log"``) or ``-r₁ d^r₂`` (``"power"``) at distances ``d = |m - n|``.

    ``distance``, ``r1`` and ``r2`` broadcast together; ``distance`` may be an integer tensor and
    is taken in the dtype of ``r1``. The parameters must be in the paper's range (§4): ``r₁, r₂ >
    0``, and ``r₂ ≤ 2`` for the power variant.
    """
    variant = _check_variant("variant", variant)
    check_float_tensor("r1", r1)
    check_float_tensor("r2", r2)
    if not isinstance(distance, torch.Tensor):
        raise TypeError(f"distance must be a torch.Tensor, got {type(distance).__name__}")
    check_same_placement(distance=distance, r1=r1, r2=r2)
    if distance.numel() and bool((distance < 0).any()):
        raise ValueError(f"distance must be >= 0 (it is |m - n|), got a minimum of {distance.min().item()}")
    _check_range(r1, r2, variant)
    return _kernel(variant, distance.to(r1.dtype), r1, r2)


def _check_range(r1: torch.Tensor, r2: torch.Tensor, variant: str) -> None:
    if not bool((r1 > 0).all()):
        raise ValueError(f"r1 must all be > 0, got {r1.tolist()}")
    if not bool((r2 > 0).all()):
        raise ValueError(f"r2 must all be > 0, got {r2.tolist()}")
    if variant == "power" and not bool((r2 <= KERPLE_MAX_POWER).all()):
        raise ValueError(
            f"r2 must all be <= {KERPLE_MAX_POWER:g} for variant='power' (beyond it -|m - n|^r2 is not "
            f"conditionally positive definite), got {r2.tolist()}"
        )


def kerple_bias(
    q_len: int, k_len: int, r1: torch.Tensor, r2: torch.Tensor, offset: int = 0, *, variant: str = "log"
) -> torch.Tensor:
    """KERPLE's bias ``k̃(m, n)`` per head, shape ``(heads, q_len, k_len)``, dtype and device of ``r1``.

    Query ``i`` is at position ``m = offset + i``, key ``j`` at ``n = j``; ``r1`` and ``r2`` hold
    one value per head. The bias is symmetric in ``m`` and ``n``; under a causal mask only
    ``n <= m`` is used.
    """
    q_len = check_int("q_len", q_len, minimum=0)
    k_len = check_int("k_len", k_len, minimum=0)
    offset = check_int("offset", offset, minimum=0)
    variant = _check_variant("variant", variant)
    check_float_tensor("r1", r1, ndim=1)
    check_float_tensor("r2", r2, ndim=1)
    check_same_placement(r1=r1, r2=r2)
    if r2.shape != r1.shape:
        raise ValueError(f"r2 must have one value per head like r1 {tuple(r1.shape)}, got {tuple(r2.shape)}")
    _check_range(r1, r2, variant)
    device = r1.device
    m = torch.arange(offset, offset + q_len, device=device)
    n = torch.arange(k_len, device=device)
    distance = (m[:, None] - n[None, :]).abs().to(r1.dtype)
    return _kernel(variant, distance[None], r1[:, None, None], r2[:, None, None])


class Kerple(LogitBias):
    """Registry entry ``"kerple"``: the learned bias ``-r₁ log(1 + r₂|m - n|)`` or ``-r₁ |m - n|^r₂`` per head.

    Option ``kerple_variant``: ``"log"`` (default, the paper's best) or ``"power"``. Parameters
    ``r1``, ``r2`` of shape ``(n_heads,)``, clamped to ``[0.01, ∞)`` (``r2`` of the power variant
    to ``[0.01, 2]``) as in the reference code; see the module docstring.
    """

    name = "kerple"
    shared_across_layers = True  # one module for the whole model, as in the reference code

    def __init__(self, *, n_heads: int, kerple_variant: str = "log"):
        super().__init__()
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        self.variant = _check_variant("kerple_variant", kerple_variant)
        r1_scale, r2_scale = (2.0, 1.0) if self.variant == "log" else (1.0, 2.0)  # the reference's U(0, scale)
        self.r1 = nn.Parameter(torch.rand(self.n_heads) * r1_scale)
        self.r2 = nn.Parameter(torch.rand(self.n_heads) * r2_scale)
        self.project_parameters_()

    @property
    def r2_max(self) -> float | None:
        """The upper bound of ``r2``: 2 for the power variant, none for the log one."""
        return KERPLE_MAX_POWER if self.variant == "power" else None

    def declared_parameters(self):
        return {"r1": ((self.n_heads,), True), "r2": ((self.n_heads,), True)}

    @torch.no_grad()
    def project_parameters_(self) -> None:
        """Clamp the stored ``r1``, ``r2`` into their range in place (the reference does this before every use).

        Through ``.data``, like the reference: autograd does not see it, so a graph built before
        stays valid (the values change only if an optimiser step left them out of range).
        """
        self.r1.data.clamp_(min=KERPLE_EPS)
        self.r2.data.clamp_(min=KERPLE_EPS, max=self.r2_max)

    def prepare_(self) -> None:
        """Before every bias (:meth:`logit_bias`, :meth:`score_mod`, the cached and FlexAttention paths)."""
        self.project_parameters_()

    depends_on = "distance"

    def distance_key(self, distance):
        return distance.abs()

    def key_score(self, head, key):
        # at least float32 (parameters cast to half keep a float32 bias; SDPA casts it to the logits' dtype)
        dtype = torch.promote_types(self.r1.dtype, torch.float32)
        r1 = self.r1.clamp(min=KERPLE_EPS).to(dtype)
        r2 = self.r2.clamp(min=KERPLE_EPS, max=self.r2_max).to(dtype)
        return _kernel(self.variant, key.to(dtype), r1[head], r2[head])

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, kerple_variant={self.variant!r}"
