"""A task's split part tokenised once for the evaluator: `prepare` -> `PreparedSplit` (scoring sequences or prompts).

Each multiple-choice example becomes one sequence per distinct model input (choices that are one-token
continuations of one context share it), each text-modelling example one sequence; a generation task keeps
its prompts. Contexts and continuations are split as lm-eval does, trimmed to `max_length` from the left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .models import pad_id_of
from .scoring import Sequence, Span
from .tasks import BoundTask, Example


@dataclass
class PreparedSplit:
    """One split part, tokenised once; reusable across models that share the tokenizer."""

    task: str
    part: str
    output_type: str
    examples: list[Example]
    sequences: list[Sequence]  # scoring sequences (multiple_choice, text_modelling)
    prompts: list[tuple[int, ...]] = field(default_factory=list)  # generate_until contexts
    until: tuple[str, ...] = ()
    max_gen_toks: int = 0
    target_delimiter: str = " "
    pad_id: int = 0
    eos_id: int | None = None
    tokenizer: Any = None  # kept for decoding generations only

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]

    @property
    def input_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences) + sum(len(p) for p in self.prompts)


def prepare(bound: BoundTask, part: str, tokenizer, limit: int | None = None, max_length: int = 1024) -> PreparedSplit:
    """Tokenise one part of the bound task (the first `limit` examples) for `evaluate`."""
    if limit is not None and limit < 1:
        raise InputError("--limit must be >= 1")
    if max_length < 8:
        raise InputError("--max-length must be >= 8 tokens")
    examples = bound.examples(part)[:limit]
    task = bound.task
    pad_id = pad_id_of(tokenizer)
    prepared = PreparedSplit(
        task=task.name, part=part, output_type=task.output_type, examples=examples, sequences=[],
        target_delimiter=task.target_delimiter, pad_id=pad_id, eos_id=tokenizer.eos_token_id,
    )
    if task.output_type == "generate_until":
        budget = max(1, max_length - task.max_gen_toks)
        prepared.prompts = [tuple(tokenizer.encode(e.context)[-budget:]) for e in examples]
        prepared.until, prepared.max_gen_toks, prepared.tokenizer = task.until, task.max_gen_toks, tokenizer
        return prepared
    for index, example in enumerate(examples):
        prepared.sequences.extend(_sequences_of(index, example, task.target_delimiter, task.output_type, tokenizer, max_length))
    return prepared


def longest_input(prepared: PreparedSplit) -> int:
    """Tokens of the longest sequence the model will see (a generation's prompt plus what it may add)."""
    if prepared.output_type == "generate_until":
        return max(map(len, prepared.prompts), default=0) + prepared.max_gen_toks
    return max((len(s.tokens) for s in prepared.sequences), default=0)


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval does: encode the whole, cut at the context's length.

    Encoding the whole keeps merges across the boundary as the model saw them in training;
    where the context's own encoding is not a prefix of the whole, the two are encoded apart.
    """
    if not context:
        whole = tokenizer.encode(continuation)
        return whole[:1], whole[1:]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer.encode(continuation, add_special_tokens=False)


def _fit(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Trim to at most max_length + 1 tokens: the context's left first (keeping one), then the continuation's tail."""
    excess = len(ctx) + len(cont) - (max_length + 1)
    if excess > 0:
        drop = min(excess, max(len(ctx) - 1, 0))
        ctx, excess = ctx[drop:], excess - drop
    if excess > 0:
        cont = cont[: len(cont) - excess]
    return ctx, cont


def _sequences_of(index: int, example: Example, delimiter: str, output_type: str, tokenizer, max_length: int) -> list[Sequence]:
    if output_type == "text_modelling":
        sep = delimiter if example.context else ""
        ctx, cont = _fit(*split_tokens(tokenizer, example.context, sep + example.target), max_length)
        full = ctx + cont
        return [Sequence(index, tuple(full[:-1]), (Span(0, tuple(cont)),))] if cont else []
    # multiple_choice: choices whose model input is identical (one-token continuations of one context)
    # share a single sequence, so a yes/no task costs one forward per example, not one per choice
    grouped: dict[tuple[int, ...], list[Span]] = {}
    for choice, text in enumerate(example.choices):
        ctx, cont = _fit(*split_tokens(tokenizer, example.context, delimiter + text), max_length)
        full = ctx + cont
        grouped.setdefault(tuple(full[:-1]), []).append(Span(choice, tuple(cont)))
    return [Sequence(index, tokens, tuple(spans)) for tokens, spans in grouped.items()]
