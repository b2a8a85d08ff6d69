"""Does LoRA healing recover what pruning cost? SmolLM2-135M on sst2 (examples/tasks/sst2.yaml), 1 CPU thread.

1. Uniform plans removing 25% and 50% of the prunable parameters (`Plan.build`, ranks from
   `search.rank_at`): test accuracy of the dense, pruned and healed models (`sieve heal`, run as
   the stage: the first of --losses at every plan, the others at --compare-at), and the heal's
   wall time (model loads included).
2. The prunable removal that the uniform search reaches at 5% tolerance, without healing and
   with each candidate healed briefly (--search-steps, in memory, distill) before it is scored:
   a custom `Scorer` here, not a search option. Both searches skip the confirm part (a custom
   scorer has none), score --limit search examples, and step the grid by --grid-step.

    python bench/heal.py [--steps 40] [--search-steps 8] [--limit 100] [--work /tmp/sieve-bench-heal]

The workspace (discover, capture of --tokens calibration tokens, output fit) is kept in --work
and reused by a rerun. Results also go to WORK/heal.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sieve_cli.capture import CaptureOptions, run_capture  # noqa: E402
from sieve_cli.discover import DiscoverOptions, load_workspace_model, run_discover  # noqa: E402
from sieve_cli.evaluate import evaluate, prepare  # noqa: E402
from sieve_cli.fit import FitOptions, load_factors, run_fit  # noqa: E402
from sieve_cli.heal import HealOptions, calibration_sequences, heal_in_memory, load_healed, run_heal  # noqa: E402
from sieve_cli.models import smollm2_gguf  # noqa: E402
from sieve_cli.plan import Plan  # noqa: E402
from sieve_cli.pruned import prune_in_memory  # noqa: E402
from sieve_cli.search import (  # noqa: E402
    Scorer,
    SearchOptions,
    build_scorers,
    measurement,
    ranks_for,
    read_targets,
    run_search,
)
from sieve_cli.tasks import bind_task  # noqa: E402
from sieve_cli.workspace import Stage, Workspace  # noqa: E402

log = logging.getLogger("bench")
TASK = REPO / "examples" / "tasks" / "sst2.yaml"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--removals", default="0.25,0.5", help="uniform plans: fractions of prunable parameters removed")
    ap.add_argument("--losses", default="distill,ce", help="heal losses to compare (the first at every plan)")
    ap.add_argument("--compare-at", default="0.5", help="removals at which the other --losses are run too")
    ap.add_argument("--steps", type=int, default=40, help="heal steps for the uniform plans")
    ap.add_argument("--lr", type=float, default=HealOptions.lr)
    ap.add_argument("--search-steps", type=int, default=8, help="heal steps per search candidate (0: skip)")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--limit", type=int, default=100, help="search-part examples per search evaluation")
    ap.add_argument("--grid-step", type=float, default=0.05)
    ap.add_argument("--tokens", type=int, default=16_384, help="calibration tokens to capture for the fit")
    ap.add_argument("--parts", default="plans,searches", help="plans (section 1), searches (section 2), or both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sieve-bench-heal"))
    return ap.parse_args()


def prepare_workspace(ws: Workspace, tokens: int) -> None:
    run_discover(ws, DiscoverOptions(model=str(smollm2_gguf())))
    run_capture(ws, CaptureOptions(task=str(TASK), tokens=tokens))
    run_fit(ws, FitOptions(method="output"))


def write_plan(ws: Workspace, plan: Plan, label: str) -> None:
    """The plan as the search stage's output, so `run_heal` heals it (inputs name the bench's plan)."""
    inputs = {"bench": label, "upstream": ws.upstream_hashes(Stage.DISCOVER, Stage.TASK, Stage.fit(plan.method))}
    ws.begin(Stage.SEARCH, inputs, force=True)
    plan.save(ws.plan_json)
    ws.finish(Stage.SEARCH, inputs, [ws.plan_json])


def uniform_plan(targets, total: int, factors, kept: float) -> Plan:
    ranks = ranks_for(targets, [kept] * len(targets), factors)
    return Plan.build(strategy="uniform", method="output", tolerance=0.0, absolute=False, matrices=targets,
                      ranks=ranks, model_total=total, metric="accuracy", dense=0.0, plan_metric=0.0)


def accuracy(model, prepared, ranks=None, factors=None) -> float:
    restore = prune_in_memory(model, ranks, factors) if ranks is not None else (lambda: None)
    try:
        return evaluate(model, prepared, batch_size=16, show_progress=False).value
    finally:
        restore()


def heal_plans(ws, model, test, targets, total, factors, args) -> list[dict]:
    rows = []
    for removal in [float(x) for x in args.removals.split(",")]:
        plan = uniform_plan(targets, total, factors, 1 - removal)
        write_plan(ws, plan, f"uniform kept {1 - removal:g}")
        ranks = plan.ranks()
        row = {"target_removal": removal, "removed_prunable": plan.params["removed_fraction_prunable"],
               "removed_model": plan.params["removed_fraction_model"], "pruned": accuracy(model, test, ranks, factors)}
        log.info("removal %.2f: pruned %.4f", removal, row["pruned"])
        losses = args.losses.split(",")
        compared = [float(x) for x in args.compare_at.split(",") if x]
        for loss in losses if removal in compared else losses[:1]:
            started, cpu = time.perf_counter(), time.process_time()
            summary = run_heal(ws, HealOptions(steps=args.steps, lr=args.lr, loss=loss), force=True)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            healed = accuracy(model, test, ranks, load_healed(ws))
            row[loss] = {"healed": healed, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "first_loss": summary["first_loss"],
                         "last_loss": summary["last_loss"], "tokens": summary["tokens"]}
            log.info("removal %.2f: healed (%s, %d steps) %.4f in %.0f s (%.0f CPU s)", removal, loss, args.steps,
                     healed, seconds, cpu)
        rows.append(row)
    return rows


class Healer:
    """Heals a candidate briefly in memory (distill from the dense model, calibration only) and scores it."""

    def __init__(self, ws, model, factors, steps: int, lr: float) -> None:
        self.teacher, tokenizer = load_workspace_model(ws, None, "cpu")
        self.sequences, _ = calibration_sequences(ws, tokenizer, HealOptions.seq_len, steps * HealOptions.batch_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.model, self.factors, self.tokenizer = model, factors, tokenizer
        self.options = HealOptions(steps=steps, lr=lr, loss="distill")  # the loss the README's search row used

    def evaluate(self, ranks, prepared):
        restore = prune_in_memory(self.model, ranks, self.factors)
        try:
            if any(r is not None for r in ranks.values()):
                heal_in_memory(self.model, self.teacher, self.sequences, self.pad_id, self.options)
            return evaluate(self.model, prepared, batch_size=16, show_progress=False)
        finally:
            restore()

    def scorer(self, ws, limit: int) -> Scorer:
        prepared = prepare(bind_task(ws, None), "search", self.tokenizer, limit=limit)

        def score(ranks):
            result = self.evaluate(ranks, prepared)
            scorer.metric, scorer.examples = result.metric, result.n
            return measurement(result)

        scorer = Scorer(score=score)
        return scorer


def searches(ws, model, test, factors, args) -> list[dict]:
    """The uniform search at the tolerance, without and with healing each candidate; test accuracy of each plan."""
    options = SearchOptions(strategy="uniform", tolerance=args.tolerance, limit=args.limit, grid_step=args.grid_step)
    rows = []
    for steps in (0, args.search_steps):
        healer = Healer(ws, model, factors, steps, args.lr) if steps else None
        # without healing: the real evaluator, without its confirm part (as the healing scorer)
        scorer = healer.scorer(ws, args.limit) if healer else build_scorers(ws, options, factors)[0]
        started = time.perf_counter()
        plan = run_search(ws, options, force=True, scorer=scorer)
        seconds = time.perf_counter() - started
        ranks = Plan(plan).ranks()
        row = {"heal_steps": steps, "uniform_p": plan["search"].get("uniform_p"),
               "removed_prunable": plan["params"]["removed_fraction_prunable"],
               "removed_model": plan["params"]["removed_fraction_model"], "search_dense": plan["metric"]["dense"],
               "search_plan": plan["metric"]["plan"], "evaluations": plan["search"].get("evaluations"),
               "seconds": round(seconds, 1)}
        # the plan's test accuracy, after the same brief heal the search gave each candidate
        row["test"] = healer.evaluate(ranks, test).value if healer else accuracy(model, test, ranks, factors)
        log.info("search with %d heal steps: p=%s, %.1f%% removed, test %.4f (%.0f s)", steps, row["uniform_p"],
                 100 * row["removed_prunable"], row["test"], seconds)
        rows.append(row)
    return rows


def render(result: dict) -> None:
    print(f"\nSmolLM2-135M-Instruct on sst2 (4-shot), {result['test_examples']} test examples, "
          f"{result['threads']} CPU thread(s); heal: {result['steps']} steps, lr {result['lr']}, LoRA rank 8, "
          f"batch 4, {result['calibration_tokens']} calibration tokens")
    losses = result["losses"]
    head = " | ".join(f"healed ({loss}) | heal time ({loss})" for loss in losses)
    print(f"| prunable removed | model removed | dense | pruned | {head} |")
    print("|" + "---|" * (4 + 2 * len(losses)))
    for row in result.get("plans", []):
        cells = " | ".join(f"{row[loss]['healed']:.3f} | {row[loss]['seconds']:.0f} s" if loss in row else "- | -"
                           for loss in losses)
        print(f"| {row['removed_prunable']:.1%} | {row['removed_model']:.1%} | {result['dense']:.3f} | "
              f"{row['pruned']:.3f} | {cells} |")
    if result.get("searches"):
        print(f"\nUniform search at {result['tolerance']:.0%} tolerance ({result['limit']} search examples, "
              f"grid step {result['grid_step']}, no confirm part):")
        print("| heal steps per candidate | p | prunable removed | model removed | test accuracy | search time |")
        print("|---|---|---|---|---|---|")
        for row in result["searches"]:
            print(f"| {row['heal_steps']} | {row['uniform_p']} | {row['removed_prunable']:.1%} | "
                  f"{row['removed_model']:.1%} | {row['test']:.3f} | {row['seconds']:.0f} s |")


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "datasets", "torchao", "peft", "sieve_cli"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ws = Workspace(args.work / "sst2")
    started = time.perf_counter()
    prepare_workspace(ws, args.tokens)
    log.info("workspace ready in %.0f s", time.perf_counter() - started)
    model, tokenizer = load_workspace_model(ws, None, "cpu")
    factors = load_factors(ws, "output")
    test = prepare(bind_task(ws, None), "test", tokenizer)
    dense = accuracy(model, test)
    log.info("dense test accuracy %.4f on %d examples", dense, len(test.examples))
    targets, total = read_targets(ws)
    result = {"dense": dense, "test_examples": len(test.examples), "threads": args.threads, "steps": args.steps,
              "lr": args.lr, "losses": args.losses.split(","), "tolerance": args.tolerance, "limit": args.limit,
              "grid_step": args.grid_step,
              "calibration_tokens": sum(map(len, calibration_sequences(ws, tokenizer, HealOptions.seq_len,
                                                                       args.steps * HealOptions.batch_size)[0]))}
    parts = args.parts.split(",")
    if "plans" in parts:
        result["plans"] = heal_plans(ws, model, test, targets, total, factors, args)
        (args.work / "heal.json").write_text(json.dumps(result, indent=2))
    if "searches" in parts and args.search_steps > 0:
        result["searches"] = searches(ws, model, test, factors, args)
    (args.work / "heal.json").write_text(json.dumps(result, indent=2))
    render(result)


if __name__ == "__main__":
    main()
