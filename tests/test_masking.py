"""pebook.masking: the causal mask (which keys a query sees) and default positions.

Two things place a token: its storage order (the causal mask follows it: the queries are the
last ``q_len`` of ``k_len`` keys) and its position id (what the encoding is told). Reference:
``ref.causal_mask`` (conftest), key j visible to the query at position offset + i iff j <= offset + i.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import causal_mask
from pebook.masking import default_positions, query_positions, storage_causal_mask


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


@pytest.mark.parametrize("q_len,k_len", [(4, 4), (1, 6), (3, 7), (0, 3), (0, 0), (1, 1)])
def test_storage_causal_mask_puts_the_queries_last(device, ref, q_len, k_len):
    mask = storage_causal_mask(q_len, k_len, device=device)
    assert mask.dtype == torch.bool and mask.shape == (q_len, k_len) and mask.device.type == device.type
    assert torch.equal(mask.cpu(), ref.causal_mask(q_len, k_len, k_len - q_len))


@given(q_len=st.integers(1, 10), past=st.integers(0, 10))
def test_storage_mask_of_new_queries_is_the_tail_of_the_full_mask(device, q_len, past):
    """Decoding q_len new tokens after `past` cached ones: the same rows as in the full square mask,
    and the last query sees every key."""
    k_len = past + q_len
    mask = storage_causal_mask(q_len, k_len, device=device)
    assert torch.equal(mask, storage_causal_mask(k_len, k_len, device=device)[past:])
    assert torch.equal(mask, causal_mask(q_len, k_len, past, device=device))
    assert mask[-1].all() and mask.sum(1).tolist() == list(range(past + 1, k_len + 1))


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


# ---------------------------------------------------------------- default_positions


def test_default_positions_continue_from_the_keys(device):
    """Keys at 0 … k_len - 1, queries the last q_len of them, one row per sequence, int64."""
    device = torch.empty(0, device=device).device  # pebook passes q.device, with its index (cuda:0)
    q_pos, k_pos = default_positions(2, 3, 5, device)
    assert q_pos.dtype == k_pos.dtype == torch.int64 and q_pos.device.type == device.type
    assert q_pos.tolist() == [[2, 3, 4]] * 2 and k_pos.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_given_positions_are_shared_or_per_sequence(device):
    shared = torch.tensor([7, 0, 9], dtype=torch.int32, device=device)
    per_sequence = torch.tensor([[4, 5], [0, 1]], device=device)
    device = shared.device  # pebook passes q.device, with its index (cuda:0)
    q_pos, k_pos = default_positions(2, 3, 2, device, shared, per_sequence)  # q_len > k_len is fine with ids
    assert q_pos.dtype == torch.int64 and q_pos.tolist() == [[7, 0, 9], [7, 0, 9]]
    assert torch.equal(k_pos, per_sequence)
    # only the queries given: the keys keep their default
    q_pos, k_pos = default_positions(2, 1, 4, device, torch.tensor([[3], [1]], device=device))
    assert q_pos.tolist() == [[3], [1]] and k_pos.tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        (
            (2, 5, 3, None),
            ValueError,
            r"without position_ids the queries are the last q_len keys, so q_len=5 must be <= k_len=3$",
        ),
        ((2, 3, 3, torch.arange(4)), ValueError, r"position_ids must have shape \(3,\) or \(2, 3\), got \(4,\)$"),
        ((2, 3, 3, torch.zeros(3, 3, dtype=torch.long)), ValueError, r"position_ids must have shape .* got \(3, 3\)$"),
        (
            (2, 3, 3, torch.zeros(2, 3, 1, dtype=torch.long)),
            ValueError,
            r"position_ids must have 1 or 2 dimensions, got shape \(2, 3, 1\)$",
        ),
        ((2, 3, 3, torch.tensor([0, -1, 2])), ValueError, r"position_ids must be >= 0, got a minimum of -1$"),
        ((2, 3, 3, torch.zeros(3)), TypeError, r"position_ids must be an integer tensor, got dtype torch.float32$"),
        (
            (2, 3, 3, torch.zeros(3, dtype=torch.bool)),
            TypeError,
            r"position_ids must be an integer tensor, got dtype torch.bool$",
        ),
        ((2, 3, 3, [0, 1, 2]), TypeError, r"position_ids must be a torch.Tensor, got list$"),
        (
            (2, 3, 3, None, torch.zeros(2, 4, dtype=torch.long)),
            ValueError,
            r"key_position_ids must have shape \(3,\) or \(2, 3\), got \(2, 4\)$",
        ),
        (
            (2, 3, 3, None, torch.tensor([[0, 1, 2], [0, -5, 2]])),
            ValueError,
            r"key_position_ids must be >= 0, got a minimum of -5$",
        ),
    ],
)
def test_bad_positions_are_rejected(args, error, pattern):
    batch, q_len, k_len, *ids = args
    with pytest.raises(error, match=pattern):
        default_positions(batch, q_len, k_len, "cpu", *ids)


@pytest.mark.cuda
def test_positions_on_another_device_are_rejected(cuda_device):
    cuda_device = torch.empty(0, device=cuda_device).device  # indexed, as q.device is when pebook calls it
    with pytest.raises(ValueError, match=r"position_ids is on cpu but the inputs are on cuda"):
        default_positions(1, 3, 3, cuda_device, torch.arange(3))
    # negative ids on a GPU are not checked (that would synchronise with the host)
    q_pos, _ = default_positions(1, 2, 2, cuda_device, torch.tensor([-1, 0], device=cuda_device))
    assert q_pos.tolist() == [[-1, 0]]
