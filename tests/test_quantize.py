"""`apply --quantize int8`: the weights stored as int8, reloaded alike by sieve and by transformers."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sieve_cli.api import TransformerPruner
from sieve_cli.apply import ApplyOptions, run_apply
from sieve_cli.cli import app
from sieve_cli.errors import InputError
from sieve_cli.lowrank import LowRankLinear
from sieve_cli.matrices import weight_of
from sieve_cli.models import model_identity
from sieve_cli.options import RunOptions
from sieve_cli.pruned import WEIGHTS, load_pruned, plan_ranks, prune_in_memory, read_sieve_json, save_pruned
from sieve_cli.workspace import Stage, Workspace

from .test_apply import IDS as APPLY_IDS
from .test_apply import KEPT, in_memory_logits, write_plan, ws  # noqa: F401  (ws is a fixture)
from .test_pruned import IDENTITY, IDS, logits, random_plan, svd_factors
from .test_remote_code import pruned_folder
from .test_tasks import write_task
from .tiny import tiny_model, tiny_tokenizer

pytest.importorskip("torchao")


def linear_weights(model) -> dict[str, torch.Tensor]:
    """Every nn.Linear weight inside the decoder blocks (dense matrices and the factors A, B)."""
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


def stored_int8_weight_entries(path) -> int:
    """Entries of the int8 weight tensors (torchao stores each as `<module>._weight_qdata`)."""
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                   if k.endswith("qdata") and f.get_slice(k).get_dtype() == "I8")


def test_int8_weights_are_row_wise_rounded_copies_of_the_float_weights(tmp_path):
    model = pruned_folder("llama", tmp_path / "f32")
    pruned_folder("llama", tmp_path / "int8", quantize="int8")
    quantized = linear_weights(load_pruned(tmp_path / "int8"))
    floats = linear_weights(model)
    assert set(quantized) == set(floats) and any(".A" in n for n in floats)
    for name, w in floats.items():
        q = quantized[name]
        assert type(q).__name__ == "Int8Tensor", name
        # independent bound: symmetric int8 per output row rounds each entry by at most half a step
        step = w.detach().abs().amax(dim=1, keepdim=True) / 127
        err = (q.dequantize().float() - w.detach()).abs()
        assert torch.all(err <= step / 2 + 1e-6), name


def test_rank_0_and_rank_1_factors_stay_float_and_the_rest_is_int8(tmp_path):
    """torchao's int8 cannot quantise a zero-element weight nor an out x 1 one (B of rank 1)."""
    model = tiny_model("llama")
    plan = random_plan(model, seed=3)
    names = sorted(n for n, m in plan["matrices"].items() if m["rank"] is not None)
    for name, rank in zip(names, (0, 1, 1, 2)):
        plan["matrices"][name]["rank"] = rank
    prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    save_pruned(model, tmp_path / "int8", plan, IDENTITY, tokenizer=tiny_tokenizer(), quantize="int8")
    loaded = load_pruned(tmp_path / "int8")
    kinds = {n: type(w).__name__ for n, w in linear_weights(loaded).items()}
    floats = {n for n, kind in kinds.items() if kind != "Int8Tensor"}
    assert floats == {f"{names[0]}.A", f"{names[0]}.B", f"{names[1]}.B", f"{names[2]}.B"}
    assert kinds[f"{names[1]}.A"] == kinds[f"{names[3]}.B"] == "Int8Tensor"
    # naming modules to skip must not lose transformers' default skip: the (untied) LM head stays float
    assert not model.config.tie_word_embeddings
    assert type(loaded.lm_head.weight) is torch.nn.Parameter and loaded.lm_head.weight.dtype == torch.float32


def test_quantized_folder_loads_alike_through_sieve_and_transformers(tmp_path):
    model = pruned_folder("qwen2", tmp_path / "int8", quantize="int8")
    by_sieve = logits(load_pruned(tmp_path / "int8"), IDS)
    by_transformers = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "int8", trust_remote_code=True), IDS)
    assert torch.equal(by_sieve, by_transformers)
    reference = logits(model, IDS)
    assert not torch.equal(by_sieve, reference)  # really quantised
    torch.testing.assert_close(by_sieve, reference, atol=0.05 * reference.abs().max().item(), rtol=0)


def test_apply_quantize_writes_a_smaller_folder_that_scores_like_the_float_one(ws, tiny_dir, tmp_path):  # noqa: F811
    write_plan(ws, KEPT)
    expected, _ = in_memory_logits(ws, tiny_dir)
    f32 = run_apply(ws, ApplyOptions(out=tmp_path / "f32"))
    int8 = run_apply(ws, ApplyOptions(out=tmp_path / "int8", quantize="int8"), force=True)
    assert int8["quantize"] == "int8" and int8["params_after"] == f32["params_after"]
    assert (tmp_path / "int8" / WEIGHTS).stat().st_size == int8["file_bytes"]
    assert int8["file_bytes"] < f32["file_bytes"]
    # every entry of every linear weight (dense, A and B) is stored once, in one byte
    linear_entries = sum(w.numel() for w in linear_weights(load_pruned(tmp_path / "f32")).values())
    assert stored_int8_weight_entries(tmp_path / "int8" / WEIGHTS) == linear_entries
    model = load_pruned(tmp_path / "int8")
    assert any(isinstance(m, LowRankLinear) and type(weight_of(m.A)).__name__ == "Int8Tensor" for m in model.modules())
    got = logits(model, APPLY_IDS)
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def test_unsupported_scheme_lists_the_supported_ones(ws, tiny_dir, tmp_path):  # noqa: F811
    for options in (lambda: ApplyOptions(out=tmp_path / "x", quantize="int4"), lambda: RunOptions(quantize="int4")):
        with pytest.raises(InputError, match="choose one of: int8"):
            options()
    for command in (["apply", "-w", str(ws.root), "-o", str(tmp_path / "x"), "--quantize", "int4"],
                    ["run", str(tiny_dir), "-w", str(tmp_path / "ws2"), "-o", str(tmp_path / "y"), "--quantize", "int4"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1, command
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "int4" in lines[0] and "int8" in lines[0], command
    assert not (tmp_path / "ws2").exists()  # refused before any stage ran


def test_run_quantize_writes_the_int8_folder_and_evaluates_it(tiny_dir, tmp_path):
    task = write_task(tmp_path, "text_modelling")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tiny_dir), "--task", str(task), "-w", str(tmp_path / "ws"), "-o",
                                      str(out), "--tokens", "2000", "--max-search", "6", "--max-test", "6",
                                      "--grid-step", "0.1", "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    info = read_sieve_json(out)
    assert info["quantize"] == "int8"
    weights = linear_weights(load_pruned(out))
    # every linear weight stored as int8, except the B (out x 1) of a rank-1 matrix (tiny plans have them)
    float_b = {f"{name}.B" for name, spec in info["factored"].items() if spec["rank"] == 1}
    assert stored_int8_weight_entries(out / WEIGHTS) == sum(w.numel() for n, w in weights.items() if n not in float_b)
    assert Workspace(tmp_path / "ws").read_manifest(Stage.APPLY)["inputs"]["options"]["quantize"] == "int8"
    # the pruned evaluation scored this very folder (its content hash), not a float copy
    pruned_eval = [p for p in (tmp_path / "ws" / "eval").iterdir() if p.name.startswith("out-")]
    assert len(pruned_eval) == 1
    manifest = json.loads((pruned_eval[0] / "manifest.json").read_text())
    assert manifest["inputs"]["model"] == model_identity(out)


def test_python_api_saves_quantized(tmp_path):
    from .test_api import config, loader, make_eval_fn

    pruner = TransformerPruner(tiny_model("llama"), config(tmp_path), tiny_tokenizer())
    pruner.uniform_prune(loader(), make_eval_fn())
    with pytest.raises(InputError, match="choose one of: int8"):
        pruner.save_pruned_model(tmp_path / "bad", quantize="int4")
    info = pruner.save_pruned_model(tmp_path / "int8", quantize="int8")
    assert info["quantize"] == "int8"
    model = load_pruned(tmp_path / "int8")
    assert {type(w).__name__ for w in linear_weights(model).values()} == {"Int8Tensor"}
