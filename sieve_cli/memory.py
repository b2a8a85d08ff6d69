"""Memory made visible: the estimated peak of a stage, from formulas, before it starts.

Each estimate names its parts (weights, statistics, hidden cache, fit working set, factors,
activations, runtime) so a user sees what to change. The formulas follow the code's own
allocations; they are upper bounds, checked against measured peaks by
`bench/blockwise_memory.py` and `bench/gpu_check.sh`. Pure arithmetic, no I/O, except
`free_bytes` (what the device has free) and `workspace_shapes` (discover's matrices.json).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psutil
import torch

from .accumulate import plan_batches
from .errors import InputError
from .files import read_json
from .options import CaptureOptions
from .scoring import batches_by_length
from .workspace import Stage, Workspace

GiB = 1 << 30
# Python, torch and transformers imported, plus allocator slack: measured 0.6-0.8 GiB RSS here.
RUNTIME_BYTES = 1 * GiB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": GiB, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


class MemoryBudgetError(InputError):
    """The run cannot fit the memory it is given; the message names the way out."""


def parse_bytes(text: str, flag: str = "--memory-budget") -> int:
    """'20GiB', '512MB', '1.5g' or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise InputError(f"{flag} takes a size such as 20GiB, 512MB or 1.5G, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB" if n < 10 * GiB else f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class Estimate:
    what: str  # e.g. "capture+fit, blockwise"
    parts: dict[str, int] = field(default_factory=dict)  # bytes per part

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        inner = ", ".join(f"{name} {self.parts[name] / GiB:.2f}" for name in self.parts)
        return f"{self.what}: estimated peak {gib(self.total)} ({inner} GiB)"

    def to_dict(self) -> dict:
        return {"what": self.what, "total_bytes": self.total, "parts_bytes": dict(self.parts)}


# ---- the model's shape, from discover's matrices.json ----------------------------------


@dataclass(frozen=True)
class MatrixShape:
    block: int
    site: str
    out_features: int  # H
    in_features: int  # D


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    resident_params: int  # outside the decoder blocks and needed before them (embeddings)
    head_params: int  # an untied LM head (0 when tied)
    other_params: int  # norms, biases
    matrices: tuple[MatrixShape, ...]

    @classmethod
    def from_discovery(cls, result: dict) -> "ModelShape":
        groups = result["groups"]
        matrices = tuple(MatrixShape(m["block"], m["site"], m["out_features"], m["in_features"]) for m in result["matrices"])
        head = 0 if groups["head"].get("tied") else groups["head"]["params"]
        return cls(result["total_params"], groups["embedding"]["params"], head, groups["other"]["params"], matrices)

    @property
    def vocab(self) -> int:
        """Rows of the embedding (an upper bound where it also holds position embeddings)."""
        return self.resident_params // max(self.hidden, 1)

    @property
    def blocks(self) -> list[int]:
        return sorted({m.block for m in self.matrices})

    @property
    def hidden(self) -> int:
        return self.matrices[0].in_features

    def block_params(self) -> int:
        """The largest block's parameters (its matrices plus an even share of norms and biases)."""
        per_block = {b: 0 for b in self.blocks}
        for m in self.matrices:
            per_block[m.block] += m.out_features * m.in_features
        return max(per_block.values()) + self.other_params // max(len(per_block), 1)

    def sites(self, block: int | None = None) -> dict[str, int]:
        """{site: input dimension D}, of one block or of all."""
        return {m.site: m.in_features for m in self.matrices if block is None or m.block == block}


@dataclass(frozen=True)
class RunShape:
    """What a capture or fit run holds besides the model: its batch and calibration sizes."""

    weight_bytes: int  # per parameter, in the dtype the weights are loaded in
    compute_bytes: int  # per activation element
    batch_size: int = 32
    seq_len: int = 512
    samples: int = 4096  # reservoir rows per site
    padded_tokens: int = 200_000  # calibration tokens including padding
    device: str = "cpu"
    scored: int | None = None  # scoring: positions per row projected to the vocabulary (None: seq_len)


# ---- the parts -----------------------------------------------------------------------


def factor_bytes(out_features: int, in_features: int, nbytes: int = 4) -> int:
    """What fit keeps for one matrix: the basis up to the break-even rank floor(HD / (H + D))
    (above it factors are larger than the matrix), B (H x R) and A (R x D), `nbytes` each."""
    rank = out_features * in_features // (out_features + in_features)
    return nbytes * rank * (out_features + in_features)


def fit_work_bytes(out_features: int, in_features: int) -> int:
    """float64 temporaries of one matrix's closed-form fit (factorize.output_basis).

    H <= D: W, W C, W C W^T, its eigenvectors, U^T W. H > D: W, C's eigen-decomposition and
    root, W C^(1/2), its SVD (U, V^T and LAPACK's work copy), U^T W.
    """
    H, D = out_features, in_features
    if H <= D:
        return 8 * (4 * H * D + 4 * H * H)
    return 8 * (5 * H * D + 6 * D * D)


def statistics_bytes(sites: dict[str, int], run: RunShape) -> int:
    """float64 Grams, their float32 (or float64) partial sums, float16 samples."""
    gram = 8 if run.compute_bytes == 8 else 4
    return sum(D * D * (8 + gram) + run.samples * D * 2 for D in sites.values())


def activation_bytes(shape: ModelShape, run: RunShape) -> int:
    """One batch's forward working set: hidden states, the MLP's intermediate, attention
    scores (heads counted as q's width / 64, an upper bound), the hooks' float32 copies."""
    rows = run.batch_size * run.seq_len
    widest = max(m.out_features for m in shape.matrices)
    heads = shape.matrices[0].out_features // 64 or 1  # the table lists q (or qkv) first
    widest_input = max(m.in_features for m in shape.matrices)
    return (rows * (8 * shape.hidden + 4 * widest) * run.compute_bytes
            + run.batch_size * heads * run.seq_len * run.seq_len * 4 * 2
            + 3 * rows * widest_input * 4)


def _runtime(run: RunShape) -> dict[str, int]:
    return {"runtime": RUNTIME_BYTES} if run.device == "cpu" else {}


# ---- the estimates -------------------------------------------------------------------


def capture_in_memory(shape: ModelShape, run: RunShape) -> Estimate:
    return Estimate("capture, in memory", {
        "weights": shape.total_params * run.weight_bytes,
        "statistics": statistics_bytes(shape.sites(), run),
        "activations": activation_bytes(shape, run),
        **_runtime(run),
    })


def fit_in_memory(shape: ModelShape, run: RunShape) -> Estimate:
    """run_fit: the whole model loaded, one site's statistics at a time, every factor kept
    until the end and copied once more when the file is written."""
    largest_site = max(shape.sites().values())
    return Estimate("fit, in memory", {
        "weights": shape.total_params * run.weight_bytes,
        "statistics": 2 * 8 * largest_site * largest_site + run.samples * largest_site * 2,
        "fit working set": max(fit_work_bytes(m.out_features, m.in_features) for m in shape.matrices),
        "factors": 2 * sum(factor_bytes(m.out_features, m.in_features, run.weight_bytes) for m in shape.matrices),
        **_runtime(run),
    })


def blockwise(shape: ModelShape, run: RunShape) -> Estimate:
    """Block-wise capture+fit: embeddings and one block's weights, one block's statistics,
    the hidden states entering and leaving the block, one matrix's fit, the factors.

    The factors of each block (lean: break-even rank, model dtype) go to disk as that block's
    shard as soon as it is fitted, and the fit's files are made by copying the shards: memory
    holds one block's factors (counted twice: built, then written).
    """
    per_block_stats = max(statistics_bytes(shape.sites(b), run) for b in shape.blocks)
    nbytes = run.weight_bytes
    per_block_factors = max(
        sum(factor_bytes(m.out_features, m.in_features, nbytes) for m in shape.matrices if m.block == b)
        for b in shape.blocks
    )
    return Estimate("capture+fit, blockwise", {
        "weights": (shape.resident_params + shape.block_params()) * run.weight_bytes,
        "statistics": per_block_stats,
        "hidden cache": 2 * run.padded_tokens * shape.hidden * run.compute_bytes,
        "fit working set": max(fit_work_bytes(m.out_features, m.in_features) for m in shape.matrices),
        "factors": 2 * per_block_factors,
        "activations": activation_bytes(shape, run),
        **_runtime(run),
    })


# ---- search and eval: scoring a split part --------------------------------------------


def scoring_run(lengths: list[int], batch_size: int, dtype: str, device: str, scored: int | None = None,
                max_batch_tokens: int = 8192) -> RunShape:
    """The RunShape of scoring sequences of these lengths in the evaluator's batches, `scored`
    positions per row at most projected to the vocabulary (None: every position)."""
    batches = batches_by_length(lengths, batch_size, max_batch_tokens) if lengths else []
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    rows = max((len(batch) for batch in batches), default=1)
    return RunShape(weight_bytes=DTYPE_BYTES[dtype], compute_bytes=DTYPE_BYTES[dtype], batch_size=rows,
                    seq_len=max(lengths, default=1), samples=0, padded_tokens=padded, device=device, scored=scored)


def logits_bytes(shape: ModelShape, run: RunShape) -> int:
    """The scored positions' logits (`logits_to_keep`) and one row's float32 log-softmax
    temporaries (`scoring.span_scores`)."""
    keep = run.seq_len if run.scored is None else min(run.scored, run.seq_len)
    return run.batch_size * keep * shape.vocab * run.compute_bytes + 3 * keep * shape.vocab * 4


def scoring_activations(shape: ModelShape, run: RunShape) -> int:
    """One batch's forward working set without capture's hooks."""
    rows = run.batch_size * run.seq_len
    widest = max(m.out_features for m in shape.matrices)
    heads = shape.matrices[0].out_features // 64 or 1
    return rows * (8 * shape.hidden + 4 * widest) * run.compute_bytes + run.batch_size * heads * run.seq_len ** 2 * 4 * 2


def all_factor_bytes(shape: ModelShape, nbytes: int, block: int | None = None) -> int:
    return sum(factor_bytes(m.out_features, m.in_features, nbytes) for m in shape.matrices
               if block is None or m.block == block)


def scoring_in_memory(shape: ModelShape, run: RunShape, what: str, factors: bool) -> Estimate:
    """Eval or search with the whole model loaded. Search (`factors`) also holds every matrix's
    factors on the device (`StoredFactors.keep_on`) and one candidate's low-rank copies."""
    parts = {"weights": shape.total_params * run.weight_bytes}
    if factors:
        parts["factors"] = 2 * all_factor_bytes(shape, run.weight_bytes)
    return Estimate(f"{what}, in memory", {
        **parts, "activations": scoring_activations(shape, run), "logits": logits_bytes(shape, run), **_runtime(run),
    })


def scoring_streaming(shape: ModelShape, run: RunShape, what: str, factors: bool) -> Estimate:
    """Eval or search block by block (`streaming.py`): the embeddings, LM head and one block's
    weights, the hidden states of every batch entering and leaving the block, one block's
    factors (read, then copied into its low-rank modules)."""
    parts = {"weights": (shape.resident_params + shape.head_params + shape.block_params()) * run.weight_bytes,
             "hidden cache": 2 * run.padded_tokens * shape.hidden * run.compute_bytes}
    if factors:
        parts["factors"] = 2 * max(all_factor_bytes(shape, run.weight_bytes, b) for b in shape.blocks)
    return Estimate(f"{what}, streaming block by block", {
        **parts, "activations": scoring_activations(shape, run), "logits": logits_bytes(shape, run), **_runtime(run),
    })


def choose_scoring_mode(mode: str, in_memory: Estimate, streaming: Estimate, budget: int, budget_source: str,
                        dtype: str, spread: int | None = None) -> str:
    """memory (one device), spread (device_map=auto over `spread` bytes of devices) or blockwise
    (streaming), as asked or (auto) as fits; refuses a run that cannot fit, naming the way out."""
    half = " load in bfloat16 (--dtype bfloat16)," if dtype == "float32" else ""
    if mode in ("auto", "memory"):
        if in_memory.total <= budget:
            return "memory"
        if spread is not None and in_memory.total <= spread:
            return "spread"
    if mode == "memory":
        across = f" or across the devices ({gib(spread)})" if spread is not None else ""
        raise MemoryBudgetError(
            f"{in_memory.describe()} exceeds {budget_source} ({gib(budget)}){across}; stream it block by block "
            f"(--mode blockwise, {gib(streaming.total)}),{half} or raise --memory-budget"
        )
    minimum = blockwise_minimum(streaming)
    if minimum <= budget:
        return "blockwise"
    raise MemoryBudgetError(
        f"even streaming block by block, one block needs {gib(minimum)} but {budget_source} is {gib(budget)} "
        f"({streaming.describe()}, hidden cache on disk); give --memory-budget of at least {gib(minimum)},{half} "
        f"or a smaller --batch-size"
    )


def spread_memory(device: str, budget: int, host: bool = True) -> dict | None:
    """accelerate's max_memory for device_map=auto: `budget` on the run's GPU, the free memory of
    the other GPUs and (`host`) of the host, less the runtime. None off CUDA (the CPU is one device).

    Search passes host=False: accelerate keeps host-mapped weights off the module (on the meta
    device, copied in per forward), so a candidate's low-rank modules could not be built there.
    """
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    own = torch.device(device).index or 0
    limits: dict = {i: (budget if i == own else free_bytes(f"cuda:{i}")) for i in range(torch.cuda.device_count())}
    if host:
        limits["cpu"] = max(free_bytes("cpu") - RUNTIME_BYTES, 0)
    return limits if len(limits) > 1 else None


def free_bytes(device: str) -> int:
    """What the device has free now: host RAM available for the CPU, free memory for CUDA."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return int(psutil.virtual_memory().available)


def choose_mode(mode: str, in_memory: Estimate, block_wise: Estimate, budget: int, budget_source: str,
                dtype: str) -> str:
    """memory or blockwise, as asked or (auto) as fits; refuses a run that cannot fit."""
    half = " load in bfloat16 (--dtype bfloat16)," if dtype == "float32" else ""
    if mode in ("auto", "memory") and in_memory.total <= budget:
        return "memory"
    if mode == "memory":
        raise MemoryBudgetError(
            f"{in_memory.describe()} exceeds {budget_source} ({gib(budget)}); run block-wise (--mode blockwise, "
            f"{gib(block_wise.total)}),{half} or raise --memory-budget"
        )
    minimum = blockwise_minimum(block_wise)
    if minimum <= budget:
        return "blockwise"
    raise MemoryBudgetError(
        f"even block-wise, one block needs {gib(minimum)} but {budget_source} is {gib(budget)} "
        f"({block_wise.describe()}, hidden cache on disk); give --memory-budget of at least {gib(minimum)},{half} "
        f"or a smaller --batch-size / --samples-per-site"
    )


def blockwise_minimum(block_wise: Estimate) -> int:
    """The block-wise peak with the hidden-state cache on disk: the least memory any run needs."""
    return block_wise.total - block_wise.parts.get("hidden cache", 0)


def choose_tier(block_wise: Estimate, budget: int, host_free: int, device: str) -> str:
    """Where the hidden states between blocks live: on the device if everything fits there,
    else in host memory (a GPU run), else on disk."""
    cache = block_wise.parts.get("hidden cache", 0)
    if block_wise.total <= budget:
        return "device"
    if not device.startswith("cpu") and cache <= host_free // 2:
        return "host"
    return "disk"


def fit_from_store(shape: ModelShape, run: RunShape) -> Estimate:
    """run_fit without loading the model: each matrix's weight read from the safetensors files."""
    base = fit_in_memory(shape, run)
    parts = dict(base.parts)
    parts["weights"] = max(m.out_features * m.in_features for m in shape.matrices) * run.weight_bytes
    return Estimate("fit, weights read per matrix", parts)


def workspace_shapes(ws: Workspace, options: CaptureOptions, sequences=None,
                     device: str | None = None) -> tuple[ModelShape, RunShape]:
    """(ModelShape, RunShape) of a capture in this workspace, from discover's matrices.json and
    the batch plan of `sequences` (or of --tokens in full-length pieces): no weights loaded."""
    dtype = options.dtype or ws.require(Stage.DISCOVER)["inputs"]["options"]["dtype"]
    # of a Calibration, the sequences' own tokens: a shared prefix's one run is small beside the batches
    sequences = getattr(sequences, "sequences", sequences)
    lengths = [len(s) for s in sequences] if sequences else [options.seq_len] * max(options.tokens // options.seq_len, 1)
    padded = sum(max(lengths[i] for i in batch.members) * len(batch.members) for batch in plan_batches(lengths, options))
    run = RunShape(weight_bytes=DTYPE_BYTES[dtype], compute_bytes=DTYPE_BYTES[dtype], batch_size=options.batch_size,
                   seq_len=options.seq_len, samples=options.samples_per_site, padded_tokens=padded,
                   device=device or options.device)
    return ModelShape.from_discovery(read_json(ws.matrices_json)), run
