"""Per-token log-probs in fp32, policy-gradient losses (AAPO, PG, PPO-clip) and KL estimators."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int, Shaped

Mask = Shaped[Array, "N T"]  # bool, int or float; nonzero marks a completion token.


# ---------------------------------------------------------------------------------------------
# Log-probabilities.


def _log_softmax_at(
    logits_xV: Float[Array, "... V"], targets_x: Int[Array, "..."]
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """fp32 log-softmax gathered at targets, and the entropy of the distribution."""
    logits_xV = logits_xV.astype(jnp.float32)
    lse_x = jax.nn.logsumexp(logits_xV, axis=-1)
    target_logit_x = jnp.take_along_axis(logits_xV, targets_x[..., None], axis=-1)[..., 0]
    probs_xV = jnp.exp(logits_xV - lse_x[..., None])
    entropy_x = lse_x - jnp.sum(probs_xV * logits_xV, axis=-1)
    return target_logit_x - lse_x, entropy_x


def token_logprobs(
    logits_NxTxV: Float[Array, "N T V"],
    targets_NxT: Int[Array, "N T"],
    *,
    temperature: float = 1.0,
) -> Float[Array, "N T"]:
    """Log-probability of each target token, computed in fp32.

        logp[n, t] = logits[n, t, y] / τ − logsumexp_v(logits[n, t, v] / τ),  y = targets[n, t]

    Args:
      logits_NxTxV: logits (any float dtype) aligned with targets: position t predicts
        targets[:, t].
      targets_NxT: int token ids.
      temperature: τ, the sampling temperature the logits are divided by.

    Returns:
      f32[N, T] log-probabilities.
    """
    logits_NxTxV = logits_NxTxV.astype(jnp.float32) / temperature
    lse_NxT = jax.nn.logsumexp(logits_NxTxV, axis=-1)
    target_NxT = jnp.take_along_axis(logits_NxTxV, targets_NxT[..., None], axis=-1)[..., 0]
    return target_NxT - lse_NxT


def token_entropy(
    logits_NxTxV: Float[Array, "N T V"], *, temperature: float = 1.0
) -> Float[Array, "N T"]:
    """Entropy of each next-token distribution, computed in fp32.

        H[n, t] = −Σ_v p_v log p_v,   p = softmax(logits[n, t] / τ)

    Args:
      logits_NxTxV: logits, any float dtype.
      temperature: τ.

    Returns:
      f32[N, T] entropies in nats.
    """
    logp_NxTxV = jax.nn.log_softmax(logits_NxTxV.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(logp_NxTxV) * logp_NxTxV, axis=-1)


def chunked_token_logprobs(
    hidden_NxTxD: Float[Array, "N T D"],
    lm_head_DxV: Float[Array, "D V"],
    targets_NxT: Int[Array, "N T"],
    *,
    chunk_size: int = 128,
    temperature: float = 1.0,
) -> tuple[Float[Array, "N T"], Float[Array, "N T"]]:
    """Log-probs and entropies of the LM head output, one chunk of time steps at a time.

        logits = hidden @ lm_head / τ   (fp32 accumulation)
        logp[n, t] = logits[n, t, y] − logsumexp_v logits[n, t, v],   H[n, t] = entropy

    Only f32[N, chunk_size, V] logits exist at any time, forward and backward: the chunk
    body is rematerialised in the backward pass (when T spans several chunks) instead of
    saving its logits. T is padded up to a multiple of chunk_size and the result sliced back.
    bf16 inputs are multiplied with fp32 accumulation; a bf16 × bf16 product is exact in
    fp32, so this equals casting the inputs to fp32 first up to summation order.

    Args:
      hidden_NxTxD: final hidden states (after the final norm), aligned with targets.
      lm_head_DxV: output projection (the transposed embedding for tied weights).
      targets_NxT: int token ids.
      chunk_size: time steps per chunk (clamped to T).
      temperature: τ.

    Returns:
      (logprobs f32[N, T], entropy f32[N, T]). Gradients flow to hidden and lm_head.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_rows, seq_len, width = hidden_NxTxD.shape
    chunk = min(chunk_size, seq_len)
    num_chunks = -(-seq_len // chunk)
    pad = num_chunks * chunk - seq_len
    hidden_NxPxD = jnp.pad(hidden_NxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_NxP = jnp.pad(targets_NxT, ((0, 0), (0, pad)))
    hidden_KxNxCxD = hidden_NxPxD.reshape(num_rows, num_chunks, chunk, width).swapaxes(0, 1)
    targets_KxNxC = targets_NxP.reshape(num_rows, num_chunks, chunk).swapaxes(0, 1)

    def one_chunk(lm_head_DxV, hidden_NxCxD, targets_NxC):
        logits_NxCxV = jnp.einsum(
            "ncd,dv->ncv", hidden_NxCxD, lm_head_DxV, preferred_element_type=jnp.float32
        )
        return _log_softmax_at(logits_NxCxV / temperature, targets_NxC)

    if num_chunks == 1:
        # One chunk: keeping its logits for the backward pass costs no more memory than
        # recomputing them would (either way one chunk is live), and saves a matmul.
        return one_chunk(lm_head_DxV, hidden_NxTxD, targets_NxT)
    one_chunk = jax.checkpoint(one_chunk)

    # lm_head goes in as an argument (not a closure) so checkpoint sees it as an input.
    logp_KxNxC, entropy_KxNxC = jax.lax.map(
        lambda xs: one_chunk(lm_head_DxV, *xs), (hidden_KxNxCxD, targets_KxNxC)
    )

    def unchunk(x_KxNxC):
        return x_KxNxC.swapaxes(0, 1).reshape(num_rows, num_chunks * chunk)[:, :seq_len]

    return unchunk(logp_KxNxC), unchunk(entropy_KxNxC)


# ---------------------------------------------------------------------------------------------
# Masked reductions and KL.


def masked_mean(
    x: Float[Array, "..."], mask: Shaped[Array, "..."], axis=None
) -> Float[Array, "..."]:
    """Mean of x over entries where mask is nonzero, Σ m·x / max(Σ m, 1); 0 for an empty mask.

    Args:
      x: values.
      mask: bool / int / float weights, broadcastable to x.
      axis: axes to reduce (all by default).

    Returns:
      f32 masked mean.
    """
    mask = mask.astype(jnp.float32)
    x = x.astype(jnp.float32)
    total = jnp.sum(x * mask, axis=axis)
    count = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=axis)
    return total / jnp.maximum(count, 1.0)


def _kl_k1(logp, ref_logp):
    return logp - ref_logp


def _kl_k2(logp, ref_logp):
    return 0.5 * jnp.square(logp - ref_logp)


def _kl_k3(logp, ref_logp):
    log_ratio = ref_logp - logp
    return jnp.exp(log_ratio) - log_ratio - 1.0


# Schulman's estimators of KL(π_θ ‖ π_ref) from samples of π_θ.
KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
}


def kl_divergence(
    logprobs_NxT: Float[Array, "N T"],
    ref_logprobs_NxT: Float[Array, "N T"],
    mask_NxT: Mask,
    estimator: str = "k3",
) -> Float[Array, "N T"]:
    """Per-token estimate of KL(π_θ ‖ π_ref) on sampled tokens, zero off the mask.

        k1 = log π_θ − log π_ref
        k2 = ½ (log π_θ − log π_ref)²
        k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1

    Args:
      logprobs_NxT: f32 log π_θ of the sampled tokens.
      ref_logprobs_NxT: f32 log π_ref of the same tokens.
      mask_NxT: completion mask.
      estimator: "k1", "k2" or "k3".

    Returns:
      f32[N, T] per-token KL, 0 where mask is 0.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown kl_estimator {estimator!r}; valid names: {sorted(KL_ESTIMATORS)}"
        )
    kl_NxT = KL_ESTIMATORS[estimator](
        logprobs_NxT.astype(jnp.float32), ref_logprobs_NxT.astype(jnp.float32)
    )
    return jnp.where(mask_NxT != 0, kl_NxT, 0.0)


# ---------------------------------------------------------------------------------------------
# Loss terms.


@struct.dataclass
class LossTerms:
    """A loss as a sum and a denominator, so micro-batches add up to the global mean.

    Attributes:
      total: f32 scalar, the loss summed over its units (tokens, or sequences for a
        sequence-mean loss).
      denominator: f32 scalar, the number of units; the loss is Σ total / Σ denominator.
      metrics: dict of f32 scalars, each summed over the same units as total.
    """

    total: Float[Array, ""]
    denominator: Float[Array, ""]
    metrics: dict[str, Float[Array, ""]]

    def mean(self) -> Float[Array, ""]:
        """total / denominator, 0 when there are no units."""
        return self.total / jnp.maximum(self.denominator, 1.0)

    def metric_means(self) -> dict[str, Float[Array, ""]]:
        """Each metric divided by the denominator."""
        denominator = jnp.maximum(self.denominator, 1.0)
        return {name: value / denominator for name, value in self.metrics.items()}


LossFn = Callable[..., LossTerms]


def _prepare(logprobs_NxT, advantages_N, mask_NxT):
    if logprobs_NxT.ndim != 2:
        raise ValueError(f"logprobs must have shape [N, T], got {logprobs_NxT.shape}")
    if mask_NxT.shape != logprobs_NxT.shape:
        raise ValueError(
            f"mask shape {mask_NxT.shape} does not match logprobs shape {logprobs_NxT.shape}"
        )
    if advantages_N.shape != logprobs_NxT.shape[:1]:
        raise ValueError(
            f"advantages must have shape [N]={logprobs_NxT.shape[:1]}, got {advantages_N.shape}"
        )
    # Advantages are constants of the update: no gradient through them.
    advantages_Nx1 = jax.lax.stop_gradient(advantages_N.astype(jnp.float32))[:, None]
    return logprobs_NxT.astype(jnp.float32), advantages_Nx1, mask_NxT.astype(jnp.float32)


def _reducer(mask_NxT: Float[Array, "N T"], seq_mean: bool):
    """Returns (reduce, denominator): reduce(x_NxT) sums x over the loss units."""
    if not seq_mean:
        return (lambda x_NxT: jnp.sum(x_NxT * mask_NxT)), jnp.sum(mask_NxT)
    tokens_N = jnp.sum(mask_NxT, axis=-1)
    # Sequences without tokens contribute 0 and are not counted.
    weights_NxT = mask_NxT / jnp.maximum(tokens_N, 1.0)[:, None]
    denominator = jnp.sum((tokens_N > 0).astype(jnp.float32))
    return (lambda x_NxT: jnp.sum(x_NxT * weights_NxT)), denominator


def pg_terms(
    logprobs_NxT: Float[Array, "N T"],
    advantages_N: Float[Array, " N"],
    mask_NxT: Mask,
    *,
    old_logprobs_NxT: Float[Array, "N T"] | None = None,
    ref_logprobs_NxT: Float[Array, "N T"] | None = None,
    seq_mean: bool = False,
) -> LossTerms:
    """On-policy policy-gradient (REINFORCE) loss.

        token mean:     L = − Σ_{i,t} m_it · logp_it · A_i  /  Σ_{i,t} m_it
        sequence mean:  L = − Σ_i (Σ_t m_it · logp_it / Σ_t m_it) · A_i  /  #{i : Σ_t m_it > 0}

    Args:
      logprobs_NxT: f32 log π_θ of the sampled tokens.
      advantages_N: f32 advantage per completion (no gradient flows into it).
      mask_NxT: completion mask (bool / int / float).
      old_logprobs_NxT: unused (on-policy).
      ref_logprobs_NxT: unused (no KL term).
      seq_mean: average each sequence's tokens first (GRPO-style) instead of a token mean.

    Returns:
      LossTerms with metrics ``pg_loss``, ``logprob`` and ``advantage`` (sums).
    """
    del old_logprobs_NxT, ref_logprobs_NxT
    logp_NxT, adv_Nx1, mask_NxT = _prepare(logprobs_NxT, advantages_N, mask_NxT)
    reduce, denominator = _reducer(mask_NxT, seq_mean)
    total = reduce(-logp_NxT * adv_Nx1)
    metrics = {
        "pg_loss": total,
        "logprob": reduce(jax.lax.stop_gradient(logp_NxT)),
        "advantage": reduce(jnp.broadcast_to(adv_Nx1, logp_NxT.shape)),
    }
    return LossTerms(total=total, denominator=denominator, metrics=metrics)


def aapo_terms(
    logprobs_NxT: Float[Array, "N T"],
    advantages_N: Float[Array, " N"],
    mask_NxT: Mask,
    *,
    old_logprobs_NxT: Float[Array, "N T"] | None = None,
    ref_logprobs_NxT: Float[Array, "N T"] | None = None,
) -> LossTerms:
    """AAPO loss: the token-mean policy gradient with AAPO advantages (DESIGN §1).

        L = − Σ_{i,t} m_it · logp_it · A_i  /  Σ_{i,t} m_it

    One update per rollout batch: no importance ratio, no clipping, no KL term.

    Args:
      logprobs_NxT: f32 log π_θ of the sampled tokens.
      advantages_N: f32 AAPO advantage per completion.
      mask_NxT: completion mask.
      old_logprobs_NxT: unused.
      ref_logprobs_NxT: unused.

    Returns:
      LossTerms (total, denominator = Σ m, metrics as in pg_terms).
    """
    return pg_terms(
        logprobs_NxT,
        advantages_N,
        mask_NxT,
        old_logprobs_NxT=old_logprobs_NxT,
        ref_logprobs_NxT=ref_logprobs_NxT,
        seq_mean=False,
    )


def ppo_clip_terms(
    logprobs_NxT: Float[Array, "N T"],
    advantages_N: Float[Array, " N"],
    mask_NxT: Mask,
    *,
    old_logprobs_NxT: Float[Array, "N T"] | None = None,
    ref_logprobs_NxT: Float[Array, "N T"] | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_beta: float = 0.0,
    kl_estimator: str = "k3",
    seq_mean: bool = False,
) -> LossTerms:
    """PPO-clip surrogate with an optional KL penalty (the GRPO loss).

        ρ_it = exp(logp_it − logp_old_it)
        ℓ_it = − min(ρ_it · A_i, clip(ρ_it, 1 − ε_low, 1 + ε_high) · A_i) + β · KL_it

    reduced as a token mean (or a sequence mean with seq_mean=True, as in TRL's GRPO).

    Args:
      logprobs_NxT: f32 log π_θ of the sampled tokens.
      advantages_N: f32 advantage per completion.
      mask_NxT: completion mask.
      old_logprobs_NxT: log-probs under the sampling policy; None means on-policy
        (stop_gradient(logprobs), ratio 1 with the policy gradient).
      ref_logprobs_NxT: log π_ref, required when kl_beta != 0.
      eps_low: ε_low.
      eps_high: ε_high.
      kl_beta: β, weight of the KL penalty.
      kl_estimator: "k1", "k2" or "k3" (see kl_divergence).
      seq_mean: average each sequence's tokens first.

    Returns:
      LossTerms with metrics ``pg_loss``, ``clip_frac`` (tokens where clipping binds),
      ``ratio``, ``kl`` (when ref_logprobs is given) and ``advantage`` (sums).

    Raises:
      ValueError: kl_beta != 0 without ref_logprobs, or an unknown kl_estimator.
    """
    logp_NxT, adv_Nx1, mask_NxT = _prepare(logprobs_NxT, advantages_N, mask_NxT)
    kl_is_off = isinstance(kl_beta, int | float) and kl_beta == 0
    if ref_logprobs_NxT is None and not kl_is_off:
        raise ValueError(f"ppo_clip with kl_beta={kl_beta} needs ref_logprobs, got None")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown kl_estimator {kl_estimator!r}; valid names: {sorted(KL_ESTIMATORS)}"
        )
    if old_logprobs_NxT is None:
        old_logp_NxT = jax.lax.stop_gradient(logp_NxT)
    else:
        old_logp_NxT = jax.lax.stop_gradient(old_logprobs_NxT.astype(jnp.float32))
    reduce, denominator = _reducer(mask_NxT, seq_mean)

    ratio_NxT = jnp.exp(logp_NxT - old_logp_NxT)
    clipped_ratio_NxT = jnp.clip(ratio_NxT, 1.0 - eps_low, 1.0 + eps_high)
    pg_NxT = -jnp.minimum(ratio_NxT * adv_Nx1, clipped_ratio_NxT * adv_Nx1)
    is_clipped_NxT = ((ratio_NxT < 1.0 - eps_low) & (adv_Nx1 < 0)) | (
        (ratio_NxT > 1.0 + eps_high) & (adv_Nx1 > 0)
    )
    metrics = {
        "pg_loss": reduce(pg_NxT),
        "clip_frac": reduce(is_clipped_NxT.astype(jnp.float32)),
        "ratio": reduce(jax.lax.stop_gradient(ratio_NxT)),
        "advantage": reduce(jnp.broadcast_to(adv_Nx1, logp_NxT.shape)),
    }
    loss_NxT = pg_NxT
    if ref_logprobs_NxT is not None:
        kl_NxT = kl_divergence(logp_NxT, ref_logprobs_NxT, mask_NxT, kl_estimator)
        metrics["kl"] = reduce(jax.lax.stop_gradient(kl_NxT))
        if not kl_is_off:
            loss_NxT = loss_NxT + kl_beta * kl_NxT
    return LossTerms(total=reduce(loss_NxT), denominator=denominator, metrics=metrics)


LOSSES: dict[str, LossFn] = {
    "aapo": aapo_terms,
    "pg": pg_terms,
    "ppo_clip": ppo_clip_terms,
}


def get_loss_fn(name: str) -> LossFn:
    """The registry entry ``fn(logprobs, advantages, mask, *, old_logprobs_NxT,
    ref_logprobs_NxT, **hparams) -> LossTerms`` for a name."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}") from None


def aapo_loss(
    logprobs: Float[Array, "N T"], advantages: Float[Array, " N"], mask: Mask
) -> Float[Array, ""]:
    """AAPO loss as a scalar: − Σ_{i,t} m_it · logp_it · A_i / max(Σ_{i,t} m_it, 1).

    Args:
      logprobs: f32[N, T] log π_θ of the sampled tokens.
      advantages: f32[N] advantage per completion.
      mask: [N, T] completion mask, bool or int.

    Returns:
      f32 scalar loss (0 for an empty mask).
    """
    return aapo_terms(logprobs, advantages, mask).mean()
