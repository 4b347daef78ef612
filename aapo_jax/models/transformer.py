"""Flax NNX decoder for the Qwen2 / Llama-3 families with an explicit KV cache."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from aapo_jax import decode_layouts
from aapo_jax import sharding as sharding_lib
from aapo_jax.models import attention, decode_attention, lora
from aapo_jax.models.config import ModelConfig

# A large finite negative instead of -inf keeps masked scores out of NaN territory.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@flax.struct.dataclass
class KVCache:
    """Fixed-size key/value buffers, one per layer.

    All rows share one write index because batches are left-padded: slot `s`
    holds the same step for every row. `mask_BxS` marks the slots that hold a
    real token (not padding, not yet written). Both are head-major so attention
    reads them without a relayout every step, and keys are stored transposed
    ([B, K, Dh, S]): a decode step's q·k then reduces over a non-minor axis and
    vectorises along the slots, about 2.7× faster on CPU than reducing over Dh.
    The buffers are separate (not stacked on a layer axis) so that the layer scan
    reads its layer's buffer where it lies: slicing layer i out of a stacked
    buffer makes XLA:CPU copy that layer's whole cache on every decode step.
    A cache for the GPU decode kernel (`attention="pallas_gpu"`, see
    `models.decode_attention`) stores keys slot-major like the values, [B, K, S, Dh],
    and whole kernel blocks of slots.
    """

    k: tuple[Float[Array, "B K Dh S"] | Float[Array, "B K S Dh"], ...]
    v: tuple[Float[Array, "B K S Dh"], ...]
    mask_BxS: Bool[Array, "B S"]
    index: Int[Array, ""]
    # A prompt stored once for the rows that continue it; the buffers above then hold
    # each row's own slots only (slot 0 is the first token after the prompt).
    prompt: SharedPrompt | None = None
    # The decode attention that reads it (`decode_attention.DECODE_ATTENTION`, resolved).
    attention: str = flax.struct.field(pytree_node=False, default="xla")

    @property
    def keys_by_slot(self) -> bool:
        """Keys stored [B, K, S, Dh] (the kernel's layout), not transposed [B, K, Dh, S]."""
        return decode_attention.uses_kernel(self.attention)

    @property
    def size(self) -> int:
        """The row's own slots (the prompt's too, unless it is a `SharedPrompt`)."""
        return self.mask_BxS.shape[1]

    @property
    def prompt_length(self) -> int:
        """P of a `SharedPrompt` (read before the own slots), else 0."""
        return 0 if self.prompt is None else self.prompt.length

    def repeat_rows(self, repeats: int) -> KVCache:
        """Every row repeated `repeats` times (rows b·repeats + r): one prefill, G continuations."""
        if repeats == 1:
            return self
        repeat = functools.partial(jnp.repeat, repeats=repeats, axis=0)
        return self.replace(
            k=tuple(map(repeat, self.k)),
            v=tuple(map(repeat, self.v)),
            mask_BxS=repeat(self.mask_BxS),
        )


@flax.struct.dataclass
class SharedPrompt:
    """Keys and values of B' prompts, each stored once for the `repeats` decode rows that
    continue it (rows b·repeats + r): a decode step reads each prompt's P slots once per
    group, not once per row. Per layer, in the cache's layouts: keys [B', K, Dh, P]
    ([B', K, P, Dh] for the GPU kernel), values [B', K, P, Dh]; `mask_BxP` marks real
    prompt tokens (left-padded).
    """

    k: tuple[Float[Array, "B K Dh P"] | Float[Array, "B K P Dh"], ...]
    v: tuple[Float[Array, "B K P Dh"], ...]
    mask_BxP: Bool[Array, "B P"]
    repeats: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def length(self) -> int:
        return self.mask_BxP.shape[1]


@flax.struct.dataclass
class PrefixKV:
    """Keys and values of a prompt already run through every layer, for continuations.

    `k`, `v`: [Ly, B', P, K, Dh] as `Transformer.forward(..., return_kv=True)` returns
    them; `mask_BxP`: [B', P]. Each of the B' rows serves `repeats` consecutive rows of
    the continuation batch (rows b·repeats + r), repeated layer by layer inside the scan.
    """

    k: Float[Array, "Ly B P K Dh"]
    v: Float[Array, "Ly B P K Dh"]
    mask_BxP: Bool[Array, "B P"]
    repeats: int = flax.struct.field(pytree_node=False, default=1)


def visibility(query_slot_L: Array, key_mask_BxS: Array) -> Bool[Array, "B L S"]:
    """Which key slots each query sees: causal over real slots, plus its own slot.

    The own slot keeps a padding query (no real key before it) attending to
    itself only, never to later tokens.
    """
    key_slot = jnp.arange(key_mask_BxS.shape[1])
    causal_LxS = key_slot[None, :] <= query_slot_L[:, None]
    self_LxS = key_slot[None, :] == query_slot_L[:, None]
    return (causal_LxS[None] & key_mask_BxS[:, None, :]) | self_LxS[None]


def init_cache(
    config: ModelConfig, batch_size: int, cache_size: int, dtype=None, *, attention: str = "xla"
) -> KVCache:
    """An empty cache of `cache_size` slots per row (keys/values in `dtype`, default compute),
    in the layout of the decode `attention` that will read it (for "pallas_gpu": rounded up
    to whole kernel blocks, `decode_attention.kernel_slots`)."""
    dtype = config.compute_dtype if dtype is None else dtype
    ly, k, dh = config.num_layers, config.num_kv_heads, config.head_dim
    by_slot = decode_attention.uses_kernel(attention)
    size = decode_attention.kernel_slots(cache_size) if by_slot else cache_size
    key_shape = (batch_size, k, size, dh) if by_slot else (batch_size, k, dh, size)
    return KVCache(
        k=tuple(jnp.zeros(key_shape, dtype) for _ in range(ly)),
        v=tuple(jnp.zeros((batch_size, k, size, dh), dtype) for _ in range(ly)),
        mask_BxS=jnp.zeros((batch_size, size), bool),
        index=jnp.zeros((), jnp.int32),
        attention=attention,
    )


def cache_from_prefix(
    prefix: PrefixKV,
    cache_size: int,
    dtype=None,
    *,
    share: bool = False,
    attention: str = "xla",
) -> KVCache:
    """A decode cache of `cache_size` slots (the prompt's included) after a prefilled prompt.

    One relayout of the prompt's keys and values (`forward(..., return_kv=True)`) into
    the cache's per-layer, head-major, transposed-key layout. Without `share` (or with
    one row per prompt) they fill the first P slots of every row's buffers, repeated
    `prefix.repeats` times, and the slots after P are empty (index = P). With `share`
    they are a `SharedPrompt` kept once per prompt, and each row's buffers hold only its
    `cache_size` − P own slots, all empty (index = 0): the same attention, with the
    prompt's keys and values stored and read once per group.
    `attention`: the decode attention that will read it (resolved, see
    `decode_attention.choose_decode_attention`). For "pallas_gpu" keys are stored
    slot-major and every part holds whole kernel blocks: a shared prompt gains masked
    slots on its left, the rows' buffers empty slots at their end.
    """
    p = prefix.k.shape[2]
    if cache_size < p:
        raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {p}.")
    dtype = prefix.k.dtype if dtype is None else dtype
    by_slot = decode_attention.uses_kernel(attention)
    key_axes = (0, 2, 1, 3) if by_slot else (0, 2, 3, 1)  # [B', K, P, Dh] or [B', K, Dh, P]
    keys = tuple(k.transpose(key_axes).astype(dtype) for k in prefix.k)
    values = tuple(v.transpose(0, 2, 1, 3).astype(dtype) for v in prefix.v)  # [B', K, P, Dh]
    mask = prefix.mask_BxP.astype(bool)
    slot_axis = 2 if by_slot else 3
    if share and prefix.repeats > 1:
        own = cache_size - p
        if by_slot:
            own, left = decode_attention.kernel_slots(own), decode_attention.kernel_slots(p) - p

            def pad_left(x, axis):
                return jnp.pad(x, [(left if d == axis else 0, 0) for d in range(x.ndim)])

            keys, values = (tuple(pad_left(x, 2) for x in xs) for xs in (keys, values))
            mask = pad_left(mask, 1)

        def empty(x, axis):
            # Zeros padded from an empty slice: inside `shard_map` they vary over the
            # devices as the prompt does, as a loop carry must.
            x = jnp.repeat(jax.lax.slice_in_dim(x, 0, 0, axis=axis), prefix.repeats, axis=0)
            return jnp.pad(x, [(0, own if d == axis else 0) for d in range(x.ndim)])

        return KVCache(
            k=tuple(empty(k, slot_axis) for k in keys),
            v=tuple(empty(v, 2) for v in values),
            mask_BxS=empty(mask, 1),
            index=jnp.zeros((), jnp.int32),
            prompt=SharedPrompt(k=keys, v=values, mask_BxP=mask, repeats=prefix.repeats),
            attention=attention,
        )
    pad = (decode_attention.kernel_slots(cache_size) if by_slot else cache_size) - p

    def pad_end(x, axis):
        return jnp.pad(x, [(0, pad if d == axis else 0) for d in range(x.ndim)])

    cache = KVCache(
        k=tuple(pad_end(k, slot_axis) for k in keys),
        v=tuple(pad_end(v, 2) for v in values),
        mask_BxS=pad_end(mask, 1),
        index=jnp.asarray(p, jnp.int32),
        attention=attention,
    )
    return cache.repeat_rows(prefix.repeats)


def positions_from_mask(mask_BxL: Array) -> Int[Array, "B L"]:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    mask = mask_BxL.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies (fp32, as transformers computes them), llama3-scaled if set."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(config.rope_theta), exponent)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_BxL: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos and sin of the RoPE angles, fp32 [B, L, Dh] (each half repeated), as transformers.

    Computed once per forward and shared by every layer's queries and keys: XLA:CPU
    evaluates cos/sin slowly, and inlined per use they cost more than the projections.
    """
    angles = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x_BxLxHxDh: Array, rope: tuple[Array, Array]) -> Array:
    """Rotate-half RoPE (the transformers layout) with tables from `rope_tables`."""
    cos, sin = (t[:, :, None, :].astype(x_BxLxHxDh.dtype) for t in rope)
    half = x_BxLxHxDh.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxLxHxDh[..., half:], x_BxLxHxDh[..., :half]], axis=-1)
    return x_BxLxHxDh * cos + rotated * sin


def dense(x: Array, kernel: Array, n_in: int = 1) -> Array:
    """x[..., in] @ kernel[in..., out...] as ONE 2-D matmul over all leading positions.

    Flattening the token axes first keeps XLA on plain GEMMs in the backward pass
    too (a dot with several batch-like axes is relaid out with copies on CPU).
    `n_in` is the number of trailing axes of `x` that are contracted.
    """
    lead, contract = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
    out = kernel.shape[n_in:]
    if kernel.ndim > 2 and decode_layouts.tensor_decoding():
        # The kernel as it is: flattening [D, H, Dh] split by Dh (the tensor decode layout)
        # is not a split of H·Dh, and XLA would gather the whole kernel to reshape it.
        x = x.reshape(-1, *contract)
        dims = (tuple(range(1, n_in + 1)), tuple(range(n_in)))
        return jax.lax.dot_general(x, kernel, (dims, ((), ()))).reshape(*lead, *out)
    y = x.reshape(-1, math.prod(contract)) @ kernel.reshape(math.prod(contract), -1)
    return y.reshape(*lead, *out)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal", stack: int = 0):
    """A parameter; with `stack` > 0, `stack` of them on a leading "layers" axis."""
    if stack:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm with fp32 statistics, scaled after casting back (transformers order)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int = 0):
        self.eps = config.rms_norm_eps
        self.scale = _param(
            rngs, (config.hidden_size,), ("norm",), config.base_weight_dtype, "ones", stack
        )

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale.value.astype(x.dtype) * x32.astype(x.dtype)


# attend(q [B, L, H, Dh], k [B, L, K, Dh], v [B, L, K, Dh]) -> (out [B, L, H, Dh], aux):
# how one layer's attention reads its keys (fresh, after a prefix, or through a cache).
AttendFn = Callable[[Array, Array, Array], tuple[Array, Any]]


class Attention(nnx.Module):
    """Grouped-query attention projections; the attention itself is the caller's `AttendFn`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int = 0):
        d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        dt = config.base_weight_dtype
        self.config = config
        p = functools.partial(_param, rngs, dtype=dt, stack=stack)
        self.q_kernel = p((d, h, dh), ("embed", "q_heads", "head_dim"))
        self.k_kernel = p((d, k, dh), ("embed", "kv_heads", "head_dim"))
        self.v_kernel = p((d, k, dh), ("embed", "kv_heads", "head_dim"))
        self.o_kernel = p((h, dh, d), ("q_heads", "head_dim", "embed"))
        if config.qkv_bias:
            self.q_bias = p((h, dh), ("q_heads", "head_dim"), init="zeros")
            self.k_bias = p((k, dh), ("kv_heads", "head_dim"), init="zeros")
            self.v_bias = p((k, dh), ("kv_heads", "head_dim"), init="zeros")
        if config.o_bias:
            self.o_bias = p((d,), ("embed",), init="zeros")
        lora.quantize_base(self, "layers/attn", config)
        lora.add_adapters(self, "layers/attn", config, rngs, stack)

    def _project(self, x, name, bias_name):
        y = lora.project(self, x, name)
        if self.config.qkv_bias:
            y = y + getattr(self, bias_name).value.astype(x.dtype)
        return y

    def __call__(
        self, x_BxLxD: Array, rope: tuple[Array, Array], attend: AttendFn
    ) -> tuple[Array, Any]:
        # In the tensor decode layout the projections are split by head_dim: each device
        # computes its slice of every head for all rows, then the rows go back to the device
        # that holds their cache (`constrain_decode_rows`), and the attention's output is
        # split by head_dim again for the output projection (elsewhere both are identities).
        x_BxLxD = decode_layouts.constrain_decode_whole(x_BxLxD)  # gathered once for q, k, v

        def project(name):
            y = self._project(x_BxLxD, f"{name}_kernel", f"{name}_bias")
            return decode_layouts.constrain_decode_rows(decode_layouts.constrain_columns(y))

        q, k, v = apply_rope(project("q"), rope), apply_rope(project("k"), rope), project("v")
        out, aux = attend(q, k, v)
        # Rows first: the head_dim split must not reach back into the attention itself.
        out = decode_layouts.constrain_decode_rows(out.astype(x_BxLxD.dtype))
        out = decode_layouts.constrain_columns(out)
        y = lora.project(self, out, "o_kernel", n_in=2)
        if self.config.o_bias:
            y = y + self.o_bias.value.astype(y.dtype)
        return y, aux


def cached_attention(
    q_BxLxHxDh: Array,
    keys_BxKxDhxS: Array,
    values_BxKxSxDh: Array,
    old_visible_BxS: Array,
    new_k_BxLxKxDh: Array,
    new_v_BxLxKxDh: Array,
    new_visible_BxLxL: Array,
    prompt: tuple[Array, Array, Array] | None = None,
    *,
    keys_by_slot: bool = False,
) -> Array:
    """Dense attention of L new queries over a cache's earlier slots and the L new entries.

    The cache part (transposed keys, `old_visible_BxS` marking its real slots, all
    before the queries) and the new keys and values are scored separately and share
    one softmax, so the layer's cache is only read: writing the new entries into it
    first would copy it. Scores are accumulated in fp32 and masked with a large finite
    negative; each part's weights, exp(score − the common max), are cast to the compute
    dtype for its value matmul, and the fp32 sum is divided once by the common
    denominator. The cache is never upcast: below fp32 it is read by dots in its own dtype.

    `prompt`: a `SharedPrompt` layer's (keys [B', K, Dh, P], values [B', K, P, Dh],
    visible [B', P]), before every other slot, for rows b·R + r (R = B / B'). Each
    prompt's slots are read once by its group's R rows together (one matmul with R·H/K
    query rows per kv head) and join the same softmax.
    `keys_by_slot`: the cache's (and the prompt's) keys are stored [B, K, S, Dh], like
    the values (a cache for the GPU decode kernel, read here for writes of L > 1 tokens).
    """
    b, seq_len, h, dh = q_BxLxHxDh.shape
    kv_heads = keys_BxKxDhxS.shape[1]
    group = h // kv_heads
    dtype = q_BxLxHxDh.dtype
    keys, values = keys_BxKxDhxS.astype(dtype), values_BxKxSxDh.astype(dtype)
    new_k, new_v = new_k_BxLxKxDh.astype(dtype), new_v_BxLxKxDh.astype(dtype)
    q = q_BxLxHxDh.reshape(b, seq_len, kv_heads, group, dh)
    # fp32 decode (one query per row; the CPU models): broadcast-multiply-reduce over Dh (a
    # non-minor axis of the transposed keys) fuses into one pass over the cache, where a
    # dot would run B·K tiny matrix-vector products. In a narrower compute dtype the same
    # product would upcast every cache slot to fp32 (on TPU an fp32 copy of each layer's
    # cache per step), so there the cache is read by dots in its own dtype that accumulate
    # in fp32.
    reduce_in_fp32 = seq_len == 1 and dtype == jnp.float32
    key_spec = "bksd" if keys_by_slot else "bkds"
    if reduce_in_fp32 and keys_by_slot:
        old = jnp.sum(q[:, 0][..., None, :] * keys[:, :, None], axis=-1)[:, :, :, None]
    elif reduce_in_fp32:
        old = jnp.sum(q[:, 0][..., None] * keys[:, :, None], axis=-2)[:, :, :, None]
    else:
        qt = q.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, group * seq_len, dh)
        old = jnp.einsum(f"bkqd,{key_spec}->bkqs", qt, keys, preferred_element_type=jnp.float32)
        old = old.reshape(b, kv_heads, group, seq_len, -1)
    new = jnp.einsum("blkgd,bmkd->bkglm", q, new_k, preferred_element_type=jnp.float32)
    scale = np.float32(1 / math.sqrt(dh))
    old = jnp.where(old_visible_BxS[:, None, None, None], old * scale, _MASK_VALUE)
    new = jnp.where(new_visible_BxLxL[:, None, None], new * scale, _MASK_VALUE)
    shared = None
    if prompt is not None:
        prompt_keys, prompt_values, prompt_visible = prompt
        groups = prompt_keys.shape[0]
        by_group, by_row = decode_attention.prompt_group_layout(b, groups, kv_heads, group, seq_len)
        shared = jnp.einsum(
            f"bkqd,{key_spec.replace('s', 'p')}->bkqp",
            by_group(q.transpose(0, 2, 3, 1, 4)),
            prompt_keys.astype(dtype),
            preferred_element_type=jnp.float32,
        )
        visible = jnp.repeat(prompt_visible, b // groups, axis=0)[:, None, None, None]
        shared = jnp.where(visible, by_row(shared) * scale, _MASK_VALUE)
    # One softmax over the parts without joining them: each part's scores stay in the
    # layout its own matmul wrote (a concatenation made XLA:TPU copy and relayout every
    # part), exponentiated against the common max; the value matmuls take the unnormalised
    # weights and their fp32 sum is divided once by the common denominator.
    parts = [x for x in (shared, old, new) if x is not None]
    peak = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1) for x in parts])[..., None]
    shared, old, new = (None if x is None else jnp.exp(x - peak) for x in (shared, old, new))
    total = sum(jnp.sum(x, axis=-1) for x in (shared, old, new) if x is not None)
    if reduce_in_fp32:
        out = jnp.sum(old[:, :, :, 0, :, None] * values[:, :, None], axis=-2)[:, :, :, None]
    else:
        old = old.astype(dtype).reshape(b, kv_heads, group * seq_len, -1)
        out = jnp.einsum("bkqs,bksd->bkqd", old, values, preferred_element_type=jnp.float32)
        out = out.reshape(b, kv_heads, group, seq_len, dh)
    out = out + jnp.einsum(
        "bkglm,bmkd->bkgld", new.astype(dtype), new_v, preferred_element_type=jnp.float32
    )
    if shared is not None:
        out = out + by_row(
            jnp.einsum(
                "bkqp,bkpd->bkqd",
                by_group(shared.astype(dtype)),
                prompt_values.astype(dtype),
                preferred_element_type=jnp.float32,
            )
        )
    out = out / total[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, seq_len, h, dh).astype(dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int = 0):
        d, f, dt = config.hidden_size, config.intermediate_size, config.base_weight_dtype
        self.config = config
        p = functools.partial(_param, rngs, dtype=dt, stack=stack)
        self.gate_kernel = p((d, f), ("embed", "mlp"))
        self.up_kernel = p((d, f), ("embed", "mlp"))
        self.down_kernel = p((f, d), ("mlp", "embed"))
        if config.mlp_bias:
            self.gate_bias = p((f,), ("mlp",), init="zeros")
            self.up_bias = p((f,), ("mlp",), init="zeros")
            self.down_bias = p((d,), ("embed",), init="zeros")
        lora.quantize_base(self, "layers/mlp", config)
        lora.add_adapters(self, "layers/mlp", config, rngs, stack)

    def __call__(self, x_BxLxD: Array) -> Array:
        def project(x, name):
            y = lora.project(self, x, f"{name}_kernel")
            if self.config.mlp_bias:
                y = y + getattr(self, f"{name}_bias").value.astype(x.dtype)
            return y

        # Split by hidden units in the tensor decode layout (else as it is), from rows
        # gathered once for both projections.
        x_BxLxD = decode_layouts.constrain_decode_whole(x_BxLxD)
        gate = decode_layouts.constrain_columns(project(x_BxLxD, "gate"))
        up = decode_layouts.constrain_columns(project(x_BxLxD, "up"))
        # Whole rows out (an all-reduce of [rows, D]): a reduce-scatter to the rows makes
        # XLA:TPU split the product into a windowed loop that copies the weight first.
        return decode_layouts.constrain_decode_whole(project(jax.nn.silu(gate) * up, "down"))


class DecoderLayer(nnx.Module):
    """Pre-norm attention block followed by a pre-norm SwiGLU block.

    Built with `stack=Ly` it holds every layer's weights on a leading axis; the
    `Transformer` scans over that axis, calling one layer's slice at a time.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int = 0):
        self.input_norm = RMSNorm(config, rngs=rngs, stack=stack)
        self.attn = Attention(config, rngs=rngs, stack=stack)
        self.post_attn_norm = RMSNorm(config, rngs=rngs, stack=stack)
        self.mlp = MLP(config, rngs=rngs, stack=stack)

    def __call__(self, x, rope, attend: AttendFn):
        attn_out, aux = self.attn(self.input_norm(x), rope, attend)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return x, aux


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a `ModelConfig.remat` name (None: save nothing)."""
    if name == "full":
        return None
    if name == "dots":
        # Keep the projections' outputs, recompute norms, RoPE, activations and attention.
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"no remat policy for {name!r}")


class Transformer(nnx.Module):
    """Decoder-only causal LM (Qwen2 / Qwen2.5 / Llama-3.x) over a scanned layer stack.

    The layers' weights are stacked ([Ly, ...]) and every forward is ONE `lax.scan`
    over them, so compile time does not grow with depth. Three ways in:
    `forward` (a causal forward over new tokens, optionally continuing a `PrefixKV`,
    with memory-bounded attention — the training forward and the prefill),
    `decode` (new tokens written into a `KVCache` at `cache.index`), and `__call__`
    (logits; through `decode` when given a cache).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = _param(
            rngs,
            (config.vocab_size, config.hidden_size),
            ("vocab", "embed"),
            config.base_weight_dtype,
        )
        self.layers = DecoderLayer(config, rngs=rngs, stack=config.num_layers)
        self.final_norm = RMSNorm(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(
                rngs,
                (config.hidden_size, config.vocab_size),
                ("embed", "vocab"),
                config.base_weight_dtype,
            )

    def lm_head_kernel(self) -> Float[Array, "D V"]:
        """The output projection [D, V] (the transposed embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed.value.T
        return self.lm_head.value

    def _embed(self, tokens_BxL: Array) -> Array:
        x = jnp.take(self.embed.value, tokens_BxL, axis=0).astype(self.config.compute_dtype)
        return sharding_lib.constrain_rows(x)

    def _scan(self, body, carry, xs, remat: str, unroll: int | None = None):
        """`lax.scan` of `body(layer, carry, xs_i) -> (carry, ys_i)` over the stacked layers."""
        graphdef, layer_params = nnx.split(self.layers)

        def step(carry, xs):
            params_i, xs_i = xs
            return body(nnx.merge(graphdef, params_i), carry, xs_i)

        if remat != "none":
            step = jax.checkpoint(step, policy=remat_policy(remat), prevent_cse=False)
        unroll = self.config.layers_per_scan_step if unroll is None else unroll
        if unroll < self.config.num_layers:
            return jax.lax.scan(step, carry, (layer_params, xs), unroll=unroll)
        # Every layer unrolled: a Python loop over static slices of the stacked weights.
        ys = []
        for i in range(self.config.num_layers):
            carry, y = step(carry, jax.tree.map(lambda t, i=i: t[i], (layer_params, xs)))
            ys.append(y)
        return carry, jax.tree.map(lambda *t: jnp.stack(t), *ys)

    def forward(
        self,
        tokens_BxL: Int[Array, "B L"],
        positions_BxL: Int[Array, "B L"],
        mask_BxL: Array,
        *,
        prefix: PrefixKV | None = None,
        return_kv: bool = False,
        remat: str | None = None,
    ) -> tuple[Array, PrefixKV | None]:
        """Final-normed hidden states [B, L, D] (compute dtype) of a causal forward.

        Every query sees the real tokens at or before it (its own slot always), and,
        with `prefix`, the whole prefilled prompt first: the completions of a group
        continue one prompt forward (`PrefixKV.repeats`), gradients flowing into it.
        Attention is `attention.attend` with the config's implementation (no
        [B, H, L, S] fp32 scores for long sequences). `return_kv` also returns this
        forward's own keys and values as a `PrefixKV` (a prefill for `cache_from_prefix`
        or a prefix for a continuation). `remat` (default `config.remat`) picks the
        layer rematerialisation of the backward pass.
        """
        cfg = self.config
        remat = cfg.remat if remat is None else remat
        mask_BxL = mask_BxL.astype(bool)
        if prefix is None:
            key_mask, offset = mask_BxL, 0
        else:
            key_mask = jnp.concatenate([_repeat(prefix.mask_BxP, prefix.repeats), mask_BxL], 1)
            offset = prefix.mask_BxP.shape[1]
        rope = rope_tables(positions_BxL, rope_inv_freq(cfg))

        def body(layer, x, prefix_kv):
            def attend(q, k, v):
                keys, values = k, v
                if prefix_kv is not None:
                    pk, pv = (_repeat(t.astype(k.dtype), prefix.repeats) for t in prefix_kv)
                    keys, values = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
                out = attention.attend(
                    q,
                    keys,
                    values,
                    key_mask,
                    query_offset=offset,
                    implementation=cfg.attention,
                    block_size=cfg.attention_block,
                )
                return out, ((k, v) if return_kv else None)

            x, kv = layer(x, rope, attend)
            return sharding_lib.constrain_rows(x), kv

        prefix_kv = None if prefix is None else (prefix.k, prefix.v)
        x, kv = self._scan(body, self._embed(tokens_BxL), prefix_kv, remat)
        x = self.final_norm(x)
        if not return_kv:
            return x, None
        return x, PrefixKV(k=kv[0], v=kv[1], mask_BxP=mask_BxL)

    def decode(
        self,
        tokens_BxL: Int[Array, "B L"],
        positions_BxL: Int[Array, "B L"],
        mask_BxL: Array,
        cache: KVCache,
        *,
        kv_len: int | None = None,
        layers: Sequence[DecoderLayer] | None = None,
        unroll: int = 1,
    ) -> tuple[Array, KVCache]:
        """Hidden states [B, L, D] of new tokens written into `cache` at `cache.index`.

        Each layer attends over the first `kv_len` slots of its cache (default: all; a
        `SharedPrompt`'s P slots count, read once per group) plus its new keys and values,
        which are written into the cache after the layer scan, in place for a donated or
        loop-carried cache: a decode loop that knows how far the cache is filled passes a
        bound, so a step reads only the filled part. Dense attention: meant for decode
        steps (L = 1) and short writes.
        `layers` (from `unstacked_layers`, made once outside the decode loop): each scan
        step runs layer i as branch i of a `switch` over its own weights, which XLA:CPU
        reads where they lie instead of copying layer i's slice of the stacked weights.
        `unroll` ≥ the layer count lays every layer out as straight-line code, over `layers`
        or static slices of the stacked weights (for a one-step program whose cost analysis
        should count every layer: XLA counts a loop body once).
        A cache for the GPU kernel (`cache.attention == "pallas_gpu"`) is read by it on
        one-token steps (`decode_attention.step_attention`): each row reads its whole
        buffer up to the write index, `kv_len` aside, and a finished row (its new token
        masked) reads none of it.
        """
        cfg = self.config
        shared = cache.prompt
        by_slot = cache.keys_by_slot
        length = tokens_BxL.shape[1]
        in_kernel = by_slot and length == 1
        # The bound counts the prompt's slots whether each row holds them or they are shared.
        own = cache.size if kv_len is None or in_kernel else kv_len - cache.prompt_length
        index = cache.index
        # Every slot before the write index that holds a real token; the new tokens
        # see each other causally (and always themselves).
        old_visible = cache.mask_BxS[:, :own] & (jnp.arange(own) < index)[None]
        new_visible = visibility(jnp.arange(length), mask_BxL.astype(bool))
        rope = rope_tables(positions_BxL, rope_inv_freq(cfg))
        if in_kernel:  # each row's slot range: from the end of its left padding to the index
            start = decode_attention.first_real_slot(cache.mask_BxS)
            end = jnp.where(mask_BxL[:, 0].astype(bool), index, 0)

        def attend_layer(i, q, k, v):
            # Layer i's buffers, read where they lie: `switch` passes them by reference,
            # where a scan input or a dynamic index into stacked buffers is a copy.
            def over(j):
                keys = cache.k[j][:, :, :own] if by_slot else cache.k[j][..., :own]
                values = cache.v[j][:, :, :own]
                prompt = None if shared is None else (shared.k[j], shared.v[j], shared.mask_BxP)
                if in_kernel:
                    return lambda *qkv: decode_attention.step_attention(
                        qkv[0], keys, values, start, end, qkv[1], qkv[2], prompt
                    )
                return lambda *qkv: cached_attention(
                    qkv[0],
                    *(keys, values, old_visible),
                    *qkv[1:],
                    new_visible,
                    prompt,
                    keys_by_slot=by_slot,
                )

            if isinstance(i, int):  # an unrolled layer: its buffers directly
                return over(i)(q, k, v)
            return jax.lax.switch(i, [over(j) for j in range(cfg.num_layers)], q, k, v)

        def body(layer, x, i):
            # The new entries go out of the scan and are written after it (in place for a
            # donated or loop-carried cache): writing them before attending would copy the
            # layer's cache.
            new = {}

            def attend(q, k, v):
                key_axes = (0, 2, 1, 3) if by_slot else (0, 2, 3, 1)  # [B, K, L, Dh] or Dh, L
                new["k"] = k.transpose(key_axes).astype(cache.k[0].dtype)
                new["v"] = v.swapaxes(1, 2).astype(cache.v[0].dtype)  # [B, K, L, Dh]
                return attend_layer(i, q, k, v), None

            x, _ = layer(x, rope, attend)
            return sharding_lib.constrain_rows(x), (new["k"], new["v"])

        x = self._embed(tokens_BxL)
        if unroll >= cfg.num_layers:
            layers = self.layer_slices() if layers is None else layers
            news = []
            for j in range(cfg.num_layers):
                x, kv = body(layers[j], x, j)
                news.append(kv)
            new_k, new_v = (tuple(t) for t in zip(*news, strict=True))
        elif layers is None:
            # Rolled whatever `scan_unroll` says. XLA:CPU copies layer i's slice of the stacked
            # weights before its dots; unrolled over static slices it also copies every
            # layer's cache (the writes below are no longer ordered after the reads).
            layer_ids = jnp.arange(cfg.num_layers)
            x, (new_k, new_v) = self._scan(body, x, layer_ids, "none", unroll=1)
        else:
            # A rolled scan whose step runs layer i as branch i of a `switch`: each branch
            # reads its layer's own weights and cache where they lie, and every read is
            # done before the writes below.
            def run(j):
                return lambda x: body(layers[j], x, j)

            branches = [run(j) for j in range(cfg.num_layers)]
            x, (new_k, new_v) = jax.lax.scan(
                lambda x, i: jax.lax.switch(i, branches, x), x, jnp.arange(cfg.num_layers)
            )
        write = jax.lax.dynamic_update_slice
        key_at = (0, 0, index, 0) if by_slot else (0, 0, 0, index)
        keys = tuple(write(c, n, key_at) for c, n in zip(cache.k, new_k, strict=True))
        values = tuple(write(c, n, (0, 0, index, 0)) for c, n in zip(cache.v, new_v, strict=True))
        mask = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxL.astype(bool), (0, index))
        new_cache = cache.replace(k=keys, v=values, mask_BxS=mask, index=index + length)
        return self.final_norm(x), new_cache

    def in_compute_dtype(self) -> Transformer:
        """This model with every floating weight cast to the compute dtype.

        Every use of a weight casts it to the compute dtype, so the copy gives the same
        outputs bit for bit; a decode loop made over it casts once, not on every step (the
        identity when the weights are already in the compute dtype).
        """
        dtype = self.config.compute_dtype
        graphdef, state = nnx.split(self)

        def cast(w):
            return w.astype(dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w

        return nnx.merge(graphdef, jax.tree.map(cast, state))

    def unstacked_layers(self) -> tuple[DecoderLayer, ...] | None:
        """Each layer with its own copy of its weights, for a decode loop to close over, when
        `scan_unroll` unrolls every layer (-1, the tiny-CPU setting); None when the layers
        are scanned.

        Made once before the loop (one copy of the layer weights per rollout), these spare
        every decode step XLA:CPU's copy of each layer's slice of the stacked weights:
        the 8-layer `bench_sampler` model decodes 18–28% faster on CPU. The `switch` has
        one branch per layer, so the rollout's compile time grows with depth, which is
        why only the unrolled setting uses it.
        """
        if self.config.layers_per_scan_step < self.config.num_layers:
            return None
        return self.layer_slices()

    def layer_slices(self) -> tuple[DecoderLayer, ...]:
        """Each layer as a module of its own: static slices of the stacked weights."""
        graphdef, stacked = nnx.split(self.layers)
        return tuple(
            nnx.merge(graphdef, jax.tree.map(lambda t, i=i: t[i], stacked))
            for i in range(self.config.num_layers)
        )

    def logits_from_hidden(self, hidden_BxLxD: Array) -> Float[Array, "B L V"]:
        """fp32 logits from hidden states (fp32 accumulation in the head matmul)."""
        kernel = self.lm_head_kernel().astype(hidden_BxLxD.dtype)
        b, length, d = hidden_BxLxD.shape
        logits = jnp.matmul(
            hidden_BxLxD.reshape(b * length, d), kernel, preferred_element_type=jnp.float32
        )
        if decode_layouts.tensor_decoding():  # split by vocabulary, then by rows for the draw
            logits = sharding_lib.constrain_rows(decode_layouts.constrain_columns(logits))
        return logits.reshape(b, length, -1)

    def __call__(
        self,
        tokens_BxL: Int[Array, "B L"],
        positions_BxL: Int[Array, "B L"],
        mask_BxL: Array,
        cache: KVCache | None = None,
    ) -> tuple[Float[Array, "B L V"], KVCache | None]:
        """fp32 logits of a causal forward, or of new tokens written into `cache`."""
        if cache is None:
            hidden, _ = self.forward(tokens_BxL, positions_BxL, mask_BxL)
        else:
            hidden, cache = self.decode(tokens_BxL, positions_BxL, mask_BxL, cache)
        return self.logits_from_hidden(hidden), cache


def _repeat(x: Array, repeats: int) -> Array:
    """Rows repeated `repeats` times each (b·repeats + r)."""
    return x if repeats == 1 else jnp.repeat(x, repeats, axis=0)


def compute_logits(
    model: Transformer, input_ids: Int[Array, "B L"], attention_mask: Array
) -> Float[Array, "B L V"]:
    """fp32 logits for a (left-padded) batch; positions come from the attention mask.

    Logits at padding positions are finite but meaningless.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask)
    logits, _ = model(input_ids, positions_from_mask(attention_mask), attention_mask)
    return logits
