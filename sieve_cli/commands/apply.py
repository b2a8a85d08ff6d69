"""`sieve apply`: execute the search's plan, writing the pruned model to a folder."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer
from rich.table import Table

from ..options import DENSE_ABOVE, ApplyOptions
from ..workspace import Workspace
from .common import (
    ForceOpt,
    Group,
    JsonOpt,
    OutOpt,
    WorkspaceOpt,
    console,
    file_size,
    print_json,
    stage_command,
    workspace_path,
)


@stage_command(options=Group(ApplyOptions))
def apply(
    out: OutOpt,
    workspace: WorkspaceOpt = None,
    speed_crossover: Annotated[bool, typer.Option(
        "--speed-crossover", help=f"Same as --dense-above {DENSE_ABOVE}: above that kept fraction two thin matmuls "
                                  "ran slower than one dense one on a CPU, so such matrices stay dense.")] = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    *,
    options: ApplyOptions,
) -> None:
    """Build the pruned model from the base model and the plan, and save it to OUT.

    OUT holds the config, the tokenizer, sieve.json (base model, plan, fit method),
    model.safetensors with the factored weights and modeling_sieve.py. Load it with
    sieve_cli.load_pruned(OUT), or without sieve with transformers'
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True); score it with
    `sieve eval --model OUT`. A width plan (`--method width`) whose kept blocks all share
    one MLP width and one number of KV groups gives a standard folder of the input family
    instead (smaller intermediate_size, fewer heads and layers, no modeling file): plain
    AutoModelForCausalLM.from_pretrained(OUT) loads it.

    Examples:\n
      sieve apply -w ws -o pruned-model\n
      sieve apply -w ws -o pruned-model --dry-run\n
      sieve apply -w ws -o pruned-bf16 --dtype bfloat16 --plan other/plan.json --force\n
      sieve apply -w ws -o pruned-int8 --quantize int8\n
      sieve apply -w ws -o pruned-task --vocab task --vocab-extra 2048
    """
    # the stage loads torch: imported when the command runs, so `sieve --help` stays fast
    from ..apply import run_apply

    if speed_crossover:
        options = replace(options, dense_above=DENSE_ABOVE)
    result = run_apply(Workspace(workspace_path(workspace)), options, force=force)
    if as_json:
        print_json(result)
        return
    render(result)


def render(result: dict) -> None:
    predicted = result["predicted"]
    title = "Predicted from the plan (dry run: nothing written)" if predicted else f"Pruned model written to {result['out']}"
    if result.get("up_to_date"):
        title = f"Up to date: {result['out']} already holds this plan's model"
    table = Table(title=title)
    for col in ("", "before", "after", "after / before"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("parameters (whole model)", f"{result['params_before']:,}", f"{result['params_after']:,}", f"{result['params_ratio']:.3f}")
    table.add_row("parameters (prunable matrices)", f"{result['prunable_before']:,}", f"{result['prunable_after']:,}",
                  f"{result['prunable_after'] / result['prunable_before']:.3f}" if result["prunable_before"] else "-")
    size_label = "weights file (predicted)" if predicted else "weights file"
    table.add_row(size_label, file_size(result['dense_file_bytes']), file_size(result['file_bytes']), f"{result['size_ratio']:.3f}")
    console.print(table)
    counts = result["matrices"]
    console.print(
        f"removed {result['removed_fraction_model']:.1%} of the model ({result['removed_fraction_prunable']:.1%} of "
        f"the prunable part; {'predicted' if predicted else 'counted from the model'}); {result['dtype']}, fit method "
        f"{result['method']}"
    )
    if "narrowed" in counts:  # a width plan
        console.print(f"modules: {counts['narrowed']} narrowed (or removed), {counts['dense']} whole by the plan")
        if result.get("standard"):
            console.print(f"a standard folder of the input family: AutoModelForCausalLM.from_pretrained("
                          f"{result['out']!r}) loads it, no remote code")
    else:
        line = f"matrices: {counts['factored']} factored, {counts['dense']} dense by the plan"
        if counts["product"]:
            line += f", {counts['product']} stored dense as B·A (kept fraction > {result['dense_above']})"
        console.print(line)
    if result.get("vocab"):
        console.print(vocab_line(result["vocab"]))
    slow = result.get("factored_above_crossover", 0)
    if slow:
        console.print(f"[dim]{slow} factored matrices keep more than {DENSE_ABOVE} of their parameters: on a CPU they "
                      f"run slower than dense; --speed-crossover keeps them dense (no size saving)[/]")


def vocab_line(vocab: dict) -> str:
    """What --vocab task did to the head (and, for a tied head, what it could not save)."""
    sources = vocab["from"]
    line = (f"task vocabulary: the head scores {vocab['kept']:,} of {vocab['vocab_size']:,} token ids ({sources['task']:,} "
            f"from the task's texts, {sources['special']:,} special, {sources['extra']:,} lowest others); ")
    if vocab["tied"]:
        line += ("the head is tied to the token embedding, which stays whole and tied: no parameters saved, only the "
                 "head's compute")
    else:
        line += f"{vocab['head_params_removed']:,} head parameters removed"
    if vocab.get("standard_fallback"):
        line += "; a standard folder cannot hold this head, so OUT is the custom folder (trust_remote_code)"
    return line
