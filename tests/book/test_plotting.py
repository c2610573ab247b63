"""pebook.book.plotting: the figures hold exactly the data they were given.

Each test checks the data behind the figure (image arrays, colour limits, line data, labels),
not pixels. Figures are closed after every test.
"""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pebook.book.plotting import plot_heatmap, plot_heatmaps, plot_lines


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def matrix(device, rows=3, cols=4, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


# ---------------------------------------------------------------- plot_heatmap


def test_heatmap_image_is_the_matrix(device):
    m = matrix(device)
    fig = plot_heatmap(m, title="T", xlabel="key j", ylabel="query i", colorbar_label="bias")
    assert isinstance(fig, Figure)
    ax, cbar_ax = fig.axes  # the heat map and its colour bar
    (image,) = ax.images
    np.testing.assert_array_equal(np.asarray(image.get_array()), m.cpu().numpy())
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("T", "key j", "query i")
    assert cbar_ax.get_ylabel() == "bias"
    assert image.get_clim() == pytest.approx((m.min().item(), m.max().item()), abs=0, rel=1e-12)


def test_heatmap_accepts_float32_bf16_and_nested_lists(device):
    m = matrix(device).float()
    image = plot_heatmap(m).axes[0].images[0]
    np.testing.assert_array_equal(np.asarray(image.get_array()), m.cpu().double().numpy())
    b = m.bfloat16()
    np.testing.assert_array_equal(np.asarray(plot_heatmap(b).axes[0].images[0].get_array()), b.cpu().double().numpy())
    rows = [[1, 2], [3, 4]]
    np.testing.assert_array_equal(np.asarray(plot_heatmap(rows).axes[0].images[0].get_array()), np.array(rows, float))


def test_heatmap_symmetric_scale_is_centred_on_zero_and_ignores_non_finite(device):
    m = torch.tensor([[0.5, -2.0, float("-inf")], [1.0, float("nan"), 0.25]], dtype=torch.float64, device=device)
    image = plot_heatmap(m, symmetric=True, cmap="RdBu").axes[0].images[0]
    assert image.get_clim() == (-2.0, 2.0)
    assert image.get_cmap().name == "RdBu"
    masked = plot_heatmap(torch.full((2, 2), float("-inf"), device=device), symmetric=True).axes[0].images[0]
    assert masked.get_clim() == (-1.0, 1.0)  # nothing finite: a unit scale


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()])
def test_heatmap_rejects_non_2d(device, shape):
    with pytest.raises(
        ValueError, match=rf"matrix must be 2-D, got shape {tuple(shape)!r}".replace("(", r"\(").replace(")", r"\)")
    ):
        plot_heatmap(torch.zeros(shape, device=device))


# ---------------------------------------------------------------- plot_heatmaps


def test_heatmaps_panels_hold_their_matrices_on_one_scale(device):
    tables = {"a": matrix(device, seed=1), "b": matrix(device, seed=2) * 3, "c": matrix(device, 2, 5, seed=3)}
    fig = plot_heatmaps(tables, ncols=2, suptitle="S", xlabel="x", ylabel="y")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["a", "b", "c"]
    low = min(t.min().item() for t in tables.values())
    high = max(t.max().item() for t in tables.values())
    for ax, table in zip(panels, tables.values(), strict=True):
        (image,) = ax.images
        np.testing.assert_array_equal(np.asarray(image.get_array()), table.cpu().numpy())
        assert image.get_clim() == pytest.approx((low, high), rel=1e-12, abs=0)
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("x", "y")
    grid = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    assert len(grid) == 4 and sum(not ax.axison for ax in grid) == 1  # 2×2 grid, the spare panel hidden
    assert "S" in [text.get_text() for text in fig.texts]  # the suptitle


def test_heatmaps_symmetric_scale(device):
    tables = {"p": torch.tensor([[0.0, 3.0]], device=device), "q": torch.tensor([[-1.0, float("nan")]], device=device)}
    fig = plot_heatmaps(tables, symmetric=True)
    assert all(ax.images[0].get_clim() == (-3.0, 3.0) for ax in fig.axes if ax.images)


def test_heatmaps_reject_bad_input(device):
    with pytest.raises(ValueError, match=r"matrices must hold at least one \{title: matrix\} entry"):
        plot_heatmaps({})
    with pytest.raises(ValueError, match=r"matrix 'row' must be 2-D, got shape \(4,\)"):
        plot_heatmaps({"ok": torch.zeros(2, 2, device=device), "row": torch.zeros(4, device=device)})


# ---------------------------------------------------------------- plot_lines


def test_single_series_line_holds_the_data(device):
    x = torch.arange(5, device=device)
    y = torch.tensor([0.5, 1.5, -2.0, 3.25, 0.0], dtype=torch.float64, device=device)
    fig = plot_lines(x, y, title="T", xlabel="distance", ylabel="score", marker="o")
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), x.cpu().numpy().astype(float))
    np.testing.assert_array_equal(line.get_ydata(), y.cpu().numpy())
    assert line.get_marker() == "o"
    assert ax.get_legend() is None  # one unlabelled series: no legend
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("T", "distance", "score")
    assert (ax.get_xscale(), ax.get_yscale()) == ("linear", "linear")


def test_several_series_are_labelled_lines(device):
    x = [1, 2, 4, 8]
    ys = {"rope": torch.tensor([1.0, 0.5, 0.25, 0.125], device=device), "alibi": [4.0, 3.0, 2.0, 1.0]}
    fig = plot_lines(x, ys, logx=True, logy=True)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["rope", "alibi"]
    for line, values in zip(lines, ys.values(), strict=True):
        np.testing.assert_array_equal(line.get_xdata(), np.array(x, float))
        np.testing.assert_array_equal(line.get_ydata(), np.asarray(torch.as_tensor(values).cpu(), float))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rope", "alibi"]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")


def test_lines_reject_mismatched_shapes(device):
    with pytest.raises(ValueError, match=r"series 'b' has shape \(3,\) but x has shape \(4,\)"):
        plot_lines(torch.arange(4, device=device), {"a": [1, 2, 3, 4], "b": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"series '' has shape \(2,\) but x has shape \(3,\)"):
        plot_lines([0, 1, 2], [1.0, 2.0])
