"""A byte-level n-gram language model with interpolated Witten-Bell smoothing.

The ALiBi chapter uses it to show the *early token curse* of non-overlapping evaluation windows
(Press, Smith & Lewis 2022, arXiv:2108.12409): the first bytes of every window are scored with
little context, so the mean loss falls with the window length even for a model, like this one,
whose context never exceeds ``order - 1`` bytes.

Smoothing (Witten & Bell 1991, "The zero-frequency problem: estimating the probabilities of
novel events in adaptive text compression", IEEE Trans. Inf. Theory 37(4):1085-1094; in the
interpolated form of Chen & Goodman 1999, "An empirical study of smoothing techniques for
language modeling", Computer Speech & Language 13(4):359-394). For a context ``h`` of ``k``
bytes, ``h'`` the same context without its oldest byte, ``c(h, w)`` the number of times byte
``w`` follows ``h`` in the training bytes, ``c(h) = Σ_w c(h, w)`` and ``N(h)`` the number of
distinct bytes seen after ``h``:

    P(w | h) = (c(h, w) + N(h) · P(w | h')) / (c(h) + N(h))      if c(h) > 0
    P(w | h) = P(w | h')                                          if c(h) = 0

The recursion ends at the empty context (``k = 0``), which is interpolated the same way with the
uniform distribution ``1/256``. Every ``P(· | h)`` sums to one over the 256 byte values.

:func:`fit` counts all ``(k + 1)``-grams, ``k = 0 … order - 1``, of the training bytes;
:meth:`WittenBellLM.log_loss` scores bytes, each with at most ``order - 1`` preceding bytes.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_int

__all__ = ["MAX_ORDER", "WittenBellLM", "fit"]

VOCAB = 256
MAX_ORDER = 7  # contexts of up to 6 bytes: (context, byte) keys fit in 56 bits


def _as_bytes(name: str, data, ndim: tuple[int, ...]) -> np.ndarray:
    """``data`` (bytes, a sequence or array of ints in [0, 256), a tensor) as an int64 array."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        array = np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64)
    else:
        if hasattr(data, "detach"):  # a torch tensor
            data = data.detach().cpu().numpy()
        array = np.asarray(data)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must hold integer byte values, got dtype {array.dtype}")
        array = array.astype(np.int64)
    if array.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimension(s), got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= VOCAB):
        raise ValueError(f"{name} must hold byte values in [0, 256), got values in [{array.min()}, {array.max()}]")
    return array


def _as_bytes_count(name: str, values, size: int) -> np.ndarray:
    """``values`` as a 1-D int64 array of ``size`` counts >= 0."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer counts, got dtype {array.dtype}")
    if array.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) (one count per target), got {array.shape}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must hold counts >= 0, got {array.min()}")
    return array.astype(np.int64)


def _context_keys(data: np.ndarray, k: int) -> np.ndarray:
    """Key of the ``k`` bytes before each position ``t >= k`` of the 1-D ``data`` (newest byte lowest)."""
    keys = np.zeros(data.size - k, dtype=np.int64)
    for back in range(1, k + 1):
        keys |= data[k - back : data.size - back] << (8 * (back - 1))
    return keys


class WittenBellLM:
    """A fitted model (build it with :func:`fit`); ``order`` bytes: ``order - 1`` of context."""

    def __init__(self, order: int, tables: list[tuple[np.ndarray, ...]], n_train: int):
        self.order = order
        self.n_train = n_train
        # per context length k: sorted (context, byte) keys and counts; sorted contexts, c(h), N(h)
        self._tables = tables

    def _lookup(self, k: int, contexts: np.ndarray, targets: np.ndarray):
        """``c(h, w)``, ``c(h)`` and ``N(h)`` (float64) for the ``k``-byte contexts and targets."""
        pair_keys, pair_counts, context_keys, context_totals, context_types = self._tables[k]
        zeros = np.zeros(contexts.shape)
        if not pair_keys.size:
            return zeros, zeros, zeros
        pairs = (contexts << 8) | targets
        where = np.searchsorted(pair_keys, pairs).clip(max=pair_keys.size - 1)
        c_hw = np.where(pair_keys[where] == pairs, pair_counts[where], 0)
        where = np.searchsorted(context_keys, contexts).clip(max=context_keys.size - 1)
        seen = context_keys[where] == contexts
        c_h = np.where(seen, context_totals[where], 0)
        n_h = np.where(seen, context_types[where], 0)
        return c_hw.astype(np.float64), c_h.astype(np.float64), n_h.astype(np.float64)

    def _probabilities(self, contexts: list[np.ndarray], targets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """P(target | its last ``lengths`` context bytes); ``contexts[k]`` are the k-byte keys."""
        p = np.full(targets.shape, 1.0 / VOCAB)
        for k in range(int(lengths.max(initial=0)) + 1):
            c_hw, c_h, n_h = self._lookup(k, contexts[k], targets)
            update = (lengths >= k) & (c_h > 0)
            interpolated = (c_hw + n_h * p) / np.where(update, c_h + n_h, 1.0)
            p = np.where(update, interpolated, p)
        return p

    def distribution(self, context) -> np.ndarray:
        """``P(w | context)`` for all 256 bytes ``w``, float64; only the last ``order - 1`` bytes count."""
        context = _as_bytes("context", context, (1,))
        context = context[context.size - min(context.size, self.order - 1) :]
        targets = np.arange(VOCAB, dtype=np.int64)
        keys = [np.zeros(VOCAB, dtype=np.int64)]
        for k in range(1, context.size + 1):
            keys.append(np.full(VOCAB, _context_keys(np.append(context[-k:], 0), k)[0]))
        return self._probabilities(keys, targets, np.full(VOCAB, context.size))

    def log_loss(self, data, context_limit: int | None = None) -> np.ndarray:
        """Per-byte loss ``-ln P(byte | context)`` in nats, float64, the shape of ``data``.

        ``data`` is one window (1-D) or a batch of independent windows (2-D, one per row). The
        byte at position ``t`` of its window is predicted from the previous
        ``min(t, context_limit, order - 1)`` bytes of that window; ``context_limit=None`` means
        no limit beyond the order. Cutting a text into rows therefore scores it with
        non-overlapping windows; a single row with ``context_limit = L - 1`` scores it as a
        sliding window of length ``L`` (stride one) would.
        """
        data = _as_bytes("data", data, (1, 2))
        limit = self.order - 1
        if context_limit is not None:
            limit = min(limit, check_int("context_limit", context_limit, minimum=0))
        rows = data.reshape(-1, data.shape[-1]) if data.size else data.reshape(-1, 0)
        width = rows.shape[1]
        padded = np.concatenate([np.zeros((rows.shape[0], limit), dtype=np.int64), rows], axis=1)
        flat = padded.reshape(-1)
        stride = width + limit
        starts = (np.arange(rows.shape[0]) * stride)[:, None] + limit + np.arange(width)[None]
        index = starts.reshape(-1)  # where each scored byte lies in `flat`
        keys = [np.zeros(index.size, dtype=np.int64)]
        for k in range(1, limit + 1):
            keys.append(_context_keys(flat, k)[index - k])
        lengths = np.minimum(np.tile(np.arange(width), rows.shape[0]), limit)
        p = self._probabilities(keys, flat[index], lengths)
        return -np.log(p).reshape(data.shape)

    def target_losses(self, tokens, context) -> np.ndarray:
        """Loss of every target ``tokens[t + 1]`` given ``context[t]`` bytes before it, in nats (float64).

        ``context`` holds, per target, how many tokens a model was given (as
        :class:`pebook.book.evaluation.TokenScores` records it); the n-gram uses the last
        ``min(context[t], order - 1)`` of them. This scores an n-gram under exactly the windows
        of another evaluation.
        """
        tokens = _as_bytes("tokens", tokens, (1,))
        context = _as_bytes_count("context", context, tokens.size - 1)
        limit = self.order - 1
        index = np.arange(1, tokens.size)  # position of each target in ``tokens``
        lengths = np.minimum(context, limit)
        if (lengths > index).any():
            raise ValueError("context must not exceed the number of tokens before each target")
        keys = [np.zeros(index.size, dtype=np.int64)]
        padded = np.concatenate([np.zeros(limit, dtype=np.int64), tokens])
        for k in range(1, limit + 1):
            keys.append(_context_keys(padded, k)[index + limit - k])
        return -np.log(self._probabilities(keys, tokens[index], lengths))


def fit(train_bytes, order: int) -> WittenBellLM:
    """Count the n-grams of ``train_bytes`` (1-D, byte values) for a model of ``order`` bytes."""
    order = check_int("order", order, minimum=1)
    if order > MAX_ORDER:
        raise ValueError(f"order must be <= {MAX_ORDER}, got {order}")
    data = _as_bytes("train_bytes", train_bytes, (1,))
    tables = []
    for k in range(order):
        if data.size > k:
            pairs = (_context_keys(data, k) << 8) | data[k:]
            pair_keys, pair_counts = np.unique(pairs, return_counts=True)
        else:
            pair_keys = pair_counts = np.zeros(0, dtype=np.int64)
        context_keys, first, context_types = np.unique(pair_keys >> 8, return_index=True, return_counts=True)
        context_totals = np.add.reduceat(pair_counts, first) if first.size else np.zeros(0, dtype=np.int64)
        tables.append((pair_keys, pair_counts, context_keys, context_totals, context_types))
    return WittenBellLM(order, tables, int(data.size))
