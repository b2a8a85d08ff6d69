"""`sieve capture`: the task's calibration text through the model -> per-site statistics."""

from __future__ import annotations

from rich.table import Table

from ..options import CaptureOptions, SplitOptions
from ..workspace import Workspace
from .common import (
    DataRootOpt,
    ForceOpt,
    Group,
    JsonOpt,
    TaskOpt,
    WorkspaceOpt,
    bind_given_task,
    console,
    human,
    print_json,
    stage_command,
    workspace_path,
)


@stage_command(options=Group(CaptureOptions), split=Group(SplitOptions))
def capture(
    workspace: WorkspaceOpt = None,
    task: TaskOpt = None,
    data_root: DataRootOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    *,
    options: CaptureOptions,
    split: SplitOptions,
) -> None:
    """Run the task's calibration split through the model and store per-site statistics.

    Writes WS/capture/stats.zarr: per input site, the float64 Gram matrix of the inputs and
    a sample of raw rows. Interrupted? Rerun the same command to continue where it stopped.

    Examples:\n
      sieve capture -w ws --task examples/tasks/sst2.yaml\n
      sieve capture -w ws --tokens 50000 --batch-size 8 --device cuda --dtype bfloat16\n
      sieve capture -w ws --task other.yaml --force\n
      sieve capture -w ws --mode blockwise --memory-budget 20GiB
    """
    # the stage loads torch: imported when the command runs, so `sieve --help` stays fast
    from ..capture import run_capture

    ws = Workspace(workspace_path(workspace))
    bind_given_task(ws, task, split, data_root, force)
    summary = run_capture(ws, options, force=force)
    if as_json:
        print_json(summary)
        return
    render(ws, summary)


def render(ws: Workspace, summary: dict) -> None:
    if summary.get("up_to_date"):
        console.print(f"capture is up to date in {ws.root}; nothing to do (--force recomputes it)")
    table = Table(title=f"Capture: {summary.get('task', '?')}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    run = summary.get("tokens_run", summary["tokens"])
    tokens = f"{run:,} run"
    if summary.get("exhausted"):
        tokens += f" (all the calibration split; {summary['requested_tokens']:,} requested)"
    table.add_row("tokens", tokens)
    if "examples_covered" in summary:
        table.add_row("calibration examples", f"{summary['examples_covered']:,} covered of {summary.get('examples', 0):,}")
        repeated = summary.get("repeated_prefix_tokens", 0)
        table.add_row("shared prefixes", f"{summary.get('prefixes', 0)} run once, counted per example: "
                                         f"{repeated:,} repeated prefix tokens not run ({summary['tokens']:,} tokens counted)")
    else:
        table.add_row("calibration examples", f"{summary.get('examples', 0):,}")
    table.add_row("input sites", str(summary["sites"]))
    table.add_row("samples per site", human(summary["samples_per_site"]))
    table.add_row("chunks", f"{summary['chunks']} (resumed from chunk {summary['resumed_from_chunk']})" if summary.get("resumed_from_chunk") else str(summary["chunks"]))
    if "seconds" in summary:
        table.add_row("time", f"{summary['seconds']:.1f} s ({summary['tokens_this_run'] / max(summary['seconds'], 1e-9):,.0f} tokens/s)")
    if "estimate" in summary:
        table.add_row("mode", f"{summary['mode']} (estimated peak {summary['estimate']['total_bytes'] / 2**30:.2f} GiB)")
    if summary.get("stats_kept", True):
        table.add_row("store", str(ws.root / summary["store"]))
    else:
        table.add_row("statistics", "not kept (--keep-stats writes them); fit/output done block by block")
    console.print(table)
