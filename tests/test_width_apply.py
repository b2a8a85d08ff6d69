"""Width plans on tiny models: narrowed modules in memory, the standard folder plain transformers loads,
the custom folder for per-layer widths, removed blocks, and the width fit stage."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sieve_cli.apply import ApplyOptions, run_apply
from sieve_cli.discover import DiscoverOptions, run_discover
from sieve_cli.factors import FactorSet
from sieve_cli.fit import record_fit
from sieve_cli.matrices import find_matrices, weight_of
from sieve_cli.modeling import MODELING_FILE
from sieve_cli.models import load_model
from sieve_cli.narrowing import width_units
from sieve_cli.plan import Plan
from sieve_cli.pruned import SIEVE_JSON, load_pruned, prune_in_memory
from sieve_cli.width import width_basis
from sieve_cli.workspace import Workspace

from .tiny import save_tiny

IDS = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(4))


def out_grams(model, units) -> dict:
    """The Gram of each unit's out matrix's input over a few random sequences (what capture records)."""
    grams, hooks = {}, []
    for u in units:
        def hook(_, args, name=u.name):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            grams[name] = grams.get(name, 0) + x.T @ x
        hooks.append(model.get_submodule(u.out).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.randint(3, 100, (8, 24), generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    return grams


def width_workspace(tmp_path, family):
    folder = save_tiny(tmp_path / family, family)
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(folder)))
    model, _ = load_model(str(folder))
    units = width_units(find_matrices(model), model.config.model_type, model.config)
    grams = out_grams(model, units)
    factors = FactorSet("width")
    for u in units:
        factors.widths[u.name] = (u, width_basis(weight_of(model.get_submodule(u.out)), grams[u.name], u.unit_size))
        factors.blocks[u.name] = u.block
    spectrum = {u.name: factors.basis(u.name).relative().tolist() for u in units}
    record_fit(ws, "width", factors, spectrum, {"options": {"method": "width"}})
    return ws, model, units, factors


def write_width_plan(ws, units, widths) -> Path:
    total = json.loads(ws.matrices_json.read_text())["total_params"]
    plan = Plan.build(strategy="uniform", method="width", tolerance=0.05, absolute=False, matrices=units,
                      ranks=widths, model_total=total, metric="accuracy", dense=1.0, plan_metric=1.0)
    path = ws.root.parent / "plan.json"
    plan.save(path)
    return path


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


FAMILIES = ["llama", "gpt2", "gemma3_text"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_reproduces_dense_and_uniform_width_is_a_standard_folder(tmp_path, family):
    ws, model, units, factors = width_workspace(tmp_path, family)
    dense = logits(model)
    whole = {u.name: u.units for u in units}  # every unit kept: the refit is W itself
    restore = prune_in_memory(model, whole, factors)
    assert torch.allclose(logits(model), dense, atol=1e-4)
    restore()
    half = {u.name: u.units // 2 for u in units}
    restore = prune_in_memory(model, half, factors)
    pruned = logits(model)
    restore()
    assert not torch.allclose(pruned, dense, atol=1e-3)
    out = tmp_path / "out"
    result = run_apply(ws, ApplyOptions(out=out, plan=write_width_plan(ws, units, half)))
    assert result["standard"] is not None and not (out / MODELING_FILE).exists()
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == model.config.model_type
    mlp_units = next(u.units for u in units if u.kind == "mlp")
    assert config.get("intermediate_size", config.get("n_inner")) == mlp_units // 2
    if family != "gpt2":
        assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 2
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert torch.allclose(logits(plain), pruned, atol=1e-4)
    assert torch.allclose(logits(load_pruned(out)), pruned, atol=1e-4)
    assert result["params_after"] == sum(p.numel() for p in plain.parameters())


def test_per_layer_widths_use_the_custom_folder_and_reload(tmp_path):
    ws, model, units, factors = width_workspace(tmp_path, "llama")
    widths = {u.name: (u.units // 2 if u.block == 0 else u.units // 4) if u.kind == "mlp" else None for u in units}
    widths["model.layers.1.self_attn"] = 0  # attention of block 1 skipped, its MLP kept narrower
    restore = prune_in_memory(model, widths, factors)
    pruned = logits(model)
    restore()
    out = tmp_path / "out"
    result = run_apply(ws, ApplyOptions(out=out, plan=write_width_plan(ws, units, widths)))
    assert result["standard"] is None and (out / MODELING_FILE).exists()
    recorded = json.loads((out / SIEVE_JSON).read_text())["factored"]
    assert recorded["model.layers.1.self_attn"] == {"type": "skip"}
    assert recorded["model.layers.0.mlp.down_proj"]["in_features"] == 32
    assert torch.allclose(logits(load_pruned(out)), pruned, atol=1e-4)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.allclose(logits(remote), pruned, atol=1e-4)


def test_a_block_with_both_units_removed_is_gone_from_the_standard_folder(tmp_path):
    ws, model, units, factors = width_workspace(tmp_path, "gemma3_text")
    widths = {u.name: 0 if u.block == 0 else u.units // 2 for u in units}
    restore = prune_in_memory(model, widths, factors)
    pruned = logits(model)
    restore()
    out = tmp_path / "out"
    result = run_apply(ws, ApplyOptions(out=out, plan=write_width_plan(ws, units, widths)))
    assert result["standard"]["removed_blocks"] == [0]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == model.config.num_hidden_layers - 1
    assert len(config["layer_types"]) == config["num_hidden_layers"]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(plain), pruned, atol=1e-4)


def test_width_units_cover_every_matrix_once_and_count_its_parameters():
    from .tiny import tiny_model

    for family in ("llama", "qwen3", "phi3", "gpt2", "opt", "gpt_neox"):
        model = tiny_model(family)
        matrices = find_matrices(model)
        units = width_units(matrices, model.config.model_type, model.config)
        covered = [n for u in units for n in (*(r for r, _ in u.rows), u.out)]
        assert len(covered) == len(set(covered))
        by_name = {m.name: m for m in matrices}
        assert sum(u.params for u in units) == sum(by_name[n].params for n in covered), family


def width_scorer(units, calls=None, fail_after=None):
    """A metric that MLP 0 barely affects and attention affects a lot: an uneven plan pays."""
    cost = {u.name: (0.02 if (u.kind, u.block) == ("mlp", 0) else 0.5 if u.kind == "mlp" else 1.0) for u in units}

    def score(widths):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        if calls is not None:
            calls.append(dict(widths))
        return 1.0 - sum(cost[u.name] * (1 - u.kept_at(widths.get(u.name))) for u in units) / len(units)

    from sieve_cli.search import Scorer
    return Scorer(score=score, metric="synthetic", examples=10)


def test_width_search_keeps_attention_whole_in_uniform_and_adaptive_goes_further(tmp_path):
    from sieve_cli.search import SearchOptions, run_search

    ws, _, units, _ = width_workspace(tmp_path, "llama")
    ws.begin("task", {"task": "synthetic"})
    ws.finish("task", {"task": "synthetic"}, [])
    uniform = run_search(ws, SearchOptions(method="width", strategy="uniform", tolerance=0.05),
                         scorer=width_scorer(units))
    entries = uniform["matrices"]
    assert set(entries) == {u.name for u in units} and all("width" in e and "rank" not in e for e in entries.values())
    assert all(e["width"] is None for e in entries.values() if e["kind"] == "attention")
    assert any(e["width"] is not None and e["width"] < e["units"] for e in entries.values() if e["kind"] == "mlp")
    adaptive = run_search(ws, SearchOptions(method="width", strategy="adaptive", tolerance=0.05),
                          scorer=width_scorer(units))
    assert adaptive["params"]["removed_fraction_model"] > uniform["params"]["removed_fraction_model"]
    kept = {n: e["kept"] for n, e in adaptive["matrices"].items()}
    assert kept["model.layers.0.mlp"] < kept["model.layers.1.mlp"]  # the cheap MLP loses more
    assert Plan.parse(adaptive).ranks() == {n: e["width"] for n, e in adaptive["matrices"].items()}


def test_killed_width_search_resumes_to_the_same_plan(tmp_path):
    import shutil

    from sieve_cli.search import SearchOptions, run_search

    ws, _, units, _ = width_workspace(tmp_path, "llama")
    ws.begin("task", {"task": "synthetic"})
    ws.finish("task", {"task": "synthetic"}, [])
    fresh = Workspace(tmp_path / "fresh")
    shutil.copytree(ws.root, fresh.root)
    options = SearchOptions(method="width", strategy="adaptive", tolerance=0.05)
    full_calls = []
    full = run_search(fresh, options, scorer=width_scorer(units, full_calls))
    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_search(ws, options, scorer=width_scorer(units, calls, fail_after=len(full_calls) * 2 // 3))
    resumed = run_search(ws, options, scorer=width_scorer(units))
    assert resumed["matrices"] == full["matrices"] and resumed["params"] == full["params"]


@pytest.mark.parametrize("standard", [True, False])
def test_width_folders_quantize_to_int8_and_reload_close(tmp_path, standard):
    pytest.importorskip("torchao")
    ws, model, units, factors = width_workspace(tmp_path, "llama")
    widths = {u.name: u.units // 2 if (standard or u.block == 0) else u.units // 4 for u in units}
    restore = prune_in_memory(model, widths, factors)
    pruned = logits(model)
    restore()
    plan = write_width_plan(ws, units, widths)
    floats = run_apply(ws, ApplyOptions(out=tmp_path / "float", plan=plan))
    result = run_apply(ws, ApplyOptions(out=tmp_path / "int8", plan=plan, quantize="int8"), force=True)
    assert (result["standard"] is not None) == standard
    assert result["file_bytes"] < floats["file_bytes"]
    reloaded = load_pruned(tmp_path / "int8")
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    assert (logits(reloaded) - pruned).abs().max() < 0.05 * pruned.abs().max()


def test_lm_eval_runs_a_standard_folder_without_remote_code(tmp_path):
    from sieve_cli.lm_eval_task import lm_eval_model_args

    ws, _, units, _ = width_workspace(tmp_path, "llama")
    run_apply(ws, ApplyOptions(out=tmp_path / "out", plan=write_width_plan(ws, units, {u.name: 1 for u in units})))
    args = lm_eval_model_args(ws, str(tmp_path / "out"), None)
    assert "trust_remote_code" not in args and args["pretrained"] == str((tmp_path / "out").resolve())


def test_cli_run_with_the_width_method_ends_in_a_folder_that_reloads(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from sieve_cli.cli import app

    from .test_tasks import write_task

    task = write_task(tmp_path, "text_modelling")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tiny_dir), "--task", str(task), "-w", str(tmp_path / "ws"), "-o",
                                      str(out), "--tokens", "2000", "--max-search", "6", "--max-test", "6",
                                      "--method", "width", "--strategy", "uniform"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / SIEVE_JSON).read_text())
    assert info["fit_method"] == "width" and info["plan"]["method"] == "width"
    assert json.loads((tmp_path / "ws" / "fit" / "width" / "manifest.json").read_text())["complete"]
    load_pruned(out)
    bad = CliRunner().invoke(app, ["search", "-w", str(tmp_path / "ws"), "--method", "widths"])
    assert bad.exit_code != 0 and "--method must be one of" in bad.output and "Traceback" not in bad.output


def test_depth_scan_finds_the_block_a_task_can_lose(tmp_path):
    from sieve_cli.search import Scorer, SearchOptions, run_search

    ws, _, units, _ = width_workspace(tmp_path, "llama")
    ws.begin("task", {"task": "synthetic"})
    ws.finish("task", {"task": "synthetic"}, [])

    def score(widths):  # block 1 does nothing for this task; block 0 is all it needs
        return 1.0 - sum((1 - u.kept_at(widths.get(u.name))) for u in units if u.block == 0)

    plan = run_search(ws, SearchOptions(method="width", strategy="adaptive", tolerance=0.05),
                      scorer=Scorer(score=score, metric="synthetic", examples=10))
    assert {n: e["width"] for n, e in plan["matrices"].items() if e["block"] == 1} == {
        "model.layers.1.mlp": 0, "model.layers.1.self_attn": 0}
    depth = [json.loads(line) for line in ws.history_jsonl.read_text().splitlines()
             if json.loads(line)["strategy"] == "depth"]
    assert [e["move"] for e in depth] == ["drop block 0", "drop block 1"]
    assert [e["acceptable"] for e in depth] == [False, True]


def test_heal_trains_the_narrowed_modules_and_apply_healed_keeps_the_standard_folder(tmp_path):
    from sieve_cli.heal import run_heal
    from sieve_cli.tasks import DEFAULT_TASK, bind_task

    from .test_heal import FAST, calibration_rows, mean_ce

    ws, model, units, factors = width_workspace(tmp_path, "llama")
    bind_task(ws, DEFAULT_TASK)
    widths = {u.name: u.units // 2 for u in units}
    path = write_width_plan(ws, units, widths)
    ws.begin("search", {"plan": "width"}, force=True)
    ws.plan_json.write_text(path.read_text())
    ws.finish("search", {"plan": "width"}, [ws.plan_json])
    summary = run_heal(ws, replace(FAST, steps=30))
    assert summary["last_loss"] < summary["first_loss"] and summary["adapter_params"] > 0
    plain = run_apply(ws, ApplyOptions(out=tmp_path / "pruned"))
    healed = run_apply(ws, ApplyOptions(out=tmp_path / "healed", healed=True))
    assert healed["standard"] is not None and healed["params_after"] == plain["params_after"]
    rows = calibration_rows(ws, FAST.seq_len)
    before = mean_ce(AutoModelForCausalLM.from_pretrained(tmp_path / "pruned"), rows)
    after = mean_ce(AutoModelForCausalLM.from_pretrained(tmp_path / "healed"), rows)
    assert after < 0.97 * before, (before, after)


def test_uniform_shape_search_drops_harmless_blocks_and_writes_a_standard_folder(tmp_path):
    from sieve_cli.search import Scorer, SearchOptions, run_search

    ws, model, units, factors = width_workspace(tmp_path, "llama")
    ws.begin("task", {"task": "synthetic"})
    ws.finish("task", {"task": "synthetic"}, [])

    def score(widths):  # block 1 does nothing; block 0's MLP costs a little per neuron, its attention a lot
        mlp0, attn0 = (1 - u.kept_at(widths.get(u.name)) for u in sorted(
            (u for u in units if u.block == 0), key=lambda u: u.kind != "mlp"))
        return 1.0 - 0.08 * mlp0 - 1.0 * attn0

    plan = run_search(ws, SearchOptions(method="width", strategy="adaptive", tolerance=0.05, uniform_shape=True),
                      scorer=Scorer(score=score, metric="synthetic", examples=10))
    entries = plan["matrices"]
    assert entries["model.layers.1.mlp"]["width"] == 0 and entries["model.layers.1.self_attn"]["width"] == 0
    assert entries["model.layers.0.self_attn"]["width"] is None  # its whole-group cut fails
    mlp = entries["model.layers.0.mlp"]
    assert 0 < mlp["width"] < mlp["units"]  # lowered again once block 1 was gone
    moves = [json.loads(line).get("move") for line in ws.history_jsonl.read_text().splitlines()]
    assert "drop block 1" in moves and any(str(m).startswith("attention") for m in moves)
    result = run_apply(ws, ApplyOptions(out=tmp_path / "out"))
    assert result["standard"] is not None and result["standard"]["removed_blocks"] == [1]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    restore = prune_in_memory(model, Plan.parse(plan).ranks(), factors)
    assert torch.allclose(logits(plain), logits(model), atol=1e-4)
    restore()


def test_uniform_shape_needs_the_width_method():
    from sieve_cli.errors import InputError
    from sieve_cli.search import SearchOptions

    with pytest.raises(InputError, match="--uniform-shape needs --method width"):
        SearchOptions(method="output", uniform_shape=True)
