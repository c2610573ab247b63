"""pebook.alibi: Attention with Linear Biases (Press, Smith & Lewis 2022, §3).

References (conftest): ``ref.alibi_slopes`` is the authors' ``get_slopes`` (quoted verbatim),
``ref.alibi_bias`` the bias -m_h · (i - j) element by element.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import alibi_bias, alibi_slopes

F64 = torch.float64


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
