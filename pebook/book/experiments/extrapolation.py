"""Train short, test long: the length-extrapolation experiment, and RoPE context extension.

The experiment behind Figure 1 of Press, Smith & Lewis (2022), "Train Short, Test Long",
arXiv:2108.12409, at book scale. One byte-level :class:`pebook.TinyLM` is trained per positional
encoding — the same data (:mod:`pebook.book.corpus`, the King James Bible), the same seed, the same
budget, the same context length ``L`` (``train_len``) — and each is evaluated on held-out text
read in contiguous windows of ``L × multiple`` tokens (``multiple`` in ``eval_multiples``). Every
length scores exactly the same target tokens. The per-position loss at the longest length that
the model accepts is averaged in buckets of ``L`` positions, so one sees *where* an encoding
breaks. A learned table refuses lengths past its size (pebook raises ``ValueError``); the
refusal is recorded with its message.

The RoPE model is then extended to ``L × factor`` with each rule of
:mod:`pebook.rope_scaling` (default, linear = position interpolation of Chen et al. 2023,
NTK-aware scaling of bloc97 2023, dynamic NTK, YaRN of Peng et al. 2023), measured the same way,
without and with a short fine-tune at the longer length.

Command line (progress bars with tqdm; CUDA when present unless ``--device``)::

    python -m pebook.book.experiments.extrapolation --preset full [--device cpu] [--run-dir DIR]
                                                    [--out results.json] [--resume]

The run directory keeps a checkpoint of the encoding being trained (weights, optimizer,
batch generator; every ``checkpoint_every`` steps and on Ctrl-C), each finished encoding's
results and the context-extension results done so far, so ``--resume`` continues an
interrupted run where it stopped and ends with the results of an uninterrupted one.
The results file (JSON) holds the preset and all its hyper-parameters, the seed, the device,
library versions, wall time, training curves, losses per length and per position bucket, and
the context-extension table. The full run's results ship with pebook as
``pebook/book/data/extrapolation_full.json`` (:func:`load_results`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ...registry import ENCODINGS
from ...utils import default_device
from .. import corpus
from ..training import TrainConfig, TrainState, build_model, evaluate_length, loss_by_bucket, train
from ._records import device_info, jsonable, read_data_file, versions, write_json

__all__ = [
    "PRESETS",
    "RULES",
    "SCHEMA",
    "preset_config",
    "train_config",
    "extension_config",
    "eval_tokens",
    "train_encoding",
    "evaluate_encoding",
    "context_extension",
    "run",
    "load_results",
    "validate_results",
    "main",
]

SCHEMA = "pebook.extrapolation/1"
RULES = ("default", "linear", "ntk", "dynamic_ntk", "yarn")

_COMMON = dict(
    # pinned, not read from the registry: a preset is a fixed experiment (the committed full run
    # records exactly these), and registering a new encoding must not change it
    encodings=("none", "sinusoidal", "learned", "shaw", "t5", "rope", "alibi"),
    n_heads=4,
    lr=3e-3,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_multiples=(1, 2, 4, 8, 16),
    eval_batch=4,
    rules=RULES,
    extension_factors=(2, 4, 8),
    finetune_lr=1e-3,
    seed=0,
    checkpoint_every=100,
)

#: Named experiment sizes. ``eval_spans`` windows of the longest length are read from the
#: held-out text; every shorter length re-reads the same tokens. ``finetune_steps`` is the
#: length of the fine-tune at ``L × factor`` (batch ``batch_size // factor``: the same tokens
#: per step as in training).
PRESETS: dict[str, dict] = {
    # seconds: for the test suite only
    "micro": dict(
        _COMMON,
        encodings=("rope", "learned"),
        dim=16,
        n_layers=1,
        n_heads=2,
        train_len=8,
        batch_size=4,
        steps=6,
        warmup_steps=2,
        log_every=2,
        eval_multiples=(1, 2, 4),
        eval_spans=2,
        extension_factors=(2,),
        finetune_steps=2,
        checkpoint_every=2,
    ),
    # the book's chapter: under 3 minutes on a 2-core CPU for all seven encodings
    "chapter": dict(
        _COMMON,
        dim=64,
        n_layers=2,
        train_len=64,
        batch_size=32,
        steps=200,
        warmup_steps=20,
        log_every=10,
        eval_spans=8,
        finetune_steps=30,
    ),
    # the committed run
    "full": dict(
        _COMMON,
        dim=128,
        n_layers=3,
        train_len=128,
        batch_size=24,
        steps=900,
        warmup_steps=90,
        log_every=20,
        eval_spans=12,
        finetune_steps=60,
    ),
}


def preset_config(preset: str, **overrides) -> dict:
    """The hyper-parameters of ``preset`` (a key of :data:`PRESETS`), with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    config = dict(PRESETS[preset])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown hyper-parameter {unknown[0]!r}; the preset has {sorted(config)}")
    config.update(overrides)
    for name in ("encodings", "eval_multiples", "rules", "extension_factors"):
        config[name] = tuple(config[name])
    bad = [e for e in config["encodings"] if e not in ENCODINGS]
    if bad:
        raise ValueError(f"encodings must be among {tuple(ENCODINGS)}, got {bad[0]!r}")
    bad = [r for r in config["rules"] if r not in RULES]
    if bad:
        raise ValueError(f"rules must be among {RULES}, got {bad[0]!r}")
    if config["eval_multiples"][0] != 1 or list(config["eval_multiples"]) != sorted(set(config["eval_multiples"])):
        raise ValueError(f"eval_multiples must increase and start at 1, got {config['eval_multiples']}")
    longest = max(config["eval_multiples"])
    if any(longest % m for m in config["eval_multiples"]) or any(longest % f for f in config["extension_factors"]):
        raise ValueError("every eval multiple and extension factor must divide the largest eval multiple")
    return config


def train_config(config: dict) -> TrainConfig:
    """The :class:`pebook.book.training.TrainConfig` of the main training runs of ``config``."""
    return TrainConfig(
        steps=config["steps"],
        batch_size=config["batch_size"],
        seq_len=config["train_len"],
        lr=config["lr"],
        warmup_steps=config["warmup_steps"],
        schedule="cosine",
        min_lr_ratio=config["min_lr_ratio"],
        weight_decay=config["weight_decay"],
        grad_clip=config["grad_clip"],
        seed=config["seed"],
        log_every=config["log_every"],
    )


def extension_config(config: dict, factor: int) -> TrainConfig:
    """The short fine-tune at ``train_len × factor``: constant LR after a 10% warm-up, same tokens per step."""
    steps = config["finetune_steps"]
    return TrainConfig(
        steps=steps,
        batch_size=max(1, config["batch_size"] // factor),
        seq_len=config["train_len"] * factor,
        lr=config["finetune_lr"],
        warmup_steps=max(1, steps // 10),
        schedule="constant",
        weight_decay=config["weight_decay"],
        grad_clip=config["grad_clip"],
        seed=config["seed"] + 1,  # the same batches for every rule
        log_every=max(1, steps // 10),
    )


def eval_tokens(config: dict) -> int:
    """Number of held-out tokens scored at every length: ``eval_spans × train_len × max(eval_multiples)``."""
    return config["eval_spans"] * config["train_len"] * max(config["eval_multiples"])


def _model(encoding: str, config: dict):
    return build_model(
        encoding,
        dim=config["dim"],
        n_layers=config["n_layers"],
        n_heads=config["n_heads"],
        max_positions=config["train_len"],
        seed=config["seed"],
    )


def train_encoding(
    encoding: str,
    config: dict,
    *,
    device=None,
    state: TrainState | None = None,
    progress: bool = False,
    checkpoint=None,
    stop_after: int | None = None,
):
    """Build and train the model of one encoding; return ``(model, TrainState)``."""
    device = torch.device(device) if device is not None else default_device()
    model = _model(encoding, config).to(device)
    state = train(
        model,
        corpus.corpus_tokens("train"),
        train_config(config),
        device=device,
        state=state,
        progress=progress,
        description=f"{encoding:>10}",
        checkpoint=checkpoint,
        checkpoint_every=config["checkpoint_every"] if checkpoint is not None else 0,
        stop_after=stop_after,
    )
    return model, state


def evaluate_encoding(model, config: dict, *, multiples=None, device=None) -> dict:
    """Loss at every ``train_len × multiple`` and the loss by position bucket at the longest accepted length.

    ``multiples`` (default ``config["eval_multiples"]``) may select some of the lengths; the
    scored tokens are the same in any case (:func:`eval_tokens`).
    """
    heldout = corpus.corpus_tokens("heldout")
    n_tokens = eval_tokens(config)
    evals = []
    for multiple in config["eval_multiples"] if multiples is None else multiples:
        record = evaluate_length(
            model,
            heldout,
            config["train_len"] * multiple,
            n_tokens,
            n_spans=config["eval_spans"],
            batch_size=config["eval_batch"],
            device=device,
        )
        record["multiple"] = multiple
        evals.append(record)
    longest = [r for r in evals if "loss" in r][-1]
    buckets = {
        "length": longest["length"],
        "bucket": config["train_len"],
        "loss": loss_by_bucket(longest["per_position"], config["train_len"]),
    }
    for r in evals:
        r.pop("per_position", None)
    return {"eval": evals, "buckets": buckets}


def _rule_frequencies(model, config: dict, rule: str, factor: int):
    from ...rope_scaling import rope_scaling_frequencies

    attn = model.blocks[0].attn
    length = config["train_len"] * factor
    return rope_scaling_frequencies(
        rule,
        attn.head_dim,
        factor=float(factor),
        original_max_positions=config["train_len"],
        seq_len=length,
    )


def context_extension(
    model, config: dict, *, device=None, done: list | None = None, on_record=None, progress: bool = False
) -> list[dict]:
    """Each rule × factor on a trained RoPE ``model``, without and with a fine-tune at ``train_len × factor``.

    Returns records ``{"rule", "factor", "length", "finetuned", "loss", "ppl"}``; ``model`` is not
    modified (each configuration works on a copy). ``done`` holds records already computed
    (they are kept and skipped); ``on_record(records)`` is called after each new one.
    """
    if model.encoding != "rope":
        raise ValueError(f"context_extension needs a RoPE model, got encoding={model.encoding!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    heldout, train_tokens = corpus.corpus_tokens("heldout"), corpus.corpus_tokens("train")
    records = list(done or [])
    have = {(r["rule"], r["factor"], r["finetuned"]) for r in records}
    for factor in config["extension_factors"]:
        length = config["train_len"] * factor
        for finetuned in (False, True):
            for rule in config["rules"]:
                if (rule, factor, finetuned) in have:
                    continue
                extended = copy.deepcopy(model).to(device)
                extended.set_rope_frequencies(*_rule_frequencies(model, config, rule, factor))
                if finetuned:
                    train(
                        extended,
                        train_tokens,
                        extension_config(config, factor),
                        device=device,
                        progress=progress,
                        description=f"ft {rule}×{factor}",
                    )
                result = evaluate_length(
                    extended,
                    heldout,
                    length,
                    eval_tokens(config),
                    n_spans=config["eval_spans"],
                    batch_size=config["eval_batch"],
                    device=device,
                )
                records.append(
                    {
                        "rule": rule,
                        "factor": factor,
                        "length": length,
                        "finetuned": finetuned,
                        "loss": result["loss"],
                        "ppl": result["ppl"],
                    }
                )
                if on_record is not None:
                    on_record(records)
    return records


# ------------------------------------------------------------------------------------ the whole run


def run(
    preset: str = "chapter",
    *,
    run_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device=None,
    resume: bool = False,
    progress: bool = False,
    extension: bool = True,
    stop_after: int | None = None,
    **overrides,
) -> dict | None:
    """Run the experiment of ``preset`` and return the results (a JSON-ready dict).

    ``run_dir`` (optional) keeps checkpoints and partial results; an existing one is continued
    only with ``resume=True`` (and only with the same hyper-parameters). ``out`` is where the
    results file is written (default ``run_dir/results.json``; nothing is written when both are
    ``None``). ``extension=False`` skips the RoPE context-extension stage. ``stop_after`` stops
    after that many training steps of this call, as an interruption would, and returns ``None``
    (for tests of resuming). ``overrides`` change single hyper-parameters of the preset.
    """
    config = preset_config(preset, **overrides)
    device = torch.device(device) if device is not None else default_device()
    run_path = Path(run_dir) if run_dir is not None else None
    meta = {"wall_time_s": 0.0, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if run_path is not None:
        cfg_file = run_path / "config.json"
        if cfg_file.exists():
            if not resume:
                raise FileExistsError(f"{run_path} holds a run already; pass resume=True (--resume) or remove it")
            saved = json.loads(cfg_file.read_text())
            if saved["config"] != jsonable(config) or saved["preset"] != preset:
                raise ValueError(f"{run_path} holds a run with other hyper-parameters; cannot resume it with these")
            meta = saved["meta"]
        else:
            run_path.mkdir(parents=True, exist_ok=True)
            write_json(cfg_file, {"preset": preset, "config": jsonable(config), "meta": meta})

    t_start = time.perf_counter()
    spent = meta["wall_time_s"]

    def save_meta():
        if run_path is not None:
            meta["wall_time_s"] = spent + time.perf_counter() - t_start
            write_json(run_path / "config.json", {"preset": preset, "config": jsonable(config), "meta": meta})

    results_by_encoding: dict[str, dict] = {}
    rope_model = None
    budget = stop_after
    try:
        for encoding in config["encodings"]:
            done_file = run_path / f"{encoding}.json" if run_path is not None else None
            ckpt_file = run_path / f"{encoding}.ckpt.pt" if run_path is not None else None
            if done_file is not None and done_file.exists():
                results_by_encoding[encoding] = json.loads(done_file.read_text())
                if encoding == "rope" and extension:
                    rope_model = _model("rope", config)
                    rope_model.load_state_dict(torch.load(run_path / "rope.model.pt", map_location="cpu"))
                    rope_model.to(device).eval()
                continue
            state = None
            if ckpt_file is not None and ckpt_file.exists():
                state = TrainState.from_dict(torch.load(ckpt_file, map_location="cpu", weights_only=False))

            def checkpoint(s, ckpt_file=ckpt_file):
                if ckpt_file is not None:
                    torch.save(s.to_dict(), ckpt_file)
                    save_meta()

            t0 = time.perf_counter()
            first_step = 0 if state is None else state.step
            model, state = train_encoding(
                encoding,
                config,
                device=device,
                state=state,
                progress=progress,
                checkpoint=checkpoint if run_path is not None else None,
                stop_after=budget,
            )
            if budget is not None:
                budget -= state.step - first_step
            if state.step < config["steps"]:  # stopped early (stop_after): as if interrupted
                checkpoint(state)
                save_meta()
                return None
            record = {
                "train_time_s": time.perf_counter() - t0,
                "history": [list(h) for h in state.history],
                "final_train_loss": state.history[-1][1] if state.history else None,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
            record.update(evaluate_encoding(model, config, device=device))
            results_by_encoding[encoding] = record
            if run_path is not None:
                if encoding == "rope":
                    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, run_path / "rope.model.pt")
                write_json(done_file, record)
                ckpt_file.unlink(missing_ok=True)
                save_meta()
            if encoding == "rope":
                rope_model = model

        ext_records = None
        if extension and rope_model is not None:
            ext_file = run_path / "context_extension.json" if run_path is not None else None
            done = json.loads(ext_file.read_text()) if ext_file is not None and ext_file.exists() else []

            def on_record(records):
                if ext_file is not None:
                    write_json(ext_file, records)
                    save_meta()

            ext_records = context_extension(
                rope_model, config, device=device, done=done, on_record=on_record, progress=progress
            )
    except KeyboardInterrupt:
        save_meta()
        raise

    save_meta()
    meta_now = dict(meta)
    meta_now["wall_time_s"] = spent + time.perf_counter() - t_start
    meta_now["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    train_tokens, heldout = corpus.corpus_tokens("train"), corpus.corpus_tokens("heldout")
    results = {
        "schema": SCHEMA,
        "preset": preset,
        "config": jsonable(config),
        "seed": config["seed"],
        **device_info(device),
        "versions": versions(),
        **meta_now,
        "data": {
            "corpus": "King James Version of the Bible (pebook/book/data/kjv.txt.xz), byte-level tokens",
            "vocab_size": corpus.VOCAB_SIZE,
            "held_out": f"every {corpus.HELD_OUT_EVERY}th chapter",
            "train_tokens": int(train_tokens.numel()),
            "heldout_tokens": int(heldout.numel()),
            "eval_tokens": eval_tokens(config),
        },
        "encodings": results_by_encoding,
        "context_extension": ext_records,
    }
    validate_results(results)
    target = Path(out) if out is not None else (run_path / "results.json" if run_path is not None else None)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, results)
    return results


def validate_results(results: dict) -> None:
    """Check the structure of a results dict (raise ``ValueError`` naming the first problem)."""

    def need(cond, what):
        if not cond:
            raise ValueError(f"invalid extrapolation results: {what}")

    need(isinstance(results, dict), "not a dict")
    need(results.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}")
    for key in ("preset", "config", "seed", "device", "device_name", "versions", "wall_time_s", "data", "encodings"):
        need(key in results, f"missing {key!r}")
    config = results["config"]
    need(results["seed"] == config["seed"], "seed differs from config['seed']")
    for key in ("torch", "python", "pebook"):
        need(key in results["versions"], f"versions lacks {key!r}")
    multiples = config["eval_multiples"]
    need(list(results["encodings"]) == list(config["encodings"]), "encodings differ from config['encodings']")
    for name, record in results["encodings"].items():
        need(len(record["history"]) > 0, f"{name}: empty training history")
        need([e["multiple"] for e in record["eval"]] == list(multiples), f"{name}: eval multiples")
        for e in record["eval"]:
            need(e["length"] == e["multiple"] * config["train_len"], f"{name}: eval length")
            if "refused" in e:
                need(isinstance(e["refused"], str) and e["refused"], f"{name}: empty refusal message")
            else:
                need(
                    math.isfinite(e["loss"]) and abs(e["ppl"] - math.exp(e["loss"])) < 1e-6 * e["ppl"],
                    f"{name}: loss/ppl",
                )
        need(len(record["buckets"]["loss"]) == record["buckets"]["length"] // config["train_len"], f"{name}: buckets")
    ext = results.get("context_extension")
    if ext is not None:
        expected = {(r, f, ft) for r in config["rules"] for f in config["extension_factors"] for ft in (False, True)}
        need(
            {(r["rule"], r["factor"], r["finetuned"]) for r in ext} == expected and len(ext) == len(expected),
            "context_extension must hold each rule × factor × finetuned once",
        )


def load_results(name: str = "extrapolation_full.json") -> dict:
    """A results file shipped in ``pebook/book/data`` (default: the committed full run), validated."""
    results = read_data_file(name)
    validate_results(results)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pebook.book.experiments.extrapolation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--preset", choices=tuple(PRESETS), default="full")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument(
        "--run-dir", default=None, help="checkpoints and partial results (default: ./extrapolation_<preset>)"
    )
    parser.add_argument("--out", default=None, help="results JSON (default: <run-dir>/results.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-extension", action="store_true", help="skip the RoPE context-extension stage")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run_dir or f"extrapolation_{args.preset}"
    try:
        results = run(
            args.preset,
            run_dir=run_dir,
            out=args.out,
            device=args.device,
            resume=args.resume,
            progress=not args.no_progress,
            extension=not args.no_extension,
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with the same command and --resume (run directory: {run_dir})")
        return 130
    print(f"{'encoding':>11}  " + "  ".join(f"{m:>5}x" for m in results["config"]["eval_multiples"]))
    for name, record in results["encodings"].items():
        cells = ["  ref." if "refused" in e else f"{e['loss']:6.3f}" for e in record["eval"]]
        print(f"{name:>11}  " + "  ".join(cells))
    print(f"results: {args.out or Path(run_dir) / 'results.json'}  ({results['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
