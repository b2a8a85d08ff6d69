"""`sieve search`: a rank per matrix, judged by the task metric on the search split."""

from __future__ import annotations

from rich.table import Table

from ..options import SearchOptions
from ..plan import Plan
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


@stage_command(options=Group(SearchOptions))
def search(
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    *,
    options: SearchOptions,
) -> None:
    """Decide how much of each matrix to keep; writes WS/search/plan.json for `sieve apply`.

    Cost, in evaluations (each scores the search part, all of it unless --limit, with the
    candidate's ranks swapped into the model): uniform: dense + 7 (--grid-step 0.01), then 1 to 7
    on the confirm part. seeds: + up to 8, as one batch. local: the seeds + at most
    --local-budget (16), --local-moves (4) per batch, ending after --local-patience (2) steps
    without gain. genetic: the seeds + about --population (16) x --generations (8). adaptive is
    local. Measured seconds and removals per strategy: docs/benchmarks.md. An interrupted search
    resumes from its last step or generation when rerun with the same flags; another --strategy
    keeps the previous plan in WS/search/<strategy>/.

    Examples:\n
      sieve search -w ws --strategy uniform --tolerance 0.05\n
      sieve search -w ws --strategy adaptive --tolerance 0.01\n
      sieve search -w ws -s local --local-budget 32   (slower, more removal)\n
      sieve search -w ws -s adaptive --workers 2   (on 2 Ray workers; needs the distributed extra)\n
      sieve search -w ws -s uniform --tolerance 0.02 --absolute --method svd\n
      sieve search -w ws -s adaptive --method width --uniform-shape   (a plan plain transformers loads)\n
      sieve search -w ws -s uniform --method width --heal-steps 30   (judged after healing)
    """
    # the stage loads torch: imported when the command runs, so `sieve --help` stays fast
    from ..search import run_search

    ws = Workspace(workspace_path(workspace))
    plan = run_search(ws, options, force=force)
    if as_json:
        print_json({k: v for k, v in plan.items() if k != "matrices"})
        return
    render(plan)
    console.print(f"plan: {ws.plan_json}")


def _cell(kept: float) -> str:
    colour = "green" if kept >= 1 else "yellow" if kept >= 0.5 else "red"
    return f"[{colour}]{'dense' if kept >= 1 else f'{kept:.2f}'}[/]"


def render(data: dict) -> None:
    if data.get("up_to_date"):
        console.print("[dim]search is up to date (same inputs); showing the existing plan. --force searches again.[/]")
    plan = Plan.parse(data).describable()
    kinds = plan.kinds()
    table = Table(title=f"Kept fraction per block and matrix kind ({plan.strategy}, fit {plan.method})")
    table.add_column("block", justify="right")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for block, row in plan.kept_by_block().items():
        table.add_row(str(block), *(_cell(row[k]) if k in row else "" for k in kinds))
    by_kind = plan.params_by_kind()
    table.add_row("all", *(f"[bold]{by_kind[k][0] / by_kind[k][1]:.2f}[/]" for k in kinds), end_section=True)
    console.print(table)
    p, m, s = plan.params, plan.metric, data.get("search", {})
    tol = f"{data['tolerance']:g}" + (" (absolute)" if data["absolute"] else f" = {data['tolerance']:.0%} of dense")
    console.print(
        f"whole model: {human(p['model_before'])} -> {human(p['model_after'])} parameters, "
        f"[bold]{p['removed_fraction_model']:.1%} removed[/]\n"
        f"prunable {'modules' if plan.method == 'width' else 'matrices'}: {human(p['prunable_before'])} -> "
        f"{human(p['prunable_after'])} parameters, {p['removed_fraction_prunable']:.1%} of them removed\n"
        f"search split {m['name']}: dense {m['dense']:.4f}, plan {m['plan']:.4f} (tolerance {tol})"
    )
    if s:
        extra = f", {s['generations']} generations, stopped by {s['stopped']}" if "generations" in s else ""
        console.print(f"uniform p = {s.get('uniform_p')}; {s.get('evaluations')} evaluations{extra}; "
                      f"{s.get('seconds')} s")
        if s.get("healed"):
            h = s["healed"]
            console.print(f"judged healed ({h['steps']} LoRA steps, `sieve heal --steps {h['steps']}` rebuilds it) "
                          f"against {h['reference']}: the unhealed plan removed {h['unhealed_removed']:.1%} of the "
                          f"prunable part, healing each candidate took it further by x{h['scale']:.2f} "
                          f"({h['heals']} heals)")
        if s.get("shape"):
            sh = s["shape"]
            console.print(f"uniform shape: every MLP keeps {sh['mlp']:.2f}, attention {sh['attention']:.2f}, "
                          f"{len(sh['dropped'])} blocks removed {sh['dropped']}")
        console.print(confirm_line(data))


def confirm_line(plan: dict) -> str:
    """The plan's evidence: its lower bound on the search part, and how it fared on the confirm part."""
    s, m = plan.get("search", {}), plan["metric"]
    line = f"accepted at {s.get('confidence', 0.5):.0%} confidence: lower bound {s.get('lower', m['plan']):.4f} on the search part"
    c = s.get("confirm")
    if c is None:
        return line + "; not confirmed (no confirm part in this task's split)"
    held = "held" if c["back_off"] == 0 else f"held after backing off {c['back_off']:.0%} toward dense"
    return line + (f"; confirm part ({c['examples']} examples): dense {c['dense']:.4f}, plan {c['plan']:.4f} "
                   f"(lower bound {c['lower']:.4f}), {held}")
