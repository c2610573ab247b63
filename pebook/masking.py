"""Causal masks and default positions.

Two different things place a token, and pebook keeps them apart, as ``transformers`` does:

* **storage order** — where the token's key sits in the (cached) key sequence. The causal mask
  follows it: query ``i`` of ``q_len`` new tokens sees the first ``k_len - q_len + i + 1`` keys
  (:func:`storage_causal_mask`).
* **position** — what the encoding is told: ``position_ids``, ``(batch, seq)`` int64, by default
  continuing from the cache (:func:`default_positions`). Passing other ids moves the token for
  the encoding only, which is how the book reproduces decoding bugs.

Batches of prompts of different lengths are **left-padded**, with the ``attention_mask`` of
``transformers``: ``(batch, length)``, 1 for a real token and 0 for padding, the padding before
the tokens (``padding_side="left"``). Padding keys are hidden from every query
(:func:`padded_causal_mask`), and the real tokens' positions are counted from the mask,
``position_ids = cumsum(attention_mask) - 1`` (:func:`mask_positions`), as ``transformers``'
``generate`` computes them, so each row is placed exactly as if it were alone and unpadded.
"""

from __future__ import annotations

import torch

from ._checks import check_int, check_positions, same_device

__all__ = [
    "causal_mask",
    "query_positions",
    "storage_causal_mask",
    "check_causal_lengths",
    "default_positions",
    "check_attention_mask",
    "mask_positions",
    "padded_causal_mask",
    "window_causal_mask",
    "continued_positions",
]


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


def window_causal_mask(q_len: int, k_len: int, window: int, device=None) -> torch.Tensor:
    """Banded causal mask ``(q_len, k_len)``: the queries are the last ``q_len`` stored keys and
    each sees only the last ``window`` keys up to itself (no checks).

    Sliding-window attention (Mistral 7B, Jiang et al. 2023, arXiv:2310.06825, §2): the query in
    storage row ``i`` sees keys ``i - window + 1 … i``. With ``window >= k_len`` it is
    :func:`storage_causal_mask`.
    """
    rows = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    keys = torch.arange(k_len, device=device)[None, :]
    return (keys <= rows) & (keys > rows - window)


def continued_positions(key_mask: torch.Tensor, past_len: int, cached_positions: torch.Tensor) -> torch.Tensor:
    """Default ``(batch, new)`` position ids of the new tokens after a padded cache that a sliding
    window has cut (its first tokens evicted), so ``cumsum(mask)`` alone would count too few.

    ``key_mask`` ``(batch, past_len + new)`` covers the cached and the new tokens. A row's next
    position is its last cached position + 1 when that token is real; if it is padding, the
    whole row so far is padding (left padding) and counting starts at 0. Equals
    ``mask_positions(full_mask)[:, -new:]`` of the uncut mask.
    """
    last = cached_positions[:, past_len - 1]
    base = torch.where(key_mask[:, past_len - 1], last + 1, torch.zeros_like(last))
    return (base[:, None] + key_mask[:, past_len:].long().cumsum(-1) - 1).clamp_(min=0)


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


def check_attention_mask(
    name: str, mask, batch: int, length: int, device, *, what: str = "length", left_padded: bool = True, values: bool
) -> torch.Tensor:
    """Validate a padding mask ``(batch, length)`` of 1 (token) and 0 (padding); return it as bool.

    ``what`` names the length in the message. With ``left_padded`` (the masks of generation and
    of :class:`pebook.TinyLM`) every row must be some 0s then at least one 1, as ``transformers``'
    left padding makes them. ``values``: check the values too (a host synchronisation on a GPU,
    so entry points called at every step pass ``mask.device.type == "cpu"``).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of 1 (token) and 0 (padding), got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or integer tensor of 1 (token) and 0 (padding), got dtype {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape (batch={batch}, {what}={length}), got {tuple(mask.shape)}")
    if not same_device(mask.device, device):
        raise ValueError(f"{name} is on {mask.device} but the tokens are on {device}")
    if mask.dtype != torch.bool:
        if values and mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            bad = mask[(mask != 0) & (mask != 1)][0].item()
            raise ValueError(f"{name} must hold only 1 (token) and 0 (padding), got the value {bad}")
        mask = mask != 0
    if left_padded and values and mask.numel():
        holes = mask[:, :-1] & ~mask[:, 1:]  # a 1 followed by a 0: right padding, or a hole
        if bool(holes.any()):
            row = int(holes.any(dim=1).nonzero()[0])
            raise ValueError(
                f"{name} must be left-padded (0s for padding, then 1s for the tokens, as transformers' "
                f"padding_side='left'): row {row} has a 0 after a 1: {mask[row].int().tolist()}"
            )
        if not bool(mask[:, -1].all()):
            row = int((~mask[:, -1]).nonzero()[0])
            raise ValueError(f"{name} must mark at least one real token (a 1) in every row, row {row} has none")
    return mask


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(batch, length)`` of a left-padded bool mask: ``cumsum(mask) - 1``, padding at 0.

    The ``transformers`` recipe: each row's real tokens sit at ``0, 1, …`` as if unpadded; a padding
    token gets 0, a valid position never attended to.
    """
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def padded_causal_mask(key_mask: torch.Tensor, q_len: int, causal: bool) -> torch.Tensor:
    """Boolean ``(batch, 1, q_len, k_len)``: which key each query sees, padding keys hidden.

    ``key_mask`` ``(batch, k_len)`` is True for real keys; the queries are the last ``q_len`` keys
    (storage order), causal if ``causal``. A padding query would see no key at all (and its
    softmax would be NaN, which would reach the real tokens through the next layer's keys and
    values as ``0 · NaN``), so padding queries see every key they may: their output is finite and
    never read.
    """
    k_len = key_mask.shape[-1]
    padding_query = ~key_mask[:, k_len - q_len :, None]
    visible = key_mask[:, None, :] | padding_query
    if causal:
        visible = visible & storage_causal_mask(q_len, k_len, key_mask.device)
    return visible[:, None]
