"""Test setup: 8 fake CPU devices for the sharding tests, fp32-exact matmuls."""

import atexit
import os
import shutil
import tempfile

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
