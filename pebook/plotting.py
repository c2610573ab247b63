"""Plotting helpers used by the chapters. Each returns the matplotlib ``Figure``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["plot_heatmap", "plot_lines"]


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
