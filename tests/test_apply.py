"""The apply stage on a tiny model: files written, counts, guards, no-op rerun, dry run, CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from sieve_cli import apply as apply_module
from sieve_cli.apply import DENSE_ABOVE, ApplyOptions, run_apply, storage_layout
from sieve_cli.cli import app
from sieve_cli.discover import DiscoverOptions, run_discover
from sieve_cli.errors import InputError, MissingStageError
from sieve_cli.lowrank import LowRankLinear, lowrank_params
from sieve_cli.matrices import Matrix
from sieve_cli.models import load_model
from sieve_cli.plan import Plan
from sieve_cli.pruned import (
    SIEVE_JSON,
    WEIGHTS,
    count_params,
    load_pruned,
    plan_ranks,
    prune_in_memory,
)
from sieve_cli.ranks import rank_for_fraction
from sieve_cli.workspace import Workspace

from .test_pruned import svd_factors

runner = CliRunner()
IDS = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(4))


def write_fit(ws: Workspace, model, method="output") -> None:
    """SVD factors where fit/<method> keeps them, with a finished manifest (the basis does not matter here)."""
    from sieve_cli.fit import record_fit

    factors = svd_factors(model)
    factors.method = method
    record_fit(ws, method, factors, {}, {"options": {"method": method}})


def write_plan(ws: Workspace, kept: dict[str, float], method="output") -> dict:
    """A plan in the format search writes: kept fraction per matrix kind (1.0: dense)."""
    found = json.loads(ws.matrices_json.read_text())
    records = [Matrix.from_dict(m) for m in found["matrices"]]
    ranks = {m.name: rank_for_fraction(kept[m.kind], m.out_features, m.in_features) for m in records}
    plan = Plan.build(strategy="uniform", method=method, tolerance=0.05, absolute=False, matrices=records,
                      ranks=ranks, model_total=found["total_params"], metric="accuracy", dense=1.0, plan_metric=1.0)
    ws.begin("search", {"plan": kept}, force=True)
    plan.save(ws.plan_json)
    ws.finish("search", {"plan": kept}, [ws.plan_json])
    plan = plan.data
    return plan


# q and gate keep 0.9 (slow to factor: stored as B·A by default), the others are factored or dense
KEPT = {"q": 0.9, "k": 0.5, "v": 0.4, "o": 1.0, "gate": 0.9, "up": 0.3, "down": 0.6}


@pytest.fixture
def ws(tmp_path, tiny_dir):
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(tiny_dir)))
    write_fit(ws, load_model(tiny_dir)[0])
    return ws


def in_memory_logits(ws, tiny_dir):
    """What search scores: the workspace's model with the plan swapped in, in memory."""
    from sieve_cli.fit import load_factors

    model, _ = load_model(tiny_dir)
    prune_in_memory(model, plan_ranks(json.loads(ws.plan_json.read_text())), load_factors(ws, "output"))
    with torch.no_grad():
        return model(IDS).logits, count_params(model)


def logits_of(folder):
    with torch.no_grad():
        return load_pruned(folder)(IDS).logits


def test_default_factors_all_and_reproduces_the_in_memory_model_exactly(ws, tiny_dir, tmp_path):
    plan = write_plan(ws, KEPT)
    result = run_apply(ws, ApplyOptions(out=tmp_path / "out"))
    expected, params = in_memory_logits(ws, tiny_dir)
    assert torch.equal(logits_of(tmp_path / "out"), expected)
    assert result["params_after"] == params == plan["params"]["model_after"]
    assert result["matrices"] == {"factored": 12, "product": 0, "dense": 2}
    info = json.loads((tmp_path / "out" / SIEVE_JSON).read_text())
    assert info["fit_method"] == "output" and info["plan"] == plan and info["base_model"]["kind"] == "local"
    for name in ("config.json", "tokenizer.json", WEIGHTS):
        assert (tmp_path / "out" / name).exists()


def test_slow_to_factor_matrices_are_stored_as_the_dense_product(ws, tiny_dir, tmp_path):
    write_plan(ws, KEPT)
    result = run_apply(ws, ApplyOptions(out=tmp_path / "out", dense_above=DENSE_ABOVE))
    assert result["matrices"] == {"factored": 8, "product": 4, "dense": 2}
    model = load_pruned(tmp_path / "out")
    assert not isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), LowRankLinear)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), LowRankLinear)
    expected, params = in_memory_logits(ws, tiny_dir)
    torch.testing.assert_close(logits_of(tmp_path / "out"), expected, rtol=1e-5, atol=1e-5)  # same map, rounded once
    dense_q = 32 * 32  # the product keeps the dense size
    assert result["params_after"] == params + 4 * dense_q - 2 * lowrank_params(14, 32, 32) - 2 * lowrank_params(19, 64, 32) + 2 * (64 * 32 - dense_q)


def test_dry_run_predicts_the_real_numbers_and_writes_nothing(ws, tmp_path):
    write_plan(ws, KEPT)
    out = tmp_path / "out"
    predicted = run_apply(ws, ApplyOptions(out=out, dry_run=True))
    assert predicted["predicted"] and not out.exists() and ws.read_manifest("apply") is None
    real = run_apply(ws, ApplyOptions(out=out))
    for key in ("params_before", "params_after", "prunable_before", "prunable_after", "matrices"):
        assert predicted[key] == real[key], key
    assert real["file_bytes"] == pytest.approx(predicted["file_bytes"], rel=0.1)  # the header is the difference
    assert real["params_after"] < real["params_before"]


def test_guards_on_the_output_folder(ws, tiny_dir, tmp_path):
    write_plan(ws, KEPT)
    with pytest.raises(InputError, match="inside the input model's folder"):
        run_apply(ws, ApplyOptions(out=tiny_dir / "pruned"))
    with pytest.raises(InputError, match="inside the input model's folder"):
        run_apply(ws, ApplyOptions(out=tiny_dir), force=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for force in (False, True):  # files apply did not write are never replaced, --force or not
        with pytest.raises(InputError, match=r"not empty.*notes.txt"):
            run_apply(ws, ApplyOptions(out=busy), force=force)
    assert (busy / "notes.txt").read_text() == "mine" and not (busy / SIEVE_JSON).exists()


def test_rerun_is_a_no_op_and_a_deleted_output_is_rebuilt(ws, tmp_path, monkeypatch):
    import shutil

    write_plan(ws, KEPT)
    out = tmp_path / "out"
    first = run_apply(ws, ApplyOptions(out=out))
    loads = []
    real = apply_module.load_factors
    monkeypatch.setattr(apply_module, "load_factors", lambda *a: loads.append(a) or real(*a))
    again = run_apply(ws, ApplyOptions(out=out))
    assert again["up_to_date"] and again["params_after"] == first["params_after"] and not loads
    shutil.rmtree(out)
    run_apply(ws, ApplyOptions(out=out))
    assert loads and (out / WEIGHTS).exists()


def test_changed_plan_needs_force(ws, tmp_path):
    from sieve_cli.errors import StaleStageError

    write_plan(ws, KEPT)
    run_apply(ws, ApplyOptions(out=tmp_path / "out"))
    write_plan(ws, {**KEPT, "o": 0.5})
    with pytest.raises((StaleStageError, InputError), match="--force"):
        run_apply(ws, ApplyOptions(out=tmp_path / "out"))
    result = run_apply(ws, ApplyOptions(out=tmp_path / "out"), force=True)
    assert result["matrices"]["dense"] == 0


def test_missing_search_names_the_command(ws, tmp_path):
    with pytest.raises(MissingStageError, match="sieve search"):
        run_apply(ws, ApplyOptions(out=tmp_path / "out"))


def test_plan_file_option_and_bad_plans(ws, tmp_path):
    plan = write_plan(ws, KEPT)
    other = tmp_path / "plan.json"
    plan["matrices"]["model.layers.0.mlp.nonsense"] = {"rank": 2}
    other.write_text(json.dumps(plan))
    with pytest.raises(InputError, match="not a prunable matrix"):
        run_apply(ws, ApplyOptions(out=tmp_path / "out", plan=other))
    with pytest.raises(InputError, match="no plan file"):
        run_apply(ws, ApplyOptions(out=tmp_path / "out", plan=tmp_path / "missing.json"))
    with pytest.raises(InputError, match="--dense-above"):
        ApplyOptions(out=tmp_path / "out", dense_above=0)


def test_storage_layout_by_kept_fraction():
    matrices = {n: Matrix(n, 0, "q", "attention", "0.attn_in", 100, 100, False, False) for n in "abc"}
    ranks = {"a": None, "b": 45, "c": 20}  # b keeps 0.9, c keeps 0.4
    assert storage_layout(ranks, matrices, 0.8) == {"a": "dense", "b": "product", "c": "factored"}
    assert storage_layout(ranks, matrices, 1.0) == {"a": "dense", "b": "factored", "c": "factored"}


def test_cli_apply_prints_counts_and_dry_run_json(ws, tmp_path):
    write_plan(ws, KEPT)
    out = tmp_path / "out"
    result = runner.invoke(app, ["apply", "-w", str(ws.root), "-o", str(out), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["predicted"] and not out.exists()
    result = runner.invoke(app, ["apply", "-w", str(ws.root), "-o", str(out)])  # default: factor every planned matrix
    assert result.exit_code == 0, result.output
    assert "parameters (whole model)" in result.output and f"{data['params_before']:,}" in result.output
    assert "12 factored" in result.output
    result = runner.invoke(app, ["apply", "-w", str(ws.root), "-o", str(tmp_path)])  # holds the workspace
    assert result.exit_code == 1 and "outside the workspace" in result.output


def test_saved_model_scores_what_search_scored_in_memory(ws, tiny_dir, tmp_path):
    """The acceptance check: the metric of OUT on the search split equals the in-memory pruned model's."""
    from sieve_cli.evaluate import EvalOptions, evaluate, prepare, run_eval
    from sieve_cli.fit import load_factors
    from sieve_cli.tasks import STDLIB_TASK, bind_task

    plan = write_plan(ws, KEPT)
    bound = bind_task(ws, STDLIB_TASK)
    model, tokenizer = load_model(tiny_dir)
    prepared = prepare(bound, "search", tokenizer, limit=12)
    prune_in_memory(model, plan_ranks(plan), load_factors(ws, "output"))
    in_memory = evaluate(model, prepared, show_progress=False)
    run_apply(ws, ApplyOptions(out=tmp_path / "out", dense_above=DENSE_ABOVE))  # the 0.9-kept matrices stored as B·A
    saved = run_eval(ws, EvalOptions(split="search", limit=12, model=str(tmp_path / "out")))
    assert saved["metric"] == in_memory.metric and saved["n"] == in_memory.n
    assert saved["value"] == in_memory.value
    assert saved["extra"]["perplexity"] == pytest.approx(in_memory.extra["perplexity"], rel=1e-5)


def test_a_gguf_input_allows_output_beside_it_but_not_over_it(tmp_path):
    from sieve_cli.apply import base_folder, guard_out
    from sieve_cli.workspace import Workspace

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    ws = Workspace(tmp_path / "ws")
    ws.begin("discover", {"options": {"model": str(gguf)}})
    ws.finish("discover", {"options": {"model": str(gguf)}}, [])
    base = base_folder(ws)
    guard_out(ws, tmp_path / "pruned", base, force=False, inputs_sha="x")  # beside the .gguf: fine
    with pytest.raises(InputError, match="inside the input model's folder"):
        guard_out(ws, gguf.resolve(), base, force=True, inputs_sha="x")
    with pytest.raises(InputError, match="holds the input model|overlaps the workspace"):
        guard_out(ws, tmp_path, base, force=True, inputs_sha="x")
