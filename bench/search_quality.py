"""Search quality on SmolLM2-135M: does the tolerance hold on examples the search never saw?

For each task: discover, capture (--tokens), fit (output), then for each tolerance a search
per strategy with the search's own defaults (paired acceptance at its default confidence,
confirm part with back-off). Reports prunable parameters removed and, for every chosen plan,
its metric on the search part (what the search saw), on the confirm part (what confirmed it)
and on the test part (what we report), evaluations and time. Headline: the worst ratio, over
all cells, of the test part's relative drop to the tolerance (<= 1: held). With --methods, the
test metric of the uniform plan's allocation with each fit method's bases.

The strategies of one task share their measurements: an allocation scored once (dense, the
uniform steps, the seeds) is not scored again by the next strategy, so a cell costs only what
is new to it. `seconds` is therefore what the strategy's own evaluations cost when they were
measured (search and confirm parts, each at its first measurement), not the cell's wall clock;
`cpu_seconds` the same in CPU time of the one torch thread (what a quiet machine would take;
the shared machine's wall clock can be several times more), `wall` the wall clock of the cell
as run (shorter when it reused measurements).

    python bench/search_quality.py                               # sst2, trec, mbpp at 1% and 5%
    python bench/search_quality.py --tasks sst2 --tolerances 0.05 --strategies local,seeds,genetic,uniform \
        --population 8 --generations 3

Workspaces are kept under --work so a rerun reuses capture and fits. Exact numbers go to
--out (JSON) as well as the table. Timings are wall clock on a shared machine: noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sieve_cli.acceptance import Measurement  # noqa: E402
from sieve_cli.capture import CaptureOptions, run_capture  # noqa: E402
from sieve_cli.discover import DiscoverOptions, load_workspace_model, run_discover  # noqa: E402
from sieve_cli.errors import InputError  # noqa: E402
from sieve_cli.evaluate import evaluate, prepare  # noqa: E402
from sieve_cli.fit import FitOptions, load_factors, run_fit  # noqa: E402
from sieve_cli.models import smollm2_gguf  # noqa: E402
from sieve_cli.options import GAConfig, LocalConfig, SplitOptions  # noqa: E402
from sieve_cli.plan import Plan  # noqa: E402
from sieve_cli.pruned import prune_in_memory  # noqa: E402
from sieve_cli.search import Scorer, SearchOptions, build_scorers, rank_at, read_targets, run_search  # noqa: E402
from sieve_cli.tasks import bind_task  # noqa: E402
from sieve_cli.workspace import Workspace  # noqa: E402

log = logging.getLogger("bench")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="sst2,trec,mbpp", help="names of examples/tasks/<name>.yaml")
    ap.add_argument("--tolerances", default="0.01,0.05")
    ap.add_argument("--strategies", default="uniform,adaptive",
                    help="any of uniform,seeds,local,genetic,adaptive, and shape (adaptive with --uniform-shape; "
                         "width fits only)")
    ap.add_argument("--methods", default="", help="fit methods compared at the uniform p, e.g. output,learned,svd,pca")
    ap.add_argument("--fits", default="output", help="fits to search over, a row per strategy each: output (pairs), "
                                                    "width")
    ap.add_argument("--tokens", type=int, default=50_000, help="calibration tokens to capture")
    ap.add_argument("--population", type=int, default=GAConfig.population)
    ap.add_argument("--generations", type=int, default=GAConfig.generations)
    ap.add_argument("--patience", type=int, default=GAConfig.patience)
    ap.add_argument("--local-budget", type=int, default=LocalConfig.budget)
    ap.add_argument("--local-moves", type=int, default=LocalConfig.moves)
    ap.add_argument("--local-patience", type=int, default=LocalConfig.patience)
    ap.add_argument("--confidence", type=float, default=SearchOptions.confidence)
    ap.add_argument("--limit", type=int, default=SearchOptions.limit, help="search-split examples per evaluation")
    ap.add_argument("--test-limit", type=int, default=None, help="test-split examples (default: all)")
    ap.add_argument("--test-size", type=float, default=None, help="split: test part (default: the task default)")
    ap.add_argument("--confirm-size", type=float, default=None, help="split: confirm part")
    ap.add_argument("--max-confirm", type=int, default=None, help="split: cap on the confirm part")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sieve-bench-search"))
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: WORK/search_quality.json)")
    return ap.parse_args()


def prepare_workspace(ws: Workspace, task: str, tokens: int, split: SplitOptions | None = None,
                      fits: tuple[str, ...] = ("output",)) -> None:
    run_discover(ws, DiscoverOptions(model=str(smollm2_gguf())))
    path = str(REPO / "examples" / "tasks" / f"{task}.yaml")
    if split is not None:  # bound first with these sizes; capture then keeps them
        bind_task(ws, path, split=split)
    run_capture(ws, CaptureOptions(task=path, tokens=tokens))
    for method in dict.fromkeys(("output", *fits)):
        run_fit(ws, FitOptions(method=method))


class TestScorer:
    """The test-split metric of a plan (or of ranks), on one loaded model."""

    def __init__(self, ws: Workspace, limit: int | None) -> None:
        self.model, tokenizer = load_workspace_model(ws, None, "cpu")
        self.prepared = prepare(bind_task(ws, None), "test", tokenizer, limit=limit)

    def __call__(self, ranks: dict, factors) -> float:
        restore = prune_in_memory(self.model, ranks, factors)
        try:
            return evaluate(self.model, self.prepared, batch_size=16, show_progress=False).value
        finally:
            restore()


class SharedScores:
    """Measurements by (part, allocation), shared by the strategies of one task, with what each cost.

    Kept in `path` (one JSON line per measurement) as well, so a rerun of the bench on the same
    workspace (a killed run, another cell) scores nothing twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cache: dict[str, tuple[Measurement, float, float]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                m = entry["m"]
                self.cache[entry["key"]] = (Measurement(m["value"], tuple(m["scores"]), tuple(m["weights"]),
                                                        tuple(m["soft"]), m["extra"]), entry["wall"], entry["cpu"])
        # wall and CPU seconds of the evaluations asked for since the last reset: CPU time is what
        # one thread costs on a quiet machine, wall clock what it cost on the shared one
        self.charged = self.cpu = 0.0

    def wrap(self, scorer: Scorer, part: str) -> Scorer:
        def score(ranks):
            key = json.dumps([part, sorted(ranks.items())])
            if key not in self.cache:
                started, cpu = time.perf_counter(), time.process_time()
                m = scorer(ranks)
                self.cache[key] = (m, time.perf_counter() - started, time.process_time() - cpu)
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, "wall": self.cache[key][1], "cpu": self.cache[key][2],
                                        "metric": scorer.metric, "examples": scorer.examples,
                                        "m": {"value": m.value, "scores": m.scores, "weights": m.weights,
                                              "soft": m.soft, "extra": m.extra}}) + "\n")
            measured, seconds, cpu_seconds = self.cache[key]
            self.charged += seconds
            self.cpu += cpu_seconds
            if scorer.metric == "metric":  # the evaluator names its metric on its first call
                scorer.metric = next(json.loads(line)["metric"] for line in self.path.read_text().splitlines()
                                     if json.loads(line)["key"].startswith(f'["{part}"'))
                scorer.examples = next(json.loads(line)["examples"] for line in self.path.read_text().splitlines()
                                       if json.loads(line)["key"].startswith(f'["{part}"'))
            shared.metric, shared.examples = scorer.metric, scorer.examples
            return measured

        shared = Scorer(score=score, metric=scorer.metric, examples=scorer.examples)
        return shared


def run_task(task: str, args, results: list[dict], out: Path) -> dict:
    ws = Workspace(args.work / task)
    started = time.perf_counter()
    sizes = {k: v for k, v in (("test", args.test_size), ("confirm", args.confirm_size),
                               ("max_confirm", args.max_confirm)) if v is not None}
    fits = tuple(args.fits.split(","))
    prepare_workspace(ws, task, args.tokens, SplitOptions(**sizes) if sizes else None, fits)
    log.info("%s: workspace ready in %.0f s", task, time.perf_counter() - started)
    test = TestScorer(ws, args.test_limit)
    result = {"task": task, "dense_test": test({}, load_factors(ws, "output")), "plans": [], "methods": []}
    results.append(result)
    shared = SharedScores(args.work / task / f"measurements-{args.limit}.jsonl")
    plans_dir = args.work / task / "plans"
    plans_dir.mkdir(parents=True, exist_ok=True)
    for method in fits:
        factors = load_factors(ws, method)
        scorers = build_scorers(ws, SearchOptions(limit=args.limit, method=method), factors)
        scorers = shared.wrap(scorers[0], "search"), scorers[1] and shared.wrap(scorers[1], "confirm")
        for tolerance in map(float, args.tolerances.split(",")):
            for strategy in args.strategies.split(","):
                row = search_cell(ws, method, factors, tolerance, strategy, args, shared, scorers, test,
                                  result["dense_test"], plans_dir)
                log.info("%s %s", task, row)
                result["plans"].append(row)
                save(results, out)
    result["methods"] = compare_methods(ws, test, result["plans"], args) if args.methods else []
    return result


def search_cell(ws: Workspace, method: str, factors, tolerance: float, strategy: str, args, shared: SharedScores,
                scorers, test: TestScorer, dense_test: float, plans_dir: Path) -> dict:
    """One strategy at one tolerance over one fit's targets: the search, then its plan on the test part."""
    ga = GAConfig(population=args.population, generations=args.generations, patience=args.patience)
    shaped = strategy == "shape"
    options = SearchOptions(strategy="adaptive" if shaped else strategy, method=method, tolerance=tolerance, ga=ga,
                            uniform_shape=shaped, limit=args.limit, confidence=args.confidence,
                            local=LocalConfig(moves=args.local_moves, budget=args.local_budget,
                                              patience=args.local_patience))
    shared.charged, shared.cpu, wall = 0.0, 0.0, time.perf_counter()
    try:
        plan = run_search(ws, options, force=True, scorer=scorers[0], confirm_scorer=scorers[1])
    except InputError as e:  # the chance guard: the intended answer on a task the model cannot do
        return {"tolerance": tolerance, "method": method, "strategy": strategy, "refused": str(e)}
    name = f"{method}-{strategy}-{tolerance:g}"
    shutil.copy(ws.plan_json, plans_dir / f"{name}.json")
    shutil.copy(ws.history_jsonl, plans_dir / f"{name}.history.jsonl")
    confirm = plan["search"].get("confirm") or {}
    test_plan = test(Plan.parse(plan).ranks(), factors)
    test_drop = (dense_test - test_plan) / abs(dense_test)
    return {"tolerance": tolerance, "method": method, "strategy": strategy,
            "algorithm": "shape" if shaped else options.algorithm, "shape": plan["search"].get("shape"),
            "removed_prunable": plan["params"]["removed_fraction_prunable"],
            "removed_model": plan["params"]["removed_fraction_model"],
            "search_dense": plan["metric"]["dense"], "search_plan": plan["metric"]["plan"],
            "confirm_dense": confirm.get("dense"), "confirm_plan": confirm.get("plan"),
            "back_off": confirm.get("back_off"), "test_plan": test_plan,
            "test_drop_over_tolerance": test_drop / tolerance,
            "evaluations": plan["search"]["evaluations"],
            "seconds": round(shared.charged, 1), "cpu_seconds": round(shared.cpu, 1),
            "wall": round(time.perf_counter() - wall, 1),
            "uniform_p": plan["search"]["uniform_p"], "seeded": plan["search"].get("seeded"),
            "progress": [{k: r.get(k) for k in ("step", "generation", "best_removed", "added", "move",
                                                "evaluations")} for r in plan["search"].get("progress", [])]}


def save(results: list[dict], out: Path) -> None:
    out.write_text(json.dumps(results, indent=2))


def compare_methods(ws: Workspace, test: TestScorer, plans: list[dict], args) -> list[dict]:
    """At each tolerance's uniform p: the test metric with each fit method's bases."""
    targets, _ = read_targets(ws)
    rows = []
    for row in (r for r in plans if r["strategy"] == "uniform"):
        p = row["uniform_p"]
        if p >= 1.0:
            continue
        for method in args.methods.split(","):
            started = time.perf_counter()
            # learned trains factors per kept fraction: train exactly this p
            options = FitOptions(method=method, levels=(p,)) if method == "learned" else FitOptions(method=method)
            run_fit(ws, options, force=method == "learned")
            factors = load_factors(ws, method)
            ranks = {t.name: rank_at(t, p, factors) for t in targets}
            rows.append({"tolerance": row["tolerance"], "p": p, "method": method, "test": test(ranks, factors),
                         "fit_and_eval_seconds": round(time.perf_counter() - started, 1)})
            log.info("%s", rows[-1])
    return rows


def render(results: list[dict]) -> None:
    print("\nplans (removed = share of the prunable matrices' parameters, model = of the whole model; metric: the task's)")
    print(f"{'task':6} {'tol':>5} {'fit':6} {'strategy':9} {'removed':>8} {'model':>7} {'search d->p':>13} "
          f"{'confirm d->p':>13} {'back-off':>8} {'test d->p':>13} {'drop/tol':>8} {'evals':>6} {'eval s':>7} {'cpu s':>7} {'wall s':>7}")
    for r in results:
        for p in r["plans"]:
            if "refused" in p:
                print(f"{r['task']:6} {p['tolerance']:>5.2f} {p.get('method', 'output'):6} {p['strategy']:9} "
                      "refused: at chance")
                continue
            confirm = (f"{p['confirm_dense']:>6.3f}->{p['confirm_plan']:.3f}" if p["confirm_dense"] is not None
                       else f"{'-':>13}")
            print(f"{r['task']:6} {p['tolerance']:>5.2f} {p.get('method', 'output'):6} {p['strategy']:9} "
                  f"{p['removed_prunable']:>8.2%} "
                  f"{p['removed_model']:>7.2%} {p['search_dense']:>6.3f}->{p['search_plan']:.3f} {confirm} "
                  f"{p['back_off'] if p['back_off'] is not None else '-':>8} "
                  f"{r['dense_test']:>6.3f}->{p['test_plan']:.3f} {p['test_drop_over_tolerance']:>8.2f} "
                  f"{p['evaluations']:>6} {p['seconds']:>7.0f} {p['cpu_seconds']:>7.0f} {p['wall']:>7.0f}")
    worst = max((p["test_drop_over_tolerance"] for r in results for p in r["plans"] if "refused" not in p),
                default=float("nan"))
    print(f"\nheadline: worst test-part relative drop / tolerance over all cells = {worst:.2f} (<= 1: the tolerance held)")
    if any(r["methods"] for r in results):
        print("\ntest metric of the uniform plan's allocation, by fit method")
        print(f"{'task':6} {'tol':>5} {'p':>5} {'method':8} {'test':>7}")
        for r in results:
            for m in r["methods"]:
                print(f"{r['task']:6} {m['tolerance']:>5.2f} {m['p']:>5.2f} {m['method']:8} {m['test']:>7.3f}")


def main() -> None:
    torch.set_num_threads(1)  # the machine is shared: one thread is steadier
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work / "search_quality.json"
    results: list[dict] = []
    for task in args.tasks.split(","):
        run_task(task, args, results, out)  # appends, and saves after every cell
    save(results, out)
    render(results)
    print(f"\nexact numbers: {out}")


if __name__ == "__main__":
    main()
