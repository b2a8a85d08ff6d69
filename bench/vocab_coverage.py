"""How much of a task's held-out text the task vocabulary (`--vocab task`) keeps, per `--vocab-extra`.

    python bench/vocab_coverage.py [--tasks sst2 mbpp] [--extras 0 2048 4096 8192 16384 32768]

Tokenisation only (SmolLM2-135M's tokenizer, no model run): each task is bound with the default split in a
temporary workspace, the kept ids chosen as apply chooses them (`vocab.task_vocabulary`, from calibration,
few-shot and choice texts only), and the held-out parts (search, confirm, test) measured against them: the share
of their tokens kept (inputs outside the set still work: this is what the head could not predict), the share
of their gold targets' tokens kept (split as the evaluator scores them), and the share of examples whose whole
gold target is kept (what a generation task needs to reach exact match). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from sieve_cli.models import load_tokenizer, smollm2_gguf
    from sieve_cli.prepared import split_tokens
    from sieve_cli.tasks import bind_task
    from sieve_cli.vocab import task_vocabulary
    from sieve_cli.workspace import Workspace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mbpp"])
    parser.add_argument("--extras", nargs="+", type=int, default=[0, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    tokenizer = load_tokenizer(smollm2_gguf())
    vocab_size = 49152  # SmolLM2's head rows
    print("| task | --vocab-extra | kept ids | held-out tokens kept | gold-target tokens kept | whole gold target kept |")
    print("|---|---|---|---|---|---|")
    for name in args.tasks:
        with tempfile.TemporaryDirectory() as tmp:
            bound = bind_task(Workspace(Path(tmp) / "ws"), REPO / "examples" / "tasks" / f"{name}.yaml",
                              data_root=args.data_root)
            parts = ("search", "confirm", "test")
            held = [i for p in parts for t in bound.texts(p) for i in tokenizer(t)["input_ids"]]
            delimiter = bound.task.target_delimiter
            targets = [split_tokens(tokenizer, e.context, delimiter + e.target)[1] for p in parts for e in bound.examples(p)]
            for extra in args.extras:
                kept = set(task_vocabulary(bound, tokenizer, vocab_size, extra).ids)
                tokens = sum(i in kept for i in held) / len(held)
                gold = sum(i in kept for t in targets for i in t) / sum(map(len, targets))
                whole = sum(all(i in kept for i in t) for t in targets) / len(targets)
                print(f"| {name} | {extra:,} | {len(kept):,} | {tokens:.1%} | {gold:.1%} | {whole:.1%} |", flush=True)


if __name__ == "__main__":
    main()
