import os
from pathlib import Path

import pytest
import torch

from .tiny import save_block_families, save_tiny

torch.set_num_threads(1)  # the CI machine has 2 cores; 1 thread is faster and steadier when another process is busy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def default_workspace(tmp_path, monkeypatch) -> Path:
    """Commands run without -w use $SIEVE_WORKSPACE: a fresh one per test, never the checkout."""
    path = tmp_path / "sieve-workspace"
    monkeypatch.setenv("SIEVE_WORKSPACE", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA with a character tokenizer, saved as a local Hugging Face folder."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict:
    """Saved tiny llama, gpt2 and gemma3 folders (block-wise capture, streaming, prefix capture)."""
    return save_block_families(tmp_path_factory)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("SIEVE_DATA_ROOT", REPO.parent / "shared" / "data"))
    if not (root / "sst2").exists():
        pytest.skip(f"shared task data not found at {root} (set SIEVE_DATA_ROOT)")
    return root


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from sieve_cli.models import smollm2_gguf as locate

    return locate()
