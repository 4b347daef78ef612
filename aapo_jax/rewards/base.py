"""The host reward signature, the stats counters rewards may bump, and small shared helpers."""

import reprlib
from collections.abc import Callable, MutableMapping, Sequence
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
    (`record(stats, GOLD_UNPARSABLE)`); it is reserved for that. The return value must be N real
    numbers, a list or an f32[N] array (`check_rewards` holds the scorer to it).
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


def binary_rewards(
    completions: Sequence[str], answers: Sequence[str], correct: Callable[[str, str], Any]
) -> np.ndarray:
    """f32[N]: 1.0 where `correct(completion, gold)` is true, else 0.0 (a None too)."""
    check_batch(completions, answers)
    pairs = zip(completions, answers, strict=True)
    return as_rewards([1.0 if correct(c, g) else 0.0 for c, g in pairs])


class RewardContractError(TypeError):
    """A host reward returned something other than N real numbers for N completions.

    A bug in the reward, not a property of one sample: `RewardScorer.score` raises it rather than
    scoring the batch with `failure_value`.
    """


def check_rewards(name: str, values: Any, n: int) -> np.ndarray:
    """f32[N] from what host reward `name` returned for N completions.

    Real numbers are bool / int / float values; strings (even "1.0", which NumPy would convert),
    objects and any shape other than (N,) (a scalar for one completion included) break the
    contract. Non-finite values pass: they are a per-sample matter for the caller.

    Raises:
      RewardContractError: naming the reward, what it returned and what was expected.
    """
    try:
        array = np.asarray(values)
    except Exception:  # ragged nesting, or an object NumPy cannot read
        array = None
    if array is not None and array.dtype.kind in "biuf" and array.shape == (n,):
        return array.astype(np.float32)
    completions = "completion" if n == 1 else "completions"
    raise RewardContractError(
        f"reward {name!r} returned {_describe(values)} for {n} {completions}; a host reward "
        "must return N real numbers (a list or an f32[N] array)"
    )


def _describe(values: Any) -> str:
    """E.g. "a list of str (length 1, ['1.0'])": the type, element types or dtype, length or
    shape and a short repr of `values`."""
    short = reprlib.repr(values)
    if isinstance(values, (list, tuple)):
        items = " and ".join(sorted({type(v).__name__ for v in values})) or "nothing"
        return f"a {type(values).__name__} of {items} (length {len(values)}, {short})"
    if isinstance(values, np.ndarray):
        return f"an array of {values.dtype} (shape {values.shape}, {short})"
    if values is None:
        return "None"
    kind = type(values).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({short})"
