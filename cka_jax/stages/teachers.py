"""The teachers' stage: one frozen teacher per task, loaded from a checkpoint the config
names, reloaded from this workdir, or trained here on its task's labels.

    teachers/<task>/        the teacher (model.json + variables), trained here or copied
    teachers/<task>.run/    its training run (checkpoints, metrics.jsonl, fingerprint.json)
"""

from __future__ import annotations

import logging
from pathlib import Path

import ml_collections
import numpy as np

from cka_jax import methods
from cka_jax.data import task_subset
from cka_jax.data.presets import IMAGENET_MEAN, IMAGENET_STD, eval_kwargs
from cka_jax.evaluation import evaluate
from cka_jax.infra import checkpoint
from cka_jax.infra.progress import JobProgress
from cka_jax.models import storage
from cka_jax.models.build import init_model, model_meta
from cka_jax.models.renormalized import Renormalized, renormalization
from cka_jax.stages.fingerprints import record_fingerprint, teacher_fingerprint
from cka_jax.train.loop import FitOptions, fit
from cka_jax.train.spec import compute_dtype, step_spec, view_shape

log = logging.getLogger(__name__)
_VALIDATION_STREAM = 4099  # seeds the teachers' held-out images apart from other draws


def teacher_model_configs(cfg, num_tasks: int) -> list[ml_collections.ConfigDict]:
    """Each task's teacher model fields: ``config.teacher`` with ``config.teachers[t]``."""
    if cfg.teachers and len(cfg.teachers) != num_tasks:
        raise ValueError(
            f"config.teachers lists {len(cfg.teachers)} teachers but the data has "
            f"{num_tasks} tasks; give one entry per task (or none to use config.teacher)"
        )
    out = []
    for t in range(num_tasks):
        m = ml_collections.ConfigDict(cfg.teacher.to_dict())
        if cfg.teachers:
            m.update(dict(cfg.teachers[t]))
        out.append(m)
    return out


def teacher_sources(cfg, taskset, workdir: Path) -> list[str]:
    """Where each task's teacher comes from: 'checkpoint' (named by the config), 'workdir'
    (trained here before) or 'train' (to train now)."""
    sources = []
    for name, m in zip(taskset.names, teacher_model_configs(cfg, taskset.num_tasks), strict=True):
        if m.checkpoint and not m.finetune:
            sources.append("checkpoint")
        elif storage.has_model(workdir / "teachers" / name):
            sources.append("workdir")
        else:
            sources.append("train")
    return sources


def get_teachers(cfg, taskset, dataset, workdir: Path, progress: JobProgress | None = None):
    """Returns ``[(model, variables)]`` in task order: a frozen checkpoint the config names,
    the teacher this workdir trained before, or one trained now on the task's labels."""
    progress = progress or JobProgress()
    teachers = []
    configs = teacher_model_configs(cfg, taskset.num_tasks)
    sources = teacher_sources(cfg, taskset, workdir)
    for t, (name, m, source) in enumerate(zip(taskset.names, configs, sources, strict=True)):
        task_classes = [taskset.class_names[c] for c in taskset.classes[t]]
        out_dir = workdir / "teachers" / name
        if source == "checkpoint":
            progress.stage("teacher %s: loading %s", name, m.checkpoint)
            model, variables, meta = storage.load_model(m.checkpoint, dtype=compute_dtype(cfg))
            check_teacher_fits(meta, m, cfg, t, name, len(task_classes))
            model = adapt_to_run(model, meta, cfg, name)
        elif source == "workdir":
            progress.stage("teacher %s: loading %s (trained before)", name, out_dir)
            model, variables, meta = storage.load_model(out_dir, dtype=compute_dtype(cfg))
        else:
            progress.start("teacher", f"teacher {name}: training")
            model, variables = train_teacher(cfg, m, taskset, dataset, t, out_dir)
            progress.finish()
        teachers.append((model, variables))
    return teachers


def adapt_to_run(model, meta: dict, cfg, task: str):
    """A checkpoint teacher as the run must call it: behind `Renormalized` when its stored
    mean/std differ from the run's; a warning naming both when its image size or crop
    differ (the views are shared by every model, so those cannot be matched per teacher)."""
    stored = meta.get("preprocess") or {}
    run = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **eval_kwargs(cfg.augment)}
    for key in ("out_size", "crop_fraction"):
        if key in stored and key in run and float(stored[key]) != float(run[key]):
            log.warning(
                "teacher %s was trained with %s=%s but this run feeds %s=%s "
                "(config.augment.%s); its accuracy may drop. Set config.augment.%s=%s to match",
                task,
                key,
                stored[key],
                key,
                run[key],
                key,
                key,
                stored[key],
            )
    if "mean" not in stored or "std" not in stored:
        return model
    c = int(cfg.augment.channels)
    pairs = [
        tuple(_channels(v, c)) for v in (run["mean"], run["std"], stored["mean"], stored["std"])
    ]
    if pairs[0] == pairs[2] and pairs[1] == pairs[3]:
        return model
    log.warning(
        "teacher %s was trained on inputs normalised with mean %s std %s; this run uses mean %s "
        "std %s: its inputs are renormalised to its own",
        task,
        pairs[2],
        pairs[3],
        pairs[0],
        pairs[1],
    )
    return Renormalized(model, *renormalization(*pairs))


def _channels(values, channels: int) -> list[float]:
    values = [float(v) for v in values]
    return (values * 3 if len(values) == 1 else values)[:channels]


def check_teacher_fits(meta: dict, m, cfg, t: int, task: str, num_classes: int) -> None:
    """A frozen teacher checkpoint must fit its task: its class count, the image channels,
    and any architecture field `config.teachers[t]` names explicitly."""
    where = f"teacher checkpoint {m.checkpoint} ({meta['arch']}, {meta['num_classes']} classes)"
    if meta["num_classes"] != num_classes:
        raise checkpoint.CheckpointError(
            f"{where} does not fit task '{task}', which has {num_classes} classes; "
            "give a checkpoint trained on that task's classes"
        )
    channels = meta.get("channels", 3)
    if channels != int(cfg.augment.channels):
        raise checkpoint.CheckpointError(
            f"{where} takes {channels}-channel images but task '{task}' feeds "
            f"{cfg.augment.channels}-channel ones; set config.augment.channels={channels}"
        )
    explicit = dict(cfg.teachers[t]) if cfg.teachers else {}
    for field in ("arch", "width", "stem"):
        if field in explicit and field in meta and explicit[field] != meta[field]:
            raise checkpoint.CheckpointError(
                f"{where} is a {field}={meta[field]!r} model but config.teachers[{t}] asks for "
                f"{field}={explicit[field]!r} for task '{task}'; drop that field (the "
                "checkpoint's model.json decides) or give a matching checkpoint"
            )


def per_class_fraction(split, fraction: float, seed: int):
    """The first ``ceil(fraction * n_c)`` images of each class in a seeded order."""
    if fraction >= 1:
        return split
    return split.per_class(lambda n: int(np.ceil(fraction * n)), seed)


def held_out_positions(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of the last ``floor(fraction * n_c)`` images of each class c in a
    seeded order: the images a teacher holds out of its training
    (`teacher_validation_fraction`)."""
    labels = np.asarray(labels)
    if fraction <= 0:
        return np.zeros(0, np.int64)
    # Another stream than the labelled subset's, so the two draws are independent.
    order = np.random.default_rng(seed + _VALIDATION_STREAM).permutation(len(labels))
    held = []
    for c in np.unique(labels):
        members = order[labels[order] == c]
        held.append(members[: int(np.floor(fraction * len(members)))])
    return np.sort(np.concatenate(held)).astype(np.int64)


def validation_split(split, fraction: float, seed: int):
    """``(train, held-out or None)`` of a teacher's labelled split (`held_out_positions`)."""
    if fraction <= 0:
        return split, None
    held = held_out_positions(split.labels, fraction, seed)
    return split.take(np.setdiff1d(np.arange(len(split)), held)), split.take(held)


def teacher_seed(cfg, t: int) -> int:
    return int(cfg.tasks.seed) + 1000 * (t + 1)


def validation_indices(cfg, taskset, train_labels, t: int) -> np.ndarray:
    """Indices into the union training split of the images teacher ``t`` held out of its
    training (empty without `teacher_validation_fraction`): images no teacher trained on."""
    members = np.flatnonzero(taskset.task_of(train_labels) == t)
    local = taskset.local_id(np.asarray(train_labels)[members])
    seed = teacher_seed(cfg, t)
    if cfg.teacher_data_fraction < 1:  # the labelled subset `per_class_fraction` keeps
        order = np.random.default_rng(seed).permutation(len(members))
        keep = []
        for c in np.unique(local):
            in_class = order[local[order] == c]
            keep.append(in_class[: int(np.ceil(cfg.teacher_data_fraction * len(in_class)))])
        kept = np.sort(np.concatenate(keep))
        members, local = members[kept], local[kept]
    return members[held_out_positions(local, cfg.teacher_validation_fraction, seed)]


def train_teacher(cfg, m, taskset, dataset, t, out_dir: Path):
    name = taskset.names[t]
    # What this teacher's numbers depend on, recorded before any work (cka_jax.infra.workdir).
    record_fingerprint(out_dir.with_name(name + ".run"), teacher_fingerprint(cfg, t, name))
    num_classes = taskset.sizes[t]
    seed = teacher_seed(cfg, t)
    model, variables = init_model(
        m, num_classes, seed, view_shape(cfg.augment), "teacher", compute_dtype(cfg)
    )
    train_split, val_split = validation_split(
        per_class_fraction(task_subset(dataset.train, taskset, t), cfg.teacher_data_fraction, seed),
        cfg.teacher_validation_fraction,
        seed,
    )
    test_split = task_subset(dataset.test, taskset, t)
    total_steps = cfg.teacher_epochs * (len(train_split) // cfg.batch_size)
    method = methods.build_method("supervised", cfg.loss)
    spec = step_spec(cfg, method, cfg.loss, model, (), cfg.teacher_optimizer, total_steps)
    scorer = evaluate.Scorer(model, cfg.augment, cfg.eval_batch_size)

    def accuracy(v, split):
        return float(np.mean(np.argmax(scorer.logits(v, split), -1) == split.labels) * 100)

    def score(v):
        scores = {"acc": accuracy(v, test_split)}
        if val_split is not None:
            scores["val_acc"] = accuracy(v, val_split)
        return scores

    result = fit(
        name=f"teacher {name}",
        spec=spec,
        options=FitOptions.from_config(cfg),
        student_variables=variables,
        teacher_variables=[],
        split=train_split,
        epochs=cfg.teacher_epochs,
        seed=seed,
        run_dir=out_dir.with_name(name + ".run"),
        evaluate=score,
    )
    task_classes = [taskset.class_names[c] for c in taskset.classes[t]]
    meta = model_meta(m, num_classes, cfg.augment, task_classes, task=name)
    storage.save_model(out_dir, result.variables, meta)
    return model, result.variables
