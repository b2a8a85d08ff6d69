"""Stage 4, search: how much of each matrix to keep, judged by the task metric on the search split.

Uses the fitted bases by truncation only (no refit): a candidate is a rank per matrix,
swapped into one in-memory model and scored on the search split. `uniform` binary
searches one kept fraction for every matrix; `seeds` adds greedy allocations from the fit
spectra; `local` (what `adaptive` names, `options.ADAPTIVE`) takes steps of moves from the
best seed (`local.py`); `genetic` runs the genetic algorithm of `genetic.py` from the same
seeds. Writes `WS/search/plan.json` (what `apply` executes) and `history.jsonl` (every
evaluation). The local and genetic searches checkpoint after each step or generation and
resume exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

from . import progress
from .acceptance import Measurement, acceptance_threshold, is_acceptable, judge
from .errors import InputError, WorkspaceError
from .factors import FactorSet
from .files import append_line, copy_file, read_json, read_jsonl, write_json_atomic
from .fit import load_factors, load_spectrum, require_fit
from .genetic import (
    GenerationReport,
    Problem,
    genetic_search,
    greedy_seeds,
    levels_with,
)
from .local import Layout, Scored, StepReport, local_search
from .matrices import Matrix
from .options import STRATEGIES, LocalConfig, SearchOptions
from .plan import Plan, Ranks
from .scorers import Scorer, build_scorers, heal_recipe, local_scorers, measurement, swapping_scorer, worker_jobs  # noqa: F401
from .shaped import droppable_blocks, shaped_kept, shaped_search, snapped
from .uniform import binary_search, first_probe, uniform_grid
from .workspace import MANIFEST, Stage, Workspace

log = logging.getLogger(__name__)

STAGE = Stage.SEARCH
# Greedy seeds at these removals beyond the uniform answer's (shares of the prunable parameters):
# fine near it, where SmolLM2's tasks hold at 5% (most matrices stay dense), coarse further out.
SEED_REMOVALS = (0.0, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.2)



# ---- the matrices and their ranks at each level -------------------------------------------
def read_targets(ws: Workspace) -> tuple[list[Matrix], int]:
    """The prunable matrices recorded by discover, and the model's total parameter count."""
    found = read_json(ws.matrices_json, rebuild=f"sieve discover MODEL -w {ws.root} --force")
    return [Matrix.from_dict(m) for m in found["matrices"]], int(found["total_params"])


def rank_at(target, kept: float, factors: FactorSet) -> int | None:
    """The level (a matrix's rank, a width unit's width) that keeps at most `kept` of the target,
    limited to what the fit provides.

    A `learned` fit has only its trained ranks: take the largest of them within `kept`
    (the smallest if none is), so the plan's parameter counts stay honest.
    """
    rank = target.level_for(kept)
    if rank is None:
        return None
    available = factors.ranks(target.name)
    if available is None:
        return min(rank, factors.max_rank(target.name))
    below = [r for r in available if r <= rank]
    return max(below) if below else min(available)


def ranks_for(targets: list, kept: list[float], factors: FactorSet) -> Ranks:
    return {t.name: rank_at(t, p, factors) for t, p in zip(targets, kept, strict=True)}


def params_after(targets: list, ranks: Ranks) -> int:
    return sum(t.size_at(ranks[t.name]) for t in targets)


def uniform_kept(targets: list, p: float) -> list[float]:
    """The uniform plan at kept fraction p: p for every matrix, or (a width fit) for every MLP.

    A width fit's attention modules stay whole here: they are cut by whole KV groups (a third of
    SmolLM2's attention each), far too coarse for one fraction shared with the MLPs; the
    adaptive search gives them their own levels.
    """
    return [1.0 if getattr(t, "level_key", "rank") == "width" and t.kind == "attention" else p for t in targets]


def search_targets(factors: FactorSet, matrices: list[Matrix]) -> list:
    """What the search gives a level to: the prunable matrices (a rank each), or a width fit's units."""
    return factors.width_units() if factors.method == "width" else matrices


# ---- evaluation bookkeeping: memo, history, checkpoint -------------------------------------
class Evaluations:
    """Every evaluation goes through here: memoised by ranks, judged against dense, appended to history.jsonl.

    `metric()` returns what the acceptance rule compares: the candidate's lower confidence
    bound, paired with dense (`acceptance.judge`); the point value is kept beside it. On
    resume, the history already on disk (including evaluations made after the last
    checkpoint) fills the memo, so nothing is scored twice and nothing is logged twice.
    """

    def __init__(self, ws: Workspace, scorer: Scorer, targets: list[Matrix], factors: FactorSet,
                 resume: bool, confidence: float = 0.5, healed: bool = False) -> None:
        self.ws, self.scorer, self.targets, self.factors = ws, scorer, targets, factors
        self.confidence = confidence
        self.healed = healed  # its scores are of healed candidates: a memo apart from the unhealed ones
        self.total = sum(t.params for t in targets)
        self.memo: dict[tuple, tuple[float, float, float | None]] = {}  # ranks -> (point, judged, signal)
        self.dense: Measurement | None = None
        self.threshold: float | None = None
        self.scored = 0  # evaluations actually run in this process
        # scored beside a batch by a worker that was idle, not yet asked for (so not in the history)
        self.prefetched: dict[tuple, Measurement] = {}
        self.ahead: list[Ranks] = []  # what the next batch may score beside it (`speculate`)
        if resume and ws.history_jsonl.exists():
            for entry in read_history(ws.history_jsonl, rebuild=f"{ws.command_for(STAGE)} --force"):
                if entry.get("strategy") == "confirm" or entry.get("healed", False) != healed:
                    continue
                kept = entry["genome"] if entry.get("genome") is not None else [entry["p"]] * len(targets)
                self.memo[self.key(ranks_for(targets, kept, factors))] = (
                    entry["metric"], entry.get("lower", entry["metric"]), entry.get("signal"))

    def key(self, ranks: Ranks) -> tuple:
        return tuple(ranks[t.name] for t in self.targets)

    def logged(self, ranks: Ranks) -> bool:
        """Whether `ranks` is in history.jsonl already (this run's or, on resume, the killed one's)."""
        return self.key(ranks) in self.memo

    def metric(self, kept: list[float], record: dict) -> float:
        return self.metrics([kept], [record])[0]

    def metrics(self, kepts: list[list[float]], records: list[dict]) -> list[float]:
        """Judged values of a batch of allocations; the ones not memoised are scored together
        (`Scorer.many`: in parallel where the scorer has a pool) and logged in the batch's order.
        Where a pool would leave workers idle, the allocations `speculate` named are scored beside
        the batch and kept unlogged until asked for, so the history is the serial search's."""
        ranks = [ranks_for(self.targets, kept, self.factors) for kept in kepts]
        todo: dict[tuple, int] = {}  # new key -> its first position in the batch
        for i, r in enumerate(ranks):
            if self.key(r) not in self.memo and self.key(r) not in self.prefetched:
                todo.setdefault(self.key(r), i)
        fresh = dict(zip(todo, self.score_ahead([ranks[i] for i in todo.values()]))) if todo else {}
        self.ahead = []  # nothing new to score beside: what was named ahead is no longer the next step
        for i, r in enumerate(ranks):  # logged in the batch's order, prefetched ones where they are asked for
            key = self.key(r)
            if key in self.memo:
                continue
            m = fresh[key] if key in fresh else self.prefetched.pop(key)
            self.memo[key] = self.log(m, r, records[i], self.dense)
            self.scored += 1
        return [self.memo[self.key(r)][1] for r in ranks]

    def score_ahead(self, batch: list[Ranks]) -> list[Measurement]:
        """`batch` scored as one, with what `speculate` named beside it where a pool has workers
        to spare; those wait, unlogged, in `prefetched`. Returns the batch's measurements."""
        taken = {self.key(r) for r in batch}
        extra = [r for r in self.ahead if self.key(r) not in self.memo and self.key(r) not in self.prefetched
                 and self.key(r) not in taken] if self.scorer.score_many is not None else []
        self.ahead = []
        measured = self.scorer.many(batch + extra)
        for r, m in zip(extra, measured[len(batch):]):
            self.prefetched[self.key(r)] = m
        return measured[: len(batch)]

    def speculate(self, kepts: list[list[float]]) -> None:
        """Allocations the next batch may score beside it on idle workers (a likely next step)."""
        self.ahead = [ranks_for(self.targets, kept, self.factors) for kept in kepts]

    def point(self, kept: list[float]) -> float:
        return self.memo[self.key(ranks_for(self.targets, kept, self.factors))][0]

    def judged(self, kept: list[float]) -> float | None:
        """The judged value of an allocation already scored; None when it was not."""
        found = self.memo.get(self.key(ranks_for(self.targets, kept, self.factors)))
        return None if found is None else found[1]

    def signal(self, kept: list[float]) -> float | None:
        """The paired drop of the low-noise signal (dense - candidate) of a scored allocation; None without one."""
        return self.memo[self.key(ranks_for(self.targets, kept, self.factors))][2]

    def log(self, m: Measurement, ranks: Ranks, record: dict, dense: Measurement | None,
            threshold: float | None = None) -> tuple[float, float, float | None]:
        """Judge `m` against `dense` and append it to the history; returns (point, judged, signal)."""
        verdict = judge(dense, m, self.confidence) if dense is not None else None
        judged = m.value if verdict is None else verdict.lower
        threshold = self.threshold if threshold is None else threshold
        after = params_after(self.targets, ranks)
        entry = {**record, **({"healed": True} if self.healed else {}), "metric": m.value, "lower": judged,
                 "params_after": after,
                 "removed_fraction": 1 - after / self.total,
                 "acceptable": True if threshold is None else is_acceptable(judged, threshold)}
        if verdict is not None:
            entry |= {"drop": verdict.drop, "se": verdict.se, "signal": verdict.signal}
        append_line(self.ws.history_jsonl, json.dumps(entry))  # never through a symlink
        return m.value, judged, None if verdict is None else verdict.signal


def read_history(path, rebuild: str = "sieve search --force") -> list[dict]:
    """history.jsonl's entries; a torn last line (a crash mid-write) is cut off the file, so the next
    entry starts on a line of its own."""
    return read_jsonl(path, rebuild=rebuild)


def dense_from_checkpoint(checkpoint: dict) -> Measurement | None:
    saved = checkpoint.get("dense_measurement")
    if saved is not None:
        return Measurement.from_record(saved)
    return None if checkpoint.get("dense") is None else Measurement(float(checkpoint["dense"]))


def check_above_chance(dense: Measurement, metric: str, allow: bool) -> None:
    """A tolerance means nothing where the dense model is at chance: stop with one line (unless allowed)."""
    level = max(dense.extra.get("chance", -1.0), dense.extra.get("majority", -1.0))
    low = dense.extra.get("ci_low")
    if level < 0 or low is None or low > level or allow:
        return
    raise InputError(
        f"the dense model's {metric} on the search part is {dense.value:.3f} (95% interval from {low:.3f}), "
        f"not clearly above the task's chance/majority level {level:.3f}: no pruning can be judged on this task; "
        f"use a task the model can do or more search examples, or pass --allow-chance"
    )


# ---- the stage ----------------------------------------------------------------------------
@dataclass
class Outcome:
    kept: list[float]  # per target
    metric: float  # the judged value it was accepted at
    extra: dict = field(default_factory=dict)


def run_search(ws: Workspace, options: SearchOptions, force: bool = False, scorer: Scorer | None = None,
               on_generation: Callable[[GenerationReport, float], None] | None = None,
               confirm_scorer: Scorer | None = None,
               healing: tuple[Scorer, Scorer | None] | None = None) -> dict:
    """Search a plan and write plan.json + history.jsonl; returns the plan.

    `scorer` (and `confirm_scorer`, for the confirm part) replace the real evaluator (tests,
    custom metrics); without `confirm_scorer` a custom scorer's plan is not confirmed. `on_generation(report,
    seconds)` is called after each GA generation. Re-running with unchanged inputs does
    nothing and returns the plan on disk; an interrupted run with the same inputs resumes.
    """
    require_fit(ws, options.method)  # before the upstream check: its line also names a fit that is there
    inputs = {"options": options.recorded(),
              "upstream": ws.upstream_hashes(Stage.DISCOVER, Stage.TASK, Stage.fit(options.method))}
    switched = None if force else switch_strategy(ws, inputs)
    if switched == "restored":
        log.info("search: the %s plan made from these inputs was set aside earlier; restored it", options.strategy)
        return {**Plan.load(ws.plan_json).data, "up_to_date": True}
    resume = not force and ws.resumable(STAGE, inputs)  # --force searches again, whatever is on disk
    if not ws.begin(STAGE, inputs, force or switched == "archived"):
        log.info("search is up to date in %s; nothing to do (--force searches again)", ws.root)
        return {**Plan.load(ws.plan_json).data, "up_to_date": True}
    if not resume:
        for stale in (ws.plan_json, ws.history_jsonl, ws.search_checkpoint):
            stale.unlink(missing_ok=True)
    matrices, model_total = read_targets(ws)
    factors = load_factors(ws, options.method)
    targets = search_targets(factors, matrices)
    checkpoint = read_json(ws.search_checkpoint, rebuild=f"{ws.command_for(STAGE)} --force") \
        if resume and ws.search_checkpoint.exists() else {}
    with ExitStack() as cleanup:  # a pool of workers lives as long as the search
        if scorer is None:
            scorer, confirm_scorer = build_scorers(ws, options, factors, cleanup)
        if healing is None and options.heal_steps:
            healing = local_scorers(ws, options, factors, healed=True)
        plan = find_plan(ws, options, scorer, targets, factors, model_total, resume, checkpoint, on_generation,
                         confirm_scorer, healing)
    plan.save(ws.plan_json)
    ws.search_checkpoint.unlink(missing_ok=True)
    # the history is a log for the report, not an output later stages need: only the plan is checked
    layout = {"layout": scorer.layout} if scorer.layout else {}
    ws.finish(STAGE, inputs, [ws.plan_json], summary=summarise(plan.data) | layout)
    return plan.data


# ---- another strategy's plan is set aside, not stale ------------------------------------------------
STRATEGY_KNOBS = ("strategy", "algorithm", "levels", "ga", "local")  # options that belong to one strategy


def strategy_archive(ws: Workspace, strategy: str):
    return ws.inside(ws.stage_dir(STAGE) / strategy)


def switch_strategy(ws: Workspace, inputs: dict) -> str | None:
    """Another strategy asked for on the same inputs is a new question, not stale data.

    The completed plan, history and manifest of the other strategy are set aside under
    WS/search/<its strategy>/ ("archived": the search runs), and when this strategy's own
    earlier plan from the same inputs is set aside there, it comes back ("restored": nothing
    runs). Any other difference (tolerance, the fit, ...) is left to the stale check.
    """
    ws.lock()
    try:
        manifest = ws.read_manifest(STAGE)
    except (InputError, WorkspaceError):
        return None  # a damaged manifest: the stale check says what to do
    new = json.loads(json.dumps(inputs, sort_keys=True, default=str))
    if not manifest or not manifest.get("complete") or not isinstance(manifest.get("inputs"), dict):
        return None
    old = manifest["inputs"]
    old_strategy = (old.get("options") or {}).get("strategy")
    if old_strategy == new["options"]["strategy"] or old_strategy not in STRATEGIES:
        return None
    if without_knobs(old) != without_knobs(new) or not ws.plan_json.exists():
        return None
    keep = strategy_archive(ws, old_strategy)
    for path in (ws.plan_json, ws.history_jsonl, ws.manifest_path(STAGE)):
        if path.exists():
            copy_file(path, ws.inside(keep / path.name))
    log.info("search: the %s plan is kept in %s; searching with %s", old_strategy, keep, new["options"]["strategy"])
    mine = strategy_archive(ws, new["options"]["strategy"])
    try:
        earlier = read_json(mine / MANIFEST) if (mine / MANIFEST).exists() else None
    except (InputError, WorkspaceError):
        earlier = None
    if not (isinstance(earlier, dict) and earlier.get("complete") and earlier.get("inputs") == new
            and (mine / ws.plan_json.name).exists()):
        return "archived"
    for name in (ws.plan_json.name, ws.history_jsonl.name):
        if (mine / name).exists():
            copy_file(ws.inside(mine / name), ws.inside(ws.stage_dir(STAGE) / name))
    ws.search_checkpoint.unlink(missing_ok=True)
    ws.finish(STAGE, inputs, [ws.plan_json], summary=earlier.get("summary") or {})
    return "restored"


def without_knobs(inputs: dict) -> dict:
    return {**inputs, "options": {k: v for k, v in (inputs.get("options") or {}).items() if k not in STRATEGY_KNOBS}}


def find_plan(ws: Workspace, options: SearchOptions, scorer: Scorer, targets: list[Matrix], factors: FactorSet,
              model_total: int, resume: bool = False, checkpoint: dict | None = None,
              on_generation: Callable[[GenerationReport, float], None] | None = None,
              confirm_scorer: Scorer | None = None, healing: tuple[Scorer, Scorer | None] | None = None) -> Plan:
    """The search itself, shared by `sieve search` and the Python API.

    Uniform, then the GA for adaptive; every candidate judged paired with dense at
    `options.confidence`; then the chosen plan confirmed on the confirm part, backing off
    toward dense until it holds there. Every evaluation goes to WS/search/history.jsonl;
    `checkpoint` (the dense measurement, the GA state) to WS/search/checkpoint.json so an
    interrupted search resumes exactly. A checkpoint that already holds `dense` (the API's
    baseline) is not scored again.
    """
    started = time.perf_counter()
    checkpoint = dict(checkpoint or {})
    evals = Evaluations(ws, scorer, targets, factors, resume, options.confidence)
    dense = dense_from_checkpoint(checkpoint)
    if dense is None:  # the dense model is scored once and kept in the checkpoint
        dense_ranks = ranks_for(targets, [1.0] * len(targets), factors)
        probe = first_probe(uniform_grid(options.grid_step))  # a second worker scores the uniform search's first
        evals.speculate([uniform_kept(targets, probe)] if probe is not None and scorer.score_many is not None else [])
        dense = evals.score_ahead([dense_ranks])[0]  # again after a kill: the checkpoint keeps its per-example scores
        if not evals.logged(dense_ranks):  # a run killed before its checkpoint had logged it already
            evals.log(dense, dense_ranks, {"strategy": options.algorithm, "generation": None, "p": 1.0}, None)
        checkpoint = {"dense": dense.value, "metric": scorer.metric, "examples": scorer.examples,
                      "dense_measurement": dense.to_record()}
        write_json_atomic(ws.search_checkpoint, checkpoint)
    scorer.metric = checkpoint.get("metric", scorer.metric)
    scorer.examples = checkpoint.get("examples", scorer.examples)
    check_above_chance(dense, scorer.metric, options.allow_chance)
    evals.dense = dense
    evals.memo[evals.key(ranks_for(targets, [1.0] * len(targets), factors))] = (dense.value, dense.value, 0.0)
    evals.threshold = acceptance_threshold(dense.value, options.tolerance, options.absolute)
    log.info("dense %s on the search split: %.4f; acceptable from %.4f at %.0f%% confidence", scorer.metric,
             dense.value, evals.threshold, 100 * options.confidence)

    uniform = search_uniform(evals, options, targets)
    if options.algorithm == "uniform":
        outcome = Outcome(uniform_kept(targets, uniform.p), dense.value if uniform.metric is None else uniform.metric,
                          {"uniform_p": uniform.p})
    elif options.uniform_shape:
        outcome = search_uniform_shape(evals, options, targets, uniform)
    else:
        outcome = search_adaptive(ws, evals, options, targets, factors, uniform, checkpoint, on_generation)
    if healing is not None:  # from here on every judgement is of a healed candidate
        evals, outcome = deepen_healed(ws, options, healing[0], evals, outcome, resume, checkpoint)
        confirm_scorer = healing[1]
        dense = evals.dense
    confirmed = confirm_plan(evals, options, outcome.kept, confirm_scorer) if confirm_scorer else None
    kept = outcome.kept if confirmed is None else confirmed.pop("kept")
    judged = evals.metric(kept, {"strategy": "backoff", "generation": None, "genome": kept})  # memo if not backed off
    ranks = ranks_for(targets, kept, factors)
    outcome.extra.update(evaluations=len(evals.memo), evaluated_now=evals.scored,
                         seconds=round(time.perf_counter() - started, 1), limit=options.limit,
                         examples=scorer.examples, confidence=options.confidence, lower=judged)
    if confirmed is not None:
        outcome.extra["confirm"] = confirmed
    return build_plan(options, targets, ranks, model_total, scorer.metric, dense.value, evals.point(kept), outcome)


HEAL_SCALES = tuple(i / 20 for i in range(1, 20))  # healed search: each pruned kept fraction times s


def deepen_healed(ws: Workspace, options: SearchOptions, scorer: Scorer, unhealed: Evaluations, outcome: Outcome,
                  resume: bool, checkpoint: dict) -> tuple[Evaluations, Outcome]:
    """`--heal-steps`: from the unhealed plan, prune further along its own allocation (every pruned
    target's kept fraction k -> k s; whole ones stay whole, or all go together when nothing was pruned)
    while the healed candidate stays acceptable: a bisection over s, one heal per candidate, every
    candidate judged paired with the reference (dense as given, or dense healed) on the search part.

    The unhealed search is the cheap ranking; healing buys the removal beyond it. Returns the healed
    judgements (for the confirm part and the plan) and the outcome at the smallest acceptable s.
    """
    evals = Evaluations(ws, scorer, unhealed.targets, unhealed.factors, resume, options.confidence, healed=True)
    evals.dense = reference_measurement(ws, evals, checkpoint)
    evals.threshold = acceptance_threshold(evals.dense.value, options.tolerance, options.absolute)
    log.info("reference (%s) on the search split: %.4f; healed candidates acceptable from %.4f",
             options.reference, evals.dense.value, evals.threshold)
    dense_ranks = ranks_for(evals.targets, [1.0] * len(evals.targets), evals.factors)
    evals.memo[evals.key(dense_ranks)] = (evals.dense.value, evals.dense.value, 0.0)
    if any(k < 1 for k in outcome.kept):
        start, cut = outcome.kept, [k < 1 for k in outcome.kept]
    else:  # nothing pruned unhealed: the uniform targets scale together (a width fit's attention stays whole)
        start, cut = [1.0] * len(outcome.kept), [k < 1 for k in uniform_kept(evals.targets, 0.0)]

    def kept_at(scale: float) -> list[float]:
        return [k * scale if c else k for k, c in zip(start, cut)]

    heals = len(HEAL_SCALES).bit_length()
    with progress.bar(f"healed search ({options.heal_steps} heal steps each)", total=heals) as b:
        def metric_at(scale: float) -> float:
            value = evals.metric(kept_at(scale), {"strategy": "healed", "generation": None, "scale": scale,
                                                  "genome": kept_at(scale)})
            b.advance()
            b.note(f"s={scale:.2f} {scorer.metric}={value:.4f}")
            return value

        result = binary_search(HEAL_SCALES, metric_at, evals.threshold)
    kept = kept_at(result.p) if result.p < 1.0 else outcome.kept
    metric = result.metric if result.metric is not None else outcome.metric
    log.info("healed search: pruned kept fractions x %.2f hold healed (%s=%.4f) after %d heals", result.p,
             scorer.metric, metric, len(result.trials))
    recipe = heal_recipe(options).recorded()
    extra = outcome.extra | {"healed": {"steps": options.heal_steps, "reference": options.reference,
                                        "scale": result.p, "recipe": {k: recipe[k] for k in HEAL_RECORDED},
                                        "unhealed_removed": 1 - params_after(evals.targets, ranks_for(
                                            evals.targets, outcome.kept, evals.factors)) / evals.total,
                                        "heals": len(result.trials)}}
    return evals, Outcome(kept, metric, extra)


HEAL_RECORDED = ("steps", "lr", "loss", "rank", "alpha", "batch_size", "seq_len", "seed")


def reference_measurement(ws: Workspace, evals: Evaluations, checkpoint: dict) -> Measurement:
    """What the healed candidates are paired with: the dense allocation as the healing scorer scores it
    (the dense model, or with `--reference healed-dense` the dense model healed by the same recipe), scored
    once on the search part and kept in the checkpoint (the pairing needs its per-example scores on resume)."""
    stored = checkpoint.get("healed_reference")
    if stored is not None:
        return Measurement.from_record(stored)
    ranks = ranks_for(evals.targets, [1.0] * len(evals.targets), evals.factors)
    m = evals.scorer(ranks)
    evals.log(m, ranks, {"strategy": "reference", "generation": None, "p": 1.0}, None)
    checkpoint["healed_reference"] = m.to_record()
    write_json_atomic(ws.search_checkpoint, checkpoint)
    return m


BACK_OFF = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75)  # steps toward dense (then dense): kept -> kept + t (1 - kept)


def confirm_plan(evals: Evaluations, options: SearchOptions, kept: list[float], scorer: Scorer) -> dict:
    """The first plan on the way from `kept` to dense that keeps the tolerance on the confirm part.

    Examples the search never saw judge it, paired with dense on the same examples and at the
    same confidence, so the search's winner's curse (the best of many noisy scores) does not
    reach the plan. Dense itself always holds; each step costs one evaluation of the confirm part.
    """
    steps = (*BACK_OFF, 1.0)
    candidates = [[k + step * (1 - k) for k in kept] for step in steps]
    if options.uniform_shape:  # every back-off step a uniform shape too, so the folder stays standard
        candidates = [snapped(evals.targets, c) for c in candidates]
    ranks = [ranks_for(evals.targets, c, evals.factors) for c in candidates]
    known: dict[tuple, Measurement] = {}  # by ranks: steps too close to differ in any rank are scored once
    workers = int((scorer.layout or {}).get("workers", 1)) if scorer.score_many is not None else 1

    def score_from(i: int) -> None:
        """Step i and, on a pool, the next back-offs beside it (one per idle worker); dense first of all.
        The confirm part is the largest part scored, so a pool pays most here."""
        todo: dict[tuple, Ranks] = {}
        take = workers if known else max(2, workers)
        for r in ([] if known else [ranks[-1]]) + ranks[i:-1]:
            if evals.key(r) not in known:
                todo.setdefault(evals.key(r), r)
            if len(todo) >= take:
                break
        known.update(zip(todo, scorer.many(list(todo.values()))))

    score_from(0)
    dense = known[evals.key(ranks[-1])]
    threshold = acceptance_threshold(dense.value, options.tolerance, options.absolute)
    for i, step in enumerate(steps):
        if evals.key(ranks[i]) not in known:
            score_from(i)
        candidate = candidates[i]
        point, judged, _ = evals.log(known[evals.key(ranks[i])], ranks[i], {
            "strategy": "confirm", "generation": None, "step": step, "genome": candidate}, dense, threshold)
        if is_acceptable(judged, threshold):
            break
    log.info("confirm part: %s (%s %.4f, lower bound %.4f, dense %.4f)",
             "the plan holds" if step == 0 else f"held after backing off {step:.0%} toward dense",
             scorer.metric, point, judged, dense.value)
    return {"kept": candidate, "dense": dense.value, "plan": point, "lower": judged, "threshold": threshold,
            "back_off": step, "examples": scorer.examples}


def search_uniform(evals: Evaluations, options: SearchOptions, targets: list[Matrix]):
    grid = uniform_grid(options.grid_step)

    def record(p: float) -> dict:  # a width plan's uniform keeps attention whole: its genome says so
        kept = uniform_kept(targets, p)
        return {"strategy": "uniform", "generation": None, "p": p} | ({"genome": kept} if len(set(kept)) > 1 else {})

    with progress.bar("uniform search", total=len(grid).bit_length()) as b:
        def metric_at(p: float) -> float:
            value = evals.metric(uniform_kept(targets, p), record(p))
            b.advance()
            b.note(f"p={p:.2f} {evals.scorer.metric}={value:.4f}")
            return value

        def ahead(_: float, after_failure: float | None) -> None:  # a second worker scores the probe after a failure
            evals.speculate([] if after_failure is None else [uniform_kept(targets, after_failure)])

        result = binary_search(grid, metric_at, evals.threshold, ahead)
    log.info("uniform: keep p=%.2f of every matrix (%s=%s) after %d evaluations",
             result.p, evals.scorer.metric, result.metric, len(result.trials))
    return result


def search_uniform_shape(evals: Evaluations, options: SearchOptions, targets: list, uniform) -> Outcome:
    """`--uniform-shape`: the most removing plan whose MLPs share one width and attention modules one
    group count, blocks dropped whole (`shaped.py`); from the uniform answer, every batch memoised."""
    def judge(kepts: list[list[float]], moves: list[str]) -> list[float]:
        return evals.metrics(kepts, [{"strategy": "shape", "generation": None, "move": move, "genome": kept}
                                     for kept, move in zip(kepts, moves)])

    with progress.bar("uniform-shape search", total=None) as b:
        def noted(line: str) -> None:
            log.info("%s", line)
            b.note(line)

        shape, metric = shaped_search(targets, uniform.p, uniform_grid(options.grid_step), judge, evals.threshold,
                                      noted)
    kept = shaped_kept(targets, shape)
    return Outcome(kept, evals.dense.value if metric is None else metric,
                   {"uniform_p": uniform.p, "shape": shape.to_dict()})


def spectrum_errors(ws: Workspace, options: SearchOptions, targets: list[Matrix], levels: list[float],
                    factors: FactorSet) -> list[list[float]] | None:
    """Relative output error of each matrix at each level, from the fit spectra, for the greedy seed.

    A `learned` fit records errors only at its trained ranks; the exact `output` spectrum
    (when fitted) stands in, else the greedy seeds are skipped.
    """
    for method in dict.fromkeys((options.method, "output")):
        if not (ws.read_manifest(Stage.fit(method)) or {}).get("complete"):
            continue  # no such fit in this workspace: try the next
        spectrum = load_spectrum(ws, method)  # a damaged spectrum is an error, not greedy seeds silently dropped
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


@dataclass(frozen=True)
class Start:
    """What every per-matrix strategy starts from: the levels, the problem, the seeds, the spectra."""

    levels: list[float]
    problem: Problem
    seeds: list[list[int]]  # the uniform answer first, then the greedy allocations
    errors: list[list[float]] | None

    def kept(self, genome) -> list[float]:
        return [self.levels[g] for g in genome]


def adaptive_start(ws, evals: Evaluations, options: SearchOptions, targets, factors, uniform) -> Start:
    levels = levels_with(options.levels, uniform.p)
    if factors.method == "width":  # a width unit may go altogether (a block whose two units go is gone)
        levels = sorted({*levels, 0.0}, reverse=True)
    kept = [[t.size_at(rank_at(t, p, factors)) for p in levels] for t in targets]
    problem = Problem(kept=kept, total=evals.total, threshold=evals.threshold)
    seeds = [[levels.index(p) for p in uniform_kept(targets, uniform.p)]]
    errors = spectrum_errors(ws, options, targets, levels, factors)
    if errors is not None:
        removal = problem.removed(seeds[0])
        seeds += greedy_seeds(errors, kept, evals.total, [min(0.95, removal + d) for d in SEED_REMOVALS])
    if factors.method == "width":
        seeds += depth_seeds(evals, targets, levels, seeds[0])
    return Start(levels, problem, seeds, errors)


DEPTH_SEEDS = (1, 2, 3, 4, 6, 8)  # blocks dropped together in the depth seeds


def depth_seeds(evals: Evaluations, targets: list, levels: list[float], base: list[int]) -> list[list[int]]:
    """Seeds that drop whole blocks (every width unit of the block at 0), from a scan that scores each
    block dropped alone from `base` (one batch, one evaluation per block).

    Which blocks a task can lose is task-specific and the fit's spectra cannot tell (to them a removed
    unit is all its output lost), so it is measured: the seeds drop the k blocks whose drop alone was
    acceptable with the best judged metric, k in DEPTH_SEEDS.
    """
    zero = levels.index(0.0)

    def dropped(blocks: set[int]) -> list[int]:
        return [zero if t.block in blocks else g for t, g in zip(targets, base)]

    blocks = sorted({t.block for t in targets})
    singles = [[levels[g] for g in dropped({b})] for b in blocks]
    judged = evals.metrics(singles, [{"strategy": "depth", "generation": None, "move": f"drop block {b}",
                                      "genome": kept} for b, kept in zip(blocks, singles)])
    held = droppable_blocks(blocks, judged, evals.threshold)
    log.info("depth scan: %d of %d blocks can go alone (best first: %s)", len(held), len(blocks), held[:8])
    return [dropped(set(held[:k])) for k in DEPTH_SEEDS if k <= len(held)]


def after_each_step(ws: Workspace, checkpoint: dict, key: str, levels: list[float], evals: Evaluations, bar,
                    current: dict, index: str, headline: Callable, on_report) -> Callable[[dict, object], None]:
    """The callback a local step or a GA generation ends with: checkpoint the run's `state` under `key`,
    move `current[index]` to the next step, log and show the best so far, and hand the report on."""
    tick = [time.perf_counter()]

    def checkpointed(state: dict, report) -> None:
        write_json_atomic(ws.search_checkpoint, {**checkpoint, key: state, "levels": levels})
        current[index] = getattr(report, index) + 1
        seconds, tick[0] = time.perf_counter() - tick[0], time.perf_counter()
        log.info("%s at %s=%.4f; %d evaluations; %.0f s", headline(report), evals.scorer.metric,
                 report.best_metric, report.evaluations, seconds)
        bar.advance()
        bar.note(f"best -{report.best_removed:.1%} {evals.scorer.metric}={report.best_metric:.4f}")
        if on_report is not None:
            on_report(report, seconds)

    return checkpointed


def search_adaptive(ws, evals: Evaluations, options: SearchOptions, targets, factors, uniform, checkpoint,
                    on_generation) -> Outcome:
    start = adaptive_start(ws, evals, options, targets, factors, uniform)
    if options.algorithm == "genetic":
        outcome = search_genetic(ws, evals, options, start, checkpoint, on_generation)
    else:
        outcome = search_local(ws, evals, options, targets, start, checkpoint, on_generation)
    outcome.extra |= {"algorithm": options.algorithm, "uniform_p": uniform.p, "levels": start.levels,
                      "uniform_removed": start.problem.removed(start.seeds[0])}
    return outcome


def search_local(ws, evals: Evaluations, options: SearchOptions, targets, start: Start, checkpoint,
                 on_step) -> Outcome:
    """`seeds` (the seeds alone) and `local` (then local steps): every batch scored at once, checkpointed per step."""
    config = options.local if options.algorithm == "local" else LocalConfig(budget=0)
    state = checkpoint.get("local")
    current = {"step": 0 if state is None else state["step"] + 1}  # the one being scored

    def evaluate(genomes, labels):
        kepts = [start.kept(genome) for genome in genomes]
        judged = evals.metrics(kepts, [{"strategy": options.algorithm, "generation": current["step"], "move": label,
                                        "genome": kept} for kept, label in zip(kepts, labels)])
        return [Scored(j, evals.signal(kept)) for j, kept in zip(judged, kepts)]

    steps = 1 + math.ceil(config.budget / config.moves)
    with progress.bar(f"{options.algorithm} search (steps)", total=steps,
                      completed=0 if state is None else state["step"] + 1) as b:

        def headline(report: StepReport) -> str:
            return (f"{'seeds' if report.step == 0 else f'step {report.step}'}: best removes "
                    f"{report.best_removed:.1%} of prunable params (+{report.added:.1%}, {report.move})")

        checkpointed = after_each_step(ws, checkpoint, "local", start.levels, evals, b, current, "step", headline,
                                       on_step)
        dense_metric = evals.dense.value if evals.dense is not None else 0.0
        result = local_search(start.problem, start.errors, Layout([t.block for t in targets], [t.kind for t in targets]),
                              evaluate, config, start.seeds, dense_metric, state=state, on_step=checkpointed)
    reports = [asdict(r) for r in result.reports]
    return Outcome(start.kept(result.genome), result.metric, {
        "steps": result.steps, "stopped": result.stopped, "seeds": len(start.seeds),
        "seeded": {k: reports[0][k] for k in ("best_removed", "best_metric", "evaluations")},
        "progress": reports,
    })


def search_genetic(ws, evals: Evaluations, options: SearchOptions, start: Start, checkpoint,
                   on_generation) -> Outcome:
    state = checkpoint.get("ga")
    current = {"generation": 0 if state is None else state["generation"] + 1}  # the one being scored

    def evaluate(genomes):
        kepts = [start.kept(genome) for genome in genomes]
        return evals.metrics(kepts, [{"strategy": "genetic", "generation": current["generation"], "genome": kept}
                                     for kept in kepts])

    with progress.bar("genetic search (generations)", total=options.ga.generations + 1,
                      completed=0 if state is None else state["generation"] + 1) as b:

        def headline(report: GenerationReport) -> str:
            return f"generation {report.generation}: best removes {report.best_removed:.1%} of prunable params"

        checkpointed = after_each_step(ws, checkpoint, "ga", start.levels, evals, b, current, "generation", headline,
                                       on_generation)
        result = genetic_search(start.problem, evaluate, options.ga, start.seeds, state=state,
                                on_generation=checkpointed)
    # what the seeds alone reached: the best acceptable seed the GA scored (a small population holds only the first)
    judged = {i: evals.judged(start.kept(g)) for i, g in enumerate(start.seeds)}
    held = [i for i, j in judged.items() if j is not None and is_acceptable(j, evals.threshold)]
    best_seed = max(held, key=lambda i: start.problem.removed(start.seeds[i]), default=0)
    reports = [asdict(r) for r in result.reports]
    for before, report in zip([None, *reports], reports):
        report["added"] = report["best_removed"] - (before["best_removed"] if before else 0.0)
    return Outcome(start.kept(result.genome), result.metric, {
        "generations": result.generations, "stopped": result.stopped, "seeds": len(start.seeds),
        "seeded": {"best_removed": start.problem.removed(start.seeds[best_seed]), "best_metric": judged[best_seed],
                   "evaluations": sum(j is not None for j in judged.values())},
        "progress": reports,
    })


def build_plan(options: SearchOptions, targets: list[Matrix], ranks: Ranks, model_total: int, metric: str,
               dense: float, point: float, outcome: Outcome) -> Plan:
    return Plan.build(strategy=options.strategy, method=options.method, tolerance=options.tolerance,
                      absolute=options.absolute, matrices=targets, ranks=ranks, model_total=model_total,
                      metric=metric, dense=dense, plan_metric=point, search=outcome.extra)


def summarise(plan: dict) -> dict:
    p, m = plan["params"], plan["metric"]
    return {"strategy": plan["strategy"], "removed_fraction_prunable": p["removed_fraction_prunable"],
            "removed_fraction_model": p["removed_fraction_model"], "metric": m["name"],
            "dense": m["dense"], "plan": m["plan"], "evaluations": plan["search"].get("evaluations"),
            "seconds": plan["search"].get("seconds")}


__all__ = ["STAGE", "Scorer", "SearchOptions", "build_plan", "run_search"]
