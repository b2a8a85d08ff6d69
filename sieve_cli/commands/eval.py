"""`sieve eval`: the task metric of the dense or a pruned model, with a 95% confidence interval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..evaluate import EvalOptions, run_eval
from ..tasks import SplitOptions, bind_task
from ..workspace import Workspace
from .common import DeviceOpt, ForceOpt, JsonOpt, WorkspaceOpt, console, print_json, sieve_command


@sieve_command
def eval(  # noqa: A001 - the command is called `eval`; cli.py imports it under another name
    workspace: WorkspaceOpt,
    task: Annotated[Optional[Path], typer.Option("--task", "-t", help="Task YAML to bind if the workspace has none (or to rebind with --force).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split part to score: test (reported numbers) or search.")] = "test",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N examples of the part.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="A pruned model folder from `sieve apply` (or any model folder); default: the dense model.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = 16,
    max_length: Annotated[int, typer.Option("--max-length", help="Longest sequence in tokens; longer contexts lose their beginning.")] = 1024,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Folder that `{data_root}` in the task's data_files means (default: $SIEVE_DATA_ROOT, else the nearest shared/data above the task file).")] = None,
    search_size: Annotated[float, typer.Option("--search-size", help="Search part when binding: a count, or a fraction below 1.")] = 0.2,
    test_size: Annotated[float, typer.Option("--test-size", help="Test part when binding: a count, or a fraction below 1.")] = 0.4,
    max_search: Annotated[int, typer.Option("--max-search", help="Cap on the search part when binding (it is scored many times).")] = 100,
    max_test: Annotated[int, typer.Option("--max-test", help="Cap on the test part when binding.")] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split's shuffle.")] = 0,
    device: DeviceOpt = "cpu",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: as discover).")] = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Score the workspace's model on the task's test (or search) part: metric, 95% CI, example count.

    Writes WS/eval/<model>-<split>/results.json (per-example scores included). Rerunning
    the same evaluation shows the stored result. Binding a task (--task) splits its examples
    by a seeded shuffle into test (40%, at most 300), search (20%, at most 100) and calibration
    (the rest); the split is recorded in WS/task and used by every later stage.

    Metrics: accuracy for multiple_choice (log-likelihood of each choice; acc_norm too),
    exact match for generate_until, next-token top-1 accuracy and perplexity for text_modelling.

    Examples:\n
      sieve discover model.gguf -w ws && sieve eval -w ws --task examples/tasks/sst2.yaml\n
      sieve eval -w ws --split search --limit 50\n
      sieve eval -w ws --model pruned/ --json\n
      SIEVE_DATA_ROOT=~/data sieve eval -w ws --task examples/tasks/trec.yaml
    """
    ws = Workspace(workspace)
    if task is not None:
        sizes = SplitOptions(search=search_size, test=test_size, max_search=max_search, max_test=max_test, seed=seed)
        bind_task(ws, task, force=force, split=sizes, data_root=data_root)
    options = EvalOptions(
        split=split, limit=limit, model=str(model) if model else None, batch_size=batch_size,
        max_length=max_length, device=device, dtype=dtype,
    )
    report = run_eval(ws, options, force=force)
    if as_json:
        print_json({k: v for k, v in report.items() if k != "per_example"})
        return
    render(report)
    console.print(f"results: {ws.eval_dir / report['run'] / 'results.json'}" + (" (stored result: inputs unchanged)" if report.get("reused") else ""))


def render(report: dict) -> None:
    table = Table(title=f"{report['task']} ({report['output_type']}), {report['split']} part, model: {report['model']}")
    for col in ("metric", "value", "95% CI", "examples"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    table.add_row(report["metric"], f"{report['value']:.2%}", f"{report['ci_low']:.2%} - {report['ci_high']:.2%}", str(report["n"]))
    extra = report["extra"]
    if "acc_norm" in extra:
        low, high = extra["acc_norm_ci"]
        table.add_row("acc_norm", f"{extra['acc_norm']:.2%}", f"{low:.2%} - {high:.2%}", str(report["n"]))
    if "perplexity" in extra:
        table.add_row("perplexity", f"{extra['perplexity']:.3f}", "", f"{extra['tokens']:,} tokens")
    console.print(table)
    if "chance" in extra:
        console.print(f"chance: {extra['chance']:.1%}")
    if report.get("seconds"):
        console.print(f"{report['seconds']:.1f} s, {report['input_tokens_per_second']:.0f} input tokens/s")
