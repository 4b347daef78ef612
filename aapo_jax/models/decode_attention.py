"""Decode attention through Pallas's GPU decode kernel, in parts joined by their log-sum-exp.

A decode step's query (one token per row) attends over up to three parts: a shared
prompt's slots (`transformer.SharedPrompt`, once per group of rows), the row's own cache
slots, and its new key. The XLA path (`transformer.cached_attention`) scores every part
in one program. Here the two cache parts run in
`jax.experimental.pallas.ops.gpu.decode_attention.gqa`, which reads keys and values in the
compute dtype, accumulates in fp32, reads only each row's slots in `[start, length)`
(nothing at all for a finished row: its length is 0) and returns each part's unnormalised
output with its softmax denominator and maximum. The parts are then joined as one
softmax. Off GPU the same kernel runs in Pallas's interpreter (for tests: slow).

The kernel reads keys slot-major, [B, K, S, Dh] like the values, so a cache meant for it
is built in that layout (`transformer.cache_from_prefix(..., attention="pallas_gpu")`),
with its slot counts rounded to whole kernel blocks (`kernel_slots`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from aapo_jax import sharding as sharding_lib

# `sampling.decode_attention`: "auto" is the GPU kernel on GPU and XLA elsewhere.
DECODE_ATTENTION = ("auto", "xla", "pallas_gpu")
_GPU_KERNEL_MODULE = "jax.experimental.pallas.ops.gpu.decode_attention"
# Cache parts for the kernel hold a multiple of this many slots (see `kernel_tiling`).
SLOT_MULTIPLE = 64
# A part's (unnormalised output [B, H, Dh], denominator [B, H], maximum [B, H]).
Part = tuple[Array, Array, Array]


def gpu_kernel_available() -> bool:
    """Whether this jax ships the GPU decode kernel. jax 0.11 deprecates Pallas's Triton
    ops, this one included, and will remove them with Pallas Triton."""
    return importlib.util.find_spec(_GPU_KERNEL_MODULE) is not None


def choose_decode_attention(name: str, backend: str | None = None) -> str:
    """The decode attention `name` runs: "auto" is "pallas_gpu" on GPU (while jax ships
    the kernel, `gpu_kernel_available`), "xla" elsewhere."""
    if name not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention={name!r}; expected one of {DECODE_ATTENTION}.")
    if name != "auto":
        return name
    backend = jax.default_backend() if backend is None else backend
    on_gpu = backend in ("gpu", "cuda") and gpu_kernel_available()
    return "pallas_gpu" if on_gpu else "xla"


def uses_kernel(attention: str) -> bool:
    """Whether the resolved decode `attention` reads the cache with the GPU kernel (and so
    needs a cache in its layout: keys slot-major, whole blocks of slots)."""
    return attention == "pallas_gpu"


def kernel_slots(slots: int) -> int:
    """`slots` rounded up to a whole number of kernel blocks (`SLOT_MULTIPLE`)."""
    return -(-slots // SLOT_MULTIPLE) * SLOT_MULTIPLE


def kernel_tiling(slots: int) -> tuple[int, int]:
    """(k_splits, block_k) for a part of `slots` slots (a multiple of 16).

    The kernel splits the slots into `k_splits` equal chunks (run in parallel, joined at
    the end), each read in blocks of `block_k`: as many splits as keep chunks whole
    multiples of 16 (up to 16 splits), then the largest block up to 128 that divides one.
    """
    if slots <= 0 or slots % 16:
        raise ValueError(f"a kernel part needs a positive multiple of 16 slots, got {slots}.")
    splits = next(k for k in (16, 8, 4, 2, 1) if slots % k == 0 and (slots // k) % 16 == 0)
    chunk = slots // splits
    block = next(b for b in (128, 64, 32, 16) if chunk % b == 0)
    return splits, block


def _gqa_part(q_BxHxDh, keys_BxKxSxDh, values_BxKxSxDh, start_B, length_B, interpret) -> Part:
    pallas_decode = importlib.import_module(_GPU_KERNEL_MODULE)
    splits, block = kernel_tiling(keys_BxKxSxDh.shape[2])
    # The kernel takes [B, S, K, Dh] and swaps back to [B, K, S, Dh]: the two transposes
    # cancel, so the cache is read where it lies.
    out, (denominator, peak) = pallas_decode.gqa(
        q_BxHxDh,
        keys_BxKxSxDh.swapaxes(1, 2),
        values_BxKxSxDh.swapaxes(1, 2),
        start_B,
        length_B,
        sm_scale=float(1 / math.sqrt(q_BxHxDh.shape[-1])),
        block_k=block,
        k_splits=splits,
        interpret=interpret,
        return_residuals=True,
        normalize_output=False,
    )
    return out.astype(jnp.float32), denominator, peak


def _per_device(fn, rows: int):
    """`fn` per device when the context mesh has automatic axes (XLA cannot partition a
    Pallas kernel): every argument and output split on its first dimension over the
    axes that `sharding.constrain_rows` splits rows over now, where they divide `rows`,
    else replicated. Inside `shard_map` or without a mesh, `fn` as is."""
    auto = sharding_lib.auto_axes()
    if not auto:
        return fn
    axes = tuple(a for a in sharding_lib.row_axes(rows) if a in auto)
    spec = PartitionSpec(axes or None)
    return jax.shard_map(
        fn,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=spec,
        out_specs=spec,
        axis_names=frozenset(auto),
        # The kernel's outputs declare no varying axes, which a checked shard_map refuses.
        check_vma=False,
    )


def kernel_part(
    q_BxHxDh: Array,
    keys_BxKxSxDh: Array,
    values_BxKxSxDh: Array,
    start_B: Int[Array, " B"],
    length_B: Int[Array, " B"],
) -> Part:
    """One part of a decode step's attention through the GPU kernel (interpreted off GPU).

    Row b's H query heads (grouped by kv head, as `q.reshape(B, K, H/K, Dh)` groups them)
    read slots `[start_B[b], length_B[b])` of its keys and values, in their dtype with fp32
    accumulation, scaled by 1/√Dh.

    Returns:
      (unnormalised output [B, H, Dh] fp32, softmax denominator [B, H], maximum score
      [B, H]): the output is Σ exp(score − maximum)·v. A row with no slot to read gives
      0, 0 and the fp32 minimum.
    """
    interpret = jax.default_backend() not in ("gpu", "cuda")
    run = functools.partial(_gqa_part, interpret=interpret)
    args = (q_BxHxDh, keys_BxKxSxDh, values_BxKxSxDh, start_B, length_B)
    return _per_device(run, q_BxHxDh.shape[0])(*args)


def join_parts(parts: list[Part]) -> Float[Array, "B H Dh"]:
    """The softmax-weighted output of several parts of one attention (`kernel_part`'s
    triples), each rescaled to the common maximum: Σ o·e^(m−M) / Σ l·e^(m−M)."""
    peak = functools.reduce(jnp.maximum, [m for _, _, m in parts])
    weights = [jnp.exp(m - peak) for _, _, m in parts]
    out = sum(o * w[..., None] for (o, _, _), w in zip(parts, weights, strict=True))
    total = sum(d * w for (_, d, _), w in zip(parts, weights, strict=True))
    return out / total[..., None]


def new_token_part(q_BxHxDh: Array, new_k_BxKxDh: Array, new_v_BxKxDh: Array) -> Part:
    """The part of a row's own new key, as a `Part`: one key, so its output is its value,
    its denominator 1 and its maximum its score."""
    b, h, dh = q_BxHxDh.shape
    kv_heads = new_k_BxKxDh.shape[1]
    q = q_BxHxDh.reshape(b, kv_heads, h // kv_heads, dh)
    score = jnp.einsum("bkgd,bkd->bkg", q, new_k_BxKxDh, preferred_element_type=jnp.float32)
    score = score.reshape(b, h) * np.float32(1 / math.sqrt(dh))
    values = jnp.repeat(new_v_BxKxDh.astype(jnp.float32), h // kv_heads, axis=1)
    return values, jnp.ones_like(score), score


def first_real_slot(mask_BxS: Array) -> Int[Array, " B"]:
    """Each row's first real slot (0 where none): where its left padding ends."""
    return jnp.argmax(mask_BxS, axis=1).astype(jnp.int32)


def step_attention(
    q_Bx1xHxDh: Array,
    keys_BxKxSxDh: Array,
    values_BxKxSxDh: Array,
    start_B: Int[Array, " B"],
    length_B: Int[Array, " B"],
    new_k_Bx1xKxDh: Array,
    new_v_Bx1xKxDh: Array,
    prompt: tuple[Array, Array, Array] | None = None,
) -> Float[Array, "B 1 H Dh"]:
    """One decode step's attention (one new token per row) with the cache parts in the kernel.

    Row b reads its cache's slots `[start_B[b], length_B[b])` (a finished row: length 0)
    and its new key and value; with `prompt` = a `SharedPrompt` layer's (keys and values
    [B', K, P, Dh], mask [B', P], left-padded), rows b·R + r (R = B / B') also read prompt
    b's real slots, once per group: the prompt's R·H query heads go to the kernel as one
    row's. Output in q's dtype: the same attention as `transformer.cached_attention`.
    """
    q = q_Bx1xHxDh[:, 0]
    b, h, dh = q.shape
    parts = [
        kernel_part(q, keys_BxKxSxDh, values_BxKxSxDh, start_B, length_B),
        new_token_part(q, new_k_Bx1xKxDh[:, 0], new_v_Bx1xKxDh[:, 0]),
    ]
    if prompt is not None:
        prompt_keys, prompt_values, prompt_mask = prompt
        groups, kv_heads = prompt_keys.shape[:2]
        group = h // kv_heads
        by_group, by_row = prompt_group_layout(b, groups, kv_heads, group, 1)
        # Rows b·R + r of prompt b side by side, grouped by kv head: [B', K·R·g, Dh].
        q_by_group = by_group(q.reshape(b, kv_heads, group, 1, dh)).reshape(groups, -1, dh)
        start = first_real_slot(prompt_mask)
        length = jnp.full_like(start, prompt_mask.shape[1])
        shared = kernel_part(q_by_group, prompt_keys, prompt_values, start, length)

        def per_row(x):  # [B', K·R·g, X] → [B, H, X]
            return by_row(x.reshape(groups, kv_heads, -1, x.shape[-1])).reshape(b, h, -1)

        out, total, peak = shared
        parts.append(
            (per_row(out), per_row(total[..., None])[..., 0], per_row(peak[..., None])[..., 0])
        )
    return join_parts(parts)[:, None].astype(q.dtype)


def prompt_group_layout(rows: int, groups: int, kv_heads: int, group: int, length: int):
    """Maps between per-row [N, K, g, L, X] and per-prompt [B', K, R·g·L, X] (N = B'·R rows
    b·R + r): a prompt's R rows side by side as one matmul's query rows."""
    repeats = rows // groups

    def by_group(x):
        x = x.reshape(groups, repeats, kv_heads, group, length, x.shape[-1])
        return x.transpose(0, 2, 1, 3, 4, 5).reshape(groups, kv_heads, -1, x.shape[-1])

    def by_row(x):
        x = x.reshape(groups, kv_heads, repeats, group, length, x.shape[-1])
        return x.transpose(0, 2, 1, 3, 4, 5).reshape(rows, kv_heads, group, length, x.shape[-1])

    return by_group, by_row
