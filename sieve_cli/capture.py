"""Stage 2, capture: the task's calibration text through the model -> per-site statistics.

For every input site (the tensor that q/k/v, or gate/up, ... read) we keep the float64
Gram matrix C = sum over non-padding tokens of x x^T, the token count, and a seeded
uniform reservoir sample of raw rows (float16). That is all `fit` needs (design.md s.3).

Two ways to run it, with the same numbers (`--mode`):
- memory: the whole model in memory, one forward pass per batch, every site's statistics
  at once. The calibration stream is cut into fixed chunks in a deterministic order; after
  each chunk the whole store is rewritten and swapped in (store.py), so a killed capture
  continues from the last chunk and ends with the same numbers.
- blockwise (`blockwise.py`): one decoder block in memory at a time, its statistics
  computed and its matrices fitted at once; for models larger than memory.
Both replay the same batch plan (`plan_batches`): the same batches, reservoir draws and
float32 -> float64 drains, so their statistics agree.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import progress
from .discover import load_workspace_model, workspace_model_source
from .errors import InputError
from .files import read_json, sha256_json
from .matrices import find_matrices, get_module, sites_of
from .models import check_fits_positions, load_tokenizer
from .options import CaptureOptions
from .statistics import (
    add_gram,
    batches_of,
    chunk_bounds,
    cut_sequences,
    drain_gram,
    gram_dtype,
    reservoir_slots,
)
from .store import STORE_SCHEMA, SiteStats, read_stats, remove_store, store_state, write_store
from .tasks import bind_task
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

STAGE = Stage.CAPTURE
# Rows summed in the compute dtype (>= float32) before they are added into float64: a
# float32 partial sum over this many tokens is as exact as one batch of that size.
DRAIN_TOKENS = 8192


# ---- the batch plan ----------------------------------------------------------------


@dataclass(frozen=True)
class PlannedBatch:
    """One forward pass of the calibration stream, decided before any model runs."""

    chunk: int
    members: list[int]  # indices into the sequences
    tokens: int  # non-padding tokens in the batch
    sample_rows: np.ndarray  # rows (among the batch's non-padding ones) that enter the reservoir
    sample_slots: np.ndarray  # their reservoir slots
    drain: bool  # add the float32 partial sums into float64 after this batch


def plan_batches(lengths: list[int], options: CaptureOptions) -> list[PlannedBatch]:
    """The deterministic batch plan: chunks, batches, reservoir draws and drains.

    Each chunk draws from its own generator, so a resumed run draws what an uninterrupted
    one would; the drains follow the tokens, so the float64 sums are rounded the same way
    whether the statistics are computed all at once or one block at a time.
    """
    plan, seen, pending = [], 0, 0
    for index, (first, last) in enumerate(chunk_bounds(lengths, options.chunk_tokens)):
        rng = np.random.default_rng([options.seed, index])
        batches = batches_of(list(range(first, last)), lengths, options.batch_size)
        for position, members in enumerate(batches):
            count = sum(lengths[i] for i in members)
            rows, slots = reservoir_slots(seen, count, options.samples_per_site, rng)
            seen, pending = seen + count, pending + count
            drain = pending >= DRAIN_TOKENS or position == len(batches) - 1  # the flushed state is exact float64
            pending = 0 if drain else pending
            plan.append(PlannedBatch(index, members, count, rows, slots, drain))
    return plan


# ---- accumulators ------------------------------------------------------------------


@dataclass
class _Accumulators:
    """Running sums of some sites (all, or one block's), on the model's device."""

    grams: dict[str, torch.Tensor]  # float64 (D, D)
    pending: dict[str, torch.Tensor]  # compute dtype (>= float32) (D, D): not yet in `grams`
    samples: dict[str, torch.Tensor]  # float16 (capacity, D)
    matrices: dict[str, list[str]]
    tokens: int = 0  # non-padding tokens seen (the reservoir's stream position too)

    @classmethod
    def empty(cls, site_matrices: dict, capacity: int, device: torch.device, dtype: torch.dtype) -> "_Accumulators":
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
class _Batch:
    """What the hooks need to know about the batch in flight, set before each forward."""

    keep: torch.Tensor | None = None  # flat indices of non-padding rows; None: every row counts
    sample_rows: torch.Tensor | None = None  # rows (among kept ones) that enter the reservoir
    sample_slots: torch.Tensor | None = None  # their reservoir slots (unique)

    def prepare(self, planned: PlannedBatch, mask: torch.Tensor, device: torch.device) -> None:
        flat_mask = mask.reshape(-1).bool()
        self.keep = None if planned.tokens == flat_mask.numel() else flat_mask.nonzero().squeeze(1)
        self.sample_rows = torch.from_numpy(planned.sample_rows).to(device)
        self.sample_slots = torch.from_numpy(planned.sample_slots).to(device)


class _SiteHooks:
    """One forward pre-hook per input site, on the first matrix that reads it; removed on exit."""

    def __init__(self, model: nn.Module, site_matrices: dict, acc: _Accumulators, batch: _Batch) -> None:
        self._handles = []
        self._targets = [(site, get_module(model, group[0].name)) for site, group in site_matrices.items()]
        self._acc, self._batch = acc, batch

    def _hook_for(self, site: str) -> Callable:
        acc, batch = self._acc, self._batch

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            rows = flat if batch.keep is None else flat.index_select(0, batch.keep)
            add_gram(acc.pending[site], rows)
            if batch.sample_rows is not None and batch.sample_rows.numel():
                acc.samples[site][batch.sample_slots] = rows.index_select(0, batch.sample_rows).to(torch.float16)

        return hook

    def __enter__(self) -> "_SiteHooks":
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


# ---- the capture loop --------------------------------------------------------------


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder without the LM head: capture needs no logits, and the head's matmul and
    its (tokens x vocab) output would cost time and memory for nothing."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_batch(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask; right padding leaves real tokens' activations
    unchanged in a causal model."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _fingerprint(sequences: list[list[int]], options: CaptureOptions, sites: dict, caller: str) -> str:
    """What a store on disk must have been made from to be resumed."""
    return sha256_json(
        {
            "caller": caller,
            "sequences": sha256_json(sequences),
            "batch_size": options.batch_size,
            "samples_per_site": options.samples_per_site,
            "chunk_tokens": options.chunk_tokens,
            "seed": options.seed,
            "sites": {site: [m.name for m in group] for site, group in sites.items()},
        }
    )


def capture_statistics(
    model: nn.Module,
    sequences: list[list[int]],
    options: CaptureOptions,
    store: str | Path,
    *,
    pad_id: int = 0,
    fingerprint: str = "",
    fresh: bool = False,
    after_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Accumulate every site's statistics over `sequences` (token ids) into the Zarr `store`.

    The in-memory mode. Resumes a store left by an interrupted call with the same sequences,
    options, model sites and `fingerprint`; `fresh` discards it. `after_chunk(k)` runs after
    chunk k is flushed (tests use it to interrupt). Returns a summary dict.
    """
    store = Path(store)
    if not sequences:
        raise InputError("no calibration tokens to capture; check the task's calibration split")
    site_matrices = sites_of(find_matrices(model))
    lengths = [len(s) for s in sequences]
    plan = plan_batches(lengths, options)
    chunks = plan[-1].chunk + 1
    key = _fingerprint(sequences, options, site_matrices, fingerprint)
    device = _model_device(model)
    acc = _Accumulators.empty(site_matrices, options.samples_per_site, device, next(model.parameters()).dtype)

    state = None if fresh else store_state(store)
    start = 0
    if state and state.get("fingerprint") == key:
        acc.load(read_stats(store))
        start = int(state["next_chunk"])
        if start:
            log.info("resuming capture at chunk %d of %d (%s tokens done)", start, chunks, f"{acc.tokens:,}")
    elif state is not None or fresh:
        log.info("discarding a capture store made from other inputs: %s", store)
        remove_store(store)

    def save(next_chunk: int) -> None:
        write_store(store, acc.site_stats(), {
            "schema": STORE_SCHEMA, "fingerprint": key, "next_chunk": next_chunk, "chunks": chunks,
            "tokens": acc.tokens, "complete": next_chunk == chunks, "sites": list(site_matrices),
            "samples_per_site": options.samples_per_site, "seed": options.seed,
        })

    total = sum(lengths)
    batch = _Batch()
    backbone = _backbone(model)
    started, done_before = time.perf_counter(), acc.tokens
    with progress.bar("capture", total=total, completed=acc.tokens) as bar, _SiteHooks(model, site_matrices, acc, batch):
        for position, planned in enumerate(plan):
            if planned.chunk < start:
                continue
            ids, mask = _pad_batch([sequences[i] for i in planned.members], pad_id, device)
            batch.prepare(planned, mask, device)
            with torch.inference_mode():
                backbone(input_ids=ids, attention_mask=mask, use_cache=False)
            acc.tokens += planned.tokens
            bar.advance(planned.tokens)
            bar.note(f"{(acc.tokens - done_before) / (time.perf_counter() - started):,.0f} tok/s")
            if planned.drain:
                acc.drain()
            if position == len(plan) - 1 or plan[position + 1].chunk != planned.chunk:
                save(planned.chunk + 1)
                if after_chunk is not None:
                    after_chunk(planned.chunk)
    return {"tokens": acc.tokens, "tokens_this_run": acc.tokens - done_before, "sites": len(site_matrices), "chunks": chunks,
            "resumed_from_chunk": start, "samples_per_site": acc.filled()}


# ---- the stage -------------------------------------------------------------------


def tokenize_calibration(tokenizer, texts: list[str], seq_len: int, budget: int, block: int = 256) -> tuple[list[list[int]], bool]:
    """Token-id sequences of the calibration texts, in split order, cut at `budget` tokens.

    Encoded as the evaluator encodes (special tokens included) and in blocks, so a large
    split is only tokenised as far as the budget needs. Returns (sequences, exhausted).
    """
    sequences, total = [], 0
    for start in range(0, len(texts), block):
        ids = tokenizer(texts[start : start + block])["input_ids"]
        more, exhausted = cut_sequences(ids, seq_len, budget - total)
        sequences += more
        total += sum(map(len, more))
        if not exhausted:
            return sequences, False
    return sequences, True


def calibration_sequences(ws: Workspace, bound, options: CaptureOptions, tokenizer) -> tuple[list[list[int]], bool]:
    texts = bound.texts("calibration")
    sequences, exhausted = tokenize_calibration(tokenizer, texts, options.seq_len, options.tokens)
    if exhausted:
        log.warning(
            "the calibration split of %s holds only %s tokens, fewer than --tokens %s: capturing all of them",
            bound.name, f"{sum(map(len, sequences)):,}", f"{options.tokens:,}",
        )
    return sequences, exhausted


def run_shape(ws: Workspace, options: CaptureOptions, sequences: list[list[int]] | None = None, device: str | None = None):
    """(ModelShape, RunShape) for the memory estimates, from discover's matrices.json: no weights loaded."""
    from .memory import DTYPE_BYTES, ModelShape, RunShape

    dtype = options.dtype or ws.require("discover")["inputs"]["options"]["dtype"]
    lengths = [len(s) for s in sequences] if sequences else [options.seq_len] * max(options.tokens // options.seq_len, 1)
    padded = sum(max(lengths[i] for i in batch.members) * len(batch.members) for batch in plan_batches(lengths, options))
    run = RunShape(weight_bytes=DTYPE_BYTES[dtype], compute_bytes=DTYPE_BYTES[dtype], batch_size=options.batch_size,
                   seq_len=options.seq_len, samples=options.samples_per_site, padded_tokens=padded,
                   device=device or options.device)
    return ModelShape.from_discovery(read_json(ws.matrices_json)), run


def choose_capture_mode(ws: Workspace, options: CaptureOptions, sequences: list[list[int]]) -> tuple[str, dict]:
    """memory or blockwise for this capture, and the estimates it was chosen by (logged)."""
    from . import memory

    shape, run = run_shape(ws, options, sequences)
    in_memory, block_wise = memory.capture_in_memory(shape, run), memory.blockwise(shape, run)
    if options.memory_budget is not None:
        budget, source = memory.parse_bytes(options.memory_budget), "--memory-budget"
    else:
        budget, source = memory.free_bytes(options.device), f"the free memory of {options.device}"
    dtype = options.dtype or ws.require("discover")["inputs"]["options"]["dtype"]
    mode = memory.choose_mode(options.mode, in_memory, block_wise, budget, source, dtype)
    chosen = in_memory if mode == "memory" else block_wise
    log.info("%s; budget %s (%s)", chosen.describe(), memory.gib(budget), source)
    return mode, {"mode": mode, "estimate": chosen.to_dict(), "budget_bytes": budget}


def run_capture(ws: Workspace, options: CaptureOptions, force: bool = False) -> dict:
    """Capture the statistics of the workspace's model on its task's calibration split.

    Binds `options.task` first (or uses the bound task when None). Refuses when the model,
    task or options changed since the last capture unless `force`; resumes an interrupted
    capture with the same inputs; does nothing when a complete one exists. Block-wise mode
    also fits the `output` method block by block (it keeps no statistics unless asked), and
    records that fit as the `fit/output` stage. Returns the summary.
    """
    bound = bind_task(ws, options.task, force=force)
    inputs = {"options": options.recorded(), "upstream": ws.upstream_hashes("discover", "task")}
    resuming = ws.resumable(STAGE, inputs)
    if not ws.begin(STAGE, inputs, force):
        log.info("capture is up to date in %s; nothing to do (--force recomputes it)", ws.root)
        return {**ws.read_manifest(STAGE)["summary"], "up_to_date": True}
    tokenizer = load_tokenizer(workspace_model_source(ws))
    sequences, exhausted = calibration_sequences(ws, bound, options, tokenizer)
    mode, memory_note = choose_capture_mode(ws, options, sequences)
    started = time.perf_counter()
    fresh = force and not resuming
    if mode == "memory":
        model, _ = load_workspace_model(ws, options.dtype, options.device)
        check_fits_positions(model, max(map(len, sequences), default=0), "--seq-len")
        summary = capture_statistics(
            model, sequences, options, ws.capture_store,
            pad_id=tokenizer.pad_token_id or 0, fingerprint=sha256_json(inputs), fresh=fresh,
        )
        summary["stats_kept"] = True
        fitted = None
    else:
        from .blockwise import capture_and_fit_workspace
        from .options import FitOptions

        fitted = capture_and_fit_workspace(ws, options, sequences, [FitOptions(method="output", device=options.device)],
                                           tokenizer, fingerprint=sha256_json(inputs), fresh=fresh)
        summary = {**fitted.summary, "stats_kept": options.keep_stats}
    summary.update(
        task=bound.name, examples=len(bound.texts("calibration")), requested_tokens=options.tokens, exhausted=exhausted,
        seconds=round(time.perf_counter() - started, 2), store=str(ws.capture_store.relative_to(ws.root)),
        **memory_note,
    )
    written = [ws.capture_store] if summary["stats_kept"] else []
    ws.finish(STAGE, inputs, written, summary)
    if fitted is not None:
        from .fit import record_blockwise_fit
        from .options import FitOptions

        record_blockwise_fit(ws, FitOptions(method="output", device=options.device), fitted.factors["output"],
                             fitted.spectra["output"], fitted.fit_seconds["output"])
        shutil.rmtree(fitted.work, ignore_errors=True)  # per-block results, now in fit/output
    return summary
