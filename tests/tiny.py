"""Tiny random models, one per family in the architecture table, built from configs (never downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

CONFIGS = {
    "llama": dict(COMMON, num_key_value_heads=2),
    "mistral": dict(COMMON, num_key_value_heads=2),
    "qwen2": dict(COMMON, num_key_value_heads=2),
    "qwen3": dict(COMMON, num_key_value_heads=2, head_dim=8),
    "gemma": dict(COMMON, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(COMMON, num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=16),
    "phi3": dict(COMMON, num_key_value_heads=2, pad_token_id=0),
    "gpt_neox": dict(COMMON),
    "opt": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4),
}


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids < VOCAB), built in memory."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny(folder, model_type: str = "llama", seed: int = 0):
    """A tiny model + tokenizer saved as a local Hugging Face folder; returns the folder."""
    model = tiny_model(model_type, seed)
    model.config.pad_token_id = 0
    model.config.eos_token_id = 1
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# Families whose block calls differ: learned positions (gpt2), rotary (llama), Gemma 3's sliding + full layers
BLOCK_FAMILIES = ["llama", "gpt2", "gemma3_text"]
BLOCK_CONFIGS = dict(CONFIGS, gemma3_text=dict(CONFIGS["gemma3_text"], layer_types=["sliding_attention", "full_attention"]))


def save_block_families(tmp_path_factory) -> dict:
    """One saved tiny model folder per BLOCK_FAMILIES entry (Gemma 3 with one sliding and one full layer)."""
    from unittest import mock

    folders = {}
    for family in BLOCK_FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        with mock.patch.dict(CONFIGS, BLOCK_CONFIGS):
            save_tiny(folder, family)
        folders[family] = folder
    return folders
