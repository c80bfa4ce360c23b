"""Orbax checkpoints: model checkpoints (teachers, exported students, ported weights) and the
training state of a run (latest few, resumable).

A model checkpoint is a directory holding `variables/` (an orbax checkpoint of
``{'params', 'batch_stats'}``) and `model.json` (architecture, class count, width, stem, class
names). `model.json` is written last and atomically, so a directory without it is an
interrupted save and is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cka_jax.distributed import barrier, is_primary
from cka_jax.files import write_json_atomic
from cka_jax.models import create_model

MODEL_FILE = "model.json"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit what the config asks for."""


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
    if is_primary():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(f"save_model {directory} start")
    variables = jax.device_get(
        {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    )
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "variables", variables)
        ckptr.wait_until_finished()
    if is_primary():
        write_json_atomic(tmp / MODEL_FILE, meta)
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


def state_digest(state) -> str:
    """SHA-256 of every array of ``state`` (paths, dtypes, shapes and bytes): orbax does
    not checksum array data, so a flipped byte would otherwise load silently."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


DIGEST_KEY = "_state_sha256"


class RunCheckpoints:
    """The training state of one run: saved every N steps and at the end, latest few kept.

    Saves are atomic (orbax writes a temporary directory and renames it when complete), so
    a process killed mid-save leaves no checkpoint that could be loaded half-written.
    Restoring walks back from the newest step: a checkpoint that fails to load (truncated,
    corrupted, or whose arrays no longer match the digest saved with them) is skipped with
    a warning naming it, and the previous one is used.
    """

    def __init__(self, directory, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state, meta: dict) -> None:
        state = jax.device_get(state)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({**meta, DIGEST_KEY: state_digest(state)}),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore_latest(self, template):
        """Returns ``(state, meta)`` of the newest loadable checkpoint, or None.

        Unreadable checkpoints newer than it are renamed ``<step>.unreadable`` (kept for
        inspection) so that the resumed run can save those steps again."""
        unreadable = []
        try:
            return self._restore_newest_good(template, unreadable)
        finally:
            if unreadable:
                self._set_aside(unreadable)

    def _set_aside(self, steps) -> None:
        if is_primary():
            for step in steps:
                bad = self.directory / str(step)
                aside = self.directory / f"{step}.unreadable"
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(bad, aside)
        barrier(f"checkpoints {self.directory} set aside")
        self.manager.reload()

    def _restore_newest_good(self, template, unreadable: list):
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(jax.tree.map(np.asarray, template)),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                meta = dict(restored["meta"])
                saved_digest = meta.pop(DIGEST_KEY, None)
                if saved_digest is not None and saved_digest != state_digest(restored["state"]):
                    raise CheckpointError("its arrays do not match the digest saved with them")
            except Exception as err:  # noqa: BLE001 - any failure means "not loadable"
                log.warning(
                    "checkpoint %s is unreadable (%s: %s); trying the previous one",
                    self.directory / str(step),
                    type(err).__name__,
                    err,
                )
                unreadable.append(step)
                continue
            return restored["state"], meta
        return None

    def close(self) -> None:
        self.manager.close()
