"""One RL step: the three stages (sample, score, update) composed.

    rl_step(state, prompts) -> (state, metrics, rollout)
        = train_step(state, score(sample(state, prompts)))

With a jittable scorer (a token reward) `jax.jit(rl_step)` is ONE XLA program: policy and
reference sampling, reward, advantage, reference log-probs and the update, with no host
round trip. With a host scorer (`rollout.HostScorer`) the same composition runs the jitted
sampler, scores on the host, then runs the jitted update.
"""

from __future__ import annotations

from collections.abc import Callable

import optax
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array

from aapo_jax import rollout, train_step
from aapo_jax.configs import OptimConfig, RLConfig
from aapo_jax.sampling import SamplerSettings
from aapo_jax.types import PromptBatch, Rollout, TrainState

RLStepFn = Callable[[TrainState, PromptBatch], tuple[TrainState, dict, Rollout]]


def make_rl_step(
    sample: rollout.SampleFn, score: rollout.ScoreFn, update: train_step.StepFn
) -> RLStepFn:
    """`rl_step(state, prompts) -> (state, metrics, rollout)`: the three stages composed.

    The scored rollout is returned too (its completions and rewards, e.g. for logging
    samples); jit the step with `donate_argnums=0` so that the state's buffers are reused.
    """

    def rl_step(state: TrainState, prompts: PromptBatch) -> tuple[TrainState, dict, Rollout]:
        scored = score(sample(state, prompts))
        state, metrics = update(state, scored)
        return state, metrics, scored

    return rl_step


def make_stages(
    rl: RLConfig,
    optim: OptimConfig,
    settings: SamplerSettings,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    eos_token_id,
    pad_token_id: int,
    mesh: Mesh | None = None,
    decode_weights: str = "auto",
    kv_budget_gib: float = 0.0,
) -> tuple[rollout.SampleFn, train_step.StepFn]:
    """(stage 1, stage 3) of one configuration: `rollout.make_sampler` and
    `train_step.make_train_step`, un-jitted, for the trainer, the planner and
    `make_token_rl_step` alike."""
    sample = rollout.make_sampler(
        rl,
        settings,
        graphdef,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        mesh=mesh,
        decode_weights=decode_weights,
        kv_budget_gib=kv_budget_gib,
    )
    return sample, train_step.make_train_step(rl, optim, graphdef, tx, mesh=mesh)


def make_token_rl_step(
    rl: RLConfig,
    optim: OptimConfig,
    settings: SamplerSettings,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    reward_fn: Callable[..., Array],
    *,
    eos_token_id,
    pad_token_id: int,
    mesh: Mesh | None = None,
    decode_weights: str = "auto",
) -> RLStepFn:
    """`make_rl_step` of the sampler, `rollout.make_token_scorer(reward_fn)` and the update:
    the one-program step for a JAX-native reward. Jit it yourself."""
    sample, update = make_stages(
        rl,
        optim,
        settings,
        graphdef,
        tx,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        mesh=mesh,
        decode_weights=decode_weights,
    )
    return make_rl_step(sample, rollout.make_token_scorer(reward_fn), update)
