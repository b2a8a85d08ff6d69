"""The report: one self-contained HTML page (and its PNG figures) of what a workspace holds.

Nothing is recomputed: the page is read from the stages' files (discover's matrices, the fit
spectra, the search plan and history, the apply and eval outputs). Reading is kept apart
from drawing: `collect` turns the workspace into plain data, the `*_figure` functions turn
plain data into matplotlib Figures (no pyplot, so no display is ever needed), and
`render_html` puts both on a page. A section whose inputs are missing is skipped with a note.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .acceptance import acceptance_threshold
from .apply import RESULT
from .errors import InputError, MissingStageError
from .fit import load_spectrum
from .options import ReportOptions
from .ranks import fraction_for_rank
from .workspace import Workspace, read_json

log = logging.getLogger(__name__)

STAGE = "report"
HTML_FILE = "report.html"
FIGURES = {
    "metric": "metric.png",
    "heatmap": "kept_heatmap.png",
    "spectra": "spectra_{method}.png",
    "tradeoff": "tradeoff.png",
}
KIND_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "fc1", "down", "fc2")
METHOD_COLOURS = {"output": "tab:blue", "learned": "tab:green", "pca": "tab:orange", "svd": "tab:red"}
ANNOTATE_MAX_CELLS = 160  # numbers in heatmap cells up to this many cells (SmolLM2: 30 x 7 = 210 gets none)
FEW_BLOCKS = 8  # spectra: up to this many blocks get a legend, more a colour bar
ERROR_FLOOR = 1e-6  # relative errors are drawn on a log axis; exact zeros sit at this floor


class ReportInputError(InputError):
    """The workspace lacks what the report needs (a finished search)."""


@dataclass
class ReportResult:
    html: Path
    images: list[Path]
    sections: dict[str, str]  # section -> "shown" or why it was skipped
    findings: list[str]  # the sentences the page says about the plan


# ---- plain data ---------------------------------------------------------------------------
@dataclass
class Score:
    label: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None


@dataclass
class Curve:
    """One fit method's spectra: per kind, per block, (kept fractions, relative errors)."""

    method: str
    lines: dict[str, list[tuple[int, list[float], list[float]]]]
    chosen: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # the plan's points


@dataclass
class Trials:
    """Every evaluation of one search (one fit method): x = removed fraction, y = metric."""

    method: str
    uniform: list[tuple[float, float]]
    adaptive: list[tuple[float, float]]


@dataclass
class Data:
    ws: Workspace
    plan: dict
    matrices: list[dict]
    total_params: int
    dtype: str
    scores: list[Score]
    spectra: list[Curve]
    trials: list[Trials]
    manifests: dict[str, dict]
    applied: dict | None  # apply's result.json when it was made from this plan
    pruned_bytes: int | None  # weights file of the evaluated pruned model
    notes: dict[str, str]  # section -> why it is skipped or partial


# ---- reading the workspace ----------------------------------------------------------------
def collect(ws: Workspace) -> Data:
    """Everything the report shows, read from the workspace; only a finished search is required."""
    try:
        ws.require("search")
    except MissingStageError as exc:
        raise ReportInputError(f"nothing to report yet: {exc}") from None
    plan = read_json(ws.plan_json)
    found = read_json(ws.matrices_json)
    manifests = {stage: m for stage in _stages(ws) if (m := ws.read_manifest(stage)) is not None}
    notes: dict[str, str] = {}
    scores, pruned_dir = read_scores(ws, plan, notes)
    spectra = [read_spectrum(ws, method, found["matrices"], plan) for method in fitted_methods(ws)]
    if not spectra:
        notes["spectra"] = f"no finished fit in the workspace; run `sieve fit -w {ws.root}`"
    trials = read_trials(ws, plan)
    if not trials or not (trials[0].uniform or trials[0].adaptive):
        notes["tradeoff"] = f"{ws.history_jsonl.name} is missing or empty"
    return Data(ws=ws, plan=plan, matrices=found["matrices"], total_params=int(found["total_params"]),
                dtype=_discover_dtype(manifests), scores=scores, spectra=spectra, trials=trials,
                manifests=manifests, applied=read_applied(ws, notes), pruned_bytes=_saved_bytes(pruned_dir),
                notes=notes)


def _stages(ws: Workspace) -> list[str]:
    fits = [ws.fit_stage(m) for m in fitted_methods(ws, finished=False)]
    evals = [f"eval/{p.name}" for p in sorted(ws.eval_dir.iterdir()) if p.is_dir()] if ws.eval_dir.is_dir() else []
    return ["discover", "task", "capture", *fits, "search", "apply", *evals]


def fitted_methods(ws: Workspace, finished: bool = True) -> list[str]:
    """The fit methods with a manifest in the workspace, `output` first."""
    root = ws.stage_dir("fit")
    if not root.is_dir():
        return []
    methods = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        manifest = ws.read_manifest(ws.fit_stage(folder.name))
        if manifest is not None and (manifest.get("complete") or not finished):
            methods.append(folder.name)
    return sorted(methods, key=lambda m: (m != "output", m))


def _discover_dtype(manifests: dict) -> str:
    return ((manifests.get("discover") or {}).get("inputs", {}).get("options", {}) or {}).get("dtype", "float32")


def read_applied(ws: Workspace, notes: dict) -> dict | None:
    """apply's counted numbers (result.json), if apply ran on the current plan."""

    manifest = ws.read_manifest("apply")
    path = ws.stage_dir("apply") / RESULT
    if not manifest or not manifest.get("complete") or not path.is_file():
        notes["apply"] = f"not applied yet; `sieve apply -w {ws.root} -o OUT` counts the pruned model and saves it"
        return None
    if manifest["inputs"].get("upstream", {}).get("search") not in (None, ws.manifest_hash("search")):
        notes["apply"] = "the last `sieve apply` used an earlier plan; its counts are not shown"
        return None
    return read_json(path)


def _saved_bytes(folder: Path | None) -> int | None:
    """Bytes of a pruned model folder's weight files."""
    if folder is None or not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or None


def read_scores(ws: Workspace, plan: dict, notes: dict) -> tuple[list[Score], Path | None]:
    """Dense and pruned scores: every finished `sieve eval` run, then the search split from the plan.

    Also returns the pruned model folder that was evaluated for this plan, if any (for its size).
    """
    scores, pruned_dir = [], None
    for result in read_eval_results(ws):
        who = result.get("model", "dense")
        label = "dense"
        if who != "dense":
            label, folder = _pruned_label(Path(who), plan)
            pruned_dir = pruned_dir or (folder if label == "pruned" else None)
        scores.append(Score(f"{label} ({result.get('split', '?')} split)", float(result["value"]),
                            _num(result.get("ci_low")), _num(result.get("ci_high")), result.get("n")))
    scores.sort(key=lambda s: (not s.label.startswith("dense"), s.label))
    if not any(s.label.startswith("pruned") for s in scores):
        notes["metric"] = (f"no evaluation of the pruned model yet: run `sieve apply -w {ws.root} -o OUT` and "
                           f"`sieve eval -w {ws.root} --model OUT` (and `sieve eval -w {ws.root}` for dense) "
                           f"for test-split scores with confidence intervals")
    metric = plan["metric"]
    split = metric.get("split", "search")
    scores.append(Score(f"dense ({split} split)", float(metric["dense"])))
    scores.append(Score(f"plan ({split} split)", float(metric["plan"])))
    return scores, pruned_dir


def read_eval_results(ws: Workspace) -> list[dict]:
    """results.json of every finished eval run (stage `eval/<run>`, one folder per model and split)."""
    if not ws.eval_dir.is_dir():
        return []
    results = []
    for folder in sorted(p for p in ws.eval_dir.iterdir() if p.is_dir()):
        manifest = ws.read_manifest(f"eval/{folder.name}")
        path = folder / "results.json"
        if manifest and manifest.get("complete") and path.is_file():
            result = read_json(path)
            if isinstance(result.get("value"), (int, float)):
                results.append(result)
    return results


def _pruned_label(folder: Path, plan: dict) -> tuple[str, Path]:
    """'pruned' when the folder holds this plan's model; otherwise say what it is."""
    info_path = folder / "sieve.json"
    if not info_path.is_file():
        return f"model {folder.name}", folder
    ranks = {name: m.get("rank") for name, m in read_json(info_path).get("plan", {}).get("matrices", {}).items()}
    same = ranks == {name: m.get("rank") for name, m in plan["matrices"].items()}
    return ("pruned" if same else f"pruned, other plan ({folder.name})"), folder


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) else None


def read_spectrum(ws: Workspace, method: str, matrices: list[dict], plan: dict) -> Curve:
    """Relative output error against kept fraction, per kind and block, from fit/<method>/spectrum.json."""

    spectrum = load_spectrum(ws, method)
    curve = Curve(method=method, lines={})
    planned = plan["matrices"] if plan.get("method") == method else {}
    for m in matrices:
        errors = spectrum.get(m["name"])
        if errors is None:
            continue
        h, d = m["out_features"], m["in_features"]
        points = [(fraction_for_rank(r, h, d), e) for r, e in enumerate(errors) if e is not None]
        points = [(x, y) for x, y in points if x <= 1.0 + 1e-9]
        curve.lines.setdefault(m["kind"], []).append((m["block"], [x for x, _ in points], [y for _, y in points]))
        chosen = planned.get(m["name"])
        if chosen and chosen.get("rank") is not None and chosen["rank"] < len(errors) and errors[chosen["rank"]] is not None:
            curve.chosen.setdefault(m["kind"], []).append((chosen["kept"], errors[chosen["rank"]]))
    return curve


def read_trials(ws: Workspace, plan: dict) -> list[Trials]:
    """The search history by fit method (entries without a method belong to the plan's)."""
    if not ws.history_jsonl.exists():
        return []
    by_method: dict[str, Trials] = {}
    for line in ws.history_jsonl.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        method = entry.get("method") or plan.get("method", "output")
        trials = by_method.setdefault(method, Trials(method, [], []))
        point = (float(entry["removed_fraction"]), float(entry["metric"]))
        (trials.adaptive if entry.get("strategy") == "adaptive" else trials.uniform).append(point)
    return sorted(by_method.values(), key=lambda t: (t.method != plan.get("method"), t.method))


# ---- the plan, summarised -------------------------------------------------------------------
def kept_grid(plan: dict) -> tuple[list[int], list[str], np.ndarray]:
    """(blocks, kinds, kept) with kept[k, b] the kept fraction of kind k in block b (nan: none)."""
    matrices = plan["matrices"].values()
    kinds = sorted({m["kind"] for m in matrices}, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))
    blocks = sorted({int(m["block"]) for m in matrices})
    grid = np.full((len(kinds), len(blocks)), np.nan)
    for m in matrices:
        grid[kinds.index(m["kind"]), blocks.index(int(m["block"]))] = min(1.0, float(m["kept"]))
    return blocks, kinds, grid


def describe_plan(plan: dict) -> list[str]:
    """What the kept-fraction map says about which matrices the task needs, in sentences."""
    blocks, kinds, grid = kept_grid(plan)
    values = grid[~np.isnan(grid)]
    if values.size == 0:
        return ["The plan holds no matrices."]
    if np.allclose(values, values[0]):
        what = "stays dense" if values[0] >= 1 else f"keeps {values[0]:.0%} of its parameters"
        return [f"Uniform plan: every matrix {what}, so the map shows no bottleneck; "
                f"`sieve search --strategy adaptive` finds which matrices the task needs."]
    weights = _param_grid(plan, blocks, kinds)
    by_kind = _weighted_mean(grid, weights, axis=1)
    by_block = _weighted_mean(grid, weights, axis=0)
    order = np.argsort(by_kind)
    most, least = order[::-1][:2], order[:2]
    dense = int(np.sum(values >= 1.0))
    findings = [
        f"The task needs {_join(kinds[i] for i in most)} most (kept {_join(f'{by_kind[i]:.0%}' for i in most)} "
        f"of their parameters) and {_join(kinds[i] for i in least)} least "
        f"({_join(f'{by_kind[i]:.0%}' for i in least)}).",
        f"{dense} of {values.size} matrices stay dense" + (f": {_dense_list(blocks, kinds, grid)}." if 0 < dense <= 8 else "."),
    ]
    if len(blocks) >= 4:
        third = max(1, len(blocks) // 3)
        parts = [("first", by_block[:third]), ("middle", by_block[third:-third]), ("last", by_block[-third:])]
        findings.append("By depth, blocks keep " + ", ".join(f"{np.mean(v):.0%} in the {name} third" for name, v in parts if len(v)) + ".")
    else:
        findings.append("By block: " + ", ".join(f"block {b} keeps {v:.0%}" for b, v in zip(blocks, by_block)) + ".")
    return findings


def _param_grid(plan: dict, blocks: list[int], kinds: list[str]) -> np.ndarray:
    weights = np.zeros((len(kinds), len(blocks)))
    for m in plan["matrices"].values():
        weights[kinds.index(m["kind"]), blocks.index(int(m["block"]))] = m.get("params_before", 1)
    return weights


def _weighted_mean(grid: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    filled = np.nan_to_num(grid)
    w = np.where(np.isnan(grid), 0.0, weights)
    total = w.sum(axis=axis)
    return np.divide((filled * w).sum(axis=axis), total, out=np.full(total.shape, np.nan), where=total > 0)


def _dense_list(blocks, kinds, grid) -> str:
    return ", ".join(f"{kinds[k]} of block {blocks[b]}" for k, b in zip(*np.nonzero(grid >= 1.0)))


def _join(items) -> str:
    items = list(items)
    return " and ".join(items) if len(items) <= 2 else ", ".join(items[:-1]) + " and " + items[-1]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points that no other point beats on both removal and metric, by increasing removal."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front[::-1]


# ---- figures (plain data in, Figure out) ----------------------------------------------------
def metric_figure(scores: list[Score], metric: str, threshold: float | None = None) -> Figure:
    """Each score as a dot, with its confidence interval as a bar when it has one."""
    fig = Figure(figsize=(7.5, 0.55 * len(scores) + 1.3), layout="constrained")
    ax = fig.add_subplot()
    ys = np.arange(len(scores))[::-1]
    for y, s in zip(ys, scores):
        colour = "tab:blue" if s.label.startswith("dense") else "tab:orange"
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


# ---- the page -------------------------------------------------------------------------------
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
 body {{ font: 15px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
 h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }}
 table {{ border-collapse: collapse; margin: .5em 0; }}
 td, th {{ padding: .25em .8em; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }}
 td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
 img {{ max-width: 100%; display: block; margin: .5em 0; }}
 .note {{ color: #8a5a00; background: #fff6e0; padding: .4em .8em; border-radius: 4px; }}
 .finding {{ background: #eef5ff; padding: .6em 1em; border-radius: 4px; }}
 code, .opts {{ font: 12px/1.4 ui-monospace, monospace; }}
</style></head><body>
<h1>{title}</h1>
<p>Workspace <code>{root}</code>. Built from the files the stages wrote; nothing recomputed.</p>
{sections}
</body></html>
"""


def section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{html.escape(heading)}</h2>\n{body}\n</section>'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def image_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


NUMERIC = re.compile(r"[-+]?[\d.,]+( to [-+]?[\d.,]+)? ?(%|[KMG]|[KMG]?B)?")


def table(rows: list[tuple], header: tuple | None = None) -> str:
    def cell(value, tag="td"):
        klass = ' class="num"' if NUMERIC.fullmatch(str(value)) else ""
        return f"<{tag}{klass}>{html.escape(str(value))}</{tag}>"

    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def score_rows(scores: list[Score]) -> list[tuple]:
    def interval(s: Score) -> str:
        return f"{s.ci_low:.4g} to {s.ci_high:.4g}" if s.ci_low is not None and s.ci_high is not None else ""

    return [(s.label, f"{s.value:.4g}", interval(s), s.n or "") for s in scores]


def summary_rows(data: Data) -> list[tuple]:
    """Parameters and sizes: the plan's prediction, and what apply counted when it ran."""
    p, a = data.plan["params"], data.applied
    width = DTYPE_BYTES.get(data.dtype, 4)
    rows = [
        ("prunable parameters (plan)", human(p["prunable_before"]), human(p["prunable_after"]),
         f"-{p['removed_fraction_prunable']:.1%}"),
        ("model parameters (plan)", human(p["model_before"]), human(p["model_after"]),
         f"-{p['removed_fraction_model']:.1%}"),
    ]
    if a:
        rows += [
            ("model parameters (counted by apply)", human(a["params_before"]), human(a["params_after"]),
             f"-{a['removed_fraction_model']:.1%}" + _stored_dense(a)),
            (f"weights file ({a['dtype']})", human_bytes(a["dense_file_bytes"]), human_bytes(a["file_bytes"]),
             f"{a['size_ratio'] - 1:+.1%}"),
        ]
    else:
        after = human_bytes(data.pruned_bytes) if data.pruned_bytes else human_bytes(p["model_after"] * width)
        rows.append((f"weights in {data.dtype} (from the counts)", human_bytes(p["model_before"] * width), after, ""))
    return rows


def plan_sentence(plan: dict, threshold: float) -> str:
    metric = plan["metric"]
    kind = "absolute" if plan.get("absolute") else "relative to dense"
    return (f"The {plan['strategy']} search over the {plan['method']} fit, tolerance {plan['tolerance']:g} ({kind}): "
            f"a plan is acceptable when {metric['name']} on the {metric.get('split', 'search')} split is at least "
            f"{threshold:.4g}.")


def _stored_dense(applied: dict) -> str:
    product = applied.get("matrices", {}).get("product", 0)
    return f" ({product} matrices stored as a dense product, faster than factored)" if product else ""


def options_rows(manifests: dict[str, dict]) -> list[tuple]:
    rows = []
    for stage, manifest in manifests.items():
        options = (manifest.get("inputs") or {}).get("options")
        if options is None:
            options = {k: v for k, v in (manifest.get("inputs") or {}).items() if k != "upstream"}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in _flat(options))
        state = manifest.get("written", "")[:16].replace("T", " ") + ("" if manifest.get("complete") else " (unfinished)")
        rows.append((stage, state, shown))
    return rows


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    else:
        yield prefix.rstrip(".") or "value", obj


def _short(value, limit=80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_html(title: str, root: Path, sections: list[str]) -> str:
    return PAGE.format(title=html.escape(title), root=html.escape(str(root)), sections="\n".join(sections))


# ---- the command's body ---------------------------------------------------------------------
def run_report(ws: Workspace, options: ReportOptions) -> ReportResult:
    """Write WS/report/*.png and the HTML page; returns where they are and what was skipped."""

    data = collect(ws)
    plan, metric = data.plan, data.plan["metric"]
    threshold = acceptance_threshold(float(metric["dense"]), float(plan["tolerance"]), bool(plan.get("absolute")))
    folder = ws.report_dir
    folder.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    status: dict[str, str] = {}
    pages: list[str] = []

    def figure(key: str, fig: Figure, alt: str, **fmt) -> str:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=options.dpi)
        path = folder / FIGURES[key].format(**fmt)
        path.write_bytes(buffer.getvalue())
        images.append(path)
        return image_tag(buffer.getvalue(), alt)

    # 1. the metric and the sizes
    body = figure("metric", metric_figure(data.scores, metric["name"], threshold), "dense vs pruned metric")
    body = (note(data.notes["metric"]) if "metric" in data.notes else "") + body
    body += table(score_rows(data.scores), (metric["name"], "value", "95% interval", "examples"))
    body += f"<p>{html.escape(plan_sentence(plan, threshold))}</p>"
    body += table(summary_rows(data), ("", "before", "after", "change"))
    body += note(data.notes["apply"]) if "apply" in data.notes else ""
    pages.append(section("summary", f"Dense vs pruned: {metric['name']}", body))
    status["summary"] = "shown"

    # 2. the kept-fraction map
    blocks, kinds, grid = kept_grid(plan)
    findings = describe_plan(plan)
    scored = [y for t in data.trials for _, y in t.uniform + t.adaptive]
    if len(scored) > 2 and max(scored) == min(scored):
        findings.append(f"Caution: all {len(scored)} evaluations scored {metric['name']} = {scored[0]:.4g}, so the "
                        f"search could not tell matrices apart; use more or harder search examples before "
                        f"reading this map.")
    title = f"kept fraction per matrix ({plan['strategy']} plan, {plan['method']} fit)"
    body = figure("heatmap", heatmap_figure(blocks, kinds, grid, title), "kept fraction heatmap")
    body += '<div class="finding">' + "".join(f"<p>{html.escape(f)}</p>" for f in findings) + "</div>"
    pages.append(section("heatmap", "Which matrices the task needs", body))
    status["heatmap"] = "shown"

    # 3. the fit spectra
    if data.spectra:
        body = "".join(figure("spectra", spectra_figure(c), f"fit spectra {c.method}", method=c.method)
                       for c in data.spectra if c.lines)
        body += ("<p>One line per block (colour); crosses mark the plan's matrices. Lower is better; a kind "
                 "whose lines fall fast can be pruned hard.</p>")
        status["spectra"] = "shown"
    else:
        body, status["spectra"] = note(data.notes["spectra"]), data.notes["spectra"]
    pages.append(section("spectra", "Fit spectra: output error vs kept fraction", body))

    # 4. accuracy vs parameters removed
    if "tradeoff" in data.notes:
        body, status["tradeoff"] = note(data.notes["tradeoff"]), data.notes["tradeoff"]
    else:
        params = plan["params"]
        share = params["prunable_before"] / params["model_before"] if params.get("model_before") else None
        chosen = (params["removed_fraction_prunable"], float(metric["plan"]))
        fig = tradeoff_figure(data.trials, float(metric["dense"]), threshold, chosen, metric["name"], share)
        body = figure("tradeoff", fig, "metric vs parameters removed")
        count = sum(len(t.uniform) + len(t.adaptive) for t in data.trials)
        body += f"<p>{count} evaluations on the search split; the front is the best metric reached at each removal.</p>"
        if len(data.trials) == 1 and len(data.spectra) > 1:
            body += note("Only one fit method was searched in this workspace (history.jsonl holds the last search).")
        status["tradeoff"] = "shown"
    pages.append(section("tradeoff", f"{metric['name'].capitalize()} vs parameters removed", body))

    # 5. the options
    pages.append(section("options", "Options used", table(options_rows(data.manifests), ("stage", "written", "options"))))

    model = (data.manifests.get("discover") or {}).get("inputs", {}).get("model", {})
    name = Path(str(model.get("id") or model.get("path") or "model")).name
    page = render_html(f"sieve report: {name}", ws.root, pages)
    out = Path(options.output) if options.output else folder / HTML_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    log.info("report: %s (%d figures)", out, len(images))
    return ReportResult(html=out, images=images, sections=status, findings=findings)


__all__ = ["ReportInputError", "ReportOptions", "ReportResult", "collect", "describe_plan", "heatmap_figure",
           "kept_grid", "metric_figure", "pareto_front", "run_report", "spectra_figure", "tradeoff_figure"]
