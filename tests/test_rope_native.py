"""pebook.rope_native: RoPE's half layout in one native pass (issue 13, item 3).

References: ``eager_half`` below is the eager computation the kernel must equal bit for bit, a
copy of pebook.rope's three passes (``x·cat(cos, cos)``, then ``addcmul_`` on each half);
``ref.rope(..., "half")`` (conftest) is RoFormer's rotation matrix R^d_{Θ,m} (arXiv:2104.09864,
eq. 15) applied in float64, i.e. eq. (34) with the features paired (i, i + d/2).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook.rope_native as rn
from pebook.rope import apply_rope, clear_rope_table_cache, rope_cos_sin, rope_frequencies
from pebook.rope_native import native_status, rope_half_native

F32, F64 = torch.float32, torch.float64

_STATUS = native_status()
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"native RoPE kernel unavailable here: {_STATUS.reason}")


def eager_half(x, cos, sin):
    """pebook.rope's half-layout passes (``eager_half_passes``) from half-width tables."""
    out = torch.mul(x, torch.cat((cos, cos), dim=-1), out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    out1, out2 = out.chunk(2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    out1.addcmul_(x2, sin, value=-1)
    out2.addcmul_(x1, sin)
    return out


def make_x(batch, heads, seq, half, strided, dtype, seed, dims=4):
    """(batch, heads, seq, 2·half); strided: q split from a fused qkv projection, as
    pebook.MultiHeadAttention makes it. ``dims`` < 4 drops leading size-1 dimensions."""
    gen = torch.Generator().manual_seed(seed)
    d = 2 * half
    if strided:
        qkv = torch.randn(batch, seq, 3 * heads * d, generator=gen, dtype=F64).to(dtype)
        x = qkv.view(batch, seq, 3 * heads, d).transpose(1, 2)[:, :heads]
    else:
        x = torch.randn(batch, heads, seq, d, generator=gen, dtype=F64).to(dtype)
    return x[(0,) * (4 - dims)]


def make_tables(batch, seq, half, batched, dtype, seed):
    """cos, sin of random angles: (seq, half), or (batch, 1, seq, half) when batched."""
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (batch, 1, seq, half) if batched else (seq, half)
    angles = torch.rand(shape, generator=gen, dtype=F64) * 1000.0
    return angles.cos().to(dtype), angles.sin().to(dtype)


def assert_identical(got, expected):
    assert got is not None
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.is_contiguous()
    assert torch.equal(got, expected)


class split_rows:
    """Within the block: every input is split over ``threads`` torch threads on OpenMP (or, with
    ``openmp=False``, runs in one thread), however small; ``threads=None`` leaves the defaults."""

    def __init__(self, threads, openmp=True):
        self.threads, self.openmp = threads, openmp

    def __enter__(self):
        self.saved = (rn._PARALLEL_MIN_BYTES, rn._USE_OPENMP, torch.get_num_threads())
        if self.threads is not None:
            rn._PARALLEL_MIN_BYTES, rn._USE_OPENMP = 0, self.openmp
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc):
        rn._PARALLEL_MIN_BYTES, rn._USE_OPENMP, threads = self.saved
        torch.set_num_threads(threads)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty build cache in ``tmp_path`` and no loaded library; the process state is forgotten
    again afterwards (the next test loads from the default cache)."""
    monkeypatch.setenv("PEBOOK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PEBOOK_NATIVE", raising=False)
    rn._reset()
    yield tmp_path
    rn._reset()


# ---------------------------------------------------------------- (1) bit for bit / references


@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    seq=st.integers(1, 19),
    half=st.sampled_from([1, 2, 3, 4, 7, 8, 16, 17, 32, 64]),
    strided=st.booleans(),
    tables=st.sampled_from(["shared", "batch_of_one", "batched"]),
    dtype=st.sampled_from([F32, F64]),
    split=st.sampled_from([None, (2, True), (3, True), (2, False), (3, False)]),
    seed=st.integers(0, 2**16),
)
def test_bit_for_bit_the_eager_passes(batch, heads, seq, half, strided, tables, dtype, split, seed):
    """Every shape, strided head views, shared or per-batch tables, both dtypes, the rows on one
    thread or split over OpenMP: exactly the eager result."""
    x = make_x(batch, heads, seq, half, strided, dtype, seed)
    cos, sin = make_tables(1 if tables == "batch_of_one" else batch, seq, half, tables != "shared", dtype, seed)
    with split_rows(*(split or (None,))):
        got = rope_half_native(x, cos, sin)
    assert_identical(got, eager_half(x, cos, sin))


@given(
    dims=st.sampled_from([2, 3]),
    heads=st.integers(1, 4),
    seq=st.integers(1, 19),
    half=st.sampled_from([1, 3, 8, 32]),
    dtype=st.sampled_from([F32, F64]),
    seed=st.integers(0, 2**16),
)
def test_bit_for_bit_for_fewer_dimensions(dims, heads, seq, half, dtype, seed):
    """(seq, d) and (heads, seq, d) inputs, contiguous or a strided slice."""
    x = make_x(1, heads, seq, half, False, dtype, seed, dims=dims)
    cos, sin = make_tables(1, seq, half, False, dtype, seed)
    assert_identical(rope_half_native(x, cos, sin), eager_half(x, cos, sin))
    wide = torch.randn(*x.shape[:-1], x.shape[-1] + 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    view = wide[..., 3 : 3 + x.shape[-1]]  # row stride d + 6, storage offset 3
    assert_identical(rope_half_native(view, cos, sin), eager_half(view, cos, sin))


@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 24),
    head_dim=st.sampled_from([2, 8, 64, 128]),
    batched_ids=st.booleans(),
    dtype=st.sampled_from([F32, F64]),
    start=st.integers(0, 10_000),
    seed=st.integers(0, 2**16),
)
def test_bit_for_bit_apply_rope_with_pebooks_tables(batch, seq, head_dim, batched_ids, dtype, start, seed):
    """With the tables pebook caches (rope_cos_sin), the kernel equals apply_rope's default
    half layout, for positions and per-batch position ids."""
    clear_rope_table_cache()
    x = make_x(batch, 3, seq, head_dim // 2, True, dtype, seed)
    ids = torch.arange(start, start + seq)
    ids = torch.stack([ids * (b + 1) for b in range(batch)]) if batched_ids else ids
    inv_freq = rope_frequencies(head_dim, dtype=dtype)
    with torch.no_grad():
        expected = apply_rope(x, ids, inv_freq)
    assert_identical(rope_half_native(x, *rope_cos_sin(ids, inv_freq, dtype)), expected)


def test_large_inputs_split_over_threads_bit_for_bit():
    """Above the size threshold the rows are split over the torch threads (OpenMP, or one thread)."""
    x = make_x(2, 8, 300, 32, True, F32, 7)  # 1.2 MiB
    assert x.numel() * 4 >= rn._PARALLEL_MIN_BYTES
    cos, sin = make_tables(2, 300, 32, True, F32, 7)
    expected = eager_half(x, cos, sin)
    for threads, openmp in [(1, True), (2, True), (4, True), (2, False), (4, False)]:
        saved = torch.get_num_threads(), rn._USE_OPENMP
        torch.set_num_threads(threads)
        rn._USE_OPENMP = openmp
        try:
            assert_identical(rope_half_native(x, cos, sin), expected)
        finally:
            torch.set_num_threads(saved[0])
            rn._USE_OPENMP = saved[1]


def test_small_inputs_run_inline(monkeypatch):
    """A decoding step (one position) never starts OpenMP threads."""
    kernel = rn._kernel(F32)[0]

    def no_threads(*args):
        pytest.fail("small inputs must run inline")

    monkeypatch.setitem(rn._KERNELS, F32, (kernel, no_threads))
    x = make_x(4, 8, 1, 32, True, F32, 3)
    cos, sin = make_tables(4, 1, 32, True, F32, 3)
    with split_rows(None):
        torch.set_num_threads(2)
        assert_identical(rope_half_native(x, cos, sin), eager_half(x, cos, sin))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_matches_the_rotation_matrix(device, ref, dtype):
    """RoFormer eq. (34) (rotation matrix of eq. 15, float64, pairs (i, i + d/2)); off the CPU the
    kernel declines (None) and the caller runs eager."""
    x = make_x(2, 3, 6, 8, True, dtype, 11).to(device)
    positions = torch.tensor([0, 1, 2, 7, 50, 99], device=device)
    cos, sin = rope_cos_sin(positions, rope_frequencies(16, dtype=dtype, device=device), dtype)
    got = rope_half_native(x, cos, sin)
    if device.type != "cpu":
        assert got is None
        return
    expected = ref.rope(x, positions.tolist(), ref.frequencies(16), "half")
    atol = 2e-5 if dtype == F32 else 1e-12  # |x| <= ~5, angles m·θ rounded to float32 for float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=atol)


def test_rotation_preserves_pair_norms_and_inverts():
    """A rotation keeps |x_i|² + |x_{i+d/2}|² and is undone by the rotation with -sin."""
    x = make_x(1, 2, 9, 16, False, F64, 5)
    cos, sin = make_tables(1, 9, 16, False, F64, 5)
    out = rope_half_native(x, cos, sin)
    norms = lambda t: t[..., :16] ** 2 + t[..., 16:] ** 2  # noqa: E731
    torch.testing.assert_close(norms(out), norms(x), rtol=1e-13, atol=0)
    torch.testing.assert_close(rope_half_native(out, cos, -sin), x, rtol=0, atol=1e-13)


def test_snapshot_values():
    """Frozen outputs: x at positions 0, 1, 1000, head_dim 8, base 10000."""
    row = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.25, -1.5, 2.0, 4.0], dtype=F64)
    x = torch.stack((row, 2 * row, -row))
    positions = torch.tensor([0, 1, 1000])
    cos, sin = rope_cos_sin(positions, rope_frequencies(8, dtype=F64), F64)
    expected64 = [
        [1.0, -2.0, 0.5, 3.0, 0.25, -1.5, 2.0, 4.0],
        [0.6598691193323313, -3.680516411171619, 0.9599506670799987, 5.9919970013335835]
        + [1.953093122549863, -3.38434616242139, 4.009799835000828, 8.005995999000334],
        [-0.3556591911577023, 2.4841862062400057, -0.6685064572405133, 1.7449770216271667]
        + [-0.9674743096046783, 0.2807470262120082, 1.9501536135975899, -4.685622177896248],
    ]
    torch.testing.assert_close(rope_half_native(x, cos, sin), torch.tensor(expected64, dtype=F64), rtol=0, atol=1e-15)
    cos32, sin32 = rope_cos_sin(positions, rope_frequencies(8), F32)
    expected32 = [-0.3556591868400574, 2.4841861724853516, -0.6685065031051636, 1.7449767589569092]
    expected32 += [-0.9674743413925171, 0.2807469367980957, 1.9501535892486572, -4.685622215270996]
    assert torch.equal(rope_half_native(x.float(), cos32, sin32)[2], torch.tensor(expected32))


# ---------------------------------------------------------------- (2) what it declines


def _unsupported_cases():
    x = make_x(2, 3, 5, 4, False, F32, 1)
    cos, sin = make_tables(2, 5, 4, False, F32, 1)
    cos_b, sin_b = make_tables(2, 5, 4, True, F32, 1)
    wide = torch.randn(2, 3, 5, 16)
    return {
        "float16": (x.half(), cos.half(), sin.half()),
        "bfloat16": (x.bfloat16(), cos.bfloat16(), sin.bfloat16()),
        "int64": (x.long(), cos.long(), sin.long()),
        "table dtype": (x, cos.double(), sin.double()),
        "last-dim stride 2": (wide[..., ::2], cos, sin),
        "transposed": (x[0, 0, :4, :4].T.contiguous().T, cos[:4, :2], sin[:4, :2]),
        "5-D": (x[None], cos, sin),
        "1-D": (x[0, 0, 0], cos[0], sin[0]),
        "odd head_dim": (wide[..., :7], cos, sin),
        "tables too short": (x, cos[:4], sin[:4]),
        "tables too narrow": (x, cos[:, :3], sin[:, :3]),
        "tables not contiguous": (x, cos.T.contiguous().T, sin),
        "cos and sin shapes differ": (x, cos, sin[None, None].expand(2, 1, 5, 4).contiguous()),
        "batched tables for 3-D x": (x[0], cos_b, sin_b),
        "batched tables of another batch": (x[:1], cos_b, sin_b),
        "3-D tables": (x, cos[None], sin[None]),
        "neg view": (torch._neg_view(x), cos, sin),
        "not a tensor": (x.tolist(), cos, sin),
    }


@pytest.mark.parametrize("case", list(_unsupported_cases()))
def test_unsupported_inputs_return_none(case):
    x, cos, sin = _unsupported_cases()[case]
    assert rope_half_native(x, cos, sin) is None


def test_non_cpu_inputs_return_none(device):
    x = make_x(1, 2, 3, 4, False, F32, 2)
    cos, sin = make_tables(1, 3, 4, False, F32, 2)
    meta = torch.device("meta")
    assert rope_half_native(x.to(meta), cos.to(meta), sin.to(meta)) is None
    assert rope_half_native(x, cos.to(meta), sin.to(meta)) is None
    if device.type != "cpu":
        assert rope_half_native(x.to(device), cos.to(device), sin.to(device)) is None
    else:
        assert_identical(rope_half_native(x, cos, sin), eager_half(x, cos, sin))


def test_gradients_decline_unless_disabled():
    """It computes no graph: with autograd on and an input that needs gradients it declines."""
    x = make_x(1, 2, 3, 4, False, F32, 2).requires_grad_()
    cos, sin = make_tables(1, 3, 4, False, F32, 2)
    assert rope_half_native(x, cos, sin) is None
    assert rope_half_native(x.detach(), cos.requires_grad_(), sin) is None
    with torch.no_grad():
        assert_identical(rope_half_native(x, cos, sin), eager_half(x.detach(), cos.detach(), sin))
    with torch.inference_mode():
        assert_identical(rope_half_native(x, cos, sin), eager_half(x.detach(), cos.detach(), sin))


def test_empty_inputs():
    for shape in [(0, 3, 5, 8), (2, 0, 5, 8), (2, 3, 0, 8)]:
        x = torch.empty(shape)
        cos, sin = torch.empty(shape[2], 4), torch.empty(shape[2], 4)
        assert_identical(rope_half_native(x, cos, sin), eager_half(x, cos, sin))


# ---------------------------------------------------------------- (3) building, caching, probing


def replace_file(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` as a new file (this process has the old one mapped: never write it)."""
    tmp = path.with_suffix(".test")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_compiles_once_into_the_cache(fresh, capfd):
    """The first load compiles into the cache directory (renamed into place: no temporary files
    left), the next loads the same file without compiling; nothing is printed."""
    first = native_status()
    assert first.available and first.compiled and first.reason == ""
    assert first.probes == {"float32": True, "float64": True}
    path = Path(first.library)
    assert path.parent == fresh and path.name.startswith("rope_native-")
    assert [p.name for p in fresh.iterdir()] == [path.name]
    mtime = path.stat().st_mtime_ns
    rn._reset()
    second = native_status()
    assert second.available and not second.compiled and second.library == first.library
    assert path.stat().st_mtime_ns == mtime
    assert capfd.readouterr() == ("", "")


def test_a_corrupted_file_is_rebuilt(fresh):
    path = Path(native_status().library)
    rn._reset()
    replace_file(path, b"\x7fELF not a shared library")
    status = native_status()
    assert status.available and status.compiled and status.library == str(path)
    assert rn._KEY_MARKER.encode() in path.read_bytes()


def test_a_mismatched_build_is_rebuilt(fresh):
    """A valid library under the right name but built from another source or flags (its key
    differs) is replaced, not loaded."""
    path = Path(native_status().library)
    key = path.stem.removeprefix("rope_native-")
    rn._reset()
    stale = path.read_bytes().replace(key.encode(), b"0" * len(key))
    assert stale != path.read_bytes()
    replace_file(path, stale)
    status = native_status()
    assert status.compiled and status.available
    assert key.encode() in path.read_bytes()


def test_the_build_key_follows_source_flags_and_compiler(monkeypatch):
    compiler = rn._compiler()
    key = rn._build_key(compiler, rn.CFLAGS)
    assert key == rn._build_key(compiler, rn.CFLAGS)
    assert key != rn._build_key(compiler, rn.CFLAGS + ("-fopenmp",))
    monkeypatch.setattr(rn, "_compiler_version", lambda compiler: "another compiler 1.0")
    assert key != rn._build_key(compiler, rn.CFLAGS)


def test_pebook_native_0_disables(fresh, monkeypatch):
    monkeypatch.setenv("PEBOOK_NATIVE", "0")
    status = native_status()
    assert not status.available and "PEBOOK_NATIVE" in status.reason and status.library is None
    x = make_x(1, 2, 3, 4, False, F32, 2)
    assert rope_half_native(x, *make_tables(1, 3, 4, False, F32, 2)) is None
    assert list(fresh.iterdir()) == []  # nothing was built


def test_no_compiler_or_a_failing_build_disables(fresh, monkeypatch, capfd):
    monkeypatch.setattr(rn, "_compiler", lambda: None)
    status = native_status()
    assert not status.available and "no C compiler" in status.reason
    rn._reset()
    monkeypatch.undo()
    monkeypatch.setenv("PEBOOK_CACHE_DIR", str(fresh))
    monkeypatch.setattr(rn, "CFLAGS", rn.CFLAGS + ("-fno-such-flag-for-pebook",))
    status = native_status()
    assert not status.available and "could not build" in status.reason
    x = make_x(1, 2, 3, 4, False, F64, 2)
    assert rope_half_native(x, *make_tables(1, 3, 4, False, F64, 2)) is None
    assert list(fresh.iterdir()) == []  # the failed build's temporary file is removed
    assert capfd.readouterr() == ("", "")


def test_the_probe_disables_a_dtype_that_differs_from_eager(fresh, monkeypatch):
    """Where eager rounds differently (here: one float32 element perturbed in the reference) the
    kernel is not used for that dtype; the other dtype is unaffected."""
    exact = rn._eager_half

    def perturbed(x, cos, sin):
        out = exact(x, cos, sin)
        if out.dtype == F32 and out.numel() > 5:
            out.view(-1)[5] = torch.nextafter(out.view(-1)[5], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(rn, "_eager_half", perturbed)
    status = native_status()
    assert status.probes == {"float32": False, "float64": True}
    assert status.available and "float32" in status.reason and "float64" not in status.reason
    x = make_x(1, 2, 3, 4, False, F32, 2)
    cos, sin = make_tables(1, 3, 4, False, F32, 2)
    assert rope_half_native(x, cos, sin) is None
    x, cos, sin = x.double(), cos.double(), sin.double()
    assert_identical(rope_half_native(x, cos, sin), exact(x, cos, sin))


def test_openmp_only_on_torchs_own_runtime():
    """Large inputs run on torch's OpenMP threads only where the library shares torch's libgomp
    (a second OpenMP runtime would compete with torch's threads)."""
    if _STATUS.openmp:
        assert rn._shares_torch_openmp() and len(rn._gomp_libraries()) == 1


def test_concurrent_first_loads_share_one_build(tmp_path):
    """Processes that build at the same time (pytest-xdist workers, notebooks) each load a whole
    file: compiles go to a temporary file that is renamed into place."""
    script = (
        "import pebook.rope_native as rn, torch;"
        "s = rn.native_status(); x = torch.randn(2, 3, 5, 8); c, s_ = torch.rand(5, 4), torch.rand(5, 4);"
        "assert s.available, s; assert torch.equal(rn.rope_half_native(x, c, s_), rn._eager_half(x, c, s_));"
        "print(s.library)"
    )
    env = dict(os.environ, PEBOOK_CACHE_DIR=str(tmp_path))
    env.pop("PEBOOK_NATIVE", None)
    runs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    assert len({out.strip() for out, _ in outputs}) == 1  # one library, whole in every process
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]
