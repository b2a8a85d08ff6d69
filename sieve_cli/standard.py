"""A width plan that leaves every kept block the same shape, saved as the family's own architecture.

When every kept block has the same MLP width and the same number of KV groups, and every other
block lost both its MLP and its attention, the pruned model *is* a model of the input family
with a smaller `intermediate_size` (or `n_inner` / `ffn_dim`), fewer heads and fewer layers.
Its folder then holds a plain config.json of that family and the renumbered weights: plain
`AutoModelForCausalLM.from_pretrained(OUT)` loads it (no remote code), and so does any engine
that runs the family. `sieve.json` beside it records the plan and marks the folder `standard`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from torch import nn

from .archs import arch_for
from .files import save_safetensors, sha256_file
from .narrowing import WidthUnit, head_layout
from .pruned import FORMAT, SIEVE_JSON, WEIGHTS, shared_weights, weights_dtype
from .quantize import quantize_folder
from .version import __version__

MLP_WIDTH_KEYS = ("intermediate_size", "n_inner", "ffn_dim")  # where families keep the MLP width


@dataclass(frozen=True)
class StandardShape:
    mlp_width: int | None  # None: unchanged
    kv_groups: int | None  # None: unchanged
    removed_blocks: tuple[int, ...] = field(default_factory=tuple)

    def describe(self) -> dict:
        return {"mlp_width": self.mlp_width, "kv_groups": self.kv_groups, "removed_blocks": list(self.removed_blocks)}


def standard_shape(model: nn.Module, units: list[WidthUnit], widths: Mapping[str, int | None]) -> StandardShape | None:
    """The shape a width plan gives the model when it is a standard one (see the module docstring), else None."""
    by_block: dict[int, dict[str, int]] = {}
    for u in units:
        width = widths.get(u.name)
        by_block.setdefault(u.block, {})[u.kind] = u.units if width is None else width
    kinds = {u.kind for u in units}
    removed = tuple(b for b, w in by_block.items() if len(w) == len(kinds) == 2 and not any(w.values()))
    kept = [w for b, w in by_block.items() if b not in removed]
    if not kept:
        return None
    shape = {}
    for kind in kinds:
        values = {w[kind] for w in kept}
        if len(values) != 1 or 0 in values:
            return None
        shape[kind] = values.pop()
    config = model.config
    full = {u.kind: u.units for u in units}
    mlp = shape.get("mlp") if shape.get("mlp") != full.get("mlp") else None
    groups = shape.get("attention") if shape.get("attention") != full.get("attention") else None
    if mlp is not None and mlp_width_key(config) is None:
        return None
    if removed and not hasattr(config, "num_hidden_layers"):
        return None
    return StandardShape(mlp, groups, removed)


def mlp_width_key(config) -> str | None:
    """The config key holding the MLP width (GPT-2's n_inner may be null: 4 x n_embd)."""
    keys = config.to_dict()
    return next((k for k in MLP_WIDTH_KEYS if k in keys), None)


def standard_config(config, shape: StandardShape):
    """The family's config with the plan's widths, heads and layers."""
    config = copy.deepcopy(config)
    if shape.mlp_width is not None:
        setattr(config, mlp_width_key(config), shape.mlp_width)
    if shape.kv_groups is not None:
        heads, kv, head_dim = head_layout(config)
        config.head_dim = head_dim  # explicit: the default hidden / heads would change with the heads
        config.num_attention_heads = heads // kv * shape.kv_groups
        config.num_key_value_heads = shape.kv_groups
    if shape.removed_blocks:
        layers = config.num_hidden_layers
        kept = [i for i in range(layers) if i not in shape.removed_blocks]
        for key, value in list(vars(config).items()):  # per-layer lists (Gemma 3's layer_types) follow the layers
            if isinstance(value, list) and len(value) == layers and key != "architectures":
                setattr(config, key, [value[i] for i in kept])
        config.num_hidden_layers = len(kept)
    return config


def renumbered(state: dict, blocks: str, removed: tuple[int, ...]) -> dict:
    """The state dict without the removed blocks, the others numbered 0, 1, ... in order."""
    if not removed:
        return state
    pattern = re.compile(rf"^{re.escape(blocks)}\.(\d+)\.")
    indices = sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})
    new_index = {old: new for new, old in enumerate(i for i in indices if i not in removed)}
    out = {}
    for key, tensor in state.items():
        m = pattern.match(key)
        if m is None:
            out[key] = tensor
        elif int(m.group(1)) in new_index:
            out[f"{blocks}.{new_index[int(m.group(1))]}.{key[m.end():]}"] = tensor
    return out


def save_standard(model: nn.Module, out: str | Path, shape: StandardShape, plan: Mapping, base_identity: Mapping,
                  tokenizer=None, extra: Mapping | None = None, quantize: str | None = None) -> dict:
    """Write the standard folder of a narrowed model; returns the sieve.json written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tied = shared_weights(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    state = renumbered(state, arch_for(model.config.model_type).blocks, shape.removed_blocks)
    save_safetensors(state, out / WEIGHTS, metadata={"format": "pt"})
    dtype = weights_dtype(model)
    config = standard_config(model.config, shape)
    config.dtype = dtype
    config.save_pretrained(out)
    written = [WEIGHTS, "config.json"]
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
        written.append("generation_config.json")
    if tokenizer is not None:
        written += [Path(f).name for f in tokenizer.save_pretrained(out)]
    info = {
        "format": FORMAT, "sieve_version": __version__, "base_model": dict(base_identity),
        "model_type": model.config.model_type, "architecture": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."), "fit_method": "width", "factored": {}, "tied": tied,
        "params": sum(t.numel() for t in state.values()), "plan": dict(plan),
        "files": sorted({name for name in written if (out / name).is_file()} | {SIEVE_JSON}), "quantize": quantize,
        **dict(extra or {}),
    }
    if quantize is not None:
        quantize_folder(out, quantize, info, WEIGHTS)
    info["sha256"] = {name: sha256_file(out / name) for name in info["files"] if name != SIEVE_JSON}
    (out / SIEVE_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


__all__ = ["StandardShape", "save_standard", "standard_config", "standard_shape"]
