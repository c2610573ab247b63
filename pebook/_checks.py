"""Argument checks shared by every public pebook function.

Each check raises ``ValueError`` or ``TypeError`` whose message names the argument, the value
it received and what is allowed, so that bad input never surfaces as a shape error from deep
inside torch.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

__all__ = [
    "check_int",
    "check_positive_float",
    "check_even",
    "check_float_tensor",
    "check_int_tensor",
    "check_same_placement",
    "check_attention_inputs",
    "check_float_dtype",
    "check_positions",
    "check_bool",
    "same_device",
]


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int; reject bools, floats and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_positive_float(name: str, value, *, greater_than: float = 0.0) -> float:
    """Return ``value`` as a finite float strictly greater than ``greater_than``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= greater_than:
        raise ValueError(f"{name} must be a finite number > {greater_than:g}, got {value!r}")
    return value


def check_even(name: str, value) -> int:
    """Return ``value`` as a positive even int (feature dimensions that are split into pairs)."""
    value = check_int(name, value, minimum=2)
    if value % 2:
        raise ValueError(f"{name} must be even (features come in sin/cos or rotation pairs), got {value}")
    return value


def check_float_dtype(name: str, dtype, allowed: tuple[torch.dtype, ...] | None = None) -> torch.dtype:
    """Check that ``dtype`` is a floating torch dtype (optionally one of ``allowed``)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype, got {dtype!r}")
    if allowed is not None and dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must be one of {names}, got {dtype}")
    return dtype


def check_float_tensor(name: str, value, *, ndim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Check that ``value`` is a floating-point tensor, optionally with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    _check_ndim(name, value, ndim)
    return value


def check_int_tensor(name: str, value, *, ndim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Check that ``value`` is an integer (not bool) tensor, optionally with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    _check_ndim(name, value, ndim)
    return value


def _check_ndim(name: str, value: torch.Tensor, ndim) -> None:
    if ndim is None:
        return
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if value.dim() not in allowed:
        wanted = " or ".join(str(n) for n in allowed)
        raise ValueError(f"{name} must have {wanted} dimensions, got shape {tuple(value.shape)}")


def check_same_placement(**tensors: torch.Tensor) -> None:
    """Check that all tensors share one device (and report which argument differs)."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate ``(batch, heads, seq, head_dim)`` query/key/value tensors (keys may have fewer heads: GQA).

    Returns ``(batch, heads, q_len, k_len, head_dim)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, ndim=4)
    check_same_placement(q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; they must match")
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[-1] != d or k.shape[1] < 1 or h % k.shape[1]:
        raise ValueError(
            f"k must have shape (batch={b}, kv_heads, k_len, head_dim={d}) with kv_heads dividing the "
            f"{h} query heads of q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape (batch, heads, k_len) = {tuple(k.shape[:3])} like k, got {tuple(v.shape)}")
    return b, h, lq, k.shape[2], d


def check_positions(name: str, ids, batch: int, length: int, device) -> torch.Tensor:
    """Validate position ids of shape ``(length,)`` or ``(batch, length)``; return them ``(batch, length)`` int64.

    Negative ids are rejected when the tensor is on the CPU (on a GPU that check would force a
    host synchronisation, so it is skipped there).
    """
    check_int_tensor(name, ids, ndim=(1, 2))
    if not same_device(ids.device, device):
        raise ValueError(f"{name} is on {ids.device} but the inputs are on {device}")
    if ids.dim() == 1:
        if ids.shape[0] != length:
            raise ValueError(f"{name} must have shape ({length},) or ({batch}, {length}), got {tuple(ids.shape)}")
        ids = ids.expand(batch, length)
    elif tuple(ids.shape) != (batch, length):
        raise ValueError(f"{name} must have shape ({length},) or ({batch}, {length}), got {tuple(ids.shape)}")
    if ids.device.type == "cpu" and ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got a minimum of {int(ids.min())}")
    return ids.long()


def same_device(a, b) -> bool:
    """``a`` and ``b`` name the same device (``"cuda"`` and ``cuda:0`` do, unlike ``torch.device`` equality)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def check_bool(name: str, value) -> bool:
    """Return ``value`` if it is a bool; anything else (``"no"``, ``0``, ``None``) raises ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return value
