"""The bandwidth cost model of autoregressive decoding: bytes, FLOPs and a lower bound on time per token.

One decoding step feeds one new token per sequence of a batch of ``B`` sequences, each with ``c``
cached positions (``context_len``). It must read the weights once (whatever ``B``) and every
sequence's KV cache, and it performs about two FLOPs per weight per sequence (a multiply and an
add) plus the attention over the cache. At small batch the reading dominates: decoding is
memory-bandwidth-bound (Pope et al. 2022, "Efficiently Scaling Transformer Inference",
arXiv:2211.05102, §2–3; incremental decoding and its memory traffic: Shazeer 2019, "Fast
Transformer Decoding: One Write-Head is All You Need", arXiv:1911.02150). With ``β`` the memory
bandwidth (bytes/s) and ``φ`` the peak arithmetic rate (FLOP/s)::

    bytes(c, B)  = W + B · c · C                                   (decode_step_bytes)
    C            = 2 · n_layers · n_kv_heads · head_dim · bytes_per_cache_value
                                                                   (kv_cache_bytes_per_token)
    flops(c, B)  = B · (2 · P + 2 · 2 · n_layers · n_heads · head_dim · c)
                                                                   (decode_step_flops)
    t(c, B)     >= max(bytes(c, B) / β, flops(c, B) / φ)            (decode_time_bound)

``W`` is the bytes of the weights a step reads (below), ``C`` the cache bytes of one token (keys
and values: the 2), ``P`` the parameters of the matrix multiplications one token goes through
(:func:`matmul_parameter_count`), and the attention term counts ``q·k`` and ``α·v`` for every
query head over the ``c`` cached positions. Grouped-query attention divides ``C`` by
``n_heads / n_kv_heads`` and leaves the FLOPs alone (Ainslie et al. 2023, "GQA: Training
Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", arXiv:2305.13245;
``n_kv_heads = 1`` is Shazeer's multi-query attention).

Both times are affine in ``B``; the weights' time does not grow with the batch, the rest does. The
roofline crossover (:func:`critical_batch`) is the batch at which they are equal::

    B* = (W / β) / (f / φ − c · C / β),      f = 2 · P + 4 · n_layers · n_heads · head_dim · c

and does not exist (``math.inf``) when reading one sequence's cache takes longer than its FLOPs
(``c · C / β >= f / φ``): attention over a cache does about ``2 · n_heads / n_kv_heads`` FLOPs per
cache value read, far below the ``φ / β`` of an accelerator, so at long contexts more batch never
makes decoding compute-bound (Pope et al. 2022, §3.1 make the same point for multi-head attention).

What the model counts, and what it leaves out:

* ``W``: every weight except an untied input embedding table, of which a step reads only the
  ``B`` looked-up rows (left out, so that the bound stays a lower bound); a tied table is read as
  the LM head. What the weights *occupy* is :func:`weight_bytes` (the whole checkpoint).
* Writing the new token's keys and values (``B · C`` bytes), activations, softmax and norm
  arithmetic, and any reuse of weights from on-chip caches (which only a model that fits in them
  gets, like the book's ``TinyLM``).
* Shapes are Llama-style decoders: no biases, RMSNorm (``d_model`` weights per norm, two per layer
  and a final one), an FFN of two matrices or of three when gated (SwiGLU).

Worked numbers (float16 weights and cache): Llama-2-7B's 6,738,415,616 parameters occupy 12.55 GiB
and each token adds 512 KiB of cache, so the cache outgrows the weights from 25,705 cached tokens
on (:func:`cache_equals_weights_tokens`; 6.3 full 4096-token contexts, and the inference chapter's
8 × 4096 tokens make 16 GiB). On the assumed H100 below, the critical batch is about 296–299 at
context 1 for the three built-in shapes and infinite at context 4096: a crossover exists only below
about 86 (Llama-2-7B), 393 (Llama-3-8B) and 1459 (Llama-2-70B) cached tokens.

Hardware figures such as ``H100_BANDWIDTH`` and ``H100_BF16_FLOPS`` below are **assumptions**
(an H100 SXM's datasheet peaks, rounded), not measurements: a real kernel reaches a fraction of
either. :func:`measure_bandwidth` measures the effective copy bandwidth of this machine, to set
beside the measured decode times of ``pebook.generation.time_per_token``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from numbers import Real

import torch

from .._checks import check_int, check_positive_float

__all__ = [
    "DecoderShape",
    "SHAPES",
    "shape",
    "parameter_count",
    "matmul_parameter_count",
    "weight_bytes",
    "kv_cache_bytes_per_token",
    "decode_step_bytes",
    "decode_step_flops",
    "DecodeBound",
    "decode_time_bound",
    "critical_batch",
    "cache_equals_weights_tokens",
    "measure_bandwidth",
    "BYTES_PER_VALUE",
    "H100_BANDWIDTH",
    "H100_BF16_FLOPS",
]

BYTES_PER_VALUE = (0.5, 1, 2, 4, 8)
"""Widths allowed for a weight or a cached value: int4, int8/fp8, fp16/bf16, fp32, fp64."""

H100_BANDWIDTH = 3.35e12
"""ASSUMPTION: an H100 SXM's peak HBM3 bandwidth in bytes/s (datasheet, 3.35 TB/s); not measured."""

H100_BF16_FLOPS = 9.9e14
"""ASSUMPTION: an H100 SXM's dense bf16 tensor-core peak in FLOP/s (datasheet 989 TFLOP/s, rounded)."""


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style decoder-only Transformer (no biases, RMSNorm).

    ``n_kv_heads`` key/value heads are shared by the ``n_heads`` query heads (grouped-query
    attention; ``n_kv_heads == n_heads`` is multi-head attention) and must divide them.
    ``head_dim`` is given, not derived (``n_heads · head_dim`` need not equal ``d_model``).
    ``gated_ffn``: SwiGLU's three ``d_model × ffn_dim`` matrices instead of two.
    ``tied_embeddings``: the LM head reuses the input embedding table.
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    gated_ffn: bool = True
    tied_embeddings: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
        for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size"):
            object.__setattr__(self, field, check_int(field, getattr(self, field), minimum=1))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads must divide n_heads={self.n_heads} (each key/value head serves a group of query "
                f"heads), got n_kv_heads={self.n_kv_heads}"
            )
        for field in ("gated_ffn", "tied_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise TypeError(f"{field} must be True or False, got {value!r} of type {type(value).__name__}")


SHAPES: dict[str, DecoderShape] = {
    s.name: s
    for s in (
        # Touvron et al. 2023 (arXiv:2307.09288) and the Hugging Face configs of the checkpoints
        DecoderShape("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000),
        DecoderShape("llama-2-70b", 80, 8192, 64, 8, 128, 28672, 32000),
        # Llama 3 (Grattafiori et al. 2024, arXiv:2407.21783): GQA with 8 kv heads, a 128256-token vocabulary
        DecoderShape("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
    )
}


def shape(name) -> DecoderShape:
    """The built-in :class:`DecoderShape` called ``name`` (one of :data:`SHAPES`)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str naming a shape, got {name!r} of type {type(name).__name__}")
    if name not in SHAPES:
        raise ValueError(f"name must be one of {', '.join(SHAPES)}, got {name!r}")
    return SHAPES[name]


def _check_shape(value) -> DecoderShape:
    """A :class:`DecoderShape`, or the name of a built-in one."""
    if isinstance(value, str):
        return shape(value)
    if not isinstance(value, DecoderShape):
        raise TypeError(f"shape must be a DecoderShape or the name of one in SHAPES, got {type(value).__name__}")
    return value


def _check_width(name: str, value) -> int | float:
    """A width in bytes from :data:`BYTES_PER_VALUE`: an int, or 0.5 for 4-bit values."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number of bytes, got {value!r} of type {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0 bytes, got {value!r}")
    if value not in BYTES_PER_VALUE:
        allowed = ", ".join(str(w) for w in BYTES_PER_VALUE)
        raise ValueError(
            f"{name} must be one of {allowed} bytes (int4, int8/fp8, fp16/bf16, fp32, fp64), got {value!r}"
        )
    return 0.5 if value == 0.5 else int(value)


def _attention_parameters(s: DecoderShape) -> int:
    q_and_o = 2 * s.d_model * s.n_heads * s.head_dim
    k_and_v = 2 * s.d_model * s.n_kv_heads * s.head_dim
    return q_and_o + k_and_v


def _layer_matmul_parameters(s: DecoderShape) -> int:
    return _attention_parameters(s) + (3 if s.gated_ffn else 2) * s.d_model * s.ffn_dim


def parameter_count(shape) -> int:
    """All parameters: embeddings, per layer the attention projections (q, k, v, o, with
    ``n_kv_heads`` key/value heads) + the FFN + two RMSNorms, a final RMSNorm, and the LM head
    unless it is tied to the embeddings.

    ``vocab · d + L · (2 · d · H · h + 2 · d · H_kv · h + (3 or 2) · d · ffn + 2 · d) + d (+ vocab · d)``.
    """
    s = _check_shape(shape)
    embeddings = s.vocab_size * s.d_model
    layers = s.n_layers * (_layer_matmul_parameters(s) + 2 * s.d_model)
    lm_head = 0 if s.tied_embeddings else s.vocab_size * s.d_model
    return embeddings + layers + s.d_model + lm_head


def matmul_parameter_count(shape) -> int:
    """``P``: the parameters of the matrix multiplications one decoded token goes through, the
    layers' projections and the LM head (tied or not); the embedding lookup and the norms do no
    matmul."""
    s = _check_shape(shape)
    return s.n_layers * _layer_matmul_parameters(s) + s.vocab_size * s.d_model


def weight_bytes(shape, bytes_per_param=2) -> int | float:
    """Bytes the weights occupy: ``parameter_count(shape) · bytes_per_param`` (the whole checkpoint)."""
    return parameter_count(shape) * _check_width("bytes_per_param", bytes_per_param)


def _weight_bytes_read(s: DecoderShape, width) -> int | float:
    """``W``: bytes of the weights one step reads (all but an untied input embedding table)."""
    unread = 0 if s.tied_embeddings else s.vocab_size * s.d_model
    return (parameter_count(s) - unread) * width


def kv_cache_bytes_per_token(shape, bytes_per_value=2) -> int:
    """``C = 2 · n_layers · n_kv_heads · head_dim · bytes_per_value``: the keys and values one token
    adds to the cache (as ``pebook.generation.kv_cache_bytes`` of one token)."""
    s = _check_shape(shape)
    width = _check_width("bytes_per_value", bytes_per_value)
    return int(2 * s.n_layers * s.n_kv_heads * s.head_dim * width)  # even, so exact for 0.5


def _check_step(context_len, batch) -> tuple[int, int]:
    return check_int("context_len", context_len, minimum=1), check_int("batch", batch, minimum=1)


def decode_step_bytes(shape, context_len, batch=1, bytes_per_param=2, bytes_per_cache_value=2) -> int | float:
    """Bytes one decoding step reads: ``W + batch · context_len · C`` (the weights once, then each
    sequence's ``context_len`` cached tokens)."""
    s = _check_shape(shape)
    context_len, batch = _check_step(context_len, batch)
    width = _check_width("bytes_per_param", bytes_per_param)
    per_token = kv_cache_bytes_per_token(s, _check_width("bytes_per_cache_value", bytes_per_cache_value))
    return _weight_bytes_read(s, width) + batch * context_len * per_token


def decode_step_flops(shape, context_len, batch=1) -> int:
    """FLOPs of one decoding step: ``batch · (2 · P + 2 · 2 · n_layers · n_heads · head_dim · context_len)``."""
    s = _check_shape(shape)
    context_len, batch = _check_step(context_len, batch)
    attention = 2 * 2 * s.n_layers * s.n_heads * s.head_dim * context_len
    return batch * (2 * matmul_parameter_count(s) + attention)


@dataclass(frozen=True)
class DecodeBound:
    """The two times of one decoding step and the lower bound they give.

    ``memory_s = bytes / bandwidth``, ``compute_s = flops / flops_per_s``, ``bound_s`` the larger,
    ``bound_by`` ``"memory"`` or ``"compute"`` (``"memory"`` on a tie).
    """

    memory_s: float
    compute_s: float
    bound_s: float
    bound_by: str
    bytes: int | float
    flops: int

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per byte read: the step is memory-bound while this is below ``flops_per_s / bandwidth``."""
        return self.flops / self.bytes


def _check_hardware(bandwidth_bytes_per_s, flops_per_s) -> tuple[float, float]:
    return (
        check_positive_float("bandwidth_bytes_per_s", bandwidth_bytes_per_s),
        check_positive_float("flops_per_s", flops_per_s),
    )


def decode_time_bound(
    shape,
    context_len,
    batch=1,
    *,
    bandwidth_bytes_per_s,
    flops_per_s,
    bytes_per_param=2,
    bytes_per_cache_value=2,
) -> DecodeBound:
    """Lower bound on the seconds of one decoding step: ``max(bytes / bandwidth, flops / flops_per_s)``."""
    bandwidth, peak = _check_hardware(bandwidth_bytes_per_s, flops_per_s)
    n_bytes = decode_step_bytes(shape, context_len, batch, bytes_per_param, bytes_per_cache_value)
    flops = decode_step_flops(shape, context_len, batch)
    memory_s, compute_s = n_bytes / bandwidth, flops / peak
    bound_by = "memory" if memory_s >= compute_s else "compute"
    return DecodeBound(memory_s, compute_s, max(memory_s, compute_s), bound_by, n_bytes, flops)


def critical_batch(
    shape,
    context_len,
    *,
    bandwidth_bytes_per_s,
    flops_per_s,
    bytes_per_param=2,
    bytes_per_cache_value=2,
) -> float:
    """The batch (a real number) at which a step's compute time equals its memory time.

    Solves ``(W + B · c · C) / β = B · f / φ`` for ``B``: ``B* = W · φ / (f · β − c · C · φ)``.
    Below ``B*`` the step is memory-bound, above it compute-bound. ``math.inf`` when the
    denominator is not positive: each added sequence brings at least as much memory time as
    compute time, so no batch makes the step compute-bound.
    """
    s = _check_shape(shape)
    context_len = check_int("context_len", context_len, minimum=1)
    beta, phi = _check_hardware(bandwidth_bytes_per_s, flops_per_s)
    weights = _weight_bytes_read(s, _check_width("bytes_per_param", bytes_per_param))
    per_sequence_bytes = context_len * kv_cache_bytes_per_token(
        s, _check_width("bytes_per_cache_value", bytes_per_cache_value)
    )
    per_sequence_flops = decode_step_flops(s, context_len, 1)
    denominator = per_sequence_flops * beta - per_sequence_bytes * phi
    if denominator <= 0:
        return math.inf
    return weights * phi / denominator


def cache_equals_weights_tokens(shape, bytes_per_param=2, bytes_per_cache_value=2) -> float:
    """Cached tokens in total (``batch · context``) whose KV cache occupies as many bytes as the
    weights: ``weight_bytes / kv_cache_bytes_per_token``. From ``math.ceil`` of it on, the cache is
    the larger of the two."""
    s = _check_shape(shape)
    cache_width = _check_width("bytes_per_cache_value", bytes_per_cache_value)
    return weight_bytes(s, bytes_per_param) / kv_cache_bytes_per_token(s, cache_width)


# ----------------------------------------------------------------------------- measurement

_MIN_BYTES_PER_REPEAT, _MAX_COPIES = 64 * 2**20, 1024


def _check_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, a str or a torch.device, got {device!r} of type {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must name a CPU or CUDA device, got {device!r}: {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device} but CUDA is not available on this machine")
    return device


def measure_bandwidth(device=None, size_bytes=256 * 2**20, repeats=5) -> float:
    """This machine's effective memory bandwidth in bytes/s: ``2 · size_bytes / time`` of copying a
    ``size_bytes`` buffer into another (each byte read once and written once), the fastest of
    ``repeats``: what the machine can reach, so that a bound computed from it is not loosened by
    a moment of load from other work (a median was, on a busy 2-core machine).

    ``device``: ``None`` (the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``; CUDA
    is synchronised around each timing. One untimed copy first touches both buffers. A buffer
    smaller than the last-level cache measures the cache, not the memory: keep the default for a
    figure to compare with a decode step; a repeat of a small buffer copies it several times (64 MiB
    in all, at most 1024 copies) so that the clock's resolution does not matter.
    """
    device = _check_device(device)
    size_bytes = check_int("size_bytes", size_bytes, minimum=1)
    repeats = check_int("repeats", repeats, minimum=1)
    copies = min(_MAX_COPIES, max(1, -(-_MIN_BYTES_PER_REPEAT // size_bytes)))
    source = torch.ones(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    target.copy_(source)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(copies):
            target.copy_(source)
        sync()
        times.append(time.perf_counter() - start)
    seconds = max(min(times), 1e-9)  # a clock that saw nothing still gives a finite figure
    return 2 * size_bytes * copies / seconds
