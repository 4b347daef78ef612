"""Two local processes (jax.distributed, CPU collectives) train like one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from aapo_jax import checkpoint, metrics, models
from tests import multiprocess_worker
from tests.helpers import REPO, trained_steps, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(command, logs: Path) -> list[subprocess.Popen]:
    """Start `command(process_id)` in two local processes (2 CPU devices each), each writing
    its output to `logs/<process_id>.log`."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(2):
        with open(logs / f"{i}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    command(i), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
                )
            )
    return procs


def _finish(procs: list[subprocess.Popen], logs: Path) -> list[str]:
    """Wait for both processes (each must exit 0); their outputs."""
    try:
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            proc.kill()
    outputs = [(logs / f"{i}.log").read_text() for i in range(len(procs))]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    return outputs


def _two_processes(command, logs: Path) -> list[str]:
    """Run `command(process_id)` in two local processes to the end; their outputs."""
    return _finish(_start_two(command, logs), logs)


def _run_two_processes(tmp_path, mode: str, *extra: str) -> dict:
    """Run the worker in two local processes; process 0's result."""
    port, out = _free_port(), tmp_path / f"{mode}.json"
    worker = [sys.executable, "-m", "tests.multiprocess_worker", mode]
    _two_processes(lambda i: [*worker, str(i), str(port), str(out), *extra], tmp_path / mode)
    return json.loads(out.read_text())


def test_two_processes_match_one_process(tmp_path):
    expected = multiprocess_worker.rl_steps()  # this process: the first 4 of 8 CPU devices
    got = _run_two_processes(tmp_path, "rl_steps")
    assert got["processes"] == 2 and got["devices"] == 4
    assert len(got["metrics"]) == len(expected["metrics"]) == 2
    for step_got, step_expected in zip(got["metrics"], expected["metrics"], strict=True):
        for key in ("loss", "grad_norm", "reward_mean", "ref_reward_mean", "entropy"):
            assert step_got[key] == pytest.approx(step_expected[key], rel=1e-4, abs=1e-6), key
    assert got["param_abs_sum"] == pytest.approx(expected["param_abs_sum"], rel=1e-6)


def test_train_command_on_two_processes_resumes_after_one_is_killed_and_matches_one_process(
    tiny_model_dir, tmp_path
):
    """`experiments.train --distributed` on two processes, with the host-reward trainer's
    per-process prompt shards, evals, checkpoints and HF export. One process is killed
    (SIGKILL) past the first checkpoint; the other is stopped as a job launcher would if it
    does not fail on its own; both restart with the same command and resume. The result
    matches one uninterrupted process, step by step, with each step logged once."""
    steps = 6
    model_dir = str(tiny_model_dir)
    expected = multiprocess_worker.train(
        model_dir, str(tmp_path / "one"), steps=steps, checkpoint_every=2
    )
    config_file = tmp_path / "two_process_config.py"
    config_file.write_text(
        "from tests.multiprocess_worker import trainer_config\n\n\n"
        f"def get_config():\n    return trainer_config({model_dir!r}, steps={steps}, "
        "checkpoint_every=2)\n"
    )
    workdir = tmp_path / "two"

    def command(port):
        flags = [
            f"--config={config_file}",
            f"--workdir={workdir}",
            "--progress=false",
            "--distributed",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
        ]
        return lambda i: [sys.executable, "-m", "experiments.train", *flags, f"--process_id={i}"]

    killed = _start_two(command(_free_port()), tmp_path / "killed")
    wait_for(
        killed,
        lambda: (
            (workdir / "checkpoints" / "2").is_dir() and max(trained_steps(workdir), default=0) >= 3
        ),
    )
    killed[1].kill()  # SIGKILL: no handler runs
    killed[1].wait()
    try:  # the survivor fails at its next collective, or waits in it until stopped
        killed[0].wait(timeout=10)
    except subprocess.TimeoutExpired:
        killed[0].kill()
        killed[0].wait()
    assert max(trained_steps(workdir)) < steps, "the run finished before the kill"

    logs = _two_processes(command(_free_port()), tmp_path / "resumed")
    assert all("resumed from step" in log for log in logs)
    assert f'"steps": {steps}' in logs[1]  # every process returns the summary
    got = json.loads((workdir / "summary.json").read_text())  # written by process 0
    assert got["steps"] == expected["steps"] == steps
    assert got["final_eval_accuracy"] == expected["final_eval_accuracy"]
    assert trained_steps(workdir) == list(range(1, steps + 1))  # each step once
    rows = {
        name: [r for r in metrics.read_metrics(tmp_path / name) if "loss" in r]
        for name in ("one", "two")
    }
    for one, two in zip(rows["one"], rows["two"], strict=True):
        for key in ("loss", "grad_norm", "reward_mean", "ref_reward_mean", "entropy"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (one["step"], key)
    exported = models.load_hf_checkpoint(tmp_path / "two" / "hf")
    reference = models.load_hf_checkpoint(tmp_path / "one" / "hf")
    for a, b in zip(
        jax.tree.leaves(nnx.state(exported, nnx.Param)),
        jax.tree.leaves(nnx.state(reference, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert checkpoint.Checkpointer(tmp_path / "two" / "checkpoints").latest_step() == steps
