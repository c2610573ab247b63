"""Context extension of a RoPE model, measured with seeds, both protocols, controls and retrieval.

A RoPE :class:`pebook.TinyLM` trained at context length ``L`` (``train_len``) is run at
``s·L`` for every ``s`` in ``factors`` (2, 4, 8) after changing its frequencies with a rule of
:mod:`pebook.rope_scaling`, with and without a short fine-tune at ``s·L``, with the evidence
protocol of :mod:`pebook.book.experiments.length_extrapolation`:

* **every rule at every s, with and without fine-tuning**: the fine-tune runs ``finetune_steps``
  at ``s·L`` with ``batch_size // s`` windows per step (the same bytes per step as training), a
  constant learning rate ``finetune_lr`` after a 10 % warm-up, and the same batches for every
  rule of a seed;
* **a fine-tuning control**: the base model fine-tuned at ``L`` for the same steps and bytes with
  its frequencies unchanged, evaluated at ``L`` and at every ``s·L``, so that what fine-tuning at
  ``s·L`` buys is not confused with what any further training buys;
* **both protocols** of :mod:`pebook.book.evaluation` at ``s·L`` (non-overlapping windows and
  sliding windows advancing by half a window) on the same held-out bytes as
  :func:`pebook.book.experiments.length_extrapolation.scored_tokens`;
* **short-input regression**: each extended model is also evaluated at ``L``, and the record
  holds the difference to the base model at ``L`` (positive: the rule costs quality on short
  inputs). The extended model keeps its static frequencies there (those of ``seq_len = s·L``);
  a dynamic rule evaluated dynamically is the unchanged model at ``L`` by construction;
* **dynamic rules evaluated dynamically**: ``"dynamic"`` (``transformers``' formula,
  ``s' = f·l/L - (f - 1)`` with ``f = s``) and ``"dynamic_ntk"`` (the paper's ``s' = max(1, l/L)``)
  are evaluated twice: statically (frequencies fixed at ``seq_len = s·L``, as the old experiment
  did) and dynamically, token by token with a KV cache of *unrotated* keys whose frequencies
  follow the current length (:func:`pebook.generation.incremental_logits` with
  :func:`pebook.rope_scaling.per_length_frequencies`, as ``transformers``' ``dynamic_rope_update``
  does). Decoding token by token is slow, so the dynamic evaluation scores the first
  ``max(1, dynamic_bytes // (s·L))`` non-overlapping windows only; the record gives the number of
  windows and tokens and the static loss on the same windows, for a paired comparison;
* **passkey retrieval**: the language models cannot do the passkey task, so for each seed a RoPE
  model is trained on it (:func:`pebook.book.experiments.retrieval.train_retrieval`, the sizes of
  the retrieval preset named by ``retrieval_preset``, at that preset's ``train_len = L_r``); each
  rule is applied to it for ``s`` (with ``L_r`` as the original length) and it is evaluated at
  ``s·L_r`` in geometric distance bins (:func:`pebook.book.experiments.retrieval.evaluate_retrieval`),
  without and with a fine-tune on the retrieval task at ``s·L_r`` (``finetune_steps``,
  ``retrieval batch_size // s``); the control is the retrieval model fine-tuned at ``L_r``.

The rules are ``rules``, each a :func:`parse_rule` spec ``"name"`` or ``"name:option=value,…"``.
The default set (:data:`DEFAULT_RULES`) holds "no change" (``default``), ``linear``, ``ntk``
with factor ``s`` and with ``2s`` (``ntk:factor_multiplier=2``), YaRN with the ``transformers``
ramp with its temperature and without it (``yarn:attention_factor=1``), ``dynamic``,
``dynamic_ntk``, ``llama3`` and ABF (``base:new_base=500000``: Xiong et al. 2023's base,
independent of ``s``; the NTK base ``base·s^(d/(d-2))`` would make it equal to ``ntk``).

Seeds change the initial weights and the batches of training and fine-tuning. Results are
JSON-ready dicts (schema :data:`SCHEMA`) with the preset, hyper-parameters, device, versions and
wall time. :func:`summary` gives mean, min and max over seeds. :func:`compare` orders two rules
only where the gap exceeds the seed spread: unpaired, where every seed of one is below every seed
of the other; paired (``paired=True``, :func:`paired_difference`), where the difference of the two
rules on the same seed's base model has the same sign on every seed, which removes what a seed does
to every rule alike. The book's results (chapter preset, seeds 0-2, one CPU thread) ship as
``pebook/book/data/context_extension_chapter.json`` (:func:`load_results`).

Command line::

    python -m pebook.book.experiments.context_extension --preset chapter [--seeds 0,1]
        [--rules default,linear] [--device cpu] [--run-dir DIR] [--out FILE] [--merge-into FILE]

``--rules`` is separated by ``;`` when a spec holds options (``"ntk;ntk:factor_multiplier=2"``).
A run directory keeps each finished (seed, rule, s) and the trained base models, so rerunning the
same command continues an interrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import torch
import torch.nn.functional as F

from ...rope import DEFAULT_ROPE_BASE
from ...rope_scaling import ROPE_SCALING_RULES, per_length_frequencies, rope_scaling_frequencies
from ...utils import default_device
from .. import corpus
from ..evaluation import score_tokens
from ..training import TrainConfig, build_model, train, train_query_task
from . import length_extrapolation as le
from . import retrieval as rt
from ._records import (
    device_info,
    experiment_parser,
    jsonable,
    load_data_file,
    order_ranges,
    parse_experiment_args,
    parse_ints,
    preset_with_overrides,
    seed_range,
    versions,
    write_json,
)

__all__ = [
    "SCHEMA",
    "DEFAULT_RULES",
    "DYNAMIC_RULES",
    "PRESETS",
    "parse_rule",
    "preset_config",
    "rule_frequencies",
    "rule_schedule",
    "finetune_config",
    "evaluate_lengths",
    "dynamic_scores",
    "static_scores",
    "run",
    "merge_results",
    "summary",
    "paired_difference",
    "compare",
    "validate_results",
    "load_results",
    "main",
]

SCHEMA = "pebook.context_extension/1"

#: rules whose frequencies depend on the current sequence length (evaluated dynamically too)
DYNAMIC_RULES = ("dynamic", "dynamic_ntk")

DEFAULT_RULES = (
    "default",
    "linear",
    "ntk",
    "ntk:factor_multiplier=2",
    "yarn",
    "yarn:attention_factor=1",
    "dynamic",
    "dynamic_ntk",
    "llama3",
    "base:new_base=500000",
)

# the experiment's defaults for a rule's options (a spec's own options override them)
_RULE_DEFAULTS = {"yarn": {"ramp": "transformers"}}

_COMMON = dict(
    rules=DEFAULT_RULES,
    factors=(2, 4, 8),
    seeds=(0, 1, 2),
    n_heads=4,
    lr=3e-3,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_batch=8,
    finetune_lr=1e-3,
)

#: Named experiment sizes (model, training and evaluation keys as in length_extrapolation).
PRESETS: dict[str, dict] = {
    # seconds: for the test suite only
    "micro": dict(
        _COMMON,
        seeds=(0, 1),
        dim=16,
        n_layers=1,
        n_heads=2,
        train_len=8,
        batch_size=8,
        steps=6,
        warmup_steps=2,
        log_every=2,
        eval_bytes=400,
        finetune_steps=2,
        dynamic_bytes=64,
        retrieval_preset="micro",
    ),
    # the book's chapter: length_extrapolation's chapter model
    "chapter": dict(
        _COMMON,
        dim=64,
        n_layers=2,
        train_len=64,
        batch_size=32,
        steps=200,
        warmup_steps=20,
        log_every=10,
        eval_bytes=32768,
        finetune_steps=30,
        dynamic_bytes=4096,
        retrieval_preset="chapter",
    ),
    # sized for a GPU: length_extrapolation's full model; fine-tunes of 15 % of training, as chapter's
    "full": dict(
        _COMMON,
        dim=256,
        n_layers=4,
        train_len=128,
        batch_size=64,
        steps=4000,
        warmup_steps=200,
        log_every=50,
        eval_batch=16,
        eval_bytes=None,
        finetune_steps=600,
        dynamic_bytes=16384,
        retrieval_preset="full",
    ),
}

_TUPLES = ("rules", "factors", "seeds")


# ------------------------------------------------------------------------------------ rules


def _cast(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def parse_rule(spec: str) -> tuple[str, dict]:
    """``"ntk:factor_multiplier=2"`` -> ``("ntk", {"factor_multiplier": 2})``: a rule with options.

    ``name`` is a key of :data:`pebook.rope_scaling.ROPE_SCALING_RULES` (but ``"longrope"``, whose
    per-pair factor lists a spec cannot hold); the options are ``option=value`` pairs (ints,
    floats, ``true``/``false`` or names) passed to
    :func:`pebook.rope_scaling.rope_scaling_frequencies`, plus this experiment's own
    ``factor_multiplier`` (the rule's factor is ``factor_multiplier · s``; default 1). The
    experiment's defaults (``yarn``: ``ramp="transformers"``) are filled in. ``factor``,
    ``original_max_positions`` and ``seq_len`` are set by the experiment and refused here;
    unknown options are refused when the frequencies are first computed (:func:`preset_config`).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a rule must be a non-empty str such as 'ntk' or 'yarn:attention_factor=1', got {spec!r}")
    name, _, rest = spec.partition(":")
    if name not in ROPE_SCALING_RULES or name == "longrope":
        allowed = tuple(r for r in ROPE_SCALING_RULES if r != "longrope")
        raise ValueError(
            f"rule must be one of {allowed} (optionally 'name:option=value,...'), got {name!r} in {spec!r}"
        )
    options = dict(_RULE_DEFAULTS.get(name, {}))
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"rule options must read option=value, got {item!r} in {spec!r}")
        if key in ("factor", "original_max_positions", "seq_len"):
            raise ValueError(f"rule option {key!r} is set by the experiment (from s and train_len), got it in {spec!r}")
        options[key] = _cast(value)
    multiplier = options.get("factor_multiplier", 1)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier >= 1:
        raise ValueError(f"factor_multiplier must be a number >= 1, got {multiplier!r} in {spec!r}")
    return name, options


def rule_frequencies(
    spec: str, factor: int, train_len: int, dim: int, base: float = DEFAULT_ROPE_BASE, *, seq_len=None
) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)`` of rule ``spec`` extending ``train_len`` by ``factor``.

    The rule gets ``factor · factor_multiplier`` as its factor, ``original_max_positions =
    train_len`` and ``seq_len`` (default ``factor · train_len``, the evaluation length).
    """
    name, options = parse_rule(spec)
    multiplier = options.pop("factor_multiplier", 1)
    return rope_scaling_frequencies(
        name,
        dim,
        base,
        factor=float(factor * multiplier),
        original_max_positions=train_len,
        seq_len=factor * train_len if seq_len is None else seq_len,
        **options,
    )


def rule_schedule(spec: str, factor: int, train_len: int, dim: int, base: float = DEFAULT_ROPE_BASE):
    """The per-length frequency schedule of rule ``spec`` (for the dynamic rules: ``seq_len -> (inv_freq,
    attention_factor)``), as :func:`pebook.rope_scaling.per_length_frequencies` builds it with the
    options of :func:`rule_frequencies`; pass it to :func:`dynamic_scores` or ``generate``."""
    name, options = parse_rule(spec)
    multiplier = options.pop("factor_multiplier", 1)
    return per_length_frequencies(
        name, dim, base, factor=float(factor * multiplier), original_max_positions=train_len, **options
    )


def _check_rules(rules) -> tuple:
    if isinstance(rules, str) or not rules:
        raise ValueError(f"rules must be a non-empty sequence of rule specs, got {rules!r}")
    rules = tuple(rules)
    if len(set(rules)) != len(rules):
        raise ValueError(f"rules must not repeat, got {rules}")
    for spec in rules:
        try:
            rule_frequencies(spec, 2, 8, 8)  # options checked once, on a small RoPE
        except (TypeError, ValueError) as err:
            raise ValueError(f"rules: bad rule {spec!r}: {err}") from None
    return rules


def _check_seeds(seeds) -> tuple:
    seeds = tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints >= 0, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must not repeat, got {seeds}")
    return seeds


def preset_config(preset: str, **overrides) -> dict:
    """The hyper-parameters of ``preset`` (a key of :data:`PRESETS`), with ``overrides`` applied."""
    config = preset_with_overrides(PRESETS, preset, overrides)
    for name in _TUPLES:
        if isinstance(config[name], str):
            raise ValueError(f"{name} must be a sequence, got the str {config[name]!r}")
        config[name] = tuple(config[name])
    config["rules"] = _check_rules(config["rules"])
    config["seeds"] = _check_seeds(config["seeds"])
    factors = config["factors"]
    if (
        not factors
        or any(isinstance(f, bool) or not isinstance(f, int) or f < 2 for f in factors)
        or list(factors) != sorted(set(factors))
    ):
        raise ValueError(f"factors must be increasing ints >= 2 (the extensions s), got {factors}")
    if config["batch_size"] % max(factors):
        raise ValueError(
            f"batch_size={config['batch_size']} must be divisible by every factor {factors} "
            "(the same bytes per fine-tuning step at every length)"
        )
    if config["eval_bytes"] is not None and config["eval_bytes"] < config["train_len"] * max(factors):
        raise ValueError(
            f"eval_bytes must be None or at least the longest window {config['train_len'] * max(factors)}, "
            f"got {config['eval_bytes']}"
        )
    for name in ("finetune_steps", "dynamic_bytes"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if config["retrieval_preset"] not in rt.PRESETS:
        raise ValueError(f"retrieval_preset must be one of {tuple(rt.PRESETS)}, got {config['retrieval_preset']!r}")
    if retrieval_config(config)["batch_size"] % max(factors):
        raise ValueError(f"the retrieval preset's batch_size must be divisible by every factor {factors}")
    return config


def retrieval_config(config: dict) -> dict:
    """The hyper-parameters of the retrieval preset ``config["retrieval_preset"]``."""
    return rt.preset_config(config["retrieval_preset"])


def finetune_config(config: dict, seed: int, factor: int, *, batch_size=None, train_len=None) -> TrainConfig:
    """The fine-tune at ``train_len × factor``: ``finetune_steps``, constant LR after a 10 % warm-up.

    ``batch_size // factor`` windows (the same bytes per step as training); the seed ``seed + 1000``
    gives every rule of a seed the same batches.
    """
    steps = config["finetune_steps"]
    return TrainConfig(
        steps=steps,
        batch_size=max(1, (config["batch_size"] if batch_size is None else batch_size) // factor),
        seq_len=(config["train_len"] if train_len is None else train_len) * factor,
        lr=config["finetune_lr"],
        warmup_steps=max(1, steps // 10),
        schedule="constant",
        weight_decay=config["weight_decay"],
        grad_clip=config["grad_clip"],
        seed=seed + 1000,
        log_every=max(1, steps // 10),
    )


# ------------------------------------------------------------------------------------ evaluation


def _rope_dim(model) -> int:
    if model.encoding != "rope":
        raise ValueError(f"context extension needs a RoPE model, got encoding={model.encoding!r}")
    return model.encoding_module.rotary_dim


def evaluate_lengths(model, config: dict, lengths, *, tokens=None, device=None) -> dict:
    """``{str(length): {"nonoverlapping", "sliding", "stride"}}``: both protocols at each length."""
    tokens = le.scored_tokens(config) if tokens is None else tokens
    out = {}
    for length in lengths:
        stride = max(1, length // 2)
        plain = score_tokens(model, tokens, length, batch_size=config["eval_batch"], device=device)
        sliding = score_tokens(model, tokens, length, stride=stride, batch_size=config["eval_batch"], device=device)
        out[str(length)] = {"nonoverlapping": plain.mean(), "sliding": sliding.mean(), "stride": stride}
    return out


def _windows(tokens: torch.Tensor, length: int, n_windows: int) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows of ``length + 1`` tokens (inputs and targets)."""
    n_windows = max(1, min(n_windows, (tokens.numel() - 1) // length))
    return torch.stack([tokens[i * length : i * length + length + 1] for i in range(n_windows)])


@torch.no_grad()
def dynamic_scores(model, windows: torch.Tensor, schedule, *, device=None) -> torch.Tensor:
    """Per-token losses ``(n_windows, length)`` of ``windows`` decoded token by token with a cache.

    ``windows`` ``(n, length + 1)``; the frequencies follow ``schedule(seq_len)`` at every step
    (:func:`pebook.generation.incremental_logits`) on a copy of ``model`` that caches keys before
    rotation (``cache_rotated_keys=False``), so that every cached key gets the current frequencies.
    """
    from ...generation import incremental_logits
    from ...model import TinyLM

    device = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        copy_ = TinyLM(
            model.vocab_size,
            model.dim,
            model.n_layers,
            model.n_heads,
            model.max_positions,
            "rope",
            cache_rotated_keys=False,
            rotary_dim=model.encoding_module.rotary_dim,
        )
    copy_.load_state_dict(model.state_dict())
    copy_ = copy_.to(device=device, dtype=next(model.parameters()).dtype).eval()
    inputs, targets = windows[:, :-1].to(device), windows[:, 1:].to(device)
    logits = incremental_logits(copy_, inputs, 1, rope_frequencies=schedule)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double().cpu()


@torch.no_grad()
def static_scores(model, windows: torch.Tensor, *, device=None) -> torch.Tensor:
    """Per-token losses ``(n_windows, length)`` of ``windows`` with one forward pass each."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(windows[:, :-1].to(device))
    finally:
        model.train(was_training)
    return F.cross_entropy(logits.transpose(1, 2), windows[:, 1:].to(device), reduction="none").double().cpu()


def _retrieval_eval(model, rconfig: dict, length: int, device) -> dict:
    records = rt.evaluate_retrieval(
        model,
        [length],
        "geometric",
        n_per_cell=rconfig["n_per_cell"],
        seed=rconfig["eval_seed"],
        train_len=rconfig["train_len"],
        batch_size=rconfig["eval_batch"],
        device=device,
    )
    far = [r for r in records if r["distance_bin"][0] >= rconfig["train_len"]]
    n_far = sum(r["n"] for r in far)
    n_all = sum(r["n"] for r in records)
    return {
        "length": length,
        "bins": records,
        "accuracy": sum(r["accuracy"] * r["n"] for r in records) / n_all,
        "accuracy_far": sum(r["accuracy"] * r["n"] for r in far) / n_far if n_far else None,
    }


def _finetune_retrieval(model, rconfig: dict, config: dict, seed: int, factor: int, device) -> list:
    """Fine-tune a retrieval model on the passkey task at ``L_r × factor`` (in place); the history."""
    tc = finetune_config(config, seed, factor, batch_size=rconfig["batch_size"], train_len=rconfig["train_len"])
    return [list(h) for h in train_query_task(model, tc, rt.make_batch, device=device)]


# ------------------------------------------------------------------------------------ one seed


class _Seed:
    """The trained base models of one seed (kept in the run directory when there is one)."""

    def __init__(self, config, seed, device, folder, progress):
        self.config, self.seed, self.device, self.progress = config, seed, device, progress
        self.rconfig = retrieval_config(config)
        self.tokens = le.scored_tokens(config)
        self.lm, self.lm_history = self._lm(folder)
        self.retrieval, self.retrieval_history = self._retrieval(folder)
        self.dim = _rope_dim(self.lm)

    def _load(self, path, model):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["state"])
        return model.to(self.device).eval(), saved["history"]

    def _lm(self, folder):
        c = self.config
        path = folder / "base_lm.pt" if folder is not None else None
        if path is not None and path.exists():
            model = build_model(
                "rope", dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], max_positions=c["train_len"]
            )
            return self._load(path, model)
        model, state = le.train_model("rope", c, self.seed, device=self.device, progress=self.progress)
        history = [list(h) for h in state.history]
        if path is not None:
            torch.save({"state": state.model, "history": history}, path)
        return model.eval(), history

    def _retrieval(self, folder):
        r = self.rconfig
        path = folder / "base_retrieval.pt" if folder is not None else None
        if path is not None and path.exists():
            model = build_model(
                "rope", dim=r["dim"], n_layers=r["n_layers"], n_heads=r["n_heads"], max_positions=r["train_len"]
            )
            return self._load(path, model)
        keys = ("dim", "n_layers", "n_heads", "train_len", "steps", "batch_size", "lr")
        keys += ("warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "log_every")
        model, history = rt.train_retrieval(
            "rope",
            **{k: r[k] for k in keys},
            seed=self.seed,
            device=self.device,
            progress=self.progress,
            return_history=True,
        )
        history = [list(h) for h in history]
        if path is not None:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            torch.save({"state": state, "history": history}, path)
        return model.eval(), history

    # -- records

    def base_record(self) -> dict:
        c, r = self.config, self.rconfig
        lengths = [c["train_len"]] + [c["train_len"] * s for s in c["factors"]]
        return {
            "history": self.lm_history,
            "parameters": sum(p.numel() for p in self.lm.parameters()),
            "lengths": evaluate_lengths(self.lm, c, lengths, tokens=self.tokens, device=self.device),
            "retrieval_history": self.retrieval_history,
            "retrieval": {
                str(s): _retrieval_eval(self.retrieval, r, r["train_len"] * s, self.device) for s in (1, *c["factors"])
            },
        }

    def control_record(self) -> dict:
        c, r = self.config, self.rconfig
        model = copy.deepcopy(self.lm)
        state = train(model, corpus.corpus_tokens("train"), finetune_config(c, self.seed, 1), device=self.device)
        lengths = [c["train_len"]] + [c["train_len"] * s for s in c["factors"]]
        retrieval = copy.deepcopy(self.retrieval)
        r_history = _finetune_retrieval(retrieval, r, c, self.seed, 1, self.device)
        return {
            "finetune_history": [list(h) for h in state.history],
            "lengths": evaluate_lengths(model, c, lengths, tokens=self.tokens, device=self.device),
            "retrieval_finetune_history": r_history,
            "retrieval": {
                str(s): _retrieval_eval(retrieval, r, r["train_len"] * s, self.device) for s in (1, *c["factors"])
            },
        }

    def extension_record(self, spec: str, factor: int, base: dict) -> dict:
        """``{"no_finetune": record, "finetuned": record}`` of rule ``spec`` at ``s = factor``."""
        c, r = self.config, self.rconfig
        name, options = parse_rule(spec)
        L, length = c["train_len"], c["train_len"] * factor
        inv_freq, attention = rule_frequencies(spec, factor, L, self.dim)
        r_freq = rule_frequencies(spec, factor, r["train_len"], _rope_dim(self.retrieval))
        out = {}
        for finetuned in (False, True):
            model = copy.deepcopy(self.lm)
            model.set_rope_frequencies(inv_freq, attention)
            record = {
                "rule": name,
                "options": dict(options),
                "factor": factor,
                "rule_factor": factor * options.get("factor_multiplier", 1),
                "attention_factor": attention,
                "finetuned": finetuned,
                "length": length,
            }
            if finetuned:
                state = train(
                    model, corpus.corpus_tokens("train"), finetune_config(c, self.seed, factor), device=self.device
                )
                record["finetune_history"] = [list(h) for h in state.history]
            evals = evaluate_lengths(model, c, [length, L], tokens=self.tokens, device=self.device)
            record.update(evals[str(length)])
            short, ref = evals[str(L)], base["lengths"][str(L)]
            record["short"] = {
                "length": L,
                "nonoverlapping": short["nonoverlapping"],
                "sliding": short["sliding"],
                "delta_nonoverlapping": short["nonoverlapping"] - ref["nonoverlapping"],
                "delta_sliding": short["sliding"] - ref["sliding"],
            }
            record["dynamic"] = None
            if name in DYNAMIC_RULES:
                windows = _windows(self.tokens, length, c["dynamic_bytes"] // length)
                dyn = dynamic_scores(model, windows, rule_schedule(spec, factor, L, self.dim), device=self.device)
                stat = static_scores(model, windows, device=self.device)
                record["dynamic"] = {
                    "protocol": "dynamic",
                    "windows": int(windows.shape[0]),
                    "tokens": int(dyn.numel()),
                    "loss": float(dyn.mean()),
                    "static_loss": float(stat.mean()),
                }
            retrieval = copy.deepcopy(self.retrieval)
            retrieval.set_rope_frequencies(*r_freq)
            if finetuned:
                record["retrieval_finetune_history"] = _finetune_retrieval(
                    retrieval, r, c, self.seed, factor, self.device
                )
            record["retrieval"] = _retrieval_eval(retrieval, r, r["train_len"] * factor, self.device)
            out["finetuned" if finetuned else "no_finetune"] = record
        return out


def _cached(path, compute):
    if path is not None and path.exists():
        return json.loads(path.read_text())
    record = jsonable(compute())
    if path is not None:
        write_json(path, record)
    return record


def _one_seed(config, seed, rules, device, folder, progress) -> dict:
    t0 = time.perf_counter()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    state = _Seed(config, seed, device, folder, progress)
    base = _cached(folder / "base.json" if folder else None, state.base_record)
    control = _cached(folder / "control.json" if folder else None, state.control_record)
    extensions = {}
    for spec in rules:
        for factor in config["factors"]:
            path = folder / f"{quote(spec, safe='')}.s{factor}.json" if folder else None
            extensions.setdefault(spec, {})[str(factor)] = _cached(
                path, lambda spec=spec, factor=factor: state.extension_record(spec, factor, base)
            )
    return {
        "base": base,
        "control": control,
        "extensions": extensions,
        "wall_time_s": time.perf_counter() - t0,
        **device_info(device),
    }


def run(
    preset: str = "chapter",
    *,
    rules=None,
    seeds=None,
    device=None,
    run_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    **overrides,
) -> dict:
    """Run ``preset`` for ``rules`` × ``seeds`` (default: the preset's); return the results.

    ``run_dir`` keeps, per seed, the trained base models and every finished record (base,
    control, each rule × s): calling again with the same directory and hyper-parameters reuses
    them. ``out`` writes the results file. ``overrides`` change single hyper-parameters.
    """
    config = preset_config(preset, **overrides)
    rules = config["rules"] if rules is None else _check_rules(rules)
    seeds = config["seeds"] if seeds is None else _check_seeds(seeds)
    device = torch.device(device) if device is not None else default_device()
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        cfg_file = run_path / "config.json"
        saved = {"preset": preset, "config": jsonable(config)}
        if cfg_file.exists() and json.loads(cfg_file.read_text()) != saved:
            raise ValueError(f"{run_path} holds a run with other hyper-parameters; use another run_dir")
        write_json(cfg_file, saved)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    runs = {}
    for seed in seeds:
        folder = run_path / f"seed{seed}" if run_path is not None else None
        runs[str(seed)] = jsonable(_one_seed(config, seed, rules, device, folder, progress))
    results = {
        "schema": SCHEMA,
        "preset": preset,
        "config": jsonable(config),
        "retrieval_config": jsonable(retrieval_config(config)),
        **device_info(device),
        "versions": versions(),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": time.perf_counter() - t0,
        "data": {
            "corpus": "King James Version of the Bible (pebook/book/data/kjv.txt.xz), byte-level tokens",
            "scored_tokens": int(le.scored_tokens(config).numel() - 1),
        },
        "runs": runs,
    }
    validate_results(results)
    if out is not None:
        write_json(Path(out), results)
    return results


# ------------------------------------------------------------------------------------ results


def merge_results(base: dict, new: dict) -> dict:
    """``base`` with the seeds and rules of ``new`` added (a record of the same seed and rule is replaced).

    Both must be results of the same preset with the same hyper-parameters. A seed's base and
    control records are taken from ``new`` (they are deterministic: the same in both).
    """
    validate_results(base)
    validate_results(new)
    if (base["preset"], base["config"]) != (new["preset"], new["config"]):
        raise ValueError(
            f"cannot merge results of preset {new['preset']!r} into {base['preset']!r} with other "
            "hyper-parameters: rerun with the same preset and overrides"
        )
    merged = json.loads(json.dumps(base))
    for seed, record in new["runs"].items():
        record = json.loads(json.dumps(record))
        if seed in merged["runs"]:
            target = merged["runs"][seed]
            target["extensions"].update(record["extensions"])
            for key in ("base", "control"):
                target[key] = record[key]
            target["wall_time_s"] += record["wall_time_s"]
        else:
            merged["runs"][seed] = record
    merged["wall_time_s"] = base["wall_time_s"] + new["wall_time_s"]
    # the span of all the runs (ISO 8601 UTC strings order as times)
    merged["started"] = min(base["started"], new["started"])
    merged["finished"] = max(base["finished"], new["finished"])
    validate_results(merged)
    return merged


METRICS = (
    "nonoverlapping",
    "sliding",
    "short_delta_nonoverlapping",
    "short_delta_sliding",
    "dynamic",
    "retrieval_accuracy",
    "retrieval_far",
)


def _metric(record: dict, metric: str):
    if metric in ("nonoverlapping", "sliding"):
        return record[metric]
    if metric.startswith("short_delta_"):
        return record["short"]["delta_" + metric[len("short_delta_") :]]
    if metric == "dynamic":
        return None if record.get("dynamic") is None else record["dynamic"]["loss"]
    retrieval = record["retrieval"]
    return retrieval["accuracy"] if metric == "retrieval_accuracy" else retrieval["accuracy_far"]


def _control_metric(control: dict, config: dict, factor: int, metric: str):
    if metric in ("nonoverlapping", "sliding"):
        return control["lengths"][str(config["train_len"] * factor)][metric]
    if metric == "retrieval_accuracy":
        return control["retrieval"][str(factor)]["accuracy"]
    if metric == "retrieval_far":
        return control["retrieval"][str(factor)]["accuracy_far"]
    return None


def summary(results: dict, metric: str = "nonoverlapping", *, finetuned: bool = False) -> dict:
    """``{rule: {s: (mean, min, max, n_seeds)}}`` of ``metric`` over seeds (``None`` where no seed has it).

    ``metric`` is one of :data:`METRICS`: the loss at ``s·L`` under either protocol, the
    short-input regression (loss at ``L`` minus the base model's), the dynamic evaluation's loss,
    or the passkey accuracy at ``s·L_r`` (all bins, or only distances beyond ``L_r``). With
    ``finetuned=True`` the fine-tuned models, plus a row ``"control"`` (fine-tuned at ``L``) where
    the metric applies to it.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(finetuned, bool):
        raise TypeError(f"finetuned must be a bool, got {finetuned!r}")
    key = "finetuned" if finetuned else "no_finetune"
    factors = results["config"]["factors"]
    values: dict = {}
    for record in results["runs"].values():
        for spec, by_factor in record["extensions"].items():
            for s, pair in by_factor.items():
                v = _metric(pair[key], metric)
                if v is not None:
                    values.setdefault(spec, {}).setdefault(int(s), []).append(v)
                else:
                    values.setdefault(spec, {}).setdefault(int(s), [])
        if finetuned:
            for s in factors:
                v = _control_metric(record["control"], results["config"], s, metric)
                if v is not None:
                    values.setdefault("control", {}).setdefault(s, []).append(v)

    return {name: {s: seed_range(rows.get(s, [])) for s in factors} for name, rows in values.items()}


def _seed_ranges(results: dict, names, factor: int, metric: str, finetuned: bool) -> list:
    """The :func:`summary` cells of ``names`` at ``s = factor``; ``ValueError`` naming a missing one."""
    table = summary(results, metric, finetuned=finetuned)
    cells = []
    for name in names:
        if name not in table:
            raise ValueError(f"rule {name!r} is not in the results for this metric; they hold {sorted(table)}")
        if factor not in table[name]:
            raise ValueError(f"factor must be one of {sorted(table[name])}, got {factor!r}")
        if table[name][factor] is None:
            raise ValueError(f"{name!r} has no {metric} at s = {factor}")
        cells.append(table[name][factor])
    return cells


def _per_seed(results: dict, name: str, factor: int, metric: str, finetuned: bool) -> dict:
    """``{seed: value}`` of rule ``name`` (or ``"control"``) at ``s = factor``, for the seeds that have it."""
    key = "finetuned" if finetuned else "no_finetune"
    out = {}
    for seed, record in results["runs"].items():
        if name == "control":
            value = _control_metric(record["control"], results["config"], factor, metric) if finetuned else None
        elif name in record["extensions"]:
            value = _metric(record["extensions"][name][str(factor)][key], metric)
        else:
            value = None
        if value is not None:
            out[seed] = value
    return out


def paired_difference(
    results: dict, first: str, second: str, factor: int, metric: str = "nonoverlapping", *, finetuned: bool = False
):
    """``(mean, min, max, n)`` over seeds of ``first - second`` at ``s = factor``, both on the same seed.

    Both rules extend the same trained model of a seed, so their per-seed difference removes what
    the seed does to every rule alike (a better or worse base model). ``None`` when no seed has both.
    """
    _seed_ranges(results, (first, second), factor, metric, finetuned)
    a = _per_seed(results, first, factor, metric, finetuned)
    b = _per_seed(results, second, factor, metric, finetuned)
    return seed_range(a[seed] - b[seed] for seed in sorted(a.keys() & b.keys(), key=int))


def compare(
    results: dict,
    first: str,
    second: str,
    factor: int,
    metric: str = "nonoverlapping",
    *,
    finetuned: bool = False,
    paired: bool = False,
) -> str:
    """``"<"``, ``">"`` or ``"~"``: is ``first`` below ``second`` at ``s = factor``, beyond the seed spread?

    Unpaired (default): ``"<"`` (``">"``) when every seed of ``first`` is below (above) every seed
    of ``second``. ``paired=True``: when ``first - second`` is negative (positive) on every seed
    (:func:`paired_difference`), the test for two rules applied to the same base models. ``"~"``:
    the results support no ordering. Raises ``ValueError`` when a rule is not in the results or
    has no value there.
    """
    if not isinstance(paired, bool):
        raise TypeError(f"paired must be a bool, got {paired!r}")
    if paired:
        _, low, high, _ = paired_difference(results, first, second, factor, metric, finetuned=finetuned)
        return "<" if high < 0 else ">" if low > 0 else "~"
    return order_ranges(*_seed_ranges(results, (first, second), factor, metric, finetuned))


def validate_results(results: dict) -> None:
    """Check the structure of a results dict (raise ``ValueError`` naming the first problem)."""

    def need(cond, what):
        if not cond:
            raise ValueError(f"invalid context-extension results: {what}")

    need(isinstance(results, dict), "not a dict")
    need(results.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}")
    for key in ("preset", "config", "device", "device_name", "versions", "wall_time_s", "data", "runs"):
        need(key in results, f"missing {key!r}")
    config = results["config"]
    factors = [str(s) for s in config["factors"]]
    L = config["train_len"]
    for seed, record in results["runs"].items():
        need(seed.isdigit(), f"seed {seed!r}: seeds are keyed by their decimal string")
        for key in ("base", "control", "extensions", "device"):
            need(key in record, f"seed {seed}: missing {key!r}")
        need(len(record["base"]["history"]) > 0, f"seed {seed}: empty training history")
        expected = {str(L)} | {str(L * int(s)) for s in factors}
        need(set(record["base"]["lengths"]) == expected, f"seed {seed}: base lengths")
        need(set(record["control"]["lengths"]) == expected, f"seed {seed}: control lengths")
        for spec, by_factor in record["extensions"].items():
            name = f"seed {seed} rule {spec!r}"
            try:
                rule, _ = parse_rule(spec)
            except ValueError as err:
                raise ValueError(f"invalid context-extension results: {name}: {err}") from None
            need(sorted(by_factor) == sorted(factors), f"{name}: factors")
            for s, pair in by_factor.items():
                need(set(pair) == {"no_finetune", "finetuned"}, f"{name} s={s}: with and without fine-tuning")
                for key, e in pair.items():
                    need(e["finetuned"] == (key == "finetuned"), f"{name} s={s}: finetuned flag")
                    need(e["length"] == L * int(s), f"{name} s={s}: length")
                    losses = (e["nonoverlapping"], e["sliding"], e["short"]["nonoverlapping"], e["short"]["sliding"])
                    need(all(math.isfinite(v) for v in losses), f"{name} s={s}: losses must be finite")
                    need((e["dynamic"] is not None) == (rule in DYNAMIC_RULES), f"{name} s={s}: dynamic record")
                    need("accuracy" in e["retrieval"], f"{name} s={s}: retrieval")


def load_results(name: str = "context_extension_chapter.json") -> dict:
    """A results file shipped in ``pebook/book/data`` (default: the chapter preset's), validated."""
    return load_data_file(name, validate_results)


def main(argv=None) -> int:
    parser = experiment_parser(
        "context_extension",
        __doc__,
        PRESETS,
        default_preset="chapter",
        subset=("--rules", "';'-separated rule specs (',' when none has options)"),
        out_help="results JSON (default: <run-dir>/results.json)",
        merge_help="merge the results into this file (rewritten)",
    )
    parser.add_argument(
        "--run-dir", default=None, help="keeps finished records (default: ./context_extension_<preset>)"
    )
    args = parse_experiment_args(parser, argv)
    rules = None
    if args.rules:
        sep = ";" if ";" in args.rules or "=" in args.rules else ","
        rules = tuple(r for r in args.rules.split(sep) if r)
    seeds = parse_ints(args.seeds) if args.seeds else None
    run_dir = args.run_dir or f"context_extension_{args.preset}"
    out = args.out or str(Path(run_dir) / "results.json")
    results = run(
        args.preset,
        rules=rules,
        seeds=seeds,
        device=args.device,
        run_dir=run_dir,
        out=out,
        progress=not args.no_progress,
    )
    if args.merge_into:
        target = Path(args.merge_into)
        merged = merge_results(json.loads(target.read_text()), results) if target.exists() else results
        write_json(target, merged)
        print(f"merged into {target}")
    factors = results["config"]["factors"]
    for finetuned in (False, True):
        print(f"loss at s·L (non-overlapping), {'fine-tuned' if finetuned else 'no fine-tune'}: mean [min, max]")
        print(f"{'rule':>26}  " + "  ".join(f"{'s=' + str(s):>22}" for s in factors))
        for rule, rows in summary(results, finetuned=finetuned).items():
            cells = [
                "-" if rows[s] is None else f"{rows[s][0]:6.3f} [{rows[s][1]:.3f},{rows[s][2]:.3f}]" for s in factors
            ]
            print(f"{rule:>26}  " + "  ".join(f"{c:>22}" for c in cells))
    print(f"results: {out}  ({results['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
