"""Evaluator speed on SmolLM2-135M: the shared few-shot prefix cached vs every sequence run whole.

    python bench/eval_speed.py [--threads 1] [--limit 100] [--repeats 2] [--batch-size 16] [--bare]

1. 4-shot sst2 (examples/tasks/sst2.yaml), the first --limit search examples, prepared once.
   Side by side in one process, interleaved so machine load hits both alike: `whole` (the evaluator
   before prefix caching: every sequence left-padded and run whole, `reuse_prefix=False`) and
   `cached` (the default: the shared prefix run once, its KV cache reused by every batch). Prints
   the best wall and process CPU seconds of each (with one thread, CPU seconds are what the wall time
   would be on an idle machine), the speed ratio, the largest absolute difference between the two
   paths' per-choice log-likelihoods, whether the metric and per-example scores are identical, and
   the wall time of one `evaluate` call (what search pays per candidate). Goal: ratio >= 3, diff <= 1e-4.
2. The built-in python_stdlib text task has no shared prefix: both settings take the whole-sequence
   path (a check that nothing changes there).
3. With --bare: evaluator vs a bare forward over the same tokens (right-padded, full logits, nothing
   computed from them), input tokens per second, for both tasks.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "examples" / "tasks" / "sst2.yaml"


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def scored(model, prepared, batch_size: int, reuse_prefix: bool):
    """What `evaluate` does for a scoring task, keeping the per-span log-likelihoods it discards."""
    from sieve_cli.evaluate import multiple_choice_result, score_sequences, text_modelling_result

    scores = score_sequences(model, prepared.sequences, prepared.pad_id, batch_size, show_progress=False, reuse_prefix=reuse_prefix)
    result = (multiple_choice_result if prepared.output_type == "multiple_choice" else text_modelling_result)(prepared, scores)
    return scores, result


def side_by_side(name: str, model, prepared, batch_size: int, repeats: int) -> None:
    from sieve_cli.evaluate import evaluate, shared_prefix_length

    lengths = [len(s.tokens) for s in prepared.sequences]
    prefix = shared_prefix_length(prepared.sequences)
    print(f"\n{name}: {len(prepared.examples)} examples, {len(lengths)} sequences of {min(lengths)}-{max(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.1f}), shared prefix {prefix} tokens")
    small = dataclasses.replace(prepared, examples=prepared.examples[:4], sequences=prepared.sequences[:4])
    for reuse in (False, True):  # warm-up: allocator, kernels
        scored(model, small, batch_size, reuse)
    times = {False: [], True: []}
    for _ in range(repeats):
        for reuse in (False, True):
            (scores, result), wall, cpu = timed(lambda: scored(model, prepared, batch_size, reuse))
            times[reuse].append((wall, cpu))
            if reuse:
                new_scores, new_result = scores, result
            else:
                old_scores, old_result = scores, result
    diff = max(abs(a[0] - b[0]) for old, new in zip(old_scores, new_scores) for a, b in zip(old, new))
    same_hits = all(a[1:] == b[1:] for old, new in zip(old_scores, new_scores) for a, b in zip(old, new))
    same = old_result.per_example == new_result.per_example and old_result.value == new_result.value
    print(f"{'path':8} {'wall s':>8} {'cpu s':>8}   (best of {repeats})")
    for reuse, label in ((False, "whole"), (True, "cached")):
        print(f"{label:8} {min(w for w, _ in times[reuse]):>8.2f} {min(c for _, c in times[reuse]):>8.2f}")
    wall_ratio = min(w for w, _ in times[False]) / min(w for w, _ in times[True])
    cpu_ratio = min(c for _, c in times[False]) / min(c for _, c in times[True])
    print(f"speed ratio whole/cached: {wall_ratio:.2f}x wall, {cpu_ratio:.2f}x cpu")
    print(f"max |log-likelihood difference| over {sum(map(len, new_scores))} spans: {diff:.2e}; "
          f"top-1 hits equal: {same_hits}; {new_result.metric} {new_result.value:.4f} (whole {old_result.value:.4f}), "
          f"per-example scores identical: {same}")
    result, wall, cpu = timed(lambda: evaluate(model, prepared, batch_size=batch_size, show_progress=False))
    print(f"one evaluate() call (default path): {wall:.2f} s wall, {cpu:.2f} s cpu, {result.metric} {result.value:.4f}")


def bare_forward(model, prepared, batch_size: int) -> float:
    from sieve_cli.scoring import batches_by_length

    seqs = prepared.sequences
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches_by_length([len(s.tokens) for s in seqs], batch_size, 8192):
            width = max(len(seqs[i].tokens) for i in batch)
            ids = torch.full((len(batch), width), prepared.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                n = len(seqs[i].tokens)
                ids[r, :n] = torch.tensor(seqs[i].tokens)
                mask[r, :n] = 1
            model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - start


def against_bare(name: str, model, prepared, batch_size: int, repeats: int) -> None:
    from sieve_cli.evaluate import evaluate

    tokens = prepared.input_tokens
    t_eval, t_bare = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate(model, prepared, batch_size=batch_size, show_progress=False)
        t_eval.append(time.perf_counter() - start)
        t_bare.append(bare_forward(model, prepared, batch_size))
    e, b = tokens / min(t_eval), tokens / min(t_bare)
    print(f"{name:32} {tokens:>8} {e:>16.1f} {b:>19.1f} {e / b:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=100, help="sst2 search examples (search's default split has 100)")
    parser.add_argument("--text-limit", type=int, default=8, help="python_stdlib search examples")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-root", default=None, help="task data (default: $SIEVE_DATA_ROOT or the nearest shared/data)")
    parser.add_argument("--bare", action="store_true", help="also compare the evaluator with a bare forward")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sieve_cli.evaluate import prepare
    from sieve_cli.models import load_model, smollm2_gguf
    from sieve_cli.tasks import STDLIB_TASK, bind_task
    from sieve_cli.workspace import Workspace

    model, tokenizer = load_model(smollm2_gguf())
    print(f"SmolLM2-135M, float32, CPU, {args.threads} thread(s), batch {args.batch_size}")
    prepared = {}
    for name, path, limit in (("sst2 4-shot (multiple_choice)", SST2, args.limit),
                              ("python_stdlib (text_modelling)", STDLIB_TASK, args.text_limit)):
        bound = bind_task(Workspace(tempfile.mkdtemp(prefix="bench-eval-")), path, data_root=args.data_root)
        prepared[name] = prepare(bound, "search", tokenizer, limit=limit)
        side_by_side(name, model, prepared[name], args.batch_size, args.repeats)
    if args.bare:
        print(f"\n{'task':32} {'tokens':>8} {'evaluator tok/s':>16} {'bare forward tok/s':>19} {'ratio':>6}")
        for name, p in prepared.items():
            against_bare(name, model, p, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
