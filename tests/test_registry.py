"""pebook.registry: ``ENCODINGS`` (name -> class), ``build_encoding``, ``encoding_options``.

The registry is the only list of encodings in pebook; these tests read it rather than naming the
encodings, except for a few frozen snapshots of specific options. The last test registers a toy
logit-bias encoding at runtime and runs it through MultiHeadAttention and TinyLM by name: adding
an encoding is one module plus one registry line.
"""

import inspect
import re

import pytest
import torch
from registry_cases import example_options

import pebook
from pebook.registry import STRUCTURAL_ARGUMENTS, check_encoding

F64 = torch.float64
SHAPE = dict(dim=16, n_heads=4, head_dim=4, causal=True)


# ---------------------------------------------------------------- the mapping


def test_every_entry_is_an_encoding_class_named_by_its_key(encoding_name):
    """Each class is a PositionalEncoding whose ``name`` is its key (so names are unique: a class
    registered under two keys would disagree with one of them)."""
    cls = pebook.ENCODINGS[encoding_name]
    assert inspect.isclass(cls) and issubclass(cls, pebook.PositionalEncoding)
    assert cls.name == encoding_name
    assert pebook.ENCODINGS is pebook.registry.ENCODINGS  # one mapping, re-exported


def named_parameters(cls):
    """The named parameters of ``cls.__init__`` (not ``self``, nor nn.Module's ``*args, **kwargs``)."""
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p for p in parameters if p.kind not in kinds}


def test_constructors_take_keyword_arguments_only(encoding_name):
    """The registry passes the structural arguments by keyword; options are keywords too, and
    building passes only the structural arguments a class names (NoPE takes none)."""
    cls = pebook.ENCODINGS[encoding_name]
    assert all(p.kind == p.KEYWORD_ONLY for p in named_parameters(cls).values())
    with pytest.raises(TypeError):
        cls(*SHAPE.values())  # positionally: refused


def test_encoding_options_are_the_constructor_options(encoding_name):
    cls = pebook.ENCODINGS[encoding_name]
    options = pebook.encoding_options(encoding_name)
    signature = named_parameters(cls)
    assert set(options) == set(signature) - set(STRUCTURAL_ARGUMENTS)
    assert all(options[name] == signature[name].default for name in options)
    assert set(example_options(encoding_name)) <= set(options)
    # every option given explicitly at its default builds the same encoding as leaving it out
    defaults = {name: value for name, value in options.items() if value is not inspect.Parameter.empty}
    required = {name: example_options(encoding_name)[name] for name in set(options) - set(defaults)}
    explicit = pebook.build_encoding(encoding_name, **SHAPE, **defaults, **required)
    implicit = pebook.build_encoding(encoding_name, **SHAPE, **required)
    assert type(explicit) is cls and repr(explicit) == repr(implicit)
    assert explicit.declared_parameters() == implicit.declared_parameters()


def test_snapshot_options():
    """The documented options of three encodings (pebook/registry.py, /work/notes/api.md)."""
    assert pebook.encoding_options("rope") == {"rope_base": 10000.0, "rope_layout": "half", "rotary_dim": None}
    assert pebook.encoding_options("learned") == {"max_positions": inspect.Parameter.empty, "init_std": 0.02}
    assert pebook.encoding_options("t5") == {"num_buckets": 32, "t5_max_distance": 128}
    assert pebook.encoding_options("none") == {}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", [name for name, cls in pebook.ENCODINGS.items() if "causal" in named_parameters(cls)])
def test_build_passes_causal_to_the_encodings_that_take_it(name, causal):
    """An encoding that names ``causal`` gets the layer's (ALiBi's sign, T5's bidirectional buckets)."""
    enc = pebook.build_encoding(name, **(SHAPE | {"causal": causal}), **example_options(name))
    assert enc.causal is causal


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["rotary", "ROPE", "", "t5 "])
def test_unknown_name_lists_the_registered_ones(name):
    listed = re.escape(str(tuple(pebook.ENCODINGS)))
    with pytest.raises(ValueError, match=rf"encoding must be one of {listed}, got {re.escape(repr(name))}$"):
        pebook.build_encoding(name, **SHAPE)
    with pytest.raises(ValueError, match=rf"encoding must be one of {listed}, got {re.escape(repr(name))}$"):
        pebook.encoding_options(name)
    with pytest.raises(ValueError, match=rf"encoding must be one of {listed}"):
        check_encoding(name)


def test_a_class_is_not_a_name():
    with pytest.raises(ValueError, match=r"encoding must be one of .*got <class 'pebook.rope.RoPE'>"):
        pebook.build_encoding(pebook.RoPE, **SHAPE)
    assert check_encoding("rope") == "rope"


def test_unknown_option_names_it_and_the_allowed_ones(encoding_name):
    allowed = sorted(pebook.encoding_options(encoding_name)) or "none"
    pattern = rf"encoding='{encoding_name}' takes no option 'bogus'; its options are {re.escape(str(allowed))}$"
    with pytest.raises(TypeError, match=pattern):
        pebook.build_encoding(encoding_name, **SHAPE, **example_options(encoding_name), bogus=1)


def test_snapshot_unknown_option_message():
    with pytest.raises(
        TypeError,
        match=r"encoding='rope' takes no option 'rope_bsae'; "
        r"its options are \['rope_base', 'rope_layout', 'rotary_dim'\]$",
    ):
        pebook.build_encoding("rope", **SHAPE, rope_bsae=500000.0)
    with pytest.raises(TypeError, match=r"encoding='none' takes no option 'max_distance'; its options are none$"):
        pebook.build_encoding("none", **SHAPE, max_distance=3)


def test_missing_required_option_is_named():
    with pytest.raises(TypeError, match=r"encoding='learned' needs the option 'max_positions'$"):
        pebook.build_encoding("learned", **SHAPE)


# ---------------------------------------------------------------- a new encoding in one registry line


class ConstantSlopeBias(pebook.LogitBias):
    """A toy logit bias: head h adds -(h + 1) · slope · |i - j| (a symmetric ALiBi with linear slopes)."""

    name = "constant_slope"
    shared_across_layers = True
    example_options = {"slope": 0.25}

    def __init__(self, *, n_heads: int, causal: bool = True, slope: float = 0.5):
        super().__init__()
        self.n_heads, self.causal, self.slope = n_heads, causal, slope

    def score(self, head, q_pos, k_pos):
        return -self.slope * (head + 1).to(F64) * (q_pos - k_pos).abs()


@pytest.fixture
def toy(monkeypatch):
    """``constant_slope`` registered for the duration of one test (undone by monkeypatch)."""
    monkeypatch.setitem(pebook.registry.ENCODINGS, ConstantSlopeBias.name, ConstantSlopeBias)
    return ConstantSlopeBias.name


def toy_bias_ref(n_heads, slope, q_positions, k_positions):
    """-(h + 1) · slope · |i - j|, element by element."""
    return torch.tensor(
        [[[-(h + 1) * slope * abs(i - j) for j in k_positions] for i in q_positions] for h in range(n_heads)],
        dtype=F64,
    )


def test_a_runtime_registered_encoding_is_available_by_name(toy, rand, ref):
    assert toy in pebook.ENCODINGS and pebook.encoding_options(toy) == {"slope": 0.5}
    with pytest.raises(
        TypeError, match=r"encoding='constant_slope' takes no option 'slop'; its options are \['slope'\]"
    ):
        pebook.build_encoding(toy, **SHAPE, slop=1.0)

    # positional_attention with the module: the base class materialises score on the grid
    enc = pebook.build_encoding(toy, **SHAPE, slope=0.25)
    q, k, v = (rand(2, 4, n, 4, seed=s, device="cpu") for s, n in ((0, 3), (1, 5), (2, 5)))
    out = pebook.positional_attention(q, k, v, enc)
    bias = toy_bias_ref(4, 0.25, range(2, 5), range(5))
    torch.testing.assert_close(out, ref.attention(q, k, v, bias=bias), rtol=1e-12, atol=1e-12)

    # MultiHeadAttention by name, options and all; causal reaches the encoding
    torch.manual_seed(0)
    mha = pebook.MultiHeadAttention(16, 4, toy, causal=False, slope=0.25).double()
    assert type(mha.position) is ConstantSlopeBias and mha.encoding == toy
    assert mha.position.causal is False and mha.position.slope == 0.25
    x = rand(2, 6, 16, seed=3, device="cpu")
    full = mha(x)
    assert full.shape == (2, 6, 16) and torch.isfinite(full).all()

    # a causal layer: decoding token by token with the cache equals the full forward
    causal = pebook.MultiHeadAttention(16, 4, toy).double()
    expected = causal(x)
    _, cache = causal(x[:, :3], return_kv=True)
    for t in range(3, 6):
        step, cache = causal(x[:, t : t + 1], past_kv=cache, return_kv=True)
        torch.testing.assert_close(step, expected[:, t : t + 1], rtol=1e-12, atol=1e-12)


def test_a_runtime_registered_encoding_runs_in_tiny_lm(toy):
    torch.manual_seed(0)
    model = pebook.TinyLM(50, 16, 2, 4, 32, encoding=toy, slope=0.125).double().eval()
    # shared across layers: one module for every block, as the class declares
    assert model.encoding_module is model.blocks[0].attn.position is model.blocks[1].attn.position
    assert model.encoding_module.slope == 0.125
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        logits, cache = model(tokens[:, :4], return_kv=True)
        steps = [logits]
        for t in range(4, 9):
            logits, cache = model(tokens[:, t : t + 1], past_kvs=cache, return_kv=True)
            steps.append(logits)
    assert full.shape == (2, 9, 50) and cache.length == 9 and len(cache) == 2
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    # the toy is a real position signal: reordering the tokens before the last changes its logits
    reordered = torch.cat((tokens[:, :-1].flip(1), tokens[:, -1:]), dim=1)
    with torch.no_grad():
        assert (model(reordered)[:, -1] - full[:, -1]).abs().max() > 1e-3
