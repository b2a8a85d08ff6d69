"""The report: one self-contained HTML page (and its PNG figures) of what a workspace holds.

Nothing is recomputed: the page is read from the stages' files (discover's matrices, the fit
spectra, the search plan and history, the apply and eval outputs). Reading is kept apart
from drawing: `read.collect` turns the workspace into plain data, `figures` turns plain data
into matplotlib Figures (no pyplot, so no display is ever needed), `summary` says what the
plan means in sentences, and `page` puts it all on one page. A section whose inputs are
missing is skipped with a note.
"""

from __future__ import annotations

import html
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ..acceptance import acceptance_threshold
from ..files import make_dir, write_bytes_atomic, write_text_atomic
from ..options import ReportOptions
from ..workspace import Stage, Workspace
from .figures import heatmap_figure, metric_figure, spectra_figure, tradeoff_figure
from .page import (
    image_tag,
    note,
    options_rows,
    part_rows,
    plan_sentence,
    render_html,
    score_rows,
    section,
    summary_rows,
    table,
)
from .read import ReportInputError, collect
from .summary import describe_plan, kept_grid, pareto_front

log = logging.getLogger(__name__)

STAGE = Stage.REPORT
FIGURES = {
    "metric": "metric.png",
    "heatmap": "kept_heatmap.png",
    "spectra": "spectra_{method}.png",
    "tradeoff": "tradeoff.png",
}


@dataclass
class ReportResult:
    html: Path
    images: list[Path]
    sections: dict[str, str]  # section -> "shown" or why it was skipped
    findings: list[str]  # the sentences the page says about the plan


def run_report(ws: Workspace, options: ReportOptions) -> ReportResult:
    """Write WS/report/*.png and the HTML page; returns where they are and what was skipped."""

    data = collect(ws)
    plan, metric = data.plan, data.plan["metric"]
    threshold = acceptance_threshold(float(metric["dense"]), float(plan["tolerance"]), bool(plan.get("absolute")))
    folder = ws.report_dir
    make_dir(folder)
    images: list[Path] = []
    status: dict[str, str] = {}
    pages: list[str] = []

    def figure(key: str, fig: Figure, alt: str, **fmt) -> str:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=options.dpi)
        path = ws.inside(folder / FIGURES[key].format(**fmt))
        write_bytes_atomic(path, buffer.getvalue())
        images.append(path)
        return image_tag(buffer.getvalue(), alt)

    # 1. the metric and the sizes
    body = figure("metric", metric_figure(data.scores, metric["name"], threshold), "dense vs pruned metric")
    body = (note(data.notes["metric"]) if "metric" in data.notes else "") + body
    body += table(score_rows(data.scores), (metric["name"], "value", "95% interval", "examples"))
    body += table(*part_rows(data.scores))
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
    out = Path(options.output) if options.output else ws.report_html
    write_text_atomic(out, page)  # a link at WS/report/report.html is replaced, never written through
    log.info("report: %s (%d figures)", out, len(images))
    return ReportResult(html=out, images=images, sections=status, findings=findings)


__all__ = ["ReportInputError", "ReportOptions", "ReportResult", "collect", "describe_plan", "heatmap_figure",
           "kept_grid", "metric_figure", "pareto_front", "run_report", "spectra_figure", "tradeoff_figure"]
