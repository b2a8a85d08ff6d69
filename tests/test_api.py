"""The seed's Python API on a tiny model, with a user-supplied loader and metric."""

import torch

from sieve_cli import LLMSieveConfig, TransformerPruner, diagnose_model, load_pruned
from sieve_cli.lowrank import LowRankLinear, rank_for_fraction

from .tiny import tiny_model, tiny_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 3


def loader(batches=6):
    tok = tiny_tokenizer()
    ids = tok(TEXT)["input_ids"]
    for i in range(batches):
        yield torch.tensor([ids[i * 10: i * 10 + 40], ids[i * 10 + 5: i * 10 + 45]])


def make_eval_fn():
    """Agreement of the model's next-token top-1 with the dense model's, on fixed text."""
    tok = tiny_tokenizer()
    ids = torch.tensor([tok(TEXT)["input_ids"][:120]])
    reference = tiny_model("llama")(ids).logits.argmax(-1)

    def eval_fn(model):
        with torch.no_grad():
            return (model(ids).logits.argmax(-1) == reference).float().mean().item()

    return eval_fn


def config(tmp_path, **kw):
    return LLMSieveConfig(calibration_tokens=400, target_accuracy_drop=0.2, workspace=str(tmp_path / "ws"), **kw)


def test_uniform_prune_apply_save_reload(tmp_path):
    model, eval_fn = tiny_model("llama"), make_eval_fn()
    pruner = TransformerPruner(model, config(tmp_path), tiny_tokenizer())
    kept = pruner.uniform_prune(loader(), eval_fn)
    plan = pruner.plan
    p = plan["search"]["uniform_p"]
    assert len(kept) == 14
    for name, m in plan["matrices"].items():  # one p for all: each matrix at the largest rank within p
        assert m["rank"] == rank_for_fraction(p, *model.get_submodule(name).weight.shape) and kept[name] <= p
    assert plan["metric"]["plan"] >= 0.8 * plan["metric"]["dense"] - 1e-9  # never violates the tolerance
    assert (tmp_path / "ws" / "capture" / "stats.zarr").exists() and (tmp_path / "ws" / "search" / "history.jsonl").exists()
    pruned = pruner.apply_pruning()
    if plan["params"]["removed_fraction_prunable"] > 0:
        assert any(isinstance(m, LowRankLinear) for m in pruned.modules())
    assert abs(eval_fn(pruned) - plan["metric"]["plan"]) < 1e-12  # what the search measured is what you get
    pruner.save_pruned_model(tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)


def test_texts_loader_and_attention_only(tmp_path):
    model = tiny_model("llama")
    pruner = TransformerPruner(model, config(tmp_path, prune_mlp=False, fit_method="pca"), tiny_tokenizer())
    kept = pruner.uniform_prune([TEXT[:200], [TEXT[200:400], TEXT[10:90]]], make_eval_fn(), baseline_accuracy=1.0)
    assert set(kept) == {n for n in kept if "self_attn" in n} and len(kept) == 8


def test_adaptive_prune_is_acceptable_and_at_least_uniform(tmp_path):
    eval_fn = make_eval_fn()
    uniform = TransformerPruner(tiny_model("llama"), config(tmp_path / "u"))
    uniform.uniform_prune(loader(), eval_fn)
    adaptive = TransformerPruner(tiny_model("llama"), config(tmp_path / "a", ga_population_size=8, ga_generations=2))
    adaptive.adaptive_prune(loader(), eval_fn)
    plan = adaptive.plan
    assert plan["metric"]["plan"] >= 0.8 * plan["metric"]["dense"] - 1e-9
    assert plan["params"]["removed_fraction_prunable"] >= uniform.plan["params"]["removed_fraction_prunable"] - 1e-9


def test_diagnose_model_dict():
    result = diagnose_model(tiny_model("gpt2"), "tiny-gpt2")
    assert result["name"] == "tiny-gpt2" and result["prunable"] == 8
    assert set(result["groups"]) >= {"attention", "mlp", "head", "embedding"}


def test_fit_runs_on_the_device_of_the_users_model(tmp_path, monkeypatch):
    """The model's device (here cpu:0, which no default spells) reaches the fit, not the CPU default."""
    import sieve_cli.api as api

    seen = []
    real_fit = api.fit_model
    monkeypatch.setattr(api, "model_device", lambda model: torch.device("cpu", 0))
    monkeypatch.setattr(api, "fit_model", lambda model, store, options: seen.append(options.device) or real_fit(model, store, options))
    TransformerPruner(tiny_model("llama"), config(tmp_path), tiny_tokenizer()).calibrate(loader())
    assert seen == ["cpu:0"]
