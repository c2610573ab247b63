"""Absolute position tables for image patches: ViT's learned table at a new resolution, MAE's 2-D sin-cos.

A Vision Transformer cuts an ``H × W``-patch image into ``N = H·W`` patches, read in raster order
(row-major: patch ``(r, c)`` is token ``r·W + c``), and prepends a class token. Dosovitskiy et al.
(2021), "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
arXiv:2010.11929, eq. (1), add a learned 1-D table ``E_pos ∈ R^{(N+1)×D}`` to these tokens. A
table learned at one resolution has no row for the patches of another, so for fine-tuning at a
higher resolution (§3.2) they "perform 2D interpolation of the pre-trained position embeddings,
according to their location in the original image": the ``N`` patch rows are reshaped to an
``H × W × D`` image with ``D`` channels, resampled to ``H' × W'``, and flattened again; the class
token's row has no place on the grid and is kept as it is. :func:`resample_position_table` does
that, with the conventions of the code people use:

* DeiT (Touvron et al. 2021, ``main.py``), MAE (``util/pos_embed.py: interpolate_pos_embed``) and
  ``transformers``' ViT (``ViTEmbeddings.interpolate_pos_encoding``): bicubic,
  ``align_corners=False``, no antialiasing: the defaults here;
* timm's ``resample_abs_pos_embed``: bicubic with ``antialias=True`` (``antialias=True`` here);
* the original ViT code (``scipy.ndimage.zoom(..., order=1)``): bilinear with the grid's corner
  patches mapped onto each other (``mode="bilinear", align_corners=True``).

MAE (He, Chen, Xie, Li, Dollár & Girshick 2022, "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022, arXiv:2111.06377) uses a fixed 2-D sin-cos table instead
(:func:`mae_sincos_2d`): half of the ``D`` features encode one grid coordinate and half the other,
each half a 1-D sinusoidal encoding (Vaswani et al. 2017, §3.5) of dimension ``D/2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_bool, check_float_dtype, check_float_tensor, check_int, check_positive_float
from .sinusoidal import sinusoidal_frequencies

__all__ = [
    "RESAMPLE_MODES",
    "MAE_ORDERS",
    "resample_position_table",
    "mae_sincos_2d",
]

RESAMPLE_MODES = ("bicubic", "bilinear")
MAE_ORDERS = ("wh", "hw")


def _grid(name: str, value) -> tuple[int, int]:
    """``value`` as a ``(height, width)`` pair of positive ints (an int ``n`` means ``(n, n)``)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
        return check_int(f"{name}[0]", value[0], minimum=1), check_int(f"{name}[1]", value[1], minimum=1)
    n = check_int(name, value, minimum=1)
    return n, n


def resample_position_table(
    table: torch.Tensor,
    old_grid,
    new_grid,
    *,
    n_prefix_tokens: int = 1,
    mode: str = "bicubic",
    align_corners: bool = False,
    antialias: bool = False,
) -> torch.Tensor:
    """A learned ViT position table, resampled from an ``old_grid`` of patches to a ``new_grid``.

    ``table`` is ``(n_prefix_tokens + H·W, D)`` or, as ViT checkpoints store it, ``(1,
    n_prefix_tokens + H·W, D)``: first the rows of the prefix tokens (the class token; DeiT's
    distillation token makes two), then one row per patch in raster order. ``old_grid`` and
    ``new_grid`` are ``(height, width)`` in patches (an int means a square grid). The prefix rows
    are returned unchanged; the patch rows are read as a ``D``-channel ``H × W`` image and resampled
    with :func:`torch.nn.functional.interpolate` to ``H' × W'``:

    * ``mode="bicubic"`` (default): Keys' cubic convolution with ``a = -0.75`` (PyTorch's and
      OpenCV's choice), border rows repeated;
    * ``mode="bilinear"``;
    * ``align_corners=False`` (default) places the patch centres of both grids on the same image:
      output patch ``j`` reads the input at ``(j + 1/2)·H/H' - 1/2``; ``align_corners=True`` maps
      the first and last patches onto each other, ``j·(H-1)/(H'-1)``;
    * ``antialias=True`` (timm's default) uses PyTorch's antialiased filter instead: PIL's cubic
      (``a = -0.5``), widened when the grid shrinks, its weights renormalised at the border.

    The defaults are those of DeiT, MAE and ``transformers``' ``ViTEmbeddings``. Computed in
    float64 and rounded once to ``table``'s dtype, on ``table``'s device; the result has ``table``'s
    number of dimensions, with ``n_prefix_tokens + H'·W'`` rows.
    """
    check_float_tensor("table", table, ndim=(2, 3))
    if table.dim() == 3 and table.shape[0] != 1:
        raise ValueError(f"a 3-D table must have shape (1, tokens, dim), got {tuple(table.shape)}")
    (h, w), (new_h, new_w) = _grid("old_grid", old_grid), _grid("new_grid", new_grid)
    n_prefix_tokens = check_int("n_prefix_tokens", n_prefix_tokens, minimum=0)
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
    check_bool("align_corners", align_corners)
    check_bool("antialias", antialias)
    rows = table.reshape(table.shape[-2], table.shape[-1])
    if rows.shape[0] != n_prefix_tokens + h * w:
        raise ValueError(
            f"table has {rows.shape[0]} rows but n_prefix_tokens + height·width = {n_prefix_tokens} + {h}·{w} = "
            f"{n_prefix_tokens + h * w} for old_grid=({h}, {w})"
        )
    prefix, patches = rows[:n_prefix_tokens], rows[n_prefix_tokens:]
    image = patches.to(torch.float64).T.reshape(1, -1, h, w)  # (1, D, H, W): features as channels
    resized = F.interpolate(image, size=(new_h, new_w), mode=mode, align_corners=align_corners, antialias=antialias)
    out = torch.cat((prefix, resized.reshape(-1, new_h * new_w).T.to(table.dtype)))
    return out.unsqueeze(0) if table.dim() == 3 else out


def mae_sincos_2d(
    grid,
    dim: int,
    base: float = 10000.0,
    *,
    order: str = "wh",
    cls_token: bool = False,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table: ``(H·W, dim)`` rows for an ``H × W`` patch grid in raster order.

    He et al. (2022), arXiv:2111.06377, ``util/pos_embed.py: get_2d_sincos_pos_embed``. With
    ``ω_i = base^(-i/(dim/4))`` for ``i = 0 … dim/4 - 1`` and the 1-D block

        e(p) = [sin(p ω_0), …, sin(p ω_{dim/4-1}), cos(p ω_0), …, cos(p ω_{dim/4-1})]   (dim/2 features)

    (Vaswani et al.'s encoding of dimension ``dim/2``, sines first instead of interleaved), the
    patch in row ``r`` and column ``c`` gets

    * ``order="wh"`` (default, MAE as released): ``[e(c) | e(r)]``. MAE's code meshes the grid as
      ``np.meshgrid(grid_w, grid_h)``, so the half its comments call ``emb_h`` holds the column;
      ``transformers``' ViTMAE keeps this layout for the pretrained weights;
    * ``order="hw"``: ``[e(r) | e(c)]``, ``transformers``' ``build_2d_sinusoidal_position_embedding``.

    ``grid`` is ``H`` (square) or ``(H, W)``; ``dim`` a multiple of 4. ``cls_token=True`` prepends
    MAE's all-zero row for the class token. Because ``sin``/``cos`` pairs rotate, the dot product of
    two rows is ``Σ_i cos(Δc ω_i) + Σ_i cos(Δr ω_i)``: it depends on the offset ``(Δr, Δc)`` only.
    Computed in float64, rounded once to ``dtype``.
    """
    h, w = _grid("grid", grid)
    dim = check_int("dim", dim, minimum=4)
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 (sin and cos of two coordinates), got {dim}")
    base = check_positive_float("base", base, greater_than=1.0)
    if order not in MAE_ORDERS:
        raise ValueError(f"order must be one of {MAE_ORDERS} (first half: column 'w' or row 'h'), got {order!r}")
    check_bool("cls_token", cls_token)
    check_float_dtype("dtype", dtype)
    omega = sinusoidal_frequencies(dim // 2, base, device=device)  # base^(-2i/(dim/2)) = base^(-i/(dim/4))
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)  # raster order: r = t // W
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)  # c = t % W

    def block(p: torch.Tensor) -> torch.Tensor:
        angles = p[:, None] * omega
        return torch.cat((angles.sin(), angles.cos()), dim=-1)

    first, second = (cols, rows) if order == "wh" else (rows, cols)
    table = torch.cat((block(first), block(second)), dim=-1)
    if cls_token:
        table = torch.cat((table.new_zeros(1, dim), table))
    return table.to(dtype)
