"""`sieve heal`: LoRA recovery fine-tuning of the plan's factored model on the calibration part."""

from __future__ import annotations

from ..options import HEAL_LOSSES, HealOptions
from ..workspace import Workspace
from .common import ForceOpt, Group, JsonOpt, WorkspaceOpt, console, human, print_json, stage_command, workspace_path


@stage_command(options=Group(HealOptions))
def heal(
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    *,
    options: HealOptions,
) -> None:
    """Recover accuracy lost to pruning: LoRA adapters trained on the task's calibration part, merged into the factors.

    Builds the model that WS/search/plan.json describes, puts a LoRA adapter (peft) on both thin
    maps of every factored matrix and trains only the adapters, on the calibration examples
    (never search, confirm or test). The default loss, ce, is next-token cross-entropy on the
    rendered calibration text, gold answers included (measured against distill:
    docs/benchmarks.md); --loss distill matches the dense model's next-token
    distribution at every position instead. The adapters are then merged into the factors: the healed model has exactly the pruned
    model's parameter count and file size. Writes WS/heal/ (the healed factors, losses.json);
    `sieve apply --healed -o OUT` builds the healed model from them. A killed run resumes from its
    last checkpoint (--checkpoint-every) when rerun with the same flags.

    Examples:\n
      sieve heal -w ws\n
      sieve heal -w ws --steps 200 --lr 5e-4 --lora-rank 16\n
      sieve heal -w ws --loss distill && sieve apply -w ws --healed -o healed-model
    """
    # the stage loads torch: imported when the command runs, so `sieve --help` stays fast
    from ..heal import run_heal

    ws = Workspace(workspace_path(workspace))
    summary = run_heal(ws, options, force=force)
    if as_json:
        print_json(summary)
        return
    render(summary)


def render(summary: dict) -> None:
    if summary.get("up_to_date"):
        console.print("[dim]heal is up to date (same plan and options); --force heals again.[/]")
    console.print(
        f"healed with {summary['loss']} ({HEAL_LOSSES[summary['loss']]}): {summary['steps']} steps on "
        f"{summary['calibration_examples']} calibration examples ({human(summary['tokens'])} tokens), "
        f"{human(summary['adapter_params'])} adapter parameters, {summary['seconds']} s\n"
        f"loss {summary['first_loss']:.4f} -> [bold]{summary['last_loss']:.4f}[/] (first and last steps); "
        f"the merged model keeps {human(summary['params'])} parameters\n"
        f"next: sieve apply -w WS --healed -o OUT"
    )
