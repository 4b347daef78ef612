"""A long prompt shared by G samples on CPU: the decode loop reading each prompt's keys and
values once per group (`sampling.shared_prompt`, the default) against a copy in every
row's cache (`shared_prompt=False`), side by side in one run.

    python -m experiments.bench_shared_prompt            # medium model, 4 prompts × G=8, P=1024
    python -m experiments.bench_shared_prompt --quick    # tiny model, P=512: a minute
    python -m experiments.bench_shared_prompt --json     # one JSON object on stdout

Both paths decode the same random prompts (every prompt P tokens long) with the same
keys and no EOS, so every row generates the whole budget; the two are timed in
alternation and `ratio` = shared tokens/s ÷ repeated tokens/s (> 1: the shared prompt is
faster). `tokens_equal_rows` is the fraction of rows whose sampled tokens agree (the two
differ only in fp32 summation order). `cache_mib` is each path's decode cache per model,
from the loop's initial state. The prompt rows are split over one JAX CPU device per core
(`--devices`), each decoding its own prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

from experiments import bench_common


def _cache_bytes(model, ids, mask, config) -> int:
    import jax

    from aapo_jax import aot, sampling

    def start(ids, mask):
        return sampling.start_decode([model], ids, mask, [jax.random.key(0)], config)[0]

    return aot.tree_bytes_per_device(jax.eval_shape(start, ids, mask).caches)


def run(
    size: str, prompts: int, group: int, prompt_len: int, new_tokens: int, reps: int, devices: int
) -> dict:
    """Time both paths `reps` times each, alternating, after one compiling call each."""
    mesh = bench_common.data_mesh(devices)
    import jax
    from flax import nnx

    from aapo_jax import models, sampling, sharding

    config = bench_common.model_config(size, max_position_embeddings=prompt_len + new_tokens)
    model = models.Transformer(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, config.vocab_size, (prompts, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    settings = sampling.SamplerSettings(max_new_tokens=new_tokens, temperature=1.0)
    base = sampling.SamplingConfig(settings, num_samples=group)
    configs = {
        "shared": base,
        "repeated": dataclasses.replace(
            base, settings=dataclasses.replace(settings, shared_prompt=False)
        ),
    }
    placed = sharding.shard_model(model, mesh) if mesh is not None else model

    def generate(name: str, seed: int):
        (out,) = sampling.generate_many(
            [placed], ids, mask, rngs=[jax.random.key(seed)], config=configs[name], mesh=mesh
        )
        return np.asarray(jax.block_until_ready(out).tokens)

    first_s, tokens = {}, {}
    for name in configs:
        start = time.perf_counter()
        tokens[name] = generate(name, 0)
        first_s[name] = time.perf_counter() - start
    seconds = {name: [] for name in configs}
    for rep in range(1, reps + 1):
        for name in configs:
            start = time.perf_counter()
            generate(name, rep)
            seconds[name].append(time.perf_counter() - start)
    rows = prompts * group
    rate = {name: rows * new_tokens / statistics.median(s) for name, s in seconds.items()}
    return dict(
        size=size,
        params=config.num_params,
        prompts=prompts,
        group=group,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        devices=1 if mesh is None else mesh.devices.size,
        shared_tokens_per_s=rate["shared"],
        repeated_tokens_per_s=rate["repeated"],
        ratio=rate["shared"] / rate["repeated"],
        # Best rep against best rep: on a shared CPU, contention only ever adds time.
        ratio_best=min(seconds["repeated"]) / min(seconds["shared"]),
        tokens_equal_rows=float(np.mean(np.all(tokens["shared"] == tokens["repeated"], axis=1))),
        cache_mib={name: _cache_bytes(model, ids, mask, c) / 2**20 for name, c in configs.items()},
        first_call_s=first_s,
        seconds_all=seconds,
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, P=512, T=32")
    p.add_argument("--size", choices=sorted(bench_common.MODEL_SHAPES), default=None)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8, help="samples per prompt G")
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--new_tokens", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--devices", type=int, default=os.cpu_count(), help="JAX CPU devices")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    size = args.size or ("tiny" if args.quick else "medium")
    prompt_len = args.prompt_len or (512 if args.quick else 1024)
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    for name in ("prompts", "group", "prompt_len", "new_tokens", "reps", "devices"):
        value = {"prompt_len": prompt_len, "new_tokens": new_tokens}.get(name, getattr(args, name))
        if value < 1:
            p.error(f"--{name}={value}: expected ≥ 1")
    result = run(size, args.prompts, args.group, prompt_len, new_tokens, args.reps, args.devices)
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        print(
            f"{size} ({result['params'] / 1e6:.1f}M params), "
            f"{args.prompts} prompts × G={args.group}, P={prompt_len}, T={new_tokens}, "
            f"{result['devices']} device(s)\n"
            f"  shared prompt   {result['shared_tokens_per_s']:9.1f} tok/s  "
            f"cache {result['cache_mib']['shared']:8.1f} MiB\n"
            f"  repeated prompt {result['repeated_tokens_per_s']:9.1f} tok/s  "
            f"cache {result['cache_mib']['repeated']:8.1f} MiB\n"
            f"  ratio {result['ratio']:.2f} (best reps {result['ratio_best']:.2f}), "
            f"rows with equal tokens {result['tokens_equal_rows']:.2f}"
        )
    return result


if __name__ == "__main__":
    main()
