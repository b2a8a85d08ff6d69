"""The pruned model: in-memory swaps, save, load, for every family in the architecture table."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from sieve_cli.errors import InputError
from sieve_cli.factors import FactorSet
from sieve_cli.lowrank import LowRankLinear, lowrank_params
from sieve_cli.matrices import find_matrices, weight_of
from sieve_cli.pruned import (
    SIEVE_JSON,
    WEIGHTS,
    build_replacements,
    count_params,
    densify_in_place,
    load_pruned,
    plan_ranks,
    prune_in_memory,
    save_pruned,
)

from .tiny import CONFIGS, tiny_model, tiny_tokenizer

IDENTITY = {"kind": "local", "path": "/nowhere", "sha256": "0" * 64}


def svd_factors(model) -> FactorSet:
    """A full ordered basis per matrix from the SVD of W (any basis serves for structure tests)."""
    factors = FactorSet("svd")
    for m in find_matrices(model):
        W = weight_of(model.get_submodule(m.name)).detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        factors.full[m.name] = ((U * S).float(), Vh.float())
    return factors


def random_plan(model, seed=0, dense_share=0.3) -> dict:
    """Some matrices dense (rank null), the others at a random rank below full."""
    g = torch.Generator().manual_seed(seed)
    matrices = {}
    for m in find_matrices(model):
        dense = torch.rand(1, generator=g).item() < dense_share
        rank = None if dense else int(torch.randint(1, min(m.out_features, m.in_features), (1,), generator=g))
        matrices[m.name] = {"rank": rank, "params_before": m.params,
                            "params_after": lowrank_params(rank, m.out_features, m.in_features)}
    return {"schema": 1, "method": "svd", "matrices": matrices}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(1))


def test_plan_that_keeps_everything_reproduces_dense_logits_exactly(tmp_path):
    model = tiny_model("llama")
    dense = logits(model, IDS)
    plan = {"method": "svd", "matrices": {m.name: {"rank": None} for m in find_matrices(model)}}
    restore = prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    assert torch.equal(logits(model, IDS), dense)
    save_pruned(model, tmp_path, plan, IDENTITY)
    assert torch.equal(logits(load_pruned(tmp_path), IDS), dense)
    restore()


def test_prune_in_memory_swaps_planned_matrices_and_restore_brings_back_dense():
    model = tiny_model("llama")
    dense = logits(model, IDS)
    originals = {name: module for name, module in model.named_modules()}
    plan = random_plan(model)
    restore = prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    for name, entry in plan["matrices"].items():
        module = model.get_submodule(name)
        if entry["rank"] is None:
            assert module is originals[name]
        else:
            assert isinstance(module, LowRankLinear) and module.rank == entry["rank"]
    assert not torch.allclose(logits(model, IDS), dense)
    restore()
    assert torch.equal(logits(model, IDS), dense)
    assert all(model.get_submodule(n) is originals[n] for n in plan["matrices"])


def test_full_rank_factors_reproduce_the_dense_matrix():
    model = tiny_model("gpt2")  # Conv1D: weights stored transposed
    factors = svd_factors(model)
    ranks = {m.name: min(m.out_features, m.in_features) for m in find_matrices(model)}
    dense = logits(model, IDS)
    prune_in_memory(model, ranks, factors)
    torch.testing.assert_close(logits(model, IDS), dense, rtol=1e-4, atol=1e-4)


def test_replacements_keep_bias_dtype_and_do_not_alias_the_factors():
    model = tiny_model("qwen2")  # q, k, v carry biases
    factors = svd_factors(model)
    name = "model.layers.0.self_attn.q_proj"
    new = build_replacements(model, {name: 4, "model.layers.0.mlp.up_proj": None}, factors, dtype=torch.bfloat16)
    assert list(new) == [name]
    module = new[name]
    assert module.A.weight.dtype == torch.bfloat16 and module.B.bias is not None
    torch.testing.assert_close(module.B.bias.float(), model.get_submodule(name).bias.bfloat16().float())
    basis = factors.full[name][1]
    assert module.A.weight.data_ptr() != basis.data_ptr()


def test_factors_of_another_shape_are_refused():
    model = tiny_model("llama")
    factors = svd_factors(tiny_model("gpt2"))
    with pytest.raises(InputError, match="no factors for"):
        build_replacements(model, {"model.layers.0.self_attn.q_proj": 2}, factors)
    name = "model.layers.0.mlp.down_proj"
    factors = svd_factors(model)
    B, A = factors.full[name]
    factors.full[name] = (B, A[:, :-1])
    with pytest.raises(InputError, match="another model"):
        build_replacements(model, {name: 2}, factors)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_family_round_trips_through_save_and_load(model_type, tmp_path):
    model = tiny_model(model_type)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    plan = random_plan(model, seed=3)
    prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    expected = logits(model, IDS)
    info = save_pruned(model, tmp_path, plan, IDENTITY)
    assert info["factored"] and all(plan["matrices"][n]["rank"] == s["rank"] for n, s in info["factored"].items())

    loaded = load_pruned(tmp_path)
    assert isinstance(loaded, PreTrainedModel) and type(loaded) is type(model)
    assert torch.equal(logits(loaded, IDS), expected)
    assert count_params(loaded) == count_params(model)
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        assert len(list(f.keys())) == len(model.state_dict()) - int(tied)  # a tied head is stored once


def test_parameter_count_equals_the_plans_prediction(tmp_path):
    model = tiny_model("opt")
    before = count_params(model)
    plan = random_plan(model, seed=5)
    prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    removed = sum(e["params_before"] - e["params_after"] for e in plan["matrices"].values())
    assert removed > 0
    assert count_params(model) == before - removed
    save_pruned(model, tmp_path, plan, IDENTITY)
    assert count_params(load_pruned(tmp_path)) == before - removed


@pytest.mark.parametrize("dtype, nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_saved_file_size_is_parameters_times_bytes(tmp_path, dtype, nbytes):
    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    plan = random_plan(model, seed=7)
    prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    save_pruned(model, tmp_path, plan, IDENTITY)
    size = (tmp_path / WEIGHTS).stat().st_size
    header = int.from_bytes((tmp_path / WEIGHTS).read_bytes()[:8], "little")
    assert size - 8 - header == count_params(model) * nbytes  # the tensor data, exactly
    assert size == pytest.approx(count_params(model) * nbytes, rel=0.02)
    assert load_pruned(tmp_path).dtype == dtype


def test_loader_writes_config_tokenizer_and_generates(tmp_path):
    model = tiny_model("llama")
    plan = random_plan(model, seed=2)
    prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    save_pruned(model, tmp_path, plan, IDENTITY, tokenizer=tiny_tokenizer(), fit_method="svd")
    info = json.loads((tmp_path / SIEVE_JSON).read_text())
    assert info["base_model"] == IDENTITY and info["fit_method"] == "svd" and info["plan"]["matrices"]
    assert (tmp_path / "config.json").exists() and (tmp_path / "tokenizer.json").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))  # no pickle
    loaded = load_pruned(tmp_path)
    expected = model.generate(IDS[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(loaded.generate(IDS[:1], max_new_tokens=5, do_sample=False), expected)
    assert load_pruned(tmp_path, dtype="bfloat16").dtype == torch.bfloat16


def test_densify_in_place_computes_the_planned_rank_map():
    for model_type in ("llama", "gpt2"):
        model = tiny_model(model_type)
        factors = svd_factors(model)
        ranks = {m.name: 3 for m in find_matrices(model)}
        prune_in_memory(model, ranks, factors)
        factored = logits(model, IDS)
        dense = tiny_model(model_type)
        densify_in_place(dense, ranks, factors)
        torch.testing.assert_close(logits(dense, IDS), factored, rtol=1e-4, atol=1e-4)


def test_load_refuses_folders_that_are_not_pruned_models(tmp_path):
    with pytest.raises(InputError, match="not a sieve pruned model"):
        load_pruned(tmp_path)
    model = tiny_model("llama")
    plan = random_plan(model)
    prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    save_pruned(model, tmp_path, plan, IDENTITY)
    info = json.loads((tmp_path / SIEVE_JSON).read_text())
    info["factored"].popitem()  # the weights no longer match the recorded layout
    (tmp_path / SIEVE_JSON).write_text(json.dumps(info))
    with pytest.raises(InputError, match="does not match"):
        load_pruned(tmp_path)


@pytest.mark.slow
def test_smollm2_round_trip_keeps_tokenizer_tied_head_and_logits(smollm2_gguf, tmp_path):
    """The real model (tied head, GGUF tokenizer): half the blocks pruned, saved, reloaded."""
    from transformers import AutoTokenizer

    from sieve_cli.models import load_model

    model, tokenizer = load_model(smollm2_gguf, "float32", "cpu")
    before = count_params(model)
    chosen = [m for m in find_matrices(model) if m.block % 2 == 0]
    factors = FactorSet("svd")
    for m in chosen:  # a random orthonormal basis: structure and sizes do not depend on the factors
        W = weight_of(model.get_submodule(m.name)).detach()
        Q = torch.linalg.qr(torch.randn(m.out_features, min(W.shape), generator=torch.Generator().manual_seed(0)))[0]
        factors.full[m.name] = (Q, Q.T @ W)
    plan = {"method": "svd", "matrices": {m.name: {"rank": min(m.out_features, m.in_features) // 4} for m in chosen}}
    prune_in_memory(model, plan_ranks(plan), factors)
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"
    ids = tokenizer(text, return_tensors="pt").input_ids
    expected = logits(model, ids)
    save_pruned(model, tmp_path, plan, IDENTITY, tokenizer)
    removed = sum(m.params - lowrank_params(plan["matrices"][m.name]["rank"], m.out_features, m.in_features) for m in chosen)

    loaded = load_pruned(tmp_path)
    assert count_params(loaded) == before - removed
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert (tmp_path / WEIGHTS).stat().st_size == pytest.approx(count_params(loaded) * 4, rel=0.01)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded_tokenizer(text).input_ids == ids[0].tolist()
    assert reloaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(logits(loaded, ids), expected)


def test_rank_zero_keeps_only_the_bias(tmp_path, recwarn):
    model = tiny_model("qwen2")
    name = "model.layers.0.self_attn.q_proj"
    plan = {"method": "svd", "matrices": {name: {"rank": 0}}}
    prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    x = torch.randn(3, 32)
    torch.testing.assert_close(model.get_submodule(name)(x), model.get_submodule(name).B.bias.expand(3, -1))
    save_pruned(model, tmp_path, plan, IDENTITY)
    assert torch.equal(logits(load_pruned(tmp_path), IDS), logits(model, IDS))
    assert not [w for w in recwarn if "zero-element" in str(w.message)]
