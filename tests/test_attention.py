"""pebook.attention: positional_attention and MultiHeadAttention, for every registered encoding.

References (conftest): ``ref.positional_attention`` and ``ref.mha`` write attention out in float64
(projections, heads, grouped-query heads, scale, storage-order causal mask, softmax) and take from
the encoding module only what its declared ``place`` contributes. No test here knows an encoding
by name: encodings come from the registry, and each encoding's own hook is checked against its
paper reference in its own test module.
"""

import inspect
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_cases import ENCODING_NAMES, example_options

from pebook import (
    ENCODINGS,
    ALiBi,
    KVCache,
    MultiHeadAttention,
    NoPE,
    RoPE,
    build_encoding,
    encoding_options,
    positional_attention,
)

F64 = torch.float64
H, D = 2, 8  # heads and head_dim of the functional tests
DIM = H * D
#: encodings that act inside attention (the others are added to the input and rejected here)
INSIDE = tuple(n for n, c in ENCODINGS.items() if c.place != "input")
INPUT = tuple(n for n, c in ENCODINGS.items() if c.place == "input")
#: every encoding that carries position (all but NoPE)
POSITIONAL = tuple(n for n, c in ENCODINGS.items() if c.place != "none")
REQUIRED = tuple(
    (n, o) for n in ENCODINGS for o, default in encoding_options(n).items() if default is inspect.Parameter.empty
)


def make_encoding(name, *, n_heads=H, head_dim=D, causal=True, device="cpu", dtype=F64, seed=0):
    """A registered encoding with its example options, shaped for ``n_heads`` heads of ``head_dim``."""
    torch.manual_seed(seed)
    options = example_options(name)
    encoding = build_encoding(
        name, dim=n_heads * head_dim, n_heads=n_heads, head_dim=head_dim, causal=causal, **options
    )
    return encoding.to(device=device, dtype=dtype)


def qkv(lq, lk, *, device="cpu", dtype=F64, seed=0, b=2, heads=H, kv_heads=None):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    shapes = [(b, heads, lq, D), (b, kv_heads, lk, D), (b, kv_heads, lk, D)]
    return [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dtype) for s in shapes]


def ids(*values, device="cpu"):
    return torch.tensor(values, device=device)


# ==================================================================== positional_attention

# (q_len, k_len, causal): default positions, keys 0 … k_len - 1, the queries the last q_len of them
CASES = [(6, 6, True), (6, 6, False), (2, 7, True), (1, 9, True), (3, 7, False), (5, 3, False)]
CASE_IDS = ["self", "bidir", "kv-cache", "one-query", "bidir-rect", "bidir-more-queries"]


@pytest.mark.parametrize("name", INSIDE)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_positional_attention_matches_reference(device, ref, name, case):
    lq, lk, causal = case
    q, k, v = qkv(lq, lk, device=device)
    encoding = make_encoding(name, causal=causal, device=device)
    position_ids = None if lq <= lk else torch.arange(lq, device=device)  # more queries than keys: say where
    out = positional_attention(q, k, v, encoding, causal=causal, position_ids=position_ids)
    assert out.shape == q.shape and out.dtype == F64 and out.device.type == device.type
    expected = ref.positional_attention(q, k, v, encoding, causal=causal, position_ids=position_ids)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", INSIDE)
def test_positional_attention_float32_matches_reference(device, ref, tol32, name):
    q, k, v = qkv(3, 7, device=device, dtype=torch.float32)
    encoding = make_encoding(name, device=device, dtype=torch.float32)
    out = positional_attention(q, k, v, encoding)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.positional_attention(q, k, v, encoding), **tol32)


@settings(max_examples=30)
@given(
    name=st.sampled_from(INSIDE),
    lq=st.integers(1, 6),
    extra=st.integers(0, 5),
    causal=st.booleans(),
    kv_heads=st.sampled_from([1, 2, 4]),
    positions=st.sampled_from(["default", "shared", "batched"]),
    scale=st.sampled_from([None, 1.0, 0.3]),
    seed=st.integers(0, 2**31),
)
def test_positional_attention_matches_reference_everywhere(
    device, ref, name, lq, extra, causal, kv_heads, positions, scale, seed
):
    lk = lq + extra
    q, k, v = qkv(lq, lk, device=device, seed=seed, heads=4, kv_heads=kv_heads)
    encoding = make_encoding(name, n_heads=4, causal=causal, device=device, seed=seed % 100)
    gen = torch.Generator().manual_seed(seed)
    shape = {"default": None, "shared": (), "batched": (2,)}[positions]
    q_ids = k_ids = None
    if shape is not None:
        q_ids = torch.randint(0, 40, (*shape, lq), generator=gen).to(device)
        k_ids = torch.randint(0, 40, (*shape, lk), generator=gen).to(device)
    kwargs = dict(causal=causal, position_ids=q_ids, key_position_ids=k_ids, scale=scale)
    out = positional_attention(q, k, v, encoding, **kwargs)
    torch.testing.assert_close(out, ref.positional_attention(q, k, v, encoding, **kwargs), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_no_encoding_is_plain_attention(device, ref, causal):
    """``None`` and ``NoPE()`` are eq. (1) of Vaswani et al. with nothing added."""
    q, k, v = qkv(3, 5, device=device)
    out = positional_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref.attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)
    assert torch.equal(positional_attention(q, k, v, None, causal=causal), out)
    assert torch.equal(positional_attention(q, k, v, NoPE(), causal=causal), out)


@pytest.mark.parametrize("name", INSIDE)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_equals_repeated_key_value_heads(device, ref, name, kv_heads):
    """k, v with kv_heads heads serve 4 query heads: query head j reads key/value head
    j // (4 / kv_heads), i.e. the same as repeating each key/value head 4 / kv_heads times."""
    q, k, v = qkv(3, 6, device=device, heads=4, kv_heads=kv_heads)
    encoding = make_encoding(name, n_heads=4, device=device)
    out = positional_attention(q, k, v, encoding)
    groups = 4 // kv_heads
    repeated = positional_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), encoding)
    torch.testing.assert_close(out, repeated, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out, ref.positional_attention(q, k, v, encoding), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", INSIDE)
def test_position_ids_place_queries_and_keys(device, ref, name):
    q, k, v = qkv(3, 6, device=device)
    encoding = make_encoding(name, device=device)
    default = positional_attention(q, k, v, encoding)
    explicit = positional_attention(
        q, k, v, encoding, position_ids=ids(3, 4, 5, device=device), key_position_ids=torch.arange(6, device=device)
    )
    torch.testing.assert_close(explicit, default, rtol=0, atol=0)
    # (len,) ids are shared by the batch; (batch, len) ids place each sequence on its own
    q_ids, k_ids = ids(9, 2, 7, device=device), ids(0, 9, 4, 4, 1, 12, device=device)
    shared = positional_attention(q, k, v, encoding, position_ids=q_ids, key_position_ids=k_ids)
    batched = positional_attention(
        q, k, v, encoding, position_ids=q_ids.expand(2, 3), key_position_ids=k_ids.expand(2, 6)
    )
    torch.testing.assert_close(batched, shared, rtol=0, atol=0)
    torch.testing.assert_close(
        shared,
        ref.positional_attention(q, k, v, encoding, position_ids=q_ids, key_position_ids=k_ids),
        rtol=1e-12,
        atol=1e-12,
    )
    per_row = torch.stack((torch.arange(3, 6, device=device), q_ids))
    per_key = torch.stack((torch.arange(6, device=device), k_ids))
    mixed = positional_attention(q, k, v, encoding, position_ids=per_row, key_position_ids=per_key)
    torch.testing.assert_close(mixed[0], default[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mixed[1], shared[1], rtol=1e-13, atol=1e-13)
    if ENCODINGS[name].place == "none":
        torch.testing.assert_close(shared, default, rtol=0, atol=0)  # no encoding, nothing to place
    else:
        assert (shared - default).abs().max() > 1e-3


@pytest.mark.parametrize("name", INSIDE)
def test_scale_multiplies_the_logits(device, ref, name):
    """scale=1 (T5, which folds 1/√d into its weights) equals the default 1/√d with q scaled by √d:
    every encoding's logit term is linear in q or independent of the scale."""
    q, k, v = qkv(4, 6, device=device)
    encoding = make_encoding(name, device=device)
    unscaled = positional_attention(q, k, v, encoding, scale=1.0)
    torch.testing.assert_close(unscaled, positional_attention(q * math.sqrt(D), k, v, encoding), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unscaled, ref.positional_attention(q, k, v, encoding, scale=1.0), rtol=1e-12, atol=1e-12)
    assert (unscaled - positional_attention(q, k, v, encoding)).abs().max() > 1e-3


@pytest.mark.parametrize("name", INSIDE)
@pytest.mark.parametrize("positions", ["default", "zeros", "reversed"])
def test_causal_mask_follows_storage_order(device, name, positions):
    """Query i of 3 sees the first 7 - 3 + i + 1 stored keys whatever the position ids say: changing
    the keys and values stored after that leaves its output unchanged (and does change it
    without the mask)."""
    q, k, v = qkv(3, 7, device=device)
    encodings = {causal: make_encoding(name, device=device, causal=causal) for causal in (True, False)}
    q_ids = {"default": None, "zeros": torch.zeros(3, dtype=torch.long), "reversed": ids(2, 1, 0)}[positions]
    k_ids = None if q_ids is None else torch.arange(6, -1, -1)
    if q_ids is not None:
        q_ids, k_ids = q_ids.to(device), k_ids.to(device)
    for i in range(3):
        visible = 7 - 3 + i + 1
        k2, v2 = k.clone(), v.clone()
        k2[:, :, visible:] += 1.0
        v2[:, :, visible:] -= 2.0
        outs = [
            positional_attention(a, b, c, encodings[causal], causal=causal, position_ids=q_ids, key_position_ids=k_ids)
            for causal in (True, False)
            for a, b, c in ((q, k, v), (q, k2, v2))
        ]
        torch.testing.assert_close(outs[1][:, :, i], outs[0][:, :, i], rtol=0, atol=0)
        if visible < 7:
            assert (outs[3][:, :, i] - outs[2][:, :, i]).abs().max() > 1e-3


def test_snapshot_attention_on_equal_keys(device):
    """With all keys equal, content cancels and a logit bias alone sets the weights: ALiBi with slope
    1/2 weights keys 0, 1, 2 of query 2 as softmax(-1, -1/2, 0) = (0.18632372, 0.30719589,
    0.50648039) (8 decimals); one-hot values return the weights."""
    encoding = ALiBi(n_heads=1, slopes=torch.tensor([0.5], dtype=F64, device=device))
    q = torch.zeros(1, 1, 3, 3, dtype=F64, device=device)
    k = torch.ones(1, 1, 3, 3, dtype=F64, device=device)
    v = torch.eye(3, dtype=F64, device=device)[None, None]
    out = positional_attention(q, k, v, encoding)
    expected = torch.tensor(
        [[1.0, 0.0, 0.0], [0.37754067, 0.62245933, 0.0], [0.18632372, 0.30719589, 0.50648039]], dtype=F64
    )
    torch.testing.assert_close(out[0, 0].cpu(), expected, rtol=0, atol=5e-9)


# ---------------------------------------------------------------- bad input, positional_attention


@pytest.mark.parametrize("name", INPUT)
def test_input_encodings_are_rejected(name):
    q, k, v = qkv(3, 3)
    encoding = make_encoding(name)
    with pytest.raises(
        ValueError, match=rf"the {name} encoding is added to the token embeddings, not inside attention"
    ):
        positional_attention(q, k, v, encoding)


@pytest.mark.parametrize("encoding", ["alibi", "none", torch.nn.Linear(2, 2), 3])
def test_encoding_must_be_a_module_or_none(encoding):
    q, k, v = qkv(3, 3)
    with pytest.raises(TypeError, match=r"encoding must be a pebook positional encoding module \(e.g. pebook.ALiBi"):
        positional_attention(q, k, v, encoding)


@pytest.mark.parametrize("name", INSIDE)
def test_encoding_built_for_another_shape_is_rejected(name):
    """An encoding built for other heads or another head size than q's is refused, naming both; an
    encoding that takes neither (by its constructor) fits any shape."""
    q, k, v = qkv(3, 3)
    takes = inspect.signature(ENCODINGS[name].__init__).parameters
    for arg, shape, message in (
        (
            "n_heads",
            dict(n_heads=2 * H),
            rf"built with n_heads={2 * H}, but this attention has {H}",
        ),
        (
            "head_dim",
            dict(head_dim=2 * D),
            rf"built with head_dim={2 * D}, but this attention has {D}",
        ),
    ):
        encoding = make_encoding(name, **shape)
        if arg in takes:
            with pytest.raises(ValueError, match=message):
                positional_attention(q, k, v, encoding)
        else:
            assert positional_attention(q, k, v, encoding).shape == q.shape


def test_mismatched_qkv_are_rejected(device):
    q, k, v = qkv(3, 5, device=device)
    with pytest.raises(
        ValueError,
        match=r"k must have shape \(batch=2, kv_heads, k_len, head_dim=8\) with kv_heads dividing the 2 query heads "
        r"of q \(2, 2, 3, 8\), got \(2, 2, 5, 6\)",
    ):
        positional_attention(q, k[..., :6], v)
    with pytest.raises(ValueError, match=r"k must have shape .* got \(1, 2, 5, 8\)"):
        positional_attention(q, k[:1], v)
    q4, k3, v3 = qkv(3, 5, device=device, heads=4, kv_heads=3)
    with pytest.raises(
        ValueError, match=r"with kv_heads dividing the 4 query heads of q \(2, 4, 3, 8\), got \(2, 3, 5, 8\)"
    ):
        positional_attention(q4, k3, v3)
    with pytest.raises(
        ValueError, match=r"v must have shape \(batch, heads, k_len\) = \(2, 2, 5\) like k, got \(2, 2, 4, 8\)"
    ):
        positional_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match=r"v must have shape .* got \(2, 1, 5, 8\)"):
        positional_attention(q, k, v[:, :1])
    with pytest.raises(TypeError, match=r"k has dtype torch.float32 but q has dtype torch.float64; they must match"):
        positional_attention(q, k.float(), v)
    with pytest.raises(TypeError, match=r"v has dtype torch.float16 but q has dtype torch.float64; they must match"):
        positional_attention(q, k, v.half())
    with pytest.raises(TypeError, match=r"q must be a floating-point tensor, got dtype torch.int64"):
        positional_attention(q.long(), k, v)
    with pytest.raises(ValueError, match=r"v must have 4 dimensions, got shape \(2, 5, 8\)"):
        positional_attention(q, k, v[:, 0])
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got list"):
        positional_attention(q, k.tolist(), v)


def test_bad_positions_are_rejected(device):
    q, k, v = qkv(3, 5, device=device)
    with pytest.raises(ValueError, match=r"position_ids must have shape \(3,\) or \(2, 3\), got \(4,\)"):
        positional_attention(q, k, v, position_ids=torch.arange(4, device=device))
    with pytest.raises(ValueError, match=r"position_ids must have shape \(3,\) or \(2, 3\), got \(1, 3\)"):
        positional_attention(q, k, v, position_ids=torch.arange(3, device=device)[None])
    with pytest.raises(ValueError, match=r"key_position_ids must have shape \(5,\) or \(2, 5\), got \(2, 3\)"):
        positional_attention(q, k, v, key_position_ids=torch.zeros(2, 3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"key_position_ids must have 1 or 2 dimensions, got shape \(1, 2, 5\)"):
        positional_attention(q, k, v, key_position_ids=torch.zeros(1, 2, 5, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"position_ids must be an integer tensor, got dtype torch.float32"):
        positional_attention(q, k, v, position_ids=torch.zeros(3, device=device))
    with pytest.raises(TypeError, match=r"key_position_ids must be a torch.Tensor, got list"):
        positional_attention(q, k, v, key_position_ids=[0, 1, 2, 3, 4])
    if device.type == "cpu":  # checked on the CPU only (on a GPU it would cost a synchronisation)
        with pytest.raises(ValueError, match=r"position_ids must be >= 0, got a minimum of -1"):
            positional_attention(q, k, v, position_ids=ids(0, -1, 2))
    q5, k3, v3 = qkv(5, 3, device=device)
    with pytest.raises(
        ValueError, match=r"without position_ids the queries are the last q_len keys, so q_len=5 must be <= k_len=3"
    ):
        positional_attention(q5, k3, v3)
    with pytest.raises(ValueError, match=r"causal attention needs q_len <= k_len .*got q_len=5, k_len=3"):
        positional_attention(q5, k3, v3, position_ids=torch.arange(5, device=device))


@pytest.mark.parametrize("scale", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_bad_scale_is_rejected(scale):
    q, k, v = qkv(3, 3)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0 or None \(for 1/sqrt\(head_dim\)\), got"):
        positional_attention(q, k, v, scale=scale)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0 or None"):
        MultiHeadAttention(DIM, H, scale=scale)


@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["k", "v"])
def test_mixed_devices_are_rejected(cuda_device, moved):
    args = dict(zip("qkv", qkv(3, 5, device=cuda_device), strict=True))
    args[moved] = args[moved].cpu()
    with pytest.raises(
        ValueError, match=rf"{moved} is on cpu but q is on cuda(:0)?; all inputs must be on the same device"
    ):
        positional_attention(args["q"], args["k"], args["v"])
    with pytest.raises(ValueError, match=r"position_ids is on cpu but the inputs are on cuda"):
        positional_attention(*qkv(3, 5, device=cuda_device), position_ids=torch.arange(2, 5))


# ==================================================================== MultiHeadAttention


def make_mha(name, *, device="cpu", dim=DIM, n_heads=H, causal=True, seed=0, dtype=F64, **kwargs):
    torch.manual_seed(seed)
    options = example_options(name) | kwargs
    return MultiHeadAttention(dim, n_heads, name, causal=causal, **options).to(device=device, dtype=dtype)


def inputs(b, t, *, device, seed=1, dtype=F64, dim=DIM):
    return torch.randn(b, t, dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device, dtype)


HEADS = [(2, None), (4, 2), (4, 1)]  # (n_heads, n_kv_heads): multi-head, grouped-query, multi-query
HEAD_IDS = ["mha", "gqa", "mqa"]


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("causal", [True, False])
def test_mha_matches_reference(device, ref, encoding_name, heads, causal):
    n_heads, n_kv_heads = heads
    mha = make_mha(encoding_name, device=device, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal)
    x = inputs(2, 9, device=device)
    with torch.no_grad():
        out = mha(x)
        expected = ref.mha(mha, x)
    assert out.shape == x.shape and out.device.type == device.type
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_mha_float32_matches_reference(device, ref, tol32, encoding_name):
    mha = make_mha(encoding_name, device=device, dtype=torch.float32, n_heads=4, n_kv_heads=2)
    x = inputs(2, 9, device=device, dtype=torch.float32)
    with torch.no_grad():
        out = mha(x)
        expected = ref.mha(mha, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, **tol32)


def test_mha_position_ids_match_reference(device, ref, encoding_name):
    mha = make_mha(encoding_name, device=device)
    x = inputs(2, 6, device=device)
    position_ids = torch.tensor([[5, 0, 3, 3, 9, 1], [0, 1, 2, 3, 4, 5]], device=device)
    with torch.no_grad():
        torch.testing.assert_close(
            mha(x, position_ids=position_ids), ref.mha(mha, x, position_ids), rtol=1e-12, atol=1e-12
        )


def test_mha_structure(encoding_name):
    """``qkv`` maps dim to (n_heads + 2·n_kv_heads)·head_dim features, ``out`` dim to dim; the
    encoding module is ``.position`` and ``.encoding`` its registered name."""
    mha = make_mha(encoding_name, dim=24, n_heads=4, n_kv_heads=2)
    assert (mha.n_heads, mha.n_kv_heads, mha.head_dim) == (4, 2, 6)
    assert mha.qkv.weight.shape == ((4 + 2 * 2) * 6, 24) and mha.out.weight.shape == (24, 24)
    assert isinstance(mha.position, ENCODINGS[encoding_name]) and mha.encoding == encoding_name
    assert make_mha(encoding_name).n_kv_heads == H


def test_mha_parameter_count(encoding_name):
    """The projections plus what the encoding declares it learns, nothing else."""
    for bias, n_kv_heads in ((True, None), (False, 1)):
        mha = make_mha(encoding_name, n_heads=4, n_kv_heads=n_kv_heads, bias=bias)
        kv = n_kv_heads or 4
        projections = DIM * (4 + 2 * kv) * (D // 2) + DIM * DIM + (((4 + 2 * kv) * (D // 2) + DIM) if bias else 0)
        assert sum(p.numel() for p in mha.parameters()) == projections + mha.position.num_learned_parameters()


def test_mha_options_reach_the_encoding(device, ref):
    """Encoding options go to the encoding's constructor: rotary_dim of RoPE rotates only the first
    rotary_dim features of each head (GPT-NeoX's rotary_pct)."""
    mha = make_mha(RoPE.name, device=device, rotary_dim=4, rope_base=500.0)
    assert mha.position.rotary_dim == 4 and mha.position.inv_freq.shape == (2,)
    torch.testing.assert_close(mha.position.inv_freq.cpu(), ref.frequencies(4, 500.0), rtol=1e-7, atol=0)
    x = inputs(2, 7, device=device)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), ref.mha(mha, x), rtol=1e-12, atol=1e-12)


def test_mha_scale(device, ref, encoding_name):
    mha = make_mha(encoding_name, device=device, scale=1.0)
    assert mha.scale == 1.0 and make_mha(encoding_name).scale is None
    x = inputs(2, 6, device=device)
    with torch.no_grad():
        out = mha(x)
        torch.testing.assert_close(out, ref.mha(mha, x), rtol=1e-12, atol=1e-12)
        mha.scale = None
        assert (mha(x) - out).abs().max() > 1e-4


def test_mha_takes_an_encoding_module(device):
    """A module is used as it is (shared, e.g. one T5 table for a stack of layers)."""
    for name in INSIDE:
        encoding = make_encoding(name, n_heads=4, head_dim=4, device=device)
        first = MultiHeadAttention(16, 4, encoding).to(device, F64)
        second = MultiHeadAttention(16, 4, encoding).to(device, F64)
        assert first.position is encoding and second.position is encoding and first.encoding == name


# ---------------------------------------------------------------- KV cache and positions


@pytest.mark.parametrize("heads", [HEADS[0], HEADS[2]], ids=[HEAD_IDS[0], HEAD_IDS[2]])
@pytest.mark.parametrize("prompt", [1, 4])
def test_mha_incremental_decoding_equals_full_forward(device, encoding_name, heads, prompt):
    """Prefill `prompt` tokens, then the rest in steps of 1 and 2 tokens with past_kv: every output
    equals the full causal forward (float64), and the cache holds n_kv_heads heads."""
    n_heads, n_kv_heads = heads
    mha = make_mha(encoding_name, device=device, n_heads=n_heads, n_kv_heads=n_kv_heads)
    kv_heads = n_kv_heads or n_heads
    x = inputs(2, 10, device=device)
    with torch.no_grad():
        full = mha(x)
        out, cache = mha(x[:, :prompt], return_kv=True)
        pieces, t, step = [out], prompt, 1
        while t < 10:
            n = min(step, 10 - t)
            out, cache = mha(x[:, t : t + n], past_kv=cache, return_kv=True)
            pieces.append(out)
            t, step = t + n, 3 - step  # alternate 1, 2, 1, 2 …
            assert isinstance(cache, KVCache) and len(cache) == 1 and cache.length == t
            k, v = cache[0]
            assert k.shape == v.shape == (2, kv_heads, t, mha.head_dim)
            assert torch.equal(cache.positions, torch.arange(t, device=device).expand(2, t))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-12, atol=1e-12)


def test_mha_default_positions_continue_from_the_cache(device, encoding_name):
    mha = make_mha(encoding_name, device=device)
    x = inputs(2, 7, device=device)
    with torch.no_grad():
        _, cache = mha(x[:, :4], return_kv=True)
        default, default_cache = mha(x[:, 4:], past_kv=cache, return_kv=True)
        given, given_cache = mha(
            x[:, 4:], past_kv=cache, position_ids=torch.arange(4, 7, device=device).expand(2, 3), return_kv=True
        )
    assert torch.equal(default, given) and torch.equal(default_cache.positions, given_cache.positions)


def test_mha_wrong_position_ids_move_tokens_for_the_encoding_only(device, ref, encoding_name):
    """Position ids tell the encoding where tokens are; the causal mask follows storage order. So
    decoding a step at a wrong position (here 0, forgetting the cache) equals the full forward with
    those ids, stays causal, and changes the output unless the encoding carries no position."""
    mha = make_mha(encoding_name, device=device)
    x = inputs(2, 8, device=device)
    wrong = torch.tensor([0, 1, 2, 3, 4, 0, 0, 0], device=device).expand(2, 8)
    with torch.no_grad():
        right_full = mha(x)
        wrong_full = mha(x, position_ids=wrong)
        out, cache = mha(x[:, :5], return_kv=True)
        steps = [out]
        for t in range(5, 8):
            out, cache = mha(x[:, t : t + 1], past_kv=cache, position_ids=wrong[:, t : t + 1], return_kv=True)
            steps.append(out)
        later = x.clone()
        later[:, 6:] += 1.0
        wrong_later = mha(later, position_ids=wrong)
    torch.testing.assert_close(torch.cat(steps, 1), wrong_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wrong_full, ref.mha(mha, x, wrong), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wrong_later[:, :6], wrong_full[:, :6], rtol=0, atol=0)  # still causal
    torch.testing.assert_close(wrong_full[:, :5], right_full[:, :5], rtol=1e-13, atol=1e-13)
    if ENCODINGS[encoding_name].place == "none":
        torch.testing.assert_close(wrong_full, right_full, rtol=1e-13, atol=1e-13)
    else:
        assert (wrong_full[:, 5:] - right_full[:, 5:]).abs().amax(dim=(0, 2)).min() > 1e-4


def test_mha_caches_keys_after_the_encoding(device, encoding_name):
    """Keys are cached as the encoding leaves them (rotated for a "qk" encoding), values as projected."""
    mha = make_mha(encoding_name, device=device)
    x = inputs(1, 5, device=device)
    pos = torch.arange(5, device=device).expand(1, 5)
    with torch.no_grad():
        _, cache = mha(x, return_kv=True)
        embedded = mha.position.embed(pos, F64)  # an "input" encoding's rows (None for the others)
        h = x if embedded is None else x + embedded
        _, raw_k, raw_v = mha.qkv(h).view(1, 5, 3, H, D).permute(2, 0, 3, 1, 4)
    k, v = cache[0]
    torch.testing.assert_close(k, mha.position.rotate(raw_k, pos), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v, raw_v, rtol=1e-14, atol=1e-14)
    if mha.position.place != "qk":
        torch.testing.assert_close(k, raw_k, rtol=1e-14, atol=1e-14)


@settings(max_examples=5)
@given(t=st.integers(0, 7), seed=st.integers(0, 2**31))
def test_mha_is_causal(device, encoding_name, t, seed):
    """Output at position t ignores the inputs after t and depends on the input at t."""
    mha = make_mha(encoding_name, device=device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, DIM, generator=gen, dtype=F64).to(device)
    later = x.clone()
    later[:, t + 1 :] = torch.randn(2, 7 - t, DIM, generator=gen, dtype=F64).to(device)
    earlier = x.clone()
    earlier[:, t] += 1.0
    with torch.no_grad():
        base, after, before = mha(x), mha(later), mha(earlier)
    torch.testing.assert_close(after[:, : t + 1], base[:, : t + 1], rtol=1e-12, atol=1e-12)
    assert (before[:, t:] - base[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-6


PERMUTATION = [3, 0, 6, 1, 7, 2, 5, 4]


def test_permutation_equivariance_without_position(device):
    """Without position and without a mask attention is a function of a set: permuting the tokens
    permutes the output. A causal mask alone breaks that."""
    x = inputs(2, 8, device=device, seed=3)
    perm = torch.tensor(PERMUTATION, device=device)
    for name in ENCODING_NAMES:
        if ENCODINGS[name].place != "none":
            continue
        with torch.no_grad():
            mha = make_mha(name, device=device, causal=False)
            torch.testing.assert_close(mha(x[:, perm]), mha(x)[:, perm], rtol=1e-12, atol=1e-12)
            mha = make_mha(name, device=device, causal=True)
            assert (mha(x[:, perm]) - mha(x)[:, perm]).abs().max() > 1e-2


@pytest.mark.parametrize("name", POSITIONAL)
def test_every_encoding_breaks_permutation_equivariance(device, name):
    """Every encoding that carries position makes the unmasked output depend on token order (seeded
    weights; margin 1e-4, eleven orders above float64 rounding: a learned table starts from
    N(0, 0.02²), so its effect at initialisation is small)."""
    mha = make_mha(name, device=device, causal=False)
    x = inputs(2, 8, device=device, seed=3)
    perm = torch.tensor(PERMUTATION, device=device)
    with torch.no_grad():
        assert (mha(x[:, perm]) - mha(x)[:, perm]).abs().max() > 1e-4


# ---------------------------------------------------------------- bad input, MultiHeadAttention


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(dim=16, n_heads=0), ValueError, r"n_heads must be an int >= 1, got 0$"),
        (dict(dim=16, n_heads=True), TypeError, r"n_heads must be an int, got True of type bool"),
        (dict(dim=10, n_heads=4), ValueError, r"dim=10 must be divisible by n_heads=4"),
        (dict(dim=0, n_heads=1), ValueError, r"dim must be an int >= 1, got 0$"),
        (dict(dim=16, n_heads=4, n_kv_heads=3), ValueError, r"n_kv_heads=3 must divide n_heads=4"),
        (dict(dim=16, n_heads=4, n_kv_heads=8), ValueError, r"n_kv_heads=8 must divide n_heads=4"),
        (dict(dim=16, n_heads=4, n_kv_heads=0), ValueError, r"n_kv_heads must be an int >= 1, got 0$"),
        (dict(dim=16, n_heads=4, n_kv_heads=2.0), TypeError, r"n_kv_heads must be an int, got 2.0 of type float"),
        (dict(dim=16, n_heads=2, encoding="unknown_pe"), ValueError, r"encoding must be one of .*got 'unknown_pe'"),
        (dict(dim=16, n_heads=2, encoding=None), ValueError, r"encoding must be one of \('none', .*\), got None"),
    ],
)
def test_mha_bad_construction_is_rejected(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        MultiHeadAttention(**kwargs)


def test_mha_unknown_option_names_the_encodings_options(encoding_name):
    allowed = sorted(encoding_options(encoding_name))
    listed = re.escape(str(allowed)) if allowed else "none"
    with pytest.raises(
        TypeError, match=rf"encoding='{encoding_name}' takes no option 'colour'; its options are {listed}"
    ):
        make_mha(encoding_name, colour="red")


@pytest.mark.parametrize("name,option", REQUIRED)
def test_mha_missing_required_option_is_named(name, option):
    with pytest.raises(TypeError, match=rf"encoding='{name}' needs the option '{option}'"):
        MultiHeadAttention(DIM, H, name)


def test_mha_options_with_an_encoding_module_are_rejected():
    with pytest.raises(
        TypeError, match=r"options go to the encoding's constructor; an encoding module takes none here"
    ):
        MultiHeadAttention(DIM, H, NoPE(), rope_base=500.0)
    for name in INSIDE:
        takes = inspect.signature(ENCODINGS[name].__init__).parameters
        if "n_heads" in takes:
            with pytest.raises(
                ValueError, match=rf"{name} encoding was built with n_heads=4, but this attention has {H}"
            ):
                MultiHeadAttention(DIM, H, make_encoding(name, n_heads=4))


def test_mha_bad_x_is_rejected(device):
    mha = make_mha(ENCODING_NAMES[0], device=device)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        mha(torch.zeros(1, 3, DIM, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(3, 16\)"):
        mha(torch.zeros(3, DIM, dtype=F64, device=device))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, dim=16\), got \(1, 3, 8\)"):
        mha(torch.zeros(1, 3, 8, dtype=F64, device=device))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        mha([[0.0] * DIM])


def test_mha_bad_position_ids_are_rejected(device, encoding_name):
    mha = make_mha(encoding_name, device=device)
    x = inputs(2, 3, device=device)
    with pytest.raises(ValueError, match=r"position_ids must have shape \(3,\) or \(2, 3\), got \(2, 4\)"):
        mha(x, position_ids=torch.zeros(2, 4, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"position_ids must be an integer tensor, got dtype torch.float64"):
        mha(x, position_ids=torch.zeros(2, 3, dtype=F64, device=device))
    with pytest.raises(TypeError, match=r"position_ids must be an integer tensor, got dtype torch.bool"):
        mha(x, position_ids=torch.zeros(3, dtype=torch.bool, device=device))
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"position_ids must be >= 0, got a minimum of -3"):
            mha(x, position_ids=ids(0, -3, 1))


def test_mha_bad_past_kv_is_rejected(device, encoding_name):
    mha = make_mha(encoding_name, device=device, n_heads=4, n_kv_heads=2)
    x = inputs(2, 3, device=device)
    step = x[:, :1]
    with torch.no_grad():
        _, cache = mha(x, return_kv=True)
    k, v = cache[0]
    with pytest.raises(TypeError, match=r"past_kv must be the KVCache returned with return_kv=True, got tuple"):
        mha(step, past_kv=(k, v))
    with pytest.raises(ValueError, match=r"past_kvs holds 2 layers but this model has n_layers=1"):
        mha(step, past_kv=KVCache([(k, v), (k, v)], cache.positions))
    with pytest.raises(
        ValueError,
        match=r"past_kvs\[0\]\.k has shape \(2, 1, 3, 4\) but this model caches \(batch, n_kv_heads=2, positions, "
        r"head_dim=4\): the cache was made by a model of another shape",
    ):
        mha(step, past_kv=KVCache([(k[:, :1], v)], cache.positions))
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.v has shape \(2, 2, 3, 2\) but this model caches"):
        mha(step, past_kv=KVCache([(k, v[..., :2])], cache.positions))
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.k holds batch size 2 but the new tokens have batch size 1"):
        mha(step[:1], past_kv=cache)
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.v holds 2 positions but the cache's positions hold 3"):
        mha(step, past_kv=KVCache([(k, v[:, :, :2])], cache.positions))
    with pytest.raises(
        TypeError, match=r"past_kvs\[0\]\.k has dtype torch.float32 but the model computes in torch.float64"
    ):
        mha(step, past_kv=KVCache([(k.float(), v)], cache.positions))
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.k must have 4 dimensions, got shape \(2, 3, 4\)"):
        mha(step, past_kv=KVCache([(k[:, 0], v)], cache.positions))
    with pytest.raises(TypeError, match=r"past_kvs\[0\] must be a \(k, v\) pair, got tuple"):
        mha(step, past_kv=KVCache([(k,)], cache.positions))


@pytest.mark.cuda
def test_mha_past_kv_on_another_device_is_rejected(cuda_device):
    mha = make_mha(ENCODING_NAMES[0], device=cuda_device)
    x = inputs(1, 3, device=cuda_device)
    with torch.no_grad():
        _, cache = mha(x, return_kv=True)
    k, v = cache[0]
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.k is on cpu but the model is on cuda"):
        mha(x[:, :1], past_kv=KVCache([(k.cpu(), v)], cache.positions))
