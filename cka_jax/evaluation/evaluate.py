"""Scoring: merged accuracy over the union label space and per-task accuracy, in percent.

- merged accuracy: argmax over all union classes, on the union test set;
- per-task accuracy: on task t's test images, argmax over task t's slice of the scores;
- routing accuracy: the share of test images whose merged argmax falls among their own
  task's classes. A merged error is either a wrong task (routing) or a wrong class within
  the right task; routing tells "knows which task" apart from "knows its task's classes".

Every test image is scored (the last batch is padded and the padding dropped), with integer
labels wide enough for any union (the CFL authors' code cast labels to uint8 and dropped the
last batch).

Scoring is sharded over the devices of every process, like the train step's 'mesh' form:
each batch is split over the devices, each process reads and scores only its devices' rows,
and the logits are gathered so that every process holds all of them (and computes the same
accuracies from them). Evaluation time falls with the number of devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cka_jax.data import eval_batches, eval_kwargs, eval_preprocess
from cka_jax.infra.distributed import local_rows, put_rows
from cka_jax.infra.xla_options import compiler_options, cpu_convolutions

AXIS = "data"


class Scorer:
    """Jitted eval-mode forward passes of one model over a test split (compiled once per
    model, test transform and devices), sharded over ``devices`` (default: every device of
    every process; every process must call `logits` together). ``eval_logits`` puts a
    student kind's logits batch first (`cka_jax.train.students`). ``batch_size`` is rounded
    up to a multiple of the device count."""

    def __init__(
        self, model, aug_cfg, batch_size: int, eval_logits: Callable | None = None, devices=None
    ):
        frozen = ml_collections.FrozenConfigDict(aug_cfg)
        self.devices = tuple(jax.devices() if devices is None else devices)
        self.forward = _eval_forward(
            model, frozen, eval_logits or _identity, self.devices, cpu_convolutions()
        )
        n = len(self.devices)
        self.batch_size = -(-batch_size // n) * n

    def logits(self, variables, split) -> np.ndarray:
        return predict(self.forward, variables, split, self.batch_size, self.devices)


def _identity(x):
    return x


def _shardings(devices: tuple) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded) over the 1-D mesh of ``devices``."""
    mesh = Mesh(np.array(devices), (AXIS,))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))


@functools.cache
def _eval_forward(model, aug_cfg, eval_logits, devices: tuple, conv_kernels: str):
    kwargs = eval_kwargs(aug_cfg)

    def forward(variables, images):
        return eval_logits(model.apply(variables, eval_preprocess(images, **kwargs))[0])

    # The outputs are gathered whole on every device, so every process can read them.
    return jax.jit(
        forward,
        out_shardings=_shardings(devices)[0],
        compiler_options=compiler_options(devices, aug_cfg.out_size),
    )


def jit_gathered(forward: Callable, devices: tuple | None = None) -> Callable:
    """``jax.jit(forward)`` with its outputs gathered whole on every device, so every process
    can read them (what `predict` needs when the batch spans processes)."""
    devices = tuple(jax.devices() if devices is None else devices)
    return jax.jit(forward, out_shardings=_shardings(devices)[0])


def predict(
    forward: Callable, variables, split, batch_size: int, devices: tuple | None = None
) -> np.ndarray:
    """Returns the (N, K) outputs of a jitted ``forward(variables, uint8 images)`` on a split,
    each batch sharded over ``devices`` (``batch_size`` a multiple of their count; default
    every device). Every process gets every output."""
    replicated, sharded = _shardings(tuple(jax.devices() if devices is None else devices))
    if batch_size % sharded.num_devices:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {sharded.num_devices} devices"
        )
    if len(split) == 0:
        raise ValueError("cannot score an empty split")
    variables = jax.device_put(variables, replicated)
    rows = local_rows(sharded, batch_size)
    outputs, pending = [], None
    for batch in eval_batches(split, batch_size, rows):
        images = put_rows(sharded, {"image": batch["image"]}, batch_size)["image"]
        # One batch in flight while the host reads the next.
        out = forward(variables, images)
        if pending is not None:
            outputs.append(np.asarray(pending))
        pending = out
    outputs.append(np.asarray(pending))
    # Only the last batch is padded, at its end: the first N rows are the split's images.
    return np.concatenate(outputs)[: len(split)]


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


def oracle_routing_scores(teacher_logits: list[np.ndarray], labels, taskset) -> np.ndarray:
    """The ensemble with oracle routing: each image scored by its own task's teacher alone
    (its logits on its slice, -inf elsewhere). It reads the labels to route, so it is the
    bound a perfect label-free router reaches, never a method: its merged accuracy is the
    teachers' within-task accuracy, weighted by the tasks' image counts."""
    labels = np.asarray(labels, np.int64)
    scores = np.full((len(labels), taskset.num_classes), -np.inf, np.float32)
    owner = taskset.task_of(labels)
    for t, sl in enumerate(taskset.slices):
        mine = owner == t
        scores[np.ix_(mine, np.arange(sl.start, sl.stop))] = teacher_logits[t][mine]
    return scores


ORACLE_ROUTING = "oracle_routing"  # the report's row name of `oracle_routing_scores`


def teacher_rows(teacher_logits: list[np.ndarray], labels, taskset) -> list[dict]:
    """Rows for each teacher alone, for the ensemble (argmax over concatenated logits) and,
    with two or more teachers, for the ensemble with oracle routing (a bound that reads the
    labels)."""
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
    if len(teacher_logits) > 1:
        oracle = oracle_routing_scores(teacher_logits, labels, taskset)
        rows.append({"method": ORACLE_ROUTING, **accuracies(oracle, labels, taskset)})
    return rows
