"""Ahead-of-time planning of `evaluation.evaluate`'s decode: the fewest passes that fit a device."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aapo_jax import aot, evaluation, models, sampling, sharding
from aapo_jax.configs import ExperimentConfig
from aapo_jax.models import attention
from aapo_jax.sampling import SamplerSettings

GiB = sharding.GiB


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """One generate call of `evaluate` as abstract inputs, placed as `sampling.generate_many`
    places them: the model (`load_hf_checkpoint`'s shardings; replicated on a data-parallel
    mesh), B prompts of P tokens (rows over data × fsdp) and the key.

    `config.settings.max_new_tokens` is the decode budget T = min(max_new_tokens,
    max_model_length − 1): the most an evaluation decodes (`evaluation.completion_budgets`
    of a one-token prompt; `evaluate` decodes min(max_new_tokens, max_model_length − its
    shortest prompt)). `config.passes` is 1: `compile_eval` sets the passes.
    """

    model_path: str
    mesh: Mesh
    model: models.Transformer
    config: sampling.SamplingConfig
    input_ids: jax.ShapeDtypeStruct
    attention_mask: jax.ShapeDtypeStruct
    rng: jax.ShapeDtypeStruct
    max_new_tokens: int
    max_model_length: int | None
    dtype: str

    @property
    def prompts(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def prompts_per_device(self) -> int:
        return self.prompts // sharding.row_ways(self.mesh, self.prompts)

    def passes_choices(self) -> list[int]:
        """The pass counts a device's prompts split into evenly (`sampling.decode_passes`)."""
        local = self.prompts_per_device
        return [p for p in range(1, local + 1) if local % p == 0]

    def kv_cache_bytes(self, passes: int) -> int:
        """Per-device KV caches of one of `passes` passes (`evaluation.kv_cache_bytes` of one
        prompt per device, times a device's prompts in a pass)."""
        per_prompt = evaluation.kv_cache_bytes(
            self.model.config,
            self.config.settings,
            self.mesh,
            sharding.row_ways(self.mesh, self.prompts),
            self.prompt_len,
            self.config.num_samples,
            layout=self.config.decode_weights,
        )
        return self.prompts_per_device // passes * per_prompt

    def passes_under(self, kv_budget_gib: float) -> int:
        """The passes `evaluate` decodes this call in under `kv_budget_gib`
        (`evaluation.decode_passes`)."""
        return evaluation.decode_passes(
            self.model.config,
            self.config.settings,
            self.mesh,
            self.prompts,
            self.prompt_len,
            self.config.num_samples,
            kv_budget_gib=kv_budget_gib,
            layout=self.config.decode_weights,
        )

    def kv_budget_gib(self, passes: int) -> float:
        """The `--kv_budget_gib` under which `evaluate` decodes in `passes` passes: one pass's
        KV caches, rounded up to 1e-4 GiB where that keeps the passes (else exact)."""
        exact = self.kv_cache_bytes(passes) / GiB
        rounded = math.ceil(exact * 1e4) / 1e4
        return rounded if self.passes_under(rounded) == passes else exact


def abstract_eval_inputs(
    config: ExperimentConfig,
    devices: Sequence[jax.Device],
    *,
    batch_size: int,
    num_samples: int = evaluation.PAPER_SAMPLES,
    prompt_len: int | None = None,
    max_new_tokens: int = evaluation.PAPER_SAMPLING.max_new_tokens,
    max_model_length: int | None = None,
    dtype: str = "bfloat16",
    draws: SamplerSettings = evaluation.PAPER_SAMPLING,
) -> EvalPlan:
    """The evaluation decode of `config.model.path` (its config.json alone) on a mesh of
    `devices` (`config.mesh`), as `experiments/evaluate.py` loads a Hugging Face checkpoint
    (`--dtype`: weights and compute in `dtype`) and `evaluate` decodes it.

    Args:
      config: the validated experiment config (`aot.plan_config`): its model and mesh.
      devices: the target devices (`aot.target_devices`).
      batch_size: B, prompts per generate call (`evaluate`'s batch_size).
      num_samples: rows per prompt (`evaluate`'s n_samples).
      prompt_len: P, the prompts' bucket (default: `config.sampling.max_prompt_length`).
      max_new_tokens, max_model_length: `evaluate`'s budget (`completion_budgets`).
      dtype: the weights' and compute dtype ("bfloat16" or "float32").
      draws: temperature and filters of the draws (the paper's by default).

    Returns:
      An `EvalPlan`.
    """
    mesh = sharding.make_mesh(**dataclasses.asdict(config.mesh), devices=devices)
    p = config.sampling.max_prompt_length if prompt_len is None else prompt_len
    (t,) = evaluation.completion_budgets([1], max_new_tokens, max_model_length)
    settings = dataclasses.replace(draws, max_new_tokens=int(t))
    hf = models.read_hf_config(config.model.path)
    model_config = models.config_from_hf(hf, dtype=dtype)
    # "auto" resolves from the host's backend at trace time: compile what the target runs.
    implementation = attention.choose_implementation(
        model_config.compute_dtype,
        model_config.head_dim,
        model_config.attention_block,
        backend=devices[0].platform,
    )
    abstract = models.abstract_hf_model(config.model.path, dtype, attention=implementation)
    graphdef, state = nnx.split(abstract)
    shardings = sharding.state_shardings(state, mesh)
    if sharding.row_parallel(mesh, batch_size):  # `generate_many` replicates the weights
        whole = NamedSharding(mesh, PartitionSpec())
        shardings = jax.tree.map(lambda _: whole, shardings)
    model = nnx.merge(graphdef, aot.with_sharding(state, shardings))
    layout, _ = sampling.decode_copies("auto", state, model_config.compute_dtype, mesh, batch_size)
    pad = hf.get("pad_token_id")
    rows = aot.rows_or_replicated(mesh, (batch_size, p))
    key = jax.eval_shape(lambda: jax.random.key(0))
    return EvalPlan(
        model_path=str(config.model.path),
        mesh=mesh,
        model=model,
        config=sampling.SamplingConfig(
            settings,
            sampling.eos_ids(hf.get("eos_token_id")),
            pad_token_id=0 if pad is None else int(pad),
            num_samples=num_samples,
            decode_weights=layout,
        ),
        input_ids=jax.ShapeDtypeStruct((batch_size, p), jnp.int32, sharding=rows),
        attention_mask=jax.ShapeDtypeStruct((batch_size, p), jnp.bool_, sharding=rows),
        rng=jax.ShapeDtypeStruct(
            key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec())
        ),
        max_new_tokens=max_new_tokens,
        max_model_length=max_model_length,
        dtype=dtype,
    )


def compile_eval(
    plan: EvalPlan, passes: int, *, log: Callable[[str], None] = lambda _: None
) -> aot.ProgramReport:
    """Compile the evaluation's generate call decoding in `passes` passes on the plan's
    abstract inputs: the program `sampling.generate_many` jits (`generate_tokens_many` of
    the models, prompts and keys, its config and mesh static)."""
    config = dataclasses.replace(plan.config, passes=passes)
    generate = functools.partial(sampling.generate_tokens_many, config=config, mesh=plan.mesh)
    args = ((plan.model,), plan.input_ids, plan.attention_mask, (plan.rng,))
    use_peak = plan.mesh.devices.flat[0].platform != "cpu"
    name = f"evaluate ({passes} pass{'es' if passes > 1 else ''})"
    _, report = aot.compile_program(name, jax.jit(generate), args, log, use_peak=use_peak)
    return report


def plan_passes(
    plan: EvalPlan, device_memory: int, *, log: Callable[[str], None] = lambda _: None
) -> tuple[int, dict[int, aot.ProgramReport]]:
    """The fewest passes whose compiled program fits `device_memory` bytes per device.

    Compiles one pass first. The next count tried is, among the counts a device's prompts
    divide into that lie between the most passes that did not fit and the fewest that did,
    the fewest whose KV caches fit the room the last program's other bytes leave (those
    assumed to stay); while nothing fits, the most passes when none is predicted to. Stops
    when no count is left to try, or at a compile error.

    Returns:
      (passes, {passes tried: its `ProgramReport`}): the fewest passes that fit, else the
      most tried (not fitting: one prompt per device per pass), or the count whose compile
      failed (its report has `error`).
    """
    choices = plan.passes_choices()
    reports: dict[int, aot.ProgramReport] = {}
    passes = choices[0]
    while True:
        report = reports[passes] = compile_eval(plan, passes, log=log)
        if report.error and report.fits is None:
            return passes, reports
        fit = [p for p, r in reports.items() if r.fits_in(device_memory)]
        over = max((p for p in reports if p not in fit), default=0)
        fewest = min(fit, default=math.inf)
        untried = [p for p in choices if over < p < fewest and p not in reports]
        room = device_memory - (report.total_bytes - plan.kv_cache_bytes(passes))
        predicted = [p for p in untried if plan.kv_cache_bytes(p) <= room]
        if predicted:
            passes = predicted[0]
        elif untried and not fit:
            passes = untried[-1]
        else:
            return (min(fit) if fit else max(reports)), reports


def time_floor(plan: EvalPlan, passes: int, weight_bytes: int) -> dict[str, Any] | None:
    """An HBM floor on the evaluation's decode time, None for a device without peaks
    (`aot.device_peaks`; CPUs): every decode step reads the device's `weight_bytes` (its
    share of the decode copies) and one pass's KV caches at their mean fill over a
    full-length decode, (P + T/2) / (P + T), at the spec sheet's HBM bandwidth.

        call_s = passes × T × (weights + mean-filled KV) / HBM

    A floor: it assumes every row runs to the budget T (rows that stop early shorten the
    loop only once all of a pass's rows stop) and leaves out prefill, compile, the judge and
    every inefficiency of the compiled step (`plan.py`'s RL-step estimate measures those).
    `paper_calls` generate calls run the five benchmarks once (`PAPER_BENCHMARK_ROWS`).
    """
    peaks = aot.device_peaks(plan.mesh.devices.flat[0])
    if peaks is None:
        return None
    t, p = plan.config.settings.max_new_tokens, plan.prompt_len
    step_bytes = weight_bytes + plan.kv_cache_bytes(passes) * (p + t / 2) / (p + t)
    call_s = passes * t * step_bytes / peaks[1]
    calls = sum(-(-n // plan.prompts) for n in evaluation.PAPER_BENCHMARK_ROWS.values())
    return {
        "step_bytes": step_bytes,
        "call_floor_s": call_s,
        "paper_calls": calls,
        "paper_floor_s": calls * call_s,
    }


def eval_report(
    plan: EvalPlan,
    passes: int,
    reports: dict[int, aot.ProgramReport],
    device_memory: int,
    *,
    memory_source: str = "",
    topology: str | None = None,
) -> dict[str, Any]:
    """The evaluation plan as one JSON-able dict: passes, rows per pass, per-device bytes,
    fit, and the `experiments.evaluate` flags that run it (`evaluate_flags`)."""
    report = reports[passes]
    device = plan.mesh.devices.flat[0]
    weights = aot.tree_bytes_per_device(nnx.state(plan.model))
    _, copies = sampling.decode_copies(
        plan.config.decode_weights,
        nnx.state(plan.model),
        plan.model.config.compute_dtype,
        plan.mesh,
        plan.prompts,
    )
    budget = plan.kv_budget_gib(passes)
    mesh = plan.mesh.shape
    flags = [
        f"--batch_size={plan.prompts}",
        f"--mesh={mesh['data']},{mesh['fsdp']},{mesh['tensor']}",
        f"--dtype={plan.dtype}",
        f"--max_new_tokens={plan.max_new_tokens}",
        *([f"--max_model_length={plan.max_model_length}"] if plan.max_model_length else []),
        f"--kv_budget_gib={budget}",
    ]
    settings = plan.config.settings
    return {
        "model": plan.model_path,
        "topology": topology,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": int(plan.mesh.devices.size),
        "mesh": dict(mesh),
        "attention": plan.model.config.attention,
        "dtype": plan.dtype,
        "batch_size": plan.prompts,
        "num_samples": plan.config.num_samples,
        "prompt_len": plan.prompt_len,
        "max_new_tokens": plan.max_new_tokens,
        "max_model_length": plan.max_model_length,
        "decode_max_new_tokens": settings.max_new_tokens,
        "decode_layout": plan.config.decode_weights,
        "prompts_per_device": plan.prompts_per_device,
        "passes": passes,
        "rows_per_pass": plan.prompts_per_device // passes * plan.config.num_samples,
        "kv_cache_per_pass_bytes": plan.kv_cache_bytes(passes),
        "kv_budget_gib": budget,
        "device_memory_bytes": int(report.available_bytes or device_memory),
        "device_memory_source": "xla" if report.available_bytes else memory_source,
        "fits": report.fits_in(device_memory),
        "compile_error": report.error if report.fits is None else None,
        "per_device_bytes": {
            "total": report.total_bytes,
            "weights": weights,
            "decode_weights": copies,
            "kv_cache": plan.kv_cache_bytes(passes),
            "temporaries": report.temp_bytes,
        },
        "tried": {str(p): dataclasses.asdict(r) for p, r in sorted(reports.items())},
        "compile_s": {str(p): round(r.compile_s, 2) for p, r in sorted(reports.items())},
        "evaluate_flags": " ".join(flags),
        "time_floor": time_floor(plan, passes, copies or weights),
    }
