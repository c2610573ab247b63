"""Rotary position embedding (RoPE).

Su, Lu, Pan, Murtadha, Wen & Liu (2021), "RoFormer: Enhanced Transformer with Rotary Position
Embedding", arXiv:2104.09864, §3.2-3.4. Split a query or key ``x`` at position ``m`` into
``d/2`` feature pairs, read pair ``i`` as the complex number ``x^(i)``, and multiply it by
``e^{i m θ_i}`` with ``θ_i = base^(-2i/d)`` (eqs. 12-16). Then

    ⟨f(q, m), f(k, n)⟩ = Re Σ_i q^(i) conj(k^(i)) e^{i (m - n) θ_i}

depends on the positions only through ``m - n``.

Which features form a pair is a convention, and both are in use:

* ``"interleaved"`` pairs ``(2i, 2i+1)``: the paper, GPT-J, Meta's Llama reference code
  (:func:`apply_rope_complex`), ``rotary-embedding-torch``.
* ``"half"`` pairs ``(i, i + d/2)``: GPT-NeoX and Llama in ``transformers`` (``rotate_half``:
  ``cat(-x2, x1)``).

They are the same function up to a fixed permutation of features
(:func:`rope_layout_permutation`); a checkpoint trained with one gives wrong results with the
other. Angles ``m·θ`` are always formed in float32 or float64, never in the input dtype:
bfloat16 rounds positions between 4096 and 8192 to multiples of 32, an angle error of up to
16 radians at ``θ_0 = 1``.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch

from ._checks import (
    check_even,
    check_float_dtype,
    check_float_tensor,
    check_int,
    check_positive_float,
    check_same_placement,
)
from .encoding import PositionalEncoding
from .rope_native import eager_half_passes, rope_half_native

__all__ = [
    "DEFAULT_ROPE_BASE",
    "rope_frequencies",
    "rope_angles",
    "apply_rope",
    "apply_rope_complex",
    "apply_rope_compiled",
    "rope_cos_sin",
    "rope_freqs_cis",
    "rope_table_cache_info",
    "clear_rope_table_cache",
    "RopeTableCacheInfo",
    "rope_layout_permutation",
    "rope_decay_bound",
    "ROPE_LAYOUTS",
    "RoPE",
]

DEFAULT_ROPE_BASE = 10000.0
ROPE_LAYOUTS = ("half", "interleaved")


def rope_frequencies(
    dim: int, base: float = DEFAULT_ROPE_BASE, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """``inv_freq``: the ``dim/2`` rotation frequencies ``θ_i = base^(-2i/dim)`` (RoFormer eq. 15).

    Computed in float64 and rounded once to ``dtype`` (float32 or float64).
    """
    dim = check_even("dim", dim)
    base = check_positive_float("base", base, greater_than=1.0)
    check_float_dtype("dtype", dtype, allowed=(torch.float32, torch.float64))
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    return (base ** (-exponents)).to(dtype)


def _check_rope_inputs(x, positions, inv_freq, rotary_dim=None) -> int:
    """Validate the arguments of :func:`apply_rope` / :func:`apply_rope_complex`; return ``rotary_dim``."""
    check_float_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., seq, head_dim), got shape {tuple(x.shape)}")
    check_float_tensor("inv_freq", inv_freq, ndim=1)
    check_float_dtype("inv_freq.dtype", inv_freq.dtype, allowed=(torch.float32, torch.float64))
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of positions, got {type(positions).__name__}")
    if positions.dtype == torch.bool or positions.dtype.is_complex:
        raise TypeError(f"positions must be an integer or floating tensor, got dtype {positions.dtype}")
    check_same_placement(x=x, positions=positions, inv_freq=inv_freq)
    seq, dim = x.shape[-2], x.shape[-1]
    if positions.dim() == 1:
        if positions.numel() != seq:
            raise ValueError(f"positions has {positions.numel()} entries but x has seq={seq} rows (x.shape[-2])")
    elif positions.dim() == 2:
        if x.dim() != 4 or positions.shape != (x.shape[0], seq):
            raise ValueError(
                f"2-D positions (position_ids) must have shape (batch, seq) = ({x.shape[0]}, {seq}) for x of shape "
                f"(batch, heads, seq, head_dim), got positions {tuple(positions.shape)} and x {tuple(x.shape)}"
            )
    else:
        raise ValueError(f"positions must be (seq,) or (batch, seq), got shape {tuple(positions.shape)}")
    if rotary_dim is None and dim % 2:  # name what the caller gave: x, not a rotary_dim they did not pass
        raise ValueError(f"x must have an even head_dim (x.shape[-1]; features rotate in pairs), got {dim}")
    rotary_dim = dim if rotary_dim is None else check_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2 or rotary_dim > dim:
        raise ValueError(f"rotary_dim must be even and at most head_dim={dim}, got {rotary_dim}")
    if inv_freq.numel() * 2 != rotary_dim:
        raise ValueError(
            f"the rotated features (rotary_dim={rotary_dim}; head_dim={dim}) must equal 2 * len(inv_freq) = "
            f"{2 * inv_freq.numel()}"
        )
    return rotary_dim


def _angles(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``m·θ`` for (seq,) positions → (seq, d/2), or (batch, seq) → (batch, 1, seq, d/2) for head-major x."""
    angles = positions.to(dtype)[..., None] * inv_freq.to(dtype)
    return angles[:, None] if positions.dim() == 2 else angles


# ------------------------------------------------------------------ table cache
#
# The tables (cos, sin; cat(cos, cos); freqs_cis) depend only on (inv_freq, positions, device,
# dtype). A model's layers rotate q and k at the same positions with equal frequencies, so each
# table is computed once and reused by every layer and call (a small process-level LRU).
# Keys never go stale: on the CPU they hold the values of positions and inv_freq (a few KiB,
# compared in microseconds); elsewhere, where reading values would wait for the device, they hold
# the tensors' identity and ``_version`` (bumped by every in-place change), validated through weak
# references. A RoPE module keys its own long-lived ``inv_freq`` buffer by value on any device
# (read once per buffer and version), so the modules of a model's layers share their tables.
# Tables are built exactly as the uncached code built them, so results are bit for bit the same.

_CACHE_MAX_ENTRIES = 8
_CACHE_MAX_BYTES = 256 * 2**20
_FREQ_MEMO_SIZE = 64


class RopeTableCacheInfo(NamedTuple):
    """Counters of :func:`rope_table_cache_info`: ``builds`` counts tables computed (misses)."""

    hits: int
    builds: int
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int


class _Entry(NamedTuple):
    tables: tuple
    guards: tuple  # (weakref, _version) of identity-keyed inputs and of the tables themselves
    nbytes: int

    def valid(self) -> bool:
        return all(ref() is not None and ref()._version == version for ref, version in self.guards)


class _TableCache:
    def __init__(self):
        self.entries: OrderedDict = OrderedDict()
        self.hits = self.builds = self.nbytes = 0

    def lookup(self, key, input_guards, build):
        entry = self.entries.get(key)
        if entry is not None:
            if entry.valid():
                self.entries.move_to_end(key)
                self.hits += 1
                return entry.tables
            self._drop(key)
        self.builds += 1
        tables = build()
        nbytes = sum(t.numel() * t.element_size() for t in tables)
        if nbytes <= _CACHE_MAX_BYTES:
            # inference tensors (made under torch.inference_mode) have no version counter
            guards = input_guards + tuple((weakref.ref(t), t._version) for t in tables if not t.is_inference())
            self.entries[key] = _Entry(tables, guards, nbytes)
            self.nbytes += nbytes
            while len(self.entries) > _CACHE_MAX_ENTRIES or self.nbytes > _CACHE_MAX_BYTES:
                self._drop(next(iter(self.entries)))
        return tables

    def _drop(self, key):
        self.nbytes -= self.entries.pop(key).nbytes

    def clear(self):
        self.entries.clear()
        self.hits = self.builds = self.nbytes = 0


_CACHE = _TableCache()
# per kind of table, the last lookup: (weak references to positions and inv_freq, dtype, inference
# mode, their versions, the tables' versions, tables)
_LAST_HIT: dict = {}
_FREQ_MEMO: OrderedDict = OrderedDict()  # id(inv_freq) -> (weakref, _version, value key)


def rope_table_cache_info() -> RopeTableCacheInfo:
    """Hits, builds, entries and bytes of the process-level RoPE table cache."""
    return RopeTableCacheInfo(
        _CACHE.hits, _CACHE.builds, len(_CACHE.entries), _CACHE.nbytes, _CACHE_MAX_ENTRIES, _CACHE_MAX_BYTES
    )


def clear_rope_table_cache() -> None:
    """Empty the RoPE table cache (and the decoding steps' tables) and reset its counters."""
    _CACHE.clear()
    _FREQ_MEMO.clear()
    _STEP_TABLES.clear()
    _LAST_HIT.clear()


def _value_key(t: torch.Tensor) -> tuple:
    """The values of ``t`` as a hashable key (reads the device; cheap for positions and frequencies)."""
    t = t.detach()
    if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 0:  # (batch, seq) ids expanded from one row
        return (t.dtype, tuple(t.shape), "rows", _value_key(t[0])[2])
    flat = t.reshape(-1).contiguous().cpu()
    return (t.dtype, tuple(t.shape), flat.view(torch.uint8).numpy().tobytes())


def _frequency_value_key(inv_freq: torch.Tensor) -> tuple:
    """:func:`_value_key` of a long-lived ``inv_freq`` buffer, read once per tensor and ``_version``."""
    if inv_freq.is_inference():
        return _value_key(inv_freq)
    memo = _FREQ_MEMO.get(id(inv_freq))
    if memo is not None and memo[0]() is inv_freq and memo[1] == inv_freq._version:
        return memo[2]
    key = _value_key(inv_freq)
    _FREQ_MEMO[id(inv_freq)] = (weakref.ref(inv_freq), inv_freq._version, key)
    _FREQ_MEMO.move_to_end(id(inv_freq))
    while len(_FREQ_MEMO) > _FREQ_MEMO_SIZE:
        _FREQ_MEMO.popitem(last=False)
    return key


def _input_key(t: torch.Tensor, guards: list, by_value: bool) -> tuple | None:
    """A key for ``t``: its values on the CPU, its identity elsewhere (``None``: not cacheable)."""
    if by_value:
        return _value_key(t)
    if t.is_inference():  # no version counter: an in-place change could not be seen
        return None
    guards.append((weakref.ref(t), t._version))
    return (t.dtype, tuple(t.shape), "id", id(t))


def _tables(kind: str, positions, inv_freq, dtype, build, module_frequencies: bool = False) -> tuple:
    """Cached ``build()`` for (``kind``, positions, inv_freq, device, dtype); computed directly when
    tracing (``torch.compile``) or when positions or frequencies need gradients."""
    if torch.compiler.is_compiling() or positions.requires_grad or inv_freq.requires_grad:
        return build()
    inference = torch.is_inference_mode_enabled()
    last = _LAST_HIT.get(kind)
    if (  # the same tensors as the previous call, unchanged: the common case, in a few attribute reads
        last is not None
        and last[0]() is positions
        and last[1]() is inv_freq
        and last[2] == dtype
        and last[3] == inference
        and last[4] == (positions._version, inv_freq._version)
        and all(t._version == version for t, version in last[5])
    ):
        _CACHE.hits += 1
        return last[6]
    guards: list = []
    freq_key = _frequency_value_key(inv_freq) if module_frequencies else _input_key(inv_freq, guards, False)
    positions_key = _input_key(positions, guards, False)
    if freq_key is None or positions_key is None:
        return build()
    # tables made under inference_mode cannot be saved for backward: a separate entry
    key = (kind, positions.device, dtype, inference, freq_key, positions_key)
    tables = _CACHE.lookup(key, tuple(guards), build)
    if not any(t.is_inference() for t in (positions, inv_freq, *tables)):  # (no version counters)
        versions = (positions._version, inv_freq._version)
        inputs = (weakref.ref(positions), weakref.ref(inv_freq))
        _LAST_HIT[kind] = (*inputs, dtype, inference, versions, [(t, t._version) for t in tables], tables)
    return tables


def _table_dtype(x_dtype: torch.dtype, inv_freq: torch.Tensor) -> torch.dtype:
    """Angles in float64 if ``x`` or ``inv_freq`` is float64, else float32 (never bf16/fp16)."""
    return torch.float64 if torch.float64 in (x_dtype, inv_freq.dtype) else torch.float32


def _cos_sin(positions, inv_freq, dtype, module_frequencies=False) -> tuple[torch.Tensor, torch.Tensor]:
    def build():
        angles = _angles(positions, inv_freq, dtype)
        return angles.cos(), angles.sin()

    return _tables("cos_sin", positions, inv_freq, dtype, build, module_frequencies)


def _half_tables(positions, inv_freq, dtype, module_frequencies=False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cat(cos, cos), sin)``: what the half layout reads (``transformers``' ``cos``), one lookup."""

    def build():
        cos, sin = _cos_sin(positions, inv_freq, dtype, module_frequencies)
        return torch.cat((cos, cos), dim=-1), sin

    return _tables("half", positions, inv_freq, dtype, build, module_frequencies)


def _freqs_cis(positions, inv_freq, dtype, module_frequencies=False) -> torch.Tensor:
    def build():
        ones = torch.ones((), dtype=dtype, device=positions.device)
        return (torch.polar(ones, _angles(positions, inv_freq, dtype)),)

    return _tables("freqs_cis", positions, inv_freq, dtype, build, module_frequencies)[0]


# ------------------------------------------------------------------ decoding steps
#
# A decoding step rotates one new position in every layer, and the cache above, keyed by the
# positions tensor (new at each step), builds a one-row table at each step. For a RoPE module on
# the CPU, one integer position shared by the batch is instead a row of a single table of
# positions 0 … n-1 per frequencies and dtype, grown by doubling (up to _STEP_TABLE_MAX_BYTES).
# When such a table is built, some of its rows are compared with the one-row tables the cache
# would build: cos and sin of a longer tensor could round otherwise (they do not with PyTorch's
# CPU kernels, whose vectorised tails round as the body does); where one differs, the process
# keeps building one-row tables.

_STEP_TABLE_MAX_BYTES = 16 * 2**20  # cos and sin together, per frequencies and dtype
_STEP_TABLE_MIN_POSITIONS = 64
_STEP_TABLE_ENTRIES = 4
_STEP_TABLES: OrderedDict = OrderedDict()  # (device, dtype, inference mode, frequencies) -> (cos, sin)
_STEP_TABLES_INEXACT: set = set()  # dtypes whose long tables differed from one-row tables


def _one_row_tables(position: int, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple:
    """``(cos, sin)`` of one position, ``(1, r)``, as the table cache builds them for it."""
    angles = _angles(torch.tensor([position], device=inv_freq.device), inv_freq, dtype)
    return angles.cos(), angles.sin()


def _step_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple | None:
    """``(cos, sin)`` rows ``(1, r)`` for positions that are one integer shared by the batch (a
    decoding step of a RoPE module on the CPU), or ``None`` (then the table cache builds them)."""
    if (
        positions.shape[-1] != 1
        or positions.device.type != "cpu"
        or positions.dtype not in (torch.int64, torch.int32)
        or (positions.dim() == 2 and positions.shape[0] > 1 and positions.stride(0) != 0)
        or dtype in _STEP_TABLES_INEXACT
        or torch.compiler.is_compiling()
    ):
        return None
    position = int(positions[(0,) * positions.dim()])
    key = (positions.device, dtype, torch.is_inference_mode_enabled(), _frequency_value_key(inv_freq))
    tables = _STEP_TABLES.get(key)
    if tables is None or tables[0].shape[0] <= position:
        row_bytes = 2 * inv_freq.numel() * dtype.itemsize
        size = max(_STEP_TABLE_MIN_POSITIONS, 1 << position.bit_length())
        if position < 0 or size * row_bytes > _STEP_TABLE_MAX_BYTES:
            return None
        angles = _angles(torch.arange(size, device=positions.device), inv_freq, dtype)
        tables = (angles.cos(), angles.sin())
        for row in {0, 1, position, size // 2 + 1, size - 1}:
            one_row = _one_row_tables(row, inv_freq, dtype)
            if not (
                torch.equal(one_row[0], tables[0][row : row + 1]) and torch.equal(one_row[1], tables[1][row : row + 1])
            ):
                _STEP_TABLES_INEXACT.add(dtype)
                return None
        _STEP_TABLES[key] = tables
        while len(_STEP_TABLES) > _STEP_TABLE_ENTRIES:
            _STEP_TABLES.popitem(last=False)
    _STEP_TABLES.move_to_end(key)
    return tables[0][position : position + 1], tables[1][position : position + 1]


def _check_table_args(positions, inv_freq, dtype) -> None:
    check_float_tensor("inv_freq", inv_freq, ndim=1)
    check_float_dtype("inv_freq.dtype", inv_freq.dtype, allowed=(torch.float32, torch.float64))
    check_float_dtype("dtype", dtype, allowed=(torch.float32, torch.float64))
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of positions, got {type(positions).__name__}")
    if positions.dtype == torch.bool or positions.dtype.is_complex:
        raise TypeError(f"positions must be an integer or floating tensor, got dtype {positions.dtype}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must be (seq,) or (batch, seq), got shape {tuple(positions.shape)}")
    check_same_placement(positions=positions, inv_freq=inv_freq)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos(m·θ_i)`` and ``sin(m·θ_i)`` (RoFormer eq. 34), cached per positions, frequencies, device, dtype.

    Shapes ``(seq, d/2)`` for ``(seq,)`` positions, ``(batch, 1, seq, d/2)`` for ``(batch, seq)``
    ones. ``dtype`` is float32 or float64. The tensors are shared with later callers: do not
    change them in place (if you do, the cache notices and rebuilds them).
    """
    _check_table_args(positions, inv_freq, dtype)
    return _cos_sin(positions, inv_freq, dtype)


def rope_freqs_cis(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``e^{i m θ_i}`` (RoFormer eq. 12; Meta's ``freqs_cis``), complex, cached as :func:`rope_cos_sin`."""
    _check_table_args(positions, inv_freq, dtype)
    return _freqs_cis(positions, inv_freq, dtype)


# ------------------------------------------------------------------ rotations


def _rotate(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: str,
    rotary_dim: int,
    module_frequencies: bool = False,
):
    """:func:`apply_rope` without argument checks, as first written (pebook.xpos and pebook.rope_nd
    call it; xPos runs in committed experiments): the tables come from the cache, the arithmetic
    is unchanged, so the result is bit for bit the uncached one in both layouts."""
    dtype = _table_dtype(x.dtype, inv_freq)
    cos, sin = _cos_sin(positions, inv_freq, dtype, module_frequencies)
    rot, rest = (x, None) if rotary_dim == x.shape[-1] else (x[..., :rotary_dim], x[..., rotary_dim:])
    xf = rot.to(dtype)
    if layout == "half":
        x1, x2 = xf.chunk(2, dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    # (x1 + i x2)(cos + i sin) = (x1 cos - x2 sin) + i (x2 cos + x1 sin)
    first, second = torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin)
    if layout == "half":
        rotated = torch.cat((first, second), dim=-1)
    else:
        rotated = torch.stack((first, second), dim=-1).flatten(-2)
    rotated = rotated.to(x.dtype)
    return rotated if rest is None else torch.cat((rotated, rest), dim=-1)


# On the CPU the half layout's three passes run over blocks of positions this size (x and output),
# so that the second and third passes find the block still in a core's L2 cache
_HALF_BLOCK_BYTES = 2**20


def _half_block_rows(x: torch.Tensor) -> int:
    """Positions per block of ``x`` (``(..., seq, d)``): all of them off the CPU, else as many as
    fit in ``_HALF_BLOCK_BYTES`` (at least one)."""
    nbytes = x.numel() * x.element_size()
    if nbytes <= _HALF_BLOCK_BYTES or x.device.type != "cpu":
        return max(x.shape[-2], 1)
    return max(1, _HALF_BLOCK_BYTES * x.shape[-2] // nbytes)


def _rotate_half_inplace(x, positions, inv_freq, rotary_dim, module_frequencies):
    """Half layout without autograd: ``out = x·cat(cos, cos)`` (one contiguous product), then
    ``out1 -= x2·sin`` and ``out2 += x1·sin`` in place with the same ``addcmul`` as :func:`_rotate`,
    into a contiguous output like the one ``cat`` gave: the same operations on the same values,
    bit for bit :func:`_rotate`, in three passes instead of eight and no ``cat`` copies. On the CPU
    the passes go block by block over positions (:data:`_HALF_BLOCK_BYTES`), which changes only
    the order in which elements are visited, not what is computed for each; and where the native
    kernel is available (:mod:`pebook.rope_native`: compiled at first use, checked against these
    passes in each process) they are one pass that rounds exactly as they do."""
    dtype = _table_dtype(x.dtype, inv_freq)
    common = rotary_dim == x.shape[-1] and x.dtype == dtype
    if common and x.device.type == "cpu":  # one native pass, bit for bit the passes below
        tables = _step_tables(positions, inv_freq, dtype) if module_frequencies else None
        out = rope_half_native(x, *(tables or _cos_sin(positions, inv_freq, dtype, module_frequencies)))
        if out is not None:
            return out
    cos_full, sin = _half_tables(positions, inv_freq, dtype, module_frequencies)
    if common:  # in as few calls as possible
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous
        rows, length = _half_block_rows(x), x.shape[-2]
        if rows >= length:  # one block (decoding, small inputs, GPUs): no slicing at all
            eager_half_passes(x, cos_full, sin, out)
            return out
        for start in range(0, length, rows):
            # tables are (seq, r) or (batch, 1, seq, r): positions on dim -2, as in x
            block = (Ellipsis, slice(start, start + rows), slice(None))
            eager_half_passes(x[block], cos_full[block], sin[block], out[block])
        return out
    half = rotary_dim // 2
    partial = rotary_dim != x.shape[-1]
    rot = x[..., :rotary_dim] if partial else x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    work = out[..., :rotary_dim] if x.dtype == dtype else torch.empty(rot.shape, dtype=dtype, device=x.device)
    xf = rot.to(dtype)
    torch.mul(xf, cos_full, out=work)
    work[..., :half].addcmul_(xf[..., half:], sin, value=-1)
    work[..., half:].addcmul_(xf[..., :half], sin)
    if x.dtype != dtype:
        out[..., :rotary_dim].copy_(work)
    if partial:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    return out


def _rotate_interleaved_complex(x, positions, inv_freq, rotary_dim, module_frequencies):
    """Interleaved layout as Meta's ``apply_rotary_emb``: pairs viewed as complex numbers times the
    cached ``freqs_cis`` (one pass). Equal to :func:`_rotate`'s real arithmetic to about 1 ulp."""
    dtype = _table_dtype(x.dtype, inv_freq)
    freqs_cis = _freqs_cis(positions, inv_freq, dtype, module_frequencies)
    rot = x[..., :rotary_dim] if rotary_dim != x.shape[-1] else x
    xf = rot if rot.dtype == dtype else rot.to(dtype)  # (no call at all in the common case)
    try:
        pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
    except RuntimeError:  # strides or offset not even: view_as_complex needs a copy
        pairs = torch.view_as_complex(xf.contiguous().unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * freqs_cis).flatten(-2)
    if rotated.dtype != x.dtype:
        rotated = rotated.to(x.dtype)
    return rotated if rot is x else torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def _rotate_fast(x, positions, inv_freq, layout: str, rotary_dim: int, module_frequencies: bool = False):
    """What :func:`apply_rope` and :class:`RoPE` run. Half layout: bit for bit :func:`_rotate`
    (without autograd in :func:`_rotate_half_inplace`, with it in :func:`_rotate` itself, whose
    backward is then unchanged too). Interleaved layout: the complex product, about 1 ulp away."""
    if layout == "interleaved":
        return _rotate_interleaved_complex(x, positions, inv_freq, rotary_dim, module_frequencies)
    if torch.is_grad_enabled() and x.requires_grad:
        return _rotate(x, positions, inv_freq, layout, rotary_dim, module_frequencies)
    return _rotate_half_inplace(x, positions, inv_freq, rotary_dim, module_frequencies)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(len(positions), len(inv_freq))`` angles ``m · θ_i`` in ``dtype`` (float32 or float64)."""
    check_float_dtype("dtype", dtype, allowed=(torch.float32, torch.float64))
    return positions.to(dtype)[:, None] * inv_freq.to(dtype)[None, :]


def apply_rope_complex(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``(..., seq, head_dim)``) by complex multiplication, RoFormer eq. (12).

    Consecutive features ``(2i, 2i+1)`` are read as ``x_{2i} + i·x_{2i+1}`` and multiplied by
    ``e^{i · positions · θ_i}``, as in Meta's Llama reference (``apply_rotary_emb``). Returns a
    tensor of ``x``'s shape, dtype and device.
    """
    _check_rope_inputs(x, positions, inv_freq)
    if x.shape[-1] != 2 * inv_freq.numel():
        raise ValueError(f"apply_rope_complex rotates every feature: head_dim={x.shape[-1]} must be 2 * len(inv_freq)")
    dtype = _table_dtype(x.dtype, inv_freq)
    rotation = _freqs_cis(positions, inv_freq, dtype)
    pairs = torch.view_as_complex(x.to(dtype).contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: str = "half",
    rotary_dim: int | None = None,
) -> torch.Tensor:
    """Rotate ``x`` (``(..., seq, head_dim)``) in real arithmetic, RoFormer eq. (34).

    ``layout="half"`` rotates pairs ``(i, i + r/2)`` (GPT-NeoX / ``transformers`` Llama:
    ``x·cos + cat(-x2, x1)·sin``); ``layout="interleaved"`` rotates pairs ``(2i, 2i+1)``
    (GPT-J, equal to :func:`apply_rope_complex`). ``positions`` is ``(seq,)`` (row ``r`` of ``x``
    at ``positions[r]``) or ``(batch, seq)`` position ids for ``x`` of shape
    ``(batch, heads, seq, head_dim)``. ``rotary_dim`` (default ``head_dim``) rotates only the
    first ``rotary_dim`` features and passes the rest through, as GPT-NeoX's ``rotary_pct`` and
    GPT-J's ``rotary_dim`` do; ``inv_freq`` then has ``rotary_dim/2`` entries. Returns a tensor
    of ``x``'s shape, dtype and device; angles are formed in float32 (float64 if either input is).

    The cos/sin tables are cached (:func:`rope_cos_sin`). The half layout is bit for bit the
    original real arithmetic ``x1·cos - x2·sin``, ``x2·cos + x1·sin`` (computed into one
    contiguous output when no gradient is needed: in one native pass on the CPU where
    :mod:`pebook.rope_native` is available, else in three in-place passes). The interleaved layout is computed as the
    complex product of :func:`apply_rope_complex` (Meta's form; one pass), which can differ from
    the real arithmetic by about 1 ulp of the output: no committed experiment uses it
    (``pebook.xpos`` keeps the real arithmetic).
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    rotary_dim = _check_rope_inputs(x, positions, inv_freq, rotary_dim)
    return _rotate_fast(x, positions, inv_freq, layout, rotary_dim)


def _rotate_from_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half_layout: bool) -> torch.Tensor:
    """The rotation as one expression, for ``torch.compile`` to fuse into a single kernel."""
    rotary_dim = 2 * cos.shape[-1]
    xf = x[..., :rotary_dim].to(cos.dtype)
    x1, x2 = (xf[..., : rotary_dim // 2], xf[..., rotary_dim // 2 :]) if half_layout else (xf[..., 0::2], xf[..., 1::2])
    first, second = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.cat((first, second), -1) if half_layout else torch.stack((first, second), -1).flatten(-2)
    rotated = rotated.to(x.dtype)
    return rotated if rotary_dim == x.shape[-1] else torch.cat((rotated, x[..., rotary_dim:]), -1)


_COMPILED: dict = {}


def apply_rope_compiled(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: str = "half",
    rotary_dim: int | None = None,
) -> torch.Tensor:
    """:func:`apply_rope` with the rotation compiled by ``torch.compile`` into one fused kernel.

    Opt-in, for accelerators (Triton on CUDA): the tables come from the same cache and stay in
    float32 (float64) whatever ``x``'s dtype, only the elementwise rotation is compiled, reading
    ``x`` once and writing the output once, as Liger's Triton RoPE does. Not bit for bit
    :func:`apply_rope` (the compiler may fuse multiply-adds): equal to within a few ulp. The first
    call per layout compiles (seconds); new shapes may recompile once, then run dynamic.
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    rotary_dim = _check_rope_inputs(x, positions, inv_freq, rotary_dim)
    cos, sin = _cos_sin(positions, inv_freq, _table_dtype(x.dtype, inv_freq))
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_rotate_from_tables)
    return _COMPILED["fn"](x, cos, sin, layout == "half")


def rope_layout_permutation(dim: int, *, device=None) -> torch.Tensor:
    """Feature order ``perm`` that turns the half-split layout into the interleaved one.

    ``apply_rope(x, p, f, "half") == apply_rope(x[..., perm], p, f, "interleaved")[..., inv]``.

    ``perm = [0, d/2, 1, d/2 + 1, …]`` puts half-split pair ``(i, i + d/2)`` at interleaved slots
    ``(2i, 2i+1)``; ``inv = argsort(perm)`` undoes it.
    """
    dim = check_even("dim", dim)
    half = torch.arange(dim // 2, device=device)
    return torch.stack((half, half + dim // 2), dim=-1).flatten()


def rope_decay_bound(distances: torch.Tensor, dim: int, base: float = DEFAULT_ROPE_BASE) -> torch.Tensor:
    """RoFormer's "relative upper bound" ``(1/(d/2)) Σ_{j=1}^{d/2} |S_j|`` at each relative distance.

    Su et al. (2021), arXiv:2104.09864, §3.4.3, eqs. (35)-(37) and Fig. 2. With
    ``h_i = q^(i) conj(k^(i))`` (pair ``i`` of ``q`` and ``k`` read as complex numbers),
    ``r = m - n`` and the partial sums ``S_j = Σ_{k=0}^{j-1} e^{i r θ_k}``, Abel summation gives

        |Σ_i h_i e^{i r θ_i}| ≤ (max_i |h_{i+1} - h_i|) · Σ_{j=1}^{d/2} |S_j|      (h_{d/2} = 0),

    so the RoPE score ``Re Σ_i h_i e^{i r θ_i}`` is bounded by a content factor times
    ``Σ_j |S_j|``. This function returns ``Σ_j |S_j| / (d/2)``, the curve of the paper's Fig. 2,
    for ``θ_i = base^(-2i/d)``. It bounds the worst case over ``q, k`` (up to the content factor);
    it is not the score of any particular ``q, k``. At ``r = 0`` it equals ``(d/2 + 1) / 2``.

    ``distances``: a tensor of relative distances ``m - n`` (integer or floating, any shape).
    Returns a float64 tensor of the same shape and device.
    """
    if not isinstance(distances, torch.Tensor):
        raise TypeError(f"distances must be a torch.Tensor of relative distances, got {type(distances).__name__}")
    if distances.dtype == torch.bool or distances.dtype.is_complex:
        raise TypeError(f"distances must be an integer or floating tensor, got dtype {distances.dtype}")
    inv_freq = rope_frequencies(dim, base, dtype=torch.float64, device=distances.device)
    angles = distances.to(torch.float64)[..., None] * inv_freq  # (..., d/2): r θ_k
    partial_sums = torch.polar(torch.ones_like(angles), angles).cumsum(-1)  # S_1 … S_{d/2}
    return partial_sums.abs().mean(-1)


class RoPE(PositionalEncoding):
    """Registry entry ``"rope"``: queries and keys rotated at their positions before attention.

    Options ``rope_base`` (10000), ``rope_layout`` (``"half"`` or ``"interleaved"``) and
    ``rotary_dim`` (``None``: the whole head). ``inv_freq`` is a buffer that stays in float32
    under ``.half()`` / ``.bfloat16()``; :meth:`set_frequencies` installs a context-extension rule.

    A KV cache holds keys after :meth:`rotate` by default, so frequencies changed between decoding
    steps (``transformers``' dynamic RoPE, ``_compute_dynamic_ntk_parameters``) leave the cached
    keys at their old rotation. ``TinyLM(..., cache_rotated_keys=False)`` caches them before
    rotation and calls :meth:`rotate` on all of them at each step, with the current frequencies
    (``O(cached tokens · head_dim)`` per layer per step); keys cached before rotation are also what
    StreamingLLM's position shifting needs (Xiao et al. 2023, arXiv:2309.17453).
    """

    name = "rope"
    place = "qk"
    full_precision_buffers = ("inv_freq",)

    def __init__(
        self,
        *,
        head_dim: int,
        rope_base: float = DEFAULT_ROPE_BASE,
        rope_layout: str = "half",
        rotary_dim: int | None = None,
    ):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        if rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}")
        if rotary_dim is None and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim (features rotate in pairs), got head_dim={self.head_dim}")
        rotary_dim = self.head_dim if rotary_dim is None else check_int("rotary_dim", rotary_dim, minimum=2)
        if rotary_dim % 2 or rotary_dim > self.head_dim:
            raise ValueError(f"rope needs an even rotary_dim <= head_dim={self.head_dim}, got rotary_dim={rotary_dim}")
        self.rope_layout = rope_layout
        self.rotary_dim = rotary_dim
        self.attention_factor = 1.0
        rope_base = check_positive_float("rope_base", rope_base, greater_than=1.0)  # named as the option
        self.register_buffer("inv_freq", rope_frequencies(rotary_dim, rope_base), persistent=False)

    def declared_parameters(self):
        return {"inv_freq": ((self.rotary_dim // 2,), False)}

    def set_frequencies(self, inv_freq: torch.Tensor, attention_factor: float = 1.0) -> None:
        """Replace the frequencies (e.g. by a :mod:`pebook.rope_scaling` rule) and the attention factor.

        ``attention_factor`` multiplies the rotated queries and keys, so the logits are scaled by
        its square (YaRN's temperature ``1/t = factor²``; 1.0 leaves attention unchanged).
        """
        check_float_tensor("inv_freq", inv_freq, ndim=1)
        check_float_dtype("inv_freq.dtype", inv_freq.dtype, allowed=(torch.float32, torch.float64))
        if inv_freq.numel() != self.rotary_dim // 2:
            raise ValueError(
                f"inv_freq must have rotary_dim/2 = {self.rotary_dim // 2} entries, got {inv_freq.numel()}"
            )
        self.attention_factor = check_positive_float("attention_factor", attention_factor)
        self.inv_freq = inv_freq.detach().to(self.inv_freq.device, self.inv_freq.dtype)

    def rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        rotated = _rotate_fast(x, position_ids, self.inv_freq, self.rope_layout, self.rotary_dim, True)
        return rotated if self.attention_factor == 1.0 else rotated * self.attention_factor

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, layout={self.rope_layout!r}"
