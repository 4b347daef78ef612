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


def build_steps(size: str, mesh=None, scan_unroll: int = -1):
    """Jitted AAPO and GRPO steps, their states and the prompt batch for one model size.

    With a `mesh`, states are replicated on it and the prompt rows split over it.
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
    out = {}
    for name, hparams in ALGORITHMS.items():
        rl_cfg = configs.RLConfig(
            algorithm=name, hparams=tuple(hparams.items()), group_size=GROUP, kl_metric=False
        )
        tx = make_optimizer(optim)
        graphdef, params = nnx.split(models.Transformer(config, rngs=nnx.Rngs(0)))
        # With a mesh the state is placed on it (replicated: a data-parallel mesh).
        state, shardings = train_step.init_train_state(params, tx, rl_cfg, seed=0, mesh=mesh)
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
        # Inputs carry their shardings; the state keeps its own.
        step = jax.jit(fn, out_shardings=(shardings, None, None), donate_argnums=0)
        out[name] = dict(step=step, state=state, rl=rl_cfg)
    if mesh is not None:
        prompts = sharding.shard_batch(prompts, mesh)
    return config, out, prompts


def _alternate(steps: dict, prompts, reps: int) -> None:
    """Warm up every step (`compile_s`), then run them in turn `reps` times (`times`)."""
    import jax

    for entry in steps.values():
        start = time.perf_counter()
        entry["state"], metrics, _ = entry["step"](entry["state"], prompts)
        jax.block_until_ready(metrics)
        entry["compile_s"] = time.perf_counter() - start
        entry["times"] = []
    for _ in range(reps):
        for entry in steps.values():
            start = time.perf_counter()
            entry["state"], metrics, _ = entry["step"](entry["state"], prompts)
            jax.block_until_ready(metrics)
            entry["times"].append(time.perf_counter() - start)


def time_size(size: str, reps: int, mesh=None, scan_unroll: int = -1) -> dict:
    """Warm up both steps, then alternate them `reps` times; median seconds per step.

    With a `mesh`, the same two steps on one device are timed next, the same way
    (`one_device_step_s`): after the mesh's, not interleaved with them, because
    switching between the two sets of buffers and programs slows both.
    """
    config, steps, prompts = build_steps(size, mesh, scan_unroll)
    _alternate(steps, prompts, reps)
    if mesh is not None:
        _, alone, alone_prompts = build_steps(size, None, scan_unroll)
        _alternate(alone, alone_prompts, reps)
    result = {"size": size, "params": config.num_params}
    for name, entry in steps.items():
        seconds = statistics.median(entry["times"])
        generated = PROMPTS * GROUP * NEW_TOKENS * (2 if entry["rl"].samples_reference else 1)
        result[name] = {
            "step_s": seconds,
            "compile_s": entry["compile_s"],
            "generated_tokens_per_s": generated / seconds,
            "gflops": step_flops(config, entry["rl"]) / seconds / 1e9,
        }
        if mesh is not None:
            result[name]["one_device_step_s"] = statistics.median(alone[name]["times"])
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
    args = parser.parse_args(argv)

    mesh = bench_common.data_mesh(args.devices)  # before any JAX work
    import jax

    calibration = bench_common.matmul_calibration([(PROMPTS * GROUP, 128), (PROMPTS * GROUP, 512)])
    sizes = [time_size("tiny", args.reps, mesh, args.scan_unroll)]
    if not args.skip_medium:
        sizes.append(time_size("medium", max(3, args.reps // 5), mesh, args.scan_unroll))
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
    if result["devices"] > 1:
        print("1dev ms: the same step on one device, timed after the others in this run.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
