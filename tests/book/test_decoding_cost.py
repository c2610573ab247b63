"""pebook.book.decoding_cost: the bandwidth cost model of decoding (Pope et al. 2022, arXiv:2211.05102).

References: the parameter counts of the three built-in shapes are the published totals of the
Hugging Face checkpoints; every other number is written out here with plain Python arithmetic from
the equations of the module docstring (exact integers, float64 for times). Hypothesis checks the
structure: bytes affine in context and batch, GQA's cache = MHA's · n_kv_heads / n_heads, the bound
= max(memory, compute) and monotone, and critical_batch where the two affine times cross.
"""

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook.book import decoding_cost as dc

GiB = 2**30
BETA, PHI = 3.35e12, 9.9e14  # the H100-like assumptions of the module: bytes/s, bf16 FLOP/s
HW = dict(bandwidth_bytes_per_s=BETA, flops_per_s=PHI)

# The totals of the checkpoints (sum of the tensors' sizes of meta-llama/Llama-2-7b-hf, Llama-2-70b-hf, Meta-Llama-3-8B)
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-2-70b": 68_976_648_192, "llama-3-8b": 8_030_261_248}


def by_hand(layers, d, heads, kv_heads, head_dim, ffn, vocab):
    """(parameters, matmul parameters, cache values per token) of an untied SwiGLU/RMSNorm decoder."""
    attention = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
    mlp = 3 * d * ffn
    params = vocab * d + layers * (attention + mlp + 2 * d) + d + vocab * d
    return params, layers * (attention + mlp) + vocab * d, 2 * layers * kv_heads * head_dim


HAND = {
    "llama-2-7b": by_hand(32, 4096, 32, 32, 128, 11008, 32000),
    "llama-2-70b": by_hand(80, 8192, 64, 8, 128, 28672, 32000),
    "llama-3-8b": by_hand(32, 4096, 32, 8, 128, 14336, 128256),
}


@st.composite
def shapes(draw):
    kv = draw(st.integers(1, 16))
    return dc.DecoderShape(
        "random",
        n_layers=draw(st.integers(1, 128)),
        d_model=draw(st.integers(1, 16384)),
        n_heads=kv * draw(st.integers(1, 8)),
        n_kv_heads=kv,
        head_dim=draw(st.integers(1, 256)),
        ffn_dim=draw(st.integers(1, 65536)),
        vocab_size=draw(st.integers(1, 256000)),
        gated_ffn=draw(st.booleans()),
        tied_embeddings=draw(st.booleans()),
    )


widths = st.sampled_from(dc.BYTES_PER_VALUE)
hardware = st.fixed_dictionaries({"bandwidth_bytes_per_s": st.floats(1e9, 1e13), "flops_per_s": st.floats(1e11, 1e16)})


# ------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_equal_the_published_checkpoints(name):
    s = dc.shape(name)
    assert dc.parameter_count(s) == HAND[name][0] == PUBLISHED[name]
    assert dc.parameter_count(name) == PUBLISHED[name]  # a name works wherever a shape does
    assert dc.matmul_parameter_count(s) == HAND[name][1]
    assert dc.weight_bytes(s) == 2 * PUBLISHED[name]


def test_shapes_table():
    assert list(dc.SHAPES) == ["llama-2-7b", "llama-2-70b", "llama-3-8b"]
    s = dc.shape("llama-2-70b")
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_dim, s.vocab_size) == (
        80,
        8192,
        64,
        8,
        128,
        28672,
        32000,
    )
    assert s.gated_ffn and not s.tied_embeddings


def test_tied_ungated_and_norm_terms():
    """Each term of the count separately, on a small shape: tying drops vocab·d, an ungated FFN a
    third of its matrices, and the norms are 2·d per layer plus d."""
    s = dc.DecoderShape("small", n_layers=3, d_model=10, n_heads=4, n_kv_heads=2, head_dim=5, ffn_dim=7, vocab_size=11)
    attention = 10 * 4 * 5 * 2 + 2 * 10 * 2 * 5  # q and o, then k and v
    assert dc.parameter_count(s) == 11 * 10 + 3 * (attention + 3 * 10 * 7 + 2 * 10) + 10 + 11 * 10 == 2720
    assert dc.parameter_count(replace(s, tied_embeddings=True)) == 2720 - 110
    assert dc.parameter_count(replace(s, gated_ffn=False)) == 2720 - 3 * 70  # one of three matrices, per layer
    # the LM head stays a matmul when it is tied; norms and the lookup are not matmuls
    assert dc.matmul_parameter_count(s) == dc.matmul_parameter_count(replace(s, tied_embeddings=True)) == 3 * 810 + 110


# ------------------------------------------------------------------ bytes, FLOPs, the worked case


def test_kv_cache_bytes_per_token_snapshots():
    assert dc.kv_cache_bytes_per_token("llama-2-7b") == 2 * 32 * 32 * 128 * 2 == 524_288 == 512 * 2**10
    assert dc.kv_cache_bytes_per_token("llama-2-70b") == 2 * 80 * 8 * 128 * 2 == 327_680
    assert dc.kv_cache_bytes_per_token("llama-3-8b") == 2 * 32 * 8 * 128 * 2 == 131_072
    assert dc.kv_cache_bytes_per_token("llama-2-7b", 1) == 262_144
    assert dc.kv_cache_bytes_per_token("llama-2-7b", 0.5) == 131_072
    assert dc.kv_cache_bytes_per_token("llama-2-7b", 4) == 1_048_576
    for name, (_, _, values) in HAND.items():
        assert dc.kv_cache_bytes_per_token(name) == 2 * values


def test_cache_equals_weights_worked_case():
    """The inference chapter: 8 full 4096-token contexts of Llama-2-7B (16 GiB of float16 cache) next
    to its float16 weights. With the exact count the weights are 12.55 GiB, and the cache reaches
    them at 25705.02 cached tokens (6.28 full contexts)."""
    weights = 2 * 6_738_415_616
    assert dc.weight_bytes("llama-2-7b") == weights == 13_476_831_232
    assert weights / GiB == pytest.approx(12.551277160644531, rel=1e-15)
    tokens = dc.cache_equals_weights_tokens("llama-2-7b")
    assert tokens == weights / 524_288 == 25_705.015625
    assert math.ceil(tokens) * 524_288 > weights > math.floor(tokens) * 524_288
    assert 8 * 4096 * 524_288 == 16 * GiB > weights  # the chapter's batch of 8: cache larger than weights
    assert tokens / 4096 == pytest.approx(6.275638580322266, rel=1e-15)
    # the other shapes (float16 weights and cache)
    assert dc.cache_equals_weights_tokens("llama-2-70b") == 2 * 68_976_648_192 / 327_680 == 421_000.05
    assert dc.cache_equals_weights_tokens("llama-3-8b") == 2 * 8_030_261_248 / 131_072 == 122_532.0625
    # 4-bit weights and an 8-bit cache: a quarter and a half, so the crossing comes at half as many tokens
    assert dc.cache_equals_weights_tokens("llama-2-7b", 0.5, 1) == 25_705.015625 / 2


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_decode_step_bytes_and_flops_by_hand(name):
    s = dc.shape(name)
    params, matmul, values = HAND[name]
    read = params - s.vocab_size * s.d_model  # the untied input table is not streamed, only B rows of it
    for context, batch in ((1, 1), (4096, 1), (4096, 8), (100, 3)):
        assert dc.decode_step_bytes(s, context, batch) == 2 * read + batch * context * 2 * values
        attention = 4 * s.n_layers * s.n_heads * s.head_dim * context
        assert dc.decode_step_flops(s, context, batch) == batch * (2 * matmul + attention)
    assert dc.decode_step_bytes(s, 10, 2, 4, 1) == 4 * read + 2 * 10 * values
    tied = replace(s, tied_embeddings=True)  # a tied table is read, as the LM head
    assert dc.decode_step_bytes(tied, 1, 1) == 2 * dc.parameter_count(tied) + 2 * values


def test_decode_time_bound_snapshot_llama_2_7b():
    """Batch 1 at 4096 tokens on the assumed H100: 2·(6738415616 − 32000·4096) + 4096·524288 bytes
    over 3.35e12 B/s is 4.59 ms, the FLOPs take 15.5 µs: memory-bound by ~300×, and the step does
    about one FLOP per byte read."""
    b = dc.decode_time_bound("llama-2-7b", 4096, 1, **HW)
    n_bytes = 2 * (6_738_415_616 - 131_072_000) + 4096 * 524_288
    flops = 2 * 6_607_077_376 + 4 * 32 * 32 * 128 * 4096
    assert (b.bytes, b.flops) == (n_bytes, flops) == (15_362_170_880, 15_361_638_400)
    assert b.memory_s == n_bytes / BETA and b.compute_s == flops / PHI
    assert b.memory_s == pytest.approx(4.585722650746269e-3, rel=1e-14)
    assert b.compute_s == pytest.approx(1.5516806464646466e-5, rel=1e-14)
    assert b.bound_s == b.memory_s and b.bound_by == "memory"
    assert b.arithmetic_intensity == flops / n_bytes == pytest.approx(0.99996533823, rel=1e-10)


def test_decode_time_bound_compute_side():
    """Short context, large batch: the weights are shared by the batch, so compute binds."""
    b = dc.decode_time_bound("llama-2-7b", 1, 4096, **HW)
    assert b.bound_by == "compute" and b.bound_s == b.compute_s > b.memory_s


# ------------------------------------------------------------------ critical batch


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_critical_batch_solves_the_linear_equation(name):
    s = dc.shape(name)
    params, matmul, values = HAND[name]
    weights = 2 * (params - s.vocab_size * s.d_model)
    for context in (1, 16, 64):
        f = 2 * matmul + 4 * s.n_layers * s.n_heads * s.head_dim * context
        expected = (weights / BETA) / (f / PHI - context * 2 * values / BETA)
        got = dc.critical_batch(s, context, **HW)
        assert got == pytest.approx(expected, rel=1e-12)
        assert (weights + got * context * 2 * values) / BETA == pytest.approx(got * f / PHI, rel=1e-12)
        below, above = math.floor(got), math.ceil(got) + (math.ceil(got) == got)
        assert dc.decode_time_bound(s, context, below, **HW).bound_by == "memory"
        assert dc.decode_time_bound(s, context, above, **HW).bound_by == "compute"


def test_critical_batch_snapshots():
    """On the assumed H100 (3.35e12 B/s, 9.9e14 FLOP/s): about φ/β ≈ 296 at context 1; at 4096
    tokens no batch is large enough: each sequence's cache costs more memory time than its FLOPs
    cost compute time (MHA: ~1 FLOP per cache byte, GQA with groups of 8: ~8)."""
    assert dc.critical_batch("llama-2-7b", 1, **HW) == pytest.approx(299.028607689934, rel=1e-12)
    assert dc.critical_batch("llama-2-70b", 1, **HW) == pytest.approx(295.7308044871795, rel=1e-12)
    assert dc.critical_batch("llama-3-8b", 1, **HW) == pytest.approx(296.28715418413094, rel=1e-12)
    assert dc.critical_batch("llama-2-70b", 512, **HW) == pytest.approx(455.36725568893695, rel=1e-12)
    for name in PUBLISHED:
        assert dc.critical_batch(name, 4096, **HW) == math.inf
        assert dc.decode_time_bound(name, 4096, 10**6, **HW).bound_by == "memory"


# ------------------------------------------------------------------ properties


@given(s=shapes(), context=st.integers(1, 10**6), step=st.integers(1, 10**5), batch=st.integers(1, 512), width=widths)
def test_bytes_are_affine_in_context_and_batch(s, context, step, batch, width):
    f = lambda c, b: dc.decode_step_bytes(s, c, b, width, width)
    per = dc.kv_cache_bytes_per_token(s, width)
    assert f(context + step, batch) - f(context, batch) == step * batch * per
    assert f(context + 2 * step, batch) + f(context, batch) == 2 * f(context + step, batch)
    assert f(context, batch + step) - f(context, batch) == step * context * per
    assert f(context, 2 * batch + 1) + f(context, 1) == 2 * f(context, batch + 1)


@given(s=shapes(), context=st.integers(1, 10**5), batch=st.integers(1, 64), width=widths)
def test_gqa_cache_is_mha_cache_times_kv_over_heads(s, context, batch, width):
    mha = replace(s, n_kv_heads=s.n_heads)
    assert dc.kv_cache_bytes_per_token(s, width) * s.n_heads == dc.kv_cache_bytes_per_token(mha, width) * s.n_kv_heads
    read = lambda shape_: dc.decode_step_bytes(shape_, context, batch, 2, width)
    weights = lambda shape_: dc.decode_step_bytes(shape_, 1, 1, 2, width) - dc.kv_cache_bytes_per_token(shape_, width)
    assert (read(s) - weights(s)) * s.n_heads == (read(mha) - weights(mha)) * s.n_kv_heads
    # the FLOPs do not change: every query head still attends over every cached position
    assert dc.decode_step_flops(s, context, batch) - dc.decode_step_flops(mha, context, batch) == (
        batch * 2 * (dc.matmul_parameter_count(s) - dc.matmul_parameter_count(mha))
    )


@given(s=shapes(), context=st.integers(1, 10**5), batch=st.integers(1, 1024), more=st.integers(1, 10**4), hw=hardware)
def test_bound_is_the_max_and_monotone(s, context, batch, more, hw):
    b = dc.decode_time_bound(s, context, batch, **hw)
    assert b.memory_s == b.bytes / hw["bandwidth_bytes_per_s"] and b.compute_s == b.flops / hw["flops_per_s"]
    assert b.bound_s == max(b.memory_s, b.compute_s)
    assert b.bound_by == ("memory" if b.memory_s >= b.compute_s else "compute")
    longer = dc.decode_time_bound(s, context + more, batch, **hw)
    wider = dc.decode_time_bound(s, context, batch + more, **hw)
    for bigger in (longer, wider):
        assert bigger.memory_s >= b.memory_s and bigger.compute_s >= b.compute_s and bigger.bound_s >= b.bound_s


@given(s=shapes(), context=st.integers(1, 10**5), hw=hardware, wp=widths, wc=widths)
def test_critical_batch_makes_the_two_times_equal(s, context, hw, wp, wc):
    """Both times are affine in the batch: read each line off batches 1 and 2 and evaluate it at B*."""
    kw = dict(hw, bytes_per_param=wp, bytes_per_cache_value=wc)
    one, two = (dc.decode_time_bound(s, context, b, **kw) for b in (1, 2))
    b_star = dc.critical_batch(s, context, **kw)
    mem_slope, comp_slope = two.memory_s - one.memory_s, two.compute_s - one.compute_s
    if math.isinf(b_star):
        assert comp_slope <= mem_slope * (1 + 1e-9)  # compute never catches up
        return
    assert b_star > 0
    memory = one.memory_s + (b_star - 1) * mem_slope
    compute = one.compute_s + (b_star - 1) * comp_slope
    assert memory == pytest.approx(compute, rel=1e-6)


# ------------------------------------------------------------------ bandwidth measurement


def test_measure_bandwidth_is_a_positive_finite_number(device):
    bandwidth = dc.measure_bandwidth(device, size_bytes=2**20, repeats=2)
    assert isinstance(bandwidth, float) and math.isfinite(bandwidth) and bandwidth > 0
    assert math.isfinite(dc.measure_bandwidth(str(device), size_bytes=1, repeats=1))


def test_measure_bandwidth_default_device_is_the_cpu():
    assert math.isfinite(dc.measure_bandwidth(size_bytes=4096, repeats=1))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"size_bytes": 0}, ValueError, "size_bytes must be an int >= 1, got 0"),
        ({"size_bytes": 2.0**20}, TypeError, "size_bytes must be an int, got 1048576.0"),
        ({"repeats": 0}, ValueError, "repeats must be an int >= 1, got 0"),
        ({"repeats": True}, TypeError, "repeats must be an int, got True"),
        ({"device": "gpu"}, ValueError, "device must name a CPU or CUDA device, got 'gpu'"),
        ({"device": "meta"}, ValueError, "device must be a CPU or CUDA device, got meta"),
        ({"device": 0}, TypeError, "device must be None, a str or a torch.device, got 0"),
    ],
)
def test_measure_bandwidth_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        dc.measure_bandwidth(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_measure_bandwidth_without_cuda():
    with pytest.raises(ValueError, match="device is cuda but CUDA is not available"):
        dc.measure_bandwidth("cuda")


# ------------------------------------------------------------------ bad input


def test_shape_lookup_lists_the_known_names():
    assert dc.shape("llama-3-8b") is dc.SHAPES["llama-3-8b"]
    with pytest.raises(ValueError, match="name must be one of llama-2-7b, llama-2-70b, llama-3-8b, got 'llama-2-13b'"):
        dc.shape("llama-2-13b")
    with pytest.raises(TypeError, match="name must be a str naming a shape, got 7 of type int"):
        dc.shape(7)
    with pytest.raises(ValueError, match="name must be one of .*got 'gpt-2'"):
        dc.parameter_count("gpt-2")
    with pytest.raises(TypeError, match="shape must be a DecoderShape or the name of one in SHAPES, got dict"):
        dc.kv_cache_bytes_per_token({"n_layers": 32})


GOOD = dict(name="x", n_layers=2, d_model=8, n_heads=4, n_kv_heads=2, head_dim=2, ffn_dim=16, vocab_size=10)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"n_kv_heads": 3}, ValueError, "n_kv_heads must divide n_heads=4 .*got n_kv_heads=3"),
        ({"n_kv_heads": 8}, ValueError, "n_kv_heads must divide n_heads=4 .*got n_kv_heads=8"),
        ({"n_kv_heads": 0}, ValueError, "n_kv_heads must be an int >= 1, got 0"),
        ({"n_layers": 0}, ValueError, "n_layers must be an int >= 1, got 0"),
        ({"d_model": 8.0}, TypeError, "d_model must be an int, got 8.0"),
        ({"head_dim": -1}, ValueError, "head_dim must be an int >= 1, got -1"),
        ({"vocab_size": True}, TypeError, "vocab_size must be an int, got True"),
        ({"name": ""}, TypeError, "name must be a non-empty str, got ''"),
        ({"gated_ffn": 1}, TypeError, "gated_ffn must be True or False, got 1"),
        ({"tied_embeddings": "no"}, TypeError, "tied_embeddings must be True or False, got 'no'"),
    ],
)
def test_decoder_shape_rejects_bad_fields(changes, error, message):
    with pytest.raises(error, match=message):
        dc.DecoderShape(**(GOOD | changes))


CALLS = {
    "kv_cache_bytes_per_token": lambda **kw: dc.kv_cache_bytes_per_token("llama-2-7b", kw.get("bytes_per_value", 2)),
    "weight_bytes": lambda **kw: dc.weight_bytes("llama-2-7b", kw.get("bytes_per_param", 2)),
    "decode_step_bytes": lambda **kw: dc.decode_step_bytes("llama-2-7b", **({"context_len": 8, "batch": 2} | kw)),
    "decode_step_flops": lambda **kw: dc.decode_step_flops("llama-2-7b", **({"context_len": 8, "batch": 2} | kw)),
    "decode_time_bound": lambda **kw: dc.decode_time_bound("llama-2-7b", **({"context_len": 8, "batch": 2} | HW | kw)),
    "critical_batch": lambda **kw: dc.critical_batch("llama-2-7b", **({"context_len": 8} | HW | kw)),
    "cache_equals_weights_tokens": lambda **kw: dc.cache_equals_weights_tokens("llama-2-7b", **kw),
}
ACCEPTS = {
    "kv_cache_bytes_per_token": {"bytes_per_value"},
    "weight_bytes": {"bytes_per_param"},
    "decode_step_bytes": {"context_len", "batch", "bytes_per_param", "bytes_per_cache_value"},
    "decode_step_flops": {"context_len", "batch"},
    "decode_time_bound": {"context_len", "batch", "bytes_per_param", "bytes_per_cache_value", "hardware"},
    "critical_batch": {"context_len", "bytes_per_param", "bytes_per_cache_value", "hardware"},
    "cache_equals_weights_tokens": {"bytes_per_param", "bytes_per_cache_value"},
}
BAD = [
    ("context_len", 0, ValueError, "context_len must be an int >= 1, got 0"),
    ("context_len", -5, ValueError, "context_len must be an int >= 1, got -5"),
    ("context_len", 4.0, TypeError, "context_len must be an int, got 4.0"),
    ("batch", 0, ValueError, "batch must be an int >= 1, got 0"),
    ("batch", -1, ValueError, "batch must be an int >= 1, got -1"),
    ("batch", "8", TypeError, "batch must be an int, got '8'"),
    ("bytes_per_param", 0, ValueError, "bytes_per_param must be > 0 bytes, got 0"),
    ("bytes_per_param", -2, ValueError, "bytes_per_param must be > 0 bytes, got -2"),
    ("bytes_per_param", 3, ValueError, r"bytes_per_param must be one of 0\.5, 1, 2, 4, 8 bytes .*got 3"),
    ("bytes_per_param", 16, ValueError, r"bytes_per_param must be one of .*got 16"),
    ("bytes_per_param", float("nan"), ValueError, "bytes_per_param must be > 0 bytes, got nan"),
    ("bytes_per_param", "fp16", TypeError, "bytes_per_param must be a number of bytes, got 'fp16'"),
    ("bytes_per_param", torch.float16, TypeError, "bytes_per_param must be a number of bytes, got torch.float16"),
    ("bytes_per_cache_value", 0.25, ValueError, r"bytes_per_cache_value must be one of .*got 0\.25"),
    ("bytes_per_cache_value", True, TypeError, "bytes_per_cache_value must be a number of bytes, got True"),
    ("bytes_per_value", 0, ValueError, "bytes_per_value must be > 0 bytes, got 0"),
    ("bytes_per_value", 3, ValueError, "bytes_per_value must be one of .*got 3"),
    ("bandwidth_bytes_per_s", 0, ValueError, "bandwidth_bytes_per_s must be a finite number > 0, got 0.0"),
    ("bandwidth_bytes_per_s", -1e12, ValueError, "bandwidth_bytes_per_s must be a finite number > 0"),
    ("bandwidth_bytes_per_s", math.inf, ValueError, "bandwidth_bytes_per_s must be a finite number > 0, got inf"),
    ("bandwidth_bytes_per_s", "fast", TypeError, "bandwidth_bytes_per_s must be a real number, got 'fast'"),
    ("flops_per_s", 0.0, ValueError, "flops_per_s must be a finite number > 0, got 0.0"),
    ("flops_per_s", None, TypeError, "flops_per_s must be a real number, got None"),
]
CASES = [
    pytest.param(fn, arg, value, error, message, id=f"{fn}-{arg}-{value!r}")
    for fn, accepted in ACCEPTS.items()
    for arg, value, error, message in BAD
    if arg in accepted or (arg in ("bandwidth_bytes_per_s", "flops_per_s") and "hardware" in accepted)
]


@pytest.mark.parametrize(("fn", "arg", "value", "error", "message"), CASES)
def test_every_function_rejects_bad_arguments_by_name(fn, arg, value, error, message):
    with pytest.raises(error, match=message):
        CALLS[fn](**{arg: value})


@pytest.mark.parametrize("fn", list(CALLS))
def test_every_function_takes_a_shape_or_a_name_only(fn):
    assert CALLS[fn]() == CALLS[fn]()  # the defaults work
    call = getattr(dc, fn)
    with pytest.raises(TypeError, match="shape must be a DecoderShape or the name of one in SHAPES, got int"):
        call(
            7,
            **({"context_len": 8} if "context_len" in ACCEPTS[fn] else {}) | (HW if "hardware" in ACCEPTS[fn] else {}),
        )
    with pytest.raises(ValueError, match="name must be one of llama-2-7b, llama-2-70b, llama-3-8b, got 'llama-2-13b'"):
        call(
            "llama-2-13b",
            **({"context_len": 8} if "context_len" in ACCEPTS[fn] else {}) | (HW if "hardware" in ACCEPTS[fn] else {}),
        )
