"""Train short, test long, measured as the papers measure it: seeds, two protocols, baselines.

The experiment behind Figure 1 of Press, Smith & Lewis (2022), "Train Short, Test Long",
arXiv:2108.12409, at book scale. For each positional encoding and each seed, one byte-level
:class:`pebook.TinyLM` is trained on the book's corpus (:mod:`pebook.book.corpus`) at context
length ``L`` (``train_len``) and evaluated on the held-out text at ``L × m`` for every ``m`` in
``eval_multiples``:

* **both protocols** of :mod:`pebook.book.evaluation`: non-overlapping windows, and sliding
  windows that advance by half a window (``stride = length // 2``, so every scored token past the
  first window conditions on at least half a window), each scoring *every* held-out byte
  (``eval_bytes=None``) or the first ``eval_bytes`` of them;
* **paired differences**: the per-token loss at ``L × m`` minus that at ``L`` on the same bytes
  (non-overlapping), grouped by how much context each byte had at ``L``; this separates the
  "early token curse" (Press et al. §5) from real use of longer context;
* **models trained at the longer length**: for every ``m`` in ``long_multiples`` the same model
  is trained directly at ``L × m`` (same steps, ``batch_size // m`` windows per step: the same
  tokens) and scored at ``L × m``, which shows what extrapolating costs against training long;
* **n-gram baselines** (:mod:`pebook.book.ngram`, interpolated Witten–Bell, orders
  ``ngram_orders``) fitted on the training text and scored on the same bytes, with their full
  ``n - 1`` bytes of context and within the non-overlapping windows.

Seeds change the initial weights and the training batches. Results are JSON-ready dicts (schema
:data:`SCHEMA`) that record the preset, the hyper-parameters, the device, the versions and the
wall time; a run of some encodings or seeds can be merged into an existing results file of the
same configuration (:func:`merge_results`), which is how newer encodings join the committed
results. The in-book preset (``chapter``) is seeded and small; the ``full`` preset is sized for a
GPU and runs, more slowly, on a CPU.

Command line::

    python -m pebook.book.experiments.length_extrapolation --preset full [--encodings rope,alibi]
        [--seeds 0,1,2] [--device cpu] [--run-dir DIR] [--out results.json] [--merge-into FILE]

A run directory keeps each finished (encoding, seed), so rerunning the same command continues
an interrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ...registry import ENCODINGS, check_encoding
from ...utils import default_device
from .. import corpus
from ..evaluation import TokenScores, paired_by_context, score_tokens, window_context
from ..training import TrainConfig, build_model, train
from ._records import (
    check_eval_multiples,
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
    "PRESETS",
    "parse_variant",
    "preset_config",
    "train_config",
    "scored_tokens",
    "train_model",
    "evaluate_model",
    "run",
    "evaluate_long",
    "ngram_baselines",
    "merge_results",
    "summary",
    "compare",
    "validate_results",
    "load_results",
    "main",
]

SCHEMA = "pebook.length_extrapolation/1"

_COMMON = dict(
    # pinned, not read from the registry: a preset is a fixed experiment, and registering a new
    # encoding must not change it (new encodings are run by name and merged in)
    encodings=("none", "sinusoidal", "learned", "shaw", "t5", "rope", "alibi"),
    seeds=(0, 1, 2),
    n_heads=4,
    lr=3e-3,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_multiples=(1, 2, 4, 8, 16),
    long_multiples=(2, 4),
    eval_batch=8,
    eval_bytes=None,
    paired_edges=(1, 4, 16),
    ngram_orders=(1, 2, 3, 4, 5),
)

#: Named experiment sizes.
PRESETS: dict[str, dict] = {
    # seconds: for the test suite only
    "micro": dict(
        _COMMON,
        encodings=("rope", "learned"),
        seeds=(0, 1),
        dim=16,
        n_layers=1,
        n_heads=2,
        train_len=8,
        batch_size=4,
        steps=6,
        warmup_steps=2,
        log_every=2,
        eval_multiples=(1, 2, 4),
        long_multiples=(2,),
        eval_bytes=400,
        ngram_orders=(1, 2),
    ),
    # the book's chapter: one seed runs live; the committed results hold all three
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
    ),
    # the committed run, sized for a GPU
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
    ),
}

_TUPLES = ("encodings", "seeds", "eval_multiples", "long_multiples", "paired_edges", "ngram_orders")


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"t5:t5_max_distance=64"`` -> ``("t5", {"t5_max_distance": 64})``: an encoding with options.

    An entry of ``encodings`` is a registered encoding's name, optionally followed by ``:`` and
    comma-separated ``option=value`` pairs (ints, floats or names), which
    :func:`pebook.book.training.build_model` passes to the encoding. Unknown options are
    refused when the model is built.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"an encoding must be a non-empty str such as 'rope' or 't5:t5_max_distance=64', got {spec!r}")
    name, _, rest = spec.partition(":")
    check_encoding(name)
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"encoding options must read option=value, got {item!r} in {spec!r}")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return name, options


def preset_config(preset: str, **overrides) -> dict:
    """The hyper-parameters of ``preset`` (a key of :data:`PRESETS`), with ``overrides`` applied."""
    config = preset_with_overrides(PRESETS, preset, overrides, _TUPLES)
    for spec in config["encodings"]:
        _check_spec(spec)
    if not config["seeds"] or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in config["seeds"]):
        raise ValueError(f"seeds must be a non-empty tuple of ints >= 0, got {config['seeds']}")
    multiples = config["eval_multiples"]
    check_eval_multiples(multiples)
    bad = [m for m in config["long_multiples"] if m not in multiples or m == 1]
    if bad:
        raise ValueError(f"long_multiples must be eval multiples above 1, got {bad[0]!r}")
    if config["batch_size"] % max(config["long_multiples"], default=1):
        raise ValueError(
            f"batch_size={config['batch_size']} must be divisible by every long multiple "
            f"{config['long_multiples']} (the same tokens per step at every length)"
        )
    if config["eval_bytes"] is not None and config["eval_bytes"] < config["train_len"] * max(multiples):
        raise ValueError(
            f"eval_bytes must be None (all held-out bytes) or at least the longest window "
            f"{config['train_len'] * max(multiples)}, got {config['eval_bytes']}"
        )
    return config


def train_config(config: dict, seed: int, multiple: int = 1) -> TrainConfig:
    """The training run of ``seed`` at ``train_len × multiple`` (``batch_size // multiple`` windows)."""
    return TrainConfig(
        steps=config["steps"],
        batch_size=config["batch_size"] // multiple,
        seq_len=config["train_len"] * multiple,
        lr=config["lr"],
        warmup_steps=config["warmup_steps"],
        schedule="cosine",
        min_lr_ratio=config["min_lr_ratio"],
        weight_decay=config["weight_decay"],
        grad_clip=config["grad_clip"],
        seed=seed,
        log_every=config["log_every"],
    )


def scored_tokens(config: dict) -> torch.Tensor:
    """The held-out tokens every evaluation scores: all of them, or the first ``eval_bytes + 1``."""
    heldout = corpus.corpus_tokens("heldout")
    n = config["eval_bytes"]
    return heldout if n is None else heldout[: n + 1]


def _check_spec(spec) -> None:
    try:
        parse_variant(spec)
    except ValueError as err:
        raise ValueError(
            f"encodings must be among {tuple(ENCODINGS)} (with options: 'name:option=value'); {err}"
        ) from None


def train_model(encoding: str, config: dict, seed: int, *, multiple: int = 1, device=None, progress=False):
    """Build and train one model of ``encoding`` (a name or a :func:`parse_variant` spec); ``(model, TrainState)``."""
    device = torch.device(device) if device is not None else default_device()
    name, options = parse_variant(encoding)
    model = build_model(
        name,
        dim=config["dim"],
        n_layers=config["n_layers"],
        n_heads=config["n_heads"],
        max_positions=config["train_len"] * multiple,
        seed=seed,
        **options,
    ).to(device)
    state = train(
        model,
        corpus.corpus_tokens("train"),
        train_config(config, seed, multiple),
        device=device,
        progress=progress,
        description=f"{encoding:>10} s{seed} ×{multiple}",
    )
    return model, state


def _score(model, tokens, length, stride, config, device) -> TokenScores | str:
    try:
        return score_tokens(model, tokens, length, stride=stride, batch_size=config["eval_batch"], device=device)
    except ValueError as err:  # a learned table shorter than the window
        return str(err)


def _by_context(scores: TokenScores, bucket: int) -> list[float]:
    """Mean loss of the tokens whose context lies in ``[k·bucket + 1, (k+1)·bucket]``, for each k."""
    group = (scores.context - 1) // bucket
    return [float(scores.loss[group == k].mean()) for k in range(int(group.max()) + 1)]


def evaluate_model(model, config: dict, *, multiples=None, device=None, tokens=None) -> dict:
    """Both protocols at every ``train_len × multiple``, the paired analysis and the loss by context.

    Returns ``{"lengths": [...], "paired": [...], "by_context": {...}}``: per length either
    ``{"multiple", "length", "nonoverlapping", "sliding", "stride"}`` (mean losses, nats/byte) or
    ``{"multiple", "length", "refused": message}``; per length above the first, the paired
    groups of :func:`pebook.book.evaluation.paired_by_context` against ``multiples[0]``; and
    the loss by context bucket of ``train_len`` at the longest accepted length.
    """
    tokens = scored_tokens(config) if tokens is None else tokens
    multiples = config["eval_multiples"] if multiples is None else tuple(multiples)
    lengths, paired, reference, longest = [], [], None, None
    for multiple in multiples:
        length = config["train_len"] * multiple
        stride = max(1, length // 2)
        plain = _score(model, tokens, length, None, config, device)
        if isinstance(plain, str):
            lengths.append({"multiple": multiple, "length": length, "refused": plain})
            continue
        sliding = _score(model, tokens, length, stride, config, device)
        lengths.append(
            {
                "multiple": multiple,
                "length": length,
                "nonoverlapping": plain.mean(),
                "sliding": sliding.mean(),
                "stride": stride,
            }
        )
        if reference is None:
            reference = plain
        else:
            groups = paired_by_context(plain, reference, config["paired_edges"])
            paired.append({"multiple": multiple, "groups": groups})
        longest = (multiple, plain)
    by_context = None
    if longest is not None:
        by_context = {
            "multiple": longest[0],
            "bucket": config["train_len"],
            "loss": _by_context(longest[1], config["train_len"]),
        }
    return {"lengths": lengths, "paired": paired, "by_context": by_context}


def evaluate_long(model, config: dict, multiple: int, *, device=None, tokens=None) -> dict:
    """A model trained at ``train_len × multiple``, scored at that length with both protocols."""
    tokens = scored_tokens(config) if tokens is None else tokens
    length = config["train_len"] * multiple
    plain = _score(model, tokens, length, None, config, device)
    sliding = _score(model, tokens, length, max(1, length // 2), config, device)
    return {"multiple": multiple, "length": length, "nonoverlapping": plain.mean(), "sliding": sliding.mean()}


def ngram_baselines(config: dict, tokens=None) -> dict:
    """n-gram losses on the scored bytes (mean nats/byte), for each order in ``ngram_orders``.

    ``{order: {"full_context": loss, "nonoverlapping": {multiple: loss}, "sliding": {multiple: loss}}}``:
    with all ``order - 1`` bytes of context, and restricted to the windows of each protocol
    (:func:`pebook.book.evaluation.window_context`), so that a line drawn beside a model's
    curve is scored under exactly the model's windows.
    """
    from .. import ngram

    tokens = scored_tokens(config) if tokens is None else tokens
    n_targets = tokens.numel() - 1
    train_tokens = corpus.corpus_tokens("train")
    records = {}
    for order in config["ngram_orders"]:
        model = ngram.fit(train_tokens, order)
        full = model.target_losses(tokens, torch.arange(1, n_targets + 1))
        by_protocol = {"nonoverlapping": {}, "sliding": {}}
        for multiple in config["eval_multiples"]:
            length = config["train_len"] * multiple
            for protocol, stride in (("nonoverlapping", None), ("sliding", max(1, length // 2))):
                context = window_context(n_targets, length, stride)
                by_protocol[protocol][str(multiple)] = float(model.target_losses(tokens, context).mean())
        records[str(order)] = {"full_context": float(full.mean()), **by_protocol}
    return records


# ------------------------------------------------------------------------------------ whole runs


def _one_run(encoding, config, seed, device, progress) -> dict:
    t0 = time.perf_counter()
    model, state = train_model(encoding, config, seed, device=device, progress=progress)
    record = {
        "history": [list(h) for h in state.history],
        "parameters": sum(p.numel() for p in model.parameters()),
        "evaluation": evaluate_model(model, config, device=device),
        "long": [],
    }
    for multiple in config["long_multiples"]:
        long_model, long_state = train_model(
            encoding, config, seed, multiple=multiple, device=device, progress=progress
        )
        long_record = evaluate_long(long_model, config, multiple, device=device)
        long_record["final_train_loss"] = long_state.history[-1][1]
        record["long"].append(long_record)
    record["wall_time_s"] = time.perf_counter() - t0
    record.update(device_info(device))
    return record


def run(
    preset: str = "chapter",
    *,
    encodings=None,
    seeds=None,
    device=None,
    run_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    baselines: bool = True,
    progress: bool = False,
    **overrides,
) -> dict:
    """Run ``preset`` for ``encodings`` × ``seeds`` (default: the preset's); return the results.

    ``run_dir`` keeps each finished (encoding, seed) as ``<encoding>.<seed>.json``: calling again
    with the same directory and hyper-parameters reuses them. ``out`` writes the results file.
    ``baselines=False`` skips the n-gram baselines. ``overrides`` change single hyper-parameters.
    """
    config = preset_config(preset, **overrides)
    encodings = config["encodings"] if encodings is None else tuple(encodings)
    seeds = config["seeds"] if seeds is None else tuple(seeds)
    for spec in encodings:
        _check_spec(spec)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad or not seeds:
        raise ValueError(f"seeds must be a non-empty sequence of ints >= 0, got {seeds}")
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
    runs: dict[str, dict] = {}
    for encoding in encodings:
        for seed in seeds:
            done = run_path / f"{encoding}.{seed}.json" if run_path is not None else None
            if done is not None and done.exists():
                record = json.loads(done.read_text())
            else:
                record = jsonable(_one_run(encoding, config, seed, device, progress))
                if done is not None:
                    write_json(done, record)
            runs.setdefault(encoding, {})[str(seed)] = record
    train_tokens, heldout = corpus.corpus_tokens("train"), corpus.corpus_tokens("heldout")
    results = {
        "schema": SCHEMA,
        "preset": preset,
        "config": jsonable(config),
        **device_info(device),
        "versions": versions(),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": time.perf_counter() - t0,
        "data": {
            "corpus": "King James Version of the Bible (pebook/book/data/kjv.txt.xz), byte-level tokens",
            "held_out": f"every {corpus.HELD_OUT_EVERY}th chapter",
            "train_tokens": int(train_tokens.numel()),
            "heldout_tokens": int(heldout.numel()),
            "scored_tokens": int(scored_tokens(config).numel() - 1),
        },
        "runs": runs,
        "baselines": jsonable(ngram_baselines(config)) if baselines else None,
    }
    validate_results(results)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(out), results)
    return results


def merge_results(base: dict, new: dict) -> dict:
    """``base`` with the runs of ``new`` added (a run of the same encoding and seed is replaced).

    Both must be results of the same preset with the same hyper-parameters; the merged results
    keep ``base``'s metadata, add ``new``'s wall time, and take ``new``'s baselines if ``base``
    has none. Each run keeps the device it ran on.
    """
    validate_results(base)
    validate_results(new)
    if (base["preset"], base["config"]) != (new["preset"], new["config"]):
        raise ValueError(
            f"cannot merge results of preset {new['preset']!r} into {base['preset']!r} with other "
            "hyper-parameters: rerun with the same preset and overrides"
        )
    merged = json.loads(json.dumps(base))
    for encoding, by_seed in new["runs"].items():
        merged["runs"].setdefault(encoding, {}).update(json.loads(json.dumps(by_seed)))
    merged["wall_time_s"] = base["wall_time_s"] + new["wall_time_s"]
    if merged.get("baselines") is None:
        merged["baselines"] = new.get("baselines")
    validate_results(merged)
    return merged


def summary(results: dict, protocol: str = "nonoverlapping") -> dict:
    """``{encoding: {multiple: (mean, min, max, n_seeds)}}`` of the loss under ``protocol``.

    ``protocol`` is ``"nonoverlapping"`` or ``"sliding"``; a length refused by every seed maps to
    ``None``.
    """
    if protocol not in ("nonoverlapping", "sliding"):
        raise ValueError(f"protocol must be 'nonoverlapping' or 'sliding', got {protocol!r}")
    table = {}
    for encoding, by_seed in results["runs"].items():
        rows = {}
        for multiple in results["config"]["eval_multiples"]:
            values = [
                e[protocol]
                for record in by_seed.values()
                for e in record["evaluation"]["lengths"]
                if e["multiple"] == multiple and protocol in e
            ]
            rows[multiple] = seed_range(values)
        table[encoding] = rows
    return table


def compare(results: dict, first: str, second: str, multiple: int, protocol: str = "nonoverlapping") -> str:
    """``"<"`` or ``">"`` when every seed of ``first`` is below (above) every seed of ``second``.

    Otherwise ``"~"``: the seeds' ranges overlap, and the results support no ordering of the two
    at ``train_len × multiple`` under ``protocol``. Raises ``ValueError`` if either encoding has
    no loss there (unknown, or refused the length).
    """
    table = summary(results, protocol)
    cells = []
    for name in (first, second):
        if name not in table:
            raise ValueError(f"encoding {name!r} is not in the results; they hold {sorted(table)}")
        if multiple not in table[name]:
            raise ValueError(f"multiple must be one of {sorted(table[name])}, got {multiple!r}")
        if table[name][multiple] is None:
            raise ValueError(f"{name!r} has no loss at {multiple}x (refused)")
        cells.append(table[name][multiple])
    return order_ranges(*cells)


def validate_results(results: dict) -> None:
    """Check the structure of a results dict (raise ``ValueError`` naming the first problem)."""

    def need(cond, what):
        if not cond:
            raise ValueError(f"invalid length-extrapolation results: {what}")

    need(isinstance(results, dict), "not a dict")
    need(results.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}")
    for key in ("preset", "config", "device", "device_name", "versions", "wall_time_s", "data", "runs"):
        need(key in results, f"missing {key!r}")
    config = results["config"]
    multiples = list(config["eval_multiples"])
    for encoding, by_seed in results["runs"].items():
        need(isinstance(encoding, str) and encoding.partition(":")[0] in ENCODINGS, f"unknown encoding {encoding!r}")
        for seed, record in by_seed.items():
            name = f"{encoding} seed {seed}"
            need(seed.isdigit(), f"{name}: seeds are keyed by their decimal string")
            need(len(record["history"]) > 0, f"{name}: empty training history")
            need("device" in record, f"{name}: no device recorded")
            lengths = record["evaluation"]["lengths"]
            need([e["multiple"] for e in lengths] == multiples, f"{name}: eval multiples")
            for e in lengths:
                need(e["length"] == e["multiple"] * config["train_len"], f"{name}: eval length")
                if "refused" not in e:
                    need(
                        all(math.isfinite(e[p]) for p in ("nonoverlapping", "sliding")),
                        f"{name}: losses must be finite",
                    )
            need(
                [r["multiple"] for r in record["long"]] == list(config["long_multiples"]),
                f"{name}: long multiples",
            )


def load_results(name: str = "length_extrapolation_full.json") -> dict:
    """A results file shipped in ``pebook/book/data``, validated."""
    return load_data_file(name, validate_results)


def main(argv=None) -> int:
    parser = experiment_parser(
        "length_extrapolation",
        __doc__,
        PRESETS,
        default_preset="full",
        subset=("--encodings", "comma-separated (default: the preset's)"),
        out_help="results JSON (default: <run-dir>/results.json)",
        merge_help="merge the runs into this results file (rewritten)",
    )
    parser.add_argument(
        "--run-dir", default=None, help="keeps finished runs (default: ./length_extrapolation_<preset>)"
    )
    args = parse_experiment_args(parser, argv)
    run_dir = args.run_dir or f"length_extrapolation_{args.preset}"
    encodings = tuple(args.encodings.split(",")) if args.encodings else None
    seeds = parse_ints(args.seeds) if args.seeds else None
    out = args.out or str(Path(run_dir) / "results.json")
    results = run(
        args.preset,
        encodings=encodings,
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
    multiples = results["config"]["eval_multiples"]
    print(f"{'encoding':>11}  " + "  ".join(f"{m:>14}x" for m in multiples))
    for encoding, rows in summary(results).items():
        cells = [
            "         ref." if rows[m] is None else f"{rows[m][0]:6.3f} [{rows[m][1]:.3f},{rows[m][2]:.3f}]"
            for m in multiples
        ]
        print(f"{encoding:>11}  " + "  ".join(cells))
    print(f"results: {out}  ({results['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
