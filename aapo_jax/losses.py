"""Policy-gradient losses (AAPO, PG, PPO-clip) as (sum, denominator) terms, and KL estimators.

`aapo_jax.algorithms` pairs each loss with an advantage estimator.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Shaped

Mask = Shaped[Array, "N T"]  # bool, int or float; nonzero marks a completion token.


# ---------------------------------------------------------------------------------------------
# KL estimators.


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
        """total / max(denominator, 1): the mean over the units (0 when there are none)."""
        return self.total / jnp.maximum(self.denominator, 1.0)


# fn(logprobs_NxT, advantages_N, mask_NxT, **hparams) -> LossTerms; a loss with a KL
# penalty also takes kl_NxT=.
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


def _token_mean(tokens_N, t_max, group_size):
    return jnp.ones_like(tokens_N), tokens_N


def _seq_mean(tokens_N, t_max, group_size):
    return 1.0 / jnp.maximum(tokens_N, 1.0), (tokens_N > 0).astype(jnp.float32)


def _per_prompt_token_mean(tokens_N, t_max, group_size):
    n = tokens_N.shape[0]
    if n % group_size:
        raise ValueError(f"{n} rows do not split into groups of {group_size}.")
    group_tokens = jnp.repeat(jnp.sum(tokens_N.reshape(-1, group_size), 1), group_size)
    units = (group_tokens > 0).astype(jnp.float32) / group_size
    return 1.0 / jnp.maximum(group_tokens, 1.0), units


def _seq_mean_token_sum(tokens_N, t_max, group_size):
    return jnp.full_like(tokens_N, 1.0 / t_max), jnp.ones_like(tokens_N)


# How a loss over a step's tokens is normalised: name -> fn(tokens_N, T_max, G) -> (w_N, u_N),
# the per-row token weights and loss units of `aggregation_weights` (config
# `rl.loss_aggregation` reads its valid names here).
AGGREGATIONS: dict[str, Callable[[Array, int, int], tuple[Array, Array]]] = {
    "token_mean": _token_mean,
    "seq_mean": _seq_mean,
    "per_prompt_token_mean": _per_prompt_token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
}


def aggregation_weights(
    mask_NxT: Mask, aggregation: str, group_size: int = 1
) -> tuple[Float[Array, " N"], Float[Array, " N"]]:
    """Per-row token weights and loss units of a batch for a loss aggregation.

    The loss is Σ_{i,t} w_i · m_it · ℓ_it / Σ_i u_i. Rows come in groups of
    `group_size` consecutive rows sharing a prompt (rows b·G + g).

        token_mean             w = 1,                 u_i = T_i: one mean over all tokens
        seq_mean               w = 1 / T_i,           u_i = [T_i > 0]: completions weigh equally
        per_prompt_token_mean  w = 1 / Σ_group T,     u_i = [group has tokens] / G: a token mean
                               per prompt, averaged over prompts (TRL 0.16 with one prompt's
                               G rows per device micro-batch, as the AAPO authors ran it)
        seq_mean_token_sum     w = 1 / T_max,         u_i = 1: each completion's token sum over
                               the generation budget T_max (the mask's width), mean over
                               completions (Dr. GRPO)

    Computed once over whole groups before a step is split into micro-batches, whose
    (Σ w·m·ℓ, Σ u) then add up to the exact batch loss.

    Raises:
      ValueError: an unknown aggregation (not in `AGGREGATIONS`), or rows that do not split
        into groups.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; valid: {sorted(AGGREGATIONS)}")
    tokens_N = jnp.sum(mask_NxT.astype(jnp.float32), axis=-1)
    return AGGREGATIONS[aggregation](tokens_N, mask_NxT.shape[1], group_size)


def _reducer(mask_NxT: Float[Array, "N T"], seq_mean: bool, row_weights=None):
    """Returns (reduce, denominator): reduce(x_NxT) sums x over the loss units.

    `row_weights` = (w_N, u_N) from `aggregation_weights`; without it, the token mean or
    (`seq_mean`) the sequence mean of these rows. Sequences without tokens contribute 0
    and are not counted.
    """
    if row_weights is None:
        row_weights = aggregation_weights(mask_NxT, "seq_mean" if seq_mean else "token_mean")
    weights_N, units_N = row_weights
    weights_NxT = mask_NxT * weights_N.astype(jnp.float32)[:, None]
    return (lambda x_NxT: jnp.sum(x_NxT * weights_NxT)), jnp.sum(units_N)


def pg_terms(
    logprobs_NxT: Float[Array, "N T"],
    advantages_N: Float[Array, " N"],
    mask_NxT: Mask,
    *,
    seq_mean: bool = False,
    row_weights: tuple[Array, Array] | None = None,
) -> LossTerms:
    """On-policy policy-gradient (REINFORCE) loss.

        token mean:     L = − Σ_{i,t} m_it · logp_it · A_i  /  Σ_{i,t} m_it
        sequence mean:  L = − Σ_i (Σ_t m_it · logp_it / Σ_t m_it) · A_i  /  #{i : Σ_t m_it > 0}

    Args:
      logprobs_NxT: f32 log π_θ of the sampled tokens.
      advantages_N: f32 advantage per completion (no gradient flows into it).
      mask_NxT: completion mask (bool / int / float).
      seq_mean: average each sequence's tokens first (GRPO-style) instead of a token mean.
      row_weights: (w_N, u_N) of `aggregation_weights`, another normalisation (then
        seq_mean must be False).

    Returns:
      LossTerms with metrics ``pg_loss``, ``logprob`` and ``advantage`` (sums).
    """
    logp_NxT, adv_Nx1, mask_NxT = _prepare(logprobs_NxT, advantages_N, mask_NxT)
    reduce, denominator = _reducer(mask_NxT, seq_mean, row_weights)
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
    row_weights: tuple[Array, Array] | None = None,
) -> LossTerms:
    """AAPO loss (arXiv 2505.14264): the token-mean policy gradient with AAPO advantages.

        L = − Σ_{i,t} m_it · logp_it · A_i  /  Σ_{i,t} m_it

    One update per rollout batch: no importance ratio, no clipping, no KL term.

    Args:
      logprobs_NxT: f32 log π_θ of the sampled tokens.
      advantages_N: f32 AAPO advantage per completion.
      mask_NxT: completion mask.
      row_weights: another normalisation (`aggregation_weights`), e.g. the authors'
        per-prompt token mean.

    Returns:
      LossTerms (total, denominator = Σ m, metrics as in pg_terms).
    """
    return pg_terms(logprobs_NxT, advantages_N, mask_NxT, row_weights=row_weights)


def ppo_clip_terms(
    logprobs_NxT: Float[Array, "N T"],
    advantages_N: Float[Array, " N"],
    mask_NxT: Mask,
    *,
    kl_NxT: Float[Array, "N T"] | None = None,
    old_logprobs_NxT: Float[Array, "N T"] | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_beta: float = 0.0,
    seq_mean: bool = False,
    row_weights: tuple[Array, Array] | None = None,
) -> LossTerms:
    """PPO-clip surrogate with an optional KL penalty (the GRPO loss).

        ρ_it = exp(logp_it − logp_old_it)
        ℓ_it = − min(ρ_it · A_i, clip(ρ_it, 1 − ε_low, 1 + ε_high) · A_i) + β · KL_it

    reduced as a token mean (or a sequence mean with seq_mean=True, as in TRL's GRPO).

    Args:
      logprobs_NxT: f32 log π_θ of the sampled tokens.
      advantages_N: f32 advantage per completion.
      mask_NxT: completion mask.
      kl_NxT: per-token KL(π_θ ‖ π_ref) estimate (`kl_divergence` of logprobs_NxT, so the
        penalty's gradient flows through it); required when kl_beta != 0.
      old_logprobs_NxT: log-probs under the sampling policy; None means on-policy
        (stop_gradient(logprobs), ratio 1 with the policy gradient).
      eps_low: ε_low.
      eps_high: ε_high.
      kl_beta: β, weight of the KL penalty.
      seq_mean: average each sequence's tokens first.
      row_weights: (w_N, u_N) of `aggregation_weights`, another normalisation.

    Returns:
      LossTerms with metrics ``pg_loss``, ``clip_frac`` (tokens where clipping binds),
      ``ratio`` and ``advantage`` (sums).

    Raises:
      ValueError: kl_beta != 0 without kl_NxT.
    """
    logp_NxT, adv_Nx1, mask_NxT = _prepare(logprobs_NxT, advantages_N, mask_NxT)
    kl_is_off = isinstance(kl_beta, int | float) and kl_beta == 0
    if kl_NxT is None and not kl_is_off:
        raise ValueError(f"ppo_clip with kl_beta={kl_beta} needs kl_NxT, got None")
    if old_logprobs_NxT is None:
        old_logp_NxT = jax.lax.stop_gradient(logp_NxT)
    else:
        old_logp_NxT = jax.lax.stop_gradient(old_logprobs_NxT.astype(jnp.float32))
    reduce, denominator = _reducer(mask_NxT, seq_mean, row_weights)

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
    if not kl_is_off:
        loss_NxT = loss_NxT + kl_beta * kl_NxT.astype(jnp.float32)
    return LossTerms(total=reduce(loss_NxT), denominator=denominator, metrics=metrics)


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
