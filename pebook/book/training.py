"""Training and evaluating :class:`pebook.TinyLM` language models: a small, explicit loop.

* :class:`TrainConfig` — steps, batch, context length, AdamW settings, warm-up + cosine schedule,
  gradient clipping, seed.
* :func:`build_model` — a seeded ``TinyLM`` (same seed → same initial weights).
* :func:`train` — next-token cross-entropy with AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) and gradient
  clipping; batches come from :func:`pebook.book.corpus.random_windows` and a seeded generator.
  Everything the loop depends on (weights, optimizer moments, generator state, step, history)
  is in :class:`TrainState`, so a run saved mid-way and resumed ends in exactly the state of an
  uninterrupted run (bitwise on the same machine and thread count).

Evaluation (both protocols, every held-out token) is in :mod:`pebook.book.evaluation`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .._checks import check_int, check_int_tensor, check_positive_float
from ..model import TinyLM
from .corpus import VOCAB_SIZE, random_windows

__all__ = [
    "TrainConfig",
    "TrainState",
    "build_model",
    "learning_rate",
    "train",
    "train_query_task",
]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all of them; ``asdict`` goes into results files).

    The learning rate warms up linearly over ``warmup_steps``, then follows a cosine from ``lr``
    down to ``lr * min_lr_ratio`` at ``steps`` (``schedule="cosine"``) or stays at ``lr``
    (``schedule="constant"``).
    """

    steps: int
    batch_size: int
    seq_len: int
    lr: float = 3e-3
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        check_int("steps", self.steps, minimum=0)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("seq_len", self.seq_len, minimum=1)
        check_positive_float("lr", self.lr)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check_positive_float("grad_clip", self.grad_clip)
        check_int("seed", self.seed, minimum=0)
        check_int("log_every", self.log_every, minimum=1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainState:
    """Everything a training run needs to continue: ``step``, weights, optimizer, batch generator, history.

    ``history`` holds ``(step, mean training loss over the last log_every steps)``.
    """

    step: int
    model: dict
    optimizer: dict
    generator: torch.Tensor
    history: list = field(default_factory=list)
    pending: list = field(default_factory=list)  # losses since the last logged step

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> TrainState:
        return cls(**state)


def build_model(
    encoding: str, *, dim: int, n_layers: int, n_heads: int, max_positions: int, seed: int = 0, **options
) -> TinyLM:
    """A byte-level ``TinyLM`` (vocabulary :data:`pebook.book.corpus.VOCAB_SIZE`) initialised from ``seed``.

    The global torch generator is re-seeded with ``seed`` and restored afterwards, so the
    weights depend on ``seed`` and the arguments only.
    """
    seed = check_int("seed", seed, minimum=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyLM(VOCAB_SIZE, dim, n_layers, n_heads, max_positions, encoding, **options)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine or constant."""
    step = check_int("step", step, minimum=0)
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_optimizer(model: TinyLM, config: TrainConfig) -> torch.optim.AdamW:
    # weight decay on matrices only (not on biases, LayerNorm gains or 1-D tables), as in GPT-2 practice
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def train(
    model: TinyLM,
    tokens: torch.Tensor,
    config: TrainConfig,
    *,
    device: torch.device | str | None = None,
    state: TrainState | None = None,
    progress: bool = False,
    description: str = "",
    checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 0,
    stop_after: int | None = None,
) -> TrainState:
    """Train ``model`` in place on random windows of ``tokens``; return the final :class:`TrainState`.

    ``state`` (from an earlier, interrupted call) resumes exactly where it stopped.
    ``checkpoint(state)`` is called every ``checkpoint_every`` steps (0: never) and, if the loop
    is interrupted (``KeyboardInterrupt``), before re-raising. ``stop_after`` ends this call
    after that many steps, as an interruption would (for tests). ``progress`` shows a tqdm bar.
    """
    check_int_tensor("tokens", tokens, ndim=1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=0)
    if stop_after is not None:
        stop_after = check_int("stop_after", stop_after, minimum=0)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    optimizer = _make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    if state is None:
        state = TrainState(step=0, model={}, optimizer={}, generator=generator.get_state())
    else:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        generator.set_state(state.generator)

    def snapshot() -> TrainState:
        state.model = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        state.optimizer = _to_cpu(copy.deepcopy(optimizer.state_dict()))
        state.generator = generator.get_state()
        state.pending = [float(loss) for loss in state.pending]  # tensors until a log step
        return state

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=state.step, desc=description or "train", leave=False)
    model.train()
    done_here = 0
    try:
        while state.step < config.steps:
            if stop_after is not None and done_here >= stop_after:
                break
            inputs, targets = random_windows(tokens, config.batch_size, config.seq_len, generator)
            inputs, targets = inputs.to(device), targets.to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state.step, config)
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            state.step += 1
            done_here += 1
            state.pending.append(loss.detach())  # read (a host sync on a GPU) at log steps only
            if state.step % config.log_every == 0 or state.step == config.steps:
                losses = [float(loss) for loss in state.pending]
                state.history.append((state.step, sum(losses) / len(losses)))
                state.pending = []
                if bar is not None:
                    bar.set_postfix(loss=f"{state.history[-1][1]:.3f}")
            if bar is not None:
                bar.update(1)
            if checkpoint is not None and checkpoint_every and state.step % checkpoint_every == 0:
                checkpoint(snapshot())
    except KeyboardInterrupt:
        if checkpoint is not None:
            checkpoint(snapshot())
        raise
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return snapshot()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def train_query_task(
    model: TinyLM,
    config: TrainConfig,
    make_batch: Callable[[int, int, torch.Generator], tuple],
    *,
    device=None,
    progress: bool = False,
    desc: str = "",
) -> list[tuple[int, float]]:
    """Train ``model`` in place on a synthetic task scored at the last position only; the loss history.

    Each step draws ``make_batch(config.batch_size, config.seq_len, generator)`` (its first two
    items: ``inputs`` and ``targets`` of shape ``(batch,)``) from a generator seeded with
    ``config.seed`` and minimises the cross-entropy of ``model(inputs)[:, -1]`` against
    ``targets``, with AdamW, gradient clipping and the schedule of :func:`learning_rate`. Used by
    the passkey and counting experiments; the same arguments give the same weights (bitwise on one
    machine and thread count). Returns ``[(step, mean loss over the last log_every steps)]`` and
    leaves the model in eval mode.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    optimizer = _make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=desc, leave=False)
    history, pending = [], []
    model.train()
    try:
        for step in range(config.steps):
            inputs, targets = make_batch(config.batch_size, config.seq_len, generator)[:2]
            inputs, targets = inputs.to(device), targets.to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            loss = F.cross_entropy(model(inputs)[:, -1], targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            pending.append(loss.detach())  # read (a host sync on a GPU) at log steps only
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                losses = [float(loss) for loss in pending]
                history.append((step + 1, sum(losses) / len(losses)))
                pending = []
                if bar is not None:
                    bar.set_postfix(loss=f"{history[-1][1]:.3f}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return history
