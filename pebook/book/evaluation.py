"""Scoring a language model on every held-out token, two ways, and comparing lengths token by token.

Two evaluation protocols of Press, Smith & Lewis (2022, "Train Short, Test Long",
arXiv:2108.12409, §2 and §5):

* **non-overlapping** windows (``stride == length``): the text is cut into windows of ``length``
  tokens and every prediction in a window sees only the tokens before it *in that window*. The
  token at window position ``p`` conditions on ``p + 1`` tokens, so the first tokens of every
  window have almost no context. Longer windows have fewer such tokens, which lowers the mean
  loss even for a model that uses no more context (the "early token curse", §5).
* **sliding** windows (``stride < length``): windows of ``length`` tokens start every ``stride``
  tokens, and each window scores only the tokens that no earlier window scored, its last
  ``stride``; apart from the start of the text, every scored token conditions on at least
  ``length - stride + 1`` tokens.

:func:`score_tokens` returns a loss for *every* target token of the text, with the number of
tokens it conditioned on (:class:`TokenScores`), so that two evaluations of the same text can be
compared token by token (:func:`paired_by_context`): the difference in loss at ``16 L`` and at
``L`` on the same tokens, grouped by how much context each token had at ``L``, separates a
model that *uses* more context from one that only has fewer context-starved tokens.

Target ``t`` (``0 <= t < len(tokens) - 1``) is the token ``tokens[t + 1]``, predicted from
``tokens[: t + 1]`` as far as the window reaches. The windows start at ``0, stride, 2 stride, …``;
when the last one does not end at the end of the text, one more window, aligned with the end,
scores the remaining targets (with more context than the protocol's pattern, for fewer than
``stride`` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._checks import check_int, check_int_tensor

__all__ = ["TokenScores", "window_starts", "window_context", "score_tokens", "paired_by_context"]


@dataclass(frozen=True)
class TokenScores:
    """Per-target results of one evaluation: ``loss`` (float64, nats) and ``context`` (int64).

    ``context[t]`` is the number of tokens the prediction of target ``t`` conditioned on
    (``1 … length``). ``length`` and ``stride`` are the window length and step.
    """

    loss: torch.Tensor
    context: torch.Tensor
    length: int
    stride: int

    def mean(self) -> float:
        """Mean loss over all targets (nats per token)."""
        return float(self.loss.mean())


def window_starts(n_targets: int, length: int, stride: int) -> list[int]:
    """Start of every window covering ``n_targets`` targets (see the module docstring)."""
    n_targets = check_int("n_targets", n_targets, minimum=1)
    length = check_int("length", length, minimum=1)
    stride = check_int("stride", stride, minimum=1)
    if stride > length:
        raise ValueError(f"stride must be in [1, length={length}], got {stride}")
    length = min(length, n_targets)
    starts = list(range(0, n_targets - length + 1, stride))
    if starts[-1] + length < n_targets:
        starts.append(n_targets - length)
    return starts


def _first_scored(starts: torch.Tensor, length: int) -> torch.Tensor:
    """First window position each window scores: everything past the previous window's end."""
    previous_end = torch.cat((torch.zeros(1, dtype=torch.long), starts[:-1] + length))
    return previous_end - starts


def window_context(n_targets: int, length: int, stride: int | None = None) -> torch.Tensor:
    """How many tokens each of ``n_targets`` targets conditions on, read in windows of ``length``.

    The ``context`` that :func:`score_tokens` records, without a model (for scoring other
    models, e.g. n-grams, under the same windows).
    """
    stride = length if stride is None else stride
    starts = torch.tensor(window_starts(n_targets, length, stride))
    length = min(length, n_targets)
    first = _first_scored(starts, length)
    context = torch.zeros(n_targets, dtype=torch.long)
    positions = torch.arange(length)
    scored = positions >= first[:, None]
    index = starts[:, None] + positions
    context[index[scored]] = (positions + 1).expand_as(index)[scored]
    return context


@torch.no_grad()
def score_tokens(
    model,
    tokens: torch.Tensor,
    length: int,
    *,
    stride: int | None = None,
    batch_size: int = 8,
    device=None,
) -> TokenScores:
    """The loss of ``model`` on every target of ``tokens``, read in windows of ``length``.

    ``stride`` (default ``length``: non-overlapping windows) is the step between windows; each
    window scores only targets no earlier window scored. ``model(inputs)`` must return logits
    ``(batch, length, vocab)``; what it raises (e.g. ``ValueError`` from a learned position table
    shorter than ``length``) propagates. Returns a :class:`TokenScores` of ``len(tokens) - 1``
    targets.
    """
    check_int_tensor("tokens", tokens, ndim=1)
    if tokens.numel() < 2:
        raise ValueError(f"tokens must hold at least 2 tokens (one target), got {tokens.numel()}")
    length = check_int("length", length, minimum=1)
    stride = length if stride is None else stride
    batch_size = check_int("batch_size", batch_size, minimum=1)
    n_targets = tokens.numel() - 1
    starts = window_starts(n_targets, length, stride)
    length = min(length, n_targets)
    device = torch.device(device) if device is not None else next(model.parameters()).device

    starts_t = torch.tensor(starts)
    first_scored = _first_scored(starts_t, length)
    window_positions = torch.arange(length)

    loss = torch.full((n_targets,), float("nan"), dtype=torch.float64)
    context = torch.zeros(n_targets, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, len(starts), batch_size):
            batch_starts = starts_t[begin : begin + batch_size]
            index = batch_starts[:, None] + window_positions  # target indices (b, length)
            inputs, targets = tokens[index], tokens[index + 1]
            logits = model(inputs.to(device))
            losses = F.cross_entropy(logits.transpose(1, 2), targets.to(device), reduction="none")
            scored = window_positions >= first_scored[begin : begin + batch_size, None]
            loss[index[scored]] = losses.double().cpu()[scored]
            context[index[scored]] = (window_positions + 1).expand_as(index)[scored]
    finally:
        model.train(was_training)
    return TokenScores(loss=loss, context=context, length=length, stride=stride)


def paired_by_context(scores: TokenScores, reference: TokenScores, edges) -> list[dict]:
    """Per-token loss differences ``scores - reference`` on the same targets, by reference context.

    ``edges`` are increasing context sizes ``e_0 < e_1 < …``; group ``g`` holds the targets whose
    ``reference.context`` lies in ``[e_g, e_{g+1})`` (the last group is open-ended). Returns one
    record per non-empty group: ``{"context": [lo, hi], "n", "mean_diff", "stderr"}`` (``hi`` is
    ``None`` for the last group; ``stderr`` is the standard error of the mean difference).
    """
    if not isinstance(scores, TokenScores) or not isinstance(reference, TokenScores):
        raise TypeError("scores and reference must be TokenScores (from score_tokens)")
    if scores.loss.shape != reference.loss.shape:
        raise ValueError(
            f"scores and reference must cover the same targets, got {scores.loss.numel()} and {reference.loss.numel()}"
        )
    edges = [check_int("edges[]", e, minimum=1) for e in edges]
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be a non-empty increasing sequence of ints >= 1, got {edges}")
    diff = scores.loss - reference.loss
    records = []
    for lo, hi in zip(edges, [*edges[1:], None]):
        in_group = reference.context >= lo
        if hi is not None:
            in_group &= reference.context < hi
        n = int(in_group.sum())
        if n == 0:
            continue
        d = diff[in_group]
        stderr = float(d.std(unbiased=True) / n**0.5) if n > 1 else float("nan")
        records.append({"context": [lo, hi], "n": n, "mean_diff": float(d.mean()), "stderr": stderr})
    return records
