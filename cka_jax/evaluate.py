"""Scoring: merged accuracy over the union label space and per-task accuracy, in percent.

- merged accuracy: argmax over all union classes, on the union test set;
- per-task accuracy: on task t's test images, argmax over task t's slice of the scores;
- routing accuracy: the share of test images whose merged argmax falls among their own
  task's classes. A merged error is either a wrong task (routing) or a wrong class within
  the right task; routing tells "knows which task" apart from "knows its task's classes".

Every test image is scored (the last batch is padded and masked), with integer labels wide
enough for any union (the CFL authors' code cast labels to uint8 and dropped the last batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from cka_jax.data import eval_batches, eval_kwargs, eval_preprocess


class Scorer:
    """Jitted eval-mode forward passes of one model over a test split (compiled once per
    model and test transform). ``eval_logits`` puts a student kind's logits batch first
    (`cka_jax.train.students`)."""

    def __init__(self, model, aug_cfg, batch_size: int, eval_logits: Callable | None = None):
        frozen = ml_collections.FrozenConfigDict(aug_cfg)
        self.forward = _eval_forward(model, frozen, eval_logits or _identity)
        self.batch_size = batch_size

    def logits(self, variables, split) -> np.ndarray:
        return predict(self.forward, variables, split, self.batch_size)


def _identity(x):
    return x


@functools.cache
def _eval_forward(model, aug_cfg, eval_logits):
    kwargs = eval_kwargs(aug_cfg)

    def forward(variables, images):
        return eval_logits(model.apply(variables, eval_preprocess(images, **kwargs))[0])

    return jax.jit(forward)


def predict(forward: Callable, variables, split, batch_size: int) -> np.ndarray:
    """Returns the (N, K) outputs of a jitted ``forward(variables, uint8 images)`` on a split."""
    outputs = []
    for batch in eval_batches(split, batch_size):
        out = np.asarray(forward(variables, batch["image"]))
        outputs.append(out[np.asarray(batch["mask"]).astype(bool)])
    return np.concatenate(outputs)


def accuracies(scores: np.ndarray, labels: np.ndarray, taskset) -> dict:
    """Merged, per-task and routing accuracy (percent) of (N, K) union scores against union
    labels."""
    labels = np.asarray(labels, np.int64)
    pred = np.argmax(scores, axis=-1)
    merged = float(np.mean(pred == labels) * 100)
    task_acc, routed = {}, np.zeros(len(labels), bool)
    for name, sl in zip(taskset.names, taskset.slices, strict=True):
        in_task = (labels >= sl.start) & (labels < sl.stop)
        routed |= in_task & (pred >= sl.start) & (pred < sl.stop)
        local_pred = np.argmax(scores[in_task, sl], axis=-1) + sl.start
        task_acc[name] = float(np.mean(local_pred == labels[in_task]) * 100)
    routing = float(np.mean(routed) * 100)
    return {"merged_acc": merged, "task_acc": task_acc, "routing_acc": routing}


def agreement(scores: np.ndarray, teacher_logits: list[np.ndarray]) -> float:
    """Percent of images on which the argmax of ``scores`` (N, K) equals the argmax of the
    teachers' concatenated logits: a label-free score of a student (the ensemble's
    prediction is its only target)."""
    target = np.argmax(np.concatenate(teacher_logits, axis=-1), axis=-1)
    return float(np.mean(np.argmax(scores, axis=-1) == target) * 100)


def single_teacher_scores(teacher_logits: np.ndarray, taskset, task: int) -> np.ndarray:
    """Teacher ``task`` alone over the union: its softmax on its slice, 0 elsewhere."""
    sl = taskset.slices[task]
    scores = np.zeros((teacher_logits.shape[0], taskset.num_classes), np.float32)
    z = teacher_logits - teacher_logits.max(axis=-1, keepdims=True)
    scores[:, sl] = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return scores


def teacher_rows(teacher_logits: list[np.ndarray], labels, taskset) -> list[dict]:
    """Rows for each teacher alone and for the ensemble (argmax over concatenated logits)."""
    rows = []
    for t, name in enumerate(taskset.names):
        acc = accuracies(single_teacher_scores(teacher_logits[t], taskset, t), labels, taskset)
        # A teacher has no scores for other tasks' classes: its per-task accuracy there is
        # undefined, not zero.
        acc["task_acc"] = {n: (v if n == name else None) for n, v in acc["task_acc"].items()}
        rows.append({"method": f"teacher:{name}", **acc})
    rows.append(
        {"method": "ensemble", **accuracies(np.concatenate(teacher_logits, -1), labels, taskset)}
    )
    return rows
