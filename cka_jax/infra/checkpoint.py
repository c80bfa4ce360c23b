"""Orbax checkpoints of a run's training state (latest few, resumable, checksummed), and the
errors and disk-full handling every checkpoint write shares (model checkpoints, which build
a model, are `cka_jax.models.storage`)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from cka_jax.infra.distributed import barrier, is_primary
from cka_jax.infra.files import disk_full_message, is_disk_full

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit what the config asks for."""


class DiskFullError(CheckpointError):
    """A checkpoint or model could not be written: no space left on its disk (or the quota
    is spent). What was there before is kept; the message names the path and the space
    needed."""


def tree_nbytes(tree) -> int:
    """The bytes of every array of ``tree``: about what writing it needs on disk."""
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


class _DropDiskFullRecords(logging.Filter):
    """Orbax logs a failed write from each of its threads, with a traceback each (about
    400 lines for one full disk); `DiskFullError` says it once."""

    def filter(self, record):
        err = record.exc_info[1] if record.exc_info else Exception(record.getMessage())
        return not is_disk_full(err)


def _drop_closed_loop_reports() -> None:
    """After an orbax write fails, tensorstore still completes the writes that were in
    flight and hands each result to the asyncio loop orbax has closed meanwhile; each
    reports 'Event loop is closed' as an unraisable exception, dozens of tracebacks printed
    after the error was handled. From the first write on, those reports (only them) are
    dropped: installed before any write can fail, the filter cannot miss one."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop", False):
        return

    def hook(unraisable):
        err = unraisable.exc_value
        if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def disk_full_as_error(what: str, path: Path, needed: int, kept: str, cleanup=None):
    """Turns a write that finds no space into `DiskFullError` (after ``cleanup()``, which
    removes the partial write so the space it took is free again)."""
    _drop_closed_loop_reports()
    # The failed writes' futures are collected later, and asyncio reports each then ("Future
    # exception was never retrieved"): dropped for good, not only inside this block.
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropDiskFullRecords) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropDiskFullRecords())
    absl_logger = logging.getLogger("absl")
    drop = _DropDiskFullRecords()
    absl_logger.addFilter(drop)
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        if cleanup is not None:
            cleanup()
        raise DiskFullError(disk_full_message(what, path, needed, kept)) from err
    finally:
        absl_logger.removeFilter(drop)


def remove_partial_write(path: Path, settle_s: float = 0.2, limit_s: float = 10.0) -> None:
    """Deletes a partial write (process 0; the files are shared). A failed orbax save
    returns while tensorstore still finishes the writes in flight, which recreate their
    directories: deleted again until it stays gone for ``settle_s``."""
    if not is_primary():
        return
    deadline = time.monotonic() + limit_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle_s)
        if not path.exists() or time.monotonic() > deadline:
            return


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
        """Writes step ``step``; a disk without space for it is a `DiskFullError` (the
        partial write removed, the checkpoints before it intact)."""
        state = jax.device_get(state)
        full = disk_full_as_error(
            f"the checkpoint of step {step}",
            self.directory / str(step),
            tree_nbytes(state),
            f"The checkpoints before it are intact in {self.directory}: the rerun resumes "
            "from the newest.",
            cleanup=lambda: self._remove_partial(step),
        )
        with full:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave({**meta, DIGEST_KEY: state_digest(state)}),
                ),
                force=True,
            )
            self.manager.wait_until_finished()

    def _remove_partial(self, step: int) -> None:
        """Deletes orbax's temporary directory of an unfinished save of ``step``."""
        for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            remove_partial_write(partial)

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
