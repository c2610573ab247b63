"""pebook.none: no positional encoding (NoPE).

Without an encoding, attention is softmax(QKᵀ/√d) V (Vaswani et al. 2017, eq. 1): reference
``ref.attention`` (conftest). Its defining property is permutation equivariance (the motivation of
Vaswani et al. §3.5 for adding positions); under a causal mask a token's output depends on the
*set* of tokens before it, not on their order (Haviv et al. 2022, arXiv:2203.16634: position can
only be inferred from how many tokens are visible).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook

F64 = torch.float64


def layer(encoding="none", causal=True, seed=0):
    torch.manual_seed(seed)
    return pebook.MultiHeadAttention(16, 4, encoding, causal=causal).double()


# ---------------------------------------------------------------- (1) float64 reference


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk", [(5, 5), (2, 6), (1, 1)])
def test_attention_is_plain_softmax_attention(device, rand, ref, causal, lq, lk):
    q, k, v = rand(2, 3, lq, 8, seed=0, device=device), *(rand(2, 3, lk, 8, seed=s, device=device) for s in (1, 2))
    expected = ref.attention(q, k, v, causal=causal)
    for encoding in (pebook.NoPE(), None):
        out = pebook.positional_attention(q, k, v, encoding, causal=causal)
        assert out.shape == (2, 3, lq, 8) and out.device.type == device.type
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_position_ids_change_nothing(device, rand):
    """NoPE ignores positions: any position ids give the same attention."""
    q, k, v = (rand(2, 2, 4, 8, seed=s, device=device) for s in (3, 4, 5))
    plain = pebook.positional_attention(q, k, v, pebook.NoPE())
    ids = torch.tensor([[7, 0, 3, 3], [100, 2, 5, 1]], device=device)
    moved = pebook.positional_attention(q, k, v, pebook.NoPE(), position_ids=ids, key_position_ids=ids.flip(1))
    assert torch.equal(moved, plain)


def test_nothing_is_learned_and_nothing_is_stored():
    nope = pebook.NoPE()
    assert nope.place == "none" and nope.declared_parameters() == {} and nope.num_learned_parameters() == 0
    assert list(nope.parameters()) == [] and list(nope.buffers()) == []
    mha = pebook.MultiHeadAttention(16, 4, "none")
    # only the projections: qkv (16 -> 48) and out (16 -> 16), with biases
    assert sum(p.numel() for p in mha.parameters()) == 16 * 48 + 48 + 16 * 16 + 16


# ---------------------------------------------------------------- (2) properties


@given(seed=st.integers(0, 2**31 - 1), length=st.integers(2, 7), data=st.data())
def test_bidirectional_attention_is_permutation_equivariant(device, seed, length, data):
    """Permuting the tokens permutes the outputs, and nothing else happens (Vaswani §3.5)."""
    mha = layer(causal=False).to(device)
    x = torch.randn(2, length, 16, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device)
    perm = torch.tensor(data.draw(st.permutations(range(length)), label="perm"), device=device)
    with torch.no_grad():
        torch.testing.assert_close(mha(x[:, perm]), mha(x)[:, perm], rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1), length=st.integers(3, 8), data=st.data())
def test_causal_output_sees_the_set_of_earlier_tokens_not_their_order(device, seed, length, data):
    """Reordering the tokens before the last one leaves the last output unchanged with NoPE
    (Haviv et al. 2022), but not with a positional encoding (RoPE, as a control)."""
    x = torch.randn(1, length, 16, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device)
    perm = data.draw(st.permutations(range(length - 1)).filter(lambda p: list(p) != sorted(p)), label="perm")
    reordered = x[:, [*perm, length - 1]]
    nope, rope = layer().to(device), layer("rope").to(device)
    with torch.no_grad():
        torch.testing.assert_close(nope(reordered)[:, -1], nope(x)[:, -1], rtol=1e-12, atol=1e-12)
        assert (rope(reordered)[:, -1] - rope(x)[:, -1]).abs().max() > 1e-6


# ---------------------------------------------------------------- (3) frozen snapshot


def test_snapshot_hand_computed_attention(device):
    """One query q = (1, 0) over keys (1, 0), (0, 1) with values (1, 2), (3, 4), d = 2, no mask:
    logits (1/√2, 0), weights (σ, 1 - σ) with σ = 1/(1 + e^{-1/√2}) = 0.669761..., output
    σ·(1, 2) + (1 - σ)·(3, 4) = (1.660477..., 2.660477...)."""
    t = lambda rows: torch.tensor(rows, dtype=F64, device=device)[None, None]  # noqa: E731
    out = pebook.positional_attention(t([[1, 0]]), t([[1, 0], [0, 1]]), t([[1, 2], [3, 4]]), causal=False)
    sigma = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    assert sigma == pytest.approx(0.669761, abs=1e-6)
    torch.testing.assert_close(out[0, 0, 0].cpu(), torch.tensor([1.660477, 2.660477], dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        out[0, 0, 0].cpu(), torch.tensor([3 - 2 * sigma, 4 - 2 * sigma], dtype=F64), rtol=0, atol=1e-15
    )


# ---------------------------------------------------------------- bad input


def test_nope_takes_no_options():
    with pytest.raises(TypeError, match=r"encoding='none' takes no option 'rope_base'; its options are none$"):
        pebook.MultiHeadAttention(16, 4, "none", rope_base=10000.0)
