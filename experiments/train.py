"""Train with an ml_collections config.

    python -m experiments.train --config=configs/quickstart.py --workdir=DIR

Override any field from the command line, e.g. `--config.train.steps=50
--config.rl.hparams.margin_low=0.1`; switch algorithms with the config's argument
(`--config=configs/quickstart.py:algo=grpo`). `--import=my_module` (repeatable) imports your
own module first, e.g. one that registers an algorithm or a reward. Re-running with the same
--workdir resumes from its newest checkpoint; SIGTERM or Ctrl-C finishes the step, saves a
checkpoint and exits (a second one stops at once). One run per --workdir: a second is refused. On
several hosts, run the same command with `--distributed` on each
(docs/reproducing-the-paper.md).
"""

import json
import logging
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from aapo_jax import configs, lock, plugins, process, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
_IMPORTS = flags.DEFINE_multi_string(plugins.FLAG, [], plugins.FLAG_HELP)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first: one process per host, same command and "
    "workdir everywhere. Cloud TPU, SLURM and Open MPI are detected; otherwise pass the "
    "three flags below.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in all (--distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (--distributed).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    1,
    "JAX CPU devices to expose (0 = one per core). With several, a data-parallel mesh "
    "(--config.mesh.data=-1 --config.mesh.fsdp=1) samples and trains each device's rows on "
    "its own core; XLA:CPU runs a small model's ops on one core per device.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Libraries (orbax, jax) log every checkpoint step at INFO; keep their warnings and
    # our own INFO lines (resume, SIGTERM), so the progress bar stays readable.
    # `--verbosity=0` brings everything back.
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("aapo_jax").setLevel(logging.INFO)
    if _CPU_DEVICES.value != 1:  # before anything touches a JAX backend
        sharding.use_cpu_devices(_CPU_DEVICES.value or None)
    if _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    config = configs.experiment_config(_CONFIG.value)
    try:
        summary = trainer.train(
            config,
            _WORKDIR.value,
            imports=tuple(_IMPORTS.value),
            progress=_PROGRESS.value,
            started=process.process_start_time(),
        )
    except lock.WorkdirBusyError as e:
        sys.exit(f"error: {e}")
    except process.Interrupted as e:
        print(f"{e}; the last checkpoint is kept and the same command resumes.", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C before the training loop took over the signal
        print("interrupted before training began; nothing was saved.", file=sys.stderr)
        sys.exit(130)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main, flags_parser=plugins.parse_flags)
