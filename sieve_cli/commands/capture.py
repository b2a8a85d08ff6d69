"""`sieve capture`: the task's calibration text through the model -> per-site statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..capture import CaptureOptions, run_capture
from ..workspace import Workspace
from .common import DeviceOpt, ForceOpt, JsonOpt, WorkspaceOpt, console, human, print_json, sieve_command


@sieve_command
def capture(
    workspace: WorkspaceOpt,
    task: Annotated[Optional[Path], typer.Option("--task", help="Task YAML; omit to use the task bound to the workspace.")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Calibration tokens to capture (padding excluded).")] = CaptureOptions.tokens,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = CaptureOptions.batch_size,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Longer examples are cut into pieces of this many tokens.")] = CaptureOptions.seq_len,
    samples_per_site: Annotated[int, typer.Option("--samples-per-site", help="Raw input rows kept per site (float16, seeded reservoir).")] = CaptureOptions.samples_per_site,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", help="Tokens per resume chunk: the store is flushed after each.")] = CaptureOptions.chunk_tokens,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the reservoir sample.")] = CaptureOptions.seed,
    device: DeviceOpt = CaptureOptions.device,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Compute dtype: float32, bfloat16 or float16 (default: the one discover used).")] = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run the task's calibration split through the model and store per-site statistics.

    Writes WS/capture/stats.zarr: per input site, the float64 Gram matrix of the inputs and
    a sample of raw rows. Interrupted? Rerun the same command to continue where it stopped.

    Examples:\n
      sieve capture -w ws --task examples/tasks/sst2.yaml\n
      sieve capture -w ws --tokens 50000 --batch-size 8 --device cuda --dtype bfloat16\n
      sieve capture -w ws --task other.yaml --force
    """
    options = CaptureOptions(
        task=str(task) if task is not None else None, tokens=tokens, batch_size=batch_size, seq_len=seq_len,
        samples_per_site=samples_per_site, chunk_tokens=chunk_tokens, seed=seed, device=device, dtype=dtype,
    )
    ws = Workspace(workspace)
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
    tokens = f"{summary['tokens']:,}"
    if summary.get("exhausted"):
        tokens += f" (all the calibration split; {summary['requested_tokens']:,} requested)"
    table.add_row("tokens", tokens)
    table.add_row("calibration examples", f"{summary.get('examples', 0):,}")
    table.add_row("input sites", str(summary["sites"]))
    table.add_row("samples per site", human(summary["samples_per_site"]))
    table.add_row("chunks", f"{summary['chunks']} (resumed from chunk {summary['resumed_from_chunk']})" if summary.get("resumed_from_chunk") else str(summary["chunks"]))
    if "seconds" in summary:
        table.add_row("time", f"{summary['seconds']:.1f} s ({summary['tokens_this_run'] / max(summary['seconds'], 1e-9):,.0f} tokens/s)")
    table.add_row("store", str(ws.root / summary["store"]))
    console.print(table)
