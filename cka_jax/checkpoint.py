"""Orbax checkpoints: model checkpoints (teachers, exported students, ported weights) and the
training state of a run (latest few, resumable).

A model checkpoint is a directory holding `variables/` (an orbax checkpoint of
``{'params', 'batch_stats'}``) and `model.json` (architecture, class count, width, stem, class
names). `model.json` is written last and atomically, so a directory without it is an
interrupted save and is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cka_jax.models import create_model

MODEL_FILE = "model.json"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit what the config asks for."""


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def model_from_meta(meta: dict, **kwargs):
    return create_model(
        meta["arch"],
        meta["num_classes"],
        stem=meta.get("stem", "imagenet"),
        width=meta.get("width", 64),
        **kwargs,
    )


def save_model(directory, variables, meta: dict) -> None:
    """Writes ``variables`` and ``meta`` (arch, num_classes, width, stem, ...) atomically."""
    directory = Path(directory).absolute()
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    variables = jax.device_get(
        {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    )
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "variables", variables)
        ckptr.wait_until_finished()
    write_json_atomic(tmp / MODEL_FILE, meta)
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def has_model(directory) -> bool:
    return (Path(directory) / MODEL_FILE).is_file()


def load_model(directory, **model_kwargs):
    """Returns ``(model, variables, meta)`` from a model checkpoint directory."""
    directory = Path(directory).absolute()
    if not has_model(directory):
        raise CheckpointError(
            f"no model checkpoint at {directory}: expected {MODEL_FILE} and variables/ there "
            "(written by cka_jax training or scripts/port_torch_resnet.py)"
        )
    meta = json.loads((directory / MODEL_FILE).read_text())
    model = model_from_meta(meta, **model_kwargs)
    size = meta.get("image_size", 32)
    shape = (1, size, size, meta.get("channels", 3))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(directory / "variables", abstract)
    return model, variables, meta


class RunCheckpoints:
    """The training state of one run: saved every N steps and at the end, latest few kept.

    Restoring walks back from the newest step: a checkpoint that fails to load (truncated,
    corrupted) is skipped with a warning naming it, and the previous one is used.
    """

    def __init__(self, directory, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(jax.device_get(state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore_latest(self, template):
        """Returns ``(state, meta)`` of the newest loadable checkpoint, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(jax.tree.map(np.asarray, template)),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as err:  # noqa: BLE001 - any failure means "not loadable"
                log.warning(
                    "checkpoint %s is unreadable (%s: %s); trying the previous one",
                    self.directory / str(step),
                    type(err).__name__,
                    err,
                )
                continue
            return restored["state"], restored["meta"]
        return None

    def close(self) -> None:
        self.manager.close()
