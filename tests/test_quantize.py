"""`apply --quantize int8`: the weights stored as int8, reloaded alike by sieve and by transformers."""

import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sieve_cli.apply import ApplyOptions, run_apply
from sieve_cli.cli import app
from sieve_cli.errors import InputError
from sieve_cli.lowrank import LowRankLinear
from sieve_cli.matrices import weight_of
from sieve_cli.pruned import WEIGHTS, load_pruned

from .test_apply import IDS as APPLY_IDS
from .test_apply import KEPT, in_memory_logits, write_plan, ws  # noqa: F401  (ws is a fixture)
from .test_pruned import IDS, logits
from .test_remote_code import pruned_folder

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


def test_unsupported_scheme_lists_the_supported_ones(ws, tmp_path):  # noqa: F811
    with pytest.raises(InputError, match="choose one of: int8"):
        ApplyOptions(out=tmp_path / "x", quantize="int4")
    result = CliRunner().invoke(app, ["apply", "-w", str(ws.root), "-o", str(tmp_path / "x"), "--quantize", "int4"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "int4" in lines[0] and "int8" in lines[0]
