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
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import memory, progress
from .accumulate import (
    NO_PREFIX,
    Accumulators,
    BatchRows,
    PlannedBatch,
    SiteHooks,
    backbone_of,
    model_device,
    pad_batch,
    plan_batches,
)
from .blockwise import capture_and_fit_workspace
from .calibration import Calibration, as_calibration, calibration_sequences
from .discover import load_workspace_model, workspace_model_source
from .errors import InputError
from .files import remove_path, sha256_json
from .fit import fit_site, record_blockwise_fit
from .matrices import find_matrices, sites_of
from .models import check_fits_positions, load_tokenizer
from .options import CaptureOptions, FitOptions
from .scoring import call_with_cache, run_prefix, suffix_inputs, suffix_mask
from .store import STORE_SCHEMA, read_stats, remove_store, store_state, write_store
from .tasks import bind_task
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

STAGE = Stage.CAPTURE


# ---- the capture loop --------------------------------------------------------------


def _fingerprint(calibration: Calibration, options: CaptureOptions, sites: dict, caller: str) -> str:
    """What a store on disk must have been made from to be resumed."""
    return sha256_json(
        {
            "caller": caller,
            "sequences": sha256_json(calibration.sequences),
            "prefixes": sha256_json([calibration.prefix_of, calibration.prefixes]),
            "batch_size": options.batch_size,
            "samples_per_site": options.samples_per_site,
            "chunk_tokens": options.chunk_tokens,
            "seed": options.seed,
            "sites": {site: [m.name for m in group] for site, group in sites.items()},
        }
    )


class _StreamRunner:
    """Runs planned batches through the backbone: a shared prefix once (its keys/values kept),
    sequences after a prefix from a copy of its cache, other sequences whole (right-padded)."""

    def __init__(self, model: nn.Module, calibration: Calibration, batch: BatchRows, pad_id: int) -> None:
        self.backbone, self.calibration, self.batch, self.pad_id = backbone_of(model), calibration, batch, pad_id
        self.device = model_device(model)
        self.caches: dict[int, object] = {}

    def prefix_cache(self, p: int):
        """Prefix p's keys/values; rebuilt without counting when a resumed run skipped its batch."""
        if p not in self.caches:
            self.batch.record = False
            try:
                self.caches[p] = run_prefix(self.backbone, self.calibration.prefixes[p])
            finally:
                self.batch.record = True
        return self.caches[p]

    @torch.inference_mode()
    def run(self, planned: PlannedBatch) -> None:
        calibration, device = self.calibration, self.device
        if planned.runs_prefix:
            prefix = calibration.prefixes[planned.prefix]
            self.batch.prepare(planned, torch.ones((1, len(prefix)), dtype=torch.long), device)
            self.caches[planned.prefix] = run_prefix(self.backbone, prefix)
            return
        rows = [calibration.sequences[i] for i in planned.members]
        if planned.prefix == NO_PREFIX:
            ids, mask = pad_batch(rows, self.pad_id, device)
            self.batch.prepare(planned, mask, device)
            self.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
            return
        cache = self.prefix_cache(planned.prefix)
        inputs = suffix_inputs(cache, len(calibration.prefixes[planned.prefix]), rows, self.pad_id, device)
        self.batch.prepare(planned, suffix_mask(inputs), device)
        call_with_cache(self.backbone, inputs)


def capture_statistics(
    model: nn.Module,
    sequences: Calibration | list[list[int]],
    options: CaptureOptions,
    store: str | Path,
    *,
    pad_id: int = 0,
    fingerprint: str = "",
    fresh: bool = False,
    after_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Accumulate every site's statistics over `sequences` into the Zarr `store`.

    The in-memory mode. `sequences`: token ids, or a `Calibration` whose shared prefixes run once
    and count once per sequence after them. Resumes a store left by an interrupted call with the
    same sequences, options, model sites and `fingerprint`; `fresh` discards it. `after_chunk(k)`
    runs after chunk k is flushed (tests use it to interrupt). Returns a summary dict.
    """
    store = Path(store)
    calibration = as_calibration(sequences)
    if not calibration.sequences:
        raise InputError("no calibration tokens to capture; check the task's calibration split")
    site_matrices = sites_of(find_matrices(model))
    plan = plan_batches(calibration.lengths, options, calibration.prefix_of, [len(p) for p in calibration.prefixes])
    chunks = plan[-1].chunk + 1
    key = _fingerprint(calibration, options, site_matrices, fingerprint)
    device = model_device(model)
    acc = Accumulators.empty(site_matrices, options.samples_per_site, device, next(model.parameters()).dtype)

    state = None if fresh else store_state(store)
    start, run_before = 0, 0
    if state and state.get("fingerprint") == key:
        acc.load(read_stats(store))
        start, run_before = int(state["next_chunk"]), int(state.get("tokens_run", 0))
        if start:
            log.info("resuming capture at chunk %d of %d (%s tokens done)", start, chunks, f"{run_before:,}")
    elif state is not None or fresh:
        log.info("discarding a capture store made from other inputs: %s", store)
        remove_store(store)

    def save(next_chunk: int, tokens_run: int) -> None:
        write_store(store, acc.site_stats(), {
            "schema": STORE_SCHEMA, "fingerprint": key, "next_chunk": next_chunk, "chunks": chunks,
            "tokens": acc.tokens, "tokens_run": tokens_run, "complete": next_chunk == chunks, "sites": list(site_matrices),
            "samples_per_site": options.samples_per_site, "seed": options.seed,
        })

    batch = BatchRows()
    runner = _StreamRunner(model, calibration, batch, pad_id)
    started, run = time.perf_counter(), run_before
    with progress.bar("capture", total=calibration.tokens_run, completed=run_before) as bar, \
            SiteHooks(model, site_matrices, acc, batch):
        for position, planned in enumerate(plan):
            if planned.chunk < start:
                continue
            runner.run(planned)
            ran = planned.tokens // planned.weight
            acc.tokens += planned.tokens
            run += ran
            bar.advance(ran)
            bar.note(f"{(run - run_before) / (time.perf_counter() - started):,.0f} tok/s")
            if planned.drain:
                acc.drain()
            if position == len(plan) - 1 or plan[position + 1].chunk != planned.chunk:
                save(planned.chunk + 1, run)
                if after_chunk is not None:
                    after_chunk(planned.chunk)
    return {"tokens": acc.tokens, "tokens_this_run": run - run_before, "sites": len(site_matrices), "chunks": chunks,
            "resumed_from_chunk": start, "samples_per_site": acc.filled(), **calibration.describe()}


# ---- the stage -------------------------------------------------------------------


def choose_capture_mode(ws: Workspace, options: CaptureOptions, sequences: Calibration) -> tuple[str, dict]:
    """memory or blockwise for this capture, and the estimates it was chosen by (logged)."""
    shape, run = memory.workspace_shapes(ws, options, sequences)
    in_memory, block_wise = memory.capture_in_memory(shape, run), memory.blockwise(shape, run)
    if options.memory_budget is not None:
        budget, source = memory.parse_bytes(options.memory_budget), "--memory-budget"
    else:
        budget, source = memory.free_bytes(options.device), f"the free memory of {options.device}"
    dtype = options.dtype or ws.require(Stage.DISCOVER)["inputs"]["options"]["dtype"]
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
    inputs = {"options": options.recorded(), "upstream": ws.upstream_hashes(Stage.DISCOVER, Stage.TASK)}
    resuming = ws.resumable(STAGE, inputs)
    if not ws.begin(STAGE, inputs, force):
        log.info("capture is up to date in %s; nothing to do (--force recomputes it)", ws.root)
        return {**ws.read_manifest(STAGE)["summary"], "up_to_date": True}
    tokenizer = load_tokenizer(workspace_model_source(ws))
    calibration, exhausted = calibration_sequences(bound, options, tokenizer)
    mode, memory_note = choose_capture_mode(ws, options, calibration)
    started = time.perf_counter()
    fresh = force and not resuming
    if mode == "memory":
        remove_path(ws.inside(ws.stage_dir(STAGE) / "blockwise"))  # a killed block-wise run's results, unused now
        model, _ = load_workspace_model(ws, options.dtype, options.device)
        check_fits_positions(model, calibration.longest, "--seq-len")
        summary = capture_statistics(
            model, calibration, options, ws.capture_store,
            pad_id=tokenizer.pad_token_id or 0, fingerprint=sha256_json(inputs), fresh=fresh,
        )
        summary["stats_kept"] = True
        fitted = None
    else:
        fitted = capture_and_fit_workspace(ws, options, calibration, [FitOptions(method="output", device=options.device)],
                                           tokenizer, fit_site, fingerprint=sha256_json(inputs), fresh=fresh)
        summary = {**fitted.summary, "stats_kept": options.keep_stats}
    summary.update(
        task=bound.name, examples=len(bound.ids("calibration")), requested_tokens=options.tokens, exhausted=exhausted,
        seconds=round(time.perf_counter() - started, 2), store=str(ws.capture_store.relative_to(ws.root)),
        **calibration.describe(), **memory_note,
    )
    written = [ws.capture_store] if summary["stats_kept"] else []
    ws.finish(STAGE, inputs, written, summary)
    if fitted is not None:
        record_blockwise_fit(ws, FitOptions(method="output", device=options.device), fitted.factors["output"],
                             fitted.spectra["output"], fitted.fit_seconds["output"])
        remove_path(fitted.work)  # per-block results, now in fit/output
    return summary
