"""Weighted sums of host rewards that keep each component visible for logging."""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aapo_jax.rewards.base import HostReward, check_batch, check_rewards


@dataclasses.dataclass(frozen=True)
class WeightedSum:
    """Host reward Σ_k w_k · r_k over named components {name: (reward, weight)}.

    `RewardScorer` scores the components one by one (and reports each); called directly, it
    returns the weighted total and `evaluate` returns the unweighted components.
    """

    components: Mapping[str, tuple[HostReward, float]]

    def __post_init__(self) -> None:
        if not self.components:
            raise ValueError("weighted_sum needs at least one component")
        for name, pair in self.components.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"component names must be non-empty strings, got {name!r}")
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"component {name!r} must be a (reward_fn, weight) pair")
            fn, weight = pair
            if not callable(fn):
                raise ValueError(f"component {name!r}: reward {fn!r} is not callable")
            if not math.isfinite(float(weight)):
                raise ValueError(f"component {name!r}: weight must be finite, got {weight}")
        # A plain dict keeps it picklable for worker processes.
        object.__setattr__(
            self, "components", {k: (fn, float(w)) for k, (fn, w) in self.components.items()}
        )

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, (_, weight) in self.components.items()}

    def evaluate(
        self, completions: Sequence[str], *, answers: Sequence[str], **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """Each component's unweighted f32[N] rewards, by name.

        Raises:
          RewardContractError: a component returned other than N real numbers (named).
        """
        n = check_batch(completions, answers)
        out = {}
        for name, (fn, _) in self.components.items():
            out[name] = check_rewards(name, fn(completions, answers=answers, **kwargs), n)
        return out

    def __call__(
        self, completions: Sequence[str], *, answers: Sequence[str], **kwargs: Any
    ) -> np.ndarray:
        """Σ_k w_k · r_k as f32[N]."""
        components = self.evaluate(completions, answers=answers, **kwargs)
        total = np.zeros(len(completions), dtype=np.float32)
        for name, values in components.items():
            total += np.float32(self.components[name][1]) * values
        return total


def weighted_sum(rewards: Mapping[str, tuple[HostReward, float]]) -> WeightedSum:
    """A host reward Σ w·r over {name: (reward_fn, weight)}; its components stay inspectable.

    E.g. the open-rs setting: `weighted_sum({"format": (format_reward, 1.0),
    "cosine": (cosine, 2.0)})`.
    """
    return WeightedSum(dict(rewards))
