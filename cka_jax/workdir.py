"""The workdir: where an experiment writes everything, checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

import jax


class WorkdirError(OSError):
    """The workdir cannot be created, read or written."""


def prepare_workdir(workdir) -> Path:
    """Creates ``workdir`` and checks, before any work, that files can be written and read
    back there."""
    workdir = Path(workdir).expanduser().absolute()
    probe = workdir / f".write_test.{os.getpid()}.{jax.process_index()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        readable = probe.read_text() == "ok"
        probe.unlink()
        os.listdir(workdir)
    except (FileExistsError, NotADirectoryError):
        culprit = next(p for p in (workdir, *workdir.parents) if p.exists())
        raise WorkdirError(
            f"workdir {workdir} cannot be a directory: {culprit} is a file; "
            "choose another --workdir"
        ) from None
    except OSError as err:
        raise WorkdirError(
            f"workdir {workdir} is not usable ({err.strerror}: {err.filename}); fix its "
            "permissions or choose another --workdir"
        ) from None
    if not readable:
        raise WorkdirError(f"workdir {workdir}: a file written there did not read back")
    return workdir
