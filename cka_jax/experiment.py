"""The main job: config -> data -> tasks -> teachers -> amalgamation -> evaluation -> report.

Every stage writes into the workdir and is skipped when its output is already there
(teacher checkpoints, each run's `result.json`), and each training run resumes from its own
checkpoints, so re-running a killed command picks up where it stopped.

Workdir layout:
  config.json, tasks.json     what ran: the config and the tasks' classes
  teachers/<task>/            teacher model checkpoints (`cka_jax.teachers`)
  runs/<method>/seed_<s>/     one student run (`cka_jax.amalgamate`)
  student/                    the exported amalgamated student, with the union's class names
  results.json, results.md    the report (`cka_jax.report`)
"""

from __future__ import annotations

import json
import logging

from cka_jax import report, selection, teachers
from cka_jax.amalgamate import train_student
from cka_jax.config import resolve_method, validate
from cka_jax.data import load_source, split_classes, union_of_datasets
from cka_jax.distributed import is_primary
from cka_jax.methods import build_method
from cka_jax.train.students import student_kind
from cka_jax.workdir import prepare_workdir

log = logging.getLogger(__name__)


def run(cfg, workdir) -> str:
    """Runs the whole experiment; returns the results table (markdown)."""
    validate(cfg)
    workdir = prepare_workdir(workdir)
    if is_primary():
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    # data -> tasks
    taskset, dataset = prepare_data(cfg)
    if is_primary():
        (workdir / "tasks.json").write_text(json.dumps(taskset.to_dict(), indent=2))
    log.info(
        "data %s: %d train / %d test images, %d classes in %d tasks %s",
        dataset.name,
        len(dataset.train),
        len(dataset.test),
        taskset.num_classes,
        taskset.num_tasks,
        list(taskset.sizes),
    )
    # teachers (each alone, and their ensemble, are the report's first rows)
    frozen, rows = [], []
    if uses_teachers(cfg):
        frozen = teachers.get_teachers(cfg, taskset, dataset, workdir)
        rows = report.teacher_rows(cfg, frozen, taskset, dataset)
    else:
        log.info("no method in config.methods uses teachers: none trained or loaded")
    # amalgamation -> evaluation, one run per method and seed
    train, holdout = selection.split_holdout(cfg, dataset.train)
    rule = selection.make_selection(cfg, frozen, holdout)
    label_free = []
    for name in cfg.methods:
        method = build_method(*resolve_method(cfg, name)[:2])
        for seed in cfg.seeds:
            row = train_student(cfg, name, seed, frozen, taskset, dataset, workdir, train, rule)
            rows.extend(student_kind(method).report_rows(row))
            if not method.uses_labels:
                label_free.append(row)
            report.write_report(workdir, rows, taskset.names, title=cfg.name)
    # report
    report.export_student(workdir, label_free)
    return report.write_report(workdir, rows, taskset.names, title=cfg.name)


def prepare_data(cfg):
    """Returns ``(taskset, dataset)`` with union labels laid out in teacher order."""
    if cfg.union:
        datasets = [load_source(cfg.data)] + [load_source(c) for c in cfg.union]
        return union_of_datasets(datasets)
    dataset = load_source(cfg.data)
    class_lists = cfg.tasks.get("class_lists") or None
    try:
        return split_classes(
            dataset,
            None if class_lists else cfg.tasks.num_tasks,
            seed=cfg.tasks.seed,
            mode=cfg.tasks.mode,
            class_lists=class_lists,
        )
    except ValueError as err:
        raise ValueError(f"config.tasks does not give valid teacher tasks: {err}") from None


def uses_teachers(cfg) -> bool:
    """Whether any method of ``cfg.methods`` needs the teachers (the peer methods but
    mcl_okd_kd, and the supervised reference, train on labels alone)."""
    return any(build_method(*resolve_method(cfg, n)[:2]).uses_teachers for n in cfg.methods)
