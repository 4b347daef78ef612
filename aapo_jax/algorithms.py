"""Algorithms as specs: an advantage estimator, a loss, their hyper-parameters and needs.

`ALGORITHMS` maps a config name (`rl.algorithm`) to an `Algorithm`; config
validation resolves the named one once into a `ConfiguredAlgorithm` (its
hyper-parameters and needs decided), which the train step calls. Add one from your
own module with a function and a dict entry, and name the module with `--import`
on the command line (`experiments.train`, `evaluate`, `plan`, `compare`):

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
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

from jaxtyping import Array, Float

from aapo_jax import advantages, fields, losses

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
        value = fields.scalar(field, value, type(self.default))
        if self.choices is not None:
            fields.check_choice(field, value, self.choices)
        if self.low is not None:
            fields.check(value >= self.low, field, value, f"≥ {self.low}")
        if self.high is not None:
            fields.check(value <= self.high, field, value, f"≤ {self.high}")
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

    def configure(
        self, values: Mapping[str, Any], *, name: str, field: str = "rl.hparams"
    ) -> ConfiguredAlgorithm:
        """This algorithm with `values` resolved (`resolve`) and its needs decided, once.

        Args, Raises: as `resolve`.
        """
        hparams = self.resolve(values, name=name, field=field)
        needs = self.needs_reference_logprobs
        return ConfiguredAlgorithm(
            name=name,
            spec=self,
            hparams=types.MappingProxyType(hparams),
            needs_reference_logprobs=bool(needs(hparams) if callable(needs) else needs),
        )


@dataclasses.dataclass(frozen=True)
class ConfiguredAlgorithm:
    """An `Algorithm` with every hyper-parameter resolved and what it needs decided.

    `configs.RLConfig` makes it once, when the config is validated; the train step calls
    `advantages` and `loss_terms`, which pass each function its own hyper-parameters.

    Attributes:
      name: the registry name.
      spec: the `Algorithm`.
      hparams: every hyper-parameter, resolved (defaults + settings).
      needs_reference_logprobs: whether the loss takes the KL to the reference.
    """

    name: str
    spec: Algorithm
    hparams: Mapping[str, Value]
    needs_reference_logprobs: bool

    @property
    def needs_reference_rollout(self) -> bool:
        """Whether each step samples the reference policy (its rewards r̃ feed `advantages`)."""
        return self.spec.needs_reference_rollout

    def advantages(
        self, rewards_BxG: Array, ref_rewards_BxG: Array | None
    ) -> tuple[Float[Array, "B G"], dict[str, Array]]:
        """(f32[B, G] advantages, their metrics) from the rewards (and the reference's)."""
        kwargs = {k: self.hparams[k] for k in self.spec.advantage_hparams}
        if self.needs_reference_rollout:
            if ref_rewards_BxG is None:
                raise ValueError(f"algorithm {self.name!r} needs the reference rollout's rewards.")
            out = self.spec.advantage(rewards_BxG, ref_rewards_BxG, **kwargs)
        else:
            out = self.spec.advantage(rewards_BxG, **kwargs)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
            return out[0], dict(out[1])
        return out, {}

    def loss_terms(
        self,
        logprobs_NxT: Array,
        advantages_N: Array,
        mask_NxT: Array,
        kl_NxT: Array | None = None,
        row_weights: tuple[Array, Array] | None = None,
    ) -> losses.LossTerms:
        """The loss's `LossTerms`; `kl_NxT` goes to a loss that needs the reference.

        `row_weights` (`losses.aggregation_weights`) picks another loss normalisation.
        """
        kwargs = {k: self.hparams[k] for k in self.spec.loss_hparams}
        if row_weights is not None:
            kwargs["row_weights"] = row_weights
        if self.needs_reference_logprobs:
            if kl_NxT is None:
                raise ValueError(f"algorithm {self.name!r}'s loss needs the KL, got None.")
            kwargs["kl_NxT"] = kl_NxT
        return self.spec.loss(logprobs_NxT, advantages_N, mask_NxT, **kwargs)


def _scale(default: bool) -> HParam:
    return HParam(default, help="divide the group-centred reward by the group std (+1e-4)")


_SEQ_MEAN = HParam(False, help="average each completion's tokens first (else one token mean)")

ALGORITHMS: dict[str, Algorithm] = {
    # AAPO: group advantage + clipped margin against the paired reference rollout, plain PG.
    "aapo": Algorithm(
        advantage=functools.partial(advantages.aapo, return_stats=True),
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
            f"config field {field}={name!r} is invalid: expected one of {sorted(ALGORITHMS)} "
            "(an algorithm of your own module is registered by --import=MODULE)."
        ) from None
