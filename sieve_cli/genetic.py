"""The genetic algorithm over per-matrix kept levels, and the greedy seeds it starts from; pure.

Nothing here touches a model, a file or a clock. The caller supplies the metric as a
callback and gets back plain data, so the algorithms are tested with synthetic metrics
and the stage (`search.py`) only wires them to the evaluator.

A *genome* is a list of level indices, one per matrix, into a level list sorted from
most kept (index 0, normally 1.0 = dense) to least kept. `kept[i][j]` is the number of
parameters matrix i keeps at level j, so removal is parameter-weighted, never an
average of genes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .acceptance import is_acceptable
from .options import GAConfig

Genome = list[int]


def levels_with(levels: Sequence[float], p: float) -> list[float]:
    """`levels` with `p` added, most kept first: the uniform answer must be a genome the GA can hold."""
    return sorted(set(map(float, levels)) | {float(p)}, reverse=True)


# ---- the problem: parameter counts per level --------------------------------------------
@dataclass(frozen=True)
class Problem:
    """What the GA optimises: `kept[i][j]` params of matrix i at level j, and the threshold."""

    kept: list[list[int]]
    total: int  # parameters of the prunable matrices when dense
    threshold: float

    @property
    def genes(self) -> int:
        return len(self.kept)

    def levels_of(self, i: int) -> int:
        return len(self.kept[i])

    def params_after(self, genome: Sequence[int]) -> int:
        return sum(self.kept[i][g] for i, g in enumerate(genome))

    def removed(self, genome: Sequence[int]) -> float:
        return 1.0 - self.params_after(genome) / self.total

    def fitness(self, genome: Sequence[int], metric: float) -> float:
        """Acceptable: the fraction removed, in [0, 1). Unacceptable: below -1, by shortfall.

        Ranking the unacceptable by how far they miss keeps selection pressure towards
        the threshold without ever letting one beat an acceptable candidate.
        """
        if is_acceptable(metric, self.threshold):
            return self.removed(genome)
        scale = max(abs(self.threshold), 1e-12)
        return -1.0 - (self.threshold - metric) / scale


# ---- greedy allocation from the fit spectra -------------------------------------------------
def greedy_allocation(errors: Sequence[Sequence[float]], kept: Sequence[Sequence[int]], budget: int) -> Genome:
    """Levels that keep at most `budget` parameters, spending them where error falls most per parameter.

    `errors[i][j]`: matrix i's relative output error at level j (levels from most to least
    kept). Starts from the least-kept level everywhere and repeatedly takes the move (to
    any more-kept level of one matrix) with the largest error removed per parameter added
    that still fits; looking past the next level copes with spectra that are not convex.
    """
    n = len(kept)
    genome = [len(k) - 1 for k in kept]
    spent = sum(kept[i][genome[i]] for i in range(n))

    def best_move(i: int) -> tuple[float, int, int]:
        """(error removed per parameter, target level, cost) of matrix i's best affordable move."""
        here = genome[i]
        best = (-math.inf, here, 0)
        for j in range(here):
            cost = kept[i][j] - kept[i][here]
            gain = errors[i][here] - errors[i][j]
            if cost > 0 and spent + cost <= budget and gain > 0 and gain / cost > best[0]:
                best = (gain / cost, j, cost)
        return best

    moves = [best_move(i) for i in range(n)]
    while True:
        # the budget only shrinks, so a cached best move that is still affordable is still the best
        for k in range(n):
            if moves[k][0] > -math.inf and spent + moves[k][2] > budget:
                moves[k] = best_move(k)
        i = max(range(n), key=lambda k: moves[k][0], default=None)
        if i is None or moves[i][0] == -math.inf:
            return genome
        spent += moves[i][2]
        genome[i] = moves[i][1]
        moves[i] = best_move(i)


def greedy_seeds(errors, kept, total: int, removals: Sequence[float]) -> list[Genome]:
    """One greedy allocation per target removal fraction, duplicates dropped."""
    seeds: list[Genome] = []
    for removal in removals:
        genome = greedy_allocation(errors, kept, int(total * (1.0 - removal)))
        if genome not in seeds:
            seeds.append(genome)
    return seeds


# ---- the genetic algorithm ------------------------------------------------------------------
@dataclass
class GenerationReport:
    generation: int
    best_removed: float
    best_metric: float
    best_acceptable: bool
    evaluations: int  # distinct genomes evaluated so far
    new_evaluations: int  # in this generation


@dataclass
class GAResult:
    genome: Genome
    metric: float
    removed: float
    evaluations: int
    generations: int  # completed, counting the initial population as generation 0
    stopped: str  # "generations" | "stagnation"
    reports: list[GenerationReport] = field(default_factory=list)


def genome_key(genome: Sequence[int]) -> str:
    return ",".join(map(str, genome))


def mutate(genome: Sequence[int], problem: Problem, rng: random.Random, expected: float,
           prune_bias: float = 0.5) -> Genome:
    """Move genes one level, each with probability expected / genes (at least one moves);
    down (less kept) with probability `prune_bias`, else up."""
    child = list(genome)
    rate = min(1.0, expected / max(1, problem.genes))
    chosen = [i for i in range(problem.genes) if rng.random() < rate] or [rng.randrange(problem.genes)]
    for i in chosen:
        top = problem.levels_of(i) - 1
        step = 1 if rng.random() < prune_bias else -1
        if not 0 <= child[i] + step <= top:
            step = -step
        child[i] = min(top, max(0, child[i] + step))
    return child


def crossover(a: Sequence[int], b: Sequence[int], rng: random.Random) -> Genome:
    """One-point: the first genes (early blocks) from one parent, the rest from the other."""
    if len(a) < 2:
        return list(a)
    cut = rng.randrange(1, len(a))
    return list(a[:cut]) + list(b[cut:])


def tournament(population: list[Genome], scores: list[float], rng: random.Random, size: int) -> Genome:
    picks = [rng.randrange(len(population)) for _ in range(size)]
    return population[max(picks, key=lambda k: (scores[k], -k))]


class _Run:
    """The GA's state, kept as JSON-able data so a checkpoint restores it exactly."""

    def __init__(self, problem: Problem, config: GAConfig, evaluate, on_generation) -> None:
        self.problem, self.config = problem, config
        self.evaluate, self.on_generation = evaluate, on_generation
        self.rng = random.Random(config.seed)
        self.cache: dict[str, float] = {}
        self.population: list[Genome] = []
        self.generation = -1
        self.best_fitness = -math.inf
        self.stagnant = 0
        self.reports: list[GenerationReport] = []

    # -- checkpoint ------------------------------------------------------------------------
    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "generation": self.generation,
            "population": [list(g) for g in self.population],
            "cache": dict(self.cache),
            "rng": [version, list(internal), gauss],
            "best_fitness": self.best_fitness,
            "stagnant": self.stagnant,
            "reports": [vars(r) for r in self.reports],
        }

    def restore(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.generation = state["generation"]
        self.population = [list(g) for g in state["population"]]
        self.cache = dict(state["cache"])
        self.best_fitness = state["best_fitness"]
        self.stagnant = state["stagnant"]
        self.reports = [GenerationReport(**r) for r in state["reports"]]

    # -- steps -----------------------------------------------------------------------------
    def fitness(self, genome: Genome) -> float:
        return self.problem.fitness(genome, self.cache[genome_key(genome)])

    def best(self) -> Genome:
        """The best genome ever evaluated; ties go to the higher metric, then the earlier."""
        keys = list(self.cache)
        genomes = [[int(x) for x in k.split(",")] for k in keys]
        order = max(range(len(keys)), key=lambda k: (self.fitness(genomes[k]), self.cache[keys[k]], -k))
        return genomes[order]

    def fresh(self, genome: Genome, taken: list[Genome]) -> bool:
        return genome_key(genome) not in self.cache and genome not in taken

    def initial_population(self, seeds: list[Genome]) -> list[Genome]:
        population: list[Genome] = []
        for seed in seeds:
            if list(seed) not in population:
                population.append(list(seed))
        population = population[: self.config.population]
        k = 0
        while len(population) < self.config.population:
            # mutants of the seeds, not random genomes: at random levels almost every
            # candidate removes ~half the model and fails the tolerance, wasting evaluations
            child = mutate(seeds[k % len(seeds)], self.problem, self.rng, 2 * self.config.mutations,
                           self.config.prune_bias)
            k += 1
            if child not in population or k > 50 * self.config.population:
                population.append(child)
        return population

    def children(self) -> list[Genome]:
        config = self.config
        scores = [self.fitness(g) for g in self.population]
        ranked = sorted(range(len(self.population)), key=lambda k: (-scores[k], k))
        nxt = [self.population[k] for k in ranked[: config.elite]]
        while len(nxt) < config.population:
            for _ in range(20):  # prefer a child not seen yet: a cache hit teaches nothing
                a = tournament(self.population, scores, self.rng, config.tournament)
                b = tournament(self.population, scores, self.rng, config.tournament)
                child = crossover(a, b, self.rng) if self.rng.random() < config.crossover_rate else list(a)
                child = mutate(child, self.problem, self.rng, config.mutations, config.prune_bias)
                if self.fresh(child, nxt):
                    break
            nxt.append(child)
        return nxt

    def score(self, population: list[Genome]) -> int:
        todo: list[Genome] = []
        for genome in population:
            if genome_key(genome) not in self.cache and genome not in todo:
                todo.append(genome)
        if todo:
            for genome, metric in zip(todo, self.evaluate(todo), strict=True):
                self.cache[genome_key(genome)] = float(metric)
        return len(todo)

    def close_generation(self, new: int) -> None:
        best = self.best()
        fitness = self.fitness(best)
        self.stagnant = 0 if fitness > self.best_fitness + 1e-12 else self.stagnant + 1
        self.best_fitness = max(self.best_fitness, fitness)
        metric = self.cache[genome_key(best)]
        self.reports.append(GenerationReport(
            generation=self.generation, best_removed=self.problem.removed(best), best_metric=metric,
            best_acceptable=is_acceptable(metric, self.problem.threshold),
            evaluations=len(self.cache), new_evaluations=new,
        ))
        if self.on_generation is not None:
            self.on_generation(self.state(), self.reports[-1])


def genetic_search(
    problem: Problem,
    evaluate: Callable[[list[Genome]], list[float]],
    config: GAConfig,
    seeds: Sequence[Sequence[int]],
    state: dict | None = None,
    on_generation: Callable[[dict, GenerationReport], None] | None = None,
) -> GAResult:
    """Maximise the parameter-weighted removal subject to the metric threshold.

    `evaluate(genomes) -> metrics` scores a batch of new genomes (the seam where a pool of
    workers can take over). `seeds` start the population (the uniform answer first); the
    rest are mutants of the seeds. After each generation `on_generation(state, report)`
    receives a JSON-able state; passing it back as `state` resumes exactly, so a killed
    run continues to the same result. The best genome ever evaluated is returned.
    """
    if not seeds:
        raise ValueError("the genetic search needs at least one seed genome")
    run = _Run(problem, config, evaluate, on_generation)
    if state is not None:
        run.restore(state)
    else:
        run.population = run.initial_population([list(s) for s in seeds])
        run.generation = 0
        run.close_generation(run.score(run.population))
    stopped = "generations"
    while run.generation < config.generations:
        if run.stagnant >= config.patience:
            stopped = "stagnation"
            break
        run.population = run.children()
        run.generation += 1
        run.close_generation(run.score(run.population))
    best = run.best()
    return GAResult(
        genome=best, metric=run.cache[genome_key(best)], removed=problem.removed(best),
        evaluations=len(run.cache), generations=run.generation, stopped=stopped, reports=run.reports,
    )
