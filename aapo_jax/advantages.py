"""Advantage estimators: pure, jittable functions from group rewards f32[B,G] to f32[B,G].

`aapo_jax.algorithms` pairs each with a loss and its hyper-parameters.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

# Added to the group std before dividing, as in the AAPO / TRL reference code.
STD_EPS = 1e-4


def _check_rewards(rewards: Float[Array, "B G"], name: str = "rewards") -> None:
    if rewards.ndim != 2:
        raise ValueError(f"{name} must have shape [B, G], got shape {rewards.shape}")


def _group_size(rewards: Float[Array, "B G"]) -> int:
    return rewards.shape[-1]


def grpo(rewards: Float[Array, "B G"], *, scale_rewards: bool = True) -> Float[Array, "B G"]:
    """GRPO group-relative advantage.

        Â_i = r_i − mean_j r_j                       (scale_rewards=False)
        Â_i = (r_i − mean_j r_j) / (std_j r_j + 1e-4)  (scale_rewards=True)

    std is the unbiased (ddof=1) standard deviation over the G completions of a prompt.

    Args:
      rewards: f32[B, G], rewards of G completions for each of B prompts.
      scale_rewards: divide by the group std (GRPO) or not (Dr. GRPO).

    Returns:
      f32[B, G] advantages.

    Raises:
      ValueError: rewards is not 2-D, or scale_rewards with G < 2 (the unbiased std of one
        sample is undefined).
    """
    _check_rewards(rewards)
    rewards_BxG = rewards.astype(jnp.float32)
    centred_BxG = rewards_BxG - jnp.mean(rewards_BxG, axis=-1, keepdims=True)
    if not scale_rewards:
        return centred_BxG
    if _group_size(rewards_BxG) < 2:
        raise ValueError(
            f"grpo with scale_rewards=True needs group size G >= 2 for the unbiased std, "
            f"got G={_group_size(rewards_BxG)}"
        )
    std_Bx1 = jnp.std(rewards_BxG, axis=-1, ddof=1, keepdims=True)
    return centred_BxG / (std_Bx1 + STD_EPS)


def dr_grpo(rewards: Float[Array, "B G"]) -> Float[Array, "B G"]:
    """Dr. GRPO advantage: the group mean baseline without std scaling.

        Â_i = r_i − mean_j r_j

    Args:
      rewards: f32[B, G].

    Returns:
      f32[B, G] advantages.
    """
    return grpo(rewards, scale_rewards=False)


def rloo(rewards: Float[Array, "B G"]) -> Float[Array, "B G"]:
    """REINFORCE leave-one-out advantage.

        A_i = r_i − 1/(G−1) · Σ_{j≠i} r_j  =  G/(G−1) · (r_i − mean_j r_j)

    Args:
      rewards: f32[B, G], G >= 2.

    Returns:
      f32[B, G] advantages.

    Raises:
      ValueError: G < 2 (no other completion to form the baseline from).
    """
    _check_rewards(rewards)
    group_size = _group_size(rewards)
    if group_size < 2:
        raise ValueError(f"rloo needs group size G >= 2, got G={group_size}")
    rewards_BxG = rewards.astype(jnp.float32)
    total_Bx1 = jnp.sum(rewards_BxG, axis=-1, keepdims=True)
    baseline_BxG = (total_Bx1 - rewards_BxG) / (group_size - 1)
    return rewards_BxG - baseline_BxG


def reinforce(rewards: Float[Array, "B G"]) -> Float[Array, "B G"]:
    """Plain REINFORCE: the raw reward is the advantage (no baseline).

        A_i = r_i

    Args:
      rewards: f32[B, G].

    Returns:
      f32[B, G] advantages (a float32 copy of rewards).
    """
    _check_rewards(rewards)
    return rewards.astype(jnp.float32)


def _check_margins(margin_low: float, margin_high: float) -> None:
    # Traced hyper-parameters cannot be checked here; config validation covers them.
    for name, value in (("margin_low", margin_low), ("margin_high", margin_high)):
        if isinstance(value, int | float) and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def margin(
    rewards: Float[Array, "B G"],
    ref_rewards: Float[Array, "B G"],
    *,
    margin_low: float = 0.2,
    margin_high: float = 0.28,
    return_stats: bool = False,
) -> Float[Array, "B G"] | tuple[Float[Array, "B G"], dict[str, Float[Array, ""]]]:
    """AAPO advantage margin against the paired reference completion.

        M_i = clip(r_i − r̃_i, −δ_low, +δ_high)

    Args:
      rewards: f32[B, G], rewards r of the policy's completions.
      ref_rewards: f32[B, G], rewards r̃ of the reference policy's completions, paired with
        rewards by index.
      margin_low: δ_low >= 0, the most the margin can subtract.
      margin_high: δ_high >= 0, the most the margin can add.
      return_stats: also return summary statistics of the margin, for metrics.

    Returns:
      f32[B, G] margins in [−δ_low, δ_high]; with `return_stats`, the pair (margins,
      stats) where stats holds f32 scalars: ``margin_mean`` (mean of M),
      ``margin_clip_low_frac`` (fraction with r − r̃ < −δ_low), ``margin_clip_high_frac``
      (fraction with r − r̃ > δ_high) and ``margin_nonzero_frac`` (fraction with M ≠ 0).
    """
    _check_rewards(rewards)
    _check_rewards(ref_rewards, "ref_rewards")
    if rewards.shape != ref_rewards.shape:
        raise ValueError(
            f"rewards and ref_rewards must have the same shape [B, G], "
            f"got {rewards.shape} and {ref_rewards.shape}"
        )
    _check_margins(margin_low, margin_high)
    diff_BxG = rewards.astype(jnp.float32) - ref_rewards.astype(jnp.float32)
    margin_BxG = jnp.clip(diff_BxG, -margin_low, margin_high)
    if not return_stats:
        return margin_BxG
    return margin_BxG, {
        "margin_mean": jnp.mean(margin_BxG),
        "margin_clip_low_frac": jnp.mean((diff_BxG < -margin_low).astype(jnp.float32)),
        "margin_clip_high_frac": jnp.mean((diff_BxG > margin_high).astype(jnp.float32)),
        "margin_nonzero_frac": jnp.mean((margin_BxG != 0).astype(jnp.float32)),
    }


def aapo(
    rewards: Float[Array, "B G"],
    ref_rewards: Float[Array, "B G"],
    *,
    scale_rewards: bool = False,
    margin_low: float = 0.2,
    margin_high: float = 0.28,
    return_stats: bool = False,
) -> Float[Array, "B G"] | tuple[Float[Array, "B G"], dict[str, Float[Array, ""]]]:
    """AAPO advantage: group-relative part plus the clipped margin over the reference.

        Â_i = r_i − mean_j r_j            (÷ (std_j r_j + 1e-4) if scale_rewards)
        A_i = Â_i + clip(r_i − r̃_i, −δ_low, +δ_high)

    When all rewards of a group are equal (Â = 0) the margin still carries signal.

    Args:
      rewards: f32[B, G], rewards r of the policy's completions.
      ref_rewards: f32[B, G], rewards r̃ of the reference completions, paired by index.
      scale_rewards: divide the group part by the unbiased group std (+1e-4).
      margin_low: δ_low >= 0.
      margin_high: δ_high >= 0.
      return_stats: also return the margin's statistics (`margin`), for metrics (the
        registry's entry point, `algorithms.ALGORITHMS["aapo"]`).

    Returns:
      f32[B, G] advantages, or with `return_stats` the pair (advantages, stats).
    """
    margin_BxG, stats = margin(
        rewards, ref_rewards, margin_low=margin_low, margin_high=margin_high, return_stats=True
    )
    advantages_BxG = grpo(rewards, scale_rewards=scale_rewards) + margin_BxG
    return (advantages_BxG, stats) if return_stats else advantages_BxG
