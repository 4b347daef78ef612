"""Decode attention through Pallas's GPU kernel (run by Pallas's interpreter here): the same
attention and the same tokens as the XLA path, finished rows and unwritten slots unread."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapo_jax import models, sampling, sharding
from aapo_jax.models import decode_attention
from aapo_jax.models.transformer import cached_attention
from tests import hf_fixtures

VOCAB = hf_fixtures.TINY["vocab_size"]


def _random(shape, seed, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def test_a_kernel_part_is_the_softmax_over_its_slot_range():
    """Row b's heads over slots [start, length) of its keys: the unnormalised output, the
    denominator and the maximum of that range's scores; a row with length 0 reads nothing."""
    b, h, kv_heads, s, dh = 4, 6, 2, 64, 16
    q = _random((b, h, dh), 0)
    keys, values = _random((b, kv_heads, s, dh), 1), _random((b, kv_heads, s, dh), 2)
    start, length = np.array([0, 5, 40, 0]), np.array([64, 17, 41, 0])
    out, total, peak = jax.jit(decode_attention.kernel_part)(q, keys, values, start, length)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, keys, values))
    for row in range(b):
        for head in range(h):
            kv = head // (h // kv_heads)
            span = slice(start[row], length[row])
            scores = kn[row, kv, span] @ qn[row, head] / np.sqrt(dh)
            if scores.size == 0:
                assert total[row, head] == 0 and np.all(np.asarray(out[row, head]) == 0)
                continue
            weights = np.exp(scores - scores.max())
            np.testing.assert_allclose(peak[row, head], scores.max(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(total[row, head], weights.sum(), rtol=1e-5)
            np.testing.assert_allclose(out[row, head], weights @ vn[row, kv, span], atol=1e-4)


def _step_inputs(dtype, seed=0):
    """A decode step of 6 rows (3 prompts × 2) over a 64-slot cache and a 64-slot shared
    prompt: each row's slot range, its prompt's left padding, one finished row."""
    groups, repeats, h, kv_heads, s, p, dh = 3, 2, 4, 2, 64, 64, 16
    b = groups * repeats
    q = _random((b, 1, h, dh), seed, dtype)
    keys, values = (_random((b, kv_heads, s, dh), seed + i, dtype) for i in (1, 2))
    new_k, new_v = (_random((b, 1, kv_heads, dh), seed + i, dtype) for i in (3, 4))
    prompt_keys, prompt_values = (
        _random((groups, kv_heads, p, dh), seed + i, dtype) for i in (5, 6)
    )
    prompt_mask = jnp.arange(p)[None] >= jnp.array([0, 20, 63])[:, None]  # left-padded
    start = jnp.array([0, 0, 3, 3, 10, 0])
    end = jnp.array([30, 30, 30, 0, 30, 30])  # row 3 has finished
    visible = (jnp.arange(s)[None] >= start[:, None]) & (jnp.arange(s)[None] < end[:, None])
    return (
        q,
        keys,
        values,
        start,
        end,
        visible,
        new_k,
        new_v,
        (prompt_keys, prompt_values, prompt_mask),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_kernel_step_is_the_xla_steps_attention(dtype):
    """Shared prompt, own slots and new entry joined by their log-sum-exp: the attention
    `cached_attention` computes over the same slots (keys slot-major for both)."""
    q, keys, values, start, end, visible, new_k, new_v, prompt = _step_inputs(dtype)
    out = jax.jit(decode_attention.step_attention)(
        q, keys, values, start, end, new_k, new_v, prompt
    )
    expected = jax.jit(cached_attention, static_argnames="keys_by_slot")(
        q, keys, values, visible, new_k, new_v, jnp.ones((6, 1, 1), bool), prompt, keys_by_slot=True
    )
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol
    )


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = hf_fixtures.save_checkpoint("qwen2", tmp_path_factory.mktemp("kernel") / "q", seed=10)
    return models.load_hf_checkpoint(path)


def _prompts():
    return hf_fixtures.left_padded_batch(np.random.default_rng(15), (9, 3, 12, 5), 12, VOCAB)


@pytest.fixture(scope="module")
def early_eos(qwen) -> int:
    """A token the model draws often: as EOS, most rows finish early, at different steps."""
    out = sampling.generate(
        qwen, *_prompts(), rng=jax.random.key(3), max_new_tokens=10, num_samples=6
    )
    values, counts = np.unique(np.asarray(out.tokens)[:, 1:4], return_counts=True)
    return int(values[counts.argmax()])


@pytest.mark.parametrize("shared_prompt,temperature", [(True, 1.0), (False, 0.0)])
def test_the_kernel_decodes_the_xla_tokens(qwen, early_eos, shared_prompt, temperature):
    """Sampled with a shared prompt, greedy with a copy in each row, most rows finishing
    early: the same tokens and log-probs as the XLA attention."""
    ids, mask = _prompts()
    kw = dict(
        rng=jax.random.key(4),
        max_new_tokens=10,
        temperature=temperature,
        num_samples=6,
        eos_token_id=early_eos,
        shared_prompt=shared_prompt,
    )
    xla = sampling.generate(qwen, ids, mask, decode_attention="xla", **kw)
    kernel = sampling.generate(qwen, ids, mask, decode_attention="pallas_gpu", **kw)
    lengths = np.asarray(xla.lengths)
    assert lengths.min() < 10 and len(set(lengths)) > 2  # rows finish at different steps
    np.testing.assert_array_equal(np.asarray(kernel.tokens), np.asarray(xla.tokens))
    np.testing.assert_allclose(np.asarray(kernel.logprobs), np.asarray(xla.logprobs), atol=1e-5)


def test_the_kernel_on_the_tensor_decode_mesh_gives_one_devices_tokens(qwen, early_eos):
    """fsdp 2 × tensor 4, tensor decode copies: the kernel runs on each device's rows (the
    prompts, fewer than the devices, whole on each) and draws one device's tokens."""
    ids, mask = _prompts()
    settings = sampling.SamplerSettings(max_new_tokens=10, temperature=1.0)
    base = sampling.SamplingConfig(settings, eos_token_ids=(early_eos,), num_samples=6)
    keys = [jax.random.key(10)]
    (alone,) = sampling.generate_many([qwen], ids, mask, rngs=keys, config=base)
    mesh = sharding.make_mesh(1, 2, 4)
    config = dataclasses.replace(
        base,
        decode_weights="tensor",
        settings=dataclasses.replace(settings, decode_attention="pallas_gpu"),
    )
    model = sharding.shard_model(qwen, mesh)
    (out,) = sampling.generate_many([model], ids, mask, rngs=keys, config=config, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(alone.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(alone.logprobs), atol=1e-5)


def test_a_kernel_cache_is_slot_major_in_whole_blocks(qwen):
    """Keys [B, K, S, Dh] like the values; the shared prompt gains masked slots on its left
    and the rows' buffers empty slots at their end, up to whole kernel blocks."""
    ids, mask = _prompts()
    settings = sampling.SamplerSettings(max_new_tokens=10, decode_attention="pallas_gpu")
    config = sampling.SamplingConfig(settings, num_samples=3)
    state, _ = sampling.start_decode([qwen], ids, mask, [jax.random.key(0)], config)
    (cache,) = state.caches
    c = qwen.config
    assert cache.keys_by_slot and cache.size == 64 and cache.prompt_length == 64
    assert cache.k[0].shape == cache.v[0].shape == (12, c.num_kv_heads, 64, c.head_dim)
    assert cache.prompt.k[0].shape == (4, c.num_kv_heads, 64, c.head_dim)
    np.testing.assert_array_equal(cache.prompt.mask_BxP[:, -12:], mask.astype(bool))
    assert not cache.prompt.mask_BxP[:, :-12].any()
    empty = models.init_cache(c, 2, 100, attention="pallas_gpu")
    assert empty.k[0].shape == (2, c.num_kv_heads, 128, c.head_dim) and empty.size == 128


def test_choices_and_tilings(monkeypatch):
    """On GPU "auto" is the kernel, while jax ships it; elsewhere XLA. A bad name fails
    naming its field; every whole number of blocks tiles into splits of whole blocks."""
    assert decode_attention.gpu_kernel_available()
    assert decode_attention.choose_decode_attention("auto", "gpu") == "pallas_gpu"
    with monkeypatch.context() as m:
        m.setattr(decode_attention, "_GPU_KERNEL_MODULE", "jax.experimental.pallas.ops.gpu.gone")
        assert decode_attention.choose_decode_attention("auto", "gpu") == "xla"
    assert decode_attention.choose_decode_attention("auto", "tpu") == "xla"
    assert decode_attention.choose_decode_attention("auto", "cpu") == "xla"
    assert decode_attention.choose_decode_attention("pallas_gpu", "cpu") == "pallas_gpu"
    with pytest.raises(ValueError, match="decode_attention='flash'"):
        decode_attention.choose_decode_attention("flash")
    with pytest.raises(ValueError, match=r"sampling\.decode_attention"):
        sampling.SamplerSettings(decode_attention="flash")
    assert decode_attention.kernel_tiling(3584) == (16, 32)
    for slots in range(decode_attention.SLOT_MULTIPLE, 8193, decode_attention.SLOT_MULTIPLE):
        splits, block = decode_attention.kernel_tiling(slots)
        chunk = slots // splits
        assert slots % splits == 0 and chunk >= 16 and chunk % block == 0 and block >= 16
    assert decode_attention.kernel_slots(3584) == 3584 and decode_attention.kernel_slots(65) == 128
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_attention.kernel_tiling(40)
