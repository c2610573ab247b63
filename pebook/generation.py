"""Autoregressive generation with a KV cache, for every positional encoding.

A decoder-only model factorises ``p(x_1 … x_T) = Π_t p(x_t | x_<t)`` and generates one token at
a time, feeding each new token back as input (Vaswani et al. 2017, arXiv:1706.03762, §3: "the
model is auto-regressive, consuming the previously generated symbols as additional input";
Radford et al. 2019). With a causal mask the keys and values of a position never change once
computed, so a step only needs to compute them for the new token and can read the earlier ones
from a cache: incremental decoding as analysed by Shazeer 2019 ("Fast Transformer Decoding: One
Write-Head is All You Need", arXiv:1911.02150). Its size is
``2 · layers · kv_heads · head_dim · tokens · batch · bytes`` (keys and values), which
grouped-query attention shrinks by sharing key/value heads (Ainslie et al. 2023, "GQA",
arXiv:2305.13245); Llama 2 uses it for its 34B and 70B models (Touvron et al. 2023,
arXiv:2307.09288).

Position during decoding: the token fed at step ``t`` sits at position ``past_len`` (the cache
length). :class:`pebook.TinyLM` does this for every encoding — RoPE rotates the new query and key
at ``past_len`` and caches the rotated key; ALiBi, T5 and Shaw use the bias / relative row of
query position ``past_len``; sinusoidal and learned add ``PE(past_len)`` to the new embedding.
:func:`incremental_logits` can reproduce the classic bug of encoding every decoded token at
position 0.

Batches of prompts of different lengths are left-padded as in ``transformers``
(``padding_side="left"``): an ``attention_mask`` ``(batch, prompt_len)`` of 1 (token) and 0
(padding) hides the padding from every query, the real tokens sit at ``position_ids =
cumsum(attention_mask) - 1``, and each new token at its row's count of real tokens so far, so every
row of a padded batch decodes exactly as it would alone (:func:`generate`, :func:`decode_step`).

Frequencies that change during generation: ``rope_frequencies`` (of :func:`generate` and
:func:`incremental_logits`) is a function of the current length, called before every forward
pass, whose ``(inv_freq, attention_factor)`` the model's RoPE layers take for that pass, as
``transformers``' dynamic RoPE recomputes its frequencies from the sequence length
(``_compute_dynamic_ntk_parameters`` in ``modeling_rope_utils``;
:func:`pebook.rope_scaling.per_length_frequencies` makes one from a rule). A cache of rotated keys
(the default) then holds keys rotated with the frequencies of the step that cached them, stale
once they change; a model built with ``cache_rotated_keys=False`` caches keys before rotation
and rotates all of them with each step's frequencies (see :class:`pebook.TinyLM`). A model with a
``sliding_window`` keeps only its last ``W`` tokens in the cache (Mistral 7B, arXiv:2310.06825).

Sampling: temperature ``τ`` divides the logits before the softmax; top-k keeps the ``k`` largest
logits (Fan, Lewis & Dauphin 2018, "Hierarchical Neural Story Generation", arXiv:1805.04833).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Real

import torch

from ._checks import check_float_dtype, check_int, check_int_tensor, check_positions, check_positive_float
from .cache import KVCache, check_cache
from .masking import check_attention_mask, mask_positions
from .model import TinyLM
from .rope_scaling import FrequencySchedule

__all__ = [
    "check_kv_cache",
    "decode_step",
    "generate",
    "incremental_logits",
    "kv_cache_bytes",
    "cache_bytes",
    "DecodeTiming",
    "time_per_token",
]


# ----------------------------------------------------------------------------- argument checks


def _check_model(model) -> TinyLM:
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a pebook.TinyLM, got {type(model).__name__}")
    return model


def _placement(model: TinyLM) -> tuple[torch.device, torch.dtype]:
    weight = model.token_embedding.weight
    return weight.device, weight.dtype


def _check_tokens(model: TinyLM, name: str, tokens) -> torch.Tensor:
    """An int tensor ``(batch, seq)`` with ``seq >= 1``, ids in the vocabulary, on the model's device."""
    check_int_tensor(name, tokens, ndim=2)
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            f"{name} must have shape (batch >= 1, seq >= 1): generation starts from at least one token, "
            f"got shape {tuple(tokens.shape)}"
        )
    if tokens.min() < 0 or tokens.max() >= model.vocab_size:
        raise ValueError(
            f"{name} must hold token ids in [0, vocab_size={model.vocab_size}), got values in "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    device, _ = _placement(model)
    if tokens.device != device:
        raise ValueError(f"{name} is on {tokens.device} but the model is on {device}; move one of them")
    return tokens.long()


def _check_schedule(model: TinyLM, rope_frequencies):
    """``rope_frequencies``: ``None`` or a callable ``seq_len -> (inv_freq, attention_factor)`` for a rotary model."""
    if rope_frequencies is None:
        return None
    if not callable(rope_frequencies):
        raise TypeError(
            "rope_frequencies must be None or a callable seq_len -> (inv_freq, attention_factor) "
            f"(e.g. pebook.rope_scaling.per_length_frequencies(...)), got {type(rope_frequencies).__name__}"
        )
    if not hasattr(model.encoding_module, "set_frequencies"):
        raise ValueError(f"rope_frequencies needs a rotary encoding, this model has encoding={model.encoding!r}")
    return rope_frequencies


def _apply_schedule(model: TinyLM, schedule: FrequencySchedule | None, seq_len: int) -> None:
    """Give the model's RoPE layers the frequencies of ``schedule`` at ``seq_len`` (nothing if ``None``)."""
    if schedule is None:
        return
    result = schedule(seq_len)
    inv_freq, factor = result if isinstance(result, tuple) else (result, 1.0)
    model.set_rope_frequencies(inv_freq, factor)


def _saved_frequencies(model: TinyLM, schedule) -> list | None:
    """Each layer's ``(inv_freq, attention_factor)``, to restore after a schedule changed them."""
    if schedule is None:
        return None
    return [(b.attn.position.inv_freq, b.attn.position.attention_factor) for b in model.blocks]


def _restore_frequencies(model: TinyLM, saved) -> None:
    if saved is not None:
        for block, (inv_freq, factor) in zip(model.blocks, saved):
            block.attn.set_rope_frequencies(inv_freq, factor)


def _check_room(model: TinyLM, needed: int, what: str) -> None:
    """Refuse work that needs positions the encoding cannot place (a learned table has an end)."""
    if needed <= 0:
        return
    try:
        model.encoding_module.check_positions(needed - 1)
    except ValueError as err:
        raise ValueError(f"{what} needs positions 0..{needed - 1}: {err}") from None


def check_kv_cache(model: TinyLM, past_kvs, *, batch: int | None = None) -> int:
    """Check that ``past_kvs`` is a KV cache this model can continue from; return its length.

    A cache is the :class:`pebook.KVCache` returned by ``model(..., return_kv=True)``: per layer
    ``(k, v)`` of shape ``(batch, n_kv_heads, cached_positions, head_dim)``, and the cached
    tokens' positions. Checked: the number of layers, key/value heads and head size (a cache made
    by a model of another shape raises ``ValueError`` saying so), the batch size (when ``batch``
    is given), equal lengths, the model's device and dtype, and, for a learned table, that the
    cache is not longer than the table.
    """
    model = _check_model(model)
    device, dtype = _placement(model)
    length = check_cache(
        "past_kvs",
        past_kvs,
        n_layers=model.n_layers,
        n_kv_heads=model.n_kv_heads,
        head_dim=model.head_dim,
        batch=batch,
        device=device,
        dtype=dtype,
        keys_rotated=model.cache_rotated_keys,
    )
    _check_room(model, past_kvs.dropped + length, "a cache of this length")
    return length


# ----------------------------------------------------------------------------- decoding


def decode_step(
    model: TinyLM,
    tokens: torch.Tensor,
    past_kvs=None,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
):
    """Feed ``tokens`` ``(batch, n)`` after the cache: returns ``(logits (batch, n, vocab), new cache)``.

    Without ``past_kvs`` this is the prefill of a prompt. The new tokens sit at positions
    ``past_len … past_len + n - 1`` unless ``position_ids`` ``(batch, n)`` says otherwise (the
    causal mask follows the cache either way). ``attention_mask`` ``(batch, past_len + n)``: a
    left-padded batch (1 token, 0 padding, as in ``transformers``), see :meth:`pebook.TinyLM.forward`;
    the returned cache keeps it, so later steps need none and continue each row's own positions.
    Runs under ``torch.no_grad()``; the arguments are validated here, once, and the model runs
    without checking them again.
    """
    model = _check_model(model)
    tokens, q_pos, _, key_mask = model._check_inputs(tokens, position_ids, past_kvs, attention_mask)
    with torch.no_grad():
        return model.forward_trusted(tokens, q_pos, past_kvs, return_kv=True, attention_mask=key_mask)


def incremental_logits(
    model: TinyLM,
    tokens: torch.Tensor,
    prompt_len: int,
    *,
    position_ids=None,
    attention_mask=None,
    rope_frequencies=None,
):
    """Logits ``(batch, seq, vocab)`` of ``tokens`` computed the way generation computes them.

    The first ``prompt_len`` tokens are fed in one call (the prefill), then the others one at a
    time with the KV cache. ``position_ids`` ``(batch, seq)`` (default ``0 … seq - 1``) give each
    token's position; with the default the result equals ``model(tokens)`` up to rounding, for
    every encoding. Wrong ids reproduce decoding bugs: ``position_ids = [0 … prompt_len - 1, 0, 0,
    …]`` is the classic one of computing a step's positions from its own input alone
    (``arange(new_len)``), forgetting the cache. ``attention_mask`` ``(batch, seq)``: a left-padded
    batch (1 token, 0 padding, as in ``transformers``); every row needs a real token among the
    first ``prompt_len``, and ``position_ids`` then default to ``cumsum(attention_mask) - 1``.
    ``rope_frequencies``: a callable ``seq_len -> (inv_freq, attention_factor)`` applied before
    every call with ``seq_len`` = the largest position id so far + 1 (as ``transformers``'
    ``dynamic_rope_update``), see :func:`generate`; the model's frequencies are restored after.
    """
    model = _check_model(model)
    tokens = _check_tokens(model, "tokens", tokens)
    batch, seq = tokens.shape
    prompt_len = check_int("prompt_len", prompt_len, minimum=1)
    if prompt_len > seq:
        raise ValueError(f"prompt_len must be between 1 and the sequence length {seq}, got {prompt_len}")
    prompt_mask = None
    if attention_mask is not None:
        attention_mask = check_attention_mask(
            "attention_mask", attention_mask, batch, seq, tokens.device, what="seq", values=True
        )
        prompt_mask = attention_mask[:, :prompt_len]
        if position_ids is None:
            position_ids = mask_positions(attention_mask)
    if position_ids is None:
        position_ids = torch.arange(seq, device=tokens.device).expand(batch, seq)
    position_ids = check_positions("position_ids", position_ids, batch, seq, tokens.device)
    schedule = _check_schedule(model, rope_frequencies)
    saved = _saved_frequencies(model, schedule)
    try:
        # seq_len of each call: the largest position id so far + 1 (one host sync, not one per step)
        lengths = None if schedule is None else (position_ids.cummax(dim=1).values.amax(dim=0) + 1).tolist()
        if schedule is not None:
            _apply_schedule(model, schedule, lengths[prompt_len - 1])
        logits, cache = decode_step(
            model, tokens[:, :prompt_len], position_ids=position_ids[:, :prompt_len], attention_mask=prompt_mask
        )
        steps = [logits]
        for t in range(prompt_len, seq):
            if schedule is not None:
                _apply_schedule(model, schedule, lengths[t])
            logits, cache = decode_step(model, tokens[:, t : t + 1], cache, position_ids=position_ids[:, t : t + 1])
            steps.append(logits)
    finally:
        _restore_frequencies(model, saved)
    return torch.cat(steps, dim=1)


def _next_token(logits: torch.Tensor, temperature: float | None, top_k: int | None, generator) -> torch.Tensor:
    """Pick one token per row of ``logits`` ``(batch, vocab)``: greedy, or sampled from softmax(logits/τ)."""
    if temperature is None:
        return logits.argmax(dim=-1, keepdim=True)
    scores = logits.double() / temperature
    if top_k is not None:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))  # ties with the k-th logit are kept
    probs = torch.softmax(scores, dim=-1)
    if generator is None:
        return torch.multinomial(probs, 1)
    return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(logits.device)


def generate(
    model: TinyLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    rope_frequencies=None,
) -> torch.Tensor:
    """Continue ``prompt`` ``(batch, prompt_len)`` by ``max_new_tokens`` tokens; returns ``(batch, prompt_len + new)``.

    * ``temperature=None``: greedy decoding (argmax). A number ``τ > 0``: sample from
      ``softmax(logits / τ)``; ``top_k`` then keeps only the ``k`` largest logits (``top_k=1`` is
      greedy). ``temperature=0`` is rejected: ask for greedy decoding with ``None``.
    * ``use_cache=True``: prefill the prompt once, then feed one token per step with the KV cache.
      ``use_cache=False``: recompute the whole sequence at every step (same tokens, more work).
    * ``generator``: a ``torch.Generator`` that makes sampling reproducible (sampling happens on
      the generator's device).
    * ``attention_mask``: a batch of prompts of different lengths, left-padded, as ``transformers``
      batches them (``padding_side="left"``): ``(batch, prompt_len)``, 1 for a real token and 0 for
      padding, the 0s first in every row. Padding is never attended to; the real tokens sit at
      ``position_ids = cumsum(attention_mask) - 1`` and each new token at its row's count of real
      tokens so far, so every row continues exactly as it would alone, unpadded. The result keeps
      the padding on the left. ``None`` (or all ones): no padding.
    * ``rope_frequencies``: ``None`` (the model's frequencies throughout), or a callable
      ``seq_len -> (inv_freq, attention_factor)`` (or just ``inv_freq``) applied to every RoPE layer
      before each forward pass, ``seq_len`` being the largest position so far + 1, new tokens
      included (the longest row's real tokens), as ``transformers``' dynamic RoPE recomputes
      its frequencies (``_compute_dynamic_ntk_parameters``). Build one from a rule with
      :func:`pebook.rope_scaling.per_length_frequencies`. With a cache of rotated keys (the
      default) the cached keys keep the rotation of the step that cached them: a stale cache,
      as in ``transformers``; a model with ``cache_rotated_keys=False`` rotates them all again
      with the current frequencies. The model's frequencies are restored afterwards.

    A learned table of ``N`` rows can encode positions ``0 … N - 1``. The last new token is
    predicted but never fed back, so ``prompt_len + max_new_tokens - 1 <= N`` is required (with
    ``attention_mask``, the longest row's real length in place of ``prompt_len``) and anything
    more raises ``ValueError`` before any work is done; the other encodings have no such limit.
    Runs under ``torch.no_grad()``; the model's train/eval mode is left as it is.
    """
    model = _check_model(model)
    prompt = _check_tokens(model, "prompt", prompt)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=0)
    if temperature is not None:
        if isinstance(temperature, Real) and not isinstance(temperature, bool) and temperature == 0:
            raise ValueError("temperature must be > 0 to sample, got 0; use temperature=None for greedy decoding")
        temperature = check_positive_float("temperature", temperature)
    if top_k is not None:
        top_k = check_int("top_k", top_k, minimum=1)
        if top_k > model.vocab_size:
            raise ValueError(f"top_k must be between 1 and vocab_size={model.vocab_size}, got {top_k}")
        if temperature is None:
            raise ValueError("top_k only applies when sampling: give a temperature > 0 (temperature=None is greedy)")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    schedule = _check_schedule(model, rope_frequencies)
    batch, prompt_len = prompt.shape
    real_len = prompt_len  # the longest row's real tokens
    if attention_mask is not None:
        # validated once, on any device (the prompt's values were checked too)
        attention_mask = check_attention_mask(
            "attention_mask", attention_mask, batch, prompt_len, prompt.device, what="prompt_len", values=True
        )
        counts = attention_mask.sum(dim=1)
        real_len = int(counts.max())
        if real_len == prompt_len and bool(attention_mask.all()):
            attention_mask = None  # no padding: the unpadded path, bit for bit
    _check_room(
        model,
        real_len + max(max_new_tokens - 1, 0),
        f"a prompt of {real_len} tokens continued by max_new_tokens={max_new_tokens}",
    )

    tokens = prompt
    if max_new_tokens == 0:
        return tokens.clone()
    # validated above, once: the steps below run the model without checking again
    total = prompt_len + max_new_tokens
    if attention_mask is None:
        positions = torch.arange(total, device=prompt.device).expand(batch, -1)
        mask = None
    else:
        mask = torch.cat((attention_mask, attention_mask.new_ones(batch, max_new_tokens)), dim=1)
        positions = mask_positions(mask)
    saved = _saved_frequencies(model, schedule)
    try:
        with torch.no_grad():
            tokens = _generate_loop(
                model,
                prompt,
                positions,
                mask,
                max_new_tokens,
                use_cache,
                temperature,
                top_k,
                generator,
                schedule,
                real_len,
            )
    finally:
        _restore_frequencies(model, saved)
    return tokens


def _generate_loop(
    model, prompt, positions, mask, max_new_tokens, use_cache, temperature, top_k, generator, schedule, real_len
):
    """The steps of :func:`generate`, on validated arguments (``real_len``: the longest row's real prompt)."""
    prompt_len = prompt.shape[1]
    tokens = prompt
    prompt_mask = None if mask is None else mask[:, :prompt_len]
    _apply_schedule(model, schedule, real_len)
    if use_cache:
        logits, cache = model.forward_trusted(
            prompt, positions[:, :prompt_len], None, return_kv=True, attention_mask=prompt_mask
        )
    else:
        logits = model.forward_trusted(prompt, positions[:, :prompt_len], attention_mask=prompt_mask)
    for step in range(max_new_tokens):
        new = _next_token(logits[:, -1], temperature, top_k, generator)
        tokens = torch.cat((tokens, new), dim=1)
        if step == max_new_tokens - 1:
            break  # the last token is returned, never fed back
        n = tokens.shape[1]
        _apply_schedule(model, schedule, real_len + n - prompt_len)
        if use_cache:  # a padded cache keeps its mask
            logits, cache = model.forward_trusted(new, positions[:, n - 1 : n], cache, return_kv=True)
        else:
            step_mask = None if mask is None else mask[:, :n]
            logits = model.forward_trusted(tokens, positions[:, :n], attention_mask=step_mask)
    return tokens


# ----------------------------------------------------------------------------- memory


def kv_cache_bytes(
    n_layers: int, n_kv_heads: int, head_dim: int, n_tokens: int, *, batch: int = 1, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes of a KV cache: ``2 · n_layers · n_kv_heads · head_dim · n_tokens · batch · bytes_per_element``.

    The 2 counts keys and values. ``n_kv_heads`` is the number of *key/value* heads: the number of
    attention heads for multi-head attention, fewer under grouped-query attention (Ainslie et al.
    2023, arXiv:2305.13245), one under multi-query attention (Shazeer 2019, arXiv:1911.02150).
    Llama-2-7B (32 layers, 32 heads of 128, Touvron et al. 2023) in float16 holds 512 KiB per token,
    2 GiB at its 4096-token context.
    """
    n_layers = check_int("n_layers", n_layers, minimum=1)
    n_kv_heads = check_int("n_kv_heads", n_kv_heads, minimum=1)
    head_dim = check_int("head_dim", head_dim, minimum=1)
    n_tokens = check_int("n_tokens", n_tokens, minimum=0)
    batch = check_int("batch", batch, minimum=1)
    dtype = check_float_dtype("dtype", dtype)
    return 2 * n_layers * n_kv_heads * head_dim * n_tokens * batch * dtype.itemsize


def cache_bytes(past_kvs: KVCache) -> int:
    """Bytes held by the keys and values of a :class:`pebook.KVCache` (its ``nbytes``).

    The cached positions (one int64 per token) are bookkeeping outside the
    ``2 · layers · kv_heads · head_dim`` count of :func:`kv_cache_bytes` and are not included.
    """
    if not isinstance(past_kvs, KVCache):
        raise TypeError(f"past_kvs must be a pebook.KVCache, got {type(past_kvs).__name__}")
    return past_kvs.nbytes


# ----------------------------------------------------------------------------- time


@dataclass(frozen=True)
class DecodeTiming:
    """Seconds to produce one token at each context length, with and without the KV cache."""

    lengths: tuple[int, ...]
    cached: tuple[float, ...]
    uncached: tuple[float, ...]
    device: str

    @property
    def ratios(self) -> tuple[float, ...]:
        """``uncached / cached`` at each length: how many times slower a step is without the cache."""
        return tuple(u / c for u, c in zip(self.uncached, self.cached))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_token(model: TinyLM, lengths, *, repeats: int = 5, batch: int = 1, seed: int = 0) -> DecodeTiming:
    """Time one decoding step at each context length ``L``, with and without the cache, side by side.

    The step produces the logits of the token after a sequence of ``L`` tokens. With the cache it
    feeds the newest token against a cache of ``L - 1`` positions (built beforehand, not timed;
    the step includes appending to the cache): per layer ``O(d²)`` projections plus ``O(L·d)``
    attention. Without it, it runs the whole sequence again: ``O(L·d²) + O(L²·d)`` per layer.
    Each repeat times every length in both ways, alternating, so that both see the same machine
    load; the result is the best of ``repeats`` (after one untimed warm-up).
    """
    model = _check_model(model)
    lengths = tuple(check_int("lengths[i]", n, minimum=2) for n in lengths)
    if not lengths:
        raise ValueError("lengths must hold at least one context length")
    repeats = check_int("repeats", repeats, minimum=1)
    batch = check_int("batch", batch, minimum=1)
    _check_room(model, max(lengths), f"timing at length {max(lengths)}")
    device, _ = _placement(model)
    gen = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    tokens = torch.randint(0, model.vocab_size, (batch, max(lengths)), generator=gen).to(device)

    with torch.no_grad():
        prefix = {n: model(tokens[:, : n - 1], return_kv=True)[1] for n in lengths}
        calls = {
            (n, True): (lambda n=n: model(tokens[:, n - 1 : n], past_kvs=prefix[n], return_kv=True)) for n in lengths
        }
        calls.update({(n, False): (lambda n=n: model(tokens[:, :n])) for n in lengths})
        best = dict.fromkeys(calls, float("inf"))
        for call in calls.values():  # warm-up
            call()
        _sync(device)
        for r in range(repeats):
            for n in lengths:
                order = (True, False) if r % 2 == 0 else (False, True)
                for cached in order:
                    start = time.perf_counter()
                    calls[(n, cached)]()
                    _sync(device)
                    best[(n, cached)] = min(best[(n, cached)], time.perf_counter() - start)
    return DecodeTiming(
        lengths=lengths,
        cached=tuple(best[(n, True)] for n in lengths),
        uncached=tuple(best[(n, False)] for n in lengths),
        device=str(device),
    )
