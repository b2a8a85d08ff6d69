"""`sieve report`: an HTML page with figures of what the workspace holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..report import ReportOptions, run_report
from ..workspace import Workspace
from .common import JsonOpt, WorkspaceOpt, console, print_json, sieve_command


@sieve_command
def report(
    workspace: WorkspaceOpt,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The HTML file to write (default WS/report/report.html).")] = None,
    dpi: Annotated[int, typer.Option("--dpi", help="Resolution of the PNG figures.")] = 110,
    as_json: JsonOpt = False,
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
    result = run_report(Workspace(workspace), ReportOptions(output=output, dpi=dpi))
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
