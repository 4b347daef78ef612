"""Stages 1 and 2 of an RL step: sample a `Rollout` from the policy (and reference), score it.

    sample(state, prompts) -> Rollout      # jittable: one decode loop for both models
    score(rollout) -> Rollout              # jittable token rewards (`make_token_scorer`), or
                                           # host rewards on decoded text (`HostScorer`)

Stage 3 is `train_step.make_train_step`; `rl_step.make_rl_step` composes all three.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array

from aapo_jax import rewards, sampling, sharding
from aapo_jax.configs import RewardConfig, RLConfig
from aapo_jax.data.sources import Example
from aapo_jax.data.tokenize import decode_completions
from aapo_jax.models.config import ModelConfig
from aapo_jax.sampling import SamplerSettings
from aapo_jax.types import PromptBatch, Rollout, TrainState

SampleFn = Callable[[TrainState, PromptBatch], Rollout]
ScoreFn = Callable[[Rollout], Rollout]


def make_sampler(
    rl: RLConfig,
    settings: SamplerSettings,
    graphdef: nnx.GraphDef,
    *,
    eos_token_id,
    pad_token_id: int,
    mesh: Mesh | None = None,
    decode_weights: str = "auto",
    kv_budget_gib: float = 0.0,
) -> SampleFn:
    """`sample(state, prompts) -> Rollout`: G completions per prompt from the policy.

    The reference is sampled too (same prompts, paired by index, its own key) only
    when the algorithm needs the reference rollout, in the same decode loop as the
    policy. Keys are `fold_in(state.rng, state.step)`. On a data-parallel `mesh`
    each device decodes its own prompts' rows (`sampling.generate_tokens_many`).
    `decode_weights` (`sampling.decode_weights`: "auto" or one of
    `decode_layouts.DECODE_LAYOUTS`) says where the decode loop reads the weights: copies made
    once per rollout, split over the devices by hidden units ("tensor") or whole on each
    ("replicated"), or the training layout ("sharded"); see `decode_copies`.
    `kv_budget_gib` (`sampling.kv_budget_gib`) > 0: each device decodes its prompts in the
    fewest sequential passes whose KV caches fit that budget (`decode_passes`); 0: one pass.
    """
    config = sampling_config(rl, settings, eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def sample(state: TrainState, prompts: PromptBatch) -> Rollout:
        rng = jax.random.fold_in(state.rng, state.step)
        policy_rng, ref_rng = jax.random.split(rng)
        models = sampled_models(rl, graphdef, state)
        layout, _ = decode_copies(
            rl,
            decode_weights,
            state,
            models[0].config.compute_dtype,
            mesh,
            prompts.ids.shape[0],
        )
        passes = decode_passes(
            rl,
            settings,
            models[0].config,
            mesh,
            *prompts.ids.shape,
            kv_budget_gib=kv_budget_gib,
            layout=layout,
        )
        config_here = dataclasses.replace(config, decode_weights=layout, passes=passes)
        # One decode loop advances both models (outputs equal two separate loops).
        outs = sampling.generate_tokens_many(
            models,
            prompts.ids,
            prompts.mask,
            [policy_rng, ref_rng][: len(models)],
            config_here,
            mesh=mesh,
        )
        return Rollout(
            prompts=prompts, policy=outs[0], reference=outs[1] if rl.samples_reference else None
        )

    return sample


def sampling_config(
    rl: RLConfig, settings: SamplerSettings, *, eos_token_id, pad_token_id: int
) -> sampling.SamplingConfig:
    """The rollout's decode settings: `settings`, the stop tokens and G samples per prompt."""
    return sampling.SamplingConfig(
        settings,
        sampling.eos_ids(eos_token_id),
        pad_token_id=pad_token_id,
        num_samples=rl.group_size,
    )


def sampled_models(rl: RLConfig, graphdef: nnx.GraphDef, state: TrainState) -> tuple:
    """The models a rollout decodes: the policy, and the reference when the algorithm samples
    it (AAPO), without gradient."""
    policy = nnx.merge(graphdef, *state.policy_weights())
    if not rl.samples_reference:
        return (policy,)
    return policy, nnx.merge(graphdef, *jax.lax.stop_gradient(state.reference_weights()))


def decode_copies(
    rl: RLConfig,
    decode_weights: str,
    state: TrainState,
    compute_dtype,
    mesh: Mesh | None,
    prompts: int,
) -> tuple[str, int]:
    """(layout, per-device bytes) of the weights the rollout's decode loop reads
    (`sampling.decode_copies` for every decoded model: the policy, and the reference when
    sampled; with LoRA both read one base). The sampler and the planner decide with this."""
    return sampling.decode_copies(
        decode_weights,
        state.policy_weights(),
        compute_dtype,
        mesh,
        prompts,
        n_models=decoded_weight_sets(rl, state),
    )


def decoded_weight_sets(rl: RLConfig, state: TrainState) -> int:
    """How many models' weights the rollout decodes from: the policy's, and the reference's
    when it is sampled, unless (LoRA) the reference is the policy's own base."""
    return 2 if rl.samples_reference and state.base is None else 1


def kv_cache_bytes(
    rl: RLConfig,
    settings: SamplerSettings,
    model_config: ModelConfig,
    mesh: Mesh | None,
    prompts: int,
    prompt_len: int,
    *,
    layout: str = "sharded",
) -> int:
    """Per-device bytes of the rollout's decode KV caches for `prompts` prompts of
    `prompt_len` tokens (`sampling.device_kv_cache_bytes`, decode `layout`): G rows each,
    for every decoded model (the reference's too when sampled). The sampler and the
    planner size with this."""
    return sampling.device_kv_cache_bytes(
        model_config, mesh, **_kv_shape(rl, settings, prompts, prompt_len), layout=layout
    )


def decode_passes(
    rl: RLConfig,
    settings: SamplerSettings,
    model_config: ModelConfig,
    mesh: Mesh | None,
    prompts: int,
    prompt_len: int,
    *,
    kv_budget_gib: float,
    layout: str = "sharded",
) -> int:
    """The rollout's sequential decode passes (`SamplingConfig.passes`) under a per-device
    KV budget (`sampling.kv_budget_gib`, 0: one pass): `sampling.device_decode_passes` in
    the decode `layout`."""
    return sampling.device_decode_passes(
        model_config,
        mesh,
        **_kv_shape(rl, settings, prompts, prompt_len),
        kv_budget_gib=kv_budget_gib,
        layout=layout,
    )


def _kv_shape(rl: RLConfig, settings: SamplerSettings, prompts: int, prompt_len: int) -> dict:
    return dict(
        prompts=prompts,
        samples=rl.group_size,
        prompt_len=prompt_len,
        max_new_tokens=settings.max_new_tokens,
        shared_prompt=settings.shared_prompt,
        models=2 if rl.samples_reference else 1,
    )


def make_token_scorer(reward_fn: rewards.TokenReward) -> ScoreFn:
    """`score(rollout) -> rollout` with f32[B, G] rewards from a JAX-native token reward.

    `reward_fn(tokens_NxT, mask_NxT, targets_NxA, target_len_N) -> f32[N]` (see
    `rewards.tokens`) reads the prompts' answer tokens; the reference completions,
    when sampled, are scored the same way.
    """

    def score(rollout: Rollout) -> Rollout:
        g = rollout.group_size
        prompts = rollout.prompts
        if prompts.targets is None:
            raise ValueError("a token reward needs PromptBatch.targets (the answers as tokens).")
        targets = jnp.repeat(prompts.targets, g, axis=0)
        target_len = jnp.repeat(prompts.target_len, g, axis=0)

        def of(out: sampling.SamplerOutput) -> Array:
            return reward_fn(out.tokens, out.mask, targets, target_len).reshape(-1, g)

        ref_rewards = None if rollout.reference is None else of(rollout.reference)
        return rollout.replace(rewards=of(rollout.policy), ref_rewards=ref_rewards)

    return score


def process_rows(rollout: Rollout, rows: int) -> Rollout:
    """Host (NumPy) copies of this process's `rows` completion rows, for host scoring.

    Process i holds rows [i·rows, (i+1)·rows) of the global batch (its own prompts' G
    completions each) and the matching prompts' `index`. Only what scoring reads leaves
    the device: tokens, mask and lengths, not the log-probs. A collective when the
    arrays span several processes.
    """
    g = rollout.group_size
    start = jax.process_index() * rows
    outs = [
        None if o is None else o.replace(logprobs=None) for o in (rollout.policy, rollout.reference)
    ]
    index = rollout.prompts.index
    policy, reference = jax.tree.map(lambda x: x[start : start + rows], sharding.to_host(outs))
    if index is not None:
        index = sharding.to_host(index)[start // g : (start + rows) // g]
    prompts = PromptBatch(ids=None, mask=None, index=index)
    return Rollout(prompts=prompts, policy=policy, reference=reference)


def host_reward(names: Sequence[str], weights: Sequence[float]) -> rewards.WeightedSum:
    """Σ w·r over host rewards by name (`rewards.get_host_reward`), components kept apart."""
    return rewards.weighted_sum(
        {
            name: (rewards.get_host_reward(name), float(w))
            for name, w in zip(names, weights, strict=True)
        }
    )


# The scorer's per-sample events that reach the step metrics, summed over completions.
COUNTED = (
    rewards.TIMEOUTS,
    rewards.ERRORS,
    rewards.GOLD_UNPARSABLE,
    rewards.KILLED,
    rewards.CRASHED,
)
# Those also counted for the reference's completions.
REFERENCE_COUNTED = (rewards.TIMEOUTS, rewards.ERRORS)


class HostScorer:
    """Stage 2 on the host: `score(rollout) -> Rollout`, rewards of decoded completions.

    Each process decodes its own rows (`process_rows`), finds their problems through
    `rollout.prompts.index` in `examples` (the run's training problems: gold answers and
    dataset entries), scores them in the time-bounded scorer (`rewards.RewardScorer`:
    each sample bounded by `config.timeout_s`, in `config.num_workers` worker processes)
    and puts the rewards back on `mesh` by rows. The rewards named in `config.names` are
    summed with `config.weights`; each component (`reward/<name>`, its mean) and the
    scorer's failure counters (`reward/timeouts`, ... their totals) ride along in the
    rollout to the step's metrics, over every process's rows.
    """

    def __init__(
        self,
        tokenizer,
        config: RewardConfig,
        examples: Sequence[Example],
        *,
        mesh: Mesh | None = None,
    ):
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.first_error: str | None = None  # the last call's first reward error, for logs
        self.mesh = mesh
        self.scorer = rewards.RewardScorer(
            host_reward(config.names, config.weights),
            timeout_s=config.timeout_s,
            num_workers=config.num_workers,
        )

    def _score(self, out: sampling.SamplerOutput, examples: Sequence[Example], g: int):
        texts = decode_completions(self.tokenizer, out.tokens, out.lengths)
        return self.scorer.score(
            texts,
            [e.answer for e in examples for _ in range(g)],
            entries=[dict(e.entry) for e in examples for _ in range(g)],
            completion_lengths=np.asarray(out.lengths).tolist(),
        )

    def __call__(self, rollout: Rollout) -> Rollout:
        """`rollout` with f32[B, G] rewards (and the reference's) and the scoring extras."""
        if rollout.prompts.index is None:
            raise ValueError("a host scorer needs PromptBatch.index (each prompt's problem).")
        g = rollout.group_size
        b = rollout.prompts.ids.shape[0] // jax.process_count()
        mine = process_rows(rollout, b * g)
        examples = [self.examples[int(i)] for i in mine.prompts.index]
        result = self._score(mine.policy, examples, g)
        self.first_error = result.first_error
        scored = {"rewards": result.rewards.reshape(b, g)}
        components = {f"reward/{k}": v.reshape(b, g) for k, v in result.components.items()}
        counts = {f"reward/{k}": _flags(result, k, b, g) for k in COUNTED}
        if mine.reference is not None:
            ref = self._score(mine.reference, examples, g)
            self.first_error = self.first_error or ref.first_error
            scored["ref_rewards"] = ref.rewards.reshape(b, g)
            counts.update({f"ref_reward/{k}": _flags(ref, k, b, g) for k in REFERENCE_COUNTED})
        scored["reward_components"] = components
        scored["reward_counts"] = counts
        if self.mesh is not None:
            scored = sharding.shard_batch(scored, self.mesh)
        return rollout.replace(**scored)

    def close(self) -> None:
        """Stops the reward worker processes."""
        self.scorer.close()


def _flags(result: rewards.ScoreResult, key: str, b: int, g: int) -> np.ndarray:
    """f32[b, G]: 1 where the scorer counted event `key` for that completion."""
    return result.flags.get(key, np.zeros(b * g, np.float32)).reshape(b, g)
