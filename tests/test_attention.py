"""Attention implementations against a per-head numpy reference of the mask semantics."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapo_jax.models import attention
from aapo_jax.models.transformer import cached_attention

B, H, K, DH = 2, 4, 2, 16


def _inputs(length, kv_len, pads, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, length, H, DH)), dtype)
    k = jnp.asarray(rng.normal(size=(B, kv_len, K, DH)), dtype)
    v = jnp.asarray(rng.normal(size=(B, kv_len, K, DH)), dtype)
    key_mask = np.arange(kv_len)[None, :] >= np.asarray(pads)[:, None]  # left padding
    return q, k, v, jnp.asarray(key_mask)


def _reference(q, k, v, key_mask, query_offset):
    """Loops over rows, heads and queries: softmax over the visible slots in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    key_mask = np.asarray(key_mask)
    b, length, heads, head_dim = q.shape
    out = np.zeros_like(q)
    for row in range(b):
        for h in range(heads):
            kv = h // (heads // k.shape[2])
            for i in range(length):
                slot = query_offset + i
                seen = [
                    s for s in range(k.shape[1]) if (key_mask[row, s] and s <= slot) or s == slot
                ]
                scores = k[row, seen, kv] @ q[row, i, h] / np.sqrt(head_dim)
                probs = np.exp(scores - scores.max())
                out[row, i, h] = (probs / probs.sum()) @ v[row, seen, kv]
    return out


def _real_queries(key_mask, query_offset, length):
    return np.asarray(key_mask)[:, query_offset : query_offset + length, None, None]


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("query_offset", [0, 5])
def test_attend_matches_the_reference_on_left_padded_rows(implementation, query_offset):
    length = 23
    q, k, v, key_mask = _inputs(length, query_offset + length, pads=[0, 9])
    out = attention.attend(
        q, k, v, key_mask, query_offset=query_offset, implementation=implementation, block_size=8
    )
    real = _real_queries(key_mask, query_offset, length)
    want = _reference(q, k, v, key_mask, query_offset)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, want, 0), atol=2e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_chunked_gradients_match_dense():
    q, k, v, key_mask = _inputs(40, 40, pads=[3, 17], seed=1)
    weight = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    weight = weight * key_mask[:, :, None, None]

    def loss(implementation):
        def f(q, k, v):
            out = attention.attend(q, k, v, key_mask, implementation=implementation, block_size=16)
            return jnp.sum(out * weight)

        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(loss("chunked"), loss("xla"), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_left_padding_does_not_change_real_outputs():
    q, k, v, key_mask = _inputs(12, 12, pads=[0, 0])
    pad = 5
    padded = [jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0))) for x in (q, k, v)]
    padded_mask = jnp.pad(key_mask, ((0, 0), (pad, 0)))
    for implementation in ("xla", "chunked"):
        plain = attention.attend(q, k, v, key_mask, implementation=implementation, block_size=4)
        shifted = attention.attend(
            *padded, padded_mask, implementation=implementation, block_size=4
        )
        np.testing.assert_allclose(shifted[:, pad:], plain, atol=1e-6)


@pytest.mark.parametrize("query_offset", [0, 130])
def test_splash_kernel_in_the_pallas_interpreter_matches_dense(query_offset):
    # Sequences that are not whole 128-lane blocks exercise the kernel's padding.
    length = 150
    q, k, v, key_mask = _inputs(length, query_offset + length, pads=[0, 37], seed=3)
    real = _real_queries(key_mask, query_offset, length)
    out = attention._splash(q, k, v, key_mask, query_offset, 128, interpret=True)
    want = attention.attend(q, k, v, key_mask, query_offset=query_offset, implementation="xla")
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, want, 0), atol=2e-6)

    def f(impl):
        return lambda q: jnp.sum(impl(q) * real)

    got = jax.grad(
        f(lambda q: attention._splash(q, k, v, key_mask, query_offset, 128, interpret=True))
    )(q)
    ref = jax.grad(f(lambda q: attention._xla(q, k, v, key_mask, query_offset, 128)))(q)
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_cudnn_arguments_reproduce_the_visibility_through_dot_product_attention():
    # The same arguments the cuDNN path passes, run by jax's XLA implementation on CPU.
    for query_offset, length in ((0, 7), (4, 9)):
        q, k, v, key_mask = _inputs(length, query_offset + length, pads=[2, 6], seed=4)
        args, kwargs = attention.cudnn_arguments(q, k, v, key_mask, query_offset)
        assert args[0].shape[1] % 2 == 0 and args[1].shape[1] % 2 == 0
        out = jax.nn.dot_product_attention(*args, **kwargs, implementation="xla")[:, :length]
        real = _real_queries(key_mask, query_offset, length)
        want = _reference(q, k, v, key_mask, query_offset)
        np.testing.assert_allclose(np.where(real, out, 0), np.where(real, want, 0), atol=2e-5)


def test_choose_implementation_picks_the_kernel_each_backend_supports():
    bf16 = jnp.bfloat16
    assert attention.choose_implementation(bf16, 128, 512, backend="tpu") == "splash"
    assert attention.choose_implementation(bf16, 128, 100, backend="tpu") == "chunked"
    assert attention.choose_implementation(bf16, 128, 512, backend="gpu") == "cudnn"
    assert attention.choose_implementation(jnp.float32, 128, 512, backend="gpu") == "chunked"
    assert attention.choose_implementation(bf16, 100, 512, backend="gpu") == "chunked"
    assert attention.choose_implementation(bf16, 128, 512, backend="cpu") == "chunked"
    assert attention.splash_problem(jnp.float16, 64, 512) is not None


def test_attend_names_the_bad_argument():
    q, k, v, key_mask = _inputs(4, 4, pads=[0, 0])
    with pytest.raises(ValueError, match="implementation='flash'"):
        attention.attend(q, k, v, key_mask, implementation="flash")
    with pytest.raises(ValueError, match="block_size"):
        attention.attend(q, k, v, key_mask, block_size=0)
    with pytest.raises(ValueError, match=r"key_mask\.shape"):
        attention.attend(q, k, v, key_mask[:, :3])
    with pytest.raises(ValueError, match="exceeds"):
        attention.attend(q, k, v, key_mask, query_offset=1)
    with pytest.raises(ValueError, match="multiple of k heads"):
        attention.attend(q[:, :, :3], k, v, key_mask)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention.attend(q, k, v, key_mask, implementation="cudnn")


def _cached_inputs(dtype, pads=(0, 5), seed=1):
    """One decode query per row over a cache of S slots (the first `pads` of a row are its
    padding) plus the query's own new entry."""
    s = 12
    q, k, v, key_mask = _inputs(1, s + 1, pads, seed=seed, dtype=dtype)
    keys_BxKxDhxS = k[:, :s].transpose(0, 2, 3, 1)
    values_BxKxSxDh = v[:, :s].transpose(0, 2, 1, 3)
    new_visible = jnp.ones((B, 1, 1), bool)
    args = (q, keys_BxKxDhxS, values_BxKxSxDh, key_mask[:, :s], k[:, s:], v[:, s:], new_visible)
    return args, _reference(q, k, v, key_mask, query_offset=s)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cached_decode_attention_matches_the_reference(dtype):
    """A decode step's attention over the cache and its new entry, in fp32 and in bf16."""
    args, expected = _cached_inputs(dtype)
    out = jax.jit(cached_attention)(*args)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=tol, rtol=tol)


def test_bf16_decode_attention_reads_the_cache_without_an_fp32_copy():
    """Below fp32 the cache is read by dots in its own dtype (accumulating in fp32): the
    program converts no cache-sized array to fp32."""
    args, _ = _cached_inputs(jnp.bfloat16)
    text = jax.jit(cached_attention).lower(*args).as_text()
    cache_size = args[1].size
    converted = [
        math.prod(int(d) for d in shape.split("x"))
        for shape in re.findall(r"stablehlo\.convert.*-> tensor<([\dx]+)xf32>", text)
    ]
    assert max(converted, default=0) < cache_size, (converted, cache_size)
    # The fp32 path (CPU models) keeps its fused multiply-reduce over the cache.
    args32, _ = _cached_inputs(jnp.float32)
    assert "stablehlo.dot_general" not in _cache_ops(args32)


def _cache_ops(args) -> str:
    """The lowered program's lines that take the cache's keys (argument 1)."""
    text = jax.jit(cached_attention).lower(*args).as_text()
    return "\n".join(line for line in text.splitlines() if "%arg1" in line)
