"""Rollouts, the train step and the one-program RL step; reference policy handling."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int

from aapo_jax import advantages as advantages_lib
from aapo_jax import losses as losses_lib
from aapo_jax import sampling
from aapo_jax.configs import OptimConfig, RLConfig, SamplerSettings
from aapo_jax.models.transformer import Transformer, init_cache, positions_from_mask

TokenRewardFn = Callable[[Array, Array, Array, Array], Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `ref_params` is None when no reference is used."""

    step: Int[Array, ""]
    params: nnx.State
    opt_state: optax.OptState
    ref_params: nnx.State | None
    rng: Array
    skipped_updates: Int[Array, ""]


@flax.struct.dataclass
class RolloutBatch:
    """N = B·G scored completions, ready for the update (rows grouped by prompt)."""

    prompt_ids: Int[Array, "N P"]
    prompt_mask: Array
    completion_ids: Int[Array, "N T"]
    completion_mask: Array
    advantages: Float[Array, " N"]
    ref_logprobs: Float[Array, "N T"] | None = None
    old_logprobs: Float[Array, "N T"] | None = None


@flax.struct.dataclass
class PromptBatch:
    """B prompts of a JAX-native task: left-padded ids and the target answer tokens."""

    ids: Int[Array, "B P"]
    mask: Array
    targets: Int[Array, "B A"]
    target_len: Int[Array, " B"]


# ---------------------------------------------------------------------------
# Optimiser


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup, then constant or cosine decay to `final_lr_fraction` of the peak."""
    warmup = config.warmup_steps
    peak = config.learning_rate
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(
            peak, max(config.total_steps - warmup, 1), alpha=config.final_lr_fraction
        )
    if warmup == 0:
        return after
    # Warmup starts above 0 so the first step already moves (as TRL/transformers do).
    ramp = optax.linear_schedule(peak / (warmup + 1), peak, warmup)
    return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on the schedule."""
    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            make_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    )
    return optax.chain(*parts)


def init_train_state(
    model: Transformer, tx: optax.GradientTransformation, rl: RLConfig, rng: Array
) -> tuple[nnx.GraphDef, TrainState]:
    """Split the model once: a static graphdef and the pure train state.

    The reference starts as a copy of the initial weights (frozen by default).
    """
    graphdef, params = nnx.split(model)
    ref = jax.tree.map(jnp.copy, params) if rl.uses_reference else None
    return graphdef, TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ref_params=ref,
        rng=rng,
        skipped_updates=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------
# Log-probs of completions


def completion_logprobs(
    model: Transformer,
    prompt_ids: Int[Array, "N P"],
    prompt_mask: Array,
    completion_ids: Int[Array, "N T"],
    completion_mask: Array,
    *,
    chunk_size: int = 128,
    prompt_group_size: int = 1,
) -> tuple[Float[Array, "N T"], Float[Array, "N T"]]:
    """fp32 log π(o_t | q, o_<t) and entropies for every completion token, chunked over T.

    With `prompt_group_size = G > 1` the caller promises that rows come in groups
    of G consecutive rows with identical prompts (the sampler's b·G + g order).
    Each prompt is then run through the model ONCE into a KV cache that the G
    completions continue from, instead of G times; gradients flow through the
    shared keys and values, so values and gradients equal the plain forward up to
    summation order. If N is not a multiple of G the plain forward is used.
    """
    prompt_len = prompt_ids.shape[1]
    mask = jnp.concatenate([prompt_mask.astype(bool), completion_mask.astype(bool)], axis=1)
    positions = positions_from_mask(mask)
    g = prompt_group_size
    if g > 1 and prompt_ids.shape[0] % g == 0:
        remat = model.config.remat
        cache = init_cache(model.config, prompt_ids.shape[0] // g, mask.shape[1])
        prompt_hidden, cache = model.hidden_states(
            prompt_ids[::g], positions[::g, :prompt_len], mask[::g, :prompt_len], cache, remat=remat
        )
        completion_hidden, _ = model.hidden_states(
            completion_ids,
            positions[:, prompt_len:],
            mask[:, prompt_len:],
            cache.repeat_rows(g),
            remat=remat,
        )
        last_prompt = jnp.repeat(prompt_hidden[:, -1:], g, axis=0)
        hidden = jnp.concatenate([last_prompt, completion_hidden[:, :-1]], axis=1)
    else:
        ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)
        hidden, _ = model.hidden_states(ids, positions, mask)
        # Hidden state at position t predicts token t + 1.
        hidden = hidden[:, prompt_len - 1 : -1]
    return losses_lib.chunked_token_logprobs(
        hidden, model.lm_head_kernel(), completion_ids, chunk_size=chunk_size
    )


def _accepted_kwargs(fn: Callable, **candidates) -> dict:
    """The subset of `candidates` that `fn` takes as keyword arguments."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in candidates.items() if k in params}


def advantage_kwargs(rl: RLConfig) -> dict:
    fn = advantages_lib.get_advantage_fn(rl.advantage)
    return _accepted_kwargs(
        fn, scale_rewards=rl.scale_rewards, margin_low=rl.margin_low, margin_high=rl.margin_high
    )


def loss_kwargs(rl: RLConfig) -> dict:
    fn = losses_lib.get_loss_fn(rl.loss)
    return _accepted_kwargs(
        fn,
        eps_low=rl.eps_low,
        eps_high=rl.eps_high,
        kl_beta=rl.kl_beta,
        kl_estimator=rl.kl_estimator,
        seq_mean=rl.seq_mean,
    )


# ---------------------------------------------------------------------------
# The update


def _where_tree(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def update_reference(rl: RLConfig, step: Array, params: nnx.State, ref: nnx.State | None):
    """Frozen: unchanged. Sync: copy every k steps. EMA: ref ← (1−α)·ref + α·params."""
    if ref is None or rl.reference == "frozen":
        return ref
    if rl.reference == "sync":
        return _where_tree(step % rl.reference_sync_every == 0, params, ref)
    rate = rl.reference_ema_rate
    return jax.tree.map(lambda r, p: ((1 - rate) * r + rate * p).astype(r.dtype), ref, params)


def make_train_step(
    rl: RLConfig,
    optim: OptimConfig,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    prompt_group_size: int = 1,
    row_axis: str | None = None,
) -> Callable[[TrainState, RolloutBatch], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)`: one on-policy update of the policy.

    The batch is split into `optim.grad_accum_steps` micro-batches; their loss
    sums and denominators add up, so the gradient is that of the exact global
    token mean. A non-finite loss or gradient skips the update (counted in
    `skipped_updates`). Jit it yourself, e.g. with `jit_step`.

    `prompt_group_size = G` declares that batch rows come in groups of G with
    identical prompts (as `make_update_fn` builds them): each micro-batch then
    runs every prompt through the model once (see `completion_logprobs`).

    `row_axis`: the step runs inside `shard_map` with the batch rows split over
    this mesh axis and the state replicated; gradients, loss sums and
    denominators are summed over it before the update, so every device applies
    the same update: the global batch's (data parallelism).
    """
    loss_fn = losses_lib.get_loss_fn(rl.loss)
    hparams = loss_kwargs(rl)
    schedule = make_schedule(optim)
    k = optim.grad_accum_steps

    def micro_loss(params, mb: RolloutBatch, prompt_group: int):
        model = nnx.merge(graphdef, params)
        logp, entropy = completion_logprobs(
            model,
            mb.prompt_ids,
            mb.prompt_mask,
            mb.completion_ids,
            mb.completion_mask,
            chunk_size=rl.logprob_chunk_size,
            prompt_group_size=prompt_group,
        )
        terms = loss_fn(
            logp,
            mb.advantages,
            mb.completion_mask,
            old_logprobs_NxT=mb.old_logprobs,
            ref_logprobs_NxT=mb.ref_logprobs,
            **hparams,
        )
        mask = mb.completion_mask.astype(jnp.float32)
        sums = dict(terms.metrics)
        sums["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * mask)
        sums["tokens"] = jnp.sum(mask)
        if mb.ref_logprobs is not None:
            kl = losses_lib.kl_divergence(
                jax.lax.stop_gradient(logp), mb.ref_logprobs, mask, rl.kl_estimator
            )
            sums["kl"] = jnp.sum(kl * mask)
        return terms.total, (terms.denominator, sums)

    def step(state: TrainState, batch: RolloutBatch) -> tuple[TrainState, dict]:
        n = batch.completion_ids.shape[0]
        if n % k:
            raise ValueError(f"batch rows {n} not divisible by optim.grad_accum_steps={k}.")
        # Micro-batches are contiguous rows: groups stay whole iff G divides n / k.
        group = prompt_group_size if (n // k) % prompt_group_size == 0 else 1
        loss_of_group = functools.partial(micro_loss, prompt_group=group)
        grad_fn = jax.value_and_grad(loss_of_group, has_aux=True)
        micro = jax.tree.map(lambda x: x.reshape(k, n // k, *x.shape[1:]), batch)
        # Inside shard_map, this device's gradients and sums are its own ("varying")
        # until the explicit psum below.
        local = (
            (lambda x: x)
            if row_axis is None
            else functools.partial(jax.lax.pcast, axis_name=row_axis, to="varying")
        )
        params = local(state.params)

        def accumulate(carry, mb):
            grads, total, denom, sums = carry
            (t, (d, s)), g = grad_fn(params, mb)
            return (
                jax.tree.map(jnp.add, grads, g),
                total + t,
                denom + d,
                jax.tree.map(jnp.add, sums, s),
            ), None

        first = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro)))
        sum_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first[0][1][1])
        init = local((jax.tree.map(jnp.zeros_like, state.params), 0.0, 0.0, sum_zeros))
        (grads, total, denom, sums), _ = jax.lax.scan(accumulate, init, micro)
        if row_axis is not None:
            grads, total, denom, sums = psum_flat((grads, total, denom, sums), row_axis)
        scale = 1.0 / jnp.maximum(denom, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        loss = total * scale
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = _where_tree(finite, params, state.params)
        opt_state = _where_tree(finite, opt_state, state.opt_state)
        new_step = state.step + finite.astype(jnp.int32)
        tokens = jnp.maximum(sums["tokens"], 1.0)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "update_skipped": (~finite).astype(jnp.float32),
            "entropy": sums["entropy"] / tokens,
        }
        if "kl" in sums:
            metrics["kl"] = sums["kl"] / tokens
        for name, value in sums.items():
            if name not in ("entropy", "tokens", "kl"):
                metrics[name] = value * scale
        new_state = state.replace(
            step=new_step,
            params=params,
            opt_state=opt_state,
            ref_params=update_reference(rl, new_step, params, state.ref_params),
            skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32),
        )
        return new_state, metrics

    return step


# ---------------------------------------------------------------------------
# Rollouts and the one-program RL step


def sampling_config(settings: SamplerSettings, rl: RLConfig, eos, pad: int):
    """The static `sampling.SamplingConfig` for group rollouts."""
    return sampling.SamplingConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        min_p=settings.min_p,
        eos_token_ids=sampling.eos_ids(eos),
        pad_token_id=pad,
        num_samples=rl.group_size,
    )


def rollout_metrics(
    rewards_BxG: Array,
    ref_rewards_BxG: Array | None,
    advantages_BxG: Array,
    out: sampling.SamplerOutput,
    rl: RLConfig,
) -> dict:
    """Reward, margin, advantage and completion-length statistics of one rollout batch."""
    t = out.tokens.shape[1]
    lengths = out.lengths.astype(jnp.float32)
    group_std = jnp.std(rewards_BxG, axis=1)
    metrics = {
        "reward_mean": jnp.mean(rewards_BxG),
        "reward_std": jnp.std(rewards_BxG),
        "advantage_mean": jnp.mean(advantages_BxG),
        "advantage_std": jnp.std(advantages_BxG),
        "zero_std_group_frac": jnp.mean((group_std == 0).astype(jnp.float32)),
        "completion_len_mean": jnp.mean(lengths),
        "completion_len_max": jnp.max(lengths),
        # A row that used the whole budget without emitting EOS was cut off.
        "truncated_frac": jnp.mean((out.lengths == t) & out.mask[:, -1]),
        "completion_tokens": jnp.sum(lengths),
    }
    if ref_rewards_BxG is not None:
        metrics["ref_reward_mean"] = jnp.mean(ref_rewards_BxG)
        metrics.update(
            advantages_lib.margin_stats(
                rewards_BxG, ref_rewards_BxG, margin_low=rl.margin_low, margin_high=rl.margin_high
            )
        )
    return metrics


def make_rollout_fn(
    rl: RLConfig,
    settings: SamplerSettings,
    graphdef: nnx.GraphDef,
    *,
    eos_token_id,
    pad_token_id: int,
    mesh: Mesh | None = None,
) -> Callable[
    [TrainState, Array, Array], tuple[sampling.SamplerOutput, sampling.SamplerOutput | None]
]:
    """`rollout(state, ids_BxP, mask_BxP) -> (policy_out, ref_out | None)`, G rows per prompt.

    The reference is sampled (same prompts, paired by index, its own key) only
    when the advantage estimator needs r̃, in the same decode loop as the policy.
    Keys are `fold_in(state.rng, state.step)`. On a data-parallel `mesh` each
    device decodes its own prompts' rows (`sampling.generate_tokens_many`).
    """
    config = sampling_config(settings, rl, eos_token_id, pad_token_id)

    def rollout(state: TrainState, ids_BxP: Array, mask_BxP: Array):
        rng = jax.random.fold_in(state.rng, state.step)
        policy_rng, ref_rng = jax.random.split(rng)
        policy = nnx.merge(graphdef, state.params)
        if not rl.samples_reference:
            out = sampling.generate_tokens(policy, ids_BxP, mask_BxP, policy_rng, config, mesh=mesh)
            return out, None
        reference = nnx.merge(graphdef, jax.lax.stop_gradient(state.ref_params))
        # One decode loop advances both models (outputs equal two separate loops).
        return sampling.generate_tokens_many(
            [policy, reference], ids_BxP, mask_BxP, [policy_rng, ref_rng], config, mesh=mesh
        )

    return rollout


def psum_flat(tree, axis: str):
    """`lax.psum` of a pytree as ONE buffer per dtype (concatenated, summed, split back).

    XLA:CPU runs an all-reduce of a tuple as one rendezvous per element: for a
    model's gradients that is dozens of cross-device handshakes, where one flat
    buffer needs one (the tiny model's gradient psum: ~4.8 ms before, ~1.6 ms with
    this, waiting for the slower device included).
    """
    leaves, treedef = jax.tree.flatten(tree)
    by_dtype: dict = {}
    for i, leaf in enumerate(leaves):
        by_dtype.setdefault(jnp.result_type(leaf), []).append(i)
    out = list(leaves)
    for dtype, idx in by_dtype.items():
        flat = jnp.concatenate([jnp.ravel(jnp.asarray(leaves[i], dtype)) for i in idx])
        flat = jax.lax.psum(flat, axis)
        offsets = np.cumsum([0] + [int(np.size(leaves[i])) for i in idx])
        for i, start, stop in zip(idx, offsets[:-1], offsets[1:], strict=True):
            out[i] = flat[start:stop].reshape(jnp.shape(leaves[i]))
    return jax.tree.unflatten(treedef, out)


def _all_rows(tree, axis: str, size: int):
    """Inside `shard_map`: every device's rows, in device order, on every device.

    A psum of zero-padded blocks rather than `all_gather`, so that the result is
    typed as replicated over `axis` (it may then leave through `PartitionSpec()`).
    """
    index = jax.lax.axis_index(axis)

    def one(x):
        n = x.shape[0]
        wide = x.astype(jnp.int32) if x.dtype == jnp.bool_ else x
        full = jnp.zeros((n * size, *x.shape[1:]), wide.dtype)
        return jax.lax.dynamic_update_slice_in_dim(full, wide, index * n, axis=0)

    dtypes = jax.tree.map(lambda x: x.dtype, tree)
    summed = psum_flat(jax.tree.map(one, tree), axis)
    return jax.tree.map(lambda x, dtype: x.astype(dtype), summed, dtypes)


def make_update_fn(
    rl: RLConfig,
    optim: OptimConfig,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    kl_metric: bool = True,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """`update(state, ids_BxP, mask_BxP, out, rewards_BxG, ref_rewards_BxG) -> (state, metrics)`.

    Advantages from the registry, reference log-probs of the policy completions
    (for a KL loss, or as a diagnostic when `kl_metric` and a reference exists),
    then `make_train_step`'s update. `ref_rewards_BxG` is None unless AAPO.

    On a data-parallel `mesh` (`sampling.row_parallel`) with the state replicated,
    the update runs in `shard_map`: each device takes its own prompts' rows
    (groups stay whole), and only gradients and loss sums cross devices; metrics
    are those of the whole batch. Otherwise XLA partitions it by the shardings.
    """
    g = rl.group_size
    plain_step = make_train_step(rl, optim, graphdef, tx, prompt_group_size=g)
    parallel_step = make_train_step(rl, optim, graphdef, tx, prompt_group_size=g, row_axis="data")
    adv_fn = advantages_lib.get_advantage_fn(rl.advantage)
    adv_kwargs = advantage_kwargs(rl)
    want_ref_logprobs = rl.needs_reference_logprobs or (kl_metric and rl.uses_reference)

    def update_rows(step_fn, axis, state, ids_BxP, mask_BxP, out, rewards_BxG, ref_rewards_BxG):
        adv = adv_fn(rewards_BxG, ref_rewards_BxG, **adv_kwargs)
        prompt_ids = jnp.repeat(ids_BxP, g, axis=0)
        prompt_mask = jnp.repeat(mask_BxP, g, axis=0)
        ref_logprobs = None
        if want_ref_logprobs:
            reference = nnx.merge(graphdef, jax.lax.stop_gradient(state.ref_params))
            ref_logprobs, _ = completion_logprobs(
                reference,
                prompt_ids,
                prompt_mask,
                out.tokens,
                out.mask,
                chunk_size=rl.logprob_chunk_size,
                prompt_group_size=g,
            )
            ref_logprobs = jax.lax.stop_gradient(ref_logprobs)
        batch = RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=out.tokens,
            completion_mask=out.mask,
            advantages=adv.reshape(-1),
            ref_logprobs=ref_logprobs,
        )
        state, metrics = step_fn(state, batch)
        scored = (rewards_BxG, ref_rewards_BxG, adv, out.replace(logprobs=None))
        if axis is not None:  # the whole batch's statistics, on every device
            scored = _all_rows(scored, axis, mesh.shape[axis])
        metrics.update(rollout_metrics(*scored, rl))
        return state, metrics

    def update(state, ids_BxP, mask_BxP, out, rewards_BxG, ref_rewards_BxG=None):
        args = (state, ids_BxP, mask_BxP, out, rewards_BxG, ref_rewards_BxG)
        if not sampling.row_parallel(mesh, ids_BxP.shape[0]):
            return update_rows(plain_step, None, *args)
        rows = PartitionSpec("data")
        return jax.shard_map(
            functools.partial(update_rows, parallel_step, "data"),
            mesh=mesh,
            in_specs=(PartitionSpec(), rows, rows, rows, rows, rows),
            out_specs=PartitionSpec(),
        )(*args)

    return update


def make_rl_step(
    rl: RLConfig,
    optim: OptimConfig,
    settings: SamplerSettings,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    reward_fn: TokenRewardFn,
    *,
    eos_token_id,
    pad_token_id: int,
    kl_metric: bool = True,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, PromptBatch], tuple[TrainState, dict]]:
    """`rl_step(state, prompts) -> (state, metrics)` for JAX-native rewards.

    Policy sampling (G per prompt), reference sampling (when the advantage needs
    r̃), reward, advantage, reference log-probs (KL loss or diagnostic) and the
    update all trace into ONE program when jitted. `mesh`: see `make_rollout_fn` and
    `make_update_fn` (on a data-parallel mesh both split the prompts over devices).
    """
    rollout = make_rollout_fn(
        rl, settings, graphdef, eos_token_id=eos_token_id, pad_token_id=pad_token_id, mesh=mesh
    )
    update = make_update_fn(rl, optim, graphdef, tx, kl_metric=kl_metric, mesh=mesh)
    g = rl.group_size

    def score(out, prompts: PromptBatch):
        targets = jnp.repeat(prompts.targets, g, axis=0)
        target_len = jnp.repeat(prompts.target_len, g, axis=0)
        return reward_fn(out.tokens, out.mask, targets, target_len).reshape(-1, g)

    def rl_step(state: TrainState, prompts: PromptBatch) -> tuple[TrainState, dict]:
        out, ref_out = rollout(state, prompts.ids, prompts.mask)
        rewards = score(out, prompts)
        ref_rewards = None if ref_out is None else score(ref_out, prompts)
        return update(state, prompts.ids, prompts.mask, out, rewards, ref_rewards)

    return rl_step


def jit_step(step_fn, state_shardings=None, batch_shardings=None):
    """`jax.jit` a step with the state donated and (optionally) explicit shardings."""
    if state_shardings is None:
        return jax.jit(step_fn, donate_argnums=0)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
