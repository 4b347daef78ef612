"""Algorithm specs: hyper-parameters, resolution, dispatch, the registry, config validation."""

import dataclasses

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from aapo_jax import advantages, algorithms, configs, losses
from aapo_jax.algorithms import ALGORITHMS, Algorithm, HParam
from tests.reference_advantages import np_aapo, np_grpo, np_rloo


def close(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol)


def random_rewards(seed, b=4, g=5):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(b, g))
    ref = rewards + 0.3 * rng.normal(size=(b, g))
    return jnp.asarray(rewards, jnp.float32), jnp.asarray(ref, jnp.float32)


def random_batch(seed, n=4, t=6):
    rng = np.random.default_rng(seed)
    logp = jnp.asarray(-rng.exponential(size=(n, t)) - 0.01, jnp.float32)
    adv = jnp.asarray(rng.normal(size=n), jnp.float32)
    mask = jnp.asarray(np.arange(t)[None] < rng.integers(1, t + 1, size=n)[:, None])
    ref = logp + jnp.asarray(0.3 * rng.normal(size=(n, t)), jnp.float32)
    return logp, adv, mask, ref


class Recorder:
    """A fake advantage or loss function that records how it was called."""

    def __init__(self, result):
        self.result = result
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


# ---------------------------------------------------------------------------------------------
# HParam.check.


def test_hparam_float_accepts_ints_as_floats():
    spec = HParam(0.2, low=0.0)
    value = spec.check("rl.hparams.margin_low", 1)
    assert value == 1.0 and type(value) is float
    assert type(spec.check("f", 0.5)) is float


@pytest.mark.parametrize(
    ("default", "value", "message"),
    [
        (0.2, True, "must be a number"),
        (0.2, "0.2", "must be a number"),
        (0.2, None, "must be a number"),
        (3, 3.0, "must be an int"),
        (3, True, "must be an int"),
        (False, 1, "must be a bool"),
        (False, 0, "must be a bool"),
        (False, "false", "must be a bool"),
        ("k3", 3, "must be a str"),
    ],
)
def test_hparam_type_errors_name_the_field(default, value, message):
    with pytest.raises(TypeError, match=rf"rl\.hparams\.x={value!r}.*{message}"):
        HParam(default).check("rl.hparams.x", value)


def test_hparam_accepts_its_own_type():
    assert HParam(3).check("f", 7) == 7 and type(HParam(3).check("f", 7)) is int
    assert HParam(False).check("f", True) is True
    assert HParam("a").check("f", "b") == "b"


def test_hparam_bounds_are_inclusive():
    spec = HParam(0.5, low=0.0, high=1.0)
    assert spec.check("f", 0.0) == 0.0
    assert spec.check("f", 1) == 1.0
    with pytest.raises(ValueError, match=r"rl\.hparams\.beta=-0\.1 is invalid: expected ≥ 0\.0"):
        spec.check("rl.hparams.beta", -0.1)
    with pytest.raises(ValueError, match=r"rl\.hparams\.beta=1\.5 is invalid: expected ≤ 1\.0"):
        spec.check("rl.hparams.beta", 1.5)
    # An int hyper-parameter with bounds.
    with pytest.raises(ValueError, match=r"f=0 is invalid: expected ≥ 1"):
        HParam(2, low=1).check("f", 0)


def test_hparam_choices():
    spec = HParam("k3", choices=("k1", "k2", "k3"))
    assert spec.check("f", "k1") == "k1"
    with pytest.raises(ValueError, match=r"rl\.hparams\.est='k9'.*one of \['k1', 'k2', 'k3'\]"):
        spec.check("rl.hparams.est", "k9")
    # Choices of a float parameter compare after the int → float conversion.
    assert HParam(0.5, choices=(0.5, 1.0)).check("f", 1) == 1.0
    with pytest.raises(ValueError, match="one of"):
        HParam(0.5, choices=(0.5, 1.0)).check("f", 2)


# ---------------------------------------------------------------------------------------------
# Algorithm construction.


def _spec(**kwargs):
    return Algorithm(advantage=advantages.dr_grpo, loss=losses.pg_terms, **kwargs)


def test_construction_rejects_shared_hparam_names():
    with pytest.raises(ValueError, match=r"\['scale'\] are both advantage and loss ones"):
        _spec(
            advantage_hparams={"scale": HParam(1.0), "a": HParam(1.0)},
            loss_hparams={"scale": HParam(1.0), "b": HParam(1.0)},
        )


@pytest.mark.parametrize("where", ["advantage_hparams", "loss_hparams"])
def test_construction_rejects_non_hparam_specs(where):
    with pytest.raises(TypeError, match=r"hyper-parameter 'beta' must be an HParam, got 0\.1"):
        _spec(**{where: {"beta": 0.1}})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (HParam(-0.1, low=0.0), "expected ≥ 0.0"),
        (HParam(2.0, high=1.0), "expected ≤ 1.0"),
        (HParam("k4", choices=("k1", "k3")), "one of"),
    ],
)
def test_construction_rejects_defaults_outside_their_own_range(spec, message):
    with pytest.raises(ValueError, match=rf"hyper-parameter .beta.: its default.*{message}"):
        _spec(loss_hparams={"beta": spec})


def test_construction_rejects_bad_min_group_size():
    with pytest.raises(ValueError, match="min_group_size must be ≥ 1, got 0"):
        _spec(min_group_size=0)


def test_algorithm_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ALGORITHMS["aapo"].min_group_size = 1


# ---------------------------------------------------------------------------------------------
# Algorithm.resolve.


def test_resolve_fills_defaults():
    spec = ALGORITHMS["aapo"]
    resolved = spec.resolve({"margin_high": 0.5}, name="aapo", field="rl.hparams")
    assert resolved == {"scale_rewards": False, "margin_low": 0.2, "margin_high": 0.5}
    assert spec.resolve({}, name="aapo", field="rl.hparams") == spec.defaults()
    # The defaults themselves are untouched.
    assert spec.defaults()["margin_high"] == 0.28


def test_resolve_converts_values():
    resolved = ALGORITHMS["grpo"].resolve({"kl_beta": 1}, name="grpo", field="rl.hparams")
    assert resolved["kl_beta"] == 1.0 and type(resolved["kl_beta"]) is float


def test_resolve_unknown_name_lists_the_hyperparameters():
    with pytest.raises(ValueError) as info:
        ALGORITHMS["aapo"].resolve({"kl_beta": 0.1}, name="aapo", field="rl.hparams")
    message = str(info.value)
    assert "rl.hparams.kl_beta" in message and "'aapo'" in message
    assert "['margin_high', 'margin_low', 'scale_rewards']" in message


def test_resolve_unknown_name_for_an_algorithm_without_hparams():
    spec = Algorithm(advantage=advantages.reinforce, loss=losses.aapo_terms)
    with pytest.raises(ValueError, match=r"my\.field\.seq_mean.*'plain'.*are none"):
        spec.resolve({"seq_mean": True}, name="plain", field="my.field")
    assert spec.resolve({}, name="plain", field="my.field") == {}


@pytest.mark.parametrize(
    ("name", "values", "error", "field"),
    [
        ("aapo", {"margin_low": -0.1}, ValueError, "rl.hparams.margin_low=-0.1"),
        ("aapo", {"scale_rewards": 1}, TypeError, "rl.hparams.scale_rewards=1"),
        ("grpo", {"kl_beta": "0.1"}, TypeError, "rl.hparams.kl_beta='0.1'"),
        ("rloo", {"seq_mean": "yes"}, TypeError, "rl.hparams.seq_mean='yes'"),
    ],
)
def test_resolve_bad_value_names_the_field(name, values, error, field):
    with pytest.raises(error, match=field.replace(".", r"\.")):
        ALGORITHMS[name].resolve(values, name=name, field="rl.hparams")


# ---------------------------------------------------------------------------------------------
# ConfiguredAlgorithm: advantages and loss_terms dispatch.


def test_advantages_without_reference_rollout():
    advantages_BxG = jnp.ones((2, 3))
    fake = Recorder(advantages_BxG)
    spec = Algorithm(
        advantage=fake,
        loss=losses.pg_terms,
        advantage_hparams={"scale": HParam(1.0)},
        loss_hparams={"seq_mean": HParam(False)},
    )
    rewards, ref = jnp.zeros((2, 3)), jnp.ones((2, 3))
    hp = {"scale": 2.0, "seq_mean": True}
    out = spec.configure(hp, name="fake").advantages(rewards, ref)
    # ref_rewards is not passed, nor are the loss's hyper-parameters.
    ((args, kwargs),) = fake.calls
    assert len(args) == 1 and args[0] is rewards
    assert kwargs == {"scale": 2.0}
    # A plain array becomes (array, {}).
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0] is advantages_BxG and out[1] == {}
    spec.configure(hp, name="fake").advantages(rewards, None)
    assert len(fake.calls[1][0]) == 1


def test_advantages_with_reference_rollout():
    result = (jnp.ones((2, 3)), {"margin_mean": jnp.float32(0.1)})
    fake = Recorder(result)
    spec = Algorithm(
        advantage=fake,
        loss=losses.aapo_terms,
        advantage_hparams={"scale": HParam(1.0)},
        needs_reference_rollout=True,
    )
    rewards, ref = jnp.zeros((2, 3)), jnp.ones((2, 3))
    algo = spec.configure({"scale": 3.0}, name="fake")
    out = algo.advantages(rewards, ref)
    ((args, kwargs),) = fake.calls
    assert len(args) == 2 and args[0] is rewards and args[1] is ref
    assert kwargs == {"scale": 3.0}
    # A (advantages, metrics) tuple comes back as it is.
    assert out[0] is result[0] and out[1] == result[1]
    with pytest.raises(ValueError, match="reference rollout"):
        algo.advantages(rewards, None)
    assert len(fake.calls) == 1


@pytest.mark.parametrize(
    ("needs", "hp", "passes_kl"),
    [
        (False, {"beta": 0.5}, False),
        (True, {"beta": 0.0}, True),
        (lambda hp: hp["beta"] > 0, {"beta": 0.0}, False),
        (lambda hp: hp["beta"] > 0, {"beta": 0.5}, True),
    ],
    ids=["never", "always", "callable_off", "callable_on"],
)
def test_loss_terms_passes_kl_only_when_needed(needs, hp, passes_kl):
    terms = losses.LossTerms(total=jnp.float32(1), denominator=jnp.float32(2), metrics={})
    fake = Recorder(terms)
    spec = Algorithm(
        advantage=advantages.grpo,
        loss=fake,
        advantage_hparams={"scale_rewards": HParam(True)},
        loss_hparams={"beta": HParam(0.0, low=0.0)},
        needs_reference_logprobs=needs,
    )
    logp, adv, mask, ref = random_batch(0)
    kl = losses.kl_divergence(logp, ref, mask)
    algo = spec.configure({"scale_rewards": True, **hp}, name="fake")
    out = algo.loss_terms(logp, adv, mask, kl)
    assert out is terms
    ((args, kwargs),) = fake.calls
    assert args[0] is logp and args[1] is adv and args[2] is mask
    expected = {"beta": hp["beta"], **({"kl_NxT": kl} if passes_kl else {})}
    assert set(kwargs) == set(expected)
    assert kwargs["beta"] == hp["beta"]
    if passes_kl:
        assert kwargs["kl_NxT"] is kl
    assert algo.needs_reference_logprobs is passes_kl


@pytest.mark.parametrize(("kl_beta", "passes_kl"), [(0.0, False), (0.04, True)])
def test_grpo_passes_kl_iff_kl_beta_positive(kl_beta, passes_kl):
    fake = Recorder(None)
    spec = dataclasses.replace(ALGORITHMS["grpo"], loss=fake)
    algo = spec.configure({"kl_beta": kl_beta}, name="grpo")
    logp, adv, mask, ref = random_batch(1)
    kl = losses.kl_divergence(logp, ref, mask)
    algo.loss_terms(logp, adv, mask, kl)
    ((_, kwargs),) = fake.calls
    assert ("kl_NxT" in kwargs) is passes_kl
    assert set(kwargs) - {"kl_NxT"} == {"eps_low", "eps_high", "kl_beta", "seq_mean"}
    assert kwargs["kl_beta"] == kl_beta


def test_grpo_loss_terms_with_kl_is_ppo_clip_plus_penalty():
    spec = ALGORITHMS["grpo"]
    algo = spec.configure({"kl_beta": 0.1, "eps_high": 0.28}, name="grpo")
    logp, adv, mask, ref = random_batch(2)
    kl = losses.kl_divergence(logp, ref, mask, "k1")
    terms = algo.loss_terms(logp, adv, mask, kl)
    expected = losses.ppo_clip_terms(
        logp, adv, mask, kl_NxT=kl, eps_low=0.2, eps_high=0.28, kl_beta=0.1
    )
    close(terms.total, expected.total, atol=0)
    # The penalty is in: on-policy the PG part of the total is −Σ m·A.
    m = np.asarray(mask, np.float64)
    pg = -(m * np.asarray(adv)[:, None]).sum()
    close(terms.total, pg + 0.1 * (m * np.asarray(kl)).sum())
    # With kl_beta = 0 no KL is needed, and the loss runs without one.
    no_kl = spec.configure({}, name="grpo").loss_terms(logp, adv, mask, None)
    close(no_kl.total, pg)


# ---------------------------------------------------------------------------------------------
# The registry.


# name -> (needs reference rollout, min G, reference log-probs at defaults, loss)
REGISTRY = {
    "aapo": (True, 2, False, losses.aapo_terms),
    "grpo": (False, 2, False, losses.ppo_clip_terms),
    "dr_grpo": (False, 1, False, losses.pg_terms),
    "rloo": (False, 2, False, losses.pg_terms),
    "reinforce": (False, 1, False, losses.pg_terms),
}


def _np_advantages(name, rewards, ref, hp):
    """The paper formulas, from the independent NumPy references."""
    if name == "aapo":
        return np_aapo(rewards, ref, hp["scale_rewards"], hp["margin_low"], hp["margin_high"])
    if name == "grpo":
        return np_grpo(rewards, hp["scale_rewards"])
    if name == "dr_grpo":
        return np_grpo(rewards, scale_rewards=False)
    if name == "rloo":
        return np_rloo(rewards)
    if name == "reinforce":
        return np.asarray(rewards, np.float64)
    raise AssertionError(f"no NumPy reference for {name!r}")


def test_registry_names():
    assert set(ALGORITHMS) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_entry(name):
    rollout, min_group, ref_logprobs, loss = REGISTRY[name]
    spec = algorithms.get_algorithm(name)
    assert spec is ALGORITHMS[name]
    assert spec.needs_reference_rollout is rollout
    assert spec.min_group_size == min_group
    assert spec.configure({}, name=name).needs_reference_logprobs is ref_logprobs
    assert spec.loss is loss
    assert spec.description


def test_grpo_needs_reference_logprobs_iff_kl_beta_positive():
    spec = ALGORITHMS["grpo"]
    for kl_beta, needs in ((0.0, False), (1e-6, True), (0.04, True)):
        algo = spec.configure({"kl_beta": kl_beta}, name="grpo")
        assert algo.needs_reference_logprobs is needs, kl_beta
    # No other algorithm has a KL knob to turn on.
    for name in ("aapo", "dr_grpo", "rloo", "reinforce"):
        assert "kl_beta" not in ALGORITHMS[name].hparams


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_defaults_resolve_cleanly(name):
    spec = ALGORITHMS[name]
    defaults = spec.defaults()
    assert set(defaults) == set(spec.advantage_hparams) | set(spec.loss_hparams)
    assert spec.resolve({}, name=name, field="rl.hparams") == defaults
    assert spec.resolve(defaults, name=name, field="rl.hparams") == defaults
    config = configs.RLConfig(algorithm=name, group_size=spec.min_group_size)
    assert config.hyperparameters == defaults


# (name, hyper-parameter settings) for the parity tests: the defaults and a variation.
PARITY_CASES = [
    ("aapo_defaults", "aapo", {}),
    ("aapo_scaled", "aapo", {"scale_rewards": True, "margin_low": 0.1, "margin_high": 0.5}),
    ("grpo_defaults", "grpo", {}),
    ("grpo_unscaled", "grpo", {"scale_rewards": False}),
    ("grpo_kl", "grpo", {"kl_beta": 0.04}),
    ("dr_grpo", "dr_grpo", {}),
    ("dr_grpo_seq_mean", "dr_grpo", {"seq_mean": True}),
    ("rloo", "rloo", {}),
    ("reinforce", "reinforce", {}),
]


class RegistryParityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(PARITY_CASES)
    def test_advantages_match_numpy(self, name, values):
        algo = ALGORITHMS[name].configure(values, name=name)
        hp = algo.hparams
        rewards, ref = random_rewards(len(name) + len(values), g=6)
        compute = self.variant(algo.advantages)
        adv, metrics = compute(rewards, ref)
        assert adv.shape == rewards.shape and adv.dtype == jnp.float32
        close(adv, _np_advantages(name, rewards, ref, hp), atol=1e-4, rtol=1e-4)
        if name == "aapo":
            _, expected = advantages.margin(
                rewards,
                ref,
                margin_low=hp["margin_low"],
                margin_high=hp["margin_high"],
                return_stats=True,
            )
            assert set(metrics) == set(expected)
            for key, value in expected.items():
                close(metrics[key], value, atol=1e-7)
        else:
            assert metrics == {}

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters((name, name) for name in sorted(REGISTRY))
    def test_smallest_group(self, name):
        # At G = min_group_size every algorithm is defined with its defaults.
        spec = ALGORITHMS[name]
        rewards, ref = random_rewards(3, b=3, g=spec.min_group_size)
        compute = self.variant(spec.configure({}, name=name).advantages)
        adv, _ = compute(rewards, ref)
        assert bool(jnp.all(jnp.isfinite(adv)))
        close(adv, _np_advantages(name, rewards, ref, spec.defaults()), atol=1e-4, rtol=1e-4)


def test_get_algorithm_unknown_name():
    with pytest.raises(ValueError, match=r"rl\.algorithm='ppo' is invalid") as info:
        algorithms.get_algorithm("ppo")
    for name in ALGORITHMS:
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match=r"eval\.algo='ppo'"):
        algorithms.get_algorithm("ppo", field="eval.algo")


# ---------------------------------------------------------------------------------------------
# RLConfig validation reads the registry.


@pytest.mark.parametrize("name", ["aapo", "grpo", "rloo"])
def test_rlconfig_rejects_group_below_minimum(name):
    with pytest.raises(ValueError, match=rf"rl\.group_size=1 is invalid: expected ≥ 2.*'{name}'"):
        configs.RLConfig(algorithm=name, group_size=1)
    assert configs.RLConfig(algorithm=name, group_size=2).group_size == 2


@pytest.mark.parametrize("name", ["dr_grpo", "reinforce"])
def test_rlconfig_accepts_group_of_one(name):
    assert configs.RLConfig(algorithm=name, group_size=1).group_size == 1
    with pytest.raises(ValueError, match=r"rl\.group_size=0"):
        configs.RLConfig(algorithm=name, group_size=0)


def test_rlconfig_rejects_ema_rate_with_frozen_reference():
    with pytest.raises(ValueError, match=r"rl\.reference_ema_rate=0\.01 has no effect"):
        configs.RLConfig(reference="frozen", reference_ema_rate=0.01)
    config = configs.RLConfig(reference="ema", reference_ema_rate=0.01)
    assert config.reference_ema_rate == 0.01


def test_rlconfig_resolves_hparams():
    config = configs.RLConfig(algorithm="grpo", hparams=(("kl_beta", 1),), group_size=4)
    assert config.hyperparameters == {
        "scale_rewards": True,
        "eps_low": 0.2,
        "eps_high": 0.2,
        "kl_beta": 1.0,
        "seq_mean": False,
    }
    assert config.hparams == tuple(sorted(config.hyperparameters.items()))
    assert config.needs_reference_logprobs and config.uses_reference
    assert not config.samples_reference
    with pytest.raises(ValueError, match=r"rl\.hparams\.margin_low.*'grpo'"):
        configs.RLConfig(algorithm="grpo", hparams=(("margin_low", 0.1),))
    with pytest.raises(ValueError, match=r"rl\.algorithm='ppo'"):
        configs.RLConfig(algorithm="ppo")


def _margin_only(rewards_BxG, ref_rewards_BxG, *, scale):
    return scale * (rewards_BxG - ref_rewards_BxG)


def test_rlconfig_accepts_a_user_registered_algorithm(monkeypatch):
    spec = Algorithm(
        advantage=_margin_only,
        loss=losses.aapo_terms,
        advantage_hparams={"scale": HParam(1.0, low=0.0)},
        needs_reference_rollout=True,
        min_group_size=3,
    )
    with pytest.raises(ValueError, match=r"rl\.algorithm='margin_only'"):
        configs.RLConfig(algorithm="margin_only")
    monkeypatch.setitem(algorithms.ALGORITHMS, "margin_only", spec)

    config = configs.RLConfig(algorithm="margin_only", hparams=(("scale", 2),), group_size=3)
    assert config.algo.spec is spec and config.algo.name == "margin_only"
    assert config.hyperparameters == {"scale": 2.0}
    assert config.samples_reference and not config.needs_reference_logprobs
    # Through the ml_collections path, hparams as a mapping.
    from_dict = configs.from_mapping(
        configs.RLConfig,
        {"algorithm": "margin_only", "hparams": {"scale": 0.5}, "group_size": 4},
        prefix="rl",
    )
    assert from_dict.hyperparameters == {"scale": 0.5}
    # Its own minimum group and hyper-parameter checks apply.
    with pytest.raises(ValueError, match=r"rl\.group_size=2.*≥ 3"):
        configs.RLConfig(algorithm="margin_only", group_size=2)
    with pytest.raises(ValueError, match=r"rl\.hparams\.scale=-1\.0"):
        configs.RLConfig(algorithm="margin_only", hparams=(("scale", -1.0),), group_size=3)
    with pytest.raises(ValueError, match=r"rl\.hparams\.margin_low.*\['scale'\]"):
        configs.RLConfig(algorithm="margin_only", hparams=(("margin_low", 0.1),), group_size=3)
    # And its advantage is computed through the configured algorithm.
    rewards, ref = random_rewards(5, g=3)
    adv, metrics = config.algo.advantages(rewards, ref)
    close(adv, 2.0 * (np.asarray(rewards) - np.asarray(ref)))
    assert metrics == {}
