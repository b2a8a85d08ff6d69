"""The search stage on a tiny model with a synthetic metric: plan format, resume, staleness, CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from sieve_cli import search as search_module
from sieve_cli.acceptance import is_acceptable
from sieve_cli.discover import DiscoverOptions, run_discover
from sieve_cli.errors import InputError, StaleStageError
from sieve_cli.factors import FactorSet
from sieve_cli.fit import record_fit
from sieve_cli.lowrank import fraction_for_rank
from sieve_cli.matrices import Matrix, find_matrices, weight_of
from sieve_cli.options import GAConfig, LocalConfig
from sieve_cli.plan import Plan
from sieve_cli.search import Scorer, SearchOptions, rank_at, run_search
from sieve_cli.workspace import Workspace


def target(name: str, h: int, d: int) -> Matrix:
    return Matrix(name=name, block=0, kind="q", group="attention", site="0.attn_in", out_features=h, in_features=d,
                  transposed=False, bias=False)


# q, k, gate and up barely matter to this metric, v, o and down do: uneven allocation pays
SENSITIVITY = {"q": 0.02, "k": 0.02, "v": 1.0, "o": 1.0, "gate": 0.02, "up": 0.02, "down": 1.0}


def fake_fit(ws: Workspace, model) -> None:
    """A task-blind SVD 'fit' written where fit/output keeps its files, with its manifest."""
    full, spectrum = {}, {}
    for m in find_matrices(model):
        W = weight_of(model.get_submodule(m.name)).detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        full[m.name] = ((U * S).float(), Vh.float())
        energy = (S**2).tolist()
        spectrum[m.name] = [sum(energy[r:]) / sum(energy) for r in range(len(energy) + 1)]
    record_fit(ws, "output", FactorSet("output", full=full), spectrum, {"options": {"method": "output"}})


@pytest.fixture
def ws(tmp_path, tiny_dir):
    from .tiny import tiny_model

    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(tiny_dir)))
    ws.begin("task", {"task": "synthetic"})  # search only needs the task manifest to hash
    ws.finish("task", {"task": "synthetic"}, [])
    fake_fit(ws, tiny_model("llama"))
    return ws


def synthetic_scorer(ws, calls=None, fail_after=None):
    found = json.loads(ws.matrices_json.read_text())["matrices"]
    shapes = {m["name"]: (m["kind"], m["out_features"], m["in_features"]) for m in found}

    def score(ranks):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt  # what a user's Ctrl-C looks like mid-evaluation
        if calls is not None:
            calls.append(dict(ranks))
        damage = 0.0
        for name, (kind, h, d) in shapes.items():
            damage += SENSITIVITY[kind] * (1 - fraction_for_rank(ranks.get(name), h, d))
        return 1.0 - damage / len(shapes)

    return Scorer(score=score, metric="synthetic", examples=10)


def history(ws):
    return [json.loads(line) for line in ws.history_jsonl.read_text().splitlines()]


def test_uniform_plan_format_and_threshold(ws):
    calls = []
    plan = run_search(ws, SearchOptions(method="output", strategy="uniform", tolerance=0.05), scorer=synthetic_scorer(ws, calls))
    assert len(calls) <= 8  # dense + at most 7 for a 0.01 grid
    assert plan["metric"]["dense"] == 1.0 and plan["metric"]["name"] == "synthetic"
    assert is_acceptable(plan["metric"]["plan"], 0.95)
    p = plan["search"]["uniform_p"]
    assert 0.8 < p < 1.0
    # one step below p is not acceptable: the binary search found the threshold
    below = round(p - 0.01, 2)
    history_ps = {h["p"]: h for h in history(ws)}
    if below in history_ps:
        assert not history_ps[below]["acceptable"]
    m = plan["matrices"]["model.layers.0.self_attn.q_proj"]
    assert set(m) == {"kind", "block", "kept", "rank", "params_before", "params_after"}
    assert m["kind"] == "q" and m["block"] == 0 and m["rank"] == rank_at(target("x", 32, 32), p, _full(32))
    assert m["params_after"] == m["rank"] * 64 and m["kept"] == pytest.approx(m["rank"] * 64 / 1024)
    params = plan["params"]
    assert params["prunable_before"] == sum(x["params_before"] for x in plan["matrices"].values())
    assert params["model_before"] - params["model_after"] == params["prunable_before"] - params["prunable_after"]
    assert params["removed_fraction_prunable"] > 0
    assert json.loads(ws.plan_json.read_text()) == json.loads(json.dumps(plan))
    lines = history(ws)
    assert len(lines) == len(calls) and lines[0]["p"] == 1.0
    assert all(set(h) >= {"strategy", "generation", "p", "metric", "params_after", "removed_fraction", "acceptable"} for h in lines)


def _full(h, d=None):
    """A FactorSet stand-in with a full basis of any rank."""
    class Any:
        def ranks(self, name):
            return None

        def max_rank(self, name):
            return 10**6

    return Any()


def test_rerun_is_a_noop_and_changed_options_are_stale(ws):
    run_search(ws, SearchOptions(method="output", strategy="uniform"), scorer=synthetic_scorer(ws))
    calls = []
    again = run_search(ws, SearchOptions(method="output", strategy="uniform"), scorer=synthetic_scorer(ws, calls))
    assert again["up_to_date"] and calls == []
    # the GA's knobs do not change a uniform plan
    assert run_search(ws, SearchOptions(method="output", strategy="uniform", ga=GAConfig(population=4)), scorer=synthetic_scorer(ws))["up_to_date"]
    with pytest.raises(StaleStageError, match="--force"):
        run_search(ws, SearchOptions(method="output", strategy="uniform", tolerance=0.1), scorer=synthetic_scorer(ws))
    plan = run_search(ws, SearchOptions(method="output", strategy="uniform", tolerance=0.1), force=True, scorer=synthetic_scorer(ws))
    assert plan["tolerance"] == 0.1 and history(ws)[0]["p"] == 1.0  # history restarted, not appended


GA = GAConfig(population=10, generations=10, patience=4, seed=3)
ADAPTIVE = dict(strategy="genetic", tolerance=0.05, ga=GA)
UNEVEN = ("q", "k", "gate", "up")  # the kinds the synthetic metric barely needs


@pytest.mark.parametrize("strategy", ["seeds", "local", "genetic", "adaptive"])
def test_per_matrix_strategies_give_acceptable_uneven_plans(ws, strategy):
    uniform = run_search(ws, SearchOptions(method="output", strategy="uniform", tolerance=0.05), scorer=synthetic_scorer(ws))
    plan = run_search(ws, SearchOptions(method="output", strategy=strategy, tolerance=0.05, ga=GA), force=True,
                      scorer=synthetic_scorer(ws))
    algorithm = SearchOptions(method="output", strategy=strategy).algorithm
    assert is_acceptable(plan["metric"]["plan"], 0.95) and plan["search"]["algorithm"] == algorithm
    removed = plan["params"]["removed_fraction_prunable"]
    assert removed >= uniform["params"]["removed_fraction_prunable"]
    # what the seeds reached is recorded, and the later steps/generations only add to it
    seeded = plan["search"]["seeded"]
    assert 0 <= seeded["best_removed"] <= removed + 1e-12 and is_acceptable(seeded["best_metric"], 0.95)
    lines = history(ws)
    per_matrix = [h for h in lines if h.get("genome") is not None]
    assert per_matrix and all(h["strategy"] == algorithm and len(h["genome"]) == 14 for h in per_matrix)
    assert {h["strategy"] for h in lines if h.get("p") not in (None, 1.0)} == {"uniform"}  # the uniform seed's search
    assert not ws.search_checkpoint.exists()
    if algorithm == "seeds":
        assert {h["generation"] for h in per_matrix} == {0}
        return
    # beyond the seeds, the uneven metric pays: well past uniform, the insensitive kinds pruned harder
    assert removed > uniform["params"]["removed_fraction_prunable"] + 0.03
    blocks = Plan.parse(plan).kept_by_block()
    qk = [blocks[b][k] for b in blocks for k in UNEVEN]
    rest = [blocks[b][k] for b in blocks for k in ("v", "o", "down")]
    assert sum(qk) / len(qk) < sum(rest) / len(rest)


def test_local_beats_its_seeds_and_records_each_step(ws):
    calls = []
    options = SearchOptions(method="output", strategy="local", tolerance=0.05, local=LocalConfig(moves=3, budget=12))
    plan = run_search(ws, options, scorer=synthetic_scorer(ws, calls))
    search = plan["search"]
    progress = search["progress"]
    assert progress[0]["step"] == 0 and progress[0]["best_removed"] == search["seeded"]["best_removed"]
    assert plan["params"]["removed_fraction_prunable"] > search["seeded"]["best_removed"]
    # each step's report adds up: the removal after step k is the seeds' plus what the steps added
    for k, report in enumerate(progress[1:], start=1):
        assert report["best_removed"] == pytest.approx(progress[0]["best_removed"] + sum(
            r["added"] for r in progress[1:k + 1]))
    assert progress[-1]["best_removed"] == pytest.approx(plan["params"]["removed_fraction_prunable"])
    lines = [h for h in history(ws) if h.get("genome") is not None]
    stepped = [h for h in lines if h["generation"] > 0]
    assert len(stepped) <= 12 and {h["move"] for h in lines if h["generation"] == 0} == {"seed"}
    assert all(h["move"] != "seed" for h in stepped) and len(calls) == len(history(ws))
    # the best plan's move is the one history logged for its genome
    best = progress[-1]
    assert best["move"] in {h["move"] for h in stepped}


def test_local_scores_each_step_as_one_batch(ws):
    batches = []
    pooled = synthetic_scorer(ws)
    pooled.score_many = lambda batch: (batches.append(len(batch)), [pooled.score(r) for r in batch])[1]
    options = SearchOptions(method="output", strategy="local", tolerance=0.05, local=LocalConfig(moves=4, budget=12))
    serial = run_search(ws, options, scorer=synthetic_scorer(ws))
    serial_history = history(ws)
    again = run_search(ws, options, force=True, scorer=pooled)
    assert again["matrices"] == serial["matrices"] and history(ws) == serial_history
    steps = again["search"]["progress"]
    # the uniform search goes in pairs (a probe and the one after its failure), then the seeds as
    # one batch, and each step's moves as one batch of at most --local-moves (the uniform answer
    # among the seeds was already scored by the uniform search: memoised)
    seeds_at = next(i for i, b in enumerate(batches) if b > 2)
    assert batches[:seeds_at] == [2] * seeds_at
    assert batches[seeds_at] == steps[0]["new_evaluations"] - 1 > 1
    after = batches[seeds_at + 1:]
    assert after == [r["new_evaluations"] for r in steps[1:]] and all(1 < b <= 4 for b in after)


def test_uniform_search_on_a_pool_scores_the_next_probe_beside_each_and_logs_the_serial_history(ws):
    options = SearchOptions(method="output", strategy="uniform", tolerance=0.05)
    serial_calls = []
    serial = run_search(ws, options, scorer=synthetic_scorer(ws, serial_calls))
    serial_history = history(ws)
    batches, calls = [], []
    pooled = synthetic_scorer(ws, calls)
    pooled.score_many = lambda batch: (batches.append([dict(r) for r in batch]), [pooled.score(r) for r in batch])[1]
    again = run_search(ws, options, force=True, scorer=pooled)
    assert again["matrices"] == serial["matrices"] and history(ws) == serial_history
    # dense went with the first probe; each later probe with the one that follows its failure, so the
    # search took fewer rounds than evaluations; a speculative score never asked for is not in the history
    rounds = len(batches) + (len(calls) - sum(len(b) for b in batches))
    assert batches[0][0] == serial_calls[0] and batches[0][1] == serial_calls[1]
    assert rounds < len(serial_calls) and len(history(ws)) == len(serial_calls)
    assert len(calls) >= len(serial_calls)


def harsher(scorer, factor):
    """The synthetic metric with `factor` times its damage: a confirm part where the plan breaks."""
    score = scorer.score
    scorer.score = lambda ranks: 1.0 - factor * (1.0 - score(ranks))
    return scorer


def test_confirm_backs_off_on_a_pool_with_the_serial_history_in_fewer_rounds(ws):
    options = SearchOptions(method="output", strategy="uniform", tolerance=0.05)
    serial_calls = []
    serial = run_search(ws, options, scorer=synthetic_scorer(ws), confirm_scorer=harsher(synthetic_scorer(ws, serial_calls), 3))
    serial_history = history(ws)
    assert serial["search"]["confirm"]["back_off"] > 0.1  # it had to back off more than one step
    batches, calls = [], []
    pooled = harsher(synthetic_scorer(ws, calls), 3)
    pooled.score_many = lambda batch: (batches.append(len(batch)), [pooled.score(r) for r in batch])[1]
    pooled.layout = {"workers": 2}
    again = run_search(ws, options, force=True, scorer=synthetic_scorer(ws), confirm_scorer=pooled)
    assert again["matrices"] == serial["matrices"] and history(ws) == serial_history
    assert again["search"]["confirm"] == serial["search"]["confirm"]
    rounds = len(batches) + len(calls) - sum(batches)
    assert all(b == 2 for b in batches) and rounds < len(serial_calls)


def test_confirm_scores_dense_and_the_plan_together(ws):
    batches = []
    confirm = synthetic_scorer(ws)
    confirm.score_many = lambda batch: (batches.append(len(batch)), [confirm.score(r) for r in batch])[1]
    plan = run_search(ws, SearchOptions(method="output", strategy="uniform", tolerance=0.05), scorer=synthetic_scorer(ws),
                      confirm_scorer=confirm)
    assert batches[0] == 2 and plan["search"]["confirm"]["back_off"] == 0.0


@pytest.mark.parametrize("strategy, key", [("genetic", "ga"), ("local", "local")])
def test_killed_search_resumes_with_the_same_result(ws, tmp_path, strategy, key):
    import shutil

    options = SearchOptions(method="output", strategy=strategy, tolerance=0.05, ga=GA, local=LocalConfig(moves=3, budget=12))
    fresh = Workspace(tmp_path / "fresh")
    shutil.copytree(ws.root, fresh.root)
    full_calls = []
    full = run_search(fresh, options, scorer=synthetic_scorer(fresh, full_calls))

    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_search(ws, options, scorer=synthetic_scorer(ws, calls, fail_after=len(full_calls) * 2 // 3))
    checkpoint = json.loads(ws.search_checkpoint.read_text())
    assert checkpoint[key]["generation" if key == "ga" else "step"] >= 0 and checkpoint["dense"] == 1.0
    resumed_calls = []
    resumed = run_search(ws, options, scorer=synthetic_scorer(ws, resumed_calls))
    assert resumed["matrices"] == full["matrices"] and resumed["metric"] == full["metric"]
    # the evaluations logged before the kill are reused from history; only the finished part of the
    # batch it interrupted is scored again (a batch is logged when it completes), and logged once
    again = len(calls) + len(resumed_calls) - len(full_calls)
    assert 0 <= again < (GA.population if strategy == "genetic" else options.local.moves)
    assert history(ws) == history(fresh)
    strip = lambda plan: {k: v for k, v in plan["search"].items() if k not in ("seconds", "evaluated_now")}  # noqa: E731
    assert strip(resumed) == strip(full)


def test_another_strategy_is_not_stale_and_keeps_the_first_plan(ws):
    adaptive = run_search(ws, SearchOptions(method="output", strategy="adaptive", tolerance=0.05), scorer=synthetic_scorer(ws))
    adaptive_history = ws.history_jsonl.read_text()
    uniform = run_search(ws, SearchOptions(method="output", strategy="uniform", tolerance=0.05), scorer=synthetic_scorer(ws))
    assert not uniform.get("up_to_date") and uniform["strategy"] == "uniform"
    kept = ws.root / "search" / "adaptive"
    assert json.loads((kept / "plan.json").read_text()) == json.loads(json.dumps(adaptive))
    assert (kept / "history.jsonl").read_text() == adaptive_history
    # asking for adaptive again brings its plan back: nothing is scored
    calls = []
    back = run_search(ws, SearchOptions(method="output", strategy="adaptive", tolerance=0.05), scorer=synthetic_scorer(ws, calls))
    assert calls == [] and back["up_to_date"] and back["matrices"] == adaptive["matrices"]
    assert ws.history_jsonl.read_text() == adaptive_history
    assert json.loads((ws.root / "search" / "uniform" / "plan.json").read_text())["strategy"] == "uniform"
    # a later stage sees a complete, consistent search stage
    assert ws.require("search")["inputs"]["options"]["strategy"] == "adaptive"
    # the local search's knobs do not make a genetic plan stale, nor the GA's a local one
    assert run_search(ws, SearchOptions(method="output", strategy="adaptive", tolerance=0.05, ga=GAConfig(population=4)),
                      scorer=synthetic_scorer(ws))["up_to_date"]
    # another tolerance is another question on the same strategy: still refused without --force
    with pytest.raises(StaleStageError, match="--force"):
        run_search(ws, SearchOptions(method="output", strategy="uniform", tolerance=0.2), scorer=synthetic_scorer(ws))


def test_learned_fit_snaps_to_trained_ranks():
    fs = FactorSet("learned", fixed={"m": {4: (torch.zeros(32, 4), torch.zeros(4, 32)),
                                            8: (torch.zeros(32, 8), torch.zeros(8, 32))}})
    t = target("m", 32, 32)
    assert rank_at(t, 1.0, fs) is None
    assert rank_at(t, 0.5, fs) == 8  # wants 8
    assert rank_at(t, 0.4, fs) == 4  # wants 6: the largest trained rank within the fraction
    assert rank_at(t, 0.1, fs) == 4  # wants 1: none within, the smallest trained


@pytest.mark.parametrize("bad, flag", [(dict(strategy="greedy"), "--strategy"), (dict(tolerance=1.5), "--tolerance"),
                                       (dict(levels=(0.5, 2.0)), "--levels"), (dict(limit=-1), "--limit")])
def test_bad_options_name_the_flag(bad, flag):
    with pytest.raises(InputError, match=flag):
        SearchOptions(**bad)


def test_the_default_width_search_on_a_pairs_workspace_names_the_fit_it_has(ws):
    from typer.testing import CliRunner

    from sieve_cli.cli import app

    result = CliRunner().invoke(app, ["search", "-w", str(ws.root)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert "has no finished width fit" in line and "--method width" in line and "--method output" in line


def test_cli_search_renders_plan(ws, monkeypatch):
    from sieve_cli.cli import app

    monkeypatch.setattr(search_module, "build_scorers", lambda ws_, options, factors, *cleanup: (synthetic_scorer(ws_), None))
    result = CliRunner().invoke(app, ["search", "-w", str(ws.root), "--method", "output", "--strategy", "adaptive", "--population", "6",
                                      "--generations", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "removed" in result.output and "down" in result.output
    assert json.loads(ws.plan_json.read_text())["strategy"] == "adaptive"
    result = CliRunner().invoke(app, ["search", "-w", str(ws.root), "--method", "output", "--strategy", "uniform", "--tolerance", "0.2"])
    assert result.exit_code == 1 and "--force" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["search", "-w", str(ws.root), "--method", "output", "--strategy", "bogus"])
    assert result.exit_code == 1 and "--strategy" in result.output


@pytest.mark.slow
def test_both_strategies_on_real_smollm2(smollm2_gguf, data_root, tmp_path):
    """A short real run: tiny capture, closed-form fit, a coarse uniform and a one-step local search."""
    from sieve_cli.capture import CaptureOptions, run_capture
    from sieve_cli.discover import load_workspace_model
    from sieve_cli.evaluate import evaluate, prepare
    from sieve_cli.fit import FitOptions, load_factors, run_fit
    from sieve_cli.pruned import plan_ranks, prune_in_memory
    from sieve_cli.tasks import bind_task

    from .conftest import REPO

    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(smollm2_gguf)))
    run_capture(ws, CaptureOptions(task=str(REPO / "examples" / "tasks" / "sst2.yaml"), tokens=2048))
    run_fit(ws, FitOptions(method="output"))
    common = dict(tolerance=0.1, limit=16, grid_step=0.25, allow_chance=True)  # 16 examples: not enough to clear the guard
    uniform = run_search(ws, SearchOptions(method="output", strategy="uniform", **common))
    assert len(uniform["matrices"]) == 210 and len(history(ws)) <= 4
    adaptive = run_search(ws, SearchOptions(method="output", strategy="adaptive", local=LocalConfig(moves=2, budget=2), **common),
                          force=True)
    assert adaptive["params"]["removed_fraction_prunable"] >= uniform["params"]["removed_fraction_prunable"]
    assert is_acceptable(adaptive["metric"]["plan"], adaptive["metric"]["dense"] * 0.9)
    # the plan's ranks, swapped in again, reproduce the metric the search recorded
    model, tokenizer = load_workspace_model(ws)
    prepared = prepare(bind_task(ws, None), "search", tokenizer, limit=16)
    restore = prune_in_memory(model, plan_ranks(adaptive), load_factors(ws, "output"))
    assert evaluate(model, prepared, show_progress=False).value == adaptive["metric"]["plan"]
    restore()


def test_batched_scorer_gives_the_serial_plan_and_history(ws, tmp_path):
    """A scorer with a pool (`score_many`) gets each generation's new candidates in one batch,
    and the plan and history equal the one-at-a-time search's."""
    options = SearchOptions(method="output", strategy="genetic", ga=GAConfig(population=6, generations=2, patience=2, seed=3))
    serial = run_search(ws, options, scorer=synthetic_scorer(ws))
    serial_history = history(ws)

    batches = []
    pooled = synthetic_scorer(ws)
    pooled.score_many = lambda batch: (batches.append(len(batch)), [pooled.score(r) for r in batch])[1]
    again = run_search(ws, options, force=True, scorer=pooled)
    strip = lambda plan: {k: v for k, v in plan["search"].items() if k not in ("seconds",)}  # noqa: E731
    assert again["matrices"] == serial["matrices"] and strip(again) == strip(serial)
    assert history(ws) == serial_history
    assert max(batches) > 1  # a generation's new candidates really went to the pool together


def test_search_killed_between_the_dense_line_and_its_checkpoint_logs_dense_once(ws, tmp_path, monkeypatch):
    """The dense line is in history.jsonl, the checkpoint that would hold it is not: the rerun scores
    dense again (the checkpoint keeps its per-example scores) but does not log it a second time."""
    import shutil

    options = SearchOptions(method="output", strategy="uniform", tolerance=0.05)
    fresh = Workspace(tmp_path / "fresh")
    shutil.copytree(ws.root, fresh.root)
    run_search(fresh, options, scorer=synthetic_scorer(fresh))

    def killed(path, obj):
        raise KeyboardInterrupt  # the first checkpoint write: right after dense was logged

    with monkeypatch.context() as patch:
        patch.setattr(search_module, "write_json_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            run_search(ws, options, scorer=synthetic_scorer(ws))
    assert len(history(ws)) == 1 and not ws.search_checkpoint.exists()
    run_search(ws, options, scorer=synthetic_scorer(ws))
    assert [entry["p"] for entry in history(ws)].count(1.0) == 1
    assert history(ws) == history(fresh)
