r"""Command line: ``python -m cka_jax.main --config=configs/default.py --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.epochs=3 --config.methods="('cka',)"``.
Re-running the same command after an interruption resumes where it stopped.

Exit codes: 0 finished; 2 an error whose message says what is wrong and what to do (a bad
config, missing data, a checkpoint that does not fit, a full disk, ...); 75 stopped by
SIGTERM or SIGINT after writing a checkpoint, rerun to resume (`cka_jax.infra.preemption`).
"""

from __future__ import annotations

import re
import sys

from absl import app, flags
from ml_collections import config_flags

from cka_jax.config import distributed_config, unknown_field
from cka_jax.data import DataNotFoundError, DataPreparationError
from cka_jax.infra import console, distributed
from cka_jax.infra.checkpoint import CheckpointError
from cka_jax.infra.files import is_disk_full
from cka_jax.infra.preemption import Preempted
from cka_jax.infra.workdir import WorkdirError
from cka_jax.stages import experiment
from cka_jax.train.loop import NonFiniteLossError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_bool(
    "discard_stale",
    False,
    "Delete the workdir's stages that another config produced (only those) and rerun them.",
)
flags.DEFINE_bool(
    "library_logs", False, "Show other libraries' log lines and warnings (hidden by default)."
)
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
    console.setup_logging(FLAGS.library_logs)
    try:
        # Before any JAX computation: join the other processes when asked to.
        distributed.initialize(FLAGS.config.get("distributed", distributed_config()))
        table = experiment.run(FLAGS.config, FLAGS.workdir, discard_stale=FLAGS.discard_stale)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Preempted as err:  # a checkpoint is written: not an error, rerun to resume
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except OSError as err:  # a full disk outside checkpoints (which say more): no traceback
        if not is_disk_full(err):
            raise
        print(f"error: {err}; free some space, then rerun the same command", file=sys.stderr)
        sys.exit(2)
    if not distributed.is_primary():
        return
    print(table)
    print(f"\nwrote {FLAGS.workdir}/results.json and {FLAGS.workdir}/results.md")


def parse_flags(argv):
    """absl's flag parsing, but a ``--config.<field>`` the config lacks (config_flags raises
    AttributeError, KeyError or ValueError while parsing) or a value of the wrong type is one
    line and exit code 2."""
    try:
        return FLAGS(argv)
    except flags.IllegalFlagValueError as err:
        message = wrong_type_message(argv, err)
    except flags.Error as err:  # e.g. a flag the command does not have
        message = f"{' '.join(str(err).split())} (see --helpshort)"
    except (AttributeError, KeyError, ValueError) as err:
        message = unknown_field_message(argv, err)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def config_of(argv):
    """The config the ``--config`` flag names, without its overrides."""
    value = None
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
    return FLAGS["config"].parser.parse(value)


def wrong_type_message(argv, err) -> str:
    """``--config.epochs: expects an int, got 'abc'``: the field, its type, the value."""
    message = " ".join(str(err).split())
    try:
        cfg = config_of(argv)
        for arg in argv[1:]:
            match = re.match(r"^--?config\.([^=]+)=(.*)$", arg, flags=re.S)
            if not match or match.group(0).split("=", 1)[0] not in message:
                continue
            current = cfg
            for part in match.group(1).split("."):
                current = current[part]
            kind = type(current).__name__
            return f"--config.{match.group(1)}: expects {kind}, got {match.group(2)!r}"
    except Exception:  # noqa: BLE001 - keep absl's own message
        pass
    return message


def unknown_field_message(argv, err) -> str:
    message = " ".join(str(err).split())
    indexed = [a for a in argv[1:] if re.match(r"^--?config\.[^=]*\.\d+(\.|=)", a)]
    if indexed:  # ml_collections indexes tuples as union[0], not union.0
        fixed = re.sub(r"\.(\d+)(?=\.|=)", r"[\1]", indexed[0].split("=", 1)[0])
        message = f"{indexed[0].split('=', 1)[0]}: index a tuple as {fixed}"
    try:  # name the field, the closest valid one and the valid fields at its level
        cfg = config_of(argv)
        for arg in argv[1:]:
            path = re.match(r"^--?config\.([^=]+)", arg)
            found = path and unknown_field(cfg, path.group(1))
            if found:
                return f"{arg.split('=', 1)[0]}: {found}"
    except Exception:  # noqa: BLE001 - keep config_flags' own message
        pass
    return message


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
