"""Decode tokens/s and the fraction of memory bandwidth it reaches, for a ~1B bf16 model.

    python -m experiments.bench_decode_bandwidth                  # 1b shape, batch 1 and 64
    python -m experiments.bench_decode_bandwidth --shape=medium   # a CPU-sized run
    python -m experiments.bench_decode_bandwidth --json           # one JSON object
    python -m experiments.bench_decode_bandwidth --decode_attention=xla,pallas_gpu  # on a GPU
    python -m experiments.bench_decode_bandwidth --shape=1.5b --new_tokens=1024  # open-rs's model

Meant for an accelerator: a random model of the Llama-3.2-1B shape (1.24B
parameters, bf16 weights and activations) decodes greedily, EOS off, from
`--prompt_len`-token prompts. One step of batch-B decode reads every weight
once (the tied embedding as the LM head) plus the keys and values of the
fixed-size cache (P + T slots per row and layer), so

    bandwidth = (weight bytes + B · cache bytes per row) / seconds per decode step

where the per-step time is (t(P, T) − t(P, 1)) / (T − 1): the difference of a
full generate and a prefill-only one removes the prefill. The same run
measures the memory bandwidth XLA reaches on a plain streaming kernel
(y = 2·x over an fp32 array as large as the weights: read + write) and reports the decode
figure as a fraction of it, and of the device's nominal peak when known.

`--decode_attention` lists the decode attentions to time side by side
(`sampling.decode_attention`; "pallas_gpu" is Pallas's GPU decode kernel, which off GPU
runs interpreted, far slower). The bytes counted are the same for each: the whole cache.
"""

from __future__ import annotations

import argparse
import json
import sys

from experiments import bench_common

SHAPES = {
    # Llama-3.2-1B: 16 layers, width 2048, 32 query / 8 KV heads of 64, MLP 8192, 128k vocab.
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        model_type="llama",
        qkv_bias=False,
    ),
    # DeepSeek-R1-Distill-Qwen-1.5B (the open-rs paper config's model): 28 layers, width 1536,
    # 12 query / 2 KV heads of 128, MLP 8960, 152k vocabulary, untied head, qkv bias.
    "1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        tie_word_embeddings=False,
        model_type="qwen2",
        qkv_bias=True,
    ),
    **{name: dict(shape, qkv_bias=True) for name, shape in bench_common.MODEL_SHAPES.items()},
}

# Nominal HBM bandwidth (bytes/s) by `jax.Device.device_kind`, from the vendors' data sheets.
NOMINAL_BANDWIDTH = {
    "NVIDIA H200": 4.8e12,
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 8.19e11,
    "TPU v5": 2.765e12,
    "TPU v6 lite": 1.64e12,
}


def model_config(shape: str):
    """The bf16 `ModelConfig` of a benchmarked shape."""
    from aapo_jax.models import ModelConfig

    return ModelConfig(
        **SHAPES[shape], dtype="bfloat16", param_dtype="bfloat16", max_position_embeddings=8192
    )


def decode_step_bytes(config, batch: int, cache_slots: int) -> dict[str, int]:
    """Bytes one decode step reads: all weights once, and the whole fixed cache."""
    itemsize = 2  # bf16 weights and cache
    embedding = config.vocab_size * config.hidden_size
    # The embedding lookup reads B rows; the head reads the whole [D, V] matrix (tied or not).
    weights = config.num_params - embedding if not config.tie_word_embeddings else config.num_params
    kv_per_row = 2 * config.num_layers * config.num_kv_heads * config.head_dim * cache_slots
    return dict(weights=weights * itemsize, kv_cache=batch * kv_per_row * itemsize)


def stream_bandwidth(num_bytes: int, reps: int) -> float:
    """Bytes/s of a jitted y = 2·x over an fp32 array of `num_bytes` (read + write counted).

    fp32, not bf16: CPUs have no native bf16 arithmetic, which would make the kernel
    compute-bound there; on accelerators both are memory-bound.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.ones((num_bytes // 4,), jnp.float32)
    double = jax.jit(lambda a: a * 2)
    seconds = bench_common.median_seconds(lambda: double(x), reps)
    return 2 * x.size * 4 / seconds


def time_decode(
    model, batch: int, prompt_len: int, new_tokens: int, reps: int, attention: str = "auto"
) -> dict:
    """Seconds per decode step at one batch size, from full and prefill-only generates,
    with the decode attention `attention`."""
    import jax
    import numpy as np

    from aapo_jax import sampling

    vocab = model.config.vocab_size
    ids = np.random.default_rng(batch).integers(1, vocab, size=(batch, prompt_len), dtype=np.int32)
    mask = np.ones_like(ids)

    def run(tokens: int):
        def call():
            return sampling.generate(
                model,
                ids,
                mask,
                rng=jax.random.key(0),
                max_new_tokens=tokens,
                temperature=0.0,
                eos_token_id=None,
                buckets=None,
                decode_attention=attention,
            ).tokens

        return bench_common.median_seconds(call, reps)

    full, prefill = run(new_tokens), run(1)
    step = max(full - prefill, 1e-9) / (new_tokens - 1)
    return dict(
        batch=batch,
        decode_attention=attention,
        generate_s=full,
        prefill_s=prefill,
        decode_step_s=step,
        decode_tokens_per_s=batch / step,
    )


def run(
    shape: str,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    reps: int,
    attentions: tuple[str, ...] = ("auto",),
) -> dict:
    """The whole benchmark as one JSON-able dict: a row per decode attention and batch size."""
    import jax
    from flax import nnx
    from tqdm.auto import tqdm

    from aapo_jax.models import Transformer

    if new_tokens < 2:
        raise ValueError(f"--new_tokens must be ≥ 2 to separate decode from prefill: {new_tokens}")
    config = model_config(shape)
    model = Transformer(config, rngs=nnx.Rngs(0))
    device = jax.devices()[0]
    weight_bytes = decode_step_bytes(config, 1, 0)["weights"]
    measured = stream_bandwidth(max(weight_bytes, 64 << 20), reps)
    nominal = NOMINAL_BANDWIDTH.get(device.device_kind)
    rows = []
    runs = [(a, b) for a in attentions for b in batches]
    for attention, batch in tqdm(runs, desc="attention × batch", file=sys.stderr):
        row = time_decode(model, batch, prompt_len, new_tokens, reps, attention)
        moved = decode_step_bytes(config, batch, prompt_len + new_tokens)
        row["bytes_per_step"] = moved
        row["bandwidth_bytes_per_s"] = sum(moved.values()) / row["decode_step_s"]
        row["fraction_of_stream"] = row["bandwidth_bytes_per_s"] / measured
        if nominal:
            row["fraction_of_nominal"] = row["bandwidth_bytes_per_s"] / nominal
        rows.append(row)
    return dict(
        shape=shape,
        params=config.num_params,
        dtype="bfloat16",
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        device=device.device_kind,
        backend=jax.default_backend(),
        stream_bandwidth_bytes_per_s=measured,
        nominal_bandwidth_bytes_per_s=nominal,
        batches=rows,
    )


def _table(result: dict) -> str:
    gb = 1e9
    lines = [
        f"{result['shape']} ({result['params']:,} params, bf16) on {result['device']}: prompt "
        f"{result['prompt_len']}, {result['new_tokens']} new tokens, greedy, EOS off",
        f"streaming bandwidth (y = 2x, same run): {result['stream_bandwidth_bytes_per_s'] / gb:.0f}"
        " GB/s"
        + (
            f"; nominal {result['nominal_bandwidth_bytes_per_s'] / gb:.0f} GB/s"
            if result["nominal_bandwidth_bytes_per_s"]
            else ""
        ),
        f"{'attention':>10} {'batch':>5} {'tok/s':>10} {'ms/step':>8} {'GB/step':>8} {'GB/s':>8} "
        f"{'%stream':>8} {'%nominal':>9}",
    ]
    for row in result["batches"]:
        nominal = row.get("fraction_of_nominal")
        lines.append(
            f"{row['decode_attention']:>10} {row['batch']:>5} {row['decode_tokens_per_s']:>10.0f} "
            f"{1e3 * row['decode_step_s']:>8.2f} {sum(row['bytes_per_step'].values()) / gb:>8.3f} "
            f"{row['bandwidth_bytes_per_s'] / gb:>8.0f} {100 * row['fraction_of_stream']:>7.0f}% "
            f"{'' if nominal is None else f'{100 * nominal:.0f}%':>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="timed calls per measurement")
    parser.add_argument(
        "--decode_attention",
        default="auto",
        help="comma-separated decode attentions to compare (auto, xla, pallas_gpu)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    attentions = tuple(args.decode_attention.split(","))
    from aapo_jax.models.decode_attention import choose_decode_attention

    for name in attentions:
        choose_decode_attention(name)  # fails naming a bad one before any timing
    result = run(args.shape, batches, args.prompt_len, args.new_tokens, args.reps, attentions)
    print(json.dumps(result) if args.json else _table(result))


if __name__ == "__main__":
    main()
