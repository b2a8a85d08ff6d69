"""The architecture table: where each family keeps its decoder blocks and prunable matrices.

One declarative entry per family, keyed by `config.model_type`. A matrix's *site* names
the tensor it reads inside its block: matrices with the same site (q, k, v; gate, up)
read the same input, so capture keeps one set of statistics for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedArchitectureError

ATTENTION_KINDS = ("q", "k", "v", "qkv", "o")
MLP_KINDS = ("gate", "up", "gate_up", "fc1", "down", "fc2")


@dataclass(frozen=True)
class MatrixSpec:
    path: str  # module path inside one decoder block
    kind: str  # one of ATTENTION_KINDS + MLP_KINDS
    site: str  # the input it reads: attn_in, attn_out, mlp_in, mlp_out

    @property
    def group(self) -> str:
        return "attention" if self.kind in ATTENTION_KINDS else "mlp"


@dataclass(frozen=True)
class WidthSpec:
    """A module whose inner width can be cut by whole units (see narrowing.py)."""

    kind: str  # mlp | attention
    unit: str  # neuron (one intermediate unit) | kv_group (a KV head with its query heads)
    rows: tuple[str, ...]  # matrix kinds that lose rows per unit
    out: str  # the matrix kind that loses columns and is refit
    module: str = ""  # its path in the block ("" where the MLP is the block itself, as OPT's)
    stacked: tuple[str, ...] = ()  # row kinds holding two stacked halves (phi3's gate_up)
    skip: bool = False  # at width 0 the module is replaced by one that outputs zero (attention)


_MLP_WIDTH = WidthSpec("mlp", "neuron", ("gate", "up"), "down", "mlp")
_KV_GROUPS = WidthSpec("attention", "kv_group", ("q", "k", "v"), "o", "self_attn", skip=True)


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # path from the CausalLM model to the ModuleList of decoder blocks
    matrices: tuple[MatrixSpec, ...]
    # where width pruning is valid: attention only where the module's forward infers the head
    # count from q's width (view(..., -1, head_dim)) and maps query heads to KV heads by position
    widths: tuple[WidthSpec, ...] = ()


def _m(path: str, kind: str, site: str) -> MatrixSpec:
    return MatrixSpec(path, kind, site)


_SEPARATE_QKV = (
    _m("self_attn.q_proj", "q", "attn_in"),
    _m("self_attn.k_proj", "k", "attn_in"),
    _m("self_attn.v_proj", "v", "attn_in"),
    _m("self_attn.o_proj", "o", "attn_out"),
)
_GATED_MLP = (
    _m("mlp.gate_proj", "gate", "mlp_in"),
    _m("mlp.up_proj", "up", "mlp_in"),
    _m("mlp.down_proj", "down", "mlp_out"),
)
LLAMA_LIKE = ArchSpec("model.layers", _SEPARATE_QKV + _GATED_MLP, (_MLP_WIDTH, _KV_GROUPS))

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "gemma3": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
    # GPT-2 uses Conv1D (weights stored in x out) and a fused c_attn.
    "gpt2": ArchSpec(
        "transformer.h",
        (
            _m("attn.c_attn", "qkv", "attn_in"),
            _m("attn.c_proj", "o", "attn_out"),
            _m("mlp.c_fc", "fc1", "mlp_in"),
            _m("mlp.c_proj", "fc2", "mlp_out"),
        ),
        (WidthSpec("mlp", "neuron", ("fc1",), "fc2", "mlp"),),  # attention splits c_attn by fixed sizes
    ),
    "phi3": ArchSpec(
        "model.layers",
        (
            _m("self_attn.qkv_proj", "qkv", "attn_in"),
            _m("self_attn.o_proj", "o", "attn_out"),
            _m("mlp.gate_up_proj", "gate_up", "mlp_in"),
            _m("mlp.down_proj", "down", "mlp_out"),
        ),
        (WidthSpec("mlp", "neuron", ("gate_up",), "down", "mlp", stacked=("gate_up",)),),
    ),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers",
        (
            _m("attention.query_key_value", "qkv", "attn_in"),
            _m("attention.dense", "o", "attn_out"),
            _m("mlp.dense_h_to_4h", "fc1", "mlp_in"),
            _m("mlp.dense_4h_to_h", "fc2", "mlp_out"),
        ),
        (WidthSpec("mlp", "neuron", ("fc1",), "fc2", "mlp"),),
    ),
    "opt": ArchSpec(
        "model.decoder.layers",
        (
            _m("self_attn.q_proj", "q", "attn_in"),
            _m("self_attn.k_proj", "k", "attn_in"),
            _m("self_attn.v_proj", "v", "attn_in"),
            _m("self_attn.out_proj", "o", "attn_out"),
            _m("fc1", "fc1", "mlp_in"),
            _m("fc2", "fc2", "mlp_out"),
        ),
        (WidthSpec("mlp", "neuron", ("fc1",), "fc2"),),
    ),
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_for(model_type: str) -> ArchSpec:
    """The table entry for `model_type`, or an error listing the supported families."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        ) from None
