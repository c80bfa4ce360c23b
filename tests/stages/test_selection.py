"""Model selection never looks at the test set: the kept and exported student is the final
one, or the best by agreement with the teachers on held-out unlabelled training images."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cka_jax.data import Split, load_source
from cka_jax.models import storage
from cka_jax.stages import experiment, selection
from cka_jax.train.loop import FitOptions, Keep, fit
from tests import tiny_config
from tests.train.test_step_parallel import BATCH, SHAPE, build


def tiny_split(n=2 * BATCH):
    rng = np.random.default_rng(3)
    return Split(rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, 5, n))


def fit_with_test_accuracies(tmp_path, accuracies, select=None):
    """`fit` for 3 epochs whose 'test set' scores the epochs with ``accuracies``."""
    spec, state, teacher_vars, _ = build("kd")
    student_vars = {"params": state.params["student"], "batch_stats": state.batch_stats}
    scores = iter(accuracies)
    result = fit(
        name="t",
        spec=spec,
        options=FitOptions(parallelism="single", batch_size=BATCH, log_every=100),
        student_variables=student_vars,
        teacher_variables=teacher_vars,
        split=tiny_split(),
        epochs=3,
        seed=0,
        run_dir=tmp_path / "run",
        evaluate=lambda v: {"merged_acc": next(scores)},
        keep=Keep(directory=tmp_path / "selected", select=select),
    )
    with ocp.StandardCheckpointer() as ckptr:  # the tiny test ResNet has no arch name
        kept = ckptr.restore(tmp_path / "selected" / "variables")
    return result, kept


def assert_same_variables(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("label_free_score", [None, "agreement"])
def test_test_accuracies_cannot_change_the_kept_model(tmp_path, label_free_score):
    # A fixed label-free score per epoch (as held-out teacher agreement would be): epoch 2.
    select = None
    if label_free_score:
        calls = iter([40.0, 70.0, 55.0, 40.0, 70.0, 55.0])
        select = lambda v: next(calls)  # noqa: E731
    best_first, kept_a = fit_with_test_accuracies(tmp_path / "a", [95.0, 20.0, 30.0], select)
    best_last, kept_b = fit_with_test_accuracies(tmp_path / "b", [20.0, 30.0, 95.0], select)
    assert best_first.selected == best_last.selected
    assert best_first.selected["epoch"] == (2 if select else 3)
    assert_same_variables(kept_a, kept_b)
    if select is None:  # the final model is kept
        assert_same_variables(kept_a, jax.device_get(best_first.variables))


def write_npz(path, dataset, test_labels):
    np.savez(
        path,
        x_train=dataset.train.images,
        y_train=dataset.train.labels,
        x_test=dataset.test.images,
        y_test=test_labels,
        class_names=np.array(dataset.class_names),
    )


@pytest.mark.slow
def test_relabelled_test_set_exports_the_same_student(tmp_path):
    """End to end, with teacher-agreement selection over 3 epochs: the same data but for the
    test labels gives the same exported student and the same selection."""
    cfg = tiny_config.get_config()
    dataset = load_source(cfg.data)
    relabelled = np.roll(dataset.test.labels, 7)  # same class counts, other labels
    assert np.mean(relabelled != dataset.test.labels) > 0.5
    outcomes = []
    for name, labels in (("true", dataset.test.labels), ("relabelled", relabelled)):
        write_npz(tmp_path / f"{name}.npz", dataset, labels)
        cfg = tiny_config.get_config()
        cfg.data = dict(name="numpy", path=str(tmp_path / f"{name}.npz"))
        cfg.epochs = 3
        cfg.selection.criterion = "teacher_agreement"
        cfg.selection.holdout_fraction = 0.2
        experiment.run(cfg, tmp_path / name)
        results = json.loads((tmp_path / name / "results.json").read_text())
        _, exported, meta = storage.load_model(tmp_path / name / "student")
        outcomes.append((results["rows"][-1], exported))
    (true_row, true_student), (other_row, other_student) = outcomes
    assert true_row["selection"]["criterion"] == "teacher_agreement"
    assert true_row["selection"] | {"merged_acc": None} == other_row["selection"] | {
        "merged_acc": None
    }
    assert true_row["merged_acc"] != other_row["merged_acc"]  # the labels did change scores
    assert_same_variables(true_student, other_student)


def test_holdout_is_kept_out_of_training_and_shared(tmp_path):
    cfg = tiny_config.get_config()
    train = load_source(cfg.data).train
    assert selection.split_holdout(cfg, train) == (train, None)
    cfg.selection.criterion = "teacher_agreement"
    cfg.selection.holdout_fraction = 0.25
    kept, held = selection.split_holdout(cfg, train)
    again, held_again = selection.split_holdout(cfg, train)
    assert len(held) == len(train) // 4 and len(kept) + len(held) == len(train)
    np.testing.assert_array_equal(held.images, held_again.images)
    # No held-out image is among the training images.
    seen = {img.tobytes() for img in kept.images}
    assert not any(img.tobytes() in seen for img in held.images)
