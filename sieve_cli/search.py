"""Stage 4, search: how much of each matrix to keep, judged by the task metric on the search split.

Uses the fitted bases by truncation only (no refit): a candidate is a rank per matrix,
swapped into one in-memory model and scored on the search split. `uniform` binary
searches one kept fraction for every matrix; `adaptive` runs the genetic algorithm of
`genetic.py`, seeded with the uniform answer and with greedy allocations from the fit
spectra. Writes `WS/search/plan.json` (what `apply` executes) and `history.jsonl` (every
evaluation). The adaptive search checkpoints after each generation and resumes exactly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from . import progress
from .errors import InputError, MissingStageError
from .factors import FactorSet
from .genetic import (
    DEFAULT_LEVELS,
    GAConfig,
    GenerationReport,
    Problem,
    acceptance_threshold,
    binary_search,
    genetic_search,
    greedy_seeds,
    is_acceptable,
    levels_with,
    uniform_grid,
)
from .lowrank import fraction_for_rank, lowrank_params, rank_for_fraction
from .workspace import Workspace, read_json, write_json_atomic

log = logging.getLogger(__name__)

STAGE = "search"
STRATEGIES = ("uniform", "adaptive")
PLAN_SCHEMA = 1
# Greedy seeds at the uniform answer's removal and a few steps beyond it: the GA starts
# from allocations that are as lean as uniform, and from leaner ones it can back off from.
GREEDY_STEPS = (0.0, 0.02, 0.05, 0.1, 0.2)

Ranks = dict[str, "int | None"]


@dataclass(frozen=True)
class SearchOptions:
    strategy: str = "uniform"
    method: str = "output"  # which fit's bases to truncate
    tolerance: float = 0.05
    absolute: bool = False  # tolerance in metric units instead of a fraction of dense
    levels: tuple[float, ...] = DEFAULT_LEVELS  # adaptive: kept fractions a gene may take
    grid_step: float = 0.01  # uniform: the binary search grid (0.01 -> 7 evaluations)
    population: int = 16
    generations: int = 8
    patience: int = 4  # adaptive: stop after this many generations without progress
    seed: int = 0
    limit: int | None = 200  # search-split examples scored per evaluation (None: all)
    batch_size: int = 16
    device: str = "cpu"
    dtype: str | None = None  # None: the dtype discover loaded the model with

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not 0 <= self.tolerance < (float("inf") if self.absolute else 1):
            raise InputError(f"--tolerance must be >= 0 (and < 1 unless --absolute), got {self.tolerance}")
        if not self.levels or any(not (0 < p <= 1) for p in self.levels):
            raise InputError(f"--levels must be kept fractions in (0, 1], got {list(self.levels)}")
        if not 0 < self.grid_step < 1:
            raise InputError(f"--grid-step must be in (0, 1), got {self.grid_step}")
        if self.population < 2 or self.generations < 0 or self.patience < 1:
            raise InputError("--population must be >= 2, --generations >= 0 and --patience >= 1")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        # dense is always a level: the GA can leave a matrix untouched
        object.__setattr__(self, "levels", tuple(sorted(set(map(float, self.levels)) | {1.0}, reverse=True)))

    def recorded(self) -> dict:
        """The options that decide the plan, for the manifest.

        The GA's knobs do not change a uniform plan, so changing them does not make it stale.
        """
        options = asdict(self)
        if self.strategy == "uniform":
            for key in ("levels", "population", "generations", "patience", "seed"):
                options.pop(key)
        return options

    def ga_config(self) -> GAConfig:
        return GAConfig(population=self.population, generations=self.generations,
                        patience=self.patience, seed=self.seed)


# ---- the scorer: ranks -> metric on the search split --------------------------------------
@dataclass
class Scorer:
    """Scores one allocation (matrix name -> rank, None = dense) on the search split.

    `metric` is the metric's name; a scorer may fill it in on its first call.
    """

    score: Callable[[Ranks], float]
    metric: str = "metric"
    examples: int | None = None

    def __call__(self, ranks: Ranks) -> float:
        return self.score(ranks)


def build_scorer(ws: Workspace, options: SearchOptions, factors: FactorSet) -> Scorer:
    """Load the model once, tokenise the search split once; each call swaps factors in and out."""
    from .discover import load_workspace_model
    from .evaluate import evaluate, prepare
    from .pruned import prune_in_memory
    from .tasks import bind_task

    model, tokenizer = load_workspace_model(ws, options.dtype, options.device)
    prepared = prepare(bind_task(ws, None), "search", tokenizer, limit=options.limit)

    def score(ranks: Ranks) -> float:
        restore = prune_in_memory(model, {"matrices": {n: {"rank": r} for n, r in ranks.items()}}, factors)
        try:
            result = evaluate(model, prepared, batch_size=options.batch_size, show_progress=False)
        finally:
            restore()
        scorer.metric, scorer.examples = result.metric, result.n
        return float(result.value)

    scorer = Scorer(score=score)
    return scorer


# ---- the matrices and their ranks at each level -------------------------------------------
@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    block: int
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


def read_targets(ws: Workspace) -> tuple[list[Target], int]:
    """The prunable matrices recorded by discover, and the model's total parameter count."""
    found = read_json(ws.matrices_json)
    targets = [Target(m["name"], m["kind"], m["block"], m["out_features"], m["in_features"]) for m in found["matrices"]]
    return targets, int(found["total_params"])


def rank_at(target: Target, kept: float, factors: FactorSet) -> int | None:
    """The rank that keeps at most `kept` of the matrix, limited to what the fit provides.

    A `learned` fit has only its trained ranks: take the largest of them within `kept`
    (the smallest if none is), so the plan's parameter counts stay honest.
    """
    rank = rank_for_fraction(kept, target.out_features, target.in_features)
    if rank is None:
        return None
    available = factors.ranks(target.name)
    if available is None:
        return min(rank, factors.max_rank(target.name))
    below = [r for r in available if r <= rank]
    return max(below) if below else min(available)


def ranks_for(targets: list[Target], kept: list[float], factors: FactorSet) -> Ranks:
    return {t.name: rank_at(t, p, factors) for t, p in zip(targets, kept, strict=True)}


def params_after(targets: list[Target], ranks: Ranks) -> int:
    return sum(lowrank_params(ranks[t.name], t.out_features, t.in_features) for t in targets)


# ---- evaluation bookkeeping: memo, history, checkpoint -------------------------------------
class Evaluations:
    """Every evaluation goes through here: memoised by ranks, appended to history.jsonl.

    On resume, the history already on disk (including evaluations made after the last
    checkpoint) fills the memo, so nothing is scored twice and nothing is logged twice.
    """

    def __init__(self, ws: Workspace, scorer: Scorer, targets: list[Target], factors: FactorSet,
                 resume: bool) -> None:
        self.ws, self.scorer, self.targets, self.factors = ws, scorer, targets, factors
        self.total = sum(t.params for t in targets)
        self.memo: dict[tuple, float] = {}
        self.threshold: float | None = None
        self.scored = 0  # evaluations actually run in this process
        if resume and ws.history_jsonl.exists():
            for line in ws.history_jsonl.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    kept = entry["genome"] if entry.get("genome") is not None else [entry["p"]] * len(targets)
                    self.memo[self.key(ranks_for(targets, kept, factors))] = entry["metric"]

    def key(self, ranks: Ranks) -> tuple:
        return tuple(ranks[t.name] for t in self.targets)

    def metric(self, kept: list[float], record: dict) -> float:
        ranks = ranks_for(self.targets, kept, self.factors)
        key = self.key(ranks)
        if key in self.memo:
            return self.memo[key]
        value = float(self.scorer(ranks))
        self.memo[key] = value
        self.scored += 1
        after = params_after(self.targets, ranks)
        entry = {**record, "metric": value, "params_after": after, "removed_fraction": 1 - after / self.total,
                 "acceptable": True if self.threshold is None else is_acceptable(value, self.threshold)}
        with open(self.ws.history_jsonl, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return value


# ---- the stage ----------------------------------------------------------------------------
@dataclass
class Outcome:
    kept: list[float]  # per target
    metric: float
    extra: dict = field(default_factory=dict)


def run_search(ws: Workspace, options: SearchOptions, force: bool = False, scorer: Scorer | None = None,
               on_generation: Callable[[GenerationReport, float], None] | None = None) -> dict:
    """Search a plan and write plan.json + history.jsonl; returns the plan.

    `scorer` replaces the real evaluator (tests, custom metrics); `on_generation(report,
    seconds)` is called after each GA generation. Re-running with unchanged inputs does
    nothing and returns the plan on disk; an interrupted run with the same inputs resumes.
    """
    from .fit import load_factors

    inputs = {"options": options.recorded(),
              "upstream": ws.upstream_hashes("discover", "task", ws.fit_stage(options.method))}
    resume = ws.resumable(STAGE, inputs)
    if not ws.begin(STAGE, inputs, force):
        log.info("search is up to date in %s; nothing to do (--force searches again)", ws.root)
        return {**read_json(ws.plan_json), "up_to_date": True}
    if not resume:
        for stale in (ws.plan_json, ws.history_jsonl, ws.search_checkpoint):
            stale.unlink(missing_ok=True)
    started = time.perf_counter()
    targets, model_total = read_targets(ws)
    factors = load_factors(ws, options.method)
    checkpoint = read_json(ws.search_checkpoint) if resume and ws.search_checkpoint.exists() else {}
    if scorer is None:
        scorer = build_scorer(ws, options, factors)
    evals = Evaluations(ws, scorer, targets, factors, resume)

    dense = checkpoint.get("dense")
    if dense is None:  # the dense model is scored once and kept in the checkpoint
        dense = evals.metric([1.0] * len(targets), {"strategy": options.strategy, "generation": None, "p": 1.0})
        checkpoint = {"dense": dense, "metric": scorer.metric, "examples": scorer.examples}
        write_json_atomic(ws.search_checkpoint, checkpoint)
    scorer.metric, scorer.examples = checkpoint["metric"], checkpoint["examples"]
    evals.threshold = acceptance_threshold(dense, options.tolerance, options.absolute)
    log.info("dense %s on the search split: %.4f; acceptable from %.4f", scorer.metric, dense, evals.threshold)

    uniform = search_uniform(evals, options, targets)
    if options.strategy == "uniform":
        outcome = Outcome([uniform.p] * len(targets), dense if uniform.metric is None else uniform.metric,
                          {"uniform_p": uniform.p})
    else:
        outcome = search_adaptive(ws, evals, options, targets, factors, uniform, checkpoint, on_generation)
    ranks = ranks_for(targets, outcome.kept, factors)
    outcome.extra.update(evaluations=len(evals.memo), evaluated_now=evals.scored,
                         seconds=round(time.perf_counter() - started, 1), limit=options.limit,
                         examples=scorer.examples)
    plan = build_plan(options, targets, ranks, model_total, scorer.metric, dense, outcome)
    write_json_atomic(ws.plan_json, plan)
    ws.search_checkpoint.unlink(missing_ok=True)
    ws.finish(STAGE, inputs, [ws.plan_json, ws.history_jsonl], summary=summarise(plan))
    return plan


def search_uniform(evals: Evaluations, options: SearchOptions, targets: list[Target]):
    grid = uniform_grid(options.grid_step)
    record = lambda p: {"strategy": "uniform", "generation": None, "p": p}  # noqa: E731
    with progress.bar("uniform search", total=len(grid).bit_length()) as b:
        def metric_at(p: float) -> float:
            value = evals.metric([p] * len(targets), record(p))
            b.advance()
            b.note(f"p={p:.2f} {evals.scorer.metric}={value:.4f}")
            return value

        result = binary_search(grid, metric_at, evals.threshold)
    log.info("uniform: keep p=%.2f of every matrix (%s=%s) after %d evaluations",
             result.p, evals.scorer.metric, result.metric, len(result.trials))
    return result


def spectrum_errors(ws: Workspace, options: SearchOptions, targets: list[Target], levels: list[float],
                    factors: FactorSet) -> list[list[float]] | None:
    """Relative output error of each matrix at each level, from the fit spectra, for the greedy seed.

    A `learned` fit records errors only at its trained ranks; the exact `output` spectrum
    (when fitted) stands in, else the greedy seeds are skipped.
    """
    from .fit import load_spectrum

    for method in dict.fromkeys((options.method, "output")):
        try:
            spectrum = load_spectrum(ws, method)
        except (InputError, MissingStageError):  # no such fit in this workspace: try the next
            continue
        errors = []
        for t in targets:
            row = []
            for level in levels:
                rank = rank_at(t, level, factors)
                curve = spectrum[t.name]
                row.append(0.0 if rank is None else curve[min(rank, len(curve) - 1)])
            errors.append(row)
        if all(e is not None for row in errors for e in row):
            return errors
    log.warning("no complete error spectrum for the %s fit: the GA starts without greedy seeds", options.method)
    return None


def search_adaptive(ws, evals: Evaluations, options: SearchOptions, targets, factors, uniform, checkpoint,
                    on_generation) -> Outcome:
    levels = levels_with(options.levels, uniform.p)
    kept = [[lowrank_params(rank_at(t, p, factors), t.out_features, t.in_features) for p in levels] for t in targets]
    problem = Problem(kept=kept, total=evals.total, threshold=evals.threshold)
    seeds = [[levels.index(uniform.p)] * len(targets)]
    errors = spectrum_errors(ws, options, targets, levels, factors)
    if errors is not None:
        removal = problem.removed(seeds[0])
        seeds += greedy_seeds(errors, kept, evals.total, [min(0.95, removal + d) for d in GREEDY_STEPS])

    state = checkpoint.get("ga")
    current = {"generation": 0 if state is None else state["generation"] + 1}  # the one being scored

    def evaluate(genomes):
        return [evals.metric([levels[g] for g in genome], {"strategy": "adaptive", "generation": current["generation"],
                                                            "genome": [levels[g] for g in genome]})
                for genome in genomes]

    tick = [time.perf_counter()]
    with progress.bar("adaptive search (generations)", total=options.generations + 1,
                      completed=0 if state is None else state["generation"] + 1) as b:

        def checkpointed(ga_state: dict, report: GenerationReport) -> None:
            write_json_atomic(ws.search_checkpoint, {**checkpoint, "ga": ga_state, "levels": levels})
            current["generation"] = report.generation + 1
            seconds, tick[0] = time.perf_counter() - tick[0], time.perf_counter()
            log.info("generation %d: best removes %.1f%% of prunable params at %s=%.4f; %d evaluations; %.0f s",
                     report.generation, 100 * report.best_removed, evals.scorer.metric, report.best_metric,
                     report.evaluations, seconds)
            b.advance()
            b.note(f"best -{report.best_removed:.1%} {evals.scorer.metric}={report.best_metric:.4f}")
            if on_generation is not None:
                on_generation(report, seconds)

        result = genetic_search(problem, evaluate, options.ga_config(), seeds, state=state, on_generation=checkpointed)
    return Outcome([levels[g] for g in result.genome], result.metric, {
        "uniform_p": uniform.p, "levels": levels, "generations": result.generations, "stopped": result.stopped,
        "seeds": len(seeds), "uniform_removed": problem.removed(seeds[0]),
        "progress": [asdict(r) for r in result.reports],
    })


def build_plan(options: SearchOptions, targets: list[Target], ranks: Ranks, model_total: int, metric: str,
               dense: float, outcome: Outcome) -> dict:
    """The plan in the format of docs/internals.md; `search` holds how it was found (apply ignores it)."""
    matrices = {}
    for t in targets:
        rank = ranks[t.name]
        matrices[t.name] = {"kind": t.kind, "block": t.block,
                            "kept": fraction_for_rank(rank, t.out_features, t.in_features), "rank": rank,
                            "params_before": t.params,
                            "params_after": lowrank_params(rank, t.out_features, t.in_features)}
    before = sum(m["params_before"] for m in matrices.values())
    after = sum(m["params_after"] for m in matrices.values())
    model_after = model_total - (before - after)
    return {
        "schema": PLAN_SCHEMA, "strategy": options.strategy, "method": options.method,
        "tolerance": options.tolerance, "absolute": options.absolute,
        "matrices": matrices,
        "params": {"prunable_before": before, "prunable_after": after, "model_before": model_total,
                   "model_after": model_after, "removed_fraction_prunable": 1 - after / before,
                   "removed_fraction_model": 1 - model_after / model_total},
        "metric": {"name": metric, "split": "search", "dense": dense, "plan": outcome.metric},
        "search": outcome.extra,
    }


def summarise(plan: dict) -> dict:
    p, m = plan["params"], plan["metric"]
    return {"strategy": plan["strategy"], "removed_fraction_prunable": p["removed_fraction_prunable"],
            "removed_fraction_model": p["removed_fraction_model"], "metric": m["name"],
            "dense": m["dense"], "plan": m["plan"], "evaluations": plan["search"].get("evaluations"),
            "seconds": plan["search"].get("seconds")}


def kept_by_block(plan: dict) -> tuple[list[str], dict[int, dict[str, float]]]:
    """{block: {kind: kept fraction}} and the kinds in table order: the bottleneck view."""
    kinds = list(dict.fromkeys(m["kind"] for m in plan["matrices"].values()))
    blocks: dict[int, dict[str, float]] = {}
    for m in plan["matrices"].values():
        blocks.setdefault(m["block"], {})[m["kind"]] = m["kept"]
    return kinds, dict(sorted(blocks.items()))


def load_plan(ws: Workspace) -> dict:
    ws.require(STAGE)
    return read_json(ws.plan_json)


__all__ = ["STAGE", "Scorer", "SearchOptions", "build_plan", "kept_by_block", "load_plan", "run_search"]
