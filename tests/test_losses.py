"""Losses and log-probs: NumPy parity, micro-batch accumulation, gradients, chunking."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapo_jax import losses

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def close(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol)


def call(fn, jit, *args, **kwargs):
    bound = functools.partial(fn, **kwargs)
    return (jax.jit(bound) if jit else bound)(*args)


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_token_logprobs(logits, targets):
    return np.take_along_axis(np_log_softmax(logits), np.asarray(targets)[..., None], -1)[..., 0]


def np_entropy(logits):
    logp = np_log_softmax(logits)
    return -(np.exp(logp) * logp).sum(-1)


def np_reduce(per_token, mask, seq_mean):
    """(Σ over units, number of units) straight from the formulas."""
    per_token, mask = np.asarray(per_token, np.float64), np.asarray(mask, np.float64)
    if not seq_mean:
        return (per_token * mask).sum(), mask.sum()
    total, count = 0.0, 0
    for row, row_mask in zip(per_token, mask, strict=True):
        if row_mask.sum() > 0:
            total += (row * row_mask).sum() / row_mask.sum()
            count += 1
    return total, count


def np_kl(logp, ref, estimator):
    logp, ref = np.asarray(logp, np.float64), np.asarray(ref, np.float64)
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return 0.5 * (logp - ref) ** 2
    return np.exp(ref - logp) - (ref - logp) - 1


def np_ppo(logp, adv, mask, old, ref, eps_low, eps_high, beta, estimator, seq_mean):
    logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
    adv = np.asarray(adv, np.float64)[:, None]
    ratio = np.exp(logp - old)
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    kl = np_kl(logp, ref, estimator)
    total, denom = np_reduce(per_token + beta * kl, mask, seq_mean)
    return total, denom, np_reduce(clipped, mask, seq_mean)[0], np_reduce(kl, mask, seq_mean)[0]


def random_batch(seed, n=6, t=9):
    # NumPy draws: no per-shape compilation of jax.random in the tests.
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(size=(n, t)) - 0.01
    lengths = rng.integers(0, t + 1, size=n)
    lengths[:2] = t, 0  # one full row, one empty row
    mask = np.arange(t)[None, :] < lengths[:, None]
    old = logp + 0.3 * rng.normal(size=(n, t))
    ref = logp + 0.3 * rng.normal(size=(n, t))
    adv = rng.normal(size=n)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return f32(logp), f32(adv), jnp.asarray(mask), f32(old), f32(ref)


# ---------------------------------------------------------------------------------------------
# Log-probs and entropy.


@JIT
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_and_entropy_match_numpy(jit, dtype):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(3 * rng.normal(size=(2, 5, 11)), dtype)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 5)))
    logp = call(losses.token_logprobs, jit, logits, targets)
    ent = call(losses.token_entropy, jit, logits)
    assert logp.dtype == ent.dtype == jnp.float32
    as_f32 = np.asarray(logits.astype(jnp.float32))
    close(logp, np_token_logprobs(as_f32, targets))
    close(ent, np_entropy(as_f32))
    close(
        call(losses.token_logprobs, jit, logits, targets, temperature=0.7),
        np_token_logprobs(as_f32 / 0.7, targets),
    )


def _head(seed, n, t, d=16, v=40):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    lm_head = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(n, t)), jnp.int32)
    return hidden, lm_head, targets


@JIT
@pytest.mark.parametrize("seq_len", [16, 13, 3], ids=["multiple", "ragged", "shorter"])
def test_chunked_logprobs_match_full(jit, seq_len):
    hidden, lm_head, targets = _head(seq_len, 3, seq_len)
    logp, ent = call(losses.chunked_token_logprobs, jit, hidden, lm_head, targets, chunk_size=4)
    assert logp.shape == ent.shape == (3, seq_len)
    logits = hidden @ lm_head
    close(logp, losses.token_logprobs(logits, targets))
    close(ent, losses.token_entropy(logits))
    close(logp, np_token_logprobs(logits, targets))


@pytest.mark.parametrize("seq_len", [16, 13, 5], ids=["multiple", "ragged", "one_chunk"])
def test_chunked_logprobs_gradient_matches_full(seq_len):
    hidden, lm_head, targets = _head(seq_len + 100, 2, seq_len)
    weights = jnp.asarray(np.random.default_rng(7).normal(size=(2, 2, seq_len)), jnp.float32)

    def chunked(h, w):
        logp, ent = losses.chunked_token_logprobs(h, w, targets, chunk_size=5)
        return jnp.sum(weights[0] * logp + weights[1] * ent)

    def full(h, w):
        logits = h @ w
        logp, ent = losses.token_logprobs(logits, targets), losses.token_entropy(logits)
        return jnp.sum(weights[0] * logp + weights[1] * ent)

    grads_chunked = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, lm_head)
    grads_full = jax.jit(jax.grad(full, argnums=(0, 1)))(hidden, lm_head)
    for g_c, g_f in zip(grads_chunked, grads_full, strict=True):
        close(g_c, g_f, atol=1e-5, rtol=1e-4)


def test_chunked_logprobs_bf16_hidden():
    hidden, lm_head, targets = _head(3, 2, 13)
    hidden_bf16 = hidden.astype(jnp.bfloat16)
    logp, ent = losses.chunked_token_logprobs(hidden_bf16, lm_head, targets, chunk_size=4)
    assert logp.dtype == ent.dtype == jnp.float32
    # Same numbers as fp32 maths on the bf16-rounded activations...
    logits = hidden_bf16.astype(jnp.float32) @ lm_head
    close(logp, losses.token_logprobs(logits, targets), atol=1e-5)
    close(ent, losses.token_entropy(logits), atol=1e-5)
    # ...and within bf16 rounding (relative 2^-9 per entry) of the unrounded fp32 result.
    close(logp, losses.token_logprobs(hidden @ lm_head, targets), atol=2e-2, rtol=0)
    # Both weights in bf16 too, and gradients still reach both.
    grads = jax.grad(
        lambda h, w: losses.chunked_token_logprobs(h, w, targets, chunk_size=4)[0].sum(),
        argnums=(0, 1),
    )(hidden_bf16, lm_head.astype(jnp.bfloat16))
    assert all(bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0)) for g in grads)


def test_chunked_logprobs_never_holds_all_logits():
    # Forward and backward: no buffer with all T·V logits of a row block.
    hidden, lm_head, targets = _head(0, 2, 32, v=48)
    fn = lambda h, w: losses.chunked_token_logprobs(h, w, targets, chunk_size=8)[0].sum()
    hlo = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hidden, lm_head).compile().as_text()
    assert "f32[2,8,48]" in hlo
    assert "f32[2,32,48]" not in hlo and "f32[4,2,8,48]" not in hlo


def test_chunked_logprobs_bad_chunk_size():
    hidden, lm_head, targets = _head(0, 1, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_token_logprobs(hidden, lm_head, targets, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# Masked mean and KL.


@JIT
def test_masked_mean(jit):
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    close(call(losses.masked_mean, jit, x, mask), 1.5)
    close(call(losses.masked_mean, jit, x, mask.astype(bool), axis=-1), [1.5, 0.0])
    zero = call(losses.masked_mean, jit, x, jnp.zeros_like(mask))
    assert np.isfinite(zero) and float(zero) == 0.0
    grad = jax.grad(lambda y: losses.masked_mean(y, jnp.zeros_like(mask)))(x)
    assert bool(jnp.all(jnp.isfinite(grad)))


@JIT
def test_kl_estimator_values(jit):
    logp = jnp.log(jnp.array([[0.5, 0.25, 0.1]]))
    ref = jnp.log(jnp.array([[0.25, 0.25, 0.2]]))
    mask = jnp.array([[1, 1, 0]])
    k1 = call(losses.kl_divergence, jit, logp, ref, mask, estimator="k1")
    k3 = call(losses.kl_divergence, jit, logp, ref, mask, estimator="k3")
    k2 = call(losses.kl_divergence, jit, logp, ref, mask, estimator="k2")
    close(k1, [[np.log(2), 0.0, 0.0]])
    close(k3, [[0.5 + np.log(2) - 1, 0.0, 0.0]])
    close(k2, [[0.5 * np.log(2) ** 2, 0.0, 0.0]])
    assert float(jnp.min(call(losses.kl_divergence, jit, ref, logp, jnp.ones((1, 3))))) >= 0
    with pytest.raises(ValueError, match="k1"):
        losses.kl_divergence(logp, ref, mask, "k4")


# ---------------------------------------------------------------------------------------------
# Losses against the formulas.


@JIT
@pytest.mark.parametrize("seed", [0, 1])
def test_aapo_and_pg_match_numpy(jit, seed):
    logp, adv, mask, _, _ = random_batch(seed)
    per_token = -np.asarray(logp, np.float64) * np.asarray(adv, np.float64)[:, None]
    for seq_mean in (False, True):
        terms = call(losses.pg_terms, jit, logp, adv, mask, seq_mean=seq_mean)
        total, denom = np_reduce(per_token, mask, seq_mean)
        close(terms.total, total)
        close(terms.denominator, denom)
        close(terms.metrics["pg_loss"], total)
        close(terms.metrics["logprob"], np_reduce(logp, mask, seq_mean)[0])
    terms = call(losses.aapo_terms, jit, logp, adv, mask)
    total, denom = np_reduce(per_token, mask, False)
    close(terms.total, total)
    close(terms.denominator, denom)
    close(call(losses.aapo_loss, jit, logp, adv, mask), total / denom)


@JIT
@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("seq_mean", [False, True])
def test_ppo_clip_matches_numpy(jit, estimator, seq_mean):
    logp, adv, mask, old, ref = random_batch(3)
    hp = {"eps_low": 0.2, "eps_high": 0.28, "kl_beta": 0.04, "kl_estimator": estimator}
    terms = call(
        losses.ppo_clip_terms,
        jit,
        logp,
        adv,
        mask,
        old_logprobs_NxT=old,
        ref_logprobs_NxT=ref,
        seq_mean=seq_mean,
        **hp,
    )
    total, denom, clip_sum, kl_sum = np_ppo(
        logp, adv, mask, old, ref, 0.2, 0.28, 0.04, estimator, seq_mean
    )
    close(terms.total, total)
    close(terms.denominator, denom)
    close(terms.metrics["clip_frac"], clip_sum)
    close(terms.metrics["kl"], kl_sum)
    assert float(clip_sum) > 0  # the random old log-probs do exercise clipping


def test_ppo_clip_fraction_hand_case():
    # ratios e^0.5 (A>0: clipped), e^0.5 (A<0: not clipped), e^-0.5 (A<0: clipped), 1.
    logp = jnp.zeros((4, 1))
    old = jnp.array([[-0.5], [-0.5], [0.5], [0.0]])
    adv = jnp.array([1.0, -1.0, -1.0, 1.0])
    terms = losses.ppo_clip_terms(logp, adv, jnp.ones((4, 1)), old_logprobs_NxT=old)
    close(terms.metrics["clip_frac"], 2.0)
    expected = -(1.2 * 1) - (np.exp(0.5) * -1) - (0.8 * -1) - 1.0
    close(terms.total, expected)


def test_aapo_loss_mask_dtypes_and_empty_mask():
    logp, adv, mask, _, _ = random_batch(5)
    as_bool = losses.aapo_loss(logp, adv, mask)
    close(losses.aapo_loss(logp, adv, mask.astype(jnp.int32)), as_bool, atol=0)
    close(losses.aapo_loss(logp, adv, mask.astype(jnp.float32)), as_bool, atol=0)
    empty = losses.aapo_loss(logp, adv, jnp.zeros_like(mask))
    assert float(empty) == 0.0
    grad = jax.grad(losses.aapo_loss)(logp, adv, jnp.zeros_like(mask))
    assert bool(jnp.all(grad == 0))


def test_aapo_loss_gradient():
    # d/dlogp_it of −Σ m·logp·A / Σ m is −m_it·A_i / Σ m; no gradient into advantages.
    logp, adv, mask, _, _ = random_batch(6)
    g_logp, g_adv = jax.grad(losses.aapo_loss, argnums=(0, 1))(logp, adv, mask)
    m = np.asarray(mask, np.float64)
    close(g_logp, -m * np.asarray(adv)[:, None] / m.sum())
    assert bool(jnp.all(g_adv == 0))


# ---------------------------------------------------------------------------------------------
# Micro-batch accumulation gives the global mean.


def _accumulate(fn, k, logp, adv, mask, old, ref, **hp):
    parts = [
        fn(lp, a, m, old_logprobs_NxT=o, ref_logprobs_NxT=r, **hp)
        for lp, a, m, o, r in zip(
            *(jnp.split(x, k) for x in (logp, adv, mask, old, ref)), strict=True
        )
    ]
    return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), parts)


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("aapo", {}),
        ("pg", {"seq_mean": True}),
        ("ppo_clip", {"kl_beta": 0.1, "eps_high": 0.28}),
        ("ppo_clip", {"kl_beta": 0.1, "seq_mean": True, "kl_estimator": "k1"}),
    ],
)
@pytest.mark.parametrize("k", [2, 3])
def test_micro_batch_accumulation(name, hp, k):
    batch = random_batch(11, n=12)
    fn = losses.get_loss_fn(name)
    logp, adv, mask, old, ref = batch
    whole = fn(logp, adv, mask, old_logprobs_NxT=old, ref_logprobs_NxT=ref, **hp)
    summed = jax.jit(functools.partial(_accumulate, fn, k, **hp))(*batch)
    close(summed.total / summed.denominator, whole.total / whole.denominator)
    close(summed.mean(), whole.mean())
    for key in whole.metrics:
        close(summed.metric_means()[key], whole.metric_means()[key])
    # Not the same as averaging per-micro-batch means when lengths differ.
    parts_mean = np.mean(
        [
            fn(lp, a, m, old_logprobs_NxT=o, ref_logprobs_NxT=r, **hp).mean()
            for lp, a, m, o, r in zip(*(jnp.split(x, k) for x in batch), strict=True)
        ]
    )
    assert abs(parts_mean - float(whole.mean())) > 1e-6


# ---------------------------------------------------------------------------------------------
# PPO-clip on-policy reduces to the policy gradient.


@pytest.mark.parametrize("old", ["same", "none"])
def test_ppo_clip_on_policy_gradient_equals_pg(old):
    logp, adv, mask, _, _ = random_batch(8)

    def ppo(lp):
        old_lp = lp if old == "same" else None
        terms = losses.ppo_clip_terms(lp, adv, mask, old_logprobs_NxT=old_lp, kl_beta=0.0)
        return terms.mean()

    pg = lambda lp: losses.pg_terms(lp, adv, mask).mean()
    close(jax.grad(ppo)(logp), jax.grad(pg)(logp), atol=1e-7)
    close(jax.grad(ppo)(logp), jax.grad(losses.aapo_loss)(logp, adv, mask), atol=1e-7)


def test_ppo_clip_kl_gradient():
    # On-policy with k3 KL: gradient is (−A_i + β·(1 − exp(ref − logp))) · m / Σ m.
    logp, adv, mask, _, ref = random_batch(9)
    beta = 0.5
    grad = jax.grad(
        lambda lp: losses.ppo_clip_terms(lp, adv, mask, ref_logprobs_NxT=ref, kl_beta=beta).mean()
    )(logp)
    m = np.asarray(mask, np.float64)
    kl_grad = 1 - np.exp(np.asarray(ref, np.float64) - np.asarray(logp, np.float64))
    expected = (-np.asarray(adv)[:, None] + beta * kl_grad) * m / m.sum()
    close(grad, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Registry, pytree and errors.


def test_registry():
    assert set(losses.LOSSES) == {"aapo", "pg", "ppo_clip"}
    with pytest.raises(ValueError, match="valid names") as info:
        losses.get_loss_fn("grpo_loss")
    for name in losses.LOSSES:
        assert name in str(info.value)


def test_uniform_signature():
    logp, adv, mask, old, ref = random_batch(4)
    for name, fn in losses.LOSSES.items():
        terms = fn(logp, adv, mask, old_logprobs_NxT=old, ref_logprobs_NxT=ref)
        assert isinstance(terms, losses.LossTerms), name
        assert terms.total.shape == terms.denominator.shape == (), name
        assert all(v.shape == () for v in terms.metrics.values()), name
        terms_no_ref = fn(logp, adv, mask)
        assert np.isfinite(float(terms_no_ref.mean())), name


def test_loss_terms_is_a_pytree():
    logp, adv, mask, _, _ = random_batch(4)
    terms = jax.jit(losses.aapo_terms)(logp, adv, mask)
    leaves = jax.tree.leaves(terms)
    assert len(leaves) == 2 + len(terms.metrics)


def test_errors():
    logp, adv, mask, _, _ = random_batch(4)
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.ppo_clip_terms(logp, adv, mask, kl_beta=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        losses.ppo_clip_terms(logp, adv, mask, ref_logprobs_NxT=logp, kl_estimator="k9")
    with pytest.raises(ValueError, match="mask shape"):
        losses.aapo_loss(logp, adv, mask[:, :-1])
    with pytest.raises(ValueError, match=r"advantages must have shape \[N\]"):
        losses.aapo_loss(logp, adv[:-1], mask)
