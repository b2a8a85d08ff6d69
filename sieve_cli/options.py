"""Every stage's options, defined once: default, help text and flag live on the dataclass field.

The CLI derives its Typer options from these fields (`commands/common.py`), the Python API
builds the same dataclasses, and each stage records `recorded()` in its manifest. Options
that several commands share (task, data root, device, dtype, seed, limit) are declared
through one helper each, so the flag, its short form and its help are the same everywhere.
This module imports no torch: `sieve --help` reads it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, TaskError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
FIT_METHODS = ("output", "learned", "svd", "pca", "width")
FIT_INITS = ("random", "output")
SUMMARY_LEVELS = (0.9, 0.75, 0.5)  # kept fractions reported in every fit summary
# how `sieve search` looks for a plan; `adaptive` names the measured best of seeds/local/genetic (ADAPTIVE)
STRATEGIES = ("uniform", "seeds", "local", "genetic", "adaptive")
ADAPTIVE = "local"
REFERENCES = ("dense", "healed-dense")  # what a healed search's tolerance is measured against
DEFAULT_LEVELS = (1.0, 0.9, 0.75, 0.6, 0.5, 0.35, 0.25, 0.2, 0.1, 0.05)  # adaptive: kept fractions a gene may take
EVAL_PARTS = ("test", "confirm", "search", "calibration")
# Kept fraction above which a factored matrix runs slower than the dense one. Measured on
# SmolLM2's shapes (bench/pruned_speed.py, 1 CPU thread, dense time / factored time): at 0.85
# and above nearly every shape is slower factored (prefill 0.81-1.18x, decode 0.64-0.92x); at
# 0.8 prefill breaks even (0.90-1.32x); at 0.75 prefill is 1.25-1.34x faster and the whole
# model decodes 1.06x faster. `sieve apply --speed-crossover` stores the dense product B A above it.
DENSE_ABOVE = 0.8
DEFAULT_WORKSPACE = "sieve-workspace"
# `sieve apply --quantize`: scheme -> what it stores (quantize.py does it)
QUANTIZE_SCHEMES = {"int8": "int8 weights, one scale per output row (torchao Int8WeightOnlyConfig)"}
MEMORY_MODES = ("auto", "memory", "blockwise")
# `sieve apply --vocab`: which token ids the LM head scores (sieve_cli/vocab.py, taskhead.py)
VOCAB_MODES = {
    "full": "every id of the vocabulary (the model's own head)",
    "task": "the ids of the task's calibration, few-shot and choice texts, the special ids and --vocab-extra lowest others",
}
VOCAB_EXTRA = 4096  # --vocab-extra: lowest ids kept beyond the task's own; bench/vocab_coverage.py: a size/coverage middle
# `sieve heal --loss`: what the LoRA adapters are trained to minimise on the calibration part
HEAL_LOSSES = {
    "ce": "next-token cross-entropy on the rendered calibration text (gold answers included)",
    "distill": "KL divergence from the dense model's next-token distribution at every position",
}
RUN_LAYOUT = ("mode", "memory_budget", "keep_stats")  # options that change how a stage runs, not its outputs
SCORING_MODE_HELP = ("memory (the whole model: on one device, or spread over the GPUs and host memory with "
                     "device_map=auto when one device is too small), blockwise (streaming: one decoder block at a "
                     "time, read from the safetensors files), or auto: as the memory budget allows.")
SEARCH_POOL = ("workers", "worker_threads", "ray_address")  # where search scores its candidates: not its plan


def fitted_what(method: str) -> str:
    """What a fit's count counts: a width fit orders modules (MLPs, attention), the others factor matrices."""
    return "modules (MLP and attention)" if method == "width" else "matrices"


def default_workspace() -> Path:
    """`$SIEVE_WORKSPACE`, else ./sieve-workspace: stage commands chain without -w."""
    return Path(os.environ.get("SIEVE_WORKSPACE") or DEFAULT_WORKSPACE)


# ---- field declarations ----------------------------------------------------------------------
def opt(default: Any, help: str, *, flag: str | None = None, short: str | None = None,
        parse: Callable[[str], Any] | None = None, show: Callable[[Any], str] | None = None,
        factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that is also a CLI option.

    `flag` defaults to --field-name; `parse` turns the CLI text into the field's value (and
    `show` the default back into text) for fields the CLI passes as a string, such as lists.
    """
    meta = {"help": help, "flag": flag, "short": short, "parse": parse, "show": show}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def floats(flag: str) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        try:
            return tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise InputError(f"{flag} takes comma-separated numbers such as 0.9,0.75,0.5, got {text!r}") from None

    return parse


def joined(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


# The options shared by several commands: one definition each.
def device_opt(default: str = "cpu") -> Any:
    return opt(default, "Torch device: cpu, cuda, cuda:1, mps.")


def dtype_opt(default: str | None = None) -> Any:
    suffix = "" if default else " (default: the one `sieve discover` loaded the model with)"
    return opt(default, f"Compute dtype: {', '.join(DTYPE_NAMES)}{suffix}.")


def seed_opt(what: str) -> Any:
    return opt(0, f"Random seed ({what}); the same seed gives the same result.")


def limit_opt(default: int | None = None) -> Any:
    return opt(default, "Score only the first N examples of the split part (0 or omitted: all of it).")


def batch_opt(default: int, what: str = "Sequences per forward pass.") -> Any:
    return opt(default, what)


# ---- checks shared by the dataclasses ----------------------------------------------------------
def check_positive(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def mode_opt(help: str) -> Any:
    return opt("auto", help)


def budget_opt() -> Any:
    return opt(None, "Memory to plan for, e.g. 20GiB (default: the free memory of the device).")


def check_memory(mode: str, budget: str | None) -> None:
    if mode not in MEMORY_MODES:
        raise InputError(f"--mode must be one of {', '.join(MEMORY_MODES)}, got {mode!r}")
    if budget is not None and not re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(budget)):
        raise InputError(f"--memory-budget takes a size such as 20GiB, 512MB or 1.5G, got {budget!r}")


def check_device(device: str) -> None:
    if not re.fullmatch(r"(cpu|cuda|mps|xpu|npu|hpu|meta)(:\d+)?", str(device)):
        raise InputError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps")


def check_dtype(dtype: str | None, allow_none: bool = True) -> None:
    if (dtype is None and not allow_none) or (dtype is not None and dtype not in DTYPE_NAMES):
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")


def quantize_opt() -> Any:
    return opt(None, "Store the linear weights (dense and both factors) quantised: int8 (torchao weight-only, one "
                     "scale per output row; needs sieve-cli[quantize]). The folder loads and evaluates like any other.")


def check_quantize(scheme: str | None) -> None:
    if scheme is not None and scheme not in QUANTIZE_SCHEMES:
        raise InputError(f"--quantize {scheme!r} is not supported; choose one of: {', '.join(QUANTIZE_SCHEMES)}")


def check_finite(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def no_limit(limit: int | None) -> int | None:
    """--limit 0 and an omitted --limit both mean the whole split part."""
    if limit is not None and limit < 0:
        raise InputError(f"--limit must be >= 0 (0: the whole split part), got {limit}")
    return limit or None


# ---- the stages' options -------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitOptions:
    """Sizes of the calibration, search, confirm and test parts: a count (>= 1) or a fraction (< 1).

    Search, confirm and test are capped (None: no cap) so that the search split stays cheap to
    score many times; calibration gets the rest (or its own size). Confirm holds examples that
    neither calibration nor the search sees: the chosen plan must keep the tolerance there too
    (0: no confirmation). Parts are drawn in the order test, confirm, search, calibration from
    one seeded shuffle. Used when a command binds a task (--task); a bound task keeps its split.
    When the task file names a `calibration_split`, calibration comes from that split (all of it,
    or --calibration-size of it) and the evaluated split's examples left after test, confirm and
    search join confirm, up to --max-confirm: confirm is scored a few times per search, so more
    examples there cost little and make its verdict sharper.
    """

    search: float = opt(0.25, "Search part when binding a task: a count, or a fraction below 1.", flag="--search-size")
    test: float = opt(0.25, "Test part when binding a task: a count, or a fraction below 1.", flag="--test-size")
    # confirm is the largest part after test: it judges one plan (and its back-offs) with no selection to
    # correct for, so its paired standard error alone decides; on sst2 131 examples (se 0.019-0.025 for
    # any pruned plan) could not confirm any removal at 5% and 90% confidence
    confirm: float = opt(0.3, "Confirm part when binding a task: a count, or a fraction below 1 (0: none).",
                         flag="--confirm-size")
    calibration: float | None = opt(None, "Calibration part when binding a task (default: every example not in "
                                          "search, confirm or test).", flag="--calibration-size")
    max_search: int | None = opt(200, "Cap on the search part when binding (it is scored many times).")
    max_test: int | None = opt(300, "Cap on the test part when binding.")
    max_confirm: int | None = opt(400, "Cap on the confirm part when binding.")
    seed: int = opt(0, "Seed of the split's shuffle when binding a task.", flag="--split-seed")

    def __post_init__(self) -> None:
        check_finite(search_size=self.search, test_size=self.test, confirm_size=self.confirm,
                     calibration_size=self.calibration)
        for flag, value in (("--search-size", self.search), ("--test-size", self.test),
                            ("--calibration-size", self.calibration)):
            if value is not None and value <= 0:
                raise InputError(f"split size {flag} must be > 0 (a count, or a fraction below 1), got {value}")
        if self.confirm < 0:
            raise InputError(f"split size --confirm-size must be >= 0 (0: no confirm part), got {self.confirm}")
        for flag, value in (("--max-search", self.max_search), ("--max-test", self.max_test),
                            ("--max-confirm", self.max_confirm)):
            if value is not None and value < 1:
                raise InputError(f"split cap {flag} must be >= 1, got {value}")

    def sizes(self, total: int, calibration_elsewhere: bool = False) -> dict[str, int]:
        """Part sizes for `total` examples; `calibration_elsewhere`: the task calibrates on another
        split, so none of these examples is calibration and the rest joins confirm."""
        test = part_count(self.test, total, self.max_test)
        confirm = part_count(self.confirm, total, self.max_confirm)
        search = part_count(self.search, total, self.max_search)
        rest = total - test - confirm - search
        if calibration_elsewhere:
            calibration = 0
            if confirm > 0 and rest > 0:
                confirm = min(confirm + rest, self.max_confirm if self.max_confirm is not None else total)
        else:
            calibration = rest if self.calibration is None else part_count(self.calibration, total)
        if (min(test, search) < 1 or (calibration < 1 and not calibration_elsewhere)
                or test + confirm + search + calibration > total):
            raise TaskError(
                f"cannot split {total} examples into test {test}, confirm {confirm}, search {search}, calibration "
                f"{calibration}; use smaller split sizes (fractions such as 0.2) or a larger dataset"
            )
        return {"calibration": calibration, "search": search, "confirm": confirm, "test": test}


def part_count(value: float, total: int, cap: int | None = None) -> int:
    """A split size as a count of `total` examples: a count (>= 1, or 0), or a fraction below 1; at most `cap`."""
    n = int(value) if value >= 1 or value == 0 else round(value * total)
    return min(n, cap) if cap is not None else n


@dataclass(frozen=True)
class DiscoverOptions:
    model: str
    dtype: str = dtype_opt("float32")
    device: str = device_opt()

    def __post_init__(self) -> None:
        check_dtype(self.dtype, allow_none=False)
        check_device(self.device)


@dataclass(frozen=True)
class CaptureOptions:
    task: str | None = None  # task YAML; None: the task already bound to the workspace
    tokens: int = opt(200_000, "Calibration tokens to capture (padding excluded).")
    batch_size: int = batch_opt(32)
    seq_len: int = opt(512, "Longer examples are cut into pieces of this many tokens.")
    samples_per_site: int = opt(4096, "Raw input rows kept per site (float16, seeded reservoir).")
    chunk_tokens: int = opt(16_384, "Tokens per resume chunk: the store is flushed after each.")
    seed: int = seed_opt("the reservoir sample of input rows")
    share_prefix: bool = opt(True, "Run a prompt prefix shared by many examples (the few-shot demonstrations) once and "
                                   "count it once per example; --tokens counts the tokens run. Off: every example whole.",
                             flag="--share-prefix/--no-share-prefix")
    device: str = device_opt()
    dtype: str | None = dtype_opt()
    # how the run is laid out in memory, not what comes out (both modes give the same numbers): not recorded
    mode: str = mode_opt("memory (the whole model), blockwise (one decoder block at a time; also fits the output "
                         "method), or auto: blockwise when the in-memory estimate exceeds the memory budget.")
    memory_budget: str | None = budget_opt()
    keep_stats: bool = opt(False, "blockwise: also write the statistics to the capture store, once per block.")

    def __post_init__(self) -> None:
        check_positive(tokens=self.tokens, batch_size=self.batch_size, seq_len=self.seq_len,
                       chunk_tokens=self.chunk_tokens)
        if isinstance(self.samples_per_site, bool) or not isinstance(self.samples_per_site, int) or self.samples_per_site < 0:
            raise InputError(f"--samples-per-site must be 0 or more, got {self.samples_per_site!r}")
        check_device(self.device)
        check_dtype(self.dtype)
        check_memory(self.mode, self.memory_budget)

    def recorded(self) -> dict:
        """What makes the statistics what they are: not the task path (its content is hashed
        upstream), nor how the run was laid out in memory."""
        return {k: v for k, v in asdict(self).items() if k not in ("task", *RUN_LAYOUT)}


@dataclass(frozen=True)
class FitOptions:
    method: str = opt("width", "width (default: a keep order of whole MLP neurons and KV groups, with the "
                               "least-squares refit), output (the exact low-rank pair per matrix), learned (the "
                               "paper's Adam), svd or pca.", short="-m")
    device: str = device_opt()  # where the decompositions and the training run (the model is read on the CPU)
    factor_dtype: str = opt("model", "dtype of the stored factors: model (the model's, default), float32, "
                                     "bfloat16 or float16.")
    # learned only: the kept fractions to train factors for, and how to train them (factorize.TrainSettings)
    levels: tuple[float, ...] = opt(SUMMARY_LEVELS, "learned: kept fractions to train factors for, comma-separated.",
                                    parse=floats("--levels"), show=joined)
    init: str = opt("random", "learned: start from 'random' (the paper) or the 'output' optimum.")
    lr: float = opt(1e-3, "learned: Adam's starting learning rate (the paper's 1e-3; --decays 0 keeps it constant).")
    max_steps: int = opt(5000, "learned: at most this many full-batch Adam steps per rank.")
    tol: float = opt(1e-3, "learned: a plateau is a drop of the best loss below this fraction of it in 100 steps.")
    decays: int = opt(2, "learned: on a plateau divide the rate by 10, this many times; the next plateau stops "
                         "(0: the paper's constant rate).")
    seed: int = seed_opt("learned: initialisation")
    mode: str = mode_opt("memory (load the model), blockwise (read each weight from its file; recompute the "
                         "statistics block by block when capture kept none), or auto: as the memory budget allows.")
    memory_budget: str | None = budget_opt()

    def __post_init__(self) -> None:
        check_memory(self.mode, self.memory_budget)
        if self.method not in FIT_METHODS:
            raise InputError(f"--method must be one of {', '.join(FIT_METHODS)}, got {self.method!r}")
        if self.init not in FIT_INITS:
            raise InputError(f"--init must be one of {', '.join(FIT_INITS)}, got {self.init!r}")
        if self.factor_dtype not in ("model", *DTYPE_NAMES):
            raise InputError(f"--factor-dtype must be model or one of {', '.join(DTYPE_NAMES)}, got {self.factor_dtype!r}")
        if not self.levels or any(not (0 < p < 1) for p in self.levels):
            raise InputError(f"--levels must be kept fractions strictly between 0 and 1, got {list(self.levels)}")
        check_finite(lr=self.lr, tol=self.tol)
        if self.lr <= 0 or self.max_steps < 0 or self.tol < 0 or self.decays < 0:
            raise InputError("--lr must be > 0, and --max-steps, --tol and --decays >= 0")
        check_device(self.device)
        object.__setattr__(self, "levels", tuple(sorted(set(map(float, self.levels)), reverse=True)))

    def recorded(self) -> dict:
        """The options that decide the outputs, for the manifest.

        Training options matter only to `learned`, so changing them does not make the other
        methods stale; the device does not change a float64 closed-form result either.
        """
        if self.method == "learned":
            return {k: v for k, v in asdict(self).items() if k not in RUN_LAYOUT}
        return {"method": self.method, "factor_dtype": self.factor_dtype}


@dataclass(frozen=True)
class GAConfig:
    """The genetic algorithm's knobs; the CLI exposes population, generations, patience, seed."""

    population: int = opt(16, "genetic: candidates per generation; each new one costs one evaluation.")
    generations: int = opt(8, "genetic: at most this many generations after the first; each costs about "
                              "population - 2 evaluations.")
    patience: int = opt(4, "genetic: stop early after this many generations without a better plan.")
    seed: int = seed_opt("the genetic algorithm")
    tournament: int = 3
    elite: int = 2
    crossover_rate: float = 0.9
    mutations: float = 3.0  # expected genes moved per child (at least one always moves)
    # chance a moved gene goes one level down (prune more) rather than up: fitness only ever
    # rewards removal and selection weeds out the children that overshoot, so a lean
    # towards pruning reaches good plans in fewer of the (expensive) evaluations
    prune_bias: float = 0.65

    def __post_init__(self) -> None:
        if self.population < 2 or self.generations < 0 or self.patience < 1:
            raise InputError("--population must be >= 2, --generations >= 0 and --patience >= 1")


@dataclass(frozen=True)
class LocalConfig:
    """The local search's knobs: how many moves one step scores together, and its evaluation budget."""

    moves: int = opt(4, "local: moves scored together per step (one batch); the best acceptable one is taken.",
                     flag="--local-moves")
    budget: int = opt(16, "local: at most this many evaluations after the seeds; it stops earlier after "
                          "--local-patience steps in a row that add nothing.", flag="--local-budget")
    patience: int = opt(2, "local: stop after this many steps in a row without a better plan (a failed step still "
                           "teaches the next one where the limit lies, and proposes repairs).", flag="--local-patience")

    def __post_init__(self) -> None:
        if self.moves < 1 or self.budget < 0 or self.patience < 1:
            raise InputError(f"--local-moves and --local-patience must be >= 1 and --local-budget >= 0, got "
                             f"{self.moves}, {self.patience} and {self.budget}")


@dataclass(frozen=True)
class SearchOptions:
    strategy: str = opt("uniform", "uniform: one kept fraction p for every matrix, binary search (7 evaluations). "
                                   "seeds: uniform, then greedy per-matrix allocations from the fit spectra at "
                                   "8 removals beyond uniform's, scored as one batch (up to +8). local: the seeds, then steps of "
                                   "--local-moves moves from the best plan (+ at most --local-budget). genetic: "
                                   "the seeds' start, then a genetic algorithm (about population x generations). "
                                   f"adaptive: {ADAPTIVE}, the most removal per minute measured "
                                   "(docs/benchmarks.md).", short="-s")
    method: str = opt("width", "Which fit to search over: width (a kept width per MLP and attention module; 0 "
                               "removes it), or output, learned, svd or pca (a rank per matrix).", short="-m")
    uniform_shape: bool = opt(False, "With --method width: search only plans whose MLPs all keep one width and "
                                     "attention modules one number of key/value groups (whole blocks may go), so "
                                     "`sieve apply` writes a standard folder that plain from_pretrained loads.")
    heal_steps: int = opt(0, "Judge the plan healed: after the unhealed search, prune further along its allocation "
                             "while the candidate, healed this many LoRA steps with the `sieve heal` recipe at its "
                             "defaults, stays within the tolerance; confirmed healed. 0: judge unhealed.")
    reference: str = opt("dense", "What the tolerance is measured against: dense (the model as given) or "
                                  "healed-dense (the dense model healed with the same recipe; needs --heal-steps).")
    # how --heal-steps heals (set by `sieve run --heal` to its heal stage's recipe; None: `sieve heal`'s defaults)
    heal_recipe: "HealOptions | None" = None
    tolerance: float = opt(0.05, "Accept a plan whose search-split metric is at least (1 - tolerance) x dense; "
                                 "with --absolute, dense - tolerance.")
    absolute: bool = opt(False, "Read --tolerance in metric units, not as a fraction of dense.")
    levels: tuple[float, ...] = opt(DEFAULT_LEVELS, "seeds, local, genetic: the kept fractions a matrix may take, "
                                    "comma-separated. More levels = finer plans, slower convergence.",
                                    parse=floats("--levels"), show=joined)
    grid_step: float = opt(0.01, "Uniform: grid of p to binary search; 0.01 costs 7 evaluations, 0.05 costs 5.")
    ga: GAConfig = field(default_factory=GAConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    confidence: float = opt(0.9, "A candidate is acceptable when, paired with dense on the same examples, its "
                                 "metric's drop is within the tolerance at this one-sided confidence (0.5: the "
                                 "point estimate). The chosen plan must also hold on the confirm part.")
    allow_chance: bool = opt(False, "Search even when the dense model is not clearly above the task's chance "
                                    "level (a tolerance means nothing there).")
    limit: int | None = limit_opt()
    batch_size: int = batch_opt(16, "Examples per forward pass.")
    device: str = device_opt()
    dtype: str | None = dtype_opt()
    # how the model is laid out in memory, not what comes out: not recorded
    mode: str = mode_opt(SCORING_MODE_HELP)
    memory_budget: str | None = budget_opt()
    # where candidates are scored (the same plan and history either way): not recorded
    workers: int = opt(1, "Score each batch of new candidates (a GA generation, a local step's moves, the seeds) on "
                          "this many Ray workers at once, each "
                          "holding the model (needs Ray: the `distributed` extra of sieve-cli). 1: in this "
                          "process, without Ray.")
    worker_threads: int = opt(1, "With --workers: torch threads (and Ray CPUs) per worker.")
    ray_address: str | None = opt(None, "With --workers: the Ray cluster to use (host:port of its head, ray://"
                                        "host:10001, or auto); every node must see the workspace at the same path. "
                                        "Default: start Ray on this machine.")

    def __post_init__(self) -> None:
        check_memory(self.mode, self.memory_budget)
        if self.strategy not in STRATEGIES:
            raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.method not in FIT_METHODS:
            raise InputError(f"--method must be one of {', '.join(FIT_METHODS)}, got {self.method!r}")
        if self.heal_steps < 0:
            raise InputError(f"--heal-steps must be >= 0, got {self.heal_steps}")
        if self.reference not in REFERENCES:
            raise InputError(f"--reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.reference == "healed-dense" and not self.heal_steps:
            raise InputError("--reference healed-dense compares healed plans: give --heal-steps N (N > 0)")
        if self.heal_steps and (self.workers > 1 or self.mode == "blockwise"):
            raise InputError("--heal-steps heals each judged candidate in this process on the whole model: drop "
                             "--workers and --mode blockwise")
        if self.uniform_shape and self.method != "width":
            raise InputError(f"--uniform-shape needs --method width (a shape is a width per module), got "
                             f"--method {self.method}")
        check_finite(tolerance=self.tolerance, confidence=self.confidence)
        if not 0.5 <= self.confidence < 1:
            raise InputError(f"--confidence must be in [0.5, 1), got {self.confidence}")
        if not 0 <= self.tolerance < (float("inf") if self.absolute else 1):
            raise InputError(f"--tolerance must be >= 0 (and < 1 unless --absolute), got {self.tolerance}")
        if not self.levels or any(not (0 < p <= 1) for p in self.levels):
            raise InputError(f"--levels must be kept fractions in (0, 1], got {list(self.levels)}")
        if not 0 < self.grid_step < 1:
            raise InputError(f"--grid-step must be in (0, 1), got {self.grid_step}")
        check_positive(batch_size=self.batch_size, workers=self.workers, worker_threads=self.worker_threads)
        if self.ray_address is not None and self.workers < 2:
            raise InputError(f"--ray-address {self.ray_address} is used only with --workers 2 or more")
        check_device(self.device)
        check_dtype(self.dtype)
        object.__setattr__(self, "limit", no_limit(self.limit))
        # dense is always a level: the GA can leave a matrix untouched
        object.__setattr__(self, "levels", tuple(sorted(set(map(float, self.levels)) | {1.0}, reverse=True)))

    @property
    def algorithm(self) -> str:
        """The strategy that runs: `adaptive` is ADAPTIVE."""
        return ADAPTIVE if self.strategy == "adaptive" else self.strategy

    def recorded(self) -> dict:
        """The options that decide the plan, for the manifest.

        Each strategy records only the knobs it reads (the GA's do not change a local plan, the
        levels not a uniform one), so changing another strategy's knob never makes it stale; nor does
        scoring on workers (a search may resume on more or fewer of them).
        """
        options = {k: v for k, v in asdict(self).items() if k not in (*RUN_LAYOUT, *SEARCH_POOL)}
        if self.strategy == "adaptive":  # a later default is another question
            options["algorithm"] = self.algorithm
        unused = {"uniform": ("levels", "ga", "local"), "seeds": ("ga", "local"), "local": ("ga",),
                  "genetic": ("local",)}[self.algorithm]
        for name in unused:
            options.pop(name)
        if self.heal_recipe is not None:
            options["heal_recipe"] = self.heal_recipe.recorded()
        for name, default in (("uniform_shape", False), ("heal_steps", 0), ("reference", "dense"),
                              ("heal_recipe", None)):
            if options[name] == default:  # recorded only when set: plans searched before these options stay current
                options.pop(name)
        return options


@dataclass(frozen=True)
class ApplyOptions:
    out: Path
    plan: Path | None = opt(None, "Plan file to execute instead of WS/search/plan.json.")
    dtype: str = dtype_opt("float32")
    dry_run: bool = opt(False, "Print the numbers predicted from the plan; write nothing.")
    # 1.0 (default) factors every planned matrix, so the model is as small as the plan says;
    # DENSE_ABOVE trades the size saving of barely-pruned matrices for dense speed.
    dense_above: float = opt(1.0, "Store a planned matrix as the dense product B·A when it keeps more than this "
                                  f"fraction (same function, dense size, dense speed); {DENSE_ABOVE} is the CPU "
                                  "speed crossover (docs/benchmarks.md). Default 1: factor every planned matrix.")
    healed: bool = opt(False, "Build the model from the factors `sieve heal` trained (LoRA merged in) instead of "
                              "the fitted ones: the same parameter count and file size.")
    quantize: str | None = quantize_opt()
    vocab: str = opt("full", "Token ids the LM head scores: full (the whole vocabulary), or task: the ids of the "
                             "task's calibration, few-shot and choice texts, the special ids and --vocab-extra "
                             "lowest others; the others get a very negative logit, so generation never emits them. "
                             "An untied head loses its other rows; a tied head stays whole (compute only).")
    vocab_extra: int = opt(VOCAB_EXTRA, "With --vocab task: how many of the lowest other ids (a BPE tokenizer's "
                                        "bytes and most frequent merges) the head also keeps.")

    def __post_init__(self) -> None:
        check_dtype(self.dtype, allow_none=False)
        check_finite(dense_above=self.dense_above)
        check_quantize(self.quantize)
        if not 0.0 < self.dense_above <= 1.0:
            raise InputError(f"--dense-above must be in (0, 1], got {self.dense_above}; 1 factors every planned matrix")
        if self.vocab not in VOCAB_MODES:
            raise InputError(f"--vocab {self.vocab!r} is not a vocabulary mode; choose one of: {', '.join(VOCAB_MODES)}")
        if self.vocab_extra < 0:
            raise InputError(f"--vocab-extra must be >= 0, got {self.vocab_extra}")
        if self.vocab == "task" and self.quantize is not None:
            raise InputError("--vocab task and --quantize cannot be combined yet; apply one of them")

    def recorded(self) -> dict:
        """The options that decide the output (a dry run writes nothing, so it is not one)."""
        options = asdict(self)
        options.pop("dry_run")
        if self.vocab == "full":  # the default leaves the inputs as they were before --vocab existed
            options.pop("vocab")
            options.pop("vocab_extra")
        options["out"] = str(resolved(self.out))
        options["plan"] = str(resolved(self.plan)) if self.plan else None
        return options


@dataclass(frozen=True)
class HealOptions:
    """`sieve heal`: LoRA fine-tuning of the plan's factored model on the calibration part only."""

    steps: int = opt(60, "Optimiser steps (each one batch of calibration sequences).")
    lr: float = opt(1e-3, "AdamW learning rate of the LoRA adapters (constant).")
    loss: str = opt("ce", "ce: next-token cross-entropy on the rendered calibration text, gold answers included "
                          "(supervised on labelled task data); distill: match the dense model's next-token "
                          "distribution (KL) at every position. Measured: docs/benchmarks.md.")
    rank: int = opt(8, "LoRA rank of each adapter.", flag="--lora-rank")
    alpha: float = opt(16.0, "LoRA alpha: the adapter's update is scaled by alpha / rank.", flag="--lora-alpha")
    batch_size: int = batch_opt(4, "Calibration sequences per step.")
    seq_len: int = opt(256, "Longer calibration examples are cut into pieces of this many tokens.")
    checkpoint_every: int = opt(20, "Save the adapters and the optimiser state every N steps (a killed run "
                                    "resumes from there to the same result).")
    seed: int = seed_opt("adapter initialisation and the order of the calibration batches")
    device: str = device_opt()
    dtype: str | None = dtype_opt()

    def __post_init__(self) -> None:
        check_positive(steps=self.steps, lora_rank=self.rank, batch_size=self.batch_size, seq_len=self.seq_len,
                       checkpoint_every=self.checkpoint_every)
        check_finite(lr=self.lr, lora_alpha=self.alpha)
        if self.lr <= 0 or self.alpha <= 0:
            raise InputError(f"--lr and --lora-alpha must be > 0, got {self.lr} and {self.alpha}")
        if self.loss not in HEAL_LOSSES:
            raise InputError(f"--loss must be one of {', '.join(HEAL_LOSSES)}, got {self.loss!r}")
        check_device(self.device)
        check_dtype(self.dtype)

    def recorded(self) -> dict:
        """What decides the healed factors: not how often they are checkpointed on the way."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}


def heal_recipe_with(recipe: HealOptions | None, steps: int, device: str, dtype: str | None) -> HealOptions:
    """The heal a search candidate or the dense reference gets: `recipe` (`sieve run --heal`'s heal stage), else
    `sieve heal`'s defaults on this device and dtype, with `steps` steps: what `sieve heal --steps` rebuilds."""
    return replace(recipe or HealOptions(device=device, dtype=dtype), steps=steps)


@dataclass(frozen=True)
class EvalOptions:
    split: str = opt("test", "Split part to score: test (reported numbers) or search.")
    limit: int | None = limit_opt()
    model: str | None = opt(None, "A pruned model folder from `sieve apply` (or any model folder); "
                                  "default: the workspace's dense model.")
    batch_size: int = batch_opt(16)
    max_length: int = opt(1024, "Longest sequence in tokens; longer contexts lose their beginning.")
    device: str = device_opt()
    dtype: str | None = dtype_opt()
    mode: str = mode_opt(SCORING_MODE_HELP)
    memory_budget: str | None = budget_opt()
    heal_dense: int = opt(0, "Score the workspace's dense model healed this many LoRA steps by the `sieve heal` "
                             "recipe at its defaults: the reference a healed plan is compared with. 0: as given.")
    heal_recipe: "HealOptions | None" = None  # set by `sieve run --heal` to its heal stage's recipe

    def __post_init__(self) -> None:
        check_memory(self.mode, self.memory_budget)
        if self.heal_dense < 0:
            raise InputError(f"--heal-dense must be >= 0, got {self.heal_dense}")
        if self.heal_dense and (self.model is not None or self.mode == "blockwise"):
            raise InputError("--heal-dense heals the workspace's dense model in memory: drop --model and "
                             "--mode blockwise")
        if self.split not in EVAL_PARTS:
            raise InputError(f"--split {self.split!r} is not a split part; use test or search")
        check_positive(batch_size=self.batch_size, max_length=self.max_length)
        check_device(self.device)
        check_dtype(self.dtype)
        object.__setattr__(self, "limit", no_limit(self.limit))

    def recorded(self) -> dict:
        """What decides the result: not how the model was laid out in memory (the scores agree)."""
        options = {k: v for k, v in asdict(self).items() if k not in RUN_LAYOUT}
        if not self.heal_dense:  # recorded only when set: results stored before the option stay current
            options.pop("heal_dense")
        if self.heal_recipe is None or not self.heal_dense:
            options.pop("heal_recipe")
        else:
            options["heal_recipe"] = self.heal_recipe.recorded()
        return options


@dataclass(frozen=True)
class ReportOptions:
    output: Path | None = opt(None, "The HTML file to write (default WS/report/report.html).", flag="--out",
                              short="-o")
    dpi: int = opt(110, "Resolution of the PNG figures.")

    def __post_init__(self) -> None:
        if not 30 <= self.dpi <= 600:
            raise InputError(f"--dpi must be between 30 and 600, got {self.dpi}")
        if self.output is not None and Path(self.output).suffix.lower() not in {".html", ".htm"}:
            raise InputError(f"--out must name an .html file, got {self.output}")


@dataclass(frozen=True)
class RunOptions:
    """`sieve run`: every stage's options; device and dtype flow into each stage."""

    model: str = ""  # hub id, local folder or .gguf file
    task: str | None = None  # None: the task already bound to the workspace
    workspace: Path = field(default_factory=default_workspace)
    out: Path = Path("pruned")
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    fit: FitOptions = field(default_factory=FitOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    split: SplitOptions = field(default_factory=SplitOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    heal: HealOptions | None = None  # None: no healing; else `sieve heal` between search and apply
    healed_out: Path | None = None  # where the healed model goes (default: OUT-healed beside OUT)
    apply_dtype: str = "float32"
    data_root: str | None = None
    device: str = device_opt()
    dtype: str = dtype_opt("float32")
    quantize: str | None = quantize_opt()  # passed to apply: the pruned model is written (and evaluated) quantised
    mode: str = mode_opt("For every stage: memory (the whole model, on one device or spread over the GPUs and "
                         "host memory), blockwise (one decoder block at a time), or auto: as the memory budget allows.")
    memory_budget: str | None = budget_opt()

    def __post_init__(self) -> None:
        check_device(self.device)
        check_dtype(self.dtype, allow_none=False)
        check_quantize(self.quantize)
        check_memory(self.mode, self.memory_budget)
        # one device, layout and budget for every stage (the dtype reaches them through discover, whose
        # dtype is each stage's default), and search truncates the fit it made
        layout = dict(device=self.device, mode=self.mode, memory_budget=self.memory_budget)
        for name in ("capture", "fit", "search", "eval"):
            object.__setattr__(self, name, replace(getattr(self, name), **layout))
        object.__setattr__(self, "search", replace(self.search, method=self.fit.method))
        if self.heal is not None:  # the search judges candidates healed by the recipe the heal stage runs
            object.__setattr__(self, "heal", replace(self.heal, device=self.device))
            object.__setattr__(self, "search", replace(self.search, heal_steps=self.heal.steps, heal_recipe=self.heal))

    @property
    def healed_folder(self) -> Path:
        return self.healed_out if self.healed_out is not None else Path(self.out).with_name(Path(self.out).name + "-healed")


def resolved(path: Path | str) -> Path:
    return Path(path).expanduser().resolve()


def cli_fields(cls: type) -> list:
    """The fields of an options dataclass that the CLI exposes (those declared with `opt`)."""
    return [f for f in fields(cls) if "help" in f.metadata]
