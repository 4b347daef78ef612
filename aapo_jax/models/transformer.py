"""Flax NNX decoder for the Qwen2 / Llama-3 families with an explicit KV cache."""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from aapo_jax.models.config import ModelConfig

# A large finite negative instead of -inf keeps masked scores out of NaN territory.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@flax.struct.dataclass
class KVCache:
    """Fixed-size key/value buffers for every layer, written left to right.

    All rows share one write index because batches are left-padded: slot `s`
    holds the same step for every row. `mask_BxS` marks the slots that hold a
    real token (not padding, not yet written). Both are head-major so attention
    reads them without a relayout every step, and keys are stored transposed
    ([B, K, Dh, S]): a decode step's q·k then reduces over a non-minor axis and
    vectorises along the slots, about 2.7× faster on CPU than reducing over Dh.
    """

    k: tuple[Float[Array, "B K Dh S"], ...]
    v: tuple[Float[Array, "B K S Dh"], ...]
    mask_BxS: Bool[Array, "B S"]
    index: Int[Array, ""]

    @property
    def size(self) -> int:
        return self.mask_BxS.shape[1]

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


def visibility(query_slot_L: Array, key_mask_BxS: Array) -> Bool[Array, "B L S"]:
    """Which key slots each query sees: causal over real slots, plus its own slot.

    The own slot keeps a padding query (no real key before it) attending to
    itself only, never to later tokens.
    """
    key_slot = jnp.arange(key_mask_BxS.shape[1])
    causal_LxS = key_slot[None, :] <= query_slot_L[:, None]
    self_LxS = key_slot[None, :] == query_slot_L[:, None]
    return (causal_LxS[None] & key_mask_BxS[:, None, :]) | self_LxS[None]


def init_cache(config: ModelConfig, batch_size: int, cache_size: int, dtype=None) -> KVCache:
    """An empty cache of `cache_size` slots per row (keys/values in `dtype`, default compute)."""
    dtype = config.compute_dtype if dtype is None else dtype
    k_shape = (batch_size, config.num_kv_heads, config.head_dim, cache_size)
    v_shape = (batch_size, config.num_kv_heads, cache_size, config.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(k_shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(v_shape, dtype) for _ in range(config.num_layers)),
        mask_BxS=jnp.zeros((batch_size, cache_size), bool),
        index=jnp.zeros((), jnp.int32),
    )


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
    y = x.reshape(-1, math.prod(contract)) @ kernel.reshape(math.prod(contract), -1)
    return y.reshape(*lead, *out)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm with fp32 statistics, scaled after casting back (transformers order)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        self.scale = _param(rngs, (config.hidden_size,), ("norm",), config.weight_dtype, "ones")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale.value.astype(x.dtype) * x32.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention over the (optionally cached) keys and values."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        dt = config.weight_dtype
        self.config = config
        self.q_kernel = _param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), dt)
        self.k_kernel = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), dt)
        self.v_kernel = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), dt)
        self.o_kernel = _param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), dt)
        if config.qkv_bias:
            self.q_bias = _param(rngs, (h, dh), ("q_heads", "head_dim"), dt, "zeros")
            self.k_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), dt, "zeros")
            self.v_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), dt, "zeros")
        if config.o_bias:
            self.o_bias = _param(rngs, (d,), ("embed",), dt, "zeros")

    def _project(self, x, kernel, bias_name):
        y = dense(x, kernel.value.astype(x.dtype))
        if self.config.qkv_bias:
            y = y + getattr(self, bias_name).value.astype(x.dtype)
        return y

    def __call__(
        self,
        x_BxLxD: Array,
        rope: tuple[Array, Array],
        visible_BxLxS: Array,
        cache_kv: tuple[Array, Array] | None,
        cache_index: Array | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        q = apply_rope(self._project(x_BxLxD, self.q_kernel, "q_bias"), rope)
        k = apply_rope(self._project(x_BxLxD, self.k_kernel, "k_bias"), rope)
        v = self._project(x_BxLxD, self.v_kernel, "v_bias")
        seq_len = x_BxLxD.shape[1]
        v = v.swapaxes(1, 2)  # [B, K, L, Dh]
        if cache_kv is None:
            keys, values = k.swapaxes(1, 2), v  # keys [B, K, L, Dh]
        else:
            k_t = k.transpose(0, 2, 3, 1).astype(cache_kv[0].dtype)  # [B, K, Dh, L]
            keys = jax.lax.dynamic_update_slice(cache_kv[0], k_t, (0, 0, 0, cache_index))
            values = jax.lax.dynamic_update_slice(
                cache_kv[1], v.astype(cache_kv[1].dtype), (0, 0, cache_index, 0)
            )

        b, group = x_BxLxD.shape[0], cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, seq_len, cfg.num_kv_heads, group, cfg.head_dim)
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        if seq_len == 1 and cache_kv is not None:
            # Decode: one query per row. Broadcast-multiply-reduce over Dh (a non-minor axis
            # of the transposed keys) fuses into one pass over the cache, where a dot would
            # run B·K tiny matrix-vector products.
            q32 = q[:, 0].astype(jnp.float32)  # [B, K, G, Dh]
            scores = jnp.sum(q32[..., None] * keys[:, :, None], axis=-2)[:, :, :, None]
        else:
            # Queries of one KV head as one [G·L, Dh] block: plain batched GEMMs over (B, K),
            # forward and backward, with no relayout of the keys.
            q = q.transpose(0, 2, 3, 1, 4).reshape(b, cfg.num_kv_heads, group * seq_len, -1)
            spec = "bkqd,bksd->bkqs" if cache_kv is None else "bkqd,bkds->bkqs"
            scores = jnp.einsum(spec, q, keys, preferred_element_type=jnp.float32)
            scores = scores.reshape(b, cfg.num_kv_heads, group, seq_len, -1)
        scores = scores / np.float32(math.sqrt(cfg.head_dim))
        scores = jnp.where(visible_BxLxS[:, None, None], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1)
        if seq_len == 1 and cache_kv is not None:
            out = jnp.sum(probs[:, :, :, 0, :, None] * values[:, :, None], axis=-2)[:, None]
            out = out.astype(x_BxLxD.dtype)
        else:
            probs = probs.astype(x_BxLxD.dtype).reshape(b, cfg.num_kv_heads, group * seq_len, -1)
            out = jnp.einsum("bkqs,bksd->bkqd", probs, values)
            out = out.reshape(b, cfg.num_kv_heads, group, seq_len, -1).transpose(0, 3, 1, 2, 4)
        out = out.reshape(b, seq_len, cfg.num_heads, cfg.head_dim)
        y = dense(out, self.o_kernel.value.astype(out.dtype), n_in=2)
        if cfg.o_bias:
            y = y + self.o_bias.value.astype(y.dtype)
        return y, (None if cache_kv is None else (keys, values))


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, dt = config.hidden_size, config.intermediate_size, config.weight_dtype
        self.config = config
        self.gate_kernel = _param(rngs, (d, f), ("embed", "mlp"), dt)
        self.up_kernel = _param(rngs, (d, f), ("embed", "mlp"), dt)
        self.down_kernel = _param(rngs, (f, d), ("mlp", "embed"), dt)
        if config.mlp_bias:
            self.gate_bias = _param(rngs, (f,), ("mlp",), dt, "zeros")
            self.up_bias = _param(rngs, (f,), ("mlp",), dt, "zeros")
            self.down_bias = _param(rngs, (d,), ("embed",), dt, "zeros")

    def __call__(self, x_BxLxD: Array) -> Array:
        def project(x, name):
            y = dense(x, getattr(self, f"{name}_kernel").value.astype(x.dtype))
            if self.config.mlp_bias:
                y = y + getattr(self, f"{name}_bias").value.astype(x.dtype)
            return y

        hidden = jax.nn.silu(project(x_BxLxD, "gate")) * project(x_BxLxD, "up")
        return project(hidden, "down")


class DecoderLayer(nnx.Module):
    """Pre-norm attention block followed by a pre-norm SwiGLU block."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, rope, visible, cache_kv, cache_index):
        attn_out, new_kv = self.attn(self.input_norm(x), rope, visible, cache_kv, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return x, new_kv


class Transformer(nnx.Module):
    """Decoder-only causal LM (Qwen2 / Qwen2.5 / Llama-3.x).

    Prefill and single-token decode are the same call: pass a `KVCache` and the
    new tokens are written at `cache.index`, attending to every earlier real
    slot. Without a cache it is a plain causal forward over `tokens_BxL`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = _param(
            rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config.weight_dtype
        )
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(
                rngs,
                (config.hidden_size, config.vocab_size),
                ("embed", "vocab"),
                config.weight_dtype,
            )

    def lm_head_kernel(self) -> Float[Array, "D V"]:
        """The output projection [D, V] (the transposed embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed.value.T
        return self.lm_head.value

    def hidden_states(
        self,
        tokens_BxL: Int[Array, "B L"],
        positions_BxL: Int[Array, "B L"],
        mask_BxL: Array,
        cache: KVCache | None = None,
        *,
        remat: bool | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Final-normed hidden states [B, L, D] (compute dtype) and the updated cache.

        `remat` rematerialises each layer in the backward pass; the default is
        `config.remat` without a cache and off with one (sampling never takes a
        gradient). A training forward that runs through a cache passes it explicitly.
        """
        cfg = self.config
        if remat is None:
            remat = cfg.remat and cache is None
        x = jnp.take(self.embed.value, tokens_BxL, axis=0).astype(cfg.compute_dtype)
        mask_BxL = mask_BxL.astype(bool)
        if cache is None:
            cache_mask = None
            visible = visibility(jnp.arange(tokens_BxL.shape[1]), mask_BxL)
        else:
            cache_mask = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxL, (0, cache.index))
            visible = visibility(cache.index + jnp.arange(tokens_BxL.shape[1]), cache_mask)
        rope = rope_tables(positions_BxL, rope_inv_freq(cfg))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            index = None if cache is None else cache.index
            call = nnx.remat(DecoderLayer.__call__) if remat else DecoderLayer.__call__
            x, new_kv = call(layer, x, rope, visible, kv, index)
            if new_kv is not None:
                new_k.append(new_kv[0])
                new_v.append(new_kv[1])
        x = self.final_norm(x)
        if cache is None:
            return x, None
        new_cache = KVCache(
            k=tuple(new_k),
            v=tuple(new_v),
            mask_BxS=cache_mask,
            index=cache.index + tokens_BxL.shape[1],
        )
        return x, new_cache

    def logits_from_hidden(self, hidden_BxLxD: Array) -> Float[Array, "B L V"]:
        """fp32 logits from hidden states (fp32 accumulation in the head matmul)."""
        kernel = self.lm_head_kernel().astype(hidden_BxLxD.dtype)
        b, length, d = hidden_BxLxD.shape
        logits = jnp.matmul(
            hidden_BxLxD.reshape(b * length, d), kernel, preferred_element_type=jnp.float32
        )
        return logits.reshape(b, length, -1)

    def __call__(
        self,
        tokens_BxL: Int[Array, "B L"],
        positions_BxL: Int[Array, "B L"],
        mask_BxL: Array,
        cache: KVCache | None = None,
    ) -> tuple[Float[Array, "B L V"], KVCache | None]:
        hidden, cache = self.hidden_states(tokens_BxL, positions_BxL, mask_BxL, cache)
        return self.logits_from_hidden(hidden), cache


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
