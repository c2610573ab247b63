"""Batched generation with left padding, for every registered encoding.

A batch of prompts of different lengths is left-padded, with the ``attention_mask`` of
``transformers`` (1 token, 0 padding, ``padding_side="left"``) and ``position_ids =
cumsum(attention_mask) - 1``. The reference is each prompt alone, unpadded: the padded batch must
give the same logits at the real tokens (float64, 1e-10) and the same greedy tokens, with and
without the KV cache, for every encoding, grouped-query models and partial rotary RoPE. Bad masks
(wrong shape, wrong values, right padding, holes, empty rows) raise errors naming
``attention_mask``; no mask, or a mask of ones, is the unpadded path bit for bit.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_cases import ENCODING_NAMES, layer_options, model_options

import pebook as pb
from pebook import KVCache, TinyLM
from pebook import generation as gen

F64 = torch.float64
VOCAB, DIM, LAYERS, HEADS, MAX_POS = 13, 16, 2, 2, 24
LENGTHS = (3, 7, 5)
NEW = 6
SHAPES = {
    "mha": {},
    "gqa": dict(n_heads=4, n_kv_heads=2),
}
SHAPE_IDS = list(SHAPES)


def make_lm(name, *, device="cpu", dtype=F64, seed=0, n_heads=HEADS, max_positions=MAX_POS, **kw):
    torch.manual_seed(seed)
    model = TinyLM(VOCAB, DIM, LAYERS, n_heads, max_positions, name, **(model_options(name) | kw))
    return model.to(device=device, dtype=dtype)


def prompts_for(lengths, *, seed, device, pad_extra=0, pad_id=0):
    """Unpadded prompts ``(1, n)`` and their left-padded batch and mask ``(batch, max + pad_extra)``."""
    gen_ = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=gen_).to(device) for n in lengths]
    width = max(lengths) + pad_extra
    batch = torch.full((len(lengths), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        batch[row, width - prompt.shape[1] :] = prompt[0]
        mask[row, width - prompt.shape[1] :] = 1
    return prompts, batch, mask


def assert_rows_generate_alone(model, prompts, batch, mask, *, use_cache, new=NEW):
    out = gen.generate(model, batch, new, attention_mask=mask, use_cache=use_cache)
    width = batch.shape[1]
    assert out.shape == (len(prompts), width + new)
    for row, prompt in enumerate(prompts):
        pad = width - prompt.shape[1]
        alone = gen.generate(model, prompt, new, use_cache=use_cache)
        assert torch.equal(out[row, :pad], batch[row, :pad])  # the padding stays on the left
        assert torch.equal(out[row, pad:], alone[0]), f"row {row} differs from its prompt generated alone"


def assert_logits_match_alone(model, prompts, batch, mask):
    width = batch.shape[1]
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        assert torch.isfinite(padded).all()  # padding queries are finite too: nothing leaks
        for row, prompt in enumerate(prompts):
            alone = model(prompt)[0]
            torch.testing.assert_close(padded[row, width - prompt.shape[1] :], alone, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ (1) (2) padded == alone


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("shape", SHAPE_IDS)
def test_padded_greedy_generation_equals_each_prompt_alone(device, encoding_name, shape, use_cache):
    model = make_lm(encoding_name, device=device, **SHAPES[shape])
    prompts, batch, mask = prompts_for(LENGTHS, seed=1, device=device)
    assert_rows_generate_alone(model, prompts, batch, mask, use_cache=use_cache)


@pytest.mark.parametrize("shape", SHAPE_IDS)
def test_padded_logits_equal_unpadded_logits(device, encoding_name, shape):
    model = make_lm(encoding_name, device=device, **SHAPES[shape])
    prompts, batch, mask = prompts_for(LENGTHS, seed=2, device=device, pad_extra=2)
    assert_logits_match_alone(model, prompts, batch, mask.bool())


def test_partial_rotary_rope(device):
    model = make_lm("rope", device=device, rotary_dim=4)
    prompts, batch, mask = prompts_for(LENGTHS, seed=3, device=device)
    assert_logits_match_alone(model, prompts, batch, mask)
    assert_rows_generate_alone(model, prompts, batch, mask, use_cache=True)


def test_decode_steps_continue_each_row_from_the_padded_cache(device, encoding_name):
    """Prefill with the mask, then steps with no mask: the cache keeps it and each row's positions."""
    model = make_lm(encoding_name, device=device)
    prompts, batch, mask = prompts_for(LENGTHS, seed=4, device=device)
    follow = torch.randint(0, VOCAB, (3, 3), generator=torch.Generator().manual_seed(5)).to(device)
    logits, cache = gen.decode_step(model, batch, attention_mask=mask)
    assert cache.mask is not None and torch.equal(cache.mask, mask.bool())
    steps = [logits]
    for t in range(follow.shape[1]):
        logits, cache = gen.decode_step(model, follow[:, t : t + 1], cache)
        steps.append(logits)
    assert cache.mask.shape == cache.positions.shape == (3, batch.shape[1] + 3)
    padded = torch.cat(steps, dim=1)
    via_incremental = gen.incremental_logits(
        model,
        torch.cat((batch, follow), 1),
        batch.shape[1],
        attention_mask=torch.cat((mask, torch.ones_like(follow)), 1),
    )
    torch.testing.assert_close(via_incremental, padded, rtol=1e-12, atol=1e-12)
    width = batch.shape[1]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat((prompt, follow[row : row + 1]), 1))[0]
            torch.testing.assert_close(padded[row, width - prompt.shape[1] :], alone, rtol=1e-10, atol=1e-10)
            real = cache.positions[row, width - prompt.shape[1] :]
            assert torch.equal(real, torch.arange(prompt.shape[1] + 3, device=device))


def test_padded_float32_stays_finite(device, encoding_name):
    model = make_lm(encoding_name, device=device, dtype=torch.float32)
    _, batch, mask = prompts_for((1, 6, 2), seed=6, device=device, pad_extra=3)
    with torch.no_grad():
        assert torch.isfinite(model(batch, attention_mask=mask)).all()
    out = gen.generate(model, batch, 4, attention_mask=mask)
    assert out.shape == (3, 13)


# ------------------------------------------------------------------ (3) any lengths, any padding


@settings(max_examples=12)
@given(
    name=st.sampled_from(ENCODING_NAMES),
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    pad_extra=st.integers(0, 3),
    pad_id=st.integers(0, VOCAB - 1),
    use_cache=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_any_lengths_and_padding_equal_each_prompt_alone(device, name, lengths, pad_extra, pad_id, use_cache, seed):
    model = make_lm(name, device=device, seed=seed % 1000)
    prompts, batch, mask = prompts_for(lengths, seed=seed, device=device, pad_extra=pad_extra, pad_id=pad_id)
    assert_logits_match_alone(model, prompts, batch, mask)
    assert_rows_generate_alone(model, prompts, batch, mask, use_cache=use_cache, new=4)


# ------------------------------------------------------------------ (5) no padding: today's path


def test_no_mask_or_a_mask_of_ones_is_the_unpadded_path_bit_for_bit(device, encoding_name):
    model = make_lm(encoding_name, device=device)
    _, batch, _ = prompts_for((5, 5), seed=7, device=device)
    ones = torch.ones_like(batch)
    for use_cache in (True, False):
        plain = gen.generate(model, batch, NEW, use_cache=use_cache)
        assert torch.equal(gen.generate(model, batch, NEW, use_cache=use_cache, attention_mask=None), plain)
        assert torch.equal(gen.generate(model, batch, NEW, use_cache=use_cache, attention_mask=ones.bool()), plain)
    with torch.no_grad():
        plain = model(batch)
        with_ones = model(batch, attention_mask=ones)
    if device.type == "cpu":  # on a GPU the values of a mask are not inspected (no host synchronisation)
        assert torch.equal(with_ones, plain)
        assert gen.decode_step(model, batch, attention_mask=ones)[1].mask is None
    else:
        torch.testing.assert_close(with_ones, plain, rtol=1e-12, atol=1e-12)
    assert gen.decode_step(model, batch)[1].mask is None


def test_learned_table_room_counts_real_tokens(device):
    """A padded row needs positions only for its real tokens; the longest row sets the limit."""
    model = make_lm("learned", device=device, max_positions=8)
    prompts, batch, mask = prompts_for((2, 4), seed=8, device=device, pad_extra=6)  # width 10 > 8 rows
    out = gen.generate(model, batch, 5, attention_mask=mask)  # longest: 4 + 5 - 1 = 8 positions
    assert torch.equal(out[1, 6:], gen.generate(model, prompts[1], 5)[0])
    with pytest.raises(ValueError, match="a prompt of 4 tokens continued by max_new_tokens=6 needs positions 0..8"):
        gen.generate(model, batch, 6, attention_mask=mask)


# ------------------------------------------------------------------ (4) bad input


def bad_masks(device):
    ok = torch.tensor([[0, 1, 1], [1, 1, 1]], device=device)
    return [
        (ok[:, 1:], ValueError, r"attention_mask must have shape \(batch=2, prompt_len=3\), got \(2, 2\)"),
        (ok[:1], ValueError, r"attention_mask must have shape \(batch=2, prompt_len=3\), got \(1, 3\)"),
        (ok[0], ValueError, r"attention_mask must have shape \(batch=2, prompt_len=3\), got \(3,\)"),
        (ok.float(), TypeError, "attention_mask must be a bool or integer tensor .* got dtype torch.float32"),
        ([[0, 1, 1], [1, 1, 1]], TypeError, "attention_mask must be a torch.Tensor .* got list"),
        (ok * 2, ValueError, r"attention_mask must hold only 1 \(token\) and 0 \(padding\), got the value 2"),
        (ok - 1, ValueError, r"attention_mask must hold only 1 \(token\) and 0 \(padding\), got the value -1"),
        (torch.tensor([[1, 1, 0], [1, 1, 1]], device=device), ValueError, "attention_mask must be left-padded.*row 0"),
        (torch.tensor([[1, 1, 1], [1, 0, 1]], device=device), ValueError, "attention_mask must be left-padded.*row 1"),
        (torch.tensor([[0, 1, 1], [0, 0, 0]], device=device), ValueError, "attention_mask must mark .* row 1 has none"),
    ]


def test_generate_rejects_bad_masks(device):
    model = make_lm("rope", device=device)
    prompt = torch.tensor([[0, 4, 5], [1, 2, 3]], device=device)
    for mask, error, message in bad_masks(device):
        with pytest.raises(error, match=message):
            gen.generate(model, prompt, 3, attention_mask=mask)
        with pytest.raises(error, match=message.replace("prompt_len", "seq")):
            gen.incremental_logits(model, prompt, 2, attention_mask=mask)


def test_forward_and_decode_step_reject_bad_masks():
    """Values are checked on the CPU (on a GPU that would synchronise at every step); shapes anywhere."""
    model = make_lm("alibi")
    prompt = torch.tensor([[0, 4, 5], [1, 2, 3]])
    for mask, error, message in bad_masks("cpu"):
        for call in (model, lambda t, attention_mask: gen.decode_step(model, t, attention_mask=attention_mask)):
            with pytest.raises(error, match=message.replace("prompt_len", "seq")):
                call(prompt, attention_mask=mask)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    _, cache = gen.decode_step(model, prompt, attention_mask=mask)
    step = torch.tensor([[1], [2]])
    with pytest.raises(
        ValueError, match=r"attention_mask must have shape \(batch=2, past_len \+ seq=4\), got \(2, 1\)"
    ):
        gen.decode_step(model, step, cache, attention_mask=torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be left-padded"):
        gen.decode_step(model, step, cache, attention_mask=torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]]))
    full = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)  # the whole mask, as transformers passes it
    with torch.no_grad():
        torch.testing.assert_close(
            model(step, past_kvs=cache, attention_mask=full), model(step, past_kvs=cache), rtol=0, atol=0
        )
    with pytest.raises(ValueError, match=r"past_kvs.mask has shape \(2, 2\) but the cache's positions have shape"):
        model(step, past_kvs=KVCache(cache.layers, cache.positions, cache.mask[:, 1:]))
    with pytest.raises(TypeError, match="past_kvs.mask must be None or a bool tensor, got dtype torch.int64"):
        model(step, past_kvs=KVCache(cache.layers, cache.positions, cache.mask.long()))


def test_attention_functions_take_a_key_mask(device, encoding_name, rand):
    """positional_attention / shaw_attention: padding keys hidden, real queries as if unpadded."""
    cls = pb.ENCODINGS[encoding_name]
    if cls.place == "input":
        pytest.skip("input encodings act on the embeddings, not in attention")
    options = {k: v for k, v in cls.example_options.items()}
    encoding = pb.build_encoding(encoding_name, dim=8, n_heads=2, head_dim=4, causal=True, **options)
    encoding = encoding.to(device=device, dtype=F64)
    q, k, v = (rand(1, 2, 6, 4, seed=s, device=device) for s in (1, 2, 3))
    key_mask = torch.tensor([[0, 0, 1, 1, 1, 1]], device=device)
    ids = pb.masking.mask_positions(key_mask.bool())
    padded = pb.positional_attention(q, k, v, encoding, position_ids=ids, key_position_ids=ids, key_mask=key_mask)
    alone = pb.positional_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], encoding)
    torch.testing.assert_close(padded[:, :, 2:], alone, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(padded).all()
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=1, k_len=6\), got \(1, 5\)"):
        pb.positional_attention(q, k, v, encoding, key_mask=key_mask[:, 1:])
    if encoding_name == "shaw":
        args = (encoding.rel_k, encoding.rel_v, encoding.max_distance)
        got = pb.shaw_attention(q, k, v, *args, position_ids=ids, key_position_ids=ids, key_mask=key_mask.bool())
        torch.testing.assert_close(got, padded, rtol=1e-12, atol=1e-12)
        with pytest.raises(TypeError, match="key_mask must be a bool or integer tensor"):
            pb.shaw_attention(q, k, v, *args, key_mask=key_mask.double())


def test_multi_head_attention_continues_a_padded_cache(device, encoding_name, rand):
    """A layer fed a cache with padding hides the padding keys and continues each row's positions."""
    torch.manual_seed(0)
    mha = pb.MultiHeadAttention(DIM, HEADS, encoding_name, **layer_options(encoding_name)).to(device, F64)
    short, long = rand(1, 3, DIM, seed=1, device=device), rand(5, DIM, seed=2, device=device)
    step = rand(2, 1, DIM, seed=3, device=device)
    with torch.no_grad():
        _, alone = mha(short, return_kv=True)
        _, full = mha(long[None], return_kv=True)
        garbage = rand(1, mha.n_kv_heads, 2, mha.head_dim, seed=4, device=device)
        layers = [tuple(torch.cat((torch.cat((garbage, a), 2), f)) for a, f in zip(alone[0], full[0]))]
        positions = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]], device=device)
        mask = torch.tensor([[False, False, True, True, True], [True] * 5], device=device)
        out, cache = mha(step, past_kv=KVCache(layers, positions, mask), return_kv=True)
        torch.testing.assert_close(out[:1], mha(step[:1], past_kv=alone), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[1:], mha(step[1:], past_kv=full), rtol=1e-12, atol=1e-12)
    assert torch.equal(cache.positions[:, -1], torch.tensor([3, 5], device=device))
    assert torch.equal(cache.mask[:, -1], torch.tensor([True, True], device=device))
