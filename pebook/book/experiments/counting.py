"""Counting sentences: a task where the position that matters is counted in sentences, not tokens.

Golovneva, Wang, Weston & Sukhbaatar (2024), "Contextual Position Encoding: Learning to Count
What's Important", arXiv:2405.18719, motivate CoPE (:mod:`pebook.cope`) with attention to "the
i-th sentence back": a position measured in tokens (RoPE, ALiBi) is the wrong unit for it when
sentences have different lengths, while CoPE's gates can open on sentence ends only, so that its
position *counts sentences*. This module is a small synthetic version of that example on the byte
vocabulary of the book's models (:data:`VOCAB_SIZE` = 256, so any model of
:func:`pebook.book.training.build_model` reads it).

A sequence of ``length`` tokens (:func:`make_batch`)::

    … w w .  w w w w !  w ?  w w w ;  w w  QUERY
             ^^^^^^^^^ ^^^^ ^^^^^^^^^ ^^^^^
                 3rd    2nd    last    unfinished

Sentences of 1 … ``max_words`` words (uniform), each word a byte of :data:`WORDS` (``a`` … ``t``),
each sentence closed by one of the four :data:`END_MARKS` (``. ! ? ;``), uniform; after the last
end mark an unfinished sentence of 0 … ``max_words`` words; :data:`QUERY` last. The sentences are
laid out backwards from the query, so the first one is usually cut. The target at the query is
the end mark of the ``back``-th last sentence (``back`` = 3 above: ``!``): chance is 1/4, and
nothing but its rank among the end marks tells it from the others. Its distance in tokens from
the query varies with the sentence lengths (with ``back`` = 3 and ``max_words`` = 5, from 5 to
18); its distance in end marks is always ``back``. The loss is the cross-entropy at the query
only (:func:`train_counting`), and the models are evaluated (:func:`evaluate_counting`) at the
training length and at multiples of it, on the same sequences for every model.

Command line (progress bars with tqdm; CUDA when present unless ``--device``)::

    python -m pebook.book.experiments.counting --preset chapter [--encodings cope,rope] [--seeds 0,1,2]
                                               [--device cpu] [--threads 1] [--out file.json]
"""

from __future__ import annotations

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
    "VOCAB_SIZE",
    "WORDS",
    "END_MARKS",
    "QUERY",
    "PRESETS",
    "min_length",
    "make_batch",
    "preset_config",
    "train_counting",
    "evaluate_counting",
    "query_gates",
    "run",
    "summary",
    "compare",
    "validate_results",
    "load_results",
    "main",
]

SCHEMA = "pebook.counting/1"

#: word alphabet: the 20 bytes ``a`` … ``t``
WORDS = tuple(range(ord("a"), ord("t") + 1))
#: the sentence ends ``. ! ? ;``: the answer is one of them (chance 1/4)
END_MARKS = tuple(map(ord, ".!?;"))
#: the last token of every sequence; the model's prediction there is its answer
QUERY = 129

#: Named experiment sizes (the hyper-parameters that :func:`run` records).
PRESETS: dict[str, dict] = {
    # seconds: for the test suite only
    "micro": dict(
        encodings=("cope", "rope"),
        seeds=(0,),
        back=2,
        max_words=2,
        dim=16,
        n_layers=1,
        n_heads=2,
        train_len=12,
        batch_size=8,
        steps=10,
        lr=1e-2,
        warmup_steps=2,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        grad_clip=1.0,
        log_every=5,
        eval_multiples=(1, 2),
        n_eval=16,
        eval_batch=8,
        eval_seed=12345,
    ),
    # the book's chapter: one layer, 600 steps; one seed of the three encodings trains in
    # well under a minute on one CPU thread
    "chapter": dict(
        encodings=("cope", "rope", "alibi"),
        seeds=(0,),
        back=3,
        max_words=5,
        dim=32,
        n_layers=1,
        n_heads=4,
        train_len=32,
        batch_size=32,
        steps=600,
        lr=1e-2,
        warmup_steps=60,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        grad_clip=1.0,
        log_every=20,
        eval_multiples=(1, 2),
        n_eval=512,
        eval_batch=128,
        eval_seed=12345,
    ),
}

# what identifies an experiment: everything but the encodings and seeds a run happened to cover
_RUN_KEYS = ("encodings", "seeds")


# ------------------------------------------------------------------------------------ the task


def min_length(back: int, max_words: int) -> int:
    """The shortest ``length`` that always holds ``back`` whole sentences before the query.

    The unfinished sentence (up to ``max_words``), ``back`` sentences of up to ``max_words + 1``
    tokens each, and the query: ``max_words + back (max_words + 1) + 1``.
    """
    back = check_int("back", back, minimum=1)
    max_words = check_int("max_words", max_words, minimum=1)
    return max_words + back * (max_words + 1) + 1


def make_batch(
    batch_size: int, length: int, generator: torch.Generator, *, back: int = 3, max_words: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_size`` sequences of ``length`` tokens, drawn with ``generator`` (CPU).

    Returns ``(inputs, targets, distances)``: ``inputs`` ``(batch_size, length)`` int64 (sentences
    of :data:`WORDS` closed by :data:`END_MARKS`, an unfinished sentence, :data:`QUERY` last),
    ``targets`` ``(batch_size,)`` the end mark of the ``back``-th last sentence, and ``distances``
    ``(batch_size,)`` its distance in tokens from the query. ``length`` must be at least
    :func:`min_length`. The draws (words, tails, sentence lengths, end marks, each one tensor per
    batch) depend on the generator's state only, so the same seed gives the same batch.
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    length = check_int("length", length)
    shortest = min_length(back, max_words)
    if length < shortest:
        raise ValueError(
            f"length must be >= {shortest} to hold {back} sentences of up to {max_words} words, "
            f"an unfinished one and the query (back={back}, max_words={max_words}), got {length}"
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (batches are drawn on the CPU), got {generator.device}"
        )
    # fixed order of draws, fixed sizes: words, unfinished lengths, sentence lengths, end marks
    words = torch.tensor(WORDS)[torch.randint(len(WORDS), (batch_size, length), generator=generator)]
    tails = torch.randint(0, max_words + 1, (batch_size,), generator=generator)
    sizes = torch.randint(1, max_words + 1, (batch_size, length), generator=generator)
    marks = torch.tensor(END_MARKS)[torch.randint(len(END_MARKS), (batch_size, length), generator=generator)]
    inputs = words.clone()
    inputs[:, -1] = QUERY
    targets = torch.empty(batch_size, dtype=torch.long)
    distances = torch.empty(batch_size, dtype=torch.long)
    for row in range(batch_size):
        end = length - 2 - int(tails[row])  # where the last sentence's end mark goes
        for rank in range(length):  # rank 0: the last sentence
            if end < 0:
                break
            inputs[row, end] = marks[row, rank]
            if rank + 1 == back:
                targets[row], distances[row] = marks[row, rank], length - 1 - end
            end -= int(sizes[row, rank]) + 1
    return inputs, targets, distances


# ------------------------------------------------------------------------------------ training


def train_counting(
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
    back: int = 3,
    max_words: int = 5,
    device=None,
    progress: bool = False,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    log_every: int = 10,
    return_history: bool = False,
):
    """Train a byte-level :class:`pebook.TinyLM` with ``encoding`` on the counting task at ``train_len``.

    The model is :func:`pebook.book.training.build_model` (``max_positions=train_len``, weights
    from ``seed``); each step draws a fresh batch (:func:`make_batch`, from a generator seeded with
    ``seed``) and minimises the cross-entropy of ``model(inputs)[:, -1]`` (the query only) against
    the end mark, with AdamW, gradient clipping and the warm-up + cosine schedule of
    :func:`pebook.book.training.learning_rate`. The same arguments give the same weights (bitwise
    on one machine and thread count). Returns the model in eval mode, or ``(model, history)`` with
    ``return_history``: ``history`` holds ``(step, mean loss over the last log_every steps)``.
    """
    check_encoding(encoding)
    train_len = check_int("train_len", train_len)
    shortest = min_length(back, max_words)
    if train_len < shortest:
        raise ValueError(f"train_len must be >= {shortest} (back={back}, max_words={max_words}), got {train_len}")
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
        lambda n, length, gen: make_batch(n, length, gen, back=back, max_words=max_words),
        device=device,
        progress=progress,
        desc=f"{encoding:>6} seed {config.seed}",
    )
    return (model, history) if return_history else model


# ------------------------------------------------------------------------------------ evaluation


def _eval_seed(seed: int, length: int, back: int, max_words: int) -> int:
    # a stable function of the cell (unlike hash()): a length's sequences do not depend on the others
    return zlib.crc32(f"{seed}/{length}/{back}/{max_words}".encode())


@torch.no_grad()
def evaluate_counting(
    model,
    lengths: Sequence[int],
    *,
    n: int,
    seed: int,
    back: int = 3,
    max_words: int = 5,
    batch_size: int = 64,
    device=None,
) -> list[dict]:
    """Accuracy of ``model`` at each of ``lengths``: ``n`` sequences per length, the same for every model.

    Returns records ``{"length", "n", "accuracy", "loss"}`` (accuracy: the argmax over the whole
    vocabulary at the query is the end mark; loss: mean cross-entropy in nats). The sequences of a
    length are drawn from a generator seeded by ``seed``, the length, ``back`` and ``max_words``.
    """
    n = check_int("n", n, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
        raise TypeError(f"lengths must be a non-empty sequence of ints, got {lengths!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    records = []
    for length in lengths:
        generator = torch.Generator().manual_seed(_eval_seed(seed, length, back, max_words))
        all_inputs, all_targets, _ = make_batch(n, length, generator, back=back, max_words=max_words)
        correct, loss = 0, 0.0
        for start in range(0, n, batch_size):
            inputs, targets = all_inputs[start : start + batch_size], all_targets[start : start + batch_size]
            logits = model(inputs.to(device))[:, -1].double()
            targets = targets.to(device)
            correct += int((logits.argmax(-1) == targets).sum())
            loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        records.append({"length": length, "n": n, "accuracy": correct / n, "loss": loss / n})
    return records


@torch.no_grad()
def query_gates(model, inputs: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """CoPE's gates ``g_mn = σ(q_m k_nᵀ / √d)`` of the last token (the query) in ``layer``, by head.

    ``model`` is a :class:`pebook.TinyLM` with ``encoding="cope"`` and no grouped keys;
    ``inputs`` ``(batch, length)``. Returns ``(batch, heads, length)``: how much each key counts
    for the query. Read from the layer's own projection of its input (a forward hook), with the
    scale the layer uses.
    """
    layer = check_int("layer", layer, minimum=0)
    if layer >= len(model.blocks):
        raise ValueError(f"layer must be < {len(model.blocks)} (the model's layers), got {layer}")
    attn = model.blocks[layer].attn
    if attn.position.name != "cope":
        raise ValueError(f"query_gates needs a CoPE model, got encoding {attn.position.name!r}")
    if attn.n_kv_heads != attn.n_heads:
        raise ValueError(f"query_gates needs n_kv_heads == n_heads, got {attn.n_kv_heads} and {attn.n_heads}")
    seen = {}
    handle = attn.qkv.register_forward_hook(lambda module, args, out: seen.setdefault("qkv", out))
    try:
        model(inputs)
    finally:
        handle.remove()
    b, t, _ = seen["qkv"].shape
    q, k, _ = seen["qkv"].view(b, t, -1, attn.head_dim).transpose(1, 2).split(attn.n_heads, dim=1)
    scale = attn.head_dim**-0.5 if attn.scale is None else attn.scale
    return torch.sigmoid((q[:, :, -1:] @ k.transpose(-1, -2))[:, :, 0] * scale)


# ------------------------------------------------------------------------------------ the whole run


def preset_config(preset: str, **overrides) -> dict:
    """The hyper-parameters of ``preset`` (a key of :data:`PRESETS`), with ``overrides`` applied."""
    config = preset_with_overrides(PRESETS, preset, overrides, ("encodings", "seeds", "eval_multiples"))
    check_task_config(config)
    shortest = min_length(config["back"], config["max_words"])
    if check_int("train_len", config["train_len"]) < shortest:
        raise ValueError(
            f"train_len must be >= {shortest} (back={config['back']}, max_words={config['max_words']}), "
            f"got {config['train_len']}"
        )
    check_positive_float("lr", config["lr"])
    for name in ("steps", "batch_size", "n_eval", "eval_batch", "dim", "n_layers", "n_heads", "eval_seed"):
        check_int(name, config[name], minimum=0 if name in ("steps", "eval_seed") else 1)
    return config


def _hyper_parameters(config: dict) -> dict:
    return jsonable({k: v for k, v in config.items() if k not in _RUN_KEYS})


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

    The dict holds the schema, the preset, its hyper-parameters (``config``, without encodings
    and seeds), the encodings and seeds run, the device and thread count, library versions, wall
    time, and ``results[encoding][str(seed)]``: training curve, final training loss, parameter
    count, training and evaluation time, and the records of :func:`evaluate_counting` at
    ``train_len × eval_multiples``.
    """
    if encodings is not None:
        overrides["encodings"] = tuple(encodings)
    if seeds is not None:
        overrides["seeds"] = tuple(seeds)
    config = preset_config(preset, **overrides)
    device = torch.device(device) if device is not None else default_device()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    task = {"back": config["back"], "max_words": config["max_words"]}
    lengths = [config["train_len"] * m for m in config["eval_multiples"]]
    results: dict[str, dict] = {}
    for encoding in config["encodings"]:
        results[encoding] = {}
        for seed in config["seeds"]:
            t0 = time.perf_counter()
            model, history = train_counting(
                encoding,
                **task,
                **{k: config[k] for k in ("dim", "n_layers", "n_heads", "train_len", "steps", "batch_size", "lr")},
                **{k: config[k] for k in ("warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "log_every")},
                seed=seed,
                device=device,
                progress=progress,
                return_history=True,
            )
            train_time = time.perf_counter() - t0
            records = evaluate_counting(
                model,
                lengths,
                **task,
                n=config["n_eval"],
                seed=config["eval_seed"],
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
    out = {
        "schema": SCHEMA,
        "preset": preset,
        "config": _hyper_parameters(config),
        "encodings": list(config["encodings"]),
        "seeds": list(config["seeds"]),
        **device_info(device),
        "versions": versions(),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": time.perf_counter() - t_start,
        "data": {
            "vocab_size": VOCAB_SIZE,
            "words": [WORDS[0], WORDS[-1]],
            "end_marks": list(END_MARKS),
            "query": QUERY,
        },
        "results": results,
    }
    validate_results(out)
    return out


def summary(results: dict, multiple: int = 1) -> dict[str, tuple[float, float, float, int]]:
    """``{encoding: (mean, min, max, n)}`` of the accuracy over the seeds at ``train_len × multiple``."""
    validate_results(results)
    length = results["config"]["train_len"] * check_int("multiple", multiple, minimum=1)
    if multiple not in results["config"]["eval_multiples"]:
        raise ValueError(f"multiple must be one of {results['config']['eval_multiples']}, got {multiple}")
    return {
        name: seed_range(e["accuracy"] for record in by_seed.values() for e in record["eval"] if e["length"] == length)
        for name, by_seed in results["results"].items()
    }


def compare(results: dict, a: str, b: str, multiple: int = 1) -> str:
    """``">"`` when every seed of ``a`` is more accurate than every seed of ``b`` at that length,
    ``"<"`` the reverse, ``"~"`` when their ranges overlap (:func:`order_ranges`)."""
    table = summary(results, multiple)
    for name in (a, b):
        if name not in table:
            raise ValueError(f"encoding {name!r} is not in the results (they hold {list(table)})")
    return order_ranges(table[a], table[b])


def validate_results(results: dict) -> None:
    """Check the structure of a results dict (raise ``ValueError`` naming the first problem)."""

    def need(cond, what):
        if not cond:
            raise ValueError(f"invalid counting results: {what}")

    need(isinstance(results, dict), "not a dict")
    need(results.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}, got {results.get('schema')!r}")
    for key in ("preset", "config", "encodings", "seeds", "device", "device_name", "torch_threads", "versions"):
        need(key in results, f"missing {key!r}")
    need("wall_time_s" in results, "missing 'wall_time_s'")
    need(isinstance(results.get("results"), dict), "missing 'results'")
    for key in ("torch", "python", "pebook"):
        need(key in results["versions"], f"versions lacks {key!r}")
    config = results["config"]
    need(list(results["results"]) == list(results["encodings"]), "results differ from 'encodings'")
    lengths = [config["train_len"] * m for m in config["eval_multiples"]]
    for name, by_seed in results["results"].items():
        need(sorted(int(s) for s in by_seed) == sorted(results["seeds"]), f"{name}: seeds differ from 'seeds'")
        for seed, record in by_seed.items():
            where = f"{name} seed {seed}"
            need(len(record.get("history", ())) > 0 or config["steps"] == 0, f"{where}: empty training history")
            need([e["length"] for e in record["eval"]] == lengths, f"{where}: eval lengths, expected {lengths}")
            for e in record["eval"]:
                need(0.0 <= e["accuracy"] <= 1.0 and e["n"] == config["n_eval"], f"{where}: accuracy/n")


def load_results(name: str = "counting_chapter.json") -> dict:
    """A results file shipped in ``pebook/book/data``, validated."""
    return load_data_file(name, validate_results)


def main(argv=None) -> int:
    parser = experiment_parser(
        "counting",
        __doc__,
        PRESETS,
        default_preset="chapter",
        subset=("--encodings", "comma-separated subset, e.g. cope,rope"),
        out_help="results JSON (default: counting_<preset>.json)",
        merge_help=None,
    )
    args = parse_experiment_args(parser, argv)
    encodings = tuple(e.strip() for e in args.encodings.split(",") if e.strip()) if args.encodings else None
    try:
        seeds = parse_ints(args.seeds) if args.seeds else None
    except ValueError:
        parser.error(f"--seeds must be comma-separated ints, got {args.seeds!r}")
    try:
        preset_config(args.preset, **{k: v for k, v in (("encodings", encodings), ("seeds", seeds)) if v})
    except ValueError as error:
        parser.error(str(error))
    results = run(args.preset, encodings=encodings, seeds=seeds, device=args.device, progress=not args.no_progress)
    target = Path(args.out or f"counting_{args.preset}.json")
    write_json(target, results)
    multiples = results["config"]["eval_multiples"]
    print(f"{'encoding':>8} {'seed':>4}  " + "  ".join(f"{m:>5}x" for m in multiples))
    for name, by_seed in results["results"].items():
        for seed, record in by_seed.items():
            print(f"{name:>8} {seed:>4}  " + "  ".join(f"{e['accuracy']:6.3f}" for e in record["eval"]))
    print(f"results: {target}  ({results['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
