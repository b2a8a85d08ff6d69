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


def fake_chunk_packages(root, sizes):
    """Installed-looking chunk packages `chunky_1` ... on sys.path, each with one data/partNN.bin."""
    import sys

    packages = []
    for i, size in enumerate(sizes, 1):
        data = root / f"chunky_{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"part{i:02d}.bin").write_bytes(bytes([i]) * size)
        packages.append(f"chunky-{i}")
    sys.path.insert(0, str(root))
    return tuple(packages)


def test_chunk_packages_are_joined_in_order_once_and_a_missing_one_is_named(tmp_path, monkeypatch):
    import sys

    from sieve_cli.errors import ModelLoadError
    from sieve_cli.models import chunk_paths, join_chunks

    packages = fake_chunk_packages(tmp_path / "site", [3, 5, 2])
    try:
        parts = chunk_paths(packages)
        target = join_chunks(parts, tmp_path / "cache" / "joined.gguf", 10)
        assert target.read_bytes() == b"\x01" * 3 + b"\x02" * 5 + b"\x03" * 2
        stamp = target.stat().st_mtime_ns
        assert join_chunks(parts, target, 10).stat().st_mtime_ns == stamp  # reused, not rewritten
        with pytest.raises(ModelLoadError, match=r"hold 10 bytes, not 11; reinstall"):
            join_chunks(parts, tmp_path / "cache" / "other.gguf", 11)
        assert not (tmp_path / "cache" / "other.gguf").exists()
        with pytest.raises(ModelLoadError, match=r"chunk 4 of 4 \(chunky-4\) is not installed; run `pip install "
                                                 r"chunky-1 chunky-2 chunky-3 chunky-4`"):
            chunk_paths((*packages, "chunky-4"))
    finally:
        sys.path.remove(str(tmp_path / "site"))


def test_the_qwen_coder_helper_joins_its_six_packages_into_the_cache(tmp_path, monkeypatch):
    import importlib.metadata
    import sys

    from sieve_cli import models

    packages = fake_chunk_packages(tmp_path / "site", [4] * 6)
    monkeypatch.setattr(models, "QWEN_CODER_PACKAGES", packages)
    monkeypatch.setattr(models, "QWEN_CODER_BYTES", 24)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9")
    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    try:
        path = models.qwen_coder_gguf()
    finally:
        sys.path.remove(str(tmp_path / "site"))
    assert path.parent == tmp_path / "cache" / "models" and path.name.endswith("-9.9.gguf")
    assert path.read_bytes() == b"".join(bytes([i]) * 4 for i in range(1, 7))
