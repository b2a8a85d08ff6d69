"""Where calibration comes from: sst2's own sentences (a part of the 872) vs GLUE train (`calibration_split`).

Two workspaces on SmolLM2-135M, the same 4-shot sst2 task except for calibration: `in_split`
calibrates on the split's calibration part (279 full dev sentences), `train` on
`calibration_split: calibration` = GLUE train (`train.tsv`, 60,614 treebank phrases, read as far
as --tokens goes). Both capture --tokens and fit `output`; then one model scores each
workspace's factors at uniform kept fractions --ps on the test part, which both splits share
(drawn first from the same seeded shuffle; checked), paired with dense on the same examples:
accuracy and the mean drop of the gold answer's log-probability (the low-noise signal).

    python bench/calibration_source.py                  # 50k tokens, p = 0.99, 0.95, 0.9
    python bench/calibration_source.py --ps 0.99 --tokens 20000

Workspaces are kept under --work, so a rerun reuses captures and fits. Exact numbers go to
--out (JSON) as well as the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sieve_cli.capture import CaptureOptions, run_capture  # noqa: E402
from sieve_cli.discover import DiscoverOptions, load_workspace_model, run_discover  # noqa: E402
from sieve_cli.evaluate import evaluate, prepare  # noqa: E402
from sieve_cli.fit import FitOptions, load_factors, run_fit  # noqa: E402
from sieve_cli.models import smollm2_gguf  # noqa: E402
from sieve_cli.pruned import prune_in_memory  # noqa: E402
from sieve_cli.search import ranks_for, read_targets  # noqa: E402
from sieve_cli.tasks import SplitOptions, bind_task, load_task  # noqa: E402
from sieve_cli.workspace import Workspace  # noqa: E402

log = logging.getLogger("bench")
SST2 = REPO / "examples" / "tasks" / "sst2.yaml"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=50_000, help="calibration tokens to capture")
    ap.add_argument("--ps", default="0.99,0.95,0.9", help="uniform kept fractions to score")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sieve-bench-calibration"))
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: WORK/calibration_source.json)")
    return ap.parse_args()


def train_task(folder: Path) -> Path:
    """examples/tasks/sst2.yaml with GLUE train as its calibration split."""
    task = load_task(SST2)
    body = yaml.safe_load(SST2.read_text())
    # absolute paths (the copy lives outside the repository, where no data root is found)
    body["data_files"] = {**task.data_files, "calibration": str(Path(task.data_files["test"]).with_name("train.tsv"))}
    body["calibration_split"] = "calibration"
    path = folder / "sst2_train_calibration.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# the split the comparison was measured on (before confirm grew to 30%): 279 in-split calibration
# sentences; both workspaces draw the same 262 test sentences first
SPLIT = SplitOptions(test=0.3, confirm=0.15, max_confirm=150)


def prepare_workspace(ws: Workspace, task: Path, tokens: int) -> dict:
    run_discover(ws, DiscoverOptions(model=str(smollm2_gguf())))
    bind_task(ws, task, split=SPLIT)
    summary = run_capture(ws, CaptureOptions(task=str(task), tokens=tokens))
    run_fit(ws, FitOptions(method="output"))
    return {k: summary.get(k) for k in ("examples", "examples_covered", "tokens_run", "tokens", "seconds")}


def main() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse()
    args.work.mkdir(parents=True, exist_ok=True)
    sources = {"in_split": SST2, "train": train_task(args.work)}
    workspaces = {name: Workspace(args.work / name) for name in sources}
    captures = {name: prepare_workspace(workspaces[name], task, args.tokens) for name, task in sources.items()}
    bounds = {name: bind_task(ws, None) for name, ws in workspaces.items()}
    test_ids = {name: bound.ids("test") for name, bound in bounds.items()}
    if test_ids["in_split"] != test_ids["train"]:
        raise SystemExit("the two splits' test parts differ: the comparison would not be paired")
    model, tokenizer = load_workspace_model(workspaces["in_split"], None, "cpu")
    prepared = prepare(bounds["in_split"], "test", tokenizer)
    targets, _ = read_targets(workspaces["in_split"])
    dense = evaluate(model, prepared, batch_size=16, show_progress=False)
    rows = []
    for name, ws in workspaces.items():
        factors = load_factors(ws, "output")
        for p in map(float, args.ps.split(",")):
            started = time.perf_counter()
            restore = prune_in_memory(model, ranks_for(targets, [p] * len(targets), factors), factors)
            try:
                result = evaluate(model, prepared, batch_size=16, show_progress=False)
            finally:
                restore()
            signal = sum(d - c for d, c in zip(dense.soft, result.soft, strict=True)) / len(result.soft)
            rows.append({"calibration": name, "p": p, "accuracy": result.value, "soft_drop": signal,
                         "seconds": time.perf_counter() - started})
            log.info("%s p=%.2f: accuracy %.4f, gold log-prob drop %.4f", name, p, result.value, signal)
    out = args.out or args.work / "calibration_source.json"
    result = {"tokens": args.tokens, "test_examples": len(prepared.examples), "dense": dense.value,
              "captures": captures, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    print(f"\nsst2 4-shot, SmolLM2-135M, {args.tokens} capture tokens; test part ({len(prepared.examples)} "
          f"examples, the same for both): dense accuracy {dense.value:.4f}")
    for name, c in captures.items():
        print(f"{name:9s} capture: {c['examples_covered']} of {c['examples']} calibration examples, "
              f"{c['tokens_run']} tokens run")
    print("| calibration | p | accuracy | drop of gold log-prob (paired) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['calibration']} | {row['p']:.2f} | {row['accuracy']:.4f} | {row['soft_drop']:.4f} |")
    print(f"exact numbers: {out}")


if __name__ == "__main__":
    main()
