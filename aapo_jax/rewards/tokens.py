"""Jittable token-level rewards for synthetic tasks, usable inside one jitted RL step."""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped

# fn(tokens_NxT, mask_NxT, targets_NxA, target_len_N) -> f32[N]. Targets are padded with -1
# after target_len; the mask covers the generated tokens up to and including the first EOS.
TokenReward = Callable[..., Float[Array, " N"]]


def _matches(
    tokens: Int[Array, "N T"], targets: Int[Array, "N A"], target_len: Int[Array, " N"]
) -> tuple[Shaped[Array, "N K"], Shaped[Array, "N K"]]:
    """(match, in_target) over the first K = min(T, A) positions."""
    k = min(tokens.shape[1], targets.shape[1])
    in_target_NxK = jnp.arange(k)[None, :] < target_len[:, None]
    match_NxK = tokens[:, :k] == targets[:, :k]
    return match_NxK, in_target_NxK


def exact_match(
    tokens: Int[Array, "N T"],
    mask: Shaped[Array, "N T"],
    targets: Int[Array, "N A"],
    target_len: Int[Array, " N"],
) -> Float[Array, " N"]:
    """1.0 iff the completion is exactly the target answer followed by one more token (EOS).

        r_i = [tokens_i[:L_i] == targets_i[:L_i]] · [Σ_t mask_i,t == L_i + 1],  L_i = target_len_i

    The mask ends at the first EOS (inclusive), so a length of L_i + 1 means "the answer, then
    EOS". A completion that hits the budget T without EOS right after the answer gets 0 (choose
    T > A). Only the first target_len positions of targets are read.

    Args:
      tokens: int32[N, T] completion tokens.
      mask: bool/int[N, T] completion mask.
      targets: int32[N, A] target answer tokens, padded with -1.
      target_len: int32[N] number of target tokens.

    Returns:
      f32[N] in {0, 1}.
    """
    match_NxK, in_target_NxK = _matches(tokens, targets, target_len)
    length_N = jnp.sum(mask.astype(jnp.int32), axis=-1)
    all_match_N = jnp.all(match_NxK | ~in_target_NxK, axis=-1)
    fits_N = target_len <= match_NxK.shape[1]
    ok_N = all_match_N & fits_N & (length_N == target_len + 1)
    return ok_N.astype(jnp.float32)


def prefix_match(
    tokens: Int[Array, "N T"],
    mask: Shaped[Array, "N T"],
    targets: Int[Array, "N A"],
    target_len: Int[Array, " N"],
) -> Float[Array, " N"]:
    """Fraction of target tokens matched position-wise (partial credit).

        r_i = Σ_{p < L_i} [tokens_i,p == targets_i,p] · mask_i,p  /  max(L_i, 1)

    Tokens outside the mask (after EOS) never count. Length is not checked: an exact answer
    followed by more text still scores 1.0.

    Args/Returns: as `exact_match`; f32[N] in [0, 1].
    """
    match_NxK, in_target_NxK = _matches(tokens, targets, target_len)
    k = match_NxK.shape[1]
    hits_NxK = match_NxK & in_target_NxK & mask[:, :k].astype(bool)
    denominator_N = jnp.maximum(target_len, 1).astype(jnp.float32)
    return jnp.sum(hits_NxK, axis=-1).astype(jnp.float32) / denominator_N


TOKEN_REWARDS: dict[str, TokenReward] = {
    "exact_match": exact_match,
    "prefix_match": prefix_match,
}


def get_token_reward(name: str) -> TokenReward:
    """The token reward registered as `name`; ValueError naming the valid ones otherwise."""
    try:
        return TOKEN_REWARDS[name]
    except KeyError:
        raise ValueError(
            f"unknown token reward {name!r}; valid names: {sorted(TOKEN_REWARDS)}"
        ) from None
