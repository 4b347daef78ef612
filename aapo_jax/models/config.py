"""Typed, validated architecture config for the Qwen2 / Llama-3 decoder family."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from aapo_jax.models import lora as lora_lib

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
# How the backward pass of the layer scan recomputes: "none" keeps every layer's
# activations, "full" keeps only each layer's input, "dots" also keeps the
# projections' outputs (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).
REMAT_POLICIES = ("none", "full", "dots")
# `attention.attend` implementations; "auto" is splash on TPU, cuDNN flash on GPU,
# query-chunked XLA elsewhere.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ("llama3") RoPE frequency scaling, as in Llama-3.1 / 3.2 checkpoints."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only checkpoint.

    `dtype` is the activation/compute dtype, `param_dtype` the storage dtype of
    the weights (cast to `dtype` inside the forward: fp32 masters, bf16 compute).
    Log-softmax, RMSNorm statistics, RoPE and attention softmax are always computed
    in fp32. `remat` is one of `REMAT_POLICIES` (True / False mean "full" / "none");
    `attention` one of `ATTENTION_IMPLEMENTATIONS`, with `attention_block` its query
    block (chunked) or kernel block (splash) size. `scan_unroll` is how many layers
    one iteration of the forward's layer scan holds (the training forward and the
    prefill): 1 (rolled) keeps compile time independent of depth; -1 (or ≥
    `num_layers`) unrolls every layer, which costs compile time linear in depth and
    is the faster choice for tiny models on CPU. With -1 the sampler's decode also
    gives each layer its own copy of its weights (`Transformer.unstacked_layers`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: Literal["qwen2", "llama"] = "qwen2"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    attention_block: int = 512
    scan_unroll: int = 1
    # LoRA (`models.lora`): rank 0 is full fine-tuning. The base is then frozen in the
    # compute dtype (or nf4), the adapters train in `param_dtype`.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: the rank (scale 1)
    lora_targets: str = lora_lib.DEFAULT_TARGETS
    lora_base_qtype: str = ""  # "" or "nf4" (QLoRA)
    lora_tile_size: int = 64

    def __post_init__(self):
        if isinstance(self.remat, bool):  # the older boolean spelling
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"ModelConfig.model_type={self.model_type!r} is not supported; "
                f"expected one of {SUPPORTED_MODEL_TYPES}."
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)."
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r}; expected 'float32', "
                    "'bfloat16' or 'float16'."
                )

        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; expected one of {REMAT_POLICIES}.")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"ModelConfig.attention={self.attention!r}; expected one of "
                f"{ATTENTION_IMPLEMENTATIONS}."
            )
        if not isinstance(self.attention_block, int) or self.attention_block < 1:
            raise ValueError(
                f"ModelConfig.attention_block must be a positive int, got {self.attention_block!r}."
            )
        if not isinstance(self.scan_unroll, int) or not (
            self.scan_unroll == -1 or self.scan_unroll >= 1
        ):
            raise ValueError(
                f"ModelConfig.scan_unroll must be -1 (every layer) or a positive int, got "
                f"{self.scan_unroll!r}."
            )

        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(
                f"ModelConfig.lora_rank must be an int ≥ 0 (0: no LoRA), got {self.lora_rank!r}."
            )
        if self.lora_alpha < 0:
            raise ValueError(f"ModelConfig.lora_alpha must be ≥ 0, got {self.lora_alpha!r}.")
        if self.lora_base_qtype not in lora_lib.BASE_QTYPES:
            raise ValueError(
                f"ModelConfig.lora_base_qtype={self.lora_base_qtype!r}; expected one of "
                f"{lora_lib.BASE_QTYPES}."
            )
        if self.lora_base_qtype and not self.lora_rank:
            raise ValueError(
                f"ModelConfig.lora_base_qtype={self.lora_base_qtype!r} quantizes the frozen "
                "base of a LoRA model: set lora_rank > 0 too."
            )
        if not isinstance(self.lora_tile_size, int) or self.lora_tile_size < 1:
            raise ValueError(
                f"ModelConfig.lora_tile_size must be a positive int, got {self.lora_tile_size!r}."
            )
        if self.lora_rank:
            lora_lib.targeted(self.lora_targets)  # names the field when it matches nothing

    @property
    def lora_paths(self) -> tuple[str, ...]:
        """The projections that carry adapters (none without LoRA)."""
        return lora_lib.targeted(self.lora_targets) if self.lora_rank else ()

    @property
    def lora_scale(self) -> float:
        """alpha / r, the adapters' output scale."""
        return (self.lora_alpha or self.lora_rank) / max(self.lora_rank, 1)

    @property
    def base_weight_dtype(self) -> jnp.dtype:
        """Storage of the non-adapter weights: frozen in the compute dtype under LoRA, else
        the trained masters' `param_dtype`."""
        return self.compute_dtype if self.lora_rank else self.weight_dtype

    @property
    def layers_per_scan_step(self) -> int:
        """The `unroll` of the layer scan: `scan_unroll` clipped to the layer count."""
        if self.scan_unroll == -1:
            return self.num_layers
        return min(self.scan_unroll, self.num_layers)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += d
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head
