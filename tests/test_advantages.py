"""Advantage estimators: hand cases, NumPy parity with the paper formulas, invariances."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aapo_jax import advantages

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None)


# Independent NumPy versions of the formulas (DESIGN §1), written element by element.


def np_grpo(rewards, scale_rewards=True):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for b, group in enumerate(rewards):
        g = len(group)
        mean = sum(group) / g
        for i, r in enumerate(group):
            out[b, i] = r - mean
        if scale_rewards:
            std = np.sqrt(sum((r - mean) ** 2 for r in group) / (g - 1))
            out[b] /= std + 1e-4
    return out


def np_rloo(rewards):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for b, group in enumerate(rewards):
        for i, r in enumerate(group):
            others = [group[j] for j in range(len(group)) if j != i]
            out[b, i] = r - sum(others) / len(others)
    return out


def np_aapo(rewards, ref_rewards, scale_rewards=False, margin_low=0.2, margin_high=0.28):
    rewards = np.asarray(rewards, np.float64)
    ref_rewards = np.asarray(ref_rewards, np.float64)
    out = np_grpo(rewards, scale_rewards)
    for b in range(rewards.shape[0]):
        for i in range(rewards.shape[1]):
            out[b, i] += min(max(rewards[b, i] - ref_rewards[b, i], -margin_low), margin_high)
    return out


def call(fn, jit, *args, **kwargs):
    """fn(*args, **kwargs), optionally under jax.jit with kwargs bound as constants."""
    bound = functools.partial(fn, **kwargs)
    return (jax.jit(bound) if jit else bound)(*args)


def close(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol)


JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])

# Rewards on a grid of quarters keep sums and shifts exact in float32.
quarter = st.integers(-8, 8).map(lambda k: k / 4)


@st.composite
def reward_groups(draw, min_group=2, max_group=6, paired=False):
    num_prompts = draw(st.integers(1, 3))
    group = draw(st.integers(min_group, max_group))
    flat = st.lists(quarter, min_size=num_prompts * group, max_size=num_prompts * group)
    rewards = np.array(draw(flat), np.float32).reshape(num_prompts, group)
    if not paired:
        return rewards
    ref = np.array(draw(flat), np.float32).reshape(num_prompts, group)
    return rewards, ref


# ---------------------------------------------------------------------------------------------
# Hand-computed cases.


@JIT
def test_grpo_hand_case(jit):
    # mean 0.5, unbiased std sqrt(1/3).
    out = call(advantages.grpo, jit, jnp.array([[1.0, 0.0, 0.0, 1.0]]))
    a = 0.5 / (np.sqrt(1 / 3) + 1e-4)
    close(out, [[a, -a, -a, a]])


@JIT
def test_grpo_group_of_two(jit):
    # mean 0.5, unbiased std sqrt(0.5).
    out = call(advantages.grpo, jit, jnp.array([[1.0, 0.0]]))
    a = 0.5 / (np.sqrt(0.5) + 1e-4)
    close(out, [[a, -a]])


@JIT
def test_grpo_zero_std_group_is_zero_not_nan(jit):
    out = call(advantages.grpo, jit, jnp.array([[0.7, 0.7, 0.7], [1.0, 1.0, 1.0]]))
    close(out, np.zeros((2, 3)), atol=0)


@JIT
def test_grpo_ties(jit):
    # Two tied winners, two tied losers: tied rewards get equal advantages.
    out = np.asarray(call(advantages.grpo, jit, jnp.array([[2.0, 2.0, 0.0, 0.0, 1.0]])))
    assert out[0, 0] == out[0, 1] and out[0, 2] == out[0, 3] and out[0, 4] == 0.0
    close(out, np_grpo([[2.0, 2.0, 0.0, 0.0, 1.0]]))


@JIT
def test_dr_grpo_hand_case(jit):
    out = call(advantages.dr_grpo, jit, jnp.array([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]]))
    close(out, [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])


@JIT
def test_rloo_hand_case(jit):
    out = call(advantages.rloo, jit, jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 2.0, 2.0]]))
    close(out, [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1 - 4 / 3, 0 - 5 / 3, 2 - 1.0, 2 - 1.0]])


@JIT
def test_rloo_group_of_two(jit):
    close(call(advantages.rloo, jit, jnp.array([[1.0, 0.0]])), [[1.0, -1.0]])


@JIT
def test_reinforce_is_the_reward(jit):
    rewards = jnp.array([[1.0, 0.0, 0.5]])
    close(call(advantages.reinforce, jit, rewards), rewards, atol=0)


@JIT
def test_aapo_hand_case(jit):
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    ref = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    # group part [.5, -.5, -.5, .5]; margins clip([1, 0, -1, 0]) = [.28, 0, -.2, 0].
    # The all-correct group has no group signal, but the margin still rewards beating ref.
    expected = [[0.78, -0.5, -0.7, 0.5], [0.28, 0.0, 0.0, 0.0]]
    close(call(advantages.aapo, jit, rewards, ref), expected)


@JIT
def test_aapo_scaled_hand_case(jit):
    rewards = jnp.array([[1.0, 0.0]])
    ref = jnp.array([[0.0, 0.1]])
    a = 0.5 / (np.sqrt(0.5) + 1e-4)
    out = call(advantages.aapo, jit, rewards, ref, scale_rewards=True)
    close(out, [[a + 0.28, -a - 0.1]])


@JIT
def test_aapo_custom_margins(jit):
    out = call(
        advantages.aapo,
        jit,
        jnp.array([[1.0, 0.0]]),
        jnp.array([[0.0, 1.0]]),
        margin_low=0.05,
        margin_high=0.5,
    )
    close(out, [[0.5 + 0.5, -0.5 - 0.05]])


@JIT
@pytest.mark.parametrize("scale_rewards", [False, True])
def test_aapo_with_ref_equal_rewards_is_grpo(jit, scale_rewards):
    rewards = jax.random.uniform(jax.random.PRNGKey(0), (4, 6))
    out = call(advantages.aapo, jit, rewards, rewards, scale_rewards=scale_rewards)
    close(out, advantages.grpo(rewards, scale_rewards=scale_rewards), atol=0)


@JIT
def test_margin_stats_hand_case(jit):
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    ref = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.9]])
    stats = call(advantages.margin_stats, jit, rewards, ref, margin_low=0.2, margin_high=0.28)
    # diffs: [1, 0, -1, 0, 1, 0, 0, 0.1] -> margins [.28, 0, -.2, 0, .28, 0, 0, .1]
    close(stats["margin_mean"], (0.28 - 0.2 + 0.28 + 0.1) / 8)
    close(stats["margin_clip_low_frac"], 1 / 8)
    close(stats["margin_clip_high_frac"], 2 / 8)
    close(stats["margin_nonzero_frac"], 4 / 8)


def test_outputs_are_float32_for_integer_rewards():
    rewards = jnp.array([[1, 0, 0, 1]], jnp.int32)
    for name, fn in advantages.ADVANTAGES.items():
        assert fn(rewards, rewards).dtype == jnp.float32, name


# ---------------------------------------------------------------------------------------------
# Parity with the NumPy formulas on random rewards.


@JIT
@pytest.mark.parametrize("group", [2, 3, 8])
def test_parity_with_numpy(jit, group):
    key_r, key_ref = jax.random.split(jax.random.PRNGKey(group))
    rewards = jax.random.normal(key_r, (5, group))
    # Reference rewards near the policy's so that some margins clip and some do not.
    ref = rewards + 0.3 * jax.random.normal(key_ref, (5, group))
    r, rr = np.asarray(rewards), np.asarray(ref)
    close(call(advantages.grpo, jit, rewards), np_grpo(r), atol=1e-4, rtol=1e-4)
    close(call(advantages.grpo, jit, rewards, scale_rewards=False), np_grpo(r, False))
    close(call(advantages.dr_grpo, jit, rewards), np_grpo(r, False))
    close(call(advantages.rloo, jit, rewards), np_rloo(r))
    close(call(advantages.reinforce, jit, rewards), r)
    close(call(advantages.aapo, jit, rewards, ref), np_aapo(r, rr))
    close(
        call(advantages.aapo, jit, rewards, ref, scale_rewards=True, margin_low=0.1),
        np_aapo(r, rr, True, 0.1, 0.28),
        atol=1e-4,
        rtol=1e-4,
    )


# ---------------------------------------------------------------------------------------------
# Properties.


@PROPERTY_SETTINGS
@given(reward_groups())
def test_group_part_has_zero_mean_per_group(rewards):
    for fn in (advantages.grpo, advantages.dr_grpo, advantages.rloo):
        out = np.asarray(fn(jnp.asarray(rewards)))
        np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-4)


@PROPERTY_SETTINGS
@given(reward_groups(paired=True), st.booleans())
def test_aapo_margin_is_bounded(pair, scale_rewards):
    rewards, ref = map(jnp.asarray, pair)
    out = advantages.aapo(rewards, ref, scale_rewards=scale_rewards)
    margin = np.asarray(out - advantages.grpo(rewards, scale_rewards=scale_rewards))
    assert np.all(margin >= -0.2 - 1e-6) and np.all(margin <= 0.28 + 1e-6)
    # Equals the margin formula itself, and dr_grpo + margin when unscaled.
    close(margin, np.clip(np.asarray(rewards - ref), -0.2, 0.28), atol=1e-5)


@PROPERTY_SETTINGS
@given(reward_groups(paired=True), quarter, st.booleans())
def test_shift_invariance(pair, shift, scale_rewards):
    rewards, ref = map(jnp.asarray, pair)
    tol = {"atol": 1e-3, "rtol": 1e-4}
    grpo = functools.partial(advantages.grpo, scale_rewards=scale_rewards)
    close(grpo(rewards + shift), grpo(rewards), **tol)
    close(advantages.dr_grpo(rewards + shift), advantages.dr_grpo(rewards), **tol)
    close(advantages.rloo(rewards + shift), advantages.rloo(rewards), **tol)
    # Shifting both rollouts' rewards leaves every AAPO advantage unchanged.
    aapo = functools.partial(advantages.aapo, scale_rewards=scale_rewards)
    close(aapo(rewards + shift, ref + shift), aapo(rewards, ref), **tol)


@PROPERTY_SETTINGS
@given(reward_groups(paired=True), st.randoms(use_true_random=False))
def test_permutation_equivariance_within_group(pair, rnd):
    rewards, ref = pair
    perm = list(range(rewards.shape[1]))
    rnd.shuffle(perm)
    for name, fn in advantages.ADVANTAGES.items():
        out = np.asarray(fn(jnp.asarray(rewards), jnp.asarray(ref)))
        out_perm = np.asarray(fn(jnp.asarray(rewards[:, perm]), jnp.asarray(ref[:, perm])))
        close(out_perm, out[:, perm], atol=1e-5, rtol=1e-5)
        assert out.shape == rewards.shape, name


@PROPERTY_SETTINGS
@given(reward_groups(paired=True))
def test_groups_are_independent(pair):
    rewards, ref = pair
    for fn in advantages.ADVANTAGES.values():
        whole = np.asarray(fn(jnp.asarray(rewards), jnp.asarray(ref)))
        for b in range(rewards.shape[0]):
            row = np.asarray(fn(jnp.asarray(rewards[b : b + 1]), jnp.asarray(ref[b : b + 1])))
            close(whole[b : b + 1], row)


# ---------------------------------------------------------------------------------------------
# Registry and errors.


def test_registry_names_and_entries():
    assert set(advantages.ADVANTAGES) == {"grpo", "dr_grpo", "rloo", "reinforce", "aapo"}
    rewards = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    ref = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
    get = advantages.get_advantage_fn
    close(get("grpo")(rewards, None), advantages.grpo(rewards), atol=0)
    close(
        get("grpo")(rewards, ref, scale_rewards=False),
        advantages.grpo(rewards, scale_rewards=False),
        atol=0,
    )
    close(get("dr_grpo")(rewards, None), advantages.dr_grpo(rewards), atol=0)
    close(get("rloo")(rewards, None), advantages.rloo(rewards), atol=0)
    close(get("reinforce")(rewards, None), rewards, atol=0)
    close(
        get("aapo")(rewards, ref, scale_rewards=True, margin_high=0.5),
        advantages.aapo(rewards, ref, scale_rewards=True, margin_high=0.5),
        atol=0,
    )


@JIT
def test_registry_entries_jit(jit):
    rewards = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    ref = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
    for fn in advantages.ADVANTAGES.values():
        close(call(fn, jit, rewards, ref), fn(rewards, ref), atol=1e-6)


def test_needs_reference():
    assert {n for n in advantages.ADVANTAGES if advantages.needs_reference(n)} == {"aapo"}
    with pytest.raises(ValueError, match="valid names"):
        advantages.needs_reference("ppo")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'gpgo'") as info:
        advantages.get_advantage_fn("gpgo")
    for name in advantages.ADVANTAGES:
        assert name in str(info.value)


def test_aapo_entry_without_reference_raises():
    with pytest.raises(ValueError, match="ref_rewards"):
        advantages.get_advantage_fn("aapo")(jnp.ones((2, 3)), None)


def test_group_of_one():
    rewards = jnp.array([[1.0], [0.0]])
    with pytest.raises(ValueError, match="G=1"):
        advantages.rloo(rewards)
    with pytest.raises(ValueError, match="G=1"):
        advantages.grpo(rewards)
    close(advantages.dr_grpo(rewards), np.zeros((2, 1)), atol=0)
    close(advantages.aapo(rewards, jnp.zeros((2, 1))), [[0.28], [0.0]])


def test_bad_shapes_and_margins():
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        advantages.grpo(jnp.ones((6,)))
    with pytest.raises(ValueError, match="same shape"):
        advantages.aapo(jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="margin_low"):
        advantages.aapo(jnp.ones((2, 3)), jnp.ones((2, 3)), margin_low=-0.1)


def test_traced_hyperparameters():
    # Margins may be traced (e.g. a schedule); the formula is unchanged.
    rewards = jnp.array([[1.0, 0.0]])
    ref = jnp.array([[0.0, 1.0]])
    fn = jax.jit(lambda lo, hi: advantages.aapo(rewards, ref, margin_low=lo, margin_high=hi))
    close(fn(0.1, 0.3), [[0.8, -0.6]])
