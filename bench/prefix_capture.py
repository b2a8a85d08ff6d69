"""Capture with and without the shared prompt prefix on SmolLM2-135M, side by side.

    PYTHONPATH=$PWD python bench/prefix_capture.py [--tasks sst2,trec] [--tokens 5000,20000] [--check]

For each task (its examples/tasks YAML, default split) and token budget, the in-memory capture
of the calibration split runs twice in one process with one thread: "before" runs every example
whole (--no-share-prefix), "after" runs each distinct prefix once and counts it once per
example. Reported: calibration examples covered, tokens run, tokens the statistics stand for,
wall time (model loaded, store written once). With --check, the full sequences of the examples
"after" covered are captured the old way as well, and the largest relative difference between
the two Grams (over sites, Frobenius norm) is printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from sieve_cli.calibration import build_calibration
from sieve_cli.capture import CaptureOptions, capture_statistics
from sieve_cli.models import load_model, smollm2_gguf
from sieve_cli.store import read_stats
from sieve_cli.tasks import bind_task
from sieve_cli.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


def calibration_examples(task: str, data_root: str) -> tuple[list[tuple[str, str]], int]:
    """(shared part, full text) of every calibration example, and the task's number of shots."""
    bound = bind_task(Workspace(tempfile.mkdtemp(prefix="bench-prefix-")), REPO / "examples" / "tasks" / f"{task}.yaml",
                      data_root=data_root)
    delimiter = bound.task.target_delimiter
    return [(e.shared, e.text(delimiter)) for e in bound.examples("calibration")], bound.task.num_fewshot


def timed_capture(model, calibration, options, pad_id: int, folder: Path, name: str) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = capture_statistics(model, calibration, options, folder / f"{name}.zarr", pad_id=pad_id, fresh=True)
    return time.perf_counter() - start, summary


def largest_gram_difference(a: Path, b: Path) -> float:
    first, second = read_stats(a), read_stats(b)
    return max(float(torch.linalg.norm(first[s].gram - second[s].gram) / torch.linalg.norm(second[s].gram)) for s in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,trec")
    parser.add_argument("--tokens", default="5000,20000")
    parser.add_argument("--data-root", default="/work/shared/data")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(smollm2_gguf(), "float32", "cpu")
    pad = tokenizer.pad_token_id or 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for task in args.tasks.split(","):
            examples, shots = calibration_examples(task, args.data_root)
            for budget in map(int, args.tokens.split(",")):
                options = CaptureOptions(tokens=budget, batch_size=args.batch_size)
                for share in (False, True):
                    calibration, exhausted = build_calibration(tokenizer, examples, options.seq_len, budget, share)
                    seconds, summary = timed_capture(model, calibration, options, pad, folder, f"{task}-{share}")
                    note = ""
                    if args.check and share:
                        timed_capture(model, calibration.full_sequences(), options, pad, folder, f"{task}-full")
                        note = f"{largest_gram_difference(folder / f'{task}-True.zarr', folder / f'{task}-full.zarr'):.1e}"
                    for store in folder.glob("*.zarr"):  # 0.75 GiB each: keep the disk free between runs
                        shutil.rmtree(store)
                    rows.append((f"{task} ({shots}-shot)", f"{budget:,}", "after" if share else "before",
                                 f"{calibration.examples} of {len(examples)}" + (" (all)" if exhausted else ""),
                                 f"{summary['tokens_this_run']:,}", f"{summary['tokens']:,}", f"{seconds:.1f}", note))
                    print(" | ".join(rows[-1]), flush=True)
    header = ("task", "--tokens", "capture", "examples covered", "tokens run", "tokens counted", "wall s", "Gram rel. diff")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
