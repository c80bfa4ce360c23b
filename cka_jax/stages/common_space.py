"""Points of the common space on test images, for the t-SNE figure (`cka_jax.stages.figures`).

For a run whose method has a common space (CKA's shared MLP, CFL's shared extractor), the
student and every teacher are mapped through the run's own trained heads (from its newest
checkpoint: the final heads) on a stratified sample of test images: one point per image and
model, in the space where the method aligns them. For other methods (KD, the supervised
reference, the peer methods) the exported student's globally pooled features stand in.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax.config import resolve_method
from cka_jax.data import eval_batches, eval_kwargs, eval_preprocess
from cka_jax.infra import checkpoint
from cka_jax.methods import build_method
from cka_jax.models import storage
from cka_jax.stages.figures import TSNE_IMAGES, stratified_sample
from cka_jax.train.spec import student_run
from cka_jax.train.step import create_train_state


def _pooled(features):
    return jnp.mean(features, axis=(1, 2)) if features.ndim == 4 else features


def _batched(fn, split, aug_cfg, batch_size: int) -> list[np.ndarray]:
    """``fn(preprocessed images) -> list of (B, d)`` over a split, concatenated per output."""
    kwargs = eval_kwargs(aug_cfg)
    jitted = jax.jit(lambda images: fn(eval_preprocess(images, **kwargs)))
    parts = []
    for batch in eval_batches(split, batch_size):
        keep = np.asarray(batch["mask"]).astype(bool)
        parts.append([np.asarray(o)[keep] for o in jitted(batch["image"])])
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def has_common_space(cfg, name: str) -> bool:
    """Whether method (or variant) ``name`` of ``cfg`` trains a common space."""
    base, loss_cfg, _ = resolve_method(cfg, name)
    return build_method(base, loss_cfg).common_space is not None


def figure_run(cfg, candidates: list[dict], exported: dict | None) -> dict | None:
    """The run whose space the t-SNE shows: the exported student's when its method has a
    common space, else the first label-free run (config order) with one, else the exported
    student's (its pooled features)."""
    if exported is not None and has_common_space(cfg, exported["method"]):
        return exported
    spaced = [r for r in candidates if has_common_space(cfg, r["method"])]
    return spaced[0] if spaced else exported


def points(cfg, name: str, seed: int, teachers, taskset, dataset, workdir) -> dict | None:
    """``{'points': {model: (N, d)}, 'labels', 'class_names', 'title'}`` for run
    ``name``/``seed`` of ``workdir``; None when the run has no checkpoint to read."""
    workdir = Path(workdir)
    test = dataset.test.take(stratified_sample(dataset.test.labels, TSNE_IMAGES))
    common = {"labels": test.labels, "class_names": taskset.class_names}
    base, loss_cfg, _ = resolve_method(cfg, name)
    method = build_method(base, loss_cfg)
    batch_size = cfg.eval_batch_size
    if method.common_space is None or not teachers:
        if not storage.has_model(workdir / "student"):
            return None
        model, variables, _ = storage.load_model(workdir / "student")
        (feats,) = _batched(
            lambda x: [_pooled(model.apply(variables, x, train=False)[1])],
            test,
            cfg.augment,
            batch_size,
        )
        title = f"{name} seed {seed}: the student's pooled features (no common space)"
        return {**common, "points": {"student": feats}, "title": title}
    run_dir = workdir / "runs" / name / f"seed_{seed}" / "checkpoints"
    if not run_dir.is_dir():
        return None
    teacher_models = [m for m, _ in teachers]
    teacher_vars = [v for _, v in teachers]
    spec, student_vars = student_run(cfg, name, taskset.num_classes, seed, teacher_models, 1, 1)
    template = create_train_state(spec, student_vars, teacher_vars, jax.random.key(seed))
    checkpoints = checkpoint.RunCheckpoints(run_dir)
    try:
        restored = checkpoints.restore_latest(jax.device_get(template))
    finally:
        checkpoints.close()
    if restored is None:
        return None
    state, _ = restored
    student_variables = {"params": state.params["student"], "batch_stats": state.batch_stats}

    def to_common(x):
        _, s_feat = spec.student.apply(student_variables, x, train=False)
        t_feats = [m.apply(v, x, train=False)[1] for m, v in teachers]
        out = spec.heads.apply({"params": state.params["heads"]}, s_feat, t_feats)
        return [_pooled(out["student_common"]), *map(_pooled, out["teacher_common"])]

    outputs = _batched(to_common, test, cfg.augment, batch_size)
    names = ["student", *(f"teacher {t}" for t in taskset.names)]
    title = f"{name} seed {seed}: common space ({method.common_space}) on test images"
    return {**common, "points": dict(zip(names, outputs, strict=True)), "title": title}
