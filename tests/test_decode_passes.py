"""The rollout in passes: a KV budget splits a step's prompts into sequential decode passes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aapo_jax import aot, configs, models, rollout, sampling, sharding
from aapo_jax.optim import make_optimizer
from aapo_jax.train_step import init_train_state
from aapo_jax.types import PromptBatch
from tests import hf_fixtures

TINY = hf_fixtures.tiny_model_config(vocab_size=32)
EOS = 4  # of 32 tokens: some rows stop early, some run to the budget
T = 6


@pytest.fixture(scope="module")
def pair():
    """Two tiny models of different weights: the policy and the reference."""
    return tuple(models.Transformer(TINY, rngs=nnx.Rngs(seed)) for seed in (0, 1))


def _prompts(b=4, width=7, seed=0):
    ids, mask = hf_fixtures.left_padded_batch(
        np.random.default_rng(seed), [1 + (3 * i) % width for i in range(b)], width, 32
    )
    return jnp.asarray(ids), jnp.asarray(mask)


def _config(passes=1, g=3, **kw):
    settings = sampling.SamplerSettings(max_new_tokens=T, temperature=1.0, **kw)
    return sampling.SamplingConfig(settings, (EOS,), num_samples=g, passes=passes)


def _assert_same(one_pass, in_passes):
    for a, b in zip(one_pass, in_passes, strict=True):
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


def test_passes_give_the_tokens_of_one_pass(pair):
    """Passes of 2 and 1 prompts (of 4, G = 3) draw the tokens of one pass for the same
    keys, for both models at once; log-probs to fp32 rounding."""
    ids, mask = _prompts()
    keys = list(jax.random.split(jax.random.key(3)))
    run = jax.jit(sampling.generate_tokens_many, static_argnames=("config", "mesh"))
    one = run(pair, ids, mask, keys, _config())
    lengths = np.asarray(one[0].lengths)
    assert lengths.min() < T and (lengths == T).any()  # early EOS and full rows both
    for passes in (2, 4):
        _assert_same(one, run(pair, ids, mask, keys, _config(passes)))


@pytest.mark.parametrize("mesh_shape", [(2, 1), (1, 2)])
def test_passes_on_a_mesh(pair, mesh_shape):
    """Data-parallel (each device its own 2 prompts, in 2 passes) and fsdp (XLA-partitioned:
    each pass takes a prompt of each device's block): the tokens of one device, one pass."""
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:2])
    ids, mask = _prompts(seed=1)
    keys = list(jax.random.split(jax.random.key(4)))
    config = _config(g=2)
    one = sampling.generate_many(pair, ids, mask, rngs=keys, config=config, buckets=None)
    on_mesh = [sharding.shard_model(m, mesh) for m in pair]
    split = dataclasses.replace(config, passes=2)
    out = sampling.generate_many(on_mesh, ids, mask, rngs=keys, config=split, mesh=mesh)
    assert len(out[0].tokens.sharding.device_set) == 2
    _assert_same(one, out)


def test_make_sampler_decodes_in_the_passes_its_budget_needs(pair, monkeypatch):
    """A budget of half the step's caches: two passes, the rollout of one pass."""
    rl_cfg = configs.RLConfig(algorithm="aapo", group_size=2)
    graphdef, params = nnx.split(pair[0])
    state = init_train_state(
        params, make_optimizer(configs.OptimConfig(total_steps=1)), rl_cfg, seed=0
    )[0]
    ids, mask = _prompts(seed=2)
    prompts = PromptBatch(ids=ids, mask=mask)
    whole = rollout.kv_cache_bytes(rl_cfg, _config(g=2).settings, TINY, None, 4, ids.shape[1])
    seen = []
    generate = sampling.generate_tokens_many

    def spy(*args, **kwargs):
        seen.append(args[4].passes)
        return generate(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate_tokens_many", spy)
    outs = []
    for budget in (0.0, whole / 2 / sharding.GiB):
        settings = configs.RolloutSettings(max_new_tokens=T, kv_budget_gib=budget)
        sample = rollout.make_sampler(
            rl_cfg, settings, graphdef, eos_token_id=EOS, pad_token_id=0, kv_budget_gib=budget
        )
        outs.append(jax.jit(sample)(state, prompts))
    assert seen == [1, 2]
    _assert_same(*((o.policy, o.reference) for o in outs))


@pytest.mark.parametrize(
    ("prompts", "budget", "expected"),
    [(8, 80, 1), (8, 79, 2), (8, 39, 4), (8, 10, 8), (6, 25, 3), (5, 45, 5), (8, 0, 1)],
)
def test_decode_passes_is_the_fewest_dividing_passes_that_fit(prompts, budget, expected):
    assert sampling.decode_passes(prompts, 10, budget) == expected


def test_a_budget_below_one_prompt_names_the_field():
    with pytest.raises(ValueError, match=r"sampling\.kv_budget_gib.*need 10 bytes per device"):
        sampling.decode_passes(8, 10, 9)


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_kv_cache_bytes_are_the_decode_caches(pair, shared_prompt):
    """The arithmetic the planner and the budget use: the bytes of the caches the decode
    loop carries (4 prompts × G = 3, policy and reference), a shared prompt stored once."""
    ids, mask = _prompts()
    config = _config(shared_prompt=shared_prompt)
    keys = [jax.random.key(0)] * 2
    state, _ = jax.eval_shape(
        lambda m: sampling.start_decode(m, ids, mask, keys, config), tuple(pair)
    )
    caches = [c.k + c.v + ((c.prompt.k + c.prompt.v) if c.prompt else ()) for c in state.caches]
    actual = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(caches))
    expected = sampling.kv_cache_bytes(
        TINY,
        prompts=4,
        rows=12,
        prompt_len=ids.shape[1],
        max_new_tokens=T,
        shared_prompt=shared_prompt,
        models=2,
    )
    assert actual == expected


def test_rollout_passes_count_each_devices_prompts():
    """8 prompts over data = 2 are 4 per device: a budget of two prompts' caches there is
    two passes; the reference's caches count only when it is sampled."""
    mesh = sharding.make_mesh(data=2, fsdp=1, devices=jax.devices()[:2])
    settings = configs.RolloutSettings(max_new_tokens=T)
    aapo = configs.RLConfig(algorithm="aapo", group_size=2)
    grpo = configs.RLConfig(algorithm="grpo", group_size=2)
    one = rollout.kv_cache_bytes(aapo, settings, TINY, mesh, 2, 8)  # one prompt per device
    assert one == 2 * rollout.kv_cache_bytes(grpo, settings, TINY, mesh, 2, 8)
    budget = 2 * one / sharding.GiB
    assert rollout.decode_passes(aapo, settings, TINY, mesh, 8, 8, kv_budget_gib=budget) == 2
    assert rollout.decode_passes(grpo, settings, TINY, mesh, 8, 8, kv_budget_gib=budget) == 1
    assert rollout.decode_passes(aapo, settings, TINY, mesh, 8, 8, kv_budget_gib=0.0) == 1


def test_config_checks():
    with pytest.raises(ValueError, match=r"sampling\.kv_budget_gib=-1\.0"):
        configs.RolloutSettings(kv_budget_gib=-1.0)
    with pytest.raises(ValueError, match="passes"):
        _config(passes=0)
    ids, mask = _prompts(b=3)
    with pytest.raises(ValueError, match=r"passes=2 must divide the 3 prompts"):
        sampling.generate_tokens_many(
            [models.Transformer(TINY, rngs=nnx.Rngs(0))],
            ids,
            mask,
            [jax.random.key(0)],
            _config(passes=2),
        )


def test_the_plan_counts_one_pass(tmp_path, capsys):
    """A 4-prompt-per-device plan under a budget of two prompts' caches: 2 passes, one pass's
    KV caches in the memory report and the printed table; a budget below one prompt is an
    error naming the field."""
    from experiments import plan as plan_cli
    from tests.helpers import tiny_plan_config
    from tests.test_plan import write_model

    c = tiny_plan_config(write_model(tmp_path / "model"))  # AAPO, B=8 × G=2, P=8, T=4
    c.mesh.fsdp = 2
    plan = aot.abstract_inputs(aot.plan_config(c), jax.devices()[:2])
    whole = aot.kv_cache_bytes(plan)
    programs = {
        name: aot.ProgramReport(name, 1.0, 0, 0, total_bytes=1) for name in ("rollout", "update")
    }
    c.sampling.kv_budget_gib = whole / 2 / sharding.GiB
    plan = aot.abstract_inputs(aot.plan_config(c), jax.devices()[:2])
    assert aot.decode_passes(plan) == 2
    report = aot.memory_report(plan, programs, 2**34)
    assert report["decode_passes"] == 2
    assert report["per_device_bytes"]["kv_cache"] == report["kv_cache_per_pass_bytes"] == whole // 2
    plan_cli.print_table(report)
    assert "decode passes: 2" in capsys.readouterr().out
    c.sampling.kv_budget_gib = whole / 16 / sharding.GiB  # a quarter of one prompt's caches
    with pytest.raises(ValueError, match=r"sampling\.kv_budget_gib"):
        aot.decode_passes(aot.abstract_inputs(aot.plan_config(c), jax.devices()[:2]))
