"""pebook.model: TransformerBlock and TinyLM, for every registered encoding.

Reference: ``ref.tiny_lm`` (conftest) writes the pre-LN decoder out in float64 with the model's own
parameters (token embedding, an input encoding once, x + attn(LN x), x + MLP(LN x), final LN,
unembedding); its attention is ``ref.mha``, which takes from the encoding only what its declared
``place`` contributes. Encodings come from the registry; where a test needs to know how an
encoding is wired it reads the encoding's declarations (``place``, ``shared_across_layers``,
``full_precision_buffers``, ``num_learned_parameters()``, ``check_positions``), never its name.
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_cases import ENCODING_NAMES, example_options, model_options

from pebook import ENCODINGS, KVCache, LearnedPE, TinyLM, TransformerBlock

F64 = torch.float64
VOCAB, DIM, LAYERS, HEADS, MAX_POS = 11, 16, 2, 2, 12
#: encodings without a rotary frequency to set
NOT_ROTARY = tuple(n for n, c in ENCODINGS.items() if not hasattr(c, "set_frequencies"))


def make_lm(name, *, device="cpu", dtype=F64, seed=0, n_layers=LAYERS, n_heads=HEADS, max_positions=MAX_POS, **kwargs):
    torch.manual_seed(seed)
    model = TinyLM(VOCAB, DIM, n_layers, n_heads, max_positions, name, **(model_options(name) | kwargs))
    return model.to(device=device, dtype=dtype)


def tokens_for(*shape, seed, device="cpu"):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def encoding_modules(model):
    """Every distinct encoding module of a model (the model's own and its layers')."""
    modules = [model.position] + [block.attn.position for block in model.blocks]
    return list({id(m): m for m in modules if m is not None}.values())


# ---------------------------------------------------------------- (1) reference


@pytest.mark.parametrize("n_heads,n_kv_heads", [(2, None), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_logits_match_reference(device, ref, encoding_name, n_heads, n_kv_heads):
    model = make_lm(encoding_name, device=device, n_heads=n_heads, n_kv_heads=n_kv_heads)
    tokens = tokens_for(3, 9, seed=1, device=device)
    with torch.no_grad():
        logits = model(tokens)
        expected = ref.tiny_lm(model, tokens)
    assert logits.shape == (3, 9, VOCAB) and logits.dtype == F64 and logits.device.type == device.type
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


def test_logits_with_position_ids_match_reference(device, ref, encoding_name):
    model = make_lm(encoding_name, device=device)
    tokens = tokens_for(2, 7, seed=2, device=device)
    position_ids = torch.tensor([[4, 5, 6, 7, 8, 9, 10], [0, 0, 1, 1, 2, 2, 3]], device=device)
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens, position_ids=position_ids), ref.tiny_lm(model, tokens, position_ids), rtol=1e-12, atol=1e-12
        )


def test_float32_logits_match_reference(device, ref, encoding_name):
    model = make_lm(encoding_name, device=device, dtype=torch.float32)
    tokens = tokens_for(2, 8, seed=2, device=device)
    with torch.no_grad():
        logits = model(tokens)
        expected = ref.tiny_lm(model, tokens)
    assert logits.dtype == torch.float32
    # two layers of float32 LayerNorm/attention/MLP on O(1) activations
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)


def test_transformer_block_is_pre_ln(device, ref, encoding_name):
    torch.manual_seed(0)
    block = TransformerBlock(DIM, HEADS, encoding_name, **example_options(encoding_name)).to(device=device, dtype=F64)
    assert block.attn.causal and block.attn.encoding == encoding_name
    x = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(3), dtype=F64).to(device)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref.block(block, x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, dim=16\), got \(2, 7, 8\)"):
        block(x[..., :8])
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        block(x.long())


def test_check_inputs_then_forward_trusted_is_forward(device, encoding_name):
    model = make_lm(encoding_name, device=device)
    tokens = tokens_for(2, 5, seed=3, device=device).int()
    checked, q_pos, past_len = model.check_inputs(tokens)
    assert checked.dtype == torch.int64 and past_len == 0
    assert torch.equal(q_pos, torch.arange(5, device=device).expand(2, 5))
    with torch.no_grad():
        assert torch.equal(model.forward_trusted(checked, q_pos), model(tokens))


# ---------------------------------------------------------------- (2) how the encoding is wired


def test_encoding_is_wired_as_it_declares(encoding_name):
    """An "input" encoding belongs to the model and is added once (the blocks get no encoding); an
    encoding shared across layers is one module in every block; any other is one module per block."""
    cls = ENCODINGS[encoding_name]
    model = make_lm(encoding_name, n_layers=3)
    layer_modules = [block.attn.position for block in model.blocks]
    assert isinstance(model.encoding_module, cls) and model.encoding == encoding_name
    if cls.place == "input":
        assert model.position is model.encoding_module
        assert all(m.place == "none" for m in layer_modules)
    else:
        assert model.position is None and model.encoding_module is layer_modules[0]
        assert all(isinstance(m, cls) for m in layer_modules)
        distinct = len({id(m) for m in layer_modules})
        assert distinct == (1 if cls.shared_across_layers else 3)


@pytest.mark.parametrize("n_kv_heads", [None, 1])
def test_parameter_count(encoding_name, n_kv_heads):
    """Base model plus the encoding's learned parameters: once for a model-level ("input") or shared
    encoding, once per layer otherwise. Read from the encoding, never a table of names."""
    model = make_lm(encoding_name, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads)
    hd, kv = DIM // 4, n_kv_heads or 4
    qkv = DIM * (4 + 2 * kv) * hd + (4 + 2 * kv) * hd
    block = 2 * 2 * DIM + qkv + DIM * DIM + DIM + DIM * 4 * DIM + 4 * DIM + 4 * DIM * DIM + DIM
    base = VOCAB * DIM + 3 * block + 2 * DIM + DIM * VOCAB
    cls = ENCODINGS[encoding_name]
    copies = 1 if cls.shared_across_layers or cls.place == "input" else 3
    assert n_params(model) == base + copies * model.encoding_module.num_learned_parameters()


def test_logit_bias_is_computed_once_per_forward(monkeypatch, bias_encoding_name):
    """A bias shared across layers (T5's one table, ALiBi's fixed slopes) is computed once per call
    and handed to every layer; a per-layer bias once per layer. Also while decoding."""
    model = make_lm(bias_encoding_name, n_layers=3)
    calls = []
    for module in encoding_modules(model):
        original = module.logit_bias

        def counting(q_pos, k_pos, original=original):
            calls.append(q_pos.shape)
            return original(q_pos, k_pos)

        monkeypatch.setattr(module, "logit_bias", counting)
    per_call = 1 if ENCODINGS[bias_encoding_name].shared_across_layers else 3
    tokens = tokens_for(2, 6, seed=4)
    with torch.no_grad():
        full = model(tokens)
        assert len(calls) == per_call
        _, cache = model(tokens[:, :4], return_kv=True)
        for t in (4, 5):
            logits, cache = model(tokens[:, t : t + 1], past_kvs=cache, return_kv=True)
    assert len(calls) == 4 * per_call
    torch.testing.assert_close(logits[:, 0], full[:, 5], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_tokens_of_any_integer_dtype(device, encoding_name, dtype):
    model = make_lm(encoding_name, device=device)
    tokens = tokens_for(2, 6, seed=5, device=device)
    with torch.no_grad():
        assert torch.equal(model(tokens.to(dtype)), model(tokens))


@pytest.mark.parametrize("convert", ["half", "bfloat16", "to_float16"])
def test_half_precision_keeps_full_precision_buffers(device, encoding_name, convert):
    """`.half()`, `.bfloat16()` and `.to(torch.float16)` run every encoding; the buffers an encoding
    declares full precision (RoPE's inv_freq, ALiBi's slopes) stay float32, everything else follows;
    logits stay close to the float32 model's (observed max differences 1.4e-3 in float16 and
    1.2e-2 in bfloat16 on O(1) logits)."""
    model = make_lm(encoding_name, device=device, dtype=torch.float32)
    tokens = tokens_for(2, 9, seed=6, device=device)
    with torch.no_grad():
        reference = model(tokens)
    dtype = torch.bfloat16 if convert == "bfloat16" else torch.float16
    half = {"half": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16(), "to_float16": lambda m: m.to(dtype)}[
        convert
    ](copy.deepcopy(model))
    kept = {(id(m), name) for m in encoding_modules(half) for name in m.full_precision_buffers}
    for module in half.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            expected = torch.float32 if (id(module), name) in kept else dtype
            assert tensor.dtype == expected, (type(module).__name__, name)
    with torch.no_grad():
        logits = half(tokens)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    tol = 5e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(logits.float(), reference, rtol=tol, atol=tol)


# ---------------------------------------------------------------- (3) properties


@settings(max_examples=5)
@given(t=st.integers(0, 8), seed=st.integers(0, 2**31))
def test_tinylm_is_causal(device, encoding_name, t, seed):
    """Logits at position t ignore every token after t (and do depend on token t)."""
    model = make_lm(encoding_name, device=device)
    tokens = tokens_for(2, 10, seed=seed, device=device)
    changed_later = tokens.clone()
    changed_later[:, t + 1 :] = (tokens[:, t + 1 :] + 1 + torch.arange(9 - t, device=device)) % VOCAB
    changed_here = tokens.clone()
    changed_here[:, t] = (tokens[:, t] + 1) % VOCAB
    with torch.no_grad():
        base, later, here = model(tokens), model(changed_later), model(changed_here)
    torch.testing.assert_close(later[:, : t + 1], base[:, : t + 1], rtol=1e-12, atol=1e-12)
    assert (here[:, t] - base[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("n_heads,n_kv_heads", [(2, None), (4, 2)], ids=["mha", "gqa"])
def test_kv_cache_equals_full_forward(device, encoding_name, n_heads, n_kv_heads):
    """Prefill 3 tokens, then 2 at a time with past_kvs: each call's logits equal the full forward's
    (float64), positions continue from the cache, and the cache holds n_kv_heads heads per layer."""
    model = make_lm(encoding_name, device=device, n_heads=n_heads, n_kv_heads=n_kv_heads)
    tokens = tokens_for(2, 9, seed=7, device=device)
    with torch.no_grad():
        full = model(tokens)
        logits, cache = model(tokens[:, :3], return_kv=True)
        steps = [logits]
        for t in range(3, 9, 2):
            logits, cache = model(tokens[:, t : t + 2], past_kvs=cache, return_kv=True)
            steps.append(logits)
        given_ids = model(
            tokens[:, 7:],
            past_kvs=KVCache([(k[:, :, :7], v[:, :, :7]) for k, v in cache], cache.positions[:, :7]),
            position_ids=torch.tensor([7, 8], device=device).expand(2, 2),
        )
    assert len(cache) == LAYERS and cache.length == 9
    assert all(k.shape == v.shape == (2, model.n_kv_heads, 9, DIM // n_heads) for k, v in cache)
    assert model.n_kv_heads == (n_kv_heads or n_heads)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(given_ids, full[:, 7:], rtol=1e-12, atol=1e-12)


def test_models_run_beyond_max_positions_unless_the_encoding_cannot(device, encoding_name):
    """max_positions sizes a learned table; for every other encoding it only records the training
    length and longer inputs run (what an extrapolation experiment needs). Whether an encoding can
    place a position is its own check_positions."""
    model = make_lm(encoding_name, device=device)
    tokens = tokens_for(1, 3 * MAX_POS, seed=8, device=device)
    try:
        model.encoding_module.check_positions(3 * MAX_POS - 1)
    except ValueError as err:
        with pytest.raises(ValueError, match=re.escape(str(err))):
            model(tokens)
    else:
        with torch.no_grad():
            logits = model(tokens)
        assert logits.shape == (1, 3 * MAX_POS, VOCAB) and torch.isfinite(logits).all()


def test_learned_table_overflow_is_a_clear_error(device):
    model = make_lm(LearnedPE.name, device=device)
    message = rf"position {MAX_POS} is beyond this learned table: it has max_positions={MAX_POS} rows"
    with torch.no_grad():
        _, cache = model(tokens_for(1, MAX_POS, seed=9, device=device), return_kv=True)
        with pytest.raises(ValueError, match=message):
            model(tokens_for(1, MAX_POS + 1, seed=9, device=device))
        with pytest.raises(ValueError, match=message):
            model(tokens_for(1, 1, seed=10, device=device), past_kvs=cache)
        if device.type == "cpu":  # given ids are checked on the CPU (a GPU check would synchronise)
            with pytest.raises(ValueError, match=rf"position 20 is beyond .*max_positions={MAX_POS}"):
                model(tokens_for(1, 2, seed=10, device=device), position_ids=torch.tensor([[0, 20]]))


@pytest.mark.parametrize("name", NOT_ROTARY)
def test_set_rope_frequencies_needs_a_rotary_encoding(name):
    with pytest.raises(
        ValueError, match=rf"set_rope_frequencies needs a rotary encoding, this model has encoding='{name}'"
    ):
        make_lm(name).set_rope_frequencies(torch.ones(DIM // HEADS // 2))


def test_a_short_training_run_learns_a_repeated_sequence(device, encoding_name):
    """30 Adam steps on a repeated 8-token pattern: the next-token loss falls below half its initial
    value (initially ≈ ln 11 ≈ 2.4; seeded, observed final/initial < 0.2 for every encoding), and
    every parameter, the encoding's included, receives a gradient."""
    model = make_lm(encoding_name, device=device, dtype=torch.float32)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6], device=device)
    tokens = pattern.repeat(2, 3)[:, :MAX_POS]  # (2, 12): within a learned table
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1.5
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- (4) frozen snapshots


def test_snapshot_parameter_count_by_hand():
    """TinyLM(11, 16, 2 layers, 2 heads, 12 positions) with no encoding, counted by hand: token
    embedding 11·16 = 176; per block 2 LayerNorms 2·(2·16) = 64, qkv 16·48 + 48 = 816, out
    16·16 + 16 = 272, MLP 16·64 + 64 + 64·16 + 16 = 2128, i.e. 3280; final LayerNorm 32; lm_head
    16·11 = 176. Total 176 + 2·3280 + 32 + 176 = 6944."""
    name = next(n for n, c in ENCODINGS.items() if c.place == "none")
    assert n_params(make_lm(name)) == 6944


def test_snapshot_gpt2_small_parameter_count():
    """TinyLM(50257, 768, 12, 12, 1024, "learned") has GPT-2 small's architecture (pre-LN blocks,
    biased projections, 4× GELU MLP, learned 1024-position table); GPT-2 ties its unembedding to
    the token embedding, TinyLM does not. GPT-2 small has 124,439,808 parameters (the
    transformers checkpoint ``gpt2``), so TinyLM must have that plus 50257·768 = 38,597,376.
    Built on the meta device: no memory is allocated."""
    with torch.device("meta"):
        model = TinyLM(50257, 768, 12, 12, 1024, LearnedPE.name)
    assert n_params(model) == 124_439_808 + 50257 * 768


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args,kwargs,error,pattern",
    [
        ((0, DIM, LAYERS, HEADS, MAX_POS), {}, ValueError, r"vocab_size must be an int >= 1, got 0$"),
        ((VOCAB, 0, LAYERS, HEADS, MAX_POS), {}, ValueError, r"dim must be an int >= 1, got 0$"),
        ((VOCAB, DIM, 0, HEADS, MAX_POS), {}, ValueError, r"n_layers must be an int >= 1, got 0$"),
        ((VOCAB, DIM, LAYERS, 0, MAX_POS), {}, ValueError, r"n_heads must be an int >= 1, got 0$"),
        ((VOCAB, DIM, LAYERS, 3, MAX_POS), {}, ValueError, r"dim=16 must be divisible by n_heads=3"),
        ((VOCAB, DIM, LAYERS, HEADS, 0), {}, ValueError, r"max_positions must be an int >= 1, got 0$"),
        ((VOCAB, DIM, LAYERS, HEADS, -5), {}, ValueError, r"max_positions must be an int >= 1, got -5$"),
        ((VOCAB, DIM, True, HEADS, MAX_POS), {}, TypeError, r"n_layers must be an int, got True of type bool"),
        ((VOCAB, DIM, LAYERS, 4, MAX_POS), dict(n_kv_heads=3), ValueError, r"n_kv_heads=3 must divide n_heads=4"),
        ((VOCAB, DIM, LAYERS, HEADS, MAX_POS), dict(scale=0.0), ValueError, r"scale must be a finite number > 0"),
    ],
)
def test_bad_construction_is_rejected(encoding_name, args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        TinyLM(*args, encoding_name, **model_options(encoding_name), **kwargs)


@pytest.mark.parametrize("name", ["unknown_pe", "Rope", None])
def test_unknown_encoding_is_rejected(name):
    with pytest.raises(ValueError, match=rf"encoding must be one of \('none', .*\), got {re.escape(repr(name))}"):
        TinyLM(VOCAB, DIM, LAYERS, HEADS, MAX_POS, name)


def test_unknown_option_is_rejected(encoding_name):
    with pytest.raises(TypeError, match=rf"encoding='{encoding_name}' takes no option 'colour'"):
        make_lm(encoding_name, colour="red")


def test_bad_tokens_are_rejected(device):
    model = make_lm(ENCODING_NAMES[0], device=device)
    with pytest.raises(
        ValueError, match=rf"tokens must lie in \[0, vocab_size={VOCAB}\), got values in \[0, {VOCAB}\]"
    ):
        model(torch.tensor([[0, 3, VOCAB]], device=device))
    with pytest.raises(ValueError, match=rf"tokens must lie in \[0, vocab_size={VOCAB}\), got values in \[-1, 4\]"):
        model(torch.tensor([[-1, 4]], device=device))
    with pytest.raises(ValueError, match=rf"tokens must lie in \[0, vocab_size={VOCAB}\), got values in \[0, 200\]"):
        model(torch.tensor([[0, 200]], dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match=r"tokens must have shape \(batch >= 1, seq >= 1\), got shape \(2, 0\)"):
        model(torch.zeros(2, 0, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor, got dtype torch.float32"):
        model(torch.zeros(1, 3, device=device))
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor, got dtype torch.bool"):
        model(torch.zeros(1, 3, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"tokens must have 2 dimensions, got shape \(3,\)"):
        model(torch.zeros(3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"tokens must be a torch.Tensor, got list"):
        model([[1, 2]])


def test_bad_position_ids_are_rejected(device):
    model = make_lm(ENCODING_NAMES[0], device=device)
    tokens = tokens_for(2, 3, seed=11, device=device)
    with pytest.raises(ValueError, match=r"position_ids must have shape \(3,\) or \(2, 3\), got \(2, 2\)"):
        model(tokens, position_ids=torch.zeros(2, 2, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"position_ids must be an integer tensor, got dtype torch.float32"):
        model(tokens, position_ids=torch.zeros(2, 3, device=device))
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"position_ids must be >= 0, got a minimum of -1"):
            model(tokens, position_ids=torch.tensor([0, -1, 2]))


def test_bad_past_kvs_are_rejected(device, encoding_name):
    model = make_lm(encoding_name, device=device, n_heads=4, n_kv_heads=2)
    prompt, step = tokens_for(2, 4, seed=12, device=device), tokens_for(2, 1, seed=13, device=device)
    with torch.no_grad():
        _, cache = model(prompt, return_kv=True)
    with pytest.raises(TypeError, match=r"past_kvs must be the KVCache returned with return_kv=True, got list"):
        model(step, past_kvs=list(cache))
    with pytest.raises(ValueError, match=rf"past_kvs holds 1 layers but this model has n_layers={LAYERS}"):
        model(step, past_kvs=KVCache(cache.layers[:1], cache.positions))
    (k0, v0), (k, v) = cache
    with pytest.raises(
        ValueError, match=r"past_kvs\[1\]\.k has shape \(2, 4, 4, 4\) but this model caches \(batch, n_kv_heads=2,"
    ):
        model(step, past_kvs=KVCache([(k0, v0), (k.repeat(1, 2, 1, 1), v)], cache.positions))
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.k holds batch size 2 but the new tokens have batch size 1"):
        model(step[:1], past_kvs=cache)
    with pytest.raises(ValueError, match=r"past_kvs\[1\]\.v holds 3 positions but the cache's positions hold 4"):
        model(step, past_kvs=KVCache([(k0, v0), (k, v[:, :, :3])], cache.positions))
    with pytest.raises(
        TypeError, match=r"past_kvs\[0\]\.k has dtype torch.float32 but the model computes in torch.float64"
    ):
        model(step, past_kvs=KVCache([(k0.float(), v0), (k, v)], cache.positions))
    with pytest.raises(TypeError, match=r"past_kvs\[1\] must be a \(k, v\) pair, got NoneType"):
        model(step, past_kvs=KVCache([(k0, v0), None], cache.positions))
