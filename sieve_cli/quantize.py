"""Quantised pruned folders (`sieve apply --quantize`), through torchao and transformers.

torchao's int8 weight-only scheme stores every linear weight (the dense ones and both
factors A and B of a LowRankLinear) as int8 with one float scale per output row; activations
stay in the folder's dtype. It runs on CPU and GPU, and transformers saves and reloads it
(`quantization_config` in config.json), so the remote-code path and `load_pruned` read
the folder alike. Embeddings, the LM head and tied weights stay unquantised (transformers'
default for torchao, `default_skips`), and so do the factors torchao cannot quantise (`unquantisable_factors`: rank 0 and
the B of rank 1).

int4 is not offered: with torchao 0.18 and transformers 5.24 no 4-bit weight format both runs on
CPU and saves through transformers (checked on this CPU, float32 and bfloat16 weights):
- Int4WeightOnlyConfig, packing plain / preshuffled: "ImportError: Requires mslk >= 1.0.0" (PyPI's
  mslk is a 0.0.0 placeholder, mslk-cuda is CUDA only); plain_int32: "Int4PlainInt32Tensor does not
  support device 'cpu' yet" (XPU/NPU); tile_packed_to_4d (tinygemm): "Torch not compiled with CUDA
  enabled" (and bfloat16 only). The v1 Int4CPULayout is gone from torchao.dtypes.
- torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig (Int4OpaqueTensor, torch's
  _weight_int4pack_mm_for_cpu) quantises and runs on CPU, but save_pretrained fails: "ValueError:
  Unsupported tensor type: <class 'torchao.prototype.quantization.int4.Int4OpaqueTensor'>" (torchao's
  safetensors support lists Int4Tensor, Int4TilePackedTo4dTensor, Int4PlainInt32Tensor, not it).
- IntxWeightOnlyConfig(weight_dtype=torch.int4) runs and saves, but as IntxUnpackedToInt8Tensor: one
  int4 value per int8 byte, so its file is no smaller than int8's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
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
    return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)


def default_skips(folder: Path, info: Mapping) -> list[str]:
    """What transformers leaves unquantised by default: the LM head and tied weights.

    transformers drops these defaults as soon as it is given its own `modules_to_not_convert`
    (HfQuantizer.get_modules_to_not_convert), so they are computed here, with its own function,
    on the folder's architecture built on the meta device (no weights read).
    """
    from accelerate import init_empty_weights
    from transformers.quantizers.base import get_keys_to_not_convert

    config_class, model_class = local_classes(info["model_type"])
    with init_empty_weights(), warnings.catch_warnings():  # a rank-0 factor is a legal zero-element weight
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = model_class(config_class.from_dict(json.loads((folder / "config.json").read_text())))
    return sorted(get_keys_to_not_convert(model))


def unquantisable_factors(factored: Mapping[str, Mapping]) -> list[str]:
    """Factors torchao's int8 cannot quantise, left in float: both of a rank-0 matrix (zero-element
    weights), and B of a rank-1 matrix (one input column: torchao 0.18's per-row scales fail on
    an out x 1 weight, "shape '[out, 1]' is invalid for input of size 1"). Either holds at most
    out_features numbers, so leaving it in float costs nothing measurable."""
    skipped = []
    for name, spec in factored.items():
        if spec.get("type", "lowrank") != "lowrank":  # a narrowed Linear (width plan) quantises as any other
            continue
        if spec["rank"] == 0:
            skipped += [f"{name}.A", f"{name}.B"]
        elif spec["rank"] == 1:
            skipped.append(f"{name}.B")
    return skipped


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
    config = torchao_config(scheme, default_skips(folder, info) + unquantisable_factors(info["factored"]))
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
