"""What produced each stage of a workdir: ``fingerprint.json``.

Each stage records the config fields its numbers depend on (`teacher_fingerprint`,
`run_fingerprint`); `check_stages` compares each stage already in a workdir with it and
refuses, or with ``discard`` deletes, the stages another config produced.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import ml_collections

from cka_jax.config import base_config, resolve_method, resolve_peers
from cka_jax.infra.distributed import barrier
from cka_jax.infra.files import write_json_atomic
from cka_jax.infra.version import code_version, describe
from cka_jax.infra.workdir import WorkdirError
from cka_jax.methods import build_method

log = logging.getLogger(__name__)


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
    "parallelism",  # mesh, pmap and single compute the same step
)
# How a stage ran rather than what it computes: recorded, and a change is a note, not stale.
EXECUTION = ("parallelism", "log_every", "checkpoint_every", "keep_checkpoints", "figures")


def execution_of(cfg) -> dict:
    """The execution-only settings of a run of ``cfg`` on this job's devices."""
    return {
        **{k: _plain(cfg[k]) for k in EXECUTION},
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }


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
    return {
        "stage": "teacher",
        "task": task,
        "task_index": int(t),
        "fields": fields,
        "code": code_version(),
        "execution": execution_of(cfg),
    }


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
    return {
        "stage": "run",
        "method": name,
        "seed": int(seed),
        "fields": fields,
        "code": code_version(),
        "execution": execution_of(cfg),
    }


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


def _note_kept(workdir: Path, output: Path, record: dict, new: dict) -> None:
    """Warnings for a stage that is kept (its fields agree) but ran differently: each
    execution-only setting that changed (its numbers do not), and other code (a table that
    would mix two versions)."""
    where = output.relative_to(workdir)
    old_run, new_run = record.get("execution") or {}, new.get("execution") or {}
    changed = [f"{k}: {old_run[k]} -> {v}" for k, v in new_run.items() if old_run.get(k, v) != v]
    if changed:
        log.warning(
            "workdir: %s ran with other execution settings (%s); kept: they do not change "
            "its numbers",
            where,
            "; ".join(changed),
        )
    if record.get("code") and record["code"] != new.get("code"):
        log.warning(
            "workdir: %s was produced by %s, this run is %s: its numbers and the new ones "
            "in one table come from different code",
            where,
            describe(record["code"]),
            describe(new["code"]),
        )


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
            continue
        _note_kept(workdir, outputs[0], record, new)
        if not path.exists():
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
