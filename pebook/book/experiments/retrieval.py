"""Passkey retrieval: can a model trained at length ``L`` *use* a token more than ``L`` positions back?

Perplexity at long lengths (:mod:`pebook.book.experiments.length_extrapolation`) says whether a model
still predicts well, not whether it can reach far-away context: most next tokens are predictable
from the last few. This experiment asks for exactly one far-away token. It is the *passkey
retrieval* task of Mohtashami & Jaggi (2023), "Landmark Attention: Random-Access Infinite Context
Length for Transformers", arXiv:2305.16300 (§4.2: a passkey hidden in filler text, asked for at
the end), in the form of a synthetic associative-recall task as in Arora et al. (2023), "Zoology:
Measuring and Improving Recall in Efficient Language Models", arXiv:2312.04927, on the byte
vocabulary of the book's models (:data:`VOCAB_SIZE` = 256, so any model of
:func:`pebook.book.training.build_model` reads it).

A sequence of ``length`` tokens (:func:`make_batch`)::

    f f f … f  MARKER  k  f f … f  QUERY
                       ^ position p          ^ position length - 1

``f`` are filler tokens drawn uniformly from :data:`FILLER` (bytes 32 … 95), ``k`` the passkey,
drawn uniformly from :data:`PASSKEYS` (bytes 160 … 169, disjoint from the filler), announced by
:data:`MARKER`; the last token is :data:`QUERY` and the target at that position is ``k``. The
*distance* is ``length - 1 - p`` (from the passkey to the query), between 1 and ``length - 2``.
The loss is the cross-entropy at the query position only (:func:`train_retrieval`), so a model
learns the task only by attending from the query back to the passkey. Because the passkey
alphabet is disjoint from the filler, content alone identifies the passkey: the task needs no
positional information at all, and what it measures is whether an encoding *lets* attention
reach a token at an unseen distance or position (ALiBi's linear penalty works against far keys;
a learned table refuses lengths past its size).

Each encoding is trained at ``train_len`` with distances uniform over all valid values, and
evaluated (:func:`evaluate_retrieval`) at ``train_len × m`` for ``m`` in ``eval_multiples``,
with distances drawn uniformly in bins ``(lo, hi]``: ``(0, L], (L, 2L], (2L, 4L], …``
(``bins="geometric"``) or ``(0, L], (L, 2L], (2L, 3L], …`` (``bins="linear"``), each bin cut
at the largest distance the length allows. Every model is scored on the same sequences.

Command line (progress bars with tqdm; CUDA when present unless ``--device``)::

    python -m pebook.book.experiments.retrieval --preset full [--encodings rope,alibi] [--seeds 0,1]
                                                [--device cpu] [--out file.json] [--merge-into file.json]

``--merge-into`` adds this run's encodings and seeds to an existing results file of the same
preset and hyper-parameters (:func:`merge_results`), so a long run can be done in pieces or on
several machines.
"""

from __future__ import annotations

import json
import math
import sys
import time
import zlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from ..._checks import check_int, check_positive_float
from ...registry import check_encoding
from ...utils import default_device
from ..corpus import VOCAB_SIZE
from ..training import TrainConfig, build_model, train_query_task
from ._records import (
    check_task_config,
    device_info,
    experiment_parser,
    load_data_file,
    parse_experiment_args,
    parse_ints,
    preset_with_overrides,
    versions,
    write_json,
)

__all__ = [
    "SCHEMA",
    "VOCAB_SIZE",
    "FILLER",
    "PASSKEYS",
    "MARKER",
    "QUERY",
    "PRESETS",
    "preset_config",
    "make_batch",
    "distance_bins",
    "train_retrieval",
    "evaluate_retrieval",
    "run",
    "merge_results",
    "load_results",
    "validate_results",
    "main",
]

SCHEMA = "pebook.retrieval/1"

#: filler alphabet: the printable bytes 32 … 95 (space, digits, punctuation, capitals)
FILLER = tuple(range(32, 96))
#: passkey alphabet: 10 bytes, 160 … 169, disjoint from the filler and from MARKER and QUERY
PASSKEYS = tuple(range(160, 170))
#: announces the passkey (the token right before it)
MARKER = 128
#: the last token of every sequence; the model's prediction there is its answer
QUERY = 129

_COMMON = dict(
    # pinned, not read from the registry: a preset is a fixed experiment
    encodings=("none", "sinusoidal", "learned", "shaw", "t5", "rope", "alibi"),
    seeds=(0,),
    n_heads=4,
    warmup_steps=30,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    grad_clip=1.0,
    log_every=10,
    eval_multiples=(1, 2, 4, 8, 16),
    bins="geometric",
    n_per_cell=64,
    eval_batch=16,
    eval_seed=12345,
)

#: Named experiment sizes (the hyper-parameters that :func:`run` records).
PRESETS: dict[str, dict] = {
    # seconds: for the test suite only
    "micro": dict(
        _COMMON,
        encodings=("rope", "learned"),
        dim=16,
        n_layers=1,
        n_heads=2,
        train_len=8,
        batch_size=8,
        steps=10,
        lr=1e-2,
        warmup_steps=2,
        log_every=5,
        eval_multiples=(1, 2, 4),
        n_per_cell=8,
        eval_batch=8,
    ),
    # the book's chapter: all seven encodings, one seed, about 40 s on a 2-core CPU (2 threads)
    "chapter": dict(
        _COMMON,
        dim=32,
        n_layers=2,
        train_len=32,
        batch_size=32,
        steps=300,
        lr=3e-3,
        warmup_steps=30,
    ),
    # GPU-sized (also runs on a CPU, slowly): a bigger model, longer training, three seeds
    "full": dict(
        _COMMON,
        seeds=(0, 1, 2),
        dim=128,
        n_layers=3,
        train_len=128,
        batch_size=64,
        steps=1500,
        lr=1e-3,
        warmup_steps=150,
        log_every=25,
        bins="linear",
        n_per_cell=200,
        eval_batch=16,
    ),
}

# what identifies an experiment: everything but the encodings and seeds a run happened to cover
_RUN_KEYS = ("encodings", "seeds")


# ------------------------------------------------------------------------------------ the task


def _check_length(length) -> int:
    length = check_int("length", length)
    if length < 3:
        raise ValueError(f"length must be an int >= 3 (MARKER, passkey and QUERY), got {length}")
    return length


def _check_distance_range(lo: int, hi: int, length: int, what: str) -> None:
    if not 1 <= lo <= hi <= length - 2:
        raise ValueError(f"{what} must lie in 1 … length - 2 = {length - 2} (length={length}), got {lo} … {hi}")


def make_batch(
    batch_size: int, length: int, generator: torch.Generator, *, distance: int | tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_size`` passkey-retrieval sequences of ``length`` tokens, drawn with ``generator`` (CPU).

    Returns ``(inputs, targets, distances)``: ``inputs`` ``(batch_size, length)`` int64 (filler,
    then :data:`MARKER` and the passkey at position ``length - 1 - distance``, filler, and
    :data:`QUERY` last), ``targets`` ``(batch_size,)`` the passkeys (the answer at the last
    position) and ``distances`` ``(batch_size,)`` from passkey to query. ``distance`` is ``None``
    (uniform over every valid distance, 1 … ``length - 2``), an int (exactly that distance) or a
    pair ``(lo, hi)`` (uniform over ``lo … hi``, both included). The draws depend on the
    generator's state only, so the same seed gives the same batch.
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    length = _check_length(length)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (batches are drawn on the CPU), got {generator.device}"
        )
    if distance is None:
        lo, hi = 1, length - 2
    elif isinstance(distance, (tuple, list)):
        if len(distance) != 2:
            raise ValueError(f"distance must be None, an int or a pair (lo, hi), got {distance!r}")
        lo, hi = (check_int("distance", d) for d in distance)
        if lo > hi:
            raise ValueError(f"distance must be a pair (lo, hi) with lo <= hi, got {distance!r}")
    else:
        lo = hi = check_int("distance", distance)
    _check_distance_range(lo, hi, length, "distance")
    # fixed order of draws: filler, passkeys, distances
    filler = torch.tensor(FILLER, dtype=torch.long)
    inputs = filler[torch.randint(len(FILLER), (batch_size, length), generator=generator)]
    targets = torch.tensor(PASSKEYS, dtype=torch.long)[torch.randint(len(PASSKEYS), (batch_size,), generator=generator)]
    distances = torch.randint(lo, hi + 1, (batch_size,), generator=generator)
    rows = torch.arange(batch_size)
    where = length - 1 - distances
    inputs[rows, where - 1] = MARKER
    inputs[rows, where] = targets
    inputs[:, -1] = QUERY
    return inputs, targets, distances


def distance_bins(train_len: int, length: int, scheme: str = "geometric") -> list[tuple[int, int]]:
    """The distance bins ``(lo, hi]`` evaluated at ``length`` for a model trained at ``train_len``.

    ``"geometric"``: ``(0, L], (L, 2L], (2L, 4L], …``; ``"linear"``: ``(0, L], (L, 2L], (2L, 3L], …``;
    the last bin is cut at ``length - 2``, the largest distance a sequence of ``length`` holds, and
    bins beyond it are dropped.
    """
    train_len = check_int("train_len", train_len, minimum=1)
    length = _check_length(length)
    if scheme not in ("geometric", "linear"):
        raise ValueError(f"scheme must be 'geometric' or 'linear', got {scheme!r}")
    bins, lo, hi = [], 0, train_len
    while lo < length - 2:
        bins.append((lo, min(hi, length - 2)))
        lo, hi = hi, (2 * hi if scheme == "geometric" else hi + train_len)
    return bins


# ------------------------------------------------------------------------------------ training


def train_retrieval(
    encoding: str,
    *,
    dim: int,
    n_layers: int,
    n_heads: int,
    train_len: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device=None,
    progress: bool = False,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    log_every: int = 10,
    return_history: bool = False,
):
    """Train a byte-level :class:`pebook.TinyLM` with ``encoding`` on passkey retrieval at ``train_len``.

    The model is :func:`pebook.book.training.build_model` (``max_positions=train_len``, weights
    from ``seed``); each step draws a fresh batch (:func:`make_batch`, distances uniform, from a
    generator seeded with ``seed``) and minimises the cross-entropy of ``model(inputs)[:, -1]``
    (the query position only) against the passkey, with AdamW (Loshchilov & Hutter 2019,
    arXiv:1711.05101), gradient clipping and the warm-up + cosine schedule of
    :func:`pebook.book.training.learning_rate`. The same arguments give the same weights (bitwise
    on one machine and thread count). Returns the model in eval mode, or ``(model, history)`` with
    ``return_history``: ``history`` holds ``(step, mean loss over the last log_every steps)``.
    """
    check_encoding(encoding)
    train_len = _check_length(train_len)
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=train_len,
        lr=lr,
        warmup_steps=warmup_steps,
        schedule="cosine",
        min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        seed=seed,
        log_every=log_every,
    )
    device = torch.device(device) if device is not None else default_device()
    model = build_model(
        encoding, dim=dim, n_layers=n_layers, n_heads=n_heads, max_positions=train_len, seed=config.seed
    ).to(device)
    history = train_query_task(
        model,
        config,
        make_batch,
        device=device,
        progress=progress,
        desc=f"{encoding:>10} seed {config.seed}",
    )
    return (model, history) if return_history else model


# ------------------------------------------------------------------------------------ evaluation


def _cell_seed(seed: int, length: int, lo: int, hi: int) -> int:
    # a stable function of the cell (unlike hash()), so a cell's sequences do not depend on which
    # other cells, lengths or models were evaluated
    return zlib.crc32(f"{seed}/{length}/{lo}/{hi}".encode())


@torch.no_grad()
def evaluate_retrieval(
    model,
    lengths: Sequence[int],
    bins: str | Sequence[tuple[int, int]] = "geometric",
    *,
    n_per_cell: int,
    seed: int,
    train_len: int | None = None,
    batch_size: int = 64,
    device=None,
) -> list[dict]:
    """Passkey accuracy of ``model`` at each of ``lengths``, by distance bin.

    ``bins`` is a scheme of :func:`distance_bins` (bins of ``train_len``, default
    ``model.max_positions``) or an explicit list of ``(lo, hi]`` distance bins, each cut at
    ``length - 2`` at every length (and skipped where ``lo >= length - 2``). Each (length, bin)
    cell scores ``n_per_cell`` sequences whose distances are uniform over ``lo + 1 … hi``, drawn
    from a generator seeded by ``seed`` and the cell, so every model sees the same sequences.
    Returns records ``{"length", "distance_bin": [lo, hi], "n", "accuracy", "loss"}`` (accuracy:
    the argmax over the whole vocabulary at the query equals the passkey; loss: mean
    cross-entropy, nats), or one ``{"length", "refused": message}`` for a length at which the
    model raises ``ValueError`` (a learned table shorter than ``length``).
    """
    n_per_cell = check_int("n_per_cell", n_per_cell, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
        raise TypeError(f"lengths must be a non-empty sequence of ints, got {lengths!r}")
    lengths = [_check_length(n) for n in lengths]
    if isinstance(bins, str):
        if bins not in ("geometric", "linear"):
            raise ValueError(f"bins must be 'geometric', 'linear' or a list of (lo, hi) pairs, got {bins!r}")
        unit = check_int("train_len", train_len if train_len is not None else model.max_positions, minimum=1)
    else:
        bins = [tuple(b) for b in bins]
        if not bins or any(
            len(b) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in b) or not 0 <= b[0] < b[1]
            for b in bins
        ):
            raise ValueError(f"bins must be a non-empty list of int pairs (lo, hi) with 0 <= lo < hi, got {bins!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    records = []
    try:
        for length in lengths:
            cells = (
                distance_bins(unit, length, bins)
                if isinstance(bins, str)
                else [(lo, min(hi, length - 2)) for lo, hi in bins if lo < length - 2]
            )
            try:
                length_records = [
                    _evaluate_cell(model, length, lo, hi, n_per_cell, seed, batch_size, device) for lo, hi in cells
                ]
            except ValueError as err:
                records.append({"length": length, "refused": str(err)})
                continue
            records.extend(length_records)
    finally:
        model.train(was_training)
    return records


def _evaluate_cell(model, length, lo, hi, n, seed, batch_size, device) -> dict:
    # the cell's sequences are drawn at once, so they do not depend on the batch size of the forward passes
    generator = torch.Generator().manual_seed(_cell_seed(seed, length, lo, hi))
    all_inputs, all_targets, _ = make_batch(n, length, generator, distance=(lo + 1, hi))
    correct, loss = 0, 0.0
    for start in range(0, n, batch_size):
        inputs, targets = all_inputs[start : start + batch_size], all_targets[start : start + batch_size]
        logits = model(inputs.to(device))[:, -1].double()
        targets = targets.to(device)
        correct += int((logits.argmax(-1) == targets).sum())
        loss += float(F.cross_entropy(logits, targets, reduction="sum"))
    return {"length": length, "distance_bin": [lo, hi], "n": n, "accuracy": correct / n, "loss": loss / n}


# ------------------------------------------------------------------------------------ the whole run


def preset_config(preset: str, **overrides) -> dict:
    """The hyper-parameters of ``preset`` (a key of :data:`PRESETS`), with ``overrides`` applied."""
    config = preset_with_overrides(PRESETS, preset, overrides, ("encodings", "seeds", "eval_multiples"))
    check_task_config(config)
    if config["bins"] not in ("geometric", "linear"):
        raise ValueError(f"bins must be 'geometric' or 'linear', got {config['bins']!r}")
    _check_length(config["train_len"])
    check_positive_float("lr", config["lr"])
    for name in ("steps", "batch_size", "n_per_cell", "eval_batch", "dim", "n_layers", "n_heads", "eval_seed"):
        check_int(name, config[name], minimum=0 if name in ("steps", "eval_seed") else 1)
    return config


def _hyper_parameters(config: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in _RUN_KEYS}))


def run(
    preset: str = "chapter",
    *,
    encodings: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    device=None,
    progress: bool = False,
    **overrides,
) -> dict:
    """Train and evaluate every encoding × seed of ``preset``; return the results (a JSON-ready dict).

    ``encodings`` and ``seeds`` (default: the preset's) select part of the experiment; the
    results of parts run separately combine with :func:`merge_results`. ``overrides`` change
    single hyper-parameters (and so make a different experiment). The dict holds the schema, the
    preset, its hyper-parameters (``config``, without encodings and seeds), the encodings and
    seeds run, the device, library versions, wall time, and ``results[encoding][str(seed)]``:
    training curve, final training loss, parameter count, training time and the records of
    :func:`evaluate_retrieval` at ``train_len × eval_multiples``.
    """
    if encodings is not None:
        overrides["encodings"] = tuple(encodings)
    if seeds is not None:
        overrides["seeds"] = tuple(seeds)
    config = preset_config(preset, **overrides)
    device = torch.device(device) if device is not None else default_device()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    lengths = [config["train_len"] * m for m in config["eval_multiples"]]
    results: dict[str, dict] = {}
    for encoding in config["encodings"]:
        results[encoding] = {}
        for seed in config["seeds"]:
            t0 = time.perf_counter()
            model, history = train_retrieval(
                encoding,
                dim=config["dim"],
                n_layers=config["n_layers"],
                n_heads=config["n_heads"],
                train_len=config["train_len"],
                steps=config["steps"],
                batch_size=config["batch_size"],
                lr=config["lr"],
                seed=seed,
                device=device,
                progress=progress,
                warmup_steps=config["warmup_steps"],
                min_lr_ratio=config["min_lr_ratio"],
                weight_decay=config["weight_decay"],
                grad_clip=config["grad_clip"],
                log_every=config["log_every"],
                return_history=True,
            )
            train_time = time.perf_counter() - t0
            records = evaluate_retrieval(
                model,
                lengths,
                config["bins"],
                n_per_cell=config["n_per_cell"],
                seed=config["eval_seed"],
                train_len=config["train_len"],
                batch_size=config["eval_batch"],
                device=device,
            )
            results[encoding][str(seed)] = {
                "train_time_s": train_time,
                "eval_time_s": time.perf_counter() - t0 - train_time,
                "history": [list(h) for h in history],
                "final_train_loss": history[-1][1] if history else None,
                "parameters": sum(p.numel() for p in model.parameters()),
                "eval": records,
            }
    wall = time.perf_counter() - t_start
    info = device_info(device)
    run_meta = {
        "encodings": list(config["encodings"]),
        "seeds": list(config["seeds"]),
        **info,
        "versions": versions(),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": wall,
    }
    out = {
        "schema": SCHEMA,
        "preset": preset,
        "config": _hyper_parameters(config),
        "encodings": list(config["encodings"]),
        "seeds": list(config["seeds"]),
        **info,
        "versions": versions(),
        "wall_time_s": wall,
        "data": {
            "vocab_size": VOCAB_SIZE,
            "filler": [FILLER[0], FILLER[-1]],
            "passkeys": [PASSKEYS[0], PASSKEYS[-1]],
            "marker": MARKER,
            "query": QUERY,
        },
        "runs": [run_meta],
        "results": results,
    }
    validate_results(out)
    return out


def merge_results(base: dict, new: dict, *, replace: bool = False) -> dict:
    """``base`` and ``new`` (results of :func:`run` for the same preset and hyper-parameters) as one.

    The encodings and seeds are united (encodings in the order of the preset, seeds sorted); a
    (encoding, seed) present in both raises ``ValueError`` unless ``replace`` (then ``new``'s is
    kept). Results of different presets, hyper-parameters or schemas raise ``ValueError``
    naming what differs. Top-level device and versions stay ``base``'s; ``runs`` lists every
    constituent run with its own device, versions and wall time, and ``wall_time_s`` is their sum.
    Neither argument is modified.
    """
    validate_results(base)
    validate_results(new)
    if base["preset"] != new["preset"]:
        raise ValueError(f"cannot merge results of preset {new['preset']!r} into preset {base['preset']!r}")
    if base["config"] != new["config"]:
        differ = sorted(
            k for k in set(base["config"]) | set(new["config"]) if base["config"].get(k) != new["config"].get(k)
        )
        detail = ", ".join(f"{k}: {base['config'].get(k)!r} vs {new['config'].get(k)!r}" for k in differ)
        raise ValueError(f"cannot merge results with different hyper-parameters ({detail})")
    merged = json.loads(json.dumps(base))
    overlap = [(e, s) for e in new["results"] for s in new["results"][e] if s in base["results"].get(e, {})]
    if overlap and not replace:
        e, s = overlap[0]
        raise ValueError(f"both results hold encoding {e!r} seed {s}; pass replace=True to keep the new one")
    for encoding, by_seed in new["results"].items():
        merged["results"].setdefault(encoding, {}).update(json.loads(json.dumps(by_seed)))
    pinned = list(PRESETS[base["preset"]]["encodings"]) if base["preset"] in PRESETS else []
    names = list(merged["results"])
    order = [e for e in pinned if e in names] + sorted(e for e in names if e not in pinned)
    merged["results"] = {e: {s: merged["results"][e][s] for s in sorted(merged["results"][e], key=int)} for e in order}
    merged["encodings"] = order
    merged["seeds"] = sorted({int(s) for e in order for s in merged["results"][e]})
    merged["runs"] = merged["runs"] + json.loads(json.dumps(new["runs"]))
    merged["wall_time_s"] = sum(r["wall_time_s"] for r in merged["runs"])
    validate_results(merged)
    return merged


def validate_results(results: dict) -> None:
    """Check the structure of a results dict (raise ``ValueError`` naming the first problem)."""

    def need(cond, what):
        if not cond:
            raise ValueError(f"invalid retrieval results: {what}")

    need(isinstance(results, dict), "not a dict")
    need(results.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}, got {results.get('schema')!r}")
    for key in ("preset", "config", "encodings", "seeds", "device", "device_name", "versions", "wall_time_s", "runs"):
        need(key in results, f"missing {key!r}")
    need(isinstance(results.get("results"), dict), "missing 'results'")
    for key in ("torch", "python", "pebook"):
        need(key in results["versions"], f"versions lacks {key!r}")
    config = results["config"]
    need(list(results["results"]) == list(results["encodings"]), "results differ from 'encodings'")
    lengths = [config["train_len"] * m for m in config["eval_multiples"]]
    for name, by_seed in results["results"].items():
        need(by_seed and all(s.isdigit() for s in by_seed), f"{name}: seeds must be non-negative int strings")
        need({int(s) for s in by_seed} <= set(results["seeds"]), f"{name}: a seed missing from 'seeds'")
        for seed, record in by_seed.items():
            where = f"{name} seed {seed}"
            need(len(record.get("history", ())) > 0 or config["steps"] == 0, f"{where}: empty training history")
            seen = []
            for e in record["eval"]:
                if e["length"] not in seen:
                    seen.append(e["length"])
                if "refused" in e:
                    need(isinstance(e["refused"], str) and e["refused"], f"{where}: empty refusal message")
                else:
                    lo, hi = e["distance_bin"]
                    need(0 <= lo < hi <= e["length"] - 2, f"{where}: distance bin {e['distance_bin']}")
                    need(0.0 <= e["accuracy"] <= 1.0 and e["n"] > 0, f"{where}: accuracy/n")
                    need(math.isfinite(e["loss"]), f"{where}: loss")
            need(seen == lengths, f"{where}: eval lengths {seen}, expected {lengths}")


def load_results(name: str = "retrieval_chapter.json") -> dict:
    """A results file shipped in ``pebook/book/data``, validated."""
    return load_data_file(name, validate_results)


def main(argv=None) -> int:
    parser = experiment_parser(
        "retrieval",
        __doc__,
        PRESETS,
        default_preset="full",
        subset=("--encodings", "comma-separated subset, e.g. rope,alibi"),
        out_help="results JSON (default: retrieval_<preset>.json)",
        merge_help="add this run to an existing results JSON (rewritten)",
    )
    args = parse_experiment_args(parser, argv)
    encodings = tuple(e.strip() for e in args.encodings.split(",") if e.strip()) if args.encodings else None
    try:
        seeds = parse_ints(args.seeds) if args.seeds else None
    except ValueError:
        parser.error(f"--seeds must be comma-separated ints, got {args.seeds!r}")
    base = None
    if args.merge_into and Path(args.merge_into).exists():
        base = json.loads(Path(args.merge_into).read_text())
        validate_results(base)  # fail before training, not after
        if base["preset"] != args.preset:
            parser.error(f"--merge-into holds preset {base['preset']!r}, not {args.preset!r}")
        overrides = {k: v for k, v in (("encodings", encodings), ("seeds", seeds)) if v is not None}
        config = preset_config(args.preset, **overrides)
        if base["config"] != _hyper_parameters(config):
            parser.error(f"--merge-into holds a run of preset {args.preset!r} with other hyper-parameters")
        done = [(e, s) for e in config["encodings"] for s in config["seeds"] if str(s) in base["results"].get(e, {})]
        if done:
            parser.error(f"--merge-into holds encoding {done[0][0]!r} seed {done[0][1]} already")
    results = run(args.preset, encodings=encodings, seeds=seeds, device=args.device, progress=not args.no_progress)
    if base is not None:
        results = merge_results(base, results)
    target = Path(args.out or args.merge_into or f"retrieval_{args.preset}.json")
    write_json(target, results)
    lengths = [results["config"]["train_len"] * m for m in results["config"]["eval_multiples"]]
    print(f"{'encoding':>11} {'seed':>4}  " + "  ".join(f"{n:>6}" for n in lengths))
    for name, by_seed in results["results"].items():
        for seed, record in by_seed.items():
            cells = []
            for n in lengths:
                at = [e for e in record["eval"] if e["length"] == n]
                if "refused" in at[0]:
                    cells.append("  ref.")
                else:
                    cells.append(f"{sum(e['accuracy'] * e['n'] for e in at) / sum(e['n'] for e in at):6.2f}")
            print(f"{name:>11} {seed:>4}  " + "  ".join(cells))
    print(f"results: {target}  ({results['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
