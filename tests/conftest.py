"""Test setup: 8 fake CPU devices, fp32-exact matmuls, one XLA cache, the shared tiny run."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests run tiny programs a few times each, where LLVM's optimisation of the code XLA
# generates costs far more than it saves. This keeps every XLA (HLO) pass and skips that,
# for this process and the subprocesses it starts.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# The tests compile the same programs again and again: every trainer run jits its own
# rollout and update, and the commands started as subprocesses (trainer runs killed and
# resumed, two-process runs, README examples) compile them afresh. The test processes (each
# xdist worker) and the subprocesses share one XLA compilation cache for the session. A
# program read back from the cache still reports a backend compile event, so the tests that
# count compiles see every jit cache miss.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="aapo-jax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random Qwen2 checkpoint and its tokenizer (`hf_fixtures.make_model_dir`)."""
    from tests import hf_fixtures

    return hf_fixtures.make_model_dir(tmp_path_factory.mktemp("tiny_model"))


class TrainedRun(NamedTuple):
    workdir: Path
    summary: dict


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, tmp_path_factory) -> TrainedRun:
    """`helpers.tiny_config` trained once for the session: two steps, a checkpoint after each.

    Tests read it and must not write to it; one that resumes or changes the run takes
    `trained_workdir`, a copy. Under xdist the tests that use it share one worker (see
    `pytest_collection_modifyitems`), so it is trained once.
    """
    from aapo_jax import configs, trainer
    from tests.helpers import tiny_config

    workdir = tmp_path_factory.mktemp("trained_run")
    summary = trainer.train(configs.experiment_config(tiny_config(tiny_model_dir)), workdir)
    return TrainedRun(workdir, summary)


@pytest.fixture
def trained_workdir(trained_run, tmp_path) -> Path:
    """A copy of the session's trained run (`trained_run`) for a test that writes to it."""
    return Path(shutil.copytree(trained_run.workdir, tmp_path / "trained"))


# Modules that train or start subprocesses, longest first: with `-n 2` (each test its own
# xdist work unit, see pyproject.toml) the last tests to start are short ones.
_LONG_MODULES = (
    "test_multiprocess.py",
    "test_reliability.py",
    "test_trainer.py",
    "test_train_step.py",
    "test_lora.py",
    "test_experiments.py",
    "test_paper_eval.py",
    "test_plan.py",
    "test_configs.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("trained_run"))
    rank = {name: i for i, name in enumerate(_LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session):
    # A worker's JAX caches hold a million-odd objects by the end. Dropped here, before xdist
    # reports the worker finished, pytest's five exit-time garbage collections take about half
    # as long, and finish inside the 5 s that execnet waits before it interrupts the worker
    # (which printed a KeyboardInterrupt traceback after a passing run).
    jax.clear_caches()
