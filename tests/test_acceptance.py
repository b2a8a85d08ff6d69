"""The acceptance rule (paired with dense, at a confidence), the confirm part's back-off, the chance guard."""

import json
import math

import numpy as np
import pytest

from sieve_cli.acceptance import Measurement, judge, paired_drop, z_for
from sieve_cli.errors import InputError
from sieve_cli.options import SearchOptions
from sieve_cli.search import Scorer, run_search

from .test_search import SENSITIVITY, history, ws  # noqa: F401 - the fixture


def flips(n: int, correct: int, lost: int) -> tuple[Measurement, Measurement]:
    """Dense right on `correct` of `n` examples; the candidate loses `lost` of them, nothing else changes."""
    dense = [1.0] * correct + [0.0] * (n - correct)
    cand = [0.0] * lost + [1.0] * (correct - lost) + [0.0] * (n - correct)
    return (Measurement(sum(dense) / n, tuple(dense), (1.0,) * n),
            Measurement(sum(cand) / n, tuple(cand), (1.0,) * n))


def test_a_drop_within_tolerance_on_the_point_estimate_but_not_with_confidence_is_rejected():
    dense, cand = flips(100, 80, 3)  # 0.80 -> 0.77: a 3.75% relative drop, inside a 5% tolerance
    threshold = dense.value * (1 - 0.05)
    assert cand.value >= threshold
    assert judge(dense, cand, 0.5).lower >= threshold  # the point estimate accepts it
    verdict = judge(dense, cand, 0.9)
    assert verdict.lower < threshold  # 90% confidence does not
    # the bound is dense - (mean paired drop + z * its standard error), computed independently here
    d = np.array(dense.scores) - np.array(cand.scores)
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert verdict.drop == pytest.approx(d.mean()) and verdict.se == pytest.approx(se)
    assert verdict.lower == pytest.approx(dense.value - d.mean() - 1.2815515655446004 * se)


def test_pairing_cancels_what_both_models_get_wrong_alike():
    dense, cand = flips(100, 80, 0)
    assert paired_drop(dense, cand) == (0.0, 0.0)  # same answers: no drop, no doubt
    # with token weights the drop is the token-weighted difference, and examples are the clusters
    d = Measurement(0.5, (1.0, 0.0, 0.5), (2.0, 1.0, 4.0))
    c = Measurement(0.25, (0.5, 0.0, 0.25), (2.0, 1.0, 4.0))
    drop, se = paired_drop(d, c)
    assert drop == pytest.approx((2 * 0.5 + 4 * 0.25) / 7) and se > 0


def test_without_per_example_scores_the_point_value_is_judged():
    verdict = judge(Measurement(0.8), Measurement(0.78), 0.95)
    assert verdict.lower == 0.78 and verdict.se == 0
    assert z_for(0.5) == 0.0 and z_for(0.9) == pytest.approx(1.2816, abs=1e-4)


def paired_scorer(ws,  # noqa: F811 - a workspace, not the fixture
                  n=200, steepness=1.0, calls=None, chance=None):
    """Per-example scores: example i is right (dense is right on 90%) until the damage passes its own level."""
    found = json.loads(ws.matrices_json.read_text())["matrices"]
    from sieve_cli.ranks import fraction_for_rank

    levels = np.linspace(0.01, 1.0, n)

    def score(ranks):
        if calls is not None:
            calls.append(dict(ranks))
        damage = sum(SENSITIVITY[m["kind"]] * (1 - fraction_for_rank(ranks.get(m["name"]), m["out_features"],
                                                                      m["in_features"])) for m in found) / len(found)
        right = tuple(float(i % 10 != 0 and steepness * damage < levels[i]) for i in range(n))
        extra = {} if chance is None else {"chance": chance, "ci_low": chance - 0.05}
        return Measurement(sum(right) / n, right, (1.0,) * n, extra=extra)

    return Scorer(score=score, metric="accuracy", examples=n)


def test_higher_confidence_gives_a_denser_plan(ws):  # noqa: F811
    loose = run_search(ws, SearchOptions(method="output", tolerance=0.05, confidence=0.5), scorer=paired_scorer(ws))
    strict = run_search(ws, SearchOptions(method="output", tolerance=0.05, confidence=0.95), scorer=paired_scorer(ws), force=True)
    assert strict["params"]["removed_fraction_prunable"] < loose["params"]["removed_fraction_prunable"]
    assert strict["search"]["confidence"] == 0.95
    # the accepted plan's lower bound is what the tolerance held, and it lies below its point value
    assert strict["search"]["lower"] >= strict["metric"]["dense"] * 0.95 - 1e-12
    assert strict["search"]["lower"] < strict["metric"]["plan"]


def test_the_confirm_part_backs_off_toward_dense_and_stops_at_the_first_plan_that_holds(ws):  # noqa: F811
    # on the confirm part the task is three times as sensitive as on the search part
    plan = run_search(ws, SearchOptions(method="output", tolerance=0.05, confidence=0.5), scorer=paired_scorer(ws),
                      confirm_scorer=paired_scorer(ws, steepness=3.0))
    confirm = plan["search"]["confirm"]
    steps = [e for e in history(ws) if e["strategy"] == "confirm"]
    assert len(steps) >= 2 and confirm["back_off"] > 0  # the search's plan broke the tolerance there
    assert [e["step"] for e in steps] == sorted(e["step"] for e in steps)  # always toward dense
    assert not any(e["acceptable"] for e in steps[:-1]) and steps[-1]["acceptable"]  # stopped at the first that held
    assert steps[-1]["step"] == confirm["back_off"] and confirm["lower"] >= confirm["threshold"]
    removed = [e["removed_fraction"] for e in steps]
    assert removed == sorted(removed, reverse=True)  # each step keeps more
    assert plan["params"]["removed_fraction_prunable"] == pytest.approx(removed[-1])
    # the plan records its search-part figure too (the backed-off plan, scored on the search part)
    assert plan["metric"]["plan"] >= plan["metric"]["dense"] * 0.95


def test_a_plan_that_holds_on_the_confirm_part_is_kept(ws):  # noqa: F811
    plan = run_search(ws, SearchOptions(method="output", tolerance=0.05, confidence=0.5), scorer=paired_scorer(ws),
                      confirm_scorer=paired_scorer(ws))
    assert plan["search"]["confirm"]["back_off"] == 0.0
    assert len([e for e in history(ws) if e["strategy"] == "confirm"]) == 1


def test_a_task_at_chance_stops_the_search_with_one_line(ws):  # noqa: F811
    with pytest.raises(InputError, match="not clearly above the task's chance.*--allow-chance"):
        run_search(ws, SearchOptions(method="output"), scorer=paired_scorer(ws, chance=0.9))
    plan = run_search(ws, SearchOptions(method="output", allow_chance=True), scorer=paired_scorer(ws, chance=0.9), force=True)
    assert plan["params"]["removed_fraction_prunable"] >= 0


def test_chance_guard_counts_the_majority_answer_not_only_chance():
    """trec: 6 choices (chance 0.167) but one class is 28% of the examples; 0.264 on 125 examples is
    above chance and still no better than always giving that class."""
    from sieve_cli.evaluate import wilson_interval
    from sieve_cli.search import check_above_chance

    low = wilson_interval(33, 125)[0]
    dense = Measurement(33 / 125, extra={"chance": 1 / 6, "majority": 0.28, "ci_low": low})
    assert 1 / 6 < low < 0.28
    with pytest.raises(InputError, match="chance/majority level 0.280"):
        check_above_chance(dense, "accuracy", allow=False)
    check_above_chance(dense, "accuracy", allow=True)
    check_above_chance(Measurement(0.9, extra={"chance": 0.5, "majority": 0.55, "ci_low": 0.85}), "accuracy", False)
