"""Sliding-window attention and its rolling KV cache (Mistral 7B, Jiang et al. 2023, arXiv:2310.06825).

Each query sees only the last ``W`` keys, itself included; decoding with a cache of at most ``W``
tokens per layer equals the full uncached forward pass under the banded causal mask.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from registry_cases import ENCODING_NAMES, model_options

import pebook
from pebook.generation import decode_step, generate, incremental_logits
from pebook.masking import continued_positions, mask_positions, window_causal_mask

VOCAB, DIM, HEADS = 40, 16, 2
SUPPORTED = tuple(
    n for n, c in pebook.ENCODINGS.items() if c.place == "input" or "window" in inspect.signature(c.attend).parameters
)
REFUSED = tuple(n for n in ENCODING_NAMES if n not in SUPPORTED)


def windowed(name, window, n_layers=2, seed=0, **extra):
    torch.manual_seed(seed)
    options = model_options(name) | extra
    return pebook.TinyLM(VOCAB, DIM, n_layers, HEADS, 32, name, sliding_window=window, **options).double().eval()


def tokens_of(batch, seq, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_the_rope_and_alibi_cases_are_supported():
    assert {"rope", "alibi"} <= set(SUPPORTED)


def test_window_causal_mask_is_the_band():
    for q_len, k_len, window in [(5, 5, 2), (1, 6, 3), (3, 7, 1), (4, 4, 9)]:
        got = window_causal_mask(q_len, k_len, window)
        for i in range(q_len):
            row = k_len - q_len + i
            want = [row - window < j <= row for j in range(k_len)]
            assert got[i].tolist() == want


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize(("window", "prompt_len"), [(3, 6), (4, 2), (1, 3), (5, 5)])
def test_windowed_cache_decoding_equals_banded_full_forward(name, window, prompt_len):
    model = windowed(name, window)
    tokens = tokens_of(2, 13)
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(incremental_logits(model, tokens, prompt_len), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["rope", "alibi"])
def test_one_layer_window_equals_the_last_w_tokens_alone(name):
    """An independent check of the band: with one layer, the logits of token i under window W are
    those of the unwindowed model run on tokens i-W+1 … i alone, at their own positions."""
    window = 4
    model = windowed(name, window, n_layers=1)
    plain = windowed(name, None, n_layers=1)
    plain.load_state_dict(model.state_dict())
    tokens = tokens_of(2, 10)
    with torch.no_grad():
        full = model(tokens)
        for i in range(10):
            lo = max(0, i - window + 1)
            alone = plain(tokens[:, lo : i + 1], position_ids=torch.arange(lo, i + 1).expand(2, -1))[:, -1]
            torch.testing.assert_close(full[:, i], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["rope", "alibi"])
def test_the_cache_never_holds_more_than_w_tokens(name):
    window = 3
    model = windowed(name, window)
    tokens = tokens_of(2, 12)
    with torch.no_grad():
        full = model(tokens)
    logits, cache = decode_step(model, tokens[:, :7])
    assert cache.length == window and cache.dropped == 4
    steps = [logits]
    for t in range(7, 12):
        logits, cache = decode_step(model, tokens[:, t : t + 1], cache)
        steps.append(logits)
        assert cache.length <= window and cache.dropped + cache.length == t + 1
        assert all(k.shape[2] <= window and v.shape[2] <= window for k, v in cache)
        torch.testing.assert_close(cache.positions, torch.arange(t + 1 - window, t + 1).expand(2, -1))
        assert cache.nbytes == pebook.generation.kv_cache_bytes(
            2, HEADS, DIM // HEADS, window, batch=2, dtype=torch.float64
        )
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


def test_default_positions_continue_after_eviction():
    model = windowed("rope", 3)
    tokens = tokens_of(1, 9)
    with torch.no_grad():
        full = model(tokens)
        _, cache = model(tokens[:, :6], return_kv=True)
        steps = []
        for t in range(6, 9):  # no position_ids: the model continues at dropped + length
            logits, cache = model(tokens[:, t : t + 1], past_kvs=cache, return_kv=True)
            steps.append(logits)
        # an attention_mask covers every token so far, evicted ones included, as in transformers
        step = model(
            tokens[:, 8:9], past_kvs=_prefix_cache(model, tokens, 8), attention_mask=torch.ones(1, 9, dtype=torch.long)
        )
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], rtol=0, atol=1e-10)
    torch.testing.assert_close(step, full[:, 8:], rtol=0, atol=1e-10)


def _prefix_cache(model, tokens, n):
    return model(tokens[:, :n], return_kv=True)[1]


@pytest.mark.parametrize("name", ["rope", "alibi"])
def test_generate_with_window_matches_recomputation(name):
    model = windowed(name, 3)
    prompt = tokens_of(2, 5)
    torch.testing.assert_close(
        generate(model, prompt, 10), generate(model, prompt, 10, use_cache=False), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", ["rope", "alibi"])
def test_padded_batch_with_window_decodes_each_row_alone(name):
    model = windowed(name, 3)
    tokens = tokens_of(2, 11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    got = incremental_logits(model, tokens, 6, attention_mask=mask)
    alone = incremental_logits(model, tokens[1:, 4:], 2)
    torch.testing.assert_close(got[1, 4:], alone[0], rtol=0, atol=1e-10)
    # the same through TinyLM.forward's default positions of a cut padded cache
    with torch.no_grad():
        _, cache = model(tokens[:, :8], attention_mask=mask[:, :8], return_kv=True)
        assert cache.dropped == 5
        steps = []
        for t in range(8, 11):
            logits, cache = model(tokens[:, t : t + 1], past_kvs=cache, return_kv=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1)[1], alone[0, -3:], rtol=0, atol=1e-10)


def test_continued_positions_equal_the_uncut_count():
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]).bool()
    full = mask_positions(mask)
    cut = 3  # the first 3 tokens evicted; 3 cached, 2 new
    got = continued_positions(mask[:, cut:], 3, full[:, cut:6])
    torch.testing.assert_close(got, full[:, 6:])


def test_window_with_pre_rotation_cache():
    model = windowed("rope", 4, cache_rotated_keys=False)
    tokens = tokens_of(2, 12)
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(incremental_logits(model, tokens, 6), full, rtol=0, atol=1e-10)


def test_window_at_least_the_sequence_changes_nothing():
    model = windowed("alibi", 20)
    plain = windowed("alibi", None)
    tokens = tokens_of(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=0, atol=0)


def test_multi_head_attention_window():
    torch.manual_seed(0)
    mha = pebook.MultiHeadAttention(DIM, HEADS, "rope", sliding_window=3).double()
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    full = mha(x)
    out, cache = mha(x[:, :5], return_kv=True)
    steps = [out]
    for t in range(5, 9):
        out, cache = mha(x[:, t : t + 1], past_kv=cache, return_kv=True)
        assert cache.length <= 3
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("window", [0, -2])
def test_window_must_be_positive(window):
    with pytest.raises(ValueError, match="sliding_window"):
        pebook.TinyLM(VOCAB, DIM, 1, HEADS, 8, "rope", sliding_window=window)


@pytest.mark.parametrize("window", [2.0, "4", True])
def test_window_must_be_an_int(window):
    with pytest.raises(TypeError, match="sliding_window"):
        pebook.TinyLM(VOCAB, DIM, 1, HEADS, 8, "rope", sliding_window=window)


@pytest.mark.parametrize("name", REFUSED or ["(none)"])
def test_encodings_whose_attention_hook_takes_no_window_are_refused(name):
    if name == "(none)":
        pytest.skip("every registered encoding supports a sliding window")
    with pytest.raises(ValueError, match=rf"sliding_window=3 is not supported by the {name} encoding"):
        pebook.TinyLM(VOCAB, DIM, 1, HEADS, 8, name, sliding_window=3, **model_options(name))


def test_window_needs_causal_attention():
    with pytest.raises(ValueError, match="sliding_window=2 needs causal attention"):
        pebook.MultiHeadAttention(DIM, HEADS, "alibi", causal=False, sliding_window=2)


def test_attention_mask_after_eviction_covers_every_token():
    model = windowed("rope", 3)
    tokens = tokens_of(1, 6)
    _, cache = decode_step(model, tokens[:, :5])
    with pytest.raises(ValueError, match=r"past_kvs\.dropped \+ past_len \+ seq=6"):
        model(tokens[:, 5:], past_kvs=cache, attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_bad_dropped_is_refused():
    model = windowed("rope", 3)
    tokens = tokens_of(1, 6)
    _, cache = decode_step(model, tokens[:, :5])
    cache.dropped = -1
    with pytest.raises(ValueError, match="past_kvs.dropped"):
        model(tokens[:, 5:], past_kvs=cache)
