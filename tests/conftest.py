"""Test setup: 8 fake CPU devices, fp32-exact matmuls, the tiny model and one trained run."""

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

# The commands the tests start as subprocesses (trainer runs killed and resumed, two-process
# runs, README examples) compile the same programs again and again: they share one XLA
# compilation cache for the session. This process keeps it off, so the tests that count
# compiles see every one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="aapo-jax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax

jax.config.update("jax_enable_compilation_cache", False)
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
    `trained_workdir`, a copy.
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
