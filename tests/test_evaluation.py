"""pebook.book.evaluation: per-token scoring in non-overlapping and sliding windows, paired analysis."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import pebook as pb
from pebook.book.evaluation import TokenScores, paired_by_context, score_tokens, window_context, window_starts

VOCAB = 11


def tiny_model(encoding="rope", seed=0, max_positions=64):
    torch.manual_seed(seed)
    return pb.TinyLM(VOCAB, dim=16, n_layers=1, n_heads=2, max_positions=max_positions, encoding=encoding)


def reference_scores(model, tokens, length, stride):
    """Written from the protocol's definition, one window at a time, in float64."""
    model = model.double().eval()
    n = tokens.numel() - 1
    length = min(length, n)
    loss = [None] * n
    context = [None] * n
    start, scored_until = 0, 0
    while scored_until < n:
        if start + length > n:
            start = n - length  # the last window ends at the end of the text
        window = tokens[start : start + length + 1]
        with torch.no_grad():
            logits = model(window[:-1][None])[0]
        losses = F.cross_entropy(logits, window[1:], reduction="none")
        for p in range(length):
            t = start + p
            if t >= scored_until:
                loss[t], context[t] = losses[p].item(), p + 1
        scored_until = start + length
        start += stride
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(context)


class Unigram(torch.nn.Module):
    """Ignores its context: the same distribution at every position."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(VOCAB, dtype=torch.float64))

    def forward(self, tokens):
        return self.logits.expand(*tokens.shape, VOCAB)


@pytest.mark.parametrize("length,stride", [(8, 8), (8, 3), (8, 1), (5, 5), (40, 40), (7, 6)])
def test_matches_reference_loop(device, length, stride):
    tokens = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(1))
    model = tiny_model().double()
    expected_loss, expected_context = reference_scores(model, tokens, length, stride)
    got = score_tokens(model.to(device), tokens, length, stride=stride, batch_size=3)
    torch.testing.assert_close(got.loss, expected_loss, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.context, expected_context)
    assert got.length == min(length, 36) and got.stride == stride


@given(
    n=st.integers(2, 80),
    length=st.integers(1, 30),
    stride_fraction=st.floats(0.01, 1.0),
)
def test_every_target_scored_once_with_its_context(n, length, stride_fraction):
    stride = max(1, min(length, round(length * stride_fraction)))
    starts = window_starts(n, length, stride)
    eff = min(length, n)
    covered = torch.zeros(n, dtype=torch.long)
    for s in starts:
        assert 0 <= s and s + eff <= n
        covered[s : s + eff] += 1
    assert (covered > 0).all()  # every target lies in some window
    tokens = torch.randint(0, VOCAB, (n + 1,), generator=torch.Generator().manual_seed(n))
    scores = score_tokens(Unigram(), tokens, length, stride=stride)
    assert not scores.loss.isnan().any()
    assert int(scores.context.min()) >= 1 and int(scores.context.max()) <= eff
    # sliding: every target past the first window has at least length - stride + 1 tokens
    past_first = torch.arange(n) >= eff
    assert (scores.context[past_first] >= eff - stride + 1).all()


@given(length=st.integers(1, 20), stride=st.integers(1, 20))
def test_a_model_without_context_scores_the_same_at_every_length(length, stride):
    stride = min(stride, length)
    tokens = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(0))
    model = Unigram()
    reference = F.cross_entropy(model(tokens[:-1]), tokens[1:], reduction="none").double()
    scores = score_tokens(model, tokens, length, stride=stride)
    torch.testing.assert_close(scores.loss, reference, rtol=1e-12, atol=1e-12)


def test_nonoverlapping_context_pattern_snapshot():
    tokens = torch.arange(11) % VOCAB  # 10 targets
    scores = score_tokens(Unigram(), tokens, 4)
    # windows at 0, 4 and one aligned with the end at 6 (scores targets 8, 9)
    assert window_starts(10, 4, 4) == [0, 4, 6]
    assert scores.context.tolist() == [1, 2, 3, 4, 1, 2, 3, 4, 3, 4]
    sliding = score_tokens(Unigram(), tokens, 4, stride=2)
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert sliding.context.tolist() == [1, 2, 3, 4, 3, 4, 3, 4, 3, 4]
    assert torch.equal(window_context(10, 4), scores.context)
    assert torch.equal(window_context(10, 4, 2), sliding.context)


def test_a_model_that_needs_one_token_gains_nothing_from_longer_windows():
    """Paired differences are exactly zero when every window gives the model all it uses."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (400,), generator=gen)

    class Previous(torch.nn.Module):
        """Predicts from the previous token only (a fixed random bigram table)."""

        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64) * 3)

        def forward(self, x):
            return self.table[x]

    model = Previous()
    short, long = score_tokens(model, tokens, 4), score_tokens(model, tokens, 100)
    torch.testing.assert_close(short.loss, long.loss, rtol=0, atol=0)  # it only sees one token
    records = paired_by_context(long, short, [1, 2])
    # 99 full windows of 4 start a target with 1 token of context; the window aligned with
    # the end (targets 396-398) and the other positions have 2-4
    assert [r["n"] for r in records] == [99, 300]
    assert all(r["mean_diff"] == 0.0 for r in records)


def test_paired_by_context_groups_and_means():
    loss_a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    loss_b = torch.tensor([0.5, 2.0, 2.0, 4.5, 5.0], dtype=torch.float64)
    context = torch.tensor([1, 2, 3, 4, 5])
    a = TokenScores(loss_a, context, 5, 5)
    b = TokenScores(loss_b, context, 5, 5)
    records = paired_by_context(b, a, [1, 3])
    assert records[0]["context"] == [1, 3] and records[0]["n"] == 2
    assert records[0]["mean_diff"] == pytest.approx(-0.25)
    assert records[1]["context"] == [3, None] and records[1]["n"] == 3
    assert records[1]["mean_diff"] == pytest.approx((-1.0 + 0.5 + 0.0) / 3)
    expected_se = torch.tensor([-1.0, 0.5, 0.0], dtype=torch.float64).std() / math.sqrt(3)
    assert records[1]["stderr"] == pytest.approx(float(expected_se))


def test_learned_table_refuses_long_windows():
    model = tiny_model("learned", max_positions=8)
    tokens = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(0))
    assert score_tokens(model, tokens, 8).loss.numel() == 29
    with pytest.raises(ValueError):
        score_tokens(model, tokens, 16)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, t: score_tokens(m, t, 4, stride=5), "stride"),
        (lambda m, t: score_tokens(m, t, 0), "length"),
        (lambda m, t: score_tokens(m, t[None], 4), "tokens"),
        (lambda m, t: score_tokens(m, t[:1], 4), "tokens"),
        (lambda m, t: score_tokens(m, t.float(), 4), "tokens"),
        (lambda m, t: score_tokens(m, t, 4, batch_size=0), "batch_size"),
        (lambda m, t: window_starts(0, 4, 4), "n_targets"),
        (lambda m, t: paired_by_context(score_tokens(m, t, 4), score_tokens(m, t[:-1], 4), [1]), "same targets"),
        (lambda m, t: paired_by_context(score_tokens(m, t, 4), score_tokens(m, t, 4), [3, 2]), "edges"),
        (lambda m, t: paired_by_context(score_tokens(m, t, 4), score_tokens(m, t, 4), []), "edges"),
        (lambda m, t: paired_by_context(1.0, score_tokens(m, t, 4), [1]), "TokenScores"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    tokens = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(0))
    with pytest.raises((ValueError, TypeError), match=match):
        call(Unigram(), tokens)
