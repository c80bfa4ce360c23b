"""Which model a label-free run keeps, chosen without test labels.

The final model (``selection.criterion='final'``), or the epoch whose student agrees most
with the teachers' union argmax on held-out unlabelled training images
(``'teacher_agreement'``): a seeded ``selection.holdout_fraction`` of the training images,
shared by every method and seed of the experiment, kept out of every student's training.
Their labels are never read.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cka_jax.data import Split
from cka_jax.evaluation import evaluate

_HOLDOUT_STREAM = 7919  # seeds the held-out images apart from every other draw
_SAMPLE_STREAM = 7927  # seeds the students' sample (`student_data_fraction`)


@dataclasses.dataclass
class Selection:
    """The experiment's selection rule, with the held-out images and the teachers' logits
    on them when it needs them."""

    criterion: str
    holdout: Split | None = None
    # The teachers' logits on ``holdout`` (or one array of their calibrated union scores).
    teacher_logits: list | None = None

    def applies(self, label_free: bool) -> bool:
        """Labelled methods (supervised, the peer methods) keep their final model."""
        return self.criterion != "final" and label_free

    def scorer(self, scorer: evaluate.Scorer):
        """``variables -> agreement (%)`` on the held-out images (for `Keep.select`)."""
        return lambda v: evaluate.agreement(scorer.logits(v, self.holdout), self.teacher_logits)


def split_holdout(cfg, train: Split) -> tuple[Split, Split | None]:
    """``(student training images, held-out images or None)``. With
    ``config.student_data_fraction`` < 1 the students train on a seeded uniform sample of
    that fraction of the images left (drawn without labels)."""
    holdout = None
    if cfg.selection.criterion != "final":
        order = np.random.default_rng(int(cfg.tasks.seed) + _HOLDOUT_STREAM).permutation(len(train))
        k = int(round(cfg.selection.holdout_fraction * len(train)))
        train, holdout = train.take(np.sort(order[k:])), train.take(np.sort(order[:k]))
    fraction = float(cfg.get("student_data_fraction", 1.0))
    if fraction < 1:
        order = np.random.default_rng(int(cfg.tasks.seed) + _SAMPLE_STREAM).permutation(len(train))
        train = train.take(np.sort(order[: int(round(fraction * len(train)))]))
    return train, holdout


def make_selection(cfg, teachers, holdout: Split | None, calibrator=None) -> Selection:
    """The `Selection` of the config: with held-out images, the teachers score them once
    (their union scores calibrated by ``calibrator``, `cka_jax.stages.calibrate`)."""
    if holdout is None or not teachers:
        return Selection("final")
    if calibrator is not None and calibrator.kind != "none":
        from cka_jax.stages.calibrate import teacher_outputs

        outputs = teacher_outputs(
            teachers, holdout, cfg.augment, cfg.eval_batch_size, calibrator.needs_features
        )
        return Selection(cfg.selection.criterion, holdout, [calibrator.union(outputs)])
    logits = [
        evaluate.Scorer(model, cfg.augment, cfg.eval_batch_size).logits(variables, holdout)
        for model, variables in teachers
    ]
    return Selection(cfg.selection.criterion, holdout, logits)
