"""Plotting helpers used by the chapters. Each returns the matplotlib ``Figure``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["plot_heatmap", "plot_heatmaps", "plot_lines"]


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def plot_heatmap(
    matrix,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    cmap: str = "viridis",
    colorbar_label: str = "",
    symmetric: bool = False,
    figsize: tuple[float, float] = (6.0, 4.0),
):
    """Heat map of a 2-D table (an encoding table, a bias matrix, attention weights).

    ``symmetric=True`` centres the colour scale on zero (use a diverging ``cmap``).
    """
    values = _to_numpy(matrix)
    if values.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {values.shape}")
    fig, ax = plt.subplots(figsize=figsize)
    limits = {}
    if symmetric:
        bound = float(np.nanmax(np.abs(values[np.isfinite(values)]))) if np.isfinite(values).any() else 1.0
        limits = {"vmin": -bound, "vmax": bound}
    image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", **limits)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    return fig


def plot_heatmaps(
    matrices: Mapping[str, object],
    *,
    ncols: int = 4,
    suptitle: str = "",
    xlabel: str = "",
    ylabel: str = "",
    cmap: str = "viridis",
    symmetric: bool = False,
    panel_size: tuple[float, float] = (3.0, 2.6),
):
    """Several 2-D tables side by side, one titled panel each (``{title: matrix}``), sharing one colour scale."""
    if not matrices:
        raise ValueError("matrices must hold at least one {title: matrix} entry")
    arrays = {title: _to_numpy(m) for title, m in matrices.items()}
    for title, values in arrays.items():
        if values.ndim != 2:
            raise ValueError(f"matrix {title!r} must be 2-D, got shape {values.shape}")
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if symmetric:
        vmax = max(abs(vmin), abs(vmax))
        vmin = -vmax
    ncols = min(ncols, len(arrays))
    nrows = -(-len(arrays) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False, constrained_layout=True
    )
    for ax, (title, values) in zip(axes.flat, arrays.items()):
        image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    for ax in list(axes.flat)[len(arrays) :]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_lines(
    x,
    ys: Mapping[str, Sequence[float]] | Sequence[float],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    marker: str | None = None,
    figsize: tuple[float, float] = (6.0, 4.0),
):
    """Line plot of one series, or of several given as ``{label: values}`` (with a legend)."""
    xs = _to_numpy(x)
    series = ys if isinstance(ys, Mapping) else {"": ys}
    fig, ax = plt.subplots(figsize=figsize)
    for label, values in series.items():
        values = _to_numpy(values)
        if values.shape != xs.shape:
            raise ValueError(f"series {label!r} has shape {values.shape} but x has shape {xs.shape}")
        ax.plot(xs, values, label=label or None, marker=marker)
    if any(series):
        ax.legend()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
