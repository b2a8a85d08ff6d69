"""The pruned model: build it from a plan and fitted factors, save it, load it back.

A planned matrix of rank R becomes a `LowRankLinear` (A: R x D, then B: H x R, plus the
original bias); a matrix with rank None stays dense and untouched. The saved folder is a
Hugging Face folder (config, tokenizer, generation config) plus `sieve.json`, which lists
the factored modules, and one `model.safetensors` holding every weight once (a tied LM
head is not stored twice). `load_pruned` rebuilds the base architecture from the config
with empty weights, swaps in LowRankLinear shells of the recorded ranks, loads the
tensors strictly and re-ties shared weights: no network, no pickle.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .factors import FactorSet
from .files import read_json, save_safetensors, sha256_file
from .lowrank import LowRankLinear, bias_of, swap_modules
from .matrices import weight_of
from .modeling import (
    MODELING_FILE,
    TYPE_PREFIX,
    base_config_dict,
    place_low_rank,
    remote_code_config,
    render_modeling_file,
)
from .models import check_device_available, torch_dtype
from .narrowing import narrowed_modules
from .plan import Plan
from .quantize import load_through_transformers, quantize_folder
from .taskhead import TaskHead, task_head_spec
from .version import __version__

log = logging.getLogger(__name__)

SIEVE_JSON = "sieve.json"
WEIGHTS = "model.safetensors"
VOCAB_FILE = "task_vocab.json"  # --vocab task: the kept ids (also the head's `index` in WEIGHTS)
FORMAT = 2  # 2: config.json typed for modeling_sieve.py (1: the base config; still read)


# ---- building --------------------------------------------------------------------------
def _copy_to(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A fresh contiguous parameter holding `t`, never a view of the factor basis."""
    out = torch.empty(t.shape, dtype=dtype, device=device)
    with torch.no_grad():
        out.copy_(t)
    return nn.Parameter(out)


def lowrank_shell(in_features: int, out_features: int, rank: int, bias: bool, dtype: torch.dtype) -> LowRankLinear:
    """A LowRankLinear with parameters on the meta device, to be assigned real tensors."""
    with warnings.catch_warnings():  # rank 0 is legal (the matrix's output is its bias alone)
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return LowRankLinear(in_features, out_features, rank, bias=bias, dtype=dtype, device="meta")


def lowrank_from_pair(B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None,
                      dtype: torch.dtype, device: torch.device) -> LowRankLinear:
    """A LowRankLinear holding copies of B (H x R), A (R x D) and bias, without random init."""
    (h, rank), d = B.shape, A.shape[1]
    module = lowrank_shell(d, h, rank, bias is not None, dtype)
    module.A.weight = _copy_to(A, dtype, device)
    module.B.weight = _copy_to(B, dtype, device)
    if bias is not None:
        module.B.bias = _copy_to(bias, dtype, device)
    return module


def checked_pair(factors: FactorSet, name: str, rank: int, out_features: int, in_features: int):
    """(B, A) at `rank` for `name`, checked against the matrix it replaces."""
    if name not in factors.names():
        raise InputError(f"the {factors.method} fit has no factors for {name}; rerun `sieve fit` on this workspace's model")
    B, A = factors.pair(name, rank)
    if B.shape != (out_features, rank) or A.shape != (rank, in_features):
        raise InputError(
            f"factors for {name} have shapes {tuple(B.shape)}, {tuple(A.shape)} but the matrix is "
            f"{out_features} x {in_features}; they were fitted on another model: rerun `sieve fit --force`"
        )
    return B, A


def build_replacements(model: nn.Module, ranks: Mapping[str, int | None], factors: FactorSet,
                       dtype: torch.dtype | None = None) -> dict[str, LowRankLinear]:
    """A LowRankLinear per matrix whose rank is not None, on the original module's device.

    dtype defaults to the original weight's; the original bias is copied into B's bias.
    A width fit's `ranks` are widths per width unit: its narrower modules (`narrowed_replacements`).
    """
    if factors.method == "width":
        return narrowed_replacements(model, ranks, factors)
    replacements = {}
    for name, rank in ranks.items():
        if rank is None:
            continue
        module = model.get_submodule(name)
        weight = weight_of(module)
        h, d = weight.shape
        B, A = checked_pair(factors, name, int(rank), h, d)
        replacements[name] = lowrank_from_pair(B, A, bias_of(module), dtype or weight.dtype, weight.device)
    return replacements


def narrowed_replacements(model: nn.Module, widths: Mapping[str, int | None], factors: FactorSet) -> dict[str, nn.Module]:
    """The narrower modules (and skipped attention modules) of every width unit whose width is not None."""
    units = {u.name: u for u in factors.width_units()}
    replacements: dict[str, nn.Module] = {}
    for name, width in widths.items():
        if width is None:
            continue
        if name not in units:
            raise InputError(f"the width fit has no unit {name}; rerun `sieve fit --method width` on this workspace's model")
        replacements |= narrowed_modules(model, units[name], int(width), factors.basis(name))
    return replacements


def plan_ranks(plan: Mapping | Plan) -> dict[str, int | None]:
    """name -> rank (None: stays dense) of a plan, or of its JSON form (e.g. from sieve.json)."""
    return (plan if isinstance(plan, Plan) else Plan.parse(plan, rebuild="sieve search")).ranks()


def prune_in_memory(model: nn.Module, ranks: Mapping[str, int | None] | Plan, factors: FactorSet) -> Callable[[], None]:
    """Swap low-rank modules of these ranks (a plan's) into `model`; return the function that restores it.

    Cheap enough to call once per search candidate: only the new factors are allocated,
    the dense modules are kept aside (not copied) and put back by the returned function.
    """
    ranks = ranks.ranks() if isinstance(ranks, Plan) else ranks
    return swap_modules(model, build_replacements(model, ranks, factors))


def densify_in_place(model: nn.Module, ranks: Mapping[str, int], factors: FactorSet) -> None:
    """Overwrite each named matrix with the dense product B A of its planned rank.

    Used where a factored matrix would run slower than a dense one: the model then computes
    the plan's rank-R map (what search evaluated) at dense speed. The product is formed in
    float64 so the only rounding is the final cast.
    """
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        weight = weight_of(module)  # a view for Conv1D, so copy_ writes through the transpose
        B, A = checked_pair(factors, name, int(rank), *weight.shape)
        with torch.no_grad():
            weight.copy_(B.double() @ A.double())


def factored_modules(model: nn.Module) -> dict[str, dict]:
    """The LowRankLinear modules (and a task vocabulary's head) in `model`, as recorded in sieve.json."""
    found = {
        name: {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features, "bias": m.B.bias is not None}
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    }
    return found | {name: task_head_spec(m) for name, m in model.named_modules() if isinstance(m, TaskHead)}


def task_head(model: nn.Module) -> tuple[str, TaskHead] | None:
    """(name, module) of the model's TaskHead, None when its head scores the whole vocabulary."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, TaskHead)), None)


def count_params(model: nn.Module) -> int:
    """Parameters of the model, each tensor once (a tied head counts once)."""
    return sum(p.numel() for p in model.parameters())


def matrix_params(model: nn.Module, names) -> int:
    """Weight parameters (biases not counted) of the named matrices as they are in `model` now."""
    total = 0
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:  # inside a skipped attention module: gone
            continue
        if isinstance(module, LowRankLinear):
            total += module.A.weight.numel() + module.B.weight.numel()
        else:
            total += weight_of(module).numel()
    return total


# ---- saving ----------------------------------------------------------------------------
def shared_weights(model: nn.Module) -> dict[str, str]:
    """State-dict keys that alias an earlier key's tensor (a tied LM head): {alias: kept}."""
    first: dict[int, str] = {}
    tied = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            tied[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    return tied


def weights_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def write_config(model: nn.Module, out: Path, dtype: torch.dtype, factored: Mapping[str, Mapping]) -> None:
    """config.json: the base config, re-typed for the modeling file (see modeling.py)."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype  # the dtype the weights are stored in, so from_config rebuilds it alike
    config.save_pretrained(out)
    path = out / "config.json"
    path.write_text(json.dumps(remote_code_config(json.loads(path.read_text()), factored), indent=2, sort_keys=True) + "\n")


def save_pruned(model: nn.Module, out_dir: str | Path, plan: Mapping, base_identity: Mapping, tokenizer=None,
                fit_method: str | None = None, extra: Mapping | None = None, quantize: str | None = None,
                narrowed: Mapping[str, dict] | None = None, vocab: Mapping | None = None) -> dict:
    """Write the pruned model folder; returns the sieve.json written.

    `quantize` (an options.QUANTIZE_SCHEMES key) stores the linear weights quantised (quantize.py).
    `vocab` (the model has a TaskHead): `vocab.TaskVocabulary.record()`, whose `ids` go to VOCAB_FILE
    and the rest to sieve.json's `vocab`.

    `out_dir` is created if missing; files of the same names are replaced. Guards against
    writing into the base model's folder belong to the caller (apply), which knows it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = shared_weights(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_safetensors(state, out / WEIGHTS, metadata={"format": "pt", "sieve": str(FORMAT)})
    dtype = weights_dtype(model)
    replaced = factored_modules(model) | dict(narrowed or {})  # narrowed: {name: narrowing.shape_of(module)}
    write_config(model, out, dtype, replaced)
    (out / MODELING_FILE).write_text(render_modeling_file(model, __version__))
    written = [WEIGHTS, "config.json", MODELING_FILE]
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
        written.append("generation_config.json")
    if tokenizer is not None:
        written += [Path(f).name for f in tokenizer.save_pretrained(out)]
    vocab_info = None
    if vocab is not None:
        vocab_info = {k: v for k, v in vocab.items() if k != "ids"} | {"file": VOCAB_FILE}
        (out / VOCAB_FILE).write_text(json.dumps({"ids": list(vocab["ids"])}) + "\n")
        written.append(VOCAB_FILE)
    info = {
        "format": FORMAT,
        "sieve_version": __version__,
        "base_model": dict(base_identity),
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "fit_method": fit_method if fit_method is not None else plan.get("method"),
        "factored": replaced,
        "tied": tied,
        "params": count_params(model),
        "plan": dict(plan),
        # what this folder holds of ours: `sieve apply` replaces a folder only when it holds nothing else
        "files": sorted({name for name in written if (out / name).is_file()} | {SIEVE_JSON}),
        "quantize": quantize,
        "vocab": vocab_info,
        **dict(extra or {}),
    }
    if quantize is not None:
        quantize_folder(out, quantize, info, WEIGHTS)
    info["sha256"] = {name: sha256_file(out / name) for name in info["files"] if name != SIEVE_JSON}
    (out / SIEVE_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


# ---- loading ---------------------------------------------------------------------------
def is_pruned_folder(path: str | Path) -> bool:
    return (Path(path) / SIEVE_JSON).is_file()


def read_sieve_json(path: str | Path) -> dict:
    file = Path(path) / SIEVE_JSON
    if not file.is_file():
        raise InputError(f"{path} is not a sieve pruned model (no {SIEVE_JSON}); make one with `sieve apply -o {path}`")
    info = read_json(file, rebuild=f"sieve apply -o {path} --force")
    if not isinstance(info, dict) or not isinstance(info.get("format", 0), int) or not isinstance(info.get("factored"), dict):
        raise InputError(f"{file} is not a sieve.json written by sieve apply; rerun `sieve apply -o {path} --force`")
    if info.get("format", 0) > FORMAT:
        raise InputError(f"{file} has format {info['format']}, newer than this sieve reads ({FORMAT}); upgrade sieve")
    return info


def verify_pruned_folder(path: str | Path, info: Mapping | None = None, required: bool = False) -> dict:
    """sieve.json, after checking every file it lists against the sha256 apply recorded (one line if not).

    Called before anything trusts the folder: loading it, and above all printing an lm_eval command
    that runs its modeling file. A folder from before the hashes were recorded is refused when
    `required` (sieve cannot vouch for its code), else loaded with a warning.
    """
    path = Path(path)
    info = dict(info) if info is not None else read_sieve_json(path)
    fix = f"rerun `sieve apply -o {path} --force` to write it again"
    recorded = info.get("sha256")
    if not isinstance(recorded, dict):
        message = f"{path / SIEVE_JSON} records no hashes of the folder's files (an older sieve wrote it)"
        if required:
            raise InputError(f"{message}, so sieve cannot vouch for its code; {fix}")
        log.warning("%s; its files are not checked", message)
        return info
    for name in info.get("files") or []:
        if name == SIEVE_JSON:
            continue
        file = path / name
        if name == MODELING_FILE and not file.exists() and not required:
            continue  # sieve's own loader needs no modeling file (load_pruned warns that transformers does)
        if not file.is_file() or file.is_symlink():
            raise InputError(f"{file}, written by sieve apply, is missing; {fix}")
        key = (str(file), file.stat().st_size, file.stat().st_mtime_ns)
        if _VERIFIED.get(key) != recorded.get(name):
            if recorded.get(name) is None or sha256_file(file) != recorded[name]:
                raise InputError(f"{file} is not the file sieve apply wrote (its sha256 differs from {SIEVE_JSON}: "
                                 f"edited or damaged since); {fix}")
            _VERIFIED[key] = recorded[name]
    return info


_VERIFIED: dict[tuple, str] = {}  # (file, size, mtime) -> sha256 already checked in this process


def _resolve_dtype(dtype: str | torch.dtype | None, saved: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype

    return torch_dtype(dtype or saved)


def _retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Make every alias key the very same Parameter as the key it was saved under."""
    for alias, kept in tied.items():
        parent_name, _, attr = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, model.get_parameter(kept))


def base_config(path: Path, info: Mapping):
    """The base family's config from config.json, whose model_type only the modeling file knows."""
    from transformers import CONFIG_MAPPING

    config = read_json(path / "config.json", rebuild=f"sieve apply -o {path} --force")
    base_type = info.get("model_type") or config["model_type"].removeprefix(TYPE_PREFIX)
    base = base_config_dict(config, base_type, info.get("architecture") or config["architectures"][0])
    if base_type not in CONFIG_MAPPING:
        raise InputError(f"{path} holds a pruned {base_type} model, which this transformers does not know; upgrade transformers")
    return CONFIG_MAPPING[base_type].from_dict(base)


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The base architecture from its config, parameters on the meta device, buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # Buffers (rotary frequencies, masks) are computed in __init__ and not saved: keep them real.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def read_weights(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a pruned folder's weights file; a cut or damaged file is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        # safetensors names the host "cpu" only (torch also takes "cpu:0")
        return load_file(str(file), device="cpu" if torch.device(device).type == "cpu" else str(device))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{file} is damaged or missing ({str(exc).splitlines()[0][:120]}); "
                         f"rerun `sieve apply -o {file.parent} --force` to rebuild it") from None


def without_modeling_file(path: Path) -> str:
    """What a pruned folder that lost its modeling file can and cannot do (one line)."""
    return (f"{path} has no {MODELING_FILE}: transformers' from_pretrained(trust_remote_code=True), and so lm-eval, "
            f"cannot load it, only sieve_cli.load_pruned (and `sieve eval --model`) can; "
            f"`sieve apply -o {path} --force` writes it again")


def require_modeling_file(path: str | Path) -> None:
    """For paths that hand a pruned folder to transformers' remote-code loader (lm-eval)."""
    path = Path(path)
    if is_pruned_folder(path) and not (path / MODELING_FILE).is_file():
        raise InputError(without_modeling_file(path))


def load_pruned(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                verify: bool = True):
    """Rebuild a model written by `save_pruned`: a regular PreTrainedModel, in eval mode.

    dtype defaults to the stored one. Nothing is downloaded. `verify` checks the files against the
    hashes sieve.json records (False: a copy re-saved by transformers, whose files differ).
    """
    path = Path(path)
    check_device_available(device)
    info = verify_pruned_folder(path) if verify else read_sieve_json(path)
    dt = _resolve_dtype(dtype, info.get("dtype", "float32"))
    if info.get("format", 1) >= 2 and not (path / MODELING_FILE).is_file():
        log.warning(without_modeling_file(path))
    if info.get("quantize"):  # quantised tensors: transformers' torchao loader reads them
        return load_through_transformers(path, info, str(device), dt).eval()
    model = empty_model(base_config(path, info), dt)
    state = read_weights(path / WEIGHTS, device)
    state = {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    try:
        with warnings.catch_warnings():  # rank 0 is legal (the matrix's output is its bias alone)
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            place_low_rank(model, info["factored"])
        result = model.load_state_dict(state, strict=False, assign=True)
    except (AttributeError, RuntimeError, KeyError, TypeError, ValueError) as exc:  # a module it lacks, a rank off by one
        raise InputError(f"{path / WEIGHTS} does not match its config and sieve.json ({str(exc).splitlines()[0][:160]}); "
                         f"rerun `sieve apply -o {path} --force`") from None
    tied = info.get("tied", {})
    missing = set(result.missing_keys) - set(tied)
    if missing or result.unexpected_keys:
        raise InputError(
            f"{path / WEIGHTS} does not match its config and sieve.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}); rerun `sieve apply --force`"
        )
    _retie(model, tied)
    check_task_vocab(model, path, info)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise InputError(f"{path} left parameters unloaded ({left[:3]}); rerun `sieve apply --force`")
    model.to(device).eval()
    _load_generation_config(model, path)
    return model


def check_task_vocab(model: nn.Module, path: Path, info: Mapping) -> None:
    """A task head's stored index must be the kept ids that sieve.json's vocab file lists."""
    found = task_head(model)
    record = info.get("vocab")
    if found is None and not record:
        return
    fix = f"rerun `sieve apply -o {path} --force`"
    if found is None or not record:
        raise InputError(f"{path}: sieve.json and the model disagree on the task vocabulary; {fix}")
    ids = read_json(path / record.get("file", VOCAB_FILE), rebuild=f"sieve apply -o {path} --force").get("ids")
    if not isinstance(ids, list) or found[1].index.tolist() != ids:
        raise InputError(f"{path / VOCAB_FILE} does not list the ids its task head keeps; {fix}")


def load_tokenizer(path: str | Path):
    """The folder's tokenizer, given the base config so transformers never asks to run the modeling file."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(path, config=base_config(path, read_sieve_json(path)), trust_remote_code=False)
    except (OSError, ValueError) as exc:  # tokenizer files deleted or damaged
        raise InputError(f"{path} holds no readable tokenizer ({str(exc).splitlines()[0][:160]}); "
                         f"rerun `sieve apply -o {path} --force` to write it again") from None


def _load_generation_config(model: nn.Module, path: Path) -> None:
    if not (path / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(path)


__all__ = [
    "SIEVE_JSON",
    "VOCAB_FILE",
    "WEIGHTS",
    "build_replacements",
    "count_params",
    "densify_in_place",
    "factored_modules",
    "is_pruned_folder",
    "load_pruned",
    "load_tokenizer",
    "lowrank_from_pair",
    "matrix_params",
    "plan_ranks",
    "prune_in_memory",
    "read_sieve_json",
    "require_modeling_file",
    "save_pruned",
    "task_head",
    "verify_pruned_folder",
]
