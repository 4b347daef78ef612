"""Qwen2 / Llama-3 decoder in Flax NNX, its KV cache, and Hugging Face import/export."""

from aapo_jax.models.config import ModelConfig, RopeScaling
from aapo_jax.models.hf import (
    abstract_hf_model,
    config_from_hf,
    load_hf_checkpoint,
    read_hf_config,
    save_hf_checkpoint,
    save_peft_adapters,
)
from aapo_jax.models.lora import merged, split_trained
from aapo_jax.models.transformer import (
    KVCache,
    Transformer,
    compute_logits,
    init_cache,
    positions_from_mask,
)

__all__ = [
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "abstract_hf_model",
    "compute_logits",
    "config_from_hf",
    "init_cache",
    "load_hf_checkpoint",
    "merged",
    "positions_from_mask",
    "read_hf_config",
    "save_hf_checkpoint",
    "save_peft_adapters",
    "split_trained",
]
