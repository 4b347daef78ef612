"""KV-cache generation: one prefill, then one jitted `lax.while_loop` decode over fixed buffers."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from aapo_jax import decode_layouts, sharding
from aapo_jax.data.tokenize import DEFAULT_BUCKETS, bucket_length
from aapo_jax.fields import check, check_choices, choice
from aapo_jax.models.config import ModelConfig
from aapo_jax.models.decode_attention import (
    DECODE_ATTENTION,
    choose_decode_attention,
    uses_kernel,
)
from aapo_jax.models.transformer import Transformer, cache_from_prefix, positions_from_mask

_NEG_INF = -jnp.inf


@flax.struct.dataclass
class SamplerOutput:
    """Completions for N rows (N = B·G with G samples per prompt, grouped by prompt).

    Attributes:
      tokens: int32[N, T] sampled tokens; `pad_token_id` after the first EOS.
      mask: bool[N, T] every token up to and including the first EOS.
      logprobs: f32[N, T] log π(token) under the model's own distribution —
        BEFORE temperature / top-k / top-p / min-p — i.e. the log-softmax of
        `compute_logits` over prompt + completion; 0 where `mask` is False.
      lengths: int32[N] number of completion tokens (the sum of `mask`).
    """

    tokens: Int[Array, "N T"]
    mask: Bool[Array, "N T"]
    logprobs: Float[Array, "N T"]
    lengths: Int[Array, " N"]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How completions are drawn: the one record the trainer, the sampler and `evaluate` take.

    temperature=0 is greedy; top_k=0, top_p=1 and min_p=0 switch those filters off
    (the transformers convention). Invalid values fail on construction, naming the
    config field (`sampling.top_k`). The paper samples at temperature 1.0 (0.7 for
    open-rs) with top_p 1.0.

    Attributes:
      max_new_tokens: the completion budget T.
      temperature: softmax temperature of the draws (0: greedy).
      top_p: nucleus filter: the smallest prefix of the sorted distribution whose mass
        reaches top_p (always ≥ 1 token).
      top_k: keep the k most likely tokens.
      min_p: drop tokens whose probability is below min_p × the most likely one's.
      shared_prompt: with several samples per prompt, the decode cache keeps each prompt's
        keys and values once and a step reads them once for its G rows
        (`models.transformer.SharedPrompt`); False copies them into every row's cache
        (G times the prompt's cache memory and reads). Either way the same attention:
        the tokens agree up to fp32 rounding.
      decode_attention: what a decode step's attention over the cache runs
        (`models.decode_attention.DECODE_ATTENTION`): "xla" scores the cache in one XLA
        program; "pallas_gpu" reads it with Pallas's GPU decode kernel, which skips
        finished rows and the slots not yet written (off GPU it runs interpreted: for
        tests); "auto": the kernel on GPU, XLA elsewhere. The same attention either way.
    """

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    shared_prompt: bool = True
    decode_attention: str = choice("auto", DECODE_ATTENTION)

    def __post_init__(self):
        check(self.max_new_tokens >= 1, "sampling.max_new_tokens", self.max_new_tokens, "≥ 1")
        check(self.temperature >= 0, "sampling.temperature", self.temperature, "≥ 0 (0: greedy)")
        check(0 < self.top_p <= 1, "sampling.top_p", self.top_p, "in (0, 1]")
        check(self.top_k >= 0, "sampling.top_k", self.top_k, "≥ 0 (0: off)")
        check(0 <= self.min_p < 1, "sampling.min_p", self.min_p, "in [0, 1) (0: off)")
        check_choices(self, "sampling")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """A decode program's static settings (each distinct value compiles its own program).

    `settings` says how tokens are drawn; `eos_token_ids` (from the model and tokenizer)
    may be empty, and then the whole budget is generated; `num_samples` completions are
    drawn per prompt (rows b·G + g). `decode_weights` (one of `decode_layouts.DECODE_LAYOUTS`):
    on a mesh, "sharded" decodes from the models as given; "replicated" and "tensor" from
    copies in the compute dtype made once per call, whole on every device or split by
    `decode_layouts.DECODE_TENSOR_RULES`, so that the decode loop moves no weights between
    devices (`decode_layouts.decode_layout` picks it for the rollout). `passes` > 1 decodes the
    prompts (each device's own, on a data-parallel mesh) in that many sequential passes of
    equal size inside the one program, so that only one pass's KV caches are alive at a
    time (`decode_passes` picks it from a memory budget); the tokens are those of one pass.
    """

    settings: SamplerSettings
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    num_samples: int = 1
    decode_weights: str = "sharded"
    passes: int = 1

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be ≥ 1, got {self.num_samples}.")
        if self.passes < 1:
            raise ValueError(f"passes must be ≥ 1, got {self.passes}.")
        if self.decode_weights not in decode_layouts.DECODE_LAYOUTS:
            raise ValueError(
                f"decode_weights={self.decode_weights!r}: expected one of "
                f"{decode_layouts.DECODE_LAYOUTS}."
            )


def eos_ids(*eos_token_ids: int | Sequence[int] | None) -> tuple[int, ...]:
    """The stop tokens of one or more sources (a model's config, its tokenizer), merged.

    Each source is an int, a list of ints or None (no stop token); the result is sorted
    and has each id once. No source, or only None: () (no early stop).
    """
    ids = set()
    for value in eos_token_ids:
        if value is None:
            continue
        if isinstance(value, int | np.integer):
            value = [value]
        ids.update(int(e) for e in value)
    return tuple(sorted(ids))


def filter_logits(logits_NxV: Array, settings: SamplerSettings) -> Float[Array, "N V"]:
    """fp32 logits / temperature with top-k, top-p and min-p applied (-inf outside)."""
    logits = logits_NxV.astype(jnp.float32) / settings.temperature
    if settings.top_k > 0 and settings.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, settings.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if settings.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (always ≥ 1 token).
        cutoff_idx = jnp.sum(mass_before < settings.top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, _NEG_INF, logits)
    if settings.min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        threshold = settings.min_p * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < threshold, _NEG_INF, logits)
    return logits


def inverse_cdf_draw(u_N: Float[Array, " N"], logits_NxV: Array) -> Int[Array, " N"]:
    """The token whose CDF interval holds u·Z, per row, for u ∈ [0, 1) (Z: the total mass).

    Two levels instead of a length-V cumulative sum (a slow reduce-window on CPU): the
    vocabulary is cut into ~√V blocks, the block holding u·Z is found from the blocks'
    cumulative masses, then the token inside that block; both prefix sums are
    broadcast-and-reduce over ~√V entries. Tokens of zero probability (-inf logits)
    are never drawn; exact up to fp32 rounding of the prefix sums.
    """
    n, v = logits_NxV.shape
    width = math.isqrt(v - 1) + 1  # ⌈√V⌉
    blocks = -(-v // width)
    probs = jax.nn.softmax(logits_NxV.astype(jnp.float32), axis=-1)
    probs = jnp.pad(probs, ((0, 0), (0, blocks * width - v))).reshape(n, blocks, width)
    block_mass = jnp.sum(probs, axis=-1)  # [N, nb]
    # before[j] = Σ_{i<j} mass[i] and upto[j] = Σ_{i≤j} mass[i], the same sums term for term.
    strict = np.tril(np.ones((blocks, blocks), bool), -1)
    before = jnp.sum(jnp.where(strict, block_mass[:, None, :], 0.0), axis=-1)
    upto = jnp.sum(jnp.where(strict | np.eye(blocks, dtype=bool), block_mass[:, None, :], 0.0), -1)
    target = u_N.astype(jnp.float32)[:, None] * upto[:, -1:]
    # A zero-mass block has upto[j] = upto[j-1], so it is counted past, never chosen.
    block = jnp.minimum(jnp.sum(upto <= target, axis=-1), blocks - 1)
    inner = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [N, width]
    offset = jnp.take_along_axis(before, block[:, None], axis=1)
    inclusive = np.tril(np.ones((width, width), bool))
    cdf = offset + jnp.sum(jnp.where(inclusive, inner[:, None, :], 0.0), axis=-1)
    index = jnp.sum(cdf <= target, axis=-1)
    # Rounding may put u·Z past the block's own last sum: fall back to its last real token.
    last = width - 1 - jnp.argmax((inner > 0)[:, ::-1], axis=-1)
    return (block * width + jnp.minimum(index, last)).astype(jnp.int32)


def categorical_inverse_cdf(rng: Array, logits_NxV: Array) -> Int[Array, " N"]:
    """One draw per row from softmax(logits) by inverting the CDF with ONE uniform per row.

    Far cheaper than Gumbel-max, which hashes V random numbers per row: on CPU that
    hashing costs several times a tiny model's whole decode step.
    """
    u = jax.random.uniform(rng, (logits_NxV.shape[0], 1), jnp.float32)[:, 0]
    return inverse_cdf_draw(u, logits_NxV)


def draw_uniforms(rng: Array, rows: int, settings: SamplerSettings) -> Float[Array, "T N"] | None:
    """The uniforms of every step's draw, made before the decode loop (None when greedy).

    Row t drives step t: step 0 uses the second half of `split(rng)`, step t ≥ 1 uses
    `fold_in(first half, t)`. Drawn up front, the loop body holds no PRNG work (on CPU
    threefry runs as a loop of its own), and row n's samples do not depend on how the
    rows are split over devices.
    """
    if settings.greedy:
        return None
    rng, first_rng = jax.random.split(rng)

    def one(key):
        return jax.random.uniform(key, (rows, 1), jnp.float32)[:, 0]

    steps = jnp.arange(1, settings.max_new_tokens)
    later = jax.vmap(lambda t: one(jax.random.fold_in(rng, t)))(steps)
    return jnp.concatenate([one(first_rng)[None], later], axis=0)


def sample_token(
    logits_NxV: Array, u_N: Array | None, settings: SamplerSettings
) -> tuple[Int[Array, " N"], Float[Array, " N"]]:
    """One token per row and its log-prob under the unfiltered, untempered softmax.

    `u_N` is this step's row of `draw_uniforms` (None when greedy).
    """
    logits = logits_NxV.astype(jnp.float32)
    if settings.greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        token = inverse_cdf_draw(u_N, filter_logits(logits, settings))
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[
        :, 0
    ]
    return token, logprob


@flax.struct.dataclass
class DecodeState:
    """The decode loop's carry: every decoded model's token buffers, flags and cache.

    Attributes:
      step: the next step to draw (tokens [:, step] are written by it).
      tokens, logprobs: per model, int32 / f32 [N, T] buffers (pad / 0 past the step).
      done: per model, bool[N]: the row has emitted EOS.
      caches: per model, its `KVCache` of P + T slots (the P of a shared prompt once per
        prompt).
      positions: int32[N] position id of the next token.
    """

    step: Array
    tokens: tuple[Array, ...]
    logprobs: tuple[Array, ...]
    done: tuple[Array, ...]
    caches: tuple[object, ...]
    positions: Array


def _prefill(model: Transformer, input_ids_BxP, mask_BxP, positions_BxP, config: SamplingConfig):
    """Prefill one model's cache once per prompt, for `num_samples` rows per prompt.

    The prompt runs through the model's memory-bounded forward; its keys and values
    then become the prompt part of a P + max_new_tokens cache: kept once per prompt
    (`settings.shared_prompt`) or repeated into each row's first P slots.
    """
    p = input_ids_BxP.shape[1]
    hidden, prefix = model.forward(input_ids_BxP, positions_BxP, mask_BxP, return_kv=True)
    last_logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]
    last_logits = jnp.repeat(last_logits, config.num_samples, axis=0)
    prefix = prefix.replace(repeats=config.num_samples)
    cache = cache_from_prefix(
        prefix,
        p + config.settings.max_new_tokens,
        model.config.compute_dtype,
        share=config.settings.shared_prompt,
        attention=choose_decode_attention(config.settings.decode_attention),
    )
    return last_logits, cache


def decode_segments(prompt_len: int, max_new_tokens: int, min_tokens: int = 512) -> list[int]:
    """The decode loop's segment ends: steps [ends[i-1], ends[i]) attend over P + ends[i] slots.

    A decode step reads only the part of the cache that can be filled by then, so over
    a long completion attention costs about what the filled cache holds rather than
    the whole P + T buffer every step. Segments are at least `min_tokens` long (each
    compiles its own loop body); up to 4.
    """
    del prompt_len  # the prompt's slots are always read
    count = max(1, min(4, max_new_tokens // min_tokens))
    return [round(max_new_tokens * (i + 1) / count) for i in range(count)]


def mean_read_slots(prompt_len: int, max_new_tokens: int) -> float:
    """The cache slots a decode step reads, averaged over the loop's steps 1..T-1 run to the
    end: P + the end of the step's segment (`decode_segments`)."""
    ends = decode_segments(prompt_len, max_new_tokens)
    starts = [1, *ends[:-1]]
    steps = sum(end - start for start, end in zip(starts, ends, strict=True))
    reads = sum((end - start) * end for start, end in zip(starts, ends, strict=True))
    return prompt_len + reads / max(steps, 1)


def kv_cache_bytes(
    model_config: ModelConfig,
    *,
    prompts: int,
    rows: int,
    prompt_len: int,
    max_new_tokens: int,
    shared_prompt: bool,
    kv_heads: int | None = None,
    models: int = 1,
) -> int:
    """Bytes of the decode KV caches of `prompts` prompts continued by `rows` rows.

        models × layers × 2 (K and V) × slots × kv_heads × head_dim × itemsize (compute dtype)

    slots = prompts·P + rows·T with a shared prompt (`cache_from_prefix(..., share=True)`:
    a prompt's P slots once for its rows, each row its own T), else rows·(P + T). The
    planner and `decode_passes` both size the caches with this; `kv_heads` (default: the
    model's) is what one device holds when they are split.
    """
    if shared_prompt:
        slots = prompts * prompt_len + rows * max_new_tokens
    else:
        slots = rows * (prompt_len + max_new_tokens)
    heads = model_config.num_kv_heads if kv_heads is None else kv_heads
    itemsize = jnp.dtype(model_config.compute_dtype).itemsize
    return models * model_config.num_layers * 2 * slots * heads * model_config.head_dim * itemsize


def device_kv_cache_bytes(
    model_config: ModelConfig,
    mesh: Mesh | None,
    *,
    prompts: int,
    samples: int,
    prompt_len: int,
    max_new_tokens: int,
    shared_prompt: bool,
    models: int = 1,
    layout: str = "sharded",
) -> int:
    """`kv_cache_bytes` on one device of `mesh`: `prompts` prompts of `samples` rows each,
    prompts and rows split over data × fsdp and kv heads over tensor, where those divide
    them (as XLA splits them); in the "tensor" decode `layout` (`decode_copies`) rows and
    prompts over every device and kv heads whole (`decode_layouts.decode_row_ways`). The
    rollout, the evaluation and the planner size with this."""
    rows = prompts * samples
    heads = model_config.num_kv_heads
    tensor = 1 if mesh is None or layout == "tensor" else mesh.shape["tensor"]
    return kv_cache_bytes(
        model_config,
        prompts=prompts // decode_layouts.decode_row_ways(mesh, prompts, layout),
        rows=rows // decode_layouts.decode_row_ways(mesh, rows, layout),
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        shared_prompt=shared_prompt,
        kv_heads=heads // tensor if heads % tensor == 0 else heads,
        models=models,
    )


def device_decode_passes(
    model_config: ModelConfig,
    mesh: Mesh | None,
    *,
    prompts: int,
    samples: int,
    prompt_len: int,
    max_new_tokens: int,
    shared_prompt: bool,
    models: int = 1,
    kv_budget_gib: float,
    layout: str = "sharded",
) -> int:
    """`decode_passes` of a decode of `prompts` prompts on `mesh` under a per-device KV
    budget (GiB; 0: one pass): the prompts each device decodes, and one prompt's caches on
    each of the devices that split the prompts (`device_kv_cache_bytes` in the decode
    `layout`)."""
    ways = sharding.row_ways(mesh, prompts)
    per_prompt = device_kv_cache_bytes(
        model_config,
        mesh,
        prompts=ways,
        samples=samples,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        shared_prompt=shared_prompt,
        models=models,
        layout=layout,
    )
    return decode_passes(prompts // ways, per_prompt, round(kv_budget_gib * sharding.GiB))


def decode_passes(prompts_per_device: int, bytes_per_prompt: int, budget_bytes: int) -> int:
    """The fewest sequential decode passes whose KV caches fit a per-device budget.

    The smallest divisor p of `prompts_per_device` with (prompts_per_device / p) ×
    `bytes_per_prompt` ≤ `budget_bytes` (`SamplingConfig.passes`). A budget ≤ 0 is no
    budget: one pass.

    Args:
      prompts_per_device: the prompts one device decodes (B over the devices that split them).
      bytes_per_prompt: one prompt's decode KV caches on a device, its G rows and every
        decoded model's included (`kv_cache_bytes`).
      budget_bytes: the per-device budget (`sampling.kv_budget_gib`).

    Returns:
      The number of passes p ≥ 1.

    Raises:
      ValueError naming `sampling.kv_budget_gib` when one prompt alone exceeds the budget.
    """
    if budget_bytes <= 0:
        return 1
    check(
        bytes_per_prompt <= budget_bytes,
        "sampling.kv_budget_gib",
        budget_bytes / sharding.GiB,
        f"≥ {bytes_per_prompt / sharding.GiB:.4g} GiB (0: one pass): one prompt's decode KV "
        f"caches (its G rows, every decoded model) need {bytes_per_prompt} bytes per device",
    )
    return next(
        p
        for p in range(1, prompts_per_device + 1)
        if prompts_per_device % p == 0
        and prompts_per_device // p * bytes_per_prompt <= budget_bytes
    )


def _step_uniforms(uniforms_TxN: Array | None, step: Array) -> Array | None:
    if uniforms_TxN is None:
        return None
    return jax.lax.dynamic_index_in_dim(uniforms_TxN, step, axis=0, keepdims=False)


def _start(
    models: Sequence[Transformer],
    input_ids_BxP: Array,
    attention_mask_BxP: Array,
    uniforms: Sequence[Array | None],
    config: SamplingConfig,
) -> DecodeState:
    """Every model's prefill and first draw: the decode loop's initial state."""
    t = config.settings.max_new_tokens
    mask_BxP = attention_mask_BxP.astype(bool)
    positions = positions_from_mask(mask_BxP)
    next_position = jnp.sum(mask_BxP, axis=-1).astype(jnp.int32)
    next_position = jnp.repeat(next_position, config.num_samples, axis=0)
    n = next_position.shape[0]
    eos = _eos_array(config)
    tokens, logprobs, done, caches = [], [], [], []
    for model, uniforms_TxN in zip(models, uniforms, strict=True):
        last_logits, cache = _prefill(model, input_ids_BxP, mask_BxP, positions, config)
        token, logprob = sample_token(last_logits, _step_uniforms(uniforms_TxN, 0), config.settings)
        tokens.append(jnp.full((n, t), config.pad_token_id, jnp.int32).at[:, 0].set(token))
        logprobs.append(jnp.zeros((n, t), jnp.float32).at[:, 0].set(logprob))
        done.append(jnp.isin(token, eos))
        caches.append(cache)
    return DecodeState(
        step=jnp.ones((), jnp.int32),
        tokens=tuple(tokens),
        logprobs=tuple(logprobs),
        done=tuple(done),
        caches=tuple(caches),
        positions=next_position,
    )


def _eos_array(config: SamplingConfig) -> Array:
    return jnp.asarray(config.eos_token_ids or (-1,), jnp.int32)


def _advance(
    models: Sequence[Transformer],
    layers: Sequence[Any],
    uniforms: Sequence[Array | None],
    state: DecodeState,
    config: SamplingConfig,
    kv_len: int,
    unroll: int = 1,
) -> DecodeState:
    """One decode step of every model over the first `kv_len` cache slots (the loop body)."""
    eos = _eos_array(config)
    step = state.step

    def one(model, layers, uniforms_TxN, tokens, logprobs, done, cache):
        prev = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1)
        hidden, cache = model.decode(
            prev,
            state.positions[:, None],
            ~done[:, None],
            cache,
            kv_len=kv_len,
            layers=layers,
            unroll=unroll,
        )
        logits = model.logits_from_hidden(hidden)
        token, logprob = sample_token(
            logits[:, 0], _step_uniforms(uniforms_TxN, step), config.settings
        )
        token = jnp.where(done, config.pad_token_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, logprob, step, axis=1)
        return tokens, logprobs, done | jnp.isin(token, eos), cache

    per_model = [
        one(*args)
        for args in zip(
            models,
            layers,
            uniforms,
            state.tokens,
            state.logprobs,
            state.done,
            state.caches,
            strict=True,
        )
    ]
    tokens, logprobs, done, caches = (tuple(x) for x in zip(*per_model, strict=True))
    return state.replace(
        step=step + 1,
        tokens=tokens,
        logprobs=logprobs,
        done=done,
        caches=caches,
        positions=state.positions + 1,
    )


def _decode(
    models: Sequence[Transformer],
    input_ids_BxP: Array,
    attention_mask_BxP: Array,
    uniforms: Sequence[Array | None],
    config: SamplingConfig,
) -> tuple[SamplerOutput, ...]:
    """Prefill and decode loop over these rows (`generate_tokens_many` without the keys)."""
    state = _start(models, input_ids_BxP, attention_mask_BxP, uniforms, config)
    # Per-layer weight copies, made once here, when every layer is unrolled (tiny CPU models).
    layers = [model.unstacked_layers() for model in models]

    def segment(end: int):
        """The loop over steps up to `end`, reading the first P + end cache slots."""

        def cond(state: DecodeState):
            all_done = functools.reduce(jnp.logical_and, [jnp.all(d) for d in state.done])
            return (state.step < end) & ~all_done

        def body(state: DecodeState) -> DecodeState:
            return _advance(models, layers, uniforms, state, config, p + end)

        return cond, body

    p, t = input_ids_BxP.shape[1], config.settings.max_new_tokens
    # The GPU kernel bounds each row's read itself: one loop body (one compile) will do.
    kernel = all(uses_kernel(cache.attention) for cache in state.caches)
    for end in [t] if kernel else decode_segments(p, t):
        state = jax.lax.while_loop(*segment(end), state)
    eos = _eos_array(config)
    return tuple(
        completion_output(tokens, logprobs, eos)
        for tokens, logprobs in zip(state.tokens, state.logprobs, strict=True)
    )


def _row_blocks(mesh: Mesh | None, prompts: int, passes: int) -> int:
    """The data × fsdp blocks XLA splits `prompts` rows into, when each block splits into
    `passes` equal slices; else 1."""
    if mesh is None:
        return 1
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    return ways if prompts % (ways * passes) == 0 else 1


def _split_passes(x: Array, passes: int, blocks: int, axis: int = 0) -> Array:
    """[..., R, ...] (rows on `axis`) → [passes, ..., R / passes, ...]: pass j holds the j-th
    of `passes` consecutive slices of each of the `blocks` equal row blocks (rows b·G + g
    of a prompt stay together and in order)."""
    x = jnp.moveaxis(x, axis, 0)
    r = x.shape[0]
    x = x.reshape(blocks, passes, r // (blocks * passes), *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1).reshape(passes, r // passes, *x.shape[3:])
    return jnp.moveaxis(x, 1, axis + 1)


def _join_passes(x: Array, blocks: int) -> Array:
    """The inverse of `_split_passes` on axis 0: [passes, R / passes, ...] → [R, ...]."""
    passes, chunk = x.shape[:2]
    x = x.reshape(passes, blocks, chunk // blocks, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(passes * chunk, *x.shape[3:])


def _decode_in_passes(
    models: Sequence[Transformer],
    input_ids_BxP: Array,
    attention_mask_BxP: Array,
    uniforms: Sequence[Array | None],
    config: SamplingConfig,
    blocks: int,
) -> tuple[SamplerOutput, ...]:
    """`_decode` over `config.passes` equal parts of the prompts, one after the other.

    One `lax.map` iteration per pass: a pass's caches are temporaries of its iteration,
    so only one pass's are alive at a time. Each row keeps its uniforms, so the tokens
    are those of one pass; each pass's loop stops when its own rows are done.
    """
    passes = config.passes
    if passes == 1:
        return _decode(models, input_ids_BxP, attention_mask_BxP, uniforms, config)
    b = input_ids_BxP.shape[0]
    if b % passes:
        raise ValueError(
            f"SamplingConfig.passes={passes} must divide the {b} prompts decoded here "
            "(a device's own on a data-parallel mesh)."
        )
    split = functools.partial(_split_passes, passes=passes, blocks=blocks)
    parts = (
        split(input_ids_BxP),
        split(attention_mask_BxP),
        tuple(None if u is None else split(u, axis=1) for u in uniforms),
    )

    def one_pass(part):
        return _decode(models, *part, config)

    outs = jax.lax.map(one_pass, parts)
    return jax.tree.map(functools.partial(_join_passes, blocks=blocks), outs)


def decode_models(
    models: Sequence[Transformer], config: SamplingConfig, mesh: Mesh | None, prompts: int
) -> tuple[Transformer, ...]:
    """The models as the decode loop reads them, made once per call (traceable).

    With `config.decode_weights` "replicated" or "tensor" on a mesh: every model in the
    compute dtype (cast once here rather than on every decode step), placed in that layout
    (`decode_layouts.decode_shardings`: one collective per weight, here, none in the loop). On a
    data-parallel mesh for `prompts` rows (`sharding.row_parallel`) the per-device loop
    gets whole weights anyway: only the cast. "sharded": the models as given. Weights the
    models share (a LoRA base) are cast and placed once.
    """
    models = tuple(models)
    if config.decode_weights == "sharded" or mesh is None:
        return models
    models = tuple(model.in_compute_dtype() for model in models)
    if sharding.row_parallel(mesh, prompts):
        return models

    # A LoRA policy and its reference (the base with the adapters off) hold the same base
    # arrays: each is placed once and both models read that one copy.
    placed: dict[int, tuple[Array, Array]] = {}

    def place_one(x, target):
        if id(x) not in placed:  # the array is kept with its copy, so its id stays its own
            placed[id(x)] = (x, jax.lax.with_sharding_constraint(x, target))
        return placed[id(x)][1]

    def place(model):
        graphdef, state = nnx.split(model)
        shardings = decode_layouts.decode_shardings(state, mesh, config.decode_weights)
        return nnx.merge(graphdef, jax.tree.map(place_one, state, shardings))

    return tuple(place(model) for model in models)


def decode_copies(
    decode_weights: str,
    params,
    compute_dtype,
    mesh: Mesh | None,
    prompts: int,
    *,
    n_models: int = 1,
) -> tuple[str, int]:
    """(layout, per-device bytes) of the weights a decode loop reads.

    The layout is what `decode_layouts.decode_layout` picks for `decode_weights` ("auto" or one
    of `decode_layouts.DECODE_LAYOUTS`) on `mesh` for `prompts` prompt rows; the bytes are those
    of its decode copies: `n_models` models with `params`' shapes, floating weights in the
    compute dtype (0 for "sharded", which decodes from the weights as given).
    """
    itemsize = jnp.dtype(compute_dtype).itemsize

    def copy_bytes(layout: str) -> int:
        return n_models * decode_layouts.layout_bytes(params, mesh, layout, itemsize)

    layout = decode_layouts.decode_layout(decode_weights, mesh, copy_bytes, prompts)
    return layout, 0 if layout == "sharded" else copy_bytes(layout)


def _uniform_specs(uniforms) -> tuple[PartitionSpec | None, ...]:
    return tuple(None if u is None else PartitionSpec(None, sharding.DATA_AXIS) for u in uniforms)


def decode_step(
    models: Sequence[Transformer],
    state: DecodeState,
    uniforms: Sequence[Array | None],
    config: SamplingConfig,
    *,
    kv_len: int,
    prompts: int,
    mesh: Mesh | None = None,
    unroll: int = 1,
) -> DecodeState:
    """ONE step of the decode loop of `generate_tokens_many`, as a program of its own.

    What the loop body does on step `state.step` for the models `decode_models` made, over
    the first `kv_len` cache slots, split over `mesh` as the sampler splits it (`prompts`:
    the prompt rows B of the batch, N = B·G). The planner compiles this to read one step's
    bytes, FLOPs and collectives: XLA's cost analysis counts a loop body once, so
    `unroll` = the layer count lays every layer out (the same work, counted whole).
    """
    layers = (None,) * len(models)

    def local(axis, models, state, uniforms):
        del axis
        return _advance(models, layers, uniforms, state, config, kv_len, unroll)

    step = sharding.data_parallel(
        local,
        mesh,
        prompts,
        in_specs=(sharding.REPLICATED, _state_specs(state), _uniform_specs(uniforms)),
        out_specs=_state_specs(state),
    )
    with sharding.activation_mesh(mesh), _tensor_decode(config, mesh, prompts):
        return step(tuple(models), state, tuple(uniforms))


def _tensor_decode(config: SamplingConfig, mesh: Mesh | None, prompts: int):
    active = config.decode_weights == "tensor" and not sharding.row_parallel(mesh, prompts)
    return decode_layouts.tensor_decode(active and mesh is not None)


def _state_specs(state: DecodeState):
    """`data_parallel` specs of a decode state: rows for arrays, replicated for scalars."""
    return jax.tree.map(lambda x: sharding.ROWS if jnp.ndim(x) else sharding.REPLICATED, state)


def start_decode(
    models: Sequence[Transformer],
    input_ids_BxP: Int[Array, "B P"],
    attention_mask_BxP: Array,
    rngs: Sequence[Array],
    config: SamplingConfig,
) -> tuple[DecodeState, tuple[Array | None, ...]]:
    """The decode loop's initial state (every model's prefill and first draw) and its
    uniforms (`draw_uniforms`), unsplit: for `jax.eval_shape` of the loop's carry."""
    uniforms = _all_uniforms(rngs, input_ids_BxP.shape[0], config)
    return _start(models, input_ids_BxP, attention_mask_BxP, uniforms, config), uniforms


def _all_uniforms(rngs: Sequence[Array], prompts: int, config: SamplingConfig) -> tuple:
    """Every model's `draw_uniforms` for `prompts` prompts × `num_samples` rows."""
    rows = prompts * config.num_samples
    return tuple(draw_uniforms(rng, rows, config.settings) for rng in rngs)


def generate_tokens_many(
    models: Sequence[Transformer],
    input_ids_BxP: Int[Array, "B P"],
    attention_mask_BxP: Array,
    rngs: Sequence[Array],
    config: SamplingConfig,
    *,
    mesh: Mesh | None = None,
) -> tuple[SamplerOutput, ...]:
    """Pure, traceable generation from several models (e.g. policy and reference) at once.

    Each model prefills the prompt batch once; with `config.num_samples = G > 1`
    its prefilled cache is repeated G times (rows b·G + g), so the prompt is
    never recomputed per sample. Decoding is ONE `lax.while_loop` whose body
    advances every model by one token, over fixed-size token buffers and
    fixed-size caches (P + max_new_tokens slots); it stops as soon as every row
    of every model has emitted EOS or the budget is spent. The loop copies no
    weights, and the models' independent per-step work is one program that XLA
    may schedule concurrently. Each model's output depends only on its own key:
    it equals `generate_tokens(model, …, rng)`.

    With a data-parallel `mesh` (see `sharding.row_parallel`) the prompts are split over its
    `data` axis and each device prefills and decodes its own rows in its own loop,
    with no collective per step. Every row keeps its own uniforms, so the tokens are
    one device's (up to fp32 rounding of the logits: each device's matmuls see fewer
    rows; log-probs agree to ~1e-6). XLA:CPU runs a small op on one core, so one
    device per core (`sharding.use_cpu_devices`) is how this loop uses them all.

    With `config.passes` = p > 1 each device's prompts are decoded in p sequential passes
    of B/p prompts (one `lax.map` iteration each), holding one pass's caches at a time:
    the same tokens, log-probs up to fp32 rounding.
    """
    if len(models) != len(rngs):
        raise ValueError(f"got {len(models)} models but {len(rngs)} rng keys.")
    uniforms = _all_uniforms(rngs, input_ids_BxP.shape[0], config)
    models = decode_models(models, config, mesh, input_ids_BxP.shape[0])

    def local(axis, models, ids, mask, uniforms):
        # Each device's loop needs no collective. Outside `shard_map` XLA splits the rows
        # over data × fsdp blocks: every pass then takes a slice of each block.
        blocks = 1 if axis is not None else _row_blocks(mesh, ids.shape[0], config.passes)
        return _decode_in_passes(models, ids, mask, uniforms, config, blocks)

    # NNX modules are pytrees: every device gets the whole (replicated) models.
    decode = sharding.data_parallel(
        local,
        mesh,
        input_ids_BxP.shape[0],
        in_specs=(sharding.REPLICATED, sharding.ROWS, sharding.ROWS, _uniform_specs(uniforms)),
        out_specs=sharding.ROWS,
    )
    # Activations stay split by rows (XLA-partitioned); in the tensor layout the MLP's and
    # the LM head's split by columns.
    with sharding.activation_mesh(mesh), _tensor_decode(config, mesh, input_ids_BxP.shape[0]):
        return decode(models, input_ids_BxP, attention_mask_BxP, uniforms)


def generate_tokens(
    model: Transformer,
    input_ids_BxP: Int[Array, "B P"],
    attention_mask_BxP: Array,
    rng: Array,
    config: SamplingConfig,
    *,
    mesh: Mesh | None = None,
) -> SamplerOutput:
    """Pure, traceable generation (call inside your own `jit`, e.g. an RL step).

    The prompt batch is prefilled once; with `config.num_samples = G > 1` the
    prefilled cache is repeated G times (rows b·G + g), so the prompt is never
    recomputed per sample. Decoding is one `lax.while_loop` over fixed-size
    token buffers and a fixed-size cache (P + max_new_tokens slots) that stops
    as soon as every row has emitted EOS or the budget is spent. `mesh`: see
    `generate_tokens_many`.
    """
    (out,) = generate_tokens_many(
        [model], input_ids_BxP, attention_mask_BxP, [rng], config, mesh=mesh
    )
    return out


def completion_output(tokens_NxT: Array, logprobs_NxT: Array, eos: Array) -> SamplerOutput:
    """Mask = every token up to and including the first EOS; zero log-probs beyond it."""
    is_eos = jnp.isin(tokens_NxT, eos)
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
    mask = eos_before == 0
    return SamplerOutput(
        tokens=tokens_NxT,
        mask=mask,
        logprobs=jnp.where(mask, logprobs_NxT, 0.0),
        lengths=jnp.sum(mask, axis=1).astype(jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _generate_jit(models, input_ids, attention_mask, rngs, config, mesh):
    # NNX modules are pytrees: passing them whole costs a flatten, not an `nnx.split`
    # and a GraphDef hash (together ~1 ms of host time a call for a small model).
    return generate_tokens_many(models, input_ids, attention_mask, rngs, config, mesh=mesh)


def _bucket_prompts(input_ids, attention_mask, buckets):
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.asarray(attention_mask).astype(bool)
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both "
            "be [B, P]."
        )
    if buckets:
        width = bucket_length(input_ids.shape[1], buckets)
        extra = width - input_ids.shape[1]
        input_ids = np.pad(input_ids, ((0, 0), (extra, 0)))
        attention_mask = np.pad(attention_mask, ((0, 0), (extra, 0)))
    return input_ids, attention_mask


def generate_many(
    models: Sequence[Transformer],
    input_ids: Int[Array, "B P"],
    attention_mask: Array,
    *,
    rngs: Sequence[Array],
    config: SamplingConfig,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    mesh: Mesh | None = None,
) -> tuple[SamplerOutput, ...]:
    """Sample several models (e.g. policy and reference) on the same prompts in ONE program.

    One decode loop advances every model (`generate_tokens_many`); no host round
    trip happens between them. Each model gets its own key. `mesh`: see `generate`.
    """
    input_ids, attention_mask = _bucket_prompts(input_ids, attention_mask, buckets)
    models = tuple(models)
    if mesh is not None:
        input_ids, attention_mask = sharding.put_rows((input_ids, attention_mask), mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        # Weights already replicated (e.g. by `sharding.shard_model`) stay where they are.
        if sharding.row_parallel(mesh, input_ids.shape[0]) and any(
            not x.sharding.is_equivalent_to(replicated, x.ndim) for x in jax.tree.leaves(models)
        ):
            models = jax.device_put(models, replicated)
    return _generate_jit(models, input_ids, attention_mask, tuple(rngs), config, mesh)


def generate(
    model: Transformer,
    input_ids: Int[Array, "B P"],
    attention_mask: Array,
    *,
    rng: Array,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    num_samples: int = 1,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    mesh: Mesh | None = None,
    **settings: Any,
) -> SamplerOutput:
    """Generate completions for a left-padded prompt batch (jitted; cached per shape).

    Args:
      model: the policy (or any) `Transformer`.
      input_ids: int[B, P] left-padded prompts; attention_mask: [B, P] (1 = token).
      rng: PRNG key; the same key gives the same samples.
      eos_token_id: an int, a list of ints (stop tokens), or None (no early stop).
      pad_token_id: written after a row's first EOS.
      num_samples: G completions per prompt; rows are ordered b·G + g.
      buckets: prompts are left-padded to the next bucket length so that a run
        compiles few programs; None keeps P as given.
      mesh: split the prompt rows over this mesh's data × fsdp devices. On a
        data-parallel mesh (`sharding.row_parallel`) every device decodes its own rows in its
        own loop (the model is replicated onto each; outputs equal one device's);
        otherwise XLA partitions the program by the model's and rows' shardings.
      **settings: the `SamplerSettings` fields, checked there: max_new_tokens (the budget
        T; the output is always [N, T]), temperature (0.0 is greedy), top_p / top_k /
        min_p (1.0 / 0 / 0.0 are off).

    Returns:
      `SamplerOutput` (tokens, mask, logprobs before temperature/filters, lengths).
    """
    config = SamplingConfig(
        SamplerSettings(**settings),
        eos_ids(eos_token_id),
        pad_token_id=int(pad_token_id),
        num_samples=num_samples,
    )
    (out,) = generate_many(
        [model], input_ids, attention_mask, rngs=[rng], config=config, buckets=buckets, mesh=mesh
    )
    return out
