"""Quantised pruned folders (`sieve apply --quantize`), through torchao and transformers.

torchao's int8 weight-only scheme stores every linear weight (the dense ones and both
factors A and B of a LowRankLinear) as int8 with one float scale per output row; activations
stay in the folder's dtype. It runs on CPU and GPU, and transformers saves and reloads it
(`quantization_config` in config.json), so the remote-code path and `load_pruned` read
the folder alike. Embeddings and the LM head stay unquantised (transformers' default for
torchao), and so does a rank-0 factor, which has no weights to quantise.

int4: torchao 0.18 has no 4-bit weight format that runs and saves on CPU (Int4WeightOnlyConfig
needs the mslk kernels or a CUDA/XPU device; IntxWeightOnlyConfig(int4) stores one int4 per
int8 byte, so its file is no smaller than int8's), so it is not offered.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .errors import InputError
from .modeling import local_classes
from .models import torch_dtype
from .options import QUANTIZE_SCHEMES as SCHEMES


def torchao_config(scheme: str, skip: list[str]):
    """The transformers quantization config for `scheme`, leaving the modules in `skip` alone."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise InputError("--quantize needs torchao: pip install 'sieve-cli[quantize]'") from None
    from transformers import TorchAoConfig

    assert scheme in SCHEMES, scheme  # options.check_quantize refused the others
    return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip or None)


def empty_factors(factored: Mapping[str, Mapping]) -> list[str]:
    """The A and B of every rank-0 matrix: zero-element weights that torchao cannot quantise."""
    return [f"{name}.{part}" for name, spec in factored.items() if spec["rank"] == 0 for part in ("A", "B")]


def load_through_transformers(folder: Path, info: Mapping, device: str, dtype, quantization_config=None):
    """from_pretrained with the modeling file's classes built from sieve's code (no remote code run)."""
    config_class, model_class = local_classes(info["model_type"])
    config = config_class.from_dict(json.loads((folder / "config.json").read_text()))
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    return model_class.from_pretrained(folder, config=config, dtype=dtype, device_map=str(device), **extra)


def quantize_folder(folder: Path, scheme: str, info: Mapping, weights: str) -> None:
    """Replace the folder's float weights by `scheme`'s, and record it in config.json.

    Loads the folder through transformers with a torchao config (transformers quantises while
    loading) and keeps only what save_pretrained writes for the weights and the quantization
    config: sieve's config.json, modeling file, tokenizer and sieve.json stay.
    """
    config = torchao_config(scheme, empty_factors(info["factored"]))
    model = load_through_transformers(folder, info, "cpu", torch_dtype(info["dtype"]), config)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        model.save_pretrained(tmp)
        saved = sorted(Path(tmp).glob("*.safetensors"))
        if [p.name for p in saved] != [weights]:  # one file, the name sieve reads
            raise RuntimeError(f"expected one {weights} from save_pretrained, got {[p.name for p in saved]}")
        shutil.move(str(saved[0]), folder / weights)
        written = json.loads((Path(tmp) / "config.json").read_text())
    path = folder / "config.json"
    config_json = json.loads(path.read_text())
    config_json["quantization_config"] = written["quantization_config"]
    path.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")


__all__ = ["SCHEMES", "load_through_transformers", "quantize_folder"]
