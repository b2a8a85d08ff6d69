"""Accumulating per-site statistics over a batch plan: what the in-memory and the block-wise
capture share, so both give the same numbers.

`plan_batches` fixes the calibration stream before any model runs (chunks, each shared prompt
prefix once, longest-first batches, seeded reservoir draws, float32 -> float64 drains);
`Accumulators` hold the running sums of some sites; `SiteHooks` feed them from forward
pre-hooks on the matrices that read each site. `calibration.py` builds the stream itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .matrices import get_module
from .options import CaptureOptions
from .statistics import add_gram, batches_of, chunk_bounds, drain_gram, gram_dtype, reservoir_slots
from .store import SiteStats

log = logging.getLogger(__name__)

# Rows summed in the compute dtype (>= float32) before they are added into float64: a
# float32 partial sum over this many tokens is as exact as one batch of that size.
DRAIN_TOKENS = 8192


# ---- the batch plan ----------------------------------------------------------------


NO_PREFIX = -1  # calibration.NO_PREFIX: a sequence that runs after no shared prefix


@dataclass(frozen=True)
class PlannedBatch:
    """One forward pass of the calibration stream, decided before any model runs.

    Either a batch of sequences (`members`), run after shared prefix `prefix` when it is not
    NO_PREFIX, or (no members) the one run of shared prefix `prefix`, whose rows count `weight`
    times: once per sequence that starts with it.
    """

    chunk: int
    members: list[int]  # indices into the sequences; empty: the batch runs prefix `prefix`
    tokens: int  # tokens the batch counts for (non-padding, times `weight`)
    sample_rows: np.ndarray  # rows (among the batch's non-padding ones) that enter the reservoir
    sample_slots: np.ndarray  # their reservoir slots
    drain: bool  # add the float32 partial sums into float64 after this batch
    prefix: int = NO_PREFIX
    weight: int = 1

    @property
    def runs_prefix(self) -> bool:
        return not self.members


def _first_uses(prefix_of: list[int]) -> dict[int, int]:
    """prefix -> the first sequence that runs after it, in stream order."""
    first: dict[int, int] = {}
    for i, p in enumerate(prefix_of):
        if p != NO_PREFIX:
            first.setdefault(p, i)
    return first


def _chunk_steps(first: int, last: int, lengths, prefix_of, first_use, multiplicity, batch_size) -> list[tuple[list[int], int, int]]:
    """(members, prefix, weight) of one chunk: the prefixes first used in it, then batches of its
    sequences grouped by prefix (a batch shares one cache), longest first within each group."""
    steps = [([], p, multiplicity[p]) for p in sorted(first_use, key=first_use.get) if first <= first_use[p] < last]
    groups: dict[int, list[int]] = {}
    for i in range(first, last):
        groups.setdefault(prefix_of[i], []).append(i)
    for p, members in groups.items():
        steps += [(batch, p, 1) for batch in batches_of(members, lengths, batch_size)]
    return steps


def plan_batches(lengths: list[int], options: CaptureOptions, prefix_of: list[int] | None = None,
                 prefix_lengths: list[int] | None = None) -> list[PlannedBatch]:
    """The deterministic batch plan: chunks, prefix runs, batches, reservoir draws and drains.

    `lengths` are the tokens each sequence runs; `prefix_of[i]` the shared prefix sequence i runs
    after (NO_PREFIX: none), of `prefix_lengths[p]` tokens. A prefix runs once, at the start of
    the chunk that first uses it, and counts once per sequence after it; in the reservoir's
    stream it stands for that many copies of its rows. Each chunk draws from its own generator,
    so a resumed run draws what an uninterrupted one would; the drains follow the tokens, so
    the float64 sums are rounded the same way whether the statistics are computed all at once
    or one block at a time.
    """
    prefix_of = prefix_of or [NO_PREFIX] * len(lengths)
    prefix_lengths = prefix_lengths or []
    first_use = _first_uses(prefix_of)
    multiplicity = {p: prefix_of.count(p) for p in first_use}
    # a chunk's size counts the tokens it runs: a prefix where it is first used
    run_lengths = [n + (prefix_lengths[prefix_of[i]] if first_use.get(prefix_of[i]) == i else 0) for i, n in enumerate(lengths)]
    plan, seen, pending = [], 0, 0
    for index, (first, last) in enumerate(chunk_bounds(run_lengths, options.chunk_tokens)):
        rng = np.random.default_rng([options.seed, index])
        steps = _chunk_steps(first, last, lengths, prefix_of, first_use, multiplicity, options.batch_size)
        for position, (members, prefix, weight) in enumerate(steps):
            rows = sum(lengths[i] for i in members) if members else prefix_lengths[prefix]
            count = rows * weight
            sampled, slots = reservoir_slots(seen, count, options.samples_per_site, rng)
            sampled = sampled % rows  # stream item k of a prefix is row k mod its length (copy k // length)
            seen, pending = seen + count, pending + count
            drain = pending >= DRAIN_TOKENS or position == len(steps) - 1  # the flushed state is exact float64
            pending = 0 if drain else pending
            plan.append(PlannedBatch(index, members, count, sampled, slots, drain, prefix, weight))
    return plan


# ---- accumulators ------------------------------------------------------------------


@dataclass
class Accumulators:
    """Running sums of some sites (all, or one block's), on the model's device."""

    grams: dict[str, torch.Tensor]  # float64 (D, D)
    pending: dict[str, torch.Tensor]  # compute dtype (>= float32) (D, D): not yet in `grams`
    samples: dict[str, torch.Tensor]  # float16 (capacity, D)
    matrices: dict[str, list[str]]
    tokens: int = 0  # non-padding tokens seen (the reservoir's stream position too)

    @classmethod
    def empty(cls, site_matrices: dict, capacity: int, device: torch.device, dtype: torch.dtype) -> "Accumulators":
        grams, pending, samples, names = {}, {}, {}, {}
        for site, group in site_matrices.items():
            dim = group[0].in_features
            grams[site] = torch.zeros(dim, dim, dtype=torch.float64, device=device)
            pending[site] = torch.zeros(dim, dim, dtype=gram_dtype(dtype), device=device)
            samples[site] = torch.zeros(capacity, dim, dtype=torch.float16, device=device)
            names[site] = [m.name for m in group]
        return cls(grams, pending, samples, names)

    def drain(self) -> None:
        for site, total in self.grams.items():
            drain_gram(total, self.pending[site])

    def filled(self) -> int:
        capacity = next(iter(self.samples.values())).shape[0] if self.samples else 0
        return min(self.tokens, capacity)

    def site_stats(self) -> dict[str, SiteStats]:
        filled = self.filled()
        return {site: SiteStats(gram, self.samples[site][:filled], self.tokens, self.matrices[site])
                for site, gram in self.grams.items()}

    def load(self, stats: dict[str, SiteStats]) -> None:
        for site, st in stats.items():
            self.grams[site].copy_(st.gram)
            self.samples[site][: st.samples.shape[0]].copy_(st.samples)
            self.tokens = st.tokens


# ---- hooks -----------------------------------------------------------------------


@dataclass
class BatchRows:
    """What the hooks need to know about the batch in flight, set before each forward."""

    keep: torch.Tensor | None = None  # flat indices of non-padding rows; None: every row counts
    sample_rows: torch.Tensor | None = None  # rows (among kept ones) that enter the reservoir
    sample_slots: torch.Tensor | None = None  # their reservoir slots (unique)
    weight: int = 1  # times each row counts (a shared prefix's multiplicity)
    record: bool = True  # False: a pass that only rebuilds a prefix's keys/values (already counted)

    def prepare(self, planned: PlannedBatch, mask: torch.Tensor, device: torch.device) -> None:
        """`mask`: 1 on the rows the hooks see that are real tokens (a suffix batch: its suffix part)."""
        flat_mask = mask.reshape(-1).bool()
        self.keep = None if planned.tokens // planned.weight == flat_mask.numel() else flat_mask.nonzero().squeeze(1)
        self.sample_rows = torch.from_numpy(planned.sample_rows).to(device)
        self.sample_slots = torch.from_numpy(planned.sample_slots).to(device)
        self.weight, self.record = planned.weight, True


class SiteHooks:
    """One forward pre-hook per input site, on the first matrix that reads it; removed on exit."""

    def __init__(self, model: nn.Module, site_matrices: dict, acc: Accumulators, batch: BatchRows) -> None:
        self._handles = []
        self._targets = [(site, get_module(model, group[0].name)) for site, group in site_matrices.items()]
        self._acc, self._batch = acc, batch

    def _hook_for(self, site: str) -> Callable:
        acc, batch = self._acc, self._batch

        def hook(module: nn.Module, args: tuple) -> None:
            if not batch.record:
                return
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            rows = flat if batch.keep is None else flat.index_select(0, batch.keep)
            add_gram(acc.pending[site], rows, batch.weight)
            if batch.sample_rows is not None and batch.sample_rows.numel():
                acc.samples[site][batch.sample_slots] = rows.index_select(0, batch.sample_rows).to(torch.float16)

        return hook

    def __enter__(self) -> "SiteHooks":
        try:
            for site, module in self._targets:
                self._handles.append(module.register_forward_pre_hook(self._hook_for(site)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder without the LM head: capture needs no logits, and the head's matmul and
    its (tokens x vocab) output would cost time and memory for nothing."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_batch(sequences, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask (1 on real tokens); right padding leaves real
    tokens' activations unchanged in a causal model. Capture and the evaluator's suffixes use it."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)
