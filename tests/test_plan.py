"""The ahead-of-time planner: a tiny config compiled on 8 fake CPU devices, the entry point's
JSON and exit status, collectives read from HLO text, and a TPU topology where libtpu exists."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from aapo_jax import aot, decode_layouts, eval_plan, evaluation, hlo, models, sampling, sharding
from tests.helpers import REPO, tiny_plan_config

MODEL_SHAPES = REPO / "configs" / "model_shapes"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

TINY_QWEN2 = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def write_model(directory: Path) -> Path:
    """A directory with only a config.json: all the planner reads."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_QWEN2))
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tiny_model"))


def _planned(model_dir, decode_weights: str):
    c = tiny_plan_config(model_dir)
    c.sampling.decode_weights = decode_weights
    plan = aot.abstract_inputs(aot.plan_config(c), jax.devices())
    return plan, aot.compile_programs(plan)


@pytest.fixture(scope="module")
def planned(model_dir):
    """Both programs of the tiny config compiled once on the 8 fake CPU devices (fsdp=8);
    the rollout decodes from tensor-parallel copies made once per rollout ("auto")."""
    return _planned(model_dir, "auto")


@pytest.fixture(scope="module")
def planned_sharded(model_dir):
    """The same, decoding from the sharded training layout."""
    return _planned(model_dir, "sharded")


def _nbytes(x) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def test_report_numbers_are_consistent(planned):
    plan, programs = planned
    report = aot.memory_report(plan, programs, 2**34)
    assert report["fits"] and report["advice"] == ""
    assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    b = report["per_device_bytes"]

    # Parameters: each fsdp-sharded leaf holds 1/8 on a device, a replicated one (norms) all.
    leaves = jax.tree.leaves(plan.state.params)
    sharded = [x for x in leaves if not x.sharding.is_fully_replicated]
    replicated = [x for x in leaves if x.sharding.is_fully_replicated]
    assert sharded and all(len(x.sharding.device_set) == 8 for x in sharded)
    expected = sum(_nbytes(x) for x in sharded) // 8 + sum(_nbytes(x) for x in replicated)
    assert b["params"] == expected < sum(_nbytes(x) for x in leaves)
    # fp32 masters: AdamW's two moments follow the parameters (plus a few step counters);
    # the frozen reference is stored in the compute dtype (fp32 here).
    assert 2 * b["params"] <= b["optimizer"] <= 2 * b["params"] + 64
    assert b["reference"] == b["params"]

    # KV cache: layers × 2 × slots per device × kv heads × head_dim × 4 B × 2 models, the
    # slots of a shared prompt (one of 8 prompts, P = 8) and of its rows' own T = 4.
    rows = 8 * 2 // 8
    assert b["kv_cache"] == 2 * 2 * (1 * 8 + rows * 4) * 2 * 16 * 4 * 2
    assert programs["rollout"].temp_bytes >= b["kv_cache"]

    assert set(report["compile_s"]) == {"rollout", "update"}
    assert all(s > 0 for s in report["compile_s"].values())
    for name, p in report["programs"].items():
        assert p["sum_bytes"] == (
            p["argument_bytes"] + p["temp_bytes"] + p["output_bytes"] - p["alias_bytes"]
        ), name
        assert p["total_bytes"] == p["sum_bytes"] > 0 and p["fits"]  # CPU: no peak
    # The whole state is an argument of both (the rollout keeps the moments in memory too).
    state = b["params"] + b["optimizer"] + b["reference"] + b["other_state"]
    assert programs["rollout"].argument_bytes >= state
    assert programs["update"].alias_bytes >= state - b["other_state"]  # the donated state
    assert b["total"] == max(p.total_bytes for p in programs.values()) > 0
    assert b["temporaries"] == programs[report["binding_program"]].temp_bytes

    # fsdp: the update gathers the sharded weights; the decode loop stops at EOS, so its
    # trip count is unknown (and listed).
    assert report["collective_bytes"]["update"]["all-gather"] > 0
    assert report["unknown_trip_count_loops"]["rollout"]
    assert report["flops"] > 0 and report["model_flops"]["total"] > report["flops"]
    json.loads(aot.to_json(report))


def test_the_decode_loop_gathers_no_weights_from_its_copies(planned, planned_sharded):
    """ "auto" on an fsdp mesh: tensor-parallel decode copies (every matmul weight split
    over the 8 devices, the norms whole), their bytes reported; the decode loop gathers
    activations only, and a rollout that does not fit names the layout knob. Sharded:
    every step gathers weights."""
    plan, programs = planned
    layout, copies = aot.decode_copies(plan)
    assert layout == "tensor" and plan.model_config.compute_dtype == np.float32
    whole = 2 * sum(x.size for x in jax.tree.leaves(plan.state.params)) * 4
    assert copies == 2 * decode_layouts.layout_bytes(plan.state.params, plan.mesh, "tensor", 4)
    assert whole / 8 < copies < whole / 7  # all but the norms split 8 ways
    mc = plan.model_config
    mlp_layer = 3 * mc.hidden_size * mc.intermediate_size * 4
    loops = programs["rollout"].collectives["unknown_trip_count_loops"]
    assert loops and all(
        loop["bytes_per_iteration"].get("all-gather", 0) < mlp_layer for loop in loops
    )
    report = aot.memory_report(plan, programs, programs["rollout"].total_bytes - 1)
    assert report["decode_layout"] == "tensor"
    assert report["per_device_bytes"]["decode_weights"] == copies
    assert not report["programs"]["rollout"]["fits"]
    assert "--config.sampling.decode_weights=sharded" in report["advice"]

    plan, programs = planned_sharded
    assert aot.decode_copies(plan) == ("sharded", 0)
    loops = programs["rollout"].collectives["unknown_trip_count_loops"]
    assert loops and all(loop["bytes_per_iteration"]["all-gather"] > mlp_layer for loop in loops)


def _decode_planned(model_dir, decode_weights: str):
    """One decode step of the tiny config with T = 1024 (two loop segments: kv_len 520 and
    1032), compiled with its decode copies on the 8 fake CPU devices."""
    c = tiny_plan_config(model_dir)
    c.sampling.max_new_tokens = 1024
    c.sampling.decode_weights = decode_weights
    plan = aot.abstract_inputs(aot.plan_config(c), jax.devices())
    return plan, aot.compile_decode_step(plan)


@pytest.fixture(scope="module")
def decode_planned(model_dir):
    return {dw: _decode_planned(model_dir, dw) for dw in ("tensor", "replicated", "sharded")}


def test_one_decode_step_reports_its_bytes_collectives_and_ideal(decode_planned):
    """The decode step's numbers: replicated copies gather once (the reshard program) and
    never per step; the sharded layout gathers every step. Bytes grow with kv_len, the
    ideal is the weights' share plus the filled cache's."""
    summaries = {}
    for dw, (plan, decode) in decode_planned.items():
        assert sorted(decode.steps) == [8 + 512, 8 + 1024]
        summary = aot.decode_step_summary(plan, decode)
        summaries[dw] = summary
        assert summary["errors"] == {}
        mean = sampling.mean_read_slots(8, 1024)
        assert summary["mean_kv_len"] == mean and 520 < mean < 1032
        lo, hi = (decode.steps[k].bytes_accessed for k in (520, 1032))
        # (XLA:CPU copies a cache slice shorter than the buffer: there bytes may fall.)
        assert 0 < min(lo, hi) <= summary["bytes_accessed"] <= max(lo, hi)
        assert summary["bytes_per_slot"] == pytest.approx((hi - lo) / 512)
        # Ideal: 1/8 of both models' fp32 weights + the cache: each of the 8 prompts' P = 8
        # slots once, T/2 = 512 slots of each of the 16 rows.
        n_params = sum(x.size for x in jax.tree.leaves(plan.state.params))
        per_slot = 2 * 2 * 2 * 16 * 4  # layers × (k, v) × kv heads × head_dim × 4 B
        assert summary["ideal_bytes_per_slot"] == pytest.approx(2 * per_slot * 16 / 8)
        assert summary["ideal_bytes"] == pytest.approx(
            2 * (n_params * 4 + per_slot * (8 * 8 + 16 * 512)) / 8
        )
        assert summary["flops"] > 0
        assert summary["staging_bytes"] == 0  # XLA:CPU has no on-chip memory space
        # CPU devices have no peaks: no roofline.
        assert aot.roofline_estimate(plan, summary) is None
    replicated, sharded = summaries["replicated"], summaries["sharded"]
    tensor = summaries["tensor"]
    assert not replicated["collectives"]["all-gather"] and replicated["reshard_collective_bytes"]
    assert sharded["collectives"]["all-gather"] > 0 and not sharded["reshard_collective_bytes"]
    assert sharded["collective_bytes"] > replicated["collective_bytes"]
    # Tensor: activations move, not weights; each device reads less than the whole copies.
    assert tensor["collective_bytes"] < sharded["collective_bytes"] / 2
    assert tensor["bytes_accessed"] < replicated["bytes_accessed"]


def test_the_decode_loop_program_counts_one_step(decode_planned):
    """The planner's decode program is the loop with one step as its body: the cost
    analysis counts that body once, so its FLOPs are one step's, those of the step compiled
    on its own (the loop's condition adds a compare)."""
    plan, decode = decode_planned["tensor"]
    prompts = plan.config.train.prompts_per_step
    alone = jax.jit(
        lambda m, s, u: sampling.decode_step(
            m, s, u, decode.config, kv_len=520, prompts=prompts, mesh=plan.mesh, unroll=2
        )
    )
    flops = alone.lower(*decode.inputs).compile().cost_analysis()["flops"]
    assert decode.steps[520].flops == pytest.approx(flops, rel=1e-3)


def test_hbm_bytes_take_the_staging_overhead_out(decode_planned):
    """A staged copy adds `staging_overhead` bytes per byte to XLA's count (XLA:TPU: 4,
    its prefetch's start and done each read and write): the HBM figure takes that out at
    each kv_len, then interpolates and takes the slope like the bytes accessed. XLA:CPU
    stages nothing: there the two are equal."""
    plan, decode = decode_planned["tensor"]
    cpu = aot.decode_step_summary(plan, decode)
    assert decode.staging_overhead is None and aot.staging_overhead(jax.devices()[0]) is None
    assert cpu["hbm_bytes"] == cpu["bytes_accessed"]
    steps = {
        520: dataclasses.replace(decode.steps[520], bytes_accessed=1000.0, staging_bytes=100),
        1032: dataclasses.replace(decode.steps[1032], bytes_accessed=3048.0, staging_bytes=200),
    }
    staged = aot.DecodeStepPrograms(decode.reshard, steps, staging_overhead=4.0)
    summary = aot.decode_step_summary(plan, staged)
    hbm = {520: 1000.0 - 400, 1032: 3048.0 - 800}
    mean = summary["mean_kv_len"]
    assert summary["hbm_bytes"] == pytest.approx(
        hbm[520] + (hbm[1032] - hbm[520]) * (mean - 520) / 512
    )
    assert summary["hbm_bytes_per_slot"] == pytest.approx((2248 - 600) / 512)
    assert summary["bytes_per_slot"] == pytest.approx(2048 / 512)
    assert summary["staging_overhead"] == 4.0


def test_a_one_segment_decode_loop_has_no_slope(model_dir):
    """T = 4: one loop segment, one kv_len compiled: the bytes are that step's, no per-slot
    figure is made up."""
    plan = aot.abstract_inputs(aot.plan_config(tiny_plan_config(model_dir)), jax.devices())
    decode = aot.compile_decode_step(plan)
    assert list(decode.steps) == [8 + 4]
    summary = aot.decode_step_summary(plan, decode)
    assert summary["bytes_accessed"] == decode.steps[12].bytes_accessed > 0
    assert summary["bytes_per_slot"] is None and summary["ideal_bytes_per_slot"] > 0


def test_roofline_estimate_against_the_floor(decode_planned, monkeypatch):
    plan, decode = decode_planned["replicated"]
    summary = aot.decode_step_summary(plan, decode)
    monkeypatch.setattr(aot, "device_peaks", lambda device: (1e12, 1e11, 1e10))
    e = aot.roofline_estimate(plan, summary)
    flops = aot.model_flops(plan)
    per_step = max(
        summary["bytes_accessed"] / 1e11,
        summary["flops"] / 1e12,
        summary["collective_bytes"] / 1e10,
    )
    assert e["rollout_s"] == pytest.approx(1024 * per_step)
    assert e["update_s"] == pytest.approx(flops["update"] / 8 / 1e12)
    assert e["update_bound"] == "flops"
    # The update's collectives over the inter-chip bandwidth when they take longer.
    slow = aot.roofline_estimate(plan, summary, update_collective_bytes=1e12)
    assert slow["update_bound"] == "collectives" and slow["update_s"] == pytest.approx(100.0)
    assert slow["floor_s"] == pytest.approx(e["floor_s"])
    assert e["step_s"] == pytest.approx(e["rollout_s"] + e["update_s"])
    floor = 1024 * summary["ideal_bytes"] / 1e11 + flops["update_useful"] / 8 / 1e12
    assert e["floor_s"] == pytest.approx(floor) and e["ratio"] == pytest.approx(e["step_s"] / floor)
    # AAPO with the kl metric: 3 passes + remat + the metric's reference forward, on rows
    # padded to T; useful: 3 passes on P + T/2 tokens.
    assert 0 < e["update_useful_flops_fraction"] < 0.6


def test_length_buckets_cut_the_planned_update(model_dir):
    """16 rows over 8 devices in one micro-batch, 4 buckets of T = 4: the rows sorted by
    length make 2 sub-batches of one row per device, the 8 shortest running at their
    longest, the others at the longest of all. The planner's mean executed length is that
    expectation for uniform lengths (order statistics of 16 draws from 1..4, exactly), and
    the update's FLOPs and padding fall with it; each prompt still runs once."""
    c = tiny_plan_config(model_dir)
    plain = aot.abstract_inputs(aot.plan_config(c), jax.devices())
    c.optim.length_buckets = 4
    plan = aot.abstract_inputs(aot.plan_config(c), jax.devices())
    assert aot.update_layout(plan) == (16, 1, 2, 8)
    assert aot.update_layout(plain) == (16, 1, 2, 8)  # a device's 2 rows: one group, kept whole

    def at_most(x, j):  # P(the j-th smallest of 16 draws from 1..4 is ≤ x)
        q = x / 4
        return sum(math.comb(16, i) * q**i * (1 - q) ** (16 - i) for i in range(j, 17))

    def mean(j):
        return sum(x * (at_most(x, j) - at_most(x - 1, j)) for x in range(1, 5))

    want = (mean(8) + mean(16)) / 2
    got = aot.expected_update_length(plan, draws=20_000)
    assert got == pytest.approx(want, abs=0.02) and got < 4
    assert aot.expected_update_length(plain) == 4
    cut, padded = aot.model_flops(plan), aot.model_flops(plain)
    assert cut["update_completion_length"] == pytest.approx(aot.expected_update_length(plan))
    assert cut["update_padding"] < padded["update_padding"]
    assert cut["update_useful"] == padded["update_useful"]
    assert cut["update"] < padded["update"]
    # A micro-batch of one row per device splits the groups: every row runs its prompt.
    c.optim.micro_batch_tokens = 8 + 4
    split = aot.abstract_inputs(aot.plan_config(c), jax.devices())
    assert aot.update_layout(split) == (16, 2, 1, 8)
    assert aot.model_flops(split)["update"] > cut["update"]
    # Remat "dots" recomputes the attention's matmuls and the head, not the whole forward.
    remat = {}
    for name in ("none", "dots", "full"):
        c.model.remat = name
        remat[name] = aot.model_flops(aot.abstract_inputs(aot.plan_config(c), jax.devices()))
    assert remat["none"]["update"] < remat["dots"]["update"] < remat["full"]["update"]


def test_too_little_memory_names_the_knob(planned_sharded):
    plan, programs = planned_sharded
    update = programs["update"]
    # Room for the state and rollout, not for the update's temporaries.
    assert programs["rollout"].total_bytes < update.total_bytes
    memory = (programs["rollout"].total_bytes + update.total_bytes) // 2
    report = aot.memory_report(plan, programs, memory)
    assert not report["fits"] and not report["programs"]["update"]["fits"]
    assert report["programs"]["rollout"]["fits"]
    assert f"--config.{aot.micro_batch_knob()}" in report["advice"]
    assert "--config.model.remat=full" in report["advice"]
    # Less than the state: shard it.
    report = aot.memory_report(plan, programs, 1024)
    assert not report["fits"] and "--config.mesh.fsdp" in report["advice"]


@pytest.mark.slow
def test_entry_point_json_and_exit_status(model_dir, tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.helpers import tiny_plan_config\n\n\n"
        f"def get_config():\n    return tiny_plan_config({str(model_dir)!r})\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.plan",
            f"--config={config_file}",
            "--config.rl.group_size=4",  # overrides as in experiments/train.py
            "--cpu_devices=8",
            "--device_memory_gb=0.0001",
            "--json",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["fits"] is False and report["devices"] == 8
    assert report["device_memory_bytes"] == int(0.0001 * 2**30)
    assert report["config"] == "tiny-plan" and report["topology"] is None
    assert set(report["compile_s"]) == {"rollout", "update"}
    assert set(report["per_device_bytes"]) >= {
        "total",
        "params",
        "optimizer",
        "reference",
        "kv_cache",
        "temporaries",
    }
    # G = 4: twice the rows of the in-process plan, 4 rows per device (T = 4 slots each)
    # and one shared prompt (P = 8).
    assert report["per_device_bytes"]["kv_cache"] == 2 * 2 * (8 + 4 * 4) * 2 * 16 * 4 * 2
    assert report["collective_bytes"]["update"]["all-gather"] > 0
    assert "compiling update" in proc.stderr
    assert "does not fit" in proc.stderr and "--config.mesh." in proc.stderr


def _eval_plan(model_dir, batch_size: int = 16):
    """The tiny model's evaluation on the 8 fake CPU devices (fsdp=8): 16 prompts of 8
    tokens × 2 samples, 64 new tokens within a model length of 72, fp32 weights."""
    config = aot.plan_config(tiny_plan_config(model_dir))
    return eval_plan.abstract_eval_inputs(
        config,
        jax.devices(),
        batch_size=batch_size,
        num_samples=2,
        prompt_len=8,
        max_new_tokens=64,
        max_model_length=72,
        dtype="float32",
    )


def test_the_evaluation_decodes_in_passes_when_memory_demands(model_dir):
    """Less memory than the one-pass program needs: the plan takes 2 passes (one prompt per
    device each), whose program compiles and fits, and the --kv_budget_gib it prints gives
    `evaluate` those 2 passes."""
    plan = _eval_plan(model_dir)
    assert plan.config.settings.max_new_tokens == 64  # min(64, 72 - a one-token prompt)
    assert plan.prompts_per_device == 2 and plan.passes_choices() == [1, 2]
    per_prompt = 2 * 2 * (8 + 2 * 64) * 2 * 16 * 4  # layers × (k, v) × slots × kv heads × Dh × 4 B
    assert plan.kv_cache_bytes(1) == 2 * per_prompt and plan.kv_cache_bytes(2) == per_prompt
    one = eval_plan.compile_eval(plan, 1)
    assert one.error is None and one.temp_bytes >= plan.kv_cache_bytes(1)
    passes, reports = eval_plan.plan_passes(plan, one.total_bytes - 1)
    assert passes == 2 and set(reports) == {1, 2}
    assert reports[2].error is None and reports[2].total_bytes < one.total_bytes
    report = eval_plan.eval_report(plan, passes, reports, one.total_bytes - 1)
    assert report["fits"] and (report["passes"], report["rows_per_pass"]) == (2, 2)
    assert report["per_device_bytes"]["kv_cache"] == per_prompt
    assert f"--kv_budget_gib={report['kv_budget_gib']}" in report["evaluate_flags"]
    assert "--batch_size=16 --mesh=1,8,1" in report["evaluate_flags"]
    json.loads(aot.to_json(report))
    # That budget in `evaluate`'s own terms: these 16 prompts decode in 2 passes.
    settings = dataclasses.replace(evaluation.PAPER_SAMPLING, max_new_tokens=64)
    budget = report["kv_budget_gib"]
    model_config = plan.model.config
    assert (
        evaluation.decode_passes(model_config, settings, plan.mesh, 16, 8, 2, kv_budget_gib=budget)
        == 2
    )
    # Too little memory for anything: the most passes, not fitting.
    passes, reports = eval_plan.plan_passes(plan, 1024)
    assert passes == 2 and not eval_plan.eval_report(plan, passes, reports, 1024)["fits"]


def test_the_pass_search_verifies_the_fewest_passes(model_dir, monkeypatch):
    """With 8 prompts per device and programs of 2·KV/passes bytes (the rest shrinking with
    the rows too), memory for exactly 2 passes: one pass leaves no room by its own numbers,
    so the most passes are compiled, whose smaller rest then predicts 2, compiled and kept."""
    plan = _eval_plan(model_dir, batch_size=64)
    assert plan.passes_choices() == [1, 2, 4, 8]
    kv = plan.kv_cache_bytes(1)
    compiled = []

    def fake_compile(plan, passes, *, log):
        compiled.append(passes)
        return aot.ProgramReport("evaluate", 0.0, 0, 0, total_bytes=2 * kv // passes)

    monkeypatch.setattr(eval_plan, "compile_eval", fake_compile)
    assert eval_plan.plan_passes(plan, kv)[0] == 2 and compiled == [1, 8, 2]
    compiled.clear()
    assert eval_plan.plan_passes(plan, 2 * kv)[0] == 1 and compiled == [1]
    compiled.clear()
    passes, reports = eval_plan.plan_passes(plan, kv // 8)
    assert passes == 8 and compiled == [1, 8] and reports[8].total_bytes > kv // 8


@pytest.mark.slow
def test_entry_point_plans_the_evaluation(model_dir, tmp_path):
    """--evaluate: the evaluation's JSON plan from the flags; a device too small for even one
    prompt per device per pass exits 1 after trying every pass count up to that."""
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.helpers import tiny_plan_config\n\n\n"
        f"def get_config():\n    return tiny_plan_config({str(model_dir)!r})\n"
    )
    command = [
        sys.executable,
        "-m",
        "experiments.plan",
        f"--config={config_file}",
        "--cpu_devices=8",
        "--device_memory_gb=0.000001",
        "--json",
        "--evaluate",
        "--eval_batch_size=16",
        "--eval_samples=2",
        "--eval_prompt_length=8",
        "--eval_max_new_tokens=64",
        "--max_model_length=72",
        "--eval_dtype=float32",
    ]
    proc = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    report = json.loads(line)
    assert (report["passes"], report["fits"], set(report["tried"])) == (2, False, {"1", "2"})
    assert (report["batch_size"], report["num_samples"], report["prompt_len"]) == (16, 2, 8)
    assert (report["decode_max_new_tokens"], report["dtype"]) == (64, "float32")
    assert report["evaluate_flags"].startswith("--batch_size=16 --mesh=1,8,1 --dtype=float32")
    assert "--max_model_length=72" in report["evaluate_flags"]
    assert "does not fit even at one prompt per device per pass" in proc.stderr


HLO = """\
HloModule test, entry_computation_layout={(f32[4,8]{1,0})->f32[16,8]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[4,8]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%next, %ar)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%until_eos (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %zero = f32[] constant(0)
  %m = f32[] reduce(%x, %zero), dimensions={0,1}, to_apply=%add
  ROOT %go = pred[] compare(%m, %zero), direction=GT
}

ENTRY %main.1 (a: f32[4,8]) -> f32[16,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %two = s32[] constant(2)
  %init = (s32[], f32[4,8]{1,0}) tuple(%zero, %a)
  %init2 = (s32[], f32[4,8]{1,0}) tuple(%two, %a)
  %known = (s32[], f32[4,8]) while(%init), condition=%until_eos, body=%body, KNOWN_TRIP_COUNT
  %counted = (s32[], f32[4,8]{1,0}) while(%init2), condition=%cond, body=%body
  %decode = (s32[], f32[4,8]{1,0}) while(%init), condition=%until_eos, body=%body
  %x = f32[4,8]{1,0} get-tuple-element(%known), index=1
  %ags = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%x), dimensions={0}
  %agd = f32[16,8]{1,0} all-gather-done(%ags)
  %rs = bf16[2,8]{1,0:T(8,128)(2,1)} reduce-scatter(%x), dimensions={0}, to_apply=%add
  %cps = (f32[4,8], f32[4,8], u32[], u32[]) collective-permute-start(%x), source_target_pairs={}
  %cpd = f32[4,8]{1,0} collective-permute-done(%cps)
  ROOT %out = f32[16,8]{1,0} copy(%agd)
}
""".replace("KNOWN_TRIP_COUNT", 'backend_config={"known_trip_count":{"n":"5"}}')


def test_collective_bytes_of_hand_written_hlo():
    out = hlo.collective_bytes(HLO)
    per_iteration = 4 * 8 * 4
    # Stated trip count 5 (its condition alone would not tell); counter condition i < 5
    # from 2: 3 trips; the decode loop: once.
    assert out["bytes"]["all-reduce"] == per_iteration * (5 + 3 + 1)
    assert out["bytes"]["all-gather"] == 16 * 8 * 4  # the async pair counts once
    assert out["bytes"]["reduce-scatter"] == 2 * 8 * 2
    assert out["bytes"]["collective-permute"] == 4 * 8 * 4
    assert out["bytes"]["all-to-all"] == 0
    assert out["count"]["all-reduce"] == 1 and out["count"]["all-gather"] == 1
    assert out["unknown_trip_count_loops"] == [
        {"loop": "decode", "bytes_per_iteration": {"all-reduce": per_iteration}}
    ]


# XLA:TPU's async collective as a chain of fusions (start, continuation, done), each with a
# copy of the one all-gather (same channel, same chain_id), inside a loop of unknown length.
ASYNC_CHAIN_HLO = """\
HloModule chain

%piece (w: bf16[2,8]) -> bf16[16,8] {
  %w = bf16[2,8]{1,0} parameter(0)
  ROOT %ag = bf16[16,8]{1,0} all-gather(%w), channel_id=7, dimensions={0}, CHAIN
}

%piece.1 (w: bf16[2,8]) -> bf16[16,8] {
  %w = bf16[2,8]{1,0} parameter(0)
  ROOT %ag.1 = bf16[16,8]{1,0} all-gather(%w), channel_id=7, dimensions={0}, CHAIN
}

%piece.2 (w: bf16[2,8]) -> bf16[16,8] {
  %w = bf16[2,8]{1,0} parameter(0)
  ROOT %ag.2 = bf16[16,8]{1,0} all-gather(%w), channel_id=7, dimensions={0}, CHAIN
}

%body (p: bf16[2,8]) -> bf16[2,8] {
  %p = bf16[2,8]{1,0} parameter(0)
  %start = bf16[16,8]{1,0} fusion(%p), kind=kCustom, calls=%piece
  %more = bf16[16,8]{1,0} fusion(%p), kind=kCustom, calls=%piece.1
  %done = bf16[16,8]{1,0} fusion(%p), kind=kCustom, calls=%piece.2
  %other = bf16[16,8]{1,0} all-gather(%p), channel_id=8, dimensions={0}
  ROOT %out = bf16[2,8]{1,0} slice(%done), slice={[0:2], [0:8]}
}

%until_eos (p: bf16[2,8]) -> pred[] {
  %p = bf16[2,8]{1,0} parameter(0)
  ROOT %go = pred[] constant(true)
}

ENTRY %main (a: bf16[2,8]) -> bf16[2,8] {
  %a = bf16[2,8]{1,0} parameter(0)
  ROOT %decode = bf16[2,8]{1,0} while(%a), condition=%until_eos, body=%body
}
""".replace("CHAIN", 'frontend_attributes={chain_id="3"}')


def test_an_async_collective_split_into_a_chain_of_fusions_counts_once():
    out = hlo.collective_bytes(ASYNC_CHAIN_HLO)
    gathered = 16 * 8 * 2
    assert out["bytes"]["all-gather"] == 2 * gathered  # the chain once, the other once
    assert out["count"]["all-gather"] == 2
    assert out["unknown_trip_count_loops"] == [
        {"loop": "decode", "bytes_per_iteration": {"all-gather": 2 * gathered}}
    ]


STAGING_HLO = """
HloModule staged

%layer (w: bf16[64,128]) -> bf16[64,128] {
  %w = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %in = (bf16[64,128]{1,0:S(1)}, bf16[64,128]{1,0}, u32[]{:S(2)}) copy-start(%w)
  ROOT %ready = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%in)
}

ENTRY %main (a: bf16[64,128], c: f32[4,256]) -> bf16[64,128] {
  %a = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %c = f32[4,256]{1,0:T(4,128)S(1)} parameter(1)
  %back = (f32[4,256]{1,0:T(4,128)}, f32[4,256]{1,0:T(4,128)S(1)}, u32[]{:S(2)}) copy-start(%c)
  %prefetch = (f32[4,256]{1,0:T(4,128)S(1)}, f32[4,256]{1,0:T(4,128)}, u32[]{:S(2)}) copy-start(%c)
  ROOT %out = bf16[64,128]{1,0} call(%a), to_apply=%layer
}
"""


BRANCHES_HLO = """
HloModule buckets

%short (p: bf16[2,8]) -> bf16[2,8] {
  %p = bf16[2,8]{1,0} parameter(0)
  %g = bf16[16,8]{1,0} all-gather(%p), channel_id=1, dimensions={0}
  ROOT %s = bf16[2,8]{1,0} slice(%g), slice={[0:2], [0:8]}
}

%long (p: bf16[2,8]) -> bf16[2,8] {
  %p = bf16[2,8]{1,0} parameter(0)
  %g = bf16[16,8]{1,0} all-gather(%p), channel_id=2, dimensions={0}
  %h = bf16[16,8]{1,0} all-gather(%p), channel_id=3, dimensions={0}
  ROOT %s = bf16[2,8]{1,0} slice(%h), slice={[0:2], [0:8]}
}

ENTRY %main (i: s32[], a: bf16[2,8]) -> bf16[2,8] {
  %i = s32[] parameter(0)
  %a = bf16[2,8]{1,0} parameter(1)
  ROOT %c = bf16[2,8]{1,0} conditional(%i, %a, %a), branch_computations={%short, %long}
}
"""


def test_a_conditional_counts_its_heaviest_branch():
    """One branch of a `switch` runs per execution (the update's length buckets): the
    count is the heaviest branch's, not the sum of all."""
    out = hlo.collective_bytes(BRANCHES_HLO)
    assert out["bytes"]["all-gather"] == 2 * 16 * 8 * 2
    assert out["count"]["all-gather"] == 3


def test_staging_and_eviction_bytes_count_copies_into_and_out_of_on_chip_memory():
    """Copies whose destination (the tuple's first array) is in memory space 1, in every
    computation, once each; a copy out of on-chip memory, and CPU HLO, count nothing."""
    assert hlo.staging_bytes(STAGING_HLO) == 64 * 128 * 2 + 4 * 256 * 4
    assert hlo.staging_bytes(HLO) == 0
    # The copy back out of on-chip memory (its source in memory space 1) is an eviction.
    assert hlo.eviction_bytes(STAGING_HLO) == 4 * 256 * 4
    assert hlo.eviction_bytes(HLO) == 0


def test_shape_bytes_and_resource_exhausted_messages():
    assert hlo.shape_bytes("(f32[8,128]{1,0}, s32[])") == 8 * 128 * 4 + 4
    assert hlo.shape_bytes("bf16[2,3]{1,0:T(8,128)(2,1)}") == 12
    assert hlo.shape_bytes("pred[7]{0}") == 7
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (37.06G) exceeds available HBM (15.75G)."
    )
    need, have = aot.parse_resource_exhausted(message)
    assert need == int(37.06 * 2**30) and have == int(15.75 * 2**30)
    assert aot.parse_resource_exhausted("INTERNAL: something else") is None


def test_plan_config_fills_only_unused_data_fields(model_dir):
    from configs import r1_distill_1p5b_openrs

    config = aot.plan_config(r1_distill_1p5b_openrs.get_config(), model_path=model_dir)
    assert config.data.path.endswith(".jsonl") and config.model.path == str(model_dir)
    c = tiny_plan_config(model_dir)
    c.data.name = ""
    assert aot.plan_config(c).data.name == aot.PLACEHOLDER_DATA
    c.data.name = "chain_sum"
    assert aot.plan_config(c).data.name == "chain_sum"


@pytest.mark.parametrize(
    "name, params",
    [
        ("qwen2.5-math-7b", 7_615_616_512),
        ("deepseek-r1-distill-qwen-1.5b", 1_777_088_000),
        ("llama-3.2-1b-instruct", 1_235_814_400),
        ("llama-3.2-3b-instruct", 3_212_749_824),
    ],
)
def test_shipped_model_shapes(name, params):
    hf = models.read_hf_config(MODEL_SHAPES / name)
    assert models.config_from_hf(hf).num_params == params
    assert sampling.eos_ids(hf["eos_token_id"])  # the rollout stops on them
    assert hf.get("pad_token_id") in (None, 0)  # the plan pads with 0 then


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_topology_without_libtpu_says_what_to_install():
    with pytest.raises(RuntimeError, match=r"pip install -r requirements-tpu\.txt"):
        aot.target_devices("v5e:2x4")


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -r requirements-tpu.txt")
def test_compiles_for_a_tpu_topology(model_dir):
    devices = aot.target_devices("v5e:2x4")
    assert len(devices) == 8 and devices[0].device_kind == "TPU v5 lite"
    config = aot.plan_config(tiny_plan_config(model_dir))
    plan = aot.abstract_inputs(config, devices, attention=aot.target_attention(config, "tpu"))
    memory, source = sharding.device_memory_bytes(devices[0])
    report = aot.memory_report(
        plan, aot.compile_programs(plan), memory, memory_source=source, topology="v5e:2x4"
    )
    assert report["fits"] and report["device_memory_bytes"] == int(15.75 * 2**30)
    assert report["collective_bytes"]["update"]["all-gather"] > 0
    # XLA:TPU drops known_trip_count: the layer and micro-batch loops are read off their
    # counter conditions, so only the decode loop stays unknown.
    assert report["unknown_trip_count_loops"]["update"] == []
    assert report["unknown_trip_count_loops"]["rollout"]


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -r requirements-tpu.txt")
def test_tpu_cost_analysis_counts_a_staged_copy_five_times():
    """XLA:TPU prefetches a weight read once into on-chip memory and counts it five times
    (the copy's start and done, each read and written, and the read): 4 bytes more per
    staged byte, which `hbm_bytes` takes out."""
    device = aot.target_devices("v5e:2x4")[0]
    assert aot.staging_overhead(device) == pytest.approx(4.0, abs=0.01)


def test_bench_compile_reports_both_depths_and_their_ratio(model_dir, tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.helpers import tiny_plan_config\n\n\n"
        f"def get_config():\n    return tiny_plan_config({str(model_dir)!r})\n"
    )
    command = [sys.executable, "-m", "experiments.bench_compile", f"--config={config_file}"]
    run = lambda *flags: subprocess.run(
        [*command, *flags],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    proc = run("--depths=1,3", "--repeats=1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["compile_s"]) == {"1", "3"} and report["repeats"] == 1
    for name in ("rollout", "update"):
        want = report["compile_s"]["3"][name] / report["compile_s"]["1"][name]
        assert report["ratio"][name] == pytest.approx(want)
    assert "1 layers" in proc.stderr and "3 layers" in proc.stderr
    bad = run("--depths=4")
    assert bad.returncode != 0 and "--depths needs two or more" in bad.stderr


def test_the_evaluation_time_floor_is_the_hbm_bound_of_a_full_length_decode(model_dir, monkeypatch):
    """passes × T × (weights + KV at its mean fill (P + T/2) / (P + T)) / HBM bytes/s, and
    the generate calls the five benchmarks take at this batch size; None on a CPU."""
    plan = _eval_plan(model_dir)  # 16 prompts of 8 tokens, T = 64
    assert eval_plan.time_floor(plan, 1, 1000) is None
    monkeypatch.setattr(aot, "device_peaks", lambda device: (1.0, 1e6, 1.0))
    floor = eval_plan.time_floor(plan, 2, 1000)
    step = 1000 + plan.kv_cache_bytes(2) * (8 + 32) / (8 + 64)
    assert floor["step_bytes"] == pytest.approx(step)
    assert floor["call_floor_s"] == pytest.approx(2 * 64 * step / 1e6)
    assert floor["paper_calls"] == 2 + 3 + 32 + 17 + 43  # ⌈30/16⌉ + ⌈40/16⌉ + … + ⌈675/16⌉
    assert floor["paper_floor_s"] == pytest.approx(97 * floor["call_floor_s"])


def test_a_tpu_plan_refuses_the_gpu_decode_kernel(model_dir):
    """A TPU plan compiles the XLA decode attention: a config set to the GPU kernel is
    refused by name rather than planned as something else."""
    from experiments import plan

    c = tiny_plan_config(model_dir)
    assert plan.tpu_config_problem(aot.plan_config(c)) is None
    c.sampling.decode_attention = "pallas_gpu"
    assert "sampling.decode_attention='pallas_gpu'" in plan.tpu_config_problem(aot.plan_config(c))
