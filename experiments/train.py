"""Train with an ml_collections config.

    python -m experiments.train --config=configs/quickstart.py --workdir=DIR

Override any field from the command line, e.g. `--config.rl.advantage=grpo
--config.train.steps=50`. Re-running with the same --workdir resumes from its
newest checkpoint; SIGTERM saves a checkpoint and exits.
"""

import json
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from aapo_jax import configs, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Libraries (orbax, jax) log every checkpoint step at INFO; keep their warnings and
    # our own INFO lines (resume, SIGTERM), so the progress bar stays readable.
    # `--verbosity=0` brings everything back.
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("aapo_jax").setLevel(logging.INFO)
    config = configs.experiment_config(_CONFIG.value)
    summary = trainer.train(config, _WORKDIR.value, progress=_PROGRESS.value)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
