"""The modeling file a pruned folder carries, so plain transformers can load it without sieve.

`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` reads `auto_map` in
config.json and imports OUT/modeling_sieve.py, rendered here from one template per base
family: a config class and a model class that subclass the base architecture's own (so
generate, save_pretrained and everything else are the base model's), the model class
swapping `LowRankLinear` pairs in at the places that `config.sieve_factored` lists. The
LowRankLinear in the file is sieve's own class, copied from its source, so both loaders
read the same state-dict keys.

config.json gets a model_type that only the modeling file knows (`sieve_<base type>`):
without trust_remote_code, transformers refuses the folder instead of silently building the
dense architecture with random weights for the factored matrices. `base_config_dict`
undoes that for `sieve_cli.load_pruned`, the path without remote code.

A folder that lost its modeling file: transformers resolves auto_map's "modeling_sieve.SieveConfig"
to OUT/modeling_sieve.py and fails with one line naming that file (utils/hub.py `cached_files`);
nothing else in config.json reaches that message, so sieve's own entry points word the rest
(`pruned.without_modeling_file`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn

from .lowrank import LowRankLinear
from .narrowing import SkippedAttention
from .taskhead import TaskHead

MODELING_FILE = "modeling_sieve.py"
CONFIG_CLASS = "SieveConfig"
MODEL_CLASS = "SieveForCausalLM"
TYPE_PREFIX = "sieve_"
FACTORED_KEY = "sieve_factored"  # config.json: {module name: {rank, in_features, out_features, bias}} (or a `type`)

_TEMPLATE = '''"""A {base_model} pruned by sieve (LLM-Sieve): some linear maps replaced by low-rank pairs.

Load with transformers alone:
    AutoModelForCausalLM.from_pretrained(this_folder, trust_remote_code=True)
Each module named in config.{factored_key} computes y = B(A(x)) (+ bias), A: rank x in, B: out x rank.
This file was written by sieve {version}; it imports only torch and transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import {base_config} as _BaseConfig
from transformers import {base_model} as _BaseModel


{lowrank_source}

{skip_source}

{head_source}

{place_source}

class {config_class}(_BaseConfig):
    model_type = "{model_type}"


class {model_class}(_BaseModel):
    config_class = {config_class}

    def __init__(self, config):
        super().__init__(config)
        place_low_rank(self, getattr(config, "{factored_key}", None) or {{}})
'''


def place_low_rank(model: nn.Module, factored: Mapping[str, Mapping]) -> None:
    """Replace each named module by an empty shell of the recorded type and shape.

    Types: a LowRankLinear pair (the default, with a rank), a narrower `linear` or GPT-2 `conv1d`
    (a width plan), `skip` (an attention module cut to no heads), or `task_head` (the LM head
    restricted to a task's vocabulary; a tied one is re-tied by the loader). The shell takes the dtype
    and device of the module it replaces: the meta device while from_pretrained builds the model,
    which then loads the stored weights into it.
    """
    for name, spec in factored.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        kind = spec.get("type", "lowrank")
        if kind == "skip":
            setattr(parent, child, SkippedAttention())
            continue
        weight = getattr(parent, child).weight
        if kind == "task_head":
            new = TaskHead(spec["vocab_size"], spec["in_features"], spec["kept"], tied=spec["tied"], bias=spec["bias"],
                           dtype=weight.dtype, device=weight.device)
        elif kind == "linear":
            new = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=weight.dtype,
                            device=weight.device)
        elif kind == "conv1d":
            from transformers.pytorch_utils import Conv1D
            new = Conv1D(spec["out_features"], spec["in_features"]).to(dtype=weight.dtype, device=weight.device)
        else:
            new = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"],
                                dtype=weight.dtype, device=weight.device)
        setattr(parent, child, new)


def local_classes(base_model_type: str):
    """The modeling file's two classes, built from sieve's own code (no file executed).

    `load_pruned` uses them where transformers must do the loading (a quantised folder).
    """
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    base_config = CONFIG_MAPPING[base_model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    config_class = type(CONFIG_CLASS, (base_config,), {"model_type": sieve_model_type(base_model_type)})

    def __init__(self, config):
        base_model.__init__(self, config)
        place_low_rank(self, getattr(config, FACTORED_KEY, None) or {})

    model_class = type(MODEL_CLASS, (base_model,), {"config_class": config_class, "__init__": __init__})
    return config_class, model_class


def sieve_model_type(base_model_type: str) -> str:
    return TYPE_PREFIX + base_model_type


def render_modeling_file(model: nn.Module, version: str) -> str:
    """The modeling file for `model`'s family (its config and CausalLM classes as bases)."""
    import transformers

    base_config, base_model = type(model.config).__name__, type(model).__name__
    for name in (base_config, base_model):
        if not hasattr(transformers, name):  # the file imports both from transformers' top level
            raise ValueError(f"transformers exports no {name}; a pruned {base_model} cannot carry a modeling file")
    return _TEMPLATE.format(
        base_config=base_config, base_model=base_model, config_class=CONFIG_CLASS, model_class=MODEL_CLASS,
        model_type=sieve_model_type(model.config.model_type), factored_key=FACTORED_KEY, version=version,
        lowrank_source=inspect.getsource(LowRankLinear), place_source=inspect.getsource(place_low_rank),
        skip_source=inspect.getsource(SkippedAttention), head_source=inspect.getsource(TaskHead),
    )


def remote_code_config(config_dict: Mapping, factored: Mapping[str, Mapping]) -> dict:
    """config.json of a pruned folder: the base config, re-typed and pointed at the modeling file."""
    module = MODELING_FILE.removesuffix(".py")
    return {
        **config_dict,
        "model_type": sieve_model_type(config_dict["model_type"]),
        "architectures": [MODEL_CLASS],
        "auto_map": {"AutoConfig": f"{module}.{CONFIG_CLASS}", "AutoModelForCausalLM": f"{module}.{MODEL_CLASS}"},
        FACTORED_KEY: {name: dict(spec) for name, spec in factored.items()},
    }


def base_config_dict(config_dict: Mapping, base_model_type: str, architecture: str) -> dict:
    """The base family's config from a pruned folder's config.json (for the loader without remote code)."""
    base = {k: v for k, v in config_dict.items() if k not in ("auto_map", FACTORED_KEY)}
    return {**base, "model_type": base_model_type, "architectures": [architecture]}


__all__ = ["MODELING_FILE", "local_classes", "place_low_rank", "base_config_dict", "remote_code_config", "render_modeling_file", "sieve_model_type"]
