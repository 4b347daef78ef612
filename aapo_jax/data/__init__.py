"""Data: problem sources, tokenizers, prompt templates and batching."""

from aapo_jax.data.pipeline import (
    EncodedPrompt,
    HostPromptBatch,
    PromptLoader,
    PromptStats,
    encode_examples,
)
from aapo_jax.data.sources import (
    ANSWER_KEYS,
    EVAL_SEED_OFFSET,
    QUESTION_KEYS,
    DataConfig,
    Example,
    gym_splits,
    load_splits,
    read_records,
    tfds_examples,
)
from aapo_jax.data.tokenize import (
    DEFAULT_BUCKETS,
    bucket_length,
    decode_completions,
    encode_targets,
    format_prompt,
    left_pad,
    load_tokenizer,
    tokenize_prompts,
)

__all__ = [
    "ANSWER_KEYS",
    "DEFAULT_BUCKETS",
    "EVAL_SEED_OFFSET",
    "QUESTION_KEYS",
    "DataConfig",
    "EncodedPrompt",
    "Example",
    "HostPromptBatch",
    "PromptLoader",
    "PromptStats",
    "bucket_length",
    "decode_completions",
    "encode_examples",
    "encode_targets",
    "format_prompt",
    "gym_splits",
    "left_pad",
    "load_splits",
    "load_tokenizer",
    "read_records",
    "tfds_examples",
    "tokenize_prompts",
]
