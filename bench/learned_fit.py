"""`learned` (full-batch Adam on the Gram loss) against the exact `output` optimum, on SmolLM2-135M.

    python bench/learned_fit.py                          # workspace /tmp/fitws, block 15, every kind
    python bench/learned_fit.py -w WS --blocks 0,15 --kinds q,down --paper

For each matrix of the chosen blocks and each kept fraction (0.9 / 0.75 / 0.5), trains the
paper's two free factors with `learn_factors` (the `sieve fit -m learned` defaults, or the
flags) and prints its relative output error ||WX - BAX||^2 / ||WX||^2 on the capture beside
the optimum's at the same rank (`output`, the global optimum, so ratio >= 1), the Adam steps,
why it stopped, and the seconds (wall and this process's CPU; the machine is shared). The
output basis is timed too: one decomposition gives every rank. `--paper` also runs the
paper's constant rate (lr 1e-3, no decays) for the same step budget.
Uses the workspace's capture, or captures sst2 there first (see bench/fit_speed.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_speed import ensure_capture  # noqa: E402

from sieve_cli.factorize import TrainSettings, learn_factors, output_basis, output_error, output_total  # noqa: E402
from sieve_cli.lowrank import rank_for_fraction  # noqa: E402
from sieve_cli.matrices import find_matrices, weight_of  # noqa: E402
from sieve_cli.models import load_model, smollm2_gguf  # noqa: E402
from sieve_cli.store import read_site  # noqa: E402
from sieve_cli.workspace import Workspace  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workspace", default="/tmp/fitws")
    parser.add_argument("--tokens", type=int, default=20_000, help="calibration tokens when capturing here")
    parser.add_argument("--blocks", default="15")
    parser.add_argument("--kinds", default="q,k,v,o,gate,up,down")
    parser.add_argument("--levels", default="0.9,0.75,0.5")
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--max-steps", type=int, default=TrainSettings.max_steps)
    parser.add_argument("--tol", type=float, default=TrainSettings.tol)
    parser.add_argument("--decays", type=int, default=TrainSettings.decays)
    parser.add_argument("--paper", action="store_true", help="also the paper's constant lr 1e-3 for the same step budget")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ws = Workspace(args.workspace)
    ensure_capture(ws, args.tokens)
    print(f"capture: {ws.read_manifest('capture')['summary']}  threads: {torch.get_num_threads()}")
    model, _ = load_model(str(smollm2_gguf()), "float32", "cpu")
    blocks, kinds = {int(b) for b in args.blocks.split(",")}, args.kinds.split(",")
    levels = [float(p) for p in args.levels.split(",")]
    settings = {"learned": TrainSettings(lr=args.lr, max_steps=args.max_steps, tol=args.tol, decays=args.decays)}
    if args.paper:
        settings["paper lr"] = replace(settings["learned"], lr=1e-3, decays=0)
    print(f"settings: {settings}")
    header = f"{'matrix':<34}{'kept':>5}{'rank':>5}{'optimum':>10}{'run':>10}{'learned':>10}{'ratio':>8}{'steps':>7}  {'stopped':<10}{'wall s':>8}{'cpu s':>8}"
    print(header)
    rows = []
    for m in [m for m in find_matrices(model) if m.block in blocks and m.kind in kinds]:
        W = weight_of(model.get_submodule(m.name)).detach().double()
        C = read_site(ws.capture_store, m.site).gram
        total = output_total(W, C)
        basis, wall, cpu = timed(lambda: output_basis(W, C))
        print(f"{m.name:<34}{'all':>5}{'':>5}{'':>10}{'output':>10}{'':>10}{'':>8}{'':>7}  {'':<10}{wall:>8.2f}{cpu:>8.2f}", flush=True)
        for p in levels:
            rank = rank_for_fraction(p, m.out_features, m.in_features)
            optimum = basis.errors[rank].item() / total
            for label, s in settings.items():
                trained, wall, cpu = timed(lambda: learn_factors(W, C, rank, s))
                learned = output_error(W, C, trained.B, trained.A) / total
                rows.append((m.kind, p, label, learned / optimum, trained.steps, wall, cpu))
                print(f"{m.name:<34}{p:>5}{rank:>5}{optimum:>10.5f}{label:>10}{learned:>10.5f}{learned / optimum:>8.4f}"
                      f"{trained.steps:>7}  {trained.stopped:<10}{wall:>8.1f}{cpu:>8.1f}", flush=True)
    print("\nper kind: learned error / optimum error, steps, cpu s (mean over the chosen blocks)")
    for label in settings:
        for kind in kinds:
            cells = []
            for p in levels:
                got = [r for r in rows if r[0] == kind and r[1] == p and r[2] == label]
                if got:
                    n = len(got)
                    cells.append(f"{p}: {sum(r[3] for r in got) / n:.4f}x {sum(r[4] for r in got) / n:.0f} steps {sum(r[6] for r in got) / n:.1f} s")
            if cells:
                print(f"  {label:<9}{kind:<6}" + " | ".join(cells))


if __name__ == "__main__":
    main()
