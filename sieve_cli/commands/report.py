"""`sieve report`: an HTML page with figures of what the workspace holds."""

from __future__ import annotations

from ..options import ReportOptions
from ..workspace import Workspace
from .common import (
    Group,
    JsonOpt,
    WorkspaceOpt,
    console,
    print_json,
    stage_command,
    workspace_path,
)


@stage_command(options=Group(ReportOptions))
def report(
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
    *,
    options: ReportOptions,
) -> None:
    """Write a self-contained HTML report (figures embedded) and its PNGs in WS/report/.

    Shows the dense vs pruned metric, parameters and size, the kept fraction of every
    matrix as a heatmap, the fit spectra and the metric vs parameters removed by the
    search. Reads the workspace only; sections whose stage has not run are skipped.

    Examples:\n
      sieve report -w ws\n
      sieve report -w ws -o smollm2-python.html\n
      sieve report -w ws --json
    """
    # matplotlib and torch: imported when the command runs, so `sieve --help` stays fast
    from ..report import run_report

    result = run_report(Workspace(workspace_path(workspace)), options)
    if as_json:
        print_json({"html": str(result.html), "images": [str(p) for p in result.images],
                    "sections": result.sections, "findings": result.findings})
        return
    for name, state in result.sections.items():
        mark = "[green]shown[/]" if state == "shown" else f"[yellow]skipped[/]: {state}"
        console.print(f"  {name}: {mark}", highlight=False, soft_wrap=True)
    for finding in result.findings:
        console.print(f"  {finding}", highlight=False, soft_wrap=True)
    console.print(f"report: {result.html} ({len(result.images)} figures in {result.images[0].parent})"
                  if result.images else f"report: {result.html}")
