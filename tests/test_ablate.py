"""The ablation module, and the margin's expected gradient (docs/margin-gradient.md) on a bandit.

The bandit: K arms, a softmax policy π_θ and a frozen softmax reference, rewards in
[0, 1]; a completion is one arm (one token). Every outcome of the G policy draws and
the G paired reference draws is enumerated, so the expected gradient of our loss with
our advantages is exact, not sampled.
"""

import itertools
import json

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

from aapo_jax import advantages, algorithms, losses, metrics
from experiments import ablate, intervals
from tests.helpers import matplotlib_backend

REWARDS = jnp.array([0.0, 0.15, 1.0])  # differences 0.15 (inside), ±0.85 and ±1 (clipped)
THETA = jnp.array([0.3, -0.5, 0.1])
THETA_REF = jnp.array([-0.2, 0.4, 0.0])
LOW, HIGH = 0.2, 0.28


@pytest.fixture(autouse=True)
def _algorithm_registry_restored():
    """The ablation runs add their algorithms to the global registry: take them out again,
    so that tests run later in the same process (test_algorithms) see the library's own."""
    saved = dict(algorithms.ALGORITHMS)
    yield
    algorithms.ALGORITHMS.clear()
    algorithms.ALGORITHMS.update(saved)


def expected_gradient(advantage_fn, group: int) -> jax.Array:
    """E[∇θ (−L)] of the token-mean PG loss over every (policy, reference) outcome."""
    pi, pi_ref = jax.nn.softmax(THETA), jax.nn.softmax(THETA_REF)
    arms = range(len(REWARDS))
    total = jnp.zeros_like(THETA)
    for ys in itertools.product(arms, repeat=group):
        for refs in itertools.product(arms, repeat=group):
            prob = jnp.prod(pi[jnp.array(ys)]) * jnp.prod(pi_ref[jnp.array(refs)])
            adv_N = advantage_fn(REWARDS[jnp.array(ys)][None], REWARDS[jnp.array(refs)][None])[0]

            def objective(theta, ys=ys, adv_N=adv_N):
                logp_Nx1 = jax.nn.log_softmax(theta)[jnp.array(ys)][:, None]
                terms = losses.aapo_terms(logp_Nx1, adv_N, jnp.ones_like(logp_Nx1))
                return -terms.total / terms.denominator

            total = total + prob * jax.grad(objective)(THETA)
    return total


def reward_objective(theta):
    """E_{π_θ}[r]."""
    return jnp.sum(jax.nn.softmax(theta) * REWARDS)


def margin_objective(theta, low=LOW, high=HIGH):
    """J_M(θ) = E_{y∼π_θ, ỹ∼π_ref} clip(r(y) − r(ỹ), −δ_low, δ_high)."""
    diff = jnp.clip(REWARDS[:, None] - REWARDS[None, :], -low, high)
    return jax.nn.softmax(theta) @ diff @ jax.nn.softmax(THETA_REF)


def aapo(r, r_ref):
    return advantages.aapo(r, r_ref, scale_rewards=False, margin_low=LOW, margin_high=HIGH)


@pytest.mark.parametrize("group", [1, 2])
def test_aapo_expected_gradient_is_the_gradient_of_the_clipped_objective(group):
    if group == 1:  # Â = 0 for G = 1: the margin alone
        got = expected_gradient(aapo, 1)
        want = jax.grad(margin_objective)(THETA)
    else:
        got = expected_gradient(aapo, group)
        want = (1 - 1 / group) * jax.grad(reward_objective)(THETA) + jax.grad(margin_objective)(
            THETA
        )
    np.testing.assert_allclose(got, want, atol=1e-6)
    # It is not the unclipped objective's gradient, nor the reward's alone: the test
    # pins which objective.
    unclipped = jax.grad(lambda t: margin_objective(t, 9.0, 9.0))(THETA)
    assert float(jnp.max(jnp.abs(jax.grad(margin_objective)(THETA) - unclipped))) > 1e-2
    assert float(jnp.max(jnp.abs(got - (1 - 1 / group) * jax.grad(reward_objective)(THETA)))) > 1e-3


def test_margin_only_and_constant_ablations_have_the_derived_expectations():
    def margin_only(r, r_ref):
        return ablate.margin_only_advantage(r, r_ref, margin_low=LOW, margin_high=HIGH)[0]

    np.testing.assert_allclose(
        expected_gradient(margin_only, 2), jax.grad(margin_objective)(THETA), atol=1e-6
    )

    # A constant shift has zero expected gradient at the sequence level (all T = 1 here).
    def constant(r, r_ref):
        return ablate.constant_advantage(r, constant=0.37)

    np.testing.assert_allclose(
        expected_gradient(constant, 2), 0.5 * jax.grad(reward_objective)(THETA), atol=1e-6
    )


def test_binary_rewards_margin_rescales_the_reward_gradient():
    """For 0/1 rewards ∇J_M = (δ_high (1 − p̃) + δ_low p̃) ∇p (docs/margin-gradient.md)."""
    global REWARDS
    saved, REWARDS = REWARDS, jnp.array([0.0, 1.0, 1.0])
    try:
        p_ref = float(jax.nn.softmax(THETA_REF) @ REWARDS)
        factor = HIGH * (1 - p_ref) + LOW * p_ref
        np.testing.assert_allclose(
            jax.grad(margin_objective)(THETA),
            factor * jax.grad(reward_objective)(THETA),
            atol=1e-6,
        )
    finally:
        REWARDS = saved


def test_variants_name_registered_algorithms_with_valid_hparams():
    from aapo_jax import configs
    from configs import quickstart

    ablate.register_algorithms()
    assert set(ablate.VARIANTS) == {
        "margin_0_0",
        "margin_0.1_0.14",
        "aapo",
        "margin_0.4_0.56",
        "margin_0.28_0.28",
        "constant",
        "margin_only",
    }
    for variant in ablate.VARIANTS.values():
        c = quickstart.get_config(f"algo={variant.algo},group=2,variant=tiny")
        c.rl.hparams.update(variant.run_hparams(constant=0.05))
        config = configs.experiment_config(c)  # validates the hyper-parameters
        assert dict(config.rl.hparams).items() >= variant.run_hparams(0.05).items()
    assert not algorithms.ALGORITHMS["aapo_constant"].needs_reference_rollout
    assert algorithms.ALGORITHMS["aapo_margin_only"].needs_reference_rollout
    with pytest.raises(ValueError, match="constant"):
        ablate.VARIANTS["constant"].run_hparams()


def test_mean_ci_is_student_t():
    mean, half = intervals.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    # t_{0.975, 4} = 2.7764; stdev = sqrt(2.5)
    assert half == pytest.approx(2.7764451 * np.sqrt(2.5) / np.sqrt(5), rel=1e-6)
    assert intervals.mean_ci([0.4]) == (0.4, 0.0)


# scipy.stats.t.ppf(0.5 + level / 2, df), to 8 decimals.
T_TABLE = {
    (0.95, 1): 12.70620474,
    (0.95, 2): 4.30265273,
    (0.95, 3): 3.18244631,
    (0.95, 4): 2.77644511,
    (0.95, 10): 2.22813885,
    (0.95, 30): 2.04227246,
    (0.95, 100): 1.98397152,
    (0.9, 5): 2.01504837,
    (0.99, 3): 5.84090931,
    (0.99, 1): 63.65674116,
}


@pytest.mark.parametrize(("level", "df"), sorted(T_TABLE))
def test_t_quantile_matches_the_t_table(level, df):
    assert intervals.t_quantile(level, df) == pytest.approx(T_TABLE[level, df], rel=1e-8)


def test_t_quantile_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="df=0"):
        intervals.t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="level=1"):
        intervals.t_quantile(1, 4)


def _result(variant, group, seed, final, curve, margin=None, **extra):
    return dict(
        variant=variant,
        algo="aapo",
        group=group,
        seed=seed,
        initial_accuracy=0.3,
        final_accuracy=final,
        reward_auc=sum(curve) / len(curve),
        zero_std_frac=0.5,
        margin_mean=margin,
        wall_seconds=1.0,
        reward_curve=curve,
        **extra,
    )


def test_table_and_plot(tmp_path):
    results = [
        _result("aapo", 2, 0, 0.40, [0.3, 0.4], margin=0.02),
        _result("aapo", 2, 1, 0.42, [0.3, 0.5], margin=0.04),
        _result("constant", 2, 0, 0.35, [0.3, 0.3], constant=0.02),
        _result("margin_0_0", 4, 0, 0.33, [0.3, 0.3]),
    ]
    lines = ablate.table(results).splitlines()
    half = 12.7062047 * np.std([40.0, 42.0], ddof=1) / np.sqrt(2)
    assert (
        lines[2]
        == f"| aapo | 2 | 2 | 41.0 ± {half:.1f} | +11.0 ± {half:.1f} | 0.375 ± 0.318 | +0.030 |"
    )
    assert lines[3] == "| constant | 2 | 1 | 35.0 ± 0.0 | +5.0 ± 0.0 | 0.300 ± 0.000 | +0.020 |"
    assert lines[4] == "| margin_0_0 | 4 | 1 | 33.0 ± 0.0 | +3.0 ± 0.0 | 0.300 ± 0.000 | – |"
    with matplotlib_backend("svg"):
        ablate.plot(results, tmp_path / "ablate.png")
        assert matplotlib.get_backend() == "svg"
    assert (tmp_path / "ablate.png").stat().st_size > 1000


def _paired_results():
    """aapo, margin_0_0 and constant at G=2 over seeds listed out of order (and one aapo seed
    that no other variant ran), plus a G=4 aapo run with no partner."""
    acc = {  # (variant, seed): final accuracy
        ("aapo", 0): 0.40, ("aapo", 1): 0.50, ("aapo", 2): 0.45, ("aapo", 3): 0.90,
        ("margin_0_0", 2): 0.44, ("margin_0_0", 0): 0.39, ("margin_0_0", 1): 0.49,
        ("constant", 1): 0.47, ("constant", 0): 0.39, ("constant", 2): 0.42,
    }  # fmt: skip
    results = [
        _result(v, 2, seed, final, [final - 0.1, final + 0.1]) for (v, seed), final in acc.items()
    ]
    return [*results, _result("aapo", 4, 0, 0.5, [0.5])]


def test_paired_differences_pair_runs_by_seed():
    rows = ablate.paired(_paired_results())
    assert [(r["a"], r["b"], r["group"], r["seeds"]) for r in rows] == [
        ("aapo", "margin_0_0", 2, [0, 1, 2]),
        ("aapo", "constant", 2, [0, 1, 2]),
    ]
    by_group_part, by_constant = rows
    # aapo − margin_0_0 is +1 point at every seed: no spread. Paired by position in the
    # results instead, the differences would be 0.40 − 0.44, … and the interval wide.
    acc = by_group_part["final_accuracy_pts"]
    np.testing.assert_allclose(acc["diffs"], [1.0, 1.0, 1.0], atol=1e-9)
    assert acc["mean"] == pytest.approx(1.0) and acc["ci95_half"] == pytest.approx(0, abs=1e-9)
    # The reward AUC is final accuracy here (a symmetric curve): the same differences.
    assert by_group_part["reward_auc"]["mean"] == pytest.approx(0.01)
    # aapo − constant: +1, +3, +3 points; t_{0.975, 2} · stdev / √3.
    acc = by_constant["final_accuracy_pts"]
    np.testing.assert_allclose(acc["diffs"], [1.0, 3.0, 3.0], atol=1e-9)
    half = 4.30265273 * np.std([1.0, 3.0, 3.0], ddof=1) / np.sqrt(3)
    assert acc["mean"] == pytest.approx(7 / 3)
    assert acc["ci95_half"] == pytest.approx(half, rel=1e-6)
    lines = ablate.paired_table(rows).splitlines()
    assert lines[2] == "| aapo − margin_0_0 | 2 | 3 | +1.0 ± 0.0 | +0.010 ± 0.000 |"
    assert (
        lines[3] == f"| aapo − constant | 2 | 3 | +2.3 ± {half:.1f} | +0.023 ± {half / 100:.3f} |"
    )


def test_paired_differences_refuse_a_seed_run_twice():
    results = _paired_results()
    with pytest.raises(ValueError, match="margin_0_0 G=2: a seed appears twice"):
        ablate.paired([*results, _result("margin_0_0", 2, 1, 0.3, [0.3])])


def test_report_writes_the_paired_table_and_json(tmp_path, capsys):
    results = _paired_results()
    with matplotlib_backend("svg"):
        ablate.report(tmp_path, results)
    text = (tmp_path / "table.md").read_text()
    assert text.startswith(ablate.table(results))
    assert ablate.paired_table(ablate.paired(results)) in text
    assert "| aapo − constant | 2 | 3 |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "paired.json").read_text())
    assert saved == json.loads(json.dumps(ablate.paired(results)))
    assert (tmp_path / "ablate.png").exists()


def test_ablation_runs_end_to_end_and_takes_c_from_the_matched_run(tmp_path):
    # A finished matched aapo run (reused, not retrained: its summary exists) with margins
    # 0.02 and 0.04; the constant run then trains with c = their mean.
    matched = tmp_path / "aapo-G2-s0"
    matched.mkdir()
    summary = {"initial_eval_accuracy": 0.3, "final_eval_accuracy": 0.4, "wall_seconds": 1.0}
    (matched / "summary.json").write_text(json.dumps(summary))
    rows = [
        {"step": s, "reward_mean": 0.5, "zero_std_group_frac": 0.5, "margin_mean": m}
        for s, m in ((1, 0.02), (2, 0.04))
    ]
    (matched / metrics.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = {"train.eval_size": 4, "train.eval_batch_size": 4, "data.train_size": 16}
    (result,) = ablate.run(
        tmp_path, ["constant"], groups=[2], seeds=[0], steps=2, prompts=2, overrides=overrides
    )
    assert result["variant"] == "constant" and result["constant"] == pytest.approx(0.03)
    config = json.loads((tmp_path / "constant-G2-s0" / "summary.json").read_text())
    assert config["algorithm"] == "aapo_constant"
    assert config["hparams"]["constant"] == pytest.approx(0.03)
    assert result["margin_mean"] is None  # no reference rollout, no margin
