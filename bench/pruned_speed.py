"""Speed and size of SmolLM2-135M pruned to uniform plans, against the dense model, side by side.

    python bench/pruned_speed.py                      # 25% and 50% removal, plus the per-shape sweep
    python bench/pruned_speed.py --kept 0.9 0.75 0.5  # other uniform kept fractions
    python bench/pruned_speed.py --no-shapes --reps 5

Plans keep the same fraction p of every prunable matrix (rank_for_fraction), with SVD factors:
speed and size do not depend on which factors. One process, one thread, dense and pruned
models measured in interleaved repetitions (median reported). Peak memory is measured by
loading each saved folder in a fresh subprocess (max RSS minus the RSS after imports).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sieve_cli.factors import FactorSet
from sieve_cli.lowrank import LowRankLinear, lowrank_params, rank_for_fraction
from sieve_cli.matrices import find_matrices, weight_of
from sieve_cli.pruned import (
    WEIGHTS,
    count_params,
    plan_ranks,
    prune_in_memory,
    save_pruned,
)

SHAPES = {"q, o": (576, 576), "k, v": (192, 576), "gate, up": (1536, 576), "down": (576, 1536)}
SWEEP = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.35, 0.25)


def svd_factors(model) -> FactorSet:
    factors = FactorSet("svd")
    for m in find_matrices(model):
        W = weight_of(model.get_submodule(m.name)).detach().float()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        factors.full[m.name] = (U * S, Vh)
    return factors


def uniform_plan(model, kept: float) -> dict:
    matrices = {}
    for m in find_matrices(model):
        rank = rank_for_fraction(kept, m.out_features, m.in_features)
        matrices[m.name] = {"rank": rank, "params_before": m.params,
                            "params_after": lowrank_params(rank, m.out_features, m.in_features)}
    before = sum(e["params_before"] for e in matrices.values())
    after = sum(e["params_after"] for e in matrices.values())
    return {"schema": 1, "strategy": "uniform", "method": "svd", "matrices": matrices,
            "params": {"prunable_before": before, "prunable_after": after,
                       "removed_fraction_prunable": 1 - after / before}}


def prefill_seconds(model, batch: int, length: int, all_logits: bool) -> float:
    """One prompt pass as generate() makes it (KV cache, logits of the last position only), or
    with every position's logits (what log-likelihood scoring needs: the LM head then costs more)."""
    ids = torch.randint(100, 40000, (batch, length), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model(ids, use_cache=not all_logits, logits_to_keep=0 if all_logits else 1)
    return time.perf_counter() - start


def decode_seconds_per_token(model, prompt: int, steps: int) -> float:
    ids = torch.randint(100, 40000, (1, prompt), generator=torch.Generator().manual_seed(1))
    out = model(ids, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def peak_memory_mib(folder: Path) -> float:
    """Peak RSS growth while loading `folder` in a fresh process (load_pruned + one short forward), in MiB.

    The peak is reset after the imports (/proc/self/clear_refs), whose own transient peak would hide
    the model's; the forward matters because safetensors maps the file lazily.
    """
    code = (
        "import sys, torch, transformers, sieve_cli.pruned as p\n"
        "def rss(key): return int(open('/proc/self/status').read().split(key + ':')[1].split()[0])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = rss('VmRSS')\n"
        "m = p.load_pruned(sys.argv[1])\n"
        "m(torch.arange(16)[None])\n"
        "print((rss('VmHWM') - base) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def shape_sweep(reps: int) -> list[tuple]:
    """Per shape and kept fraction: dense time / factored time, for prefill and decode inputs."""
    rows = []
    for label, (h, d) in SHAPES.items():
        dense = torch.nn.Linear(d, h, bias=False)
        for tokens, n in ((2048, 3), (1, 200)):
            x = torch.randn(tokens, d)
            for p in SWEEP:
                low = LowRankLinear(d, h, rank_for_fraction(p, h, d))
                td, tl = [], []
                for _ in range(reps):
                    td.append(_best(dense, x, n))
                    tl.append(_best(low, x, n))
                rows.append((label, "prefill" if tokens > 1 else "decode", p, min(td) / min(tl)))
    return rows


def _best(module, x, n) -> float:
    module(x)
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        module(x)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kept", type=float, nargs="+", default=[0.75, 0.5], help="uniform kept fractions")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per measurement")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--no-shapes", action="store_true", help="skip the per-shape crossover sweep")
    parser.add_argument("--all-logits", action="store_true", help="prefill computes logits at every position")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from sieve_cli.models import load_model, smollm2_gguf

    dense, _ = load_model(smollm2_gguf(), "float32", "cpu")
    factors = svd_factors(dense)
    models = {"dense": dense}
    plans = {"dense": {"method": "svd", "matrices": {m.name: {"rank": None} for m in find_matrices(dense)}}}
    for kept in args.kept:
        model = copy.deepcopy(dense)
        plans[f"p={kept}"] = uniform_plan(dense, kept)
        prune_in_memory(model, plan_ranks(plans[f"p={kept}"]), factors)
        models[f"p={kept}"] = model

    sizes, peaks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            folder = Path(tmp) / name
            save_pruned(model, folder, plans[name], {"kind": "bench"})
            sizes[name] = (folder / WEIGHTS).stat().st_size
            peaks[name] = peak_memory_mib(folder)

    prefill = {name: [] for name in models}
    decode = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(args.reps):  # interleaved: each repetition visits every model once
            for name, model in models.items():
                prefill[name].append(prefill_seconds(model, args.batch, args.length, args.all_logits))
                decode[name].append(decode_seconds_per_token(model, 32, args.decode_steps))

    tokens = args.batch * args.length
    d_pre, d_dec = statistics.median(prefill["dense"]), statistics.median(decode["dense"])
    logits = "every position's logits" if args.all_logits else "last position's logits, as generate() does"
    print(f"SmolLM2-135M, float32, 1 thread, {args.reps} interleaved reps (median); prefill {args.batch}x{args.length} "
          f"({logits}), decode batch 1 after a 32-token prompt; peak = RSS growth for load_pruned + a 16-token forward")
    header = f"{'model':<8} {'removed':>8} {'params':>12} {'file MiB':>9} {'peak MiB':>9} {'prefill tok/s':>14} {'x dense':>8} {'decode ms/tok':>14} {'x dense':>8}"
    print(header)
    results = {}
    for name in models:
        removed = plans[name].get("params", {}).get("removed_fraction_prunable", 0.0)
        pre, dec = statistics.median(prefill[name]), statistics.median(decode[name])
        row = {"removed_prunable": removed, "params": count_params(models[name]), "file_bytes": sizes[name],
               "peak_mib": peaks[name], "prefill_tok_s": tokens / pre, "prefill_speedup": d_pre / pre,
               "decode_ms": dec * 1e3, "decode_speedup": d_dec / dec}
        results[name] = row
        print(f"{name:<8} {removed:>8.1%} {row['params']:>12,} {sizes[name] / 2**20:>9.1f} {peaks[name]:>9.0f} "
              f"{row['prefill_tok_s']:>14.0f} {row['prefill_speedup']:>8.2f} {row['decode_ms']:>14.2f} {row['decode_speedup']:>8.2f}")
    print(json.dumps(results))

    if not args.no_shapes:
        print("\nper-shape speedup of the factored form (dense time / factored time; >1: factored is faster)")
        rows = shape_sweep(args.reps)
        print(f"{'shape':<10} {'input':<8} " + " ".join(f"{p:>5}" for p in SWEEP))
        for label in SHAPES:
            for mode in ("prefill", "decode"):
                cells = [r[3] for r in rows if r[0] == label and r[1] == mode]
                print(f"{label:<10} {mode:<8} " + " ".join(f"{c:>5.2f}" for c in cells))


if __name__ == "__main__":
    main()
