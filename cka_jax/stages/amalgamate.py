"""The amalgamation stage: one method, one seed, one student trained through the one train
step, resumable, into ``runs/<method>/seed_<s>/`` (checkpoints/, selected/, metrics.jsonl,
tensorboard/, result.json, fingerprint.json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cka_jax.config import resolve_method
from cka_jax.evaluation import evaluate
from cka_jax.infra.distributed import barrier, is_primary
from cka_jax.infra.files import write_json_atomic
from cka_jax.methods import diagnostics
from cka_jax.models.build import model_meta, param_count
from cka_jax.stages.fingerprints import record_fingerprint, run_fingerprint
from cka_jax.train.loop import FitOptions, Keep, fit
from cka_jax.train.spec import student_run

log = logging.getLogger(__name__)


def train_student(
    cfg, name, seed, teachers, taskset, dataset, workdir: Path, train, selection, calibrator=None
):
    """Trains method (or variant) ``name`` with ``seed`` on the ``train`` images, resuming if
    interrupted; returns its result row (also ``result.json``; a finished run is read back).
    ``teachers`` are ``[(model, variables)]``, their union scores calibrated by
    ``calibrator`` (`cka_jax.stages.calibrate`); ``selection`` chooses the kept model."""
    run_dir = workdir / "runs" / name / f"seed_{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    # What this run's numbers depend on, recorded before any work (cka_jax.infra.workdir).
    record_fingerprint(run_dir, run_fingerprint(cfg, name, seed))
    base, _, student_cfg = resolve_method(cfg, name)
    total_steps = cfg.epochs * (len(train) // cfg.batch_size)
    spec, student_vars = student_run(
        cfg,
        name,
        taskset.num_classes,
        seed,
        [m for m, _ in teachers],
        total_steps,
        len(train),
        calibrator,
    )
    method, kind, student = spec.method, spec.kind, spec.student
    used = teachers if method.uses_teachers else []
    scorer = evaluate.Scorer(student, cfg.augment, cfg.eval_batch_size, kind.eval_logits)
    test = dataset.test
    selects = selection.applies(not method.uses_labels)
    meta = model_meta(
        student_cfg,
        taskset.num_classes,
        cfg.augment,
        taskset.class_names,
        method=name,
        seed=seed,
        source_image_size=int(dataset.image_shape[0]),
        source_channels=int(dataset.image_shape[2]),
    )
    result = fit(
        name=f"{name} seed {seed}",
        spec=spec,
        options=FitOptions.from_config(cfg),
        student_variables=student_vars,
        teacher_variables=[v for _, v in used],
        split=train,
        epochs=cfg.epochs,
        seed=seed,
        run_dir=run_dir,
        evaluate=lambda v: kind.scores(scorer.logits(v, test), test.labels, taskset),
        keep=Keep(
            directory=run_dir / "selected",
            meta=meta,
            select=selection.scorer(scorer) if selects else None,
            deploy=lambda v: kind.deploy(student, v),
        ),
    )
    row = result_row(name, base, seed, result, "final" if not selects else selection.criterion)
    row.update(kind.result_extras(student, student_vars, result.history[-1]))
    if is_primary():
        write_json_atomic(result_file, row)
    barrier(f"result {result_file}")
    return row


def result_row(name: str, base: str, seed: int, result, criterion: str) -> dict:
    """A run's result: the final student's accuracies (the last evaluation scored it), the
    kept model's selection, and the median gradient share of every term."""
    final = result.history[-1]
    kept = next(h for h in result.history if h["step"] == result.selected["step"])
    row = {
        "method": name,
        "base_method": base,
        "seed": int(seed),
        "merged_acc": final["merged_acc"],
        "task_acc": final["task_acc"],
        "routing_acc": final["routing_acc"],
        # The kept model, chosen without test labels; its test accuracy is only reported.
        "selection": {
            "criterion": criterion,
            "epoch": result.selected["epoch"],
            "score": result.selected["score"],
            "merged_acc": kept["merged_acc"],
        },
        "params": param_count(result.variables),
        "wall_s": round(result.wall_s, 1),
    }
    if result.diagnostics:
        row["grad_share_median"] = diagnostics.median_shares(result.diagnostics)
        log.info(
            "%s seed %d: median gradient share on the student: %s",
            name,
            seed,
            ", ".join(f"{k} {v:.3f}" for k, v in row["grad_share_median"].items()),
        )
    return row
