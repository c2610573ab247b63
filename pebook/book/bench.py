"""Side-by-side benchmark: time and peak extra memory of pebook's fast paths against the direct formulas.

Run ``python -m pebook.book.bench`` (or ``make bench``). For each sequence length it measures, in one
run on one device,

* ``shaw_attention`` (O(L·(2k+1) + L²) extra memory) against ``shaw_attention_naive``, which
  materialises the two ``(L, L, head_dim)`` tensors of the direct formula, and
* ``apply_rope`` (real arithmetic, half-split) against ``apply_rope_complex``,

and prints each pair's time and memory ratios. Only the ratios are meant to be compared: absolute
numbers depend on the machine.

Peak extra memory is the high-water mark above the memory in use just before the call:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident set size of a fresh worker
process (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc told to return
every allocation above 64 KiB to the system when freed so that the baseline holds no cached heap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from ..rope import apply_rope, apply_rope_complex, rope_frequencies
from ..shaw import shaw_attention, shaw_attention_naive

__all__ = ["Measurement", "measure_pair", "run_benchmark", "format_table", "main"]

PAIRS = {"shaw": ("shaw_attention", "shaw_attention_naive"), "rope": ("apply_rope", "apply_rope_complex")}
ROPE_BATCH, ROPE_HEADS = 1, 8
MIN_SECONDS, MAX_REPEATS = 0.25, 200


@dataclass
class Measurement:
    function: str
    seq_len: int
    device: str
    seconds: float
    peak_extra_bytes: int | None


def _inputs(function: str, seq_len: int, head_dim: int, max_distance: int, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    if function.startswith("shaw"):
        q, k, v = (randn(1, 1, seq_len, head_dim) for _ in range(3))
        rel_k, rel_v = (randn(2 * max_distance + 1, head_dim) for _ in range(2))
        return (q, k, v, rel_k, rel_v, max_distance)
    x = randn(ROPE_BATCH, ROPE_HEADS, seq_len, head_dim)
    return (x, torch.arange(seq_len, device=device), rope_frequencies(head_dim, device=device))


FUNCTIONS = {
    "shaw_attention": shaw_attention,
    "shaw_attention_naive": shaw_attention_naive,
    "apply_rope": apply_rope,
    "apply_rope_complex": apply_rope_complex,
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1))


def _call(function: str, args, device: torch.device):
    with torch.no_grad():
        out = FUNCTIONS[function](*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def _peak_here(function: str, seq_len: int, head_dim: int, max_distance: int, device: str) -> int:
    """Peak extra bytes of one call, measured in this process (after one warm-up call)."""
    dev = torch.device(device)
    args = _inputs(function, seq_len, head_dim, max_distance, dev)
    _call(function, args, dev)  # warm-up: one-time allocations (thread pools, kernels) are not counted
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        _call(function, args, dev)
        return torch.cuda.max_memory_allocated(dev) - base
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    _call(function, args, dev)
    return max(_rss_kib("VmHWM") - base, 0) * 1024


def _peak_in_worker(function: str, seq_len: int, head_dim: int, max_distance: int) -> int:
    if not (sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")):
        raise RuntimeError("CPU peak-memory measurement needs Linux /proc/self/clear_refs")
    job = json.dumps(dict(function=function, seq_len=seq_len, head_dim=head_dim, max_distance=max_distance))
    # glibc returns every block above 64 KiB to the system when freed, so RSS tracks live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run(
        [sys.executable, "-m", "pebook.book.bench", "--worker", job],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker for {function} at L={seq_len} failed:\n{done.stderr}")
    return int(done.stdout.strip().splitlines()[-1])


def measure_pair(
    fast: str,
    reference: str,
    seq_len: int,
    *,
    head_dim: int = 64,
    max_distance: int = 128,
    device: str = "cpu",
    repeats: int = 5,
) -> tuple[Measurement, Measurement]:
    """Time and peak extra memory of two functions on the same inputs, side by side.

    Time: the best of at least ``repeats`` calls (more, up to 0.25 s, for cheap calls), the two functions
    alternating so that both see the same machine load. Memory: on CPU in a fresh worker process per
    function, on CUDA from the allocator.
    """
    for name in (fast, reference):
        if name not in FUNCTIONS:
            raise ValueError(f"function must be one of {sorted(FUNCTIONS)}, got {name!r}")
    dev = torch.device(device)
    peaks = {}
    for name in (fast, reference):
        if dev.type == "cuda":
            peaks[name] = _peak_here(name, seq_len, head_dim, max_distance, device)
        else:
            peaks[name] = _peak_in_worker(name, seq_len, head_dim, max_distance)
    args = {name: _inputs(name, seq_len, head_dim, max_distance, dev) for name in (fast, reference)}
    times = {fast: [], reference: []}
    for name in (fast, reference):
        _call(name, args[name], dev)  # warm-up
    # alternate until each has run `repeats` times and for at least MIN_SECONDS (cheap calls repeat more)
    while len(times[fast]) < MAX_REPEATS and (
        len(times[fast]) < repeats or min(sum(times[fast]), sum(times[reference])) < MIN_SECONDS
    ):
        for name in (fast, reference):
            start = time.perf_counter()
            _call(name, args[name], dev)
            times[name].append(time.perf_counter() - start)
    return tuple(Measurement(name, seq_len, device, min(times[name]), peaks[name]) for name in (fast, reference))


def run_benchmark(lengths=(256, 1024, 4096), *, head_dim=64, max_distance=128, device="cpu", repeats=5, progress=True):
    """Measure both pairs at every length; returns a list of ``(fast, reference)`` measurement pairs."""
    from tqdm.auto import tqdm

    jobs = [(pair, seq_len) for seq_len in lengths for pair in PAIRS.values()]
    kwargs = dict(head_dim=head_dim, max_distance=max_distance, device=device, repeats=repeats)
    return [
        measure_pair(fast, ref, seq_len, **kwargs)
        for (fast, ref), seq_len in tqdm(jobs, desc="benchmark", disable=not progress)
    ]


def _mib(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.1f}"


def format_table(results) -> str:
    """The results as a text table, with reference/fast ratios of time and memory."""
    pair = f"{'time ms':>10}{'peak MiB':>11}"
    header = f"{'L':>6}  {'function':<22}{pair}   {'vs':<22}{pair}{'time ×':>8}{'memory ×':>10}"
    lines = [header, "-" * len(header)]
    for fast, ref in results:
        if fast.peak_extra_bytes is None or ref.peak_extra_bytes is None:
            mem_ratio = "n/a"
        else:
            mem_ratio = f"{ref.peak_extra_bytes / max(fast.peak_extra_bytes, 1):.1f}"
        lines.append(
            f"{fast.seq_len:>6}  {fast.function:<22}{fast.seconds * 1e3:>10.2f}{_mib(fast.peak_extra_bytes):>11}   "
            f"{ref.function:<22}{ref.seconds * 1e3:>10.2f}{_mib(ref.peak_extra_bytes):>11}"
            f"{ref.seconds / fast.seconds:>8.1f}{mem_ratio:>10}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pebook.book.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-distance", type=int, default=128, help="Shaw's clipping distance k")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: pebook.default_device())")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one CPU memory measurement in this fresh process, printed as bytes
        print(_peak_here(device="cpu", **json.loads(args.worker)))
        return 0

    from ..utils import default_device

    device = args.device or str(default_device())
    print(
        f"pebook.book.bench on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads): "
        f"head_dim={args.head_dim}, Shaw k={args.max_distance}, Shaw batch×heads=1×1, "
        f"RoPE batch×heads={ROPE_BATCH}×{ROPE_HEADS}; time = best of >= {args.repeats} alternating calls"
    )
    results = run_benchmark(
        args.lengths, head_dim=args.head_dim, max_distance=args.max_distance, device=device, repeats=args.repeats
    )
    print(format_table(results))
    shaw_longest = [pair for pair in results if pair[0].function == "shaw_attention"][-1]
    ratio = shaw_longest[1].peak_extra_bytes / max(shaw_longest[0].peak_extra_bytes, 1)
    print(
        f"\nAt L={shaw_longest[0].seq_len}: the naive Shaw formula needs {ratio:.1f}× "
        "the peak extra memory of shaw_attention."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
