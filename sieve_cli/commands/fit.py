"""`sieve fit`: per-matrix factor bases and error spectra from the capture statistics."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import InputError
from ..options import FIT_METHODS, SUMMARY_LEVELS, FitOptions, fitted_what
from ..workspace import Workspace
from .common import (
    ForceOpt,
    Group,
    JsonOpt,
    WorkspaceOpt,
    console,
    print_json,
    stage_command,
    workspace_path,
)

MethodsOpt = Annotated[
    Optional[list[str]],
    typer.Option("--method", "-m", help="output (exact, default), learned (the paper's Adam), svd or pca; repeat, "
                 "comma-separate or say 'all' for several."),
]


@stage_command(options=Group(FitOptions, exclude=("method",)))
def fit(
    workspace: WorkspaceOpt = None,
    method: MethodsOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    *,
    options: FitOptions,
) -> None:
    """Fit low-rank factors for every prunable matrix, from the statistics `sieve capture` wrote.

    Writes WS/fit/METHOD/ (factors.json + factors-block-NNN.safetensors, spectrum.json,
    manifest.json); methods coexist. The default method, output, is the exact optimum of each
    matrix's output error on the task data: one decomposition gives every rank, so `sieve
    search` can try any pruning level. learned trains the paper's two factors by full-batch
    Adam on the same loss, per --levels rank, until its loss stops falling.

    Examples:\n
      sieve fit -w ws\n
      sieve fit -w ws --method svd --method pca\n
      sieve fit -w ws -m learned --levels 0.9,0.5 --max-steps 5000\n
      sieve fit -w ws -m all --device cuda
    """
    # the stage loads torch: imported when the command runs, so `sieve --help` stays fast
    from ..fit import run_fit

    ws = Workspace(workspace_path(workspace))
    summaries = [run_fit(ws, replace(options, method=name), force=force) for name in _methods(method)]
    if as_json:
        print_json(summaries)
        return
    render(summaries)


def _methods(given: list[str] | None) -> list[str]:
    names = [n.strip() for item in (given or [FitOptions.method]) for n in item.split(",") if n.strip()]
    if "all" in names:
        return list(FIT_METHODS)
    for name in names:
        if name not in FIT_METHODS:
            raise InputError(f"--method must be one of {', '.join(FIT_METHODS)} or all, got {name!r}")
    return list(dict.fromkeys(names))


def render(summaries: list[dict]) -> None:
    levels = sorted({float(p) for s in summaries for p in s["levels"]} | set(SUMMARY_LEVELS), reverse=True)
    table = Table(title="Mean relative output error ||WX - W'X||^2 / ||WX||^2 per matrix kind, by kept fraction")
    for col in ("method", "kind", "count", *(f"{p:g} kept" for p in levels)):
        table.add_column(col, justify="left" if col in ("method", "kind") else "right")
    for s in summaries:
        counts = s.get("counts", {})
        for kind, per_level in s["relative_error"].items():
            cells = [_cell(per_level.get(str(p))) for p in levels]
            table.add_row(s["method"], kind, str(counts.get(kind, "")), *cells)
            if "optimum_error" in s:  # learned: the exact optimum at the same ranks, its lower bound
                optimum = s["optimum_error"].get(kind, {})
                table.add_row("  (optimum)", kind, "", *[_cell(optimum.get(str(p))) for p in levels])
        table.add_section()
    console.print(table)
    for s in summaries:
        note = " (up to date, not rerun)" if s.get("up_to_date") else ""
        load = f", model load {s['load_seconds']:.1f} s" if s.get("load_seconds") else ""
        console.print(f"{s['method']}: {s['matrices']} {fitted_what(s['method'])} fitted in {s['seconds']:.1f} s{load}{note}")
        if "steps" in s:
            steps = [v for per_level in s["steps"].values() for v in per_level.values()]
            console.print(f"  Adam steps per rank: mean {sum(steps) / len(steps):.0f}; stopped: {s['stopped']}")


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}" if value >= 1e-3 else f"{value:.2e}"
