"""Device mesh (data, fsdp, tensor), logical-axis rules, batch placement, device memory and
data parallelism. The rollout's decode layouts: `aapo_jax.decode_layouts`."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXIS = "data"
# `data_parallel` specs: a pytree's leading (row) dimension split over the data axis, or
# the whole value on every device.
ROWS = PartitionSpec(DATA_AXIS)
REPLICATED = PartitionSpec()

GiB = 2**30
# Usable HBM per device as XLA:TPU reports it in RESOURCE_EXHAUSTED messages ("available HBM
# (Y G)", G = GiB), checked on libtpu's compile-only devices: v5e:2x4, v5p:2x2x2, v4:2x2x1
# (one device per TensorCore there, so 8 devices of ~16 GiB) and v6e:2x4.
TPU_MEMORY_BYTES = {
    "TPU v4": int(15.25 * GiB),
    "TPU v5 lite": int(15.75 * GiB),
    "TPU v5": int(95.74 * GiB),
    "TPU v6 lite": int(31.25 * GiB),
}

# Logical axis -> mesh axis (or axes). A dimension whose size the mesh axes do
# not divide is replicated instead (e.g. a single KV head on a 4-way tensor axis).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("length", None),
)


def use_cpu_devices(count: int | None = None) -> None:
    """Expose `count` JAX CPU devices (default: one per core); call before any JAX work.

    XLA:CPU runs each small op on a single core, so a model of a few million
    parameters leaves the other cores idle on one device; with one device per core
    a data-parallel mesh (`make_mesh(data=-1, fsdp=1)`) splits the rows over all of
    them. Only the CPU backend is affected (a GPU or TPU run keeps its devices).
    An explicit `--xla_force_host_platform_device_count` in XLA_FLAGS wins.
    """
    if count is None:
        count = os.cpu_count() or 1
    if count < 1:
        raise ValueError(f"use_cpu_devices: count must be ≥ 1, got {count}.")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", count)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(
                f"mesh shape (data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]}) does not "
                f"divide {len(devices)} devices: set --config.mesh.data/fsdp/tensor to sizes "
                "whose product divides them (-1: the rest)."
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) > len(devices):
        raise ValueError(
            f"mesh shape (data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]}) needs "
            f"{math.prod(shape)} devices, {len(devices)} are available."
        )
    # A fully specified smaller mesh uses the first devices (e.g. one device for a tiny run).
    devices = devices[: math.prod(shape)]
    # Auto axes: jit propagates shardings and `with_sharding_constraint` works.
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes on this mesh.

    Each mesh axis is used at most once; a dimension is left replicated when the
    product of its mesh axes does not divide it.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or size % ways:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The `logical_axes` metadata of a parameter (replicated when absent)."""
    metadata = variable.get_metadata()
    axes = metadata.get("logical_axes")
    if axes is None:
        return (None,) * np.ndim(variable.value)
    return tuple(axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.State:
    """A NamedSharding for every variable of an (abstract or concrete) NNX state."""

    def one(variable):
        spec = logical_to_spec(variable_axes(variable), variable.value.shape, mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.Module:
    """A copy of `model` with every parameter placed on `mesh` by the logical rules."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    return nnx.merge(graphdef, state)


ROW_AXES = ("data", "fsdp")


def activation_mesh(mesh: Mesh | None):
    """Context for tracing a program whose activations `constrain_rows` keeps row-sharded.

    `jax.sharding.use_abstract_mesh` may be entered inside `jit`; without a mesh it is a
    no-op context.
    """
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


_ROW_AXES = contextvars.ContextVar("row_axes", default=ROW_AXES)


@contextlib.contextmanager
def rows_over(axes: tuple[str, ...]):
    """While tracing inside it, `constrain_rows` splits rows over `axes` (mesh axis names)."""
    token = _ROW_AXES.set(tuple(axes))
    try:
        yield
    finally:
        _ROW_AXES.reset(token)


def constrain_rows(x: jax.Array, dim: int = 0) -> jax.Array:
    """`x` with dimension `dim` (rows) split over data × fsdp, the rest replicated; inside
    `rows_over(axes)` over those axes (the tensor decode layout: every axis).

    Only under `activation_mesh` and outside `shard_map` (where rows are already a
    device's own); rows the axes do not divide are left to XLA. Activations pinned to
    their rows keep the weights' fsdp sharding from spreading into them: the partitioner
    then all-gathers weights instead of all-reducing activations.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return x
    axes = row_axes(x.shape[dim])
    if not axes:
        return x
    spec = [None] * x.ndim
    spec[dim] = axes
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def auto_axes() -> tuple[str, ...]:
    """The context mesh's axes XLA still partitions automatically (not yet manual inside a
    `shard_map`); () without a context mesh. A Pallas kernel, which XLA cannot partition,
    runs in a `shard_map` over all of them, size-1 ones too: Mosaic refuses a partially
    manual context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)


def row_axes(rows: int) -> tuple[str, ...]:
    """The context mesh's axes that `constrain_rows` splits `rows` rows over now: data ×
    fsdp (inside `rows_over(axes)`: those axes), the ones of size > 1; () when they do not
    divide `rows` or there is no context mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a in _ROW_AXES.get() if a in mesh.shape and mesh.shape[a] > 1)
    if not axes or rows % math.prod(mesh.shape[a] for a in axes):
        return ()
    return axes


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) dimension over data × fsdp, replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def put(tree, shardings):
    """Place a pytree of values that every process holds in full onto global shardings.

    One process: `jax.device_put`. Several processes (after
    `jax.distributed.initialize()`): each process builds the same values (same
    seed, same checkpoint file) and contributes the slices its own devices hold
    (`jax.make_array_from_callback`); typed PRNG keys travel as their key data.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # already global: reshard
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.random.key_data(x)
            spec = PartitionSpec(*sharding.spec, *([None] * (data.ndim - len(sharding.spec))))
            data = one(data, NamedSharding(sharding.mesh, spec))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree):
    """NumPy copies of every (global) array in `tree`, whole, on every process.

    Arrays this process can read entirely are fetched directly; arrays spread over
    several processes are all-gathered (a collective: every process must call).
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def shard_batch(tree, mesh: Mesh):
    """Put host arrays (any pytree) on `mesh`, rows split over data × fsdp.

    Each array's leading dimension is split over the `data` and `fsdp` axes
    (`batch_sharding`), so every device computes on its own rows instead of
    every device computing the whole batch. With one process the arrays are the
    global batch, and one whose rows the axes do not divide evenly (or a scalar)
    is replicated. With several processes each passes its own rows (e.g. from a
    per-process data shard) and the global batch is their concatenation in
    process order; the rows must then divide evenly.
    """
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    processes = jax.process_count()

    def one(x):
        x = np.asarray(x)
        if processes > 1:
            if x.ndim == 0 or (x.shape[0] * processes) % rows:
                raise ValueError(
                    f"an array of shape {x.shape} per process cannot be split by rows over "
                    f"data × fsdp = {rows} devices across {processes} processes."
                )
            return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
        return jax.device_put(x, _rows_or_replicated(mesh, x))

    return jax.tree.map(one, tree)


def tree_shardings(tree, params: nnx.State, mesh: Mesh, rules=LOGICAL_RULES):
    """A NamedSharding for every leaf of `tree` (e.g. a whole train state).

    A leaf whose tree path ends with a parameter's path and has its shape (the
    parameter itself, the reference copy, AdamW's mu and nu) gets that
    parameter's sharding; every other leaf (step, rng, counters) is replicated.
    """
    by_path = {}
    flat_params = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for path, variable in flat_params:
        spec = logical_to_spec(variable_axes(variable), variable.value.shape, mesh, rules)
        by_path[(*path, jax.tree_util.GetAttrKey("value"))] = (variable.value.shape, spec)
    longest = max((len(p) for p in by_path), default=0)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        for size in range(min(longest, len(path)), 0, -1):
            match = by_path.get(tuple(path[-size:]))
            if match is not None and tuple(match[0]) == tuple(shape):
                return NamedSharding(mesh, match[1])
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def put_rows(tree, mesh: Mesh):
    """Place host arrays that every process holds IN FULL on `mesh`, rows over data × fsdp.

    The counterpart of `shard_batch` for a batch that is the same on every process
    (e.g. an eval batch): each array's rows are split over data × fsdp when they
    divide evenly, otherwise it is replicated.
    """
    tree = jax.tree.map(np.asarray, tree)
    return put(tree, jax.tree.map(functools.partial(_rows_or_replicated, mesh), tree))


def _rows_or_replicated(mesh: Mesh, x) -> NamedSharding:
    """Rows over data × fsdp when they divide evenly (`batch_sharding`), else replicated."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if np.ndim(x) and np.shape(x)[0] % rows == 0:
        return batch_sharding(mesh, np.ndim(x))
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------------
# Device memory.


def device_memory_bytes(device: jax.Device, override_gb: float | None = None) -> tuple[int, str]:
    """Usable memory of one device and where the number comes from.

    `override_gb` (GiB) wins; TPU: `TPU_MEMORY_BYTES` by device kind (compile-only devices
    have no memory_stats); GPU, and a real TPU of a kind the table lacks:
    `memory_stats()['bytes_limit']`; CPU: host RAM / local CPU devices.

    Returns:
      (bytes, source) with source one of "flag", "table", "memory_stats", "host_ram".

    Raises:
      ValueError: a TPU kind the table lacks, on a device with no memory_stats.
    """
    if override_gb is not None:
        return int(override_gb * GiB), "flag"
    if device.platform == "tpu" and device.device_kind in TPU_MEMORY_BYTES:
        return TPU_MEMORY_BYTES[device.device_kind], "table"
    if device.platform in ("tpu", "gpu"):
        try:
            return int(device.memory_stats()["bytes_limit"]), "memory_stats"
        except Exception as e:  # compile-only devices: "only for addressable devices"
            raise ValueError(
                f"device kind {device.device_kind!r} has no entry in sharding.TPU_MEMORY_BYTES "
                f"({sorted(TPU_MEMORY_BYTES)}) and no memory_stats ({e}): pass plan.py's "
                "--device_memory_gb, or set --config.sampling.decode_weights to tensor, "
                "replicated or sharded."
            ) from None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(len(jax.devices("cpu")), 1), "host_ram"


# ---------------------------------------------------------------------------
# Data parallelism: per-device code over a data-parallel mesh, and its collectives.


def row_ways(mesh: Mesh | None, rows: int) -> int:
    """data × fsdp of `mesh` when it divides `rows` (how XLA splits them), else 1."""
    if mesh is None:
        return 1
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    return ways if rows % ways == 0 else 1


def row_parallel(mesh: Mesh | None, rows: int) -> bool:
    """Whether work on `rows` leading rows (prompts) is split over the mesh's data axis.

    Only on a data-parallel mesh (fsdp = tensor = 1, so every device holds the whole
    model) with several devices on `data`, for a row count they divide. The sampler
    and the train step both decide with this, through `data_parallel`.
    """
    if mesh is None or mesh.shape.get("fsdp", 1) != 1 or mesh.shape.get("tensor", 1) != 1:
        return False
    ways = mesh.shape.get(DATA_AXIS, 1)
    return ways > 1 and rows % ways == 0


def data_parallel(
    fn: Callable[..., object], mesh: Mesh | None, rows: int, *, in_specs, out_specs
) -> Callable[..., object]:
    """`fn(axis, *args)` as a function of `*args`, run per device when `row_parallel`.

    On a data-parallel mesh (see `row_parallel`) the result runs `fn` in
    `jax.shard_map` with `axis = "data"`: each device sees its own rows of the
    arguments whose spec is `ROWS` and the whole of those whose spec is
    `REPLICATED` (any `PartitionSpec` may be given), and `fn` reduces across
    devices with `psum_flat` / `all_rows` where it needs to. Otherwise `fn` runs
    as is with `axis = None`, where those helpers are the identity, and XLA
    partitions it by the arguments' shardings. One body of code serves both.
    """
    if not row_parallel(mesh, rows):
        return functools.partial(fn, None)
    return jax.shard_map(
        functools.partial(fn, DATA_AXIS), mesh=mesh, in_specs=in_specs, out_specs=out_specs
    )


def varying(tree, axis: str | None):
    """Inside `data_parallel`: mark replicated values as per-device ("varying").

    Gradients with respect to such values stay each device's own until an explicit
    `psum_flat` (without it, differentiating a replicated input sums implicitly).
    """
    if axis is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.pcast(x, axis_name=axis, to="varying"), tree)


def psum_flat(tree, axis: str | None):
    """`lax.psum` of a pytree as ONE buffer per dtype (concatenated, summed, split back).

    XLA:CPU runs an all-reduce of a tuple as one rendezvous per element: for a
    model's gradients that is dozens of cross-device handshakes, where one flat
    buffer needs one (the tiny model's gradient psum: ~4.8 ms before, ~1.6 ms with
    this, waiting for the slower device included). The identity when `axis` is None.
    """
    if axis is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    by_dtype: dict = {}
    for i, leaf in enumerate(leaves):
        by_dtype.setdefault(jnp.result_type(leaf), []).append(i)
    out = list(leaves)
    for dtype, idx in by_dtype.items():
        flat = jnp.concatenate([jnp.ravel(jnp.asarray(leaves[i], dtype)) for i in idx])
        flat = jax.lax.psum(flat, axis)
        offsets = np.cumsum([0] + [int(np.size(leaves[i])) for i in idx])
        for i, start, stop in zip(idx, offsets[:-1], offsets[1:], strict=True):
            out[i] = flat[start:stop].reshape(jnp.shape(leaves[i]))
    return jax.tree.unflatten(treedef, out)


def all_rows(tree, axis: str | None):
    """Inside `data_parallel`: every device's rows, in device order, on every device.

    A psum of zero-padded blocks rather than `all_gather`, so that the result is
    typed as replicated over `axis` (it may then leave through `REPLICATED`). The
    identity when `axis` is None.
    """
    if axis is None:
        return tree
    index = jax.lax.axis_index(axis)
    size = jax.lax.axis_size(axis)

    def one(x):
        n = x.shape[0]
        wide = x.astype(jnp.int32) if x.dtype == jnp.bool_ else x
        full = jnp.zeros((n * size, *x.shape[1:]), wide.dtype)
        return jax.lax.dynamic_update_slice_in_dim(full, wide, index * n, axis=0)

    dtypes = jax.tree.map(lambda x: x.dtype, tree)
    summed = psum_flat(jax.tree.map(one, tree), axis)
    return jax.tree.map(lambda x, dtype: x.astype(dtype), summed, dtypes)


def own_rows(tree, axis: str | None):
    """Inside `data_parallel`: this device's block of rows of arrays that hold all rows.

    The inverse of `all_rows`; the identity when `axis` is None.
    """
    if axis is None:
        return tree
    index = jax.lax.axis_index(axis)
    size = jax.lax.axis_size(axis)

    def one(x):
        n = x.shape[0] // size
        return jax.lax.dynamic_slice_in_dim(x, index * n, n, axis=0)

    return jax.tree.map(one, tree)
