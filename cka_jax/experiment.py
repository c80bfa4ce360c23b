"""The main job: config -> data -> tasks -> teachers -> amalgamation -> evaluation -> report.

Every stage writes into the workdir and is skipped when its output is already there
(teacher checkpoints, each run's `result.json`), and each training run resumes from its own
checkpoints, so re-running a killed command picks up where it stopped.

Workdir layout:
  teachers/<task>/            teacher model checkpoints (trained here or copied from config)
  runs/<method>/seed_<s>/     checkpoints/, selected/, metrics.jsonl, tensorboard/, result.json
  student/                    the exported amalgamated student, with the union's class names
  results.json, results.md    the report
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cka_jax import checkpoint, diagnostics, evaluate, report
from cka_jax.config import resolve_method, resolve_peers, validate
from cka_jax.data import (
    Split,
    augment_with_keys,
    eval_kwargs,
    eval_preprocess,
    load_source,
    split_classes,
    task_subset,
    train_kwargs,
    union_of_datasets,
)
from cka_jax.distributed import barrier, is_primary
from cka_jax.models import PeerNetworks, create_model, init_variables
from cka_jax.train import methods
from cka_jax.train.loop import fit
from cka_jax.train.step import StepSpec, build_heads, make_optimizer

log = logging.getLogger(__name__)


def param_count(variables) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


# --- data ---------------------------------------------------------------------------------


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


def make_augment(aug_cfg):
    """The training augmentation of ``aug_cfg``: one function per distinct config, so that
    equal StepSpecs (another seed, another run in this process) share compiled steps."""
    return _augment(ml_collections.FrozenConfigDict(aug_cfg))


@functools.cache
def _augment(aug_cfg):
    kwargs = train_kwargs(aug_cfg)
    return lambda keys, images: augment_with_keys(keys, images, **kwargs)


def make_preprocess(aug_cfg):
    return functools.partial(eval_preprocess, **eval_kwargs(aug_cfg))


def view_shape(aug_cfg):
    return (int(aug_cfg.out_size), int(aug_cfg.out_size), int(aug_cfg.channels))


class Scorer:
    """Jitted eval-mode forward passes of one model over a test split (compiled once)."""

    def __init__(self, model, aug_cfg, batch_size):
        self.forward = _eval_forward(model, ml_collections.FrozenConfigDict(aug_cfg))
        self.batch_size = batch_size

    def logits(self, variables, split) -> np.ndarray:
        return evaluate.predict(self.forward, variables, split, self.batch_size)


@functools.cache
def _eval_forward(model, aug_cfg):
    preprocess = make_preprocess(aug_cfg)

    def forward(variables, images):
        logits = model.apply(variables, preprocess(images))[0]
        # Peer networks: (M, B, C) -> (B, M, C), batch first like every other output.
        return jnp.moveaxis(logits, 0, 1) if isinstance(model, PeerNetworks) else logits

    return jax.jit(forward)


# --- teachers -----------------------------------------------------------------------------


def teacher_model_configs(cfg, num_tasks: int) -> list[ml_collections.ConfigDict]:
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


def model_meta(m, num_classes, aug_cfg, class_names, **extra) -> dict:
    return {
        "arch": m.arch,
        "num_classes": int(num_classes),
        "width": int(m.width),
        "stem": m.stem,
        "channels": int(aug_cfg.channels),
        "image_size": int(aug_cfg.out_size),
        "class_names": list(class_names),
        "preprocess": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in eval_kwargs(aug_cfg).items()
        },
        **extra,
    }


def get_teachers(cfg, taskset, dataset, workdir: Path):
    """Returns ``[(model, variables)]`` in task order: loaded, or trained on the task."""
    teachers = []
    for t, (name, m) in enumerate(
        zip(taskset.names, teacher_model_configs(cfg, taskset.num_tasks), strict=True)
    ):
        task_classes = [taskset.class_names[c] for c in taskset.classes[t]]
        out_dir = workdir / "teachers" / name
        if m.checkpoint and not m.finetune:
            model, variables, meta = checkpoint.load_model(m.checkpoint, dtype=compute_dtype(cfg))
            check_teacher_fits(meta, m, cfg, t, name, len(task_classes))
        elif checkpoint.has_model(out_dir):
            model, variables, meta = checkpoint.load_model(out_dir, dtype=compute_dtype(cfg))
        else:
            model, variables = train_teacher(cfg, m, taskset, dataset, t, out_dir)
        teachers.append((model, variables))
    return teachers


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


def train_teacher(cfg, m, taskset, dataset, t, out_dir: Path):
    name = taskset.names[t]
    num_classes = taskset.sizes[t]
    seed = int(cfg.tasks.seed) + 1000 * (t + 1)
    model, variables = init_model(m, num_classes, seed, cfg.augment, "teacher", compute_dtype(cfg))
    train_split = per_class_fraction(
        task_subset(dataset.train, taskset, t), cfg.teacher_data_fraction, seed
    )
    test_split = task_subset(dataset.test, taskset, t)
    total_steps = cfg.teacher_epochs * (len(train_split) // cfg.batch_size)
    method = methods.build_method("supervised", cfg.loss)
    spec = step_spec(cfg, method, cfg.loss, model, (), cfg.teacher_optimizer, total_steps)
    scorer = Scorer(model, cfg.augment, cfg.eval_batch_size)

    def score(v):
        logits = scorer.logits(v, test_split)
        return {"acc": float(np.mean(np.argmax(logits, -1) == test_split.labels) * 100)}

    result = fit(
        name=f"teacher {name}",
        spec=spec,
        parallelism=cfg.parallelism,
        student_variables=variables,
        teacher_variables=[],
        split=train_split,
        batch_size=cfg.batch_size,
        epochs=cfg.teacher_epochs,
        seed=seed,
        run_dir=out_dir.with_name(name + ".run"),
        evaluate=score,
        eval_every=cfg.eval_every,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
    )
    task_classes = [taskset.class_names[c] for c in taskset.classes[t]]
    meta = model_meta(m, num_classes, cfg.augment, task_classes, task=name)
    checkpoint.save_model(out_dir, result.variables, meta)
    return model, result.variables


# --- amalgamation -------------------------------------------------------------------------


def step_spec(
    cfg, method, loss_cfg, student, teacher_models, optimizer_cfg, total_steps, num_data=0
):
    """The `StepSpec` of one training run: the same for teachers, every method and the
    benchmark (scripts/benchmark.py times exactly this step)."""
    return StepSpec(
        student=student,
        teachers=tuple(teacher_models),
        heads=build_heads(method, tuple(teacher_models), dtype=compute_dtype(cfg)),
        method=method,
        loss_cfg=ml_collections.FrozenConfigDict(loss_cfg),
        augment=make_augment(cfg.augment),
        view_shape=view_shape(cfg.augment),
        tx=make_optimizer(optimizer_cfg.learning_rate, optimizer_cfg.weight_decay, total_steps),
        num_data=int(num_data),
    )


def compute_dtype(cfg):
    return jnp.dtype(cfg.get("compute_dtype", "float32"))


def init_model(m, num_classes: int, seed: int, aug_cfg, what: str, dtype=jnp.float32):
    """A fresh model, or one starting from ``m.checkpoint`` (a new classifier when the
    checkpoint's class count differs, e.g. an ImageNet backbone)."""
    model = create_model(m.arch, num_classes, stem=m.stem, width=m.width, dtype=dtype)
    variables = init_variables(model, seed, (1, *view_shape(aug_cfg)))
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    if m.checkpoint:
        _, loaded, meta = checkpoint.load_model(m.checkpoint)
        if meta["arch"] != m.arch:
            raise checkpoint.CheckpointError(
                f"{what} checkpoint {m.checkpoint} is a {meta['arch']}, but the config asks "
                f"for a {m.arch}: set the {what}'s arch to {meta['arch']!r}"
            )
        fresh_fc = variables["params"]["fc"]
        variables = jax.tree.map(np.asarray, dict(loaded))
        variables["params"] = dict(variables["params"])
        if meta["num_classes"] != num_classes:
            variables["params"]["fc"] = fresh_fc
    return model, variables


def peer_networks(cfg, method_name: str, m, num_classes: int, seed: int):
    """MCL-OKD's `PeerNetworks` of ``config.peers.num_peers`` copies of the student model
    ``m`` (sharing ``config.peers.shared_stages`` stages; a variant may change both),
    initialised from ``seed`` (each peer independently)."""
    peers = resolve_peers(cfg, method_name)
    peer = create_model(m.arch, num_classes, stem=m.stem, width=m.width, dtype=compute_dtype(cfg))
    model = PeerNetworks(
        peer,
        num_peers=int(peers.num_peers),
        embed_dim=int(peers.embed_dim),
        shared_stages=int(peers.shared_stages),
    )
    variables = init_variables(model, seed, (1, *view_shape(cfg.augment)))
    return model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def peer_scores(logits: np.ndarray, labels, taskset) -> dict:
    """The leader's (the last peer's) accuracies, and under 'ensemble' those of the naive
    ensemble of all peers (mean logits, MCL-OKD Eq. 4). ``logits`` (N, M, C)."""
    result = evaluate.accuracies(logits[:, -1], labels, taskset)
    result["ensemble"] = evaluate.accuracies(logits.mean(axis=1), labels, taskset)
    return result


def report_rows(row: dict) -> list[dict]:
    """A run's report rows: one, or for peer methods the leader's and the ensemble's."""
    if "ensemble" not in row:
        return [row]
    ensemble = {**row, **row["ensemble"], "method": f"{row['method']}:ensemble"}
    ensemble["params"] = row["ensemble_params"]
    ensemble["selection"] = None  # only the leader is kept
    del ensemble["ensemble"], ensemble["ensemble_params"]
    return [row, ensemble]


_HOLDOUT_STREAM = 7919  # seeds the held-out images apart from every other draw


@dataclasses.dataclass
class Selection:
    """How a run's kept model is chosen, without test labels: the final one, or the best by
    agreement with the teachers' union argmax on held-out unlabelled training images."""

    criterion: str
    holdout: Split | None = None
    teacher_logits: list | None = None  # the teachers' logits on ``holdout``

    def applies(self, label_free: bool) -> bool:
        """Labelled methods (supervised, the peer methods) keep their final model."""
        return self.criterion != "final" and label_free

    def scorer(self, scorer: Scorer):
        """``variables -> agreement (%)`` on the held-out images, for `fit`'s ``select``."""
        return lambda v: evaluate.agreement(scorer.logits(v, self.holdout), self.teacher_logits)


def selection_split(cfg, train: Split) -> tuple[Split, Split | None]:
    """``(student training images, held-out images)``: with the criterion
    'teacher_agreement', ``selection.holdout_fraction`` of the training images (a seeded
    draw shared by every method and seed of the experiment) are kept out of every student's
    training for model selection; their labels are never read."""
    if cfg.selection.criterion == "final":
        return train, None
    order = np.random.default_rng(int(cfg.tasks.seed) + _HOLDOUT_STREAM).permutation(len(train))
    k = int(round(cfg.selection.holdout_fraction * len(train)))
    return train.take(np.sort(order[k:])), train.take(np.sort(order[:k]))


def make_selection(cfg, teachers, holdout: Split | None) -> Selection:
    if holdout is None or not teachers:
        return Selection("final")
    logits = [
        Scorer(model, cfg.augment, cfg.eval_batch_size).logits(variables, holdout)
        for model, variables in teachers
    ]
    return Selection(cfg.selection.criterion, holdout, logits)


def run_method(
    cfg, method_name, seed, teachers, taskset, dataset, workdir: Path, train, selection
) -> dict:
    """Trains one method with one seed on ``train`` (resuming if interrupted); returns its
    result row (`report_rows` gives the report's rows of it)."""
    run_dir = workdir / "runs" / method_name / f"seed_{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    base_method, loss_cfg, student_cfg = resolve_method(cfg, method_name)
    method = methods.build_method(base_method, loss_cfg)
    if method.peers:
        student, student_vars = peer_networks(
            cfg, method_name, student_cfg, taskset.num_classes, seed
        )
        deploy = student.leader_variables
    else:
        student, student_vars = init_model(
            student_cfg, taskset.num_classes, seed, cfg.augment, "student", compute_dtype(cfg)
        )
        deploy = None
    teacher_models = tuple(m for m, _ in teachers) if method.uses_teachers else ()
    teacher_vars = [v for _, v in teachers] if method.uses_teachers else []
    total_steps = cfg.epochs * (len(train) // cfg.batch_size)
    spec = step_spec(
        cfg, method, loss_cfg, student, teacher_models, cfg.optimizer, total_steps,
        num_data=len(train),
    )  # fmt: skip
    scorer = Scorer(student, cfg.augment, cfg.eval_batch_size)
    test = dataset.test

    scores = peer_scores if method.peers else evaluate.accuracies

    def score(v):
        return scores(scorer.logits(v, test), test.labels, taskset)

    meta = model_meta(
        student_cfg, taskset.num_classes, cfg.augment, taskset.class_names,
        method=method_name, seed=seed, source_image_size=int(dataset.image_shape[0]),
        source_channels=int(dataset.image_shape[2]),
    )  # fmt: skip
    selects = selection.applies(not methods.uses_labels(base_method))
    result = fit(
        name=f"{method_name} seed {seed}",
        spec=spec,
        parallelism=cfg.parallelism,
        student_variables=student_vars,
        teacher_variables=teacher_vars,
        split=train,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        seed=seed,
        run_dir=run_dir,
        evaluate=score,
        eval_every=cfg.eval_every,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        selected_dir=run_dir / "selected",
        selected_meta=meta,
        select=selection.scorer(scorer) if selects else None,
        deploy=deploy,
        # A single term's share is 1 by construction: nothing to diagnose.
        diagnose_every=cfg.log_every if cfg.diagnostics and len(method.weights) > 1 else 0,
    )
    # The last epoch-end evaluation scored the final student already.
    final = result.history[-1]
    kept = next(h for h in result.history if h["step"] == result.selected["step"])
    row = {
        "method": method_name,
        "base_method": base_method,
        "seed": int(seed),
        "merged_acc": final["merged_acc"],
        "task_acc": final["task_acc"],
        "routing_acc": final["routing_acc"],
        # The kept model, chosen without test labels; its test accuracy is only reported.
        "selection": {
            "criterion": selection.criterion if selects else "final",
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
            "%s seed %d: median gradient share on the student: %s", method_name, seed,
            ", ".join(f"{k} {v:.3f}" for k, v in row["grad_share_median"].items()),
        )  # fmt: skip
    if method.peers:
        row["ensemble"] = final["ensemble"]
        # Every peer's network (a shared trunk once), without the embeddings used in training.
        networks = {k: v for k, v in student_vars["params"].items() if not k.startswith("embed")}
        row["ensemble_params"] = param_count({"params": networks})
    if is_primary():
        checkpoint.write_json_atomic(result_file, row)
    barrier(f"result {result_file}")
    return row


def export_student(workdir: Path, rows: list[dict]) -> None:
    """Copies one amalgamated (label-free) student to workdir/student/: the best by the
    label-free selection score when the runs have one, else the first label-free method of
    ``config.methods`` with its first seed. Test accuracy plays no part."""
    candidates = [
        r for r in rows
        if r.get("selection") is not None
        and not methods.uses_labels(r.get("base_method", r["method"]))
    ]  # fmt: skip
    if not candidates:
        return
    scored = [r for r in candidates if r["selection"]["score"] is not None]
    best = max(scored, key=lambda r: r["selection"]["score"]) if scored else candidates[0]
    src = workdir / "runs" / best["method"] / f"seed_{best['seed']}" / "selected"
    model, variables, meta = checkpoint.load_model(src)
    checkpoint.save_model(workdir / "student", variables, meta)


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


def uses_teachers(cfg) -> bool:
    """Whether any method of ``cfg.methods`` needs the teachers (the peer methods but
    mcl_okd_kd, and the supervised reference, train on labels alone)."""
    for name in cfg.methods:
        base, loss_cfg, _ = resolve_method(cfg, name)
        if methods.build_method(base, loss_cfg).uses_teachers:
            return True
    return False


def teacher_report_rows(cfg, teachers, taskset, dataset) -> list[dict]:
    """The report's rows for each teacher alone and for their ensemble."""
    teacher_logits = [
        Scorer(model, cfg.augment, cfg.eval_batch_size).logits(variables, dataset.test)
        for model, variables in teachers
    ]
    rows = evaluate.teacher_rows(teacher_logits, dataset.test.labels, taskset)
    counts = [param_count(v) for _, v in teachers]
    for row, n in zip(rows, [*counts, sum(counts)], strict=True):
        row.update(seed=None, params=n)
    return rows


def run(cfg, workdir) -> str:
    """Runs the whole experiment; returns the results table (markdown)."""
    validate(cfg)
    workdir = prepare_workdir(workdir)
    if is_primary():
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    taskset, dataset = prepare_data(cfg)
    if is_primary():
        (workdir / "tasks.json").write_text(json.dumps(taskset.to_dict(), indent=2))
    log.info(
        "data %s: %d train / %d test images, %d classes in %d tasks %s",
        dataset.name, len(dataset.train), len(dataset.test), taskset.num_classes,
        taskset.num_tasks, list(taskset.sizes),
    )  # fmt: skip
    rows, teachers = [], []
    if uses_teachers(cfg):
        teachers = get_teachers(cfg, taskset, dataset, workdir)
        rows = teacher_report_rows(cfg, teachers, taskset, dataset)
    else:
        log.info("no method in config.methods uses teachers: none trained or loaded")
    train, holdout = selection_split(cfg, dataset.train)
    selection = make_selection(cfg, teachers, holdout)
    for method_name in cfg.methods:
        for seed in cfg.seeds:
            row = run_method(
                cfg, method_name, seed, teachers, taskset, dataset, workdir, train, selection
            )
            rows.extend(report_rows(row))
            report.write_report(workdir, rows, taskset.names, title=cfg.name)
    export_student(workdir, rows)
    return report.write_report(workdir, rows, taskset.names, title=cfg.name)
