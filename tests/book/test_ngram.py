"""Tests of pebook.book.ngram: the interpolated Witten-Bell byte n-gram model."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pebook.book import ngram

TEXT = b"abracadabra, the cat sat on the mat; abba"


def reference_probability(train: bytes, order: int, context: bytes, byte: int) -> float:
    """P(byte | context) by the Witten-Bell recursion, written plainly (float64)."""
    context = context[max(0, len(context) - (order - 1)) :] if order > 1 else b""
    p = 1.0 / 256
    for k in range(len(context) + 1):
        h = context[len(context) - k :]
        follow = Counter(train[t + k] for t in range(len(train) - k) if train[t : t + k] == h)
        c_h, n_h = sum(follow.values()), len(follow)
        if c_h:
            p = (follow[byte] + n_h * p) / (c_h + n_h)
    return p


def reference_losses(train: bytes, order: int, window: bytes, context_limit=None) -> list[float]:
    limit = order - 1 if context_limit is None else min(order - 1, context_limit)
    return [
        -math.log(reference_probability(train, order, window[max(0, t - limit) : t], window[t]))
        for t in range(len(window))
    ]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("context", [b"", b"a", b"ab", b"the ", b"zzz", b"\x00\xff"])
def test_distribution_matches_reference_and_sums_to_one(order, context):
    model = ngram.fit(TEXT, order)
    p = model.distribution(context)
    expected = [reference_probability(TEXT, order, context, w) for w in range(256)]
    assert p.dtype == np.float64 and p.shape == (256,)
    np.testing.assert_allclose(p, expected, rtol=1e-13, atol=0)
    assert abs(p.sum() - 1.0) < 1e-12 and (p > 0).all()


@pytest.mark.parametrize("order", [1, 2, 3, 5])
@pytest.mark.parametrize("context_limit", [None, 0, 1, 2])
def test_log_loss_matches_reference(order, context_limit):
    model = ngram.fit(TEXT, order)
    window = b"the cab sat on abba, mat"
    losses = model.log_loss(window, context_limit)
    np.testing.assert_allclose(losses, reference_losses(TEXT, order, window, context_limit), rtol=1e-12)


def test_rows_are_independent_windows():
    model = ngram.fit(TEXT, 3)
    text = np.frombuffer(b"the cat sat on the mat!!", dtype=np.uint8)
    rows = model.log_loss(text.reshape(4, 6))
    assert rows.shape == (4, 6)
    for r in range(4):
        np.testing.assert_array_equal(rows[r], model.log_loss(text[6 * r : 6 * r + 6]))


def test_inputs_as_bytes_tensor_and_array_agree():
    model = ngram.fit(torch.tensor(list(TEXT)), 3)
    same = ngram.fit(np.frombuffer(TEXT, dtype=np.uint8), 3)
    window = b"abra cat"
    np.testing.assert_array_equal(model.log_loss(window), same.log_loss(list(window)))
    np.testing.assert_array_equal(model.log_loss(window), same.log_loss(torch.tensor(list(window))))


# total loss in nats of b"the bat sat" under the 3-gram of TEXT, frozen from a first run
SNAPSHOT_SUM = 13.544676423332158


def test_frozen_snapshot():
    losses = ngram.fit(TEXT, 3).log_loss(b"the bat sat")
    assert losses.sum() == pytest.approx(SNAPSHOT_SUM, rel=1e-12)
    assert sum(reference_losses(TEXT, 3, b"the bat sat")) == pytest.approx(SNAPSHOT_SUM, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    train=st.binary(min_size=0, max_size=60),
    context=st.binary(min_size=0, max_size=6),
    order=st.integers(1, 4),
)
def test_every_context_sums_to_one(train, context, order):
    p = ngram.fit(train, order).distribution(context)
    assert abs(p.sum() - 1.0) < 1e-12 and (p > 0).all()


@settings(max_examples=30, deadline=None)
@given(
    train=st.binary(min_size=1, max_size=40),
    window=st.binary(min_size=1, max_size=12),
    order=st.integers(1, 4),
)
def test_log_loss_property_matches_reference(train, window, order):
    losses = ngram.fit(train, order).log_loss(window)
    np.testing.assert_allclose(losses, reference_losses(train, order, window), rtol=1e-12)


def test_longer_context_limit_cannot_matter_beyond_order():
    model = ngram.fit(TEXT, 3)
    window = b"abracadabra cat"
    np.testing.assert_array_equal(model.log_loss(window, 2), model.log_loss(window, 100))
    np.testing.assert_array_equal(model.log_loss(window, 2), model.log_loss(window))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="order"):
        ngram.fit(TEXT, 0)
    with pytest.raises(ValueError, match="order"):
        ngram.fit(TEXT, ngram.MAX_ORDER + 1)
    with pytest.raises(TypeError, match="order"):
        ngram.fit(TEXT, 2.0)
    with pytest.raises(ValueError, match="train_bytes"):
        ngram.fit([1, 2, 300], 2)
    with pytest.raises(TypeError, match="train_bytes"):
        ngram.fit(np.array([0.5, 1.0]), 2)
    with pytest.raises(ValueError, match="train_bytes"):
        ngram.fit(np.zeros((2, 2), dtype=np.int64), 2)
    model = ngram.fit(TEXT, 2)
    with pytest.raises(ValueError, match="data"):
        model.log_loss([-1, 3])
    with pytest.raises(ValueError, match="data"):
        model.log_loss(np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="context_limit"):
        model.log_loss(b"ab", context_limit=-1)
    with pytest.raises(ValueError, match="context"):
        model.distribution([256])


@pytest.mark.parametrize("order", [1, 2, 3, 5])
@pytest.mark.parametrize("length,stride", [(4, 4), (5, 2), (30, 30)])
def test_target_losses_under_another_evaluations_windows(order, length, stride):
    from pebook.book.evaluation import window_context

    model = ngram.fit(TEXT, order)
    tokens = np.frombuffer(b"the cab sat on abba, mat", dtype=np.uint8)
    context = window_context(tokens.size - 1, length, stride).numpy()
    losses = model.target_losses(tokens, context)
    window = bytes(tokens)
    expected = [
        -math.log(reference_probability(TEXT, order, window[t + 1 - c : t + 1], window[t + 1]))
        for t, c in enumerate(context.tolist())
    ]
    np.testing.assert_allclose(losses, expected, rtol=1e-12)
    # with all the context there is, it is log_loss of the whole text, first byte left out
    full = model.target_losses(tokens, np.arange(1, tokens.size))
    np.testing.assert_allclose(full, model.log_loss(tokens)[1:], rtol=1e-13)


def test_target_losses_bad_context():
    model = ngram.fit(TEXT, 3)
    with pytest.raises(ValueError, match="context must have shape"):
        model.target_losses(b"abcd", [1, 2])
    with pytest.raises(ValueError, match="context must hold counts"):
        model.target_losses(b"abcd", [1, -1, 2])
    with pytest.raises(ValueError, match="context must not exceed"):
        model.target_losses(b"abcd", [2, 2, 3])
    with pytest.raises(TypeError, match="context"):
        model.target_losses(b"abcd", [1.0, 2.0, 3.0])
