"""reasoning-gym scorers as host rewards: a dataset's own `score_answer` on the extracted answer."""

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from aapo_jax.rewards.base import as_rewards, check_batch

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_gym_answer(completion: str) -> str | None:
    """The answer a reasoning-gym scorer sees.

    The content of the last `<answer>…</answer>` block, stripped; without one, the last non-empty
    line, stripped; None for a blank completion. Stripping matters: `score_answer` gives 0.5, not
    1.0, to a correct answer padded with spaces.
    """
    blocks = _ANSWER_TAG.findall(completion)
    if blocks:
        return blocks[-1].strip()
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else None


@functools.cache
def _score_answer_fn(dataset_name: str) -> Callable[..., float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(dataset_name)


def _entry(
    i: int,
    answers: Sequence[str],
    entries: Sequence[Mapping[str, Any]] | None,
    metadata: Sequence[Mapping[str, Any]] | None,
) -> Mapping[str, Any]:
    if entries is not None:
        return entries[i]
    if metadata is not None:
        item = metadata[i]
        if "answer" in item and "metadata" in item:  # a whole entry passed as metadata
            return item
        return {"question": "", "answer": answers[i], "metadata": item}
    raise ValueError(
        "a reasoning-gym reward needs the dataset entries: pass entries=[entry, ...] (the dicts "
        "the dataset yields) or metadata=[entry['metadata'], ...], aligned with completions"
    )


@dataclasses.dataclass(frozen=True)
class GymReward:
    """Host reward scoring completions with reasoning-gym dataset `dataset_name`'s `score_answer`.

    Each sample's entry comes from `entries[i]` (a dataset item: question, answer, metadata) or
    from `metadata[i]` (an item, or its `metadata` dict, completed with `answers[i]`). The answer
    is `extract_gym_answer(completion)`. A frozen dataclass rather than a closure so that it can
    be sent to reward worker processes.
    """

    dataset_name: str

    def __call__(
        self,
        completions: Sequence[str],
        *,
        answers: Sequence[str],
        entries: Sequence[Mapping[str, Any]] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Returns f32[N]: the dataset's score (1.0 correct, 0.0 wrong, partial credit between)."""
        del kwargs
        n = check_batch(completions, answers)
        score_answer = _score_answer_fn(self.dataset_name)
        values = []
        for i in range(n):
            entry = _entry(i, answers, entries, metadata)
            answer = extract_gym_answer(completions[i])
            values.append(float(score_answer(answer=answer, entry=entry)))
        return as_rewards(values)


def make_gym_reward(dataset_name: str) -> GymReward:
    """A host reward for reasoning-gym dataset `dataset_name` (checked against its registry)."""
    from reasoning_gym.factory import DATASETS

    if dataset_name not in DATASETS:
        close = difflib.get_close_matches(dataset_name, list(DATASETS), n=5)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown reasoning-gym dataset {dataset_name!r}{hint} "
            f"(valid names: reasoning_gym.factory.DATASETS, {len(DATASETS)} of them)"
        )
    return GymReward(dataset_name)
