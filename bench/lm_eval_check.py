"""lm-evaluation-harness vs `sieve eval` on a pruned SmolLM2 folder: same examples, same accuracy?

    PYTHONPATH=$PWD python bench/quantize.py                # makes the workspace and the folders first
    PYTHONPATH=$PWD python bench/lm_eval_check.py --limit 100

Exports the workspace's sst2 test part (first --limit examples) with
`sieve_cli.lm_eval_task.write_lm_eval_task`, runs the lm-eval command line on each folder
through its Hugging Face backend (plain transformers, trust_remote_code), and scores the same
folder with sieve's evaluator; prints both accuracies, per-example agreement and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sieve_cli.evaluate import evaluate, prepare  # noqa: E402
from sieve_cli.lm_eval_task import write_lm_eval_task  # noqa: E402
from sieve_cli.pruned import load_pruned, load_tokenizer  # noqa: E402
from sieve_cli.tasks import bind_task  # noqa: E402
from sieve_cli.workspace import Workspace  # noqa: E402


def lm_eval_command(folder: Path, tasks_dir: Path, name: str, out: Path) -> list[str]:
    return ["lm-eval", "run", "--model", "hf",
            "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
            "--include_path", str(tasks_dir), "--tasks", name, "--device", "cpu", "--batch_size", "1",
            "--output_path", str(out), "--log_samples"]


def run_lm_eval(folder: Path, tasks_dir: Path, name: str, out: Path) -> tuple[float, list[float], float]:
    command = lm_eval_command(folder, tasks_dir, name, out)
    print("$ " + " ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    results = json.loads(max(out.rglob("results_*.json")).read_text())["results"][name]
    samples = [json.loads(line) for line in max(out.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()]
    per_example = [s["acc"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    return results["acc,none"], per_example, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sieve-bench-quantize"))
    parser.add_argument("--out-dir", type=Path, default=None, help="where the folders are (default: WORK/out)")
    parser.add_argument("--folders", nargs="+", default=["pruned-50%-float32", "dense-float32"],
                        help="folders under WORK/out (written by bench/quantize.py)")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)

    bound = bind_task(Workspace(args.work / "ws"), None)
    tasks_dir = args.work / "lm_eval_tasks"
    name = write_lm_eval_task(bound, "test", tasks_dir, limit=args.limit)
    for folder_name in args.folders:
        folder = (args.out_dir or args.work / "out") / folder_name
        started = time.perf_counter()
        prepared = prepare(bound, "test", load_tokenizer(folder), limit=args.limit)
        ours = evaluate(load_pruned(folder), prepared, batch_size=16, show_progress=False)
        sieve_seconds = time.perf_counter() - started
        theirs, per_example, seconds = run_lm_eval(folder, tasks_dir, name, args.work / "lm_eval_out" / folder_name)
        agree = sum(a == b for a, b in zip(per_example, ours.per_example))
        print(f"{folder_name}: sieve eval {ours.value:.3f} ({sieve_seconds:.0f} s), lm-eval {theirs:.3f} "
              f"({seconds:.0f} s), {agree}/{len(per_example)} examples scored alike", flush=True)


if __name__ == "__main__":
    main()
