import pytest
import torch

from sieve_cli.errors import InputError
from sieve_cli.models import load_model, model_identity, resolve_source


def test_resolve_source_kinds(tiny_dir, tmp_path):
    assert resolve_source(tiny_dir).kind == "local"
    assert resolve_source("gpt2").kind == "hub"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(InputError, match="no such file"):
        resolve_source(tmp_path / "x.gguf")


def test_dtype_is_explicit_and_checked(tiny_dir):
    model, _ = load_model(tiny_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype 'fp8'"):
        load_model(tiny_dir, dtype="fp8")


def test_local_identity_changes_with_weights(tiny_dir, tmp_path):
    from .tiny import save_tiny

    other = save_tiny(tmp_path / "o", "llama", seed=3)
    assert model_identity(tiny_dir)["sha256"] != model_identity(other)["sha256"]
    assert model_identity(tiny_dir) == model_identity(tiny_dir)


@pytest.mark.slow
def test_gguf_dequantised_copy_matches_direct_load(smollm2_gguf, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path))
    cached, _ = load_model(smollm2_gguf)  # first call writes the copy
    again, _ = load_model(smollm2_gguf)  # second call reads it
    assert list(tmp_path.glob("gguf/*/model.safetensors"))
    direct = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    ids = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, again(ids).logits)
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight
