"""Shared test helpers: the tiny trainer and planner configs, and `experiments.train` as a job."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from aapo_jax import metrics
from configs.base import base_config
from tests import hf_fixtures

REPO = Path(__file__).resolve().parents[1]


def tiny_config(model_dir, **train):
    """Two steps of AAPO on chain_sum from the tiny random model, trained on `digit_fraction`
    (a reward that varies between a random model's completions) and evaluated with the
    chain_sum scorer."""
    hf_fixtures.register_test_rewards()
    c = base_config()
    c.name = "tiny"
    c.model.path = str(model_dir)
    c.data.name = "chain_sum"
    c.data.gym_kwargs = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    c.data.train_size = 64
    c.data.eval_size = 8
    c.rl.group_size = 4
    c.sampling.max_prompt_length = 128
    c.sampling.max_new_tokens = 6
    c.reward.names = ("digit_fraction",)
    c.reward.eval_name = "gym:chain_sum"
    c.reward.num_workers = 0
    c.optim.learning_rate = 1e-3
    c.train.steps = 2
    c.train.prompts_per_step = 4
    c.train.samples_every = 1
    c.train.checkpoint_every = 1
    c.train.update(train)
    return c


def tiny_plan_config(model_dir):
    """AAPO (policy + reference rollout) on the tiny model: B=8 prompts × G=2, P=8, T=4."""
    c = base_config()
    c.name = "tiny-plan"
    c.model.path = str(model_dir)
    c.data.name = "chain_sum"
    c.rl.group_size = 2
    c.train.prompts_per_step = 8
    c.sampling.max_prompt_length = 8
    c.sampling.max_new_tokens = 4
    return c


def train_process(config_file: Path, workdir: Path) -> subprocess.Popen:
    """`python -m experiments.train` on a config file, as a user starts it (no progress bar)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.train",
            f"--config={config_file}",
            f"--workdir={workdir}",
            "--noprogress",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(procs: subprocess.Popen | list[subprocess.Popen], ready, timeout_s=240) -> None:
    """Poll `ready()` until it holds; fails if one of `procs` exits first or time runs out."""
    procs = [procs] if isinstance(procs, subprocess.Popen) else procs
    deadline = time.time() + timeout_s
    while not ready():
        for proc in procs:  # the output (or, written to a file, the status) of one that exited
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        assert time.time() < deadline, "the run never reached the point waited for"
        time.sleep(0.05)


def trained_steps(workdir: Path) -> list[int]:
    """The steps of the training rows a (possibly running) job has written so far."""
    path = workdir / metrics.METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row being written
            pass
    return [r["step"] for r in rows if "loss" in r]


@contextlib.contextmanager
def matplotlib_backend(name: str):
    """matplotlib's backend set to `name` for the block (restored after): a plot written
    inside must leave it so, as a notebook's inline backend must survive a training run."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use(name)
    try:
        yield
    finally:
        matplotlib.use(before)
