"""pebook.generation: decoding with a KV cache, for every registered encoding.

Reference: ``ref.tiny_lm`` (conftest), the float64 model written out, run on the whole sequence at
once. Prefill + one token at a time must reproduce it for every encoding and for grouped-query
models. The classic bug of placing every decoded token at position 0 (computing a step's positions
from its own input, forgetting the cache) is reproduced with position ids
``[0 … prompt_len - 1, 0, 0, …]``: it must leave the prompt alone and change every later logit
for every encoding that carries position (place other than "none"). The cache size is checked
against the formula 2 · layers · kv_heads · head_dim · tokens · batch · bytes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_cases import ENCODING_NAMES, model_options

from pebook import ENCODINGS, KVCache, LearnedPE, TinyLM
from pebook import generation as gen

F64 = torch.float64
VOCAB, DIM, LAYERS, HEADS, MAX_POS = 13, 16, 2, 2, 24
GQA = [(2, None), (4, 2)]  # (n_heads, n_kv_heads)
GQA_IDS = ["mha", "gqa"]


def make_lm(name, *, device="cpu", dtype=F64, seed=0, n_heads=HEADS, n_layers=LAYERS, max_positions=MAX_POS, **kw):
    torch.manual_seed(seed)
    model = TinyLM(VOCAB, DIM, n_layers, n_heads, max_positions, name, **(model_options(name) | kw))
    return model.to(device=device, dtype=dtype)


def tokens_for(*shape, seed, device="cpu"):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def restart_at_zero(batch, seq, prompt_len, device):
    """Position ids of the bug: the prompt at 0 … prompt_len - 1, every decoded token at 0."""
    ids = torch.cat((torch.arange(prompt_len), torch.zeros(seq - prompt_len, dtype=torch.long)))
    return ids.to(device).expand(batch, seq)


# ------------------------------------------------------------------ incremental == full forward


@pytest.mark.parametrize("heads", GQA, ids=GQA_IDS)
@pytest.mark.parametrize("prompt_len", [1, 6, 16])
def test_incremental_logits_equal_the_float64_reference(device, ref, encoding_name, heads, prompt_len):
    n_heads, n_kv_heads = heads
    model = make_lm(encoding_name, device=device, n_heads=n_heads, n_kv_heads=n_kv_heads)
    tokens = tokens_for(2, 16, seed=1, device=device)
    logits = gen.incremental_logits(model, tokens, prompt_len)
    with torch.no_grad():
        expected = ref.tiny_lm(model, tokens)
        full = model(tokens)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == F64
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, full, rtol=1e-12, atol=1e-12)


def test_incremental_logits_float32(device, tol32, encoding_name):
    model = make_lm(encoding_name, device=device, dtype=torch.float32)
    tokens = tokens_for(3, 14, seed=2, device=device)
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(gen.incremental_logits(model, tokens, 5), full, **tol32)


@settings(max_examples=10)
@given(
    name=st.sampled_from(ENCODING_NAMES),
    seq=st.integers(1, MAX_POS),
    prompt_frac=st.floats(0.0, 1.0),
    wrong_positions=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_incremental_equals_full_for_any_split_and_any_positions(device, name, seq, prompt_frac, wrong_positions, seed):
    """With any position ids, prefill + steps equals one forward with those ids: the cache keeps
    each key's position, and the mask follows storage order either way."""
    model = make_lm(name, device=device, seed=seed % 1000)
    tokens = tokens_for(1, seq, seed=seed, device=device)
    prompt_len = max(1, round(prompt_frac * seq))
    position_ids = None
    if wrong_positions:
        gen_ = torch.Generator().manual_seed(seed)
        position_ids = torch.randint(0, MAX_POS, (1, seq), generator=gen_).to(device)
    with torch.no_grad():
        full = model(tokens, position_ids=position_ids)
    got = gen.incremental_logits(model, tokens, prompt_len, position_ids=position_ids)
    torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)


def test_decode_step_prefills_then_continues_from_the_cache(device, encoding_name):
    model = make_lm(encoding_name, device=device)
    tokens = tokens_for(2, 7, seed=3, device=device)
    logits, cache = gen.decode_step(model, tokens[:, :5])
    assert isinstance(cache, KVCache) and cache.length == 5 and not logits.requires_grad
    step, cache = gen.decode_step(model, tokens[:, 5:6], cache)
    given_ids, _ = gen.decode_step(model, tokens[:, 6:], cache, position_ids=torch.tensor([[6], [6]], device=device))
    default_ids, cache = gen.decode_step(model, tokens[:, 6:], cache)
    assert torch.equal(given_ids, default_ids)
    assert torch.equal(cache.positions, torch.arange(7, device=device).expand(2, 7))
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(torch.cat((logits, step, default_ids), 1), full, rtol=1e-12, atol=1e-12)


def test_cached_keys_and_values_do_not_change(device, encoding_name):
    """Causal model: the keys and values of positions 0..n-1 are the same whether or not later
    tokens follow, which is what makes a cache possible."""
    model = make_lm(encoding_name, device=device)
    tokens = tokens_for(2, 12, seed=3, device=device)
    _, short = gen.decode_step(model, tokens[:, :7])
    _, long = gen.decode_step(model, tokens)
    for (k7, v7), (k12, v12) in zip(short, long):
        torch.testing.assert_close(k12[:, :, :7], k7, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v12[:, :, :7], v7, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads", GQA, ids=GQA_IDS)
def test_greedy_generation_same_with_and_without_cache(device, encoding_name, heads):
    n_heads, n_kv_heads = heads
    model = make_lm(encoding_name, device=device, n_heads=n_heads, n_kv_heads=n_kv_heads)
    prompt = tokens_for(3, 5, seed=4, device=device)
    with_cache = gen.generate(model, prompt, 12)
    without = gen.generate(model, prompt, 12, use_cache=False)
    assert with_cache.shape == (3, 17) and with_cache.dtype == torch.int64
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    # greedy: every new token is the argmax of the full forward pass over what precedes it
    with torch.no_grad():
        logits = model(with_cache[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), with_cache[:, 5:])
    # a uint8 prompt (any integer dtype) generates the same tokens
    assert torch.equal(gen.generate(model, prompt.to(torch.uint8), 12), with_cache)


# ------------------------------------------------------------------ the restart-at-0 bug


def test_restart_at_zero_bug(device, encoding_name):
    """Decoding every new token at position 0 instead of at the cache length. The prompt is
    untouched; every later logit changes, for every encoding that carries position (ALiBi too: the
    decoded keys are cached at 0 as well, so the bias row is no longer a constant shift of the right
    one); NoPE has no position to get wrong."""
    model = make_lm(encoding_name, device=device)
    tokens = tokens_for(2, 16, seed=5, device=device)
    right = gen.incremental_logits(model, tokens, 6)
    buggy = gen.incremental_logits(model, tokens, 6, position_ids=restart_at_zero(2, 16, 6, device))
    torch.testing.assert_close(buggy[:, :6], right[:, :6], rtol=1e-12, atol=1e-12)  # the prompt is fine
    if ENCODINGS[encoding_name].place == "none":
        torch.testing.assert_close(buggy, right, rtol=1e-12, atol=1e-12)
    else:  # seeded; smallest observed change 1.2e-2 (ALiBi's 2-head slopes are 1/16 and 1/256)
        assert (buggy[:, 6:] - right[:, 6:]).abs().amax(dim=(0, 2)).min() > 1e-3


# ------------------------------------------------------------------ learned table limit


def test_generation_stops_at_the_end_of_a_learned_table_only(device, encoding_name):
    """A learned table of N rows places positions 0 … N - 1: the last new token is predicted but
    never fed, so prompt_len + max_new_tokens - 1 <= N; refused up front otherwise. Encodings that
    can place any position (their check_positions) generate past max_positions."""
    model = make_lm(encoding_name, device=device, max_positions=12)
    prompt = tokens_for(1, 4, seed=7, device=device)
    assert gen.generate(model, prompt, 9).shape == (1, 13)
    try:
        model.encoding_module.check_positions(12)
    except ValueError:
        pass
    else:
        assert gen.generate(model, prompt, 30).shape == (1, 34)
        return
    with pytest.raises(ValueError, match=r"positions 0\.\.12.*max_positions=12"):
        gen.generate(model, prompt, 10)
    with pytest.raises(ValueError, match=r"prompt of 13 tokens.*max_positions=12"):
        gen.generate(model, tokens_for(1, 13, seed=8, device=device), 0)
    _, cache = gen.decode_step(model, tokens_for(1, 12, seed=9, device=device))
    assert gen.check_kv_cache(model, cache) == 12
    with pytest.raises(ValueError, match="max_positions=12"):
        gen.decode_step(model, prompt[:, :1], cache)


def test_learned_cache_longer_than_the_table_is_rejected(device):
    short = make_lm(LearnedPE.name, device=device, max_positions=8)
    _, cache = gen.decode_step(make_lm(LearnedPE.name, device=device), tokens_for(1, 10, seed=9, device=device))
    with pytest.raises(ValueError, match=r"a cache of this length needs positions 0\.\.9: position 9 is beyond"):
        gen.check_kv_cache(short, cache)


# ------------------------------------------------------------------ cache size


def test_kv_cache_bytes_llama2_numbers():
    # Llama-2-7B: 32 layers, 32 heads of 128, float16, 4096 tokens -> exactly 2 GiB
    assert gen.kv_cache_bytes(32, 32, 128, 4096) == 2 * 32 * 32 * 128 * 4096 * 2 == 2 * 2**30
    assert gen.kv_cache_bytes(32, 32, 128, 1) == 512 * 2**10  # 512 KiB per token
    # Llama-2-70B: 80 layers, 8 key/value heads (GQA) of 128: 320 KiB per token instead of 2.5 MiB
    assert gen.kv_cache_bytes(80, 8, 128, 1) == 320 * 2**10
    assert gen.kv_cache_bytes(80, 64, 128, 1) == 8 * gen.kv_cache_bytes(80, 8, 128, 1)
    assert gen.kv_cache_bytes(2, 3, 4, 5, batch=6, dtype=torch.float32) == 2 * 2 * 3 * 4 * 5 * 6 * 4
    assert gen.kv_cache_bytes(2, 3, 4, 0) == 0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("heads", [(4, None), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_cache_bytes_match_the_formula(device, encoding_name, dtype, heads):
    n_heads, n_kv_heads = heads
    model = make_lm(encoding_name, device=device, dtype=dtype, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=3)
    kv = n_kv_heads or n_heads
    tokens = tokens_for(3, 10, seed=10, device=device)
    _, cache = gen.decode_step(model, tokens[:, :6])
    assert gen.cache_bytes(cache) == cache.nbytes == gen.kv_cache_bytes(3, kv, DIM // 4, 6, batch=3, dtype=dtype)
    for t in range(6, 10):
        _, cache = gen.decode_step(model, tokens[:, t : t + 1], cache)
    assert all(k.shape == v.shape == (3, kv, 10, DIM // 4) for k, v in cache)
    assert gen.cache_bytes(cache) == gen.kv_cache_bytes(3, kv, DIM // 4, 10, batch=3, dtype=dtype)


# ------------------------------------------------------------------ sampling


def test_sampling_is_reproducible_with_a_seeded_generator(device, encoding_name):
    model = make_lm(encoding_name, device=device)
    prompt = tokens_for(2, 3, seed=11, device=device)

    def sample(seed, **kwargs):
        return gen.generate(model, prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kwargs)

    first = sample(0)
    assert torch.equal(first, sample(0))
    assert torch.equal(first, sample(0, use_cache=False))  # same distribution at each step, same draws
    assert not torch.equal(first, sample(1))
    assert not torch.equal(first, gen.generate(model, prompt, 20))  # not greedy at temperature 1.5


def test_top_k_one_is_greedy_and_top_k_restricts_the_choice(device):
    model = make_lm(ENCODING_NAMES[-1], device=device)
    prompt = tokens_for(2, 3, seed=12, device=device)
    greedy = gen.generate(model, prompt, 15)
    one = gen.generate(model, prompt, 15, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, greedy)
    three = gen.generate(model, prompt, 15, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top3 = model(three[:, :-1])[:, 2:].topk(3, dim=-1).indices
    assert (top3 == three[:, 3:, None]).any(-1).all()


def test_zero_new_tokens_returns_the_prompt(device):
    model = make_lm(ENCODING_NAMES[0], device=device)
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
    model = make_lm(ENCODING_NAMES[0], device=device)
    prompt = tokens_for(1, 3, seed=14, device=device)
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(error, match=message):
        gen.generate(model, prompt, **kwargs)


def test_generate_rejects_bad_prompts(device):
    model = make_lm(ENCODING_NAMES[0], device=device)
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
    with pytest.raises(ValueError, match=rf"prompt must hold token ids in \[0, vocab_size={VOCAB}\), got .*\[1, 200\]"):
        gen.generate(model, torch.tensor([[1, 200]], dtype=torch.uint8, device=device), 3)
    with pytest.raises(TypeError, match="model must be a pebook.TinyLM, got Linear"):
        gen.generate(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 3)


@pytest.mark.cuda
def test_generate_rejects_a_prompt_on_another_device(cuda_device):
    model = make_lm(ENCODING_NAMES[0])
    with pytest.raises(ValueError, match="prompt is on cuda.*model is on cpu"):
        gen.generate(model, torch.zeros(1, 2, dtype=torch.long, device=cuda_device), 3)


def test_check_kv_cache_rejects_a_cache_from_another_model(device):
    model = make_lm(ENCODING_NAMES[0], device=device, n_heads=4, n_kv_heads=2)
    tokens = tokens_for(2, 5, seed=15, device=device)
    step = tokens[:, :1]
    _, own = gen.decode_step(model, tokens)
    assert gen.check_kv_cache(model, own, batch=2) == 5 and gen.check_kv_cache(model, own) == 5
    _, other_heads = gen.decode_step(make_lm(ENCODING_NAMES[0], device=device, n_heads=4), tokens)
    with pytest.raises(
        ValueError,
        match=r"past_kvs\[0\]\.k has shape \(2, 4, 5, 4\) but this model caches \(batch, n_kv_heads=2, positions, "
        r"head_dim=4\): the cache was made by a model of another shape",
    ):
        gen.check_kv_cache(model, other_heads)
    _, other_layers = gen.decode_step(
        make_lm(ENCODING_NAMES[0], device=device, n_layers=3, n_heads=4, n_kv_heads=2), tokens
    )
    with pytest.raises(ValueError, match="past_kvs holds 3 layers but this model has n_layers=2"):
        gen.check_kv_cache(model, other_layers)
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.k holds batch size 2 but the new tokens have batch size 1"):
        gen.check_kv_cache(model, own, batch=1)
    with pytest.raises(ValueError, match="batch size 2 but the new tokens have batch size 1"):
        gen.decode_step(model, step[:1], own)
    as_float32 = KVCache([(k.float(), v.float()) for k, v in own], own.positions)
    with pytest.raises(
        TypeError, match=r"past_kvs\[0\]\.k has dtype torch.float32 but the model computes in torch.float64"
    ):
        gen.check_kv_cache(model, as_float32)
    uneven = KVCache([own[0], (own[1][0][:, :, :4], own[1][1][:, :, :4])], own.positions)
    with pytest.raises(ValueError, match=r"past_kvs\[1\]\.k holds 4 positions but the cache's positions hold 5"):
        gen.check_kv_cache(model, uneven)
    with pytest.raises(TypeError, match=r"past_kvs\[1\] must be a \(k, v\) pair, got Tensor"):
        gen.check_kv_cache(model, KVCache([own[0], own[1][0]], own.positions))
    with pytest.raises(TypeError, match=r"past_kvs must be the KVCache returned with return_kv=True, got list"):
        gen.check_kv_cache(model, list(own))
    with pytest.raises(TypeError, match="model must be a pebook.TinyLM"):
        gen.check_kv_cache(torch.nn.Linear(2, 2), own)


def test_decode_step_and_incremental_logits_reject_bad_arguments(device):
    model = make_lm(ENCODING_NAMES[0], device=device)
    tokens = tokens_for(1, 6, seed=16, device=device)
    with pytest.raises(ValueError, match="prompt_len must be an int >= 1"):
        gen.incremental_logits(model, tokens, 0)
    with pytest.raises(ValueError, match="prompt_len must be between 1 and the sequence length 6, got 7"):
        gen.incremental_logits(model, tokens, 7)
    with pytest.raises(TypeError, match="prompt_len must be an int, got 2.0"):
        gen.incremental_logits(model, tokens, 2.0)
    with pytest.raises(ValueError, match=r"position_ids must have shape \(6,\) or \(1, 6\), got \(5,\)"):
        gen.incremental_logits(model, tokens, 2, position_ids=torch.arange(5, device=device))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor, got dtype torch.float32"):
        gen.incremental_logits(model, tokens, 2, position_ids=torch.zeros(6, device=device))
    with pytest.raises(ValueError, match=rf"tokens must hold token ids in \[0, vocab_size={VOCAB}\)"):
        gen.incremental_logits(model, tokens + VOCAB, 2)
    with pytest.raises(TypeError, match="model must be a pebook.TinyLM"):
        gen.decode_step(torch.nn.Linear(2, 2), tokens)
    with pytest.raises(ValueError, match=r"position_ids must have shape \(1,\) or \(1, 1\), got \(1, 2\)"):
        gen.decode_step(model, tokens[:, :1], position_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="past_kvs must be the KVCache returned with return_kv=True"):
        gen.decode_step(model, tokens[:, :1], [])


def test_cache_bytes_and_formula_reject_bad_arguments():
    with pytest.raises(TypeError, match="past_kvs must be a pebook.KVCache, got Tensor"):
        gen.cache_bytes(torch.zeros(2))
    with pytest.raises(TypeError, match="past_kvs must be a pebook.KVCache, got list"):
        gen.cache_bytes([(torch.zeros(1), torch.zeros(1))])
    with pytest.raises(ValueError, match="n_layers must be an int >= 1"):
        gen.kv_cache_bytes(0, 1, 1, 1)
    with pytest.raises(ValueError, match="n_kv_heads must be an int >= 1"):
        gen.kv_cache_bytes(1, 0, 1, 1)
    with pytest.raises(ValueError, match="n_tokens must be an int >= 0"):
        gen.kv_cache_bytes(1, 1, 1, -1)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        gen.kv_cache_bytes(1, 1, 1, 1, batch=0)
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        gen.kv_cache_bytes(1, 1, 1, 1, dtype=torch.int8)


# ------------------------------------------------------------------ timing


def test_time_per_token_reports_both_ways(device):
    """Structure only: wall-clock times depend on the machine, so none is compared to a number."""
    model = make_lm(ENCODING_NAMES[0], device=device, dtype=torch.float32)
    timing = gen.time_per_token(model, [4, 8], repeats=1, batch=2)
    assert isinstance(timing, gen.DecodeTiming)
    assert timing.lengths == (4, 8) and len(timing.cached) == len(timing.uncached) == 2
    assert all(t > 0 for t in timing.cached + timing.uncached) and timing.device == str(device)
    assert timing.ratios == tuple(u / c for u, c in zip(timing.uncached, timing.cached))
    with pytest.raises(ValueError, match="lengths must hold at least one"):
        gen.time_per_token(model, [])
    with pytest.raises(ValueError, match=r"lengths\[i\] must be an int >= 2"):
        gen.time_per_token(model, [1])
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        gen.time_per_token(model, [4], repeats=0)
    with pytest.raises(ValueError, match=r"timing at length 25 needs positions 0\.\.24: .*max_positions=24"):
        gen.time_per_token(make_lm(LearnedPE.name, device=device), [25])
