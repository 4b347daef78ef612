"""Shared benchmark helpers: median timing, matmul calibration, FLOP counts of our model."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

# The two benchmarked Qwen2 shapes, as `aapo_jax.models.ModelConfig` fields (q/k/v bias on).
MODEL_SHAPES = {
    "tiny": dict(  # 0.43M parameters
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    ),
    "medium": dict(  # 33.6M parameters
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
    ),
}


def data_mesh(devices: int):
    """Expose `devices` JAX CPU devices (call before any JAX work) and return a
    data-parallel mesh over all devices, or None when there is only one."""
    from aapo_jax import sharding

    sharding.use_cpu_devices(devices)
    mesh = sharding.make_mesh(data=-1, fsdp=1)
    return mesh if mesh.devices.size > 1 else None


def model_config(size: str, **overrides):
    """The `ModelConfig` of a benchmarked size."""
    from aapo_jax.models import ModelConfig

    return ModelConfig(qkv_bias=True, **MODEL_SHAPES[size], **overrides)


def random_torch_model(hf_config, seed: int = 0):
    """A fp32 transformers model from `hf_config` with O(1) logits, in eval mode.

    Every weight is drawn from N(0, 0.15²) and every norm scale from 1 + N(0, 0.1²), so
    the next-token distribution is far from uniform and argmax ties are unlikely.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model.eval()


def body_and_head_params(config) -> tuple[int, int]:
    """(non-embedding matmul params of the layers, params of the output head)."""
    head = config.hidden_size * config.vocab_size
    body = config.num_params - config.vocab_size * config.hidden_size
    if not config.tie_word_embeddings:
        body -= head
    return body, head


def attention_flops_per_token(config, keys: int) -> int:
    """QKᵀ and PV for one query over `keys` slots, all layers."""
    return config.num_layers * 4 * config.num_heads * config.head_dim * keys


def generate_flops(config, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Matmul FLOPs of our prefill + decode (attention over the fixed P+T cache).

    Prefill runs the body over B·P tokens and the head on the last one; each of
    the T-1 decode steps runs body + head on B tokens and attends to all S = P+T
    slots (QKᵀ and PV: 4·H·Dh·S per layer).
    """
    body, head = body_and_head_params(config)
    attn_per_token = attention_flops_per_token(config, prompt_len + new_tokens)
    prefill = prompt_len * (2 * body + attn_per_token) + 2 * head
    decode = (new_tokens - 1) * (2 * (body + head) + attn_per_token)
    return float(batch * (prefill + decode))


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `fn()` until its (JAX) result is ready, after one warm-up call."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_calibration(shapes: list[tuple[int, int]]) -> dict[str, float]:
    """Median GFLOP/s of jitted fp32 matmuls: 1024³ square and MLP-shaped decode chains.

    The decode entry for (B, D) runs 32 dependent [B, D]@[D, 4D]@[4D, D] pairs in
    one program, as the decode loop does, so dispatch cost is not counted.
    """
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    result = {}
    a = jax.random.normal(key, (1024, 1024), jnp.float32)
    seconds = median_seconds(functools.partial(jax.jit(lambda x: x @ x), a), 7)
    result["square_1024"] = 2 * 1024**3 / seconds / 1e9

    steps = 32

    @jax.jit
    def chain(x, w_up, w_down):
        body = lambda _, h: (h @ w_up) @ w_down * 0.01
        return jax.lax.fori_loop(0, steps, body, x)

    for batch, width in shapes:
        x = jax.random.normal(key, (batch, width), jnp.float32)
        w_up = jax.random.normal(key, (width, 4 * width), jnp.float32)
        w_down = jax.random.normal(key, (4 * width, width), jnp.float32)
        seconds = median_seconds(functools.partial(chain, x, w_up, w_down), 7)
        flops = steps * 2 * (2 * batch * width * 4 * width)
        result[f"decode_b{batch}_d{width}"] = flops / seconds / 1e9
    return result
