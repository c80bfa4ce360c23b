"""The workdir: where an experiment writes everything, checked before any work.

`prepare_workdir` checks that files can be written there; `WorkdirLock` (``lock.json``)
lets one run at a time use it. What produced each stage in it is
`cka_jax.stages.fingerprints`.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger(__name__)


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


# --- one run per workdir: lock.json -------------------------------------------------------

LOCK_FILE = "lock.json"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks)`` of a process from /proc (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], fields[19]


def _is_running(holder: dict) -> bool:
    """Whether the process that wrote lock record ``holder`` may still run: False only when
    it ran on this host and is gone (or its pid now belongs to a later process)."""
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(pid)
    if stat is not None and (stat[0] in ("Z", "X") or stat[1] != holder.get("pid_start", stat[1])):
        return False  # a zombie, or the pid was reused
    return True


class WorkdirLock:
    """One run per workdir: ``workdir/lock.json`` (pid, host, start time, command), created
    atomically (O_CREAT | O_EXCL) before any work and removed at exit, also on an error.

    A second run finds the file and stops with a `WorkdirError` naming the holder. A lock
    left by a process that no longer exists on this host (killed with SIGKILL, a crashed
    machine) is taken over with a warning. A job of several processes takes one lock:
    process 0 takes it and tells the others whether it could.
    """

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.record = None

    def __enter__(self):
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except WorkdirError as err:
                error = err
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not int(ok) and error is None:
                error = WorkdirError(
                    f"process 0 could not lock workdir {self.workdir} (its error says why)"
                )
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc_info):
        self.release()

    def _acquire(self) -> None:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
            "pid_start": (_proc_stat(os.getpid()) or ("", ""))[1],
            "token": uuid.uuid4().hex,
        }
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            self.record = record
            return
        raise WorkdirError(f"could not take the lock {self.path}: other runs keep taking it")

    def _read(self) -> dict | None:
        """The lock's record; None if it vanished. A record that stays unreadable for a
        second (a writer killed between creating and writing it) reads as a dead holder."""
        for _ in range(10):
            try:
                record = json.loads(self.path.read_text())
                if isinstance(record, dict):
                    return record
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        return {"pid": -1, "host": socket.gethostname(), "unreadable": True}

    def _take_over_if_stale(self) -> None:
        holder = self._read()
        if holder is None:
            return  # released meanwhile: try again
        if _is_running(holder):
            command = " ".join(str(holder.get("command")).split())
            command = command if len(command) <= 300 else command[:297] + "..."
            raise WorkdirError(
                f"workdir {self.workdir} is in use by another run: process {holder.get('pid')} "
                f"on {holder.get('host')}, started {holder.get('started')} "
                f"({command}); wait for it to end, or choose another --workdir. "
                f"If that process is gone (e.g. it ran on another host), delete {self.path}"
            )
        # Serialise take-overs (an flock on the workdir itself), and remove the lock only
        # if it is still the dead holder's: another newcomer may have replaced it already.
        fd = os.open(self.workdir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._read() == holder:
                self.path.unlink()
                log.warning(
                    "workdir: took over %s from process %s on %s (started %s), which no "
                    "longer runs",
                    self.path,
                    holder.get("pid"),
                    holder.get("host"),
                    holder.get("started", "?"),
                )
        finally:
            os.close(fd)  # releases the flock

    def release(self) -> None:
        """Removes the lock if it is still this run's."""
        if self.record is None:
            return
        try:
            if json.loads(self.path.read_text()).get("token") == self.record["token"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.record = None
