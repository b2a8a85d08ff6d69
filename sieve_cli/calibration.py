"""The calibration stream as capture runs it: each example's tokens after a prompt prefix it shares.

Every few-shot example of a task starts with the same demonstrations. Running that prefix again
for each example spends most of a `--tokens` budget on the same activations, so capture runs each
distinct prefix once and counts its statistics once per example that starts with it (what
deployment sees), then runs each example's own tokens after the prefix's cached keys/values.

A prompt group is the examples whose rendered shared part (description + demonstrations,
`Example.shared`) is the same text; its token prefix is the longest common prefix of that text's
tokens and the first member's tokens, so it ends at a token boundary both tokenisations agree on.
`--tokens` counts the tokens run: a prefix once, where first used, and every example's own tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice

# Below this many shared tokens the prefix pass and cache copies buy nothing (scoring's threshold).
from .scoring import MIN_SHARED_PREFIX

log = logging.getLogger(__name__)

NO_PREFIX = -1


@dataclass(frozen=True)
class Calibration:
    """Sequences to run, each after one of `prefixes` (index) or after none (NO_PREFIX).

    The statistics of the stream are those of the full sequences `prefixes[p] + sequences[i]`,
    every token counted; a prefix counts `multiplicity[p]` times (once per sequence after it).
    """

    sequences: list[list[int]]
    prefix_of: list[int] = field(default_factory=list)  # per sequence; empty: no prefixes at all
    prefixes: list[tuple[int, ...]] = field(default_factory=list)
    examples: int = 0  # calibration examples covered (some of their tokens run), 0 when unknown

    def __post_init__(self) -> None:
        if not self.prefix_of:
            object.__setattr__(self, "prefix_of", [NO_PREFIX] * len(self.sequences))

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]

    @property
    def longest(self) -> int:
        """The longest full sequence (prefix + own tokens): what must fit the model's positions."""
        return max((len(s) + (len(self.prefixes[p]) if p != NO_PREFIX else 0) for s, p in zip(self.sequences, self.prefix_of)), default=0)

    @property
    def multiplicity(self) -> list[int]:
        counts = [0] * len(self.prefixes)
        for p in self.prefix_of:
            if p != NO_PREFIX:
                counts[p] += 1
        return counts

    @property
    def tokens_run(self) -> int:
        """Tokens the model runs: each prefix once, each sequence's own tokens."""
        return sum(self.lengths) + sum(len(p) for p, m in zip(self.prefixes, self.multiplicity) if m)

    @property
    def tokens_counted(self) -> int:
        """Tokens the statistics stand for: every prefix token once per sequence after it."""
        return sum(self.lengths) + sum(len(p) * m for p, m in zip(self.prefixes, self.multiplicity))

    @property
    def repeated_prefix_tokens(self) -> int:
        """Prefix tokens counted but not run (the repeats a full-sequence capture would have run)."""
        return self.tokens_counted - self.tokens_run

    def full_sequences(self) -> list[list[int]]:
        """What a capture without prefix sharing runs for the same examples (the reference)."""
        return [list(self.prefixes[p]) + s if p != NO_PREFIX else list(s) for s, p in zip(self.sequences, self.prefix_of)]

    def describe(self) -> dict:
        return {"examples_covered": self.examples, "tokens_run": self.tokens_run, "tokens_counted": self.tokens_counted,
                "prefixes": sum(1 for m in self.multiplicity if m), "repeated_prefix_tokens": self.repeated_prefix_tokens}


def as_calibration(sequences) -> Calibration:
    """A Calibration as is; a plain list of token sequences as sequences without prefixes."""
    return sequences if isinstance(sequences, Calibration) else Calibration([list(s) for s in sequences])


def common_prefix_length(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Builder:
    """Cuts examples into runs within a token budget, with each prompt group's prefix run once."""

    def __init__(self, seq_len: int, budget: int) -> None:
        self.seq_len, self.budget = seq_len, budget
        self.sequences: list[list[int]] = []
        self.prefix_of: list[int] = []
        self.prefixes: list[tuple[int, ...]] = []
        self.group_prefix: dict[str, int] = {}  # shared text -> prefix index, or NO_PREFIX
        self.used: set[int] = set()  # prefixes already counted against the budget
        self.run = 0
        self.examples = 0

    def full(self) -> bool:
        return self.run >= self.budget

    def _prefix_for(self, shared: str, shared_ids: list[int] | None, ids: list[int]) -> int:
        """The group's prefix index, decided at its first member; NO_PREFIX when it would be too short."""
        if shared not in self.group_prefix:
            n = common_prefix_length(shared_ids or [], ids) if shared else 0
            n = min(n, self.seq_len - 1, len(ids) - 1)  # the prefix ends inside the first piece, before its last token
            if n >= MIN_SHARED_PREFIX:
                self.prefixes.append(tuple(ids[:n]))
                self.group_prefix[shared] = len(self.prefixes) - 1
            else:
                self.group_prefix[shared] = NO_PREFIX
        p = self.group_prefix[shared]
        if p == NO_PREFIX:
            return p
        prefix = self.prefixes[p]
        # a member that tokenises differently at the boundary, or too short to extend it, runs whole
        fits = len(ids) > len(prefix) and ids[: len(prefix)] == list(prefix)
        return p if fits else NO_PREFIX

    def _add(self, tokens: list[int], prefix: int) -> None:
        self.sequences.append(tokens)
        self.prefix_of.append(prefix)

    def add(self, ids: list[int], shared: str, shared_ids: list[int] | None) -> None:
        """One example: its first piece after the group's prefix, further pieces whole (as without sharing)."""
        self.examples += 1
        p = self._prefix_for(shared, shared_ids, ids)
        start = 0
        if p != NO_PREFIX:
            n = len(self.prefixes[p])
            cost = 0 if p in self.used else n
            left = self.budget - self.run
            first = ids[n : min(len(ids), self.seq_len)]
            if left > cost:  # room for the prefix (once) and at least one own token
                own = first[: left - cost]
                self._add(own, p)
                self.run += cost + len(own)
                self.used.add(p)
                start = min(len(ids), self.seq_len)
            # else: no room for the prefix; run the example whole, cut at the budget, like any other
        for begin in range(start, len(ids), self.seq_len):
            if self.full():
                return
            piece = ids[begin : begin + self.seq_len][: self.budget - self.run]
            self._add(piece, NO_PREFIX)
            self.run += len(piece)

    def result(self) -> Calibration:
        return Calibration(self.sequences, self.prefix_of, self.prefixes, self.examples)


def build_calibration(tokenizer, examples: Iterable[tuple[str, str]], seq_len: int, budget: int, share_prefix: bool = True,
                      block: int = 256) -> tuple[Calibration, bool]:
    """The calibration stream of (shared text, full text) examples, in split order, cut at `budget` tokens run.

    Encoded as the evaluator encodes (special tokens included) and in blocks, so a large split is
    only tokenised as far as the budget needs. `share_prefix` False runs every example whole
    (the capture before prefix sharing). Returns (calibration, exhausted).
    """
    builder = _Builder(seq_len, budget)
    shared_ids: dict[str, list[int]] = {}
    stream = iter(examples)
    while part := list(islice(stream, block)):
        ids = tokenizer([text for _, text in part])["input_ids"]
        new = sorted({s for s, _ in part if s and s not in shared_ids}) if share_prefix else []
        if new:
            shared_ids.update(zip(new, tokenizer(new)["input_ids"]))
        for (shared, _), row in zip(part, ids):
            if builder.full():
                return builder.result(), False
            builder.add(list(row), shared if share_prefix else "", shared_ids.get(shared))
    return builder.result(), not builder.full()


def calibration_sequences(bound, options, tokenizer) -> tuple[Calibration, bool]:
    """The task's calibration split as capture runs it (`options`: CaptureOptions)."""
    delimiter = bound.task.target_delimiter
    examples = ((e.shared, e.text(delimiter)) for e in bound.iter_examples("calibration"))  # rendered as read
    calibration, exhausted = build_calibration(tokenizer, examples, options.seq_len, options.tokens, options.share_prefix)
    if exhausted:  # the usual case for a small task at the default --tokens (the demo's too): said, not warned
        log.info(
            "the calibration split of %s holds only %s tokens, fewer than --tokens %s: capturing all of them",
            bound.name, f"{calibration.tokens_run:,}", f"{options.tokens:,}",
        )
    return calibration, exhausted
