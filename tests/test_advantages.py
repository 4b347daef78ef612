"""Advantage estimators: hand cases, NumPy parity with the paper formulas, invariances."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from aapo_jax import advantages
from tests.reference_advantages import np_aapo, np_grpo, np_margin_stats, np_rloo

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None)


def close(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol)


def jitted_or_not(variant, fn, **kwargs):
    """variant(fn) with kwargs bound as Python constants (not traced under jit)."""
    return variant(functools.partial(fn, **kwargs))


# Every estimator as fn(rewards, ref_rewards); the reference-free ones ignore ref_rewards.
PAIRED = {
    "grpo": lambda r, ref: advantages.grpo(r),
    "grpo_unscaled": lambda r, ref: advantages.grpo(r, scale_rewards=False),
    "dr_grpo": lambda r, ref: advantages.dr_grpo(r),
    "rloo": lambda r, ref: advantages.rloo(r),
    "reinforce": lambda r, ref: advantages.reinforce(r),
    "margin": advantages.margin,
    "aapo": advantages.aapo,
    "aapo_scaled": lambda r, ref: advantages.aapo(r, ref, scale_rewards=True),
    "aapo_return_stats": lambda r, ref: advantages.aapo(r, ref, return_stats=True)[0],
    "margin_return_stats": lambda r, ref: advantages.margin(r, ref, return_stats=True)[0],
}

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


class HandCaseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_grpo_hand_case(self):
        # mean 0.5, unbiased std sqrt(1/3).
        out = self.variant(advantages.grpo)(jnp.array([[1.0, 0.0, 0.0, 1.0]]))
        a = 0.5 / (np.sqrt(1 / 3) + 1e-4)
        close(out, [[a, -a, -a, a]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_grpo_group_of_two(self):
        # mean 0.5, unbiased std sqrt(0.5).
        out = self.variant(advantages.grpo)(jnp.array([[1.0, 0.0]]))
        a = 0.5 / (np.sqrt(0.5) + 1e-4)
        close(out, [[a, -a]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_grpo_zero_std_group_is_zero_not_nan(self):
        out = self.variant(advantages.grpo)(jnp.array([[0.7, 0.7, 0.7], [1.0, 1.0, 1.0]]))
        close(out, np.zeros((2, 3)), atol=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grpo_ties(self):
        # Two tied winners, two tied losers: tied rewards get equal advantages.
        rewards = [[2.0, 2.0, 0.0, 0.0, 1.0]]
        out = np.asarray(self.variant(advantages.grpo)(jnp.array(rewards)))
        assert out[0, 0] == out[0, 1] and out[0, 2] == out[0, 3] and out[0, 4] == 0.0
        close(out, np_grpo(rewards))

    @chex.variants(with_jit=True, without_jit=True)
    def test_dr_grpo_hand_case(self):
        rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
        out = self.variant(advantages.dr_grpo)(rewards)
        close(out, [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_rloo_hand_case(self):
        rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 2.0, 2.0]])
        out = self.variant(advantages.rloo)(rewards)
        close(out, [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1 - 4 / 3, 0 - 5 / 3, 2 - 1.0, 2 - 1.0]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_rloo_group_of_two(self):
        close(self.variant(advantages.rloo)(jnp.array([[1.0, 0.0]])), [[1.0, -1.0]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_reinforce_is_the_reward(self):
        rewards = jnp.array([[1.0, 0.0, 0.5]])
        close(self.variant(advantages.reinforce)(rewards), rewards, atol=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_aapo_hand_case(self):
        rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
        ref = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
        # group part [.5, -.5, -.5, .5]; margins clip([1, 0, -1, 0]) = [.28, 0, -.2, 0].
        # The all-correct group has no group signal, but the margin still rewards beating ref.
        expected = [[0.78, -0.5, -0.7, 0.5], [0.28, 0.0, 0.0, 0.0]]
        close(self.variant(advantages.aapo)(rewards, ref), expected)

    @chex.variants(with_jit=True, without_jit=True)
    def test_aapo_scaled_hand_case(self):
        rewards = jnp.array([[1.0, 0.0]])
        ref = jnp.array([[0.0, 0.1]])
        a = 0.5 / (np.sqrt(0.5) + 1e-4)
        out = jitted_or_not(self.variant, advantages.aapo, scale_rewards=True)(rewards, ref)
        close(out, [[a + 0.28, -a - 0.1]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_aapo_custom_margins(self):
        fn = jitted_or_not(self.variant, advantages.aapo, margin_low=0.05, margin_high=0.5)
        out = fn(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]]))
        close(out, [[0.5 + 0.5, -0.5 - 0.05]])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("unscaled", False), ("scaled", True))
    def test_aapo_with_ref_equal_rewards_is_grpo(self, scale_rewards):
        rewards = jax.random.uniform(jax.random.PRNGKey(0), (4, 6))
        fn = jitted_or_not(self.variant, advantages.aapo, scale_rewards=scale_rewards)
        close(fn(rewards, rewards), advantages.grpo(rewards, scale_rewards=scale_rewards), atol=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_margin_stats_hand_case(self):
        rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
        ref = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.9]])
        fn = jitted_or_not(
            self.variant, advantages.margin, margin_low=0.2, margin_high=0.28, return_stats=True
        )
        margins, stats = fn(rewards, ref)
        close(margins, [[0.28, 0.0, -0.2, 0.0], [0.28, 0.0, 0.0, 0.1]])
        # diffs: [1, 0, -1, 0, 1, 0, 0, 0.1] -> margins [.28, 0, -.2, 0, .28, 0, 0, .1]
        close(stats["margin_mean"], (0.28 - 0.2 + 0.28 + 0.1) / 8)
        close(stats["margin_clip_low_frac"], 1 / 8)
        close(stats["margin_clip_high_frac"], 2 / 8)
        close(stats["margin_nonzero_frac"], 4 / 8)


@pytest.mark.parametrize("name", sorted(PAIRED))
def test_outputs_are_float32_for_integer_rewards(name):
    rewards = jnp.array([[1, 0, 0, 1]], jnp.int32)
    ref = jnp.array([[0, 0, 1, 1]], jnp.int32)
    assert PAIRED[name](rewards, ref).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# return_stats: the same advantages and margins, with the margin's statistics.


def _random_pair(seed, shape):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=shape)
    # Reference rewards near the policy's so that some margins clip and some do not.
    ref = rewards + 0.3 * rng.normal(size=shape)
    return jnp.asarray(rewards, jnp.float32), jnp.asarray(ref, jnp.float32)


class AapoWithStatsTest(chex.TestCase):
    def _check_same(self, rewards, ref, **hp):
        both = jitted_or_not(self.variant, advantages.aapo, return_stats=True, **hp)(rewards, ref)
        adv = jitted_or_not(self.variant, advantages.aapo, **hp)(rewards, ref)
        margins = {k: v for k, v in hp.items() if k != "scale_rewards"}
        margin_fn = jitted_or_not(self.variant, advantages.margin, return_stats=True, **margins)
        margin, stats = margin_fn(rewards, ref)
        close(margin, advantages.margin(rewards, ref, **margins), atol=0, rtol=0)
        assert isinstance(both, tuple) and len(both) == 2
        close(both[0], adv, atol=0, rtol=0)
        assert set(both[1]) == set(stats)
        for key, value in stats.items():
            close(both[1][key], value, atol=0, rtol=0)
        return both

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("defaults", 0, (5, 4), {}),
        ("scaled", 1, (3, 8), {"scale_rewards": True}),
        ("custom_margins", 2, (4, 4), {"margin_low": 0.05, "margin_high": 0.5}),
        ("zero_margins", 3, (2, 6), {"margin_low": 0.0, "margin_high": 0.0}),
        (
            "everything",
            4,
            (6, 3),
            {"scale_rewards": True, "margin_low": 0.1, "margin_high": 0.15},
        ),
    )
    def test_random_inputs(self, seed, shape, hp):
        rewards, ref = _random_pair(seed, shape)
        adv, stats = self._check_same(rewards, ref, **hp)
        # And both are the paper formulas.
        close(adv, np_aapo(rewards, ref, **hp), atol=1e-4, rtol=1e-4)
        margins = {k: v for k, v in hp.items() if k != "scale_rewards"}
        expected = np_margin_stats(rewards, ref, **margins)
        assert set(stats) == set(expected)
        for key, value in expected.items():
            close(stats[key], value, atol=1e-6)
        # These random pairs clip at both ends, and not everywhere.
        assert 0 < float(stats["margin_clip_low_frac"]) < 1
        assert 0 < float(stats["margin_clip_high_frac"]) < 1

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_case(self):
        rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
        ref = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.9]])
        adv, stats = self._check_same(rewards, ref)
        # group part [.5, -.5, -.5, .5] and 0; margins [.28, 0, -.2, 0] and [.28, 0, 0, .1].
        close(adv, [[0.78, -0.5, -0.7, 0.5], [0.28, 0.0, 0.0, 0.1]])
        close(stats["margin_mean"], (0.28 - 0.2 + 0.28 + 0.1) / 8)
        close(stats["margin_clip_low_frac"], 1 / 8)
        close(stats["margin_clip_high_frac"], 2 / 8)
        close(stats["margin_nonzero_frac"], 4 / 8)

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_case_all_tied(self):
        # Every group tied and every reference equal: no signal at all, nothing clips.
        rewards = jnp.full((2, 3), 0.5)
        adv, stats = self._check_same(rewards, rewards, scale_rewards=True)
        close(adv, np.zeros((2, 3)), atol=0)
        for key in stats:
            assert float(stats[key]) == 0.0, key


def test_return_stats_errors():
    with pytest.raises(ValueError, match="same shape"):
        advantages.aapo(jnp.ones((2, 3)), jnp.ones((2, 4)), return_stats=True)
    with pytest.raises(ValueError, match="margin_high"):
        advantages.margin(jnp.ones((2, 3)), jnp.ones((2, 3)), margin_high=-0.1, return_stats=True)


# ---------------------------------------------------------------------------------------------
# Parity with the NumPy formulas on random rewards.


class ParityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("G2", 2), ("G3", 3), ("G8", 8))
    def test_parity_with_numpy(self, group):
        rewards, ref = _random_pair(group, (5, group))
        r, rr = np.asarray(rewards), np.asarray(ref)
        v = functools.partial(jitted_or_not, self.variant)
        close(v(advantages.grpo)(rewards), np_grpo(r), atol=1e-4, rtol=1e-4)
        close(v(advantages.grpo, scale_rewards=False)(rewards), np_grpo(r, False))
        close(v(advantages.dr_grpo)(rewards), np_grpo(r, False))
        close(v(advantages.rloo)(rewards), np_rloo(r))
        close(v(advantages.reinforce)(rewards), r)
        close(v(advantages.margin)(rewards, ref), np_aapo(r, rr) - np_grpo(r, False))
        close(v(advantages.aapo)(rewards, ref), np_aapo(r, rr))
        close(
            v(advantages.aapo, scale_rewards=True, margin_low=0.1)(rewards, ref),
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
    # Equals the margin formula itself.
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
    for name, fn in PAIRED.items():
        out = np.asarray(fn(jnp.asarray(rewards), jnp.asarray(ref)))
        out_perm = np.asarray(fn(jnp.asarray(rewards[:, perm]), jnp.asarray(ref[:, perm])))
        assert out.shape == rewards.shape, name
        close(out_perm, out[:, perm], atol=1e-5, rtol=1e-5)


@PROPERTY_SETTINGS
@given(reward_groups(paired=True))
def test_groups_are_independent(pair):
    rewards, ref = pair
    for fn in PAIRED.values():
        whole = np.asarray(fn(jnp.asarray(rewards), jnp.asarray(ref)))
        for b in range(rewards.shape[0]):
            row = np.asarray(fn(jnp.asarray(rewards[b : b + 1]), jnp.asarray(ref[b : b + 1])))
            close(whole[b : b + 1], row)


@PROPERTY_SETTINGS
@given(reward_groups(paired=True), st.booleans())
def test_return_stats_property(pair, scale_rewards):
    rewards, ref = map(jnp.asarray, pair)
    adv, stats = advantages.aapo(rewards, ref, scale_rewards=scale_rewards, return_stats=True)
    close(adv, advantages.aapo(rewards, ref, scale_rewards=scale_rewards), atol=0, rtol=0)
    expected = np_margin_stats(np.asarray(rewards), np.asarray(ref))
    assert set(stats) == set(expected)
    for key, value in expected.items():
        close(stats[key], value, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors and edge cases.


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
    with pytest.raises(ValueError, match=r"ref_rewards must have shape \[B, G\]"):
        advantages.aapo(jnp.ones((2, 3)), jnp.ones((6,)))
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
    with_stats = jax.jit(
        lambda lo, hi: advantages.aapo(
            rewards, ref, margin_low=lo, margin_high=hi, return_stats=True
        )
    )
    adv, stats = with_stats(0.1, 0.3)
    close(adv, [[0.8, -0.6]])
    close(stats["margin_clip_high_frac"], 0.5)
