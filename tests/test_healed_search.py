"""The healed search on a tiny model: candidates judged after healing, a memo apart from the unhealed one,
the plan recording its recipe, and `sieve heal` with the same steps rebuilding the very model it judged."""

import json

import pytest

from sieve_cli.apply import ApplyOptions, run_apply
from sieve_cli.discover import load_workspace_model
from sieve_cli.errors import InputError
from sieve_cli.evaluate import EvalOptions, run_eval
from sieve_cli.fit import load_factors
from sieve_cli.heal import calibration_sequences, healed_copy, run_heal
from sieve_cli.options import HealOptions
from sieve_cli.plan import Plan
from sieve_cli.pruned import load_pruned
from sieve_cli.search import SearchOptions, heal_recipe, run_search
from sieve_cli.tasks import DEFAULT_TASK, bind_task

from .test_width_apply import logits, width_scorer, width_workspace

pytest.importorskip("peft")

LIMIT = 8


def healed_options(**kw) -> SearchOptions:
    return SearchOptions(method="width", strategy="uniform", tolerance=0.05, heal_steps=3, limit=LIMIT,
                         allow_chance=True, **kw)


def healed_workspace(tmp_path, monkeypatch, scales=(0.5,)):
    """A tiny width workspace whose unhealed search is a synthetic metric (a random model's real one is flat)
    and whose healed search scores the real task on `scales` only."""
    import sieve_cli.search as search

    ws, _, units, _ = width_workspace(tmp_path, "llama")
    bind_task(ws, DEFAULT_TASK)
    monkeypatch.setattr(search, "HEAL_SCALES", scales)
    return ws, width_scorer(units)


def history(ws) -> list[dict]:
    return [json.loads(line) for line in ws.history_jsonl.read_text().splitlines()]


def test_a_healed_search_judges_healed_candidates_and_heal_rebuilds_the_judged_model(tmp_path, monkeypatch):
    ws, scorer = healed_workspace(tmp_path, monkeypatch)
    plan = run_search(ws, healed_options(), scorer=scorer)
    healed = plan["search"]["healed"]
    assert healed["steps"] == 3 and healed["reference"] == "dense" and healed["recipe"]["loss"] == "ce"
    assert healed["scale"] == 0.5 and healed["heals"] == 1
    entries = history(ws)
    assert [e["strategy"] for e in entries if e.get("healed")][:2] == ["reference", "healed"]
    assert not any(e.get("healed") for e in entries if e["strategy"] == "uniform")
    widths = {n: e["width"] for n, e in plan["matrices"].items() if e["kind"] == "mlp"}
    assert all(0 < w < plan["matrices"][n]["units"] for n, w in widths.items())
    assert plan["params"]["removed_fraction_prunable"] > healed["unhealed_removed"] > 0

    # `sieve heal` with the search's steps and `apply --healed` build the very model the search judged
    run_heal(ws, HealOptions(steps=3))
    run_apply(ws, ApplyOptions(out=tmp_path / "healed", healed=True))
    run_apply(ws, ApplyOptions(out=tmp_path / "unhealed"))
    model, tokenizer = load_workspace_model(ws, None, "cpu")
    recipe = heal_recipe(healed_options())
    sequences, _ = calibration_sequences(ws, tokenizer, recipe.seq_len, recipe.steps * recipe.batch_size)
    judged = healed_copy(model, Plan.parse(plan).ranks(), load_factors(ws, "width"), recipe, sequences, 0)
    built, unhealed = load_pruned(tmp_path / "healed"), load_pruned(tmp_path / "unhealed")
    assert (logits(built) - logits(judged)).abs().max() < 1e-5
    assert (logits(unhealed) - logits(judged)).abs().max() > 1e-4  # the heal changed the model
    scored = run_eval(ws, EvalOptions(split="search", limit=LIMIT, model=str(tmp_path / "healed")))
    assert scored["value"] == pytest.approx(next(e for e in entries if e["strategy"] == "healed")["metric"])


def test_a_killed_healed_search_resumes_without_healing_again(tmp_path, monkeypatch):
    import sieve_cli.scorers as scorers

    ws, scorer = healed_workspace(tmp_path, monkeypatch, scales=(0.25, 0.5, 0.75))
    calls = []
    real = scorers.healed_copy

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scorers, "healed_copy", counting)
    with pytest.raises(KeyboardInterrupt):
        run_search(ws, healed_options(), scorer=scorer)
    assert len([e for e in history(ws) if e["strategy"] == "healed"]) == 1
    calls.clear()
    monkeypatch.setattr(scorers, "healed_copy", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = run_search(ws, healed_options(), scorer=scorer)
    scales = [e["scale"] for e in history(ws) if e["strategy"] == "healed"]
    assert len(scales) == len(set(scales)) == plan["search"]["healed"]["heals"]  # none healed twice
    assert len(calls) == len(scales) - 1 + len([e for e in history(ws) if e.get("healed") and e["strategy"] == "confirm"
                                                and e["removed_fraction"] > 0])


def test_the_healed_dense_reference_is_scored_once_and_recorded(tmp_path, monkeypatch):
    ws, scorer = healed_workspace(tmp_path, monkeypatch)
    plan = run_search(ws, healed_options(reference="healed-dense"), scorer=scorer)
    assert plan["search"]["healed"]["reference"] == "healed-dense"
    references = [e for e in history(ws) if e["strategy"] == "reference"]
    assert len(references) == 1 and references[0]["healed"]
    checkpoint_free = not ws.search_checkpoint.exists()
    assert checkpoint_free


@pytest.mark.parametrize("kw, message", [
    (dict(reference="healed-dense"), "--reference healed-dense compares healed plans"),
    (dict(heal_steps=-1), "--heal-steps must be >= 0"),
    (dict(reference="other", heal_steps=2), "--reference must be one of dense, healed-dense"),
    (dict(heal_steps=2, workers=2), "drop --workers"),
])
def test_bad_healed_search_options_are_one_line(kw, message):
    with pytest.raises(InputError, match=message):
        SearchOptions(**kw)
