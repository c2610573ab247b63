"""pebook.encoding: the protocol every registered encoding implements.

Every test here is parametrized over :data:`pebook.ENCODINGS` (through conftest's
``encoding_name`` / ``bias_encoding_name`` fixtures), so an encoding added to the registry is held
to the contract without a new line here:

* ``place`` is one of :data:`pebook.PLACES`, and only the hook of that place acts; the others are
  the identity (``rotate``) or ``None`` (``embed``, ``logit_bias``), and ``attend`` is plain
  ``softmax(q kᵀ · scale + bias) v``;
* :meth:`~pebook.PositionalEncoding.declared_parameters` lists exactly the module's parameters
  (learned) and buffers (fixed), with their shapes, and
  :meth:`~pebook.PositionalEncoding.num_learned_parameters` counts them;
* a :class:`pebook.LogitBias` gives the same attention through FlexAttention's ``score_mod`` as
  through SDPA with the materialised :meth:`~pebook.LogitBias.logit_bias`;
* ``full_precision_buffers`` survive ``.half()`` / ``.bfloat16()`` / ``.to(torch.float16)`` in
  float32, and the encoding still runs in a half-precision :class:`pebook.MultiHeadAttention`.

Reference for the attention itself: ``ref.attention`` (conftest), softmax(QKᵀ/√d + bias) V with an
explicit causal mask.
"""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from registry_cases import example_options
from torch.nn.attention.flex_attention import flex_attention

import pebook

F64 = torch.float64
# (dim, n_heads): head_dim 4 and 12 (even, as RoPE needs; dim even, as the sinusoidal table needs)
SHAPES = [(16, 4), (24, 2)]
CASTS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "to(float16)": lambda m: m.to(torch.float16),
}
CAST_DTYPE = {"half": torch.float16, "bfloat16": torch.bfloat16, "to(float16)": torch.float16}
# half-precision MHA output vs the float32 one (|out| ~ 1): a few roundings of the cast dtype
CAST_ATOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2}
FLEX_EAGER = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def build(name, dim=16, n_heads=4, causal=True):
    """The registered encoding ``name`` for a layer of this shape, with its example options."""
    return pebook.build_encoding(
        name, dim=dim, n_heads=n_heads, head_dim=dim // n_heads, causal=causal, **example_options(name)
    )


def positions(batch, length, seed, high=40, *, device):
    """Random (batch, length) position ids, deliberately non-contiguous (every other column)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, high, (batch, 2 * length), generator=gen)[:, ::2].to(device)
    assert not ids.is_contiguous() or length <= 1
    return ids


# ---------------------------------------------------------------- class attributes


def test_place_and_class_attributes(encoding_name):
    cls = pebook.ENCODINGS[encoding_name]
    assert cls.place in pebook.PLACES
    assert isinstance(cls.shared_across_layers, bool)
    assert isinstance(cls.example_options, dict)
    assert isinstance(cls.full_precision_buffers, tuple)
    # a logit bias is exactly an encoding in the "logits" place
    assert issubclass(cls, pebook.LogitBias) == (cls.place == "logits")


# ---------------------------------------------------------------- declared parameters


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dim,n_heads", SHAPES)
def test_declared_parameters_are_the_modules_parameters_and_buffers(encoding_name, dim, n_heads, causal):
    enc = build(encoding_name, dim, n_heads, causal)
    declared = enc.declared_parameters()
    learned = {name: tuple(shape) for name, (shape, is_learned) in declared.items() if is_learned}
    fixed = {name: tuple(shape) for name, (shape, is_learned) in declared.items() if not is_learned}
    assert learned == {name: tuple(p.shape) for name, p in enc.named_parameters()}
    assert fixed == {name: tuple(b.shape) for name, b in enc.named_buffers()}
    assert all(p.requires_grad for p in enc.parameters())
    assert set(enc.full_precision_buffers) <= set(fixed)  # only buffers can be kept in float32
    n_learned = enc.num_learned_parameters()
    assert isinstance(n_learned, int)
    assert n_learned == sum(p.numel() for p in enc.parameters())


def test_num_learned_parameters_counts_the_declared_shapes():
    """The count is read from declared_parameters (so a subclass need only declare its tensors)."""

    class Declared(pebook.PositionalEncoding):
        name = "declared"

        def declared_parameters(self):
            return {"a": ((3, 4), True), "b": ((5,), True), "c": ((7, 7), False), "d": ((), True)}

    assert Declared().num_learned_parameters() == 3 * 4 + 5 + 1


# ---------------------------------------------------------------- hooks


def test_only_the_hook_of_its_place_acts(encoding_name, device, rand, ref):
    """embed / rotate / logit_bias of another place are None / identity / None, and attend is plain
    softmax(q kᵀ/√d + logit_bias) v unless attend is the encoding's own hook (key_value: Shaw;
    contextual: CoPE)."""
    enc = build(encoding_name).double().to(device)
    b, h, lq, lk, d = 2, 4, 3, 6, 4
    q, k, v = rand(b, h, lq, d, seed=1, device=device), *(rand(b, h, lk, d, seed=s, device=device) for s in (2, 3))
    q_pos, k_pos = positions(b, lq, 0, device=device) + 1, positions(b, lk, 1, device=device) + 1

    embedded = enc.embed(q_pos, F64)
    if enc.place == "input":
        assert embedded.shape == (b, lq, 16) and embedded.dtype == F64 and embedded.device.type == device.type
    else:
        assert embedded is None

    rotated = enc.rotate(q, q_pos)
    if enc.place == "qk":
        assert rotated.shape == q.shape and not torch.allclose(rotated, q)  # positions >= 1 move it
    else:
        assert torch.equal(rotated, q)

    bias = enc.logit_bias(q_pos, k_pos)
    if enc.place == "logits":
        assert bias.shape == (b, h, lq, lk) and bias.device.type == device.type
    else:
        assert bias is None

    out = enc.attend(q, k, v, q_pos, k_pos, causal=True, scale=None)  # storage order
    plain = ref.attention(q, k, v, bias=bias, causal=True)
    assert out.shape == (b, h, lq, d)
    if enc.place in ("key_value", "contextual"):
        assert not torch.allclose(out, plain)
    else:
        torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)


def test_attend_uses_a_precomputed_bias_and_scale(bias_encoding_name, device, rand):
    """A model computes a shared encoding's bias once and hands it to every layer's attend: that
    bias replaces the encoding's own, and ``scale`` replaces 1/√d."""
    enc = build(bias_encoding_name).double().to(device)
    q, k, v = (rand(1, 4, 5, 4, seed=s, device=device) for s in (4, 5, 6))
    pos = torch.arange(5, device=device)[None]
    other = rand(1, 4, 5, 5, seed=7, device=device)
    out = enc.attend(q, k, v, pos, pos, causal=False, scale=0.5, bias=other)
    expected = ((q @ k.transpose(-1, -2)) * 0.5 + other).softmax(-1) @ v
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@given(b=st.integers(1, 3), lq=st.integers(1, 5), lk=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_logit_bias_is_pointwise_per_sequence(bias_encoding_name, device, b, lq, lk, seed):
    """Row b of a batched bias is the bias of sequence b alone, and the bias of one (query, key)
    pair is the same whatever else is in the grid: score is a pointwise function."""
    enc = build(bias_encoding_name).double().to(device)
    q_pos, k_pos = positions(b, lq, seed, 300, device=device), positions(b, lk, seed + 1, 300, device=device)
    bias = enc.logit_bias(q_pos, k_pos)
    assert bias.shape == (b, 4, lq, lk) and bias.dtype == F64
    for row in range(b):
        assert torch.equal(bias[row], enc.logit_bias(q_pos[row : row + 1], k_pos[row : row + 1])[0])
    single = enc.logit_bias(q_pos[-1:, -1:], k_pos[-1:, :1])
    assert torch.equal(single[0, :, 0, 0], bias[-1, :, -1, 0])


# ---------------------------------------------------------------- FlexAttention score_mod


@FLEX_EAGER
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_score_mod_in_flex_attention_equals_sdpa_with_the_materialised_bias(
    bias_encoding_name, device, rand, ref, causal, kv_heads
):
    """Keys longer than queries (a KV cache), batched non-contiguous position ids that are not
    the storage order, float64: FlexAttention with score_mod and SDPA with logit_bias agree to
    1e-12 (the causal mask of both follows storage order)."""
    enc = build(bias_encoding_name, causal=causal).double().to(device)
    b, h, lq, lk, d = 2, 4, 3, 7, 4
    q = rand(b, h, lq, d, seed=10, device=device)
    k, v = rand(b, kv_heads, lk, d, seed=11, device=device), rand(b, kv_heads, lk, d, seed=12, device=device)
    q_pos, k_pos = positions(b, lq, 13, device=device), positions(b, lk, 14, device=device)
    flex = flex_attention(q, k, v, score_mod=enc.score_mod(q_pos, k_pos, causal=causal), enable_gqa=kv_heads != h)
    sdpa = pebook.positional_attention(q, k, v, enc, causal=causal, position_ids=q_pos, key_position_ids=k_pos)
    torch.testing.assert_close(flex, sdpa, rtol=1e-12, atol=1e-12)
    # and both are softmax(q kᵀ/√d + bias) v with the bias on the grid of positions
    k, v = k.repeat_interleave(h // kv_heads, dim=1), v.repeat_interleave(h // kv_heads, dim=1)
    expected = ref.attention(q, k, v, bias=enc.logit_bias(q_pos, k_pos), causal=causal)
    torch.testing.assert_close(sdpa, expected, rtol=1e-12, atol=1e-12)


@FLEX_EAGER
def test_score_mod_at_default_positions(bias_encoding_name, device, rand, ref):
    """Self-attention at positions 0 … L-1: flex with score_mod equals the float64 reference."""
    enc = build(bias_encoding_name).double().to(device)
    q, k, v = (rand(1, 4, 6, 4, seed=s, device=device) for s in (20, 21, 22))
    pos = torch.arange(6, device=device)[None]
    flex = flex_attention(q, k, v, score_mod=enc.score_mod(pos, pos, causal=True))
    torch.testing.assert_close(flex, ref.attention(q, k, v, bias=enc.logit_bias(pos, pos)), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("cast", list(CASTS))
def test_half_precision_keeps_full_precision_buffers(encoding_name, device, cast):
    torch.manual_seed(0)
    mha = pebook.MultiHeadAttention(16, 4, encoding_name, **example_options(encoding_name)).to(device)
    x = torch.randn(2, 7, 16, device=device)
    with torch.no_grad():
        expected = mha(x)
    low = CASTS[cast](copy.deepcopy(mha))
    dtype = CAST_DTYPE[cast]
    kept = type(low.position).full_precision_buffers
    for name in kept:
        buffer = getattr(low.position, name)
        assert buffer.dtype == torch.float32, name
        assert buffer.device.type == device.type
        assert torch.equal(buffer, getattr(mha.position, name))  # not rounded on the way
    for name, tensor in [*low.named_parameters(), *low.named_buffers()]:
        if name.split(".")[-1] not in kept:
            assert tensor.dtype == dtype, name
    with torch.no_grad():
        out = low(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=CAST_ATOL[dtype])
    # and back: float() restores float32 everywhere
    assert all(t.dtype == torch.float32 for t in [*low.float().parameters(), *low.buffers()])
