"""Throughput guards (issue 13, item 4): the fast paths compute exactly what the model computed before.

* Bit for bit: ``TinyLM.forward`` / ``forward_trusted`` (logits and every tensor of the returned
  cache) and :func:`pebook.generate` (tokens) equal a frozen copy of the model-level code as it
  was before the throughput work (``_frozen_forward_trusted``, ``_frozen_generate``), with
  ``torch.equal``, for every registered encoding and for padding, a sliding window, a
  pre-rotation cache and a changing RoPE frequency schedule. Committed experiments are re-checked
  against live training runs, so "close" is not enough.
* No host synchronisation in a step: a training step (forward, backward, clipping, AdamW) and
  cached decoding steps run on the ``meta`` device, where any read of a tensor's value
  (``.item()``, ``int()``, ``bool()``, ``.tolist()``) raises; on CUDA the same steps run under
  ``torch.cuda.set_sync_debug_mode("error")``.
* The benchmark's floor is a fair one: :meth:`pebook.book.bench.NanoGPT.from_tinylm` has the
  same parameters, tensor for tensor, and computes TinyLM's function (float64 logits against
  TinyLM's; its greedy loop decodes TinyLM's tokens).

Times are never asserted.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_cases import ENCODING_NAMES, model_options

import pebook as pb
from pebook import generation as gen
from pebook.book import bench
from pebook.cache import KVCache, extend_key_mask, window_cache
from pebook.masking import mask_positions
from pebook.rope_scaling import per_length_frequencies

VOCAB, DIM, LAYERS, HEADS, MAX_POS = 17, 16, 2, 2, 32
QK_ENCODINGS = tuple(n for n in ENCODING_NAMES if pb.ENCODINGS[n].place == "qk")
ROTARY = tuple(n for n in QK_ENCODINGS if hasattr(pb.ENCODINGS[n], "set_frequencies"))


def make_lm(name, *, device="cpu", dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    model = pb.TinyLM(VOCAB, DIM, LAYERS, HEADS, MAX_POS, name, **(model_options(name) | kw))
    return model.to(device=device, dtype=dtype).eval()


def tokens_of(batch, seq, *, seed=1, device="cpu"):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def left_padding(batch, seq, device="cpu"):
    """Row ``i`` has ``i`` padding tokens first (row 0 none)."""
    return (torch.arange(seq)[None, :] >= torch.arange(batch)[:, None]).long().to(device)


# ----------------------------------------------------------------- frozen copies of the old code


def _frozen_forward_trusted(model, tokens, q_pos, past_kvs=None, return_kv=False, *, attention_mask=None):
    """``TinyLM.forward_trusted`` before the throughput work (commit 6ee1398), line for line."""
    x = model.token_embedding(tokens)
    if model.position is not None:
        x = x + model.position.embed(q_pos, x.dtype)
    dropped = 0 if past_kvs is None else past_kvs.dropped
    k_pos = q_pos if past_kvs is None else torch.cat((past_kvs.positions, q_pos), dim=1)
    key_mask = attention_mask
    if key_mask is None and past_kvs is not None:
        key_mask = extend_key_mask(past_kvs.mask, tokens.shape[1])
    bias = model.blocks[0].attn.position.logit_bias(q_pos, k_pos) if model._shared_bias else None
    new_kvs = []
    for layer, block in enumerate(model.blocks):
        past = None if past_kvs is None else past_kvs[layer]
        attended, kv = block.attn._attend(block.attn_norm(x), q_pos, k_pos, past, bias, key_mask)
        x = x + attended
        x = x + block.mlp(block.mlp_norm(x))
        new_kvs.append(kv)
    logits = model.lm_head(model.final_norm(x))
    if not return_kv:
        return logits
    if model.sliding_window is None and model.cache_rotated_keys:
        return logits, KVCache(new_kvs, k_pos, key_mask)
    cache = window_cache(
        new_kvs, k_pos, key_mask, model.sliding_window, keys_rotated=model.cache_rotated_keys, dropped=dropped
    )
    return logits, cache


def _frozen_generate(model, prompt, max_new_tokens, *, attention_mask=None, rope_frequencies=None):
    """Greedy ``generate`` with the cache before the throughput work: the loop of commit 6ee1398."""
    batch, prompt_len = prompt.shape
    real_len = prompt_len
    mask = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        real_len = int(attention_mask.sum(dim=1).max())
        mask = torch.cat((attention_mask.bool(), attention_mask.new_ones(batch, max_new_tokens).bool()), dim=1)
    if mask is None:
        positions = torch.arange(prompt_len + max_new_tokens, device=prompt.device).expand(batch, -1)
    else:
        positions = mask_positions(mask)
    saved = gen._saved_frequencies(model, rope_frequencies)
    tokens = prompt
    try:
        with torch.no_grad():
            gen._apply_schedule(model, rope_frequencies, real_len)
            prompt_mask = None if mask is None else mask[:, :prompt_len]
            logits, cache = _frozen_forward_trusted(
                model, prompt, positions[:, :prompt_len], None, True, attention_mask=prompt_mask
            )
            for step in range(max_new_tokens):
                new = logits[:, -1].argmax(dim=-1, keepdim=True)
                tokens = torch.cat((tokens, new), dim=1)
                if step == max_new_tokens - 1:
                    break
                n = tokens.shape[1]
                gen._apply_schedule(model, rope_frequencies, real_len + n - prompt_len)
                logits, cache = _frozen_forward_trusted(model, new, positions[:, n - 1 : n], cache, True)
    finally:
        gen._restore_frequencies(model, saved)
    return tokens


def _assert_same_cache(got: KVCache, expected: KVCache):
    assert (got.dropped, got.keys_rotated, len(got)) == (expected.dropped, expected.keys_rotated, len(expected))
    assert torch.equal(got.positions, expected.positions)
    assert (got.mask is None) == (expected.mask is None)
    if got.mask is not None:
        assert torch.equal(got.mask, expected.mask)
    for (k, v), (k0, v0) in zip(got, expected):
        assert torch.equal(k, k0) and torch.equal(v, v0)


# configurations of the model-level paths: (TinyLM options, padded batch)
PATHS = {
    "plain": ({}, False),
    "padded": ({}, True),
    "window": ({"sliding_window": 5}, False),
    "window_padded": ({"sliding_window": 5}, True),
}


def _supports(name, options):
    if "sliding_window" in options:
        try:
            make_lm(name, **options)
        except ValueError:
            return False
    return True


def _prefill_then_steps(model, tokens, mask, prompt_len, forward):
    """Logits and caches of a prefill and single-token steps, through ``forward(tokens, q_pos, cache, mask)``."""
    q_pos = mask_positions(mask.bool()) if mask is not None else None
    if q_pos is None:
        q_pos = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    key_mask = None if mask is None else mask[:, :prompt_len].bool()
    outs = [forward(tokens[:, :prompt_len], q_pos[:, :prompt_len], None, key_mask)]
    for t in range(prompt_len, tokens.shape[1]):
        outs.append(forward(tokens[:, t : t + 1], q_pos[:, t : t + 1], outs[-1][1], None))
    return outs


@pytest.mark.parametrize("path", list(PATHS))
def test_forward_and_cache_are_bit_for_bit_the_frozen_code(device, encoding_name, path):
    options, padded = PATHS[path]
    if not _supports(encoding_name, options):
        pytest.skip(f"{encoding_name} takes no sliding window")
    model = make_lm(encoding_name, device=device, **options)
    tokens = tokens_of(3, 12, device=device)
    mask = left_padding(3, 12, device) if padded else None
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        tok, q_pos, _, key_mask = model._check_inputs(tokens, None, None, mask)
        assert torch.equal(full, _frozen_forward_trusted(model, tok, q_pos, attention_mask=key_mask))
        new = _prefill_then_steps(
            model, tokens, mask, 5, lambda t, p, c, m: model.forward_trusted(t, p, c, True, attention_mask=m)
        )
        old = _prefill_then_steps(
            model, tokens, mask, 5, lambda t, p, c, m: _frozen_forward_trusted(model, t, p, c, True, attention_mask=m)
        )
    for (logits, cache), (logits0, cache0) in zip(new, old):
        assert torch.equal(logits, logits0)
        _assert_same_cache(cache, cache0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_kv_heads", [None, 1])
@pytest.mark.parametrize("path", ["plain", "padded", "window"])
@pytest.mark.parametrize("name", QK_ENCODINGS)
def test_decoding_steps_rotate_queries_and_keys_in_one_call_bit_for_bit(device, name, path, n_kv_heads, dtype):
    """A decoding step rotates the query and key heads in one call where the encoding rotates them
    alike (rotate_queries not overridden): logits and caches equal those of two calls, forced here
    by overriding rotate_queries with the same rotation; grouped-query heads and padded rows too."""
    options, padded = PATHS[path]
    if not _supports(name, options):
        pytest.skip(f"{name} takes no sliding window")
    kv = {} if n_kv_heads is None else {"n_kv_heads": n_kv_heads}
    model = make_lm(name, device=device, dtype=dtype, **options, **kv)
    cls = type(model.blocks[0].attn.position)
    tokens = tokens_of(3, 10, device=device)
    mask = left_padding(3, 10, device) if padded else None
    calls = []

    def run():
        calls.clear()
        with torch.no_grad():
            return _prefill_then_steps(
                model, tokens, mask, 4, lambda t, p, c, m: model.forward_trusted(t, p, c, True, attention_mask=m)
            )

    rotate = cls.rotate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cls, "rotate", lambda self, x, ids: calls.append(x.shape[1]) or rotate(self, x, ids))
        joined = run()
        joined_calls = list(calls)
        if cls.rotate_queries is pb.PositionalEncoding.rotate_queries:
            patch.setattr(cls, "rotate_queries", lambda self, x, ids: self.rotate(x, ids))
        separate = run()
        separate_calls = list(calls)
    steps, layers, heads, kv_heads = 10 - 4, LAYERS, HEADS, n_kv_heads or HEADS
    if name == "xpos":  # its queries scale the other way: two calls at every step
        assert joined_calls == separate_calls
    else:
        assert joined_calls[-steps * layers :] == [heads + kv_heads] * (steps * layers)
        assert separate_calls[-2 * steps * layers :] == [heads, kv_heads] * (steps * layers)
    for (logits, cache), (logits0, cache0) in zip(joined, separate):
        assert torch.equal(logits, logits0)
        _assert_same_cache(cache, cache0)


@pytest.mark.parametrize("path", ["plain", "padded", "window"])
def test_generate_is_bit_for_bit_the_frozen_loop(device, encoding_name, path):
    options, padded = PATHS[path]
    if not _supports(encoding_name, options):
        pytest.skip(f"{encoding_name} takes no sliding window")
    model = make_lm(encoding_name, device=device, **options)
    prompt = tokens_of(3, 6, seed=2, device=device)
    mask = left_padding(3, 6, device) if padded else None
    new = 26 - 6 if encoding_name != "learned" else MAX_POS - 6 - 2
    got = gen.generate(model, prompt, new, attention_mask=mask)
    assert torch.equal(got, _frozen_generate(model, prompt, new, attention_mask=mask))


@pytest.mark.parametrize("cache_rotated_keys", [True, False])
@pytest.mark.parametrize("name", ROTARY)
def test_pre_rotation_cache_and_frequency_schedules_are_bit_for_bit_the_frozen_loop(device, name, cache_rotated_keys):
    model = make_lm(name, device=device, cache_rotated_keys=cache_rotated_keys)
    head_dim = DIM // HEADS
    schedule = per_length_frequencies("dynamic", head_dim, factor=4.0, original_max_positions=8, device=device)
    prompt = tokens_of(2, 5, seed=3, device=device)
    got = gen.generate(model, prompt, 20, rope_frequencies=schedule)
    assert torch.equal(got, _frozen_generate(model, prompt, 20, rope_frequencies=schedule))
    with torch.no_grad():
        new = _prefill_then_steps(
            model, prompt, None, 2, lambda t, p, c, m: model.forward_trusted(t, p, c, True, attention_mask=m)
        )
        old = _prefill_then_steps(
            model, prompt, None, 2, lambda t, p, c, m: _frozen_forward_trusted(model, t, p, c, True, attention_mask=m)
        )
    for (logits, cache), (logits0, cache0) in zip(new, old):
        assert torch.equal(logits, logits0)
        _assert_same_cache(cache, cache0)


@settings(max_examples=12)
@given(
    name=st.sampled_from(ENCODING_NAMES),
    batch=st.integers(1, 3),
    prompt_len=st.integers(1, 8),
    new=st.integers(1, 10),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_generate_equals_the_frozen_loop_for_any_shape(name, batch, prompt_len, new, padded, seed):
    model = make_lm(name, seed=seed % 7)
    prompt = tokens_of(batch, prompt_len, seed=seed)
    mask = left_padding(batch, prompt_len) if padded and prompt_len >= batch else None
    got = gen.generate(model, prompt, new, attention_mask=mask)
    assert torch.equal(got, _frozen_generate(model, prompt, new, attention_mask=mask))


def test_snapshot_greedy_tokens():
    """A frozen snapshot: the tokens a seeded float64 RoPE model decodes (robust to rounding)."""
    model = make_lm("rope", dtype=torch.float64, seed=0)
    out = gen.generate(model, tokens_of(1, 4, seed=0), 8)
    assert out[0, 4:].tolist() == _frozen_generate(model, tokens_of(1, 4, seed=0), 8)[0, 4:].tolist()
    assert out.shape == (1, 12)


# ----------------------------------------------------------------- no host synchronisation


def _train_step(model, tokens):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _decode_steps(model, tokens, mask):
    """Prefill and three cached steps through the public entry points (validation included)."""
    with torch.no_grad():
        logits, cache = gen.decode_step(model, tokens, attention_mask=mask)
        for _ in range(3):
            new = logits[:, -1:].argmax(dim=-1)
            logits, cache = model(new, past_kvs=cache, return_kv=True)
    return logits


# Host reads found by the test below, in files outside this work (each one a GPU sync per forward):
# remove an entry when its cause is fixed (the xfail is not strict only because the fix lands elsewhere).
KNOWN_HOST_READS = {
    "fire": "FIRE.logit_bias compares the rows of q_pos/k_pos with bool(...) at every forward (fire.py)",
    "rope": "the RoPE table cache reads inv_freq's values for its key (rope._frequency_value_key)",
}


@pytest.mark.parametrize("padded", [False, True])
def test_a_training_step_and_decoding_steps_never_read_a_value_on_the_host(request, encoding_name, padded):
    """On the meta device a tensor has no values: reading one (a host sync on a GPU) raises."""
    if encoding_name in KNOWN_HOST_READS:
        reason = KNOWN_HOST_READS[encoding_name]
        request.applymarker(pytest.mark.xfail(reason=reason, raises=(RuntimeError, NotImplementedError)))
    model = make_lm(encoding_name).to("meta").train()
    tokens = torch.zeros(3, 8, dtype=torch.long, device="meta")
    _train_step(model, tokens)
    mask = left_padding(3, 8).bool().to("meta") if padded else None
    assert _decode_steps(model.eval(), tokens, mask).shape == (3, 1, VOCAB)


def test_meta_tensors_refuse_a_host_read():
    """What the test above relies on."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.zeros(2, device="meta").sum().item()


@pytest.mark.parametrize("padded", [False, True])
def test_no_host_sync_on_cuda(cuda_device, encoding_name, padded):
    model = make_lm(encoding_name, device=cuda_device).train()
    tokens = tokens_of(3, 8, device=cuda_device)
    mask = left_padding(3, 8, cuda_device).bool() if padded else None
    _train_step(model, tokens)  # warm-up: lazy initialisation may synchronise once
    _decode_steps(model.eval(), tokens, mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_step(model.train(), tokens)
        _decode_steps(model.eval(), tokens, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------- the benchmark's floor


@pytest.mark.parametrize("encoding", ["learned", "rope"])
def test_nanogpt_twin_has_the_same_parameters_and_computes_the_same_function(encoding):
    tiny = make_lm(encoding, dtype=torch.float64)
    nano = bench.NanoGPT.from_tinylm(tiny).eval()
    assert bench._n_params(nano) == bench._n_params(tiny)
    assert sorted(p.shape for p in nano.parameters()) == sorted(p.shape for p in tiny.parameters())
    tokens = tokens_of(2, 20)
    with torch.no_grad():
        # the twin's RoPE tables are float32 (nanoGPT-style): equal to rounding
        torch.testing.assert_close(nano(tokens)[0], tiny(tokens), rtol=1e-6, atol=1e-6)
    prompt = tokens_of(1, 5, seed=4)
    with torch.no_grad():
        assert torch.equal(bench.nanogpt_greedy(nano, prompt, 12), gen.generate(tiny, prompt, 12))


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("alibi", {}, "encoding='alibi'"),
        ("rope", {"n_kv_heads": 1}, "n_kv_heads=1 of n_heads=2"),
        ("rope", {"rope_layout": "interleaved"}, "rope_layout='interleaved'"),
        ("rope", {"rope_base": 500.0}, "default frequencies: False"),
        ("rope", {"scale": 1.0}, "scale=1.0"),
    ],
)
def test_nanogpt_twin_refuses_another_architecture(name, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        bench.NanoGPT.from_tinylm(make_lm(name, **options))


def test_decode_rows_state_the_peer_size():
    rows = bench._decode_candidates(bench.DECODE_QUICK, torch.device("cpu"))
    peer = [r for r in rows if r.role == "peer"][0]
    if peer.unavailable is None:
        assert "parameters, TinyLM" in peer.label
