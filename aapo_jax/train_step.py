"""Stage 3 of an RL step, `train_step(state, rollout) -> (state, metrics)`, and the train state.

    rows         A = rl.algo.advantages(r, r̃) once over the batch; prompts and A per row
    gradients    per micro-batch: log π_θ (and log π_ref), the KL, the loss's (sum, denominator)
    update       AdamW on the exact global mean's gradient, then the reference policy

Each is a module-level pure function (`step_rows`, `micro_batch_loss`,
`accumulate_gradients`, `apply_gradients`); `make_train_step` composes them. The
one-program RL step that puts stages 1–3 together is `rl_step.make_rl_step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from aapo_jax import logprobs, losses, sharding
from aapo_jax.configs import OptimConfig, RLConfig
from aapo_jax.models.transformer import PrefixKV
from aapo_jax.optim import make_schedule
from aapo_jax.types import Rollout, TrainState

StepFn = Callable[[TrainState, Rollout], tuple[TrainState, dict]]


def _init_state(
    params: nnx.State, base: nnx.State | None, tx, rl: RLConfig, seed: int, reference_dtype
) -> TrainState:
    def reference_copy(p):  # the reference starts as a copy of the initial weights
        return jnp.array(p, dtype=reference_dtype or p.dtype, copy=True)

    # With LoRA the reference is the frozen base with the adapters off: no copy.
    copy_reference = rl.uses_reference and base is None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ref_params=jax.tree.map(reference_copy, params) if copy_reference else None,
        rng=jax.random.key(seed),
        skipped_updates=jnp.zeros((), jnp.int32),
        base=base,
    )


def abstract_train_state(
    params: nnx.State,
    tx: optax.GradientTransformation,
    rl: RLConfig,
    *,
    seed: int = 0,
    reference_dtype=None,
    base: nnx.State | None = None,
) -> TrainState:
    """The train state's shapes and dtypes (`jax.ShapeDtypeStruct` leaves), computing nothing.

    `params` (and `base`) may be abstract too (e.g. `nnx.split(nnx.eval_shape(...))[1]`).
    `reference_dtype`, `base`: as in `init_train_state`.
    """
    init = functools.partial(_init_state, tx=tx, rl=rl, seed=seed, reference_dtype=reference_dtype)
    return jax.eval_shape(init, params, base)


def init_train_state(
    params: nnx.State,
    tx: optax.GradientTransformation,
    rl: RLConfig,
    *,
    seed: int,
    mesh: Mesh | None = None,
    reference_dtype=None,
    base: nnx.State | None = None,
) -> tuple[TrainState, object]:
    """The initial train state, built shape-first straight onto its shardings.

    The params are the trained masters (their dtype is the optimizer's too);
    `reference_dtype` (default: theirs) stores the reference copy, e.g. bf16 for a
    frozen reference that only ever runs bf16 forwards (`ModelSource.reference_storage`).
    `base`: with LoRA, the frozen rest of the model (`params` are then the adapters); it
    becomes `TrainState.base` as it is, and no reference copy is made.

    `abstract_train_state` → a sharding per leaf (`sharding.tree_shardings`: AdamW's
    moments and the reference copy follow their parameter) → ONE jitted init with
    those output shardings, so no state leaf is ever whole on one device. The
    params' buffers are donated (they become the state's). Without a mesh, the
    state lives on the default device.

    Returns:
      (state, shardings): the state and the pytree of its NamedShardings (None without
      a mesh), for the caller's `jax.jit(..., out_shardings=...)`.
    """
    init = functools.partial(_init_state, tx=tx, rl=rl, seed=seed, reference_dtype=reference_dtype)
    if mesh is None:
        return jax.jit(init, donate_argnums=(0, 1))(params, base), None
    variables = model_variables(params, base)
    params, base = sharding.put(
        (params, base), sharding.tree_shardings((params, base), variables, mesh)
    )  # a no-op for weights already placed
    abstract = jax.eval_shape(init, params, base)
    shardings = sharding.tree_shardings(abstract, variables, mesh)
    state = jax.jit(init, donate_argnums=(0, 1), out_shardings=shardings)(params, base)
    return state, shardings


def model_variables(params: nnx.State, base: nnx.State | None) -> nnx.State:
    """Every weight of the model in one state: the trained `params`, and a LoRA model's
    frozen `base` when there is one (what `sharding.tree_shardings` reads the train state's
    shardings from)."""
    return params if base is None else nnx.merge_state(params, base)


def update_reference(rl: RLConfig, step: Array, params: nnx.State, ref: nnx.State | None):
    """Frozen: unchanged. Sync: copy every k steps. EMA: ref ← (1−α)·ref + α·params."""
    if ref is None or rl.reference == "frozen":
        return ref
    if rl.reference == "sync":
        return _where_tree(step % rl.reference_sync_every == 0, params, ref)
    rate = rl.reference_ema_rate
    return jax.tree.map(lambda r, p: ((1 - rate) * r + rate * p).astype(r.dtype), ref, params)


def _where_tree(pred, new, old):
    """`where(pred, new, old)` leaf by leaf, in `old`'s dtypes (the state's are fixed)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b).astype(b.dtype), new, old)


def micro_batch_count(
    rows: int, row_tokens: int, *, budget: int, ways: int = 1, group: int = 1, fallback: int = 1
) -> int:
    """How many micro-batches the update splits `rows` rows of `row_tokens` tokens into.

    With a token `budget` > 0: the fewest k such that each device holds at most `budget`
    tokens per micro-batch, i.e. (rows / k / ways) · row_tokens ≤ budget, where `ways`
    devices split every micro-batch's rows; k divides rows / ways, and a k that keeps
    prompt groups whole (rows / k / ways a multiple of `group`) is preferred when one
    fits. A budget below one row per device gives one row per device per micro-batch.
    Without a budget: `fallback` (`optim.grad_accum_steps`).
    """
    if budget <= 0:
        return fallback
    if rows % ways:
        raise ValueError(f"{rows} rows do not split over {ways} devices.")
    local = rows // ways
    counts = [k for k in range(1, local + 1) if local % k == 0]
    fitting = [k for k in counts if (local // k) * row_tokens <= budget] or [local]
    whole = [k for k in fitting if (local // k) % group == 0]
    return min(whole or fitting)


@flax.struct.dataclass
class Rows:
    """N = B·G completions with their prompts repeated per row and their advantages."""

    prompt_ids: Int[Array, "N P"]
    prompt_mask: Array
    completion_ids: Int[Array, "N T"]
    completion_mask: Array
    advantages: Float[Array, " N"]
    # (w_N, u_N) of `losses.aggregation_weights`, over whole groups; None: the loss's own.
    row_weights: tuple[Array, Array] | None = None


@flax.struct.dataclass
class Accumulated:
    """A step's gradient and loss as sums over its micro-batches (divided once, at the end)."""

    grads: nnx.State
    total: Float[Array, ""]
    denominator: Float[Array, ""]
    sums: dict[str, Array]


def step_rows(rl: RLConfig, rollout: Rollout, advantages_N: Array) -> Rows:
    """The rollout's completions as training rows: prompt per row, advantage per row, and
    the loss aggregation's row weights (computed here, over whole groups)."""
    g = rl.group_size
    prompts = rollout.prompts
    rows = Rows(
        prompt_ids=jnp.repeat(prompts.ids, g, axis=0),
        prompt_mask=jnp.repeat(prompts.mask, g, axis=0),
        completion_ids=rollout.policy.tokens,
        completion_mask=rollout.policy.mask,
        advantages=advantages_N,
    )
    if rl.loss_aggregation == "token_mean":  # the loss's own normalisation
        return rows
    weights = losses.aggregation_weights(rows.completion_mask, rl.loss_aggregation, g)
    return rows.replace(row_weights=weights)


def split_micro_batches(rows: Rows, k: int, ways: int) -> Rows:
    """`rows` as k micro-batches (a leading axis of k), each holding `ways` blocks of rows.

    The rows of each of `ways` devices are cut into k contiguous blocks and micro-batch j
    is every device's block j: no row moves between devices, and groups stay whole iff G
    divides a block.
    """
    n = rows.completion_ids.shape[0]
    block = n // (k * ways)

    def split(x):
        x = x.reshape(ways, k, block, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain_rows(x.reshape(k, ways * block, *x.shape[3:]), dim=1)

    return jax.tree.map(split, rows)


def length_buckets(max_new_tokens: int, buckets: int) -> tuple[int, ...]:
    """The completion lengths an update micro-batch is cut to: T·i / buckets, i = 1..buckets."""
    return tuple(-(-max_new_tokens * i // buckets) for i in range(1, buckets + 1))


def truncate_completions(mb: Rows, length: int) -> Rows:
    """The micro-batch's first `length` completion tokens (exact when no row is longer)."""
    return mb.replace(
        completion_ids=mb.completion_ids[:, :length],
        completion_mask=mb.completion_mask[:, :length],
    )


def by_length(fn: Callable, max_new_tokens: int, buckets: int) -> Callable:
    """`fn(params, mb, *rest)` run on the rows `mb` cut to the shortest of `length_buckets`
    that holds their longest completion: one branch of a `switch` per length, so the rows
    compute on about their real tokens rather than padded to T. The causal model's
    log-probs of the kept tokens do not depend on the cut padding, so the results are
    `fn`'s on the whole rows. `buckets` ≤ 1: `fn` itself."""
    if buckets <= 1:
        return fn
    lengths = length_buckets(max_new_tokens, buckets)

    def cut(length):
        return lambda params, mb, *rest: fn(params, truncate_completions(mb, length), *rest)

    def run(params, mb: Rows, *rest):
        longest = jnp.max(jnp.sum(mb.completion_mask.astype(jnp.int32), axis=1))
        index = jnp.searchsorted(jnp.asarray(lengths), longest)  # the first length ≥ longest
        return jax.lax.switch(index, [cut(n) for n in lengths], params, mb, *rest)

    return run


def row_logprobs(
    rl: RLConfig,
    graphdef: nnx.GraphDef,
    weights: tuple[nnx.State, ...],
    mb: Rows,
    prompt_group: int,
) -> tuple[Float[Array, "N T"], Float[Array, "N T"]]:
    """(log π, entropy) of a micro-batch's completion tokens under the model of `weights`
    (the states `nnx.merge(graphdef, *weights)` takes)."""
    return logprobs.completion_logprobs(
        nnx.merge(graphdef, *weights),
        mb.prompt_ids,
        mb.prompt_mask,
        mb.completion_ids,
        mb.completion_mask,
        chunk_size=rl.logprob_chunk_size,
        prompt_group_size=prompt_group,
        temperature=rl.logprob_temperature,
    )


def micro_batch_loss(
    params: nnx.State,
    mb: Rows,
    ref_logp: Array | None,
    *,
    rl: RLConfig,
    graphdef: nnx.GraphDef,
    prompt_group: int,
    base: nnx.State | None = None,
) -> tuple[Array, tuple[Array, dict[str, Array]]]:
    """The micro-batch's loss sum, and (its denominator, metric sums): the function whose
    gradient the update takes (with LoRA `params` are the adapters and `base` the frozen
    rest)."""
    logp, entropy = row_logprobs(rl, graphdef, _weights(params, base), mb, prompt_group)
    return loss_sums(rl, mb, logp, entropy, ref_logp)


def _weights(params: nnx.State, base: nnx.State | None) -> tuple[nnx.State, ...]:
    """The states the model merges: `params`, and a frozen LoRA `base` (no gradient)."""
    return (params,) if base is None else (params, jax.lax.stop_gradient(base))


def loss_sums(
    rl: RLConfig, mb: Rows, logp: Array, entropy: Array, ref_logp: Array | None
) -> tuple[Array, tuple[Array, dict[str, Array]]]:
    """(loss sum, (denominator, metric sums)) of rows from their log-probs: sums over rows,
    so any split of a step's rows adds up to the whole step's. One KL serves the loss's
    penalty and the `kl` metric."""
    kl = None
    if ref_logp is not None:
        kl = losses.kl_divergence(logp, ref_logp, mb.completion_mask, rl.kl_estimator)
    terms = rl.algo.loss_terms(logp, mb.advantages, mb.completion_mask, kl, mb.row_weights)
    mask = mb.completion_mask.astype(jnp.float32)
    sums = dict(terms.metrics)
    sums["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * mask)
    sums["tokens"] = jnp.sum(mask)
    if kl is not None:
        sums["kl"] = jnp.sum(jax.lax.stop_gradient(kl) * mask)
    return terms.total, (terms.denominator, sums)


def reference_logprobs(
    rl: RLConfig,
    graphdef: nnx.GraphDef,
    ref_weights: tuple[nnx.State, ...] | None,
    mb: Rows,
    prompt_group: int,
) -> Array | None:
    """log π_ref of the micro-batch when the loss or the `kl` metric needs it, else None.

    `ref_weights`: `TrainState.reference_weights()`. Outside the differentiated function:
    nothing of it is kept for the backward pass.
    """
    if not rl.computes_reference_logprobs:
        return None
    ref_weights = jax.lax.stop_gradient(ref_weights)
    ref_logp, _ = row_logprobs(rl, graphdef, ref_weights, mb, prompt_group)
    return jax.lax.stop_gradient(ref_logp)


def sort_into_sub_batches(mb: Rows, prompt_group: int, rows_per: int) -> tuple[Rows, Array]:
    """The micro-batch's rows sorted by completion length, shortest first, as N / R
    sub-batches of R = `rows_per` rows (a leading axis; each sub-batch's rows split over
    the row devices), and each row's prompt: its index into `mb.prompt_ids[::prompt_group]`.
    """
    n = mb.completion_ids.shape[0]
    lengths = jnp.sum(mb.completion_mask.astype(jnp.int32), axis=1)
    order = jnp.argsort(lengths, stable=True)

    def take(x):
        x = x[order]
        return sharding.constrain_rows(x.reshape(n // rows_per, rows_per, *x.shape[1:]), dim=1)

    return jax.tree.map(take, mb), take(jnp.arange(n) // prompt_group)


def length_sorted_grad(
    rl: RLConfig,
    graphdef: nnx.GraphDef,
    *,
    base: nnx.State | None,
    ref_weights: tuple[nnx.State, ...] | None,
    prompt_group: int,
    rows_per: int,
    max_new_tokens: int,
    buckets: int,
    axis: str | None = None,
) -> Callable:
    """`grad_fn(params, mb) -> ((loss sum, (denominator, sums)), grads)` of a micro-batch,
    computed on about its real tokens: the same values as `micro_batch_loss`'s gradient.

    Each of the micro-batch's prompts (one per `prompt_group` rows) runs through the
    model once (`logprobs.prompt_prefix`). Its rows are then sorted by completion length
    into sub-batches of `rows_per` rows (`sort_into_sub_batches`: one per row device, so
    rows of like length run side by side), and each sub-batch is cut to the shortest of
    `length_buckets(max_new_tokens, buckets)` that holds it (`by_length`) and continues
    its rows' prompts. A sub-batch's gradient reaches the parameters directly and through
    the prompts' keys and values; the latter are summed over the sub-batches (in fp32)
    and pulled back through the prompt forward once. The reference's log-probs (when
    `rl.computes_reference_logprobs`) are taken the same way, without gradients.
    Inside `sharding.data_parallel`, `axis` names the devices' axis.
    """

    def continuation(weights, prefix, mask, sb: Rows, index):
        last, k, v = prefix
        last, taken = logprobs.take_prompts(last, PrefixKV(k=k, v=v, mask_BxP=mask), index)
        return logprobs.continuation_logprobs(
            nnx.merge(graphdef, *weights),
            last,
            taken,
            taken.mask_BxP,
            sb.completion_ids,
            sb.completion_mask,
            chunk_size=rl.logprob_chunk_size,
            temperature=rl.logprob_temperature,
        )

    def sub_loss(params, prefix, mask, sb: Rows, index, ref_logp):
        logp, entropy = continuation(_weights(params, base), prefix, mask, sb, index)
        return loss_sums(rl, sb, logp, entropy, ref_logp)

    def sub_grad(params, sb: Rows, prefix, ref_prefix, mask, index):
        ref_logp = None
        if ref_prefix is not None:
            frozen = jax.lax.stop_gradient(ref_weights)
            ref_logp = jax.lax.stop_gradient(continuation(frozen, ref_prefix, mask, sb, index)[0])
        loss_and_grad = jax.value_and_grad(sub_loss, argnums=(0, 1), has_aux=True)
        value, (grads, prefix_grads) = loss_and_grad(params, prefix, mask, sb, index, ref_logp)
        return value, (grads, _in_fp32(prefix_grads))

    at_length = by_length(sub_grad, max_new_tokens, buckets)

    def grad_fn(params: nnx.State, mb: Rows):
        ids, mask = mb.prompt_ids[::prompt_group], mb.prompt_mask[::prompt_group]

        def prompt_pass(weights):  # (last hidden, keys, values): what the rows continue
            last, prefix = logprobs.prompt_prefix(nnx.merge(graphdef, *weights), ids, mask)
            return last, prefix.k, prefix.v

        prefix, pullback = jax.vjp(lambda p: prompt_pass(_weights(p, base)), params)
        ref_prefix = None
        if rl.computes_reference_logprobs:
            ref_prefix = jax.lax.stop_gradient(prompt_pass(jax.lax.stop_gradient(ref_weights)))
        subs, indices = sort_into_sub_batches(mb, prompt_group, rows_per)

        def add(acc, xs):
            sb, index = xs
            step = at_length(params, sb, prefix, ref_prefix, mask, index)
            return jax.tree.map(jnp.add, acc, step), None

        sb, index = jax.tree.map(lambda x: x[0], (subs, indices))
        shapes = jax.eval_shape(at_length, params, sb, prefix, ref_prefix, mask, index)
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        init = sharding.varying(init, axis)
        (value, (grads, prefix_grads)), _ = jax.lax.scan(add, init, (subs, indices))
        prefix_grads = jax.tree.map(lambda g, x: g.astype(x.dtype), prefix_grads, prefix)
        (prompt_grads,) = pullback(prefix_grads)
        return value, jax.tree.map(jnp.add, grads, prompt_grads)

    return grad_fn


def _in_fp32(tree):
    """Floating leaves of `tree` in fp32 (sums over many terms kept exact)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def accumulate_gradients(grad_fn: Callable, params: nnx.State, micro: Rows, init: Accumulated):
    """`init` plus every micro-batch's (gradient, loss sum, denominator, metric sums).

    `grad_fn(params, mb) -> ((total, (denominator, sums)), grads)`; `micro` has a leading
    micro-batch axis (`split_micro_batches`); `init` is `zero_accumulator`'s.
    """

    def add(acc: Accumulated, mb: Rows):
        (total, (denominator, sums)), grads = grad_fn(params, mb)
        step = Accumulated(grads=grads, total=total, denominator=denominator, sums=sums)
        return jax.tree.map(jnp.add, acc, step), None

    acc, _ = jax.lax.scan(add, init, micro)
    return acc


def zero_accumulator(grad_fn: Callable, params: nnx.State, micro: Rows) -> Accumulated:
    """Zeros shaped like one micro-batch's `Accumulated` (computing nothing)."""
    first = jax.tree.map(lambda x: x[0], micro)
    (_, (_, sums)), _ = jax.eval_shape(grad_fn, params, first)
    return Accumulated(
        grads=jax.tree.map(jnp.zeros_like, params),
        total=jnp.zeros((), jnp.float32),
        denominator=jnp.zeros((), jnp.float32),
        sums=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums),
    )


def apply_gradients(
    rl: RLConfig,
    optim: OptimConfig,
    tx: optax.GradientTransformation,
    state: TrainState,
    acc: Accumulated,
) -> tuple[TrainState, dict[str, Array]]:
    """The optimizer step on the exact global mean's gradient, then the reference policy.

    The gradient and loss are the sums divided by the denominator. A non-finite loss or
    gradient keeps the parameters and AdamW's state as they were (`update_skipped`,
    counted in `skipped_updates`); the state's dtypes never change.
    """
    scale = 1.0 / jnp.maximum(acc.denominator, 1.0)
    grads = jax.tree.map(lambda x: x * scale, acc.grads)
    loss = acc.total * scale
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # In the old state's dtypes: a leaf the update promotes (a bf16 moment meeting fp32
    # gradients) would otherwise change the state's type and recompile step 2.
    new_params = _where_tree(finite, new_params, state.params)
    opt_state = _where_tree(finite, opt_state, state.opt_state)
    new_step = state.step + finite.astype(jnp.int32)
    sums = dict(acc.sums)
    tokens = jnp.maximum(sums.pop("tokens"), 1.0)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": make_schedule(optim)(state.step),
        "update_skipped": (~finite).astype(jnp.float32),
        "entropy": sums.pop("entropy") / tokens,
    }
    if "kl" in sums:
        metrics["kl"] = sums.pop("kl") / tokens
    metrics.update({name: value * scale for name, value in sums.items()})
    new_state = state.replace(
        step=new_step,
        params=new_params,
        opt_state=opt_state,
        ref_params=update_reference(rl, new_step, new_params, state.ref_params),
        skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32),
    )
    return new_state, metrics


def rollout_metrics(
    rewards_BxG: Array,
    ref_rewards_BxG: Array | None,
    advantages_BxG: Array,
    lengths_N: Array,
    truncated_N: Array,
) -> dict[str, Array]:
    """Reward, advantage and completion-length statistics of one scored rollout.

    `truncated_N` marks rows that used the whole budget without emitting EOS.
    """
    lengths = lengths_N.astype(jnp.float32)
    metrics = {
        "reward_mean": jnp.mean(rewards_BxG),
        "reward_std": jnp.std(rewards_BxG),
        "advantage_mean": jnp.mean(advantages_BxG),
        "advantage_std": jnp.std(advantages_BxG),
        "zero_std_group_frac": jnp.mean((jnp.std(rewards_BxG, axis=1) == 0).astype(jnp.float32)),
        "completion_len_mean": jnp.mean(lengths),
        "completion_len_max": jnp.max(lengths),
        "truncated_frac": jnp.mean(truncated_N),
        "completion_tokens": jnp.sum(lengths),
    }
    if ref_rewards_BxG is not None:
        metrics["ref_reward_mean"] = jnp.mean(ref_rewards_BxG)
    return metrics


def scorer_metrics(
    components: dict[str, Array] | None, counts: dict[str, Array] | None
) -> dict[str, Array]:
    """The scoring stage's per-completion extras as metrics: each component's mean, each
    counter's total (`Rollout.reward_components`, `Rollout.reward_counts`)."""
    metrics = {name: jnp.mean(x) for name, x in (components or {}).items()}
    metrics.update({name: jnp.sum(x) for name, x in (counts or {}).items()})
    return metrics


def micro_batch_plan(
    rl: RLConfig, optim: OptimConfig, n: int, row_tokens: int, ways: int
) -> tuple[int, int]:
    """(k micro-batches, prompt group kept whole per micro-batch: G or 1) for `n` rows of
    `row_tokens` (prompt + completion) tokens split over `ways` devices.

    A micro-batch keeps groups whole when each device's block of it does; with
    `optim.length_buckets` > 1 also when it is the only one (`length_sorted_grad` runs
    each prompt once and moves its keys and values to the rows that continue it)."""
    k = micro_batch_count(
        n,
        row_tokens,
        budget=optim.micro_batch_tokens,
        ways=ways,
        group=rl.group_size,
        fallback=optim.grad_accum_steps,
    )
    if n % (k * ways):
        raise ValueError(
            f"batch rows {n} not divisible by optim.grad_accum_steps={k} × {ways} devices."
        )
    block = n // (k * ways)
    whole = block % rl.group_size == 0 or (k == 1 and optim.length_buckets > 1)
    return k, rl.group_size if whole else 1


def make_train_step(
    rl: RLConfig,
    optim: OptimConfig,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
) -> StepFn:
    """`train_step(state, rollout) -> (state, metrics)`: one on-policy update from a scored rollout.

    Advantages come from `rl.algo` over the whole batch, once (`step_rows`); the rows
    are split into micro-batches (`micro_batch_plan`: `optim.micro_batch_tokens` or
    `optim.grad_accum_steps`) whose loss sums and denominators add up
    (`accumulate_gradients`), so the gradient is that of the exact global mean
    (`apply_gradients`). Each micro-batch runs every prompt through the model once for
    its G completions, and the reference's log-probs too when the loss or the `kl`
    metric needs them. With `optim.length_buckets` > 1 the rows are first sorted by
    completion length into the micro-batches (`sort_by_length`) and each micro-batch is
    cut to the shortest bucket length that holds it (`by_length`): the same loss and
    gradient, computed on about the real tokens. Jit it yourself (donate the state).

    On a data-parallel `mesh` (`sharding.row_parallel`: parameters replicated) the
    step runs per device over its own prompts' rows (`sharding.data_parallel`), and
    only gradients, loss sums and the small per-row statistics cross devices;
    metrics are those of the whole batch. Otherwise XLA partitions it by the
    shardings of the state and the rollout. Either way the maths above is the same
    functions; `device_step` below is the only place that knows about the axis.
    """

    def device_step(axis, state: TrainState, rollout: Rollout) -> tuple[TrainState, dict]:
        if rollout.rewards is None:
            raise ValueError("train_step needs a scored rollout (rewards is None).")
        # Rewards are tiny: every device scores the advantages of the whole batch, so
        # the advantage's own metrics (AAPO's margin statistics) are the batch's.
        scored = sharding.all_rows((rollout.rewards, rollout.ref_rewards), axis)
        advantages_BxG, adv_metrics = rl.algo.advantages(*scored)
        rows = step_rows(rl, rollout, sharding.own_rows(advantages_BxG, axis).reshape(-1))
        # Devices that split each micro-batch's rows: none inside `data_parallel` (its rows
        # are this device's), else data × fsdp when they divide the rows.
        n, completion_len = rows.completion_ids.shape
        ways = 1 if axis is not None else sharding.row_ways(mesh, n)
        k, prompt_group = micro_batch_plan(
            rl, optim, n, rows.prompt_ids.shape[1] + completion_len, ways
        )
        micro = split_micro_batches(rows, k, ways)
        ref_weights = state.reference_weights()
        if optim.length_buckets > 1:
            grad_fn = length_sorted_grad(
                rl,
                graphdef,
                base=state.base,
                ref_weights=ref_weights,
                prompt_group=prompt_group,
                rows_per=ways,
                max_new_tokens=completion_len,
                buckets=optim.length_buckets,
                axis=axis,
            )
        else:
            loss_and_grad = jax.value_and_grad(
                functools.partial(
                    micro_batch_loss,
                    rl=rl,
                    graphdef=graphdef,
                    prompt_group=prompt_group,
                    base=state.base,
                ),
                has_aux=True,
            )

            def grad_fn(params, mb):
                ref_logp = reference_logprobs(rl, graphdef, ref_weights, mb, prompt_group)
                return loss_and_grad(params, mb, ref_logp)

        # On a data-parallel mesh this device's gradients and sums stay its own until the
        # psum below.
        params = sharding.varying(state.params, axis)
        init = sharding.varying(zero_accumulator(grad_fn, state.params, micro), axis)
        acc = sharding.psum_flat(accumulate_gradients(grad_fn, params, micro, init), axis)
        state, metrics = apply_gradients(rl, optim, tx, state, acc)
        out = rollout.policy
        truncated_N = (out.lengths == out.tokens.shape[1]) & out.mask[:, -1]
        lengths_N, truncated_N, components, counts = sharding.all_rows(
            (out.lengths, truncated_N, rollout.reward_components, rollout.reward_counts), axis
        )
        metrics.update(rollout_metrics(*scored, advantages_BxG, lengths_N, truncated_N))
        metrics.update(adv_metrics)
        metrics.update(scorer_metrics(components, counts))
        return state, metrics

    def train_step(state: TrainState, rollout: Rollout) -> tuple[TrainState, dict]:
        with sharding.activation_mesh(mesh):
            return sharding.data_parallel(
                device_step,
                mesh,
                rollout.prompts.ids.shape[0],
                in_specs=(sharding.REPLICATED, sharding.ROWS),
                out_specs=sharding.REPLICATED,
            )(state, rollout)

    return train_step
