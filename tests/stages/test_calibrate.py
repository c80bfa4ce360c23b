"""The calibration stage in a real (tiny) experiment: fitted once on the unlabelled training
images, saved and read back, used by the ensemble row and the students' targets, never
reading a label, and falling back to 'none' with a warning when a fit fails."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.data import Split
from cka_jax.methods import calibration, losses
from cka_jax.models import storage
from cka_jax.stages import calibrate, experiment, inputs
from cka_jax.stages.calibrate import Calibrator
from tests import tiny_config

pytestmark = pytest.mark.slow  # whole (tiny) experiments


@pytest.fixture(scope="module")
def teachers_run(tmp_path_factory):
    """A teachers-only job (``config.methods=()``) on tiny data."""
    cfg = tiny_config.get_config()
    cfg.methods = ()
    workdir = tmp_path_factory.mktemp("teachers")
    experiment.run(cfg, workdir)
    taskset, dataset = inputs.prepare_data(cfg)
    frozen = [storage.load_model(workdir / "teachers" / n)[:2] for n in taskset.names]
    return cfg, workdir, taskset, dataset, frozen


def test_a_teachers_only_job_scores_the_teachers_and_trains_no_student(teachers_run):
    _, workdir, *_ = teachers_run
    rows = json.loads((workdir / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == [
        "teacher:task0",
        "teacher:task1",
        "ensemble",
        "oracle_routing",
    ]
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("kind", ["standardize", "cluster_vote"])
def test_the_fit_reads_no_label(teachers_run, tmp_path, kind):
    cfg, _, _, dataset, frozen = teachers_run
    cfg = cfg.copy_and_resolve_references()
    cfg.teacher_calibration = kind
    cfg.calibration_clusters_per_class = 2
    train = dataset.train
    shuffled = Split(train.images, np.random.default_rng(0).permutation(train.labels))
    a = calibrate.get_calibrator(cfg, frozen, train, tmp_path / "a")
    b = calibrate.get_calibrator(cfg, frozen, shuffled, tmp_path / "b")
    assert a.kind == b.kind == kind
    assert json.loads((tmp_path / "a" / "calibration.json").read_text()) == json.loads(
        (tmp_path / "b" / "calibration.json").read_text()
    )


def test_a_run_fits_once_uses_it_everywhere_and_reads_it_back(teachers_run, tmp_path):
    cfg, teacher_dir, taskset, _, _ = teachers_run
    cfg = cfg.copy_and_resolve_references()
    cfg.teacher_calibration = "standardize"
    cfg.teachers = tuple({"checkpoint": str(teacher_dir / "teachers" / n)} for n in taskset.names)
    cfg.methods = ("kd",)
    experiment.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["kind"] == "standardize" and not saved["fallback"]
    assert len(saved["params"]["std"]) == 2
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["ensemble"]["calibration"] == "standardize"
    assert "ensemble:none" in rows
    # The uncalibrated ensemble is the teachers-only job's ensemble, exactly.
    plain = json.loads((teacher_dir / "results.json").read_text())["rows"]
    raw = next(r for r in plain if r["method"] == "ensemble")
    assert rows["ensemble:none"]["merged_acc"] == raw["merged_acc"]
    # A rerun reads the calibration back instead of fitting it again.
    stamp = (tmp_path / "calibration.json").stat().st_mtime_ns
    experiment.run(cfg, tmp_path)
    assert (tmp_path / "calibration.json").stat().st_mtime_ns == stamp


def test_the_kd_target_is_the_calibrated_union():
    """The step's KD term with a calibrator equals KD on the calibrated logits (float64)."""
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(8, 3)) * 5, rng.normal(size=(8, 2))]
    student = rng.normal(size=(8, 5))
    calibrator = Calibrator("standardize", {"mean": [0.5, -0.2], "std": [5.0, 1.0]})
    union = np.concatenate(
        [(z - m) / s for z, m, s in zip(logits, [0.5, -0.2], [5.0, 1.0], strict=True)], -1
    )
    t = union / 4.0
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = student / 4.0
    log_q = q - q.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    ref = 16.0 * np.mean(np.sum(p * (np.log(p) - log_q), -1))
    calibrated = jnp.concatenate(calibrator([jnp.asarray(z) for z in logits]), -1)
    got = losses.soft_target_kl(jnp.asarray(student, jnp.float32), calibrated, temperature=4.0)
    assert float(got) == pytest.approx(ref, rel=1e-4)


def test_a_fit_that_starves_a_teacher_falls_back_to_none(caplog):
    # Teacher 0 always answers with a margin, teacher 1 never: after mean subtraction
    # teacher 1 is never the argmax, so it would get no image.
    rng = np.random.default_rng(0)
    z0 = 0.1 * rng.normal(size=(500, 3)) + np.array([10.0, -5.0, -5.0])
    outputs = calibration.TeacherOutputs((z0, 0.01 * rng.normal(size=(500, 2))))
    with caplog.at_level(logging.WARNING):
        calibrator, _ = calibrate.fit("mean_subtracted", outputs, {})
    assert calibrator.kind == "none" and "teacher 1" in calibrator.fallback
    assert "falling back to 'none'" in caplog.text


def test_one_teacher_is_a_clear_error_for_a_router():
    cfg = tiny_config.get_config()
    cfg.teacher_calibration = "cluster_vote"
    with pytest.raises(ValueError, match="needs at least 2"):
        calibrate.check_config(cfg, 1)
