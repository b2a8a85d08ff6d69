"""The local search over per-matrix kept levels, from the best of the spectrum seeds; pure.

Nothing here touches a model, a file or a clock (like `genetic.py`): the caller scores genomes
through a callback. A genome is a list of level indices, one per matrix, most kept first
(`genetic.py` explains the encoding; `Problem` holds the parameter counts).

Each step proposes moves from the best acceptable genome so far: lower it further where the
fit spectra say it costs least (greedy lowering by a few removal sizes), lower one block or one
matrix kind a level, merge the last step's acceptable moves, or raise the most damaged matrix of
a move that just failed. Scoring is the expensive part, so the proposals are ranked cheaply
first: a line through the origin fitted to what was already scored predicts each proposal's
paired damage (the drop of the low-noise signal, else of the judged metric) from its summed
spectral error, and the largest moves predicted to stay within the damage where acceptability
flipped so far are scored, `moves` of them as one batch. The best acceptable one becomes the
new start; `patience` steps in a row that add nothing, or a spent budget, end the search (a
step that adds nothing still narrows the damage limit and proposes repairs for the next).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from .acceptance import is_acceptable
from .genetic import Genome, Problem, genome_key
from .options import LocalConfig

# greedy lowering from the best genome by these shares of the prunable parameters
LOWERING_STEPS = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
PER_FAMILY = 2  # at most this many moves of one family per batch: a batch spans different kinds of move
BASES = 3  # moves start from the best genome and the next BASES - 1 acceptable ones by removal


@dataclass(frozen=True)
class Scored:
    """What one evaluation tells the local search."""

    metric: float  # the judged value the acceptance rule compares (the paired lower bound)
    damage: float | None = None  # paired drop of the low-noise signal against dense; None: not measured


@dataclass(frozen=True)
class Move:
    name: str  # e.g. "lower block 3", "greedy +1.0%"
    family: str  # greedy | block | kind | merge | repair
    genome: Genome
    base: Genome = field(default_factory=list, compare=False)  # the scored genome it starts from


@dataclass
class StepReport:
    step: int  # 0: the seeds
    best_removed: float
    best_metric: float
    added: float  # removal gained over the previous step's best
    move: str  # what the best came from
    evaluations: int  # distinct genomes scored so far
    new_evaluations: int


@dataclass
class LocalResult:
    genome: Genome
    metric: float
    removed: float
    evaluations: int
    steps: int  # steps after the seeds
    stopped: str  # "no gain" | "budget" | "no moves"
    reports: list[StepReport] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """Where each gene sits in the model: its block and matrix kind (for block and kind moves)."""

    blocks: list[int]
    kinds: list[str]


# ---- moves ---------------------------------------------------------------------------------------
def lowered(genome: Sequence[int], genes: Sequence[int], problem: Problem) -> Genome:
    """`genome` with each of `genes` one level less kept (those already at the bottom stay)."""
    child = list(genome)
    for i in genes:
        child[i] = min(child[i] + 1, problem.levels_of(i) - 1)
    return child


def greedy_lowering(errors: Sequence[Sequence[float]], problem: Problem, genome: Sequence[int],
                    budget: int) -> Genome:
    """Lower genes one level at a time, the one adding least spectral error per parameter removed
    first, until at most `budget` parameters are kept (or nothing can be lowered)."""
    child = list(genome)
    spent = problem.params_after(child)
    while spent > budget:
        best, best_cost = None, math.inf
        for i, g in enumerate(child):
            if g + 1 >= problem.levels_of(i):
                continue
            saved = problem.kept[i][g] - problem.kept[i][g + 1]
            if saved <= 0:
                continue
            cost = max(0.0, errors[i][g + 1] - errors[i][g]) / saved
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            break
        spent -= problem.kept[best][child[best]] - problem.kept[best][child[best] + 1]
        child[best] += 1
    return child


def propose(problem: Problem, errors, layout: Layout, base: Genome, accepted_last: list[Genome],
            failed_last: list[Genome]) -> list[Move]:
    """Every move from `base` this step could score (duplicates and no-ops dropped later)."""
    moves: list[Move] = []
    if errors is not None:
        params = problem.params_after(base)
        for share in LOWERING_STEPS:
            moves.append(Move(f"greedy +{share:.2%}", "greedy",
                              greedy_lowering(errors, problem, base, int(params - share * problem.total)), base))
    for block in sorted(set(layout.blocks)):
        genes = [i for i, b in enumerate(layout.blocks) if b == block]
        moves.append(Move(f"lower block {block}", "block", lowered(base, genes, problem), base))
    for kind in dict.fromkeys(layout.kinds):
        genes = [i for i, k in enumerate(layout.kinds) if k == kind]
        moves.append(Move(f"lower {kind}", "kind", lowered(base, genes, problem), base))
    if len(accepted_last) >= 2:  # two moves that each held may hold together
        moves.append(Move("merge", "merge", [max(levels) for levels in zip(*accepted_last)], base))
    for genome in failed_last:
        if errors is None:
            break
        changed = [i for i, (g, b) in enumerate(zip(genome, base)) if g > b]
        if changed:  # raise the matrix the spectra say the move damaged most
            worst = max(changed, key=lambda i: errors[i][genome[i]])
            child = list(genome)
            child[worst] -= 1
            moves.append(Move("repair", "repair", child, genome))
    return moves


# ---- the cheap ranking -------------------------------------------------------------------------------
def spectral_error(errors, problem: Problem, genome: Sequence[int]) -> float:
    """Summed relative output error of the matrices at their levels (the removal without spectra)."""
    if errors is None:
        return problem.removed(genome)
    return sum(errors[i][g] for i, g in enumerate(genome))


def damage_of(scored: Scored, dense_metric: float) -> float:
    return scored.damage if scored.damage is not None else dense_metric - scored.metric


def damage_model(points: list[tuple[float, float, bool]]) -> tuple[float | None, float]:
    """(slope, limit) from scored (spectral error, damage, acceptable) points.

    The slope is least squares through the origin (dense: no error, no damage); the limit is
    the damage where acceptability flipped: midway between the largest acceptable damage and
    the smallest unacceptable one (the latter alone when noise crossed them; infinite before
    anything failed).
    """
    sxx = sum(e * e for e, _, _ in points)
    slope = sum(e * d for e, d, _ in points) / sxx if sxx > 0 else None
    good = [d for _, d, ok in points if ok]
    bad = [d for _, d, ok in points if not ok]
    if not bad:
        return slope, math.inf
    low = min(bad)
    below = [d for d in good if d < low]
    return slope, (max(below) + low) / 2 if below else low


def rank_moves(moves: list[Move], problem: Problem, errors, damage: Callable[[Genome], float],
               slope: float | None, limit: float, take: int) -> list[Move]:
    """The `take` moves to score: predicted to hold first, the largest removal first, at most
    PER_FAMILY of one family while others are left. A move's predicted damage is its base's
    measured `damage` plus the slope times the spectral error it adds."""

    def key(move: Move) -> tuple:
        added = spectral_error(errors, problem, move.genome) - spectral_error(errors, problem, move.base)
        predicted = damage(move.base) + (slope or 0.0) * added
        return (predicted > limit, -problem.removed(move.genome))

    ranked = sorted(moves, key=key)
    chosen: list[Move] = []
    for cap in (PER_FAMILY, math.inf):
        for move in ranked:
            if len(chosen) < take and move not in chosen and sum(m.family == move.family for m in chosen) < cap:
                chosen.append(move)
    return chosen


# ---- the search ------------------------------------------------------------------------------------
class _Run:
    """The local search's state, kept as JSON-able data so a checkpoint restores it exactly."""

    def __init__(self, problem: Problem, errors, layout: Layout, dense_metric: float, config: LocalConfig,
                 evaluate: Callable[[list[Genome], list[str]], list[Scored]], on_step) -> None:
        self.problem, self.errors, self.layout, self.config = problem, errors, layout, config
        self.dense_metric, self.evaluate, self.on_step = dense_metric, evaluate, on_step
        self.seen: dict[str, Scored] = {}
        self.step = -1
        self.best: Genome = []
        self.best_move = "seeds"
        self.spent = 0  # evaluations after the seeds
        self.idle = 0  # steps in a row without a better plan
        self.accepted_last: list[Genome] = []
        self.failed_last: list[Genome] = []
        self.stopped = ""
        self.reports: list[StepReport] = []

    def state(self) -> dict:
        return {"step": self.step, "best": self.best, "best_move": self.best_move, "spent": self.spent, "idle": self.idle,
                "seen": {k: [s.metric, s.damage] for k, s in self.seen.items()},
                "accepted_last": self.accepted_last, "failed_last": self.failed_last, "stopped": self.stopped,
                "reports": [asdict(r) for r in self.reports]}

    def restore(self, state: dict) -> None:
        self.step, self.best, self.best_move = state["step"], list(state["best"]), state["best_move"]
        self.spent, self.stopped = state["spent"], state["stopped"]
        self.idle = state.get("idle", 0)
        self.seen = {k: Scored(m, d) for k, (m, d) in state["seen"].items()}
        self.accepted_last = [list(g) for g in state["accepted_last"]]
        self.failed_last = [list(g) for g in state["failed_last"]]
        self.reports = [StepReport(**r) for r in state["reports"]]

    def acceptable(self, genome: Genome) -> bool:
        return is_acceptable(self.seen[genome_key(genome)].metric, self.problem.threshold)

    def score(self, genomes: list[Genome], labels: list[str]) -> list[Genome]:
        """Score the genomes not seen yet, as one batch; returns those that were new."""
        todo, names = [], []
        for genome, label in zip(genomes, labels, strict=True):
            if genome_key(genome) not in self.seen and genome not in todo:
                todo.append(genome)
                names.append(label)
        if todo:
            for genome, scored in zip(todo, self.evaluate(todo, names), strict=True):
                self.seen[genome_key(genome)] = scored
        return todo

    def better(self, genome: Genome) -> bool:
        """Acceptable and removes more than the best (ties: a higher metric)."""
        if not self.acceptable(genome):
            return False
        if not self.best:
            return True
        mine, theirs = self.problem.removed(genome), self.problem.removed(self.best)
        return mine > theirs + 1e-12 or (abs(mine - theirs) <= 1e-12 and
                                         self.seen[genome_key(genome)].metric > self.seen[genome_key(self.best)].metric)

    def close_step(self, new: int, previous_removed: float) -> None:
        metric = self.seen[genome_key(self.best)].metric
        removed = self.problem.removed(self.best)
        self.reports.append(StepReport(step=self.step, best_removed=removed, best_metric=metric,
                                       added=max(0.0, removed - previous_removed) if self.step > 0 else removed,
                                       move=self.best_move, evaluations=len(self.seen), new_evaluations=new))
        if self.on_step is not None:
            self.on_step(self.state(), self.reports[-1])

    def seeds(self, seeds: list[Genome]) -> None:
        new = self.score(seeds, ["seed"] * len(seeds))
        for genome in seeds:
            if self.better(genome):
                self.best = list(genome)
        if not self.best:  # no seed held: stay dense (always acceptable)
            self.best = [0] * self.problem.genes
            self.seen.setdefault(genome_key(self.best), Scored(self.dense_metric, 0.0))
        self.step = 0
        self.close_step(len(new), 0.0)

    def bases(self) -> list[Genome]:
        """Where moves start: the best, and the runners-up with the most removal (BASES in all). The best
        often sits at the limit, where every move fails; a runner-up with slack can still pass it."""
        held = sorted((k for k, s in self.seen.items() if is_acceptable(s.metric, self.problem.threshold)),
                      key=lambda k: (-self.problem.removed([int(x) for x in k.split(",")]), k))
        others = [[int(x) for x in k.split(",")] for k in held if k != genome_key(self.best)]
        return [self.best, *others[: BASES - 1]]

    def points(self) -> list[tuple[float, float, bool]]:
        return [(spectral_error(self.errors, self.problem, [int(x) for x in k.split(",")]),
                 damage_of(s, self.dense_metric), is_acceptable(s.metric, self.problem.threshold))
                for k, s in self.seen.items()]

    def next_step(self) -> bool:
        """One step; False when the search is over."""
        left = self.config.budget - self.spent
        if left <= 0:
            self.stopped = "budget"
            return False
        moves = [m for base in self.bases()
                 for m in propose(self.problem, self.errors, self.layout, base, self.accepted_last, self.failed_last)
                 if genome_key(m.genome) not in self.seen and self.problem.removed(m.genome) > self.problem.removed(self.best)]
        moves = list({genome_key(m.genome): m for m in reversed(moves)}.values())[::-1]  # first of duplicates
        if not moves:
            self.stopped = "no moves"
            return False
        slope, limit = damage_model(self.points())
        batch = rank_moves(moves, self.problem, self.errors,
                           lambda genome: damage_of(self.seen[genome_key(genome)], self.dense_metric), slope, limit,
                           min(self.config.moves, left))
        previous = self.problem.removed(self.best)
        new = self.score([m.genome for m in batch], [m.name for m in batch])
        self.spent += len(new)
        self.accepted_last = [m.genome for m in batch if self.acceptable(m.genome)]
        self.failed_last = [m.genome for m in batch if not self.acceptable(m.genome)]
        improved = False
        for move in batch:
            if self.better(move.genome):
                self.best, self.best_move, improved = list(move.genome), move.name, True
        self.step += 1
        self.idle = 0 if improved else self.idle + 1
        if self.idle >= self.config.patience:
            self.stopped = "no gain"
        self.close_step(len(new), previous)
        return not self.stopped


def local_search(problem: Problem, errors, layout: Layout,
                 evaluate: Callable[[list[Genome], list[str]], list[Scored]],
                 config: LocalConfig, seeds: Sequence[Sequence[int]], dense_metric: float, state: dict | None = None,
                 on_step: Callable[[dict, StepReport], None] | None = None) -> LocalResult:
    """The most removal found from `seeds` by local steps, subject to the threshold.

    `evaluate(genomes, labels) -> [Scored]` scores a batch (the seeds at once, then each step's
    moves at once; `labels` name each genome's move). `errors[i][j]` is matrix i's spectral error at level j (None: no spectra, so no
    greedy or repair moves). After the seeds (step 0) and each step, `on_step(state, report)`
    gets a JSON-able state; passing it back as `state` resumes exactly. `config.budget` = 0
    scores the seeds only.
    """
    run = _Run(problem, errors, layout, dense_metric, config, evaluate, on_step)
    if state is not None:
        run.restore(state)
    else:
        run.seeds([list(s) for s in seeds])
    while not run.stopped and run.next_step():
        pass
    if not run.stopped:
        run.stopped = "budget"
    return LocalResult(genome=run.best, metric=run.seen[genome_key(run.best)].metric,
                       removed=problem.removed(run.best), evaluations=len(run.seen), steps=run.step,
                       stopped=run.stopped, reports=run.reports)
