"""Host rewards on decoded text (time-bounded by RewardScorer) and jittable token rewards."""

# Host reward: `fn(completions, *, answers, **kwargs) -> f32[N]` (see `HostReward`).
# Token reward: `fn(tokens_NxT, mask_NxT, targets_NxA, target_len_N) -> f32[N]` (see `tokens`).

import functools
from typing import Any

from aapo_jax.rewards import lighteval_pinned
from aapo_jax.rewards.accuracy import (
    COSINE_DEFAULTS,
    DEFAULT_MATH_VERIFY_TIMEOUT_S,
    accuracy,
    accuracy_boxed_gold,
    cosine,
    cosine_value,
    is_correct,
    lighteval_accuracy,
    lighteval_correct,
    make_cosine_reward,
)
from aapo_jax.rewards.base import (
    ERRORS,
    GOLD_UNPARSABLE,
    TIMEOUTS,
    HostReward,
    RewardContractError,
    record,
)
from aapo_jax.rewards.combine import WeightedSum, weighted_sum
from aapo_jax.rewards.format import format_reward, format_think_close, tag_count
from aapo_jax.rewards.gym import GymReward, extract_gym_answer, make_gym_reward
from aapo_jax.rewards.scorer import CRASHED, KILLED, RewardScorer, ScoreResult

HOST_REWARDS: dict[str, HostReward] = {
    "accuracy": accuracy,
    "accuracy_boxed_gold": accuracy_boxed_gold,
    "format": format_reward,
    "format_think_close": format_think_close,
    "tag_count": tag_count,
    "cosine": cosine,
    # The paper's evaluation (lighteval as open-r1 / open-rs configure it), by gold format.
    "lighteval_latex_gold": functools.partial(lighteval_accuracy, gold_as="latex"),
    "lighteval_expr_gold": functools.partial(lighteval_accuracy, gold_as="expr"),
    # The same metrics decided by lighteval 0.8.1 itself, the authors' pinned version, from its
    # own directory (`lighteval_pinned`; score in worker processes).
    "lighteval081_latex_gold": functools.partial(
        lighteval_pinned.lighteval_accuracy, gold_as="latex"
    ),
    "lighteval081_expr_gold": functools.partial(
        lighteval_pinned.lighteval_accuracy, gold_as="expr"
    ),
    # The AAPO authors' open-rs run (open-rs `get_cosine_scaled_reward` with their YAML): wrong
    # answers score 0 (short) to -0.5 (long); length in characters over the default max_len of
    # 1000, the progress not clipped.
    "cosine_open_rs": make_cosine_reward(
        min_value_wrong=0.0, max_len=1000, length_unit="chars", clip=False
    ),
}

# `get_host_reward("gym:<dataset>")` builds a reasoning-gym scorer for that dataset.
GYM_PREFIX = "gym:"


def get_host_reward(name: str) -> HostReward:
    """The host reward registered as `name`, or `gym:<dataset>` for a reasoning-gym scorer.

    Raises:
      ValueError: unknown name (the message lists the valid ones).
    """
    if name in HOST_REWARDS:
        return HOST_REWARDS[name]
    if name.startswith(GYM_PREFIX):
        return make_gym_reward(name.removeprefix(GYM_PREFIX))
    raise ValueError(
        f"unknown host reward {name!r}; valid names: {sorted(HOST_REWARDS)} "
        f"or '{GYM_PREFIX}<reasoning-gym dataset>'"
    )


# The token rewards import JAX; load them on first use so that reward worker processes (which
# import this package) start without JAX.
_TOKEN_NAMES = ("TOKEN_REWARDS", "TokenReward", "exact_match", "get_token_reward", "prefix_match")


def __getattr__(name: str) -> Any:
    if name in _TOKEN_NAMES:
        from aapo_jax.rewards import tokens

        return getattr(tokens, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_TOKEN_NAMES])


__all__ = [
    "COSINE_DEFAULTS",
    "CRASHED",
    "DEFAULT_MATH_VERIFY_TIMEOUT_S",
    "ERRORS",
    "GOLD_UNPARSABLE",
    "GYM_PREFIX",
    "HOST_REWARDS",
    "KILLED",
    "TIMEOUTS",
    "GymReward",
    "HostReward",
    "RewardContractError",
    "RewardScorer",
    "ScoreResult",
    "WeightedSum",
    "accuracy",
    "accuracy_boxed_gold",
    "cosine",
    "cosine_value",
    "extract_gym_answer",
    "format_reward",
    "format_think_close",
    "get_host_reward",
    "is_correct",
    "lighteval_accuracy",
    "lighteval_correct",
    "lighteval_pinned",
    "make_cosine_reward",
    "make_gym_reward",
    "record",
    "tag_count",
    "weighted_sum",
]
