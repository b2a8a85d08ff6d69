"""Wall time of `sieve fit` on SmolLM2-135M from a finished capture, and each method's errors.

    python bench/fit_speed.py                       # workspace /tmp/fitws, sst2, 1 thread
    python bench/fit_speed.py -w WS --threads 2 --methods output,svd

Uses the workspace's capture when it has one; otherwise binds examples/tasks/sst2.yaml and
captures its calibration split (up to --tokens) into the workspace first (not timed as fit).
Times: `load` is reading the model, `fit` the decompositions and training, `total` the whole
run_fit call (including writing the factors), `cpu` that call's process CPU time: with one
thread it is what the wall time would be on an idle machine (the machine is shared). Errors: mean relative output error
||WX - W'X||^2 / ||WX||^2 over all 210 matrices at 0.9 / 0.75 / 0.5 kept, on the capture.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sieve_cli.fit import FitOptions, load_spectrum, run_fit
from sieve_cli.lowrank import rank_for_fraction
from sieve_cli.models import load_model, smollm2_gguf
from sieve_cli.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
LEVELS = (0.9, 0.75, 0.5)


def ensure_capture(ws: Workspace, tokens: int) -> None:
    """discover + task + capture, unless the workspace already has a finished capture."""
    from sieve_cli import capture
    from sieve_cli.discover import DiscoverOptions, run_discover
    from sieve_cli.statistics import cut_sequences
    from sieve_cli.tasks import bind_task

    if (ws.read_manifest("capture") or {}).get("complete"):
        return
    run_discover(ws, DiscoverOptions(model=str(smollm2_gguf())))
    task = REPO / "examples" / "tasks" / "sst2.yaml"
    if hasattr(capture, "run_capture"):
        capture.run_capture(ws, capture.CaptureOptions(task=str(task), tokens=tokens))
        return
    # capture's stage wrapper is not in yet: the same statistics through its engine
    bound = bind_task(ws, task)
    model, tokenizer = load_model(str(smollm2_gguf()), "float32", "cpu")
    options = capture.CaptureOptions(tokens=tokens)
    examples = [tokenizer(t)["input_ids"] for t in bound.texts("calibration")]
    sequences, _ = cut_sequences(examples, options.seq_len, options.tokens)
    inputs = {"options": options.recorded(), "upstream": ws.upstream_hashes("discover", "task")}
    ws.begin("capture", inputs)
    started = time.perf_counter()
    result = capture.capture_statistics(model, sequences, options, ws.capture_store, pad_id=tokenizer.pad_token_id or 0)
    print(f"captured {result['tokens']:,} tokens in {time.perf_counter() - started:.1f} s")
    ws.finish("capture", inputs, [ws.capture_store], {"tokens": result["tokens"]})


def mean_errors(ws: Workspace, method: str, model) -> dict[float, float]:
    from sieve_cli.matrices import find_matrices

    spectrum = load_spectrum(ws, method)
    out = {}
    for p in LEVELS:
        values = [spectrum[m.name][rank_for_fraction(p, m.out_features, m.in_features)] for m in find_matrices(model)]
        values = [v for v in values if v is not None]
        out[p] = sum(values) / len(values) if values else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workspace", default="/tmp/fitws")
    parser.add_argument("--tokens", type=int, default=50_000, help="calibration tokens when capturing here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="output,svd,pca,learned-init,learned")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ws = Workspace(args.workspace)
    ensure_capture(ws, args.tokens)
    print(f"capture: {ws.read_manifest('capture')['summary']}  threads: {torch.get_num_threads()}")

    rows = []
    model = None
    for label in args.methods.split(","):
        options = FitOptions(method="learned", init="output") if label == "learned-init" else FitOptions(method=label)
        started, cpu_started = time.perf_counter(), time.process_time()
        summary = run_fit(ws, options, force=True)
        total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        if model is None:
            model, _ = load_model(str(smollm2_gguf()), "float32", "cpu")
        # learned-init writes fit/learned too: its errors are read here, before `learned` replaces it
        rows.append((label, summary, total, cpu, mean_errors(ws, options.method, model)))
        print(f"  {label}: done in {total:.1f} s")

    print()
    print(f"{'method':<13}{'matrices':>9}{'load s':>9}{'fit s':>9}{'total s':>9}{'cpu s':>9}" + "".join(f"{f'err@{p}':>12}" for p in LEVELS))
    for label, s, total, cpu, errors in rows:
        print(f"{label:<13}{s['matrices']:>9}{s['load_seconds']:>9.2f}{s['seconds']:>9.2f}{total:>9.2f}{cpu:>9.2f}"
              + "".join(f"{errors[p]:>12.6f}" for p in LEVELS))
    print()
    print("mean relative output error per matrix kind (kept 0.9 / 0.75 / 0.5):")
    for label, s, *_ in rows:
        for kind, per in s["relative_error"].items():
            print(f"  {label:<13}{kind:<6}" + " ".join(f"{per.get(str(p), float('nan')):.6f}" for p in LEVELS))


if __name__ == "__main__":
    main()
