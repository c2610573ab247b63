"""RoPE's half layout in one native pass on the CPU, bit for bit what eager PyTorch computes.

Su et al. (2021), "RoFormer", arXiv:2104.09864, eq. (34), with the features paired ``(j, j + d/2)``
(GPT-NeoX, ``transformers``' Llama): ``out1 = x1 cos - x2 sin``, ``out2 = x2 cos + x1 sin``. No
single eager PyTorch op pairs ``j`` with ``j + d/2``, so eager needs three passes
(:func:`_eager_half`: ``x·cat(cos, cos)`` and one ``addcmul_`` per half). ``rope_native.c`` does it
in one, rounding as those passes round on the CPU: ``fma(∓x2, sin, x1·cos)`` on the rounded
product ``x1·cos``, built with ``-ffp-contract=off`` so that nothing else is fused.

The C source is compiled at first use with the system compiler (``cc`` or ``gcc``) into a
per-user cache directory (``$PEBOOK_CACHE_DIR``, else ``$XDG_CACHE_HOME/pebook``, else
``~/.cache/pebook``), named by a hash of the source, the flags, the compiler's version, the
machine and the CPU, written to a temporary file and renamed into place (concurrent processes
never load a half-written file), and loaded with :mod:`ctypes`. Once per process and dtype a
probe compares the kernel with :func:`_eager_half` on a few shapes; where they differ (ATen
built without fused multiply-adds) the kernel is not used for that dtype. Nothing is printed:
:func:`native_status` says what happened. ``PEBOOK_NATIVE=0`` turns the kernel off.

Inputs of :data:`_PARALLEL_MIN_BYTES` or more are split by rows over ``torch.get_num_threads()``
threads. Where torch runs on a GNU OpenMP runtime named ``libgomp.so.1`` (Linux wheels), the
library is built with ``-fopenmp`` and binds to that same runtime (same soname), so the rows run
on torch's own thread team, which is spinning for work right after any torch op. Elsewhere the
kernel runs in the calling thread: threads of our own would compete with torch's spinning ones
(a thread pool measured slower than one thread on 2 cores).

:func:`rope_half_native` is a private helper behind :func:`pebook.rope.apply_rope` (which checks
the arguments): it returns ``None`` for anything it does not handle, and the caller runs eager.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["NativeStatus", "native_status", "rope_half_native"]

SOURCE = Path(__file__).with_name("rope_native.c")
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
LIBS = ("-lm",)
#: inputs of at least this many bytes are split over ``torch.get_num_threads()`` threads
_PARALLEL_MIN_BYTES = 256 * 2**10
#: split on torch's own OpenMP threads where the library shares torch's libgomp (else one thread)
_USE_OPENMP = True
_COMPILE_TIMEOUT_S = 120
_KEY_MARKER = "pebook-rope-native:"
_SYMBOLS = {
    torch.float32: ("pebook_rope_half_f32", "pebook_rope_half_f32_threads"),
    torch.float64: ("pebook_rope_half_f64", "pebook_rope_half_f64_threads"),
}
_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 11
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_OFF_VALUES = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class NativeStatus:
    """Where the native kernel stands in this process.

    ``available``: the library is loaded and at least one dtype passed its probe. ``reason``: why
    not, or which dtype failed its probe ("" when all is well). ``library``: the shared library's
    path. ``compiled``: this process compiled it (``False``: it came from the cache). ``openmp``:
    large inputs run on torch's own OpenMP threads (``False``: in one thread). ``probes``:
    dtype name → whether the kernel equals eager bit for bit (absent: not probed).
    """

    available: bool
    reason: str
    library: str | None = None
    compiled: bool = False
    openmp: bool = False
    probes: dict = dataclasses.field(default_factory=dict)


class _State:
    """The process-level loader state (replaced whole by :func:`_reset`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.loaded = False  # the load was attempted
        self.library = None  # ctypes.CDLL
        self.path: str | None = None
        self.compiled = False
        self.openmp = False
        self.reason = ""
        self.probes: dict[str, bool] = {}
        self.probe_reasons: dict[str, str] = {}


_STATE = _State()
#: dtype → (kernel, OpenMP kernel or None) that passed the probe, or None; absent: not yet tried
_KERNELS: dict = {}


def _reset() -> None:
    """Forget the loaded library and the probes (tests; a changed environment)."""
    global _STATE
    _STATE = _State()
    _KERNELS.clear()


# ------------------------------------------------------------------ building and loading


def _cache_dir() -> Path:
    if os.environ.get("PEBOOK_CACHE_DIR"):
        return Path(os.environ["PEBOOK_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "pebook"
    return Path.home() / ".cache" / "pebook"


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    lines = done.stdout.strip().splitlines()
    return lines[0] if lines else ""


def _cpu_identity() -> str:
    """What ``-march=native`` targets: a cache shared between machines must not mix their builds."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor is enough
                name = line.split(":", 1)[0].strip()
                if name in ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part"):
                    parts.append(line.strip())
    except OSError:
        pass
    return "\n".join(parts)


def _gomp_libraries() -> set[str]:
    """The GNU OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return set()
    return {path for path in paths if os.path.basename(path).startswith("libgomp")}


def _shares_torch_openmp() -> bool:
    """torch runs on a libgomp named ``libgomp.so.1``: a library built with ``-fopenmp`` then binds
    to that same runtime (same soname) and its parallel loops run on torch's thread team."""
    loaded = _gomp_libraries()
    return bool(loaded) and all(os.path.basename(path) == "libgomp.so.1" for path in loaded)


def _build_key(compiler: str, flags: tuple) -> str:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags + LIBS).encode(), _compiler_version(compiler).encode()):
        digest.update(part + b"\0")
    digest.update(platform.machine().encode() + b"\0" + _cpu_identity().encode())
    return digest.hexdigest()[:24]


def _library_path(key: str) -> Path:
    return _cache_dir() / f"rope_native-{key}.so"


def _holds_key(path: Path, key: str) -> bool:
    """The file is a build with this key (a stale, foreign or truncated file is not)."""
    try:
        return (_KEY_MARKER + key).encode() in path.read_bytes()
    except OSError:
        return False


def _compile(compiler: str, flags: tuple, key: str, path: Path) -> None:
    """Compile into a temporary file next to ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        command = [compiler, *flags, f'-DPEBOOK_ROPE_KEY="{_KEY_MARKER}{key}"', "-o", tmp, str(SOURCE), *LIBS]
        done = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path):
    library = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
    for kernel, threads in _SYMBOLS.values():
        getattr(library, kernel).argtypes = _ARGTYPES
        getattr(library, threads).argtypes = _ARGTYPES + [ctypes.c_int64]
        getattr(library, kernel).restype = getattr(library, threads).restype = None
    library.pebook_rope_native_openmp.restype = ctypes.c_int
    return library


def _find_or_build(compiler: str, flags: tuple) -> tuple:
    """(library, path, compiled): the cached build of these flags if it is sound, else a new one."""
    key = _build_key(compiler, flags)
    path = _library_path(key)
    if _holds_key(path, key):
        try:
            return _open(path), path, False
        except (OSError, AttributeError):  # corrupted: build it again
            pass
    _compile(compiler, flags, key, path)
    return _open(path), path, True


def _load(state: _State) -> None:
    """Find or build the library and open it; on failure leave ``state.reason``."""
    state.loaded = True
    if os.environ.get("PEBOOK_NATIVE", "").strip().lower() in _OFF_VALUES:
        state.reason = "disabled by PEBOOK_NATIVE=0"
        return
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        state.reason = f"not built on {sys.platform} (Linux and macOS only)"
        return
    compiler = _compiler()
    if compiler is None:
        state.reason = "no C compiler (cc or gcc) on PATH"
        return
    variants = [CFLAGS + ("-fopenmp",), CFLAGS] if _shares_torch_openmp() else [CFLAGS]
    runtimes = _gomp_libraries()
    for flags in variants:
        try:
            library, path, compiled = _find_or_build(compiler, flags)
        except Exception as error:  # whatever goes wrong here, apply_rope runs eager instead
            state.reason = f"could not build or load the kernel: {type(error).__name__}: {error}"
            continue
        state.library, state.path, state.compiled, state.reason = library, str(path), compiled, ""
        # OpenMP only on torch's own runtime: a second libgomp would compete with torch's threads
        state.openmp = bool(library.pebook_rope_native_openmp()) and _gomp_libraries() == runtimes
        return


# ------------------------------------------------------------------ the probe


def eager_half_passes(x: torch.Tensor, cos_full: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """The half layout's three eager passes into ``out`` (what :func:`pebook.apply_rope` runs where
    the kernel does not): ``out = x·cos_full``, then ``out1 -= x2·sin`` and ``out2 += x1·sin``."""
    torch.mul(x, cos_full, out=out)
    out1, out2 = out.chunk(2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    out1.addcmul_(x2, sin, value=-1)
    out2.addcmul_(x1, sin)


def _eager_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The eager passes the kernel must equal, from half-width tables, into a new tensor."""
    out = torch.empty(x.shape, dtype=x.dtype)
    eager_half_passes(x, torch.cat((cos, cos), dim=-1), sin, out)
    return out


# (batch, heads, seq, half, x a strided view of a qkv projection, batched (B, 1, L, half) tables, split)
_PROBE_CASES = (
    (1, 1, 1, 1, False, False, 1),
    (1, 1, 7, 3, True, False, 1),
    (2, 3, 5, 17, True, True, 2),
    (1, 4, 9, 32, True, False, 3),
    (2, 2, 6, 64, False, True, 4),
    (1, 1, 33, 8, False, False, 1),
)


def _probe_inputs(batch, heads, seq, half, strided, batched, dtype, generator):
    d = 2 * half
    if strided:  # q as pebook.MultiHeadAttention splits it from one qkv output
        qkv = torch.randn(batch, seq, 3 * heads * d, generator=generator, dtype=dtype)
        x = qkv.view(batch, seq, 3 * heads, d).transpose(1, 2)[:, heads : 2 * heads]
    else:
        x = torch.randn(batch, heads, seq, d, generator=generator, dtype=dtype)
    table_shape = (batch, 1, seq, half) if batched else (seq, half)
    angles = torch.rand(table_shape, generator=generator, dtype=torch.float64) * 200.0
    return x, angles.cos().to(dtype), angles.sin().to(dtype)


def _probe(kernels, dtype) -> str:
    """ "" if the kernel equals :func:`_eager_half` on every probe case, else where it differs."""
    generator = torch.Generator().manual_seed(13)  # never the global generator
    threads = torch.get_num_threads()  # no more threads than torch's (the split computes the same)
    with torch.no_grad():
        for batch, heads, seq, half, strided, batched, parts in _PROBE_CASES:
            x, cos, sin = _probe_inputs(batch, heads, seq, half, strided, batched, dtype, generator)
            got = _run(kernels, x, cos, sin, min(parts, threads))
            expected = _eager_half(x, cos, sin)
            if got is None or not torch.equal(got, expected):
                return f"differs from eager at x {tuple(x.shape)}, tables {tuple(cos.shape)}"
    return ""


def _kernel(dtype):
    """``(kernel, OpenMP kernel or None)`` for ``dtype`` if its probe passed, else ``None``; loads
    the library and probes once per process and dtype."""
    if dtype not in _SYMBOLS:  # no kernel for it: do not build one
        _KERNELS[dtype] = None
        return None
    state = _STATE
    with state.lock:
        if dtype in _KERNELS:
            return _KERNELS[dtype]
        if not state.loaded:
            _load(state)
        kernels = None
        if state.library is not None:
            kernel, threads = _SYMBOLS[dtype]
            candidate = (getattr(state.library, kernel), getattr(state.library, threads) if state.openmp else None)
            mismatch = _probe(candidate, dtype)
            name = str(dtype).removeprefix("torch.")
            state.probes[name] = not mismatch
            if mismatch:
                state.probe_reasons[name] = f"{name}: the kernel {mismatch} (eager rounds otherwise here): not used"
            else:
                kernels = candidate
        if state is _STATE:
            _KERNELS[dtype] = kernels
        return kernels


def native_status() -> NativeStatus:
    """Load the kernel and probe both dtypes (once per process); report what happened."""
    for dtype in _SYMBOLS:
        _kernel(dtype)
    state = _STATE
    probes = dict(state.probes)
    reason = state.reason or "; ".join(state.probe_reasons.values())
    available = state.library is not None and any(probes.values())
    return NativeStatus(available, reason, state.path, state.compiled, state.openmp, probes)


# ------------------------------------------------------------------ the call


def _run(kernels, x, cos, sin, parts: int | None = None):
    """Rotate ``x`` with ``kernels`` (single-threaded, OpenMP or ``None``) into a new tensor, over
    ``parts`` ranges of rows on OpenMP (default: one, or the torch threads for large inputs; one
    without OpenMP); ``None`` where the shapes or strides are not the kernel's (placement and
    dtypes are checked by the caller)."""
    shape, stride, table_shape = x.shape, x.stride(), cos.shape
    dim = len(shape)
    if dim == 4:
        (n_b, n_h, n_l, d), (xs_b, xs_h, xs_l, xs_d) = shape, stride
    elif dim == 3:
        n_b, xs_b, (n_h, n_l, d), (xs_h, xs_l, xs_d) = 1, 0, shape, stride
    elif dim == 2:
        n_b, n_h, xs_b, xs_h, (n_l, d), (xs_l, xs_d) = 1, 1, 0, 0, shape, stride
    else:
        return None
    half = d // 2
    if xs_d != 1 or half == 0 or d != 2 * half:
        return None
    if len(table_shape) == 2:  # (seq, half)
        if table_shape[0] != n_l or table_shape[1] != half:
            return None
        ts_b = 0
    elif len(table_shape) == 4 and dim == 4:  # (batch, 1, seq, half), batch 1 or x's
        t_b, one, t_l, t_half = table_shape
        if one != 1 or t_l != n_l or t_half != half or (t_b != n_b and t_b != 1):
            return None
        ts_b = 0 if t_b == 1 else n_l * half
    else:
        return None
    out = torch.empty(shape, dtype=x.dtype)
    rows = n_b * n_h * n_l
    if rows == 0:
        return out
    arguments = (x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), half, n_b, n_h, n_l, xs_b, xs_h, xs_l)
    arguments += (ts_b, half)
    if parts is None:
        parts = torch.get_num_threads() if rows * d * x.element_size() >= _PARALLEL_MIN_BYTES else 1
    parts = min(parts, rows)
    kernel, threads = kernels
    if parts > 1 and threads is not None and _USE_OPENMP:
        threads(*arguments, 0, rows, parts)
    else:
        kernel(*arguments, 0, rows)
    return out


def rope_half_native(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """RoPE, half layout, in one native pass: bit for bit :func:`_eager_half`, or ``None``.

    ``x``: ``(..., seq, 2·half)`` with 2 to 4 dimensions (``(seq, d)``, ``(heads, seq, d)`` or
    ``(batch, heads, seq, d)``), float32 or float64, on the CPU, last-dimension stride 1 (any
    other strides: e.g. q split from a fused qkv projection). ``cos``, ``sin``: the half-width
    tables of ``x``'s dtype, contiguous, ``(seq, half)`` or, for 4-D ``x``, ``(batch, 1, seq,
    half)`` (``batch`` may be 1). Returns a new contiguous tensor of ``x``'s shape.

    A private helper behind :func:`pebook.rope.apply_rope`, which validates the arguments: it
    returns ``None`` for anything it does not handle (other dtypes, devices, shapes or strides,
    tensors that need gradients, tensor subclasses, ``torch.compile`` tracing, the kernel
    unavailable: :func:`native_status`), and the caller then runs eager.
    """
    if type(x) not in _PLAIN_TENSORS or torch.compiler.is_compiling():
        return None
    dtype = x.dtype
    kernels = _KERNELS.get(dtype, False)
    if kernels is False:
        kernels = _kernel(dtype)
    if (
        kernels is None
        or type(cos) not in _PLAIN_TENSORS
        or type(sin) not in _PLAIN_TENSORS
        or cos.dtype != dtype
        or sin.dtype != dtype
        or not (x.is_cpu and cos.is_cpu and sin.is_cpu)
        or sin.shape != cos.shape
        or not (cos.is_contiguous() and sin.is_contiguous())
        or x.is_neg()
        or cos.is_neg()
        or sin.is_neg()
        or (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad))
    ):
        return None
    return _run(kernels, x, cos, sin)
