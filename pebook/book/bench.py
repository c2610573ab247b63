"""Benchmark: pebook against the best peers and the hardware floor, as time ratios with peak extra memory.

Run ``python -m pebook.book.bench`` (or ``make bench``). One table per workload; each row is one
implementation of the same computation on the same inputs, measured side by side in one process:

* ``floor``: the cheapest thing the hardware must do anyway: SDPA with ``is_causal=True`` and no
  bias for attention, an elementwise copy of q and k into preallocated buffers for RoPE, a
  nanoGPT-style model of identical size for training, a hand-written greedy loop (SDPA,
  ``torch.cat`` cache) for decoding;
* ``pebook``: pebook's public path (``positional_attention``, ``shaw_attention``, ``apply_rope``,
  ``TinyLM``, ``generate``) and its reference path (the direct formula: the materialised bias with
  an explicit softmax, ``shaw_attention_naive``, ``apply_rope_complex``);
* ``peer``: what a practitioner would use instead: FlexAttention with the encoding's own
  ``score_mod`` and a causal ``BlockMask`` (``torch.compile``d), SDPA with a precomputed 4-D bias,
  Meta's complex RoPE with a precomputed ``freqs_cis``, ``transformers``' ``apply_rotary_pos_emb``
  (eager and compiled), Liger's RoPE kernel where installed, ``transformers``' ``generate``.

Every cell is ``time ratio to the floor`` (the median over rounds of the ratio measured within one
round, so that every row sees the same machine load) and ``peak extra memory``. Absolute times
depend on the machine and are only kept in the ``--json`` file.

Peak extra memory is the high-water mark above the memory in use just before the call (after a
warm-up call): ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident set size
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) of a fresh worker process per workload,
started with glibc told to return every allocation above 64 KiB to the system when freed, so that
the resident set tracks live tensors. Inputs (q, k, v, a peer's precomputed bias or tables, the
model and its optimiser state) exist before the call and are not counted.

Times are not taken under that setting: a fresh mapping per allocation faults in every page it
touches, which a long-running process does not pay. While the rounds run, the worker sets glibc to
where its dynamic thresholds settle in such a process (``mmap`` only above 32 MiB, freed memory
kept), and back afterwards (:func:`steady_allocator`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Candidate",
    "Cell",
    "Row",
    "Table",
    "WORKLOADS",
    "NanoGPT",
    "measure_cell",
    "steady_allocator",
    "run_workload",
    "run_benchmark",
    "format_table",
    "main",
]

HEADS, HEAD_DIM, SHAW_K = 8, 64, 128
CPU_LENGTHS, CUDA_LENGTHS, QUICK_LENGTHS = (1024, 2048, 4096), (1024, 2048, 4096, 16384), (64, 128)
MIN_CALL_SECONDS = 0.02  # cheap calls are repeated within a round until a round's batch lasts this long
MAX_INNER = 200
CELL_BUDGET_SECONDS = 4.0  # rounds beyond the minimum stop once a cell has used this much time
MIN_ROUNDS = 3
REFERENCE_LIMIT_BYTES = {"cpu": 3 * 2**30, "cuda": 40 * 2**30}  # largest tensors a reference path may materialise
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# glibc's dynamic mmap threshold rises with each freed mapping up to DEFAULT_MMAP_THRESHOLD_MAX
# (32 MiB on 64-bit), and the trim threshold follows at twice that: a long-running process's state
STEADY_MMAP_THRESHOLD, STEADY_TRIM_THRESHOLD = 32 * 2**20, 64 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


# -- data -------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One row of one cell: ``fn()`` runs the computation once; ``unavailable`` says why it cannot."""

    label: str
    role: str  # "floor", "pebook" or "peer"
    fn: Callable[[], object] | None = None
    unavailable: str | None = None
    grad: bool = False  # run with autograd on (training); off otherwise
    notes: list[str] = field(default_factory=list)  # filled while it runs (e.g. a compile fallback)


@dataclass
class Cell:
    ratio: float | None = None  # median time ratio to the floor
    seconds: float | None = None  # median seconds per call
    peak_extra_bytes: int | None = None
    rounds: int = 0
    unavailable: str | None = None


@dataclass
class Row:
    label: str
    role: str
    cells: dict = field(default_factory=dict)  # column key (str) -> Cell
    notes: list = field(default_factory=list)


@dataclass
class Table:
    workload: str
    title: str
    columns: list  # column keys, e.g. ["L=1024", "L=2048"]
    rows: list
    note: str = ""
    extra: dict = field(default_factory=dict)  # per column: figures such as tokens/s of each row

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Table:
        rows = [
            Row(r["label"], r["role"], {k: Cell(**c) for k, c in r["cells"].items()}, list(r["notes"]))
            for r in data["rows"]
        ]
        return cls(data["workload"], data["title"], list(data["columns"]), rows, data["note"], dict(data["extra"]))


# -- measurement ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field_name}:\s+(\d+) kB", status.read()).group(1))


def cpu_memory_measurable() -> bool:
    """True in a process started with :data:`MEMORY_ENV` on Linux (a benchmark worker)."""
    return (
        sys.platform.startswith("linux")
        and os.path.exists("/proc/self/clear_refs")
        and all(os.environ.get(k) == v for k, v in MEMORY_ENV.items())
    )


def _set_malloc_thresholds(libc, mmap_threshold: int, trim_threshold: int) -> None:
    if not (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)):
        raise RuntimeError(f"mallopt refused mmap_threshold={mmap_threshold}, trim_threshold={trim_threshold}")


@contextlib.contextmanager
def steady_allocator():
    """Inside a memory worker (:func:`cpu_memory_measurable`), glibc malloc as a long-running process
    has it: allocations up to 32 MiB reuse freed heap memory instead of mapping fresh pages, whose
    page faults would be timed otherwise. On exit :data:`MEMORY_ENV`'s setting is restored and the
    heap trimmed, so that the next peak is measured as before. Elsewhere it changes nothing."""
    if not cpu_memory_measurable():
        yield
        return
    libc = ctypes.CDLL("libc.so.6")
    _set_malloc_thresholds(libc, STEADY_MMAP_THRESHOLD, STEADY_TRIM_THRESHOLD)
    try:
        yield
    finally:
        _set_malloc_thresholds(
            libc, int(MEMORY_ENV["MALLOC_MMAP_THRESHOLD_"]), int(MEMORY_ENV["MALLOC_TRIM_THRESHOLD_"])
        )
        libc.malloc_trim(0)


def _call(candidate: Candidate, device: torch.device) -> float:
    start = time.perf_counter()
    with torch.set_grad_enabled(candidate.grad):
        candidate.fn()
    _sync(device)
    return time.perf_counter() - start


def _peak(candidate: Candidate, device: torch.device) -> tuple[int, float]:
    """Peak extra bytes of one call (and its seconds)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds = _call(candidate, device)
        return torch.cuda.max_memory_allocated(device) - base, seconds
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    seconds = _call(candidate, device)
    return max(_rss_kib("VmHWM") - base, 0) * 1024, seconds


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:100]}"


def measure_cell(
    candidates: list[Candidate],
    *,
    device="cpu",
    repeats: int = 5,
    memory: bool = False,
    budget: float | None = None,
    min_rounds: int = MIN_ROUNDS,
) -> dict[str, Cell]:
    """Time (and optionally peak memory of) each candidate side by side; the first must be the floor.

    A warm-up call first (compilation, one-time allocations), then one call measuring memory, then
    (under :func:`steady_allocator`, after one more untimed call each) rounds: in each round every
    candidate runs ``inner`` times (enough for ``MIN_CALL_SECONDS``), in an order rotated from round
    to round, and its time per call is divided by the floor's of the same round. At least
    ``min_rounds`` rounds, up to ``repeats`` while the cell's time budget lasts.
    """
    device = torch.device(device)
    budget = CELL_BUDGET_SECONDS if budget is None else budget
    if not candidates or candidates[0].role != "floor":
        raise ValueError("the first candidate must be the floor")
    for name, value in (("repeats", repeats), ("min_rounds", min_rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    cells = {c.label: Cell(unavailable=c.unavailable) for c in candidates}
    live, estimate = [], {}
    for c in candidates:
        if c.fn is None:
            if c.unavailable is None:
                cells[c.label].unavailable = "no implementation"
            continue
        try:
            _call(c, device)  # warm-up
            if memory:
                cells[c.label].peak_extra_bytes, estimate[c.label] = _peak(c, device)
            else:
                estimate[c.label] = _call(c, device)
        except Exception as error:  # a peer that fails here is reported, not fatal
            if c.role == "floor":
                raise
            cells[c.label].unavailable = f"failed: {_short(error)}"
            continue
        live.append(c)
    inner = {c.label: max(1, min(MAX_INNER, math.ceil(MIN_CALL_SECONDS / max(estimate[c.label], 1e-9)))) for c in live}
    round_seconds = sum(inner[c.label] * estimate[c.label] for c in live)
    rounds = max(min_rounds, min(repeats, int(budget / max(round_seconds, 1e-9))))
    times = {c.label: [] for c in live}
    with steady_allocator():
        for c in live:  # untimed: the heap grows to its working size under the new setting
            _call(c, device)
        for r in range(rounds):
            shift = r % len(live)
            for c in live[shift:] + live[:shift]:
                start = time.perf_counter()
                with torch.set_grad_enabled(c.grad):
                    for _ in range(inner[c.label]):
                        c.fn()
                _sync(device)
                times[c.label].append((time.perf_counter() - start) / inner[c.label])
    floor = times[candidates[0].label]
    for c in live:
        cell = cells[c.label]
        cell.ratio = statistics.median(t / f for t, f in zip(times[c.label], floor))
        cell.seconds = statistics.median(times[c.label])
        cell.rounds = rounds
    return cells


# -- implementations measured -----------------------------------------------------------------------


def _randn(*shape, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device)


def _causal_block_mask(length: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, length, length, device=device)


_COMPILED: dict = {}


def _compiled(name: str, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _flex_candidate(label, q, k, v, score_mod, block_mask, compile_peers: bool) -> Candidate:
    """FlexAttention, compiled when asked; a compile failure falls back to eager and says so."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:
        return Candidate(label, "peer", unavailable=f"torch.nn.attention.flex_attention: {_short(error)}")
    if not compile_peers:
        return Candidate(
            label + " (eager)", "peer", lambda: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        )
    cand = Candidate(label + " (compiled)", "peer")
    state = {"fn": _compiled("flex_attention", flex_attention)}

    def run():
        try:
            return state["fn"](q, k, v, score_mod=score_mod, block_mask=block_mask)
        except Exception as error:
            if state["fn"] is flex_attention:
                raise
            cand.notes.append(f"torch.compile failed ({_short(error)}); this row ran eager FlexAttention")
            state["fn"] = flex_attention
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    cand.fn = run
    return cand


def _explicit_attention(q, k, v, bias):
    """The direct formula: ``softmax(q kᵀ/√d + bias, causal) v`` with the whole score matrix."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    length = q.shape[-2]
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu_(1)
    return scores.masked_fill_(mask, float("-inf")).softmax(dim=-1) @ v


def _bias_candidates(name: str, length: int, device, compile_peers: bool) -> list[Candidate]:
    import pebook as pb

    q, k, v = (_randn(1, HEADS, length, HEAD_DIM, device=device, seed=s) for s in range(3))
    torch.manual_seed(0)
    enc = (pb.ALiBi(n_heads=HEADS) if name == "alibi" else pb.T5PE(n_heads=HEADS)).to(device)
    pos = torch.arange(length, device=device)[None]
    with torch.no_grad():
        bias = enc.logit_bias(pos, pos).masked_fill(
            torch.ones(length, length, dtype=torch.bool, device=device).triu(1), float("-inf")
        )
    enc_name = "ALiBi" if name == "alibi" else "T5PE"
    with torch.no_grad():  # the first call builds the cached (1,H,L,L) bias, as a model's first layer or step does
        pb.positional_attention(q, k, v, enc)
    rows = [
        Candidate("SDPA is_causal, no bias", "floor", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        Candidate(
            f"positional_attention({enc_name}), cached bias (built by a first call, untimed)",
            "pebook",
            lambda: pb.positional_attention(q, k, v, enc),
        ),
    ]
    flex_label = f"positional_attention({enc_name}, attn_implementation='flex_attention')"
    if compile_peers:
        rows.append(
            Candidate(
                flex_label,
                "pebook",
                lambda: pb.positional_attention(q, k, v, enc, attn_implementation="flex_attention"),
            )
        )
    else:  # the fast path is the compiled kernel: without it the row would time the fallback
        rows.append(Candidate(flex_label, "pebook", unavailable="compile off"))
    if 4 * HEADS * length * length * 4 > REFERENCE_LIMIT_BYTES[device.type]:
        rows.append(Candidate("reference: logit_bias + explicit softmax", "pebook", unavailable="skipped: too large"))
    else:
        rows.append(
            Candidate(
                "reference: logit_bias + explicit softmax",
                "pebook",
                lambda: _explicit_attention(q, k, v, enc.logit_bias(pos, pos)),
            )
        )
    rows.append(
        _flex_candidate(
            "FlexAttention score_mod + causal BlockMask",
            q,
            k,
            v,
            enc.score_mod(pos, pos, causal=True),
            _causal_block_mask(length, device),
            compile_peers,
        )
    )
    rows.append(
        Candidate(
            "SDPA + precomputed (1,H,L,L) bias",
            "peer",
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        )
    )
    return rows


def _shaw_candidates(length: int, device, compile_peers: bool) -> list[Candidate]:
    from ..shaw import shaw_attention, shaw_attention_naive

    q, k, v = (_randn(1, HEADS, length, HEAD_DIM, device=device, seed=s) for s in range(3))
    rel_k, rel_v = (_randn(2 * SHAW_K + 1, HEAD_DIM, device=device, seed=s) * HEAD_DIM**-0.5 for s in (3, 4))
    naive_bytes = 2 * length * length * HEAD_DIM * 4
    rows = [
        Candidate("SDPA is_causal, no bias", "floor", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        Candidate(f"shaw_attention (k={SHAW_K})", "pebook", lambda: shaw_attention(q, k, v, rel_k, rel_v, SHAW_K)),
        Candidate(
            "shaw fast path (attn_implementation='flex_attention')",
            "pebook",
            lambda: shaw_attention(q, k, v, rel_k, rel_v, SHAW_K, attn_implementation="flex_attention"),
        ),
    ]
    if naive_bytes > REFERENCE_LIMIT_BYTES[device.type]:
        rows.append(
            Candidate(
                "reference: shaw_attention_naive",
                "pebook",
                unavailable=f"skipped: materialises {naive_bytes / 2**30:.0f} GiB",
            )
        )
    else:
        rows.append(
            Candidate(
                "reference: shaw_attention_naive", "pebook", lambda: shaw_attention_naive(q, k, v, rel_k, rel_v, SHAW_K)
            )
        )
    rows.append(
        Candidate(
            "(no peer)",
            "peer",
            unavailable="no library implements both of Shaw's terms (FlexAttention has no value term)",
        )
    )
    return rows


def meta_rope_freqs_cis(head_dim: int, length: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Meta Llama's ``precompute_freqs_cis``: ``(length, head_dim/2)`` complex64."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def meta_apply_rotary_emb(xq, xk, freqs_cis):
    """Meta Llama's ``apply_rotary_emb`` on ``(batch, seq, heads, head_dim)`` tensors."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def _rope_candidates(layout: str, shape, device, compile_peers: bool) -> list[Candidate]:
    from ..rope import apply_rope, apply_rope_compiled, apply_rope_complex, rope_frequencies

    batch, heads, length, dim = shape
    q, k = (_randn(*shape, device=device, seed=s) for s in range(2))
    buf_q, buf_k = torch.empty_like(q), torch.empty_like(k)
    pos = torch.arange(length, device=device)
    inv_freq = rope_frequencies(dim, device=device)

    def floor():
        buf_q.copy_(q)
        buf_k.copy_(k)

    # the tables are cached per (positions, frequencies, device, dtype) and shared by a model's
    # layers: measure with a warm cache (the warm-up call fills it), as every layer after the first
    rows = [
        Candidate("elementwise copy of q and k", "floor", floor),
        Candidate(
            f"apply_rope(layout={layout!r}) (cached tables)",
            "pebook",
            lambda: (apply_rope(q, pos, inv_freq, layout), apply_rope(k, pos, inv_freq, layout)),
        ),
        Candidate(
            "reference: apply_rope_complex (cached freqs_cis)",
            "pebook",
            lambda: (apply_rope_complex(q, pos, inv_freq), apply_rope_complex(k, pos, inv_freq)),
        ),
    ]
    if compile_peers:
        rows.append(
            Candidate(
                f"apply_rope_compiled(layout={layout!r})",
                "pebook",
                lambda: (apply_rope_compiled(q, pos, inv_freq, layout), apply_rope_compiled(k, pos, inv_freq, layout)),
            )
        )
    else:
        rows.append(Candidate(f"apply_rope_compiled(layout={layout!r})", "pebook", unavailable="compile off"))
    # the yardstick in both tables: one complex product per pair, in Meta's own layout (the
    # half layout's pairs are not adjacent, so for it this is the speed to match, not the same result)
    q_bl, k_bl = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # Meta's (B, L, H, D)
    freqs_cis = meta_rope_freqs_cis(dim, length, device=device)
    rows.append(
        Candidate("Meta complex (precomputed freqs_cis)", "peer", lambda: meta_apply_rotary_emb(q_bl, k_bl, freqs_cis))
    )
    if layout == "interleaved":
        try:
            from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rope
            from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions
        except ImportError as error:
            rows.append(Candidate("transformers GPT-J rotary", "peer", unavailable=_short(error)))
        else:
            sincos = create_sinusoidal_positions(length, dim).to(device)[None]
            sin, cos = torch.split(sincos, dim // 2, dim=-1)
            rows.append(
                Candidate(
                    "transformers GPT-J apply_rotary_pos_emb",
                    "peer",
                    lambda: (gptj_rope(q_bl, sin, cos), gptj_rope(k_bl, sin, cos)),
                )
            )
        return rows
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
    except ImportError as error:
        rows.append(Candidate("transformers Llama apply_rotary_pos_emb", "peer", unavailable=_short(error)))
    else:
        emb = torch.cat((pos[:, None].float() * inv_freq, pos[:, None].float() * inv_freq), dim=-1)[None]
        cos, sin = emb.cos(), emb.sin()  # precomputed, as LlamaRotaryEmbedding hands them to every layer
        rows.append(
            Candidate("transformers Llama apply_rotary_pos_emb (eager)", "peer", lambda: llama_rope(q, k, cos, sin))
        )
        if compile_peers:
            compiled = _compiled("llama_rope", llama_rope)
            rows.append(
                Candidate(
                    "transformers Llama apply_rotary_pos_emb (compiled)", "peer", lambda: compiled(q, k, cos, sin)
                )
            )
        else:
            rows.append(
                Candidate("transformers Llama apply_rotary_pos_emb (compiled)", "peer", unavailable="compile off")
            )
    if importlib.util.find_spec("liger_kernel") is None:
        rows.append(Candidate("Liger liger_rotary_pos_emb", "peer", unavailable="liger_kernel not installed"))
    elif device.type != "cuda":
        rows.append(Candidate("Liger liger_rotary_pos_emb", "peer", unavailable="Triton kernel, needs CUDA"))
    else:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        rows.append(Candidate("Liger liger_rotary_pos_emb", "peer", lambda: liger_rotary_pos_emb(q, k, cos, sin)))
    return rows


# -- the nanoGPT-style model: floor for training and decoding ---------------------------------------


class _NanoBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, cos, sin, past):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        if cos is not None:  # RoPE, half layout
            q = q * cos + torch.cat((-q[..., q.shape[-1] // 2 :], q[..., : q.shape[-1] // 2]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., k.shape[-1] // 2 :], k[..., : k.shape[-1] // 2]), dim=-1) * sin
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)  # one new token sees every cached key
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x)), (k, v)


class NanoGPT(nn.Module):
    """A minimal nanoGPT-style decoder of TinyLM's size: same blocks, learned positions or RoPE, SDPA.

    ``forward(tokens, start=0, past=None)`` → ``(logits, cache)``; the cache is a list of
    ``(keys, values)`` per layer, grown with ``torch.cat``. The output head is not tied to the
    embedding, as in :class:`pebook.TinyLM`, so both have the same parameters.
    """

    def __init__(self, vocab_size: int, dim: int, n_layers: int, n_heads: int, max_positions: int, rope: bool):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = None if rope else nn.Embedding(max_positions, dim)
        self.blocks = nn.ModuleList(_NanoBlock(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        head_dim = dim // n_heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.arange(max_positions).float()[:, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos() if rope else None, persistent=False)
        self.register_buffer("sin", angles.sin() if rope else None, persistent=False)

    def forward(self, tokens, start: int = 0, past=None):
        t = tokens.shape[1]
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + t, device=tokens.device))
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos[start : start + t], self.sin[start : start + t]
        cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, None if past is None else past[i])
            cache.append(kv)
        return self.lm_head(self.ln_f(x)), cache

    @classmethod
    def from_tinylm(cls, tiny) -> NanoGPT:
        """The nanoGPT-style model computing the same function as ``tiny`` (its weights copied).

        ``tiny``: a :class:`pebook.TinyLM` with ``encoding="learned"`` or ``"rope"`` (half layout,
        base 10000, whole head, multi-head attention, default scale). Every parameter maps to
        exactly one of the same shape (TinyLM's ``qkv`` holds queries, keys, values head-major, as
        ``c_attn`` does), so the two have the same size and architecture, not just the same count.
        """
        from ..rope import rope_frequencies

        rope = tiny.encoding == "rope"
        if tiny.encoding not in ("learned", "rope") or tiny.n_kv_heads != tiny.n_heads:
            raise ValueError(
                "from_tinylm needs a multi-head TinyLM with encoding 'learned' or 'rope', got "
                f"encoding={tiny.encoding!r}, n_kv_heads={tiny.n_kv_heads} of n_heads={tiny.n_heads}"
            )
        if rope:
            enc = tiny.encoding_module
            shape = (enc.rope_layout, enc.rotary_dim, tiny.blocks[0].attn.scale, enc.attention_factor)
            default = torch.allclose(enc.inv_freq.cpu().double(), rope_frequencies(tiny.head_dim, dtype=torch.float64))
            if shape != ("half", tiny.head_dim, None, 1.0) or not default:
                raise ValueError(
                    "from_tinylm needs RoPE in the half layout over the whole head with base 10000 and the default "
                    f"scale, got rope_layout={enc.rope_layout!r}, rotary_dim={enc.rotary_dim} of head_dim="
                    f"{tiny.head_dim}, scale={tiny.blocks[0].attn.scale}, attention_factor={enc.attention_factor}, "
                    f"default frequencies: {default}"
                )
        weight = tiny.token_embedding.weight
        nano = cls(tiny.vocab_size, tiny.dim, tiny.n_layers, tiny.n_heads, tiny.max_positions, rope=rope)
        nano.to(weight.device, weight.dtype)
        pairs = [(nano.wte, tiny.token_embedding), (nano.ln_f, tiny.final_norm), (nano.lm_head, tiny.lm_head)]
        for mine, theirs in zip(nano.blocks, tiny.blocks):
            pairs += [(mine.ln_1, theirs.attn_norm), (mine.c_attn, theirs.attn.qkv), (mine.c_proj, theirs.attn.out)]
            pairs += [(mine.ln_2, theirs.mlp_norm), (mine.mlp, theirs.mlp)]
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.load_state_dict(theirs.state_dict())
            if not rope:
                nano.wpe.weight.copy_(tiny.position.table.weight)
        return nano


def nanogpt_greedy(model: NanoGPT, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The hand-written decoding loop: prefill, then one token per step with a ``torch.cat`` cache."""
    tokens = prompt
    logits, cache = model(prompt)
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat((tokens, nxt), dim=1)
        if step + 1 < max_new_tokens:
            logits, cache = model(nxt, start=tokens.shape[1] - 1, past=cache)
    return tokens


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


TRAIN = dict(vocab=512, dim=128, layers=4, heads=4, seq=256, batch=8)
TRAIN_QUICK = dict(vocab=64, dim=32, layers=1, heads=2, seq=32, batch=2)
DECODE = dict(vocab=512, dim=128, layers=4, heads=4, prompt=32, new=256)
DECODE_QUICK = dict(vocab=64, dim=32, layers=1, heads=2, prompt=8, new=8)


def _train_candidates(cfg: dict, device) -> tuple[list[Candidate], dict]:
    import pebook as pb

    data = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)
    models = {}
    torch.manual_seed(0)
    for encoding in ("learned", "rope"):  # each nanoGPT twin starts from its TinyLM's weights: the same function
        tiny = pb.TinyLM(cfg["vocab"], cfg["dim"], cfg["layers"], cfg["heads"], cfg["seq"], encoding)
        models[f"nano_{encoding}"], models[f"pebook_{encoding}"] = NanoGPT.from_tinylm(tiny), tiny

    def step_fn(model, nano):
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(x)[0] if nano else model(x)
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
            opt.step()

        return step

    labels = {
        "nano_learned": ("nanoGPT-style, learned positions", "floor"),
        "pebook_learned": ("TinyLM(encoding='learned')", "pebook"),
        "nano_rope": ("nanoGPT-style, RoPE", "peer"),
        "pebook_rope": ("TinyLM(encoding='rope')", "pebook"),
    }
    rows = [
        Candidate(labels[key][0], labels[key][1], step_fn(model, key.startswith("nano")), grad=True)
        for key, model in models.items()
    ]
    params = {labels[key][0]: _n_params(model) for key, model in models.items()}
    for encoding in ("learned", "rope"):
        if _n_params(models[f"nano_{encoding}"]) != _n_params(models[f"pebook_{encoding}"]):
            raise RuntimeError(f"the nanoGPT-style twin of TinyLM({encoding!r}) has another parameter count")
    return rows, params


def _decode_candidates(cfg: dict, device) -> list[Candidate]:
    import pebook as pb

    from ..generation import generate

    max_positions = cfg["prompt"] + cfg["new"]
    prompt = torch.randint(0, cfg["vocab"], (1, cfg["prompt"]), generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    tiny = pb.TinyLM(cfg["vocab"], cfg["dim"], cfg["layers"], cfg["heads"], max_positions, "rope").to(device).eval()
    nano = NanoGPT.from_tinylm(tiny).eval()  # the same weights: both loops decode the same tokens
    rows = [
        Candidate(
            "hand-written loop (SDPA, torch.cat cache)", "floor", lambda: nanogpt_greedy(nano, prompt, cfg["new"])
        ),
        Candidate("pebook.generation.generate (greedy)", "pebook", lambda: generate(tiny, prompt, cfg["new"])),
    ]
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        rows.append(Candidate("transformers generate, tiny Llama", "peer", unavailable=_short(error)))
        return rows
    # Llama's gated MLP has three matrices and no biases: intermediate size (8d + 11) / 3 gives its
    # layers TinyLM's parameter count (exactly when d % 3 == 2, as for d = 128; RMSNorm has no bias)
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["dim"],
        intermediate_size=round((8 * cfg["dim"] + 11) / 3),
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    llama = LlamaForCausalLM(config).to(device).eval()  # built from a config: nothing is downloaded
    llama.generation_config.eos_token_id = None
    llama.generation_config.pad_token_id = 0

    def hf():
        return llama.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=cfg["new"],
            min_new_tokens=cfg["new"],
            do_sample=False,
        )

    size = f"{_n_params(llama):,} parameters, TinyLM {_n_params(tiny):,}"
    rows.append(Candidate(f"transformers generate, tiny Llama (sdpa; {size})", "peer", hf))
    return rows


# -- workloads --------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    title: str
    per_length: bool  # one column per sequence length; otherwise one fixed shape
    note: str = ""
    # rows that differ by a few per cent, less than one round's noise: more rounds, whatever the budget
    min_rounds: int = MIN_ROUNDS


WORKLOADS = {
    "alibi": Workload(
        "alibi",
        "ALiBi attention (B=1, H=8, D=64, causal, float32 on CPU)",
        True,
        "SDPA + bias: the bias is built once outside the timed call (not counted in time or memory).",
    ),
    "t5": Workload(
        "t5",
        "T5-bias attention (B=1, H=8, D=64, causal, 32 buckets, max distance 128)",
        True,
        "SDPA + bias: the bias is built once outside the timed call (not counted in time or memory).",
    ),
    "shaw": Workload("shaw", f"Shaw attention, key and value terms (B=1, H=8, D=64, causal, k={SHAW_K})", True),
    "rope_half": Workload(
        "rope_half",
        "RoPE on q and k, half layout (1, 8, L, 64), per q+k pair",
        True,
        "Meta takes (B, L, H, D) inputs (its native layout), prepared outside the timed call.",
        min_rounds=11,
    ),
    "rope_interleaved": Workload(
        "rope_interleaved",
        "RoPE on q and k, interleaved layout (1, 8, L, 64), per q+k pair",
        True,
        "Meta and GPT-J take (B, L, H, D) inputs (their native layout), prepared outside the timed call.",
        min_rounds=11,
    ),
    "rope_large": Workload(
        "rope_large", "RoPE on q and k, half layout, Llama-size (batch, heads, L, head_dim), per q+k pair", False
    ),
    "train": Workload(
        "train",
        "TinyLM training step (AdamW) vs a nanoGPT-style model of identical size",
        False,
        "Read each TinyLM row against the nanoGPT-style row of the same encoding (the floor is the learned one); "
        "each pair has the same weights and parameter count.",
        min_rounds=11,
    ),
    "decode": Workload(
        "decode",
        "Greedy decoding with a KV cache, batch 1",
        False,
        "On CPU every row runs with one thread.",
        min_rounds=9,
    ),
}


def _candidates(name: str, column, device, quick: bool, compile_peers: bool):
    if name in ("alibi", "t5"):
        return _bias_candidates(name, column, device, compile_peers), {}
    if name == "shaw":
        return _shaw_candidates(column, device, compile_peers), {}
    if name in ("rope_half", "rope_interleaved"):
        layout = name.split("_")[1]
        return _rope_candidates(layout, (1, HEADS, column, HEAD_DIM), device, compile_peers), {}
    if name == "rope_large":
        return _rope_candidates("half", column, device, compile_peers), {}
    if name == "train":
        cfg = TRAIN_QUICK if quick else TRAIN
        rows, params = _train_candidates(cfg, device)
        tokens = cfg["batch"] * cfg["seq"]
        return rows, {"tokens_per_call": tokens, "parameters": params}
    if name == "decode":
        cfg = DECODE_QUICK if quick else DECODE
        return _decode_candidates(cfg, device), {"tokens_per_call": cfg["new"]}
    raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {name!r}")


def _columns(name: str, lengths, quick: bool):
    """``(column key, argument)`` pairs of one workload."""
    if WORKLOADS[name].per_length:
        return [(f"L={n}", n) for n in lengths]
    if name == "rope_large":
        shape = (1, 4, 64, 32) if quick else (4, 32, 1024, 128)
        return [("x".join(map(str, shape)), shape)]
    if name == "train":
        cfg = TRAIN_QUICK if quick else TRAIN
        return [(f"d={cfg['dim']} layers={cfg['layers']} seq={cfg['seq']} batch={cfg['batch']}", None)]
    cfg = DECODE_QUICK if quick else DECODE
    return [(f"d={cfg['dim']} layers={cfg['layers']} prompt={cfg['prompt']} new={cfg['new']}", None)]


def run_workload(
    name: str,
    lengths=CPU_LENGTHS,
    *,
    device="cpu",
    quick: bool = False,
    compile_peers: bool = True,
    repeats: int = 5,
    memory: bool | None = None,
    log=None,
) -> Table:
    """Measure one workload in this process. ``memory=None``: measured where it can be (CUDA, or a worker)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {name!r}")
    device = torch.device(device)
    if memory is None:
        memory = device.type == "cuda" or cpu_memory_measurable()
    elif memory and device.type == "cpu" and not cpu_memory_measurable():
        raise RuntimeError("CPU peak memory needs a worker process started with MEMORY_ENV on Linux")
    work = WORKLOADS[name]
    rows: dict[str, Row] = {}
    extra = {}
    columns = _columns(name, lengths, quick)
    for key, arg in columns:
        start = time.perf_counter()
        candidates, info = _candidates(name, arg, device, quick, compile_peers)
        threads = torch.get_num_threads()
        if name == "decode" and device.type == "cpu":
            torch.set_num_threads(1)  # batch-1 steps at d=128 are too small to share; a 2nd thread only spins
        try:
            with torch.no_grad():
                cells = measure_cell(
                    candidates, device=device, repeats=repeats, memory=memory, min_rounds=work.min_rounds
                )
        finally:
            torch.set_num_threads(threads)
        for c in candidates:
            row = rows.setdefault(c.label, Row(c.label, c.role))
            row.cells[key] = cells[c.label]
            row.notes += [n for n in c.notes if n not in row.notes]
        if "tokens_per_call" in info:
            extra[key] = {
                label: info["tokens_per_call"] / cell.seconds for label, cell in cells.items() if cell.seconds
            }
            extra[key] = {
                "tokens_per_second": extra[key],
                **({"parameters": info["parameters"]} if "parameters" in info else {}),
            }
        del candidates
        if log:
            log(f"  {name} {key}: {time.perf_counter() - start:.1f} s")
    for row in rows.values():  # a row first seen at a later column is unavailable where it did not exist
        for key, _ in columns:
            row.cells.setdefault(key, Cell(unavailable="not run"))
    memory_note = "" if memory else "peak memory not measured (n/a) in this process."
    note = " ".join(n for n in (work.note, memory_note) if n)
    return Table(name, work.title, [key for key, _ in columns], list(rows.values()), note, extra)


def _run_in_worker(name: str, log=None, **kwargs) -> Table:
    """One workload in a fresh process with :data:`MEMORY_ENV`, so that its CPU peaks can be measured.

    The worker's progress lines (its stderr) go to ``log`` when one is given, and are otherwise
    kept out of the caller's output (a notebook cell shows stderr); a failed worker's last lines
    are in the error.
    """
    job = json.dumps(dict(name=name, **kwargs))
    env = dict(os.environ, **MEMORY_ENV)
    done = subprocess.run(
        [sys.executable, "-m", "pebook.book.bench", "--worker", job],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"benchmark worker for {name} failed with exit status {done.returncode}:\n{tail}")
    if log:
        for line in done.stderr.splitlines():
            log(line)
    return Table.from_dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_benchmark(
    workloads=tuple(WORKLOADS),
    lengths=CPU_LENGTHS,
    *,
    device="cpu",
    quick: bool = False,
    compile_peers: bool = True,
    repeats: int = 5,
    workers: bool | None = None,
    log=None,
) -> list[Table]:
    """Every workload: on CPU each in its own worker process (memory), on CUDA in this process."""
    device = torch.device(device)
    if workers is None:
        workers = device.type == "cpu" and sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")
    kwargs = dict(lengths=list(lengths), device=str(device), quick=quick, compile_peers=compile_peers, repeats=repeats)
    tables = []
    for name in workloads:
        if log:
            log(f"{name} ...")
        if workers:
            tables.append(_run_in_worker(name, log=log, **kwargs))
        else:
            tables.append(run_workload(name, **kwargs, log=log))
    return tables


# -- output -----------------------------------------------------------------------------------------


def _cell_text(cell: Cell) -> str:
    if cell.unavailable:
        return f"unavailable: {cell.unavailable}"
    mem = "n/a" if cell.peak_extra_bytes is None else f"{cell.peak_extra_bytes / 2**20:.1f}"
    return f"{cell.ratio:.2f}x {mem:>7} MiB"


def format_table(table: Table) -> str:
    """One workload as text: rows × columns, each cell ``ratio x  peak MiB`` (or ``unavailable: why``)."""
    label_width = max(len(f"{r.role:<7} {r.label}") for r in table.rows) + 2
    width = max([20] + [len(_cell_text(c)) + 2 for r in table.rows for c in r.cells.values() if not c.unavailable])
    lines = [f"{table.title}", "time ÷ floor (median of side-by-side rounds) and peak extra memory"]
    header = " " * label_width + "".join(f"{col:>{width}}" for col in table.columns)
    lines += [header, "-" * len(header)]
    notes = []
    for row in table.rows:
        cells = [row.cells[col] for col in table.columns]
        head = f"{row.role:<7} {row.label}".ljust(label_width)
        reasons = {c.unavailable for c in cells}
        if len(reasons) == 1 and None not in reasons:
            lines.append(head + f"unavailable: {cells[0].unavailable}")
        else:
            lines.append(head + "".join("  " + f"{_cell_text(c):>{width - 2}}" for c in cells))
        notes += [f"  * {row.label}: {n}" for n in row.notes]
    for col in table.columns:
        tps = table.extra.get(col, {}).get("tokens_per_second")
        if tps:
            lines.append(f"tokens/s ({col}): " + ", ".join(f"{label} {v:,.0f}" for label, v in tps.items()))
        params = table.extra.get(col, {}).get("parameters")
        if params:
            lines.append("parameters: " + ", ".join(f"{label} {n:,}" for label, n in params.items()))
    if table.note:
        lines.append(f"note: {table.note}")
    return "\n".join(lines + notes)


def environment(device: str) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "liger_kernel", "triton"):
        try:
            from importlib.metadata import version

            versions[package] = version(package.replace("_", "-"))
        except Exception:
            versions[package] = None
    info = {
        "device": device,
        "versions": versions,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pebook.book.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: pebook.default_device())")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths of the L tables")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="small shapes and no compilation (for tests)")
    parser.add_argument("--no-compile", action="store_true", help="run the peers eager (no torch.compile)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per cell at most (at least 3)")
    parser.add_argument("--in-process", action="store_true", help="no worker processes (CPU memory then n/a)")
    parser.add_argument("--json", metavar="FILE", help="also write the results, device and versions as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one workload in this fresh process; its table goes to stdout as one JSON line
        job = json.loads(args.worker)
        table = run_workload(job.pop("name"), **job, log=lambda s: print(s, file=sys.stderr, flush=True))
        print(json.dumps(table.to_dict()))
        return 0

    from ..utils import default_device

    device = args.device or str(default_device())
    if args.lengths is None:
        args.lengths = list(QUICK_LENGTHS if args.quick else CUDA_LENGTHS if device.startswith("cuda") else CPU_LENGTHS)
    compile_peers = not (args.quick or args.no_compile)
    env = environment(device)
    print(
        f"pebook.book.bench on {device} (torch {env['versions']['torch']}, transformers "
        f"{env['versions']['transformers']}, {env['torch_threads']} threads): lengths {args.lengths}, "
        f"peers {'compiled' if compile_peers else 'eager'}; ratios of times measured side by side",
        flush=True,
    )
    start = time.perf_counter()
    tables = run_benchmark(
        args.workloads,
        args.lengths,
        device=device,
        quick=args.quick,
        compile_peers=compile_peers,
        repeats=args.repeats,
        workers=False if args.in_process else None,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    total = time.perf_counter() - start
    for table in tables:
        print()
        print(format_table(table))
    print(f"\ntotal {total:.0f} s")
    if args.json:
        result = dict(
            environment=env,
            lengths=args.lengths,
            quick=args.quick,
            compile_peers=compile_peers,
            total_seconds=total,
            tables=[t.to_dict() for t in tables],
        )
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
