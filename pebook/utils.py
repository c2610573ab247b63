"""Reproducibility and device selection."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ._checks import check_int

__all__ = ["seed_everything", "default_device"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device) with ``seed``."""
    seed = check_int("seed", seed, minimum=0)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def default_device() -> torch.device:
    """CUDA when available, else CPU; the environment variable ``PEBOOK_DEVICE`` overrides both.

    ``PEBOOK_DEVICE`` may be ``cpu``, ``cuda`` or ``cuda:N``; asking for CUDA on a machine
    without it raises an error rather than silently falling back.
    """
    requested = os.environ.get("PEBOOK_DEVICE", "").strip()
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ValueError(f"PEBOOK_DEVICE={requested!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"PEBOOK_DEVICE={requested!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"PEBOOK_DEVICE={requested!r} but CUDA is not available on this machine")
    return device
