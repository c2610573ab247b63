"""pebook.learned: a trainable (max_positions, dim) table (Gehring et al. 2017; BERT; GPT-2).

The "reference" for a lookup table is the table itself: forward(n, offset) must return exactly
rows offset … offset + n - 1 of ``weight``, and gradients must land on exactly those rows.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import LearnedPositionalEmbedding


def make(max_positions, dim, device, seed=0, **kwargs):
    torch.manual_seed(seed)
    return LearnedPositionalEmbedding(max_positions, dim, **kwargs).to(device)


@pytest.mark.parametrize("n,offset", [(5, 0), (3, 4), (8, 0), (0, 8), (1, 7)])
def test_forward_returns_the_rows_of_the_positions(device, n, offset):
    emb = make(8, 6, device)
    rows = emb(n, offset)
    assert rows.shape == (n, 6) and rows.device.type == device.type
    expected = torch.stack([emb.weight[p] for p in range(offset, offset + n)]) if n else emb.weight[:0]
    assert torch.equal(rows, expected)


@given(max_positions=st.integers(1, 40), data=st.data())
def test_gradient_reaches_exactly_the_rows_used(device, max_positions, data):
    n = data.draw(st.integers(0, max_positions), label="n")
    offset = data.draw(st.integers(0, max_positions - n), label="offset")
    emb = make(max_positions, 4, device).double()
    upstream = torch.arange(1.0, n * 4 + 1, dtype=torch.float64, device=device).reshape(n, 4)
    (emb(n, offset) * upstream).sum().backward()
    expected = torch.zeros(max_positions, 4, dtype=torch.float64, device=device)
    expected[offset : offset + n] = upstream
    if n == 0:
        assert emb.weight.grad is None or torch.equal(emb.weight.grad, expected)
    else:
        assert torch.equal(emb.weight.grad, expected)  # exact: a slice's backward copies the gradient


def test_parameter_count_and_init_scale(device):
    emb = make(512, 64, device, init_std=0.02)
    assert sum(p.numel() for p in emb.parameters()) == 512 * 64
    assert [name for name, _ in emb.named_parameters()] == ["weight"]
    # 32768 N(0, 0.02²) draws: the sample std is within 2 % of 0.02 with overwhelming probability
    # (relative standard error 1/sqrt(2·32768) ≈ 0.4 %); the seed is fixed anyway.
    assert emb.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(emb.weight.mean().item()) < 0.02 * 0.05


def test_extra_repr_names_the_sizes():
    assert "max_positions=16, dim=4" in repr(LearnedPositionalEmbedding(16, 4))


# ---------------------------------------------------------------- snapshots


def test_snapshot_published_table_sizes():
    """Published sizes: GPT-2 small's ``wpe`` is 1024 × 768 = 786 432 parameters (Radford et al.
    2019, model card), BERT-base's position table 512 × 768 = 393 216 (Devlin et al. 2019)."""
    gpt2 = LearnedPositionalEmbedding(1024, 768)
    bert = LearnedPositionalEmbedding(512, 768)
    assert gpt2.weight.numel() == 786_432 and tuple(gpt2.weight.shape) == (1024, 768)
    assert bert.weight.numel() == 393_216


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("n,offset,last", [(9, 0, 8), (1, 8, 8), (4, 6, 9), (100, 50, 149)])
def test_positions_beyond_the_table_raise_and_name_the_limit(device, n, offset, last):
    emb = make(8, 4, device)
    with pytest.raises(
        ValueError, match=rf"position {last} is beyond.*max_positions=8.*n_positions={n}.*offset={offset}"
    ):
        emb(n, offset)


def test_negative_arguments_are_rejected(device):
    emb = make(8, 4, device)
    with pytest.raises(ValueError, match=r"n_positions must be an int >= 0, got -1$"):
        emb(-1)
    with pytest.raises(ValueError, match=r"offset must be an int >= 0, got -2$"):
        emb(2, -2)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(max_positions=0, dim=4), r"max_positions must be an int >= 1, got 0$"),
        (dict(max_positions=-3, dim=4), r"max_positions must be an int >= 1, got -3$"),
        (dict(max_positions=4, dim=0), r"dim must be an int >= 1, got 0$"),
    ],
)
def test_bad_sizes_are_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LearnedPositionalEmbedding(**kwargs)


def test_bools_and_floats_are_not_ints(device):
    with pytest.raises(TypeError, match=r"max_positions must be an int, got True of type bool"):
        LearnedPositionalEmbedding(True, 4)
    emb = make(8, 4, device)
    with pytest.raises(TypeError, match=r"n_positions must be an int, got 2.0 of type float"):
        emb(2.0)
    with pytest.raises(TypeError, match=r"offset must be an int, got True of type bool"):
        emb(2, True)
