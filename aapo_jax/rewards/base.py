"""The host reward signature, the stats counters rewards may bump, and small shared helpers."""

from collections.abc import MutableMapping, Sequence
from typing import Any, Protocol

import numpy as np

# Keys of the per-call stats that rewards and the scorer count. A count is the number of samples
# in which the event happened (the scorer clips each sample's count to 1).
TIMEOUTS = "timeouts"
ERRORS = "errors"
GOLD_UNPARSABLE = "gold_unparsable"

Stats = MutableMapping[str, int]


class HostReward(Protocol):
    """A reward on decoded text, batched over N completions.

    `answers[i]` is the gold answer of `completions[i]`. Extra per-sample fields (`metadata`,
    `entries`, `completion_lengths`, ...) and scalars (`max_completion_length`, ...) arrive as
    keyword arguments, so every reward must accept `**kwargs` and ignore what it does not use.
    The keyword `stats`, when given, is a mutable mapping the reward may bump counters in
    (`record(stats, GOLD_UNPARSABLE)`); it is reserved for that.
    """

    def __call__(
        self, completions: Sequence[str], *, answers: Sequence[str], **kwargs: Any
    ) -> np.ndarray: ...


def record(stats: Stats | None, key: str, count: int = 1) -> None:
    """Adds `count` to `stats[key]`; a no-op when the caller passed no stats."""
    if stats is not None:
        stats[key] = stats.get(key, 0) + count


def check_batch(completions: Sequence[str], answers: Sequence[str]) -> int:
    """Returns N after checking that completions and answers are aligned."""
    if isinstance(completions, str) or isinstance(answers, str):
        raise TypeError("completions and answers must be sequences of strings, not one string")
    if len(completions) != len(answers):
        raise ValueError(
            f"completions and answers must be aligned, got {len(completions)} completions "
            f"and {len(answers)} answers"
        )
    return len(completions)


def as_rewards(values: Sequence[float]) -> np.ndarray:
    """f32[N] from a list of floats."""
    return np.asarray(values, dtype=np.float32).reshape(-1)
