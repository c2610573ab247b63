"""pebook.masking: the causal mask for queries that start at an offset (KV cache)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import causal_mask
from pebook.masking import query_positions


@pytest.mark.parametrize(
    "q_len,k_len,offset", [(4, 4, 0), (1, 6, 5), (3, 7, 4), (3, 7, 0), (5, 2, 0), (0, 3, 0), (2, 0, 1)]
)
def test_causal_mask_matches_reference(device, ref, q_len, k_len, offset):
    mask = causal_mask(q_len, k_len, offset, device=device)
    assert mask.dtype == torch.bool and mask.shape == (q_len, k_len) and mask.device.type == device.type
    assert torch.equal(mask.cpu(), ref.causal_mask(q_len, k_len, offset))


@given(q_len=st.integers(0, 12), k_len=st.integers(0, 12), offset=st.integers(0, 12))
def test_causal_mask_properties(device, ref, q_len, k_len, offset):
    mask = causal_mask(q_len, k_len, offset, device=device).cpu()
    assert torch.equal(mask, ref.causal_mask(q_len, k_len, offset))
    # offset consistency: the mask of queries starting at `offset` is the tail of the full mask
    full = causal_mask(offset + q_len, k_len, device=device).cpu()
    assert torch.equal(mask, full[offset:])
    # every query sees key 0 when there is one, and rows only gain keys
    if k_len and q_len:
        assert mask[:, 0].all()
        assert (mask.sum(1).diff() >= 0).all()


def test_query_positions(device):
    pos = query_positions(3, 5, device=device)
    assert pos.dtype == torch.int64 and pos.device.type == device.type
    assert pos.tolist() == [5, 6, 7]
    assert query_positions(0, 2, device=device).numel() == 0


def test_snapshot_kv_cache_mask(device):
    """Two new queries after two cached tokens (k_len = 4, offset = 2), written out by hand."""
    expected = [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(2, 4, 2, device=device).tolist() == expected
    assert causal_mask(3, 3, device=device).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((-1, 3, 0), r"q_len must be an int >= 0, got -1$"),
        ((2, -4, 0), r"k_len must be an int >= 0, got -4$"),
        ((2, 3, -1), r"offset must be an int >= 0, got -1$"),
    ],
)
def test_negative_arguments_are_rejected(device, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        causal_mask(*args, device=device)


def test_bools_are_not_ints(device):
    with pytest.raises(TypeError, match=r"k_len must be an int, got True of type bool"):
        causal_mask(2, True, device=device)
    with pytest.raises(TypeError, match=r"q_len must be an int, got False of type bool"):
        query_positions(False, device=device)
