"""Scorers: an allocation (rank or width per target) -> its metric on a split part of the task.

The search's evaluator builders, apart from its strategies: the model in memory with each candidate's
modules swapped in and out, a healed copy of each candidate (`--heal-steps`), the model streamed block by
block, or a pool of Ray workers each holding the model (`pool.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from .acceptance import Measurement
from .discover import check_model_unchanged, load_workspace_model, workspace_model_source
from .evaluate import evaluate, prepare, stream_evaluate
from .factors import FactorSet, StoredFactors
from .fit import load_factors
from .heal import heal_inputs, healed_copy, healed_dense_model
from .models import load_tokenizer, safetensors_folder, torch_dtype
from .options import HealOptions, SearchOptions, heal_recipe_with
from .plan import Ranks
from .pool import WorkerPool
from .pruned import prune_in_memory
from .streaming import choose_layout, open_streaming
from .tasks import bind_task
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)


# ---- the scorer: ranks -> metric on a split part ---------------------------------------------
@dataclass
class Scorer:
    """Scores one allocation (matrix name -> rank, None = dense) on a split part.

    `score` returns a `Measurement` (with per-example scores, so candidates are judged paired
    with dense) or a bare float (a user's metric: judged on its point value). `metric` is the
    metric's name; a scorer may fill it in on its first call.
    """

    score: Callable[[Ranks], "Measurement | float"]
    metric: str = "metric"
    examples: int | None = None
    # scores a batch of allocations at once (a pool of workers); None: one after another
    score_many: Callable[[list[Ranks]], "list[Measurement | float]"] | None = None
    layout: dict | None = None  # how the model is held (streaming.Layout.note), for the stage's summary

    def __call__(self, ranks: Ranks) -> Measurement:
        return as_measurement(self.score(ranks))

    def many(self, batch: list[Ranks]) -> list[Measurement]:
        """Measurements of `batch`, in its order: the seam where a pool of workers takes over."""
        if self.score_many is None or len(batch) < 2:
            return [self(ranks) for ranks in batch]
        return [as_measurement(r) for r in self.score_many(batch)]


def as_measurement(result) -> Measurement:
    return result if isinstance(result, Measurement) else Measurement(float(result))


def swapping_scorer(model, factors: FactorSet, measure: Callable[[object], "Measurement | float"],
                    metric: str = "metric") -> Scorer:
    """A scorer that swaps each candidate's factors into `model`, measures it, and restores it."""

    def score(ranks: Ranks) -> Measurement | float:
        restore = prune_in_memory(model, ranks, factors)
        try:
            return measure(model)
        finally:
            restore()

    return Scorer(score=score, metric=metric)


def measurement(result) -> Measurement:
    """An evaluator result as the acceptance rule reads it."""
    extra = {k: result.extra[k] for k in ("chance", "majority") if k in result.extra}
    return Measurement(result.value, tuple(result.per_example), tuple(result.weights), tuple(result.soft),
                       extra | {"ci_low": result.ci_low, "n": result.n})


def build_scorers(ws: Workspace, options: SearchOptions, factors: FactorSet,
                  cleanup: ExitStack | None = None) -> tuple[Scorer, Scorer | None]:
    """Scorers of the search and confirm parts: in this process (`local_scorers`), or with
    `options.workers` > 1 on a pool of Ray workers (each running `local_scorers`) that `cleanup` closes."""
    if options.workers > 1:
        if cleanup is None:
            raise ValueError("a pool of workers needs an ExitStack to close it")
        return pooled_scorers(ws, options, cleanup)
    return local_scorers(ws, options, factors)


def local_scorers(ws: Workspace, options: SearchOptions, factors: FactorSet,
                  healed: bool = False) -> tuple[Scorer, Scorer | None]:
    """Scorers of the search and confirm parts, sharing one model; each call swaps factors in and out
    (`healed`: scores a healed copy of each candidate instead, `healing_evaluator`).

    The model is loaded whole on the device, spread over the devices, or streamed block by block
    (each candidate's factors swapped into each block while it is loaded), as `--mode` and the
    memory budget decide (`streaming.choose_layout`; the estimate is logged).
    """
    bound = bind_task(ws, None)
    tokenizer = load_tokenizer(workspace_model_source(ws))
    parts = {"search": prepare(bound, "search", tokenizer, limit=options.limit)}
    if bound.ids("confirm"):
        parts["confirm"] = prepare(bound, "confirm", tokenizer)
    dtype = options.dtype or ws.require(Stage.DISCOVER)["inputs"]["options"]["dtype"]
    layout = choose_layout(ws, options.mode, options.memory_budget, options.device, dtype, list(parts.values()),
                           options.batch_size, "search", factors=True)
    evaluator = (healing_evaluator(ws, options, factors, layout.max_memory) if healed
                 else streaming_evaluator(ws, options, factors, dtype, layout.tier) if layout.mode == "blockwise"
                 else swapping_evaluator(ws, options, factors, layout.max_memory))

    def scorer_for(prepared) -> Scorer:
        run = evaluator(prepared)

        def score(ranks: Ranks) -> Measurement:
            result = run(ranks)
            scorer.metric, scorer.examples = result.metric, result.n
            return measurement(result)

        scorer = Scorer(score=score, layout=layout.note())
        return scorer

    confirm = scorer_for(parts["confirm"]) if "confirm" in parts else None
    return scorer_for(parts["search"]), confirm


def swapping_evaluator(ws: Workspace, options: SearchOptions, factors: FactorSet, max_memory: dict | None):
    """prepared -> (ranks -> EvalResult) on the whole model (one device, or spread by `max_memory`)."""
    model, _ = load_workspace_model(ws, options.dtype, options.device, max_memory)
    if isinstance(factors, StoredFactors):  # each matrix's factors cross to the device once, then are sliced
        factors.keep_on(options.device, next(model.parameters()).dtype)

    def evaluator(prepared):
        def run(ranks: Ranks):
            restore = prune_in_memory(model, ranks, factors)
            try:
                return evaluate(model, prepared, batch_size=options.batch_size, show_progress=False)
            finally:
                restore()

        return run

    return evaluator


def heal_recipe(options: SearchOptions) -> HealOptions:
    """How `--heal-steps` heals a candidate: `sieve heal` at its defaults with that many steps (or, from
    `sieve run --heal`, its heal stage's recipe), so the heal stage rebuilds the very model the search judged."""
    return heal_recipe_with(options.heal_recipe, options.heal_steps, options.device, options.dtype)


def healing_evaluator(ws: Workspace, options: SearchOptions, factors: FactorSet, max_memory: dict | None):
    """prepared -> (ranks -> EvalResult) of the candidate healed (`heal.healed_copy`); the dense
    allocation is the dense model as given, or with `--reference healed-dense` the dense model healed."""
    model, tokenizer = load_workspace_model(ws, options.dtype, options.device, max_memory)
    recipe = heal_recipe(options)
    inputs = heal_inputs(ws, tokenizer, recipe)
    healed_dense: list = []  # the healed dense copy, made once

    def healed(ranks: Ranks):
        if any(r is not None for r in ranks.values()):
            return healed_copy(model, ranks, factors, recipe, *inputs)
        if options.reference == "dense":
            return model
        if not healed_dense:
            healed_dense.append(healed_dense_model(ws, model, tokenizer, recipe, inputs))
        return healed_dense[0]

    def evaluator(prepared):
        def run(ranks: Ranks):
            return evaluate(healed(ranks), prepared, batch_size=options.batch_size, show_progress=False)

        return run

    return evaluator


def streaming_evaluator(ws: Workspace, options: SearchOptions, factors: FactorSet, dtype: str, tier: str):
    """prepared -> (ranks -> EvalResult), streaming the model block by block for every candidate."""
    source = check_model_unchanged(ws)["inputs"]["options"]["model"]
    runner = open_streaming(safetensors_folder(source), torch_dtype(dtype), options.device)
    if isinstance(factors, StoredFactors):
        factors.cache = False  # hold no factors between candidates: one block's at a time, read per candidate
    scratch = ws.stage_dir(Stage.SEARCH)
    scratch.mkdir(parents=True, exist_ok=True)

    def evaluator(prepared):
        def run(ranks: Ranks):
            return stream_evaluate(runner, prepared, options.batch_size, show_progress=False, ranks=ranks,
                                   factors=factors, tier=tier, folder=scratch)

        return run

    return evaluator


def worker_jobs(root: str, options: SearchOptions) -> dict[str, Callable[[Ranks], tuple]]:
    """What each pool worker builds once (the model, the factors, the tokenised parts) and then runs
    per candidate: part -> ranks -> (measurement, metric name, examples)."""
    ws = Workspace(root)
    search, confirm = local_scorers(ws, options, load_factors(ws, options.method))
    scorers = {"search": search} | ({"confirm": confirm} if confirm is not None else {})

    def job(scorer: Scorer) -> Callable[[Ranks], tuple]:
        return lambda ranks: (scorer.score(ranks), scorer.metric, scorer.examples)

    return {part: job(scorer) for part, scorer in scorers.items()}


def pooled_scorers(ws: Workspace, options: SearchOptions, cleanup: ExitStack) -> tuple[Scorer, Scorer | None]:
    """The search and confirm scorers on a pool of Ray workers: a batch is scored in parallel, in its order."""
    pool = cleanup.enter_context(WorkerPool.start(worker_jobs, (str(ws.root), options), options.workers,
                                                  options.worker_threads, options.ray_address))
    layout = {"workers": options.workers, "worker_threads": options.worker_threads,
              "ray_address": options.ray_address}

    def scorer_on(part: str) -> Scorer:
        def many(batch: list[Ranks]) -> list[Measurement | float]:
            results = pool.map(part, batch)
            scorer.metric, scorer.examples = results[-1][1], results[-1][2]
            return [m for m, _, _ in results]

        scorer = Scorer(score=lambda ranks: many([ranks])[0], score_many=many, layout=layout)
        return scorer

    return scorer_on("search"), scorer_on("confirm") if "confirm" in pool.jobs else None
