"""Seconds per jitted RL step (AAPO vs GRPO) on the reference workload, and achieved GFLOP/s.

    python -m experiments.bench_rl_step            # tiny reference workload + medium variant
    python -m experiments.bench_rl_step --json     # one JSON object (aapo_step_s, grpo_step_s, …)

Reference workload: 8 prompts × G=4, prompt 16 tokens, completion 32 (EOS off,
so every row decodes the full budget), temperature 1.0, the tiny Qwen2 shape
(2 layers, width 128, 4 heads / 2 kv heads, MLP 256, vocab 512), a JAX-native
reward. One AAPO step = policy sampling + reference sampling + reward +
advantage + update; one GRPO step = policy sampling + reference log-probs for
the KL penalty (β = 0.04) + update. Each is ONE jitted program; the two are
timed alternately after warm-up and the medians reported. FLOPs count the
matmuls of prefill, decode (attention over the fixed cache), the update's
forward + backward (3× forward; each prompt runs once per group) and, for
GRPO, the reference forward.

One JAX CPU device per core (`--devices`, default all): the prompts are split
over a data-parallel mesh, each device samples and differentiates its own rows
and only gradients and loss sums cross devices (`rl_step.make_token_rl_step(..., mesh=)`).
XLA:CPU runs each small op on one core, so one device would leave the other idle;
the same steps on one device are timed after them in the same run (`1dev ms`).

`--scan_unroll` is the model's `scan_unroll`: -1 (default) unrolls the forward's layer scan,
what the quickstart's tiny model runs with on CPU; 1 times the rolled scan of the
paper configs, whose per-layer weight slices XLA:CPU copies before each matmul.

`--lora_rank` (default 16; 0 skips it) times the AAPO step of the same model with LoRA
adapters on its attention and MLP projections (`ModelConfig.lora_rank`), in the same
round of alternation as the two full fine-tuning steps (`lora.step_s` against
`aapo.step_s`). The step's sampling is not cheaper under LoRA (the forward still runs
every base weight, plus the adapters), so the update alone is timed too: the full and the
LoRA `train_step.make_train_step` alternated on one fixed scored rollout (`lora.update_s`
against `lora.full_update_s`). The LoRA model's frozen base holds the full model's
weights and its B adapters start at zero, so both start as the same policy; with EOS off
every row decodes the full budget, so both steps generate the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from experiments import bench_common

PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 8, 4, 16, 32
# Algorithms of `aapo_jax.algorithms.ALGORITHMS` and the hyper-parameters set for this
# workload (GRPO with the KL penalty, so its step runs the reference forward).
ALGORITHMS = {"aapo": {}, "grpo": {"kl_beta": 0.04}}
# The LoRA variant of the AAPO step, timed beside the full steps.
LORA = "aapo_lora"


def step_flops(config, rl) -> float:
    """Matmul FLOPs of one RL step of the reference workload."""
    body, head = bench_common.body_and_head_params(config)
    cache = PROMPT_LEN + NEW_TOKENS
    rows = PROMPTS * GROUP
    attn = bench_common.attention_flops_per_token(config, cache)
    # Sampling: prefill once per prompt (head on the last token), decode per row.
    prefill = PROMPTS * (PROMPT_LEN * (2 * body + attn) + 2 * head)
    decode = rows * (NEW_TOKENS - 1) * (2 * (body + head) + attn)
    samplers = 2 if rl.samples_reference else 1
    # The update's forward runs each prompt once into a P+T-slot cache that its G
    # completions continue from; the head runs on the T predicting positions per row.
    forward = PROMPTS * PROMPT_LEN * (2 * body + attn) + rows * NEW_TOKENS * (
        2 * (body + head) + attn
    )
    update = 3 * forward
    reference_forward = forward if rl.needs_reference_logprobs else 0
    return float(samplers * (prefill + decode) + update + reference_forward)


def lora_model(config, rank: int):
    """The benchmark model with rank-`rank` adapters whose frozen base holds the full
    model's weights (both from `nnx.Rngs(0)`): with B = 0 it is the same policy."""
    import jax
    from flax import nnx

    from aapo_jax import models

    full = models.Transformer(config, rngs=nnx.Rngs(0))
    lora_config = config.replace(lora_rank=rank)
    model = models.Transformer(lora_config, rngs=nnx.Rngs(0))
    # The adapters' draws shift the rng stream, so the base is copied, not re-drawn; it is
    # stored in the compute dtype under LoRA.
    dtype = lora_config.base_weight_dtype
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(full, nnx.Param)))
    return model


def build_steps(size: str, mesh=None, scan_unroll: int = -1, lora_rank: int = 0):
    """Jitted AAPO and GRPO steps, their states and the prompt batch for one model size.

    Each entry holds the one-program RL step (`step`) and its update alone (`update`,
    `train_step.make_train_step` on a scored rollout), both jitted over the same state.
    With `lora_rank` > 0 a LoRA AAPO entry (`LORA`) of the same model is added. With a
    `mesh`, states are replicated on it and the prompt rows split over it.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from aapo_jax import configs, models, rl_step, sharding, train_step
    from aapo_jax.optim import make_optimizer
    from aapo_jax.rewards import tokens
    from aapo_jax.sampling import SamplerSettings
    from aapo_jax.types import PromptBatch

    config = bench_common.model_config(size, scan_unroll=scan_unroll)
    optim = configs.OptimConfig(learning_rate=1e-5, total_steps=1000)
    settings = SamplerSettings(max_new_tokens=NEW_TOKENS, temperature=1.0)
    ids = jax.random.randint(jax.random.key(1), (PROMPTS, PROMPT_LEN), 3, config.vocab_size)
    prompts = PromptBatch(
        ids=ids,
        mask=jnp.ones_like(ids),
        targets=jax.random.randint(jax.random.key(2), (PROMPTS, 4), 3, config.vocab_size),
        target_len=jnp.full((PROMPTS,), 4, jnp.int32),
    )

    def entry(name: str, model) -> dict:
        rl_cfg = configs.RLConfig(
            algorithm=name,
            hparams=tuple(ALGORITHMS[name].items()),
            group_size=GROUP,
            kl_metric=False,
        )
        tx = make_optimizer(optim)
        # Without LoRA every weight trains (base None); with it the adapters do.
        graphdef, params, base = models.split_trained(model)
        trained = sum(x.size for x in jax.tree.leaves(params))
        # With a mesh the state is placed on it (replicated: a data-parallel mesh).
        state, shardings = train_step.init_train_state(
            params, tx, rl_cfg, seed=0, mesh=mesh, base=base
        )
        fn = rl_step.make_token_rl_step(
            rl_cfg,
            optim,
            settings,
            graphdef,
            tx,
            tokens.prefix_match,
            eos_token_id=None,
            pad_token_id=0,
            mesh=mesh,
        )
        update = train_step.make_train_step(rl_cfg, optim, graphdef, tx, mesh=mesh)
        # Inputs carry their shardings; the state keeps its own.
        return dict(
            step=jax.jit(fn, out_shardings=(shardings, None, None), donate_argnums=0),
            update=jax.jit(update, out_shardings=(shardings, None), donate_argnums=0),
            state=state,
            rl=rl_cfg,
            trained_params=trained,
        )

    out = {name: entry(name, models.Transformer(config, rngs=nnx.Rngs(0))) for name in ALGORITHMS}
    if lora_rank:
        out[LORA] = entry("aapo", lora_model(config, lora_rank))
    if mesh is not None:
        prompts = sharding.shard_batch(prompts, mesh)
    return config, out, prompts


def _alternate(steps: dict, inputs, reps: int, fn: str = "step") -> None:
    """Warm up every entry's `fn` on `inputs`, then run them in turn `reps` times.

    Each entry gets `{fn}_compile_s` (the warm-up), `{fn}_times` and `{fn}_out` (what its
    last call returned besides the state: the metrics, and for a step its rollout).
    """
    import jax

    def call(entry) -> float:
        start = time.perf_counter()
        entry["state"], *entry[f"{fn}_out"] = entry[fn](entry["state"], inputs)
        jax.block_until_ready(entry[f"{fn}_out"][0])  # the metrics
        return time.perf_counter() - start

    for entry in steps.values():
        entry[f"{fn}_compile_s"] = call(entry)
        entry[f"{fn}_times"] = []
    for _ in range(reps):
        for entry in steps.values():
            entry[f"{fn}_times"].append(call(entry))


def time_lora(steps: dict, reps: int, rank: int) -> dict:
    """The LoRA AAPO step against the full one, and their updates alone alternated `reps`
    times on the full step's last scored rollout (the same tokens and rewards for both)."""
    full, lora = steps["aapo"], steps[LORA]
    rollout = full["step_out"][1]
    pair = {"aapo": full, LORA: lora}
    _alternate(pair, rollout, reps, fn="update")
    step_s = statistics.median(lora["step_times"])
    full_step_s = statistics.median(full["step_times"])
    update_s = statistics.median(lora["update_times"])
    full_update_s = statistics.median(full["update_times"])
    return {
        "rank": rank,
        "trained_params": lora["trained_params"],
        "full_trained_params": full["trained_params"],
        "step_s": step_s,
        "full_step_s": full_step_s,
        "step_ratio": step_s / full_step_s,
        "compile_s": lora["step_compile_s"],
        "update_s": update_s,
        "full_update_s": full_update_s,
        "update_ratio": update_s / full_update_s,
    }


def time_size(size: str, reps: int, mesh=None, scan_unroll: int = -1, lora_rank: int = 0) -> dict:
    """Warm up both steps, then alternate them `reps` times; median seconds per step.

    With `lora_rank` > 0 the LoRA AAPO step takes its turn in the same alternation, and
    then the full and LoRA updates alone are alternated (`time_lora`, under "lora").
    With a `mesh`, the same two steps on one device are timed next, the same way
    (`one_device_step_s`): after the mesh's, not interleaved with them, because
    switching between the two sets of buffers and programs slows both.
    """
    config, steps, prompts = build_steps(size, mesh, scan_unroll, lora_rank)
    _alternate(steps, prompts, reps)
    lora = time_lora(steps, reps, lora_rank) if lora_rank else None
    if mesh is not None:
        _, alone, alone_prompts = build_steps(size, None, scan_unroll)
        _alternate(alone, alone_prompts, reps)
    result = {"size": size, "params": config.num_params}
    for name in ALGORITHMS:
        entry = steps[name]
        seconds = statistics.median(entry["step_times"])
        generated = PROMPTS * GROUP * NEW_TOKENS * (2 if entry["rl"].samples_reference else 1)
        result[name] = {
            "step_s": seconds,
            "compile_s": entry["step_compile_s"],
            "generated_tokens_per_s": generated / seconds,
            "gflops": step_flops(config, entry["rl"]) / seconds / 1e9,
        }
        if mesh is not None:
            result[name]["one_device_step_s"] = statistics.median(alone[name]["step_times"])
    if lora is not None:
        result["lora"] = lora
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--reps", type=int, default=15, help="timed steps per algorithm (tiny)")
    parser.add_argument("--skip_medium", action="store_true", help="only the tiny workload")
    parser.add_argument(
        "--devices",
        type=int,
        default=os.cpu_count(),
        help="JAX CPU devices to split the rows over (default: one per core; 1 = one device)",
    )
    parser.add_argument(
        "--scan_unroll",
        type=int,
        default=-1,
        help="layers per layer-scan iteration (-1: all, the tiny-CPU setting; 1: rolled)",
    )
    parser.add_argument(
        "--lora_rank",
        type=int,
        default=16,
        help="LoRA rank of the AAPO step timed beside the full one (0: skip it)",
    )
    args = parser.parse_args(argv)

    mesh = bench_common.data_mesh(args.devices)  # before any JAX work
    import jax

    calibration = bench_common.matmul_calibration([(PROMPTS * GROUP, 128), (PROMPTS * GROUP, 512)])
    sizes = [time_size("tiny", args.reps, mesh, args.scan_unroll, args.lora_rank)]
    if not args.skip_medium:
        medium_reps = max(3, args.reps // 5)
        sizes.append(time_size("medium", medium_reps, mesh, args.scan_unroll, args.lora_rank))
    square = calibration["square_1024"]
    result = {
        "aapo_step_s": sizes[0]["aapo"]["step_s"],
        "grpo_step_s": sizes[0]["grpo"]["step_s"],
        "calibration_gflops": calibration,
        "sizes": sizes,
        "workload": dict(
            prompts=PROMPTS, group=GROUP, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS
        ),
        "devices": 1 if mesh is None else int(mesh.devices.size),
        "backend": jax.default_backend(),
        "scan_unroll": args.scan_unroll,
    }
    if not args.skip_medium:
        result["medium_aapo_fraction_of_calibration"] = sizes[1]["aapo"]["gflops"] / square
    if args.lora_rank:
        result["lora"] = sizes[0]["lora"]  # the tiny workload's, as aapo_step_s
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"calibration: {', '.join(f'{k}={v:.1f}' for k, v in calibration.items())} GFLOP/s")
    print(f"devices: {result['devices']} ({result['backend']}); the prompts' rows split over them")
    print(
        f"{'size':8} {'params':>11} {'algo':5} {'step ms':>8} {'gen tok/s':>10} "
        f"{'GFLOP/s':>8} {'% of 1024³':>10} {'compile s':>9} {'1dev ms':>8}"
    )
    for entry in sizes:
        for name in ALGORITHMS:
            r = entry[name]
            alone = 1000 * r.get("one_device_step_s", r["step_s"])
            print(
                f"{entry['size']:8} {entry['params']:>11,} {name:5} {1000 * r['step_s']:8.1f} "
                f"{r['generated_tokens_per_s']:10.0f} {r['gflops']:8.1f} "
                f"{100 * r['gflops'] / square:9.0f}% {r['compile_s']:9.1f} {alone:8.1f}"
            )
    if args.lora_rank:
        print(
            f"LoRA rank {args.lora_rank} against full fine-tuning, AAPO ({result['devices']} "
            "devices; update: train_step alone on one fixed scored rollout)"
        )
        print(
            f"{'size':8} {'trained':>11} {'of':>11} {'full ms':>8} {'LoRA ms':>8} {'ratio':>6} "
            f"{'full upd':>8} {'LoRA upd':>8} {'ratio':>6}"
        )
        for entry in sizes:
            r = entry["lora"]
            print(
                f"{entry['size']:8} {r['trained_params']:>11,} {r['full_trained_params']:>11,} "
                f"{1000 * r['full_step_s']:8.1f} {1000 * r['step_s']:8.1f} "
                f"{r['step_ratio']:6.2f} {1000 * r['full_update_s']:8.1f} "
                f"{1000 * r['update_s']:8.1f} {r['update_ratio']:6.2f}"
            )
    if result["devices"] > 1:
        print("1dev ms: the same step on one device, timed after the others in this run.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
