"""pebook.vision_tables: ViT's learned table resampled to a new patch grid, MAE's fixed 2-D sin-cos table.

References (this module, float64, never calling pebook):

* ``mae_ref`` writes MAE's table (He et al. 2022, ``util/pos_embed.py``) element by element in Python
  floats: patch ``(r, c)`` is row ``r·W + c``; with ``ω_i = base^(-i/(D/4))`` each half is
  ``[sin(p ω_i)]_i ++ [cos(p ω_i)]_i``, the first half for ``p = c`` (MAE's ``meshgrid(grid_w, grid_h)``)
  or ``p = r`` (``order="hw"``). Checked as well against ``transformers`` 5.24's own builders:
  ``build_2d_sinusoidal_position_embedding`` (``[h | w]``) and ``ViTMAEEmbeddings.initialize_weights``
  (``[w | h]``, the layout of MAE's released weights).
* ``resample_ref`` resamples the ``H × W`` grid of patch rows separably, row by row and column by
  column, from the definitions: output index ``j`` reads the input at ``u = (j + 1/2)·in/out - 1/2``
  (``align_corners=False``; ``u = j·(in-1)/(out-1)`` with ``align_corners=True``); bilinear clamps
  ``u`` to ``[0, in-1]`` and mixes the two neighbours; bicubic takes the four neighbours
  ``⌊u⌋-1 … ⌊u⌋+2`` (indices clamped to the border) with Keys' cubic-convolution weights for
  ``a = -0.75``, ``W(s) = (a+2)|s|³ - (a+3)|s|² + 1`` for ``|s| ≤ 1`` and ``a|s|³ - 5a|s|² + 8a|s| - 4a``
  for ``1 < |s| < 2``. Checked as well against ``transformers``' ``ViTEmbeddings.interpolate_pos_encoding``
  (DeiT/DINO's bicubic resampling).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook.vision_tables import mae_sincos_2d, resample_position_table

F64 = torch.float64


# ---------------------------------------------------------------- references


def mae_ref(h: int, w: int, dim: int, base: float = 10000.0, order: str = "wh", cls_token: bool = False):
    quarter = dim // 4
    omega = [base ** (-i / quarter) for i in range(quarter)]
    rows = [[0.0] * dim] if cls_token else []
    for r in range(h):
        for c in range(w):
            first, second = (c, r) if order == "wh" else (r, c)
            row = []
            for p in (first, second):
                row += [math.sin(p * o) for o in omega] + [math.cos(p * o) for o in omega]
            rows.append(row)
    return torch.tensor(rows, dtype=F64)


def cubic_weight(s: float, a: float = -0.75) -> float:
    s = abs(s)
    if s <= 1:
        return (a + 2) * s**3 - (a + 3) * s**2 + 1
    if s < 2:
        return a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a
    return 0.0


def resample_1d_ref(values: list, n_out: int, mode: str, align_corners: bool, a: float = -0.75) -> list:
    """Resample a list of equal-length vectors along the list (one axis of the grid)."""
    n_in = len(values)
    out = []
    for j in range(n_out):
        if align_corners:
            u = j * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:
            u = (j + 0.5) * n_in / n_out - 0.5
        if mode == "bilinear":
            u = min(max(u, 0.0), n_in - 1)
            i0 = math.floor(u)
            i1, t = min(i0 + 1, n_in - 1), u - i0
            weights = {i0: 1 - t}
            weights[i1] = weights.get(i1, 0.0) + t
        else:
            i0 = math.floor(u)
            t = u - i0
            weights = {}
            for k in range(-1, 3):
                idx = min(max(i0 + k, 0), n_in - 1)
                weights[idx] = weights.get(idx, 0.0) + cubic_weight(k - t, a)
        out.append([sum(wt * values[i][f] for i, wt in weights.items()) for f in range(len(values[0]))])
    return out


def resample_ref(patches: torch.Tensor, old, new, mode="bicubic", align_corners=False, a=-0.75) -> torch.Tensor:
    """``(H·W, D)`` patch rows (raster order) resampled to ``(H'·W', D)``, float64, by explicit loops."""
    (h, w), (nh, nw) = old, new
    grid = patches.double().cpu().reshape(h, w, -1).tolist()
    rows_done = [resample_1d_ref(row, nw, mode, align_corners, a) for row in grid]  # along W: (h, nw, D)
    columns = [[rows_done[r][c] for r in range(h)] for c in range(nw)]
    cols_done = [resample_1d_ref(col, nh, mode, align_corners, a) for col in columns]  # along H: (nw, nh, D)
    out = [[cols_done[c][r] for c in range(nw)] for r in range(nh)]
    return torch.tensor(out, dtype=F64).reshape(nh * nw, -1)


def randn(*shape, seed, device, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- MAE's 2-D sin-cos table


@pytest.mark.parametrize("order", ["wh", "hw"])
@pytest.mark.parametrize("grid,dim", [((3, 5), 8), (4, 16), ((1, 7), 4), ((6, 2), 32)])
def test_mae_table_matches_reference(device, order, grid, dim):
    h, w = (grid, grid) if isinstance(grid, int) else grid
    table = mae_sincos_2d(grid, dim, order=order, dtype=F64, device=device)
    assert table.shape == (h * w, dim) and table.device.type == device.type
    torch.testing.assert_close(table.cpu(), mae_ref(h, w, dim, order=order), rtol=0, atol=1e-12)
    with_cls = mae_sincos_2d(grid, dim, order=order, cls_token=True, device=device)
    assert with_cls.dtype == torch.float32 and with_cls.shape == (h * w + 1, dim)
    assert with_cls[0].eq(0).all()  # MAE's class token row: zeros
    # float32: the float64 value rounded once
    torch.testing.assert_close(with_cls[1:].cpu(), table.cpu().float(), rtol=0, atol=0)


@pytest.mark.parametrize("h,w,dim", [(3, 5, 8), (4, 4, 16), (2, 7, 12)])
def test_mae_table_matches_transformers_builder(device, h, w, dim):
    vit_mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    expected = vit_mae.build_2d_sinusoidal_position_embedding(h, w, dim, cls_token=True, device=device, dtype=F64)
    ours = mae_sincos_2d((h, w), dim, order="hw", cls_token=True, dtype=F64, device=device)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-14)


def test_mae_default_order_is_the_released_weights_layout():
    """``transformers``' ViTMAE swaps the halves of its builder back to MAE's ``[w | h]`` for the
    pretrained weights; our default order is that layout (float32, both rounded once from float64)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

    config = transformers.ViTMAEConfig(image_size=20, patch_size=4, hidden_size=16, num_channels=3)
    embeddings = ViTMAEEmbeddings(config)
    embeddings.initialize_weights()
    table = embeddings.position_embeddings.detach()[0]
    torch.testing.assert_close(table, mae_sincos_2d(5, 16, cls_token=True), rtol=0, atol=0)


@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    dim=st.sampled_from([4, 8, 16]),
    base=st.sampled_from([10000.0, 100.0]),
    order=st.sampled_from(["wh", "hw"]),
)
def test_mae_dot_products_depend_on_the_2d_offset_only(h, w, dim, base, order):
    """Row · row = Σ_i cos(Δc ω_i) + Σ_i cos(Δr ω_i): the sin/cos halves are rotations (Vaswani §3.5)."""
    table = mae_sincos_2d((h, w), dim, base, order=order, dtype=F64)
    dots = table @ table.T
    omega = [base ** (-i / (dim // 4)) for i in range(dim // 4)]
    for n in range(h * w):
        for m in range(h * w):
            dr, dc = n // w - m // w, n % w - m % w
            expected = sum(math.cos(dc * o) + math.cos(dr * o) for o in omega)
            assert abs(dots[n, m].item() - expected) < 1e-12


def test_snapshot_mae_smallest_table(device):
    """dim 4, ω_0 = 1: patch (r, c) is [sin c, cos c, sin r, cos r] (MAE order)."""
    table = mae_sincos_2d((2, 2), 4, dtype=F64, device=device).cpu()
    s1, c1 = math.sin(1.0), math.cos(1.0)
    expected = torch.tensor(
        [[0, 1, 0, 1], [s1, c1, 0, 1], [0, 1, s1, c1], [s1, c1, s1, c1]],
        dtype=F64,
    )
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-15)


def test_mae_bad_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        mae_sincos_2d(3, 6)
    with pytest.raises(ValueError, match="order must be one of"):
        mae_sincos_2d(3, 8, order="xy")
    with pytest.raises(ValueError, match=r"\(height, width\) pair"):
        mae_sincos_2d((1, 2, 3), 8)
    with pytest.raises(ValueError, match="grid must be an int >= 1"):
        mae_sincos_2d(0, 8)
    with pytest.raises(TypeError, match="cls_token must be True or False"):
        mae_sincos_2d(2, 8, cls_token=1)
    with pytest.raises(ValueError, match="base must be a finite number > 1"):
        mae_sincos_2d(2, 8, 1.0)


# ---------------------------------------------------------------- resampling a learned table


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("old,new", [((4, 4), (6, 6)), ((3, 5), (7, 4)), ((6, 6), (4, 4)), ((2, 3), (2, 3))])
def test_resample_matches_reference(device, mode, align_corners, old, new):
    dim, prefix = 5, 1
    table = randn(prefix + old[0] * old[1], dim, seed=11, device=device)
    out = resample_position_table(table, old, new, mode=mode, align_corners=align_corners)
    assert out.shape == (prefix + new[0] * new[1], dim) and out.dtype == F64 and out.device.type == device.type
    assert out[:prefix].equal(table[:prefix])  # the class token's row is kept aside, unchanged
    expected = resample_ref(table[prefix:], old, new, mode, align_corners)
    torch.testing.assert_close(out[prefix:].cpu(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("new_hw", [(7, 7), (5, 9), (3, 3)])
def test_resample_matches_transformers_vit(device, new_hw):
    """transformers' ViTEmbeddings.interpolate_pos_encoding (after DINO/DeiT): bicubic, align_corners=False."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    config = transformers.ViTConfig(image_size=20, patch_size=4, hidden_size=6, num_channels=3)
    embeddings = ViTEmbeddings(config).to(device=device, dtype=F64)
    with torch.no_grad():
        embeddings.position_embeddings.copy_(randn(1, 26, 6, seed=12, device=device))
    nh, nw = new_hw
    dummy = torch.zeros(1, 1 + nh * nw, 6, dtype=F64, device=device)
    expected = embeddings.interpolate_pos_encoding(dummy, nh * 4, nw * 4).detach()
    ours = resample_position_table(embeddings.position_embeddings.detach(), 5, new_hw)
    assert ours.shape == expected.shape == (1, 1 + nh * nw, 6)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_resample_float32_is_rounded_once(device):
    table = randn(1 + 16, 8, seed=13, device=device, dtype=torch.float32)
    out = resample_position_table(table, 4, 6)
    assert out.dtype == torch.float32
    exact = resample_position_table(table.double(), 4, 6)
    torch.testing.assert_close(out, exact.float(), rtol=0, atol=0)


@given(
    old=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    new=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    mode=st.sampled_from(["bicubic", "bilinear"]),
    align_corners=st.booleans(),
    antialias=st.booleans(),
    prefix=st.integers(0, 2),
)
def test_resample_keeps_constant_tables_and_prefix(old, new, mode, align_corners, antialias, prefix):
    """The interpolation weights sum to one: a table equal on every patch stays equal (any mode)."""
    dim = 3
    head = randn(prefix, dim, seed=14, device="cpu")
    value = torch.tensor([0.5, -2.0, 3.0], dtype=F64)
    table = torch.cat((head, value.expand(old[0] * old[1], dim)))
    out = resample_position_table(
        table, old, new, n_prefix_tokens=prefix, mode=mode, align_corners=align_corners, antialias=antialias
    )
    assert out.shape == (prefix + new[0] * new[1], dim)
    assert out[:prefix].equal(head)
    torch.testing.assert_close(out[prefix:], value.expand(new[0] * new[1], dim), rtol=0, atol=1e-12)


def test_resample_same_grid_is_identity_and_antialias_matters(device):
    table = randn(1, 2 + 20, 4, seed=15, device=device)  # two prefix tokens (DeiT: class + distillation)
    same = resample_position_table(table, (4, 5), (4, 5), n_prefix_tokens=2)
    torch.testing.assert_close(same, table, rtol=0, atol=1e-12)
    plain = resample_position_table(table, (4, 5), (2, 2), n_prefix_tokens=2)
    smooth = resample_position_table(table, (4, 5), (2, 2), n_prefix_tokens=2, antialias=True)  # timm's default
    assert not torch.allclose(plain, smooth)


def test_antialias_upsampling_is_the_pil_cubic_inside_the_grid(device):
    """timm's antialias=True: when enlarging the grid, PyTorch's antialiased bicubic is Keys' kernel
    with a = -0.5 (PIL's) away from the border, where it renormalises the weights instead of
    repeating the edge rows."""
    old, new = (10, 10), (17, 17)
    table = randn(100, 2, seed=16, device=device)
    out = resample_position_table(table, old, new, n_prefix_tokens=0, antialias=True).cpu().reshape(17, 17, 2)
    expected = resample_ref(table, old, new, a=-0.5).reshape(17, 17, 2)
    torch.testing.assert_close(out[3:-3, 3:-3], expected[3:-3, 3:-3], rtol=0, atol=1e-12)
    assert not torch.allclose(out[3:-3, 3:-3], resample_ref(table, old, new).reshape(17, 17, 2)[3:-3, 3:-3])


def test_resample_bad_input():
    table = torch.zeros(17, 4)
    with pytest.raises(ValueError, match=r"table has 17 rows but n_prefix_tokens \+ height·width = 1 \+ 3·3"):
        resample_position_table(table, 3, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        resample_position_table(table, 4, 5, mode="nearest")
    with pytest.raises(ValueError, match=r"shape \(1, tokens, dim\)"):
        resample_position_table(torch.zeros(2, 17, 4), 4, 5)
    with pytest.raises(TypeError, match="floating-point tensor"):
        resample_position_table(torch.zeros(17, 4, dtype=torch.long), 4, 5)
    with pytest.raises(ValueError, match="new_grid must be an int >= 1"):
        resample_position_table(table, 4, 0)
    with pytest.raises(TypeError, match="align_corners must be True or False"):
        resample_position_table(table, 4, 5, align_corners=None)
