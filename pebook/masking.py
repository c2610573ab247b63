"""Causal masks for queries that start at an offset (decoding with a KV cache)."""

from __future__ import annotations

import torch

from ._checks import check_int

__all__ = ["causal_mask", "query_positions"]


def query_positions(q_len: int, offset: int = 0, *, device=None) -> torch.Tensor:
    """Absolute positions ``offset … offset + q_len - 1`` of the queries, as int64."""
    q_len = check_int("q_len", q_len, minimum=0)
    offset = check_int("offset", offset, minimum=0)
    return torch.arange(offset, offset + q_len, device=device)


def causal_mask(q_len: int, k_len: int, offset: int = 0, *, device=None) -> torch.Tensor:
    """Boolean ``(q_len, k_len)`` mask, True where query ``i`` may attend to key ``j``.

    Query ``i`` sits at absolute position ``offset + i`` and key ``j`` at position ``j``; the
    query sees key ``j`` iff ``j <= offset + i``. With ``offset = k_len - q_len`` the queries
    are the last ``q_len`` positions, which is the case of decoding with a KV cache.
    """
    k_len = check_int("k_len", k_len, minimum=0)
    rows = query_positions(q_len, offset, device=device)
    return torch.arange(k_len, device=device)[None, :] <= rows[:, None]
