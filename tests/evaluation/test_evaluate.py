"""Scoring on constructed logits whose answers are known: merged, per-task and routing
accuracy, teacher agreement, and the teacher rows."""

import numpy as np
import pytest

from cka_jax.data import TaskSet
from cka_jax.evaluation import evaluate

# Two tasks: union classes 0-2 (task a) and 3-4 (task b).
TASKS = TaskSet(names=("a", "b"), classes=((0, 1, 2), (3, 4)), class_names="vwxyz", num_classes=5)


def one_hot_scores(predictions, num_classes=5):
    scores = np.zeros((len(predictions), num_classes), np.float32)
    scores[np.arange(len(predictions)), predictions] = 1.0
    return scores


def test_routing_counts_predictions_inside_the_own_task():
    labels = np.array([0, 1, 2, 3, 4, 4, 0, 3])
    # right class; wrong class, right task; right; right; wrong class, right task;
    # wrong task; wrong task; wrong task.
    pred = np.array([0, 2, 2, 3, 3, 1, 4, 0])
    acc = evaluate.accuracies(one_hot_scores(pred), labels, TASKS)
    assert acc["merged_acc"] == pytest.approx(100 * 3 / 8)
    assert acc["routing_acc"] == pytest.approx(100 * 5 / 8)
    # Merged errors split into wrong-task (3) and wrong-class-in-task (2) images.
    assert 100 - acc["merged_acc"] == pytest.approx((100 - acc["routing_acc"]) + 100 * 2 / 8)


def test_task_accuracy_ignores_routing():
    labels = np.array([0, 1, 3, 4])
    scores = np.array(
        [
            [0.1, 0.0, 0.0, 0.9, 0.0],  # merged: class 3 (wrong task); within a: class 0
            [0.0, 0.5, 0.4, 0.0, 0.9],  # merged: 4 (wrong task); within a: 1
            [0.9, 0.0, 0.0, 0.2, 0.1],  # merged: 0 (wrong task); within b: 3
            [0.0, 0.0, 0.0, 0.6, 0.7],  # right
        ],
        np.float32,
    )
    acc = evaluate.accuracies(scores, labels, TASKS)
    assert acc["task_acc"] == {"a": 100.0, "b": 100.0}
    assert acc["routing_acc"] == 25.0 and acc["merged_acc"] == 25.0


def test_a_teacher_alone_routes_everything_to_its_task():
    labels = np.array([0, 1, 2, 3, 4])
    logits = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    scores = evaluate.single_teacher_scores(logits, TASKS, 0)
    assert evaluate.accuracies(scores, labels, TASKS)["routing_acc"] == 60.0


def test_teacher_agreement():
    scores = one_hot_scores(np.array([0, 4, 3, 1]))
    teacher_a = np.array([[3, 1, 0], [0, 0, 0.5], [0, 0, 0], [0, 2, 0]], np.float32)
    teacher_b = np.array([[0, 0], [9, 1], [0.1, 0], [0, 0]], np.float32)
    # Union argmax: 0, 3, 3, 1 -> agrees on images 0, 2 and 3.
    assert evaluate.agreement(scores, [teacher_a, teacher_b]) == 75.0


def test_oracle_routing_scores_each_image_by_its_own_teacher():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=200)
    # Teacher b is far more confident, so the plain ensemble routes most images to b.
    logits = [rng.normal(size=(200, 3)), 10 * rng.normal(size=(200, 2))]
    rows = evaluate.teacher_rows(logits, labels, TASKS)
    by_name = {r["method"]: r for r in rows}
    oracle = by_name[evaluate.ORACLE_ROUTING]
    # Independently: image i is right iff its own teacher's argmax is its local class.
    own = np.where(labels < 3, 0, 1)
    local = np.where(labels < 3, labels, labels - 3)
    right = [np.argmax(logits[t][i]) == local[i] for i, t in enumerate(own)]
    assert oracle["merged_acc"] == pytest.approx(100 * np.mean(right))
    assert oracle["routing_acc"] == 100.0
    assert oracle["task_acc"] == pytest.approx(by_name["ensemble"]["task_acc"])
    assert by_name["ensemble"]["routing_acc"] < 100.0
    # One teacher has nothing to route: no oracle row.
    single = TaskSet(names=("a",), classes=((0, 1, 2),), class_names="vwx", num_classes=3)
    rows = evaluate.teacher_rows([logits[0][labels < 3]], labels[labels < 3], single)
    assert evaluate.ORACLE_ROUTING not in {r["method"] for r in rows}
