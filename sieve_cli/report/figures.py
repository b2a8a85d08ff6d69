"""The report's figures: plain data in, matplotlib Figure out (no pyplot, so no display is needed)."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..plan import KIND_ORDER
from .read import Curve, Score, Trials
from .summary import pareto_front

METHOD_COLOURS = {"output": "tab:blue", "learned": "tab:green", "pca": "tab:orange", "svd": "tab:red"}
ANNOTATE_MAX_CELLS = 160  # numbers in heatmap cells up to this many cells (SmolLM2: 30 x 7 = 210 gets none)
FEW_BLOCKS = 8  # spectra: up to this many blocks get a legend, more a colour bar
ERROR_FLOOR = 1e-6  # relative errors are drawn on a log axis; exact zeros sit at this floor


def metric_figure(scores: list[Score], metric: str, threshold: float | None = None) -> Figure:
    """Each score as a dot, with its confidence interval as a bar when it has one."""
    fig = Figure(figsize=(7.5, 0.55 * len(scores) + 1.3), layout="constrained")
    ax = fig.add_subplot()
    ys = np.arange(len(scores))[::-1]
    for y, s in zip(ys, scores):
        who = s.label.split(" (")[0].split(",")[0]
        colour = {"dense": "tab:blue", "dense healed": "tab:cyan", "pruned healed": "tab:green"}.get(who, "tab:orange")
        if s.ci_low is not None and s.ci_high is not None:
            ax.errorbar(s.value, y, xerr=[[s.value - s.ci_low], [s.ci_high - s.value]], fmt="o", color=colour,
                        capsize=5, lw=2, ms=7)
        else:
            ax.plot(s.value, y, "o", color=colour, ms=7, mfc="white", mew=2)
        n = f"  (n={s.n})" if s.n else ""
        ax.annotate(f"{s.value:.4g}{n}", (s.value, y), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=9)
    searched = [y for y, s in zip(ys, scores) if "search split" in s.label]
    if threshold is not None and searched:  # the tolerance applies to the split the search scored
        ax.plot([threshold] * 2, [min(searched) - 0.45, max(searched) + 0.45], color="grey", ls="--", lw=1,
                label=f"tolerance, search split ({threshold:.4g})")
        ax.legend(loc="lower left", fontsize=8, frameon=False)
    ax.set_yticks(ys, [s.label for s in scores])
    ax.set_ylim(-0.7, len(scores) - 0.2)
    ax.set_xlabel(f"{metric} (higher is better; bars: confidence interval)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def heatmap_figure(blocks: list[int], kinds: list[str], kept: np.ndarray, title: str) -> Figure:
    """Kept fraction per matrix: blocks across, kinds down, one colour scale 0..1."""
    width = min(13.0, max(4.5, 0.36 * len(blocks) + 2.2))
    fig = Figure(figsize=(width, 0.42 * len(kinds) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    cmap = _kept_cmap()
    image = ax.imshow(np.ma.masked_invalid(kept), cmap=cmap, norm=Normalize(0, 1), aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=8 if len(blocks) > 20 else 10)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("matrix")
    ax.set_title(title, fontsize=11)
    ax.set_xticks(np.arange(len(blocks) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(kinds) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=1)
    ax.tick_params(which="minor", length=0)
    if kept.size <= ANNOTATE_MAX_CELLS:
        for (k, b), value in np.ndenumerate(kept):
            if not np.isnan(value):
                dark = sum(cmap(value)[:3]) < 1.5
                ax.text(b, k, _cell_text(value), ha="center", va="center",
                        fontsize=8 if len(blocks) > 12 else 9, color="white" if dark else "black")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("kept fraction")
    return fig


def _cell_text(value: float) -> str:
    """.75 rather than 0.75 so that 30 blocks still fit; exact 0 and 1 as digits."""
    return "1" if value >= 1 else "0" if value <= 0 else f"{value:.2f}".lstrip("0")


def _kept_cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#dddddd")


def spectra_figure(curve: Curve) -> Figure:
    """Relative output error against kept fraction: one panel per kind, one line per block."""
    kinds = sorted(curve.lines, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))
    ncols = min(4, len(kinds))
    nrows = math.ceil(len(kinds) / ncols)
    fig = Figure(figsize=(3.2 * ncols + 1.2, 2.6 * nrows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    blocks = sorted({b for lines in curve.lines.values() for b, _, _ in lines})
    norm = Normalize(min(blocks), max(max(blocks), min(blocks) + 1))
    cmap = _block_cmap()
    few = len(blocks) <= FEW_BLOCKS
    for ax, kind in zip(axes, kinds):
        for block, xs, ys in curve.lines[kind]:
            style = "-" if len(xs) > 12 else "o-"
            colour = f"C{blocks.index(block)}" if few else cmap(norm(block))
            ax.plot(xs, np.maximum(ys, ERROR_FLOOR), style, color=colour, lw=1.2, ms=3, alpha=0.85, label=f"block {block}")
        if kind in curve.chosen:
            cx, cy = zip(*curve.chosen[kind])
            ax.plot(cx, np.maximum(cy, ERROR_FLOOR), "kx", ms=5, mew=1.2, alpha=0.8)
        ax.set_title(kind, fontsize=10)
        ax.set_yscale("log")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3, which="major")
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    fig.supxlabel("kept fraction of the matrix's parameters", fontsize=10)
    fig.supylabel("relative output error", fontsize=10)
    marks = "; x: the plan's matrices" if curve.chosen else ""
    fig.suptitle(f"fit spectra, method {curve.method} (one line per block{marks})", fontsize=11)
    if few:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=9, frameon=False)
    else:
        from matplotlib.cm import ScalarMappable

        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[: len(kinds)].tolist(), fraction=0.03, pad=0.01)
        bar.set_label("block")
    return fig


def _block_cmap():
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps["plasma"](np.linspace(0, 0.85, 256)))  # no pale yellow on white


def tradeoff_figure(trials: list[Trials], dense: float, threshold: float | None, chosen: tuple[float, float] | None,
                    metric: str, model_share: float | None = None) -> Figure:
    """Metric against parameters removed: every evaluation, the uniform curve, the adaptive front."""
    fig = Figure(figsize=(8.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for t in trials:
        colour = METHOD_COLOURS.get(t.method, "tab:purple")
        tag = f" ({t.method})" if len(trials) > 1 else ""
        if t.adaptive:
            ax.scatter(*zip(*t.adaptive), s=12, color=colour, alpha=0.25, lw=0, label=f"adaptive evaluations{tag}")
        if t.uniform:
            xs, ys = zip(*sorted(t.uniform))
            ax.plot(xs, ys, "s--", color=colour, ms=5, lw=1.2, alpha=0.9, label=f"uniform{tag}")
        if t.adaptive:
            front = pareto_front(t.adaptive + t.uniform)
            ax.plot(*zip(*front), "o-", color=colour, lw=2, ms=4, label=f"adaptive front{tag}")
    ax.axhline(dense, color="black", lw=0.8, alpha=0.6, label=f"dense ({dense:.4g})")
    if threshold is not None:
        ax.axhline(threshold, color="grey", ls=":", lw=1.5, label=f"tolerance ({threshold:.4g})")
    if chosen is not None:
        ax.plot(*chosen, "*", color="gold", mec="black", ms=16, zorder=5, label="chosen plan")
    points = [p for t in trials for p in t.uniform + t.adaptive]
    if points:
        hidden = _zoom(ax, points, dense, threshold)
        if hidden:
            ax.text(0.99, 0.01, f"{hidden} evaluation{'s' * (hidden > 1)} below the axis", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("parameters removed (share of the prunable matrices)")
    ax.set_ylabel(f"{metric} (search split)")
    ax.xaxis.set_major_formatter(_percent)
    if model_share:
        top = ax.secondary_xaxis("top", functions=(lambda x: x * model_share, lambda x: x / model_share))
        top.set_xlabel("share of the whole model", fontsize=9)
        top.xaxis.set_major_formatter(_percent)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", frameon=True, framealpha=0.9)
    return fig


def _zoom(ax, points, dense, threshold) -> int:
    """Keep the region near the tolerance readable when some candidates collapse; returns how many are cut off."""
    ys = np.array([y for _, y in points])
    low = threshold if threshold is not None else dense
    spread = max(abs(dense - low), 1e-9)
    floor = min(low - 4 * spread, np.percentile(ys, 10)) if len(ys) > 10 else ys.min()
    bottom = max(ys.min(), floor)
    pad = 0.06 * (max(ys.max(), dense) - bottom or 1)
    ax.set_ylim(bottom - pad, max(ys.max(), dense) + pad)
    ax.set_xlim(-0.02, max(x for x, _ in points) * 1.05 + 0.02)
    return int(np.sum(ys < bottom - pad))


_percent = FuncFormatter(lambda x, _pos=None: f"{x:.0%}")
