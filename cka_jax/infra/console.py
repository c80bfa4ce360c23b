"""What the command line prints: this package's progress at INFO, as ``HH:MM:SS message``;
other libraries' log lines and Python warnings hidden unless asked for (``--library_logs``).

JAX opens with an INFO line about a missing TPU library, orbax writes about a dozen INFO
lines per checkpoint and TensorFlow's C++ code logs its own: none of it is about the
user's run, and it buries the stage and progress lines.
"""

from __future__ import annotations

import logging
import os
import warnings

from absl import logging as absl_logging


class _Formatter(logging.Formatter):
    """``HH:MM:SS message``; warnings and errors say so."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")

    def format(self, record):
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            time_text, _, message = text.partition(" ")
            return f"{time_text} {record.levelname.lower()}: {message}"
        return text


def setup_logging(library_logs: bool = False) -> None:
    """This package at INFO; with ``library_logs`` other libraries log as they would
    (absl's format, their own levels), else only their errors."""
    logging.getLogger("cka_jax").setLevel(logging.INFO)
    if library_logs:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's / XLA's C++ logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    absl_logging.get_absl_handler().setFormatter(_Formatter())
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"cka_jax(\.|$)")
