"""FIRE: functional interpolation for relative positions.

Li, You, Guruganesh, Ainslie, Ontañón, Zaheer, Sanghai, Yang, Kumar & Bhojanapalli (2024),
"Functional Interpolation for Relative Positions Improves Long Context Transformers", ICLR 2024,
arXiv:2310.04418. Every head adds to the logit of a query at position ``i`` and a key at
``j <= i`` a learned function of their relative position, normalised by the query position so
that the input of the function stays in ``[0, 1]`` whatever the sequence length ("progressive
interpolation"):

    b(i, j) = f_θ( ψ(i - j) / ψ(max{L, i}) )
    ψ(x)    = log(c·x + 1)                 c > 0 learned ("amplifying the differences among
                                           local positions" with a log transform)
    L > 0 learned                          ("adaptive thresholding": short sequences are not
                                           stretched to fill [0, 1])

``f_θ: ℝ → ℝ^H`` is an MLP with one output per head. Since ``ψ(i - j) <= ψ(i) <= ψ(max{L, i})``
the input is in ``[0, 1]``; for queries at ``i <= L`` the normaliser is the constant ``ψ(L)``
and the bias depends on ``i - j`` only (shift invariant), beyond ``L`` it depends on the
ratio of ``ψ(i - j)`` to ``ψ(i)``.

Conventions of the reference code read for this module, class ``FIRE`` of
github.com/mcleish7/arithmetic, ``cramming/architectures/embeddings.py`` ("FIRE attention bias
module (https://arxiv.org/abs/2310.04418)"; another public port has the same defaults), followed
here:

* ``f_θ`` is ``Linear(1, 32) → ReLU → Linear(32, H)``: one hidden layer of width 32
  (:data:`FIRE_MLP_WIDTH`, option ``fire_mlp_width``) shared by all heads, with
  ``torch.nn.Linear``'s default initialisation;
* ``c`` and ``L`` are scalars shared by all heads; ``c`` starts at 0.1, and ``L`` is stored as a
  fixed initial value 512 (a buffer) times a learned multiplier that starts at 1, so that an
  optimiser step moves ``L`` by a fraction of itself;
* ``ψ`` and the threshold take absolute values, ``ψ(x) = log(|c·x| + 1)`` and
  ``L = |multiplier · L₀|``, which keeps them defined whatever sign an optimiser gives ``c``
  or the multiplier (the paper's ``c, L > 0``);
* the denominator gets ``+ 1e-6`` (:data:`FIRE_EPS`): ``ψ(i - j) / (ψ(max{L, i}) + 1e-6)``.

As every pebook logit bias, it is added to the logits already scaled by ``1/√d``. Each layer
has its own module (the paper's FIRE; its FIRE-S variant shares one across layers).

The paper is causal (decoder-only language models). Without a causal mask pebook applies the
reference code's ``ψ(|i - j|)``: the same bias for a key ``d`` positions after the query as for
one ``d`` before it, with the normaliser still ``ψ(max{L, i})`` of the query position (so a key
more than ``max{L, i}`` positions after the query gets an input above 1).
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_float_tensor, check_int, check_int_tensor, check_positive_float, check_same_placement
from .encoding import LogitBias

__all__ = ["FIRE_EPS", "FIRE_MLP_WIDTH", "fire_log_transform", "fire_interpolation", "FIRE"]

#: the reference code's ``eps``, added to the normaliser ψ(max{L, i})
FIRE_EPS = 1e-6
#: the reference code's hidden width of f_θ
FIRE_MLP_WIDTH = 32


def _psi(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.log1p((c * x).abs())


def _interpolate(q_pos: torch.Tensor, k_pos: torch.Tensor, c: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ψ(|i - j|) / (ψ(max{|L|, i}) + eps), pointwise (usable in a ``score_mod``), in the dtype of ``c``."""
    distance = (q_pos - k_pos).abs().to(c.dtype)
    normaliser = torch.maximum(q_pos.to(c.dtype), threshold.abs())
    return _psi(distance, c) / (_psi(normaliser, c) + FIRE_EPS)


def fire_log_transform(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``ψ(x) = log(|c·x| + 1)``; ``x`` (distances or positions, ``>= 0``) and ``c`` broadcast.

    ``x`` may be an integer tensor and is taken in the dtype of ``c``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_float_tensor("c", c)
    check_same_placement(x=x, c=c)
    if x.numel() and bool((x < 0).any()):
        raise ValueError(f"x must be >= 0 (a distance or a position), got a minimum of {x.min().item()}")
    return _psi(x.to(c.dtype), c)


def fire_interpolation(q_pos: torch.Tensor, k_pos: torch.Tensor, c: torch.Tensor, threshold: torch.Tensor):
    """The input of ``f_θ``: ``ψ(|i - j|) / (ψ(max{L, i}) + 1e-6)`` for queries at ``q_pos`` and keys at ``k_pos``.

    ``q_pos`` and ``k_pos`` are integer tensors (positions ``>= 0``) that broadcast together;
    ``c`` and ``threshold`` (``L``) are floating-point tensors that broadcast with them. The
    result, in the dtype of ``c``, is in ``[0, 1)`` for ``0 <= j <= i``.
    """
    check_int_tensor("q_pos", q_pos)
    check_int_tensor("k_pos", k_pos)
    check_float_tensor("c", c)
    check_float_tensor("threshold", threshold)
    check_same_placement(q_pos=q_pos, k_pos=k_pos, c=c, threshold=threshold)
    for name, pos in (("q_pos", q_pos), ("k_pos", k_pos)):
        if pos.numel() and bool((pos < 0).any()):
            raise ValueError(f"{name} must be >= 0, got a minimum of {pos.min().item()}")
    return _interpolate(q_pos, k_pos, c, threshold)


class FIRE(LogitBias):
    """Registry entry ``"fire"``: the learned bias ``f_θ(ψ(i - j) / ψ(max{L, i}))`` per head.

    Options: ``fire_mlp_width`` (the hidden width of ``f_θ``, 32), ``fire_init_c`` (the initial
    ``c``, 0.1) and ``fire_init_threshold`` (the initial ``L``, 512), the reference code's values.
    Parameters: ``mlp_hidden`` (``Linear(1, width)``), ``mlp_out`` (``Linear(width, n_heads)``),
    ``c`` and ``threshold_multiplier`` (scalars); buffer ``init_threshold`` (the fixed ``L₀``,
    ``L = |multiplier · L₀|``). See the module docstring.
    """

    name = "fire"
    example_options = {"fire_mlp_width": 8, "fire_init_threshold": 4.0}  # positions beyond L in small tests

    def __init__(
        self,
        *,
        n_heads: int,
        fire_mlp_width: int = FIRE_MLP_WIDTH,
        fire_init_c: float = 0.1,
        fire_init_threshold: float = 512.0,
    ):
        super().__init__()
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        self.mlp_width = check_int("fire_mlp_width", fire_mlp_width, minimum=1)
        init_c = check_positive_float("fire_init_c", fire_init_c)
        init_threshold = check_positive_float("fire_init_threshold", fire_init_threshold)
        self.mlp_hidden = nn.Linear(1, self.mlp_width)
        self.mlp_out = nn.Linear(self.mlp_width, self.n_heads)
        self.c = nn.Parameter(torch.tensor(init_c))
        self.threshold_multiplier = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("init_threshold", torch.tensor(init_threshold))
        self._options = dict(fire_mlp_width=self.mlp_width, fire_init_c=init_c, fire_init_threshold=init_threshold)

    def declared_parameters(self):
        width, heads = self.mlp_width, self.n_heads
        return {
            "c": ((), True),
            "threshold_multiplier": ((), True),
            "mlp_hidden.weight": ((width, 1), True),
            "mlp_hidden.bias": ((width,), True),
            "mlp_out.weight": ((heads, width), True),
            "mlp_out.bias": ((heads,), True),
            "init_threshold": ((), False),
        }

    @property
    def threshold(self) -> torch.Tensor:
        """``L = |multiplier · L₀|``, the query position below which the normaliser stays ``ψ(L)``."""
        return (self.threshold_multiplier * self.init_threshold).abs()

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(x W₁ + b₁)``, the hidden layer of ``f_θ`` at every input ``x`` (a new last dim of width)."""
        return torch.relu(x[..., None] * self.mlp_hidden.weight[:, 0].to(x.dtype) + self.mlp_hidden.bias.to(x.dtype))

    def mlp(self, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """``f_θ(x)`` for ``head``, pointwise: ``x`` and ``head`` broadcast (usable in a ``score_mod``)."""
        dtype = x.dtype
        hidden = self._hidden(x)
        out_weight, out_bias = self.mlp_out.weight.to(dtype), self.mlp_out.bias.to(dtype)
        return (hidden * out_weight[head]).sum(-1) + out_bias[head]

    def logit_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """:meth:`score` on the grid, ``(batch or 1, heads, q_len, k_len)``, computed the cheap way.

        ``f_θ``'s hidden layer is shared by the heads, so it runs once per (query, key) pair
        (``(q_len, k_len, width)`` activations) instead of once per head, and once for the whole
        batch when every row has the same positions (the default); bit for bit
        :meth:`LogitBias.logit_bias`, which evaluates :meth:`score` for every head and row.
        """
        if q_pos.shape[0] > 1 and bool((q_pos == q_pos[:1]).all()) and bool((k_pos == k_pos[:1]).all()):
            q_pos, k_pos = q_pos[:1], k_pos[:1]
        dtype = torch.promote_types(self.c.dtype, torch.float32)
        x = _interpolate(q_pos[:, :, None], k_pos[:, None, :], self.c.to(dtype), self.threshold.to(dtype))
        hidden = self._hidden(x)
        out_weight, out_bias = self.mlp_out.weight.to(dtype), self.mlp_out.bias.to(dtype)
        # head by head with score's own products and sum (a matmul would round differently by grid size)
        return torch.stack([(hidden * out_weight[h]).sum(-1) + out_bias[h] for h in range(self.n_heads)], dim=1)

    def score(self, head, q_pos, k_pos):
        # at least float32 (parameters cast to half keep a float32 bias; SDPA casts it to the logits' dtype)
        dtype = torch.promote_types(self.c.dtype, torch.float32)
        x = _interpolate(q_pos, k_pos, self.c.to(dtype), self.threshold.to(dtype))
        return self.mlp(x, head)

    def flex_score(self):
        """:meth:`score` without a reduction, for a compiled FlexAttention ``score_mod``.

        The hidden layer's sum over its ``width`` units is unrolled into ``width`` pointwise
        terms (the compiled kernel lowers a ``score_mod`` as pointwise code); the function
        captures the parameters as tensors, not the module. Equal to :meth:`score` up to the
        order of the sum (float rounding).
        """
        dtype = torch.promote_types(self.c.dtype, torch.float32)
        c, threshold = self.c.to(dtype), self.threshold.to(dtype)
        w1, b1 = self.mlp_hidden.weight[:, 0].to(dtype), self.mlp_hidden.bias.to(dtype)
        w2, b2 = self.mlp_out.weight.to(dtype), self.mlp_out.bias.to(dtype)
        width = self.mlp_width

        def score(head, q_pos, k_pos):
            x = _interpolate(q_pos, k_pos, c, threshold)
            out = b2[head]
            for unit in range(width):
                out = out + torch.relu(x * w1[unit] + b1[unit]) * w2[head, unit]
            return out

        return score

    def extra_repr(self) -> str:
        return ", ".join([f"n_heads={self.n_heads}", *(f"{k}={v!r}" for k, v in self._options.items())])
