"""The report's figures, drawn from plain arrays: heatmaps, knockout curves, similarity vs F1,
head-set stability and per-step coverage curves.

Source: Zhao, Yin, Durrett (ICML 2025): Figures 6-9 (retrieval / insight scores by layer and
head), Figure 3 (F1 after masking the top-k heads vs k random heads), Figure 4 (similarity of
a synthetic model's heads to the real model's vs its real-task F1).

Figures are built with `matplotlib.figure.Figure`, which renders through Agg without pyplot's
global state, so report writing works headless and in parallel.

Example:
    >>> import numpy as np
    >>> from pathlib import Path
    >>> score_heatmaps({"real": np.random.rand(4, 8)}, "mdqa: retrieval score", Path("h.png"))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from engine.store import atomic_path


def score_heatmaps(grids: Mapping[str, np.ndarray], title: str, path: Path) -> Path:
    """One layer x head heatmap per model on a shared color scale.

    Args:
        grids: {model label: [layer, head] scores}.
        title: the figure title.
        path: the PNG to write.
    """
    labels = list(grids)
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    finite = [g[np.isfinite(g)] for g in grids.values()]
    vmax = max((float(f.max()) for f in finite if f.size), default=0.0) or 1.0
    fig = Figure(figsize=(3.2 * cols + 1.0, 3.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    # Heads outside H_X (score exactly 0) are drawn apart from small positive scores.
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="whitesmoke")
    image = None
    for ax, label in zip(axes.flat, labels):
        grid = grids[label]
        masked = np.ma.masked_where(~(grid > 0), grid)  # also hides NaN (no example counted)
        image = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", origin="lower")
        ax.set_title(f"{label} (|H|={int((grid > 0).sum())})", fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, shrink=0.8, label="score")
    fig.suptitle(title)
    return _save(fig, path)


def knockout_curve(
    ks: Sequence[int],
    top_f1: Sequence[float],
    random_mean: Sequence[float],
    random_std: Sequence[float],
    unmasked_f1: float,
    title: str,
    path: Path,
) -> Path:
    """F1 against k for the top-k heads masked and for k random heads (mean ± std over seeds)."""
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(ks, top_f1, "o-", color="tab:red", label="top-k heads masked")
    ax.errorbar(
        ks, random_mean, yerr=random_std, fmt="s--", color="tab:blue", capsize=4, label="k random heads (±std)"
    )
    if not math.isnan(unmasked_f1):
        ax.axhline(unmasked_f1, color="gray", linestyle=":", label="no masking")
    ax.set_xlabel("k (heads masked)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("F1 on the real task")
    ax.set_ylim(bottom=0.0)
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def similarity_scatter(panels: Sequence[Mapping], title: str, path: Path) -> Path:
    """Similarity to the real model's heads vs real-task F1, one panel per similarity measure.

    Args:
        panels: dicts with `xlabel`, `labels`, `x`, `y`, `rho`, `p_value`, `n`.
        title: the figure title.
        path: the PNG to write.
    """
    fig = Figure(figsize=(5.0 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        ax.scatter(panel["x"], panel["y"], color="tab:purple")
        for label, x, y in zip(panel["labels"], panel["x"], panel["y"]):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=9)
        ax.margins(0.15)  # room for the labels of the extreme points
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel("F1 on the real task")
        stats = f"Spearman rho={_num(panel['rho'])}, p={_num(panel['p_value'], '.2g')}, n={panel['n']}"
        ax.set_title(stats, fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)


def line_bands(curves: Mapping[str, Mapping[str, Sequence[float]]], xlabel: str, ylabel: str, title: str,
               path: Path, log_x: bool = False, reference: float | None = None) -> Path:
    """One line per model with an optional shaded band: head-set stability against the number of
    scored examples, or per-step coverage of H_X against the decoding step.

    Args:
        curves: {model label: {"x", "y", and optionally "low", "high"}}.
        xlabel, ylabel, title: axis labels and the title.
        path: the PNG to write.
        log_x: a base-2 log x axis (subset sizes 1, 2, 4, ...).
        reference: a dotted horizontal line (e.g. the Jaccard index called enough).
    """
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, c in curves.items():
        (line,) = ax.plot(c["x"], c["y"], "o-", markersize=3, label=label)
        if "low" in c and "high" in c:
            ax.fill_between(c["x"], c["low"], c["high"], color=line.get_color(), alpha=0.15, linewidth=0)
    if log_x:
        ax.set_xscale("log", base=2)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    if curves:
        ax.legend(fontsize=8, ncol=2)
    ax.set_title(title)
    return _save(fig, path)


def _num(x: float, spec: str = ".2f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
