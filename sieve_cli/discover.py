"""Stage 1, discover: the model's matrices by kind, with true parameter counts.

`diagnose(model)` is the pure part (counts from the model itself); `run_discover`
binds a model to a workspace, so later stages know what to load.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from torch import nn

from .errors import StaleStageError
from .files import read_json, write_json_atomic
from .matrices import find_matrices, is_linear_like
from .models import (
    check_device_available,
    load_model,
    local_folder,
    meta_model,
    model_identity,
    model_stat,
    resolve_source,
)
from .options import DiscoverOptions
from .workspace import Stage, Workspace

STAGE = Stage.DISCOVER


def _unique_params(modules: list[nn.Module]) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters(recurse=False) if p.dim() >= 2}
    return sum(seen.values())


def diagnose(model: nn.Module) -> dict:
    """Counts of linear layers and parameters by type; weights only, biases not counted.

    Types: attention and mlp (the prunable matrices), head (the LM head, possibly tied
    to the token embedding), embedding (token and position embeddings).
    """
    matrices = find_matrices(model)
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    head = model.get_output_embeddings()
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    tied = head is not None and any(head.weight is e.weight for e in embeddings)
    groups = {}
    for group in ("attention", "mlp"):
        chosen = [m for m in matrices if m.group == group]
        groups[group] = {"count": len(chosen), "params": sum(m.params for m in chosen)}
    groups["head"] = {"count": int(head is not None), "params": _unique_params([head] if head is not None else []), "tied": tied}
    groups["embedding"] = {"count": len(embeddings), "params": _unique_params(embeddings)}
    head_extra = 0 if tied else groups["head"]["params"]
    counted = groups["attention"]["params"] + groups["mlp"]["params"] + groups["embedding"]["params"] + head_extra
    groups["other"] = {"count": 0, "params": total - counted}  # norms, biases
    for entry in groups.values():
        entry["share"] = entry["params"] / total if total else 0.0
    prunable_params = groups["attention"]["params"] + groups["mlp"]["params"]
    return {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "blocks": len({m.block for m in matrices}),
        "total_params": total,
        "linear_layers": sum(1 for m in model.modules() if is_linear_like(m)),
        "groups": groups,
        "prunable": len(matrices),
        "prunable_params": prunable_params,
        "prunable_share": prunable_params / total if total else 0.0,
        "biases_counted": False,
        "ready": len(matrices) > 0,
        "matrices": [m.to_dict() for m in matrices],
    }


def run_discover(workspace: Workspace | None, options: DiscoverOptions, force: bool = False) -> dict:
    """Diagnose the model; with a workspace, bind the model to it and write matrices.json.

    A workspace already bound to other weights or options is refused unless `force`.
    Local and .gguf models are identified by content hash before loading, so a workspace
    that is up to date returns its matrices.json without loading the model at all.
    """
    source = resolve_source(options.model)  # a bad path fails before any loading
    if source.kind != "hub":  # recorded absolute: a later stage run from another folder loads this model
        options = replace(options, model=source.location)
    if workspace is not None and source.kind != "hub":
        inputs = {"options": asdict(options), "model": model_identity(options.model)}
        if not workspace.begin(STAGE, inputs, force=force):
            return read_json(workspace.matrices_json)
    check_device_available(options.device)  # as load_model would: later stages use this device
    model = _meta_model(options.model)  # counts and shapes need no weights where they are local
    if model is None:
        model, _ = load_model(options.model, options.dtype, options.device)
    result = diagnose(model)
    result["model"] = model_identity(options.model, model)
    if workspace is None:
        return result
    inputs = {"options": asdict(options), "model": result["model"]}
    if workspace.begin(STAGE, inputs, force=force):
        write_json_atomic(workspace.matrices_json, result)
        summary = {"prunable": result["prunable"], "model_stat": model_stat(options.model)}
        workspace.finish(STAGE, inputs, [workspace.matrices_json], summary=summary)
    return result


def _meta_model(source: str):
    """The model built from its config on the meta device when its weights are local
    (a folder, a .gguf's dequantised cache, a downloaded hub snapshot): counting parameters
    then needs no memory for them. None when there is no local folder."""
    folder = local_folder(source)
    if folder is None:
        return None
    try:
        return meta_model(folder)
    except (OSError, ValueError, KeyError):  # a config transformers cannot build: load it the usual way
        return None


def workspace_model_source(workspace: Workspace) -> str:
    """The model the workspace was bound to by `sieve discover`."""
    return workspace.require(STAGE)["inputs"]["options"]["model"]


def check_model_unchanged(workspace: Workspace) -> dict:
    """The discover manifest, after checking the model's files are still the ones discover hashed.

    Size and modification time first (free); where they changed, the content hash decides, so
    weights replaced after fit are named instead of silently used with the old factors.
    """
    manifest = workspace.require(STAGE)
    recorded, source = manifest["inputs"].get("model") or {}, manifest["inputs"]["options"]["model"]
    if recorded.get("kind") not in ("local", "gguf"):
        return manifest
    if (manifest.get("summary") or {}).get("model_stat") == model_stat(source):
        return manifest
    if model_identity(source).get("sha256") != recorded.get("sha256"):
        raise StaleStageError(
            f"the model at {source} changed since `sieve discover` bound it to {workspace.root} (its files were "
            f"replaced); rerun `sieve discover {source} -w {workspace.root} --force`, then the later stages"
        )
    return manifest


def load_workspace_model(workspace: Workspace, dtype: str | None = None, device: str = "cpu",
                         max_memory: dict | None = None):
    """(model, tokenizer) of the workspace's model; dtype defaults to the one discover used;
    `max_memory` spreads it over devices (`load_model`)."""
    options = check_model_unchanged(workspace)["inputs"]["options"]
    return load_model(options["model"], dtype or options["dtype"], device, max_memory)
