"""Losses and log-probs: NumPy parity, micro-batch accumulation, gradients, chunking."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from aapo_jax import losses
from aapo_jax.logprobs import chunked_token_logprobs


def close(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), atol=atol, rtol=rtol
    )


# ---------------------------------------------------------------------------------------------
# Independent NumPy references (float64), straight from the formulas.


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_token_logprobs(logits, targets):
    return np.take_along_axis(np_log_softmax(logits), np.asarray(targets)[..., None], -1)[..., 0]


def np_entropy(logits):
    logp = np_log_softmax(logits)
    return -(np.exp(logp) * logp).sum(-1)


def np_head_logits(hidden, lm_head):
    """hidden @ lm_head in float64 from the (possibly bf16) values as stored."""
    as_f64 = lambda x: np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    return as_f64(hidden) @ as_f64(lm_head)


def np_head_grads(hidden, lm_head, targets, w_logp, w_ent):
    """Gradients of Σ w_logp·logp + w_ent·H w.r.t. hidden and lm_head, by hand.

    d logp_y / dz = onehot(y) − p,   dH / dz = −p ⊙ (log p + H).
    """
    h = np.asarray(jnp.asarray(hidden).astype(jnp.float32), np.float64)
    w = np.asarray(jnp.asarray(lm_head).astype(jnp.float32), np.float64)
    logp_all = np_log_softmax(h @ w)
    p = np.exp(logp_all)
    ent = -(p * logp_all).sum(-1)
    onehot = np.eye(w.shape[1])[np.asarray(targets)]
    w_logp, w_ent = np.asarray(w_logp, np.float64), np.asarray(w_ent, np.float64)
    dz = w_logp[..., None] * (onehot - p) - w_ent[..., None] * p * (logp_all + ent[..., None])
    return dz @ w.T, np.einsum("ntd,ntv->dv", h, dz)


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


def np_kl_grad(logp, ref, estimator):
    """d KL_it / d logp_it for each estimator."""
    logp, ref = np.asarray(logp, np.float64), np.asarray(ref, np.float64)
    if estimator == "k1":
        return np.ones_like(logp)
    if estimator == "k2":
        return logp - ref
    return 1 - np.exp(ref - logp)


def np_ppo(logp, adv, mask, old, ref, eps_low, eps_high, beta, estimator, seq_mean):
    """PPO-clip + β·KL: (total, denominator, metric sums)."""
    logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
    adv = np.asarray(adv, np.float64)[:, None]
    ratio = np.exp(logp - old)
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    kl = np_kl(logp, ref, estimator)
    total, denom = np_reduce(per_token + beta * kl, mask, seq_mean)
    metrics = {
        "pg_loss": np_reduce(per_token, mask, seq_mean)[0],
        "clip_frac": np_reduce(clipped, mask, seq_mean)[0],
        "ratio": np_reduce(ratio, mask, seq_mean)[0],
        "advantage": np_reduce(np.broadcast_to(adv, logp.shape), mask, seq_mean)[0],
    }
    return total, denom, metrics


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


def _head(seed, n, t, d=16, v=40):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    lm_head = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(n, t)), jnp.int32)
    return hidden, lm_head, targets


# ---------------------------------------------------------------------------------------------
# Chunked log-probs and entropy of the LM head.


class ChunkedLogprobsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("multiple", 16, 1.0),
        ("ragged", 13, 1.0),
        ("shorter_than_chunk", 3, 1.0),
        ("temperature", 13, 0.7),
    )
    def test_match_numpy_fp32(self, seq_len, temperature):
        hidden, lm_head, targets = _head(seq_len, 3, seq_len)
        fn = self.variant(
            functools.partial(chunked_token_logprobs, chunk_size=4, temperature=temperature)
        )
        logp, ent = fn(hidden, lm_head, targets)
        assert logp.shape == ent.shape == (3, seq_len)
        assert logp.dtype == ent.dtype == jnp.float32
        logits = np_head_logits(hidden, lm_head) / temperature
        close(logp, np_token_logprobs(logits, targets))
        close(ent, np_entropy(logits))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("hidden_bf16", False), ("both_bf16", True))
    def test_match_numpy_bf16(self, head_bf16):
        hidden, lm_head, targets = _head(3, 2, 13)
        hidden_bf16 = hidden.astype(jnp.bfloat16)
        head = lm_head.astype(jnp.bfloat16) if head_bf16 else lm_head
        logp, ent = self.variant(functools.partial(chunked_token_logprobs, chunk_size=4))(
            hidden_bf16, head, targets
        )
        assert logp.dtype == ent.dtype == jnp.float32
        # fp32 accumulation: the float64 maths on the bf16 values as stored...
        rounded = np_head_logits(hidden_bf16, head)
        close(logp, np_token_logprobs(rounded, targets), atol=1e-5)
        close(ent, np_entropy(rounded), atol=1e-5)
        # ...and within bf16 rounding (relative 2^-9 per entry) of the unrounded result.
        exact = np_head_logits(hidden, lm_head)
        close(logp, np_token_logprobs(exact, targets), atol=3e-2, rtol=0)
        close(ent, np_entropy(exact), atol=3e-2, rtol=0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("multiple", 15), ("ragged", 13), ("one_chunk", 5))
    def test_gradient_matches_numpy(self, seq_len):
        hidden, lm_head, targets = _head(seq_len + 100, 2, seq_len)
        weights = np.random.default_rng(7).normal(size=(2, 2, seq_len))

        def loss(h, w):
            logp, ent = chunked_token_logprobs(h, w, targets, chunk_size=5)
            return jnp.sum(weights[0] * logp + weights[1] * ent)

        grads = self.variant(jax.grad(loss, argnums=(0, 1)))(hidden, lm_head)
        expected = np_head_grads(hidden, lm_head, targets, weights[0], weights[1])
        for grad, want in zip(grads, expected, strict=True):
            close(grad, want, atol=1e-5, rtol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_bf16_inputs(self):
        hidden, lm_head, targets = _head(3, 2, 13)
        hidden, lm_head = hidden.astype(jnp.bfloat16), lm_head.astype(jnp.bfloat16)
        loss = lambda h, w: chunked_token_logprobs(h, w, targets, chunk_size=4)[0].sum()
        grads = self.variant(jax.grad(loss, argnums=(0, 1)))(hidden, lm_head)
        ones = np.ones(targets.shape)
        expected = np_head_grads(hidden, lm_head, targets, ones, 0 * ones)
        for grad, want in zip(grads, expected, strict=True):
            assert grad.dtype == jnp.bfloat16
            # The cotangent is rounded to bf16 on its way out: 2^-8 relative, plus sums.
            close(grad, want, atol=2e-2 * np.abs(want).max(), rtol=2e-2)


def test_chunked_logprobs_never_holds_all_logits():
    # Forward and backward: no buffer with all T·V logits of a row block.
    hidden, lm_head, targets = _head(0, 2, 32, v=48)
    fn = lambda h, w: chunked_token_logprobs(h, w, targets, chunk_size=8)[0].sum()
    hlo = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hidden, lm_head).compile().as_text()
    assert "f32[2,8,48]" in hlo
    assert "f32[2,32,48]" not in hlo and "f32[4,2,8,48]" not in hlo


def test_chunked_logprobs_bad_chunk_size():
    hidden, lm_head, targets = _head(0, 1, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(hidden, lm_head, targets, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# KL estimators.


class KLTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_values(self):
        logp = jnp.log(jnp.array([[0.5, 0.25, 0.1]]))
        ref = jnp.log(jnp.array([[0.25, 0.25, 0.2]]))
        mask = jnp.array([[1, 1, 0]])
        kl = {
            est: self.variant(functools.partial(losses.kl_divergence, estimator=est))(
                logp, ref, mask
            )
            for est in ("k1", "k2", "k3")
        }
        close(kl["k1"], [[np.log(2), 0.0, 0.0]])
        close(kl["k2"], [[0.5 * np.log(2) ** 2, 0.0, 0.0]])
        close(kl["k3"], [[0.5 + np.log(2) - 1, 0.0, 0.0]])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters((e, e) for e in ("k1", "k2", "k3"))
    def test_match_numpy(self, estimator):
        logp, _, mask, _, ref = random_batch(2)
        kl = self.variant(functools.partial(losses.kl_divergence, estimator=estimator))(
            logp, ref, mask
        )
        assert kl.dtype == jnp.float32
        close(kl, np.where(np.asarray(mask), np_kl(logp, ref, estimator), 0.0))

    def test_estimators_and_sign(self):
        assert set(losses.KL_ESTIMATORS) == {"k1", "k2", "k3"}
        logp, _, _, _, ref = random_batch(3)
        ones = jnp.ones_like(logp)
        # k2 and k3 are non-negative on every sample; k1 is not.
        assert float(jnp.min(losses.kl_divergence(logp, ref, ones, "k2"))) >= 0
        assert float(jnp.min(losses.kl_divergence(logp, ref, ones, "k3"))) >= 0
        assert float(jnp.min(losses.kl_divergence(logp, ref, ones, "k1"))) < 0

    def test_unknown_estimator(self):
        logp, _, mask, _, ref = random_batch(3)
        with pytest.raises(ValueError, match=r"kl_estimator 'k4'.*k1"):
            losses.kl_divergence(logp, ref, mask, "k4")


# ---------------------------------------------------------------------------------------------
# Losses against the formulas.


def _ppo_with_kl(logp, adv, mask, old, ref, *, estimator, **hp):
    """ppo_clip_terms with its penalty's KL computed from logp, as the train step does."""
    kl = losses.kl_divergence(logp, ref, mask, estimator)
    return losses.ppo_clip_terms(logp, adv, mask, kl_NxT=kl, old_logprobs_NxT=old, **hp)


REDUCTION = {False: "token_mean", True: "seq_mean"}
ESTIMATOR_X_REDUCTION = [
    (f"{est}_{REDUCTION[seq_mean]}", est, seq_mean)
    for est in ("k1", "k2", "k3")
    for seq_mean in (False, True)
]


class LossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        (f"seed{seed}_{REDUCTION[seq_mean]}", seed, seq_mean)
        for seed in (0, 1)
        for seq_mean in (False, True)
    )
    def test_pg_matches_numpy(self, seed, seq_mean):
        logp, adv, mask, _, _ = random_batch(seed)
        terms = self.variant(functools.partial(losses.pg_terms, seq_mean=seq_mean))(logp, adv, mask)
        per_token = -np.asarray(logp, np.float64) * np.asarray(adv, np.float64)[:, None]
        total, denom = np_reduce(per_token, mask, seq_mean)
        close(terms.total, total)
        close(terms.denominator, denom)
        close(terms.metrics["pg_loss"], total)
        close(terms.metrics["logprob"], np_reduce(logp, mask, seq_mean)[0])
        adv_per_token = np.broadcast_to(np.asarray(adv)[:, None], logp.shape)
        close(terms.metrics["advantage"], np_reduce(adv_per_token, mask, seq_mean)[0])
        close(terms.mean(), total / denom)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("seed0", 0), ("seed1", 1))
    def test_aapo_matches_numpy(self, seed):
        logp, adv, mask, _, _ = random_batch(seed)
        per_token = -np.asarray(logp, np.float64) * np.asarray(adv, np.float64)[:, None]
        total, denom = np_reduce(per_token, mask, False)
        terms = self.variant(losses.aapo_terms)(logp, adv, mask)
        close(terms.total, total)
        close(terms.denominator, denom)
        close(self.variant(losses.aapo_loss)(logp, adv, mask), total / denom)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(ESTIMATOR_X_REDUCTION)
    def test_ppo_clip_matches_numpy(self, estimator, seq_mean):
        logp, adv, mask, old, ref = random_batch(3)
        hp = {"eps_low": 0.2, "eps_high": 0.28, "kl_beta": 0.04}
        fn = functools.partial(_ppo_with_kl, estimator=estimator, seq_mean=seq_mean, **hp)
        terms = self.variant(fn)(logp, adv, mask, old, ref)
        total, denom, metrics = np_ppo(
            logp, adv, mask, old, ref, 0.2, 0.28, 0.04, estimator, seq_mean
        )
        close(terms.total, total)
        close(terms.denominator, denom)
        # The KL is the caller's metric now (it computed kl_NxT).
        assert set(terms.metrics) == set(metrics)
        for key, value in metrics.items():
            close(terms.metrics[key], value, atol=1e-5, rtol=1e-5)
        assert metrics["clip_frac"] > 0  # the random old log-probs do exercise clipping
        # The penalty adds exactly β · (reduced KL) to the total.
        kl_sum = np_reduce(np_kl(logp, ref, estimator), mask, seq_mean)[0]
        close(terms.total - terms.metrics["pg_loss"], 0.04 * kl_sum)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ppo_clip_zero_beta_ignores_kl(self):
        logp, adv, mask, old, ref = random_batch(4)
        kl = losses.kl_divergence(logp, ref, mask)
        fn = self.variant(
            lambda kl_NxT: (
                losses.ppo_clip_terms(
                    logp, adv, mask, kl_NxT=kl_NxT, old_logprobs_NxT=old, kl_beta=0.0
                ).total
            )
        )
        no_kl = losses.ppo_clip_terms(logp, adv, mask, old_logprobs_NxT=old).total
        close(fn(kl), no_kl, atol=0)
        close(fn(100 * kl + 1), no_kl, atol=0)

    def test_ppo_clip_fraction_hand_case(self):
        # ratios e^0.5 (A>0: clipped), e^0.5 (A<0: not clipped), e^-0.5 (A<0: clipped), 1.
        logp = jnp.zeros((4, 1))
        old = jnp.array([[-0.5], [-0.5], [0.5], [0.0]])
        adv = jnp.array([1.0, -1.0, -1.0, 1.0])
        terms = losses.ppo_clip_terms(logp, adv, jnp.ones((4, 1)), old_logprobs_NxT=old)
        close(terms.metrics["clip_frac"], 2.0)
        expected = -(1.2 * 1) - (np.exp(0.5) * -1) - (0.8 * -1) - 1.0
        close(terms.total, expected)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(ESTIMATOR_X_REDUCTION)
    def test_ppo_clip_kl_penalty_gradient(self, estimator, seq_mean):
        # On-policy: d/dlogp of the mean is (−A_i + β · dKL_it/dlogp_it) · w_it, where
        # w_it = m_it / Σ m (token mean) or m_it / (Σ_t m_it · #non-empty rows) (seq mean).
        logp, adv, mask, _, ref = random_batch(9)
        beta = 0.5

        def mean_loss(lp, kl_beta):
            kl = losses.kl_divergence(lp, ref, mask, estimator)
            return losses.ppo_clip_terms(
                lp, adv, mask, kl_NxT=kl, kl_beta=kl_beta, seq_mean=seq_mean
            ).mean()

        grad = self.variant(jax.grad(lambda lp: mean_loss(lp, beta)))(logp)
        grad_no_kl = self.variant(jax.grad(lambda lp: mean_loss(lp, 0.0)))(logp)
        m = np.asarray(mask, np.float64)
        if seq_mean:
            rows = m.sum(-1, keepdims=True)
            weights = m / np.maximum(rows, 1) / (rows > 0).sum()
        else:
            weights = m / m.sum()
        penalty = beta * np_kl_grad(logp, ref, estimator) * weights
        close(grad - grad_no_kl, penalty, atol=1e-6)
        close(grad, -np.asarray(adv)[:, None] * weights + penalty, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("old_is_logp", "same"), ("old_is_none", "none"))
    def test_ppo_clip_on_policy_gradient_equals_pg(self, old):
        logp, adv, mask, _, _ = random_batch(8)

        def ppo(lp):
            old_lp = lp if old == "same" else None
            return losses.ppo_clip_terms(lp, adv, mask, old_logprobs_NxT=old_lp).mean()

        grad = self.variant(jax.grad(ppo))(logp)
        m = np.asarray(mask, np.float64)
        close(grad, -m * np.asarray(adv)[:, None] / m.sum(), atol=1e-7)
        close(grad, jax.grad(lambda lp: losses.pg_terms(lp, adv, mask).mean())(logp), atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_aapo_loss_gradient(self):
        # d/dlogp_it of −Σ m·logp·A / Σ m is −m_it·A_i / Σ m; no gradient into advantages.
        logp, adv, mask, _, _ = random_batch(6)
        g_logp, g_adv = self.variant(jax.grad(losses.aapo_loss, argnums=(0, 1)))(logp, adv, mask)
        m = np.asarray(mask, np.float64)
        close(g_logp, -m * np.asarray(adv)[:, None] / m.sum())
        assert bool(jnp.all(g_adv == 0))


def test_aapo_loss_mask_dtypes_and_empty_mask():
    logp, adv, mask, _, _ = random_batch(5)
    as_bool = losses.aapo_loss(logp, adv, mask)
    close(losses.aapo_loss(logp, adv, mask.astype(jnp.int32)), as_bool, atol=0)
    close(losses.aapo_loss(logp, adv, mask.astype(jnp.float32)), as_bool, atol=0)
    empty = losses.aapo_loss(logp, adv, jnp.zeros_like(mask))
    assert float(empty) == 0.0
    grad = jax.grad(losses.aapo_loss)(logp, adv, jnp.zeros_like(mask))
    assert bool(jnp.all(grad == 0))


def test_seq_mean_empty_mask_is_zero():
    logp, adv, mask, _, _ = random_batch(5)
    empty = jnp.zeros_like(mask)
    for terms in (
        losses.pg_terms(logp, adv, empty, seq_mean=True),
        losses.ppo_clip_terms(logp, adv, empty, seq_mean=True),
    ):
        assert float(terms.denominator) == 0.0
        assert float(terms.mean()) == 0.0


# ---------------------------------------------------------------------------------------------
# Micro-batch accumulation gives the global mean, for every loss.


def _pg(logp, adv, mask, old, ref, **hp):
    return losses.pg_terms(logp, adv, mask, **hp)


def _aapo(logp, adv, mask, old, ref):
    return losses.aapo_terms(logp, adv, mask)


def _ppo(logp, adv, mask, old, ref, **hp):
    return _ppo_with_kl(logp, adv, mask, old, ref, estimator=hp.pop("estimator", "k3"), **hp)


LOSS_CASES = (
    ("aapo", _aapo),
    ("pg_token_mean", functools.partial(_pg, seq_mean=False)),
    ("pg_seq_mean", functools.partial(_pg, seq_mean=True)),
    ("ppo_clip_kl", functools.partial(_ppo, kl_beta=0.1, eps_high=0.28)),
    ("ppo_clip_kl_seq_mean", functools.partial(_ppo, kl_beta=0.1, seq_mean=True, estimator="k1")),
)


def _micro_batches(batch, k):
    return list(zip(*(jnp.split(x, k) for x in batch), strict=True))


class MicroBatchTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        (f"{name}_k{k}", fn, k) for name, fn in LOSS_CASES for k in (2, 3)
    )
    def test_accumulation(self, fn, k):
        batch = random_batch(11, n=12)
        whole = fn(*batch)
        step = self.variant(fn)
        parts = [step(*part) for part in _micro_batches(batch, k)]
        total = sum(float(p.total) for p in parts)
        denominator = sum(float(p.denominator) for p in parts)
        close(total / denominator, whole.mean())
        summed = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), parts)
        close(summed.mean(), whole.mean())
        assert set(summed.metrics) == set(whole.metrics)
        for key in whole.metrics:
            close(summed.metrics[key] / denominator, whole.metrics[key] / whole.denominator)
        # Not the same as averaging per-micro-batch means when lengths differ.
        parts_mean = np.mean([float(p.mean()) for p in parts])
        assert abs(parts_mean - float(whole.mean())) > 1e-6


# ---------------------------------------------------------------------------------------------
# Pytree, signatures and errors.


@pytest.mark.parametrize(
    "fn",
    [losses.aapo_terms, losses.pg_terms, losses.ppo_clip_terms],
    ids=["aapo", "pg", "ppo_clip"],
)
def test_loss_signature(fn):
    logp, adv, mask, _, _ = random_batch(4)
    terms = fn(logp, adv, mask)
    assert isinstance(terms, losses.LossTerms)
    assert terms.total.shape == terms.denominator.shape == ()
    assert terms.metrics and all(v.shape == () for v in terms.metrics.values())
    # Without hyper-parameters every loss has the on-policy token-mean policy gradient.
    grad = jax.grad(lambda lp: fn(lp, adv, mask).mean())(logp)
    close(grad, jax.grad(losses.aapo_loss)(logp, adv, mask), atol=1e-7)


def test_loss_terms_is_a_pytree():
    logp, adv, mask, _, _ = random_batch(4)
    terms = jax.jit(losses.aapo_terms)(logp, adv, mask)
    assert isinstance(terms, losses.LossTerms)
    leaves = jax.tree.leaves(terms)
    assert len(leaves) == 2 + len(terms.metrics)


def test_errors():
    logp, adv, mask, _, _ = random_batch(4)
    with pytest.raises(ValueError, match="needs kl_NxT"):
        losses.ppo_clip_terms(logp, adv, mask, kl_beta=0.1)
    with pytest.raises(ValueError, match="mask shape"):
        losses.aapo_loss(logp, adv, mask[:, :-1])
    with pytest.raises(ValueError, match=r"advantages must have shape \[N\]"):
        losses.aapo_loss(logp, adv[:-1], mask)
    with pytest.raises(ValueError, match=r"logprobs must have shape \[N, T\]"):
        losses.pg_terms(logp[0], adv, mask[0])


def test_aggregation_weights_match_the_losses_own_normalisations_and_the_formulas():
    rng = np.random.default_rng(0)
    n, t, g = 6, 5, 3
    logp = jnp.asarray(rng.normal(size=(n, t)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=n), jnp.float32)
    mask = jnp.asarray(np.arange(t)[None] < np.array([5, 2, 0, 4, 1, 3])[:, None])
    m, x = np.asarray(mask, np.float64), -np.asarray(logp, np.float64) * np.asarray(adv)[:, None]

    def loss(name):
        weights = losses.aggregation_weights(mask, name, g)
        return float(losses.pg_terms(logp, adv, mask, row_weights=weights).mean())

    np.testing.assert_allclose(loss("token_mean"), float(losses.pg_terms(logp, adv, mask).mean()))
    seq = float(losses.pg_terms(logp, adv, mask, seq_mean=True).mean())
    np.testing.assert_allclose(loss("seq_mean"), seq, rtol=1e-6)
    groups = [(x * m)[i : i + g].sum() / m[i : i + g].sum() for i in range(0, n, g)]
    np.testing.assert_allclose(loss("per_prompt_token_mean"), np.mean(groups), rtol=1e-6)
    np.testing.assert_allclose(loss("seq_mean_token_sum"), (x * m).sum() / (n * t), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        losses.aggregation_weights(mask, "mean")
    with pytest.raises(ValueError, match="6 rows do not split into groups of 4"):
        losses.aggregation_weights(mask, "per_prompt_token_mean", 4)
