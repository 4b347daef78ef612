"""LoRA and QLoRA: adapters on the stacked projections, the frozen base, export, training."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from aapo_jax import checkpoint, configs, metrics, models, sampling, sharding, train_step, trainer
from aapo_jax.models import lora
from aapo_jax.optim import make_optimizer
from configs.quickstart import quickstart_dir
from tests import hf_fixtures
from tests.helpers import tiny_config, train_process, trained_steps, wait_for

RANK = 4


def _load(model_dir, **kw):
    return models.load_hf_checkpoint(model_dir, jnp.float32, **kw)


def _batch(vocab, rows=3, width=9, seed=0):
    rng = np.random.default_rng(seed)
    return hf_fixtures.left_padded_batch(rng, [9, 6, 4][:rows], width, vocab)


def _moved(model: models.Transformer, seed: int = 1) -> models.Transformer:
    """`model` with random non-zero adapters (as training would leave them)."""
    graphdef, adapters, base = models.split_trained(model)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), adapters)
    return nnx.merge(graphdef, adapters, base)


def test_targets_are_matched_in_full_and_a_bad_pattern_is_named():
    assert lora.targeted(lora.DEFAULT_TARGETS) == tuple(lora.PROJECTIONS)
    assert lora.targeted(r"layers/attn/(q|v)_kernel") == (
        "layers/attn/q_kernel",
        "layers/attn/v_kernel",
    )
    with pytest.raises(ValueError, match=r"model\.lora_targets='q_proj' matches no projection"):
        lora.targeted("q_proj")
    c = tiny_config("unused")
    c.model.lora_rank = 8
    c.rl.reference = "ema"
    with pytest.raises(ValueError, match=r"rl\.reference"):
        configs.experiment_config(c)
    c.rl.reference = "frozen"
    c.model.lora_rank = 0
    c.model.lora_base_qtype = "nf4"
    with pytest.raises(ValueError, match=r"model\.lora_base_qtype"):
        configs.experiment_config(c)


def test_fresh_adapters_give_the_base_logits_exactly_and_are_stacked(tiny_model_dir):
    base = _load(tiny_model_dir)
    model = _load(tiny_model_dir, lora_rank=RANK, lora_alpha=8.0)
    cfg = model.config
    adapters = nnx.state(model, nnx.LoRAParam)
    a, b = (
        adapters["layers"]["attn"]["q_kernel_lora_a"],
        adapters["layers"]["attn"]["q_kernel_lora_b"],
    )
    d, hq = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    assert a.value.shape == (cfg.num_layers, d, RANK) and b.value.shape == (
        cfg.num_layers,
        RANK,
        hq,
    )
    o = adapters["layers"]["attn"]["o_kernel_lora_a"]
    assert o.value.shape == (cfg.num_layers, hq, RANK)
    assert np.abs(np.asarray(a.value)).min() < np.abs(np.asarray(a.value)).max()  # A is random
    assert not np.any(np.asarray(b.value))
    # The base is stored once, frozen in the compute dtype; only adapters are LoRAParams.
    _, trained, frozen = models.split_trained(model)
    assert {type(v) for v in jax.tree.leaves(trained, is_leaf=_is_var)} == {nnx.LoRAParam}
    assert sum(x.size for x in jax.tree.leaves(frozen)) == cfg.num_params
    ids, mask = _batch(cfg.vocab_size)
    np.testing.assert_array_equal(
        models.compute_logits(model, ids, mask), models.compute_logits(base, ids, mask)
    )
    # Moved adapters change the logits by x A B · alpha / r; switched off they are the base.
    moved = _moved(model)
    assert not np.allclose(
        models.compute_logits(moved, ids, mask), models.compute_logits(base, ids, mask)
    )
    graphdef, trained, frozen = models.split_trained(moved)
    off = nnx.merge(graphdef, lora.adapters_off(trained), frozen)
    np.testing.assert_array_equal(
        models.compute_logits(off, ids, mask), models.compute_logits(base, ids, mask)
    )


def _is_var(x):
    return isinstance(x, nnx.Variable)


def test_reference_with_adapters_off_decodes_the_base_greedy_output(tiny_model_dir):
    base = _load(tiny_model_dir)
    graphdef, trained, frozen = models.split_trained(_moved(_load(tiny_model_dir, lora_rank=RANK)))
    policy = nnx.merge(graphdef, trained, frozen)
    reference = nnx.merge(graphdef, lora.adapters_off(trained), frozen)
    ids, mask = _batch(base.config.vocab_size)
    kw = dict(temperature=0.0, max_new_tokens=6, eos_token_id=None, rng=jax.random.key(0))
    want = sampling.generate(base, ids, mask, **kw)
    got = sampling.generate(reference, ids, mask, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6)
    assert not np.array_equal(sampling.generate(policy, ids, mask, **kw).tokens, want.tokens)


def test_merged_export_loads_in_transformers_and_peft_files_hold_the_adapters(
    tiny_model_dir, tmp_path
):
    model = _moved(_load(tiny_model_dir, lora_rank=RANK, lora_alpha=2.0 * RANK))
    ids, mask = _batch(model.config.vocab_size)
    ours = np.asarray(models.compute_logits(model, ids, mask))
    models.save_hf_checkpoint(model, tmp_path / "merged")
    real = mask.astype(bool)  # logits at padding positions are meaningless
    np.testing.assert_allclose(
        hf_fixtures.torch_logits(tmp_path / "merged", ids, mask)[real],
        ours[real],
        atol=2e-5,
        rtol=1e-5,
    )
    models.save_peft_adapters(model, tmp_path / "adapter", tiny_model_dir)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == 2.0 * RANK
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # PEFT's W + B A · alpha / r over the base checkpoint gives the merged weights.
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        pre = f"model.layers.1.{name}"
        a = tensors[f"base_model.model.{pre}.lora_A.weight"]
        b = tensors[f"base_model.model.{pre}.lora_B.weight"]
        assert a.shape[0] == RANK and b.shape[1] == RANK
        np.testing.assert_allclose(
            base[f"{pre}.weight"] + b @ a * 2.0, merged[f"{pre}.weight"], atol=1e-6
        )


def test_qlora_nf4_base_is_within_the_stated_tolerance_of_the_float_base():
    model_dir = quickstart_dir()  # a trained model: its logits mean something
    base = _load(model_dir)
    model = _load(model_dir, lora_rank=RANK, lora_base_qtype="nf4")
    attn = nnx.state(model, nnx.Param)["layers"]["attn"]
    assert attn["q_kernel"].value.dtype == jnp.uint4
    assert attn["q_kernel_scale"].value.shape[1] == model.config.hidden_size // 64
    rng = np.random.default_rng(0)
    ids, mask = hf_fixtures.left_padded_batch(rng, [30, 20, 12, 30], 30, base.config.vocab_size)
    real = mask.astype(bool)
    want = np.asarray(models.compute_logits(base, ids, mask))[real]
    got = np.asarray(models.compute_logits(model, ids, mask))[real]
    kl = np.mean(
        np.sum(jax.nn.softmax(want) * (jax.nn.log_softmax(want) - jax.nn.log_softmax(got)), -1)
    )
    assert 0 < kl < lora.NF4_MAX_KL
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= lora.NF4_MIN_TOP1_AGREEMENT
    # Merged, the codes are dequantized: the same forward as the quantized model.
    merged = np.asarray(models.compute_logits(models.merged(model), ids, mask))[real]
    np.testing.assert_allclose(merged, got, atol=1e-4, rtol=1e-4)


def test_a_lora_run_trains_only_adapters_and_resumes_bit_identically_after_kill9(
    tiny_model_dir, tmp_path
):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.helpers import tiny_config, train_process, trained_steps, wait_for\n\n\n"
        "def get_config():\n"
        f"    c = tiny_config({str(tiny_model_dir)!r}, steps=4, checkpoint_every=2, "
        "export_hf=True)\n"
        f"    c.model.lora_rank = {RANK}\n"
        "    c.optim.learning_rate = 1e-2\n"
        "    return c\n"
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = train_process(config_file, straight)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    # SIGKILL mid-run, past the step-2 checkpoint; the rerun resumes from it.
    proc = train_process(config_file, resumed)
    wait_for(proc, lambda: max(trained_steps(resumed), default=0) >= 3)
    proc.kill()
    proc.wait()
    proc = train_process(config_file, resumed)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output

    # Checkpoints hold the adapters and AdamW's state of them, nothing of the base.
    meta = checkpoint.Checkpointer(resumed / "checkpoints").read_meta()
    saved = [k for k in meta[checkpoint.FINGERPRINT] if "/layers/" in k or "embed" in k]
    assert saved and all("_lora_" in k for k in saved), saved
    assert not any(k.startswith("ref_params") for k in meta[checkpoint.FINGERPRINT])

    hf_fixtures.register_test_rewards()
    (a, _), (b, _) = (trainer.load_trained_model(w) for w in (straight, resumed))
    for one in (a, b):  # the adapters moved from their B = 0 start
        b_leaves = nnx.state(one, nnx.LoRAParam)["layers"]["mlp"]["up_kernel_lora_b"].value
        assert np.any(np.asarray(b_leaves))
    for x, y in zip(
        jax.tree.leaves(nnx.state(a, nnx.LoRAParam)),
        jax.tree.leaves(nnx.state(b, nnx.LoRAParam)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    rows = [r["loss"] for r in metrics.read_metrics(resumed) if "loss" in r]
    assert rows == [r["loss"] for r in metrics.read_metrics(straight) if "loss" in r]

    # The export: merged weights transformers loads (logits of our LoRA model), and PEFT files.
    ids, mask = _batch(a.config.vocab_size)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        hf_fixtures.torch_logits(straight / "hf", ids, mask)[real],
        np.asarray(models.compute_logits(a, ids, mask))[real],
        atol=2e-5,
        rtol=1e-5,
    )
    assert (straight / "adapter" / "adapter_model.safetensors").is_file()


def _lora_rl_steps(mesh, steps=2, length_buckets=1):
    """Two one-program AAPO steps (policy + base-as-reference rollout, token reward) of a LoRA
    model: (metrics per step, adapters, base before, base after)."""
    from tests import test_train_step as ts

    optim = dataclasses.replace(ts.LINEAR_ADAM, length_buckets=length_buckets)

    rl_cfg = configs.RLConfig(group_size=ts.G)
    model = models.Transformer(ts.TINY.replace(lora_rank=RANK), rngs=nnx.Rngs(0))
    graphdef, adapters, base = models.split_trained(_moved(model))
    before = [np.asarray(x) for x in jax.tree.leaves(base)]
    tx = make_optimizer(ts.LINEAR_ADAM)
    state, _ = train_step.init_train_state(adapters, tx, rl_cfg, seed=0, mesh=mesh, base=base)
    assert state.ref_params is None  # the reference is the base with the adapters off
    prompts = ts._prompts(8)
    if mesh is not None:
        prompts = sharding.shard_batch(prompts, mesh)
    step = ts._rl_step(rl_cfg, optim, graphdef, tx, mesh=mesh)
    history = []
    for _ in range(steps):
        state, m = step(state, prompts)
        history.append({k: float(v) for k, v in m.items()})
    after = [np.asarray(x) for x in jax.tree.leaves(state.base)]
    return history, [np.asarray(x) for x in jax.tree.leaves(state.params)], before, after


def test_lora_rl_steps_move_only_adapters_and_an_8_device_mesh_matches_one():
    """On 8 devices the update also sorts its rows by length into sub-batches (one length
    bucket per completion length): the same steps as one device's padded update."""
    m1, p1, before, after = _lora_rl_steps(None)
    for x, y in zip(before, after, strict=True):  # the frozen base, bit for bit
        np.testing.assert_array_equal(x, y)
    assert abs(m1[0]["loss"]) > 1e-4 and m1[0]["reward_std"] > 0.1
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    m8, p8, _, after8 = _lora_rl_steps(mesh, length_buckets=5)
    for x, y in zip(before, after8, strict=True):
        np.testing.assert_array_equal(x, y)
    for step_1, step_8 in zip(m1, m8, strict=True):
        for name in step_1:
            # Tolerance: reductions are ordered differently across 8 devices (fp32).
            assert step_8[name] == pytest.approx(step_1[name], rel=1e-4, abs=1e-6), name
    for a, b in zip(p1, p8, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_the_decode_layout_places_a_shared_lora_base_once():
    from tests import test_train_step as ts

    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    model = models.Transformer(ts.TINY.replace(lora_rank=RANK), rngs=nnx.Rngs(0))
    graphdef, adapters, base = models.split_trained(model)
    config = sampling.SamplingConfig(sampling.SamplerSettings(), decode_weights="tensor")

    def decoded(adapters, base):
        policy = nnx.merge(graphdef, adapters, base)
        reference = nnx.merge(graphdef, lora.adapters_off(adapters), base)
        return sampling.decode_models((policy, reference), config, mesh, prompts=1)

    eqns = jax.make_jaxpr(decoded)(adapters, base).eqns
    placed = sum(e.primitive.name == "sharding_constraint" for e in eqns)
    # Every base weight and adapter A once (fp32 here: no cast makes a new array), and each
    # model's B (the reference's are zeros): 36, where a copy per model would be 58.
    n_adapters = len(jax.tree.leaves(adapters))
    assert placed == len(jax.tree.leaves(base)) + n_adapters + n_adapters // 2


def test_the_planner_counts_a_lora_base_once_and_no_reference(tmp_path):
    from aapo_jax import aot
    from tests.helpers import tiny_plan_config
    from tests.test_plan import write_model

    c = tiny_plan_config(write_model(tmp_path / "model"))
    c.model.lora_rank = RANK
    plan = aot.abstract_inputs(aot.plan_config(c), jax.devices())
    b = aot.state_bytes(plan)
    mc = plan.model_config
    per_layer = sum(  # A [in, r] + B [r, out] of every projection, fp32
        RANK * (i + o)
        for i, o in (
            (mc.hidden_size, mc.num_heads * mc.head_dim),
            (mc.hidden_size, mc.num_kv_heads * mc.head_dim),
            (mc.hidden_size, mc.num_kv_heads * mc.head_dim),
            (mc.num_heads * mc.head_dim, mc.hidden_size),
            (mc.hidden_size, mc.intermediate_size),
            (mc.hidden_size, mc.intermediate_size),
            (mc.intermediate_size, mc.hidden_size),
        )
    )
    leaves = jax.tree.leaves(plan.state.params)
    assert sum(math.prod(x.shape) * 4 for x in leaves) == per_layer * mc.num_layers * 4
    # Split like their kernels: an A whose kernel's input is the embedding over fsdp.
    a = plan.state.params["layers"]["mlp"]["up_kernel_lora_a"].value
    assert len(a.sharding.device_set) == 8 and a.sharding.spec[1] == "fsdp"
    assert b["params"] < per_layer * mc.num_layers * 4
    devices = jax.device_count()
    assert 2 * b["params"] <= b["optimizer"] <= 2 * b["params"] + 64  # moments of adapters
    assert b["reference"] == 0  # the base with the adapters off
    # The whole model's weights once, in the compute dtype (fp32 in this config).
    assert b["frozen_base"] * devices == pytest.approx(mc.num_params * 4, rel=0.05)
    # No weight gradients for the base: a forward and a backward of activations only.
    c.model.lora_rank = 0
    full = aot.abstract_inputs(aot.plan_config(c), jax.devices())
    lora_flops, full_flops = aot.model_flops(plan), aot.model_flops(full)
    assert lora_flops["rollout"] == full_flops["rollout"]
    assert lora_flops["update"] == pytest.approx(full_flops["update"] * 2 / 3)


@pytest.mark.parametrize(
    "module", ["r1_distill_1p5b_openrs", "qwen25_math_7b_simplerl", "llama32_simplerl"]
)
def test_paper_configs_take_lora_and_nf4_arguments(module):
    import importlib

    get_config = importlib.import_module(f"configs.{module}").get_config
    full = get_config()
    c = get_config("lora=64,base=nf4")
    for one in (c, full):  # validation only: nothing is read
        one.model.path = "/ckpt"
        one.data.path = "/data/train." + ("jsonl" if one.data.source == "jsonl" else "parquet")
    config = configs.experiment_config(c)
    assert config.model.lora_rank == 64 and config.model.lora_alpha == 64.0
    assert config.model.lora_base_qtype == "nf4" and config.name.endswith("-lora64-nf4")
    assert config.optim.learning_rate == pytest.approx(10 * full.optim.learning_rate)
    rows = config.sampling.max_prompt_length + config.sampling.max_new_tokens
    assert config.optim.micro_batch_tokens == 2 * rows and config.sampling.kv_budget_gib == 4.5
    # Beside the base on one chip: full remat, and with nf4 one padded micro-batch at a time.
    assert config.model.remat == "full" and config.optim.length_buckets == 1
    assert full.optim.length_buckets == 8 and full.model.remat == "dots"
    # The 1.5B's 24 rows split 2 ways beside a 4-way tensor axis; one chip has no such axis.
    wide = 4 if module == "r1_distill_1p5b_openrs" else 1
    assert full.mesh.tensor == wide and c.mesh.tensor == get_config("lora=64").mesh.tensor == 1
    assert configs.experiment_config(full).model.lora_rank == 0
    plain = get_config("lora=64")
    assert plain.optim.micro_batch_tokens == 4 * rows and plain.sampling.kv_budget_gib == 0
    with pytest.raises(ValueError, match="lora=RANK"):
        get_config("base=nf4")


def test_the_ideal_decode_read_counts_a_lora_base_once_and_both_caches(tmp_path):
    from aapo_jax import aot
    from tests.helpers import tiny_plan_config
    from tests.test_plan import write_model

    c = tiny_plan_config(write_model(tmp_path / "model"))
    full = aot.abstract_inputs(aot.plan_config(c), jax.devices())
    c.model.lora_rank = RANK
    plan = aot.abstract_inputs(aot.plan_config(c), jax.devices())
    # One more filled slot per row costs the same: the policy's and the reference's caches.
    slot = aot.ideal_decode_bytes(plan, 1) - aot.ideal_decode_bytes(plan, 0)
    assert slot == pytest.approx(aot.ideal_decode_bytes(full, 1) - aot.ideal_decode_bytes(full, 0))
    # At no fill: two copies of the full model's weights (W), or one base plus the adapters
    # (A); both with the two models' prompt caches. So LoRA reads A − W more (fp32 here).
    size = jax.device_count()
    w = sum(x.size for x in jax.tree.leaves(full.state.params)) * 4 / size
    a = sum(x.size for x in jax.tree.leaves(plan.state.params)) * 4 / size
    got = aot.ideal_decode_bytes(plan, 0) - aot.ideal_decode_bytes(full, 0)
    assert got == pytest.approx(a - w, rel=1e-6)
