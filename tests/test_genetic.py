"""The pure search algorithms on synthetic metrics: binary search, greedy allocation, the GA."""

import pytest

from sieve_cli.acceptance import acceptance_threshold, is_acceptable
from sieve_cli.genetic import (
    Problem,
    genetic_search,
    greedy_allocation,
    greedy_seeds,
    levels_with,
)
from sieve_cli.options import DEFAULT_LEVELS, GAConfig
from sieve_cli.uniform import binary_search, uniform_grid

N = 20  # matrices
SIZES = [1000 if i % 4 else 3000 for i in range(N)]  # uneven sizes: removal must be parameter-weighted
# half the matrices barely matter: a metric that rewards pruning them hard and sparing the rest
SENSITIVITY = [1.0 if i % 2 else 0.02 for i in range(N)]


def synthetic(levels):
    kept = [[round(size * level) for level in levels] for size in SIZES]

    def metric_of(genome):
        damage = sum(s * (1 - levels[g]) for s, g in zip(SENSITIVITY, genome))
        return 1.0 - damage / N

    return kept, metric_of


def batch(metric_of, log=None, fail_after=None):
    def evaluate(genomes):
        out = []
        for g in genomes:
            if fail_after is not None and len(log) >= fail_after:
                raise RuntimeError("killed")
            if log is not None:
                log.append(list(g))
            out.append(metric_of(g))
        return out

    return evaluate


def uniform_then_problem(tolerance=0.05):
    """Binary search the uniform p on the synthetic metric, then the GA problem seeded with it."""
    threshold = acceptance_threshold(1.0, tolerance)
    uniform = binary_search(uniform_grid(0.01), lambda p: 1.0 - (1 - p) * sum(SENSITIVITY) / N, threshold)
    levels = levels_with(DEFAULT_LEVELS, uniform.p)
    kept, metric_of = synthetic(levels)
    problem = Problem(kept=kept, total=sum(SIZES), threshold=threshold)
    seed = [levels.index(uniform.p)] * N
    return uniform, problem, metric_of, seed


@pytest.mark.parametrize("threshold_p", [0.01, 0.37, 0.5, 0.99])
def test_binary_search_finds_the_threshold(threshold_p):
    calls = []

    def metric_at(p):
        calls.append(p)
        return 1.0 if p >= threshold_p - 1e-9 else 0.0

    result = binary_search(uniform_grid(0.01), metric_at, threshold=0.5)
    assert result.p == pytest.approx(threshold_p)
    assert result.metric == 1.0
    assert len(calls) <= 7 and len(calls) == len(result.trials)


def test_binary_search_when_nothing_below_dense_is_acceptable():
    result = binary_search(uniform_grid(0.05), lambda p: 0.0, threshold=0.5)
    assert result.p == 1.0 and result.metric is None and len(result.trials) <= 5


def test_acceptance_threshold_relative_absolute_and_negative_metrics():
    assert acceptance_threshold(0.8, 0.05) == pytest.approx(0.76)
    assert acceptance_threshold(0.8, 0.05, absolute=True) == pytest.approx(0.75)
    # a negated perplexity: the threshold must lie below dense, not above
    assert acceptance_threshold(-10.0, 0.1) == pytest.approx(-11.0)
    assert is_acceptable(0.76, acceptance_threshold(0.8, 0.05)) and not is_acceptable(0.7599, 0.76)


def test_levels_with_inserts_the_uniform_answer():
    assert levels_with([1.0, 0.5, 0.1], 0.37) == [1.0, 0.5, 0.37, 0.1]
    assert levels_with([1.0, 0.5], 0.5) == [1.0, 0.5]


def test_greedy_spends_budget_where_error_falls_most_per_parameter():
    kept = [[100, 50, 10], [100, 50, 10], [400, 200, 40]]
    errors = [[0.0, 0.5, 0.9], [0.0, 0.01, 0.02], [0.0, 0.5, 0.9]]  # matrix 1 barely cares
    genome = greedy_allocation(errors, kept, budget=170)
    assert sum(k[g] for k, g in zip(kept, genome)) <= 170
    assert genome[1] == 2  # the flat-spectrum matrix stays at the least kept level
    assert genome[0] == 0  # the small steep one is bought back first (same gain, quarter the cost)
    # a generous budget restores everything; a tiny one keeps the floor
    assert greedy_allocation(errors, kept, budget=10_000) == [0, 0, 0]
    assert greedy_allocation(errors, kept, budget=0) == [2, 2, 2]
    seeds = greedy_seeds(errors, kept, total=600, removals=[0.0, 0.0, 0.5])
    assert len(seeds) == 2 and seeds[0] == [0, 0, 0]


def test_problem_fitness_ranks_acceptable_above_unacceptable():
    problem = Problem(kept=[[10, 5, 1], [30, 15, 3]], total=40, threshold=0.9)
    assert problem.removed([1, 0]) == pytest.approx(5 / 40)
    good = problem.fitness([0, 0], 0.9)  # removes nothing but is acceptable
    bad = problem.fitness([2, 2], 0.8999)  # removes 90% but misses the threshold
    worse = problem.fitness([2, 2], 0.5)
    assert good == 0.0 and bad < good and worse < bad


def run_ga(problem, metric_of, seeds, config, **kw):
    return genetic_search(problem, batch(metric_of, kw.pop("log", None), kw.pop("fail_after", None)), config, seeds, **kw)


CONFIG = GAConfig(population=12, generations=8, patience=3, seed=7)


def test_ga_is_deterministic_for_a_seed():
    uniform, problem, metric_of, seed = uniform_then_problem()
    first = run_ga(problem, metric_of, [seed], CONFIG)
    second = run_ga(problem, metric_of, [seed], CONFIG)
    assert first.genome == second.genome and first.evaluations == second.evaluations
    assert [vars(r) for r in first.reports] == [vars(r) for r in second.reports]
    other = run_ga(problem, metric_of, [seed], GAConfig(population=12, generations=8, patience=3, seed=8))
    assert other.genome != first.genome  # the seed is really used


def test_ga_improves_on_uniform_when_uneven_allocation_pays():
    uniform, problem, metric_of, seed = uniform_then_problem()
    assert 0.85 < uniform.p < 0.95
    result = run_ga(problem, metric_of, [seed], CONFIG)
    uniform_removed = problem.removed(seed)
    assert result.removed > uniform_removed + 0.04
    # it got there by pruning the insensitive matrices harder than the sensitive ones
    levels = levels_with(DEFAULT_LEVELS, uniform.p)
    kept_insensitive = sum(levels[g] for i, g in enumerate(result.genome) if SENSITIVITY[i] < 1) / (N / 2)
    kept_sensitive = sum(levels[g] for i, g in enumerate(result.genome) if SENSITIVITY[i] == 1) / (N / 2)
    assert kept_insensitive < kept_sensitive


@pytest.mark.parametrize("tolerance", [0.0, 0.01, 0.05, 0.2])
def test_ga_never_returns_an_unacceptable_plan(tolerance):
    uniform, problem, metric_of, seed = uniform_then_problem(tolerance)
    # seed also with an aggressive, unacceptable genome: it must not win
    aggressive = [problem.levels_of(i) - 1 for i in range(N)]
    result = run_ga(problem, metric_of, [aggressive, seed], CONFIG)
    assert is_acceptable(metric_of(result.genome), problem.threshold)
    assert result.metric == metric_of(result.genome)
    assert all(r.best_acceptable for r in result.reports)


def test_ga_resumes_identically_after_an_interruption():
    uniform, problem, metric_of, seed = uniform_then_problem()
    full_log = []
    full = run_ga(problem, metric_of, [seed], CONFIG, log=full_log)
    assert full.generations >= 3

    saved = {}

    def checkpoint(state, report):
        saved["state"] = state

    log = []
    kill_at = len(full_log) // 2  # in the middle of some generation
    with pytest.raises(RuntimeError, match="killed"):
        run_ga(problem, metric_of, [seed], CONFIG, log=log, fail_after=kill_at, on_generation=checkpoint)
    assert 0 <= saved["state"]["generation"] < full.generations
    import json

    state = json.loads(json.dumps(saved["state"]))  # it must survive a trip through a JSON file
    resumed = run_ga(problem, metric_of, [seed], CONFIG, state=state)
    assert resumed.genome == full.genome and resumed.metric == full.metric
    assert resumed.evaluations == full.evaluations and resumed.generations == full.generations
    assert [vars(r) for r in resumed.reports] == [vars(r) for r in full.reports]


def test_ga_stops_on_stagnation():
    # a metric nothing below dense satisfies: the best never improves past the seed
    problem = Problem(kept=[[10, 5, 1]] * 4, total=40, threshold=1.0)
    result = genetic_search(problem, lambda gs: [1.0 if all(x == 0 for x in g) else 0.0 for g in gs],
                            GAConfig(population=6, generations=50, patience=2), [[0, 0, 0, 0]])
    assert result.stopped == "stagnation" and result.generations == 2
    assert result.genome == [0, 0, 0, 0] and result.removed == 0.0
