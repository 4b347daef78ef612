"""Where the rollout's decode loop reads the weights, and how it splits its activations.

Three layouts (`DECODE_LAYOUTS`, `sampling.decode_weights`): the training layout as given,
a whole copy on every device, or a copy split over every device by hidden units
(`DECODE_TENSOR_RULES`), whose decode moves activations instead of weights under
`tensor_decode`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aapo_jax.sharding import (
    MESH_AXES,
    REPLICATED,
    ROW_AXES,
    constrain_rows,
    device_memory_bytes,
    row_parallel,
    rows_over,
    state_shardings,
)

# `sampling.decode_weights="auto"` decodes from copies of the weights (every decoded model
# in the compute dtype, in the layout it picks) when they take at most this share of a
# device's memory, else from the training layout.
DECODE_WEIGHTS_SHARE = 0.5

# Where the rollout's decode loop reads the weights (`sampling.decode_weights`): "sharded",
# the training layout as given (XLA gathers what each step needs); "replicated", a copy on
# every device; "tensor", a copy split by `DECODE_TENSOR_RULES`.
DECODE_LAYOUTS = ("sharded", "replicated", "tensor")

# The "tensor" decode layout: the MLP's hidden dimension, the vocabulary (embedding and LM
# head) and the attention projections' head_dim split over every device, the norms whole.
# A decode step then reads 1/devices of every matmul weight, whatever the head counts, and
# attention runs on each device's own rows and cache; the projections, the MLP and the LM
# head exchange only activations ([rows, D] in, [rows, D] / [rows, V] out, and each
# layer's q, k, v and attention output between head_dim slices and rows), under
# `tensor_decode`.
DECODE_TENSOR_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", MESH_AXES),
    ("layers", None),
    ("vocab", MESH_AXES),
    ("embed", None),
    ("q_heads", None),
    ("kv_heads", None),
    ("head_dim", MESH_AXES),
    ("mlp", MESH_AXES),
    ("norm", None),
    ("length", None),
)

_TENSOR_DECODE = contextvars.ContextVar("tensor_decode", default=False)


@contextlib.contextmanager
def tensor_decode(active: bool = True):
    """While tracing inside it, `constrain_columns` splits activations' last dimension and
    `constrain_rows` splits rows over every device (`decode_row_axes`)."""
    token = _TENSOR_DECODE.set(active)
    try:
        with rows_over(decode_row_axes("tensor" if active else "sharded")):
            yield
    finally:
        _TENSOR_DECODE.reset(token)


def tensor_decoding() -> bool:
    """Whether a trace is inside `tensor_decode`."""
    return _TENSOR_DECODE.get()


def _tensor_decode_mesh():
    """The abstract mesh a trace inside `tensor_decode` partitions over (under
    `activation_mesh`, outside `shard_map`), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if not _TENSOR_DECODE.get() or mesh.empty or mesh.manual_axes:
        return None
    return mesh


def constrain_columns(x: jax.Array) -> jax.Array:
    """Under `tensor_decode` (and `activation_mesh`): `x`'s last dimension (the MLP hidden
    units, the vocabulary) split over every device and its rows whole, so that a matmul
    with weights split that way by `DECODE_TENSOR_RULES` moves the activations, not the
    weights. Otherwise, or when the devices do not divide it, `x` as it is."""
    mesh = _tensor_decode_mesh()
    if mesh is None:
        return x
    axes = tuple(a for a in MESH_AXES if a in mesh.shape and mesh.shape[a] > 1)
    ways = math.prod(mesh.shape[a] for a in axes)
    if not axes or x.shape[-1] % ways:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*([None] * (x.ndim - 1)), axes))


def constrain_decode_rows(x: jax.Array) -> jax.Array:
    """Under `tensor_decode`: `constrain_rows(x)` (each row on the device that holds its
    cache); otherwise `x` as it is."""
    return constrain_rows(x) if _TENSOR_DECODE.get() else x


def constrain_decode_whole(x: jax.Array) -> jax.Array:
    """Under `tensor_decode` (and `activation_mesh`): `x` whole on every device (the rows
    gathered once, for the several projections that read them); otherwise `x` as it is."""
    if _tensor_decode_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec())


def decode_layout(
    choice: str, mesh: Mesh | None, copy_bytes: Callable[[str], int], prompts: int
) -> str:
    """The layout the rollout decodes from (`DECODE_LAYOUTS`).

    `choice` is `sampling.decode_weights`; `copy_bytes(layout)` the per-device bytes of the
    decode copies in that layout; `prompts` the prompt rows. A single device, or no mesh,
    decodes from the weights as given ("sharded"). On a data-parallel mesh
    (`row_parallel`: each device runs its own loop over whole weights) "tensor" becomes
    "replicated". "auto": "tensor" on a mesh that splits the weights, "replicated" on a
    data-parallel one, when the copies fit `DECODE_WEIGHTS_SHARE` of one device's memory
    (`device_memory_bytes`), else "sharded".
    """
    if choice not in ("auto", *DECODE_LAYOUTS):
        raise ValueError(f"sampling.decode_weights={choice!r}: expected 'auto' or {DECODE_LAYOUTS}")
    if mesh is None or mesh.size == 1 or choice == "sharded":
        return "sharded"
    whole = row_parallel(mesh, prompts)
    if choice != "auto":
        return "replicated" if whole else choice
    layout = "replicated" if whole else "tensor"
    here = jax.process_index()  # a device of this process: another's has no memory_stats
    device = next((d for d in mesh.devices.flat if d.process_index == here), None)
    memory, _ = device_memory_bytes(mesh.devices.flat[0] if device is None else device)
    return layout if copy_bytes(layout) <= DECODE_WEIGHTS_SHARE * memory else "sharded"


def layout_bytes(params: nnx.State, mesh: Mesh, layout: str, itemsize: int) -> int:
    """Per-device bytes of `params`' decode copies in a layout ("replicated" or "tensor",
    placed by `decode_shardings`): floating weights at `itemsize` bytes each."""
    total = 0
    variables = jax.tree.leaves(
        decode_shardings(params, mesh, layout), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    values = jax.tree.leaves(params)
    for value, variable in zip(values, variables, strict=True):
        floating = jnp.issubdtype(value.dtype, jnp.floating)
        size = itemsize if floating else value.dtype.itemsize
        total += math.prod(variable.value.shard_shape(value.shape)) * size
    return total


def decode_shardings(tree, mesh: Mesh, layout: str):
    """NamedShardings of a model state's variables in a decode layout ("replicated": all
    whole; "tensor": `DECODE_TENSOR_RULES`)."""
    if layout == "tensor":
        return state_shardings(tree, mesh, DECODE_TENSOR_RULES)
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, REPLICATED)),
        tree,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def decode_row_axes(layout: str) -> tuple[str, ...]:
    """The mesh axes a decode splits its rows and their caches over: every axis in the
    "tensor" layout (each device attends for its own rows while the weights are split
    over all devices, so a tensor axis holds no copy of another's rows), else data × fsdp
    (`ROW_AXES`; in the training layout the model's tensor axis splits the heads)."""
    return MESH_AXES if layout == "tensor" else ROW_AXES


def decode_row_ways(mesh: Mesh | None, rows: int, layout: str) -> int:
    """The devices a decode in `layout` splits `rows` over: those of `decode_row_axes` when
    they divide the rows, else 1 (XLA places them; a prompt batch the devices do not
    divide is kept whole on each)."""
    if mesh is None:
        return 1
    ways = math.prod(mesh.shape[a] for a in decode_row_axes(layout))
    return ways if rows % ways == 0 else 1
