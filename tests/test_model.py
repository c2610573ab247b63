"""pebook.model: TransformerBlock and TinyLM with every encoding.

Reference: ``ref.tiny_lm`` (conftest) writes the pre-LN decoder out in float64 with the model's
own parameters (token embedding + absolute encoding, x + attn(LN x), x + MLP(LN x), final LN,
unembedding), its attention from the paper references.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pebook import ENCODINGS, TinyLM, TransformerBlock

F64 = torch.float64
VOCAB, DIM, LAYERS, HEADS, MAX_POS = 11, 16, 2, 2, 12
SHAW_K, BUCKETS = 3, 8


def make_lm(encoding, *, device, dtype=F64, seed=0, **kwargs):
    torch.manual_seed(seed)
    if encoding == "shaw":
        kwargs.setdefault("max_distance", SHAW_K)
    if encoding == "t5":
        kwargs.setdefault("num_buckets", BUCKETS)
        kwargs.setdefault("t5_max_distance", 20)
    model = TinyLM(VOCAB, DIM, LAYERS, HEADS, MAX_POS, encoding, **kwargs)
    return model.to(device=device, dtype=dtype)


def tokens_for(*shape, seed, device):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- (1) reference


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_logits_match_reference(device, ref, encoding):
    model = make_lm(encoding, device=device)
    tokens = tokens_for(3, 9, seed=1, device=device)
    with torch.no_grad():
        logits = model(tokens)
        expected = ref.tiny_lm(model, tokens)
    assert logits.shape == (3, 9, VOCAB) and logits.dtype == F64 and logits.device.type == device.type
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


def test_sinusoidal_base_option_reaches_the_encoding(device, ref):
    """TinyLM forwards extra options to MultiHeadAttention, whose options include
    sinusoidal_base; for encoding="sinusoidal" TinyLM adds the table itself, so it must use that
    base too (not silently keep 10000)."""
    model = make_lm("sinusoidal", device=device, sinusoidal_base=100.0)
    tokens = tokens_for(1, 10, seed=13, device=device)
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens), ref.tiny_lm(model, tokens, sinusoidal_base=100.0), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("encoding", ["none", "rope", "alibi"])
def test_float32_logits_match_reference(device, ref, encoding):
    model = make_lm(encoding, device=device, dtype=torch.float32)
    tokens = tokens_for(2, 8, seed=2, device=device)
    with torch.no_grad():
        logits = model(tokens)
        expected = ref.tiny_lm(model, tokens)
    assert logits.dtype == torch.float32
    # two layers of float32 LayerNorm/attention/MLP on O(1) activations
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encoding", ["none", "rope", "shaw"])
def test_transformer_block_is_pre_ln(device, ref, encoding):
    torch.manual_seed(0)
    kwargs = {"max_distance": SHAW_K} if encoding == "shaw" else {}
    block = TransformerBlock(DIM, HEADS, encoding, **kwargs).to(device=device, dtype=F64)
    x = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(3), dtype=F64).to(device)
    ln = lambda norm, h: F.layer_norm(h, (DIM,), norm.weight, norm.bias, norm.eps)  # noqa: E731
    with torch.no_grad():
        h = x + ref.mha(block.attn, ln(block.attn_norm, x))
        expected = h + block.mlp[2](F.gelu(block.mlp[0](ln(block.mlp_norm, h))))
        torch.testing.assert_close(block(x), expected, rtol=1e-11, atol=1e-11)
    assert block.attn.causal


# ---------------------------------------------------------------- (2) properties


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=10)
@given(t=st.integers(0, 8), seed=st.integers(0, 2**31))
def test_tinylm_is_causal(device, encoding, t, seed):
    """Logits at position t ignore every token after t (and do depend on token t)."""
    model = make_lm(encoding, device=device)
    tokens = tokens_for(2, 10, seed=seed, device=device)
    changed_later = tokens.clone()
    changed_later[:, t + 1 :] = (tokens[:, t + 1 :] + 1 + torch.arange(9 - t, device=device)) % VOCAB
    changed_here = tokens.clone()
    changed_here[:, t] = (tokens[:, t] + 1) % VOCAB
    with torch.no_grad():
        base, later, here = model(tokens), model(changed_later), model(changed_here)
    torch.testing.assert_close(later[:, : t + 1], base[:, : t + 1], rtol=1e-12, atol=1e-12)
    assert (here[:, t] - base[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("prompt", [1, 3, 6])
def test_kv_cache_generation_equals_full_forward(device, encoding, prompt):
    """Feed a prompt, then one token at a time with past_kvs: each step's logits equal the full
    forward's logits at that position (float64, tolerance 1e-10)."""
    model = make_lm(encoding, device=device)
    tokens = tokens_for(2, 10, seed=4, device=device)
    with torch.no_grad():
        full = model(tokens)
        logits, cache = model(tokens[:, :prompt], return_kv=True)
        steps = [logits]
        for t in range(prompt, 10):
            logits, cache = model(tokens[:, t : t + 1], past_kvs=cache, return_kv=True)
            steps.append(logits)
    assert len(cache) == LAYERS and all(k.shape == (2, HEADS, 10, DIM // HEADS) for k, _ in cache)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("encoding", [e for e in ENCODINGS if e != "learned"])
def test_non_learned_encodings_run_beyond_max_positions(device, encoding):
    model = make_lm(encoding, device=device)
    tokens = tokens_for(1, 3 * MAX_POS, seed=5, device=device)
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (1, 3 * MAX_POS, VOCAB) and torch.isfinite(logits).all()


def test_learned_cannot_run_beyond_max_positions(device):
    model = make_lm("learned", device=device)
    with torch.no_grad():
        assert model(tokens_for(1, MAX_POS, seed=6, device=device)).shape == (1, MAX_POS, VOCAB)
        with pytest.raises(
            ValueError,
            match=rf"position {MAX_POS} is beyond this learned table: it has "
            rf"max_positions={MAX_POS} rows",
        ):
            model(tokens_for(1, MAX_POS + 1, seed=6, device=device))
        _, cache = model(tokens_for(1, MAX_POS, seed=6, device=device), return_kv=True)
        with pytest.raises(ValueError, match=rf"position {MAX_POS} is beyond .*max_positions={MAX_POS}"):
            model(tokens_for(1, 1, seed=7, device=device), past_kvs=cache)


def test_parameter_counts_per_encoding(device):
    """Only learned, Shaw and T5 add parameters; sinusoidal, RoPE and ALiBi are free."""
    base = n_params(make_lm("none", device=device))
    extra = {e: n_params(make_lm(e, device=device)) - base for e in ENCODINGS}
    head_dim = DIM // HEADS
    assert extra == {
        "none": 0,
        "sinusoidal": 0,
        "rope": 0,
        "alibi": 0,
        "learned": MAX_POS * DIM,
        "shaw": LAYERS * 2 * (2 * SHAW_K + 1) * head_dim,
        "t5": LAYERS * BUCKETS * HEADS,
    }


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_short_training_run_learns_a_repeated_sequence(device, encoding):
    """30 Adam steps on a repeated 8-token pattern: the next-token loss falls below half its
    initial value (initially ≈ ln 11 ≈ 2.4; seeded, observed final/initial < 0.2 for every
    encoding)."""
    torch.manual_seed(0)
    model = make_lm(encoding, device=device, dtype=torch.float32)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6], device=device)
    tokens = pattern.repeat(2, 3)[:, :MAX_POS]  # (2, 12): within the learned table
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1.5
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- (3) frozen snapshots


def test_snapshot_parameter_count_by_hand():
    """TinyLM(11, 16, 2 layers, 2 heads, 12 positions, "none"), counted by hand: token embedding
    11·16 = 176; per block 2 LayerNorms 2·(2·16) = 64, qkv 16·48 + 48 = 816, out 16·16 + 16 = 272,
    MLP 16·64 + 64 + 64·16 + 16 = 2128, i.e. 3280; final LayerNorm 32; lm_head 16·11 = 176.
    Total 176 + 2·3280 + 32 + 176 = 6944."""
    assert n_params(make_lm("none", device="cpu")) == 6944


def test_snapshot_gpt2_small_parameter_count():
    """TinyLM(50257, 768, 12, 12, 1024, "learned") has GPT-2 small's architecture (pre-LN blocks,
    biased projections, 4× GELU MLP, learned 1024-position table); GPT-2 ties its unembedding to
    the token embedding, TinyLM does not. GPT-2 small has 124,439,808 parameters (the
    transformers checkpoint ``gpt2``), so TinyLM must have that plus 50257·768 = 38,597,376.
    Built on the meta device: no memory is allocated."""
    with torch.device("meta"):
        model = TinyLM(50257, 768, 12, 12, 1024, "learned")
    assert n_params(model) == 124_439_808 + 50257 * 768


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["xpos", "Rope", None])
def test_unknown_encoding_is_rejected(name):
    with pytest.raises(ValueError, match=rf"encoding must be one of \('none', .*\), got {name!r}"):
        TinyLM(VOCAB, DIM, LAYERS, HEADS, MAX_POS, name)


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        ((0, DIM, LAYERS, HEADS, MAX_POS), ValueError, r"vocab_size must be an int >= 1, got 0$"),
        ((VOCAB, DIM, 0, HEADS, MAX_POS), ValueError, r"n_layers must be an int >= 1, got 0$"),
        ((VOCAB, DIM, LAYERS, 0, MAX_POS), ValueError, r"n_heads must be an int >= 1, got 0$"),
        ((VOCAB, DIM, LAYERS, HEADS, 0), ValueError, r"max_positions must be an int >= 1, got 0$"),
        ((VOCAB, DIM, LAYERS, HEADS, -5, "rope"), ValueError, r"max_positions must be an int >= 1, got -5$"),
        ((VOCAB, 15, LAYERS, 3, MAX_POS, "sinusoidal"), ValueError, r"dim must be even .* got 15$"),
        (
            (VOCAB, 12, LAYERS, 4, MAX_POS, "rope"),
            ValueError,
            r"rope needs an even head_dim, got dim=12 / n_heads=4 = 3",
        ),
        ((VOCAB, DIM, True, HEADS, MAX_POS), TypeError, r"n_layers must be an int, got True of type bool"),
    ],
)
def test_bad_construction_is_rejected(args, error, pattern):
    with pytest.raises(error, match=pattern):
        TinyLM(*args)


def test_bad_tokens_are_rejected(device):
    model = make_lm("rope", device=device)
    with pytest.raises(
        ValueError, match=rf"tokens must lie in \[0, vocab_size={VOCAB}\), got values in \[0, {VOCAB}\]"
    ):
        model(torch.tensor([[0, 3, VOCAB]], device=device))
    with pytest.raises(ValueError, match=rf"tokens must lie in \[0, vocab_size={VOCAB}\), got values in \[-1, 4\]"):
        model(torch.tensor([[-1, 4]], device=device))
    with pytest.raises(ValueError, match=r"tokens must hold at least one position, got shape \(2, 0\)"):
        model(torch.zeros(2, 0, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor, got dtype torch.float32"):
        model(torch.zeros(1, 3, device=device))
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor, got dtype torch.bool"):
        model(torch.zeros(1, 3, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"tokens must have 2 dimensions, got shape \(3,\)"):
        model(torch.zeros(3, dtype=torch.long, device=device))


@pytest.mark.parametrize("encoding", ["rope", "learned", "shaw"])
def test_bad_past_kvs_are_rejected(device, encoding):
    model = make_lm(encoding, device=device)
    prompt, step = tokens_for(2, 4, seed=8, device=device), tokens_for(2, 1, seed=9, device=device)
    with torch.no_grad():
        _, cache = model(prompt, return_kv=True)
    with pytest.raises(ValueError, match=rf"past_kvs must hold one \(k, v\) per layer \({LAYERS}\), got 1"):
        model(step, past_kvs=cache[:1])
    k, v = cache[1]
    with pytest.raises(
        ValueError, match=r"past_kv\[0\] has shape \(2, 1, 4, 8\) .*needs \(batch=2, heads=2, past_len, head_dim=8\)"
    ):
        model(step, past_kvs=[cache[0], (k[:, :1], v)])
    with pytest.raises(ValueError, match=r"past_kv\[1\] has shape \(1, 2, 4, 8\) .*needs \(batch=2,"):
        model(step, past_kvs=[cache[0], (k, v[:1])])
    with pytest.raises(ValueError, match=r"past keys \(4\) and values \(3\) differ in length"):
        model(step, past_kvs=[cache[0], (k, v[:, :, :3])])


def test_past_kvs_of_different_lengths_per_layer_are_rejected(device):
    """Every layer's cache must hold the same past positions: TinyLM places the new tokens at
    position past_kvs[0][0].shape[2], so a layer whose cache is longer or shorter would attend at
    inconsistent positions. This must raise, naming the lengths, not run silently."""
    model = make_lm("rope", device=device)
    with torch.no_grad():
        _, cache4 = model(tokens_for(1, 4, seed=10, device=device), return_kv=True)
        _, cache5 = model(tokens_for(1, 5, seed=10, device=device), return_kv=True)
    mixed = [cache4[0], cache5[1]]
    with pytest.raises(ValueError, match=r"past_kvs?.*\b4\b.*\b5\b"):
        model(tokens_for(1, 1, seed=11, device=device), past_kvs=mixed)


def test_past_kvs_with_malformed_entries_are_rejected(device):
    """Entries that are not (k, v) pairs of 4-D tensors must give pebook's clear error naming
    past_kv, not an IndexError/TypeError from inside TinyLM.forward."""
    model = make_lm("rope", device=device)
    step = tokens_for(1, 1, seed=12, device=device)
    flat = torch.zeros(1, 8, dtype=F64, device=device)  # 2-D
    with pytest.raises(ValueError, match=r"past_kv"):
        model(step, past_kvs=[(flat, flat), (flat, flat)])
    with pytest.raises(TypeError, match=r"past_kv"):
        model(step, past_kvs=[None, None])
