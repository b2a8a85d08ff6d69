"""`sieve search`: a rank per matrix, judged by the task metric on the search split."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ..genetic import DEFAULT_LEVELS
from ..search import SearchOptions, kept_by_block, run_search
from ..workspace import Workspace
from .common import DeviceOpt, ForceOpt, JsonOpt, WorkspaceOpt, console, human, print_json, sieve_command

_LEVELS = ",".join(f"{p:g}" for p in DEFAULT_LEVELS)


def _levels(text: str) -> tuple[float, ...]:
    from ..errors import InputError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--levels must be comma-separated kept fractions like {_LEVELS}, got {text!r}") from None


@sieve_command
def search(
    workspace: WorkspaceOpt,
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="uniform: one kept fraction p for every matrix, "
                                          "binary search (about 8 evaluations). adaptive: a genetic search per matrix, "
                                          "seeded with the uniform answer (about population x generations evaluations).")] = "uniform",
    tolerance: Annotated[float, typer.Option("--tolerance", "-t", help="Accept a plan whose search-split metric is at least "
                                             "(1 - tolerance) x dense; with --absolute, dense - tolerance.")] = 0.05,
    absolute: Annotated[bool, typer.Option("--absolute", help="Read --tolerance in metric units, not as a fraction of dense.")] = False,
    method: Annotated[str, typer.Option("--method", "-m", help="Which fit's bases to truncate: output, learned, svd, pca.")] = "output",
    levels: Annotated[str, typer.Option("--levels", help="Adaptive: the kept fractions a matrix may take, comma-separated. "
                                        "More levels = finer plans, slower convergence.")] = _LEVELS,
    grid_step: Annotated[float, typer.Option("--grid-step", help="Uniform: grid of p to binary search; 0.01 costs 7 "
                                             "evaluations, 0.05 costs 5.")] = 0.01,
    population: Annotated[int, typer.Option("--population", help="Adaptive: candidates per generation; each new one "
                                            "costs one evaluation.")] = 16,
    generations: Annotated[int, typer.Option("--generations", help="Adaptive: at most this many generations after the "
                                             "first; each costs about population - 2 evaluations.")] = 8,
    patience: Annotated[int, typer.Option("--patience", help="Adaptive: stop early after this many generations "
                                          "without a better plan.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Adaptive: random seed; the same seed gives the same plan.")] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Search-split examples scored per evaluation; time "
                                                 "per evaluation grows in proportion, noise shrinks as 1/sqrt. "
                                                 "0 = the whole split.")] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 16,
    device: DeviceOpt = "cpu",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Compute dtype (default: the one discover used).")] = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Decide how much of each matrix to keep; writes WS/search/plan.json for `sieve apply`.

    Cost: every evaluation scores --limit search-split examples with the candidate's ranks swapped into the model (SmolLM2 on a 2-core CPU: a few seconds for 200 sst2 examples). uniform takes about 8 evaluations; adaptive about 8 + population x (generations + 1), fewer when it stops early or meets a candidate twice. An interrupted adaptive search resumes from its last generation when rerun with the same flags.

    Examples:\n
      sieve search -w ws --strategy uniform --tolerance 0.05\n
      sieve search -w ws --strategy adaptive --tolerance 0.01\n
      sieve search -w ws -s adaptive --population 32 --generations 30 --limit 500   (slower, better)\n
      sieve search -w ws -s uniform -t 0.02 --absolute --method svd
    """
    options = SearchOptions(
        strategy=strategy, method=method, tolerance=tolerance, absolute=absolute, levels=_levels(levels),
        grid_step=grid_step, population=population, generations=generations, patience=patience, seed=seed,
        limit=limit or None, batch_size=batch_size, device=device, dtype=dtype,
    )
    ws = Workspace(workspace)
    plan = run_search(ws, options, force=force)
    if as_json:
        print_json({k: v for k, v in plan.items() if k != "matrices"})
        return
    render(plan)
    console.print(f"plan: {ws.plan_json}")


def _cell(kept: float) -> str:
    colour = "green" if kept >= 1 else "yellow" if kept >= 0.5 else "red"
    return f"[{colour}]{'dense' if kept >= 1 else f'{kept:.2f}'}[/]"


def render(plan: dict) -> None:
    if plan.get("up_to_date"):
        console.print("[dim]search is up to date (same inputs); showing the existing plan. --force searches again.[/]")
    kinds, blocks = kept_by_block(plan)
    table = Table(title=f"Kept fraction per block and matrix kind ({plan['strategy']}, fit {plan['method']})")
    table.add_column("block", justify="right")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for block, row in blocks.items():
        table.add_row(str(block), *(_cell(row[k]) if k in row else "" for k in kinds))
    by_kind = {k: [0, 0] for k in kinds}
    for m in plan["matrices"].values():
        by_kind[m["kind"]][0] += m["params_after"]
        by_kind[m["kind"]][1] += m["params_before"]
    table.add_row("all", *(f"[bold]{by_kind[k][0] / by_kind[k][1]:.2f}[/]" for k in kinds), end_section=True)
    console.print(table)
    p, m, s = plan["params"], plan["metric"], plan.get("search", {})
    tol = f"{plan['tolerance']:g}" + (" (absolute)" if plan["absolute"] else f" = {plan['tolerance']:.0%} of dense")
    console.print(
        f"prunable matrices: {human(p['prunable_before'])} -> {human(p['prunable_after'])} parameters, "
        f"[bold]{p['removed_fraction_prunable']:.1%} removed[/]\n"
        f"whole model: {human(p['model_before'])} -> {human(p['model_after'])} parameters, "
        f"{p['removed_fraction_model']:.1%} removed\n"
        f"search split {m['name']}: dense {m['dense']:.4f}, plan {m['plan']:.4f} (tolerance {tol})"
    )
    if s:
        extra = f", {s['generations']} generations, stopped by {s['stopped']}" if "generations" in s else ""
        console.print(f"uniform p = {s.get('uniform_p')}; {s.get('evaluations')} evaluations{extra}; "
                      f"{s.get('seconds')} s")
