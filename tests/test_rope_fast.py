"""pebook.rope fast paths (issue 13): cached RoPE tables, the in-place half layout, the complex
interleaved layout, and the opt-in compiled rotation.

References: ``legacy_rotate`` below is a verbatim copy of ``pebook.rope._rotate`` before the
tables were cached (RoFormer arXiv:2104.09864 eq. 34 in real arithmetic, angles recomputed on
every call): the half layout, the default of every model, must equal it bit for bit. ``ref.rope``
(conftest) is the float64 rotation matrix R^d_{Θ,m} of RoFormer eq. (15).
"""

import pickle
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook
import pebook.rope as rope_module
from pebook.rope import (
    RoPE,
    apply_rope,
    apply_rope_compiled,
    apply_rope_complex,
    clear_rope_table_cache,
    rope_cos_sin,
    rope_freqs_cis,
    rope_frequencies,
    rope_table_cache_info,
)

F64 = torch.float64


def legacy_rotate(x, positions, inv_freq, layout, rotary_dim):
    """pebook.rope._rotate as it was before issue 13 (angles, cos and sin on every call)."""
    dtype = torch.float64 if torch.float64 in (x.dtype, inv_freq.dtype) else torch.float32
    angles = positions.to(dtype)[..., None] * inv_freq.to(dtype)
    angles = angles[:, None] if positions.dim() == 2 else angles
    cos, sin = angles.cos(), angles.sin()
    rot, rest = (x, None) if rotary_dim == x.shape[-1] else (x[..., :rotary_dim], x[..., rotary_dim:])
    xf = rot.to(dtype)
    if layout == "half":
        x1, x2 = xf.chunk(2, dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    first, second = torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin)
    if layout == "half":
        rotated = torch.cat((first, second), dim=-1)
    else:
        rotated = torch.stack((first, second), dim=-1).flatten(-2)
    rotated = rotated.to(x.dtype)
    return rotated if rest is None else torch.cat((rotated, rest), dim=-1)


@pytest.fixture(autouse=True)
def empty_cache():
    clear_rope_table_cache()
    yield
    clear_rope_table_cache()


def split_heads(batch, seq, heads, head_dim, device, dtype, seed):
    """q as MultiHeadAttention makes it: a strided (batch, heads, seq, head_dim) view of a qkv output."""
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, generator=torch.Generator().manual_seed(seed))
    qkv = qkv.to(device=device, dtype=dtype)
    return qkv.view(batch, seq, -1, head_dim).transpose(1, 2).split((heads, heads, heads), dim=1)[0]


def assert_identical(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    # the same memory layout (strides of size-1 dimensions address nothing and may differ)
    assert [st for n, st in zip(got.shape, got.stride()) if n > 1] == [
        st for n, st in zip(expected.shape, expected.stride()) if n > 1
    ]
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- (1) bit for bit / references


@given(
    seq=st.integers(1, 37),
    heads=st.integers(1, 5),
    head_dim=st.sampled_from([2, 4, 6, 8, 16, 24, 64]),
    partial=st.booleans(),
    batched_ids=st.booleans(),
    dtype=st.sampled_from([torch.float32, F64, torch.bfloat16, torch.float16]),
    start=st.integers(0, 10_000),
    seed=st.integers(0, 2**16),
)
def test_half_layout_is_bit_for_bit_the_legacy_code(
    device, seq, heads, head_dim, partial, batched_ids, dtype, start, seed
):
    """apply_rope, RoPE.rotate (twice: cold and warm cache) and _rotate equal the old code exactly,
    values and strides, for strided head views, partial rotary, position ids and every dtype."""
    rotary_dim = max(2, head_dim // 2 // 2 * 2) if partial else head_dim
    x = split_heads(2, seq, heads, head_dim, device, dtype, seed)
    ids = torch.arange(start, start + seq, device=device)
    ids = torch.stack((ids, ids.flip(0) * 3)) if batched_ids else ids
    module = RoPE(head_dim=head_dim, rotary_dim=rotary_dim).to(device)
    expected = legacy_rotate(x, ids, module.inv_freq, "half", rotary_dim)
    with torch.no_grad():
        for _ in range(2):
            assert_identical(module.rotate(x, ids), expected)
            assert_identical(apply_rope(x, ids, module.inv_freq, rotary_dim=rotary_dim), expected)
    assert_identical(rope_module._rotate(x, ids, module.inv_freq, "half", rotary_dim), expected)
    assert_identical(
        rope_module._rotate(x, ids, module.inv_freq, "interleaved", rotary_dim),
        legacy_rotate(x, ids, module.inv_freq, "interleaved", rotary_dim),
    )  # xpos, rope_nd


@given(
    seq=st.integers(1, 40),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([2, 8, 64]),
    batched_ids=st.booleans(),
    dtype=st.sampled_from([torch.float32, F64]),
    block_bytes=st.integers(1, 4096),
    seed=st.integers(0, 2**16),
)
def test_half_layout_in_blocks_of_positions_is_bit_for_bit(
    device, seq, heads, head_dim, batched_ids, dtype, block_bytes, seed
):
    """The CPU's blocked passes (forced small here: from one position per block to all of them,
    with a ragged last block) give exactly the unblocked result, strided inputs and position ids."""
    x = split_heads(2, seq, heads, head_dim, device, dtype, seed)
    ids = torch.arange(3, 3 + seq, device=device)
    ids = torch.stack((ids, ids.flip(0) * 5)) if batched_ids else ids
    inv_freq = rope_frequencies(head_dim, device=device)
    expected = legacy_rotate(x, ids, inv_freq, "half", head_dim)
    saved = rope_module._HALF_BLOCK_BYTES
    rope_module._HALF_BLOCK_BYTES = block_bytes
    try:
        with torch.no_grad():
            got = apply_rope(x, ids, inv_freq)
    finally:
        rope_module._HALF_BLOCK_BYTES = saved
    assert_identical(got, expected)


def test_half_layout_blocks_are_a_megabyte_of_positions_on_the_cpu_only():
    x = torch.zeros(2, 8, 4096, 64)  # 4 KiB per position
    assert rope_module._half_block_rows(x) == 256
    assert rope_module._half_block_rows(torch.zeros(3, 2**19)) == 1  # a position above the block
    assert rope_module._half_block_rows(torch.zeros(1, 8, 100, 64)) >= 100  # one block
    if torch.cuda.is_available():
        assert rope_module._half_block_rows(x.cuda()) == 4096


def test_training_graph_is_unchanged(device):
    """With autograd the half layout runs the old graph: outputs and gradients bit for bit."""
    x = split_heads(2, 9, 3, 16, device, torch.float32, 1).detach().requires_grad_()
    x_old = x.detach().clone().requires_grad_()
    ids = torch.arange(9, device=device).expand(2, 9)
    module = RoPE(head_dim=16).to(device)
    grad = torch.randn(2, 3, 9, 16, generator=torch.Generator().manual_seed(2)).to(device)
    out, old = module.rotate(x, ids), legacy_rotate(x_old, ids, module.inv_freq, "half", 16)
    assert torch.equal(out, old)
    out.backward(grad)
    old.backward(grad)
    assert torch.equal(x.grad, x_old.grad)


@pytest.mark.parametrize("shape", [(7, 8), (2, 3, 5, 16), (1, 2)])
def test_interleaved_matches_the_rotation_matrix(device, ref, rand, shape):
    x = rand(*shape, seed=3, device=device)
    positions = torch.tensor([0, 1, 2, 5, 17, 100, 4096][: shape[-2]], device=device)
    theta = ref.frequencies(shape[-1])
    with torch.no_grad():
        out = apply_rope(x, positions, theta.to(device), "interleaved")
    torch.testing.assert_close(out, ref.rope(x, positions.tolist(), theta, "interleaved"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_interleaved_is_the_complex_form_within_an_ulp(device, dtype, rotary_dim):
    x = split_heads(2, 50, 3, 16, device, dtype, 4)
    ids = torch.arange(1000, 1050, device=device)
    inv_freq = rope_frequencies(rotary_dim or 16, dtype=dtype, device=device)
    got = apply_rope(x, ids, inv_freq, "interleaved", rotary_dim)
    r = rotary_dim or 16
    atol = 2e-6 if dtype == torch.float32 else 1e-14  # |x| <= ~5: a few ulp
    torch.testing.assert_close(got[..., :r], apply_rope_complex(x[..., :r], ids, inv_freq), rtol=0, atol=atol)
    torch.testing.assert_close(got, legacy_rotate(x, ids, inv_freq, "interleaved", r), rtol=0, atol=atol)
    assert torch.equal(got[..., r:], x[..., r:])


def test_apply_rope_complex_is_unchanged(device):
    """Meta's form with the cached freqs_cis: bit for bit the uncached polar(1, m θ) product."""
    x = split_heads(1, 20, 2, 8, device, torch.float32, 5)
    ids = torch.arange(3, 23, device=device)
    inv_freq = rope_frequencies(8, device=device)
    rotation = torch.polar(torch.ones((), device=device), ids.float()[:, None] * inv_freq)
    pairs = torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2)))
    expected = torch.view_as_real(pairs * rotation).flatten(-2)
    for _ in range(2):
        assert torch.equal(apply_rope_complex(x, ids, inv_freq), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_low_precision_input_keeps_float32_angles(device, ref, dtype, layout):
    """bf16/fp16 x: angles and tables in float32 (positions near 5000 would be off by up to 16 rad
    in bfloat16); only the output is rounded to x's dtype."""
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    ids = torch.arange(5000, 5006, device=device)
    inv_freq = rope_frequencies(16, device=device)
    with torch.no_grad():
        out = apply_rope(x, ids, inv_freq, layout)
    assert out.dtype == dtype
    expected = ref.rope(x.double(), ids.tolist(), ref.frequencies(16), layout).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=2 * torch.finfo(dtype).eps * 8)
    cos, sin = rope_cos_sin(ids, inv_freq)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (6, 8)


# ---------------------------------------------------------------- (2) the cache


def count_angles(monkeypatch):
    calls = []
    original = rope_module._angles
    monkeypatch.setattr(rope_module, "_angles", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_tables_are_computed_once_for_all_layers_and_calls(device, monkeypatch, layout):
    calls = count_angles(monkeypatch)
    model = pebook.TinyLM(
        vocab_size=11, dim=32, n_layers=3, n_heads=2, max_positions=64, encoding="rope", rope_layout=layout
    ).to(device)
    tokens = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        first = model(tokens)
        assert len(calls) == 1  # freqs_cis; or cos, sin (and cat(cos, cos) from them)
        if device.type == "cpu":  # keys by value: a new forward's new positions tensor hits too
            assert torch.equal(model(tokens), first)
            assert len(calls) == 1
    info = rope_table_cache_info()
    assert info.hits >= 5 and info.entries == info.builds


def test_invalidation(device, monkeypatch):
    calls = count_angles(monkeypatch)
    rope = RoPE(head_dim=8).to(device)
    x = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(8)).to(device)
    ids = torch.arange(6, device=device)

    def rotated_with_new_tables(fn, *args):
        before = len(calls)
        out = fn(*args)
        return out, len(calls) > before

    with torch.no_grad():
        base, built = rotated_with_new_tables(rope.rotate, x, ids)
        assert built
        assert not rotated_with_new_tables(rope.rotate, x, ids)[1]
        # set_frequencies (context extension, dynamic NTK during generation)
        rope.set_frequencies(rope.inv_freq / 4)
        out, built = rotated_with_new_tables(rope.rotate, x, ids)
        assert built and torch.equal(out, legacy_rotate(x, ids, rope.inv_freq, "half", 8))
        # in-place change of inv_freq
        rope.inv_freq.mul_(2)
        out, built = rotated_with_new_tables(rope.rotate, x, ids)
        assert built and torch.equal(out, legacy_rotate(x, ids, rope.inv_freq, "half", 8))
        # in-place change of the positions tensor
        ids.add_(5)
        out, built = rotated_with_new_tables(rope.rotate, x, ids)
        assert built and torch.equal(out, legacy_rotate(x, ids, rope.inv_freq, "half", 8))
        # other positions, length, dtype
        for x2, ids2 in ((x, torch.arange(1, 7, device=device)), (x[..., :4, :], ids[:4]), (x.double(), ids)):
            out, built = rotated_with_new_tables(rope.rotate, x2, ids2)
            assert built and torch.equal(out, legacy_rotate(x2, ids2, rope.inv_freq, "half", 8))
        # a table changed in place by a caller is rebuilt, not reused
        cos, _ = rope_cos_sin(ids, rope.inv_freq)
        cos.zero_()
        assert rope_cos_sin(ids, rope.inv_freq)[0].abs().sum() > 0


def test_other_device_is_another_entry(cuda_device):
    ids, inv_freq = torch.arange(5), rope_frequencies(8)
    cpu_cos = rope_cos_sin(ids, inv_freq)[0]
    cuda_cos = rope_cos_sin(ids.to(cuda_device), inv_freq.to(cuda_device))[0]
    assert cuda_cos.device.type == "cuda" and rope_table_cache_info().entries == 2
    torch.testing.assert_close(cuda_cos.cpu(), cpu_cos, rtol=0, atol=1e-6)


def test_inference_mode_tables_are_not_reused_with_autograd(device):
    rope = RoPE(head_dim=8).to(device)
    ids = torch.arange(4, device=device)
    with torch.inference_mode():
        rope.rotate(torch.randn(1, 4, 8, device=device), ids)
    x = torch.randn(1, 4, 8, device=device, requires_grad=True)
    rope.rotate(x, ids).sum().backward()  # an inference-mode table here would raise
    assert x.grad is not None


def test_cache_is_bounded(device):
    inv_freq = rope_frequencies(8, device=device)
    for n in range(1, 40):
        rope_cos_sin(torch.arange(n, device=device), inv_freq)
    info = rope_table_cache_info()
    assert info.entries == info.max_entries and info.builds == 39
    assert info.bytes == sum(e.nbytes for e in rope_module._CACHE.entries.values())
    clear_rope_table_cache()
    assert rope_table_cache_info()[:4] == (0, 0, 0, 0)


def test_cache_holds_no_input_alive(device):
    ids = torch.arange(6, device=device) + 1
    rope_cos_sin(ids, rope_frequencies(8, device=device))
    ref_ids = weakref.ref(ids)
    del ids
    assert ref_ids() is None


def test_module_still_pickles_and_copies(device):
    rope = RoPE(head_dim=8).to(device)
    ids = torch.arange(3, device=device)
    x = torch.randn(3, 8, device=device)
    with torch.no_grad():
        out = rope.rotate(x, ids)
        assert torch.equal(pickle.loads(pickle.dumps(rope)).rotate(x, ids), out)


# ---------------------------------------------------------------- (3) properties


@given(
    dim=st.sampled_from([2, 4, 8, 16, 32]),
    layout=st.sampled_from(["half", "interleaved"]),
    seed=st.integers(0, 2**31),
    m=st.integers(0, 10_000),
    n=st.integers(0, 10_000),
    s=st.integers(0, 10_000),
)
def test_norm_and_relative_position_invariance(device, dim, layout, seed, m, n, s):
    """RoFormer eqs. (14)-(16): pair norms are kept, q·k depends on m - n only (warm cache included)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(dim, generator=gen, dtype=F64).to(device) for _ in range(2))
    inv_freq = rope_frequencies(dim, dtype=F64, device=device)
    with torch.no_grad():
        at = lambda v, p: apply_rope(v[None], torch.tensor([p], device=device), inv_freq, layout)[0]  # noqa: E731
        rq, rk = at(q, m), at(k, n)
        scale = (q.norm() * k.norm()).item()
        assert abs((rq @ rk).item() - (at(q, m + s) @ at(k, n + s)).item()) <= 1e-10 * scale
        assert abs(rq.norm().item() - q.norm().item()) <= 1e-12 * q.norm().item()


# ---------------------------------------------------------------- (4) snapshot


def test_snapshot():
    """Frozen values (float32, head_dim 4, positions 0 and 7): guards the layouts and the tables."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    ids = torch.tensor([0, 7])
    inv_freq = rope_frequencies(4)
    with torch.no_grad():
        half = apply_rope(x, ids, inv_freq, "half")
        inter = apply_rope(x, ids, inv_freq, "interleaved")
    torch.testing.assert_close(half[1], torch.tensor([-1.21706, 1.71533, 2.91869, 4.13009]), rtol=0, atol=1e-4)
    torch.testing.assert_close(inter[1], torch.tensor([-0.56007, 2.16479, 2.71288, 4.20003]), rtol=0, atol=1e-4)
    assert torch.equal(half[0], x[0]) and torch.equal(inter[0], x[0])
    cos, sin = rope_cos_sin(ids, inv_freq)
    torch.testing.assert_close(cos[1], torch.tensor([0.7539, 0.9976]), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.view_as_real(rope_freqs_cis(ids, inv_freq))[1, :, 1], sin[1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- (5) compiled path


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_compiled_rotation(device, ref, layout):
    x = split_heads(1, 12, 2, 16, device, torch.float32, 9)
    ids = torch.arange(12, device=device)
    inv_freq = rope_frequencies(16, device=device)
    with torch.no_grad():
        got = apply_rope_compiled(x, ids, inv_freq, layout)
        expected = legacy_rotate(x, ids, inv_freq, layout, 16)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
        half = apply_rope_compiled(x.bfloat16(), ids, inv_freq, layout)  # float32 tables, bf16 output
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), expected, rtol=0, atol=0.05)
    with pytest.raises(ValueError, match="layout must be one of"):
        apply_rope_compiled(x, ids, inv_freq, "spiral")


# ---------------------------------------------------------------- (6) errors


def test_clear_errors(device):
    ids, inv_freq = torch.arange(4, device=device), rope_frequencies(8, device=device)
    with pytest.raises(TypeError, match="positions must be a torch.Tensor"):
        rope_cos_sin([0, 1], inv_freq)
    with pytest.raises(TypeError, match="positions must be an integer or floating tensor, got dtype torch.bool"):
        rope_freqs_cis(ids > 1, inv_freq)
    with pytest.raises(ValueError, match=r"positions must be \(seq,\) or \(batch, seq\), got shape \(1, 1, 4\)"):
        rope_cos_sin(ids[None, None], inv_freq)
    with pytest.raises(TypeError, match="dtype must be one of torch.float32, torch.float64, got torch.bfloat16"):
        rope_cos_sin(ids, inv_freq, torch.bfloat16)
    with pytest.raises(ValueError, match=r"inv_freq must have 1 dimensions, got shape \(1, 4\)"):
        rope_cos_sin(ids, inv_freq[None])
    with pytest.raises(ValueError, match="rotary_dim must be even and at most head_dim=8, got 12"):
        apply_rope_compiled(torch.zeros(4, 8, device=device), ids, inv_freq, rotary_dim=12)


# ---------------------------------------------------------------- decoding steps' tables


@given(
    position=st.integers(0, 5000),
    head_dim=st.sampled_from([2, 6, 16, 18, 64, 128]),
    dtype=st.sampled_from([torch.float32, F64]),
    batch=st.integers(1, 3),
    inference=st.booleans(),
)
def test_a_decoding_step_reads_its_tables_from_one_long_table_bit_for_bit(position, head_dim, dtype, batch, inference):
    """One position shared by the batch: RoPE.rotate takes rows of a long table, which equal the
    one-row tables the cache builds, so the rotation is bit for bit apply_rope's."""
    clear_rope_table_cache()
    module = RoPE(head_dim=head_dim).to(dtype)
    x = split_heads(batch, 1, 3, head_dim, "cpu", dtype, position)
    ids = torch.tensor([[position]]).expand(batch, 1)
    with torch.inference_mode(inference), torch.no_grad():
        rows = rope_module._step_tables(ids, module.inv_freq, dtype)
        got = module.rotate(x, ids)
        expected = legacy_rotate(x, ids, module.inv_freq, "half", head_dim)
    assert rows is not None and rows[0].shape == (1, head_dim // 2)
    one_row = rope_module._one_row_tables(position, module.inv_freq, dtype)
    assert torch.equal(rows[0], one_row[0]) and torch.equal(rows[1], one_row[1])
    assert_identical(got, expected)
    table = next(iter(rope_module._STEP_TABLES.values()))[0]
    assert table.shape[0] > position and table.shape[0] & (table.shape[0] - 1) == 0  # grown by doubling


@pytest.mark.parametrize(
    "ids",
    [
        torch.tensor([[3], [4]]),  # rows at different positions
        torch.tensor([[3.0]]),  # not integers
        torch.tensor([[3, 4]]),  # two positions: the table cache serves prefills
        torch.tensor([[-1]]),
        torch.tensor([[2**20]]),  # beyond _STEP_TABLE_MAX_BYTES
    ],
)
def test_step_tables_only_serve_one_integer_position_shared_by_the_batch(ids):
    assert rope_module._step_tables(ids, rope_frequencies(64), torch.float32) is None


def test_step_tables_stay_few_and_are_cleared_with_the_cache():
    clear_rope_table_cache()
    for base in range(10):
        inv_freq = rope_frequencies(16, 1000.0 + base)
        assert rope_module._step_tables(torch.tensor([[5]]), inv_freq, torch.float32) is not None
    assert len(rope_module._STEP_TABLES) == rope_module._STEP_TABLE_ENTRIES
    clear_rope_table_cache()
    assert not rope_module._STEP_TABLES


def test_a_long_table_that_rounds_otherwise_is_never_used(monkeypatch):
    """Where a long table's row differs from the one-row table (cos/sin of longer tensors rounding
    otherwise), the process keeps the one-row tables for that dtype."""
    clear_rope_table_cache()
    real = rope_module._one_row_tables

    def off_by_one_ulp(position, inv_freq, dtype):
        cos, sin = real(position, inv_freq, dtype)
        return torch.nextafter(cos, torch.full_like(cos, 2.0)), sin

    monkeypatch.setattr(rope_module, "_one_row_tables", off_by_one_ulp)
    monkeypatch.setattr(rope_module, "_STEP_TABLES_INEXACT", set())
    module = RoPE(head_dim=16)
    ids = torch.tensor([[7]])
    assert rope_module._step_tables(ids, module.inv_freq, torch.float32) is None
    assert rope_module._STEP_TABLES_INEXACT == {torch.float32}
    x = split_heads(1, 1, 2, 16, "cpu", torch.float32, 0)
    with torch.no_grad():
        assert_identical(module.rotate(x, ids), legacy_rotate(x, ids, module.inv_freq, "half", 16))
