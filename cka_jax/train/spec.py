"""Builds the `StepSpec` of a training run from the config: the same for teachers, every
method, the benchmark (scripts/benchmark.py times exactly this step) and the tests."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import ml_collections

from cka_jax.config import resolve_method, resolve_peers
from cka_jax.data import augment_with_keys, train_kwargs
from cka_jax.methods import build_method
from cka_jax.train.step import StepSpec, build_heads, learning_rate_schedule, make_optimizer
from cka_jax.train.students import student_kind


def student_run(
    cfg, name, num_classes, seed, teacher_models, total_steps, num_data, calibration=None
):
    """``(spec, student variables)`` of method (or variant) ``name``'s run with ``seed``: its
    student (fresh, from its checkpoint, or peer networks) and the step that trains it with
    ``teacher_models`` (used only when the method needs teachers), their logits calibrated
    by ``calibration`` (a `cka_jax.stages.calibrate.Calibrator`; None or 'none': raw)."""
    base, loss_cfg, student_cfg = resolve_method(cfg, name)
    method = build_method(base, loss_cfg)
    student, variables = student_kind(method).build(
        student_cfg,
        resolve_peers(cfg, name),
        num_classes,
        seed,
        view_shape(cfg.augment),
        compute_dtype(cfg),
    )
    teacher_models = teacher_models if method.uses_teachers else ()
    spec = step_spec(
        cfg, method, loss_cfg, student, teacher_models, cfg.optimizer, total_steps, num_data
    )
    if calibration is not None and calibration.kind != "none" and method.uses_teachers:
        spec = dataclasses.replace(spec, calibration=calibration)
    return spec, variables


def step_spec(
    cfg, method, loss_cfg, student, teacher_models, optimizer_cfg, total_steps, num_data=0
) -> StepSpec:
    """The step of one run: ``method`` (`cka_jax.methods.Method`) trains ``student`` with
    ``teacher_models`` frozen, Adam from ``optimizer_cfg`` over ``total_steps``."""
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
        learning_rate=learning_rate_schedule(optimizer_cfg.learning_rate, total_steps),
    )


def compute_dtype(cfg):
    return jnp.dtype(cfg.get("compute_dtype", "float32"))


def view_shape(aug_cfg) -> tuple[int, int, int]:
    """(H, W, C) of one augmented view."""
    return (int(aug_cfg.out_size), int(aug_cfg.out_size), int(aug_cfg.channels))


def make_augment(aug_cfg):
    """The training augmentation of ``aug_cfg``: one function per distinct config, so that
    equal StepSpecs (another seed, another run in this process) share compiled steps."""
    return _augment(ml_collections.FrozenConfigDict(aug_cfg))


@functools.cache
def _augment(aug_cfg):
    kwargs = train_kwargs(aug_cfg)
    return lambda keys, images: augment_with_keys(keys, images, **kwargs)
