"""The main job: config -> data -> tasks -> teachers -> amalgamation -> evaluation -> report.

Every stage writes into the workdir and is skipped when its output is already there
(teacher checkpoints, each run's `result.json`), and each training run resumes from its own
checkpoints, so re-running a killed command picks up where it stopped.

Workdir layout:
  config.json, tasks.json     what ran: the config and the tasks' classes
  lock.json                   the run using the workdir now (pid, host, start, command)
  teachers/<task>/            teacher model checkpoints (`cka_jax.stages.teachers`)
  teachers/<task>.run/        its training run, with fingerprint.json: the fields it used
  runs/<method>/seed_<s>/     one student run (`cka_jax.stages.amalgamate`), with fingerprint.json
  student/                    the exported amalgamated student, with the union's class names
  results.json, results.md    the report (`cka_jax.stages.report`)
  timing.json                 where this invocation's time went (`cka_jax.infra.timing`)
"""

from __future__ import annotations

import json
import logging

from cka_jax.config import resolve_method, validate
from cka_jax.infra import timing
from cka_jax.infra.distributed import is_primary
from cka_jax.infra.progress import JobProgress
from cka_jax.infra.workdir import WorkdirLock, prepare_workdir
from cka_jax.methods import build_method
from cka_jax.stages import calibrate, report, selection, teachers
from cka_jax.stages.amalgamate import train_student
from cka_jax.stages.fingerprints import check_stages
from cka_jax.stages.inputs import prepare_data
from cka_jax.train.students import student_kind

log = logging.getLogger(__name__)


def run(cfg, workdir, discard_stale: bool = False) -> str:
    """Runs the whole experiment; returns the results table (markdown). One run at a time
    uses a workdir (`WorkdirLock`), and stages another config produced there are refused
    before any work, or with ``discard_stale`` deleted and rerun (`check_stages`)."""
    validate(cfg)
    workdir = prepare_workdir(workdir)
    with WorkdirLock(workdir), timing.Timing().active() as job_timing:
        with timing.stage("checks"):  # a refused rerun leaves the workdir untouched
            check_stages(cfg, workdir, discard=discard_stale)
        try:
            return run_stages(cfg, workdir)
        finally:
            write_timing(job_timing, workdir)


def write_timing(job_timing: timing.Timing, workdir) -> None:
    """Writes ``timing.json`` and logs the breakdown (process 0), also after a failure."""
    if not is_primary():
        return
    breakdown = job_timing.write(workdir / "timing.json")
    for line in timing.breakdown_text(breakdown).splitlines():
        log.info("%s", line)


def run_stages(cfg, workdir) -> str:
    """The stages, in a locked workdir whose outputs all came from ``cfg``."""
    if is_primary():  # only now: config.json always describes the results
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    progress = JobProgress(students=len(cfg.methods) * len(cfg.seeds))
    # data -> tasks
    progress.stage("data: loading %s", " + ".join(c.name for c in [cfg.data, *cfg.union]))
    with timing.stage("data"):
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
    frozen, rows, calibrator = [], [], calibrate.NONE
    train, holdout = selection.split_holdout(cfg, dataset.train)
    if uses_teachers(cfg):
        progress.add("teacher", teachers.teacher_sources(cfg, taskset, workdir).count("train"))
        with timing.stage("teachers"):
            frozen = teachers.get_teachers(cfg, taskset, dataset, workdir, progress)
        if cfg.teacher_calibration != "none":
            progress.stage("teachers: fitting calibration %s", cfg.teacher_calibration)
        with timing.stage("calibration"):
            calibrator = calibrate.get_calibrator(cfg, frozen, train, workdir)
        progress.stage("teachers: scoring each alone and their ensemble on the test set")
        with timing.stage("teacher scores", "evaluation"):
            rows = report.teacher_rows(cfg, frozen, taskset, dataset, calibrator)
    else:
        log.info("no method in config.methods uses teachers: none trained or loaded")
    # amalgamation -> evaluation, one run per method and seed
    with timing.stage("selection", "selection"):
        rule = selection.make_selection(cfg, frozen, holdout, calibrator)
    with timing.stage("amalgamation"):
        label_free = amalgamate_all(
            cfg, frozen, taskset, dataset, workdir, rows, progress, (train, rule, calibrator)
        )
    # report
    progress.stage("report: exporting the student to %s", workdir / "student")
    with timing.stage("export"):
        chosen = report.export_student(workdir, label_free)
    paths = []
    if cfg.figures:
        progress.stage("report: drawing figures into %s", workdir / "figures")
        with timing.stage("figures", "figures"):
            paths = report.draw_figures(cfg, workdir, label_free, chosen, frozen, taskset, dataset)
    with timing.stage("report"):
        return report.write_report(workdir, rows, taskset.names, title=cfg.name, figure_paths=paths)


def amalgamate_all(cfg, frozen, taskset, dataset, workdir, rows, progress, fitted) -> list[dict]:
    """One student run per method and seed, each reported as it ends (``rows`` grows);
    returns the result rows of the label-free runs (the candidates for export). ``fitted``
    is ``(training images, selection rule, calibrator)``."""
    train, rule, calibrator = fitted
    label_free = []
    for name in cfg.methods:
        method = build_method(*resolve_method(cfg, name)[:2])
        for seed in cfg.seeds:
            finished = (workdir / "runs" / name / f"seed_{seed}" / "result.json").exists()
            doing = "finished before" if finished else "amalgamating"
            progress.start("student", f"student {name} seed {seed}: {doing}")
            row = train_student(
                cfg, name, seed, frozen, taskset, dataset, workdir, train, rule, calibrator
            )
            progress.finish(cached=finished)
            rows.extend(student_kind(method).report_rows(row))
            if not method.uses_labels:
                label_free.append(row)
            report.write_report(workdir, rows, taskset.names, title=cfg.name)
    return label_free


def uses_teachers(cfg) -> bool:
    """Whether any method of ``cfg.methods`` needs the teachers (the peer methods but
    mcl_okd_kd, and the supervised reference, train on labels alone). An empty
    ``config.methods`` is a teachers-only job: the teachers and their ensemble are scored,
    no student is trained (e.g. teachers shared by several student jobs)."""
    if not cfg.methods:
        return True
    return any(build_method(*resolve_method(cfg, n)[:2]).uses_teachers for n in cfg.methods)
