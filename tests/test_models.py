"""The NNX decoder against transformers, HF import/export, cache, causality and sharding."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from aapo_jax import models, sampling, sharding
from aapo_jax.models import transformer
from tests import hf_fixtures

PARITY_ATOL = 1e-4
# bf16 weights + activations against the fp32 forward of the same checkpoint.
BF16_ATOL = 0.15
LENGTHS = (11, 4, 7, 1)
WIDTH = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (transformers-5 dir, hub-style bf16 sharded 4.x-config dir)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for i, family in enumerate(hf_fixtures.FAMILIES):
        v5 = hf_fixtures.save_checkpoint(family, root / family, seed=i)
        hub = hf_fixtures.hub_style_copy(v5, root / f"{family}_hub")
        out[family] = (v5, hub)
    return out


def _batch(seed=0, vocab=hf_fixtures.TINY["vocab_size"]):
    return hf_fixtures.left_padded_batch(np.random.default_rng(seed), LENGTHS, WIDTH, vocab)


def _max_valid_diff(a, b, mask):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) * np.asarray(mask)[..., None]))


@pytest.mark.parametrize("family", list(hf_fixtures.FAMILIES))
@pytest.mark.parametrize("layout", ["v5", "hub"])
def test_logits_match_transformers(checkpoints, family, layout):
    path = checkpoints[family][0 if layout == "v5" else 1]
    ids, mask = _batch()
    ours = models.compute_logits(models.load_hf_checkpoint(path), ids, mask)
    ref = hf_fixtures.torch_logits(path, ids, mask)
    assert np.abs(ref).max() > 0.5, "logits too small for a meaningful comparison"
    assert _max_valid_diff(ours, ref, mask) <= PARITY_ATOL


def test_hub_layout_is_what_the_fixture_claims(checkpoints):
    _, hub = checkpoints["llama3"]
    config = json.loads((hub / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_scaling"]["rope_type"] == "llama3"
    assert config["torch_dtype"] == "bfloat16"
    assert (hub / "model.safetensors.index.json").exists()
    tensor = next(iter(load_file(next(hub.glob("model-*.safetensors"))).values()))
    assert tensor.dtype.name == "bfloat16"


def test_config_fields(checkpoints):
    qwen = models.load_hf_checkpoint(checkpoints["qwen2"][1]).config
    assert qwen.qkv_bias and not qwen.o_bias and not qwen.tie_word_embeddings
    mqa = models.load_hf_checkpoint(checkpoints["qwen2_tied_mqa"][0]).config
    assert mqa.tie_word_embeddings and mqa.num_kv_heads == 1
    llama = models.load_hf_checkpoint(checkpoints["llama3"][1]).config
    assert llama.rope_scaling.factor == 8.0 and llama.rope_theta == 500000.0
    assert not llama.qkv_bias


def test_abstract_model_has_the_loaded_shapes_and_reads_no_tensor(checkpoints, tmp_path):
    directory = hf_fixtures.copy_checkpoint(checkpoints["qwen2"][0], tmp_path / "ckpt")
    loaded = nnx.state(models.load_hf_checkpoint(directory, param_dtype=jnp.bfloat16))
    for weights in directory.glob("*.safetensors"):
        weights.unlink()  # only config.json is left to read
    abstract = models.abstract_hf_model(directory, param_dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert [(x.shape, x.dtype) for x in leaves] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(loaded)
    ]


@pytest.mark.parametrize("family", ["qwen2", "llama3_tied"])
def test_export_loads_in_transformers_with_identical_logits(checkpoints, tmp_path, family):
    model = models.load_hf_checkpoint(checkpoints[family][0])
    models.save_hf_checkpoint(model, tmp_path / "out")
    ids, mask = _batch(1)
    exported = hf_fixtures.torch_logits(tmp_path / "out", ids, mask)
    original = hf_fixtures.torch_logits(checkpoints[family][0], ids, mask)
    np.testing.assert_array_equal(exported, original)


def test_import_export_import_is_bit_exact(checkpoints, tmp_path):
    first = models.load_hf_checkpoint(checkpoints["llama3"][1], dtype=jnp.bfloat16)
    models.save_hf_checkpoint(first, tmp_path / "a", max_shard_size=30_000)
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    second = models.load_hf_checkpoint(tmp_path / "a", dtype=jnp.bfloat16)
    for a, b in zip(
        jax.tree.leaves(nnx.state(first)), jax.tree.leaves(nnx.state(second)), strict=True
    ):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And the files themselves round-trip: same tensors as the hub checkpoint.
    src = {}
    for f in checkpoints["llama3"][1].glob("*.safetensors"):
        src.update(load_file(f))
    out = {}
    for f in (tmp_path / "a").glob("*.safetensors"):
        out.update(load_file(f))
    assert src.keys() == out.keys()
    for k in src:
        np.testing.assert_array_equal(src[k], out[k])


@pytest.mark.parametrize("max_shard_size", [5 * 1024**3, 30_000])
def test_exported_weights_have_the_mode_of_a_plain_file(tiny_model_dir, tmp_path, max_shard_size):
    """safetensors writes 0600 files; the export's weights are as readable as its config."""
    model = models.load_hf_checkpoint(tiny_model_dir)
    models.save_hf_checkpoint(model, tmp_path, max_shard_size=max_shard_size)
    (tmp_path / "plain").write_text("")
    mode = (tmp_path / "plain").stat().st_mode
    weights = sorted(tmp_path.glob("*.safetensors"))
    assert (len(weights) > 1) == (max_shard_size == 30_000)
    assert {f.name: oct(f.stat().st_mode) for f in weights} == {f.name: oct(mode) for f in weights}


def test_causality(checkpoints):
    model = models.load_hf_checkpoint(checkpoints["qwen2"][0])
    ids, mask = _batch(2)
    t = 8
    changed = ids.copy()
    changed[:, t] = (changed[:, t] + 1) % hf_fixtures.TINY["vocab_size"]
    a = np.asarray(models.compute_logits(model, ids, mask))
    b = np.asarray(models.compute_logits(model, changed, mask))
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert np.abs(a[0, t:] - b[0, t:]).max() > 1e-3


def test_left_padding_invariance(checkpoints):
    model = models.load_hf_checkpoint(checkpoints["llama3"][0])
    ids, mask = _batch(3)
    padded = np.asarray(models.compute_logits(model, ids, mask))
    for row, n in enumerate(LENGTHS):
        alone = models.compute_logits(model, ids[row : row + 1, -n:], mask[row : row + 1, -n:])
        np.testing.assert_allclose(padded[row, -n:], np.asarray(alone)[0], atol=1e-5, rtol=0)


def test_bf16_within_documented_tolerance(checkpoints):
    path = checkpoints["qwen2"][1]
    ids, mask = _batch(4)
    ref = models.compute_logits(models.load_hf_checkpoint(path), ids, mask)
    bf16 = models.load_hf_checkpoint(path, dtype=jnp.bfloat16)
    assert bf16.embed.value.dtype == jnp.bfloat16
    low = models.compute_logits(bf16, ids, mask)
    assert low.dtype == jnp.float32
    assert np.isfinite(np.asarray(low)).all()
    assert _max_valid_diff(low, ref, mask) <= BF16_ATOL


def test_cache_prefill_and_decode_equal_full_forward(checkpoints):
    model = models.load_hf_checkpoint(checkpoints["qwen2_tied_mqa"][0])
    ids, mask = _batch(5)
    full = np.asarray(models.compute_logits(model, ids, mask))
    split = 7
    cache = models.init_cache(model.config, ids.shape[0], cache_size=WIDTH + 4)
    positions = models.positions_from_mask(mask)
    logits, cache = model(ids[:, :split], positions[:, :split], mask[:, :split], cache)
    steps = [np.asarray(logits)]
    for t in range(split, WIDTH):
        logits, cache = model(ids[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    assert int(cache.index) == WIDTH
    np.testing.assert_allclose(
        np.concatenate(steps, axis=1) * mask[..., None], full * mask[..., None], atol=1e-5
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_shared_prompt_cache_decodes_as_the_repeated_one(checkpoints, dtype):
    """`cache_from_prefix(share=True)` keeps each prompt's keys and values once for its
    rows; decode steps over it (read by the whole group in one matmul) give the hidden
    states of the cache that repeats the prompt into every row, in fp32 and in bf16 (fp32
    accumulation), whatever bound `kv_len` the loop passes."""
    model = models.load_hf_checkpoint(checkpoints["qwen2"][0], dtype=dtype)
    ids, mask = _batch(8)
    g, steps = 3, 4
    positions = models.positions_from_mask(mask)
    _, prefix = model.forward(ids, positions, mask, return_kv=True)
    prefix = prefix.replace(repeats=g)
    size = WIDTH + steps
    repeated = transformer.cache_from_prefix(prefix, size)
    shared = transformer.cache_from_prefix(prefix, size, share=True)
    assert shared.prompt.k[0].shape[0] == ids.shape[0] and shared.size == steps
    assert shared.prompt_length == WIDTH and int(shared.index) == 0
    assert repeated.prompt is None and repeated.size == size
    rng = np.random.default_rng(1)
    position = jnp.repeat(jnp.sum(mask, axis=1), g)[:, None]
    live = jnp.ones_like(position, bool)
    for t in range(steps):
        token = jnp.asarray(
            rng.integers(3, hf_fixtures.TINY["vocab_size"], (ids.shape[0] * g, 1)), jnp.int32
        )
        kv_len = WIDTH + t + 1 if t % 2 else None
        a, repeated = model.decode(token, position + t, live, repeated, kv_len=kv_len)
        b, shared = model.decode(token, position + t, live, shared, kv_len=kv_len)
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol
        )
    assert int(shared.index) == steps and bool(np.asarray(shared.mask_BxS).all())


def test_remat_gives_same_logits_and_grads(checkpoints):
    path = checkpoints["llama3"][0]
    ids, mask = _batch(6)

    def loss(model):
        return jnp.mean(models.compute_logits(model, ids, mask) ** 2)

    plain = models.load_hf_checkpoint(path)
    remat = models.load_hf_checkpoint(path, remat=True)
    g1 = jax.tree.leaves(nnx.grad(loss)(plain))
    g2 = jax.tree.leaves(nnx.grad(loss)(remat))
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("scan_unroll", [-1, 2])
def test_unrolled_layers_match_the_rolled_scan(checkpoints, scan_unroll):
    """`scan_unroll` of every layer (-1, or the layer count: the forward is a Python loop
    over static slices; decode runs each layer as a `switch` branch over its own weights,
    `unstacked_layers`) changes how the program is laid out, not what it computes:
    logits, gradients, prefill, decode and generated tokens agree with the rolled scan."""
    path = checkpoints["llama3"][0]  # 2 layers
    ids, mask = _batch(7)
    rolled = models.load_hf_checkpoint(path)
    unrolled = models.load_hf_checkpoint(path, scan_unroll=scan_unroll)
    assert unrolled.config.layers_per_scan_step == 2 and rolled.config.layers_per_scan_step == 1

    def loss(model):
        return jnp.mean(models.compute_logits(model, ids, mask) ** 2)

    for a, b in zip(
        jax.tree.leaves(nnx.grad(loss)(rolled)),
        jax.tree.leaves(nnx.grad(loss)(unrolled)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    positions = models.positions_from_mask(mask)
    assert rolled.unstacked_layers() is None
    layers = unrolled.unstacked_layers()
    assert len(layers) == 2 and layers[1].mlp.up_kernel.value.shape == (32, 64)
    outs = []
    for model, kwargs in ((rolled, {}), (unrolled, dict(layers=layers))):
        cache = models.init_cache(model.config, ids.shape[0], cache_size=WIDTH + 1)
        hidden, cache = model.decode(ids, positions, mask, cache, **kwargs)
        step, cache = model.decode(
            ids[:, -1:], positions[:, -1:] + 1, mask[:, -1:], cache, **kwargs
        )
        tokens = sampling.generate(model, ids, mask, rng=jax.random.key(0), max_new_tokens=4)
        outs.append([np.asarray(t) for t in (hidden, step, cache.k[1], cache.v[0], tokens.tokens)])
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="scan_unroll"):
        models.load_hf_checkpoint(path, scan_unroll=0)


def test_sharded_forward_matches_one_device(checkpoints):
    assert jax.device_count() == 8
    path = checkpoints["qwen2"][1]
    ids, mask = _batch(7)
    ids, mask = np.tile(ids, (2, 1)), np.tile(mask, (2, 1))  # 8 rows
    expected = np.asarray(models.compute_logits(models.load_hf_checkpoint(path), ids, mask))
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model = models.load_hf_checkpoint(path, mesh=mesh)
    q = model.layers.attn.q_kernel.value  # every layer's, stacked on a leading axis
    assert q.shape[0] == model.config.num_layers
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert model.embed.value.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return models.compute_logits(nnx.merge(graphdef, state), ids, mask)

    batch = sharding.batch_sharding(mesh, 2)
    got = forward(state, jax.device_put(ids, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_logical_to_spec_replicates_indivisible_dims():
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 1, 8), mesh)
    assert spec == jax.sharding.PartitionSpec(None, None, None)
    spec = sharding.logical_to_spec(("vocab", "embed"), (96, 32), mesh)
    assert spec == jax.sharding.PartitionSpec("tensor", None)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=2, fsdp=2, tensor=4)


# --- clear errors ------------------------------------------------------------


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_unsupported_model_type(checkpoints, tmp_path):
    path = hf_fixtures.copy_checkpoint(checkpoints["qwen2"][0], tmp_path / "c")
    _edit_config(path, model_type="mistral")
    with pytest.raises(ValueError, match="model_type='mistral'"):
        models.load_hf_checkpoint(path)


def test_unsupported_rope_type(checkpoints, tmp_path):
    path = hf_fixtures.copy_checkpoint(checkpoints["llama3"][1], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    _edit_config(path, rope_scaling={**config["rope_scaling"], "rope_type": "yarn"})
    with pytest.raises(ValueError, match="'yarn'"):
        models.load_hf_checkpoint(path)


def test_missing_tensor(checkpoints, tmp_path):
    path = hf_fixtures.copy_checkpoint(checkpoints["qwen2"][0], tmp_path / "c")
    _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        models.load_hf_checkpoint(path)


def test_extra_tensor(checkpoints, tmp_path):
    path = hf_fixtures.copy_checkpoint(checkpoints["qwen2"][0], tmp_path / "c")
    _edit_tensors(path, lambda t: t.update({"model.layers.9.extra.weight": np.ones(3, "f4")}))
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.9\.extra\.weight"):
        models.load_hf_checkpoint(path)


def test_shape_mismatch(checkpoints, tmp_path):
    path = hf_fixtures.copy_checkpoint(checkpoints["qwen2"][0], tmp_path / "c")
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensors(path, lambda t: t.update({name: np.ones((8, 32), "f4")}))
    with pytest.raises(ValueError, match=rf"{name}.*\(8, 32\).*\(16, 32\)"):
        models.load_hf_checkpoint(path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        models.load_hf_checkpoint(tmp_path)


def test_bad_model_config_names_field():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        hf_fixtures.tiny_model_config(num_heads=4, num_kv_heads=3)


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    ids, odd, scalar = sharding.shard_batch(
        (np.zeros((8, 5), np.int32), np.zeros((6, 3), np.float32), np.float32(1.0)), mesh
    )
    assert ids.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert {s.data.shape for s in ids.addressable_shards} == {(2, 5)}  # 4 row blocks
    assert odd.sharding.spec == jax.sharding.PartitionSpec()  # 6 rows do not split 4 ways
    assert scalar.sharding.spec == jax.sharding.PartitionSpec()


@pytest.mark.parametrize(
    ("xla_flags", "expected"), [("", 3), ("--xla_force_host_platform_device_count=2", 2)]
)
def test_use_cpu_devices_before_jax_starts(xla_flags, expected):
    """One CPU device per requested core in a fresh process; an explicit XLA flag wins."""
    code = (
        "from aapo_jax import sharding; sharding.use_cpu_devices(3); "
        "import jax; print(jax.device_count())"
    )
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == str(expected)
    with pytest.raises(ValueError, match="count must be ≥ 1"):
        sharding.use_cpu_devices(0)
