"""Pure math of capture: Gram updates, seeded reservoir sampling, and cutting the token stream.

No I/O and no model here, so each piece is tested against a plain reference.
"""

from __future__ import annotations

import numpy as np
import torch


def gram_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype of one batch's x^T x: the compute dtype, but never narrower than float32.

    A half-precision product would round every entry to 8-11 mantissa bits before it is
    added into the float64 sum; float32 keeps the batch product exact enough at little cost.
    """
    return compute if compute in (torch.float32, torch.float64) else torch.float32


def add_gram(pending: torch.Tensor, rows: torch.Tensor, weight: int = 1) -> None:
    """pending (D x D, >= float32) += weight * rows^T rows, one fused matmul-add into a persistent buffer.

    `weight` counts each row that many times (a shared prefix, once per example after it).

    Adding each batch's product straight into float64 costs a D x D temporary and a float64
    pass per batch, as much as the matmul itself for short batches; the float32 partial sum
    is drained into float64 by `drain_gram` every few thousand tokens instead.
    """
    pending.addmm_(rows.T.to(pending.dtype), rows.to(pending.dtype), alpha=weight)


def drain_gram(total: torch.Tensor, pending: torch.Tensor) -> None:
    """total (float64) += pending; pending = 0."""
    total.add_(pending)
    pending.zero_()


def reservoir_slots(seen: int, count: int, capacity: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm R over `count` new items whose stream positions are seen .. seen+count-1.

    Returns (rows, slots): new item rows[k] goes into reservoir slot slots[k]. Slots are
    unique; where two new items draw the same slot the later one wins, as in the
    sequential algorithm. After N items every item is held with probability capacity / N.
    """
    positions = np.arange(seen, seen + count, dtype=np.int64)
    draws = np.floor(rng.random(count) * (positions + 1)).astype(np.int64)
    slots = np.where(positions < capacity, positions, draws)
    accepted = np.nonzero(slots < capacity)[0]
    if accepted.size == 0:
        return accepted, accepted
    # keep the last item per slot: unique() on the reversed list finds each slot's last writer
    reversed_slots = slots[accepted][::-1]
    _, first_in_reversed = np.unique(reversed_slots, return_index=True)
    rows = accepted[::-1][first_in_reversed]
    order = np.argsort(rows, kind="stable")
    return rows[order], slots[rows[order]]


def cut_sequences(examples: list[list[int]], seq_len: int, budget: int) -> tuple[list[list[int]], bool]:
    """Split each example into pieces of at most `seq_len` tokens and stop at `budget` tokens.

    Returns (sequences, exhausted): exhausted is True when the examples ran out before the budget.
    """
    sequences, total = [], 0
    for ids in examples:
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len][: budget - total]
            if piece:
                sequences.append(piece)
                total += len(piece)
            if total >= budget:
                return sequences, False
    return sequences, True


def chunk_bounds(lengths: list[int], chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of sequences holding at least `chunk_tokens` tokens (the last may hold fewer)."""
    bounds, start, total = [], 0, 0
    for index, length in enumerate(lengths):
        total += length
        if total >= chunk_tokens:
            bounds.append((start, index + 1))
            start, total = index + 1, 0
    if start < len(lengths):
        bounds.append((start, len(lengths)))
    return bounds


def batches_of(sequence_ids: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of sequence indices, longest first, so each batch pads little; deterministic."""
    ordered = sorted(sequence_ids, key=lambda i: (-lengths[i], i))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
