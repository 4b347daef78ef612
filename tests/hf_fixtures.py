"""Tiny Hugging Face checkpoints and tokenizers built locally with transformers + CPU torch."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

FAMILIES = {
    # name: (model_type, extra config)
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2_tied_mqa": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "llama3": (
        "llama",
        dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama3_tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
}

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_model_config(**overrides):
    """The tiny model as our `models.ModelConfig` (Qwen2: q/k/v biases), from the numbers in
    `TINY`; tests that need another vocabulary, width or depth pass it as an override."""
    import dataclasses

    from aapo_jax import models

    config = models.config_from_hf({**TINY, "model_type": "qwen2"})
    return dataclasses.replace(config, **overrides)


def hf_config(family: str, **overrides):
    import transformers

    model_type, extra = FAMILIES[family]
    kwargs = {**TINY, **extra, **overrides}
    kwargs.setdefault("rope_parameters", dict(rope_type="default", rope_theta=10000.0))
    cls = transformers.Qwen2Config if model_type == "qwen2" else transformers.LlamaConfig
    return cls(**kwargs)


def make_torch_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised transformers model with O(1) logits (all params perturbed)."""
    from experiments.bench_common import random_torch_model

    return random_torch_model(hf_config(family, **overrides), seed)


def save_checkpoint(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny checkpoint exactly as transformers 5 writes it (fp32, one file)."""
    make_torch_model(family, seed, **overrides).save_pretrained(path)
    return path


def hub_style_copy(src: Path, dst: Path, max_shard_size: str = "20KB") -> Path:
    """Rewrite a checkpoint as hub models ship: bf16, sharded, transformers-4.x config.json."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    config = json.loads((dst / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    config["torch_dtype"] = config.pop("dtype", "bfloat16")
    config["transformers_version"] = "4.51.3"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def torch_logits(model_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray):
    """fp32 transformers logits for a left-padded batch (positions from the mask)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return torch_model_logits(model.eval(), input_ids, attention_mask)


def torch_model_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths, width: int, vocab: int, pad: int = 0):
    """Random token rows of the given lengths, left-padded to `width`."""
    ids = np.full((len(lengths), width), pad, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.integers(3, vocab, size=n)
        mask[row, width - n :] = 1
    return ids, mask


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def make_tokenizer(path: Path, corpus: list[str] | None = None, vocab_size: int = 96) -> Path:
    """A tiny byte-level BPE tokenizer with a chat template, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (
        corpus
        or [
            "What is 12 + 7? The answer is 19.",
            "Calculate 5 - 3 - 6. Answer: -4",
            "<think> add the numbers </think> <answer> 42 </answer>",
        ]
        * 4
    )
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(specials)),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(path)
    return path


def make_model_dir(path: Path, family: str = "qwen2", seed: int = 0) -> Path:
    """A tokenizer plus a random tiny checkpoint of matching vocabulary, in one directory."""
    from transformers import AutoTokenizer

    make_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    make_torch_model(family, seed, **ids).save_pretrained(path)
    return path


def digit_fraction(completions, *, answers, **kwargs):
    """A host reward that varies on a random model's output: the share of digit characters.

    Tests train with it so that rewards, advantages, losses and gradients are not all 0
    (a random model almost never solves the task, and 0 rewards would hide a broken update).
    """
    del answers, kwargs
    return np.asarray(
        [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions], np.float32
    )


def hangs(completions, *, answers, **kwargs):
    """A host reward that never returns (an unbounded call in a user's reward)."""
    del completions, answers, kwargs
    time.sleep(10_000)


def always_raises(completions, *, answers, **kwargs):
    """A host reward that fails on every sample (a broken dependency, say)."""
    del completions, answers, kwargs
    raise ConnectionError("the grading service is down")


def returns_strings(completions, *, answers, **kwargs):
    """A host reward that breaks the contract: strings, not numbers."""
    del answers, kwargs
    return ["1.0" for _ in completions]


def low_token_share(tokens, mask, targets, target_len):
    """A token reward that varies on a random model: the share of completion tokens below 16."""
    import jax.numpy as jnp

    del targets, target_len
    m = mask.astype(jnp.float32)
    return jnp.sum((tokens < 16) * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def register_test_rewards() -> None:
    """Register `digit_fraction` (host), the faulty host rewards `hangs`, `always_raises`
    and `returns_strings`, and `low_token_share` (token) as rewards by name, since configs
    validate reward names."""
    from aapo_jax import rewards
    from aapo_jax.rewards import tokens

    rewards.HOST_REWARDS["digit_fraction"] = digit_fraction
    rewards.HOST_REWARDS["hangs"] = hangs
    rewards.HOST_REWARDS["always_raises"] = always_raises
    rewards.HOST_REWARDS["returns_strings"] = returns_strings
    tokens.TOKEN_REWARDS["low_token_share"] = low_token_share
