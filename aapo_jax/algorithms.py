"""Algorithms as specs: an advantage estimator, a loss, their hyper-parameters and needs.

`ALGORITHMS` maps a config name (`rl.algorithm`) to an `Algorithm`; config
validation, the train step, the benchmarks and the comparison read it and
nothing else. Add one from your own code with a function and a dict entry:

    def margin_only(rewards_BxG, ref_rewards_BxG, *, scale):
        return scale * (rewards_BxG - ref_rewards_BxG)

    ALGORITHMS["margin_only"] = Algorithm(
        advantage=margin_only,
        loss=losses.aapo_terms,
        advantage_hparams={"scale": HParam(1.0, low=0.0)},
        needs_reference_rollout=True,
    )
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jaxtyping import Array, Float

from aapo_jax import advantages, losses

Value = bool | int | float | str


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyper-parameter: its default (whose type values must have) and its valid range.

    `low` / `high` are inclusive bounds of a number; `choices` lists the valid values.
    """

    default: Value
    low: float | None = None
    high: float | None = None
    choices: tuple[Value, ...] | None = None
    help: str = ""

    def __post_init__(self):
        numeric = isinstance(self.default, int | float) and not isinstance(self.default, bool)
        if (self.low is not None or self.high is not None) and not numeric:
            raise ValueError(f"low / high bound a number, not the default {self.default!r}.")

    def check(self, field: str, value: Any) -> Value:
        """`value` converted to the default's type; ValueError / TypeError naming `field`."""
        kind = type(self.default)
        if isinstance(value, np.generic):  # NumPy scalars count as the Python number they hold
            value = value.item()
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"config field {field}={value!r} must be a bool.")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"config field {field}={value!r} must be an int.")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"config field {field}={value!r} must be a number.")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"config field {field}={value!r} is invalid: expected finite.")
        elif not isinstance(value, kind):
            raise TypeError(f"config field {field}={value!r} must be a {kind.__name__}.")
        if self.choices is not None and value not in self.choices:
            raise ValueError(
                f"config field {field}={value!r} is invalid: expected one of {list(self.choices)}."
            )
        if self.low is not None and value < self.low:
            raise ValueError(f"config field {field}={value!r} is invalid: expected ≥ {self.low}.")
        if self.high is not None and value > self.high:
            raise ValueError(f"config field {field}={value!r} is invalid: expected ≤ {self.high}.")
        return value


AdvantageOut = Float[Array, "B G"] | tuple[Float[Array, "B G"], dict[str, Array]]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One RL algorithm: how rewards become advantages and advantages a loss.

    Attributes:
      advantage: `fn(rewards_BxG, **advantage_hparams)`, or with
        `needs_reference_rollout` `fn(rewards_BxG, ref_rewards_BxG, **advantage_hparams)`,
        returning f32[B, G] advantages, or a pair (advantages, {name: f32 scalar}) whose
        metrics are logged as they are (e.g. AAPO's margin statistics).
      loss: `fn(logprobs_NxT, advantages_N, mask_NxT, **loss_hparams) -> losses.LossTerms`;
        when the algorithm needs reference log-probs it also gets `kl_NxT=`, the
        per-token KL(π_θ ‖ π_ref) with its gradient (estimator: `rl.kl_estimator`).
      advantage_hparams, loss_hparams: the hyper-parameters each function takes, by name
        (disjoint); config `rl.hparams` may set them and nothing else.
      needs_reference_rollout: whether each step samples the reference policy too (its
        rewards r̃ go to `advantage`).
      needs_reference_logprobs: whether the loss needs log π_ref of the policy's
        completions: a bool, or a function of the resolved hyper-parameters (GRPO needs
        them only when its KL weight is positive).
      min_group_size: the smallest G the advantage is defined for.
      description: one line for listings.
    """

    advantage: Callable[..., AdvantageOut]
    loss: Callable[..., losses.LossTerms]
    advantage_hparams: Mapping[str, HParam] = dataclasses.field(default_factory=dict)
    loss_hparams: Mapping[str, HParam] = dataclasses.field(default_factory=dict)
    needs_reference_rollout: bool = False
    needs_reference_logprobs: bool | Callable[[Mapping[str, Value]], bool] = False
    min_group_size: int = 1
    description: str = ""

    def __post_init__(self):
        shared = sorted(set(self.advantage_hparams) & set(self.loss_hparams))
        if shared:
            raise ValueError(f"hyper-parameter names {shared} are both advantage and loss ones.")
        if self.min_group_size < 1:
            raise ValueError(f"min_group_size must be ≥ 1, got {self.min_group_size}.")
        for name, spec in self.hparams.items():
            if not isinstance(spec, HParam):
                raise TypeError(f"hyper-parameter {name!r} must be an HParam, got {spec!r}.")
            try:
                spec.check(name, spec.default)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"hyper-parameter {name!r}: its default fails its check: {e}"
                ) from None
        # Read-only views: a registered algorithm cannot be changed in place.
        for attr in ("advantage_hparams", "loss_hparams"):
            object.__setattr__(self, attr, types.MappingProxyType(dict(getattr(self, attr))))

    @property
    def hparams(self) -> dict[str, HParam]:
        """Every hyper-parameter, advantage and loss ones together."""
        return {**self.advantage_hparams, **self.loss_hparams}

    def defaults(self) -> dict[str, Value]:
        """The default value of every hyper-parameter."""
        return {name: spec.default for name, spec in self.hparams.items()}

    def resolve(self, values: Mapping[str, Any], *, name: str, field: str) -> dict[str, Value]:
        """The defaults updated with `values`, each checked; an unknown name is an error.

        Args:
          values: hyper-parameter settings (e.g. config `rl.hparams`).
          name: this algorithm's registry name, for messages.
          field: the config field `values` came from, for messages (e.g. "rl.hparams").
        """
        specs = self.hparams
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise ValueError(
                f"config field(s) {[f'{field}.{k}' for k in unknown]} are not used by algorithm "
                f"{name!r}; its hyper-parameters are {sorted(specs) or 'none'}. (To switch "
                "algorithms, use the config's algo= argument or configs.base.set_algorithm.)"
            )
        resolved = self.defaults()
        for key, value in values.items():
            resolved[key] = specs[key].check(f"{field}.{key}", value)
        return resolved

    def reference_logprobs(self, hparams: Mapping[str, Value]) -> bool:
        """Whether the loss needs log π_ref under these (resolved) hyper-parameters."""
        needs = self.needs_reference_logprobs
        return bool(needs(hparams) if callable(needs) else needs)

    def compute_advantages(
        self, rewards_BxG: Array, ref_rewards_BxG: Array | None, hparams: Mapping[str, Value]
    ) -> tuple[Float[Array, "B G"], dict[str, Array]]:
        """(f32[B, G] advantages, their metrics) from the rewards."""
        kwargs = {k: hparams[k] for k in self.advantage_hparams}
        if self.needs_reference_rollout:
            if ref_rewards_BxG is None:
                raise ValueError("this algorithm needs the reference rollout's rewards.")
            out = self.advantage(rewards_BxG, ref_rewards_BxG, **kwargs)
        else:
            out = self.advantage(rewards_BxG, **kwargs)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
            return out[0], dict(out[1])
        return out, {}

    def loss_terms(
        self,
        logprobs_NxT: Array,
        advantages_N: Array,
        mask_NxT: Array,
        kl_NxT: Array | None,
        hparams: Mapping[str, Value],
        row_weights: tuple[Array, Array] | None = None,
    ) -> losses.LossTerms:
        """The loss's `LossTerms`; `kl_NxT` is passed on when the loss needs the reference.

        `row_weights` (`losses.aggregation_weights`) picks another loss normalisation.
        """
        kwargs = {k: hparams[k] for k in self.loss_hparams}
        if row_weights is not None:
            kwargs["row_weights"] = row_weights
        if self.reference_logprobs(hparams):
            if kl_NxT is None:
                raise ValueError("this algorithm's loss needs the KL to the reference, got None.")
            kwargs["kl_NxT"] = kl_NxT
        return self.loss(logprobs_NxT, advantages_N, mask_NxT, **kwargs)


def _scale(default: bool) -> HParam:
    return HParam(default, help="divide the group-centred reward by the group std (+1e-4)")


_SEQ_MEAN = HParam(False, help="average each completion's tokens first (else one token mean)")

ALGORITHMS: dict[str, Algorithm] = {
    # AAPO: group advantage + clipped margin against the paired reference rollout, plain PG.
    "aapo": Algorithm(
        advantage=advantages.aapo_with_stats,
        loss=losses.aapo_terms,
        advantage_hparams={
            "scale_rewards": _scale(False),
            "margin_low": HParam(0.2, low=0.0, help="δ_low: the most the margin subtracts"),
            "margin_high": HParam(0.28, low=0.0, help="δ_high: the most the margin adds"),
        },
        needs_reference_rollout=True,
        min_group_size=2,
        description="group advantage + clip(r − r̃, −δ_low, δ_high), token-mean PG",
    ),
    # GRPO: std-scaled group advantage, PPO-clip loss (one update: ratio 1), optional KL.
    "grpo": Algorithm(
        advantage=advantages.grpo,
        loss=losses.ppo_clip_terms,
        advantage_hparams={"scale_rewards": _scale(True)},
        loss_hparams={
            "eps_low": HParam(0.2, low=0.0, help="ε_low of the ratio clip"),
            "eps_high": HParam(0.2, low=0.0, help="ε_high of the ratio clip"),
            "kl_beta": HParam(0.0, low=0.0, help="β: weight of the KL penalty (0 = off)"),
            "seq_mean": _SEQ_MEAN,
        },
        needs_reference_logprobs=lambda hp: hp["kl_beta"] > 0,
        min_group_size=2,
        description="(r − mean) / std, PPO-clip surrogate + β·KL",
    ),
    # Dr. GRPO: mean-only baseline, token-mean PG.
    "dr_grpo": Algorithm(
        advantage=advantages.dr_grpo,
        loss=losses.pg_terms,
        loss_hparams={"seq_mean": _SEQ_MEAN},
        description="r − mean, token-mean PG",
    ),
    # RLOO: leave-one-out baseline.
    "rloo": Algorithm(
        advantage=advantages.rloo,
        loss=losses.pg_terms,
        loss_hparams={"seq_mean": _SEQ_MEAN},
        min_group_size=2,
        description="r − mean of the other G − 1, token-mean PG",
    ),
    # REINFORCE / GPG: the raw reward, no baseline.
    "reinforce": Algorithm(
        advantage=advantages.reinforce,
        loss=losses.pg_terms,
        loss_hparams={"seq_mean": _SEQ_MEAN},
        description="r, token-mean PG",
    ),
}


def get_algorithm(name: str, *, field: str = "rl.algorithm") -> Algorithm:
    """The registered `Algorithm` called `name`; ValueError naming `field` otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"config field {field}={name!r} is invalid: expected one of {sorted(ALGORITHMS)}."
        ) from None
