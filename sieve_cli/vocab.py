"""The task vocabulary (`--vocab task`): which token ids the LM head keeps for a bound task.

Kept: every id of the texts the task itself brings, tokenised as capture and the evaluator do (special
tokens included): each calibration example's full text (context + delimiter + gold target) and its
context alone (a generation prompt), each of its choices as scored (`prepared.split_tokens`), and
each few-shot record rendered on its own; the tokenizer's special ids (bos, eos, pad, unk,
`all_special_ids`) and the model's own (`special`: config and generation config); then the `extra`
lowest ids not yet kept. The search, confirm and test examples are never read: they are held out,
and a held-out id outside the set is what the search's and eval's metrics are to measure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .prepared import split_tokens
from .tasks import BoundTask


@dataclass(frozen=True)
class TaskVocabulary:
    """The kept ids (sorted) and how many each source added (task texts, special ids, the lowest others)."""

    ids: tuple[int, ...]
    vocab_size: int
    from_task: int
    from_special: int
    from_extra: int
    extra: int  # the --vocab-extra asked for

    def record(self) -> dict:
        """What a pruned folder records (sieve.json's `vocab` plus the ids for its vocab file)."""
        return {"mode": "task", "kept": len(self.ids), "vocab_size": self.vocab_size, "extra": self.extra,
                "from": {"task": self.from_task, "special": self.from_special, "extra": self.from_extra},
                "ids": list(self.ids)}


def task_text_ids(bound: BoundTask, tokenizer) -> set[int]:
    """Every id in the calibration, few-shot and choice texts of the task, as the model reads them."""
    delimiter = bound.task.target_delimiter
    ids: set[int] = set()
    for example in [*bound.iter_examples("calibration"), *bound.fewshot_examples()]:
        ids.update(tokenizer(example.text(delimiter))["input_ids"])
        if example.context:
            ids.update(tokenizer.encode(example.context))
        for choice in example.choices:
            context, continuation = split_tokens(tokenizer, example.context, delimiter + choice)
            ids.update(context)
            ids.update(continuation)
    return ids


def special_ids(tokenizer, special: Iterable[int | None] = ()) -> set[int]:
    named = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return {int(i) for i in (*named, *tokenizer.all_special_ids, *special) if i is not None}


def task_vocabulary(bound: BoundTask, tokenizer, vocab_size: int, extra: int,
                    special: Iterable[int | None] = ()) -> TaskVocabulary:
    """The ids the head keeps for `bound`'s task, all below `vocab_size` (the head's rows).

    `extra` adds that many of the lowest ids not yet kept: a BPE vocabulary numbers its tokens in
    merge order, so the lowest ids are the bytes and the earliest, most frequent merges: a proxy for
    how often a token occurs, with no corpus to count on.
    """
    if extra < 0:
        raise ValueError("extra must be >= 0")
    from_task = {i for i in task_text_ids(bound, tokenizer) if 0 <= i < vocab_size}
    specials = {i for i in special_ids(tokenizer, special) if 0 <= i < vocab_size} - from_task
    kept = from_task | specials
    added = 0
    for i in range(vocab_size):
        if added >= extra:
            break
        if i not in kept:
            kept.add(i)
            added += 1
    return TaskVocabulary(tuple(sorted(kept)), vocab_size, len(from_task), len(specials), added, extra)


def model_special_ids(model) -> list[int]:
    """bos, eos (one or a list) and pad ids from the model's config and generation config."""
    found: list[int] = []
    for config in (model.config, getattr(model, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, key, None) if config is not None else None
            found += [int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]
    return found


__all__ = ["TaskVocabulary", "model_special_ids", "special_ids", "task_text_ids", "task_vocabulary"]
