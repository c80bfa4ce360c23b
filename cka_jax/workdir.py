"""The workdir: where an experiment writes everything, checked before any work.

`prepare_workdir` checks that files can be written there; `WorkdirLock` (``lock.json``)
lets one run at a time use it; `check_stages` compares each stage already there with the
``fingerprint.json`` it recorded (the config fields its numbers depend on:
`teacher_fingerprint`, `run_fingerprint`) and refuses, or with ``discard`` deletes, the
stages another config produced.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

import jax
import ml_collections
import numpy as np

from cka_jax.config import base_config, resolve_method, resolve_peers
from cka_jax.distributed import barrier
from cka_jax.files import write_json_atomic
from cka_jax.methods import build_method

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


# --- what produced each stage: fingerprint.json -------------------------------------------

FINGERPRINT = "fingerprint.json"
# Config fields that cannot change any stage's numbers: a rerun may change them freely.
# Everything else counts, so a field added to the config later is compared by default.
IGNORABLE = (
    "name",  # the report's title
    "log_every",  # when metrics are fetched and per-term diagnostics logged
    "checkpoint_every",  # a resumed run ends bit-identical to an uninterrupted one
    "keep_checkpoints",
    "diagnostics",  # a separate jitted function; the train step is unchanged
    "figures",  # drawn from the finished runs
    "distributed",  # how the processes find each other
)
# Fields of a data source (`data`, each of `union`) that only say how its files are read.
IGNORABLE_SOURCE = ("cache", "cache_dir", "strict", "download")
# Read only when a label-free run's kept model is chosen by a score (selection.criterion
# other than 'final'); otherwise they change only the test curve's cadence in metrics.jsonl.
IGNORABLE_WHEN_FINAL = ("eval_every", "eval_batch_size", "selection.holdout_fraction")
# What only the students read: a teacher ignores them (besides IGNORABLE).
STUDENT_ONLY = (
    "student",
    "student_data_fraction",
    "teacher_calibration",  # fitted after the teachers, from their outputs
    "calibration_clusters_per_class",
    "methods",
    "variants",
    "seeds",
    "epochs",
    "optimizer",
    "loss",  # a teacher trains on cross-entropy alone
    "peers",
    "selection",
    "eval_every",
    "eval_batch_size",
)
# What only the teachers read: a run of a method without teachers ignores them.
TEACHER_ONLY = (
    "teacher",
    "teachers",
    "teacher_epochs",
    "teacher_optimizer",
    "teacher_data_fraction",
    "teacher_validation_fraction",
)


class StaleWorkdirError(WorkdirError):
    """The workdir holds stages that another config produced (the message lists the fields)."""


def _plain(value):
    """``value`` as JSON reads it back (tuples as lists), the form fingerprints compare in."""
    return json.loads(json.dumps(value, default=str))


def _flatten(tree, prefix="") -> dict:
    """``{'a.b': leaf}`` of nested dicts; a list of dicts (``union``) flattens by index."""
    out = {}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        items = ((str(i), x) for i, x in enumerate(tree))
    else:
        return {prefix[:-1]: tree}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _ignorable(path: str, cfg) -> bool:
    parts = path.split(".")
    if parts[0] in IGNORABLE:
        return True
    if parts[0] in ("data", "union") and parts[-1] in IGNORABLE_SOURCE:
        return True
    return cfg.selection.criterion == "final" and path in IGNORABLE_WHEN_FINAL


def _fields(cfg, drop, **resolved) -> dict:
    """The flat config fields of a stage: ``cfg`` without ``drop`` and the ignorable fields,
    with the ``resolved`` subtrees (e.g. a variant's loss) in place of the config's."""
    tree = {k: v for k, v in _plain(cfg.to_dict()).items() if k not in drop}
    tree.update(
        _plain({k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in resolved.items()})
    )
    return {k: v for k, v in sorted(_flatten(tree).items()) if not _ignorable(k, cfg)}


def teacher_model(cfg, t: int):
    """Task ``t``'s teacher model fields: ``config.teacher`` with ``config.teachers[t]``."""
    m = ml_collections.ConfigDict(cfg.teacher.to_dict())
    if t < len(cfg.teachers):
        m.update(dict(cfg.teachers[t]))
    return m


def teacher_fingerprint(cfg, t: int, task: str) -> dict:
    """What a teacher trained here (``teachers/<task>/``) depends on: the data, the tasks,
    the augmentation, its own model fields, its epochs, optimiser and data fraction, the
    batch size, dtype and parallelism: everything but `STUDENT_ONLY` and `IGNORABLE`."""
    fields = _fields(cfg, STUDENT_ONLY + ("teachers",), teacher=teacher_model(cfg, t))
    return {"stage": "teacher", "task": task, "task_index": int(t), "fields": fields}


def run_fingerprint(cfg, name: str, seed: int) -> dict:
    """What the student run ``runs/<name>/seed_<seed>/`` depends on: every field but
    `IGNORABLE` ones and the other methods, variants and seeds; its variant resolved (base
    method, loss, student, peers); the teachers' fields when the method uses teachers."""
    base, loss, student = resolve_method(cfg, name)
    drop = ("methods", "variants", "seeds")
    if not build_method(base, loss).uses_teachers:
        drop += TEACHER_ONLY
    fields = _fields(
        cfg,
        drop,
        method=base,
        seed=int(seed),
        loss=loss,
        student=student,
        peers=resolve_peers(cfg, name),
    )
    return {"stage": "run", "method": name, "seed": int(seed), "fields": fields}


def record_fingerprint(stage_dir: Path, fingerprint: dict) -> None:
    """Writes ``stage_dir/fingerprint.json`` before the stage's first work (process 0; a
    resumed stage keeps the one it has: the workdir check compared it)."""
    path = Path(stage_dir) / FINGERPRINT
    if jax.process_index() != 0 or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, fingerprint)


def _changes(old: dict, new: dict) -> list[str]:
    """``path: old -> new`` for each field that differs. A field the old record lacks (added
    to the config since) counts as unchanged when it has its default value; a field the
    config no longer has is not compared."""
    defaults = _flatten(_plain(base_config().to_dict()))
    out = []
    for path, value in new.items():
        if path in old:
            if old[path] != value:
                out.append(f"{path}: {json.dumps(old[path])} -> {json.dumps(value)}")
        elif path not in defaults or defaults[path] != value:
            out.append(f"{path}: (not recorded) -> {json.dumps(value)}")
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stages(cfg, workdir: Path):
    """``(outputs, fingerprint file, its fingerprint under cfg, config -> its fingerprint)``
    of every stage in ``workdir`` that ``cfg`` would use (the function reads a workdir's
    config.json where the stage predates fingerprint.json)."""
    methods_used = [resolve_method(cfg, n) for n in cfg.methods]
    if any(build_method(base, loss).uses_teachers for base, loss, _ in methods_used):
        tasks = _read_json(workdir / "tasks.json") or {}
        teachers_dir = workdir / "teachers"
        names = set()
        if teachers_dir.is_dir():
            for p in teachers_dir.iterdir():
                stem = (
                    p.name.rsplit(".", 1)[0]
                    if p.name.endswith((".run", ".partial", ".old"))
                    else p.name
                )
                names.add(stem)
        for task in sorted(names):
            record = _read_json(teachers_dir / f"{task}.run" / FINGERPRINT)
            if record is not None:
                t = int(record["task_index"])
            elif task in tasks.get("names", []):
                t = tasks["names"].index(task)
            else:
                log.warning(
                    "workdir: cannot tell which task teachers/%s was trained for; not checked", task
                )
                continue
            if teacher_model(cfg, t).checkpoint and not teacher_model(cfg, t).finetune:
                continue  # this config loads a frozen checkpoint instead
            outputs = [teachers_dir / f"{task}{s}" for s in ("", ".run", ".partial", ".old")]
            yield (
                outputs,
                teachers_dir / f"{task}.run" / FINGERPRINT,
                teacher_fingerprint(cfg, t, task),
                lambda c, t=t, task=task: teacher_fingerprint(c, t, task),
            )
    for name in cfg.methods:
        for seed in cfg.seeds:
            run_dir = workdir / "runs" / name / f"seed_{seed}"
            if run_dir.is_dir():
                yield (
                    [run_dir],
                    run_dir / FINGERPRINT,
                    run_fingerprint(cfg, name, seed),
                    lambda c, name=name, seed=seed: run_fingerprint(c, name, seed),
                )


def _old_config(workdir: Path):
    """The config.json of a workdir written before fingerprints, as a ConfigDict, or None."""
    data = _read_json(workdir / "config.json")
    if not isinstance(data, dict):
        return None
    try:
        return ml_collections.ConfigDict(data)
    except Exception:  # noqa: BLE001 - not a config we can read: treated as absent
        return None


def check_stages(cfg, workdir, discard: bool = False) -> list[Path]:
    """Compares, before any work, every stage already in ``workdir`` that ``cfg`` would use
    (each teacher trained here, each run of a method and seed of ``cfg``) with the
    fingerprint it recorded. A stage whose fields differ is an error listing each changed
    field (``path: old -> new``) and how to proceed, or with ``discard`` its outputs are
    deleted (only those, with the report and student/ built from them) so that it reruns.

    A stage written before fingerprints existed (no fingerprint.json) is compared with the
    workdir's config.json, and when they agree adopts that fingerprint; without a
    config.json it is adopted with a warning. Returns the deleted paths."""
    workdir = Path(workdir)
    old_cfg = None
    stale, adopt = [], []
    for outputs, path, new, of_config in _stages(cfg, workdir):
        record = _read_json(path)
        note = ""
        if record is None:
            if old_cfg is None:
                old_cfg = _old_config(workdir) or False
            try:
                record = of_config(old_cfg) if old_cfg else None
            except Exception:  # noqa: BLE001 - the old config does not describe this stage
                record = None
            if record is None:
                log.warning(
                    "workdir: %s has no %s and no config.json describes it (written by an "
                    "older version); assuming it came from this config",
                    outputs[0].relative_to(workdir),
                    FINGERPRINT,
                )
                adopt.append((path, new))
                continue
            note = " (recorded in config.json: it predates fingerprint.json)"
        changes = _changes(record.get("fields", {}), new["fields"])
        if changes:
            stale.append((outputs, note, changes))
        elif not path.exists():
            adopt.append((path, new))
    if stale and not discard:
        lines = [
            f"  {outputs[0].relative_to(workdir)}{note}: {'; '.join(changes)}"
            for outputs, note, changes in stale
        ]
        raise StaleWorkdirError(
            f"workdir {workdir} holds results of another config; these stages differ "
            "(field: theirs -> this run's):\n" + "\n".join(lines) + "\nTo keep them, "
            "rerun with their config (config.json) or choose a new --workdir; to delete "
            "these stages (only them) and rerun them with this config, add --discard_stale "
            "(experiment.run(..., discard_stale=True))."
        )
    deleted = []
    if stale:
        derived = [workdir / n for n in ("results.json", "results.md")]
        derived += [workdir / f"student{s}" for s in ("", ".partial", ".old")]
        targets = [p for outputs, _, _ in stale for p in outputs] + derived
        deleted = [p for p in targets if p.exists()]
        barrier("workdir check")  # every process has read the fingerprints
        if jax.process_index() == 0:
            for outputs, _, changes in stale:
                log.warning(
                    "workdir: discarding %s (%s)",
                    outputs[0].relative_to(workdir),
                    "; ".join(changes),
                )
            for p in deleted:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        barrier("workdir discard")
    for path, fingerprint in adopt:
        record_fingerprint(path.parent, fingerprint)
    return deleted


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
