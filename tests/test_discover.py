import json

import pytest
import torch

from sieve_cli.archs import ARCHITECTURES, arch_for
from sieve_cli.discover import diagnose
from sieve_cli.errors import UnsupportedArchitectureError
from sieve_cli.matrices import find_matrices, is_linear_like, sites_of, weight_of

from .tiny import CONFIGS, tiny_model


def test_every_table_family_has_a_tiny_model():
    covered = {"gemma3"}  # the multimodal entry shares gemma3_text's layout
    assert set(ARCHITECTURES) - covered <= set(CONFIGS)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_matrices_match_the_model(model_type):
    model = tiny_model(model_type)
    matrices = find_matrices(model)
    spec = arch_for(model_type)
    n_blocks = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    assert len(matrices) == n_blocks * len(spec.matrices)
    modules = dict(model.named_modules())
    for m in matrices:
        module = modules[m.name]
        w = weight_of(module)
        assert tuple(w.shape) == (m.out_features, m.in_features)
        # y = W x must hold for the H x D view, whatever the module stores
        x = torch.randn(3, m.in_features)
        bias = module.bias if module.bias is not None else 0
        torch.testing.assert_close(module(x), x @ w.T + bias)
    # matrices sharing a site really read the same tensor: record inputs with plain hooks
    seen = {}
    hooks = [modules[m.name].register_forward_pre_hook(lambda mod, args, name=m.name: seen.__setitem__(name, args[0])) for m in matrices]
    model(torch.randint(0, 100, (1, 5)))
    for h in hooks:
        h.remove()
    for site, group in sites_of(matrices).items():
        for other in group[1:]:
            assert seen[other.name] is seen[group[0].name] or torch.equal(seen[other.name], seen[group[0].name]), site


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_diagnose_counts_add_up(model_type):
    model = tiny_model(model_type)
    result = diagnose(model)
    prunable = [m for m in find_matrices(model)]
    assert result["prunable"] == len(prunable)
    assert result["prunable_params"] == sum(m.out_features * m.in_features for m in prunable)
    assert result["total_params"] == sum(p.numel() for p in model.parameters())
    groups = result["groups"]
    head = 0 if groups["head"]["tied"] else groups["head"]["params"]
    parts = groups["attention"]["params"] + groups["mlp"]["params"] + groups["embedding"]["params"] + head + groups["other"]["params"]
    assert parts == result["total_params"]
    assert groups["other"]["params"] >= 0
    assert result["linear_layers"] == sum(1 for m in model.modules() if is_linear_like(m))
    json.dumps(result)  # what discover writes must be JSON


def test_gpt2_full_size_counts():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config())
    result = diagnose(model)
    g = result["groups"]
    assert g["attention"]["params"] == 28_311_552
    assert g["mlp"]["params"] == 56_623_104
    assert g["head"]["params"] == 38_597_376 and g["head"]["tied"]
    assert result["total_params"] == 124_439_808
    assert result["prunable"] == 48 and result["linear_layers"] == 49


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: .*gpt2.*llama"):
        arch_for("mamba")


def test_layout_mismatch_is_a_clear_error():
    model = tiny_model("llama")
    model.config.model_type = "gpt2"  # table says transformer.h, model has model.layers
    with pytest.raises(UnsupportedArchitectureError, match="has no module 'transformer.h'"):
        find_matrices(model)
