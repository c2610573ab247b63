"""pebook.rope.rope_decay_bound: RoFormer's long-term-decay bound (Su et al. 2021, §3.4.3).

The float64 reference is written from the paper's definitions in Python complex arithmetic:
S_j = Σ_{k=0}^{j-1} e^{i r θ_k} (S_0 = 0) and the plotted "relative upper bound"
(1/(d/2)) Σ_{j=1}^{d/2} |S_j| of RoFormer Fig. 2, with θ_k = base^(-2k/d).
"""

import cmath
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import apply_rope, rope_frequencies
from pebook.rope import rope_decay_bound

F64 = torch.float64
dims = st.sampled_from([2, 4, 8, 16, 64, 128])


def decay_bound_ref(r: float, dim: int, base: float = 10000.0) -> float:
    """(1/(d/2)) Σ_{j=1}^{d/2} |S_j|, S_j = Σ_{k<j} e^{i r θ_k}, by explicit loops."""
    thetas = [base ** (-2 * k / dim) for k in range(dim // 2)]
    total, partial = 0.0, 0j
    for theta in thetas:
        partial += cmath.exp(1j * r * theta)  # S_{j} after adding term k = j - 1
        total += abs(partial)
    return total / (dim // 2)


# ---------------------------------------------------------------- (1) float64 reference


@pytest.mark.parametrize("dim,base", [(2, 10000.0), (8, 10000.0), (64, 10000.0), (128, 10000.0), (128, 500000.0), (6, 3.0)])
def test_matches_reference(device, dim, base):
    distances = torch.tensor([0, 1, 2, 3, 10, 57, 100, 1000, 4095, -7], device=device)
    got = rope_decay_bound(distances, dim, base)
    assert got.dtype == F64 and got.shape == distances.shape and got.device.type == device.type
    expected = torch.tensor([decay_bound_ref(float(r), dim, base) for r in distances.tolist()], dtype=F64)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_fractional_distances_and_any_shape(device):
    distances = torch.tensor([[0.5, 2.25], [10.0, 1e4]], dtype=F64, device=device)
    got = rope_decay_bound(distances, 16)
    assert got.shape == (2, 2)
    expected = torch.tensor([[decay_bound_ref(r, 16) for r in row] for row in distances.tolist()], dtype=F64)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)
    # float32 distances give the same float64 result (they are converted, not computed in float32)
    torch.testing.assert_close(rope_decay_bound(distances.float(), 16), got, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- (3) frozen snapshots


def test_snapshot_small_dims(device):
    """d = 2: one partial sum of modulus 1 at every distance. d = 4, base 10000: θ = (1, 0.01),
    so the bound is (|S_1| + |S_2|)/2 = (1 + |e^{ir} + e^{0.01 ir}|)/2 = (1 + 2|cos(0.495 r)|)/2."""
    r = torch.tensor([0.0, 1.0, 3.0, 100.0, math.pi / 0.99], dtype=F64, device=device)
    torch.testing.assert_close(rope_decay_bound(r, 2).cpu(), torch.ones(5, dtype=F64), rtol=0, atol=1e-15)
    expected = (1 + 2 * (0.495 * r.cpu()).cos().abs()) / 2
    torch.testing.assert_close(rope_decay_bound(r, 4).cpu(), expected, rtol=0, atol=1e-12)
    assert abs(rope_decay_bound(r, 4)[-1].item() - 0.5) < 1e-12  # S_2 = 0 at r = π / 0.99


def test_snapshot_roformer_curve(device):
    """d = 128, base 10000 (the chapter's figure): (d/2 + 1)/2 = 32.5 at r = 0, maximal there,
    decaying on the whole but not monotonically."""
    distances = torch.arange(0, 1025, device=device)
    bound = rope_decay_bound(distances, 128).cpu()
    assert bound[0].item() == pytest.approx(32.5, rel=1e-14)
    assert int(bound.argmax()) == 0
    torch.testing.assert_close(bound[[10, 100, 1000]], torch.tensor([17.9541, 10.2273, 4.4708], dtype=F64), rtol=0, atol=1e-4)
    assert bound[1000] < bound[0] / 6
    assert int((bound[1:] > bound[:-1]).sum()) > 100


# ---------------------------------------------------------------- (2) properties


@given(dim=dims, seed=st.integers(0, 2**31), r=st.integers(-20_000, 20_000))
def test_abel_bound_holds_for_rope_scores(device, dim, seed, r):
    """RoFormer eq. (37): |Σ_i h_i e^{i r θ_i}| ≤ max_i |h_{i+1} - h_i| · Σ_j |S_j| with
    h_i = q^(i) conj(k^(i)), h_{d/2} = 0; and Re Σ_i h_i e^{i r θ_i} is pebook's RoPE score."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(dim, generator=gen, dtype=F64).to(device) for _ in range(2))
    h = torch.view_as_complex(q.view(-1, 2)) * torch.view_as_complex(k.view(-1, 2)).conj()
    theta = rope_frequencies(dim, dtype=F64, device=device)
    total = (h * torch.polar(torch.ones_like(theta), r * theta)).sum()
    dh = torch.cat((h, h.new_zeros(1))).diff()
    bound = rope_decay_bound(torch.tensor([r], device=device), dim)[0]
    assert total.abs().item() <= dh.abs().max().item() * bound.item() * (dim // 2) * (1 + 1e-12) + 1e-12
    m, n = (r, 0) if r >= 0 else (0, -r)
    qm = apply_rope(q[None], torch.tensor([m], device=device), theta, "interleaved")[0]
    kn = apply_rope(k[None], torch.tensor([n], device=device), theta, "interleaved")[0]
    assert math.isclose((qm @ kn).item(), total.real.item(), abs_tol=1e-9 * (1 + q.norm().item() * k.norm().item()))


@given(dim=dims, r=st.floats(-1e5, 1e5, allow_nan=False), base=st.floats(1.5, 1e6))
def test_even_and_between_trivial_bounds(device, dim, r, base):
    """|S_j(-r)| = |conj S_j(r)| makes the bound even in r; 1 ≤ |S_1| and |S_j| ≤ j give
    1/(d/2) ≤ bound ≤ (d/2 + 1)/2 = bound(0)."""
    values = rope_decay_bound(torch.tensor([r, -r, 0.0], dtype=F64, device=device), dim, base).tolist()
    assert math.isclose(values[0], values[1], rel_tol=1e-12, abs_tol=1e-12)
    assert 1 / (dim // 2) - 1e-12 <= values[0] <= values[2] + 1e-12
    assert math.isclose(values[2], (dim // 2 + 1) / 2, rel_tol=1e-14)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_rejected(device):
    good = torch.arange(4, device=device)
    with pytest.raises(TypeError, match=r"distances must be a torch.Tensor of relative distances, got list"):
        rope_decay_bound([0, 1, 2], 8)
    with pytest.raises(TypeError, match=r"distances must be an integer or floating tensor, got dtype torch.bool"):
        rope_decay_bound(good > 1, 8)
    with pytest.raises(TypeError, match=r"distances must be an integer or floating tensor, got dtype torch.complex64"):
        rope_decay_bound(good.to(torch.complex64), 8)
    with pytest.raises(ValueError, match=r"dim must be even.*got 7$"):
        rope_decay_bound(good, 7)
    with pytest.raises(TypeError, match=r"dim must be an int, got 8.0"):
        rope_decay_bound(good, 8.0)
    with pytest.raises(ValueError, match=r"base must be a finite number > 1, got 1.0"):
        rope_decay_bound(good, 8, 1.0)
