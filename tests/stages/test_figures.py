"""Figures of a workdir, the report command, what a run prints, and a ported teacher's own
input normalisation."""

import json
import logging
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from cka_jax.data import augment_config, eval_preprocess
from cka_jax.infra import progress
from cka_jax.models import create_model
from cka_jax.models.build import init_variables_of
from cka_jax.models.renormalized import Renormalized, renormalization
from cka_jax.stages import figures, teachers
from tests.main_process import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("accuracy.png", "losses.png", "common_space.png")


def write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def student_rows():
    rows = []
    for step in (1, 2, 3, 4):
        losses = {"loss": 3.0 / step, "loss/kd": 2.0 / step, "loss/inter": 1 / step}
        rows.append({"step": step, **losses})
    rows.append(
        {
            "step": 2,
            "epoch": 1,
            "eval/merged_acc": 40.0,
            "eval/task_acc/t0": 50.0,
            "eval/task_acc/t1": 60.0,
            "eval/routing_acc": 70.0,
        }
    )
    rows.append(
        {
            "step": 4,
            "epoch": 2,
            "eval/merged_acc": 45.0,
            "eval/task_acc/t0": 55.0,
            "eval/task_acc/t1": 65.0,
            "eval/routing_acc": 75.0,
        }
    )
    return rows


def test_curves_read_from_metrics_rows():
    epochs, curves = figures.accuracy_curves(student_rows())
    assert epochs == [1.0, 2.0]
    assert curves == {
        "merged": [40.0, 45.0],
        "t0": [50.0, 55.0],
        "t1": [60.0, 65.0],
        "routing": [70.0, 75.0],
    }
    steps, losses = figures.loss_curves(student_rows())
    assert steps == [1, 2, 3, 4]
    assert losses == {"kd": [2.0, 1.0, 2 / 3, 0.5], "inter": [1.0, 0.5, 1 / 3, 0.25]}


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')
    assert figures.read_metrics(path) == [{"step": 1, "loss": 1.0}]


def test_a_corrupt_line_mid_file_is_a_warning_with_its_line_and_a_gap_in_the_label(
    tmp_path, caplog
):
    run = tmp_path / "runs" / "kd" / "seed_0"
    run.mkdir(parents=True)
    lines = [json.dumps({"step": 1, "loss": 2.0}), '{"step": 2, "lo', json.dumps({"step": 3})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        [(label, rows)] = figures.runs_of(tmp_path)
    assert [r["step"] for r in rows] == [1, 3]
    assert label == "kd seed 0 (gap at line 2)"
    assert any("line 2 is not JSON" in r.getMessage() for r in caplog.records)


def test_draw_writes_every_figure(tmp_path):
    write_metrics(tmp_path / "runs" / "cka" / "seed_0" / "metrics.jsonl", student_rows())
    teacher = [{"step": 1, "loss": 1.0, "loss/ce": 1.0}, {"step": 1, "epoch": 1, "eval/acc": 80.0}]
    write_metrics(tmp_path / "teachers" / "task0.run" / "metrics.jsonl", teacher)
    labels = np.repeat(np.arange(3), 10)
    rng = np.random.default_rng(0)
    space = {
        "points": {"student": rng.normal(size=(30, 8)), "teacher task0": rng.normal(size=(30, 8))},
        "labels": labels,
        "class_names": ("a", "b", "c"),
        "title": "test",
    }
    paths = figures.draw(tmp_path, space)
    assert [p.name for p in paths] == list(FIGURES)
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert [label for label, _ in figures.runs_of(tmp_path)] == ["teacher task0", "cka seed 0"]


def test_stratified_sample_takes_every_class_equally():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    picked = figures.stratified_sample(labels, 30, seed=1)
    assert np.bincount(labels[picked]).tolist() == [10, 10, 10]
    assert len(set(picked.tolist())) == 30
    np.testing.assert_array_equal(picked, figures.stratified_sample(labels, 30, seed=1))


def test_job_eta_is_the_mean_time_per_kind_times_what_is_left(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 10.0, 30.0, 30.0, 36.0])  # the job's start, then runs
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    job = progress.JobProgress(teachers=1, students=3)
    assert job.eta_seconds() is None
    job.start("teacher", "teacher t0")  # 0 -> 10
    job.finish()
    assert job.eta_seconds() is None  # no student timed yet
    job.start("student", "kd")  # 10 -> 30
    job.finish()
    assert job.eta_seconds() == pytest.approx(2 * 20.0)
    job.start("student", "cka")  # 30 -> 36, found finished: not timed
    job.finish(cached=True)
    assert job.eta_seconds() == pytest.approx(20.0)
    assert job.done == 3 and job.total == 1


def test_renormalized_teacher_sees_its_own_normalisation():
    model = create_model("resnet10", 3, stem="small", width=4)
    variables = init_variables_of(model, 0, (16, 16, 3))
    images = np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    run = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    own = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x_run = eval_preprocess(images, out_size=16, **run)
    x_own = eval_preprocess(images, out_size=16, **own)
    wrapped = Renormalized(
        model, *renormalization(run["mean"], run["std"], own["mean"], own["std"])
    )
    got = wrapped.apply(variables, x_run, train=False)
    want = model.apply(variables, x_own, train=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), got, want)
    assert wrapped.num_classes == 3 and wrapped.width == 4  # the model's own fields


def run_config(**augment):
    cfg = ml_collections.ConfigDict({"augment": augment_config("imagenet")})
    cfg.augment.update(augment)
    return cfg


def test_a_ported_teacher_is_renormalised_or_warned_about(caplog):
    model = create_model("resnet10", 3, stem="small", width=4)
    stored = {"out_size": 224, "crop_fraction": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3}
    meta = {"preprocess": stored}
    with caplog.at_level(logging.WARNING, logger="cka_jax"):
        same = teachers.adapt_to_run(model, meta, run_config(mean=(0.5,) * 3, std=(0.5,) * 3), "t0")
    assert same is model and not caplog.records
    with caplog.at_level(logging.WARNING, logger="cka_jax"):
        other = teachers.adapt_to_run(model, meta, run_config(out_size=64), "t0")
    assert isinstance(other, Renormalized) and other.model is model
    text = caplog.text
    assert "out_size=224" in text and "out_size=64" in text  # both named
    assert "renormalised" in text


def test_main_run_prints_stages_progress_and_no_library_lines(tiny_main_run):
    printed = tiny_main_run.with_suffix(".log").read_text()
    for line in (
        "== data: loading mnist_embedded",
        "== teacher task0: training (run 1 of 3)",
        "== student kd seed 0: amalgamating (run 3 of 3)",
        "job: 3 of 3 runs done",
        "ETA",
        "== report: drawing figures",
    ):
        assert line in printed, line
    assert not re.search(r"^[IWEF]\d{4} ", printed, re.M), "an absl-formatted library line"
    for noise in ("libtpu", "orbax", "tensorflow"):
        assert noise not in printed.lower(), noise
    assert not re.search(r"\d\.\d{5,}", printed), "an unrounded number"


def test_main_run_draws_figures_linked_from_results(tiny_main_run):
    results_md = (tiny_main_run / "results.md").read_text()
    for name in FIGURES:
        path = tiny_main_run / "figures" / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert f"(figures/{name})" in results_md


@pytest.mark.slow
def test_report_command_redraws_a_workdir(tiny_main_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_main_run, workdir)
    shutil.rmtree(workdir / "figures")
    done = subprocess.run(
        [sys.executable, "-m", "cka_jax.stages.report", f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote" in done.stdout
    for name in FIGURES:
        assert (workdir / "figures" / name).read_bytes()[:8] == PNG_MAGIC


def test_report_command_names_a_wrong_workdir(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cka_jax.stages.report", f"--workdir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "config.json" in done.stderr and "Traceback" not in done.stderr
