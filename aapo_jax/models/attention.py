"""Causal grouped-query attention over a key mask: dense, query-chunked, cuDNN flash, splash."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, Bool, Float

from aapo_jax import sharding

# A large finite negative instead of -inf keeps masked scores out of NaN territory.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Pallas TPU kernels tile the sequence axes in lanes of 128.
_SPLASH_LANES = 128
# The largest head dim the splash kernel was compiled with (v5e, forward and backward; every
# size tried from 8 to 512 compiled, 80, 96 and 100 included: blocks span the whole Dh).
_SPLASH_MAX_HEAD_DIM = 512
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# The mesh axis that splits heads (see `aapo_jax.sharding.LOGICAL_RULES`).
_HEAD_AXIS = "tensor"

# impl(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, key_mask_BxS, query_offset, block_size) -> out_BxLxHxDh
AttentionFn = Callable[[Array, Array, Array, Array, int, int], Array]


def visibility(query_slot_L: Array, key_mask_BxS: Array) -> Bool[Array, "B L S"]:
    """Which key slots each query sees: causal over real slots, plus its own slot.

    Args:
      query_slot_L: the key slot of each query, int [L].
      key_mask_BxS: which key slots hold a real token, bool [B, S].

    Returns:
      bool [B, L, S]: `(key_mask[b, s] and s <= slot[l]) or s == slot[l]`. The own slot
      keeps a padding query (no real key before it) attending to itself only.
    """
    key_slot = jnp.arange(key_mask_BxS.shape[1])
    causal_LxS = key_slot[None, :] <= query_slot_L[:, None]
    self_LxS = key_slot[None, :] == query_slot_L[:, None]
    return (causal_LxS[None] & key_mask_BxS[:, None, :]) | self_LxS[None]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(x: Array, axis: int, size: int) -> Array:
    """`x` zero-padded (False for bool) at the end of `axis` up to `size`."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def dense_attention(
    q_BxLxHxDh: Float[Array, "B L H Dh"],
    k_BxSxKxDh: Float[Array, "B S K Dh"],
    v_BxSxKxDh: Float[Array, "B S K Dh"],
    visible_BxLxS: Bool[Array, "B L S"],
) -> Float[Array, "B L H Dh"]:
    """Softmax attention with an explicit visibility mask, materialising the scores.

    out = softmax(where(visible, q·kᵀ / √Dh, -0.7·f32max)) @ v, with q·k accumulated in
    fp32, the softmax in fp32 and the probabilities cast to q's dtype for the value
    matmul. Queries of one KV head form one [G·L, Dh] block, so both matmuls are plain
    batched GEMMs over (B, K), forward and backward, with no relayout of the keys.

    Args:
      q_BxLxHxDh: queries; head h reads KV head h // G (G = H / K).
      k_BxSxKxDh: keys (cast to q's dtype).
      v_BxSxKxDh: values (cast to q's dtype).
      visible_BxLxS: which keys each query attends to (at least one per row).

    Returns:
      The attention output [B, L, H, Dh] in q's dtype.
    """
    b, length, heads, head_dim = q_BxLxHxDh.shape
    kv_heads = k_BxSxKxDh.shape[2]
    group = heads // kv_heads
    dtype = q_BxLxHxDh.dtype
    keys = k_BxSxKxDh.swapaxes(1, 2).astype(dtype)  # [B, K, S, Dh]
    values = v_BxSxKxDh.swapaxes(1, 2).astype(dtype)
    q = q_BxLxHxDh.reshape(b, length, kv_heads, group, head_dim)
    q = q.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, group * length, head_dim)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, keys, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv_heads, group, length, -1)
    scores = scores / np.float32(math.sqrt(head_dim))
    scores = jnp.where(visible_BxLxS[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = probs.astype(dtype).reshape(b, kv_heads, group * length, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, values)
    out = out.reshape(b, kv_heads, group, length, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, length, heads, head_dim).astype(dtype)


def _xla(q, k, v, key_mask, query_offset, block_size):
    del block_size
    slots = query_offset + jnp.arange(q.shape[1])
    return dense_attention(q, k, v, visibility(slots, key_mask))


def _chunked(q, k, v, key_mask, query_offset, block_size):
    b, length, heads, head_dim = q.shape
    if length <= block_size:
        # One chunk is the dense path itself: no map, no checkpoint, identical numerics.
        return _xla(q, k, v, key_mask, query_offset, block_size)
    chunks = -(-length // block_size)
    q_pad = _pad_axis(q, 1, chunks * block_size)
    q_NxBxCxHxDh = jnp.moveaxis(q_pad.reshape(b, chunks, block_size, heads, head_dim), 1, 0)
    starts_N = query_offset + block_size * jnp.arange(chunks)

    # Checkpointed so the backward pass recomputes one chunk's [B, H, C, S] scores at a
    # time instead of keeping every chunk's probabilities from the forward. The padded
    # tail queries (slots past the real ones) are finite: masked scores are finite too.
    @functools.partial(jax.checkpoint, prevent_cse=False)  # CSE is harmless inside a map
    def one_chunk(args):
        q_chunk, start = args
        visible = visibility(start + jnp.arange(block_size), key_mask)
        return dense_attention(q_chunk, k, v, visible)

    out = jax.lax.map(one_chunk, (q_NxBxCxHxDh, starts_N))
    out = jnp.moveaxis(out, 0, 1).reshape(b, chunks * block_size, heads, head_dim)
    return out[:, :length]


def cudnn_arguments(
    q_BxLxHxDh: Float[Array, "B L H Dh"],
    k_BxSxKxDh: Float[Array, "B S K Dh"],
    v_BxSxKxDh: Float[Array, "B S K Dh"],
    key_mask_BxS: Bool[Array, "B S"],
    query_offset: int,
) -> tuple[tuple[Array, Array, Array], dict]:
    """Arguments of `jax.nn.dot_product_attention` that reproduce `visibility` exactly.

    cuDNN's own padding masks (`query_seq_lengths` / `key_value_seq_lengths`) assume
    right padding; our rows are left-padded, so the visibility goes in as a boolean
    mask [B, 1, L', S'] (broadcast over heads; cuDNN turns it into an additive bias).
    `is_causal` is added when `query_offset` is 0: the mask already implies it under
    either diagonal alignment, and it lets the kernel skip the blocks above the diagonal.
    L and S are padded to even lengths (the cuDNN backward with a bias needs them) and S
    to cover the padded queries' own slots, so no row is fully masked.

    Args:
      q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, key_mask_BxS, query_offset: as in `attend`.

    Returns:
      `((q, k, v), kwargs)` for `jax.nn.dot_product_attention(q, k, v, **kwargs)`; its
      output keeps the padded query length (slice back to L).
    """
    length = q_BxLxHxDh.shape[1]
    q_len = _round_up(length, 2)
    kv_len = _round_up(max(k_BxSxKxDh.shape[1], query_offset + q_len), 2)
    q = _pad_axis(q_BxLxHxDh, 1, q_len)
    k, v = (_pad_axis(x.astype(q.dtype), 1, kv_len) for x in (k_BxSxKxDh, v_BxSxKxDh))
    key_mask = _pad_axis(key_mask_BxS, 1, kv_len)
    mask_Bx1xLxS = visibility(query_offset + jnp.arange(q_len), key_mask)[:, None]
    return (q, k, v), {"mask": mask_Bx1xLxS, "is_causal": query_offset == 0}


def _cudnn(q, k, v, key_mask, query_offset, block_size):
    del block_size
    if q.dtype not in _CUDNN_DTYPES:
        raise ValueError(
            f"attend(implementation='cudnn') needs bfloat16 or float16 queries, got {q.dtype}; "
            "use 'chunked' for float32."
        )
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 256:
        raise ValueError(
            f"attend(implementation='cudnn'): head_dim={head_dim} must be a multiple of 8 and "
            "at most 256 (128 before Hopper)."
        )
    args, kwargs = cudnn_arguments(q, k, v, key_mask, query_offset)
    out = jax.nn.dot_product_attention(*args, **kwargs, implementation="cudnn")
    return out[:, : q.shape[1]]


def splash_problem(dtype, head_dim: int, block_size: int) -> str | None:
    """Why the splash kernel cannot run these arguments (None when it can).

    Args:
      dtype: the compute dtype of the queries.
      head_dim: Dh.
      block_size: the kernel's query and key block size.

    Returns:
      A sentence naming the bad argument, or None.
    """
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"the compute dtype must be bfloat16 or float32, got {jnp.dtype(dtype)}"
    if head_dim > _SPLASH_MAX_HEAD_DIM:
        return f"head_dim={head_dim} is above {_SPLASH_MAX_HEAD_DIM}, the largest one tested"
    if block_size % _SPLASH_LANES:
        return f"block_size={block_size} must be a multiple of {_SPLASH_LANES}"
    return None


def _over_mesh(fn, batch: int, heads: int, kv_heads: int, n_args: int):
    """`fn(q, k, v, *segment_ids)` per device when the context mesh has auto axes.

    XLA cannot partition a Pallas kernel: under an abstract mesh with automatic axes the
    kernel runs in `shard_map`, rows split over the row axes that divide them and heads
    over the tensor axis when it divides both H and K (other axes replicate). Inside a
    `shard_map` (manual axes) or without a mesh, `fn` runs as is.
    """
    auto = sharding.auto_axes()
    if not auto:
        return fn
    mesh = jax.sharding.get_abstract_mesh()
    rows, ways = [], 1
    for axis in sharding.ROW_AXES:
        size = mesh.shape.get(axis, 1)
        if axis in auto and size > 1 and batch % (ways * size) == 0:
            rows.append(axis)
            ways *= size
    head_axis = None
    size = mesh.shape.get(_HEAD_AXIS, 1)
    if _HEAD_AXIS in auto and size > 1 and heads % size == 0 and kv_heads % size == 0:
        head_axis = _HEAD_AXIS
    row_spec = tuple(rows) or None
    qkv = PartitionSpec(row_spec, head_axis, None, None)
    segment = PartitionSpec(row_spec, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv) + (segment,) * n_args,
        out_specs=qkv,
        axis_names=frozenset(auto),
        # The kernel's outputs declare no varying axes, which a checked shard_map refuses.
        check_vma=False,
    )


def _varying_axes(x: Array) -> frozenset:
    """The manual mesh axes `x` varies over (empty outside a checked `shard_map`)."""
    manual_axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(manual_axis_type, "varying", ()))


def _splash(q, k, v, key_mask, query_offset, block_size, *, interpret: bool = False):
    """The splash kernel; `interpret=True` runs it in the Pallas interpreter (any backend)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, length, heads, head_dim = q.shape
    problem = splash_problem(q.dtype, head_dim, block_size)
    if problem is not None:
        raise ValueError(f"attend(implementation='splash'): {problem}.")
    if _varying_axes(q):
        raise ValueError(
            "attend(implementation='splash') inside a jax.shard_map with check_vma=True: the "
            "Pallas kernel declares no varying axes for its outputs; pass check_vma=False to "
            "that shard_map or use implementation='chunked'."
        )
    # Blocks no longer than the (lane-rounded) sequences; sequences padded to whole blocks,
    # keys far enough that every padded query's own slot exists (so no row is all masked).
    block_q = min(block_size, _round_up(length, _SPLASH_LANES))
    q_len = _round_up(length, block_q)
    kv_need = max(k.shape[1], query_offset + q_len)
    block_kv = min(block_size, _round_up(kv_need, _SPLASH_LANES))
    kv_len = _round_up(kv_need, block_kv)

    # The kernel takes no scale: fold 1/√Dh into q (one rounding in q's dtype).
    scale = np.float32(1.0 / math.sqrt(head_dim))
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q_BxHxLxDh = _pad_axis(q, 1, q_len).swapaxes(1, 2)
    k_BxKxSxDh, v_BxKxSxDh = (
        _pad_axis(x.astype(q.dtype), 1, kv_len).swapaxes(1, 2) for x in (k, v)
    )
    # Segment ids: a query sees keys of its own slot's kind (real or padding) at or before
    # it. For a real query that is exactly `visibility`; a padding query still sees itself.
    kv_segment_BxS = _pad_axis(key_mask, 1, kv_len).astype(jnp.int32)
    q_segment_BxL = kv_segment_BxS[:, query_offset : query_offset + q_len]
    block_sizes = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )

    def per_device(q, k, v, q_segment, kv_segment):
        causal = splash.CausalMask((q_len, kv_len), offset=query_offset)
        mask = splash.MultiHeadMask(tuple(causal for _ in range(q.shape[1])))
        kernel = splash.make_splash_mha_single_device(
            mask, block_sizes=block_sizes, interpret=interpret
        )
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q_segment, kv_segment))

    run = _over_mesh(per_device, b, heads, k.shape[2], n_args=2)
    out = run(q_BxHxLxDh, k_BxKxSxDh, v_BxKxSxDh, q_segment_BxL, kv_segment_BxS)
    return out.swapaxes(1, 2)[:, :length]


def choose_implementation(dtype, head_dim: int, block_size: int, backend: str | None = None) -> str:
    """What "auto" runs: splash on TPU, cuDNN flash on GPU, query-chunked XLA elsewhere.

    Each kernel only where it supports the arguments (splash: bf16/fp32, its head dims
    and block sizes, and not inside a `shard_map` with check_vma=True; cuDNN: bf16/fp16,
    head_dim a multiple of 8 up to 128), "chunked" otherwise.

    Args:
      dtype: the compute dtype.
      head_dim: Dh.
      block_size: `attend`'s block size.
      backend: the platform (default `jax.default_backend()` at trace time).

    Returns:
      The name of an implementation in `IMPLEMENTATIONS`.
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "tpu" and splash_problem(dtype, head_dim, block_size) is None:
        return "splash"
    supported_by_cudnn = jnp.dtype(dtype) in map(jnp.dtype, _CUDNN_DTYPES)
    if backend in ("gpu", "cuda") and supported_by_cudnn and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "chunked"


def _auto(q, k, v, key_mask, query_offset, block_size):
    name = choose_implementation(q.dtype, q.shape[-1], block_size)
    if name == "splash" and _varying_axes(q):
        name = "chunked"  # a checked shard_map refuses the kernel (see `_splash`)
    return IMPLEMENTATIONS[name](q, k, v, key_mask, query_offset, block_size)


IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "auto": _auto,
    "xla": _xla,
    "chunked": _chunked,
    "cudnn": _cudnn,
    "splash": _splash,
}


def _check_arguments(q, k, v, key_mask, query_offset, implementation, block_size) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attend: implementation={implementation!r} is not one of {tuple(IMPLEMENTATIONS)}."
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"attend: block_size must be a positive int, got {block_size!r}.")
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(
            f"attend: q must be [B, L, H, Dh] and k, v [B, S, K, Dh]; got q {q.shape}, k {k.shape}."
        )
    b, length, heads, head_dim = q.shape
    kv_b, kv_len, kv_heads, kv_dim = k.shape
    if v.shape != k.shape:
        raise ValueError(f"attend: v.shape={v.shape} must equal k.shape={k.shape}.")
    if kv_b != b or kv_dim != head_dim:
        raise ValueError(
            f"attend: k.shape={k.shape} must share batch and head_dim with q.shape={q.shape}."
        )
    if heads % kv_heads:
        raise ValueError(
            f"attend: q heads H={heads} must be a multiple of k heads K={kv_heads} (query head h "
            "reads KV head h // (H / K))."
        )
    if key_mask.shape != (b, kv_len):
        raise ValueError(f"attend: key_mask.shape={key_mask.shape} must be (B, S)={(b, kv_len)}.")
    if isinstance(query_offset, bool) or not isinstance(query_offset, int) or query_offset < 0:
        raise ValueError(f"attend: query_offset must be a static int ≥ 0, got {query_offset!r}.")
    if query_offset + length > kv_len:
        raise ValueError(
            f"attend: query_offset + L = {query_offset} + {length} exceeds the S={kv_len} key "
            "slots (query l sits at key slot query_offset + l)."
        )


def attend(
    q_BxLxHxDh: Float[Array, "B L H Dh"],
    k_BxSxKxDh: Float[Array, "B S K Dh"],
    v_BxSxKxDh: Float[Array, "B S K Dh"],
    key_mask_BxS: Bool[Array, "B S"],
    *,
    query_offset: int = 0,
    implementation: str = "xla",
    block_size: int = 512,
) -> Float[Array, "B L H Dh"]:
    """Causal grouped-query attention of L queries over S key slots.

    Query l sits at key slot s_q = query_offset + l and sees slot s iff
    `(key_mask[b, s] and s <= s_q) or s == s_q`; scores are q·k / √Dh accumulated in
    fp32, softmax in fp32 over the visible slots. Outputs at queries whose own slot is
    padding are unspecified but finite.

    Implementations (`IMPLEMENTATIONS`):
      "xla": dense, materialises the fp32 [B, H, L, S] scores (the reference).
      "chunked": "xla" over query chunks of `block_size` under `lax.map`, each chunk
        rematerialised in the backward pass: O(B·H·block·S) scores live at a time.
        Exactly "xla" when L <= block_size.
      "cudnn": cuDNN flash attention (GPU; bf16/fp16; head_dim a multiple of 8 up to
        128, 256 from Hopper), the visibility passed as a [B, 1, L, S] mask.
      "splash": the Pallas TPU splash kernel (bf16/fp32; head_dim <= 512; block_size a
        multiple of 128, 1024 at most on v5e's VMEM), padding as segment ids. Under an abstract mesh
        with automatic axes it runs in `shard_map` (rows over data×fsdp, heads over
        tensor); trace the caller under `jax.sharding.use_abstract_mesh`.
      "auto": splash on TPU, cudnn on GPU, chunked elsewhere (`choose_implementation`).

    Args:
      q_BxLxHxDh: queries in the compute dtype; head h reads KV head h // (H / K).
      k_BxSxKxDh: keys (cast to q's dtype).
      v_BxSxKxDh: values (cast to q's dtype).
      key_mask_BxS: which key slots hold a real token.
      query_offset: static key slot of query 0 (query_offset + L <= S).
      implementation: a name in `IMPLEMENTATIONS`.
      block_size: query chunk ("chunked") or kernel block ("splash") size.

    Returns:
      The attention output [B, L, H, Dh] in q's dtype.
    """
    _check_arguments(
        q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, key_mask_BxS, query_offset, implementation, block_size
    )
    key_mask = key_mask_BxS.astype(bool)
    impl = IMPLEMENTATIONS[implementation]
    return impl(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, key_mask, query_offset, block_size)
