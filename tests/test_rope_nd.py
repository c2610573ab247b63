"""pebook.rope_nd: axial 2-D RoPE and RoPE-Mixed (Heo et al. 2024), M-RoPE (Qwen2-VL, Wang et al. 2024).

References (this module, float64, never calling pebook):

* ``rotate_ref`` multiplies feature pair ``i`` (``(2i, 2i+1)`` interleaved, ``(i, i + d/2)`` half),
  read as the complex number ``x_a + i x_b``, by ``e^{i φ_i}`` in Python complex arithmetic (RoFormer
  eq. 12), for explicitly listed angles ``φ_i``;
* the angles are written from the papers: axial ``φ_t = θ_t x``, ``φ_{d/4+t} = θ_t y`` with
  ``θ_t = base^(-t/(d/4))``; RoPE-Mixed ``φ_{h,i} = θ^x_{h,i} x + θ^y_{h,i} y``; M-RoPE
  ``φ_i = θ_i · (t, h or w)`` by the section of pair ``i``, ``θ_i = base^(-2i/d)``;
* the score property: on a patch grid, ``⟨f(q, p), f(k, p')⟩`` equals the relative formula
  ``Re Σ_i q^(i) conj(k^(i)) e^{i φ_i(p - p')}`` and is the same for every pair of positions with the
  same offset.

External implementations, called, not copied (``transformers`` 5.24, pinned; tiny configs built
here, nothing downloaded): ``Qwen2VLModel.get_rope_index`` (M-RoPE positions),
``Qwen2VLRotaryEmbedding`` + ``apply_rotary_pos_emb`` (the sectioned rotation of the language
model), ``Qwen2VLVisionRotaryEmbedding`` + ``apply_rotary_pos_emb_vision`` (axial 2-D RoPE in
Qwen2-VL's vision encoder, half layout, rows first). The M-RoPE positions are also checked on
worked examples written out by hand.
"""

import cmath
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook.rope import apply_rope, rope_frequencies
from pebook.rope_nd import (
    DEFAULT_MROPE_SECTION,
    RoPEMixed,
    apply_axial_rope,
    apply_mrope,
    apply_rope_mixed,
    apply_sectioned_rope,
    axial_rope_frequencies,
    grid_positions,
    mrope_position_ids,
    rope_mixed_frequencies,
)

F64 = torch.float64
LAYOUTS = ["interleaved", "half"]
IMG = 99  # the image token id of the M-RoPE examples


def randn(*shape, seed, device, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- references


def pairs(dim: int, layout: str):
    if layout == "interleaved":
        return [(2 * i, 2 * i + 1) for i in range(dim // 2)]
    return [(i, i + dim // 2) for i in range(dim // 2)]


def rotate_ref(v, angles, layout):
    """One vector (list of floats) with pair i multiplied by e^{i angles[i]}."""
    out = list(v)
    for phi, (a, b) in zip(angles, pairs(len(v), layout)):
        z = complex(v[a], v[b]) * cmath.exp(1j * phi)
        out[a], out[b] = z.real, z.imag
    return out


def axial_angles(x: float, y: float, dim: int, base: float):
    theta = [base ** (-t / (dim // 4)) for t in range(dim // 4)]
    return [th * x for th in theta] + [th * y for th in theta]


def mixed_angles(x: float, y: float, fx, fy):
    return [a * x + b * y for a, b in zip(fx, fy)]


def mrope_angles(t: float, h: float, w: float, dim: int, base: float, section):
    theta = [base ** (-2 * i / dim) for i in range(dim // 2)]
    axis = [s for s, n in enumerate(section) for _ in range(n)]
    return [th * (t, h, w)[axis[i]] for i, th in enumerate(theta)]


def score_formula(q, k, angle_offset, layout):
    """Re Σ_i q^(i) conj(k^(i)) e^{i φ_i(p - p')}: the score written with the offset only."""
    total = 0j
    for phi, (a, b) in zip(angle_offset, pairs(len(q), layout)):
        total += complex(q[a], q[b]) * complex(k[a], k[b]).conjugate() * cmath.exp(1j * phi)
    return total.real


def rotate_rows_ref(x, angle_rows, layout):
    """x (..., seq, d) float64; angle_rows[n] the angles of token n (or [head][n] if nested per head)."""
    flat = x.double().cpu()
    out = torch.empty_like(flat)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in flat.shape[:-1]]).reshape(-1, flat.dim() - 1):
        idx = tuple(idx.tolist())
        out[idx] = torch.tensor(rotate_ref(flat[idx].tolist(), angle_rows(idx), layout), dtype=F64)
    return out


# ---------------------------------------------------------------- grid and frequencies


def test_grid_positions_raster_order(device):
    pos = grid_positions(2, 3, device=device)
    assert pos.dtype == torch.long and pos.device.type == device.type
    assert pos.cpu().tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]]  # (x = column, y = row)


@pytest.mark.parametrize("dim,base", [(4, 100.0), (16, 100.0), (64, 10.0)])
def test_axial_frequencies(device, dim, base):
    f = axial_rope_frequencies(dim, base, dtype=F64, device=device)
    expected = torch.tensor([base ** (-t / (dim // 4)) for t in range(dim // 4)], dtype=F64)
    torch.testing.assert_close(f.cpu(), expected, rtol=1e-15, atol=0)
    assert axial_rope_frequencies(dim, base, device=device).dtype == torch.float32


def test_snapshot_axial_frequencies():
    """rope-vit's axial default: theta=100, head_dim 64 → 100^(-t/16)."""
    f = axial_rope_frequencies(64, dtype=F64)
    assert f.shape == (16,) and f[0] == 1.0
    assert f[8].item() == pytest.approx(0.1, rel=1e-15)
    assert f[-1].item() == pytest.approx(100 ** (-15 / 16), rel=1e-15)


# ---------------------------------------------------------------- axial 2-D RoPE


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,grid", [((2, 3, 6, 8), (2, 3)), ((12, 16), (4, 3)), ((1, 1, 4, 4), (1, 4))])
def test_axial_matches_reference(device, layout, shape, grid):
    dim, base = shape[-1], 100.0
    x = randn(*shape, seed=1, device=device)
    pos = grid_positions(*grid, device=device)
    out = apply_axial_rope(x, pos, axial_rope_frequencies(dim, base, dtype=F64, device=device), layout)
    assert out.shape == x.shape and out.dtype == F64 and out.device.type == device.type
    p = pos.cpu().tolist()
    expected = rotate_rows_ref(x, lambda idx: axial_angles(p[0][idx[-1]], p[1][idx[-1]], dim, base), layout)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_axial_float32_and_batched_positions(device, layout):
    tol = dict(rtol=1e-5, atol=1e-5) if device.type == "cpu" else dict(rtol=5e-5, atol=5e-5)
    x = randn(2, 3, 6, 16, seed=2, device=device)
    pos = torch.stack((grid_positions(2, 3), grid_positions(3, 2).flip(0) + 1), dim=1).to(device)  # (2, batch, seq)
    f = axial_rope_frequencies(16, dtype=F64, device=device)
    out = apply_axial_rope(x, pos, f, layout)
    for b in range(2):
        torch.testing.assert_close(out[b], apply_axial_rope(x[b], pos[:, b], f, layout), rtol=0, atol=1e-13)
    out32 = apply_axial_rope(x.float(), pos, f.float(), layout)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, **tol)


def test_axial_matches_qwen2_vl_vision_encoder(device):
    """Qwen2-VL's ViT: inv_freq over head_dim/2, cos = cat(θh, θw, θh, θw), rotate_half: our half
    layout with positions (row, column)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLVisionRotaryEmbedding,
        apply_rotary_pos_emb_vision,
    )

    config = transformers.Qwen2VLConfig(vision_config=dict(depth=1, embed_dim=32, num_heads=2)).vision_config
    rotary = Qwen2VLVisionRotaryEmbedding(config).to(device)
    head_dim = 16
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    hw = torch.stack((rows.flatten(), cols.flatten()), dim=-1).to(device)  # (seq, 2): transformers' layout
    cos, sin = rotary(torch.zeros(1, device=device), hw)
    q = randn(12, 2, head_dim, seed=3, device=device, dtype=torch.float32)  # (seq, heads, head_dim)
    expected, _ = apply_rotary_pos_emb_vision(q, q, cos, sin)
    inv_freq = axial_rope_frequencies(head_dim, 10000.0, device=device)
    torch.testing.assert_close(rotary.inv_freq, inv_freq, rtol=1e-6, atol=0)
    ours = apply_axial_rope(q.transpose(0, 1), hw.T, inv_freq, "half").transpose(0, 1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- RoPE-Mixed


def test_mixed_frequencies_formula(device):
    angles = torch.tensor([0.0, 0.3, 2.0], dtype=F64)
    f = rope_mixed_frequencies(8, 3, 10.0, angles=angles, dtype=F64, device=device)
    assert f.shape == (2, 3, 4) and f.device.type == device.type
    theta = [10.0 ** (-t / 2) for t in range(2)]
    for h, a in enumerate(angles.tolist()):
        fx = [th * math.cos(a) for th in theta] + [th * math.cos(a + math.pi / 2) for th in theta]
        fy = [th * math.sin(a) for th in theta] + [th * math.sin(a + math.pi / 2) for th in theta]
        torch.testing.assert_close(f[0, h].cpu(), torch.tensor(fx, dtype=F64), rtol=0, atol=1e-15)
        torch.testing.assert_close(f[1, h].cpu(), torch.tensor(fy, dtype=F64), rtol=0, atol=1e-15)
    gen = torch.Generator().manual_seed(0)
    drawn = rope_mixed_frequencies(8, 5, generator=gen)
    assert drawn.dtype == torch.float32
    # every head's two halves have the magnitudes θ_t and perpendicular directions
    norms = drawn.double().pow(2).sum(0).sqrt()
    torch.testing.assert_close(norms, torch.tensor([1.0, 10**-0.5] * 2, dtype=F64).expand(5, 4), rtol=1e-6, atol=0)
    dots = (drawn[0, :, :2] * drawn[0, :, 2:] + drawn[1, :, :2] * drawn[1, :, 2:]).double()
    torch.testing.assert_close(dots, torch.zeros_like(dots), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_matches_reference(device, layout):
    heads, dim = 3, 8
    x = randn(2, heads, 6, dim, seed=4, device=device)
    pos = grid_positions(2, 3, device=device)
    freqs = randn(2, heads, dim // 2, seed=5, device=device)  # any learned values
    out = apply_rope_mixed(x, pos, freqs, layout)
    assert out.shape == x.shape and out.dtype == F64 and out.device.type == device.type
    p, f = pos.cpu().tolist(), freqs.cpu().tolist()
    expected = rotate_rows_ref(
        x, lambda idx: mixed_angles(p[0][idx[-1]], p[1][idx[-1]], f[0][idx[-2]], f[1][idx[-2]]), layout
    )
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-12)
    tol = dict(rtol=1e-5, atol=1e-5) if device.type == "cpu" else dict(rtol=5e-5, atol=5e-5)
    out32 = apply_rope_mixed(x.float(), pos, freqs.float(), layout)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double().cpu(), expected, **tol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_with_zero_directions_is_axial(device, layout):
    x = randn(2, 4, 12, 16, seed=6, device=device)
    pos = grid_positions(3, 4, device=device)
    freqs = rope_mixed_frequencies(16, 4, 100.0, angles=torch.zeros(4, dtype=F64), dtype=F64, device=device)
    axial = apply_axial_rope(x, pos, axial_rope_frequencies(16, 100.0, dtype=F64, device=device), layout)
    torch.testing.assert_close(apply_rope_mixed(x, pos, freqs, layout), axial, rtol=0, atol=1e-13)


def test_mixed_sees_diagonals(device):
    """With direction α = π/4, the first d/4 pairs turn with (x + y)/√2: moving along the other
    diagonal (Δx, Δy) = (1, -1) leaves them unchanged, which no axial pair can do (each axial pair
    turns with x or with y alone)."""
    freqs = rope_mixed_frequencies(8, 1, angles=torch.tensor([math.pi / 4], dtype=F64), dtype=F64, device=device)
    x = randn(1, 2, 8, seed=7, device=device).expand(1, 2, 8).contiguous()
    x[0, 1] = x[0, 0]
    pos = torch.tensor([[3, 4], [5, 4]], device=device)  # (3, 5) and (4, 4): offset (1, -1)
    out = apply_rope_mixed(x, pos, freqs)
    torch.testing.assert_close(out[0, 0, :4], out[0, 1, :4], rtol=0, atol=1e-13)  # pairs 0, 1: interleaved
    assert not torch.allclose(out[0, 0, 4:], out[0, 1, 4:])


def test_rope_mixed_module_learns_its_frequencies(device):
    gen = torch.Generator().manual_seed(1)
    module = RoPEMixed(head_dim=8, n_heads=2, generator=gen).to(device)
    assert module.freqs.shape == (2, 2, 4) and module.freqs.requires_grad
    assert "head_dim=8, n_heads=2, base=10" in repr(module)
    x = randn(1, 2, 4, 8, seed=8, device=device, dtype=torch.float32)
    pos = grid_positions(2, 2, device=device)
    out = module(x, pos)
    torch.testing.assert_close(out, apply_rope_mixed(x, pos, module.freqs.detach()), rtol=0, atol=0)
    scores = out[0, :, 0] @ out[0, :, 3].T  # queries at (0, 0), keys at (1, 1)
    scores.sum().backward()
    assert module.freqs.grad is not None and module.freqs.grad.abs().sum() > 0


# ---------------------------------------------------------------- the score depends on (Δx, Δy) only


@given(
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    dim=st.sampled_from([4, 8, 16]),
    scheme=st.sampled_from(["axial", "mixed"]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_2d_score_depends_on_offset_only(h, w, dim, scheme, layout, seed):
    q, k = randn(dim, seed=seed, device="cpu"), randn(dim, seed=seed + 1, device="cpu")
    pos = grid_positions(h, w)
    n = h * w
    if scheme == "axial":
        f = axial_rope_frequencies(dim, dtype=F64)
        rot = lambda v: apply_axial_rope(v.expand(n, dim), pos, f, layout)  # noqa: E731
        angles = lambda dx, dy: axial_angles(dx, dy, dim, 100.0)  # noqa: E731
    else:
        freqs = randn(2, 1, dim // 2, seed=seed + 2, device="cpu")
        rot = lambda v: apply_rope_mixed(v.expand(1, n, dim), pos, freqs, layout)[0]  # noqa: E731
        angles = lambda dx, dy: mixed_angles(dx, dy, freqs[0, 0].tolist(), freqs[1, 0].tolist())  # noqa: E731
    scores = rot(q) @ rot(k).T  # (query token, key token)
    by_offset = {}
    for i in range(n):
        for j in range(n):
            dx, dy = int(pos[0, i] - pos[0, j]), int(pos[1, i] - pos[1, j])
            expected = score_formula(q.tolist(), k.tolist(), angles(dx, dy), layout)
            assert abs(scores[i, j].item() - expected) < 1e-10
            by_offset.setdefault((dx, dy), []).append(scores[i, j].item())
    for values in by_offset.values():  # same offset, same score, wherever the two patches are
        assert max(values) - min(values) < 1e-10


# ---------------------------------------------------------------- M-RoPE positions


def test_mrope_worked_example():
    """Text "a b c", an image of 4 × 6 patches (merged 2 × 2 → 2 × 3 tokens), text "d e".

    a b c at 0, 1, 2 on all three axes. The image starts at s = 3: t = 3 for all six tokens,
    h = 3 + row (3 3 3 4 4 4), w = 3 + column (3 4 5 3 4 5). Its largest position is 5, so "d e"
    continue at 6, 7. rope_deltas = 8 - 11 = -3: the next token (index 11) gets position 8.
    """
    ids = torch.tensor([1, 2, 3] + [IMG] * 6 + [4, 5])
    pos, deltas = mrope_position_ids(ids, torch.tensor([[1, 4, 6]]), image_token_id=IMG)
    assert pos.tolist() == [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],
    ]
    assert deltas.tolist() == [-3]


def test_mrope_worked_example_two_images_and_padding():
    """Row 0 (left-padded by 2): pad pad, "a", a 2×2-patch image (one merged token), then at once a
    4×2-patch image (2 × 1 tokens), "b".
      "a" 0; image 1 at s = 1: (1, 1, 1), s = 2; image 2 at s = 2: (2, 2, 2), (2, 3, 2), s = 4; "b" 4.
    Row 1: text only, five tokens 0 … 4 (M-RoPE is 1-D RoPE on text). Pads get 0, as transformers does.
    """
    ids = torch.tensor([[0, 0, 7, IMG, IMG, IMG, 8], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pos, deltas = mrope_position_ids(ids, torch.tensor([[1, 2, 2], [1, 4, 2]]), image_token_id=IMG, attention_mask=mask)
    assert pos[:, 0].tolist() == [[0, 0, 0, 1, 2, 2, 4], [0, 0, 0, 1, 2, 3, 4], [0, 0, 0, 1, 2, 2, 4]]
    assert pos[:, 1].tolist() == [list(range(7))] * 3
    assert deltas.tolist() == [5 - 5, 0]


def test_mrope_frames_move_the_next_position_by_the_longest_axis():
    """t = 4 frames of 2 × 2 patches (one merged token each): temporal ids s … s+3, so the text after
    continues at s + 4 (max + 1, the paper's rule; transformers 5.24 moves by max(h, w)/m = 1 instead)."""
    ids = torch.tensor([5, IMG, IMG, IMG, IMG, 6])
    pos, deltas = mrope_position_ids(ids, torch.tensor([[4, 2, 2]]), image_token_id=IMG)
    assert pos.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 1, 1, 1, 5], [0, 1, 1, 1, 1, 5]]
    assert deltas.tolist() == [0]


@pytest.fixture(scope="module")
def qwen2_vl():
    """A tiny Qwen2VLModel (random weights, nothing downloaded): only its get_rope_index is used."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=16,
            num_attention_heads=1,
            num_key_value_heads=1,
            num_hidden_layers=1,
            intermediate_size=16,
            vocab_size=128,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=1, spatial_merge_size=2, mlp_ratio=1),
    )
    return transformers.Qwen2VLModel(config).eval()


segment = st.one_of(
    st.tuples(st.just("text"), st.integers(1, 4)),
    st.tuples(st.just("image"), st.tuples(st.just(1), st.sampled_from([2, 4, 6]), st.sampled_from([2, 4, 6]))),
)


@given(rows=st.lists(st.lists(segment, min_size=1, max_size=5), min_size=1, max_size=3), left_pad=st.booleans())
def test_mrope_positions_match_transformers_get_rope_index(qwen2_vl, rows, left_pad):
    # transformers groups consecutive image tokens into one image: keep text between images there
    rows = [[s for i, s in enumerate(r) if not (s[0] == "image" and i and r[i - 1][0] == "image")] for r in rows]
    sequences, grids = [], []
    for r in rows:
        ids = []
        for kind, value in r:
            if kind == "text":
                ids += [1 + (len(ids) % 50)] * value
            else:
                grids.append(value)
                ids += [IMG] * (value[0] * value[1] * value[2] // 4)
        sequences.append(ids)
    length = max(map(len, sequences))
    pad = lambda s, v: ([v] * (length - len(s)) + s) if left_pad else (s + [v] * (length - len(s)))  # noqa: E731
    input_ids = torch.tensor([pad(s, 0) for s in sequences])
    mask = torch.tensor([pad([1] * len(s), 0) for s in sequences])
    grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    expected, expected_deltas = qwen2_vl.get_rope_index(
        input_ids, (input_ids == IMG).int(), image_grid_thw=grid_thw if grids else None, attention_mask=mask
    )
    pos, deltas = mrope_position_ids(
        input_ids, grid_thw if grids else None, image_token_id=IMG, spatial_merge_size=2, attention_mask=mask
    )
    assert pos.equal(expected)
    assert deltas.equal(expected_deltas.flatten())


def test_mrope_positions_device(device):
    ids = torch.tensor([[1, IMG, IMG, 2]], device=device)
    pos, deltas = mrope_position_ids(ids, torch.tensor([[1, 2, 4]]), image_token_id=IMG)
    assert pos.device.type == deltas.device.type == device.type
    assert pos[:, 0].cpu().tolist() == [[0, 1, 1, 3], [0, 1, 1, 3], [0, 1, 2, 3]]


def test_mrope_positions_bad_input():
    ids = torch.tensor([1, IMG, IMG, 2])
    with pytest.raises(ValueError, match="divisible by spatial_merge_size=2"):
        mrope_position_ids(ids, torch.tensor([[1, 3, 2]]), image_token_id=IMG)
    with pytest.raises(ValueError, match="image 0 needs 4"):
        mrope_position_ids(ids, torch.tensor([[1, 4, 4]]), image_token_id=IMG)
    with pytest.raises(ValueError, match="no image_grid_thw row is left"):
        mrope_position_ids(ids, None, image_token_id=IMG)
    with pytest.raises(ValueError, match="fewer images were found"):
        mrope_position_ids(ids, torch.tensor([[1, 2, 4], [1, 2, 2]]), image_token_id=IMG)
    with pytest.raises(ValueError, match=r"shape \(n_images, 3\)"):
        mrope_position_ids(ids, torch.tensor([[1, 2]]), image_token_id=IMG)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        mrope_position_ids(ids.float(), None, image_token_id=IMG)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        mrope_position_ids(ids, torch.tensor([[1, 2, 4]]), image_token_id=IMG, attention_mask=torch.ones(5))


# ---------------------------------------------------------------- M-RoPE rotation


def test_mrope_rotation_matches_reference(device):
    section, dim, base = (2, 3, 3), 16, 10000.0
    ids = torch.tensor([1, 2] + [IMG] * 6 + [3])
    pos, _ = mrope_position_ids(ids, torch.tensor([[1, 4, 6]]), image_token_id=IMG)
    x = randn(2, 2, 9, dim, seed=9, device=device)
    out = apply_mrope(x, pos.to(device), rope_frequencies(dim, base, dtype=F64, device=device), section)
    p = pos.tolist()
    expected = rotate_rows_ref(
        x, lambda idx: mrope_angles(p[0][idx[-1]], p[1][idx[-1]], p[2][idx[-1]], dim, base, section), "half"
    )
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-12)


def test_mrope_rotation_matches_transformers_qwen2_vl(device, qwen2_vl):
    """Qwen2VLRotaryEmbedding (cos/sin recomposed by mrope_section) + apply_rotary_pos_emb (rotate_half)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    rotary = Qwen2VLRotaryEmbedding(qwen2_vl.config.text_config).to(device)
    ids = torch.tensor([[1, 2] + [IMG] * 6 + [3, 4], [5] * 2 + [IMG] * 4 + [6] * 4])
    grids = torch.tensor([[1, 4, 6], [1, 2, 8]])
    pos, _ = mrope_position_ids(ids, grids, image_token_id=IMG)
    pos = pos.to(device)
    q = randn(2, 1, 10, 16, seed=10, device=device, dtype=torch.float32)  # (batch, heads, seq, head_dim)
    cos, sin = rotary(q, pos)
    expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
    ours = apply_mrope(q, pos, rope_frequencies(16, 10000.0, device=device), [2, 3, 3])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_mrope_on_text_is_1d_rope(device, dtype):
    """Equal temporal, height and width positions: every pair turns by m θ_i, exactly as apply_rope."""
    x = randn(2, 3, 7, 128, seed=11, device=device, dtype=dtype)
    m = torch.arange(100, 107, device=device)
    inv_freq = rope_frequencies(128, 1e6, device=device)
    out = apply_mrope(x, m.expand(3, 7), inv_freq, DEFAULT_MROPE_SECTION)
    assert out.dtype == dtype
    assert out.equal(apply_rope(x, m, inv_freq, "half"))


@given(seed=st.integers(0, 2**16), section=st.sampled_from([(1, 1, 2), (2, 3, 3), (4, 2, 2)]))
def test_mrope_score_depends_on_3d_offset_only(seed, section):
    dim = 2 * sum(section)
    q, k = randn(dim, seed=seed, device="cpu"), randn(dim, seed=seed + 1, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 20, (3, 6), generator=gen)
    shift = torch.randint(-5, 20, (3, 1), generator=gen)
    inv_freq = rope_frequencies(dim, dtype=F64)
    rot = lambda v, p: apply_mrope(v.expand(6, dim), p, inv_freq, section)  # noqa: E731
    scores = rot(q, pos) @ rot(k, pos).T
    torch.testing.assert_close(scores, rot(q, pos + shift + 5) @ rot(k, pos + shift + 5).T, rtol=0, atol=1e-10)
    i, j = 0, 1
    d = (pos[:, i] - pos[:, j]).tolist()
    expected = score_formula(q.tolist(), k.tolist(), mrope_angles(*d, dim, 10000.0, section), "half")
    assert abs(scores[i, j].item() - expected) < 1e-10


# ---------------------------------------------------------------- sectioned rotation: general cases and errors


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sectioned_partial_rotary_passes_the_rest(device, layout):
    x = randn(5, 12, seed=12, device=device)
    pos = torch.stack((torch.arange(5), torch.arange(5) * 2)).to(device)
    inv_freq = rope_frequencies(8, dtype=F64, device=device)
    out = apply_sectioned_rope(x, pos, inv_freq, (1, 3), layout, rotary_dim=8)
    assert out[:, 8:].equal(x[:, 8:])
    p = pos.cpu().tolist()
    theta = inv_freq.tolist()
    expected = rotate_rows_ref(
        x[:, :8], lambda idx: [theta[i] * p[0 if i < 1 else 1][idx[-1]] for i in range(4)], layout
    )
    torch.testing.assert_close(out[:, :8].cpu(), expected, rtol=0, atol=1e-12)


def test_rope_nd_bad_input(device):
    x = torch.zeros(2, 3, 6, 8, device=device)
    pos = grid_positions(2, 3, device=device)
    f = axial_rope_frequencies(8, device=device)
    with pytest.raises(ValueError, match="divisible by 4"):
        axial_rope_frequencies(6)
    with pytest.raises(ValueError, match=r"positions must have shape \(2, seq\) or \(2, batch, seq\)"):
        apply_axial_rope(x, pos[0], f)
    with pytest.raises(ValueError, match="positions has 5 entries but x has seq=6"):
        apply_axial_rope(x, pos[:, :5], f)
    with pytest.raises(ValueError, match=r"sections \[1, 2\] must add up to the 4 rotary pairs"):
        apply_sectioned_rope(x, pos, rope_frequencies(8, device=device), (1, 2))
    with pytest.raises(ValueError, match="layout must be one of"):
        apply_sectioned_rope(x, pos, rope_frequencies(8, device=device), (2, 2), "complex")
    with pytest.raises(ValueError, match="mrope_section must be three counts"):
        apply_mrope(x, pos, rope_frequencies(8, device=device), (2, 2))
    with pytest.raises(ValueError, match=r"freqs must have shape \(2, heads, head_dim/2\) = \(2, 3, 4\)"):
        apply_rope_mixed(x, pos, torch.zeros(2, 2, 4, device=device))
    with pytest.raises(ValueError, match=r"positions must have shape \(2, seq\) = \(2, 6\)"):
        apply_rope_mixed(x, pos[:, :4], torch.zeros(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="angles must have one direction per head"):
        rope_mixed_frequencies(8, 3, angles=torch.zeros(2))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        apply_axial_rope(x.long(), pos, f)


def test_rope_nd_device_mismatch(cuda_device):
    x = torch.zeros(6, 8)
    with pytest.raises(ValueError, match="on the same device"):
        apply_axial_rope(x, grid_positions(2, 3, device=cuda_device), axial_rope_frequencies(8))
    with pytest.raises(ValueError, match="on the same device"):
        apply_rope_mixed(x[None], grid_positions(2, 3), torch.zeros(2, 1, 4, device=cuda_device))
