"""Ahead-of-time planning: compile an RL step's device programs without weights and size them."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import re
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aapo_jax import configs, decode_layouts, models, rl_step, rollout, sampling, sharding
from aapo_jax import train_step as train_step_lib
from aapo_jax.configs import ExperimentConfig
from aapo_jax.hlo import collective_bytes, on_chip_copies, staging_bytes
from aapo_jax.optim import make_optimizer
from aapo_jax.types import PromptBatch, Rollout, TrainState

GiB = sharding.GiB
# The placeholder data file/task a plan config gets when it names none (no data is read).
PLACEHOLDER_DATA = "unused-by-plan"
_OOM = (
    re.compile(
        r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"
    ),
    re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


# ---------------------------------------------------------------------------
# Config, target devices and device memory.


def plan_config(
    config: ml_collections.ConfigDict, *, model_path: str | None = None
) -> ExperimentConfig:
    """Validate an experiment ConfigDict for planning; data fields it leaves empty get dummies.

    Planning reads no data, yet `DataConfig` insists on a file (jsonl/parquet), a task name
    (reasoning-gym) or both (TFDS): an empty `data.path` / `data.name` becomes
    `PLACEHOLDER_DATA` (with the source's file suffix). Fields that are set are kept, and
    a one-epoch run (train.steps=-1) is planned as 100 steps.

    Args:
      config: the ml_collections config (as `experiments/train.py` parses it).
      model_path: overrides `model.path` (a directory with a Hugging Face config.json).

    Returns:
      The validated `ExperimentConfig`.
    """
    c = config.copy_and_resolve_references()
    if model_path is not None:
        c.model.path = str(model_path)
    source = c.data.source
    if source in ("jsonl", "parquet") and not c.data.path:
        c.data.path = f"{PLACEHOLDER_DATA}.{source}"
    if source in ("reasoning_gym", "tfds") and not c.data.name:
        c.data.name = PLACEHOLDER_DATA
    if source == "tfds" and not c.data.path:
        c.data.path = PLACEHOLDER_DATA
    config = configs.experiment_config(c)
    # One epoch (train.steps=-1) needs the data's size; the schedule's length changes no
    # shape, so a nominal 100 steps stands in.
    return configs.resolve_epoch_steps(config, 100 * config.train.prompts_per_step)


def topology_chips(topology: str) -> int:
    """The chip count of a TPU topology name ("v5e:1x1" → 1, "v5p:2x2x2" → 8).

    Raises:
      ValueError: the name is not `<generation>:<AxBxC...>` (named).
    """
    _, _, shape = topology.partition(":")
    try:
        return math.prod(int(n) for n in shape.split("x"))
    except ValueError:
        raise ValueError(
            f"--topology={topology!r}: expected <generation>:<chips per axis>, e.g. v5e:1x1, "
            "v5e:2x4 or v5p:2x2x2."
        ) from None


def target_devices(topology: str | None = None) -> list[jax.Device]:
    """libtpu's compile-only devices of a TPU topology (e.g. "v5e:2x4"), else the local ones.

    Raises:
      RuntimeError: a topology is asked for and libtpu is not installed, or another
        process holds libtpu's lockfile.
    """
    if topology is None:
        return list(jax.devices())
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            f"--topology={topology} compiles for TPU devices through libtpu, which is not "
            "installed: pip install -r requirements-tpu.txt"
        )
    from jax.experimental import topologies

    kwargs = {}
    if topology_chips(topology) == 1:
        # One chip: libtpu's default host (2x2x1 chips) does not divide it; name it.
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
    except Exception as e:
        if "lockfile" not in str(e):
            raise
        # libtpu lets one process at a time hold the chips; compile-only devices need none.
        raise RuntimeError(
            f"{e}\nAnother process holds libtpu. On a machine without TPU chips, "
            "ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets several processes load it."
        ) from e
    return list(topo.devices)


# ---------------------------------------------------------------------------
# Abstract inputs.


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the two programs are built and lowered from, with no weight in memory.

    `state` and `prompts` hold `jax.ShapeDtypeStruct` leaves carrying their shardings.
    """

    config: ExperimentConfig
    mesh: Mesh
    model_config: models.ModelConfig
    graphdef: nnx.GraphDef
    tx: Any
    state: TrainState
    state_shardings: Any
    prompts: PromptBatch
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def rows_or_replicated(mesh: Mesh, shape: Sequence[int], layout: str = "sharded") -> NamedSharding:
    """An array's rows over data × fsdp when they divide its leading dimension, else whole;
    as a decode in `layout` splits them (`decode_layouts.decode_row_axes`: every axis in the
    "tensor" layout)."""
    if len(shape) and decode_layouts.decode_row_ways(mesh, shape[0], layout) > 1:
        axes = decode_layouts.decode_row_axes(layout)
        return NamedSharding(mesh, PartitionSpec(axes, *([None] * (len(shape) - 1))))
    return NamedSharding(mesh, PartitionSpec())


def with_sharding(tree, shardings):
    """Abstract leaves (`jax.ShapeDtypeStruct`) of `tree` carrying `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_inputs(
    config: ExperimentConfig, devices: Sequence[jax.Device], *, attention: str | None = None
) -> Plan:
    """The abstract model, train state and prompt batch of a config on a mesh of `devices`.

    Shape-first as `trainer.load_trained_model`: the model from config.json alone
    (`models.abstract_hf_model`, the trainer's dtypes), `nnx.split`, the abstract train
    state and its shardings (`sharding.tree_shardings`). Prompts are int32/bool [B, P]
    (B = train.prompts_per_step, P = sampling.max_prompt_length), rows over data × fsdp
    when they divide.

    Args:
      config: the validated experiment config.
      devices: the target devices (`target_devices`); the mesh is `config.mesh` over them.
      attention: a model attention implementation to force (e.g. the one "auto" picks on
        the target platform, which differs from the host's when compiling for a topology).

    Returns:
      A `Plan`.
    """
    mesh = sharding.make_mesh(**dataclasses.asdict(config.mesh), devices=devices)
    kwargs = config.model.model_kwargs()
    if attention is not None:
        kwargs["attention"] = attention
    hf = models.read_hf_config(config.model.path)
    abstract_model = models.abstract_hf_model(config.model.path, **kwargs)
    graphdef, params, base = models.split_trained(abstract_model)
    tx = make_optimizer(config.optim)
    state = train_step_lib.abstract_train_state(
        params,
        tx,
        config.rl,
        seed=config.train.seed,
        reference_dtype=config.model.reference_storage(config.rl.reference),
        base=base,
    )
    shardings = sharding.tree_shardings(state, train_step_lib.model_variables(params, base), mesh)
    b, p = config.train.prompts_per_step, config.sampling.max_prompt_length
    prompt_sharding = rows_or_replicated(mesh, (b, p))
    prompts = PromptBatch(
        ids=jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=prompt_sharding),
        mask=jax.ShapeDtypeStruct((b, p), jnp.bool_, sharding=prompt_sharding),
    )
    pad = hf.get("pad_token_id")
    return Plan(
        config=config,
        mesh=mesh,
        model_config=abstract_model.config,
        graphdef=graphdef,
        tx=tx,
        state=with_sharding(state, shardings),
        state_shardings=shardings,
        prompts=prompts,
        eos_token_ids=sampling.eos_ids(hf.get("eos_token_id")),
        pad_token_id=0 if pad is None else int(pad),
    )


def target_attention(config: ExperimentConfig, platform: str) -> str | None:
    """The attention implementation "auto" picks on `platform`, or None when one is set.

    The model resolves "auto" from `jax.default_backend()` at trace time, which is the host
    (CPU) when compiling for a TPU topology; the plan should compile what the TPU runs.
    """
    from aapo_jax.models import attention

    if config.model.attention != "auto":
        return None
    model_config = models.config_from_hf(
        models.read_hf_config(config.model.path), **config.model.model_kwargs()
    )
    return attention.choose_implementation(
        model_config.compute_dtype,
        model_config.head_dim,
        model_config.attention_block,
        backend=platform,
    )


def tree_bytes_per_device(tree) -> int:
    """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * _itemsize(leaf.dtype)
    return math.ceil(total)


def _itemsize(dtype) -> float:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # threefry key data: 2 × uint32
    dtype = jnp.dtype(dtype)
    if dtype.name in ("int4", "uint4"):  # nf4 codes: two to a byte on TPU, as XLA counts them
        return 0.5
    return dtype.itemsize


def kv_cache_bytes(plan: Plan, prompts: int | None = None) -> int:
    """Per-device KV cache of the rollout (a temporary of that program), from the model config.

        layers × 2 × (row slots per device) × kv heads per device × head_dim × itemsize
        × models sampled (2 when the reference is sampled too)

    Row slots: N = B·G rows of P + T slots, or with a shared prompt
    (`sampling.shared_prompt`, G > 1) B prompts of P slots plus N rows of T. Rows and
    prompts split over data × fsdp, and kv heads over tensor, when they divide
    (`rollout.kv_cache_bytes`). `prompts`: B (default: train.prompts_per_step).
    """
    cfg = plan.config
    b = cfg.train.prompts_per_step if prompts is None else prompts
    return rollout.kv_cache_bytes(
        cfg.rl,
        cfg.sampling,
        plan.model_config,
        plan.mesh,
        b,
        cfg.sampling.max_prompt_length,
        layout=decode_copies(plan)[0],
    )


def decode_passes(plan: Plan) -> int:
    """The rollout's sequential decode passes under `sampling.kv_budget_gib`
    (`rollout.decode_passes`; ValueError naming that field when one prompt exceeds it)."""
    cfg = plan.config
    return rollout.decode_passes(
        cfg.rl,
        cfg.sampling,
        plan.model_config,
        plan.mesh,
        cfg.train.prompts_per_step,
        cfg.sampling.max_prompt_length,
        kv_budget_gib=cfg.sampling.kv_budget_gib,
        layout=decode_copies(plan)[0],
    )


def decode_copies(plan: Plan) -> tuple[str, int]:
    """(layout, per-device bytes) of the rollout's decode copies of the weights (a
    temporary of that program; 0 bytes when it decodes from the training layout):
    `rollout.decode_copies` for the plan's config and mesh."""
    cfg = plan.config
    return rollout.decode_copies(
        cfg.rl,
        cfg.sampling.decode_weights,
        plan.state,
        plan.model_config.compute_dtype,
        plan.mesh,
        cfg.train.prompts_per_step,
    )


# ---------------------------------------------------------------------------
# Compilation.


@dataclasses.dataclass
class ProgramReport:
    """One compiled (or refused) program: per-device bytes, FLOPs, collectives, compile time.

    `total_bytes` is XLA's peak (`memory_analysis().peak_memory_in_bytes`) on TPU and GPU,
    where it is what the compiler budgets with (temporaries share time with donated
    arguments, so the peak can be below the sum); on CPU, and where no peak is reported,
    it is `sum_bytes` = arguments + temporaries + outputs − aliased.
    `fits` is None for a compiled program (`memory_report` weighs it against the device)
    and False for one XLA refused (`error` set): then `total_bytes` is what the error
    says it needs (XLA:TPU's "HLO temporaries" figure counts the arguments too) and
    `temp_bytes` that minus the arguments; outputs, FLOPs and collectives are unknown.
    A program that failed to compile for another reason has `error` set and `fits` None.
    """

    name: str
    compile_s: float
    argument_bytes: int
    temp_bytes: int
    output_bytes: int | None = None
    alias_bytes: int | None = None
    total_bytes: int = 0
    sum_bytes: int | None = None
    peak_bytes: int | None = None
    fits: bool | None = None
    flops: float | None = None
    bytes_accessed: float | None = None
    staging_bytes: int | None = None  # `hlo.staging_bytes`
    eviction_bytes: int | None = None  # `hlo.eviction_bytes`
    collectives: dict[str, Any] | None = None
    error: str | None = None
    available_bytes: int | None = None  # the device memory XLA's error states

    def fits_in(self, device_memory: int) -> bool:
        """Whether the program fits `device_memory` bytes per device: XLA's verdict where it
        gave one (`fits`), else compiled (no `error`) with `total_bytes` within it."""
        if self.fits is not None:
            return self.fits
        return self.error is None and self.total_bytes <= device_memory


def parse_resource_exhausted(message: str) -> tuple[int, int] | None:
    """(needed, available) bytes from an XLA RESOURCE_EXHAUSTED compile error, or None."""
    for pattern in _OOM:
        found = pattern.search(message)
        if found:
            need, need_unit, have, have_unit = found.groups()
            return int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit])
    return None


def compile_program(
    name: str,
    jitted,
    args,
    log: Callable[[str], None],
    *,
    use_peak: bool,
    compiler_options: dict[str, str] | None = None,
):
    """(compiled or None, `ProgramReport`) of `jitted` lowered on abstract `args`; a
    RESOURCE_EXHAUSTED compile is a report that does not fit, another failure one with
    its error. `use_peak`: total = XLA's peak (not on CPU, where it under-states)."""
    log(f"compiling {name}…")
    start = time.perf_counter()
    argument_bytes = tree_bytes_per_device(args)
    try:
        compiled = jitted.lower(*args).compile(compiler_options=compiler_options)
    except Exception as e:  # XLA raises JaxRuntimeError; tracing / lowering anything
        seconds = time.perf_counter() - start
        parsed = parse_resource_exhausted(str(e)) if "RESOURCE_EXHAUSTED" in str(e) else None
        if parsed is None:  # not a memory verdict: report it, plan the other program
            log(f"{name}: failed to compile ({seconds:.1f} s):\n{traceback.format_exc()}")
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:500]}"
            return None, ProgramReport(name, seconds, argument_bytes, 0, error=message)
        log(f"{name}: does not fit ({seconds:.1f} s)")
        need, have = parsed
        report = ProgramReport(
            name=name,
            compile_s=seconds,
            argument_bytes=argument_bytes,
            temp_bytes=max(need - argument_bytes, 0),
            total_bytes=need,
            fits=False,
            error=str(e).strip().splitlines()[0][:500],
            available_bytes=have,
        )
        return None, report
    seconds = time.perf_counter() - start
    log(f"compiled {name} in {seconds:.1f} s")
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = None if not cost or cost.get("flops") is None else float(cost["flops"])
    accessed = None if not cost or cost.get("bytes accessed") is None else cost["bytes accessed"]
    report = ProgramReport(
        name=name,
        compile_s=seconds,
        argument_bytes=argument_bytes,
        temp_bytes=0,
        flops=flops,
        bytes_accessed=None if accessed is None else float(accessed),
    )
    if memory is not None:
        report.argument_bytes = int(memory.argument_size_in_bytes)
        report.temp_bytes = int(memory.temp_size_in_bytes)
        report.output_bytes = int(memory.output_size_in_bytes)
        report.alias_bytes = int(memory.alias_size_in_bytes)
        peak = int(getattr(memory, "peak_memory_in_bytes", 0) or 0)  # newer jaxlibs only
        report.peak_bytes = peak or None
    report.sum_bytes = (
        report.argument_bytes
        + report.temp_bytes
        + (report.output_bytes or 0)
        - (report.alias_bytes or 0)
    )
    report.total_bytes = (use_peak and report.peak_bytes) or report.sum_bytes
    text = compiled.as_text()
    report.collectives = collective_bytes(text)
    report.staging_bytes, report.eviction_bytes = on_chip_copies(text)
    return compiled, report


def compile_programs(
    plan: Plan, *, log: Callable[[str], None] = lambda _: None
) -> dict[str, ProgramReport]:
    """Lower and compile the rollout and the update for the plan's mesh, as the trainer jits them.

    rollout: `jax.jit` of `rl_step.make_stages`' sampler on (state, prompts); update:
    `jax.jit(make_train_step(...), out_shardings=(state shardings, None), donate_argnums=0)`
    on (state, the scored rollout). The rollout's structure comes from `jax.eval_shape` of
    the sampler; its shardings from the compiled sampler's outputs (rows over data × fsdp
    if the sampler did not compile), rewards f32[B, G] by rows. A token-reward config
    compiles the same two programs (the scorer is negligible).

    Args:
      plan: from `abstract_inputs`.
      log: progress messages (e.g. to stderr).

    Returns:
      {"rollout": ProgramReport, "update": ProgramReport}.
    """
    cfg, mesh = plan.config, plan.mesh
    sample, step = rl_step.make_stages(
        cfg.rl,
        cfg.optim,
        cfg.sampling,
        plan.graphdef,
        plan.tx,
        eos_token_id=plan.eos_token_ids,
        pad_token_id=plan.pad_token_id,
        mesh=mesh,
        decode_weights=cfg.sampling.decode_weights,
        kv_budget_gib=cfg.sampling.kv_budget_gib,
    )
    # keep_unused: the whole state stays in memory while sampling (the optimizer moments
    # too), so it counts among the rollout's arguments.
    jit_sample = jax.jit(sample, keep_unused=True)
    # XLA:CPU's peak under-states (about the arguments alone): there the sum is the bound.
    use_peak = mesh.devices.flat[0].platform != "cpu"
    compiled, rollout_report = compile_program(
        "rollout", jit_sample, (plan.state, plan.prompts), log, use_peak=use_peak
    )
    shape = jax.eval_shape(sample, plan.state, plan.prompts)
    if compiled is not None:
        shardings = compiled.output_shardings
    else:
        shardings = jax.tree.map(lambda x: rows_or_replicated(mesh, x.shape), shape)
    sampled = with_sharding(shape, shardings)
    b, g = cfg.train.prompts_per_step, cfg.rl.group_size
    reward = jax.ShapeDtypeStruct((b, g), jnp.float32, sharding=rows_or_replicated(mesh, (b,)))
    scored: Rollout = sampled.replace(
        prompts=plan.prompts,
        rewards=reward,
        ref_rewards=reward if cfg.rl.samples_reference else None,
    )
    jit_step = jax.jit(
        step, out_shardings=(plan.state_shardings, None), donate_argnums=0, keep_unused=True
    )
    _, update_report = compile_program(
        "update", jit_step, (plan.state, scored), log, use_peak=use_peak
    )
    return {"rollout": rollout_report, "update": update_report}


# ---------------------------------------------------------------------------
# The report.


def state_bytes(plan: Plan) -> dict[str, int]:
    """Per-device bytes of the train state's parts: params (the trained ones: the adapters
    under LoRA), the frozen LoRA base (0 without), optimizer, reference, other."""
    s = plan.state
    return {
        "params": tree_bytes_per_device(s.params),
        "frozen_base": tree_bytes_per_device(s.base) if s.base is not None else 0,
        "optimizer": tree_bytes_per_device(s.opt_state),
        "reference": tree_bytes_per_device(s.ref_params) if s.ref_params is not None else 0,
        "other_state": tree_bytes_per_device((s.step, s.rng, s.skipped_updates)),
    }


def micro_batch_knob() -> str:
    """The config field that bounds the update's micro-batch: a token budget if it exists."""
    fields = {f.name for f in dataclasses.fields(configs.OptimConfig)}
    return (
        "optim.micro_batch_tokens" if "micro_batch_tokens" in fields else "optim.grad_accum_steps"
    )


def _forward_parts(
    mc: models.ModelConfig, tokens: float, keys: float, logits: float
) -> tuple[float, float, float]:
    """FLOPs of a forward over `tokens` that attend to `keys` each, with `logits` of them
    through the LM head (2 per multiply-add), as (the layers' weight matmuls, the
    attention's own matmuls, the LM head): what a backward may run again differs by part."""
    d, layers = mc.hidden_size, mc.num_layers
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    layer_weights = layers * (2 * d * q + 2 * d * kv + 3 * d * mc.intermediate_size)
    return (
        2 * tokens * layer_weights,
        4 * tokens * keys * layers * q,
        2 * logits * mc.vocab_size * d,
    )


def update_layout(plan: Plan) -> tuple[int, int, int, int]:
    """(rows each update micro-batch set decides for, micro-batches k, prompt group G or 1,
    devices that split each micro-batch's rows): how `train_step.make_train_step` splits
    the plan's rows. On a data-parallel mesh each device splits its own rows (and picks
    its own bucket lengths); otherwise all rows are one set, split over the devices that
    divide them."""
    cfg, mesh = plan.config, plan.mesh
    b, g = cfg.train.prompts_per_step, cfg.rl.group_size
    n, row_tokens = b * g, cfg.sampling.max_prompt_length + cfg.sampling.max_new_tokens
    if sharding.row_parallel(mesh, b):
        n, ways = n // mesh.devices.size, 1
    else:
        ways = sharding.row_ways(mesh, n)
    k, prompt_group = train_step_lib.micro_batch_plan(cfg.rl, cfg.optim, n, row_tokens, ways)
    return n, k, prompt_group, ways


def expected_update_length(plan: Plan, *, draws: int = 512, seed: int = 0) -> float:
    """The completion length an update row computes on, averaged, when completion lengths
    are independent and uniform on 1..T (mean ≈ T/2, the useful FLOPs' assumption).

    With `optim.length_buckets` ≤ 1 that is T. Otherwise each micro-batch's rows are
    sorted by length into sub-batches of one row per row device, and each sub-batch runs
    at the shortest bucket length holding its longest row (`train_step.length_sorted_grad`):
    a Monte Carlo mean over `draws` batches, fixed `seed`.
    """
    cfg = plan.config
    t, buckets = cfg.sampling.max_new_tokens, cfg.optim.length_buckets
    if buckets <= 1:
        return float(t)
    n, k, _, ways = update_layout(plan)
    lengths = np.random.default_rng(seed).integers(1, t + 1, (draws, k, n // k))
    longest = np.sort(lengths, axis=-1).reshape(draws, k, -1, ways).max(axis=-1)
    cuts = np.asarray(train_step_lib.length_buckets(t, buckets))
    return float(cuts[np.searchsorted(cuts, longest)].mean())


def model_flops(plan: Plan) -> dict[str, float]:
    """Analytic FLOPs of one step over all devices, from the model config (2 per multiply-add).

    XLA's cost analysis counts a `while` body once (the layer scan, the decode loop), so
    this is the number to budget with. A forward over `n` tokens that attend to `c` keys
    each costs 2·n·(layer weights) + 4·n·c·layers·H·Dh, plus 2·n·V·D for the tokens
    whose logits are taken. Rollout, per model sampled: prefill B·P prompt tokens
    (c ≈ P/2), decode N·T tokens (c ≈ P + T/2, every row running the whole budget: an
    upper bound). Update: the same forward over the prompts (once per group when the
    micro-batches keep groups whole, else once per row: `update_layout`) and the
    completions at their executed length (`expected_update_length`: T, or the bucket
    lengths of `optim.length_buckets`), ×3 for the backward (×2 with LoRA: the frozen
    base's weight gradients are not computed; the adapters' FLOPs and attention's own
    gradients, which stay ×3, are left out), plus what the backward runs again (the
    layers with remat "full", the attention's matmuls with "dots", the LM head when a row
    spans several `rl.logprob_chunk_size` chunks), +1 for the reference log-probs.
    `update_useful`: the update's work on real tokens only, at a mean completion of T/2
    (each prompt's P once, a forward + backward, and the reference forward only when the
    loss needs it): the numerator of the update's useful / executed FLOPs.
    `update_padding`: the executed FLOPs on padding (the completions past their real T/2,
    on average).
    """
    mc, cfg = plan.model_config, plan.config
    b, g = cfg.train.prompts_per_step, cfg.rl.group_size
    p, t, n = cfg.sampling.max_prompt_length, cfg.sampling.max_new_tokens, b * g

    def one_pass(t, prompt_rows=b, parts=(1.0, 1.0, 1.0)):
        prompts = _forward_parts(mc, prompt_rows * p, p / 2, 0)
        completions = _forward_parts(mc, n * t, p + t / 2, n * t)
        return sum(w * (a + c) for w, a, c in zip(parts, prompts, completions, strict=True))

    _, _, prompt_group, _ = update_layout(plan)
    update_rows = n // prompt_group
    executed = expected_update_length(plan)
    sampled = 2 if cfg.rl.samples_reference else 1
    forward_and_backward = 2 if mc.lora_rank else 3
    reference = 1 if cfg.rl.computes_reference_logprobs else 0
    useful = forward_and_backward + (1 if cfg.rl.needs_reference_logprobs else 0)
    # What the backward runs again: the layers under remat "full", the attention's matmuls
    # under "dots" (their outputs are not saved); the LM head when its chunks are
    # rematerialised (`logprobs.chunked_token_logprobs`, more than one chunk a row).
    chunked = executed > cfg.rl.logprob_chunk_size
    again = (
        1.0 if cfg.model.remat == "full" else 0.0,
        1.0 if cfg.model.remat in ("full", "dots") else 0.0,
        1.0 if chunked else 0.0,
    )
    passes = forward_and_backward + reference

    def update(length):
        return passes * one_pass(length, update_rows) + one_pass(length, update_rows, again)

    out = {
        "rollout": sampled * one_pass(t),
        "update": update(executed),
        "update_completion_length": executed,
    }
    out["total"] = out["rollout"] + out["update"]
    out["update_useful"] = useful * one_pass(t / 2)
    out["update_padding"] = out["update"] - update(t / 2)
    return out


# ---------------------------------------------------------------------------
# One decode step and the roofline estimate.

# Per device: peak dense bf16 FLOP/s, HBM bytes/s and inter-chip (ICI / NVLink) bytes/s, from
# the vendors' spec sheets, by device kind (a substring for GPUs). v4 exposes each of a
# chip's two TensorCores as a device: half a chip each.
DEVICE_PEAKS = {
    "TPU v4": (137.5e12, 0.6e12, 0.15e12),
    "TPU v5 lite": (197e12, 0.819e12, 0.2e12),
    "TPU v5": (459e12, 2.765e12, 0.6e12),
    "TPU v6 lite": (918e12, 1.64e12, 0.448e12),
    "H100": (989e12, 3.35e12, 0.45e12),
    "H200": (989e12, 4.8e12, 0.45e12),
}


def device_peaks(device: jax.Device) -> tuple[float, float, float] | None:
    """(FLOP/s, HBM bytes/s, inter-chip bytes/s) of one device (`DEVICE_PEAKS`), None for a
    kind the table lacks (CPUs)."""
    kind = device.device_kind
    if kind in DEVICE_PEAKS:
        return DEVICE_PEAKS[kind]
    if device.platform == "gpu":
        return next((v for k, v in DEVICE_PEAKS.items() if k in kind), None)
    return None


def ideal_decode_bytes(plan: Plan, completion_slots: float) -> float:
    """Bytes one device must read per decode step at best: its share (1/devices) of every
    decoded model's weights in the compute dtype (a LoRA base once: the policy and the
    reference share it), and of every decoded model's cache: each prompt's P slots once
    (its G rows share them) and `completion_slots` filled slots of every row."""
    cfg, mc = plan.config, plan.model_config
    itemsize = jnp.dtype(mc.compute_dtype).itemsize
    weights = sum(x.size for x in jax.tree.leaves(plan.state.policy_weights())) * itemsize
    prompts = cfg.train.prompts_per_step
    slots = (
        prompts * cfg.sampling.max_prompt_length + prompts * cfg.rl.group_size * completion_slots
    )
    per_slot = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * itemsize
    caches = 2 if cfg.rl.samples_reference else 1  # the reference's own, LoRA or not
    read = rollout.decoded_weight_sets(cfg.rl, plan.state) * weights + caches * per_slot * slots
    return read / plan.mesh.devices.size


@dataclasses.dataclass
class DecodeStepPrograms:
    """The rollout's decode loop, compiled step by step.

    `reshard`: the program that makes the decode copies once per rollout
    (`sampling.decode_models`); `steps`: the decode loop with ONE step as its body
    (`decode_loop_program`) at each of the kv_len the loop's segments read, first and last;
    `staging_overhead`: how much XLA's bytes accessed add per byte the backend stages into
    on-chip memory (`staging_overhead`; None where it stages nothing). `config` and
    `inputs` (the abstract decode copies, loop state and uniforms) are what the steps were
    compiled with.
    """

    reshard: ProgramReport
    steps: dict[int, ProgramReport]
    staging_overhead: float | None = None
    config: sampling.SamplingConfig | None = None
    inputs: tuple | None = None


# Sliced prefetches (`slice-start`) are staged copies that `hlo.staging_bytes` does not see;
# with none (0: XLA:TPU also accepts no other value for shapes it splits) every staged copy
# is a `copy-start`, the same data moved.
_TPU_COST_OPTIONS = {"xla_tpu_sliced_prefetch_max_slices": "0"}


def _compiler_options(device: jax.Device) -> dict[str, str]:
    return dict(_TPU_COST_OPTIONS) if device.platform == "tpu" else {}


def staging_overhead(device: jax.Device, *, size: int = 2048) -> float | None:
    """Bytes accessed that XLA's cost analysis adds per byte it stages into on-chip memory,
    measured on `device`'s compiler: a program that reads a [size, size] bf16 weight once,
    which XLA:TPU prefetches into on-chip memory first (`hlo.staging_bytes`), is compiled and
    its count compared with the bytes it moves (weight, input and output once). XLA:TPU v5e
    gives 4.0: the prefetch's start and done each count a read and a write, and the read
    that follows counts again. None where nothing is staged (CPU and GPU).
    """
    sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((8, size), jnp.bfloat16, sharding=sharding)
    w = jax.ShapeDtypeStruct((size, size), jnp.bfloat16, sharding=sharding)
    compiled = jax.jit(jnp.matmul).lower(x, w).compile(compiler_options=_compiler_options(device))
    staged = staging_bytes(compiled.as_text())
    if not staged:
        return None
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    moved = (8 * size + size * size + 8 * size) * 2
    return (float(cost["bytes accessed"]) - moved) / staged


def decode_loop_program(config: sampling.SamplingConfig, plan: Plan, kv_len: int, layouts):
    """The rollout's decode loop over the first `kv_len` slots, with ONE step
    (`sampling.decode_step`, every layer laid out so that the cost analysis counts each) as
    its body and a trip count known only at run time, jitted: (decode copies, state,
    uniforms, trips) -> state, the state donated as the loop carries it in place.

    XLA's cost analysis counts the body once, and what does not change from step to step
    (a relayout of the decode copies, the shared prompt's slicing) is hoisted out of it, as
    in the rollout's own loop: a step compiled on its own would redo it on every call.
    `layouts`: (copies, state, uniforms) shardings, `Format(Layout.AUTO, ...)` where the
    installed jax has it, so the inputs arrive in the layouts the loop reads them in (the
    rollout makes them inside its own program).
    """
    step = functools.partial(
        sampling.decode_step,
        config=config,
        kv_len=kv_len,
        prompts=plan.config.train.prompts_per_step,
        mesh=plan.mesh,
        unroll=plan.model_config.num_layers,
    )

    def loop(models, state, uniforms, trips):
        body = functools.partial(step, models, uniforms=uniforms)
        return jax.lax.while_loop(lambda s: s.step < trips, body, state)

    copies, state, uniforms = layouts
    return jax.jit(
        loop,
        donate_argnums=1,
        in_shardings=(copies, state, uniforms, None),
        out_shardings=state,
    )


def _auto_layouts(tree):
    """Each leaf's sharding as `Format(Layout.AUTO, sharding)` (the compiler picks the
    layout), or the sharding itself where this jax has no `Format`."""
    try:
        from jax.experimental.layout import Format, Layout
    except ImportError:  # pragma: no cover - a jax without the layout API
        return jax.tree.map(lambda x: x.sharding, tree)
    return jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding), tree)


def compile_decode_step(
    plan: Plan, *, log: Callable[[str], None] = lambda _: None
) -> DecodeStepPrograms:
    """Compile the rollout's decode-copy program and the decode loop with one step as its
    body (`decode_loop_program`) at the first and last segment's kv_len, on the plan's mesh
    as the sampler splits them.

    The loop's inputs are the decode copies (the reshard program's outputs, with their
    shardings), the loop state (`sampling.start_decode`'s shape; rows as the decode layout
    splits them, `rows_or_replicated`)
    and the draws' uniforms. On TPU prefetches are compiled unsliced (`_TPU_COST_OPTIONS`)
    so that `hlo.staging_bytes` sees every staged copy.
    """
    cfg, mesh = plan.config, plan.mesh
    config = rollout.sampling_config(
        cfg.rl, cfg.sampling, eos_token_id=plan.eos_token_ids, pad_token_id=plan.pad_token_id
    )
    config = dataclasses.replace(config, decode_weights=decode_copies(plan)[0])
    prompts = cfg.train.prompts_per_step
    device = mesh.devices.flat[0]
    use_peak = device.platform != "cpu"

    def reshard(state):
        models = rollout.sampled_models(cfg.rl, plan.graphdef, state)
        return sampling.decode_models(models, config, mesh, prompts)

    compiled, reshard_report = compile_program(
        "reshard", jax.jit(reshard), (plan.state,), log, use_peak=use_peak
    )
    if compiled is None:  # its error is in the report; no step to compile from it
        return DecodeStepPrograms(reshard=reshard_report, steps={})
    models_shape = jax.eval_shape(reshard, plan.state)
    decode_models = with_sharding(models_shape, compiled.output_shardings)

    def start(models, prompts):
        keys = [jax.random.key(0)] * len(models)
        return sampling.start_decode(models, prompts.ids, prompts.mask, keys, config)

    state_shape, uniforms_shape = jax.eval_shape(start, decode_models, plan.prompts)
    layout = config.decode_weights
    state = with_sharding(
        state_shape, jax.tree.map(lambda x: rows_or_replicated(mesh, x.shape, layout), state_shape)
    )
    # The uniforms are [T, N]: their rows are the second dimension.
    by_rows = rows_or_replicated(mesh, (prompts * cfg.rl.group_size,), layout)
    spec = PartitionSpec(None, *by_rows.spec)
    uniforms = tuple(
        None
        if u is None
        else jax.ShapeDtypeStruct(u.shape, u.dtype, sharding=NamedSharding(mesh, spec))
        for u in uniforms_shape
    )
    layouts = tuple(_auto_layouts(x) for x in (decode_models, state, uniforms))
    trips = jax.ShapeDtypeStruct((), jnp.int32)
    p, t = cfg.sampling.max_prompt_length, cfg.sampling.max_new_tokens
    ends = sampling.decode_segments(p, t)
    steps = {}
    for kv_len in sorted({p + ends[0], p + ends[-1]}):
        _, report = compile_program(
            f"decode step (kv_len {kv_len})",
            decode_loop_program(config, plan, kv_len, layouts),
            (decode_models, state, uniforms, trips),
            log,
            use_peak=use_peak,
            compiler_options=_compiler_options(device),
        )
        steps[kv_len] = report
    return DecodeStepPrograms(
        reshard=reshard_report,
        steps=steps,
        staging_overhead=staging_overhead(device),
        config=config,
        inputs=(decode_models, state, uniforms),
    )


def _at(values: dict[int, float], x: float) -> float:
    """The straight line through (kv_len, value) points, first and last, at `x`."""
    (x0, y0), (x1, y1) = min(values.items()), max(values.items())
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def decode_step_summary(plan: Plan, decode: DecodeStepPrograms) -> dict[str, Any]:
    """Per decode step per device, at the loop's average read (`sampling.mean_read_slots`):
    XLA's bytes accessed and FLOPs for one step of the loop (straight-line between the
    first and last segment's kv_len), the on-chip staging copies among them
    (`hlo.staging_bytes`) and `hbm_bytes`, the bytes accessed less what the cost analysis
    adds for those copies (`staging_overhead` per staged byte): the HBM traffic, a staged
    buffer counted once per read. `eviction_bytes`: what it copies from on-chip memory
    back to HBM (left in `hbm_bytes` as the cost analysis counts it). Also the collectives'
    bytes, the ideal bytes (`ideal_decode_bytes` at the average fill: each prompt's P once,
    T/2 per row), bytes per added cache slot against the ideal's, and the one-time
    reshard collectives.
    Estimates from the compiled programs, not measurements.
    """
    cfg = plan.config
    p, t = cfg.sampling.max_prompt_length, cfg.sampling.max_new_tokens
    steps = decode.steps
    mean = sampling.mean_read_slots(p, t)
    missing = [r.name for r in steps.values() if r.bytes_accessed is None or r.error]
    missing += [] if steps else ["decode step"]
    collectives = {
        k: sum(r.collectives["bytes"].values()) for k, r in steps.items() if r.collectives
    }
    by_kind = max(steps.items())[1].collectives if steps else None
    overhead = decode.staging_overhead or 0.0
    hbm = {k: r.bytes_accessed - overhead * (r.staging_bytes or 0) for k, r in steps.items()}
    kv = sorted(steps)

    def slope(values):  # one segment: one kv_len, no slope
        return (
            None if missing or len(kv) == 1 else (values[kv[-1]] - values[kv[0]]) / (kv[-1] - kv[0])
        )

    ideal_slot = ideal_decode_bytes(plan, 1) - ideal_decode_bytes(plan, 0)  # one slot per row
    reshard = decode.reshard.collectives
    accessed = {k: r.bytes_accessed for k, r in steps.items()}
    return {
        "kv_len": kv,
        "mean_kv_len": mean,
        "bytes_accessed": None if missing else _at(accessed, mean),
        "bytes_accessed_by_kv_len": accessed,
        "staging_bytes": None
        if missing
        else _at({k: r.staging_bytes or 0 for k, r in steps.items()}, mean),
        "staging_overhead": decode.staging_overhead,
        "eviction_bytes": None
        if missing
        else _at({k: r.eviction_bytes or 0 for k, r in steps.items()}, mean),
        "hbm_bytes": None if missing else _at(hbm, mean),
        "ideal_bytes": ideal_decode_bytes(plan, t / 2),
        "bytes_per_slot": slope(accessed),
        "hbm_bytes_per_slot": slope(hbm),
        "ideal_bytes_per_slot": ideal_slot,
        "flops": None if missing else _at({k: r.flops for k, r in steps.items()}, mean),
        "collective_bytes": _at(collectives, mean) if collectives else None,
        "collectives": None if by_kind is None else by_kind["bytes"],
        "reshard_collective_bytes": None if reshard is None else sum(reshard["bytes"].values()),
        "compile_s": {
            "reshard": round(decode.reshard.compile_s, 2),
            **{str(k): round(r.compile_s, 2) for k, r in steps.items()},
        },
        "errors": {r.name: r.error for r in [decode.reshard, *steps.values()] if r.error},
    }


def roofline_estimate(
    plan: Plan, decode_step: dict[str, Any], update_collective_bytes: float | None = None
) -> dict[str, Any] | None:
    """Seconds per RL step from the compiled decode step and the update, beside the physical
    floor, on the device's peaks (`device_peaks`; None for a kind without them).

    rollout_s = T × the slowest of (HBM bytes (`decode_step_summary`'s `hbm_bytes`) / HBM,
    FLOPs / peak, collectives / inter-chip) per decode step; update_s = the slower of the
    update's executed FLOPs (`model_flops`: completions at their expected executed length,
    T without `optim.length_buckets`) / devices / peak and its `update_collective_bytes`
    per device / inter-chip (the compiled update's, e.g. FSDP's weight gathers, once per
    micro-batch).
    floor_s = T × ideal bytes / HBM + the update's useful FLOPs / devices / peak. Prefill
    and host time are left out of both. An estimate: the ratio step_s / floor_s is what a
    change to the rollout or the update is judged by.
    """
    device = plan.mesh.devices.flat[0]
    peaks = device_peaks(device)
    if peaks is None or decode_step.get("bytes_accessed") is None:
        return None
    peak, hbm, ici = peaks
    t = plan.config.sampling.max_new_tokens
    devices = plan.mesh.devices.size
    seconds = {  # per decode step, by what bounds it
        "hbm": decode_step["hbm_bytes"] / hbm,
        "flops": (decode_step["flops"] or 0.0) / peak,
        "collectives": (decode_step["collective_bytes"] or 0.0) / ici,
    }
    bound = max(seconds, key=seconds.get)
    per_step = seconds[bound]
    flops = model_flops(plan)
    rollout_s = t * per_step
    update = {
        "flops": flops["update"] / devices / peak,
        "collectives": (update_collective_bytes or 0.0) / ici,
    }
    update_bound = max(update, key=update.get)
    update_s = update[update_bound]
    floor_s = t * decode_step["ideal_bytes"] / hbm + flops["update_useful"] / devices / peak
    return {
        "rollout_s": rollout_s,
        "update_s": update_s,
        "update_bound": update_bound,
        "step_s": rollout_s + update_s,
        "floor_s": floor_s,
        "ratio": (rollout_s + update_s) / floor_s,
        "decode_step_bound": bound,
        "update_useful_flops_fraction": flops["update_useful"] / flops["update"],
        "update_padding_flops_fraction": flops["update_padding"] / flops["update"],
        "device_peaks": {"flops": peak, "hbm_bytes_per_s": hbm, "interchip_bytes_per_s": ici},
    }


def memory_report(
    plan: Plan,
    programs: dict[str, ProgramReport],
    device_memory: int,
    *,
    memory_source: str = "",
    topology: str | None = None,
    decode: DecodeStepPrograms | None = None,
) -> dict[str, Any]:
    """The plan as one JSON-able dict: per-device bytes, fit, FLOPs, collectives, advice.

    total = max over programs of the program's `total_bytes` (XLA's peak, else arguments
    + temporaries + outputs − aliased); a program XLA refused counts what its error says
    it needs. `temporaries` is the binding
    (largest) program's; the KV cache (`kv_cache_bytes`, of one of the `decode_passes`
    passes the rollout decodes in under `sampling.kv_budget_gib`) is part of the rollout's
    temporaries. `flops` is XLA's cost analysis (per device) summed over programs (None
    when a program has none): it counts each `while` body once, so `model_flops`
    (analytic, all devices) is given too.

    Args:
      plan: from `abstract_inputs`.
      programs: from `compile_programs`.
      device_memory: usable bytes per device (`device_memory_bytes`); the HBM a
        RESOURCE_EXHAUSTED error states replaces it.
      memory_source: where `device_memory` comes from, for the report.
      topology: the TPU topology name, if any.
      decode: from `compile_decode_step`: adds `decode_step` (`decode_step_summary`) and
        `estimate` (`roofline_estimate`); both None without it.

    Returns:
      The report dict (its keys are listed in experiments/plan.py).
    """
    for p in programs.values():
        if p.available_bytes:
            device_memory, memory_source = p.available_bytes, "xla"
    fits = {name: p.fits_in(device_memory) for name, p in programs.items()}
    binding = max(programs.values(), key=lambda p: p.total_bytes)
    cfg, device = plan.config, plan.mesh.devices.flat[0]
    layout, copies = decode_copies(plan)
    passes = decode_passes(plan)
    kv_per_pass = kv_cache_bytes(plan, cfg.train.prompts_per_step // passes)
    per_device = {
        "total": binding.total_bytes,
        **state_bytes(plan),
        "kv_cache": kv_per_pass,
        "decode_weights": copies,
        "temporaries": binding.temp_bytes,
    }
    flops = [p.flops for p in programs.values()]
    report = {
        "config": cfg.name,
        "model": cfg.model.path,
        "topology": topology,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": int(plan.mesh.devices.size),
        "mesh": dict(plan.mesh.shape),
        "attention": plan.model_config.attention,
        "decode_layout": layout,
        "decode_passes": passes,
        "kv_cache_per_pass_bytes": kv_per_pass,
        "device_memory_bytes": int(device_memory),
        "device_memory_source": memory_source,
        "fits": all(fits.values()),
        "compile_errors": {
            name: p.error for name, p in programs.items() if p.error and p.fits is None
        },
        "binding_program": binding.name,
        "per_device_bytes": per_device,
        "programs": {
            name: {**dataclasses.asdict(p), "fits": fits[name]} for name, p in programs.items()
        },
        "compile_s": {name: round(p.compile_s, 2) for name, p in programs.items()},
        "flops": None if None in flops else float(sum(flops)),
        "flops_by_program": {name: p.flops for name, p in programs.items()},
        "model_flops": model_flops(plan),
        "collective_bytes": {
            name: None if p.collectives is None else p.collectives["bytes"]
            for name, p in programs.items()
        },
        "unknown_trip_count_loops": {
            name: [] if p.collectives is None else p.collectives["unknown_trip_count_loops"]
            for name, p in programs.items()
        },
    }
    report["decode_step"] = None if decode is None else decode_step_summary(plan, decode)
    update_collectives = report["collective_bytes"].get("update")
    report["estimate"] = (
        None
        if decode is None
        else roofline_estimate(
            plan, report["decode_step"], update_collectives and sum(update_collectives.values())
        )
    )
    report["advice"] = advice(report, plan)
    return report


def _micro_batch_hint(plan: Plan, update: dict[str, Any], have: int) -> str:
    """The micro-batch knob, with a value that would scale the update's temporaries to fit."""
    cfg, mesh = plan.config, plan.mesh
    knob = micro_batch_knob()
    hint = f"--config.{knob}"
    room = have - update["argument_bytes"]
    if room <= 0 or not update["temp_bytes"]:
        return hint
    shrink = room / update["temp_bytes"]  # temporaries scale about with the micro-batch
    n = cfg.train.prompts_per_step * cfg.rl.group_size
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    local = n // ways if n % ways == 0 else n
    row_tokens = cfg.sampling.max_prompt_length + cfg.sampling.max_new_tokens
    if knob == "optim.micro_batch_tokens":
        current = cfg.optim.micro_batch_tokens or local // cfg.optim.grad_accum_steps * row_tokens
        budget = max(int(current * shrink) // row_tokens, 1) * row_tokens
        return f"{hint}={budget} or less ({budget // row_tokens} rows of {row_tokens} tokens)"
    k = math.ceil(cfg.optim.grad_accum_steps / shrink)
    k = min([d for d in range(k, n + 1) if n % d == 0] or [n])
    return f"{hint}={k} or more"


def advice(report: dict[str, Any], plan: Plan) -> str:
    """What to change when a program does not fit, by which part dominates (empty if it fits).

    The state (params + optimizer + reference) or a rollout's KV cache → the mesh / a
    bigger topology; the update's temporaries → smaller micro-batches and remat.
    """
    if report["fits"]:
        return ""
    b, progs, cfg = report["per_device_bytes"], report["programs"], plan.config
    state = b["params"] + b["frozen_base"] + b["optimizer"] + b["reference"]
    have = report["device_memory_bytes"]
    mesh_hint = (
        "shard it over more devices (--config.mesh.fsdp / --config.mesh.tensor) or a "
        "bigger --topology"
    )
    lines = []
    if state > have:
        lines.append(
            f"the train state ({state / GiB:.2f} GiB per device) exceeds the device "
            f"({have / GiB:.2f} GiB): {mesh_hint}."
        )
    update = progs["update"]
    over = {
        name: not p["fits"] and name not in report["compile_errors"] for name, p in progs.items()
    }
    if over["update"] and state <= have:
        if update["temp_bytes"] >= state:
            hint = f"smaller micro-batches: {_micro_batch_hint(plan, update, have)}"
            if cfg.model.remat != "full":
                hint += ", and/or --config.model.remat=full"
            lines.append(
                f"update: its temporaries ({update['temp_bytes'] / GiB:.2f} GiB) dominate: {hint}."
            )
        else:
            lines.append(f"update: the state ({state / GiB:.2f} GiB) dominates: {mesh_hint}.")
    if over["rollout"] and state <= have:
        if b["decode_weights"]:
            lines.append(
                f"rollout: its {report['decode_layout']} decode copies of the weights "
                f"({b['decode_weights'] / GiB:.2f} GiB per device) take room: decode from "
                "the training layout with --config.sampling.decode_weights=sharded."
            )
        elif b["kv_cache"] >= state:
            lines.append(
                f"rollout: the KV cache ({b['kv_cache'] / GiB:.2f} GiB) dominates: split its "
                "rows over more devices (--config.mesh.data / --config.mesh.fsdp, a bigger "
                "--topology), decode in passes under a budget (--config.sampling.kv_budget_gib) "
                "or sample fewer --config.train.prompts_per_step."
            )
        else:
            lines.append(f"rollout: the state ({state / GiB:.2f} GiB) dominates: {mesh_hint}.")
    return " ".join(lines)


def to_json(report: dict[str, Any]) -> str:
    """The report as one line of JSON."""
    return json.dumps(report, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
