"""Streaming evaluation: the task metric of a model that does not fit in memory, block by block.

The model is built on the meta device and its weights are read one decoder block at a time
from its safetensors files (`blockwise.BlockRunner`, the machinery of block-wise capture).
Every batch of the split is embedded, then each block is loaded once and every batch's hidden
states go through it (they are carried between blocks in `blockwise.HiddenCache`: on the
device, in host memory or on disk); after the last block the model's own final norm and LM
head give the logits of the scored positions. The model computes its own masks, position
embeddings and logits: the runner catches the arguments the model hands each block and calls
the real block with them, never a re-implemented forward.

The batches, the scored positions and the per-span scores are `scoring.py`'s, so the scores
(`evaluate.stream_evaluate` turns them into the metric) equal `evaluate.evaluate`'s within float rounding. Not reused: the shared-prefix KV cache
(every sequence runs whole, left-padded: the evaluator's `reuse_prefix=False` path) and
generation (a generated token needs every block: `generate_until` is refused).

A search candidate (ranks per matrix) is scored by swapping each block's factored matrices in
while that block is loaded (`pruned.prune_in_memory` on the block's matrices), so search runs
on a model that never is whole in memory; each candidate reads the weights once more.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import memory, progress
from .blockwise import BlockRunner, HiddenCache, SafetensorsWeights, open_runner, pass_through
from .errors import InputError
from .factors import FactorSet
from .files import read_json
from .lowrank import swap_modules
from .models import torch_dtype
from .pruned import SIEVE_JSON, base_config, empty_model, lowrank_shell, prune_in_memory, verify_pruned_folder
from .scoring import SpanScore, batches_by_length, left_pad, longest_span, null_bar, span_scores
from .taskhead import TaskHead
from .workspace import Workspace

log = logging.getLogger(__name__)


# ---- the model, opened for streaming -----------------------------------------------------------


def open_streaming(folder: str | Path, dtype: torch.dtype, device: str) -> BlockRunner:
    """A Hugging Face folder's model on the meta device, its embeddings, final norm and LM head loaded."""
    runner = open_runner(folder, dtype, device)
    runner.load_head()
    return runner


def open_streaming_pruned(folder: str | Path, device: str, dtype: str | torch.dtype | None = None) -> BlockRunner:
    """A folder written by `sieve apply`, opened like `open_streaming`: the base architecture with
    its low-rank shells swapped in on the meta device, then read block by block from model.safetensors."""
    folder = Path(folder)
    info = verify_pruned_folder(folder)
    if info.get("quantize"):
        raise InputError(f"{folder} holds quantised weights, which streaming evaluation cannot read block by block; "
                         f"evaluate it with --mode memory, or apply the plan without --quantize")
    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype or torch_dtype(info.get("dtype", "float32"))
    model = empty_model(base_config(folder, info), dt)
    for param in model.parameters():  # init_empty_weights(include_buffers=False): parameters only are on meta
        assert param.device.type == "meta"
    model.tie_weights()
    # the runner finds the matrices (and the names tied weights go by) on the dense skeleton; the
    # shells then take the factored matrices' places, and their A and B load with their blocks
    runner = BlockRunner(model.eval(), SafetensorsWeights(folder), device, dt)
    shells = {name: shell_of(s, dt) for name, s in info["factored"].items()}
    try:
        swap_modules(model, shells)
    except AttributeError as exc:  # sieve.json names a module the model lacks
        raise InputError(f"{folder / SIEVE_JSON} does not match the model ({exc}); "
                         f"rerun `sieve apply -o {folder} --force`") from None
    runner.load_head()
    for name, shell in shells.items():  # a task head's kept ids: an int64 buffer, read as stored
        if isinstance(shell, TaskHead):
            shell.index = runner.weights.get([f"{name}.index"]).to(device)
    return runner


def shell_of(spec: Mapping, dtype: torch.dtype):
    """An empty module of a sieve.json `factored` entry (a low-rank pair, or a task vocabulary's head)."""
    if spec.get("type") == "task_head":
        return TaskHead(spec["vocab_size"], spec["in_features"], spec["kept"], tied=spec["tied"], bias=spec["bias"],
                        dtype=dtype, device="meta")
    return lowrank_shell(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype)


def is_pruned(folder: str | Path) -> bool:
    return (Path(folder) / SIEVE_JSON).exists()


# ---- the candidate's factors, one block at a time ----------------------------------------------


@contextmanager
def factored_block(runner: BlockRunner, index: int, ranks: Mapping[str, int | None] | None, factors: FactorSet | None):
    """Block `index` (loaded) with the candidate's low-rank matrices swapped in, restored afterwards."""
    own = {m.name for m in runner.matrices if m.block == index}
    if factors is not None and factors.method == "width":
        own |= {u.name for u in factors.width_units() if u.block == index}
    chosen = {name: rank for name, rank in (ranks or {}).items() if name in own and rank is not None}
    if not chosen:
        yield
        return
    if factors is None:
        raise InputError("a candidate with low-rank matrices needs the fit's factors")
    restore = prune_in_memory(runner.model, chosen, factors)
    try:
        yield
    finally:
        restore()


# ---- scoring ---------------------------------------------------------------------------------


def final_logits(runner: BlockRunner, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits at the last `keep` positions of the last block's output `hidden`.

    The model's own forward computes them (final norm, LM head, any logit soft-capping): its
    first block returns `hidden` and the others pass it through.
    """
    blocks = list(runner.blocks)

    def feed(*args, **kwargs):
        return hidden

    try:
        blocks[0].forward = feed
        for block in blocks[1:]:
            block.forward = pass_through
        out = runner.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep,
                           use_cache=False)
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    return out.logits


@torch.inference_mode()
def stream_scores(runner: BlockRunner, sequences, pad_id: int, batch_size: int = 16, max_batch_tokens: int = 8192,
                  show_progress: bool = True, ranks: Mapping[str, int | None] | None = None,
                  factors: FactorSet | None = None, tier: str = "device", folder: Path | None = None,
                  ) -> list[list[SpanScore]]:
    """Per sequence, per span: (sum log p(targets), top-1 hits, targets), as `scoring.score_sequences`
    gives them, with one decoder block in memory at a time.

    `tier` says where the hidden states between blocks live (`blockwise.HiddenCache`; "disk"
    writes them under `folder`, a temporary folder when None).
    """
    batches = batches_by_length([len(s.tokens) for s in sequences], batch_size, max_batch_tokens)
    inputs = [left_pad([sequences[i].tokens for i in batch], pad_id, runner.device) for batch in batches]
    out: list[list[SpanScore]] = [[] for _ in sequences]
    with tempfile.TemporaryDirectory(prefix="sieve-stream-", dir=folder) as scratch:
        cache = HiddenCache(tier, Path(scratch), runner.device)
        blocks = len(runner.blocks)
        with progress.bar("eval (streaming)", total=blocks + 1) if show_progress else null_bar() as bar:
            for index in range(blocks):
                with runner.loaded(index) as block, factored_block(runner, index, ranks, factors):
                    for b, (ids, mask, positions) in enumerate(inputs):
                        args, kwargs = runner.call_of(index, {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
                        hidden = args[0] if index == 0 else cache.get(b)
                        result = block(hidden, *args[1:], **kwargs)
                        cache.put(b, result[0] if isinstance(result, tuple) else result)
                cache.advance()
                bar.advance()
            for b, (batch, (ids, mask, positions)) in enumerate(zip(batches, inputs)):
                rows = [sequences[i] for i in batch]
                keep = max(longest_span(s) for s in rows)
                logits = final_logits(runner, cache.get(b), ids, mask, positions, keep)
                for r, seq in enumerate(rows):
                    out[batch[r]] = span_scores(logits[r], seq, keep)
            bar.advance()
        cache.clear()
    return out


# ---- the stages' choice: one device, spread over devices, or streaming ----------------------------


@dataclass(frozen=True)
class Layout:
    """How search or eval holds the model: `memory` (one device), `spread` (device_map=auto with
    `max_memory`) or `blockwise` (streaming, hidden states on `tier`), and the estimate it was chosen by."""

    mode: str
    estimate: memory.Estimate
    budget: int
    max_memory: dict | None = None
    tier: str = "device"

    def note(self) -> dict:
        extra = {"hidden_cache": self.tier} if self.mode == "blockwise" else {}
        return {"mode": self.mode, "estimate": self.estimate.to_dict(), "budget_bytes": self.budget, **extra}


def scored_positions(prepared) -> int | None:
    """Positions per row the evaluator projects to the vocabulary (None: a generation's, one per step
    but the prompt's last; counted as every position, an upper bound)."""
    if prepared.prompts:
        return None
    return max((longest_span(s) for s in prepared.sequences), default=1)


def choose_layout(ws: Workspace, mode: str, memory_budget: str | None, device: str, dtype: str,
                  parts: list, batch_size: int, what: str, factors: bool = False,
                  can_spread: bool = True) -> Layout:
    """The layout of a search or eval in this workspace, from discover's shapes and the lengths of
    the parts it scores (`evaluate.PreparedSplit`s; no weights loaded); logs the estimated peak;
    refuses a run that cannot fit."""
    shape = memory.ModelShape.from_discovery(read_json(ws.matrices_json))
    runs = [memory.scoring_run([len(s.tokens) for s in p.sequences] + [len(q) + p.max_gen_toks for q in p.prompts],
                               batch_size, dtype, device, scored_positions(p)) for p in parts]
    in_memory = max((memory.scoring_in_memory(shape, r, what, factors) for r in runs), key=lambda e: e.total)
    streaming = max((memory.scoring_streaming(shape, r, what, factors) for r in runs), key=lambda e: e.total)
    if memory_budget is not None:
        budget, source = memory.parse_bytes(memory_budget), "--memory-budget"
    else:
        budget, source = memory.free_bytes(device), f"the free memory of {device}"
    limits = memory.spread_memory(device, budget, host=not factors) if can_spread else None
    chosen = memory.choose_scoring_mode(mode, in_memory, streaming, budget, source, dtype,
                                        None if limits is None else sum(limits.values()))
    if chosen == "blockwise":
        layout = Layout(chosen, streaming, budget, tier=memory.choose_tier(streaming, budget, memory.free_bytes("cpu"), device))
    else:
        layout = Layout(chosen, in_memory, budget, max_memory=limits if chosen == "spread" else None)
    how = {"memory": f"on {device}", "spread": "spread over the devices (device_map=auto)",
           "blockwise": f"streaming, hidden states on {layout.tier}"}[chosen]
    log.info("%s; budget %s (%s); runs %s", layout.estimate.describe(), memory.gib(budget), source, how)
    return layout
