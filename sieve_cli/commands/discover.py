"""`sieve discover`: the model's matrices by type, with parameter counts."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..options import DiscoverOptions
from ..workspace import Workspace
from .common import (
    ForceOpt,
    Group,
    JsonOpt,
    WorkspaceOpt,
    console,
    human,
    print_json,
    stage_command,
    workspace_path,
)


@stage_command(options=Group(DiscoverOptions))
def discover(
    model: Annotated[str, typer.Argument(help="Hub id, local Hugging Face folder, or .gguf file.")],
    workspace: WorkspaceOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every prunable matrix.")] = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    *,
    options: DiscoverOptions,
) -> None:
    """List the model's prunable matrices by type, with true parameter counts, and bind it to the workspace.

    Examples:\n
      sieve discover path/to/model.gguf\n
      sieve discover ./my-hf-model -w ws --verbose\n
      sieve discover gpt2 --json
    """
    # the stage loads torch: imported when the command runs, so `sieve --help` stays fast
    from ..discover import run_discover

    ws = Workspace(workspace_path(workspace))
    result = run_discover(ws, options, force=force)
    if as_json:
        print_json(result if verbose else {k: v for k, v in result.items() if k != "matrices"})
        return
    render(result, verbose)


def render(result: dict, verbose: bool) -> None:
    console.print(
        f"[bold]{result['architecture']}[/] ({result['model_type']}): {result['blocks']} blocks, "
        f"{result['total_params']:,} parameters, {result['linear_layers']} linear layers"
    )
    table = Table(title="Parameters by type (matrix weights; biases and norms under 'other')")
    for col in ("type", "matrices", "parameters", "share of model"):
        table.add_column(col, justify="right" if col != "type" else "left")
    for name, g in result["groups"].items():
        label = {"other": "other (norms, biases)"}.get(name, name) + (" (tied to embedding)" if g.get("tied") else "")
        count = "" if name == "other" else str(g["count"])
        table.add_row(label, count, f"{g['params']:,}", f"{g['share']:.1%}")
    console.print(table)
    console.print(
        f"prunable: {result['prunable']} matrices, {result['prunable_params']:,} parameters "
        f"({result['prunable_share']:.1%} of the model)"
    )
    ready = "[green]ready[/] to prune" if result["ready"] else "[red]not ready[/]: no prunable matrices"
    console.print(ready)
    if verbose:
        detail = Table(title="Prunable matrices")
        for col in ("name", "kind", "shape (out x in)", "params", "input site"):
            detail.add_column(col)
        for m in result["matrices"]:
            detail.add_row(m["name"], m["kind"], f"{m['out_features']} x {m['in_features']}", human(m["params"]), m["site"])
        console.print(detail)
