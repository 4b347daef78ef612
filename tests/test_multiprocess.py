"""Two local processes (jax.distributed, CPU collectives) train like one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aapo_jax import checkpoint, metrics, models
from tests import hf_fixtures, multiprocess_worker

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(command) -> list[str]:
    """Run `command(process_id)` in two local processes (2 CPU devices each); their outputs."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    procs = [
        subprocess.Popen(
            command(i),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    return logs


def _run_two_processes(tmp_path, mode: str, *extra: str) -> dict:
    """Run the worker in two local processes; process 0's result."""
    port, out = _free_port(), tmp_path / f"{mode}.json"
    worker = [sys.executable, "-m", "tests.multiprocess_worker", mode]
    _two_processes(lambda i: [*worker, str(i), str(port), str(out), *extra])
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


def test_train_command_on_two_processes_matches_one_process(tmp_path):
    """`experiments.train --distributed` on two processes, with the host-reward trainer's
    per-process prompt shards, evals, checkpoints and HF export: same steps as one process."""
    model_dir = str(hf_fixtures.make_model_dir(tmp_path / "model"))
    expected = multiprocess_worker.train(model_dir, str(tmp_path / "one"))
    config_file = tmp_path / "two_process_config.py"
    config_file.write_text(
        "from tests.multiprocess_worker import trainer_config\n\n\n"
        f"def get_config():\n    return trainer_config({model_dir!r})\n"
    )
    port, workdir = _free_port(), tmp_path / "two"
    flags = [
        f"--config={config_file}",
        f"--workdir={workdir}",
        "--progress=false",
        "--distributed",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    logs = _two_processes(
        lambda i: [sys.executable, "-m", "experiments.train", *flags, f"--process_id={i}"]
    )
    assert '"steps": 2' in logs[1]  # every process returns the summary
    got = json.loads((workdir / "summary.json").read_text())  # written by process 0
    assert got["steps"] == expected["steps"] == 2
    assert got["final_eval_accuracy"] == expected["final_eval_accuracy"]
    rows = {
        name: [r for r in metrics.read_metrics(tmp_path / name) if "loss" in r]
        for name in ("one", "two")
    }
    assert [r["step"] for r in rows["two"]] == [1, 2]
    for one, two in zip(rows["one"], rows["two"], strict=True):
        for key in ("loss", "grad_norm", "reward_mean", "ref_reward_mean", "entropy", "kl"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    exported = models.load_hf_checkpoint(tmp_path / "two" / "hf")
    reference = models.load_hf_checkpoint(tmp_path / "one" / "hf")
    np.testing.assert_allclose(
        np.asarray(exported.embed.value), np.asarray(reference.embed.value), atol=1e-6
    )
    assert checkpoint.Checkpointer(tmp_path / "two" / "checkpoints").latest_step() == 2
