"""Compile a config's RL step ahead of time, without weights, and report whether it fits.

    python -m experiments.plan --config=configs/qwen25_math_7b_simplerl.py \
        --model=qwen2.5-math-7b --topology=v5p:2x2x2
    python -m experiments.plan --config=configs/r1_distill_1p5b_openrs.py \
        --model=deepseek-r1-distill-qwen-1.5b --topology=v5e:2x4 --json
    python -m experiments.plan --config=configs/quickstart.py --cpu_devices=8 --config.mesh.fsdp=-1
    python -m experiments.plan --config=configs/r1_distill_1p5b_openrs.py \
        --model=deepseek-r1-distill-qwen-1.5b --topology=v5e:2x4 --evaluate \
        --eval_batch_size=64 --max_model_length=32768

The two device programs of a step, `rollout` (the sampler: policy and, for AAPO, the
reference in one decode loop) and `update` (the train step, state donated), are lowered on
abstract inputs and compiled for the target: a TPU topology through libtpu's compile-only
devices (`pip install -r requirements-tpu.txt`), else the local devices (GPU, or
--cpu_devices fake CPU devices). Only the model's config.json is read: `--model=NAME` picks
one shipped under configs/model_shapes/, or pass `--config.model.path=DIR`. Data fields the
config leaves empty get placeholders (`aot.PLACEHOLDER_DATA`): no data is read.
`--import=my_module` (repeatable) imports your own module first (an algorithm it registers
can then be planned).

Prints a table (GiB per device) or, with --json, one JSON object: fits, devices,
device_kind, device_memory_bytes, decode_layout, decode_passes and kv_cache_per_pass_bytes
(the rollout's sequential decode passes under sampling.kv_budget_gib and the KV caches of
one), per_device_bytes {total, params (the trained ones: LoRA's adapters), frozen_base (LoRA's
base, stored once; 0 without LoRA), optimizer, reference, kv_cache (one pass's),
decode_weights (the rollout's decode copies),
temporaries, other_state}, compile_s {rollout, update}, flops (XLA's, per device, each loop body
once), model_flops (analytic, all devices), collective_bytes {program: {kind:
bytes}}, unknown_trip_count_loops, compile_errors, programs (every number per program),
decode_step (per decode step per device at the loop's average read: hbm_bytes,
bytes_accessed, staging_bytes, staging_overhead, eviction_bytes, ideal_bytes,
collective_bytes, hbm_bytes_per_slot, bytes_per_slot, ideal_bytes_per_slot, flops,
reshard_collective_bytes: from the decode loop compiled with one step as its body;
--nodecode_step skips it), estimate (roofline seconds per RL step: step_s, floor_s, ratio,
update_bound, update_useful_flops_fraction, update_padding_flops_fraction; None on CPU), advice.
Exits with status 1 when a program does not fit, naming the knob to turn, and 2
when one fails to compile for another reason (its traceback on stderr; the other program
is still planned). XLA:CPU's temporaries over-state (no buffer reuse across the program):
decide TPU fits with --topology.

--evaluate plans `experiments.evaluate`'s program instead (`aapo_jax.eval_plan`): one generate
call of --eval_batch_size prompts of --eval_prompt_length tokens, --eval_samples rows each,
decoding min(--eval_max_new_tokens, --max_model_length − 1) tokens (the most any prompt gets)
from the checkpoint's weights in --eval_dtype on the config's mesh, at the paper's temperature
and top_p. It compiles one pass, then the fewest sequential decode passes whose KV caches fit
the room the rest leaves, until a program fits the device, and prints the passes, rows per
pass per device, the peak per device and the `experiments.evaluate` flags that run it
(--kv_budget_gib: one pass's KV caches per device). --json fields: passes, rows_per_pass,
prompts_per_device, kv_cache_per_pass_bytes, kv_budget_gib, decode_max_new_tokens,
decode_layout, fits, compile_error, per_device_bytes {total, weights, decode_weights,
kv_cache, temporaries}, tried {passes: the program report}, compile_s, evaluate_flags,
time_floor {step_bytes, call_floor_s, paper_calls, paper_floor_s: an HBM-bound floor, every row
decoding the whole budget; null on CPU}, and
the settings. Exits 1 when even one prompt per device per pass does not fit, 2 on a compile
error.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from aapo_jax import plugins

MODEL_SHAPES = Path(__file__).resolve().parent.parent / "configs" / "model_shapes"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
flags.DEFINE_multi_string(plugins.FLAG, [], plugins.FLAG_HELP)  # read by plugins.parse_flags
_MODEL = flags.DEFINE_string(
    "model", None, "A shipped architecture (configs/model_shapes/NAME): sets model.path."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology to compile for, e.g. v5e:2x4, v5p:2x2x2, v4:2x2x1."
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Expose this many fake CPU devices (without --topology)."
)
_DEVICE_MEMORY_GB = flags.DEFINE_float(
    "device_memory_gb", None, "Usable memory per device in GiB (default: from the device)."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
_DECODE_STEP = flags.DEFINE_bool(
    "decode_step",
    True,
    "Also compile the decode loop with one step as its body (and the decode copies) for a "
    "step's bytes, FLOPs and collectives, and the roofline estimate.",
)
_EVALUATE = flags.DEFINE_bool(
    "evaluate",
    False,
    "Plan experiments.evaluate's decode (rows per pass, passes, --kv_budget_gib) instead of "
    "the RL step.",
)
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
    "eval_batch_size",
    None,
    "--evaluate: prompts per generate call (default: the config's train.eval_batch_size).",
)
_EVAL_SAMPLES = flags.DEFINE_integer(
    "eval_samples", 1, "--evaluate: samples per prompt (the paper's: 1)."
)
_EVAL_PROMPT_LENGTH = flags.DEFINE_integer(
    "eval_prompt_length",
    None,
    "--evaluate: the prompts' padded length (default: the config's sampling.max_prompt_length).",
)
_EVAL_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "eval_max_new_tokens", 32768, "--evaluate: the completion budget (the paper's: 32768)."
)
_MAX_MODEL_LENGTH = flags.DEFINE_integer(
    "max_model_length",
    None,
    "--evaluate: prompt + completion cap (the paper's: 32768; default: none).",
)
_EVAL_DTYPE = flags.DEFINE_enum(
    "eval_dtype", "bfloat16", ["bfloat16", "float32"], "--evaluate: the weights' dtype."
)
flags.mark_flags_as_required(["config"])


def shipped_models() -> list[str]:
    """Names of the architectures under configs/model_shapes/."""
    return sorted(p.parent.name for p in MODEL_SHAPES.glob("*/config.json"))


def model_path(config, model: str | None) -> Path | None:
    """configs/model_shapes/MODEL for --model, None to keep the config's model.path.

    Exits with a message naming the choices when MODEL is not shipped or neither is set.
    """
    choose = (
        f"pass --model=NAME, one of {shipped_models()} (configs/model_shapes/), or "
        "--config.model.path=DIR (a directory with a Hugging Face config.json)"
    )
    if model is not None:
        if model not in shipped_models():
            sys.exit(f"error: --model={model!r} is not shipped: {choose}.")
        return MODEL_SHAPES / model
    if not config.model.path:
        sys.exit(f"error: the config has no model.path: {choose}.")
    return None


def _gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def print_table(report: dict) -> None:
    b = report["per_device_bytes"]
    where = report["topology"] or report["platform"]
    print(
        f"{report['config']} on {report['devices']} × {report['device_kind']} ({where}), "
        f"mesh {report['mesh']}, {_gib(report['device_memory_bytes'])} GiB per device "
        f"({report['device_memory_source']}); attention: {report['attention']}; decode "
        f"weights: {report['decode_layout']}"
    )
    print(
        f"decode passes: {report['decode_passes']} (KV caches per pass: "
        f"{_gib(report['kv_cache_per_pass_bytes'])} GiB per device)"
    )
    print(f"{'per device':<22}{'GiB':>10}")
    for key in (
        "params",
        "frozen_base",
        "optimizer",
        "reference",
        "other_state",
        "kv_cache",
        "decode_weights",
        "temporaries",
    ):
        print(f"  {key:<20}{_gib(b[key]):>10}")
    print(f"  {'total':<20}{_gib(b['total']):>10}   (binding: {report['binding_program']})")
    print()
    head = f"{'program':<10}{'fits':>6}{'args':>9}{'temps':>9}{'outs':>9}{'alias':>9}{'total':>9}"
    print(head + f"{'compile s':>11}{'TFLOP':>10}{'coll. GiB':>11}")
    for name, p in report["programs"].items():
        coll = report["collective_bytes"][name]
        flops = "—" if p["flops"] is None else f"{p['flops'] / 1e12:.2f}"
        print(
            f"{name:<10}{'yes' if p['fits'] else 'NO':>6}{_gib(p['argument_bytes']):>9}"
            f"{_gib(p['temp_bytes']):>9}{_gib(p['output_bytes']):>9}{_gib(p['alias_bytes']):>9}"
            f"{_gib(p['total_bytes']):>9}{p['compile_s']:>11.1f}{flops:>10}"
            f"{'—' if coll is None else _gib(sum(coll.values())):>11}"
        )
    peaks = [n for n, p in report["programs"].items() if p["peak_bytes"]]
    if peaks:
        print(f"  total = XLA's peak memory for {', '.join(peaks)} (not the column sum)")
    for name, coll in report["collective_bytes"].items():
        if coll:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in coll.items() if v)
            print(f"  {name} collectives (GiB per device): {parts or 'none'}")
    for name, loops in report["unknown_trip_count_loops"].items():
        for loop in loops:
            per = sum(loop["bytes_per_iteration"].values())
            print(
                f"  {name}: loop {loop['loop']} has no known trip count: counted once "
                f"({_gib(per)} GiB of collectives per iteration)"
            )
    if report["flops"] is None:
        print("  XLA FLOPs: unavailable (a program did not compile or has no cost analysis)")
    print_decode_step(report)
    model = report["model_flops"]
    print(
        f"  model FLOPs per step, all devices: rollout {model['rollout'] / 1e12:.1f} T (upper "
        f"bound), update {model['update'] / 1e12:.1f} T (completions at "
        f"{model['update_completion_length']:.0f} tokens a row, "
        f"{model['update_padding'] / 1e12:.1f} T on padding); XLA's TFLOP column counts each "
        "loop body once"
    )


def print_decode_step(report: dict) -> None:
    """The decode step and the roofline estimate (estimates from the compiled programs)."""
    d, e = report["decode_step"], report["estimate"]
    if d is None:
        return
    for name, error in d["errors"].items():
        print(f"  {name} did not compile: {error}")
    if d["bytes_accessed"] is None:
        return
    mib = lambda n: "—" if n is None else f"{n / 2**20:.3f}"
    print(
        f"decode step, per device, at the loop's average read ({d['mean_kv_len']:.0f} slots; "
        "estimates from the compiled programs):"
    )
    print(
        f"  HBM bytes {_gib(d['hbm_bytes'])} GiB, ideal {_gib(d['ideal_bytes'])} GiB "
        f"({d['hbm_bytes'] / d['ideal_bytes']:.1f}×); XLA's bytes accessed "
        f"{_gib(d['bytes_accessed'])} GiB ({d['bytes_accessed'] / d['ideal_bytes']:.1f}×), "
        f"of which on-chip staging copies {_gib(d['staging_bytes'])} GiB counted "
        f"{1 + (d['staging_overhead'] or 0):.0f}×; copies back to HBM "
        f"{_gib(d['eviction_bytes'])} GiB"
    )
    print(
        f"  per added cache slot: HBM {mib(d['hbm_bytes_per_slot'])} MiB, accessed "
        f"{mib(d['bytes_per_slot'])} MiB, ideal {mib(d['ideal_bytes_per_slot'])} MiB"
    )
    coll = ", ".join(f"{k} {_gib(v)}" for k, v in (d["collectives"] or {}).items() if v)
    print(
        f"  collectives {_gib(d['collective_bytes'])} GiB ({coll or 'none'}); one-time "
        f"decode copies {_gib(d['reshard_collective_bytes'])} GiB; "
        f"{(d['flops'] or 0) / 1e9:.1f} GFLOP"
    )
    if e is not None:
        print(
            f"  estimated RL step {e['step_s']:.1f} s (rollout {e['rollout_s']:.1f} s, "
            f"{e['decode_step_bound']}-bound; update {e['update_s']:.1f} s, "
            f"{e['update_bound']}-bound), floor "
            f"{e['floor_s']:.1f} s: {e['ratio']:.1f}× the floor; update useful/executed "
            f"FLOPs {e['update_useful_flops_fraction']:.0%}, on padding "
            f"{e['update_padding_flops_fraction']:.0%}"
        )


def print_eval_table(report: dict) -> None:
    """The --evaluate plan: passes, rows per pass, bytes per device, the evaluate flags."""
    b = report["per_device_bytes"]
    where = report["topology"] or report["platform"]
    cap = report["max_model_length"]
    print(
        f"evaluate {report['model']} on {report['devices']} × {report['device_kind']} ({where}), "
        f"mesh {report['mesh']}, {_gib(report['device_memory_bytes'])} GiB per device "
        f"({report['device_memory_source']}); attention: {report['attention']}; decode "
        f"weights: {report['decode_layout']}, {report['dtype']}"
    )
    print(
        f"{report['batch_size']} prompts × {report['num_samples']} samples a generate call, "
        f"prompts of {report['prompt_len']} tokens, up to {report['decode_max_new_tokens']} new "
        f"(max_new_tokens {report['max_new_tokens']}, max_model_length {cap or 'none'})"
    )
    print(
        f"passes: {report['passes']} ({report['rows_per_pass']} rows per pass per device of "
        f"{report['prompts_per_device']} prompts; KV caches per pass "
        f"{_gib(report['kv_cache_per_pass_bytes'])} GiB per device)"
    )
    print(f"{'per device':<22}{'GiB':>10}")
    labels = {
        "kv_cache": "(part of the temporaries)",
        "total": "(XLA's peak, not the sum)",
    }
    for key in ("weights", "decode_weights", "kv_cache", "temporaries", "total"):
        print(f"  {key:<20}{_gib(b[key]):>10}   {labels.get(key, '')}".rstrip())
    tried = ", ".join(
        f"{p} pass(es) {_gib(r['total_bytes'])} GiB" + ("" if r["error"] is None else " (refused)")
        for p, r in report["tried"].items()
    )
    print(f"compiled: {tried}")
    print(f"experiments.evaluate flags: {report['evaluate_flags']}")
    floor = report["time_floor"]
    if floor is not None:
        print(
            f"time floor (HBM-bound, every row to the budget; an estimate): "
            f"{floor['call_floor_s'] / 60:.1f} min a generate call, "
            f"{floor['paper_floor_s'] / 3600:.2f} h for the five benchmarks once "
            f"({floor['paper_calls']} calls)"
        )


def plan_evaluation(config, devices, memory: int, source: str) -> int:
    """--evaluate: plan, print, and return the exit status (0 fits, 1 does not, 2 error)."""
    from aapo_jax import aot, eval_plan

    batch = _EVAL_BATCH_SIZE.value or config.train.eval_batch_size
    try:
        plan = eval_plan.abstract_eval_inputs(
            config,
            devices,
            batch_size=batch,
            num_samples=_EVAL_SAMPLES.value,
            prompt_len=_EVAL_PROMPT_LENGTH.value,
            max_new_tokens=_EVAL_MAX_NEW_TOKENS.value,
            max_model_length=_MAX_MODEL_LENGTH.value,
            dtype=_EVAL_DTYPE.value,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    log = lambda message: print(message, file=sys.stderr, flush=True)
    log(f"planning the evaluation on {len(devices)} × {devices[0].device_kind}")
    passes, reports = eval_plan.plan_passes(plan, memory, log=log)
    report = eval_plan.eval_report(
        plan, passes, reports, memory, memory_source=source, topology=_TOPOLOGY.value
    )
    if _JSON.value:
        print(aot.to_json(report))
    else:
        print_eval_table(report)
    if report["compile_error"]:
        print(f"the evaluation failed to compile: {report['compile_error']}", file=sys.stderr)
        return 2
    if not report["fits"]:
        print(
            "does not fit even at one prompt per device per pass: fewer --eval_samples, a "
            "shorter --max_model_length, more devices (--config.mesh.*, a bigger --topology)",
            file=sys.stderr,
        )
        return 1
    return 0


def tpu_config_problem(config) -> str | None:
    """What in an `ExperimentConfig` a TPU plan cannot compile as the run would, or None."""
    if config.sampling.decode_attention == "pallas_gpu":
        return (
            "sampling.decode_attention='pallas_gpu' is Pallas's GPU decode kernel; a TPU plan "
            "compiles the XLA decode attention: set it to 'auto' or 'xla'."
        )
    return None


def main(argv):
    del argv
    from aapo_jax import sharding

    if _CPU_DEVICES.value and not _TOPOLOGY.value:  # before anything touches a JAX backend
        sharding.use_cpu_devices(_CPU_DEVICES.value)
    from aapo_jax import aot

    config = aot.plan_config(_CONFIG.value, model_path=model_path(_CONFIG.value, _MODEL.value))
    if _TOPOLOGY.value and (problem := tpu_config_problem(config)):
        sys.exit(f"error: {problem}")
    try:
        devices = aot.target_devices(_TOPOLOGY.value)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    memory, source = sharding.device_memory_bytes(devices[0], _DEVICE_MEMORY_GB.value)
    if _EVALUATE.value:
        sys.exit(plan_evaluation(config, devices, memory, source))
    attention = aot.target_attention(config, devices[0].platform) if _TOPOLOGY.value else None
    plan = aot.abstract_inputs(config, devices, attention=attention)
    try:
        aot.decode_passes(plan)  # a KV budget below one prompt's caches: before compiling
    except ValueError as e:
        sys.exit(f"error: {e}")
    log = lambda message: print(message, file=sys.stderr, flush=True)
    log(f"planning {config.name} on {len(devices)} × {devices[0].device_kind}")
    programs = aot.compile_programs(plan, log=log)
    decode = aot.compile_decode_step(plan, log=log) if _DECODE_STEP.value else None
    report = aot.memory_report(
        plan, programs, memory, memory_source=source, topology=_TOPOLOGY.value, decode=decode
    )
    if _JSON.value:
        print(aot.to_json(report))
    else:
        print_table(report)
    if report["compile_errors"]:
        for name, error in report["compile_errors"].items():
            print(f"{name} failed to compile (traceback above): {error}", file=sys.stderr)
        sys.exit(2)
    if not report["fits"]:
        print(f"does not fit: {report['advice']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=plugins.parse_flags)
