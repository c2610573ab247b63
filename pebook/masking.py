"""Causal masks and default positions.

Two different things place a token, and pebook keeps them apart, as ``transformers`` does:

* **storage order** — where the token's key sits in the (cached) key sequence. The causal mask
  follows it: query ``i`` of ``q_len`` new tokens sees the first ``k_len - q_len + i + 1`` keys
  (:func:`storage_causal_mask`).
* **position** — what the encoding is told: ``position_ids``, ``(batch, seq)`` int64, by default
  continuing from the cache (:func:`default_positions`). Passing other ids moves the token for
  the encoding only, which is how the book reproduces decoding bugs.
"""

from __future__ import annotations

import torch

from ._checks import check_int, check_positions

__all__ = ["causal_mask", "query_positions", "storage_causal_mask", "check_causal_lengths", "default_positions"]


def query_positions(q_len: int, offset: int = 0, *, device=None) -> torch.Tensor:
    """Absolute positions ``offset … offset + q_len - 1`` of the queries, as int64."""
    q_len = check_int("q_len", q_len, minimum=0)
    offset = check_int("offset", offset, minimum=0)
    return torch.arange(offset, offset + q_len, device=device)


def causal_mask(q_len: int, k_len: int, offset: int = 0, *, device=None) -> torch.Tensor:
    """Boolean ``(q_len, k_len)`` mask, True where query ``i`` may attend to key ``j``.

    Query ``i`` sits at position ``offset + i`` and key ``j`` at position ``j``; the query sees
    key ``j`` iff ``j <= offset + i``. With ``offset = k_len - q_len`` the queries are the last
    ``q_len`` positions, which is the case of decoding with a KV cache
    (:func:`storage_causal_mask`).
    """
    k_len = check_int("k_len", k_len, minimum=0)
    rows = query_positions(q_len, offset, device=device)
    return torch.arange(k_len, device=device)[None, :] <= rows[:, None]


def storage_causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """:func:`causal_mask` for queries that are the last ``q_len`` of ``k_len`` stored keys (no checks)."""
    rows = torch.arange(k_len - q_len, k_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= rows[:, None]


def check_causal_lengths(causal: bool, q_len: int, k_len: int) -> None:
    """Causal attention over stored keys needs ``q_len <= k_len``: otherwise the first queries see no key."""
    if causal and q_len > k_len:
        raise ValueError(
            f"causal attention needs q_len <= k_len (the queries are the last q_len of the k_len stored keys), "
            f"got q_len={q_len}, k_len={k_len}"
        )


def default_positions(batch, q_len, k_len, device, position_ids=None, key_position_ids=None):
    """``(batch, q_len)`` query and ``(batch, k_len)`` key positions for attention functions.

    Defaults: keys at ``0 … k_len - 1`` and queries the last ``q_len`` of them. Given ids of shape
    ``(len,)`` are shared by the batch; ``(batch, len)`` ids are per sequence.
    """
    if position_ids is None:
        if q_len > k_len:
            raise ValueError(
                f"without position_ids the queries are the last q_len keys, so q_len={q_len} must be <= k_len={k_len}"
            )
        position_ids = torch.arange(k_len - q_len, k_len, device=device)
    if key_position_ids is None:
        key_position_ids = torch.arange(k_len, device=device)
    q_pos = check_positions("position_ids", position_ids, batch, q_len, device)
    k_pos = check_positions("key_position_ids", key_position_ids, batch, k_len, device)
    return q_pos, k_pos
