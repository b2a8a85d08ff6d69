"""`sieve fit`: per-matrix factor bases and error spectra from the capture statistics."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import InputError
from ..fit import METHODS, SUMMARY_LEVELS, FitOptions, run_fit
from ..workspace import Workspace
from .common import DeviceOpt, ForceOpt, JsonOpt, WorkspaceOpt, console, print_json, sieve_command

MethodOpt = Annotated[
    Optional[list[str]],
    typer.Option("--method", "-m", help="output (exact, default), learned (the paper's Adam), svd or pca; repeat, "
                 "comma-separate or say 'all' for several."),
]


@sieve_command
def fit(
    workspace: WorkspaceOpt,
    method: MethodOpt = None,
    device: DeviceOpt = "cpu",
    levels: Annotated[str, typer.Option("--levels", help="learned: kept fractions to train factors for, comma-separated.")] = "0.9,0.75,0.5",
    init: Annotated[str, typer.Option("--init", help="learned: start from 'random' (the paper) or the 'output' optimum.")] = "random",
    epochs: Annotated[int, typer.Option("--epochs", help="learned: passes over the captured sample rows.")] = 2,
    lr: Annotated[float, typer.Option("--lr", help="learned: Adam learning rate.")] = 1e-3,
    batch_rows: Annotated[int, typer.Option("--batch-rows", help="learned: sample rows per Adam step.")] = 5000,
    seed: Annotated[int, typer.Option("--seed", help="learned: seed of the initialisation and row order.")] = 0,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Fit low-rank factors for every prunable matrix, from the statistics `sieve capture` wrote.

    Writes WS/fit/METHOD/ (factors.safetensors, spectrum.json, manifest.json); methods coexist.
    The default method, output, is the exact optimum of each matrix's output error on the task
    data: one decomposition gives every rank, so `sieve search` can try any pruning level.

    Examples:\n
      sieve fit -w ws\n
      sieve fit -w ws --method svd --method pca\n
      sieve fit -w ws -m learned --levels 0.9,0.5 --init output --epochs 10\n
      sieve fit -w ws -m all --device cuda
    """
    ws = Workspace(workspace)
    parsed_levels = _floats(levels, "--levels")
    summaries = []
    for name in _methods(method):
        options = FitOptions(method=name, device=device, levels=parsed_levels, init=init, lr=lr,
                             epochs=epochs, batch_rows=batch_rows, seed=seed)
        summaries.append(run_fit(ws, options, force=force))
    if as_json:
        print_json(summaries)
        return
    render(summaries)
    console.print(f"workspace: {ws.root} (fit/{'|'.join(s['method'] for s in summaries)})")


def _methods(given: list[str] | None) -> list[str]:
    names = [n.strip() for item in (given or ["output"]) for n in item.split(",") if n.strip()]
    if "all" in names:
        return list(METHODS)
    for name in names:
        if name not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)} or all, got {name!r}")
    return list(dict.fromkeys(names))


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{flag} takes comma-separated numbers such as 0.9,0.75,0.5, got {text!r}") from None


def render(summaries: list[dict]) -> None:
    levels = sorted({float(p) for s in summaries for p in s["levels"]} | set(SUMMARY_LEVELS), reverse=True)
    table = Table(title="Mean relative output error ||WX - W'X||^2 / ||WX||^2 per matrix kind, by kept fraction")
    for col in ("method", "kind", "matrices", *(f"{p:g} kept" for p in levels)):
        table.add_column(col, justify="left" if col in ("method", "kind") else "right")
    for s in summaries:
        counts = s.get("counts", {})
        for kind, per_level in s["relative_error"].items():
            cells = [_cell(per_level.get(str(p))) for p in levels]
            table.add_row(s["method"], kind, str(counts.get(kind, "")), *cells)
        table.add_section()
    console.print(table)
    for s in summaries:
        note = " (up to date, not rerun)" if s.get("up_to_date") else ""
        load = f", model load {s['load_seconds']:.1f} s" if s.get("load_seconds") else ""
        console.print(f"{s['method']}: {s['matrices']} matrices fitted in {s['seconds']:.1f} s{load}{note}")


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}" if value >= 1e-3 else f"{value:.2e}"
