"""Model checkpoints (teachers, exported students, ported weights): a directory holding
`variables/` (an orbax checkpoint of ``{'params', 'batch_stats'}``) and `model.json`
(architecture, class count, width, stem, class names). `model.json` is written last and
atomically, so a directory without it is an interrupted save and is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from cka_jax.infra.checkpoint import (
    CheckpointError,
    disk_full_as_error,
    remove_partial_write,
    tree_nbytes,
)
from cka_jax.infra.distributed import barrier, is_primary
from cka_jax.infra.files import write_json_atomic
from cka_jax.models.resnet import create_model

MODEL_FILE = "model.json"

log = logging.getLogger(__name__)


def model_from_meta(meta: dict, **kwargs):
    return create_model(
        meta["arch"],
        meta["num_classes"],
        stem=meta.get("stem", "imagenet"),
        width=meta.get("width", 64),
        **kwargs,
    )


def save_model(directory, variables, meta: dict) -> None:
    """Writes ``variables`` and ``meta`` (arch, num_classes, width, stem, ...) atomically.

    The new checkpoint is complete in ``<directory>.partial`` before it replaces the old
    one; a save killed between the two renames is finished by the next `has_model`.
    Every process of a multi-process run calls this (orbax writes together); process 0
    moves the files.
    """
    directory = Path(directory).absolute()
    tmp = directory.with_name(directory.name + ".partial")
    variables = jax.device_get(
        {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    )
    kept = "The model saved there before, if any, is kept."
    full = disk_full_as_error(
        "a model",
        directory,
        tree_nbytes(variables),
        kept,
        cleanup=lambda: remove_partial_write(tmp),
    )
    with full:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(f"save_model {directory} start")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "variables", variables)
            ckptr.wait_until_finished()
        if is_primary():
            write_json_atomic(tmp / MODEL_FILE, meta)
    if is_primary():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    barrier(f"save_model {directory} done")


def _finish_interrupted_save(directory: Path) -> None:
    """A save killed between its two renames left no ``directory`` but a complete
    ``.partial`` (the new model) or ``.old`` (the previous one): put it back."""
    if directory.exists():
        return
    for suffix in (".partial", ".old"):
        candidate = directory.with_name(directory.name + suffix)
        if (candidate / MODEL_FILE).is_file():
            log.warning("finishing an interrupted save: %s -> %s", candidate, directory)
            os.replace(candidate, directory)
            return


def has_model(directory) -> bool:
    directory = Path(directory).absolute()
    if is_primary():
        _finish_interrupted_save(directory)
    barrier(f"has_model {directory}")  # every process then sees the same directory
    return (directory / MODEL_FILE).is_file()


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
