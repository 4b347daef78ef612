"""fp32 log-probs and entropies of completion tokens under a model, memory-bounded over time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from aapo_jax.models.transformer import PrefixKV, Transformer, positions_from_mask


def _log_softmax_at(
    logits_xV: Float[Array, "... V"], targets_x: Int[Array, ...]
) -> tuple[Float[Array, ...], Float[Array, ...]]:
    """fp32 log-softmax gathered at targets, and the entropy of the distribution."""
    logits_xV = logits_xV.astype(jnp.float32)
    lse_x = jax.nn.logsumexp(logits_xV, axis=-1)
    target_logit_x = jnp.take_along_axis(logits_xV, targets_x[..., None], axis=-1)[..., 0]
    probs_xV = jnp.exp(logits_xV - lse_x[..., None])
    entropy_x = lse_x - jnp.sum(probs_xV * logits_xV, axis=-1)
    return target_logit_x - lse_x, entropy_x


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


def completion_logprobs(
    model: Transformer,
    prompt_ids: Int[Array, "N P"],
    prompt_mask: Array,
    completion_ids: Int[Array, "N T"],
    completion_mask: Array,
    *,
    chunk_size: int = 128,
    prompt_group_size: int = 1,
    temperature: float = 1.0,
) -> tuple[Float[Array, "N T"], Float[Array, "N T"]]:
    """fp32 log π(o_t | q, o_<t) and entropies for every completion token, chunked over T.

    `temperature` τ: of the distribution softmax(logits / τ), as in `chunked_token_logprobs`.

    With `prompt_group_size = G > 1` the caller promises that rows come in groups
    of G consecutive rows with identical prompts (the sampler's b·G + g order).
    Each prompt is then run through the model ONCE; its keys and values (a
    `PrefixKV`, not a decode cache) are shared by the G completions, which attend
    to them without copying them G times; gradients flow through the
    shared keys and values, so values and gradients equal the plain forward up to
    summation order. If N is not a multiple of G the plain forward is used.
    """
    g = prompt_group_size
    if g > 1 and prompt_ids.shape[0] % g == 0:
        last, prefix = prompt_prefix(model, prompt_ids[::g], prompt_mask[::g])
        return continuation_logprobs(
            model,
            jnp.repeat(last, g, axis=0),
            prefix.replace(repeats=g),
            prompt_mask,
            completion_ids,
            completion_mask,
            chunk_size=chunk_size,
            temperature=temperature,
        )
    prompt_len = prompt_ids.shape[1]
    mask = jnp.concatenate([prompt_mask.astype(bool), completion_mask.astype(bool)], axis=1)
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)
    hidden, _ = model.forward(ids, positions_from_mask(mask), mask)
    # Hidden state at position t predicts token t + 1.
    hidden = hidden[:, prompt_len - 1 : -1]
    return _completion_head(model, hidden, completion_ids, chunk_size, temperature)


def _completion_head(model: Transformer, hidden, completion_ids, chunk_size, temperature):
    """`chunked_token_logprobs` of the completion tokens through the model's LM head."""
    head = model.lm_head_kernel()
    return chunked_token_logprobs(
        hidden, head, completion_ids, chunk_size=chunk_size, temperature=temperature
    )


def prompt_prefix(
    model: Transformer, prompt_ids: Int[Array, "B P"], prompt_mask: Array
) -> tuple[Float[Array, "B D"], PrefixKV]:
    """One forward over B' (left-padded) prompts: the last slot's hidden state (it predicts
    each continuation's first token) and every layer's keys and values, for
    `continuation_logprobs`. Differentiable: the continuations' gradients flow back
    through both."""
    positions = positions_from_mask(prompt_mask)
    hidden, prefix = model.forward(prompt_ids, positions, prompt_mask, return_kv=True)
    return hidden[:, -1], prefix


def take_prompts(last: Float[Array, "B D"], prefix: PrefixKV, index: Int[Array, " N"]):
    """`prompt_prefix`'s outputs for rows that continue prompts `index` (one row each)."""
    taken = PrefixKV(
        k=jnp.take(prefix.k, index, axis=1),
        v=jnp.take(prefix.v, index, axis=1),
        mask_BxP=jnp.take(prefix.mask_BxP, index, axis=0),
    )
    return jnp.take(last, index, axis=0), taken


def continuation_logprobs(
    model: Transformer,
    last_N: Float[Array, "N D"],
    prefix: PrefixKV,
    prompt_mask: Array,
    completion_ids: Int[Array, "N T"],
    completion_mask: Array,
    *,
    chunk_size: int = 128,
    temperature: float = 1.0,
) -> tuple[Float[Array, "N T"], Float[Array, "N T"]]:
    """`completion_logprobs` of N completions that continue a `prompt_prefix`: `last_N` its
    last hidden state per row, `prefix` its keys and values (`repeats` rows per prompt),
    `prompt_mask` [N, P] each row's prompt mask (for the completions' positions)."""
    prompt_len = prompt_mask.shape[1]
    mask = jnp.concatenate([prompt_mask.astype(bool), completion_mask.astype(bool)], axis=1)
    positions = positions_from_mask(mask)[:, prompt_len:]
    completion_hidden, _ = model.forward(
        completion_ids, positions, mask[:, prompt_len:], prefix=prefix
    )
    hidden = jnp.concatenate([last_N[:, None], completion_hidden[:, :-1]], axis=1)
    return _completion_head(model, hidden, completion_ids, chunk_size, temperature)
