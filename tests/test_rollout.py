"""Stages 1 and 2: sampling a Rollout, token scoring, host scoring of decoded text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aapo_jax import configs, data, models, rewards, rollout, sampling
from aapo_jax.data.sources import Example
from aapo_jax.optim import make_optimizer
from aapo_jax.rewards import tokens
from aapo_jax.train_step import init_train_state
from aapo_jax.types import PromptBatch, Rollout
from tests import hf_fixtures

TINY = hf_fixtures.tiny_model_config(vocab_size=32)
G, T = 2, 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return data.load_tokenizer(hf_fixtures.make_tokenizer(tmp_path_factory.mktemp("tok")))


def _state(rl_cfg):
    graphdef, params = nnx.split(models.Transformer(TINY, rngs=nnx.Rngs(0)))
    tx = make_optimizer(configs.OptimConfig(total_steps=1))
    return graphdef, init_train_state(params, tx, rl_cfg, seed=0)[0]


def _prompts():
    ids = jnp.asarray(np.random.default_rng(0).integers(3, TINY.vocab_size, (3, 5)), jnp.int32)
    return PromptBatch(
        ids=ids,
        mask=jnp.ones_like(ids),
        targets=jnp.asarray([[7, -1], [8, 9], [3, -1]], jnp.int32),
        target_len=jnp.asarray([1, 2, 1], jnp.int32),
    )


@pytest.mark.parametrize("algorithm", ["aapo", "grpo"])
def test_sampler_draws_the_reference_only_when_the_algorithm_needs_it(algorithm):
    rl_cfg = configs.RLConfig(algorithm=algorithm, group_size=G)
    graphdef, state = _state(rl_cfg)
    settings = sampling.SamplerSettings(max_new_tokens=T)
    sample = rollout.make_sampler(rl_cfg, settings, graphdef, eos_token_id=2, pad_token_id=0)
    out = jax.jit(sample)(state, _prompts())
    assert out.policy.tokens.shape == (3 * G, T) and out.group_size == G
    assert out.rewards is None and out.ref_rewards is None
    if algorithm == "grpo":
        assert out.reference is None
        return
    # Policy and reference are the same weights at step 0 but draw with their own keys.
    assert out.reference.tokens.shape == out.policy.tokens.shape
    assert not np.array_equal(np.asarray(out.reference.tokens), np.asarray(out.policy.tokens))
    # The policy's rows are those of a plain sampler call with the policy's key.
    policy_rng, _ = jax.random.split(jax.random.fold_in(state.rng, state.step))
    config = sampling.SamplingConfig(settings, (2,), pad_token_id=0, num_samples=G)
    alone = sampling.generate_tokens(
        nnx.merge(graphdef, state.params), _prompts().ids, _prompts().mask, policy_rng, config
    )
    np.testing.assert_array_equal(np.asarray(alone.tokens), np.asarray(out.policy.tokens))


def test_token_scorer_scores_policy_and_reference_against_the_targets():
    prompts = _prompts()
    # Row b·G + g: prompt 0's completions [7, EOS], [5, ...]; prompt 1's [8, 9, EOS] and so on.
    tokens_NxT = jnp.asarray(
        [[7, 2, 0, 0], [5, 2, 0, 0], [8, 9, 2, 0], [8, 9, 9, 2], [3, 2, 0, 0], [3, 3, 3, 3]]
    )
    eos = jnp.asarray([2])
    out = sampling.completion_output(tokens_NxT, jnp.zeros(tokens_NxT.shape), eos)
    # The reference's rows are the same completions in reverse order.
    ref = sampling.completion_output(tokens_NxT[::-1], jnp.zeros(tokens_NxT.shape), eos)
    scored = rollout.make_token_scorer(tokens.exact_match)(
        Rollout(prompts=prompts, policy=out, reference=ref)
    )
    np.testing.assert_array_equal(np.asarray(scored.rewards), [[1, 0], [1, 0], [1, 0]])
    np.testing.assert_array_equal(np.asarray(scored.ref_rewards), [[0, 0], [0, 1], [0, 0]])
    with pytest.raises(ValueError, match="targets"):
        rollout.make_token_scorer(tokens.exact_match)(
            Rollout(prompts=prompts.replace(targets=None), policy=out)
        )


def test_host_scorer_decodes_and_scores_both_rollouts(tokenizer):
    hf_fixtures.register_test_rewards()
    texts = ["12 + 7", "abc", "19", "The answer"]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, encoded)) + 1
    eos = tokenizer.eos_token_id
    rows = np.full((4, width), tokenizer.pad_token_id, np.int32)
    for i, ids in enumerate(encoded):
        rows[i, : len(ids) + 1] = [*ids, eos]
    out = sampling.completion_output(jnp.asarray(rows), jnp.zeros(rows.shape), jnp.asarray([eos]))
    reversed_rows = jax.tree.map(lambda x: x[::-1], out)
    # Two prompts (G = 2), which are problems 2 and 0 of the run's list.
    prompts = PromptBatch(
        ids=jnp.zeros((2, 1), jnp.int32),
        mask=jnp.ones((2, 1), jnp.int32),
        index=jnp.asarray([2, 0], jnp.int32),
    )
    sampled = Rollout(prompts=prompts, policy=out, reference=reversed_rows)
    host = rollout.process_rows(sampled, rows=4)
    assert host.policy.logprobs is None and isinstance(host.policy.tokens, np.ndarray)
    assert data.decode_completions(tokenizer, host.policy.tokens, host.policy.lengths) == texts
    np.testing.assert_array_equal(host.prompts.index, [2, 0])
    problems = [Example("q0", "x"), Example("q1", "x"), Example("q2", "19")]
    reward = configs.RewardConfig(names=("digit_fraction",), num_workers=0)
    scorer = rollout.HostScorer(tokenizer, reward, problems)
    try:
        scored = scorer(sampled)
    finally:
        scorer.close()
    # Stage 2 returns the rollout, scored: f32[B, G] rewards of both models' completions.
    assert isinstance(scored, Rollout) and scored.policy is out
    digits = [sum(c.isdigit() for c in t) / len(t) for t in texts]
    np.testing.assert_allclose(scored.rewards, np.reshape(digits, (2, 2)), rtol=1e-6)
    np.testing.assert_allclose(scored.ref_rewards, np.reshape(digits[::-1], (2, 2)), rtol=1e-6)
    # Its per-completion extras: each component's value and each failure counter's 0/1.
    np.testing.assert_allclose(
        scored.reward_components["reward/digit_fraction"], np.reshape(digits, (2, 2)), rtol=1e-6
    )
    assert set(scored.reward_counts) == {
        *(f"reward/{k}" for k in rollout.COUNTED),
        *(f"ref_reward/{k}" for k in rollout.REFERENCE_COUNTED),
    }
    assert all(not np.any(v) for v in scored.reward_counts.values())


def _exact_text(completions, *, answers, **kwargs):
    return np.asarray([float(c == a) for c, a in zip(completions, answers, strict=True)])


def test_host_scorer_finds_each_prompts_gold_answer_through_its_index(tokenizer, monkeypatch):
    """The same completions score 1 or 0 by the gold answer of the problem `index` names."""
    monkeypatch.setitem(rewards.HOST_REWARDS, "exact_text", _exact_text)
    out = sampling.completion_output(
        jnp.asarray([[5, 2], [5, 2]]), jnp.zeros((2, 2)), jnp.asarray([2])
    )
    text = data.decode_completions(tokenizer, np.asarray(out.tokens), np.asarray(out.lengths))[0]
    problems = [Example("q0", text), Example("q1", text + " not")]
    reward = configs.RewardConfig(names=("exact_text",), num_workers=0)
    scorer = rollout.HostScorer(tokenizer, reward, problems)
    try:
        for index, expected in ((0, 1.0), (1, 0.0)):
            prompts = PromptBatch(
                ids=jnp.zeros((1, 1), jnp.int32),
                mask=jnp.ones((1, 1), jnp.int32),
                index=jnp.asarray([index], jnp.int32),
            )
            scored = scorer(Rollout(prompts=prompts, policy=out))
            np.testing.assert_array_equal(scored.rewards, [[expected, expected]])
            assert scored.ref_rewards is None
        with pytest.raises(ValueError, match="index"):
            scorer(Rollout(prompts=prompts.replace(index=None), policy=out))
    finally:
        scorer.close()
