"""Two local processes (jax.distributed, CPU collectives) train like one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import multiprocess_worker

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    expected = multiprocess_worker.rl_steps()  # this process: the first 4 of 8 CPU devices
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    port, out = _free_port(), tmp_path / "result.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_worker", str(i), str(port), str(out)],
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
    got = json.loads(out.read_text())
    assert got["processes"] == 2 and got["devices"] == 4
    assert len(got["metrics"]) == len(expected["metrics"]) == 2
    for step_got, step_expected in zip(got["metrics"], expected["metrics"], strict=True):
        for key in ("loss", "grad_norm", "reward_mean", "ref_reward_mean", "entropy"):
            assert step_got[key] == pytest.approx(step_expected[key], rel=1e-4, abs=1e-6), key
    assert got["param_abs_sum"] == pytest.approx(expected["param_abs_sum"], rel=1e-6)
