"""Stages 1 and 2 of an RL step: sample a `Rollout` from the policy (and reference), score it.

    sample(state, prompts) -> Rollout            # jittable: one decode loop for both models
    score(rollout) -> Rollout                    # jittable token rewards (`make_token_scorer`)
    HostScorer(tokenizer, reward)(rollout, batch)  # or host rewards on decoded text, time-bounded

Stage 3 is `train_step.make_train_step`; `train_step.make_rl_step` composes all three.
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
from aapo_jax.configs import RewardConfig, RLConfig, SamplerSettings
from aapo_jax.data.pipeline import HostPromptBatch
from aapo_jax.data.tokenize import decode_completions
from aapo_jax.types import PromptBatch, Rollout, TrainState

SampleFn = Callable[[TrainState, PromptBatch], Rollout]
ScoreFn = Callable[[Rollout], Rollout]


def sampling_config(
    settings: SamplerSettings, group_size: int, eos_token_id, pad_token_id: int
) -> sampling.SamplingConfig:
    """The static `sampling.SamplingConfig` of a group rollout (G samples per prompt)."""
    return sampling.SamplingConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        min_p=settings.min_p,
        eos_token_ids=sampling.eos_ids(eos_token_id),
        pad_token_id=pad_token_id,
        num_samples=group_size,
    )


def make_sampler(
    rl: RLConfig,
    settings: SamplerSettings,
    graphdef: nnx.GraphDef,
    *,
    eos_token_id,
    pad_token_id: int,
    mesh: Mesh | None = None,
) -> SampleFn:
    """`sample(state, prompts) -> Rollout`: G completions per prompt from the policy.

    The reference is sampled too (same prompts, paired by index, its own key) only
    when the algorithm needs the reference rollout, in the same decode loop as the
    policy. Keys are `fold_in(state.rng, state.step)`. On a data-parallel `mesh`
    each device decodes its own prompts' rows (`sampling.generate_tokens_many`).
    """
    config = sampling_config(settings, rl.group_size, eos_token_id, pad_token_id)

    def sample(state: TrainState, prompts: PromptBatch) -> Rollout:
        rng = jax.random.fold_in(state.rng, state.step)
        policy_rng, ref_rng = jax.random.split(rng)
        policy = nnx.merge(graphdef, state.params)
        if not rl.samples_reference:
            out = sampling.generate_tokens(
                policy, prompts.ids, prompts.mask, policy_rng, config, mesh=mesh
            )
            return Rollout(prompts=prompts, policy=out)
        reference = nnx.merge(graphdef, jax.lax.stop_gradient(state.ref_params))
        # One decode loop advances both models (outputs equal two separate loops).
        out, ref_out = sampling.generate_tokens_many(
            [policy, reference], prompts.ids, prompts.mask, [policy_rng, ref_rng], config, mesh=mesh
        )
        return Rollout(prompts=prompts, policy=out, reference=ref_out)

    return sample


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
    completions each). Only what scoring reads leaves the device: tokens, mask and
    lengths, not the log-probs. A collective when the arrays span several processes.
    """
    start = jax.process_index() * rows
    outs = [
        None if o is None else o.replace(logprobs=None) for o in (rollout.policy, rollout.reference)
    ]
    policy, reference = jax.tree.map(lambda x: x[start : start + rows], sharding.to_host(outs))
    return Rollout(prompts=rollout.prompts, policy=policy, reference=reference)


@dataclasses.dataclass(frozen=True)
class HostScores:
    """One process's scored rows: f32[b, G] rewards, the reference's, counters, the texts."""

    rewards: np.ndarray
    ref_rewards: np.ndarray | None
    metrics: dict[str, float]
    texts: list[str]

    def samples(self, batch: HostPromptBatch, count: int) -> list[dict]:
        """The first `count` completions with their prompt, gold answer and reward, for logs."""
        g = self.rewards.shape[1]
        flat = self.rewards.reshape(-1)
        return [
            {
                "prompt": batch.questions[i // g],
                "answer": batch.answers[i // g],
                "completion": self.texts[i],
                "reward": float(flat[i]),
            }
            for i in range(min(count, len(self.texts)))
        ]


def host_reward(names: Sequence[str], weights: Sequence[float]) -> rewards.WeightedSum:
    """Σ w·r over host rewards by name (`rewards.get_host_reward`), components kept apart."""
    return rewards.weighted_sum(
        {
            name: (rewards.get_host_reward(name), float(w))
            for name, w in zip(names, weights, strict=True)
        }
    )


class HostScorer:
    """Stage 2 on the host: decode completions and score them in the time-bounded scorer.

    Rewards are named in `RewardConfig.names` and weighted by `.weights`; each
    sample is bounded by `timeout_s` in `num_workers` worker processes
    (`rewards.RewardScorer`). Call it on `process_rows(rollout, ...)` with the
    prompts' `HostPromptBatch` (its gold answers and dataset entries).
    """

    def __init__(self, tokenizer, config: RewardConfig):
        self.tokenizer = tokenizer
        self.scorer = rewards.RewardScorer(
            host_reward(config.names, config.weights),
            timeout_s=config.timeout_s,
            num_workers=config.num_workers,
        )

    def _score(self, out: sampling.SamplerOutput, batch: HostPromptBatch, g: int):
        texts = decode_completions(self.tokenizer, out.tokens, out.lengths)
        result = self.scorer.score(
            texts,
            [a for a in batch.answers for _ in range(g)],
            entries=[e for e in batch.entries for _ in range(g)],
            completion_lengths=np.asarray(out.lengths).tolist(),
        )
        return texts, result

    def __call__(self, rollout: Rollout, batch: HostPromptBatch) -> HostScores:
        """Rewards of this process's rows (`process_rows`), [b, G] for its b prompts."""
        b = len(batch.answers)
        g = rollout.policy.tokens.shape[0] // b
        texts, result = self._score(rollout.policy, batch, g)
        metrics = {f"reward/{k}": v for k, v in result.stats.items() if not k.startswith("mean/")}
        for name, values in result.components.items():
            metrics[f"reward/{name}"] = float(np.mean(values))
        ref_rewards = None
        if rollout.reference is not None:
            _, ref_result = self._score(rollout.reference, batch, g)
            ref_rewards = ref_result.rewards.reshape(b, g)
            for key in (rewards.TIMEOUTS, rewards.ERRORS):
                if key in ref_result.stats:
                    metrics[f"ref_reward/{key}"] = ref_result.stats[key]
        return HostScores(result.rewards.reshape(b, g), ref_rewards, metrics, texts)

    def close(self) -> None:
        """Stops the reward worker processes."""
        self.scorer.close()
