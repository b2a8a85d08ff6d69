"""A search on Ray workers vs in one process, side by side, on SmolLM2-135M and sst2.

Builds (or reuses) a workspace under --work: discover, capture (--tokens), fit (output). Then
the same search (--strategy, default adaptive) twice, one after the other in this process: serially with 1 torch
thread (no Ray), and with `--workers` Ray workers of 1 thread each (Ray started locally with
that many CPUs, each worker loading the model, the factors and the tokenised split once). Prints
whether the two plans and histories are identical, each run's wall time (Ray start and worker
loading included) and the search's own seconds (plan.json `search.seconds`: after the workers
are up), their ratios, and the machine's load (`uptime`) before, between and after: the
machine is shared, so a busy neighbour slows the parallel run most.

    python bench/ray_search.py                          # sst2 at 5%, adaptive (the local search)
    python bench/ray_search.py --strategy genetic --population 8 --generations 3

Exact numbers go to --out (JSON) as well as the printout.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sieve_cli.capture import CaptureOptions, run_capture  # noqa: E402
from sieve_cli.discover import DiscoverOptions, run_discover  # noqa: E402
from sieve_cli.fit import FitOptions, run_fit  # noqa: E402
from sieve_cli.models import smollm2_gguf  # noqa: E402
from sieve_cli.options import GAConfig  # noqa: E402
from sieve_cli.search import SearchOptions, run_search  # noqa: E402
from sieve_cli.workspace import Workspace  # noqa: E402

log = logging.getLogger("bench")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2", help="name of examples/tasks/<name>.yaml")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--strategy", default="adaptive", help="uniform, seeds, local, genetic or adaptive")
    ap.add_argument("--tokens", type=int, default=50_000, help="calibration tokens to capture")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--grid-step", type=float, default=SearchOptions.grid_step, help="the uniform search's grid")
    ap.add_argument("--limit", type=int, default=SearchOptions.limit, help="search-part examples per evaluation "
                                                                           "(default: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sieve-bench-ray"))
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: WORK/ray_search.json)")
    return ap.parse_args()


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def prepare_workspace(ws: Workspace, task: str, tokens: int) -> None:
    run_discover(ws, DiscoverOptions(model=str(smollm2_gguf())))
    run_capture(ws, CaptureOptions(task=str(REPO / "examples" / "tasks" / f"{task}.yaml"), tokens=tokens))
    run_fit(ws, FitOptions(method="output"))


def timed_search(ws: Workspace, options: SearchOptions) -> dict:
    started = time.perf_counter()
    plan = run_search(ws, options, force=True)
    wall = time.perf_counter() - started
    history = ws.history_jsonl.read_text().splitlines()
    return {"wall": wall, "search_seconds": plan["search"]["seconds"], "plan": plan, "history": history,
            "evaluations": plan["search"]["evaluations"], "load": uptime()}


def without_time(plan: dict) -> dict:
    return {**plan, "search": {k: v for k, v in plan["search"].items() if k != "seconds"}}


def main() -> None:
    torch.set_num_threads(1)  # the serial run's thread; each worker sets its own
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse()
    ws = Workspace(args.work / args.task)
    prepare_workspace(ws, args.task, args.tokens)
    ga = GAConfig(population=args.population, generations=args.generations, patience=args.patience)
    options = SearchOptions(strategy=args.strategy, tolerance=args.tolerance, ga=ga, limit=args.limit,
                            grid_step=args.grid_step)
    before = uptime()
    serial = timed_search(ws, options)
    pooled = timed_search(ws, replace(options, workers=args.workers))
    same_plan = without_time(serial["plan"]) == without_time(pooled["plan"])
    same_history = serial["history"] == pooled["history"]
    result = {"options": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
              "load_before": before, "load_between": serial["load"], "load_after": pooled["load"],
              "same_plan": same_plan, "same_history": same_history, "evaluations": serial["evaluations"],
              "removed_prunable": serial["plan"]["params"]["removed_fraction_prunable"],
              "serial": {k: serial[k] for k in ("wall", "search_seconds")},
              "workers": {k: pooled[k] for k in ("wall", "search_seconds")},
              "wall_ratio": pooled["wall"] / serial["wall"],
              "search_ratio": pooled["search_seconds"] / serial["search_seconds"]}
    out = args.out or args.work / "ray_search.json"
    out.write_text(json.dumps(result, indent=2))
    knobs = (f"population {args.population}, {args.generations} generations, patience {args.patience}, "
             if options.algorithm == "genetic" else "")
    print(f"\n{args.task} at {args.tolerance:g}, {args.strategy} ({options.algorithm}), {knobs}"
          f"grid {args.grid_step:g}, {args.limit or 'all'} search examples per evaluation: "
          f"{result['evaluations']} evaluations, {result['removed_prunable']:.1%} of prunable parameters removed")
    print(f"same plan: {same_plan}; same history: {same_history}")
    print(f"serial, 1 thread:            wall {serial['wall']:7.1f} s, search {serial['search_seconds']:7.1f} s")
    print(f"{args.workers} Ray workers x 1 thread:   wall {pooled['wall']:7.1f} s, search {pooled['search_seconds']:7.1f} s")
    print(f"ratio workers / serial: wall {result['wall_ratio']:.2f}x, search {result['search_ratio']:.2f}x")
    print(f"load before:  {before}\nload between: {serial['load']}\nload after:   {pooled['load']}")
    print(f"exact numbers: {out}")


if __name__ == "__main__":
    main()
