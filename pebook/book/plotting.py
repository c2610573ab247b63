"""Plotting helpers used by the chapters. Each returns the matplotlib ``Figure``.

The figures are drawn to be read in the book's column (about 900 px wide): several panels wrap
into rows (``plot_heatmaps``), a legend can sit outside the axes where the curves fill them
(``plot_lines(legend="outside")``), and log axes label only their major ticks, with plain
numbers, so that tick labels never run into each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

__all__ = ["log_tick_label", "plot_bands", "plot_heatmap", "plot_heatmaps", "plot_lines"]


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
    ncols: int = 3,
    suptitle: str = "",
    xlabel: str = "",
    ylabel: str = "",
    cmap: str = "viridis",
    symmetric: bool = False,
    panel_size: tuple[float, float] = (3.0, 2.6),
):
    """Several 2-D tables, one titled panel each (``{title: matrix}``), sharing one colour scale.

    The panels fill rows of ``ncols`` (the last row may be short); each panel is
    ``panel_size`` inches. The default of at most three 3-inch panels per row keeps the figure
    about as wide as the book's column; use ``ncols=2`` and larger panels for detail. Rows and
    columns are indices, so the ticks are integers.
    """
    if not matrices:
        raise ValueError("matrices must hold at least one {title: matrix} entry")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
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
        for axis in (ax.xaxis, ax.yaxis):  # rows and columns are indices: integer ticks
            axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10], integer=True))
    for ax in list(axes.flat)[len(arrays) :]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def log_tick_label(value: float, _position=None, *, plain: bool = True) -> str:
    """Label of a tick on a log axis: a plain number ("64", "0.01", "2000") where that is short
    (``plain`` and ``1e-3 <= value < 1e5``), else a power of ten ("$10^{-16}$", "$2\\times10^{6}$")."""
    if not math.isfinite(value) or value <= 0:
        return ""
    if plain and 1e-3 <= value < 1e5:
        return f"{value:g}"
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10**exponent
    if math.isclose(mantissa, 1.0, rel_tol=1e-9):
        return f"$10^{{{exponent}}}$"
    return f"${mantissa:g}\\times10^{{{exponent}}}$"


def _log_axis(axis, values: np.ndarray, ticks: Sequence[float] | None) -> None:
    """Only major ticks labelled: at ``ticks`` if given, else at 1, 2, 5 times the powers of ten
    when the data span at most 2.5 decades, at the powers of ten otherwise. Plain numbers when
    the data lie within 1e-3 .. 1e5, else powers of ten throughout."""
    positive = values[np.isfinite(values) & (values > 0)]
    low, high = (positive.min(), positive.max()) if positive.size else (1.0, 1.0)
    if ticks is None:
        decades = math.log10(high / low)
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)))
    plain = 1e-3 <= low and high < 1e5
    axis.set_major_formatter(FuncFormatter(lambda value, pos: log_tick_label(value, pos, plain=plain)))
    axis.set_minor_formatter(NullFormatter())


_LEGEND_OUTSIDE = "outside"


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
    legend: str | None = "best",
    legend_ncols: int = 1,
    xticks: Sequence[float] | None = None,
    styles: Mapping[str, Mapping[str, object]] | None = None,
):
    """Line plot of one series, or of several given as ``{label: values}`` (with a legend).

    ``legend`` places the legend of labelled series: a matplotlib location inside the axes
    ("best", "upper left", "lower right", ...), ``"outside"`` (to the right of the axes, for
    curves that fill them; the axes narrow to make room within ``figsize``) or ``None`` (no
    legend). ``xticks`` puts the major x ticks at these values (for example the lengths a
    model was evaluated at), labelled as plain numbers. On a log axis only major ticks are
    labelled (see :func:`log_tick_label`), so that labels do not run into each other.
    ``styles`` gives some series their own line properties (``{label: {"linestyle": "--",
    "color": "C0", "marker": ""}}``), which the legend shows too.
    """
    xs = _to_numpy(x)
    series = ys if isinstance(ys, Mapping) else {"": ys}
    styles = dict(styles or {})
    unknown = set(styles) - set(series)
    if unknown:
        raise ValueError(f"styles name series that are not plotted: {sorted(unknown)}")
    fig, ax = plt.subplots(figsize=figsize)
    all_y = []
    for label, values in series.items():
        values = _to_numpy(values)
        if values.shape != xs.shape:
            raise ValueError(f"series {label!r} has shape {values.shape} but x has shape {xs.shape}")
        ax.plot(xs, values, **{"label": label or None, "marker": marker, **styles.get(label, {})})
        all_y.append(values.ravel())
    if any(series) and legend is not None:
        if legend == _LEGEND_OUTSIDE:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, ncols=legend_ncols)
        else:
            ax.legend(loc=legend, ncols=legend_ncols)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log")
        _log_axis(ax.xaxis, xs.ravel(), xticks)
    if logy:
        ax.set_yscale("log")
        _log_axis(ax.yaxis, np.concatenate(all_y), None)
    if xticks is not None:
        ticks = [float(t) for t in xticks]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_bands(
    x,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    *,
    references: Mapping[str, float | Sequence[float]] | None = None,
    ax=None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    xticks: Sequence[float] | None = None,
    marker: str | None = "o",
    styles: Mapping[str, Mapping[str, object]] | None = None,
    legend: str | None = "outside",
    alpha: float = 0.2,
    figsize: tuple[float, float] = (6.0, 4.0),
):
    """Curves with a shaded band each (``{label: (centre, low, high)}``), and reference lines.

    For results over several seeds: the centre (e.g. the mean) is drawn as a line, the band
    from ``low`` to ``high`` (e.g. the minimum and maximum over the seeds) is shaded in the
    line's colour. NaN values leave a gap (an evaluation that was refused). ``references``
    draws grey dashed lines labelled at their left end, outside the legend: a number is a
    horizontal line across the axes, a sequence a line over ``x`` (for example the loss of an
    n-gram baseline under the same windows). ``ax`` draws into existing axes (several panels);
    without it a new figure of ``figsize`` is made. ``legend``, ``xticks``, ``logx`` and
    ``styles`` are as in :func:`plot_lines`. Returns the figure.
    """
    xs = _to_numpy(x)
    if xs.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {xs.shape}")
    styles = dict(styles or {})
    unknown = set(styles) - set(bands)
    if unknown:
        raise ValueError(f"styles name series that are not plotted: {sorted(unknown)}")
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    for label, band in bands.items():
        if len(band) != 3:
            raise ValueError(f"band {label!r} must be (centre, low, high), got {len(band)} sequences")
        centre, low, high = (_to_numpy(v) for v in band)
        for name, values in (("centre", centre), ("low", low), ("high", high)):
            if values.shape != xs.shape:
                raise ValueError(f"band {label!r}: {name} has shape {values.shape} but x has shape {xs.shape}")
        finite = np.isfinite(low) & np.isfinite(high)
        if (low[finite] > high[finite]).any():
            raise ValueError(f"band {label!r}: low must not exceed high")
        (line,) = ax.plot(xs, centre, **{"label": label, "marker": marker, **styles.get(label, {})})
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=alpha, linewidth=0)
    for label, value in (references or {}).items():
        values = np.full(xs.shape, float(value)) if np.ndim(value) == 0 else _to_numpy(value)
        if values.shape != xs.shape:
            raise ValueError(f"reference {label!r} has shape {values.shape} but x has shape {xs.shape}")
        if np.ndim(value) == 0:
            ax.axhline(float(value), color="0.5", linestyle="--", linewidth=1.0, zorder=1)
        else:
            ax.plot(xs, values, color="0.5", linestyle="--", linewidth=1.0, zorder=1)
        ax.annotate(
            label,
            (xs[0], values[0]),
            xytext=(2, 2),
            textcoords="offset points",
            fontsize="small",
            color="0.35",
        )
    if bands and legend is not None:
        if legend == _LEGEND_OUTSIDE:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        else:
            ax.legend(loc=legend)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log")
        _log_axis(ax.xaxis, xs, xticks)
    if xticks is not None:
        ax.xaxis.set_major_locator(FixedLocator([float(t) for t in xticks]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    if own:
        fig.tight_layout()
    return fig
