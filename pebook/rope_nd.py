"""Rotary position embedding in two and three dimensions: axial 2-D RoPE, RoPE-Mixed and M-RoPE.

RoPE (Su et al. 2021, :mod:`pebook.rope`) rotates feature pair ``i`` of a query or key by an
angle ``φ_i``; the score of a query with angles ``φ`` and a key with angles ``φ'`` is

    ⟨R(φ) q, R(φ') k⟩ = Re Σ_i q^(i) conj(k^(i)) e^{i (φ_i - φ'_i)}                     (*)

so it depends on the positions only through the differences ``φ_i - φ'_i``. In one dimension
``φ_i = m θ_i``. Any angle that is *linear* in a multi-dimensional position ``p`` keeps (*)
relative: ``φ_i(p) - φ_i(p') = φ_i(p - p')``. The three schemes here differ only in which linear
function each pair gets.

**Axial 2-D RoPE** (Heo, Park, Han & Yun 2024, "Rotary Position Embedding for Vision Transformer",
ECCV 2024, arXiv:2403.13298, §3, "axial frequency"; code ``naver-ai/rope-vit``): for a patch at
column ``x`` and row ``y`` of the grid, the first ``d/4`` pairs rotate with ``x`` and the last
``d/4`` with ``y``, with the same frequencies ``θ_t = base^(-t/(d/4))``, ``t < d/4`` (``base`` 100
for their ViTs):

    φ_t = θ_t · x,   φ_{d/4 + t} = θ_t · y.

**RoPE-Mixed** (same paper, "mixed learnable frequency"): every pair turns with both coordinates,

    φ_{h,i} = θ^x_{h,i} · x + θ^y_{h,i} · y,

with a learnable frequency vector ``(θ^x_{h,i}, θ^y_{h,i})`` per head ``h`` and pair ``i``, so a
head can respond to diagonal directions that the axial scheme cannot. The released code
initialises head ``h`` with a random direction ``α_h``: ``(θ^x, θ^y) = θ_t (cos α_h, sin α_h)`` for
the first ``d/4`` pairs and ``θ_t (cos(α_h + π/2), sin(α_h + π/2))`` for the rest (``base`` 10);
``α_h = 0`` gives axial RoPE back. Either way the score depends on ``(Δx, Δy)`` alone.

**M-RoPE** (Wang, Bai, Tan, Wang, Fan, Bai, … & Lin 2024, "Qwen2-VL: Enhancing Vision-Language
Model's Perception of the World at Any Resolution", arXiv:2409.12191, §2.1): the ``d/2`` pairs
of 1-D RoPE (``θ_i = base^(-2i/d)``) are split into consecutive temporal, height and width sections
(``mrope_section``, ``[16, 24, 24]`` for ``d = 128``); a token at ``(t, h, w)`` rotates the pairs of
each section by that coordinate. Text tokens get ``t = h = w = `` their 1-D position, which makes
M-RoPE equal to 1-D RoPE on text; :func:`mrope_position_ids` gives the positions of a mixed
text-image sequence.

All rotations here are :func:`pebook.rope.apply_rope`'s, applied to a subset of pairs or with
frequencies laid out per head; nothing rotates features by other code.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ._checks import (
    check_float_dtype,
    check_float_tensor,
    check_int,
    check_int_tensor,
    check_positive_float,
    check_same_placement,
)
from .rope import ROPE_LAYOUTS, _check_rope_inputs, _rotate, rope_frequencies, rope_layout_permutation

__all__ = [
    "DEFAULT_AXIAL_BASE",
    "DEFAULT_MIXED_BASE",
    "DEFAULT_MROPE_SECTION",
    "grid_positions",
    "axial_rope_frequencies",
    "apply_sectioned_rope",
    "apply_axial_rope",
    "rope_mixed_frequencies",
    "apply_rope_mixed",
    "RoPEMixed",
    "mrope_position_ids",
    "apply_mrope",
]

#: Heo et al. (2024): ``rope_theta`` 100 for axial RoPE and 10 for RoPE-Mixed in their ViTs.
DEFAULT_AXIAL_BASE = 100.0
DEFAULT_MIXED_BASE = 10.0
#: Qwen2-VL's ``rope_scaling.mrope_section`` for ``head_dim = 128``: 16 temporal, 24 height, 24 width pairs.
DEFAULT_MROPE_SECTION = (16, 24, 24)


def grid_positions(height: int, width: int, *, device=None) -> torch.Tensor:
    """The ``(2, height·width)`` int64 coordinates ``(x, y)`` = (column, row) of a patch grid in raster order.

    Token ``n = y·width + x``, as rope-vit's ``init_t_xy`` (``t_x = n % width``, ``t_y = n // width``).
    """
    height = check_int("height", height, minimum=1)
    width = check_int("width", width, minimum=1)
    n = torch.arange(height * width, device=device)
    return torch.stack((n % width, n // width))


def axial_rope_frequencies(
    head_dim: int, base: float = DEFAULT_AXIAL_BASE, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """The ``head_dim/4`` frequencies ``θ_t = base^(-t/(head_dim/4))`` shared by both axes of axial RoPE.

    The 1-D frequencies of a quarter as many pairs: :func:`pebook.rope_frequencies` ``(head_dim/2, base)``.
    """
    head_dim = check_int("head_dim", head_dim, minimum=4)
    if head_dim % 4:
        raise ValueError(f"axial 2-D RoPE needs head_dim divisible by 4 (pairs for x and for y), got {head_dim}")
    return rope_frequencies(head_dim // 2, base, dtype=dtype, device=device)


def _check_axis_positions(x, positions, n_axes: int | None, inv_freq, rotary_dim) -> int:
    """Validate ``positions`` ``(n_axes, seq)`` or ``(n_axes, batch, seq)`` against ``x``; return ``rotary_dim``."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of shape (axes, seq), got {type(positions).__name__}")
    if positions.dim() not in (2, 3) or (n_axes is not None and positions.shape[0] != n_axes):
        axes = "axes" if n_axes is None else n_axes
        raise ValueError(
            f"positions must have shape ({axes}, seq) or ({axes}, batch, seq): one row per axis, "
            f"got {tuple(positions.shape)}"
        )
    return _check_rope_inputs(x, positions[0], inv_freq, rotary_dim)  # shapes, dtypes, devices of one axis


def _section_features(sections: list[int], layout: str, rotary_dim: int) -> list[torch.Tensor]:
    """For each section of consecutive pairs, the feature indices of its pairs in ``layout`` order."""
    out, start = [], 0
    for n in sections:
        pairs = torch.arange(start, start + n)
        if layout == "half":  # pair i = (i, i + r/2): the section is itself a half-split vector
            out.append(torch.cat((pairs, pairs + rotary_dim // 2)))
        else:  # pair i = (2i, 2i + 1): contiguous
            out.append(torch.stack((2 * pairs, 2 * pairs + 1), -1).flatten())
        start += n
    return out


def apply_sectioned_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    sections,
    layout: str = "half",
    rotary_dim: int | None = None,
) -> torch.Tensor:
    """RoPE with one position per axis: pair ``i`` of section ``s`` rotates by ``positions[s] · θ_i``.

    ``x`` is ``(..., seq, head_dim)``; ``positions`` is ``(n_axes, seq)`` or, for ``x`` of shape
    ``(batch, heads, seq, head_dim)``, ``(n_axes, batch, seq)``; ``inv_freq`` holds the ``rotary_dim/2``
    frequencies ``θ_i``; ``sections`` are ``n_axes`` counts of consecutive pairs that sum to
    ``len(inv_freq)``. Pairs follow ``layout`` (:mod:`pebook.rope`: ``"half"`` pairs ``(i, i + r/2)``,
    ``"interleaved"`` pairs ``(2i, 2i+1)``); features past ``rotary_dim`` pass through. Each section
    is rotated by :func:`pebook.rope.apply_rope` on its own features, so every feature is rounded
    once, from float32 (float64 if ``x`` or ``inv_freq`` is) to ``x``'s dtype.

    M-RoPE is sections ``mrope_section`` with the 1-D frequencies, layout ``"half"``
    (:func:`apply_mrope`); axial 2-D RoPE is sections ``(d/4, d/4)`` with ``θ`` repeated
    (:func:`apply_axial_rope`).
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    if isinstance(sections, (str, bytes)) or not hasattr(sections, "__iter__"):
        raise TypeError(f"sections must be a sequence of ints (pairs per axis), got {sections!r}")
    sections = [check_int(f"sections[{i}]", n, minimum=1) for i, n in enumerate(sections)]
    rotary_dim = _check_axis_positions(x, positions, len(sections), inv_freq, rotary_dim)
    if sum(sections) != inv_freq.numel():
        raise ValueError(
            f"sections {sections} must add up to the {inv_freq.numel()} rotary pairs (len(inv_freq)), "
            f"got {sum(sections)}"
        )
    if positions.dtype == torch.bool or positions.dtype.is_complex:
        raise TypeError(f"positions must be an integer or floating tensor, got dtype {positions.dtype}")
    index = _section_features(sections, layout, rotary_dim)
    starts = [0, *itertools.accumulate(sections)]
    pieces = []
    for s, features in enumerate(index):
        part = x[..., features.to(x.device)]
        pieces.append(_rotate(part, positions[s], inv_freq[starts[s] : starts[s + 1]], layout, part.shape[-1]))
    if layout == "half":  # reassemble [first halves of every section | second halves of every section]
        rotated = torch.cat(
            [p[..., :n] for p, n in zip(pieces, sections)] + [p[..., n:] for p, n in zip(pieces, sections)], -1
        )
    else:
        rotated = torch.cat(pieces, dim=-1)
    return rotated if rotary_dim == x.shape[-1] else torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def apply_axial_rope(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str = "interleaved"
) -> torch.Tensor:
    """Axial 2-D RoPE (Heo et al. 2024): pair ``t`` turns by ``θ_t·positions[0]``, ``d/4 + t`` by ``θ_t·positions[1]``.

    ``x`` is ``(..., seq, head_dim)``; ``positions`` ``(2, seq)`` (or ``(2, batch, seq)`` for 4-D ``x``),
    for rope-vit ``(x, y)`` = (column, row), :func:`grid_positions`; ``inv_freq`` the ``head_dim/4``
    frequencies of :func:`axial_rope_frequencies`. ``layout="interleaved"`` is rope-vit's (feature
    pairs ``(2i, 2i+1)`` read as complex numbers); ``layout="half"`` with ``positions = (row,
    column)`` is Qwen2-VL's vision encoder (``Qwen2VLVisionRotaryEmbedding``: ``cat(θ·h, θ·w)``,
    then ``rotate_half``).
    """
    check_float_tensor("inv_freq", inv_freq, ndim=1)
    quarter = inv_freq.numel()
    return apply_sectioned_rope(x, positions, torch.cat((inv_freq, inv_freq)), (quarter, quarter), layout)


def rope_mixed_frequencies(
    head_dim: int,
    n_heads: int,
    base: float = DEFAULT_MIXED_BASE,
    *,
    angles: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """RoPE-Mixed's initial frequencies, shape ``(2, n_heads, head_dim/2)``: ``[θ^x, θ^y]``.

    As rope-vit's ``init_2d_freqs``: with ``θ_t = base^(-t/(head_dim/4))`` (:func:`axial_rope_frequencies`)
    and one direction ``α_h`` per head, pair ``t < d/4`` gets ``(θ^x, θ^y) = θ_t (cos α_h, sin α_h)``
    and pair ``d/4 + t`` the perpendicular ``θ_t (cos(α_h + π/2), sin(α_h + π/2)) = θ_t (-sin α_h, cos α_h)``
    (written in the second form, so ``α_h = 0`` is exactly axial RoPE). ``angles`` gives the
    ``n_heads`` directions; by default they are drawn uniformly from ``[0, 2π)`` with ``generator``.
    Pairs are indexed as in the layout they are used with. Computed in float64, rounded once.
    """
    theta = axial_rope_frequencies(head_dim, base, dtype=torch.float64, device=device)
    n_heads = check_int("n_heads", n_heads, minimum=1)
    check_float_dtype("dtype", dtype)
    if angles is None:
        angles = torch.rand(n_heads, generator=generator, dtype=torch.float64) * (2 * math.pi)
    else:
        check_float_tensor("angles", angles, ndim=1)
        if angles.numel() != n_heads:
            raise ValueError(f"angles must have one direction per head (n_heads={n_heads}), got {angles.numel()}")
    a = angles.to(device=theta.device, dtype=torch.float64)[:, None]
    cos, sin = a.cos(), a.sin()
    freq_x = torch.cat((theta * cos, -theta * sin), dim=-1)
    freq_y = torch.cat((theta * sin, theta * cos), dim=-1)
    return torch.stack((freq_x, freq_y)).to(dtype)


def apply_rope_mixed(
    x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, layout: str = "interleaved"
) -> torch.Tensor:
    """RoPE-Mixed (Heo et al. 2024): pair ``i`` of head ``h`` rotates by ``θ^x_{h,i} · x + θ^y_{h,i} · y``.

    ``x`` is ``(..., heads, seq, head_dim)``; ``positions`` ``(2, seq)`` holds ``(x, y)`` of each token
    (:func:`grid_positions`), shared by the batch; ``freqs`` is ``(2, heads, head_dim/2)``
    (:func:`rope_mixed_frequencies`). Rotations of one plane add their angles, so
    ``R(θ^x x + θ^y y) = R(θ^y y) R(θ^x x)``: the heads are laid side by side as one vector of
    ``heads · head_dim/2`` interleaved pairs and turned by :func:`pebook.rope.apply_rope` twice, first
    with ``x`` and the frequencies ``θ^x``, then with ``y`` and ``θ^y``, in float32 (float64 if ``x`` or
    ``freqs`` is), rounded once to ``x``'s dtype. ``layout`` is how ``x``'s features are paired
    (rope-vit: ``"interleaved"``). The score of a query at ``(x, y)`` with a key at ``(x', y')``
    depends on ``(x - x', y - y')`` only.
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    check_float_tensor("x", x)
    check_float_tensor("freqs", freqs, ndim=3)
    if x.dim() < 3:
        raise ValueError(f"x must have shape (..., heads, seq, head_dim), got {tuple(x.shape)}")
    heads, seq, head_dim = x.shape[-3:]
    if freqs.shape != (2, heads, head_dim // 2) or head_dim % 2:
        raise ValueError(
            f"freqs must have shape (2, heads, head_dim/2) = (2, {heads}, {head_dim // 2}) for x of shape "
            f"{tuple(x.shape)} (even head_dim), got {tuple(freqs.shape)}"
        )
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape != (2, seq):
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions must have shape (2, seq) = (2, {seq}): (x, y) of every token, got {shape}")
    check_float_dtype("freqs.dtype", freqs.dtype, allowed=(torch.float32, torch.float64))
    check_same_placement(x=x, positions=positions, freqs=freqs)
    dtype = torch.float64 if torch.float64 in (x.dtype, freqs.dtype) else torch.float32
    xf = x.to(dtype)
    if layout == "half":
        perm = rope_layout_permutation(head_dim, device=x.device)
        xf = xf[..., perm]  # now interleaved
    # (..., heads, seq, d) -> (..., seq, heads·d): pair i of head h is pair h·d/2 + i of the long vector
    flat = xf.transpose(-3, -2).flatten(-2)
    for axis in range(2):
        flat = _rotate(flat, positions[axis], freqs[axis].reshape(-1).to(dtype), "interleaved", flat.shape[-1])
    out = flat.unflatten(-1, (heads, head_dim)).transpose(-3, -2)
    if layout == "half":
        out = out[..., torch.argsort(perm)]
    return out.to(x.dtype)


class RoPEMixed(nn.Module):
    """RoPE-Mixed with its learnable frequencies ``freqs`` ``(2, n_heads, head_dim/2)`` (Heo et al. 2024).

    Initialised by :func:`rope_mixed_frequencies` (random directions from ``generator``; ``base`` 10).
    ``forward(x, positions)`` is :func:`apply_rope_mixed`; apply it to the queries and the keys of
    the patch tokens (rope-vit leaves the class token unrotated). One module holds one layer's
    frequencies: rope-vit learns a separate ``(2, heads, head_dim/2)`` set for every block.
    """

    def __init__(
        self,
        *,
        head_dim: int,
        n_heads: int,
        base: float = DEFAULT_MIXED_BASE,
        layout: str = "interleaved",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if layout not in ROPE_LAYOUTS:
            raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
        self.head_dim, self.n_heads, self.layout = head_dim, n_heads, layout
        self.base = check_positive_float("base", base, greater_than=1.0)
        self.freqs = nn.Parameter(rope_mixed_frequencies(head_dim, n_heads, base, generator=generator))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_rope_mixed(x, positions, self.freqs, self.layout)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, n_heads={self.n_heads}, base={self.base:g}, layout={self.layout!r}"


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's M-RoPE positions ``(3, batch, seq)`` (temporal, height, width) and ``rope_deltas`` ``(batch,)``.

    Wang et al. (2024), arXiv:2409.12191, §2.1. ``input_ids`` is ``(seq,)`` or ``(batch, seq)``; every
    token equal to ``image_token_id`` is an image patch token. ``image_grid_thw`` ``(n_images, 3)``
    holds each image's ``(t, h, w)`` grid of vision-encoder patches in order of appearance (row by
    row through the batch); the language model sees ``t · (h/m) · (w/m)`` tokens per image after the
    ``m × m`` patch merger (``spatial_merge_size``, 2 in Qwen2-VL). Walking through a row with
    ``s`` the next free position (``s = 0`` at the start):

    * a text token gets ``(s, s, s)`` and ``s ← s + 1`` (so text alone is 1-D RoPE);
    * an image's tokens, in raster order over ``(τ, r, c)`` (frame, merged row, merged column), get
      ``(s + τ, s + r, s + c)``; then ``s ← 1 + max`` of those, ``s + max(t, h/m, w/m)``: "position
      numbering for each modality is initialized by incrementing the maximum position ID of the
      preceding modality by one".

    Images may follow each other without text between them. ``rope_deltas = max position + 1 -
    (number of tokens)``: a token generated after the prompt, at index ``L``, gets ``L + rope_deltas``
    on all three axes. With ``attention_mask`` (``1`` for real tokens), padded tokens are skipped and
    get position 0, as in ``transformers`` 5.24. ``transformers`` 5.24 moves ``s`` by ``max(h, w)/m``
    after an image or video, which is the same for images (``t = 1``) but not for inputs with more
    frames than merged rows or columns. Returns int64 tensors on ``input_ids``' device.
    """
    check_int_tensor("input_ids", input_ids, ndim=(1, 2))
    image_token_id = check_int("image_token_id", image_token_id)
    merge = check_int("spatial_merge_size", spatial_merge_size, minimum=1)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    batch, length = ids.shape
    if attention_mask is None:
        keep = torch.ones_like(ids, dtype=torch.bool)
    else:
        check_same_placement(input_ids=input_ids, attention_mask=attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        keep = (attention_mask if attention_mask.dim() == 2 else attention_mask[None]).bool()
    grids: list[tuple[int, int, int]] = []
    if image_grid_thw is not None:
        check_int_tensor("image_grid_thw", image_grid_thw, ndim=2)
        if image_grid_thw.shape[-1] != 3:
            raise ValueError(
                f"image_grid_thw must have shape (n_images, 3): (t, h, w), got {tuple(image_grid_thw.shape)}"
            )
        for k, (t, h, w) in enumerate(image_grid_thw.tolist()):
            if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
                raise ValueError(
                    f"image_grid_thw[{k}] = ({t}, {h}, {w}): t, h, w must be >= 1 and h, w divisible by "
                    f"spatial_merge_size={merge}"
                )
            grids.append((t, h // merge, w // merge))
    next_grid = iter(enumerate(grids))
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        kept = torch.nonzero(keep[b].cpu()).flatten()
        is_image = (ids[b].cpu()[kept] == image_token_id).tolist()
        rows, s = [], 0
        i = 0
        for image, run in itertools.groupby(is_image):
            n = len(list(run))
            if not image:
                rows.append(torch.arange(s, s + n).expand(3, n))
                s += n
            else:
                left = n
                while left:
                    k, (t, gh, gw) = next(next_grid, (None, (0, 0, 0)))
                    if k is None or t * gh * gw > left:
                        which = "no image_grid_thw row is left" if k is None else f"image {k} needs {t * gh * gw}"
                        raise ValueError(
                            f"row {b}: a run of {n} image tokens at token {i} does not match the grids: {which} "
                            f"(with {left} image tokens left)"
                        )
                    tau, r, c = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
                    rows.append(torch.stack((tau.flatten(), r.flatten(), c.flatten())) + s)
                    s += max(t, gh, gw)
                    left -= t * gh * gw
            i += n
        row = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
        positions[:, b, kept] = row
        deltas[b] = s - len(is_image)  # s = max position + 1
    if next(next_grid, None) is not None:
        raise ValueError(f"image_grid_thw has {len(grids)} rows but fewer images were found in input_ids")
    positions, deltas = positions.to(input_ids.device), deltas.to(input_ids.device)
    return (positions, deltas) if input_ids.dim() == 2 else (positions[:, 0], deltas)


def apply_mrope(
    x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section=DEFAULT_MROPE_SECTION
) -> torch.Tensor:
    """M-RoPE (Qwen2-VL): pair ``i`` rotates by ``θ_i`` times the temporal, height or width position of its section.

    ``x`` ``(..., seq, head_dim)``; ``position_ids`` ``(3, seq)`` or ``(3, batch, seq)`` from
    :func:`mrope_position_ids`; ``inv_freq`` the ``head_dim/2`` 1-D frequencies
    (:func:`pebook.rope_frequencies`, ``rope_theta`` 1e6 in Qwen2-VL); ``mrope_section`` three counts of
    consecutive pairs (temporal, height, width) adding up to ``head_dim/2``. The layout is
    ``transformers``' ``"half"`` (``rotate_half``, with ``cos = cat(freq, freq)``). Equal to
    :func:`pebook.apply_rope` when the three rows of ``position_ids`` are equal (text).
    """
    if isinstance(mrope_section, (str, bytes)) or not hasattr(mrope_section, "__iter__"):
        raise TypeError(f"mrope_section must be three counts of pairs (temporal, height, width), got {mrope_section!r}")
    mrope_section = list(mrope_section)
    if len(mrope_section) != 3:
        raise ValueError(
            f"mrope_section must be three counts of pairs (temporal, height, width), got {mrope_section!r}"
        )
    return apply_sectioned_rope(x, position_ids, inv_freq, mrope_section, "half")
