"""Prompt encoding (with counted drops) and a resumable, sharded grain loader of padded batches."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from aapo_jax.data.sources import Example
from aapo_jax.data.tokenize import DEFAULT_BUCKETS, bucket_length, format_prompt, left_pad

logger = logging.getLogger(__name__)


# What `encode_examples` does with a prompt longer than max_prompt_length.
OVERLONG = ("drop", "truncate_left")


@dataclasses.dataclass(frozen=True)
class PromptStats:
    """How many examples `encode_examples` kept, why it dropped the others, how many
    over-long prompts it cut to their last `max_prompt_length` tokens, and how many kept
    ones have an empty (or null) gold answer, which no completion can match."""

    kept: int
    dropped_too_long: int
    dropped_empty: int
    truncated: int = 0
    empty_answer: int = 0


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One usable prompt: its token ids (no padding), its example and the formatted text."""

    ids: tuple[int, ...]
    example: Example
    text: str


def encode_examples(
    examples: Sequence[Example],
    tokenizer,
    *,
    template: str | None = None,
    system_prompt: str | None = None,
    use_chat_template: bool = False,
    max_prompt_length: int,
    overlong: str = "drop",
) -> tuple[list[EncodedPrompt], PromptStats]:
    """Format and tokenize problems, dropping (and counting) unusable ones.

    Prompts are formatted with `format_prompt` and tokenized without added
    special tokens (chat templates carry their own). Examples whose question is
    empty or whitespace are dropped. Prompts longer than `max_prompt_length` tokens
    are dropped (`overlong="drop"`) or keep their last `max_prompt_length` tokens
    (`"truncate_left"`, TRL's `prompt_ids[:, -max_prompt_length:]`); all are counted
    and logged, never fatal. A truncated prompt's `text` is still the full text.

    Args:
      examples: the problems, e.g. from `load_splits`.
      tokenizer: a transformers tokenizer.
      template, system_prompt, use_chat_template: as in `format_prompt`.
      max_prompt_length: the longest prompt kept, in tokens.
      overlong: "drop" or "truncate_left" (see above).

    Returns:
      The kept prompts in input order, and the counts.

    Raises:
      ValueError: max_prompt_length < 1, or no example is usable (the message
        gives the counts and max_prompt_length).
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be ≥ 1.")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}; valid: {OVERLONG}")
    candidates = [e for e in examples if e.question.strip()]
    dropped_empty = len(examples) - len(candidates)
    texts = [
        format_prompt(
            tokenizer,
            e.question,
            template=template,
            system_prompt=system_prompt,
            use_chat_template=use_chat_template,
        )
        for e in candidates
    ]
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    encoded, dropped_too_long, truncated = [], 0, 0
    for example, text, ids in zip(candidates, texts, token_ids, strict=True):
        if len(ids) > max_prompt_length:
            if overlong == "drop":
                dropped_too_long += 1
                continue
            ids, truncated = ids[-max_prompt_length:], truncated + 1
        encoded.append(EncodedPrompt(ids=tuple(int(i) for i in ids), example=example, text=text))
    stats = PromptStats(
        kept=len(encoded),
        dropped_too_long=dropped_too_long,
        dropped_empty=dropped_empty,
        truncated=truncated,
        empty_answer=sum(not p.example.answer.strip() for p in encoded),
    )
    if stats.empty_answer:
        logger.warning("prompts: %d kept prompts have an empty gold answer.", stats.empty_answer)
    if truncated:
        logger.warning(
            "prompts: kept the last %d tokens of %d prompts longer than that.",
            max_prompt_length,
            truncated,
        )
    if dropped_too_long or dropped_empty:
        logger.warning(
            "prompts: kept %d of %d; dropped %d longer than max_prompt_length=%d tokens "
            "and %d with an empty question.",
            stats.kept,
            len(examples),
            dropped_too_long,
            max_prompt_length,
            dropped_empty,
        )
    if not encoded:
        raise ValueError(
            f"no usable prompts: of {len(examples)} examples, {dropped_too_long} are longer "
            f"than max_prompt_length={max_prompt_length} tokens and {dropped_empty} have an "
            "empty question. Raise max_prompt_length or check the data's question column."
        )
    return encoded, stats


@dataclasses.dataclass
class HostPromptBatch:
    """This host's share of one step's prompts, left-padded to a length bucket.

    ids, mask: int32 [b, P], b = global batch_size / shard_count; P is the
      smallest bucket that holds the longest prompt of the GLOBAL batch, so
      every host sees the same shape.
    indices: int64 [b], the prompts' positions in the loader's `encoded` list.
    """

    ids: np.ndarray
    mask: np.ndarray
    answers: list[str]
    questions: list[str]
    entries: list[dict]
    indices: np.ndarray


class PromptLoader:
    """Endless (or `num_epochs`) shuffled batches of prompts, sharded over hosts, resumable.

    Built on grain: `MapDataset.range(n)` → `.shuffle(seed)` (a fresh order each
    epoch) → `.batch(batch_size, drop_remainder=True)` (the incomplete last
    batch of each epoch is dropped) → `.repeat(num_epochs)`. Each global batch
    is the same whatever the number of hosts; host `shard_index` takes the
    contiguous slice `[shard_index·b, (shard_index+1)·b)` of it, b =
    batch_size / shard_count, so shards are disjoint and a run can resume on a
    different host count.

    Iterate it (`next(loader)`); `get_state()` / `set_state()` save and restore
    the position: after a restore the next batch is the one an uninterrupted
    loader would have produced next.
    """

    def __init__(
        self,
        encoded: Sequence[EncodedPrompt],
        *,
        batch_size: int,
        seed: int,
        pad_id: int,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
    ):
        """See the class docstring.

        Args:
          encoded: the prompts, from `encode_examples`.
          batch_size: the GLOBAL number of prompts per step (all hosts).
          seed: the shuffle seed, in [0, 2**32).
          pad_id: the token id used for left padding.
          buckets: allowed padded lengths P.
          shuffle: False keeps the stored order every epoch.
          num_epochs: None repeats forever.
          shard_index, shard_count: this host's shard; default
            `jax.process_index()` / `jax.process_count()`.
        """
        import grain  # deferred: a heavy import that the library does not always need

        if shard_index is None or shard_count is None:
            import jax

            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be ≥ 1.")
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(
                f"shard_index={shard_index} must be in [0, shard_count={shard_count})."
            )
        if batch_size % shard_count:
            raise ValueError(
                f"batch_size={batch_size} (global prompts per step) must be divisible by "
                f"shard_count={shard_count} (the number of hosts)."
            )
        if len(encoded) < batch_size:
            raise ValueError(
                f"only {len(encoded)} usable prompts, fewer than batch_size={batch_size}."
            )
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed} must be in [0, 2**32) for the shuffle.")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs={num_epochs} must be ≥ 1 or None (forever).")
        if not buckets:
            raise ValueError("buckets must name at least one length.")
        longest = max(len(p.ids) for p in encoded)
        if longest > max(buckets):
            raise ValueError(
                f"a prompt of {longest} tokens exceeds the largest bucket {max(buckets)}; "
                "add a bucket or lower max_prompt_length."
            )

        self._encoded = list(encoded)
        self._lengths = np.array([len(p.ids) for p in self._encoded], np.int64)
        self._buckets = tuple(sorted(buckets))
        self._pad_id = int(pad_id)
        self._per_host = batch_size // shard_count
        self._start = shard_index * self._per_host
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.num_epochs = num_epochs

        dataset = grain.MapDataset.range(len(self._encoded))
        if shuffle:
            # grain reseeds each epoch with seed + epoch; mixing the seed first keeps
            # runs with neighbouring seeds from sharing shifted epoch orders.
            mixed = int(np.random.SeedSequence(seed).generate_state(1)[0])
            dataset = dataset.shuffle(seed=mixed)
        dataset = dataset.batch(batch_size, drop_remainder=True, batch_fn=self._make_batch)
        dataset = dataset.repeat(num_epochs)
        # No worker threads: batches are cheap, and this keeps the loader single-threaded.
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._iterator = iter(dataset.to_iter_dataset(options))

    def _make_batch(self, indices: Sequence[int]) -> HostPromptBatch:
        global_indices = np.asarray(indices, np.int64)
        # The bucket comes from the global batch, so all hosts pad to one shape.
        length = bucket_length(int(self._lengths[global_indices].max()), self._buckets)
        mine = global_indices[self._start : self._start + self._per_host]
        prompts = [self._encoded[i] for i in mine]
        ids, mask = left_pad([p.ids for p in prompts], self._pad_id, length=length)
        return HostPromptBatch(
            ids=ids,
            mask=mask,
            answers=[p.example.answer for p in prompts],
            questions=[p.example.question for p in prompts],
            entries=[dict(p.example.entry) for p in prompts],
            indices=mine,
        )

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> HostPromptBatch:
        return next(self._iterator)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "num_prompts": len(self._encoded),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def get_state(self) -> dict[str, Any]:
        """The position as a JSON-serialisable dict (grain's iterator state + what it assumes)."""
        return {"iterator": self._iterator.get_state(), **self._fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from `get_state()` output (also after a JSON round trip).

        Raises:
          ValueError: the state was saved by a loader over a different number of
            prompts, batch size, seed or shuffle setting (the positions would not
            mean the same batches). The host count may differ.
        """
        expected = self._fingerprint()
        saved = {key: state.get(key) for key in expected}
        if saved != expected:
            raise ValueError(
                f"loader state was saved with {saved}, but this loader has {expected}; "
                "resuming would not continue the same sequence of batches."
            )
        self._iterator.set_state(state["iterator"])
