"""What every experiment's results file records about where and how it ran, and how it is written."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from ... import __version__ as PEBOOK_VERSION
from ..._checks import check_int

__all__ = [
    "device_info",
    "versions",
    "write_json",
    "jsonable",
    "parse_ints",
    "seed_range",
    "order_ranges",
    "read_data_file",
    "load_data_file",
    "experiment_parser",
    "parse_experiment_args",
    "preset_with_overrides",
    "check_eval_multiples",
    "check_task_config",
]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def device_info(device: torch.device) -> dict:
    """The device, its name (GPU model or CPU model), torch's thread count and the CPU count."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.processor() or platform.machine() or "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def versions() -> dict:
    """Versions of pebook, torch, numpy and Python, and the platform string."""
    import numpy

    return {
        "pebook": PEBOOK_VERSION,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def jsonable(obj):
    """``obj`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` to ``path`` atomically (a temporary file, then a rename), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def parse_ints(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)`` (command-line lists)."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def seed_range(values) -> tuple[float, float, float, int] | None:
    """``(mean, min, max, n)`` of the values of several seeds, or ``None`` when there are none."""
    values = list(values)
    return (sum(values) / len(values), min(values), max(values), len(values)) if values else None


def order_ranges(first: tuple, second: tuple) -> str:
    """``"<"`` / ``">"`` when the seed range ``first`` lies wholly below / above ``second``, else ``"~"``.

    Both are :func:`seed_range` tuples; overlapping ranges support no ordering.
    """
    (_, low_a, high_a, _), (_, low_b, high_b, _) = first, second
    if high_a < low_b:
        return "<"
    if low_a > high_b:
        return ">"
    return "~"


def read_data_file(name: str) -> dict:
    """The JSON results file ``name`` shipped in ``pebook/book/data``."""
    from importlib import resources

    return json.loads(resources.files("pebook.book").joinpath("data", name).read_text())


def load_data_file(name: str, validate) -> dict:
    """The results file ``name`` shipped in ``pebook/book/data``, checked with ``validate`` (which raises)."""
    results = read_data_file(name)
    validate(results)
    return results


def experiment_parser(
    module: str,
    doc: str,
    presets,
    *,
    default_preset: str,
    subset: tuple[str, str] | None,
    out_help: str,
    merge_help: str | None = None,
) -> argparse.ArgumentParser:
    """The command line every experiment shares: ``--preset``, the subset option ``subset`` (``(flag,
    help)``, e.g. ``("--encodings", ...)``), ``--seeds``, ``--device``, ``--out``, ``--merge-into``
    (when ``merge_help``), ``--threads`` and ``--no-progress``; modules add their own options."""
    prog, description = f"python -m pebook.book.experiments.{module}", doc.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", choices=tuple(presets), default=default_preset)
    if subset is not None:
        parser.add_argument(subset[0], default=None, help=subset[1])
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("--out", default=None, help=out_help)
    if merge_help is not None:
        parser.add_argument("--merge-into", default=None, help=merge_help)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_experiment_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with ``--threads`` applied to torch."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def preset_with_overrides(presets: dict, preset: str, overrides: dict, tuples=()) -> dict:
    """A copy of ``presets[preset]`` with ``overrides`` applied (each must name a hyper-parameter of
    the preset) and the entries named in ``tuples`` made tuples."""
    if preset not in presets:
        raise ValueError(f"preset must be one of {tuple(presets)}, got {preset!r}")
    config = dict(presets[preset])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown hyper-parameter {unknown[0]!r}; the preset has {sorted(config)}")
    config.update(overrides)
    for name in tuples:
        config[name] = tuple(config[name])
    return config


def check_eval_multiples(multiples) -> None:
    """Evaluation lengths as multiples of the training length: increasing, the first 1."""
    if multiples[0] != 1 or list(multiples) != sorted(set(multiples)):
        raise ValueError(f"eval_multiples must increase and start at 1, got {multiples}")


def check_task_config(config: dict) -> None:
    """The entries the query-task experiments (retrieval, counting) share: at least one registered
    encoding, distinct seeds ``>= 0`` and the evaluation multiples."""
    from ...registry import ENCODINGS

    if not config["encodings"]:
        raise ValueError("encodings must name at least one encoding, got ()")
    bad = [e for e in config["encodings"] if e not in ENCODINGS]
    if bad:
        raise ValueError(f"encodings must be among {tuple(ENCODINGS)}, got {bad[0]!r}")
    if not config["seeds"]:
        raise ValueError("seeds must hold at least one seed, got ()")
    for s in config["seeds"]:
        check_int("seeds", s, minimum=0)
    if len(set(config["seeds"])) != len(config["seeds"]):
        raise ValueError(f"seeds must not repeat, got {config['seeds']}")
    check_eval_multiples(config["eval_multiples"])
