"""pebook.t5: T5's bucketed relative position bias (Raffel et al. 2020, §2.1).

Reference: ``ref.t5_bucket`` (conftest) is ``_relative_position_bucket`` of transformers'
``T5Attention`` (a port of Mesh TensorFlow's), quoted from the published source. The registry's
``T5PE`` adds ``table[bucket(k_pos - q_pos), head]`` to the logits, with bidirectional buckets
exactly when the attention is not causal.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook
from pebook import T5PE, T5RelativeBias, t5_relative_bucket

F64 = torch.float64


def t5_module(n_heads=3, causal=True, seed=0, **options):
    """A T5PE with a random float64 table (N(0, 1), as nn.Embedding initialises it)."""
    torch.manual_seed(seed)
    return T5PE(n_heads=n_heads, causal=causal, **options).double()


ALL_OFFSETS = torch.arange(-300, 301)
# (bidirectional, num_buckets, max_distance), including T5's (32, 128) and edge configurations
CONFIGS = [
    (True, 32, 128),
    (False, 32, 128),
    (True, 16, 64),
    (False, 16, 64),
    (True, 64, 256),
    (False, 10, 50),
    (True, 8, 20),
    (False, 7, 30),
    (True, 4, 3),
    (False, 2, 5),
    (True, 32, 9),
    (False, 32, 300),
]


def valid_config():
    """Hypothesis strategy for (bidirectional, num_buckets, max_distance) that pebook accepts."""

    @st.composite
    def build(draw):
        bidirectional = draw(st.booleans())
        per_direction = draw(st.integers(2, 40))
        num_buckets = 2 * per_direction if bidirectional else per_direction
        max_exact = per_direction // 2
        max_distance = draw(st.integers(max_exact + 1, 400))
        return bidirectional, num_buckets, max_distance

    return build()


# ---------------------------------------------------------------- (1) reference


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", CONFIGS)
def test_buckets_match_reference_for_every_offset(device, ref, bidirectional, num_buckets, max_distance):
    rel = ALL_OFFSETS.to(device)
    got = t5_relative_bucket(rel, bidirectional, num_buckets, max_distance)
    assert got.dtype == torch.int64 and got.device.type == device.type and got.shape == rel.shape
    assert torch.equal(got.cpu(), ref.t5_bucket(ALL_OFFSETS, bidirectional, num_buckets, max_distance))


def test_buckets_keep_shape_and_accept_int32(device, ref):
    rel = (torch.arange(7)[None, :] - torch.arange(5)[:, None]).to(device)  # j - i, shape (5, 7)
    got = t5_relative_bucket(rel.int())
    assert got.shape == (5, 7)
    assert torch.equal(got.cpu(), ref.t5_bucket(rel.cpu()))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (6, 5)])
def test_module_score_is_the_table_at_the_reference_bucket(device, ref, causal, num_buckets, max_distance):
    """T5PE.logit_bias[b, h, i, j] = table[bucket(k_pos[b, j] - q_pos[b, i]), h], with the
    reference buckets, bidirectional iff not causal; at batched, unordered, far-apart positions."""
    enc = t5_module(3, causal, num_buckets=num_buckets, t5_max_distance=max_distance).to(device)
    assert enc.relative_bias.bidirectional is (not causal)
    q_pos = torch.tensor([[0, 7, 300, 12], [5, 5, 1, 0]], device=device)
    k_pos = torch.tensor([[0, 1, 2, 20, 150, 299], [400, 3, 5, 9, 0, 1]], device=device)
    bias = enc.logit_bias(q_pos, k_pos)
    assert bias.shape == (2, 3, 4, 6) and bias.dtype == F64 and bias.device.type == device.type
    relative = (k_pos[:, None, :] - q_pos[:, :, None]).cpu()  # (b, i, j): j - i
    buckets = ref.t5_bucket(relative, not causal, num_buckets, max_distance)
    table = enc.relative_bias.bias.weight.detach().cpu()
    assert torch.equal(bias.detach().cpu(), table[buckets].permute(0, 3, 1, 2))


@pytest.mark.parametrize("causal", [True, False])
def test_module_equals_the_bias_module_at_contiguous_positions(device, causal):
    """Queries at offset … offset + q_len - 1 and keys at 0 … k_len - 1: T5RelativeBias.forward."""
    enc = t5_module(2, causal).to(device)
    q_pos, k_pos = torch.arange(150, 155, device=device)[None], torch.arange(200, device=device)[None]
    assert torch.equal(enc.logit_bias(q_pos, k_pos)[0], enc.relative_bias(5, 200, 150))


def test_module_in_attention_is_unscaled_t5_attention(device, rand, ref):
    """T5 does not scale the logits (scale=1.0): softmax(q kᵀ + bias) v, causal, over a cache."""
    enc = t5_module(4).to(device)
    q, k, v = rand(2, 4, 2, 8, seed=0, device=device), *(rand(2, 4, 7, 8, seed=s, device=device) for s in (1, 2))
    out = pebook.positional_attention(q, k, v, enc, scale=1.0)
    relative = torch.arange(7)[None, :] - torch.arange(5, 7)[:, None]
    bias = enc.relative_bias.bias.weight.detach().cpu()[ref.t5_bucket(relative, False)].permute(2, 0, 1).to(device)
    expected = ref.attention(q * math.sqrt(8), k, v, bias=bias)  # ref divides by √d
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- (2) properties


@given(config=valid_config())
def test_bucket_properties(device, ref, config):
    bidirectional, num_buckets, max_distance = config
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_direction // 2
    span = max_distance + 20
    distance = torch.arange(span + 1, device=device)
    back = t5_relative_bucket(-distance, bidirectional, num_buckets, max_distance).cpu()  # j - i = 0, -1, -2, …
    ahead = t5_relative_bucket(distance[1:], bidirectional, num_buckets, max_distance).cpu()  # j - i = 1, 2, …
    both = torch.cat((back, ahead))
    assert torch.equal(
        both, ref.t5_bucket(torch.cat((-distance, distance[1:])).cpu(), bidirectional, num_buckets, max_distance)
    )
    assert both.min() >= 0 and both.max() < num_buckets
    # monotone non-decreasing in distance within each direction
    assert (back.diff() >= 0).all() and (ahead.diff() >= 0).all()
    # exact buckets for small distances
    assert torch.equal(back[:max_exact], torch.arange(max_exact))
    if bidirectional:
        assert torch.equal(ahead[: max_exact - 1], torch.arange(1, max_exact) + per_direction)
        assert (ahead >= per_direction).all() and (back < per_direction).all()  # directions never share
    else:
        assert (ahead == 0).all()  # causal: the future is folded onto bucket 0 (it is masked anyway)
    # every distance >= max_distance shares the last bucket of its direction
    assert (back[max_distance:] == per_direction - 1).all()
    if bidirectional:
        assert (ahead[max_distance - 1 :] == num_buckets - 1).all()
    # and the log-spaced part starts right after the exact part
    assert back[max_exact] == max_exact


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", [(False, 32, 128), (True, 32, 128), (False, 8, 40)])
def test_bias_module_gathers_the_reference_buckets(device, ref, bidirectional, num_buckets, max_distance):
    torch.manual_seed(0)
    module = T5RelativeBias(3, num_buckets, max_distance, bidirectional).to(device)
    q_len, k_len, offset = 5, 200, 150
    out = module(q_len, k_len, offset)
    assert out.shape == (3, q_len, k_len) and out.device.type == device.type
    relative = torch.arange(k_len)[None, :] - torch.arange(offset, offset + q_len)[:, None]
    expected = module.bias.weight.detach().cpu()[ref.t5_bucket(relative, bidirectional, num_buckets, max_distance)]
    assert torch.equal(out.detach().cpu(), expected.permute(2, 0, 1))


@given(q_len=st.integers(1, 12), k_len=st.integers(1, 40), offset=st.integers(0, 30), bidirectional=st.booleans())
def test_bias_module_is_toeplitz_and_respects_offset(device, q_len, k_len, offset, bidirectional):
    torch.manual_seed(0)
    module = T5RelativeBias(2, 16, 20, bidirectional).to(device)
    with torch.no_grad():
        out = module(q_len, k_len, offset)
        full = module(offset + q_len, k_len)
    assert torch.equal(out[:, 1:, 1:], out[:, :-1, :-1])  # depends on j - i only
    assert torch.equal(out, full[:, offset:])  # offset = the tail rows of a longer block
    # a query at position p and key j: same value as query 0 and key j - p whenever j >= p
    if k_len > offset:
        assert torch.equal(out[:, 0, offset:], full[:, 0, : k_len - offset])


def test_bias_module_gradient_reaches_only_used_buckets(device, ref):
    torch.manual_seed(0)
    module = T5RelativeBias(2, 32, 128).to(device)  # causal (bidirectional=False)
    module(6, 6).sum().backward()
    buckets = ref.t5_bucket(torch.arange(6)[None, :] - torch.arange(6)[:, None], False)
    counts = torch.bincount(buckets.flatten(), minlength=32).float()  # 21 pairs j <= i in 0..5, 15 future in 0
    assert counts[6:].sum() == 0 and counts[0] == 6 + 15
    # d(sum)/d(row b) = number of (i, j) pairs in bucket b, for each head; unused rows get 0
    assert torch.equal(module.bias.weight.grad.cpu(), counts[:, None].expand(32, 2))


@given(
    shift=st.integers(0, 500),
    causal=st.booleans(),
    q=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    k=st.lists(st.integers(0, 300), min_size=1, max_size=5),
)
def test_module_bias_is_translation_invariant(device, shift, causal, q, k):
    """A relative encoding: moving every query and key by the same amount changes nothing."""
    enc = t5_module(2, causal).to(device)
    q_pos, k_pos = torch.tensor([q], device=device), torch.tensor([k], device=device)
    with torch.no_grad():
        assert torch.equal(enc.logit_bias(q_pos + shift, k_pos + shift), enc.logit_bias(q_pos, k_pos))


def test_module_gradient_reaches_only_used_buckets(device, ref):
    enc = t5_module(2, causal=True).to(device)
    pos = torch.arange(6, device=device)[None]
    enc.logit_bias(pos, pos).sum().backward()
    counts = torch.bincount(
        ref.t5_bucket(torch.arange(6)[None, :] - torch.arange(6)[:, None], False).flatten(), minlength=32
    )
    assert torch.equal(enc.relative_bias.bias.weight.grad.cpu(), counts[:, None].double().expand(32, 2))


# ---------------------------------------------------------------- (3) frozen snapshots

SNAPSHOT_OFFSETS = [-200, -128, -127, -64, -20, -16, -12, -8, -7, -1, 0, 1, 7, 8, 12, 16, 20, 64, 127, 128, 200]


def test_snapshot_t5_default_buckets(device, ref):
    """T5's configuration (32 buckets, max_distance 128). Values computed once with the quoted
    transformers function and checked by hand, e.g. bidirectional j - i = -16: 16 buckets per
    direction, max_exact 8, 8 + ⌊ln(16/8)/ln(128/8)·8⌋ = 8 + 2 = 10; j - i = -64: 8 + ⌊ln 8/ln 16·8⌋
    = 14; unidirectional j - i = -20: 16 + ⌊ln(20/16)/ln(8)·16⌋ = 16 + 1 = 17."""
    rel = torch.tensor(SNAPSHOT_OFFSETS, device=device)
    bidirectional = [15, 15, 15, 14, 10, 10, 9, 8, 7, 1, 0, 17, 23, 24, 25, 26, 26, 30, 31, 31, 31]
    causal = [31, 31, 31, 26, 17, 16, 12, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert t5_relative_bucket(rel, True).tolist() == bidirectional
    assert t5_relative_bucket(rel, False).tolist() == causal
    assert ref.t5_bucket(rel.cpu(), True).tolist() == bidirectional
    assert ref.t5_bucket(rel.cpu(), False).tolist() == causal


def test_snapshot_bias_module(device, ref):
    """With bias row b set to b (one head), T5RelativeBias returns the bucket of every (i, j):
    queries at positions 20, 21 over keys 0, 1, 2, 19, 20, 21, 22 (causal T5 buckets: 32, 128).
    By hand, 16 + ⌊ln(d/16)/ln 8 · 16⌋ for d >= 16: d = 21 → 16 + ⌊2.09⌋ = 18, d = 20 → 17,
    d = 19 → 17, d = 18 → 16; small d are exact; every future offset → 0. The quoted transformers
    function gives the same."""
    module = T5RelativeBias(1, 32, 128).to(device)
    with torch.no_grad():
        module.bias.weight.copy_(torch.arange(32.0, device=device)[:, None])
    keys = [0, 1, 2, 19, 20, 21, 22]
    out = module(2, 23, offset=20)[0][:, keys]
    relative = torch.tensor(keys)[None, :] - torch.tensor([20, 21])[:, None]
    assert ref.t5_bucket(relative, False).tolist() == [[17, 17, 16, 1, 0, 0, 0], [18, 17, 17, 2, 1, 0, 0]]
    assert out.tolist() == [[17.0, 17.0, 16.0, 1.0, 0.0, 0.0, 0.0], [18.0, 17.0, 17.0, 2.0, 1.0, 0.0, 0.0]]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_relative_positions_are_rejected(device, dtype):
    rel = torch.arange(-3, 3, device=device).to(dtype)
    with pytest.raises(TypeError, match=rf"relative_position must be an integer tensor, got dtype {dtype}"):
        t5_relative_bucket(rel)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(bidirectional=True, num_buckets=31), r"num_buckets must be even when bidirectional=True, got 31"),
        (dict(bidirectional=False, num_buckets=1), r"num_buckets must be an int >= 2, got 1$"),
        (dict(bidirectional=True, num_buckets=2), r"max_distance must exceed the 0 exact buckets \(num_buckets=2"),
        (dict(bidirectional=True, max_distance=0), r"max_distance must be an int >= 1, got 0$"),
        (dict(bidirectional=False, max_distance=-5), r"max_distance must be an int >= 1, got -5$"),
        (
            dict(bidirectional=True, num_buckets=32, max_distance=8),
            r"max_distance must exceed the 8 exact buckets .* got max_distance=8",
        ),
        (dict(bidirectional=False, num_buckets=32, max_distance=16), r"exceed the 16 exact .* got max_distance=16"),
    ],
)
def test_bad_bucket_arguments_are_rejected(device, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        t5_relative_bucket(torch.arange(-3, 3, device=device), **kwargs)
    with pytest.raises(ValueError, match=pattern):  # the module validates them at construction
        T5RelativeBias(2, **kwargs)


def test_unsigned_relative_positions_are_rejected_or_exact(device):
    """uint8 is an integer dtype, but negation wraps around in it: causal buckets of the positive
    offsets 1, 2 must be 0 (as for int64), not the far-past bucket. pebook must either reject
    unsigned dtypes (TypeError naming relative_position and the dtype) or compute as int64."""
    rel = torch.tensor([0, 1, 2, 200], dtype=torch.uint8, device=device)
    try:
        got = t5_relative_bucket(rel, bidirectional=False)
    except TypeError as err:
        assert "relative_position" in str(err) and "uint8" in str(err)
    else:
        assert got.tolist() == t5_relative_bucket(rel.long(), bidirectional=False).tolist() == [0, 0, 0, 0]


def test_bools_where_ints_are_needed(device):
    with pytest.raises(TypeError, match=r"num_buckets must be an int, got True of type bool"):
        t5_relative_bucket(torch.arange(3, device=device), num_buckets=True)
    with pytest.raises(TypeError, match=r"n_heads must be an int, got True of type bool"):
        T5RelativeBias(True)


@pytest.mark.parametrize("n_heads", [0, -1])
def test_n_heads_below_one_is_rejected(n_heads):
    with pytest.raises(ValueError, match=rf"n_heads must be an int >= 1, got {n_heads}$"):
        T5RelativeBias(n_heads)


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((-1, 3), r"q_len must be an int >= 0, got -1$"),
        ((3, -2), r"k_len must be an int >= 0, got -2$"),
        ((3, 3, -4), r"offset must be an int >= 0, got -4$"),
    ],
)
def test_bias_module_rejects_negative_lengths(device, args, pattern):
    module = T5RelativeBias(2).to(device)
    with pytest.raises(ValueError, match=pattern):
        module(*args)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(causal=False, num_buckets=31), ValueError, r"num_buckets must be even when bidirectional=True, got 31$"),
        (dict(num_buckets=1), ValueError, r"num_buckets must be an int >= 2, got 1$"),
        (dict(t5_max_distance=0), ValueError, r"t5_max_distance must be an int >= 1, got 0$"),
        (
            dict(t5_max_distance=16),
            ValueError,
            r"max_distance must exceed the 16 exact buckets .* got max_distance=16$",
        ),
        (dict(t5_max_distance=128.0), TypeError, r"t5_max_distance must be an int, got 128.0 of type float$"),
        (dict(n_heads=0), ValueError, r"n_heads must be an int >= 1, got 0$"),
    ],
)
def test_module_rejects_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        T5PE(**({"n_heads": 2} | kwargs))
