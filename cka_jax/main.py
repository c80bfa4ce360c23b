r"""Command line: ``python -m cka_jax.main --config=configs/default.py --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.epochs=3 --config.methods="('cka',)"``.
Re-running the same command after an interruption resumes where it stopped.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from cka_jax import distributed, experiment
from cka_jax.checkpoint import CheckpointError
from cka_jax.config import distributed_config
from cka_jax.data import DataNotFoundError, DataPreparationError
from cka_jax.train.loop import NonFiniteLossError
from cka_jax.workdir import WorkdirError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors whose message already says what went wrong and what to do: no stack trace.
USER_ERRORS = (
    DataNotFoundError,
    DataPreparationError,
    CheckpointError,
    NonFiniteLossError,
    WorkdirError,
    distributed.DistributedInitError,
    ValueError,
    PermissionError,
)


def main(argv):
    del argv
    logging.getLogger("cka_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    try:
        # Before any JAX computation: join the other processes when asked to.
        distributed.initialize(FLAGS.config.get("distributed", distributed_config()))
        table = experiment.run(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if not distributed.is_primary():
        return
    print(table)
    print(f"\nwrote {FLAGS.workdir}/results.json and {FLAGS.workdir}/results.md")


if __name__ == "__main__":
    app.run(main)
