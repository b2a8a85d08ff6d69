"""The local search's pure parts against independent references: the damage line (numpy least
squares), the ranking, and the search against a brute-force optimum on a small additive problem."""

import itertools

import numpy as np
import pytest

from sieve_cli.genetic import Problem
from sieve_cli.local import Layout, Move, Scored, damage_model, greedy_lowering, local_search, rank_moves
from sieve_cli.options import LocalConfig


def test_damage_line_is_least_squares_through_the_origin_and_the_limit_splits_the_verdicts():
    points = [(0.1, 0.02, True), (0.3, 0.05, True), (0.5, 0.11, False), (0.9, 0.2, False)]
    x = np.array([[e] for e, _, _ in points], dtype=np.float64)
    y = np.array([d for _, d, _ in points], dtype=np.float64)
    reference = np.linalg.lstsq(x, y, rcond=None)[0][0]
    slope, limit = damage_model(points)
    assert slope == pytest.approx(reference, rel=1e-12)
    assert limit == pytest.approx((0.05 + 0.11) / 2)
    # nothing failed yet: no limit; noise crossed the verdicts: the smallest failure bounds it
    assert damage_model(points[:2])[1] == float("inf")
    assert damage_model([(0.1, 0.3, True), (0.2, 0.1, False)])[1] == pytest.approx(0.1)


def test_greedy_lowering_spends_the_removal_where_the_spectra_are_cheapest():
    # three matrices of equal size; lowering matrix 1 costs no error, matrix 2 a lot
    problem = Problem(kept=[[100, 50, 10]] * 3, total=300, threshold=0.0)
    errors = [[0.0, 0.2, 0.5], [0.0, 0.0, 0.01], [0.0, 0.9, 1.0]]
    child = greedy_lowering(errors, problem, [0, 0, 0], budget=200)
    assert problem.params_after(child) <= 200
    assert child == [1, 2, 0]  # matrix 1 to the bottom first (90 removed for 0.01), then matrix 0 one level


def test_ranking_puts_predicted_failures_last_and_mixes_move_kinds():
    problem = Problem(kept=[[10, 5, 1]] * 4, total=40, threshold=0.0)
    errors = [[0.0, 0.1, 0.5]] * 4
    best = [0, 0, 0, 0]
    big = Move("big", "kind", [2, 2, 2, 2], best)  # removes most, predicted far above the limit
    greedy = [Move(f"g{i}", "greedy", [1] * i + [0] * (4 - i), best) for i in range(1, 4)]
    chosen = rank_moves([big, *greedy], problem, errors, lambda genome: 0.0, slope=1.0, limit=0.35, take=3)
    # the largest predicted-acceptable moves (predicted damage 0.3, 0.2, 0.1 against 0.35), at most
    # two of one kind while another kind is left: the predicted failure beats the third greedy move
    assert chosen == [greedy[2], greedy[1], big]
    tighter = rank_moves([big, *greedy], problem, errors, lambda genome: 0.0, slope=1.0, limit=0.25, take=3)
    assert tighter == [greedy[1], greedy[0], big]  # 0.3 > 0.25: the largest greedy move is predicted to fail


def additive_problem():
    """Four matrices, three levels; the metric drops by a known amount per matrix and level."""
    kept = [[40, 20, 5], [40, 20, 5], [20, 10, 2], [20, 10, 2]]
    drop = [[0.0, 0.01, 0.08], [0.0, 0.04, 0.2], [0.0, 0.002, 0.01], [0.0, 0.03, 0.05]]
    problem = Problem(kept=kept, total=120, threshold=0.95)
    metric = lambda genome: 1.0 - sum(drop[i][g] for i, g in enumerate(genome))  # noqa: E731
    return problem, drop, metric


def test_local_search_finds_the_brute_force_optimum_of_an_additive_problem():
    problem, drop, metric = additive_problem()
    optimum = max((g for g in itertools.product(range(3), repeat=4) if metric(g) >= 0.95 - 1e-12),
                  key=problem.removed)
    batches = []

    def evaluate(genomes, labels):
        batches.append(len(genomes))
        return [Scored(metric(g), 1.0 - metric(g)) for g in genomes]

    # spectral errors that rank the matrices like the true damage, scaled: the search must still
    # find where the limit lies from what it scores
    errors = [[3 * d for d in row] for row in drop]
    result = local_search(problem, errors, Layout([0, 0, 1, 1], ["q", "k", "q", "k"]), evaluate,
                          LocalConfig(moves=3, budget=30), seeds=[[0, 0, 0, 0]], dense_metric=1.0)
    assert metric(result.genome) >= 0.95 - 1e-12
    assert result.removed == pytest.approx(problem.removed(optimum))
    assert batches[0] == 1 and all(b <= 3 for b in batches[1:]) and sum(batches[1:]) <= 30
    assert result.reports[-1].best_removed == result.removed and result.reports[0].step == 0


def test_a_budget_of_zero_scores_the_seeds_only():
    problem, _, metric = additive_problem()
    seeds = [[0, 0, 0, 0], [1, 0, 1, 0], [2, 2, 2, 2]]
    result = local_search(problem, None, Layout([0] * 4, ["q"] * 4),
                          lambda gs, labels: [Scored(metric(g)) for g in gs], LocalConfig(budget=0), seeds,
                          dense_metric=1.0)
    assert result.genome == [1, 0, 1, 0] and result.steps == 0 and result.stopped == "budget"
    assert result.evaluations == 3


@pytest.mark.parametrize("patience", [1, 2])
def test_a_step_without_gain_ends_the_search_only_after_patience_such_steps(patience):
    problem, drop, metric = additive_problem()
    calls = []

    def evaluate(genomes, labels):  # the first step's moves all fail (as a noisy batch might)
        calls.append(len(genomes))
        failing = len(calls) == 2
        return [Scored(0.0 if failing else metric(g), 1.0 if failing else 1.0 - metric(g)) for g in genomes]

    result = local_search(problem, [[3 * d for d in row] for row in drop], Layout([0, 0, 1, 1], ["q", "k", "q", "k"]),
                          evaluate, LocalConfig(moves=2, budget=30, patience=patience), seeds=[[0, 0, 0, 0]],
                          dense_metric=1.0)
    assert result.reports[1].added == 0.0 and result.reports[1].step == 1
    if patience == 1:
        assert result.stopped == "no gain" and result.steps == 1 and result.removed == 0.0
    else:  # the second step finds what the first missed
        assert result.steps >= 2 and result.reports[2].added > 0 and metric(result.genome) >= 0.95 - 1e-12


def test_local_patience_below_one_is_refused():
    from sieve_cli.errors import InputError
    with pytest.raises(InputError, match="--local-patience"):
        LocalConfig(patience=0)
