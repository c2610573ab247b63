"""pebook.book.training: the seeded training loop, its schedule, resumption and evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from pebook.book import corpus
from pebook.book.training import (
    TrainConfig,
    build_model,
    learning_rate,
    train,
    train_query_task,
)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, batch_size=1, seq_len=4, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1) and learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert learning_rate(100, cfg) == pytest.approx(0.1) and learning_rate(500, cfg) == pytest.approx(0.1)
    const = TrainConfig(steps=100, batch_size=1, seq_len=4, lr=0.5, warmup_steps=4, schedule="constant")
    assert [learning_rate(s, const) for s in (0, 3, 4, 99)] == [0.125, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(steps=1, batch_size=1, seq_len=1, schedule="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(steps=1, batch_size=1, seq_len=1, min_lr_ratio=2.0)


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=8, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=8, seed=1)
    c = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=8, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)


def test_training_lowers_the_loss(device):
    tokens = corpus.corpus_tokens("train")[:20_000]
    model = build_model("alibi", dim=16, n_layers=1, n_heads=2, max_positions=16).to(device)
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=3, log_every=10)
    state = train(model, tokens, cfg, device=device)
    assert state.step == 30 and [s for s, _ in state.history] == [10, 20, 30]
    assert state.history[-1][1] < state.history[0][1] < math.log(256) + 0.5


def test_interrupted_training_resumes_to_the_same_state():
    tokens = corpus.corpus_tokens("train")[:20_000]
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=8, lr=1e-2, warmup_steps=2, log_every=3)
    make = lambda: build_model("t5", dim=16, n_layers=1, n_heads=2, max_positions=8)  # noqa: E731
    whole = train(make(), tokens, cfg)
    saved = []
    part = train(make(), tokens, cfg, stop_after=5, checkpoint=lambda s: saved.append(s.step), checkpoint_every=2)
    assert part.step == 5 and saved == [2, 4]
    resumed = train(make(), tokens, cfg, state=part)
    assert resumed.step == 8 and resumed.history == whole.history
    assert all(torch.equal(resumed.model[k], whole.model[k]) for k in whole.model)


def test_train_query_task_learns_a_last_token_task_deterministically():
    """The shared loop of the passkey and counting experiments: loss at the last position only,
    the same weights and history for the same seed, the model left in eval mode."""

    def copy_first(batch, length, generator):  # the answer is the first token of the window
        inputs = torch.randint(0, 8, (batch, length), generator=generator)
        return inputs, inputs[:, 0]

    cfg = TrainConfig(steps=60, batch_size=16, seq_len=6, lr=3e-2, warmup_steps=5, log_every=20, seed=4)
    runs = []
    for _ in range(2):
        model = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=6, seed=4)
        runs.append((model, train_query_task(model, cfg, copy_first)))
    (first, history), (second, again) = runs
    assert [s for s, _ in history] == [20, 40, 60] and history == again
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
    assert not first.training
    assert history[-1][1] < 0.5 * history[0][1]  # it learns to copy the first token
