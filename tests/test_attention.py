"""pebook.attention: positional_attention and MultiHeadAttention with every encoding.

References (conftest): ``ref.positional_attention`` assembles, for each encoding, the float64
paper references exactly as the papers combine them with softmax(QKᵀ/√d) V (see its docstring);
``ref.mha`` writes MultiHeadAttention out with the module's own parameters.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import (
    ENCODINGS,
    MultiHeadAttention,
    alibi_slopes,
    apply_rope,
    positional_attention,
    rope_frequencies,
)

F64 = torch.float64
H, D = 2, 8  # heads and head_dim for the functional tests
RELATIVE = ["none", "rope", "alibi", "t5", "shaw"]  # encodings that act inside attention

# (q_len, k_len, causal, offset); offset None = the queries are the last q_len positions
CASES = [
    (6, 6, True, None),
    (6, 6, False, None),
    (2, 7, True, None),
    (3, 7, True, 2),
    (3, 7, False, 2),
    (1, 9, True, None),
    (4, 4, True, 0),
    (3, 5, True, 0),
]
CASE_IDS = ["self", "bidir", "kv-cache", "offset", "offset-bidir", "one-query", "offset0", "lq<lk-offset0"]


def encoding_params(encoding, *, device, dtype=F64, seed=0, layout="half"):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(device=device, dtype=dtype)  # noqa: E731
    if encoding == "rope":
        return {"inv_freq": rope_frequencies(D, dtype=F64, device=device), "layout": layout}
    if encoding == "alibi":
        return {"slopes": alibi_slopes(H, dtype=dtype, device=device)}
    if encoding == "t5":
        return {"bias_table": rnd(8, H), "max_distance": 20}
    if encoding == "shaw":
        return {"rel_k": rnd(7, D), "rel_v": rnd(7, D), "max_distance": 3}
    return {}


def qkv(lq, lk, *, device, dtype=F64, seed=0, b=2):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, H, lq, D), (b, H, lk, D), (b, H, lk, D)]
    return [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dtype) for s in shapes]


# ---------------------------------------------------------------- (1) reference, functional


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_positional_attention_matches_reference_float64(device, ref, encoding, case):
    lq, lk, causal, offset = case
    q, k, v = qkv(lq, lk, device=device)
    params = encoding_params(encoding, device=device)
    out = positional_attention(q, k, v, encoding, causal=causal, offset=offset, **params)
    assert out.shape == q.shape and out.dtype == F64 and out.device.type == device.type
    expected = ref.positional_attention(q, k, v, encoding, params, causal, offset)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_layouts_match_reference(device, ref, layout):
    q, k, v = qkv(3, 9, device=device)
    params = encoding_params("rope", device=device, layout=layout)
    out = positional_attention(q, k, v, "rope", **params)
    torch.testing.assert_close(
        out, ref.positional_attention(q, k, v, "rope", params, True, None), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_positional_attention_float32_matches_reference(device, ref, tol32, encoding):
    q, k, v = qkv(3, 7, device=device, dtype=torch.float32)
    params = encoding_params(encoding, device=device, dtype=torch.float32)
    if encoding == "rope":
        params["inv_freq"] = rope_frequencies(D, device=device)  # float32 frequencies, float32 angles
    out = positional_attention(q, k, v, encoding, **params)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.positional_attention(q, k, v, encoding, params, True, None), **tol32)


@given(
    encoding=st.sampled_from(RELATIVE),
    lq=st.integers(1, 6),
    extra=st.integers(0, 6),
    causal=st.booleans(),
    explicit_offset=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_positional_attention_matches_reference_everywhere(
    device, ref, encoding, lq, extra, causal, explicit_offset, seed
):
    lk = lq + extra
    offset = extra // 2 if explicit_offset else None
    q, k, v = qkv(lq, lk, device=device, seed=seed, b=1)
    params = encoding_params(encoding, device=device, seed=seed)
    out = positional_attention(q, k, v, encoding, causal=causal, offset=offset, **params)
    torch.testing.assert_close(
        out, ref.positional_attention(q, k, v, encoding, params, causal, offset), rtol=1e-11, atol=1e-12
    )


def test_rope_keys_encoded_means_keys_are_already_rotated(device):
    """keys_encoded=True (a RoPE KV cache) must skip the key rotation: passing pre-rotated keys
    with it equals passing raw keys without it; passing raw keys with it does not."""
    q, k, v = qkv(2, 7, device=device)
    params = encoding_params("rope", device=device)
    rotated_k = apply_rope(k, torch.arange(7, device=device), params["inv_freq"], params["layout"])
    plain = positional_attention(q, k, v, "rope", **params)
    cached = positional_attention(q, rotated_k, v, "rope", keys_encoded=True, **params)
    torch.testing.assert_close(cached, plain, rtol=1e-13, atol=1e-13)
    wrong = positional_attention(q, k, v, "rope", keys_encoded=True, **params)
    assert (wrong - plain).abs().max() > 1e-3


@pytest.mark.parametrize("encoding", [e for e in ENCODINGS if e != "rope"])
def test_keys_encoded_is_irrelevant_for_other_encodings(device, encoding):
    q, k, v = qkv(3, 5, device=device)
    params = encoding_params(encoding, device=device)
    assert torch.equal(
        positional_attention(q, k, v, encoding, keys_encoded=True, **params),
        positional_attention(q, k, v, encoding, keys_encoded=False, **params),
    )


# ---------------------------------------------------------------- MultiHeadAttention


def make_mha(encoding, *, device, dim=16, n_heads=2, causal=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    if encoding == "learned":
        kwargs.setdefault("max_positions", 64)
    if encoding == "t5":
        kwargs.setdefault("num_buckets", 8)
        kwargs.setdefault("t5_max_distance", 20)
    if encoding == "shaw":
        kwargs.setdefault("max_distance", 3)
    return MultiHeadAttention(dim, n_heads, encoding, causal=causal, **kwargs).to(device=device, dtype=F64)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("causal", [True, False])
def test_mha_matches_reference(device, ref, encoding, causal):
    mha = make_mha(encoding, device=device, causal=causal)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1), dtype=F64).to(device)
    with torch.no_grad():
        out = mha(x)
        expected = ref.mha(mha, x)
    assert out.shape == x.shape and out.device.type == device.type
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("encoding", ENCODINGS)
@given(t=st.integers(0, 7), seed=st.integers(0, 2**31))
def test_mha_is_causal(device, encoding, t, seed):
    """Output at position t does not change when the inputs after t change, and does change when
    an input at or before t changes."""
    mha = make_mha(encoding, device=device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 16, generator=gen, dtype=F64).to(device)
    later = x.clone()
    later[:, t + 1 :] = torch.randn(2, 7 - t, 16, generator=gen, dtype=F64).to(device)
    earlier = x.clone()
    earlier[:, t] += 1.0
    with torch.no_grad():
        base, after, before = mha(x), mha(later), mha(earlier)
    torch.testing.assert_close(after[:, : t + 1], base[:, : t + 1], rtol=1e-12, atol=1e-12)
    if t < 7:
        assert (after[:, t + 1 :] - base[:, t + 1 :]).abs().amax(dim=(0, 2)).min() > 1e-6
    assert (before[:, t:] - base[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-6


def test_bidirectional_mha_is_not_causal(device):
    mha = make_mha("none", device=device, causal=False)
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(2), dtype=F64).to(device)
    later = x.clone()
    later[:, -1] += 1.0
    with torch.no_grad():
        assert (mha(later)[:, 0] - mha(x)[:, 0]).abs().max() > 1e-4


PERMUTATION = [3, 0, 6, 1, 7, 2, 5, 4]


def test_nope_without_mask_is_permutation_equivariant(device):
    """With no position information and no mask, attention is a function of a set: permuting
    the sequence permutes the output (to float64 rounding)."""
    mha = make_mha("none", device=device, causal=False)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3), dtype=F64).to(device)
    perm = torch.tensor(PERMUTATION, device=device)
    with torch.no_grad():
        torch.testing.assert_close(mha(x[:, perm]), mha(x)[:, perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("encoding", [e for e in ENCODINGS if e != "none"])
def test_every_encoding_breaks_permutation_equivariance(device, encoding):
    """Each encoding makes the output depend on order: the permuted input's output differs from
    the permuted output by far more than rounding (seeded weights; margin 1e-2, smallest observed
    gap 3.7e-2 for ALiBi, whose 2-head slopes are only 1/16 and 1/256)."""
    mha = make_mha(encoding, device=device, causal=False)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3), dtype=F64).to(device)
    perm = torch.tensor(PERMUTATION, device=device)
    with torch.no_grad():
        gap = (mha(x[:, perm]) - mha(x)[:, perm]).abs().max().item()
    assert gap > 1e-2


def test_causal_mask_alone_breaks_permutation_equivariance(device):
    mha = make_mha("none", device=device, causal=True)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3), dtype=F64).to(device)
    perm = torch.tensor(PERMUTATION, device=device)
    with torch.no_grad():
        assert (mha(x[:, perm]) - mha(x)[:, perm]).abs().max() > 1e-2


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("prompt", [1, 4, 7])
def test_mha_incremental_decoding_equals_full_forward(device, encoding, prompt):
    """Prompt of `prompt` tokens, then the rest in steps of 1 and 2 tokens with past_kv: every
    output equals the full causal forward (float64, tolerance 1e-11)."""
    mha = make_mha(encoding, device=device)
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(4), dtype=F64).to(device)
    with torch.no_grad():
        full = mha(x)
        out, kv = mha(x[:, :prompt], return_kv=True)
        pieces, t, step = [out], prompt, 1
        while t < 10:
            n = min(step, 10 - t)
            out, kv = mha(x[:, t : t + n], past_kv=kv, return_kv=True)
            pieces.append(out)
            t, step = t + n, 3 - step  # alternate 1, 2, 1, 2 …
            assert kv[0].shape == (2, 2, t, 8) and kv[1].shape == (2, 2, t, 8)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("encoding", ["rope", "alibi", "none"])
def test_cached_keys_are_rotated_for_rope_only(device, encoding):
    mha = make_mha(encoding, device=device)
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(5), dtype=F64).to(device)
    with torch.no_grad():
        _, (k, v) = mha(x, return_kv=True)
        _, raw_k, raw_v = mha.qkv(x).view(1, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    if encoding == "rope":
        raw_k = apply_rope(raw_k, torch.arange(5, device=device), mha.inv_freq, mha.rope_layout)
    torch.testing.assert_close(k, raw_k, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v, raw_v, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_mha_rope_layout_option(device, ref, layout):
    mha = make_mha("rope", device=device, rope_layout=layout, rope_base=500.0)
    assert mha.rope_layout == layout
    torch.testing.assert_close(mha.inv_freq.cpu(), ref.frequencies(8, 500.0), rtol=1e-7, atol=0)
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(6), dtype=F64).to(device)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), ref.mha(mha, x), rtol=1e-11, atol=1e-11)


def test_mha_parameter_counts(device):
    base = sum(p.numel() for p in make_mha("none", device=device).parameters())
    assert base == 16 * 48 + 48 + 16 * 16 + 16
    extra = {e: sum(p.numel() for p in make_mha(e, device=device).parameters()) - base for e in ENCODINGS}
    assert extra == {
        "none": 0,
        "sinusoidal": 0,
        "learned": 64 * 16,
        "shaw": 2 * 7 * 8,
        "t5": 8 * 2,
        "rope": 0,
        "alibi": 0,
    }


# ---------------------------------------------------------------- (3) frozen snapshot


def test_snapshot_alibi_attention_on_equal_keys(device):
    """With all keys equal, content cancels and ALiBi alone sets the weights: query 2 (third
    token) of a head with m = 1/2 weights keys 0, 1, 2 as softmax(-1, -1/2, 0) =
    (0.18632372, 0.30719589, 0.50648039) (8 decimals). With v = one-hot rows, the output is
    exactly these weights."""
    q = torch.zeros(1, 1, 3, 3, dtype=F64, device=device)
    k = torch.ones(1, 1, 3, 3, dtype=F64, device=device)
    v = torch.eye(3, dtype=F64, device=device)[None, None]
    out = positional_attention(q, k, v, "alibi", slopes=torch.tensor([0.5], dtype=F64, device=device))
    expected = torch.tensor(
        [[1.0, 0.0, 0.0], [0.37754067, 0.62245933, 0.0], [0.18632372, 0.30719589, 0.50648039]], dtype=F64
    )
    torch.testing.assert_close(out[0, 0].cpu(), expected, rtol=0, atol=5e-9)


# ---------------------------------------------------------------- bad input, positional_attention


@pytest.mark.parametrize("name", ["xpos", "RoPE", "", None])
def test_unknown_encoding_is_rejected(device, name):
    q, k, v = qkv(3, 3, device=device)
    with pytest.raises(ValueError, match=rf"encoding must be one of \('none', .*\), got {name!r}"):
        positional_attention(q, k, v, name)


@pytest.mark.parametrize(
    "encoding,missing",
    [
        ("rope", "inv_freq"),
        ("alibi", "slopes"),
        ("t5", "bias_table"),
        ("shaw", "rel_k"),
        ("shaw", "rel_v"),
        ("shaw", "max_distance"),
    ],
)
def test_missing_encoding_parameter_is_named(device, encoding, missing):
    # a missing keyword is a TypeError, as for any Python call with a missing argument
    q, k, v = qkv(3, 3, device=device)
    params = encoding_params(encoding, device=device)
    del params[missing]
    with pytest.raises(TypeError, match=rf"encoding='{encoding}' needs the keyword argument '{missing}'"):
        positional_attention(q, k, v, encoding, **params)


@pytest.mark.parametrize(
    "encoding,extra",
    [
        ("none", "slopes"),
        ("sinusoidal", "inv_freq"),
        ("rope", "slopes"),
        ("alibi", "max_distance"),
        ("t5", "rel_k"),
        ("shaw", "layout"),
    ],
)
def test_unexpected_encoding_parameter_is_named(device, encoding, extra):
    q, k, v = qkv(3, 3, device=device)
    params = encoding_params(encoding, device=device) | {extra: 1}
    with pytest.raises(TypeError, match=rf"encoding='{encoding}' takes no parameter '{extra}'"):
        positional_attention(q, k, v, encoding, **params)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_mismatched_qkv_are_rejected(device, encoding):
    q, k, v = qkv(3, 5, device=device)
    params = encoding_params(encoding, device=device)
    call = lambda q, k, v: positional_attention(q, k, v, encoding, **params)  # noqa: E731
    with pytest.raises(
        ValueError,
        match=r"k must have shape \(batch=2, heads=2, k_len, head_dim=8\) to match q "
        r"\(2, 2, 3, 8\), got \(2, 2, 5, 6\)",
    ):
        call(q, k[..., :6], v)
    with pytest.raises(ValueError, match=r"k must have shape .* got \(1, 2, 5, 8\)"):
        call(q, k[:1], v)
    with pytest.raises(
        ValueError, match=r"v must have shape \(batch, heads, k_len\) = \(2, 2, 5\) like k, got \(2, 2, 4, 8\)"
    ):
        call(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match=r"v must have shape .* got \(2, 1, 5, 8\)"):
        call(q, k, v[:, :1])
    with pytest.raises(TypeError, match=r"k has dtype torch.float32 but q has dtype torch.float64; they must match"):
        call(q, k.float(), v)
    with pytest.raises(TypeError, match=r"v has dtype torch.float16 but q has dtype torch.float64; they must match"):
        call(q, k, v.half())
    with pytest.raises(TypeError, match=r"q must be a floating-point tensor, got dtype torch.int64"):
        call(q.long(), k, v)
    with pytest.raises(ValueError, match=r"v must have 4 dimensions, got shape \(2, 5, 8\)"):
        call(q, k, v[:, 0])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_bad_offsets_are_rejected(device, encoding):
    params = encoding_params(encoding, device=device)
    q, k, v = qkv(3, 5, device=device)
    with pytest.raises(ValueError, match=r"offset must be an int >= 0, got -1$"):
        positional_attention(q, k, v, encoding, offset=-1, **params)
    with pytest.raises(TypeError, match=r"offset must be an int, got True of type bool"):
        positional_attention(q, k, v, encoding, offset=True, **params)
    q, k, v = qkv(5, 3, device=device)
    with pytest.raises(ValueError, match=r"q_len=5 must be <= k_len=3"):
        positional_attention(q, k, v, encoding, **params)


def test_bad_encoding_parameters_are_rejected(device):
    q, k, v = qkv(3, 5, device=device)
    with pytest.raises(ValueError, match=r"slopes must have one entry per head \(2\), got 3"):
        positional_attention(q, k, v, "alibi", slopes=alibi_slopes(3, dtype=F64, device=device))
    with pytest.raises(TypeError, match=r"slopes must be a floating-point tensor, got dtype torch.int64"):
        positional_attention(q, k, v, "alibi", slopes=torch.ones(2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"bias_table must have shape \(num_buckets, heads=2\), got \(8, 3\)"):
        positional_attention(q, k, v, "t5", bias_table=torch.zeros(8, 3, dtype=F64, device=device))
    with pytest.raises(TypeError, match=r"bias_table must be a floating-point tensor, got dtype torch.int64"):
        positional_attention(q, k, v, "t5", bias_table=torch.zeros(8, 2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"max_distance must be an int >= 1, got -3$"):
        positional_attention(q, k, v, "t5", bias_table=torch.zeros(8, 2, dtype=F64, device=device), max_distance=-3)
    with pytest.raises(ValueError, match=r"max_distance must be an int >= 0, got -1$"):
        positional_attention(
            q,
            k,
            v,
            "shaw",
            rel_k=torch.zeros(1, 8, dtype=F64, device=device),
            rel_v=torch.zeros(1, 8, dtype=F64, device=device),
            max_distance=-1,
        )
    with pytest.raises(ValueError, match=r"rel_k must have shape \(2\*max_distance\+1, head_dim\) = \(7, 8\)"):
        positional_attention(
            q,
            k,
            v,
            "shaw",
            **(encoding_params("shaw", device=device) | {"rel_k": torch.zeros(5, 8, dtype=F64, device=device)}),
        )
    with pytest.raises(TypeError, match=r"rel_k must be a floating-point tensor, got dtype torch.int64"):
        positional_attention(
            q,
            k,
            v,
            "shaw",
            **(encoding_params("shaw", device=device) | {"rel_k": torch.zeros(7, 8, dtype=torch.long, device=device)}),
        )
    with pytest.raises(ValueError, match=r"layout must be one of \('half', 'interleaved'\), got 'gptj'"):
        positional_attention(q, k, v, "rope", inv_freq=rope_frequencies(8, device=device), layout="gptj")
    with pytest.raises(ValueError, match=r"must equal 2 \* len\(inv_freq\) = 6"):
        positional_attention(q, k, v, "rope", inv_freq=rope_frequencies(6, device=device))


def test_t5_max_distance_zero_is_rejected_not_replaced(device):
    """max_distance=0 is invalid for T5 buckets (t5_relative_bucket and T5RelativeBias reject it);
    positional_attention must not silently substitute the default 128 for it."""
    q, k, v = qkv(3, 5, device=device)
    table = torch.zeros(8, 2, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"max_distance must be an int >= 1, got 0$"):
        positional_attention(q, k, v, "t5", bias_table=table, max_distance=0)


@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["k", "v"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_mixed_devices_are_rejected(cuda_device, encoding, moved):
    args = dict(zip("qkv", qkv(3, 5, device=cuda_device), strict=True))
    args[moved] = args[moved].cpu()
    params = encoding_params(encoding, device=cuda_device)
    with pytest.raises(
        ValueError, match=rf"{moved} is on cpu but q is on cuda(:0)?; all inputs must be on the same device"
    ):
        positional_attention(args["q"], args["k"], args["v"], encoding, **params)


# ---------------------------------------------------------------- bad input, MultiHeadAttention


@pytest.mark.parametrize("n_heads", [0, -2])
def test_mha_n_heads_below_one_is_rejected(n_heads):
    with pytest.raises(ValueError, match=rf"n_heads must be an int >= 1, got {n_heads}$"):
        MultiHeadAttention(16, n_heads)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(dim=16, n_heads=2, encoding="xpos"), ValueError, r"encoding must be one of \(.*\), got 'xpos'"),
        (dict(dim=16, n_heads=2, encoding="learned"), TypeError, r"encoding='learned' needs max_positions"),
        (dict(dim=10, n_heads=4), ValueError, r"dim=10 must be divisible by n_heads=4"),
        (dict(dim=0, n_heads=1), ValueError, r"dim must be an int >= 1, got 0$"),
        (
            dict(dim=6, n_heads=2, encoding="rope"),
            ValueError,
            r"rope needs an even head_dim, got dim=6 / n_heads=2 = 3",
        ),
        (
            dict(dim=16, n_heads=2, encoding="rope", rope_layout="gptj"),
            ValueError,
            r"rope_layout must be one of \('half', 'interleaved'\), got 'gptj'",
        ),
        (
            dict(dim=16, n_heads=2, encoding="rope", rope_base=1.0),
            ValueError,
            r"base must be a finite number > 1, got 1.0",
        ),
        (dict(dim=5, n_heads=1, encoding="sinusoidal"), ValueError, r"dim must be even .* got 5$"),
        (
            dict(dim=16, n_heads=2, encoding="sinusoidal", sinusoidal_base=0.5),
            ValueError,
            r"base must be .* > 1, got 0.5",
        ),
        (
            dict(dim=16, n_heads=2, encoding="shaw", max_distance=-1),
            ValueError,
            r"max_distance must be an int >= 0, got -1$",
        ),
        (
            dict(dim=16, n_heads=2, encoding="t5", num_buckets=31, causal=False),
            ValueError,
            r"num_buckets must be even when bidirectional=True, got 31",
        ),
        (
            dict(dim=16, n_heads=2, encoding="t5", t5_max_distance=-4),
            ValueError,
            r"max_distance must be an int >= 1, got -4$",
        ),
        (
            dict(dim=16, n_heads=2, encoding="learned", max_positions=0),
            ValueError,
            r"max_positions must be an int >= 1, got 0$",
        ),
        (dict(dim=16, n_heads=True), TypeError, r"n_heads must be an int, got True of type bool"),
    ],
)
def test_mha_bad_construction_is_rejected(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        MultiHeadAttention(**kwargs)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_mha_bad_x_is_rejected(device, encoding):
    mha = make_mha(encoding, device=device)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        mha(torch.zeros(1, 3, 16, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(3, 16\)"):
        mha(torch.zeros(3, 16, dtype=F64, device=device))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, dim=16\), got \(1, 3, 8\)"):
        mha(torch.zeros(1, 3, 8, dtype=F64, device=device))


def test_mha_learned_beyond_max_positions_raises(device):
    mha = make_mha("learned", device=device, max_positions=8)
    x = torch.zeros(1, 9, 16, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"position 8 is beyond this learned table: it has max_positions=8"):
        mha(x)
    _, kv = mha(x[:, :6], return_kv=True)
    with pytest.raises(ValueError, match=r"position 8 is beyond .* max_positions=8 .* offset=6"):
        mha(x[:, :3], past_kv=kv)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_mha_bad_past_kv_is_rejected(device, encoding):
    mha = make_mha(encoding, device=device)
    x = torch.randn(2, 3, 16, dtype=F64, device=device)
    with torch.no_grad():
        _, (k, v) = mha(x, return_kv=True)
    step = x[:, :1]
    with pytest.raises(TypeError, match=r"past_kv must be the \(k, v\) tuple returned with return_kv=True"):
        mha(step, past_kv=[k, v])
    with pytest.raises(TypeError, match=r"past_kv must be the \(k, v\) tuple"):
        mha(step, past_kv=(k, v, v))
    with pytest.raises(
        ValueError,
        match=r"past_kv\[0\] has shape \(2, 1, 3, 8\) on \S+, but this layer needs "
        r"\(batch=2, heads=2, past_len, head_dim=8\)",
    ):
        mha(step, past_kv=(k[:, :1], v))
    with pytest.raises(
        ValueError, match=r"past_kv\[1\] has shape \(2, 2, 3, 4\) .*needs \(batch=2, heads=2, past_len, head_dim=8\)"
    ):
        mha(step, past_kv=(k, v[..., :4]))
    with pytest.raises(ValueError, match=r"past_kv\[0\] has shape \(1, 2, 3, 8\) .*needs \(batch=2,"):
        mha(step, past_kv=(k[:1], v))
    with pytest.raises(ValueError, match=r"past keys \(3\) and values \(2\) differ in length"):
        mha(step, past_kv=(k, v[:, :, :2]))
    with pytest.raises(ValueError, match=r"past_kv\[0\] must have 4 dimensions, got shape \(2, 3, 8\)"):
        mha(step, past_kv=(k[:, 0], v))
    with pytest.raises(TypeError, match=r"past_kv\[1\] must be a floating-point tensor, got dtype torch.int64"):
        mha(step, past_kv=(k, v.long()))


@pytest.mark.cuda
def test_mha_past_kv_on_another_device_is_rejected(cuda_device):
    mha = make_mha("rope", device=cuda_device)
    x = torch.randn(1, 3, 16, dtype=F64, device=cuda_device)
    with torch.no_grad():
        _, (k, v) = mha(x, return_kv=True)
    with pytest.raises(
        ValueError, match=r"past_kv\[0\] has shape \(1, 2, 3, 8\) on cpu, but this layer needs .* on cuda"
    ):
        mha(x[:, :1], past_kv=(k.cpu(), v))
