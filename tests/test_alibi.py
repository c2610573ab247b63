"""pebook.alibi: Attention with Linear Biases (Press, Smith & Lewis 2022, §3).

References (conftest): ``ref.alibi_slopes`` is the authors' ``get_slopes`` (quoted verbatim),
``ref.alibi_bias`` the bias -m_h · (i - j) element by element. Without a causal mask the bias is
the symmetric -m_h · |i - j| (MosaicBERT, Portes et al. 2023, arXiv:2312.17482). The chapter's
helpers are checked against w_h(d) = exp(-m_h d) / Σ_d' exp(-m_h d'), in Python floats, and
against the weights read off real attention (``ref.attention``, zero queries, one-hot values).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook
from pebook import ALiBi, alibi_bias, alibi_distance_weights, alibi_effective_window, alibi_slopes

F64 = torch.float64


def distance_weights_ref(slopes, n_keys: int) -> torch.Tensor:
    """w_h(d) = exp(-m_h d) / Σ_{d'} exp(-m_h d'), d = 0 … n_keys-1, in Python floats."""
    rows = []
    for m in slopes:
        m = float(m)
        numerators = [math.exp(-m * d) for d in range(n_keys)]
        total = math.fsum(numerators)
        rows.append([x / total for x in numerators])
    return torch.tensor(rows, dtype=F64).reshape(len(slopes), n_keys)


def alibi_positions_ref(slopes, q_pos, k_pos, symmetric):
    """-m_h (i - j), or -m_h |i - j|, for queries at q_pos[b] and keys at k_pos[b], by loops."""
    rows = []
    for qs, ks in zip(q_pos.tolist(), k_pos.tolist(), strict=True):
        rows.append([[[-m * (abs(i - j) if symmetric else i - j) for j in ks] for i in qs] for m in slopes.tolist()])
    return torch.tensor(rows, dtype=F64).reshape(len(rows), slopes.numel(), q_pos.shape[1], k_pos.shape[1])


# ---------------------------------------------------------------- (1) reference


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 24, 32, 40, 64, 96])
def test_slopes_match_reference_get_slopes(device, ref, n_heads):
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    assert slopes.shape == (n_heads,) and slopes.dtype == F64 and slopes.device.type == device.type
    torch.testing.assert_close(slopes.cpu(), torch.tensor(ref.alibi_slopes(n_heads), dtype=F64), rtol=1e-14, atol=0)
    assert alibi_slopes(n_heads, device=device).dtype == torch.float32  # default dtype


@pytest.mark.parametrize("q_len,k_len,offset", [(5, 5, 0), (1, 9, 8), (3, 10, 4), (4, 2, 0), (0, 3, 1)])
def test_bias_matches_reference(device, ref, q_len, k_len, offset):
    slopes = alibi_slopes(6, dtype=F64, device=device)
    bias = alibi_bias(q_len, k_len, slopes, offset)
    assert bias.shape == (6, q_len, k_len) and bias.dtype == F64 and bias.device.type == device.type
    expected = ref.alibi_bias(q_len, k_len, slopes.tolist(), offset)
    torch.testing.assert_close(bias.cpu(), expected, rtol=1e-15, atol=0)


def test_bias_follows_the_slopes_dtype(device):
    for dtype in (torch.float32, torch.bfloat16, F64):
        assert alibi_bias(3, 3, alibi_slopes(4, dtype=dtype, device=device)).dtype == dtype


@pytest.mark.parametrize("q_len,k_len,offset", [(5, 5, 0), (1, 9, 8), (3, 10, 4), (4, 2, 0), (0, 3, 1)])
def test_symmetric_bias_matches_reference(device, ref, q_len, k_len, offset):
    """symmetric=True: -m_h |i - j|, i.e. minus the magnitude of the signed reference (m_h > 0)."""
    slopes = alibi_slopes(6, dtype=F64, device=device)
    bias = alibi_bias(q_len, k_len, slopes, offset, symmetric=True)
    assert bias.shape == (6, q_len, k_len) and bias.dtype == F64 and bias.device.type == device.type
    expected = -ref.alibi_bias(q_len, k_len, slopes.tolist(), offset).abs()
    torch.testing.assert_close(bias.cpu(), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_module_bias_at_position_ids_matches_reference(device, ref, causal):
    """ALiBi(causal=True) adds the signed -m_h (i - j) of §3, ALiBi(causal=False) the symmetric
    -m_h |i - j|, at batched, unordered position ids; slopes of the reference get_slopes."""
    enc = ALiBi(n_heads=6, causal=causal).double().to(device)
    torch.testing.assert_close(enc.slopes.cpu(), torch.tensor(ref.alibi_slopes(6), dtype=F64), rtol=1e-14, atol=0)
    q_pos = torch.tensor([[4, 9, 2], [0, 0, 30]], device=device)
    k_pos = torch.tensor([[0, 1, 2, 3, 9], [31, 7, 0, 2, 2]], device=device)
    bias = enc.logit_bias(q_pos, k_pos)
    assert bias.shape == (2, 6, 3, 5) and bias.dtype == F64 and bias.device.type == device.type
    expected = alibi_positions_ref(enc.slopes.cpu(), q_pos.cpu(), k_pos.cpu(), symmetric=not causal)
    torch.testing.assert_close(bias.cpu(), expected, rtol=1e-15, atol=0)
    # contiguous positions: the functional form, with the first query at `offset`
    pos = torch.arange(3, 8, device=device)[None]
    keys = torch.arange(8, device=device)[None]
    functional = alibi_bias(5, 8, enc.slopes, 3, symmetric=not causal)
    assert torch.equal(enc.logit_bias(pos, keys)[0], functional)
    if causal:
        torch.testing.assert_close(functional.cpu(), ref.alibi_bias(5, 8, enc.slopes.tolist(), 3), rtol=1e-15, atol=0)


def test_slopes_can_be_overridden(device, ref):
    slopes = torch.tensor([1.0, 0.25, 0.0], device=device)
    enc = ALiBi(n_heads=3, slopes=slopes)
    slopes[0] = 7.0  # the module keeps its own copy
    assert enc.slopes.tolist() == [1.0, 0.25, 0.0] and enc.slopes.device.type == device.type
    pos = torch.arange(4, device=device)[None]
    expected = ref.alibi_bias(4, 4, [1.0, 0.25, 0.0]).to(device)[None]
    assert torch.equal(enc.logit_bias(pos, pos).double(), expected)
    # a zero slope is a head with no positional bias at all
    assert torch.equal(enc.logit_bias(pos, pos)[0, 2], torch.zeros(4, 4, device=device))


@pytest.mark.parametrize("n_heads,n_keys", [(1, 1), (4, 7), (8, 64), (12, 300), (6, 2048)])
def test_distance_weights_match_reference(device, n_heads, n_keys):
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    weights = alibi_distance_weights(slopes, n_keys)
    assert weights.shape == (n_heads, n_keys) and weights.dtype == F64 and weights.device.type == device.type
    expected = distance_weights_ref(slopes.tolist(), n_keys)
    torch.testing.assert_close(weights.cpu(), expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("n_heads,n_keys", [(4, 9), (8, 33)])
def test_distance_weights_are_the_weights_of_real_alibi_attention(device, ref, rand, n_heads, n_keys):
    """q = 0 makes every q·k equal; values = identity turn the output into the weights themselves."""
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    q = torch.zeros(1, n_heads, n_keys, 8, dtype=F64, device=device)
    k = rand(1, n_heads, n_keys, 8, seed=0, device=device)
    v = torch.eye(n_keys, dtype=F64, device=device).expand(1, n_heads, n_keys, n_keys)
    bias = ref.alibi_bias(n_keys, n_keys, slopes.tolist()).to(device)
    attention_weights = ref.attention(q, k, v, bias=bias)[0, :, -1, :]  # last query, keys j = 0 … n-1
    by_distance = attention_weights.flip(-1)  # column d: key j = n - 1 - d
    torch.testing.assert_close(alibi_distance_weights(slopes, n_keys), by_distance, rtol=1e-12, atol=1e-14)


def test_effective_window_matches_reference(device):
    slopes = alibi_slopes(8, dtype=F64, device=device)
    window = alibi_effective_window(slopes)
    assert window.shape == (8,) and window.dtype == F64 and window.device.type == device.type
    expected = torch.tensor([math.log(100.0) * 2.0**h for h in range(1, 9)], dtype=F64)
    torch.testing.assert_close(window.cpu(), expected, rtol=1e-14, atol=0)
    half = alibi_effective_window(slopes, fraction=0.5).cpu()
    torch.testing.assert_close(half, math.log(2.0) / slopes.cpu(), rtol=1e-14, atol=0)


def test_helpers_follow_the_slopes_dtype(device):
    for dtype in (torch.float32, F64):
        slopes = alibi_slopes(4, dtype=dtype, device=device)
        assert alibi_distance_weights(slopes, 5).dtype == dtype
        assert alibi_effective_window(slopes).dtype == dtype


# ---------------------------------------------------------------- (2) properties


@given(n_heads=st.integers(1, 200))
def test_slope_properties(device, n_heads):
    slopes = alibi_slopes(n_heads, dtype=F64, device=device).cpu()
    assert ((slopes > 0) & (slopes < 1)).all()
    assert len(set(slopes.tolist())) == n_heads  # every head gets its own slope
    closest = 2 ** (n_heads.bit_length() - 1)
    head = slopes[:closest]  # the first 2^⌊log2 n⌋ slopes: geometric, starting at and with ratio 2^(-8/closest)
    start = 2.0 ** (-8.0 / closest)
    torch.testing.assert_close(head, start ** torch.arange(1, closest + 1, dtype=F64), rtol=1e-13, atol=0)
    assert head[-1].item() == pytest.approx(2.0**-8, rel=1e-13)  # always ends at 1/256
    if n_heads > closest:  # the rest interleave: every other slope of the next power of two
        finer = 2.0 ** (-8.0 / (2 * closest))
        expected = finer ** torch.arange(1, 2 * (n_heads - closest), 2, dtype=F64)
        torch.testing.assert_close(slopes[closest:], expected, rtol=1e-13, atol=0)


@given(q_len=st.integers(1, 12), k_len=st.integers(1, 12), offset=st.integers(0, 20), n_heads=st.integers(1, 12))
def test_bias_is_toeplitz_linear_and_offset_consistent(device, q_len, k_len, offset, n_heads):
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    bias = alibi_bias(q_len, k_len, slopes, offset)
    # Toeplitz in (i, j): depends on (offset + i) - j only
    assert torch.equal(bias[:, 1:, 1:], bias[:, :-1, :-1])
    # linear in the distance with slope m_h: one key further back costs exactly m_h more
    if k_len > 1:
        steps = bias[:, :, 1:] - bias[:, :, :-1]
        torch.testing.assert_close(steps, slopes[:, None, None].expand_as(steps), rtol=1e-13, atol=0)
    # zero exactly where key j is the query's own position
    for i in range(q_len):
        if offset + i < k_len:
            assert (bias[:, i, offset + i] == 0).all()
    # a query block at `offset` is the tail of the block starting at 0
    assert torch.equal(bias, alibi_bias(offset + q_len, k_len, slopes)[:, offset:])
    # the past is penalised (bias <= 0 wherever j <= offset + i)
    visible = (
        torch.arange(k_len, device=device)[None, :] <= torch.arange(offset, offset + q_len, device=device)[:, None]
    )
    assert (bias[:, visible] <= 0).all()


@given(q_len=st.integers(1, 10), k_len=st.integers(1, 10), offset=st.integers(0, 12), n_heads=st.integers(1, 9))
def test_symmetric_bias_agrees_with_the_signed_one_on_the_past(device, q_len, k_len, offset, n_heads):
    """The two forms differ only for keys after the query: there the signed bias rewards the
    distance (+m_h (j - i)) and the symmetric one penalises it like the past (-m_h (j - i))."""
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    signed = alibi_bias(q_len, k_len, slopes, offset)
    symmetric = alibi_bias(q_len, k_len, slopes, offset, symmetric=True)
    past = torch.arange(k_len, device=device)[None, :] <= torch.arange(offset, offset + q_len, device=device)[:, None]
    assert torch.equal(symmetric[:, past], signed[:, past])
    assert torch.equal(symmetric[:, ~past], -signed[:, ~past])
    assert (symmetric <= 0).all()


def test_bidirectional_query_attends_most_to_itself(device, rand, ref):
    """Review finding: with equal content scores (zero queries) and no causal mask, the signed
    bias -m (i - j) is largest for the *last* key, so query 0 attended mostly to the end of the
    sequence. With the symmetric bias every query's largest weight is on its own position, and
    the weights fall off geometrically (ratio e^{-m}) on both sides."""
    n_heads, length = 4, 7
    q = torch.zeros(1, n_heads, length, 8, dtype=F64, device=device)
    k = rand(1, n_heads, length, 8, seed=3, device=device)
    v = torch.eye(length, 8, dtype=F64, device=device).expand(1, n_heads, length, 8)  # output = weights
    enc = ALiBi(n_heads=n_heads, causal=False).double().to(device)
    weights = pebook.positional_attention(q, k, v, enc, causal=False)[0, :, :, :length]
    assert torch.equal(weights.argmax(-1).cpu(), torch.arange(length).expand(n_heads, length))
    ratio = torch.exp(-enc.slopes)[:, None]
    torch.testing.assert_close(
        weights[:, 0, 1:] / weights[:, 0, :-1], ratio.expand(n_heads, length - 1), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        weights[:, -1, :-1] / weights[:, -1, 1:], ratio.expand(n_heads, length - 1), rtol=1e-12, atol=0
    )
    # what the finding was: the signed bias without a mask puts query 0's largest weight on the
    # last key, the one farthest from it; an ALiBi built causal is now refused in such attention
    signed = ref.attention(q, k, v, bias=alibi_bias(length, length, enc.slopes), causal=False)[0, :, :, :length]
    assert (signed[:, 0].argmax(-1) == length - 1).all()
    with pytest.raises(
        ValueError, match=r"the alibi encoding was built with causal=True, but this attention has False"
    ):
        pebook.positional_attention(q, k, v, ALiBi(n_heads=n_heads), causal=False)


def test_causal_module_keeps_the_signed_bias_under_the_mask(device, rand, ref):
    """Under a causal mask only j <= i is used, where signed and symmetric agree; ALiBi(causal)
    in attention equals the reference with the bias of §3."""
    enc = ALiBi(n_heads=4).double().to(device)
    q, k, v = rand(2, 4, 3, 8, seed=4, device=device), *(rand(2, 4, 6, 8, seed=s, device=device) for s in (5, 6))
    out = pebook.positional_attention(q, k, v, enc)
    bias = ref.alibi_bias(3, 6, enc.slopes.tolist(), offset=3).to(device)
    torch.testing.assert_close(out, ref.attention(q, k, v, bias=bias), rtol=1e-12, atol=1e-12)


@given(n_heads=st.integers(1, 40), n_keys=st.integers(1, 400))
def test_distance_weights_decay_geometrically(device, n_heads, n_keys):
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    weights = alibi_distance_weights(slopes, n_keys)
    torch.testing.assert_close(weights.sum(-1), torch.ones(n_heads, dtype=F64, device=device), rtol=0, atol=1e-12)
    assert (weights > 0).all()
    if n_keys > 1:  # w(d+1) / w(d) = exp(-m_h) at every distance
        ratio = weights[:, 1:] / weights[:, :-1]
        torch.testing.assert_close(ratio, torch.exp(-slopes)[:, None].expand_as(ratio), rtol=1e-12, atol=0)
        assert (weights[:, 1:] < weights[:, :-1]).all()  # strictly decreasing with distance


@given(n_heads=st.integers(1, 40), fraction=st.floats(1e-6, 0.9))
def test_window_is_where_the_weights_cross_the_fraction(device, n_heads, fraction):
    slopes = alibi_slopes(n_heads, dtype=F64, device=device)
    window = alibi_effective_window(slopes, fraction)
    # exp(-m · window) = fraction
    torch.testing.assert_close(torch.exp(-slopes * window), torch.full_like(window, fraction), rtol=1e-12, atol=0)
    # the first integer distance with w(d) <= fraction · w(0) is ceil(window), read off the weights
    n_keys = int(window.max().ceil().item()) + 2
    relative = alibi_distance_weights(slopes, n_keys) / alibi_distance_weights(slopes, n_keys)[:, :1]
    first = (relative <= fraction).to(torch.int64).argmax(-1)
    near_integer = (window - window.round()).abs() < 1e-9  # too close to call in floating point
    assert torch.equal(first[~near_integer], window.ceil().to(torch.int64)[~near_integer])


# ---------------------------------------------------------------- (3) frozen snapshots


def test_snapshot_paper_slopes(device):
    """Press et al. §3: for 8 heads the slopes are 1/2^1, …, 1/2^8; for 16 heads the geometric
    sequence starting at 1/√2 with ratio 1/√2, i.e. 2^(-h/2)."""
    eight = alibi_slopes(8, dtype=F64, device=device).cpu()
    assert eight.tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    assert alibi_slopes(8, device=device).tolist() == eight.tolist()  # dyadic: exact in float32 too
    # 16 heads: (2^-0.5)^h is a product of rounded factors (as in get_slopes), so a few ulps
    sixteen = alibi_slopes(16, dtype=F64, device=device).cpu()
    torch.testing.assert_close(
        sixteen, torch.tensor([2.0 ** (-0.5 * h) for h in range(1, 17)], dtype=F64), rtol=4e-15, atol=0
    )


def test_snapshot_non_power_of_two_slopes(device):
    """The reference get_slopes for 6 heads: the 4-head slopes (1/4, 1/16, 1/64, 1/256) then
    every other 8-head slope (1/2, 1/8); for 12 heads: 1/2 … 1/256, then 2^-0.5, 2^-1.5, 2^-2.5,
    2^-3.5. Worked out by hand from the quoted code."""
    assert alibi_slopes(6, dtype=F64, device=device).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    twelve = alibi_slopes(12, dtype=F64, device=device).cpu()
    expected = [2.0**-h for h in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(twelve, torch.tensor(expected, dtype=F64), rtol=1e-15, atol=0)


def test_snapshot_bias_matrix(device):
    """The matrix of §3 for one head with m = 1/2: row i holds -m·(i - j)."""
    bias = alibi_bias(3, 3, torch.tensor([0.5], dtype=F64, device=device))[0]
    assert bias.tolist() == [[0.0, 0.5, 1.0], [-0.5, 0.0, 0.5], [-1.0, -0.5, 0.0]]
    # decoding the 4th token with a KV cache (offset 3): -m·(3, 2, 1, 0)
    assert alibi_bias(1, 4, torch.tensor([0.5], dtype=F64, device=device), offset=3)[0].tolist() == [
        [-1.5, -1.0, -0.5, 0.0]
    ]


def test_snapshot_slope_one_half(device):
    """m = 1/2 over 3 keys: e^{-d/2} / (1 + e^{-1/2} + e^{-1})."""
    weights = alibi_distance_weights(torch.tensor([0.5], dtype=F64, device=device), 3)[0].cpu()
    total = 1 + math.exp(-0.5) + math.exp(-1)
    torch.testing.assert_close(
        weights, torch.tensor([1 / total, math.exp(-0.5) / total, math.exp(-1) / total], dtype=F64), rtol=1e-15, atol=0
    )
    assert alibi_effective_window(torch.tensor([0.5], dtype=F64, device=device)).item() == pytest.approx(
        2 * math.log(100.0), rel=1e-15
    )


def test_snapshot_symmetric_bias_matrix(device):
    """One head with m = 1/2, no mask: row i holds -m |i - j|."""
    bias = alibi_bias(3, 3, torch.tensor([0.5], dtype=F64, device=device), symmetric=True)[0]
    assert bias.tolist() == [[0.0, -0.5, -1.0], [-0.5, 0.0, -0.5], [-1.0, -0.5, 0.0]]
    enc = ALiBi(n_heads=1, causal=False, slopes=torch.tensor([0.5], dtype=F64, device=device))
    pos = torch.arange(3, device=device)[None]
    assert enc.logit_bias(pos, pos)[0, 0].tolist() == bias.tolist()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("n_heads", [0, -1, -8])
def test_n_heads_below_one_is_rejected(device, n_heads):
    with pytest.raises(ValueError, match=rf"n_heads must be an int >= 1, got {n_heads}$"):
        alibi_slopes(n_heads, device=device)


def test_n_heads_must_be_an_int(device):
    with pytest.raises(TypeError, match=r"n_heads must be an int, got True of type bool"):
        alibi_slopes(True, device=device)
    with pytest.raises(TypeError, match=r"n_heads must be an int, got 8.0 of type float"):
        alibi_slopes(8.0, device=device)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_slopes_need_a_floating_dtype(device, dtype):
    """Slopes are 2^(-8h/n) < 1: an integer dtype would silently turn every slope into 0."""
    with pytest.raises(TypeError, match=rf"dtype must be a floating-point torch.dtype, got {dtype}"):
        alibi_slopes(8, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((-1, 3), r"q_len must be an int >= 0, got -1$"),
        ((3, -1), r"k_len must be an int >= 0, got -1$"),
        ((3, 3, -2), r"offset must be an int >= 0, got -2$"),
    ],
)
def test_bias_rejects_negative_lengths(device, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        alibi_bias(*args[:2], alibi_slopes(4, device=device), *args[2:])


def test_bias_rejects_bad_slopes(device):
    with pytest.raises(TypeError, match=r"slopes must be a floating-point tensor, got dtype torch.int64"):
        alibi_bias(3, 3, torch.ones(4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"slopes must have 1 dimensions, got shape \(2, 2\)"):
        alibi_bias(3, 3, torch.ones(2, 2, device=device))
    with pytest.raises(TypeError, match=r"slopes must be a torch.Tensor, got list"):
        alibi_bias(3, 3, [0.5, 0.25])
    with pytest.raises(TypeError, match=r"q_len must be an int, got True of type bool"):
        alibi_bias(True, 3, alibi_slopes(2, device=device))


def test_distance_weights_reject_bad_input(device):
    slopes = alibi_slopes(4, device=device)
    with pytest.raises(ValueError, match=r"n_keys must be an int >= 1, got 0$"):
        alibi_distance_weights(slopes, 0)
    with pytest.raises(TypeError, match=r"n_keys must be an int, got 3.0 of type float"):
        alibi_distance_weights(slopes, 3.0)
    with pytest.raises(TypeError, match=r"slopes must be a floating-point tensor, got dtype torch.int64"):
        alibi_distance_weights(torch.ones(4, dtype=torch.long, device=device), 3)
    with pytest.raises(ValueError, match=r"slopes must have 1 dimensions, got shape \(2, 2\)"):
        alibi_distance_weights(torch.ones(2, 2, device=device), 3)
    with pytest.raises(TypeError, match=r"slopes must be a torch.Tensor, got list"):
        alibi_distance_weights([0.5], 3)


def test_effective_window_rejects_bad_input(device):
    slopes = alibi_slopes(4, device=device)
    for fraction in (1.0, 2.0):
        with pytest.raises(ValueError, match=rf"fraction must be in \(0, 1\), got {fraction}"):
            alibi_effective_window(slopes, fraction)
    for fraction in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"fraction must be a finite number > 0, got"):
            alibi_effective_window(slopes, fraction)
    with pytest.raises(TypeError, match=r"fraction must be a real number, got '0.1' of type str"):
        alibi_effective_window(slopes, "0.1")
    with pytest.raises(ValueError, match=r"slopes must all be > 0 .*got \[0.5, 0.0\]"):
        alibi_effective_window(torch.tensor([0.5, 0.0], device=device))
    with pytest.raises(TypeError, match=r"slopes must be a floating-point tensor, got dtype torch.int64"):
        alibi_effective_window(torch.ones(4, dtype=torch.long, device=device))


def test_symmetric_must_be_a_bool(device):
    with pytest.raises(TypeError, match=r"symmetric must be a bool, got 1$"):
        alibi_bias(3, 3, alibi_slopes(2, device=device), symmetric=1)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(slopes=torch.ones(3)), ValueError, r"slopes must have one entry per head \(2\), got 3$"),
        (dict(slopes=torch.ones(1)), ValueError, r"slopes must have one entry per head \(2\), got 1$"),
        (
            dict(slopes=torch.ones(2, dtype=torch.long)),
            TypeError,
            r"slopes must be a floating-point tensor, got dtype torch.int64$",
        ),
        (dict(slopes=torch.ones(1, 2)), ValueError, r"slopes must have 1 dimensions, got shape \(1, 2\)$"),
        (dict(slopes=[0.5, 0.25]), TypeError, r"slopes must be a torch.Tensor, got list$"),
        (dict(n_heads=0), ValueError, r"n_heads must be an int >= 1, got 0$"),
        (dict(n_heads=2.0), TypeError, r"n_heads must be an int, got 2.0 of type float$"),
    ],
)
def test_module_rejects_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ALiBi(**({"n_heads": 2} | kwargs))
