"""Stage 2, capture: the task's calibration text through the model -> per-site statistics.

For every input site (the tensor that q/k/v, or gate/up, ... read) we keep the float64
Gram matrix C = sum over non-padding tokens of x x^T, the token count, and a seeded
uniform reservoir sample of raw rows (float16). That is all `fit` needs (design.md s.3).

The calibration stream is cut into fixed chunks in a deterministic order. After each chunk
the whole store, with the index of the next chunk in its root attributes, is written into
a sibling folder and swapped in by rename, so a killed capture leaves the last complete
state readable and a rerun continues from it and ends with the same numbers.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import progress
from .discover import load_workspace_model
from .errors import InputError
from .files import sha256_json
from .matrices import find_matrices, get_module, sites_of
from .models import check_fits_positions
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
from .tasks import bind_task
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

STAGE = Stage.CAPTURE
STORE_SCHEMA = 1
STATE_KEY = "sieve_capture"  # root attribute holding the resume state
# Rows summed in the compute dtype (>= float32) before they are added into float64: a
# float32 partial sum over this many tokens is as exact as one batch of that size.
DRAIN_TOKENS = 8192


# ---- reading the store (what fit imports) ----------------------------------------


@dataclass(frozen=True)
class SiteStats:
    gram: torch.Tensor  # float64 (D, D): sum of x x^T over non-padding calibration tokens
    samples: torch.Tensor  # float16 (n, D): uniform reservoir sample of input rows
    tokens: int
    matrices: list[str]  # full names of the matrices that read this site


def _open_store(path: str | os.PathLike):
    import zarr

    path = Path(path)
    _recover_store(path)
    if not path.exists():
        raise InputError(f"no capture store at {path}; run `sieve capture -w WORKSPACE --task TASK.yaml` first")
    return zarr.open_group(str(path), mode="r")


def _site_from_group(group) -> SiteStats:
    attrs = group.attrs
    return SiteStats(
        gram=torch.from_numpy(np.asarray(group["gram"][...], dtype=np.float64)),
        samples=torch.from_numpy(np.asarray(group["samples"][...], dtype=np.float16)),
        tokens=int(attrs["tokens"]),
        matrices=list(attrs["matrices"]),
    )


def read_site(path: str | os.PathLike, site: str) -> SiteStats:
    """The statistics of one input site (e.g. "0.attn_in") from a capture store."""
    root = _open_store(path)
    if site not in root.group_keys():
        raise InputError(f"capture store {path} has no site {site!r}; rerun `sieve capture` for this model")
    return _site_from_group(root[site])


def read_stats(path: str | os.PathLike) -> dict[str, SiteStats]:
    """Every site's statistics, in the model's block order."""
    root = _open_store(path)
    order = root.attrs.get(STATE_KEY, {}).get("sites") or sorted(root.group_keys())
    return {site: _site_from_group(root[site]) for site in order}


def store_state(path: str | os.PathLike) -> dict | None:
    """The resume state in the store's root attributes (None when there is no store)."""
    path = Path(path)
    _recover_store(path)
    if not path.exists():
        return None
    import zarr

    return dict(zarr.open_group(str(path), mode="r").attrs.get(STATE_KEY, {}))


# ---- options ---------------------------------------------------------------------


# ---- the atomic store ------------------------------------------------------------


def _siblings(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")


def _recover_store(path: Path) -> None:
    """Finish or undo a swap interrupted by a crash; drop a half-written new state."""
    tmp, old = _siblings(path)
    if not path.exists() and old.exists():
        os.replace(old, path)  # crashed between the two renames: the previous state is whole
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def remove_store(path: Path) -> None:
    for p in (path, *_siblings(path)):
        shutil.rmtree(p, ignore_errors=True)


@dataclass
class _Accumulators:
    """Running sums of every site, on the model's device."""

    grams: dict[str, torch.Tensor]  # float64 (D, D)
    pending: dict[str, torch.Tensor]  # compute dtype (>= float32) (D, D): not yet in `grams`
    samples: dict[str, torch.Tensor]  # float16 (capacity, D)
    matrices: dict[str, list[str]]
    tokens: int = 0  # non-padding tokens seen (the reservoir's stream position too)
    pending_tokens: int = 0

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
        self.pending_tokens = 0

    def filled(self) -> int:
        capacity = next(iter(self.samples.values())).shape[0] if self.samples else 0
        return min(self.tokens, capacity)


def _write_store(path: Path, acc: _Accumulators, state: dict) -> None:
    """Write the whole state beside `path`, then swap it in: a crash leaves old or new, never half."""
    import zarr

    tmp, old = _siblings(path)
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w")
    filled = acc.filled()
    for site, gram in acc.grams.items():
        group = root.create_group(site, attributes={"tokens": acc.tokens, "site": site, "matrices": acc.matrices[site]})
        dim = gram.shape[0]
        # float64 running sums do not compress; skipping the codec keeps each flush cheap
        group.create_array("gram", data=gram.cpu().numpy(), chunks=(dim, dim), compressors=None)
        rows = acc.samples[site][:filled].cpu().numpy()
        group.create_array("samples", data=rows, chunks=(max(filled, 1), dim), compressors=None)
    root.attrs[STATE_KEY] = state  # written last: a store without it is never swapped in
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _load_store(path: Path, acc: _Accumulators) -> None:
    """Fill `acc` from a store written by `_write_store` for the same inputs."""
    stats = read_stats(path)
    for site, st in stats.items():
        acc.grams[site].copy_(st.gram)
        acc.samples[site][: st.samples.shape[0]].copy_(st.samples)
        acc.tokens = st.tokens


# ---- hooks -----------------------------------------------------------------------


@dataclass
class _Batch:
    """What the hooks need to know about the batch in flight, set before each forward."""

    keep: torch.Tensor | None = None  # flat indices of non-padding rows; None: every row counts
    sample_rows: torch.Tensor | None = None  # rows (among kept ones) that enter the reservoir
    sample_slots: torch.Tensor | None = None  # their reservoir slots (unique)


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
    store: str | os.PathLike,
    *,
    pad_id: int = 0,
    fingerprint: str = "",
    fresh: bool = False,
    after_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Accumulate every site's statistics over `sequences` (token ids) into the Zarr `store`.

    Resumes a store left by an interrupted call with the same sequences, options, model
    sites and `fingerprint`; `fresh` discards it. `after_chunk(k)` runs after chunk k is
    flushed (tests use it to interrupt). Returns a summary dict.
    """
    store = Path(store)
    if not sequences:
        raise InputError("no calibration tokens to capture; check the task's calibration split")
    site_matrices = sites_of(find_matrices(model))
    lengths = [len(s) for s in sequences]
    chunks = chunk_bounds(lengths, options.chunk_tokens)
    key = _fingerprint(sequences, options, site_matrices, fingerprint)
    device = _model_device(model)
    acc = _Accumulators.empty(site_matrices, options.samples_per_site, device, next(model.parameters()).dtype)

    state = None if fresh else store_state(store)
    start = 0
    if state and state.get("fingerprint") == key:
        _load_store(store, acc)
        start = int(state["next_chunk"])
        if start:
            log.info("resuming capture at chunk %d of %d (%s tokens done)", start, len(chunks), f"{acc.tokens:,}")
    elif state is not None or fresh:
        log.info("discarding a capture store made from other inputs: %s", store)
        remove_store(store)

    def save(next_chunk: int) -> None:
        _write_store(store, acc, {
            "schema": STORE_SCHEMA, "fingerprint": key, "next_chunk": next_chunk, "chunks": len(chunks),
            "tokens": acc.tokens, "complete": next_chunk == len(chunks), "sites": list(site_matrices),
            "samples_per_site": options.samples_per_site, "seed": options.seed,
        })

    total = sum(lengths)
    batch = _Batch()
    backbone = _backbone(model)
    started, done_before = time.perf_counter(), acc.tokens
    with progress.bar("capture", total=total, completed=acc.tokens) as bar, _SiteHooks(model, site_matrices, acc, batch):
        for index in range(start, len(chunks)):
            # each chunk draws from its own generator, so a resumed run draws what an uninterrupted one would
            rng = np.random.default_rng([options.seed, index])
            first, last = chunks[index]
            for members in batches_of(list(range(first, last)), lengths, options.batch_size):
                _run_batch(backbone, [sequences[i] for i in members], acc, batch, rng, options, pad_id, device)
                bar.advance(sum(lengths[i] for i in members))
                bar.note(f"{(acc.tokens - done_before) / (time.perf_counter() - started):,.0f} tok/s")
                if acc.pending_tokens >= DRAIN_TOKENS:
                    acc.drain()
            acc.drain()  # the flushed state is exact float64, and the same whether or not a run resumed
            save(index + 1)
            if after_chunk is not None:
                after_chunk(index)
    return {"tokens": acc.tokens, "tokens_this_run": acc.tokens - done_before, "sites": len(site_matrices), "chunks": len(chunks),
            "resumed_from_chunk": start, "samples_per_site": acc.filled()}


def _run_batch(backbone, members, acc, batch, rng, options, pad_id, device) -> None:
    ids, mask = _pad_batch(members, pad_id, device)
    count = int(mask.sum())
    flat_mask = mask.reshape(-1).bool()
    batch.keep = None if count == flat_mask.numel() else flat_mask.nonzero().squeeze(1)
    rows, slots = reservoir_slots(acc.tokens, count, options.samples_per_site, rng)
    batch.sample_rows = torch.from_numpy(rows).to(device)
    batch.sample_slots = torch.from_numpy(slots).to(device)
    with torch.inference_mode():
        backbone(input_ids=ids, attention_mask=mask, use_cache=False)
    acc.tokens += count
    acc.pending_tokens += count


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


def run_capture(ws: Workspace, options: CaptureOptions, force: bool = False) -> dict:
    """Capture the statistics of the workspace's model on its task's calibration split.

    Binds `options.task` first (or uses the bound task when None). Refuses when the model,
    task or options changed since the last capture unless `force`; resumes an interrupted
    capture with the same inputs; does nothing when a complete one exists. Returns the summary.
    """

    bound = bind_task(ws, options.task, force=force)
    inputs = {"options": options.recorded(), "upstream": ws.upstream_hashes("discover", "task")}
    resuming = ws.resumable(STAGE, inputs)
    if not ws.begin(STAGE, inputs, force):
        log.info("capture is up to date in %s; nothing to do (--force recomputes it)", ws.root)
        return {**ws.read_manifest(STAGE)["summary"], "up_to_date": True}
    model, tokenizer = load_workspace_model(ws, options.dtype, options.device)
    texts = bound.texts("calibration")
    sequences, exhausted = tokenize_calibration(tokenizer, texts, options.seq_len, options.tokens)
    check_fits_positions(model, max(map(len, sequences), default=0), "--seq-len")
    if exhausted:
        log.warning(
            "the calibration split of %s holds only %s tokens, fewer than --tokens %s: capturing all of them",
            bound.name, f"{sum(map(len, sequences)):,}", f"{options.tokens:,}",
        )
    started = time.perf_counter()
    summary = capture_statistics(
        model, sequences, options, ws.capture_store,
        pad_id=tokenizer.pad_token_id or 0, fingerprint=sha256_json(inputs), fresh=force and not resuming,
    )
    summary.update(
        task=bound.name, examples=len(texts), requested_tokens=options.tokens, exhausted=exhausted,
        seconds=round(time.perf_counter() - started, 2), store=str(ws.capture_store.relative_to(ws.root)),
    )
    ws.finish(STAGE, inputs, [ws.capture_store], summary)
    return summary
