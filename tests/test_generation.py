"""pebook.generation: decoding with a KV cache, for every encoding.

Reference: ``ref.tiny_lm`` (conftest), the float64 model written out from the papers, run on the
whole sequence at once. Decoding prefill + one token at a time must reproduce it for every
encoding; the restart-at-0 bug must break it except for ALiBi and NoPE (where a constant shift of
every query position shifts each bias row by a constant, which softmax ignores). The cache size
is checked against the formula 2 · layers · kv_heads · head_dim · tokens · batch · bytes.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pebook import ENCODINGS, TinyLM
from pebook import generation as gen

F64 = torch.float64
VOCAB, DIM, LAYERS, HEADS, MAX_POS = 13, 16, 2, 2, 24
BUGGY = ("sinusoidal", "learned", "shaw", "t5", "rope")  # the restart-at-0 bug changes their logits
IMMUNE = ("none", "alibi")  # ... and not these
assert set(BUGGY + IMMUNE) == set(ENCODINGS)


def make_lm(encoding, *, device, dtype=F64, seed=0, n_heads=HEADS, n_layers=LAYERS, max_positions=MAX_POS):
    torch.manual_seed(seed)
    options = {"shaw": {"max_distance": 3}, "t5": {"num_buckets": 8, "t5_max_distance": 20}}.get(encoding, {})
    model = TinyLM(VOCAB, DIM, n_layers, n_heads, max_positions, encoding, **options)
    return model.to(device=device, dtype=dtype)


def tokens_for(*shape, seed, device):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).to(device)


# ------------------------------------------------------------------ incremental == full forward


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("prompt_len", [1, 4, 11, 16])
def test_incremental_logits_equal_the_float64_reference(device, ref, encoding, prompt_len):
    model = make_lm(encoding, device=device)
    tokens = tokens_for(2, 16, seed=1, device=device)
    logits = gen.incremental_logits(model, tokens, prompt_len)
    with torch.no_grad():
        expected = ref.tiny_lm(model, tokens)
        full = model(tokens)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == F64
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_incremental_logits_float32(device, tol32, encoding):
    model = make_lm(encoding, device=device, dtype=torch.float32)
    tokens = tokens_for(3, 14, seed=2, device=device)
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(gen.incremental_logits(model, tokens, 5), full, **tol32)


@settings(max_examples=15)
@given(
    encoding=st.sampled_from(ENCODINGS),
    seq=st.integers(1, MAX_POS),
    prompt_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_incremental_equals_full_for_any_split(device, encoding, seq, prompt_frac, seed):
    model = make_lm(encoding, device=device, seed=seed % 1000)
    tokens = tokens_for(1, seq, seed=seed, device=device)
    prompt_len = max(1, round(prompt_frac * seq))
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(gen.incremental_logits(model, tokens, prompt_len), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cached_keys_and_values_do_not_change(device, encoding):
    """Causal model: the keys and values of positions 0..n-1 are the same whether or not later
    tokens follow, which is what makes a cache possible."""
    model = make_lm(encoding, device=device)
    tokens = tokens_for(2, 12, seed=3, device=device)
    _, short = gen.decode_step(model, tokens[:, :7])
    _, long = gen.decode_step(model, tokens)
    for (k7, v7), (k12, v12) in zip(short, long):
        torch.testing.assert_close(k12[:, :, :7], k7, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v12[:, :, :7], v7, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_greedy_generation_same_with_and_without_cache(device, encoding):
    model = make_lm(encoding, device=device)
    prompt = tokens_for(3, 5, seed=4, device=device)
    with_cache = gen.generate(model, prompt, 12)
    without = gen.generate(model, prompt, 12, use_cache=False)
    assert with_cache.shape == (3, 17) and with_cache.dtype == prompt.dtype
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    # greedy: every new token is the argmax of the full forward pass over what precedes it
    with torch.no_grad():
        logits = model(with_cache[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), with_cache[:, 5:])


# ------------------------------------------------------------------ the restart-at-0 bug


@pytest.mark.parametrize("encoding", BUGGY)
def test_restart_at_zero_bug_changes_the_logits(device, encoding):
    model = make_lm(encoding, device=device)
    tokens = tokens_for(2, 16, seed=5, device=device)
    right = gen.incremental_logits(model, tokens, 6)
    buggy = gen.incremental_logits(model, tokens, 6, position_offset_bug=True)
    torch.testing.assert_close(buggy[:, :6], right[:, :6], rtol=1e-12, atol=1e-12)  # the prompt is fine
    # from the second decoded token on (the first, at position 6, is decoded at 0 instead of 6)
    assert (buggy[:, 6:] - right[:, 6:]).abs().amax(dim=(0, 2)).min() > 1e-3


@pytest.mark.parametrize("encoding", IMMUNE)
def test_restart_at_zero_bug_is_harmless_for_alibi_and_nope(device, encoding):
    """ALiBi: bias -m(i - j) at i = 0 instead of i = t shifts the whole row by m·t, and softmax is
    invariant to adding a constant to every logit of a row. NoPE has no positions at all."""
    model = make_lm(encoding, device=device)
    tokens = tokens_for(2, 16, seed=6, device=device)
    right = gen.incremental_logits(model, tokens, 3)
    buggy = gen.incremental_logits(model, tokens, 3, position_offset_bug=True)
    torch.testing.assert_close(buggy, right, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ learned table limit


def test_learned_table_stops_at_its_limit_rope_and_alibi_continue(device):
    learned = make_lm("learned", device=device, max_positions=12)
    prompt = tokens_for(1, 4, seed=7, device=device)
    # positions 0..11 are fed; the 13th token is predicted but never fed, so it needs no row
    assert gen.generate(learned, prompt, 9).shape == (1, 13)
    with pytest.raises(ValueError, match=r"positions 0\.\.12.*max_positions=12"):
        gen.generate(learned, prompt, 10)
    with pytest.raises(ValueError, match=r"prompt of 13 tokens.*max_positions=12"):
        gen.generate(learned, tokens_for(1, 13, seed=8, device=device), 0)
    _, cache = gen.decode_step(learned, tokens_for(1, 12, seed=9, device=device))
    with pytest.raises(ValueError, match="max_positions=12"):
        gen.decode_step(learned, prompt[:, :1], cache)
    for encoding in ("rope", "alibi"):
        model = make_lm(encoding, device=device, max_positions=12)
        assert gen.generate(model, prompt, 30).shape == (1, 34)


# ------------------------------------------------------------------ cache size


def test_kv_cache_bytes_llama2_numbers():
    # Llama-2-7B: 32 layers, 32 heads of 128, float16, 4096 tokens -> exactly 2 GiB
    assert gen.kv_cache_bytes(32, 32, 128, 4096) == 2 * 32 * 32 * 128 * 4096 * 2 == 2147483648 == 2 * 2**30
    assert gen.kv_cache_bytes(32, 32, 128, 1) == 512 * 2**10  # 512 KiB per token
    # Llama-2-70B: 80 layers, 8 key/value heads (GQA) of 128: 320 KiB per token instead of 2.5 MiB
    assert gen.kv_cache_bytes(80, 8, 128, 1) == 320 * 2**10
    assert gen.kv_cache_bytes(80, 64, 128, 1) == 8 * gen.kv_cache_bytes(80, 8, 128, 1)
    assert gen.kv_cache_bytes(2, 3, 4, 5, batch=6, dtype=torch.float32) == 2 * 2 * 3 * 4 * 5 * 6 * 4
    assert gen.kv_cache_bytes(2, 3, 4, 0) == 0


@settings(max_examples=20)
@given(
    layers=st.integers(1, 100),
    heads=st.integers(1, 128),
    head_dim=st.integers(1, 256),
    n=st.integers(0, 10**6),
    batch=st.integers(1, 64),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_kv_cache_bytes_is_linear_in_every_factor(layers, heads, head_dim, n, batch, dtype):
    one = gen.kv_cache_bytes(1, 1, 1, 1, dtype=dtype)
    assert one == 2 * torch.empty((), dtype=dtype).element_size()
    assert gen.kv_cache_bytes(layers, heads, head_dim, n, batch=batch, dtype=dtype) == math.prod(
        (one, layers, heads, head_dim, n, batch)
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("encoding", ["rope", "alibi", "learned"])
def test_cache_bytes_match_the_formula(device, dtype, encoding):
    model = make_lm(encoding, device=device, dtype=dtype, n_heads=4, n_layers=3)
    tokens = tokens_for(3, 10, seed=10, device=device)
    _, cache = gen.decode_step(model, tokens[:, :6])
    assert gen.cache_bytes(cache) == gen.kv_cache_bytes(3, 4, DIM // 4, 6, batch=3, dtype=dtype)
    for t in range(6, 10):
        _, cache = gen.decode_step(model, tokens[:, t : t + 1], cache)
    assert all(k.shape == v.shape == (3, 4, 10, DIM // 4) for k, v in cache)
    assert gen.cache_bytes(cache) == gen.kv_cache_bytes(3, 4, DIM // 4, 10, batch=3, dtype=dtype)


# ------------------------------------------------------------------ sampling


def test_sampling_is_reproducible_with_a_seeded_generator(device):
    model = make_lm("rope", device=device)
    prompt = tokens_for(2, 3, seed=11, device=device)

    def sample(seed, **kwargs):
        return gen.generate(model, prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kwargs)

    first = sample(0)
    assert torch.equal(first, sample(0))
    assert torch.equal(first, sample(0, use_cache=False))  # same distribution at each step, same draws
    assert not torch.equal(first, sample(1))
    assert not torch.equal(first, gen.generate(model, prompt, 20))  # not greedy at temperature 1.5


def test_top_k_one_is_greedy_and_top_k_restricts_the_choice(device):
    model = make_lm("alibi", device=device)
    prompt = tokens_for(2, 3, seed=12, device=device)
    greedy = gen.generate(model, prompt, 15)
    one = gen.generate(model, prompt, 15, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, greedy)
    three = gen.generate(model, prompt, 15, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top3 = model(three[:, :-1])[:, 2:].topk(3, dim=-1).indices
    assert (top3 == three[:, 3:, None]).any(-1).all()


def test_zero_new_tokens_returns_the_prompt(device):
    model = make_lm("none", device=device)
    prompt = tokens_for(2, 4, seed=13, device=device)
    out = gen.generate(model, prompt, 0)
    assert torch.equal(out, prompt) and out is not prompt


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int"),
        (dict(temperature=0), ValueError, "temperature=None for greedy"),
        (dict(temperature=0.0), ValueError, "temperature=None for greedy"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature="hot"), TypeError, "temperature must be a real number"),
        (dict(temperature=1.0, top_k=0), ValueError, "top_k must be an int >= 1"),
        (dict(temperature=1.0, top_k=VOCAB + 1), ValueError, f"top_k must be between 1 and vocab_size={VOCAB}"),
        (dict(top_k=3), ValueError, "top_k only applies when sampling"),
        (dict(use_cache="yes"), TypeError, "use_cache must be a bool"),
        (dict(temperature=1.0, generator=0), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_generate_rejects_bad_arguments(device, kwargs, error, message):
    model = make_lm("rope", device=device)
    prompt = tokens_for(1, 3, seed=14, device=device)
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(error, match=message):
        gen.generate(model, prompt, **kwargs)


def test_generate_rejects_bad_prompts(device):
    model = make_lm("rope", device=device)
    with pytest.raises(ValueError, match=r"prompt must have shape \(batch >= 1, seq >= 1\).*\(1, 0\)"):
        gen.generate(model, torch.zeros(1, 0, dtype=torch.long, device=device), 3)
    with pytest.raises(ValueError, match=r"prompt must have 2 dimensions"):
        gen.generate(model, torch.zeros(3, dtype=torch.long, device=device), 3)
    with pytest.raises(TypeError, match="prompt must be an integer tensor"):
        gen.generate(model, torch.zeros(1, 3, device=device), 3)
    with pytest.raises(TypeError, match="prompt must be a torch.Tensor"):
        gen.generate(model, [[1, 2]], 3)
    with pytest.raises(ValueError, match=rf"prompt must hold token ids in \[0, vocab_size={VOCAB}\)"):
        gen.generate(model, torch.tensor([[1, VOCAB]], device=device), 3)
    with pytest.raises(TypeError, match="model must be a pebook.TinyLM"):
        gen.generate(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 3)


def test_generate_rejects_a_prompt_on_another_device(cuda_device):
    model = make_lm("rope", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="prompt is on cuda.*model is on cpu"):
        gen.generate(model, torch.zeros(1, 2, dtype=torch.long, device=cuda_device), 3)


def test_a_cache_from_another_model_is_rejected(device):
    model = make_lm("rope", device=device)
    tokens = tokens_for(2, 5, seed=15, device=device)
    step = tokens[:, :1]
    _, other_heads = gen.decode_step(make_lm("rope", device=device, n_heads=4), tokens)
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.k has shape \(2, 4, 5, 4\).*n_heads=2.*another shape"):
        gen.decode_step(model, step, other_heads)
    _, other_layers = gen.decode_step(make_lm("rope", device=device, n_layers=3), tokens)
    with pytest.raises(ValueError, match="holds 3 layers but this model has n_layers=2"):
        gen.decode_step(model, step, other_layers)
    _, own = gen.decode_step(model, tokens)
    with pytest.raises(ValueError, match="batch size 2 but the new tokens have batch size 1"):
        gen.decode_step(model, step[:1], own)
    with pytest.raises(TypeError, match="dtype torch.float32 but the model computes in torch.float64"):
        gen.decode_step(model, step, [(k.float(), v.float()) for k, v in own])
    with pytest.raises(ValueError, match="keys .* and values .* must have one shape"):
        gen.decode_step(model, step, [(k, v[:, :, :3]) for k, v in own])
    with pytest.raises(ValueError, match=r"same number of positions, got \[4, 5\]"):
        gen.decode_step(model, step, [own[0], (own[1][0][:, :, :4], own[1][1][:, :, :4])])
    with pytest.raises(TypeError, match=r"past_kvs\[1\] must be a \(k, v\) pair"):
        gen.decode_step(model, step, [own[0], own[1][0]])
    with pytest.raises(TypeError, match="past_kvs must be the list of per-layer"):
        gen.decode_step(model, step, own[0][0])
    assert gen.check_kv_cache(model, own, batch=2) == 5


def test_incremental_logits_rejects_bad_arguments(device):
    model = make_lm("rope", device=device)
    tokens = tokens_for(1, 6, seed=16, device=device)
    with pytest.raises(ValueError, match="prompt_len must be an int >= 1"):
        gen.incremental_logits(model, tokens, 0)
    with pytest.raises(ValueError, match="prompt_len must be between 1 and the sequence length 6, got 7"):
        gen.incremental_logits(model, tokens, 7)
    with pytest.raises(TypeError, match="position_offset_bug must be a bool"):
        gen.incremental_logits(model, tokens, 2, position_offset_bug=1)


def test_cache_bytes_and_formula_reject_bad_arguments():
    with pytest.raises(TypeError, match="past_kvs must be a list"):
        gen.cache_bytes(torch.zeros(2))
    with pytest.raises(TypeError, match=r"past_kvs\[0\]\.v must be a floating-point tensor"):
        gen.cache_bytes([(torch.zeros(1), torch.zeros(1, dtype=torch.long))])
    with pytest.raises(ValueError, match="n_layers must be an int >= 1"):
        gen.kv_cache_bytes(0, 1, 1, 1)
    with pytest.raises(ValueError, match="n_tokens must be an int >= 0"):
        gen.kv_cache_bytes(1, 1, 1, -1)
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        gen.kv_cache_bytes(1, 1, 1, 1, dtype=torch.int8)


# ------------------------------------------------------------------ timing


def test_time_per_token_measures_both_ways(device):
    model = make_lm("rope", device=device, dtype=torch.float32)
    timing = gen.time_per_token(model, [4, 8], repeats=2)
    assert timing.lengths == (4, 8) and len(timing.cached) == len(timing.uncached) == 2
    assert all(t > 0 for t in timing.cached + timing.uncached)
    assert timing.ratios == tuple(u / c for u, c in zip(timing.uncached, timing.cached))
    with pytest.raises(ValueError, match="lengths must hold at least one"):
        gen.time_per_token(model, [])
    with pytest.raises(ValueError, match=r"lengths\[i\] must be an int >= 2"):
        gen.time_per_token(model, [1])
    with pytest.raises(ValueError, match="max_positions=24"):
        gen.time_per_token(make_lm("learned", device=device), [25])
