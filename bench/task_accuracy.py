"""Dense accuracy of SmolLM2-135M on every example of a task file, with its 95% interval and chance.

All records are scored (no split): the number a task file's comment states. Few-shot
demonstrations, where the task has any, come from the records, never an example's own.

    python bench/task_accuracy.py [TASK.yaml ...] [--threads 1] [--limit N]

Default task: the built-in `reviews` (sieve_cli/builtin_tasks/reviews.yaml).
"""

from __future__ import annotations

import argparse
import time

import torch


def all_records_bound(path: str):
    """The task with every record in one part ("test"), scored as `sieve eval` would score it."""
    from sieve_cli.tasks import BoundTask, draw_fewshot, fewshot_pool, fewshot_source, load_task, read_records
    from sieve_cli.tasks.binding import records_by_id

    task = load_task(path)
    records = records_by_id(task, read_records(task))
    split = {"ids": {"test": list(records)}}
    source = fewshot_source(task)
    if task.num_fewshot and source is None:  # demonstrations from the records themselves, never an example's own
        split["fewshot"] = draw_fewshot(task, fewshot_pool(task, None, records, list(records)), seed=0)
    elif task.num_fewshot:
        split["fewshot_from"] = f"split:{source}"
        split["fewshot"] = draw_fewshot(task, fewshot_pool(task, source, records, []), seed=0)
    return BoundTask(task, split, records)


def main() -> None:
    from sieve_cli.tasks import DEFAULT_TASK

    parser = argparse.ArgumentParser()
    parser.add_argument("tasks", nargs="*", default=[str(DEFAULT_TASK)])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sieve_cli.evaluate import evaluate, prepare
    from sieve_cli.models import load_model, smollm2_gguf

    model, tokenizer = load_model(str(smollm2_gguf()))
    print(f"SmolLM2-135M-Instruct, float32, CPU, {args.threads} thread(s)")
    for path in args.tasks:
        bound = all_records_bound(path)
        if bound.output_type != "multiple_choice":
            print(f"{bound.name}: {bound.output_type} has no chance level; skipped")
            continue
        prepared = prepare(bound, "test", tokenizer, limit=args.limit)
        start = time.perf_counter()
        result = evaluate(model, prepared, show_progress=False)
        print(f"{bound.name}: accuracy {result.value:.4f} (95% interval {result.ci_low:.4f} to {result.ci_high:.4f}) "
              f"on {result.n} examples, chance {result.extra['chance']:.2f}, acc_norm {result.extra['acc_norm']:.4f} "
              f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
