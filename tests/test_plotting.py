"""bnlib.plotting: offline, deterministic animation HTML; histogram grids; curves; tables.

Truths: np.histogram on clipped values, surfaces.loss at the contours' levels, counting frames in matplotlib's own
HTML, geometric means by hand, a table typed out by hand.
"""

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.animation import FuncAnimation  # noqa: E402

from bnlib import plotting  # noqa: E402


def _tiny_animation(n_frames=3):
    fig, ax = plt.subplots(figsize=(1, 1), dpi=20)
    (line,) = ax.plot([0, 1], [0, 0])
    anim = FuncAnimation(fig, lambda k: line.set_ydata([0, k]), frames=n_frames, interval=100)
    return fig, anim


def test_animation_html_is_offline_and_deterministic():
    fig, anim = _tiny_animation()
    html = plotting.animation_html(anim).data
    plt.close(fig)
    fig2, anim2 = _tiny_animation()
    html2 = plotting.animation_html(anim2).data
    plt.close(fig2)
    assert "<link" not in html and "font-awesome" not in html and "https://" not in html
    assert html == html2
    assert "new Animation(frames" in html or "Animation(frames" in html
    assert len(re.findall(r"frames\[\d+\]", html)) == 3  # every frame embedded
    # the player's id is consistent: one hex id, used by the image, the slider and the script
    ids = set(re.findall(r"_anim_img([0-9a-f]+)", html))
    assert len(ids) == 1
    assert html.count(ids.pop()) >= 5


def test_animation_html_differs_between_animations():
    fig, anim = _tiny_animation(3)
    fig2, anim2 = _tiny_animation(4)
    a, b = plotting.animation_html(anim).data, plotting.animation_html(anim2).data
    plt.close(fig), plt.close(fig2)
    assert re.search(r"_anim_img([0-9a-f]+)", a).group(1) != re.search(r"_anim_img([0-9a-f]+)", b).group(1)


def test_histogram_fractions():
    v = np.array([-5.0, -1.0, -0.2, 0.1, 0.9, 1.0, 7.0])
    h = plotting.histogram_fractions(v, bins=4, range=(-1, 1))
    expected, _ = np.histogram(np.clip(v, -1, 1), bins=4, range=(-1, 1))
    np.testing.assert_array_equal(h, expected / 7)
    assert h.sum() == pytest.approx(1.0, abs=1e-15)
    assert h[0] == 2 / 7 and h[-1] == 3 / 7  # clipped values land in the edge bins
    with pytest.raises(ValueError, match="range"):
        plotting.histogram_fractions(v, bins=4, range=(1, 1))


def test_histogram_grid_and_update():
    rng = np.random.default_rng(0)
    rows = {"no BN": [rng.normal(size=100) for _ in range(3)], "BN": [rng.normal(size=100) for _ in range(3)]}
    grid = plotting.HistogramGrid(rows, bins=10, ranges=(-3, 3), col_titles=["1", "2", "3"])
    assert grid.axes.shape == (2, 3)
    heights = [r.get_height() for r in grid.bars["BN", 2]]
    np.testing.assert_allclose(heights, plotting.histogram_fractions(rows["BN"][2], 10, (-3, 3)))
    new = {k: [v + 10 for v in vs] for k, vs in rows.items()}  # everything clipped into the last bin
    grid.update(new, title="later")
    assert [r.get_height() for r in grid.bars["no BN", 0]][-1] == 1.0
    assert grid.suptitle.get_text() == "later"
    plt.close(grid.fig)
    with pytest.raises(ValueError, match="equally long"):
        plotting.HistogramGrid({"a": [np.zeros(3)], "b": [np.zeros(3), np.zeros(3)]})


def test_histogram_animation_fixes_the_y_axis_over_all_frames():
    frames = [{"x": [np.zeros(10)]}, {"x": [np.linspace(-1, 1, 10)]}]
    anim, grid = plotting.histogram_animation(frames, titles=["a", "b"], bins=5, ranges=(-1, 1))
    assert grid.axes[0, 0].get_ylim()[1] == pytest.approx(1.1)  # frame 0: all mass in one bin
    html = plotting.animation_html(anim).data
    plt.close(grid.fig)
    assert len(re.findall(r"frames\[\d+\]", html)) == 2
    with pytest.raises(ValueError, match="titles"):
        plotting.histogram_animation(frames, titles=["a"])


def test_layer_curves_geometric_mean_and_band():
    fig, ax = plt.subplots()
    values = np.array([[1.0, 100.0], [100.0, 1.0]])
    plotting.layer_curves(ax, {"a": values}, logy=True)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [10.0, 10.0])  # sqrt(1 * 100)
    assert ax.get_yscale() == "log" and len(ax.collections) == 1
    plotting.layer_curves(ax, {"b": values}, logy=False)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [50.5, 50.5])
    plt.close(fig)


def test_layer_curves_keeps_a_label_s_colour():
    fig, ax = plt.subplots()
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    plotting.layer_curves(ax, {"a": values, "b": values}, colors={"b": "tab:red"})
    assert [line.get_color() for line in ax.lines] == ["C0", "tab:red"]
    plt.close(fig)


def test_layer_table():
    table = plotting.layer_table(
        {"no BN": np.array([[0.1, 0.3], [0.3, 0.5]]), "BN": np.array([0.0, 0.25])}, fmt="{:.2f}"
    )
    assert table == (
        "layer          1          2\n"
        "no BN  0.20±0.10  0.40±0.10\n"
        "BN          0.00       0.25"
    )
    with pytest.raises(ValueError, match="same number of columns"):
        plotting.layer_table({"a": np.zeros(2), "b": np.zeros(3)})


def test_histogram_fractions_leave_nan_out():
    """NaN belongs to no bin: left out of the count too, so the fractions of
    the other values still sum to 1; infinities go to the edge bins."""
    fractions = plotting.histogram_fractions([0.1, 0.2, np.nan, 5.0, -np.inf], 4, (-1, 1))
    assert fractions.sum() == pytest.approx(1.0)
    assert fractions[0] == pytest.approx(0.25) and fractions[-1] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="all NaN"):
        plotting.histogram_fractions([np.nan], 4, (-1, 1))


def test_loss_contours_levels_window_and_star():
    """Levels at the same heights above the minimum; the window centred on it."""
    from bnlib import features, surfaces

    X, y = features.make_regression(50, scales=(0.2, 2.0), noise=0.3, seed=0)
    theta = surfaces.optimum(X, y)
    fig, ax = plt.subplots()
    contours = plotting.loss_contours(ax, X, y, theta, title="raw", half=2.0, num=21)
    np.testing.assert_allclose(contours.levels, surfaces.loss(theta, X, y) + np.geomspace(0.02, 40, 12))
    np.testing.assert_allclose(ax.get_xlim(), [theta[1] - 2.0, theta[1] + 2.0])
    np.testing.assert_allclose(ax.get_ylim(), [theta[2] - 2.0, theta[2] + 2.0])
    star = ax.lines[0]
    assert star.get_marker() == "*" and list(star.get_xdata()) == [theta[1]]
    assert ax.get_title() == "raw" and ax.get_aspect() == 1.0
    plt.close(fig)
