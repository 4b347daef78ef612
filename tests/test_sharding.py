"""Meshes, batch placement and the data-parallel wrapper with its collectives (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapo_jax import decode_layouts, sharding

ROWS = jax.sharding.PartitionSpec("data")
REPLICATED = jax.sharding.PartitionSpec()


def _tree():
    return {
        "w": jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 2, 3) / 7,
        "n": jnp.arange(16, dtype=jnp.int32).reshape(8, 2),
        "b": jnp.arange(8) % 3 == 0,
    }


def test_row_parallel_needs_a_data_mesh_that_divides_the_rows():
    data4 = sharding.make_mesh(data=4, fsdp=1)
    assert sharding.row_parallel(data4, 8)
    assert not sharding.row_parallel(data4, 6)
    assert not sharding.row_parallel(None, 8)
    assert not sharding.row_parallel(sharding.make_mesh(data=1, fsdp=4), 8)
    assert not sharding.row_parallel(sharding.make_mesh(data=2, fsdp=2), 8)
    assert not sharding.row_parallel(sharding.make_mesh(data=1, fsdp=1), 8)


def test_psum_flat_equals_a_psum_per_leaf():
    mesh = sharding.make_mesh(data=4, fsdp=1)
    tree = {k: v for k, v in _tree().items() if k != "b"}

    def run(reduce):
        return jax.jit(jax.shard_map(reduce, mesh=mesh, in_specs=ROWS, out_specs=ROWS))(tree)

    flat = run(lambda t: sharding.psum_flat(t, "data"))
    each = run(lambda t: jax.tree.map(lambda x: jax.lax.psum(x, "data"), t))
    for name in tree:
        assert flat[name].dtype == tree[name].dtype and flat[name].shape == tree[name].shape
        np.testing.assert_allclose(np.asarray(flat[name]), np.asarray(each[name]), rtol=1e-6)
    assert sharding.psum_flat(tree, None) is tree


def test_all_rows_and_own_rows_round_trip():
    mesh = sharding.make_mesh(data=4, fsdp=1)
    tree = _tree()

    def body(axis, t):
        whole = sharding.all_rows(t, axis)
        mine = sharding.own_rows(whole, axis)
        return whole, mine

    whole, mine = jax.jit(
        sharding.data_parallel(
            body, mesh, 8, in_specs=(ROWS,), out_specs=(sharding.REPLICATED, ROWS)
        )
    )(tree)
    for name, x in tree.items():
        np.testing.assert_array_equal(np.asarray(whole[name]), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(mine[name]), np.asarray(x))
        assert whole[name].dtype == x.dtype
    # Off a data-parallel mesh the body runs once, with the helpers as the identity.
    alone = sharding.data_parallel(body, None, 8, in_specs=None, out_specs=None)(tree)
    assert alone[0] is tree and alone[1] is tree


def test_data_parallel_runs_per_device_only_when_rows_divide():
    mesh = sharding.make_mesh(data=4, fsdp=1)
    seen = []

    def body(axis, x):
        seen.append((axis, x.shape))
        return sharding.psum_flat(jnp.sum(x)[None], axis)

    x = jnp.ones((8, 3))
    total = jax.jit(
        sharding.data_parallel(body, mesh, 8, in_specs=(ROWS,), out_specs=sharding.REPLICATED)
    )(x)
    assert seen[-1] == ("data", (2, 3)) and float(total[0]) == 24.0
    total = jax.jit(
        sharding.data_parallel(body, mesh, 6, in_specs=(ROWS,), out_specs=sharding.REPLICATED)
    )(jnp.ones((6, 3)))
    assert seen[-1] == (None, (6, 3)) and float(total[0]) == 18.0


@pytest.mark.parametrize("rows", [8, 6])
def test_put_rows_splits_rows_that_divide_and_replicates_the_rest(rows):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    x = np.arange(rows * 3).reshape(rows, 3)
    placed = sharding.put_rows({"x": x, "s": np.float32(2.0)}, mesh)
    np.testing.assert_array_equal(np.asarray(placed["x"]), x)
    expected = ("data", "fsdp") if rows % 4 == 0 else None
    assert placed["x"].sharding.spec[:1] == (expected,) or (
        expected is None and placed["x"].sharding.spec == jax.sharding.PartitionSpec()
    )
    assert placed["s"].sharding.spec == jax.sharding.PartitionSpec()


@pytest.mark.parametrize(
    "rows, tensor_decode, expected",
    [
        (16, False, ("data", "fsdp")),
        (16, True, ("data", "fsdp", "tensor")),
        (4, False, ("data", "fsdp")),
        (4, True, None),  # 8 devices do not divide 4 rows: left to XLA, as on an fsdp mesh
    ],
)
def test_decode_rows_go_over_every_device_under_the_tensor_layout(rows, tensor_decode, expected):
    """Training keeps rows on data × fsdp (the tensor axis splits heads); the "tensor" decode
    layout splits its rows over every axis, or leaves them to XLA where they do not divide.
    `decode_row_ways` sizes the caches the same way."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)

    def f(x):
        with sharding.activation_mesh(mesh), decode_layouts.tensor_decode(tensor_decode):
            return sharding.constrain_rows(x * 2)

    x = jax.device_put(jnp.ones((rows, 4)), jax.sharding.NamedSharding(mesh, REPLICATED))
    text = jax.jit(f).lower(x).as_text()
    layout = "tensor" if tensor_decode else "sharded"
    ways = 1 if expected is None else int(np.prod([mesh.shape[a] for a in expected]))
    assert decode_layouts.decode_row_ways(mesh, rows, layout) == ways
    if expected is None:
        assert "sharding_constraint" not in text and "Sharding" not in text
    else:
        out = jax.jit(f).lower(x).compile().output_shardings
        assert out.spec[0] == (expected if len(expected) > 1 else expected[0])


def test_row_axes_and_auto_axes_follow_the_context_mesh():
    """Rows go over data × fsdp (the axes of size > 1), over every axis inside
    `rows_over`, and over none when they do not divide; inside a `shard_map` the manual
    axes are no longer automatic. Without a context mesh: none."""
    assert sharding.auto_axes() == () and sharding.row_axes(8) == ()
    mesh = sharding.make_mesh(2, 4, 1)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert sharding.auto_axes() == ("data", "fsdp", "tensor")
        assert sharding.row_axes(8) == ("data", "fsdp") and sharding.row_axes(6) == ()
    mesh = sharding.make_mesh(1, 2, 4)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert sharding.row_axes(8) == ("fsdp",)
        with sharding.rows_over(("data", "fsdp", "tensor")):
            assert sharding.row_axes(8) == ("fsdp", "tensor") and sharding.row_axes(4) == ()

    def inside(x):
        assert sharding.auto_axes() == ("fsdp", "tensor")
        return x

    jax.shard_map(
        inside, mesh=mesh, in_specs=jax.P("data"), out_specs=jax.P("data"), axis_names={"data"}
    )(jnp.zeros(8))
