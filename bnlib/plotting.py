r"""Figures, animations and small text tables for the book's per-layer experiments.

- :func:`animation_html`: a matplotlib animation as JavaScript HTML that plays
  offline (no CDN link) and is the same text on every run.
- :class:`HistogramGrid` and :func:`histogram_animation`: a grid of histograms,
  one row per condition (e.g. "no BN", "BN") and one column per layer.
- :func:`layer_curves`: one line per condition across layers, mean over seeds
  with the min-max band.
- :func:`layer_table`: the same numbers as a fixed-width text table.
- :func:`loss_contours`: the error surface of a linear model with two
  weights, as contours around its minimum.
"""

from __future__ import annotations

import hashlib
import re
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import animation as mpl_animation

from bnlib import surfaces

__all__ = [
    "animation_html",
    "histogram_fractions",
    "HistogramGrid",
    "histogram_animation",
    "layer_curves",
    "layer_table",
    "loss_contours",
]

# matplotlib's HTMLWriter puts this stylesheet link (a CDN) in front of its player.
_CDN_LINK = re.compile(r'<link rel="stylesheet"\s+href="[^"]*font-awesome[^"]*">\s*')
# ... and names the player's elements with a random uuid4().hex.
_ANIM_ID = re.compile(r'_anim_img([0-9a-f]{32})')


def animation_html(anim: mpl_animation.Animation, fps: float | None = None, default_mode: str = "loop"):
    """``IPython.display.HTML`` of ``anim.to_jshtml()``, made offline and deterministic.

    Two changes to matplotlib's output: the Font Awesome ``<link>`` (a CDN
    stylesheet; the book's theme ships the icons) is removed, and the random
    element id is replaced by a hash of the frames, so the same animation gives
    the same text on every run (and two different animations never share an id).
    Close the figure afterwards (``plt.close(fig)``) so it is not shown twice.
    """
    from IPython.display import HTML

    html = anim.to_jshtml(fps=fps, default_mode=default_mode)
    html = _CDN_LINK.sub("", html)
    match = _ANIM_ID.search(html)
    if match:
        old = match.group(1)
        new = hashlib.sha1(html.replace(old, "").encode()).hexdigest()[:32]
        html = html.replace(old, new)
    return HTML(html)


def histogram_fractions(values, bins: int, range: tuple[float, float]) -> np.ndarray:
    """Fraction of ``values`` (any shape) in each of ``bins`` equal bins over ``range``.

    Values outside ``range`` (infinities too) are clipped into the first or
    last bin, so the fractions always sum to 1 and saturated mass shows up at
    the edges. NaN values (a diverged network's) belong to no bin and are
    left out of the count as well. Shape ``(bins,)``.
    """
    lo, hi = range
    if not hi > lo or bins < 1:
        raise ValueError(f"need bins >= 1 and range (lo, hi) with hi > lo, got bins={bins}, range={range}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        raise ValueError("values is empty (or all NaN)")
    counts, _ = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    return counts / v.size


def _as_numpy(t):
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t)


class HistogramGrid:
    """A ``len(rows) x n_layers`` grid of histograms (fractions per bin, see :func:`histogram_fractions`).

    ``rows``: ``{row label: [values of layer 1, values of layer 2, ...]}``, all rows
    with the same number of layers. ``ranges``: one ``(lo, hi)`` for every row or
    ``{row label: (lo, hi)}``. ``ylim``: the top of the y axis per row (a number
    or a dict); by default 1.1 times the row's tallest bar. ``update(rows)`` sets
    new bar heights (for animations). Attributes: ``fig``, ``axes`` (2-D array).
    """

    def __init__(
        self,
        rows: Mapping[str, Sequence],
        bins: int = 30,
        ranges: tuple[float, float] | Mapping[str, tuple[float, float]] = (-1.0, 1.0),
        col_titles: Sequence[str] | None = None,
        ylim: float | Mapping[str, float] | None = None,
        colors: Sequence[str] | None = None,
        figsize: tuple[float, float] | None = None,
        dpi: float | None = None,
        title: str | None = None,
    ):
        labels = list(rows)
        n_cols = {len(v) for v in rows.values()}
        if len(labels) < 1 or len(n_cols) != 1 or min(n_cols) < 1:
            raise ValueError(
                "rows must map labels to equally long, non-empty lists of layers, got lengths "
                f"{[len(v) for v in rows.values()]}"
            )
        self.labels = labels
        self.bins = bins
        self.n_cols = n_cols.pop()
        self.ranges = {k: (ranges[k] if isinstance(ranges, Mapping) else ranges) for k in labels}
        colors = colors or [f"C{i}" for i in range(len(labels))]
        figsize = figsize or (1.3 * self.n_cols + 1.2, 1.2 * len(labels) + 0.6)
        self.fig, self.axes = plt.subplots(
            len(labels), self.n_cols, figsize=figsize, dpi=dpi, squeeze=False, sharey="row"
        )
        self.bars = {}
        heights = {k: [histogram_fractions(_as_numpy(v), bins, self.ranges[k]) for v in rows[k]] for k in labels}
        for i, k in enumerate(labels):
            lo, hi = self.ranges[k]
            edges = np.linspace(lo, hi, bins + 1)
            top = ylim[k] if isinstance(ylim, Mapping) else ylim
            if top is None:
                top = 1.1 * max(float(h.max()) for h in heights[k])
            for j in range(self.n_cols):
                ax = self.axes[i, j]
                self.bars[k, j] = ax.bar(
                    edges[:-1], heights[k][j], width=np.diff(edges), align="edge", color=colors[i % len(colors)]
                )
                ax.set_xlim(lo, hi)
                ax.set_ylim(0, top)
                ax.set_yticks([])
                # sizes that stay legible when the page shrinks an 11-inch
                # figure to its ~750-pixel column
                ax.tick_params(labelsize=8)
                if i == 0 and col_titles is not None:
                    ax.set_title(col_titles[j], fontsize=10)
            # "no BN: tanh input" -> two short lines beside the row
            self.axes[i, 0].set_ylabel(k.replace(": ", ":\n"), fontsize=9)
        self.suptitle = self.fig.suptitle(title or "", fontsize=11)
        self.fig.tight_layout()

    def update(self, rows: Mapping[str, Sequence], title: str | None = None) -> list:
        """Set every bar to the fractions of the new ``rows`` (same labels and layers); returns the changed artists."""
        changed = []
        for k in self.labels:
            for j, values in enumerate(rows[k]):
                h = histogram_fractions(_as_numpy(values), self.bins, self.ranges[k])
                for rect, height in zip(self.bars[k, j], h):
                    rect.set_height(height)
                changed.extend(self.bars[k, j])
        if title is not None:
            self.suptitle.set_text(title)
            changed.append(self.suptitle)
        return changed


def histogram_animation(
    frames: Sequence[Mapping[str, Sequence]],
    titles: Sequence[str] | None = None,
    interval: int = 400,
    **grid_kwargs,
) -> tuple[mpl_animation.FuncAnimation, HistogramGrid]:
    """A ``FuncAnimation`` of a :class:`HistogramGrid` over ``frames`` (one ``rows`` dict per frame).

    The y axis of each row is fixed to 1.1 times its tallest bar over all frames
    unless ``ylim`` is given. ``titles[k]`` is shown above frame ``k``.
    Returns ``(anim, grid)``; show it with :func:`animation_html`, then close ``grid.fig``.
    """
    if len(frames) < 1:
        raise ValueError("need at least one frame")
    if titles is not None and len(titles) != len(frames):
        raise ValueError(f"got {len(titles)} titles for {len(frames)} frames")
    if grid_kwargs.get("ylim") is None:
        bins = grid_kwargs.get("bins", 30)
        ranges = grid_kwargs.get("ranges", (-1.0, 1.0))
        ylim = {}
        for k in frames[0]:
            rng = ranges[k] if isinstance(ranges, Mapping) else ranges
            ylim[k] = 1.1 * max(
                float(histogram_fractions(_as_numpy(v), bins, rng).max()) for f in frames for v in f[k]
            )
        grid_kwargs["ylim"] = ylim
    grid = HistogramGrid(frames[0], title=titles[0] if titles else None, **grid_kwargs)

    def draw(k):
        return grid.update(frames[k], titles[k] if titles else None)

    anim = mpl_animation.FuncAnimation(grid.fig, draw, frames=len(frames), interval=interval, blit=False)
    return anim, grid


def _summary(values: np.ndarray, log: bool):
    """Mean over seeds (geometric if ``log``), min and max: three arrays of shape (n_layers,)."""
    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    mean = np.exp(np.log(v).mean(axis=0)) if log else v.mean(axis=0)
    return mean, v.min(axis=0), v.max(axis=0)


def layer_curves(
    ax,
    series: Mapping[str, np.ndarray],
    x: Sequence | None = None,
    logy: bool = False,
    band: bool = True,
    marker: str = "o",
    colors: Mapping[str, str] | None = None,
):
    """Plot one line per condition: ``series[label]`` has shape ``(n_seeds, n_layers)`` or ``(n_layers,)``.

    The line is the mean over seeds (the geometric mean when ``logy``, the
    right average for quantities that vary by orders of magnitude), the shaded
    band runs from the smallest to the largest seed. ``x`` defaults to
    ``1, ..., n_layers``. ``colors`` maps a label to its colour, so that a
    condition keeps one colour across panels (a label it lacks, and every
    label by default, gets ``C0``, ``C1``, ... in the order of ``series``).
    Returns ``ax``.
    """
    for i, (label, values) in enumerate(series.items()):
        mean, lo, hi = _summary(values, logy)
        xs = np.arange(1, mean.size + 1) if x is None else np.asarray(x)
        color = (colors or {}).get(label, f"C{i}")
        ax.plot(xs, mean, marker=marker, ms=4, color=color, label=label)
        if band and np.atleast_2d(values).shape[0] > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
    if logy:
        ax.set_yscale("log")
    return ax


def layer_table(
    rows: Mapping[str, np.ndarray],
    fmt: str = "{:.3f}",
    col_labels: Sequence[str] | None = None,
    header: str = "layer",
    spread: bool = True,
) -> str:
    """A fixed-width text table: one row per condition, one column per layer.

    ``rows[label]`` has shape ``(n_layers,)`` or ``(n_seeds, n_layers)``; a 2-D
    entry is shown as ``mean±std`` over seeds (``spread=False``: the mean only).
    ``col_labels`` default to ``1, 2, ...``. Print the returned string.
    """
    cells, n = {}, None
    for label, values in rows.items():
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 1:
            cells[label] = [fmt.format(a) for a in v]
        else:
            cells[label] = [
                fmt.format(m) + ("±" + fmt.format(s) if spread else "")
                for m, s in zip(v.mean(axis=0), v.std(axis=0))
            ]
        if n is not None and len(cells[label]) != n:
            raise ValueError(f"all rows need the same number of columns, got {n} and {len(cells[label])}")
        n = len(cells[label])
    cols = list(col_labels) if col_labels is not None else [str(i) for i in range(1, n + 1)]
    if len(cols) != n:
        raise ValueError(f"got {len(cols)} column labels for {n} columns")
    w0 = max(len(header), *(len(k) for k in cells))
    ws = [max(len(c), *(len(cells[k][j]) for k in cells)) for j, c in enumerate(cols)]
    lines = [header.ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, ws))]
    for label, row in cells.items():
        lines.append(label.ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(row, ws)))
    return "\n".join(lines)


def loss_contours(ax, X, y, theta, title=None, half=5.0, num=201, n_levels=12):
    """Contours of a two-feature linear model's MSE over ``(w1, w2)``, bias held at ``theta[0]``.

    ``theta = (b, w1, w2)``, usually the minimum (:func:`bnlib.surfaces.optimum`),
    marked with a star. The window is :func:`bnlib.surfaces.grid_around`
    (``half`` either side of ``theta``, equal scales on both axes), the levels
    ``L(theta) + geomspace(0.02, 40, n_levels)``: the same heights above the
    minimum in every panel, so panels of two problems compare. Returns the
    ``QuadContourSet``.
    """
    w1, w2 = surfaces.grid_around(theta, half=half, num=num)
    Z = surfaces.loss_grid(X, y, w1, w2, b=theta[0])
    levels = surfaces.loss(theta, X, y) + np.geomspace(0.02, 40, n_levels)
    contours = ax.contour(w1, w2, Z, levels=levels, cmap="viridis")
    ax.plot(theta[1], theta[2], "k*", ms=10)
    ax.set(xlabel="$w_1$", ylabel="$w_2$", title=title or "", aspect="equal")
    return contours
