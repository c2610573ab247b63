"""Pre-rotation key cache (``cache_rotated_keys=False``) and frequencies that change per step.

A RoPE cache of rotated keys (the default, as ``transformers`` caches them) goes stale when the
frequencies change between steps, as ``transformers``' dynamic RoPE recomputes them from the
sequence length (``_compute_dynamic_ntk_parameters``); caching keys before rotation and rotating
them all at every step fixes it, at the cost of ``cache length`` more rotated key rows per layer
per step. Positions of keys cached before rotation can also be reassigned, which StreamingLLM's
position shifting needs (Xiao et al. 2023, arXiv:2309.17453).
"""

from __future__ import annotations

import pytest
import torch
from registry_cases import ENCODING_NAMES, model_options

import pebook
from pebook.generation import decode_step, generate, incremental_logits
from pebook.rope_scaling import per_length_frequencies

VOCAB, DIM, HEADS = 40, 16, 2
HEAD_DIM = DIM // HEADS


def twins(n_layers=1, seed=0, **options):
    """Two float64 RoPE models with the same weights: keys cached after and before rotation."""
    torch.manual_seed(seed)
    post = pebook.TinyLM(VOCAB, DIM, n_layers, HEADS, 8, "rope", **options).double().eval()
    pre = pebook.TinyLM(VOCAB, DIM, n_layers, HEADS, 8, "rope", cache_rotated_keys=False, **options).double().eval()
    pre.load_state_dict(post.state_dict())
    return post, pre


def tokens_of(batch, seq, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def dynamic_schedule(dim=HEAD_DIM):
    # transformers' "dynamic" rule with a short original context, so the frequencies change at every step past 4
    return per_length_frequencies("dynamic", dim, factor=8.0, original_max_positions=4, dtype=torch.float64)


def full_logits_at_final_frequencies(model, tokens, schedule):
    """Each row t: the uncached forward of tokens[:, :t+1] with the frequencies of length t+1."""
    rows = []
    saved = model.encoding_module.inv_freq
    for t in range(tokens.shape[1]):
        model.set_rope_frequencies(*schedule(t + 1))
        with torch.no_grad():
            rows.append(model(tokens[:, : t + 1])[:, -1])
    model.set_rope_frequencies(saved)
    return torch.stack(rows, dim=1)


# ----------------------------------------------------------------------------- fixed frequencies


@pytest.mark.parametrize("options", [{}, {"rope_layout": "interleaved"}, {"rotary_dim": 4}, {"n_kv_heads": 1}])
@pytest.mark.parametrize("prompt_len", [1, 5])
def test_pre_rotation_cache_equals_post_rotation_and_full_forward(options, prompt_len):
    post, pre = twins(n_layers=2, **options)
    tokens = tokens_of(2, 11)
    with torch.no_grad():
        full = post(tokens)
    got_post = incremental_logits(post, tokens, prompt_len)
    got_pre = incremental_logits(pre, tokens, prompt_len)
    torch.testing.assert_close(got_pre, full, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_pre, got_post, rtol=0, atol=1e-10)


def test_pre_rotation_cache_holds_unrotated_keys_and_their_positions():
    post, pre = twins()
    tokens = tokens_of(1, 6)
    _, cache = decode_step(pre, tokens)
    assert cache.keys_rotated is False and decode_step(post, tokens)[1].keys_rotated is True
    torch.testing.assert_close(cache.positions, torch.arange(6)[None])
    attn = pre.blocks[0].attn
    x = pre.blocks[0].attn_norm(pre.token_embedding(tokens))
    k = attn.qkv(x).view(1, 6, -1, HEAD_DIM).transpose(1, 2)[:, HEADS : HEADS + attn.n_kv_heads]
    torch.testing.assert_close(cache[0][0], k.detach(), rtol=0, atol=0)


def test_generate_is_unchanged_by_where_keys_are_cached():
    post, pre = twins(n_layers=2)
    prompt = tokens_of(3, 4)
    torch.testing.assert_close(generate(pre, prompt, 9), generate(post, prompt, 9), rtol=0, atol=0)


def test_padded_batch_with_pre_rotation_cache_decodes_each_row_alone():
    _, pre = twins(n_layers=2)
    tokens = tokens_of(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    got = incremental_logits(pre, tokens, 5, attention_mask=mask)
    alone = incremental_logits(pre, tokens[1:, 3:], 2)
    torch.testing.assert_close(got[1, 3:], alone[0], rtol=0, atol=1e-10)


def test_multi_head_attention_pre_rotation_cache():
    torch.manual_seed(0)
    mha = pebook.MultiHeadAttention(DIM, HEADS, "rope", cache_rotated_keys=False).double()
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    full = mha(x)
    out, cache = mha(x[:, :4], return_kv=True)
    assert cache.keys_rotated is False
    steps = [out]
    for t in range(4, 7):
        out, cache = mha(x[:, t : t + 1], past_kv=cache, return_kv=True)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- frequencies that change


def test_per_length_frequencies_follow_the_rule():
    schedule = dynamic_schedule()
    for seq_len in (1, 4, 5, 9):
        want = pebook.rope_scaling.dynamic_frequencies(
            HEAD_DIM, factor=8.0, seq_len=seq_len, original_max_positions=4, dtype=torch.float64
        )
        got = schedule(seq_len)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert got[1] == want[1]
    assert torch.equal(schedule(3)[0], schedule(4)[0])  # plain RoPE up to the original length
    assert not torch.equal(schedule(5)[0], schedule(6)[0])  # then new frequencies at every length


def test_post_rotation_cache_goes_stale_and_pre_rotation_cache_does_not():
    """The stale cache, shown and fixed (one layer: every cached key is then all that a step reuses)."""
    post, pre = twins(n_layers=1)
    tokens = tokens_of(2, 12)
    schedule = dynamic_schedule()
    reference = full_logits_at_final_frequencies(post, tokens, schedule)
    got_post = incremental_logits(post, tokens, 3, rope_frequencies=schedule)
    got_pre = incremental_logits(pre, tokens, 3, rope_frequencies=schedule)
    # within the original context (length <= 4) the frequencies do not change and both agree
    torch.testing.assert_close(got_post[:, :4], reference[:, :4], rtol=0, atol=1e-10)
    # past it, keys rotated at earlier frequencies are stale: a clear gap
    stale = (got_post - reference).abs().amax()
    assert stale > 1e-3, stale
    # keys cached before rotation are rotated with the current frequencies: the full recomputation
    torch.testing.assert_close(got_pre, reference, rtol=0, atol=1e-10)
    # the model's own frequencies are left as they were
    torch.testing.assert_close(pre.encoding_module.inv_freq, pebook.rope_frequencies(HEAD_DIM).double())


def test_deeper_layers_keep_hidden_states_of_earlier_frequencies():
    """With two layers, the cached keys and values of layer 1 are functions of layer 0's outputs at
    the frequencies of their own step: pre-rotation caching rotates them correctly but cannot
    recompute their content, so it no longer equals the full recomputation exactly."""
    post, pre = twins(n_layers=2)
    tokens = tokens_of(2, 12)
    schedule = dynamic_schedule()
    reference = full_logits_at_final_frequencies(post, tokens, schedule)
    got_pre = incremental_logits(pre, tokens, 3, rope_frequencies=schedule)
    assert (got_pre - reference).abs().amax() > 1e-10
    # ... but its first layer is exact: run the schedule with one block only
    one = pebook.TinyLM(VOCAB, DIM, 1, HEADS, 8, "rope", cache_rotated_keys=False).double().eval()
    state = {k: v for k, v in pre.state_dict().items() if not k.startswith("blocks.1.")}
    one.load_state_dict(state)
    torch.testing.assert_close(
        incremental_logits(one, tokens, 3, rope_frequencies=schedule),
        full_logits_at_final_frequencies(one, tokens, schedule),
        rtol=0,
        atol=1e-10,
    )


def test_generate_with_changing_frequencies_matches_recomputation_with_pre_rotation_cache():
    post, pre = twins(n_layers=1)
    prompt = tokens_of(2, 3)
    schedule = dynamic_schedule()
    uncached = generate(pre, prompt, 12, use_cache=False, rope_frequencies=schedule)
    torch.testing.assert_close(generate(pre, prompt, 12, rope_frequencies=schedule), uncached, rtol=0, atol=0)
    before = pre.encoding_module.inv_freq.clone()
    generate(pre, prompt, 4, rope_frequencies=schedule)
    assert torch.equal(pre.encoding_module.inv_freq, before)  # restored


def test_generate_passes_the_length_so_far_to_the_schedule():
    _, pre = twins()
    seen = []

    def schedule(seq_len):
        seen.append(seq_len)
        return pebook.rope_frequencies(HEAD_DIM), 1.0

    generate(pre, tokens_of(1, 3), 4, rope_frequencies=schedule)
    assert seen == [3, 4, 5, 6]  # the prefill, then each fed token (the last one is never fed)
    seen.clear()
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    generate(pre, tokens_of(2, 3), 3, rope_frequencies=schedule, attention_mask=mask)
    assert seen == [3, 4, 5]  # the longest row's real tokens
    seen.clear()
    incremental_logits(pre, tokens_of(1, 5), 2, rope_frequencies=schedule)
    assert seen == [2, 3, 4, 5]


# ----------------------------------------------------------------------------- the cost


def test_each_step_rotates_every_cached_key():
    """The cost of a pre-rotation cache: per layer per step, the cached keys are rotated again
    (``O(cache length · head_dim)``), where a post-rotation cache rotates only the new key."""
    post, pre = twins(n_layers=2, n_kv_heads=1)
    tokens = tokens_of(1, 8)
    calls = []
    for model, cached_rows in ((post, lambda length: 0), (pre, lambda length: length)):
        for block in model.blocks:
            encoding = block.attn.position
            original = encoding.rotate

            def counting(x, position_ids, original=original):
                calls.append((x.shape[1], x.shape[2]))  # (heads, rows)
                return original(x, position_ids)

            encoding.rotate = counting
        _, cache = decode_step(model, tokens[:, :3])
        for t in range(3, 8):
            calls.clear()
            length = cache.length
            _, cache = decode_step(model, tokens[:, t : t + 1], cache)
            # the one key head alone, or with the 2 query heads: a post-rotation step rotates the
            # new queries and key in one call
            key_rows = [rows for heads, rows in calls if heads in (1, 3)]
            assert key_rows == [cached_rows(length) + 1] * len(model.blocks)
        for block in model.blocks:
            del block.attn.position.rotate


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ENCODING_NAMES)
def test_cache_rotated_keys_false_needs_a_rotary_encoding(name):
    cls = pebook.ENCODINGS[name]
    options = model_options(name)
    if cls.place == "qk":
        pebook.TinyLM(VOCAB, DIM, 1, HEADS, 8, name, cache_rotated_keys=False, **options)
        return
    with pytest.raises(ValueError, match=rf"cache_rotated_keys=False .*the {name} encoding has place"):
        pebook.TinyLM(VOCAB, DIM, 1, HEADS, 8, name, cache_rotated_keys=False, **options)


def test_cache_rotated_keys_must_be_a_bool():
    with pytest.raises(TypeError, match="cache_rotated_keys"):
        pebook.TinyLM(VOCAB, DIM, 1, HEADS, 8, "rope", cache_rotated_keys=0)


def test_a_cache_of_the_other_kind_is_refused():
    post, pre = twins()
    tokens = tokens_of(1, 4)
    _, post_cache = decode_step(post, tokens)
    _, pre_cache = decode_step(pre, tokens)
    with pytest.raises(ValueError, match=r"holds rotated keys .* before rotation \(cache_rotated_keys=False\)"):
        pre(tokens[:, :1], past_kvs=post_cache)
    with pytest.raises(ValueError, match=r"holds unrotated keys .* after rotation \(cache_rotated_keys=True\)"):
        decode_step(post, tokens[:, :1], pre_cache)
    with pytest.raises(ValueError, match="holds rotated keys"):
        pebook.generation.check_kv_cache(pre, post_cache)


def test_bad_rope_frequencies():
    _, pre = twins()
    prompt = tokens_of(1, 3)
    with pytest.raises(TypeError, match="rope_frequencies must be None or a callable"):
        generate(pre, prompt, 2, rope_frequencies="dynamic")
    alibi = pebook.TinyLM(VOCAB, DIM, 1, HEADS, 8, "alibi")
    with pytest.raises(ValueError, match="rope_frequencies needs a rotary encoding"):
        generate(alibi, prompt, 2, rope_frequencies=dynamic_schedule())
    with pytest.raises(ValueError, match="rope_frequencies needs a rotary encoding"):
        incremental_logits(alibi, prompt, 2, rope_frequencies=dynamic_schedule())


def test_bad_per_length_frequencies():
    with pytest.raises(ValueError, match="rule must be one of"):
        per_length_frequencies("dynamc", HEAD_DIM)
    with pytest.raises(ValueError, match="original_max_positions"):
        per_length_frequencies("dynamic", HEAD_DIM, factor=2.0)
    with pytest.raises(TypeError, match="passes seq_len itself"):
        per_length_frequencies("dynamic", HEAD_DIM, factor=2.0, original_max_positions=4, seq_len=3)
    constant = per_length_frequencies("linear", HEAD_DIM, factor=2.0)
    assert torch.equal(constant(3)[0], constant(300)[0])
