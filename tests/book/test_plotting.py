"""pebook.book.plotting: the figures hold exactly the data they were given, laid out to be read.

Each test checks the data behind the figure (image arrays, colour limits, line data, labels)
or its layout after a draw (where the legend and the tick labels end up, in display
coordinates), not pixels. Figures are closed after every test.
"""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from pebook.book.plotting import log_tick_label, plot_heatmap, plot_heatmaps, plot_lines


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


def test_heatmaps_wrap_into_rows_of_ncols_panels_of_panel_size(device):
    tables = {f"head {h}": matrix(device, 4, 4, seed=h) for h in range(4)}
    fig = plot_heatmaps(tables, ncols=2, panel_size=(4.0, 3.0))
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in panels] == [(2, 2)] * 4
    assert [(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in panels] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert tuple(fig.get_size_inches()) == (8.0, 6.0)
    fig.canvas.draw()
    for ax in panels:  # row and column indices: integer ticks only
        for ticks in (ax.get_xticks(), ax.get_yticks()):
            np.testing.assert_array_equal(ticks, np.round(ticks))
    # by default at most three panels per row: about the width of the book's column
    default = plot_heatmaps(tables)
    assert default.get_size_inches()[0] == 9.0
    assert sum(ax.get_subplotspec().rowspan.start == 0 for ax in default.axes if ax.images) == 3
    with pytest.raises(ValueError, match="ncols must be at least 1, got 0"):
        plot_heatmaps(tables, ncols=0)


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


def _drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _visible_tick_labels(ax, axis="x"):
    """(text, window extent) of every non-empty tick label drawn inside the axis' view."""
    renderer = _drawn(ax.figure)
    axis = ax.xaxis if axis == "x" else ax.yaxis
    low, high = sorted(axis.get_view_interval())
    labels = []
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        label = tick.label1
        if label.get_visible() and label.get_text() and low <= tick.get_loc() <= high:
            labels.append((label.get_text(), label.get_window_extent(renderer)))
    return labels


def _many_series(n=7, length=5):
    x = [64 * 2**i for i in range(length)]
    rng = np.random.default_rng(0)
    return x, {f"series {i}": rng.uniform(1.0, 3.0, length).tolist() for i in range(n)}


def test_legend_outside_sits_right_of_the_axes_within_the_figure():
    x, ys = _many_series()
    fig = plot_lines(x, ys, logx=True, marker="o", legend="outside", figsize=(7.5, 4.0))
    renderer = _drawn(fig)
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(ys)
    box, frame = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= frame.x1  # covers no curve
    figure = fig.bbox
    assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and box.y1 <= figure.y1
    assert frame.width > 0.5 * figure.width  # the axes keep most of the width


@pytest.mark.parametrize("where", ["lower right", "upper left"])
def test_legend_at_a_chosen_corner_or_none(where):
    fig = plot_lines([0, 1, 2], {"a": [0.0, 1.0, 2.0], "b": [2.0, 1.0, 0.0]}, legend=where, legend_ncols=2)
    renderer = _drawn(fig)
    ax = fig.axes[0]
    box, frame = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    right, top = box.x1 > frame.x0 + frame.width / 2, box.y1 > frame.y0 + frame.height / 2
    assert (right, top) == {"lower right": (True, False), "upper left": (False, True)}[where]
    a, b = (text.get_window_extent(renderer) for text in ax.get_legend().get_texts())
    assert a.y0 == pytest.approx(b.y0) and a.x1 < b.x0  # legend_ncols=2: side by side
    assert plot_lines([0, 1], {"a": [0.0, 1.0]}, legend=None).axes[0].get_legend() is None


@pytest.mark.parametrize("x", [[64, 128, 256, 512, 1024], [128, 256, 512, 1024, 2048], [32, 48, 64, 96, 128, 192, 256]])
def test_log_axis_tick_labels_do_not_overlap(x):
    fig = plot_lines(x, {"a": np.linspace(1, 2, len(x)), "b": np.linspace(2, 1, len(x))}, logx=True)
    ax = fig.axes[0]
    assert all(not t.label1.get_text() for t in ax.xaxis.get_minor_ticks())  # minor ticks unlabelled
    labels = _visible_tick_labels(ax)
    assert len(labels) >= 2
    for i, (text_a, a) in enumerate(labels):
        for text_b, b in labels[i + 1 :]:
            assert not _overlap(a, b), (text_a, text_b)
    assert all("times" not in text for text, _ in labels)  # plain numbers inside 1e-3 .. 1e5


def test_explicit_xticks_are_the_labelled_ticks():
    x = [64, 128, 256, 512, 1024]
    fig = plot_lines(x, [2.0, 2.1, 2.2, 2.4, 2.6], logx=True, xticks=x)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.get_xticks(), np.array(x, float))
    assert [text for text, _ in _visible_tick_labels(ax)] == ["64", "128", "256", "512", "1024"]
    linear = plot_lines([0, 5, 10], [1.0, 2.0, 3.0], xticks=[0, 5, 10]).axes[0]
    assert [text for text, _ in _visible_tick_labels(linear)] == ["0", "5", "10"]


def test_log_y_axis_over_many_decades_labels_powers_of_ten():
    fig = plot_lines([0, 1, 2], [1e-16, 1e-8, 1.0], logy=True)
    texts = [text for text, _ in _visible_tick_labels(fig.axes[0], "y")]
    assert "$10^{-16}$" in texts and "$10^{0}$" in texts  # one style on the whole axis
    assert all(text.startswith("$10^{") for text in texts)
    assert all(not t.label1.get_text() for t in fig.axes[0].yaxis.get_minor_ticks())


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (64.0, "64"),
        (1000.0, "1000"),
        (0.01, "0.01"),
        (0.005, "0.005"),
        (1e-16, "$10^{-16}$"),
        (2e6, "$2\\times10^{6}$"),
        (1e5, "$10^{5}$"),
        (0.0, ""),
        (-1.0, ""),
        (float("nan"), ""),
    ],
)
def test_log_tick_label(value, label):
    assert log_tick_label(value) == label
    assert (
        log_tick_label(0.01, plain=False) == "$10^{-2}$" and log_tick_label(64.0, plain=False) == "$6.4\\times10^{1}$"
    )


def test_styles_set_line_properties_and_the_legend_shows_them():
    x = [1, 2, 3]
    ys = {"rope": [1.0, 2.0, 3.0], "rope +ft": [0.5, 1.0, 1.5], "L = 2": [2.0, 2.0, 2.0]}
    styles = {"rope +ft": {"color": "C0", "linestyle": "--"}, "L = 2": {"marker": "", "linestyle": ":"}}
    fig = plot_lines(x, ys, marker="o", styles=styles)
    ax = fig.axes[0]
    plain, tuned, reference = ax.get_lines()
    assert to_rgb(tuned.get_color()) == to_rgb(plain.get_color())  # "C0": the first series' colour
    assert (tuned.get_linestyle(), tuned.get_marker()) == ("--", "o")
    assert (reference.get_linestyle(), reference.get_marker()) == (":", "")
    handles = ax.get_legend().legend_handles
    assert [(h.get_linestyle(), h.get_marker()) for h in handles] == [("-", "o"), ("--", "o"), (":", "")]
    np.testing.assert_array_equal(tuned.get_ydata(), np.array(ys["rope +ft"]))
    with pytest.raises(ValueError, match=r"styles name series that are not plotted: \['yarn'\]"):
        plot_lines(x, ys, styles={"yarn": {"color": "C1"}})


# ---------------------------------------------------------------- plot_bands


def test_bands_hold_centre_band_and_references(device):
    from pebook.book.plotting import plot_bands

    x = torch.tensor([64.0, 128.0, 256.0], device=device)
    mean, low, high = [2.0, 2.1, 2.3], [1.9, 2.0, 2.2], [2.1, 2.2, float("nan")]
    fig = plot_bands(
        x,
        {"rope": (mean, low, high), "alibi": ([2.0, 1.9, 1.9], [1.9, 1.8, 1.8], [2.1, 2.0, 2.0])},
        references={"2-gram": 2.26, "3-gram": [1.8, 1.77, 1.76]},
        logx=True,
        xticks=[64, 128, 256],
        styles={"alibi": {"color": "C3"}},
        title="T",
    )
    (ax,) = fig.axes
    rope, alibi, _, trigram = ax.lines  # the series, then the references in order
    np.testing.assert_array_equal(rope.get_xdata(), [64.0, 128.0, 256.0])
    np.testing.assert_array_equal(rope.get_ydata(), mean)
    assert to_rgb(alibi.get_color()) == to_rgb("C3")
    # one shaded band per series, in the series' colour, spanning low .. high
    rope_band, alibi_band = ax.collections
    assert to_rgb(alibi_band.get_facecolor()[0][:3]) == to_rgb("C3")
    ys = rope_band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(1.9) and ys.max() == pytest.approx(2.2)  # NaN: a gap
    # references: a horizontal line and a curve, grey, dashed, labelled in the axes only
    horizontal = [line for line in ax.lines if list(line.get_ydata()) == [2.26, 2.26]]
    assert len(horizontal) == 1 and horizontal[0].get_linestyle() == "--"
    np.testing.assert_array_equal(trigram.get_ydata(), [1.8, 1.77, 1.76])
    assert {t.get_text() for t in ax.texts} == {"2-gram", "3-gram"}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rope", "alibi"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "128", "256"]


def test_bands_draw_into_given_axes_and_reject_bad_input():
    from pebook.book.plotting import plot_bands

    fig, (left, right) = plt.subplots(1, 2)
    assert plot_bands([1, 2], {"a": ([1, 2], [0, 1], [2, 3])}, ax=right, legend=None) is fig
    assert len(right.lines) == 1 and not left.lines and right.get_legend() is None
    with pytest.raises(ValueError, match="centre, low, high"):
        plot_bands([1, 2], {"a": ([1, 2], [0, 1])})
    with pytest.raises(ValueError, match="low has shape"):
        plot_bands([1, 2], {"a": ([1, 2], [0], [2, 3])})
    with pytest.raises(ValueError, match="low must not exceed high"):
        plot_bands([1, 2], {"a": ([1, 2], [3, 1], [2, 3])})
    with pytest.raises(ValueError, match="reference 'r'"):
        plot_bands([1, 2], {"a": ([1, 2], [0, 1], [2, 3])}, references={"r": [1, 2, 3]})
    with pytest.raises(ValueError, match="styles name"):
        plot_bands([1, 2], {"a": ([1, 2], [0, 1], [2, 3])}, styles={"b": {}})
