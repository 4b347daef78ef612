"""Tokenizer loading, prompt templates (plain or chat) and left-padding into length buckets."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def load_tokenizer(path: str | os.PathLike):
    """A `transformers` tokenizer from a local directory (never the hub).

    Left padding is set, since prompts are left-padded for generation.
    """
    from transformers import AutoTokenizer  # deferred: slow import

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!s} does not exist.")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def format_prompt(
    tokenizer,
    question: str,
    *,
    template: str | None = None,
    system_prompt: str | None = None,
    use_chat_template: bool = False,
) -> str:
    """The prompt text for one question.

    Args:
      tokenizer: a transformers tokenizer (only used with `use_chat_template`).
      question: the problem text.
      template: a plain template with a `{question}` field, e.g.
        "Question: {question}\\nAnswer:"; None means the question itself.
      system_prompt: with the chat template, an optional system message; with a
        plain template it is prepended followed by a newline.
      use_chat_template: apply the tokenizer's chat template with a generation
        prompt (the paper's setting for instruct / distilled models).
    """
    content = template.format(question=question) if template is not None else question
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template.")
        messages = [{"role": "user", "content": content}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\n{content}" if system_prompt else content


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket ≥ length (so jitted code sees few distinct shapes)."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}.")


def left_pad(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    *,
    length: int | None = None,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into int32 [B, L] ids and a {0,1} int32 [B, L] mask.

    L is `length` if given, else the smallest bucket holding the longest row
    (or exactly that row's length when `buckets` is None).
    """
    longest = max((len(s) for s in sequences), default=0)
    if length is None:
        length = bucket_length(longest, buckets) if buckets else longest
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit length={length}.")
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = 1
    return ids, mask


def encode_prompts(
    tokenizer, prompts: Sequence[str], *, add_special_tokens: bool = False
) -> list[list[int]]:
    """Each prompt text's token ids, unpadded.

    `add_special_tokens`: what the tokenizer adds around a text (e.g. a BOS in front), as
    transformers' `tokenizer(text, add_special_tokens=True)` does. Off by default: chat
    templates already contain their special tokens; lighteval's vLLM path adds them anyway
    (`evaluation.PAPER_ADD_SPECIAL_TOKENS`).
    """
    return tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[str],
    *,
    length: int | None = None,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    add_special_tokens: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize prompt texts (`encode_prompts`: no extra special tokens unless asked) and
    left-pad them into a bucket."""
    encoded = encode_prompts(tokenizer, prompts, add_special_tokens=add_special_tokens)
    return left_pad(encoded, tokenizer.pad_token_id, length=length, buckets=buckets)


def decode_completions(tokenizer, tokens_NxT, lengths_N) -> list[str]:
    """Completion texts: each row's first `lengths_N[n]` tokens, special tokens (EOS) dropped."""
    tokens, lengths = np.asarray(tokens_NxT), np.asarray(lengths_N)
    return tokenizer.batch_decode(
        [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)],
        skip_special_tokens=True,
    )


def encode_targets(tokenizer, answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Answer tokens padded with -1 into int32 [B, A], and their lengths int32 [B].

    The targets of the token rewards (`rewards.tokens`): `exact_match` scores a
    completion 1 iff it is exactly these tokens followed by EOS.
    """
    encoded = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    width = max((len(a) for a in encoded), default=0)
    targets = np.full((len(encoded), max(width, 1)), -1, np.int32)
    for row, ids in enumerate(encoded):
        targets[row, : len(ids)] = ids
    return targets, np.asarray([len(a) for a in encoded], np.int32)
