"""Evaluator throughput vs a bare batched forward over the same tokens, on SmolLM2-135M.

For each task, the same prepared sequences are run (a) through `evaluate` (left padding,
position ids, logits only where scored, log-likelihoods and top-1 hits) and (b) as a bare
`model(input_ids, attention_mask)` forward with the same length-sorted batches, right-padded,
full logits, nothing computed from them. Input tokens per second; goal: ratio >= 0.8.

    python bench/eval_speed.py [--threads 1] [--limit 48] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def bare_forward(model, prepared, batch_size: int) -> float:
    from sieve_cli.evaluate import _batches

    seqs = prepared.sequences
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in _batches([len(s.tokens) for s in seqs], batch_size, 8192):
            width = max(len(seqs[i].tokens) for i in batch)
            ids = torch.full((len(batch), width), prepared.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                n = len(seqs[i].tokens)
                ids[r, :n] = torch.tensor(seqs[i].tokens)
                mask[r, :n] = 1
            model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sieve_cli.evaluate import evaluate, prepare
    from sieve_cli.models import load_model, smollm2_gguf
    from sieve_cli.tasks import DEFAULT_TASK, bind_task
    from sieve_cli.workspace import Workspace

    model, tokenizer = load_model(smollm2_gguf())
    tasks = {"sst2 (multiple_choice)": REPO / "examples" / "tasks" / "sst2.yaml", "python_stdlib (text_modelling)": DEFAULT_TASK}
    print(f"SmolLM2-135M, float32, CPU, {args.threads} thread(s), batch {args.batch_size}, {args.limit} search examples, best of {args.repeats}")
    print(f"{'task':32} {'tokens':>8} {'evaluator tok/s':>16} {'bare forward tok/s':>19} {'ratio':>6}")
    for name, path in tasks.items():
        bound = bind_task(Workspace(tempfile.mkdtemp(prefix="bench-eval-")), path)
        prepared = prepare(bound, "search", tokenizer, limit=args.limit)
        tokens = prepared.input_tokens
        evaluate(model, prepared, batch_size=args.batch_size)  # warm-up
        t_eval, t_bare = [], []
        for _ in range(args.repeats):  # interleaved, so machine load hits both alike
            start = time.perf_counter()
            evaluate(model, prepared, batch_size=args.batch_size)
            t_eval.append(time.perf_counter() - start)
            t_bare.append(bare_forward(model, prepared, args.batch_size))
        e, b = tokens / min(t_eval), tokens / min(t_bare)
        print(f"{name:32} {tokens:>8} {e:>16.1f} {b:>19.1f} {e / b:>6.2f}")


if __name__ == "__main__":
    main()
