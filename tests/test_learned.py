"""pebook.learned: a trainable (max_positions, dim) table (Gehring et al. 2017; BERT; GPT-2).

The "reference" for a lookup table is the table itself: forward(n, offset) and
``LearnedPE.embed(position_ids)`` must return exactly the rows of ``weight`` at those positions,
and gradients must land on exactly those rows. ``learned_parameter_count`` is checked against the
size of the table and published model sizes.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook
from pebook import LearnedPE, LearnedPositionalEmbedding, learned_parameter_count


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


@pytest.mark.parametrize("init_std", [None, 0.01, 0.5])
def test_init_is_normal_with_the_given_std(init_std):
    """Rows start as N(0, init_std²), init_std = 0.02 (BERT's initializer_range) by default.
    262 144 draws with a fixed seed: the relative standard error of the sample std is
    1/sqrt(2·262144) ≈ 0.14 %, so the 2 % tolerance is 14 standard errors (and the seed is fixed)."""
    torch.manual_seed(0)
    options = {} if init_std is None else {"init_std": init_std}
    pe = LearnedPE(dim=64, max_positions=4096, **options)
    std = 0.02 if init_std is None else init_std
    weight = pe.table.weight.detach()
    assert pe.table.init_std == std
    assert weight.std().item() == pytest.approx(std, rel=0.02)
    assert abs(weight.mean().item()) < std * 0.01  # standard error of the mean: std / 512
    # Gaussian, not uniform: the fraction within one std is 68.3 % (uniform of that std: 57.7 %)
    assert (weight.abs() < std).double().mean().item() == pytest.approx(0.6827, abs=0.01)


def test_parameters_are_the_table(device):
    emb = make(512, 64, device)
    assert [name for name, _ in emb.named_parameters()] == ["weight"]
    pe = LearnedPE(dim=64, max_positions=512)
    assert pe.declared_parameters() == {"table.weight": ((512, 64), True)}
    assert pe.num_learned_parameters() == learned_parameter_count(512, 64) == 512 * 64


def test_extra_repr_names_the_sizes():
    assert "max_positions=16, dim=4, init_std=0.02" in repr(LearnedPositionalEmbedding(16, 4))


# ---------------------------------------------------------------- LearnedPE.embed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_embed_returns_the_rows_of_the_position_ids(device, dtype):
    torch.manual_seed(0)
    pe = LearnedPE(dim=6, max_positions=10).to(device)
    ids = torch.tensor([[0, 9, 3, 3], [5, 4, 0, 1]], device=device)
    out = pe.embed(ids, dtype)
    assert out.shape == (2, 4, 6) and out.dtype == dtype and out.device.type == device.type
    for b in range(2):
        for s in range(4):
            assert torch.equal(out[b, s], pe.table.weight[ids[b, s]].to(dtype))
    # the same rows as the table's forward for contiguous positions
    assert torch.equal(pe.embed(torch.arange(3, 8, device=device)[None], torch.float32)[0], pe.table(5, 3))


@given(max_positions=st.integers(1, 30), data=st.data())
def test_embed_gradient_counts_each_use_of_a_row(device, max_positions, data):
    """d(sum of embed)/d(row p) = number of times p occurs in position_ids (a repeated id accumulates)."""
    ids = data.draw(st.lists(st.integers(0, max_positions - 1), min_size=1, max_size=12), label="ids")
    pe = LearnedPE(dim=3, max_positions=max_positions).double().to(device)
    pe.embed(torch.tensor([ids], device=device), torch.float64).sum().backward()
    counts = torch.bincount(torch.tensor(ids), minlength=max_positions).double()
    assert torch.equal(pe.table.weight.grad.cpu(), counts[:, None].expand(max_positions, 3))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("n,offset,last", [(9, 0, 8), (1, 8, 8), (4, 6, 9), (100, 50, 149)])
def test_positions_beyond_the_table_raise_and_name_the_limit(device, n, offset, last):
    emb = make(8, 4, device)
    with pytest.raises(
        ValueError,
        match=rf"position {last} is beyond this learned table: it has max_positions=8 rows \(positions 0\.\.7\)\. "
        "A learned absolute embedding has no vector for unseen positions.$",
    ):
        emb(n, offset)


def test_check_positions_accepts_the_table_and_names_the_limit():
    pe = LearnedPE(dim=4, max_positions=8)
    pe.check_positions(7)  # the last row exists
    pe.check_positions(0)
    with pytest.raises(ValueError, match=r"position 8 is beyond this learned table: it has max_positions=8 rows"):
        pe.check_positions(8)
    with pytest.raises(ValueError, match=r"position 1000 is beyond .*\(positions 0\.\.7\)"):
        pe.check_positions(1000)
    # a model asks the encoding before running: the message reaches the caller of TinyLM
    model = pebook.TinyLM(10, 8, 1, 2, 8, encoding="learned")
    with pytest.raises(ValueError, match=r"position 8 is beyond this learned table: it has max_positions=8 rows"):
        model(torch.zeros(1, 9, dtype=torch.long))


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


@pytest.mark.parametrize(
    "init_std,error,pattern",
    [
        (0.0, ValueError, r"init_std must be a finite number > 0, got 0.0$"),
        (-0.02, ValueError, r"init_std must be a finite number > 0, got -0.02$"),
        (float("nan"), ValueError, r"init_std must be a finite number > 0, got nan$"),
        (float("inf"), ValueError, r"init_std must be a finite number > 0, got inf$"),
        (True, TypeError, r"init_std must be a real number, got True of type bool$"),
        ("0.02", TypeError, r"init_std must be a real number, got '0.02' of type str$"),
    ],
)
def test_bad_init_std_is_rejected(init_std, error, pattern):
    with pytest.raises(error, match=pattern):
        LearnedPositionalEmbedding(8, 4, init_std=init_std)
    with pytest.raises(error, match=pattern):
        LearnedPE(dim=4, max_positions=8, init_std=init_std)


def test_bools_and_floats_are_not_ints(device):
    with pytest.raises(TypeError, match=r"max_positions must be an int, got True of type bool"):
        LearnedPositionalEmbedding(True, 4)
    emb = make(8, 4, device)
    with pytest.raises(TypeError, match=r"n_positions must be an int, got 2.0 of type float"):
        emb(2.0)
    with pytest.raises(TypeError, match=r"offset must be an int, got True of type bool"):
        emb(2, True)


# ---------------------------------------------------------------- learned_parameter_count


@pytest.mark.parametrize(
    "max_positions,dim,expected",
    [(512, 768, 393_216), (512, 1024, 524_288), (1024, 768, 786_432), (1, 1, 1)],
    ids=["bert-base", "bert-large", "gpt2-small", "one"],
)
def test_parameter_count_snapshots(max_positions, dim, expected):
    """Published sizes: BERT-base's position table is 512 × 768 = 393 216 parameters (Devlin et
    al. 2019), GPT-2 small's ``wpe`` 1024 × 768 = 786 432 (Radford et al. 2019, model card)."""
    assert learned_parameter_count(max_positions, dim) == expected
    assert tuple(LearnedPositionalEmbedding(max_positions, dim).weight.shape) == (max_positions, dim)


@given(max_positions=st.integers(1, 300), dim=st.integers(1, 64))
def test_parameter_count_is_the_size_of_the_table(max_positions, dim):
    table = LearnedPositionalEmbedding(max_positions, dim)
    count = learned_parameter_count(max_positions, dim)
    assert count == sum(p.numel() for p in table.parameters()) == max_positions * dim
    assert isinstance(count, int)


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        ((0, 8), ValueError, r"max_positions must be an int >= 1, got 0$"),
        ((8, -2), ValueError, r"dim must be an int >= 1, got -2$"),
        ((8.0, 8), TypeError, r"max_positions must be an int, got 8.0 of type float"),
        ((8, True), TypeError, r"dim must be an int, got True of type bool"),
    ],
)
def test_parameter_count_rejects_bad_arguments(args, error, pattern):
    with pytest.raises(error, match=pattern):
        learned_parameter_count(*args)
