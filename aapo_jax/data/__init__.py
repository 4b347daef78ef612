"""Data: tokenizers, prompt templates and batching."""

from aapo_jax.data.tokenize import (
    DEFAULT_BUCKETS,
    bucket_length,
    format_prompt,
    left_pad,
    load_tokenizer,
    tokenize_prompts,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "bucket_length",
    "format_prompt",
    "left_pad",
    "load_tokenizer",
    "tokenize_prompts",
]
