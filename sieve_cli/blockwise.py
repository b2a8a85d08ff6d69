"""Block-wise capture and fit: one decoder block's weights in memory at a time.

For models larger than memory (design.md s.8), following the sequential calibration of
llm-compressor and SliceGPT:
- the model is built on the meta device (accelerate's `init_empty_weights`); only the
  embeddings, and then one decoder block at a time, are read from the model's safetensors
  files (memory-mapped by `safe_open`);
- the calibration batches' hidden states are cached between blocks (in memory, or on disk
  when they do not fit, which also lets a killed run resume after its last finished block);
- a block's input-site statistics exist only while that block runs: its matrices are
  fitted as soon as they are complete, and the statistics are written to the capture store
  only when asked (once per block).

The runner never re-implements a block's forward, masks or rotary embeddings: for each
batch it runs the real model's forward with the blocks before block k replaced by
pass-throughs, catches the (args, kwargs) that the model hands block k (its attention mask
for its layer type, the position embeddings, ...), and calls the real block with them.
The batch plan, reservoir draws and float64 drains are the in-memory capture's own
(`capture.plan_batches`), so both modes give the same statistics and the same factors.

A shared prompt prefix runs once per block, as in memory: its hidden states are cached between
blocks like a batch's, and its keys/values, kept per layer across blocks, are what each block's
batches after it attend to (the model builds their masks from that cache, as in a full forward).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
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
    pad_batch,
    plan_batches,
)
from .calibration import Calibration, as_calibration
from .discover import workspace_model_source
from .errors import InputError, ModelLoadError
from .factors import INDEX_FORMAT, FactorSet
from .files import make_dir, read_json, remove_path, save_safetensors, sha256_json, write_json_atomic
from .matrices import Matrix, decoder_blocks, find_matrices, sites_of
from .models import check_fits_positions, meta_model, safetensors_folder, torch_dtype
from .options import CaptureOptions
from .scoring import cache_keywords, prefix_inputs, suffix_inputs, suffix_mask
from .store import STORE_SCHEMA, SiteStats, add_sites, remove_store
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
INDEX_FILE = "model.safetensors.index.json"


# ---- weights, read lazily from safetensors -------------------------------------------------


class SafetensorsWeights:
    """The tensors of a Hugging Face folder's safetensors files, opened memory-mapped and read by name."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._handles: dict[str, object] = {}
        index = self.folder / INDEX_FILE
        if index.exists():
            self.weight_map: dict[str, str] = dict(read_json(index)["weight_map"])
            for shard in sorted(set(self.weight_map.values())):
                self._open(shard)  # a missing or corrupt shard is named now, not blocks later
            return
        files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(
                f"{self.folder} has no .safetensors weights, which block-wise mode reads; re-save the model "
                f"with save_pretrained (safetensors) or use --mode memory"
            )
        self.weight_map = {key: name for name in files for key in self._open(name).keys()}

    def _open(self, name: str):
        if name not in self._handles:
            from safetensors import safe_open

            path = self.folder / name
            if not path.exists():
                raise ModelLoadError(f"weight shard {path} is missing (listed in {INDEX_FILE}); restore or re-download it")
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for a bad header or size
                raise ModelLoadError(
                    f"weight shard {path} is corrupt or truncated ({_first_line(exc)}); re-download or re-save it"
                ) from None
        return self._handles[name]

    def get(self, names: list[str]) -> torch.Tensor:
        """The tensor stored under the first of `names` (a parameter's aliases) present in the files."""
        for name in names:
            if name in self.weight_map:
                shard = self.weight_map[name]
                try:
                    return self._open(shard).get_tensor(name)
                except Exception as exc:
                    raise ModelLoadError(
                        f"weight shard {self.folder / shard} is corrupt: cannot read {name} ({_first_line(exc)}); "
                        f"re-download or re-save it"
                    ) from None
        raise ModelLoadError(f"no tensor {names[0]} in the safetensors files of {self.folder}; is it the model's own folder?")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _aliases(model: nn.Module, base_prefix: str) -> dict[str, list[str]]:
    """Every name under which a parameter may be stored: tied names, and with or without the
    base model's prefix (some checkpoints drop it)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    result = {}
    for names in by_tensor.values():
        stripped = [n[len(base_prefix) + 1:] for n in names if base_prefix and n.startswith(base_prefix + ".")]
        for name in names:
            result[name] = [name, *[n for n in names if n != name], *stripped]
    return result


# ---- the skeleton and its blocks -----------------------------------------------------------


class _Reached(Exception):
    """Raised by the block being looked for, carrying what the model called it with (never escapes)."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.call = (args, kwargs)


def pass_through(hidden_states, *args, **kwargs):
    return hidden_states


class BlockRunner:
    """A model on the meta device whose embeddings are loaded and whose blocks load on demand."""

    def __init__(self, model: nn.Module, weights: SafetensorsWeights, device: str | torch.device, dtype: torch.dtype) -> None:
        self.model, self.weights = model, weights
        self.device, self.dtype = torch.device(device), dtype
        self.prefix, self.blocks = decoder_blocks(model)
        self.backbone = backbone_of(model)
        self.aliases = _aliases(model, getattr(model, "base_model_prefix", ""))
        self.matrices = find_matrices(model)  # shapes are known on the meta device
        head = model.get_output_embeddings()
        head_names = {n for n, m in model.named_modules() if m is head and head is not None}
        for name, _ in list(model.named_parameters()):
            if not name.startswith(self.prefix + ".") and name.rsplit(".", 1)[0] not in head_names:
                self._load(model, name, name)  # embeddings and final norm: small beside the blocks

    def load_head(self) -> None:
        """The LM head too (capture never needs it; the evaluator does): tied to the loaded
        embeddings where the config ties them, else read from the files."""
        self.model.tie_weights()
        for name, param in list(self.model.named_parameters()):
            if param.device.type == "meta" and not name.startswith(self.prefix + "."):
                self._load(self.model, name, name)

    def _load(self, module: nn.Module, local: str, full: str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        tensor = self.weights.get(self.aliases.get(full, [full]))
        set_module_tensor_to_device(module, local, self.device, value=tensor.to(self.dtype))

    @contextmanager
    def loaded(self, index: int):
        """Block `index` with its weights read from disk; back on the meta device afterwards."""
        from accelerate.utils import set_module_tensor_to_device

        block = self.blocks[index]
        names = [name for name, _ in block.named_parameters()]
        try:
            for name in names:
                self._load(block, name, f"{self.prefix}.{index}.{name}")
            yield block
        finally:
            for name in names:
                set_module_tensor_to_device(block, name, "meta")

    def call_of(self, index: int, inputs: dict) -> tuple[tuple, dict]:
        """The (args, kwargs) the model's own forward passes block `index` for this batch
        (`inputs`: forward keywords such as input ids, mask, the evaluator's position ids, and a
        prefix's cache under "cache").

        The blocks before it pass their input through (their output is not used: only the
        arguments the model builds for block `index`, and for block 0 its input, are).
        """
        replaced = list(self.blocks)[:index]
        target = self.blocks[index]

        def reached(*args, **kwargs):
            raise _Reached(args, kwargs)

        try:
            for block in replaced:
                block.forward = pass_through
            target.forward = reached
            with torch.inference_mode():
                self.backbone(**cache_keywords(self.backbone, {"use_cache": False, **inputs}))
        except _Reached as caught:
            return caught.call
        finally:
            for block in [*replaced, target]:
                block.__dict__.pop("forward", None)
        raise InputError(f"the model's forward never called decoder block {index}; block-wise mode cannot run it")


def open_runner(folder: str | Path, dtype: torch.dtype, device: str) -> BlockRunner:
    """The meta-device skeleton of the Hugging Face folder's model, its embeddings loaded."""
    weights = SafetensorsWeights(folder)
    try:
        model = meta_model(folder, dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config of {folder}: {_first_line(exc)}") from None
    return BlockRunner(model, weights, device, dtype)


# ---- the hidden-state cache between blocks ---------------------------------------------------


class HiddenCache:
    """The hidden states entering the current block, one tensor per planned batch.

    Tiers: "device" (kept where the model runs), "host" (CPU memory), "disk" (a folder per
    block boundary, so a killed run resumes from the last finished block without replaying it).
    """

    def __init__(self, tier: str, folder: Path, device: torch.device) -> None:
        self.tier, self.folder, self.device = tier, folder, device
        self.current: dict[int, torch.Tensor] = {}
        self.next: dict[int, torch.Tensor] = {}
        self.block = 0  # the block whose inputs `current` holds

    def _dir(self, block: int) -> Path:
        return self.folder / f"hidden-{block:05d}"

    def get(self, batch: int) -> torch.Tensor:
        if self.tier == "disk":
            from safetensors.torch import load_file

            return load_file(str(self._dir(self.block) / f"{batch}.safetensors"))["h"].to(self.device)
        return self.current[batch].to(self.device)

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        if self.tier == "disk":
            folder = make_dir(self._dir(self.block + 1).with_suffix(".tmp"))
            save_safetensors({"h": hidden.detach().cpu().contiguous()}, folder / f"{batch}.safetensors")
        else:
            self.next[batch] = hidden if self.tier == "device" else hidden.cpu()

    def advance(self) -> None:
        """The block is finished: its outputs become the next block's inputs."""
        if self.tier == "disk":
            done = self._dir(self.block + 1)
            remove_path(done)
            if done.with_suffix(".tmp").is_dir() and not done.with_suffix(".tmp").is_symlink():
                done.with_suffix(".tmp").rename(done)
            remove_path(self._dir(self.block))
        self.current, self.next = self.next, {}
        self.block += 1

    def resumable_at(self, block: int) -> bool:
        return self.tier == "disk" and self._dir(block).exists()

    def clear(self) -> None:
        self.current, self.next = {}, {}
        if self.tier == "disk":
            for path in self.folder.iterdir():
                if path.name.startswith("hidden-"):
                    remove_path(path)  # a link is unlinked, never followed


# ---- a planned batch's inputs ----------------------------------------------------------------


def _cache_in(args: tuple, kwargs: dict):
    """The KV cache the model hands a block (positionally in GPT-2, by keyword in most)."""
    from transformers import Cache

    return next((v for v in [*args, *kwargs.values()] if isinstance(v, Cache)), None)


class BlockStream:
    """Forward inputs of each planned batch at one block, and the shared prefixes' keys/values.

    A prefix's cache holds layers 0..k after block k: its own run at block k starts from an
    empty cache (the model masks it as the first tokens) and its layer k is then copied in;
    the batches after it run from a copy, so the model builds their masks and positions as in
    the full forward, and block k attends to layer k.
    """

    def __init__(self, calibration: Calibration, pad_id: int, device: torch.device) -> None:
        self.calibration, self.pad_id, self.device = calibration, pad_id, device
        self.prefix_caches: dict[int, object] = {}

    def inputs(self, planned: PlannedBatch) -> tuple[dict, torch.Tensor]:
        """(forward keywords, mask of the rows the block's hooks see: 1 on real tokens)."""
        calibration = self.calibration
        if planned.runs_prefix:
            inputs = prefix_inputs(calibration.prefixes[planned.prefix], self.device)
            return inputs, torch.ones_like(inputs["input_ids"])
        rows = [calibration.sequences[i] for i in planned.members]
        if planned.prefix == NO_PREFIX:
            ids, mask = pad_batch(rows, self.pad_id, self.device)
            return {"input_ids": ids, "attention_mask": mask}, mask
        cache = self.prefix_caches[planned.prefix]
        inputs = suffix_inputs(cache, len(calibration.prefixes[planned.prefix]), rows, self.pad_id, self.device)
        return inputs, suffix_mask(inputs)

    def keep_layer(self, planned: PlannedBatch, index: int, ran_with) -> None:
        """After a prefix's run through block `index` (from cache `ran_with`), keep its layer."""
        if not planned.runs_prefix:
            return
        kept = self.prefix_caches.setdefault(planned.prefix, ran_with)
        if kept is not ran_with:
            kept.layers[index] = ran_with.layers[index]


# ---- the block loop ----------------------------------------------------------------------------


@dataclass
class BlockwiseResult:
    summary: dict
    factors: dict[str, FactorSet] = field(default_factory=dict)  # method -> every block's factors
    spectra: dict[str, dict] = field(default_factory=dict)  # method -> {matrix: relative errors}
    fit_seconds: dict[str, float] = field(default_factory=dict)
    work: Path | None = None  # the folder of per-block results and resume state


# fit.fit_site: (site, its matrices, its statistics, weight of a matrix, FitOptions, factors out, spectrum out)
FitSite = Callable[[str, list[Matrix], SiteStats, Callable[[Matrix], torch.Tensor], object, FactorSet, dict], None]


def capture_and_fit(
    runner: BlockRunner,
    sequences: Calibration | list[list[int]],
    options: CaptureOptions,
    fits: list,
    work: Path,
    fit_site: FitSite,
    *,
    pad_id: int = 0,
    fit_dtype: torch.dtype | None = None,
    store: Path | None = None,
    tier: str = "device",
    fingerprint: str = "",
    fresh: bool = False,
    after_block: Callable[[int], None] | None = None,
) -> BlockwiseResult:
    """Capture every block's statistics and fit its matrices with each of `fits` (FitOptions).

    `work` holds the per-block results and the resume state; `store`, when given, receives
    the statistics once per block. A run with the same inputs resumes after its last
    finished block; `fresh` starts over. `after_block(k)` runs after block k is saved.
    `fit_site` is fit's own per-site function (passed in: fit imports this module).
    """
    calibration = as_calibration(sequences)
    if not calibration.sequences:
        raise InputError("no calibration tokens to capture; check the task's calibration split")
    plan = plan_batches(calibration.lengths, options, calibration.prefix_of, [len(p) for p in calibration.prefixes])
    run_tokens = calibration.tokens_run
    stream = BlockStream(calibration, pad_id, runner.device)
    sites = sites_of(runner.matrices)
    blocks = sorted({m.block for m in runner.matrices})
    key = sha256_json({
        "caller": fingerprint, "sequences": sha256_json(calibration.sequences),
        "prefixes": sha256_json([calibration.prefix_of, calibration.prefixes]), "options": options.recorded(),
        "fits": [f.recorded() for f in fits], "store": store is not None, "sites": {s: [m.name for m in g] for s, g in sites.items()},
    })
    make_dir(work)
    cache = HiddenCache(tier, work, runner.device)
    start = _resume_point(work, key, cache, fresh, store)
    fit_dtype = fit_dtype or runner.dtype
    result = BlockwiseResult(summary={}, work=work)
    seconds = {f.method: 0.0 for f in fits}
    started = time.perf_counter()
    with progress.bar("capture+fit (blockwise)", total=len(blocks) * run_tokens) as bar:
        if 0 < start < len(blocks) and not cache.resumable_at(start):
            _replay(runner, stream, plan, cache, start, bar)
        elif start:
            cache.block = start
            _replay_prefixes(runner, stream, plan, start, bar)
        bar.advance(start * run_tokens)
        for index in blocks[start:]:
            block_sites = {s: g for s, g in sites.items() if g[0].block == index}
            with runner.loaded(index):
                stats = _block_statistics(runner, index, block_sites, stream, plan, options, cache,
                                          last=index == blocks[-1], bar=bar)
                if store is not None:
                    add_sites(store, stats, _store_state(key, sites, index + 1, len(blocks), stats, options))
                for fit in fits:
                    tick = time.perf_counter()
                    part, spectrum = FactorSet(fit.method), {}
                    weight = _weights_for_fit(runner, fit_dtype)
                    for site, members in block_sites.items():
                        fit_site(site, members, stats[site], weight, fit, part, spectrum)
                    _save_block(work, index, fit.method, part, spectrum)
                    seconds[fit.method] += time.perf_counter() - tick
            del stats
            cache.advance()
            write_json_atomic(work / STATE_FILE, {"fingerprint": key, "blocks_done": index + 1, "tier": tier,
                                                  "fit_seconds": seconds})
            if after_block is not None:
                after_block(index)
    cache.clear()
    for fit in fits:
        result.factors[fit.method], result.spectra[fit.method] = _merge_blocks(work, blocks, fit.method)
    state = read_json(work / STATE_FILE)
    result.fit_seconds = state.get("fit_seconds", seconds)
    counted = calibration.tokens_counted
    result.summary = {
        "tokens": counted, "tokens_this_run": run_tokens, "sites": len(sites), "chunks": plan[-1].chunk + 1,
        "blocks": len(blocks), "resumed_from_block": start, "samples_per_site": min(counted, options.samples_per_site),
        "hidden_cache": tier, "seconds_this_run": round(time.perf_counter() - started, 2),
    }
    return result


def _resume_point(work: Path, key: str, cache: HiddenCache, fresh: bool, store: Path | None) -> int:
    state_path = work / STATE_FILE
    state = None if fresh or not state_path.exists() else read_json(state_path)
    if state and state.get("fingerprint") == key and state.get("tier") == cache.tier:
        log.info("resuming block-wise capture after block %d", state["blocks_done"] - 1)
        return int(state["blocks_done"])
    for path in work.iterdir():  # per-method block results, hidden states, state: never through a link
        remove_path(path)
    cache.clear()
    if store is not None:
        remove_store(store)
    return 0


def _run_block(runner, index, block, stream: BlockStream, planned, position, cache, batch=None):
    inputs, mask = stream.inputs(planned)
    args, kwargs = runner.call_of(index, inputs)
    hidden = args[0] if index == 0 else cache.get(position)
    if batch is not None:
        batch.prepare(planned, mask, runner.device)
    with torch.inference_mode():
        out = block(hidden, *args[1:], **kwargs)
    stream.keep_layer(planned, index, _cache_in(args, kwargs))
    return out[0] if isinstance(out, tuple) else out


def _block_statistics(runner, index, block_sites, stream, plan: list[PlannedBatch], options, cache, last, bar):
    """One block over every planned batch: its sites' statistics; its outputs into the cache."""
    acc = Accumulators.empty(block_sites, options.samples_per_site, runner.device, runner.dtype)
    batch = BatchRows()
    block = runner.blocks[index]
    with SiteHooks(runner.model, block_sites, acc, batch):
        for position, planned in enumerate(plan):
            out = _run_block(runner, index, block, stream, planned, position, cache, batch)
            if not last:  # the last block's outputs feed nothing we capture
                cache.put(position, out)
            acc.tokens += planned.tokens
            if planned.drain:
                acc.drain()
            bar.advance(planned.tokens // planned.weight)
            bar.note(f"block {index}")
    acc.pending.clear()  # the float32 partial sums are drained; free them before fitting
    return acc.site_stats()


def _replay(runner, stream, plan, cache, upto: int, bar) -> None:
    """Rebuild the hidden states entering block `upto` (and the prefixes' keys/values) by running
    the finished blocks forward only (no statistics, no fit): what resuming costs when the cache
    was not on disk."""
    for index in range(upto):
        with runner.loaded(index):
            block = runner.blocks[index]
            for position, planned in enumerate(plan):
                cache.put(position, _run_block(runner, index, block, stream, planned, position, cache))
        cache.advance()
        bar.note(f"replayed block {index}")


def _replay_prefixes(runner, stream, plan, upto: int, bar) -> None:
    """Rebuild the shared prefixes' keys/values in blocks before `upto` (a resume from hidden
    states on disk): the prefixes alone through the finished blocks."""
    runs = [(position, planned) for position, planned in enumerate(plan) if planned.runs_prefix]
    if not runs:
        return
    hidden: dict[int, torch.Tensor] = {}  # the prefixes' hidden states between blocks, in memory (they are short)
    held = SimpleNamespace(get=hidden.__getitem__)  # read as `_run_block` reads a HiddenCache
    for index in range(upto):
        with runner.loaded(index):
            block = runner.blocks[index]
            for position, planned in runs:
                hidden[position] = _run_block(runner, index, block, stream, planned, position, held)
        bar.note(f"replayed the shared prefixes through block {index}")


def _weights_for_fit(runner: BlockRunner, dtype: torch.dtype) -> Callable[[Matrix], torch.Tensor]:
    """A matrix's weight as H x D in the dtype the in-memory fit loads (read again from the
    file, so a capture in another dtype does not change the factors)."""

    def weight(m: Matrix) -> torch.Tensor:
        full = f"{m.name}.weight"
        tensor = runner.weights.get(runner.aliases.get(full, [full])).to(dtype)
        return tensor.T if m.transposed else tensor

    return weight


def _store_state(key, sites, blocks_done, blocks, stats, options) -> dict:
    tokens = next(iter(stats.values())).tokens if stats else 0
    return {"schema": STORE_SCHEMA, "fingerprint": key, "mode": "blockwise", "blocks_done": blocks_done,
            "complete": blocks_done == blocks, "tokens": tokens, "sites": list(sites),
            "samples_per_site": options.samples_per_site, "seed": options.seed}


def _block_file(work: Path, index: int, method: str) -> Path:
    """One block's factors: an index (with its shard beside it) in the method's own folder."""
    return work / method / f"block-{index:05d}.json"


def _save_block(work: Path, index: int, method: str, part: FactorSet, spectrum: dict) -> None:
    path = _block_file(work, index, method)
    make_dir(path.parent)
    write_json_atomic(path.with_suffix(".spectrum.json"), spectrum)
    part.save(path)  # the index last: a block whose index exists is complete


def _merge_blocks(work: Path, blocks: list[int], method: str) -> tuple[FactorSet, dict]:
    """Every block's factors as one lazily read set (one index over the blocks' shards), and the spectra.

    Nothing is loaded: memory holds one block's factors at a time, from the fit of a block to
    the fit's files (`StoredFactors.save` copies the shards).
    """
    entries, hashes, spectrum, dtype = {}, {}, {}, "float32"
    for index in blocks:
        path = _block_file(work, index, method)
        body = json.loads(path.read_text())
        entries.update(body["matrices"])
        hashes.update(body.get("shards", {}))
        dtype = body.get("dtype", dtype)
        spectrum.update(json.loads(path.with_suffix(".spectrum.json").read_text()))
    merged = work / method / "factors.json"
    write_json_atomic(merged, {"format": INDEX_FORMAT, "method": method, "dtype": dtype, "lean": True,
                               "matrices": entries, "shards": hashes})
    return FactorSet.load(merged), spectrum


# ---- the stages' entry point ---------------------------------------------------------------------


def capture_and_fit_workspace(ws: Workspace, options: CaptureOptions, sequences: Calibration | list[list[int]], fits: list, tokenizer,
                              fit_site: FitSite, *, fingerprint: str = "", fresh: bool = False,
                              work: Path | None = None) -> BlockwiseResult:
    """`capture_and_fit` on the workspace's model: its safetensors folder, the hidden-cache tier
    the memory budget allows, statistics kept in the capture store only with --keep-stats."""
    discover_dtype = ws.require(Stage.DISCOVER)["inputs"]["options"]["dtype"]
    dtype = options.dtype or discover_dtype
    shape, run = memory.workspace_shapes(ws, options, sequences)
    estimate = memory.blockwise(shape, run)
    budget = memory.parse_bytes(options.memory_budget) if options.memory_budget else memory.free_bytes(options.device)
    host = memory.free_bytes("cpu")
    tier = memory.choose_tier(estimate, budget, host, options.device)
    runner = open_runner(safetensors_folder(workspace_model_source(ws)), torch_dtype(dtype), options.device)
    check_fits_positions(runner.model, as_calibration(sequences).longest, "--seq-len")
    return capture_and_fit(
        runner, sequences, options, fits, ws.inside(work or ws.stage_dir(Stage.CAPTURE) / "blockwise"), fit_site,
        pad_id=tokenizer.pad_token_id or 0, fit_dtype=torch_dtype(discover_dtype),
        store=ws.capture_store if options.keep_stats else None, tier=tier, fingerprint=fingerprint, fresh=fresh,
    )
