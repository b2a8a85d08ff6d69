"""`sieve eval`: the task metric of the dense or a pruned model, with a 95% confidence interval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..options import EvalOptions, SplitOptions
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
    print_json,
    stage_command,
    workspace_path,
)


@stage_command(options=Group(EvalOptions), split=Group(SplitOptions))
def eval(  # noqa: A001 - the command is called `eval`; cli.py imports it under another name
    workspace: WorkspaceOpt = None,
    task: TaskOpt = None,
    data_root: DataRootOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    lm_eval_yaml: Annotated[Optional[Path], typer.Option(
        "--lm-eval-yaml", metavar="DIR",
        help="Also write the scored examples (this --split and --limit, rendered as sieve renders them) as an "
             "lm-evaluation-harness task into DIR, and print the lm_eval command that scores the same model on "
             "them (multiple_choice tasks; a pruned --model loads through its modeling_sieve.py).")] = None,
    *,
    options: EvalOptions,
    split: SplitOptions,
) -> None:
    """Score the workspace's model on the task's test (or search) part: metric, 95% CI, example count.

    Writes WS/eval/<model>-<split>/results.json (per-example scores included). Rerunning
    the same evaluation shows the stored result. Binding a task (--task) splits its examples
    by a seeded shuffle into test (25%, at most 300), confirm (30%, at most 400), search (25%,
    at most 200) and calibration (the rest); the split is recorded in WS/task and used by every
    later stage.

    Metrics: accuracy for multiple_choice (log-likelihood of each choice; acc_norm too),
    exact match for generate_until, next-token top-1 accuracy and perplexity for text_modelling.

    Examples:\n
      sieve discover model.gguf -w ws && sieve eval -w ws --task examples/tasks/sst2.yaml\n
      sieve eval -w ws --split search --limit 50\n
      sieve eval -w ws --model pruned/ --json\n
      sieve eval -w ws --model pruned/ --lm-eval-yaml lm_eval_tasks   # then run the lm_eval command it prints\n
      SIEVE_DATA_ROOT=~/data sieve eval -w ws --task examples/tasks/trec.yaml
    """
    # the stage loads torch: imported when the command runs, so `sieve --help` stays fast
    from ..evaluate import run_eval

    ws = Workspace(workspace_path(workspace))
    bind_given_task(ws, task, split, data_root, force)
    # before scoring, so a task or folder lm-eval cannot take is refused at once
    exported = None if lm_eval_yaml is None else export_lm_eval(ws, options, lm_eval_yaml)
    report = run_eval(ws, options, force=force)
    if as_json:
        print_json({k: v for k, v in report.items() if k != "per_example"} | ({"lm_eval": exported} if exported else {}))
        return
    render(report)
    console.print(f"results: {ws.eval_dir / report['run'] / 'results.json'}" + (" (stored result: inputs unchanged)" if report.get("reused") else ""))
    if exported:
        console.print(f"lm-eval task {exported['task']} ({report['n']} examples, the ones scored above) in "
                      f"{exported['include_path']}; score it with:\n  {exported['command']}", highlight=False, soft_wrap=True)


def export_lm_eval(ws: Workspace, options: EvalOptions, folder: Path) -> dict:
    """Write the lm-eval task of the examples `options` scores; its name, folder and the lm_eval command."""
    from ..lm_eval_task import lm_eval_command, lm_eval_model_args, write_lm_eval_task
    from ..tasks import bind_task

    model_args = lm_eval_model_args(ws, options.model, options.dtype)
    name = write_lm_eval_task(bind_task(ws, None), options.split, folder, limit=options.limit)
    include_path = str(folder.expanduser().resolve())
    return {"task": name, "include_path": include_path, "model_args": model_args,
            "command": lm_eval_command(model_args, include_path, name, options.device)}


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
    if report.get("layout"):
        console.print(layout_line(report["layout"]))


def layout_line(layout: dict) -> str:
    """How the model was held, and the peak estimated for it (search's summary holds the same)."""
    how = {"memory": "whole model on the device", "spread": "spread over the devices (device_map=auto)",
           "blockwise": f"streamed block by block (hidden states on {layout.get('hidden_cache')})"}[layout["mode"]]
    return f"layout: {how}, estimated peak {layout['estimate']['total_bytes'] / 2**30:.2f} GiB"
