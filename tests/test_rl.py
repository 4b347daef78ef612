"""The train step, the one-program RL step, references, schedules and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aapo_jax import configs, models, rl, sampling, sharding
from aapo_jax.rewards import tokens as token_rewards

TINY = models.ModelConfig(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qkv_bias=True,
)
B, G, P, T = 4, 4, 6, 5


def _model(seed=0):
    return models.Transformer(TINY, rngs=nnx.Rngs(seed))


def _prompts(b=B):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY.vocab_size, size=(b, P)).astype(np.int32)
    mask = np.ones((b, P), np.int32)
    mask[1, :2] = 0
    ids[1, :2] = 0
    targets = np.full((b, 2), -1, np.int32)
    targets[:, 0] = 7
    return rl.PromptBatch(
        ids=jnp.asarray(ids),
        mask=jnp.asarray(mask),
        targets=jnp.asarray(targets),
        target_len=jnp.ones((b,), jnp.int32),
    )


def _rollout_batch(seed=0, n=B * G):
    """A random RolloutBatch sampled from the tiny model with random advantages."""
    model = _model()
    prompts = _prompts(n)
    out = sampling.generate(
        model, prompts.ids, prompts.mask, rng=jax.random.key(seed), max_new_tokens=T, buckets=None
    )
    adv = jax.random.normal(jax.random.key(seed + 1), (n,))
    return rl.RolloutBatch(
        prompt_ids=prompts.ids,
        prompt_mask=prompts.mask,
        completion_ids=out.tokens,
        completion_mask=out.mask,
        advantages=adv,
    )


# Adam's first step is lr·g/(|g| + eps): with a tiny eps it is ≈ lr·sign(g), which turns
# fp32 summation-order noise in near-zero gradients into full-size differences. eps=1 keeps
# the update linear in g, so parameter comparisons test the gradient itself.
LINEAR_ADAM = configs.OptimConfig(learning_rate=1e-2, total_steps=10, eps=1.0)


def _setup(rl_cfg=None, optim=None, seed=0):
    rl_cfg = rl_cfg or configs.RLConfig(group_size=G)
    optim = optim or configs.OptimConfig(learning_rate=1e-2, total_steps=10)
    tx = rl.make_optimizer(optim)
    graphdef, state = rl.init_train_state(_model(seed), tx, rl_cfg, jax.random.key(seed))
    return rl_cfg, optim, tx, graphdef, state


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_constant_and_cosine_schedules():
    const = rl.make_schedule(
        configs.OptimConfig(learning_rate=1.0, warmup_ratio=0.1, total_steps=100)
    )
    assert float(const(0)) == pytest.approx(1 / 11)
    assert float(const(10)) == pytest.approx(1.0) and float(const(99)) == pytest.approx(1.0)
    cosine = rl.make_schedule(
        configs.OptimConfig(
            learning_rate=1.0,
            schedule="cosine",
            warmup_ratio=0.1,
            total_steps=100,
            final_lr_fraction=0.1,
        )
    )
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(55)) == pytest.approx(0.55, abs=1e-6)  # half-way: (1 + 0.1) / 2
    assert float(cosine(100)) == pytest.approx(0.1)


def test_completion_logprobs_equal_sampler_logprobs():
    model = _model()
    prompts = _prompts()
    out = sampling.generate(
        model,
        prompts.ids,
        prompts.mask,
        rng=jax.random.key(3),
        max_new_tokens=T,
        eos_token_id=5,
        buckets=None,
    )
    logp, entropy = rl.completion_logprobs(
        model, prompts.ids, prompts.mask, out.tokens, out.mask, chunk_size=2
    )
    np.testing.assert_allclose(
        np.asarray(logp) * np.asarray(out.mask), np.asarray(out.logprobs), atol=2e-5
    )
    assert (np.asarray(entropy) > 0).all()


def _grouped_rollout(model, seed=3):
    """G sampled completions per prompt (rows b·G + g), prompts repeated to match."""
    prompts = _prompts()
    out = sampling.generate(
        model,
        prompts.ids,
        prompts.mask,
        rng=jax.random.key(seed),
        max_new_tokens=T,
        eos_token_id=5,
        num_samples=G,
        buckets=None,
    )
    assert 0 < int(jnp.sum(out.lengths < T))  # some rows stop early: masked tails
    ids, mask = jnp.repeat(prompts.ids, G, axis=0), jnp.repeat(prompts.mask, G, axis=0)
    return ids, mask, out


@pytest.mark.parametrize("remat", [False, True])
def test_shared_prompt_forward_equals_plain_forward_and_gradient(remat):
    model = models.Transformer(TINY.replace(remat=remat), rngs=nnx.Rngs(0))
    ids, mask, out = _grouped_rollout(model)
    graphdef, params = nnx.split(model)
    weights = jax.random.normal(jax.random.key(9), out.tokens.shape) * out.mask

    def objective(params, group):
        logp, entropy = rl.completion_logprobs(
            nnx.merge(graphdef, params),
            ids,
            mask,
            out.tokens,
            out.mask,
            chunk_size=2,
            prompt_group_size=group,
        )
        return jnp.sum(logp * weights), (logp * out.mask, entropy * out.mask)

    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
    (plain, plain_aux), plain_grad = grad_fn(params, 1)
    (shared, shared_aux), shared_grad = grad_fn(params, G)
    np.testing.assert_allclose(float(shared), float(plain), rtol=1e-5)
    for a, b in zip(_leaves(shared_aux), _leaves(plain_aux), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for a, b in zip(_leaves(shared_grad), _leaves(plain_grad), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    # Equal to the sampler's own log-probs, too.
    np.testing.assert_allclose(np.asarray(shared_aux[0]), np.asarray(out.logprobs), atol=2e-5)


def test_train_step_with_shared_prompts_matches_plain_step():
    model = _model()
    ids, mask, out = _grouped_rollout(model)
    batch = rl.RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        completion_ids=out.tokens,
        completion_mask=out.mask,
        advantages=jax.random.normal(jax.random.key(1), (B * G,)),
    )
    results = []
    for group, k in ((1, 1), (G, 1), (G, 2), (G, 8)):  # k=8: G does not divide the micro-batch
        rl_cfg, optim, tx, graphdef, state = _setup(
            optim=configs.OptimConfig(
                learning_rate=1e-2, total_steps=10, grad_accum_steps=k, eps=1.0
            )
        )
        step = jax.jit(rl.make_train_step(rl_cfg, optim, graphdef, tx, prompt_group_size=group))
        results.append(step(state, batch))
    (s_plain, m_plain), *others = results
    for s_other, m_other in others:
        np.testing.assert_allclose(float(m_other["loss"]), float(m_plain["loss"]), rtol=1e-5)
        for a, b in zip(_leaves(s_other.params), _leaves(s_plain.params), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_grad_accumulation_equals_one_big_batch():
    batch = _rollout_batch()
    results = []
    for k in (1, 4):
        rl_cfg, optim, tx, graphdef, state = _setup(
            optim=configs.OptimConfig(
                learning_rate=1e-2, total_steps=10, grad_accum_steps=k, eps=1.0
            )
        )
        step = jax.jit(rl.make_train_step(rl_cfg, optim, graphdef, tx))
        state, metrics = step(state, batch)
        results.append((state, metrics))
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-4)
    for a, b in zip(_leaves(s1.params), _leaves(s4.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_non_finite_update_is_skipped_and_counted():
    rl_cfg, optim, tx, graphdef, state = _setup()
    before = _leaves(state.params)
    batch = _rollout_batch()
    batch = batch.replace(advantages=batch.advantages.at[0].set(jnp.nan))
    step = jax.jit(rl.make_train_step(rl_cfg, optim, graphdef, tx))
    state, metrics = step(state, batch)
    assert float(metrics["update_skipped"]) == 1.0
    assert int(state.skipped_updates) == 1 and int(state.step) == 0
    for a, b in zip(before, _leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["frozen", "sync", "ema"])
def test_reference_policy_modes(mode):
    rl_cfg = configs.RLConfig(
        group_size=G, reference=mode, reference_sync_every=2, reference_ema_rate=0.25
    )
    rl_cfg, optim, tx, graphdef, state = _setup(rl_cfg)
    initial = _leaves(state.ref_params)
    step = jax.jit(rl.make_train_step(rl_cfg, optim, graphdef, tx))
    batch = _rollout_batch()
    state, _ = step(state, batch)  # step 1
    policy_1, ref_1 = _leaves(state.params), _leaves(state.ref_params)
    state, _ = step(state, batch)  # step 2
    policy_2, ref_2 = _leaves(state.params), _leaves(state.ref_params)
    for i in range(len(initial)):
        if mode == "frozen":
            np.testing.assert_array_equal(ref_2[i], initial[i])
        elif mode == "sync":
            np.testing.assert_array_equal(ref_1[i], initial[i])
            np.testing.assert_array_equal(ref_2[i], policy_2[i])
        else:
            np.testing.assert_allclose(ref_1[i], 0.75 * initial[i] + 0.25 * policy_1[i], atol=1e-7)
            np.testing.assert_allclose(ref_2[i], 0.75 * ref_1[i] + 0.25 * policy_2[i], atol=1e-7)


def _rl_step(rl_cfg, optim, graphdef, tx, max_new_tokens=T, mesh=None):
    settings = configs.SamplerSettings(max_new_tokens=max_new_tokens, temperature=1.0)
    fn = rl.make_rl_step(
        rl_cfg,
        optim,
        settings,
        graphdef,
        tx,
        token_rewards.prefix_match,
        eos_token_id=2,
        pad_token_id=0,
        mesh=mesh,
    )
    return jax.jit(fn, donate_argnums=0)


# First AAPO step of the tiny model, seed 0, on CPU (fp32, highest matmul precision).
GOLDEN_AAPO_STEP_1 = {
    "loss": -0.04863326996564865,
    "reward_mean": 0.0,
    "ref_reward_mean": 0.0625,
    "grad_norm": 0.05351589620113373,
}


def test_golden_one_step_metrics():
    rl_cfg, optim, tx, graphdef, state = _setup()
    _, metrics = _rl_step(rl_cfg, optim, graphdef, tx)(state, _prompts())
    got = {k: float(metrics[k]) for k in GOLDEN_AAPO_STEP_1}
    for name, expected in GOLDEN_AAPO_STEP_1.items():
        assert got[name] == pytest.approx(expected, rel=1e-4, abs=1e-6), name
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6)  # policy == reference


def test_rl_step_metrics_are_consistent():
    rl_cfg, optim, tx, graphdef, state = _setup()
    state, m = _rl_step(rl_cfg, optim, graphdef, tx)(state, _prompts())
    assert int(state.step) == 1
    for name in (
        "loss",
        "grad_norm",
        "lr",
        "reward_mean",
        "reward_std",
        "ref_reward_mean",
        "margin_mean",
        "margin_clip_low_frac",
        "margin_clip_high_frac",
        "advantage_mean",
        "advantage_std",
        "zero_std_group_frac",
        "completion_len_mean",
        "completion_len_max",
        "truncated_frac",
        "entropy",
        "kl",
        "completion_tokens",
    ):
        assert np.isfinite(float(m[name])), name
    assert 0 <= float(m["zero_std_group_frac"]) <= 1
    assert -0.2 <= float(m["margin_mean"]) <= 0.28
    assert 1 <= float(m["completion_len_mean"]) <= float(m["completion_len_max"]) <= T


def test_grpo_step_with_kl_penalty():
    rl_cfg = configs.RLConfig(
        advantage="grpo", loss="ppo_clip", group_size=G, scale_rewards=True, kl_beta=0.04
    )
    rl_cfg, optim, tx, graphdef, state = _setup(rl_cfg)
    step = _rl_step(rl_cfg, optim, graphdef, tx)
    history = []
    for _ in range(6):
        state, m = step(state, _prompts())
        history.append({k: float(m[k]) for k in ("kl", "grad_norm")})
    assert "ref_reward_mean" not in m  # GRPO never samples the reference
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # Once an update has moved the policy, it differs from the frozen reference.
    moved = next(i for i, h in enumerate(history) if h["grad_norm"] > 0)
    assert all(h["kl"] > 0 for h in history[moved + 1 :]), history


def test_rl_step_learns_a_token_task():
    """From a random model, AAPO on a JAX-native reward raises the mean reward."""
    rl_cfg = configs.RLConfig(group_size=8)
    optim = configs.OptimConfig(learning_rate=3e-3, total_steps=100)
    tx = rl.make_optimizer(optim)
    graphdef, state = rl.init_train_state(_model(1), tx, rl_cfg, jax.random.key(1))
    step = _rl_step(rl_cfg, optim, graphdef, tx, max_new_tokens=4)
    prompts = _prompts(8)
    rewards = []
    for _ in range(60):
        state, m = step(state, prompts)
        rewards.append(float(m["reward_mean"]))
    assert np.mean(rewards[:3]) < 0.2
    assert np.mean(rewards[-10:]) > 0.8, rewards


def test_sharded_train_step_matches_one_device():
    assert jax.device_count() == 8
    batch = _rollout_batch()  # 16 rows
    rl_cfg, optim, tx, graphdef, state = _setup(optim=LINEAR_ADAM)
    step_fn = rl.make_train_step(rl_cfg, optim, graphdef, tx)
    expected, m1 = jax.jit(step_fn)(state, batch)
    expected = _leaves(expected.params)

    rl_cfg, optim, tx, graphdef, state = _setup(optim=LINEAR_ADAM)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    state_sh = sharding.tree_shardings(state, state.params, mesh)
    batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch)
    state = jax.device_put(state, state_sh)
    q = state.params["layers"][0]["attn"]["q_kernel"].value
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    mu = state.opt_state[1][0].mu["layers"][0]["attn"]["q_kernel"].value
    assert mu.sharding.spec == q.sharding.spec
    step = rl.jit_step(step_fn, state_sh, batch_sh)
    got, m8 = step(state, jax.device_put(batch, batch_sh))
    assert got.params["embed"].value.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    # Tolerance: reductions are ordered differently across 8 devices (fp32).
    for a, b in zip(expected, _leaves(got.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_psum_flat_equals_a_psum_per_leaf():
    mesh = sharding.make_mesh(data=4, fsdp=1)
    tree = {
        "w": jnp.arange(4 * 6, dtype=jnp.float32).reshape(4, 2, 3) / 7,
        "n": jnp.arange(8, dtype=jnp.int32).reshape(4, 2),
        "s": jnp.linspace(-1, 1, 4, dtype=jnp.float32).reshape(4, 1),
    }
    rows = jax.sharding.PartitionSpec("data")

    def run(reduce):
        return jax.jit(jax.shard_map(reduce, mesh=mesh, in_specs=rows, out_specs=rows))(tree)

    flat = run(lambda t: rl.psum_flat(t, "data"))
    each = run(lambda t: jax.tree.map(lambda x: jax.lax.psum(x, "data"), t))
    for name in tree:
        assert flat[name].dtype == tree[name].dtype and flat[name].shape == tree[name].shape
        np.testing.assert_allclose(np.asarray(flat[name]), np.asarray(each[name]), rtol=1e-6)


@pytest.mark.parametrize(
    "algo",
    [dict(), dict(advantage="grpo", loss="ppo_clip", scale_rewards=True, kl_beta=0.04)],
    ids=["aapo", "grpo_kl"],
)
def test_data_parallel_rl_step_matches_one_device(algo):
    """4 devices each sample and differentiate 2 of 8 prompts; only sums cross devices."""
    rl_cfg = configs.RLConfig(group_size=G, **algo)
    runs = {}
    for name, mesh in (("one", None), ("four", sharding.make_mesh(data=4, fsdp=1))):
        _, optim, tx, graphdef, state = _setup(rl_cfg, optim=LINEAR_ADAM)
        prompts = _prompts(8)
        if mesh is not None:
            assert sampling.row_parallel(mesh, 8)
            state = jax.device_put(state, sharding.tree_shardings(state, state.params, mesh))
            prompts = sharding.shard_batch(prompts, mesh)
        step = _rl_step(rl_cfg, optim, graphdef, tx, mesh=mesh)
        metrics = []
        for _ in range(2):
            state, m = step(state, prompts)
            metrics.append({k: float(v) for k, v in m.items()})
        runs[name] = (metrics, _leaves(state.params))
    (m1, p1), (m4, p4) = runs["one"], runs["four"]
    assert m1[0]["reward_std"] > 0 or m1[0]["ref_reward_mean"] > 0  # the step saw a signal
    for step_1, step_4 in zip(m1, m4, strict=True):
        assert step_1.keys() == step_4.keys()
        for name in step_1:
            # Tolerance: per-device matmuls and sums are ordered differently (fp32).
            assert step_4[name] == pytest.approx(step_1[name], rel=1e-4, abs=1e-6), name
    for a, b in zip(p1, p4, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"rl\.advantage='ppo'"):
        configs.RLConfig(advantage="ppo")
    with pytest.raises(ValueError, match=r"rl\.reference_sync_every"):
        configs.RLConfig(reference="sync")
    with pytest.raises(ValueError, match=r"unknown config field.*'rl\.margin_lo'"):
        configs.from_mapping(configs.RLConfig, {"margin_lo": 0.1}, prefix="rl")
    with pytest.raises(TypeError, match=r"optim\.total_steps"):
        configs.from_mapping(configs.OptimConfig, {"total_steps": 1.5}, prefix="optim")
    with pytest.raises(ValueError, match=r"rl\.kl_estimator='k9'"):
        configs.from_mapping(configs.RLConfig, {"kl_estimator": "k9"}, prefix="rl")
    cfg = configs.from_mapping(configs.OptimConfig, {"learning_rate": 1, "schedule": "cosine"})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
