"""Quantised pruned folders: SmolLM2-135M dense and 50%-removed, in float32 / bfloat16 / int8, side by side.

    PYTHONPATH=$PWD python bench/quantize.py                 # sst2, 100 test examples, 3 reps
    PYTHONPATH=$PWD python bench/quantize.py --limit 40 --reps 1

Workspace (kept under --work, reused by a rerun): discover on the SmolLM2 GGUF, capture of
--tokens sst2 calibration tokens, `fit --method output`. Plans: dense (every rank null) and
uniform p = 0.5 (every prunable matrix keeps half its parameters: 50% of the prunable
parameters removed). Each (plan, format) is written by `run_apply` (what `sieve apply
--plan P --dtype D [--quantize int8]` does) and read back with `load_pruned`. int8 is
torchao's weight-only int8 (sieve_cli/quantize.py; no CPU int4) with float32 (int8) or
bfloat16 (int8-bf16) for everything else: embeddings, norms, scales and activations.

Reported per folder: model.safetensors size; peak memory (RSS growth of a fresh process for
load_pruned + a 16-token forward, bench/pruned_speed.py); prefill (batch x length, logits of
the last position) and decode (batch 1 after a 32-token prompt) throughput relative to dense
float32, from interleaved repetitions in this one process (median); sst2 test accuracy (first
--limit examples, 4-shot, sieve's evaluator); and the size of the input GGUF file. 1 thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from pruned_speed import decode_seconds_per_token, peak_memory_mib, prefill_seconds  # noqa: E402

from sieve_cli.apply import ApplyOptions, run_apply  # noqa: E402
from sieve_cli.capture import CaptureOptions, run_capture  # noqa: E402
from sieve_cli.discover import DiscoverOptions, run_discover  # noqa: E402
from sieve_cli.evaluate import evaluate, prepare  # noqa: E402
from sieve_cli.fit import FitOptions, load_factors, run_fit  # noqa: E402
from sieve_cli.lowrank import lowrank_params  # noqa: E402
from sieve_cli.models import smollm2_gguf  # noqa: E402
from sieve_cli.pruned import WEIGHTS, count_params, load_pruned, load_tokenizer  # noqa: E402
from sieve_cli.search import rank_at, read_targets  # noqa: E402
from sieve_cli.tasks import bind_task  # noqa: E402
from sieve_cli.workspace import Workspace, write_json_atomic  # noqa: E402

# name -> (apply --dtype, --quantize): int8 weights with float32 or with bfloat16 for the rest
# (embeddings, norms, scales) and the activations
FORMATS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "int8": ("float32", "int8"),
           "int8-bf16": ("bfloat16", "int8")}


def prepare_workspace(ws: Workspace, tokens: int) -> None:
    if (ws.read_manifest(ws.fit_stage("output")) or {}).get("complete"):
        return  # fitted by an earlier run (perhaps of an older sieve, whose split defaults differ): reuse it
    run_discover(ws, DiscoverOptions(model=str(smollm2_gguf())))
    run_capture(ws, CaptureOptions(task=str(REPO / "examples" / "tasks" / "sst2.yaml"), tokens=tokens))
    run_fit(ws, FitOptions(method="output"))


def write_plan(ws: Workspace, kept: float | None, path: Path) -> Path:
    """A plan file keeping fraction `kept` of every prunable matrix (None: all dense)."""
    targets, total = read_targets(ws)
    factors = load_factors(ws, "output")
    matrices = {}
    for t in targets:
        rank = None if kept is None else rank_at(t, kept, factors)
        matrices[t.name] = {"kind": t.kind, "block": t.block, "rank": rank, "params_before": t.params,
                            "params_after": lowrank_params(rank, t.out_features, t.in_features)}
    before = sum(m["params_before"] for m in matrices.values())
    after = sum(m["params_after"] for m in matrices.values())
    write_json_atomic(path, {"schema": 1, "strategy": "uniform", "method": "output", "matrices": matrices,
                             "params": {"prunable_before": before, "prunable_after": after, "model_before": total,
                                        "model_after": total - before + after,
                                        "removed_fraction_prunable": 1 - after / before}})
    return path


def build_folders(ws: Workspace, work: Path) -> dict[str, Path]:
    folders = {}
    for plan_name, kept in (("dense", None), ("pruned-50%", 0.5)):
        plan = write_plan(ws, kept, work / f"plan-{plan_name}.json")
        for fmt, (dtype, quantize) in FORMATS.items():
            out = work / "out" / f"{plan_name}-{fmt}"
            started = time.perf_counter()
            run_apply(ws, ApplyOptions(out=out, plan=plan, dtype=dtype, quantize=quantize), force=True)
            print(f"apply {plan_name} {fmt}: {time.perf_counter() - started:.0f} s", flush=True)
            folders[f"{plan_name} {fmt}"] = out
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sieve-bench-quantize"))
    parser.add_argument("--tokens", type=int, default=50_000, help="sst2 calibration tokens to capture")
    parser.add_argument("--limit", type=int, default=100, help="sst2 test examples scored")
    parser.add_argument("--reps", type=int, default=3, help="interleaved speed repetitions (median)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: WORK/quantize.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    ws = Workspace(args.work / "ws")
    prepare_workspace(ws, args.tokens)
    folders = build_folders(ws, args.work)
    models = {name: load_pruned(folder) for name, folder in folders.items()}
    tokenizer = load_tokenizer(folders["dense float32"])
    prepared = prepare(bind_task(ws, None), "test", tokenizer, limit=args.limit)

    rows = {}
    for name, model in models.items():
        started = time.perf_counter()
        result = evaluate(model, prepared, batch_size=16, show_progress=False)
        rows[name] = {"file_bytes": (folders[name] / WEIGHTS).stat().st_size, "params": count_params(model),
                      "peak_mib": peak_memory_mib(folders[name]), "accuracy": result.value,
                      "ci": [result.ci_low, result.ci_high], "eval_seconds": time.perf_counter() - started}
        print(f"{name}: accuracy {result.value:.3f} in {rows[name]['eval_seconds']:.0f} s", flush=True)

    prefill = {name: [] for name in models}
    decode = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(args.reps):  # interleaved: each repetition visits every folder once
            for name, model in models.items():
                prefill[name].append(prefill_seconds(model, args.batch, args.length, all_logits=False))
                decode[name].append(decode_seconds_per_token(model, 32, args.decode_steps))
    base_pre, base_dec = statistics.median(prefill["dense float32"]), statistics.median(decode["dense float32"])
    for name in models:
        pre, dec = statistics.median(prefill[name]), statistics.median(decode[name])
        rows[name].update(prefill_tok_s=args.batch * args.length / pre, prefill_x=base_pre / pre,
                          decode_tok_s=1 / dec, decode_x=base_dec / dec)

    gguf = smollm2_gguf()
    print(f"\nSmolLM2-135M-Instruct; input GGUF {gguf.name}: {gguf.stat().st_size / 2**20:.1f} MiB. 1 thread; "
          f"prefill {args.batch}x{args.length}, decode batch 1; speed x = vs dense float32 ({args.reps} interleaved reps, "
          f"median); sst2 test accuracy on {prepared.examples.__len__()} examples (4-shot)")
    print(f"{'folder':<20} {'params':>12} {'file MiB':>9} {'peak MiB':>9} {'prefill tok/s':>14} {'x':>5} "
          f"{'decode tok/s':>13} {'x':>5} {'sst2 acc':>9}")
    for name, r in rows.items():
        print(f"{name:<20} {r['params']:>12,} {r['file_bytes'] / 2**20:>9.1f} {r['peak_mib']:>9.0f} "
              f"{r['prefill_tok_s']:>14.0f} {r['prefill_x']:>5.2f} {r['decode_tok_s']:>13.1f} {r['decode_x']:>5.2f} "
              f"{r['accuracy']:>9.3f}")
    out = args.out or args.work / "quantize.json"
    out.write_text(json.dumps({"gguf_bytes": gguf.stat().st_size, "rows": rows, "args": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    main()
