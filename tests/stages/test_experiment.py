"""End to end: the main job on tiny data, every method, the report, export and predict."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cka_jax.evaluation import evaluate
from cka_jax.methods import build_method, okd
from cka_jax.models import ResNet, create_model, init_variables, storage
from cka_jax.models.storage import load_model
from cka_jax.stages import experiment, inputs
from cka_jax.train.spec import view_shape
from cka_jax.train.students import PLAIN
from tests import tiny_config
from tests.main_process import final_state

pytestmark = pytest.mark.slow  # whole experiments

REPO = Path(__file__).resolve().parents[2]


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_term_and_student_kind_trains_with_finite_terms_and_falling_loss(all_methods_run):
    cfg, workdir, _ = all_methods_run
    for method in cfg.methods:
        steps = [
            m
            for m in read_metrics(workdir / "runs" / method / "seed_0" / "metrics.jsonl")
            if "loss" in m
        ]
        assert len(steps) == cfg.epochs * 10, method  # 200 images / batch 20
        terms = {k for k in steps[0] if k.startswith("loss/")}
        expected = {
            "kd": {"kd"},
            "cfl": {"kd", "align", "recon"},
            "supervised": {"ce"},
            "cka": {"intra", "inter", "align", "std", "recon"},
            "cka_intra": {"intra", "align", "std", "recon"},
            "cka_inter": {"inter", "align", "std", "recon"},
            "independent": {"peer_ce"},
            "dml": {"peer_ce", "mutual_kl"},
            "mcl_okd": {"peer_ce", "leader_kl", "contrast"},
            "mcl_okd_kd": {"peer_ce", "leader_kl", "contrast", "kd"},
        }[method]
        assert terms == {f"loss/{t}" for t in expected}, method
        assert all(np.isfinite(m[k]) for m in steps for k in terms | {"loss"}), method
        first = np.mean([m["loss"] for m in steps[:5]])
        last = np.mean([m["loss"] for m in steps[-5:]])
        assert last < first, (method, first, last)


def test_cka_runs_log_what_each_term_does(all_methods_run):
    cfg, workdir, _ = all_methods_run
    rows = {r["method"]: r for r in json.loads((workdir / "results.json").read_text())["rows"]}
    metrics = read_metrics(workdir / "runs" / "cka" / "seed_0" / "metrics.jsonl")
    logged = [m for m in metrics if "grad_share/inter" in m]
    assert [m["step"] for m in logged] == list(range(cfg.log_every, 21, cfg.log_every))
    for m in logged:
        shares = [v for k, v in m.items() if k.startswith("grad_share/")]
        assert abs(sum(shares) - 1) < 1e-4 and len(shares) == 5
        assert m["grad_share/recon"] == 0.0  # the guard trains teacher-side heads only
        assert {"inter/student_peak", "inter/teacher0_peak", "inter/teacher1_entropy"} <= set(m)
    assert set(rows["cka"]["grad_share_median"]) == {"intra", "inter", "align", "std", "recon"}
    # Single-term methods have nothing to decompose.
    kd_metrics = read_metrics(workdir / "runs" / "kd" / "seed_0" / "metrics.jsonl")
    assert not any("grad_share/kd" in m for m in kd_metrics)
    assert "grad_share_median" not in rows["kd"]


def test_report_has_every_row_in_the_documented_schema(all_methods_run):
    cfg, workdir, table = all_methods_run
    results = json.loads((workdir / "results.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    peers = {m for m in cfg.methods if build_method(m, cfg.loss).peers}
    trained = [[m, f"{m}:ensemble"] if m in peers else [m] for m in cfg.methods]
    assert methods == [
        "teacher:task0",
        "teacher:task1",
        "ensemble",
        "oracle_routing",
        *sum(trained, []),
    ]
    for row in results["rows"]:
        assert set(row) >= {"method", "seed", "merged_acc", "task_acc", "routing_acc", "params"}
        assert 0 <= row["merged_acc"] <= row["routing_acc"] <= 100
        assert set(row["task_acc"]) == {"task0", "task1"}
    teacher0 = results["rows"][0]
    assert teacher0["task_acc"]["task1"] is None  # undefined, not 0
    assert teacher0["merged_acc"] <= 50.0 + 1e-9  # sees only 5 of the 10 classes
    summary = results["summary"]
    assert set(summary) == set(methods)
    assert summary["kd"]["merged_acc_mean"] == results["rows"][methods.index("kd")]["merged_acc"]
    md = (workdir / "results.md").read_text()
    assert "| Method | Params | Merged | Routing | task0 | task1 |" in md
    assert all(f"| {m} |" in md for m in methods)
    assert table in md


def test_teachers_score_as_reported_and_stages_are_skipped_when_done(all_methods_run):
    cfg, workdir, _ = all_methods_run
    before = (workdir / "results.json").read_text()
    mtimes = {p: p.stat().st_mtime for p in (workdir / "teachers").rglob("model.json")}
    assert len(mtimes) == 2
    experiment.run(cfg, workdir)  # everything is there: nothing retrains
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    assert json.loads((workdir / "results.json").read_text()) == json.loads(before)


def test_exported_student_predicts_top5_by_class_name(all_methods_run, tmp_path):
    from PIL import Image

    from cka_jax.data import load_source

    cfg, workdir, _ = all_methods_run
    model, variables, meta = load_model(workdir / "student")
    assert meta["class_names"] == [str(d) for d in range(10)]
    # Final students carry no selection score: the first label-free method is exported.
    assert meta["method"] == next(m for m in cfg.methods if m != "supervised") == "kd"
    data = load_source(cfg.data)
    paths = []
    for i in range(2):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(data.test.images[i, ..., 0]).save(path)
        paths.append(str(path))
    out = subprocess.run(
        [sys.executable, "-m", "cka_jax.interop.predict", f"--workdir={workdir}", *paths],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    blocks = [b for b in out.stdout.strip().split("\n\n") if b]
    assert len(blocks) == 2
    for block, path in zip(blocks, paths, strict=True):
        lines = block.splitlines()
        assert lines[0].startswith(path)
        assert len(lines) == 6  # header + top-5
        names = [line.split()[0] for line in lines[1:]]
        assert set(names) <= set(meta["class_names"]) and len(set(names)) == 5


def test_finetuned_teachers_and_a_student_from_a_checkpoint(all_methods_run, tmp_path):
    cfg, workdir, _ = all_methods_run
    trained = [workdir / "teachers" / t for t in ("task0", "task1")]
    cfg = tiny_config.get_config()
    cfg.teachers = tuple({"checkpoint": str(p), "finetune": True} for p in trained)
    cfg.teacher_epochs = 1
    # A 5-class teacher as the student's starting point: backbone kept, new 10-way classifier.
    cfg.student.checkpoint = str(trained[0])
    cfg.epochs = 1
    experiment.run(cfg, tmp_path)
    _, start, _ = load_model(trained[0])
    for t in (0, 1):
        assert (tmp_path / "teachers" / f"task{t}.run" / "metrics.jsonl").exists()
        _, tuned, _ = load_model(tmp_path / "teachers" / f"task{t}")
        _, original, _ = load_model(trained[t])
        before = np.asarray(original["params"]["conv1"]["kernel"])
        after = np.asarray(tuned["params"]["conv1"]["kernel"])
        assert not np.array_equal(before, after)  # it trained ...
        assert np.abs(after - before).max() < np.abs(before).max()  # ... starting from it
    student_metrics = read_metrics(tmp_path / "runs" / "kd" / "seed_0" / "metrics.jsonl")
    assert student_metrics  # the student ran from the 5-class checkpoint's backbone


def test_a_method_variant_trains_its_own_student_beside_the_shared_teachers(
    all_methods_run, tmp_path
):
    cfg, workdir, _ = all_methods_run
    cfg = tiny_config.get_config()
    cfg.teachers = tuple({"checkpoint": str(workdir / "teachers" / t)} for t in ("task0", "task1"))
    cfg.variants = {"kd_wide": dict(method="kd", student=dict(width=8))}
    cfg.methods = ("kd_wide",)
    cfg.epochs = 1
    experiment.run(cfg, tmp_path)
    row = json.loads((tmp_path / "results.json").read_text())["rows"][-1]
    assert (row["method"], row["base_method"]) == ("kd_wide", "kd")
    wide = create_model("resnet10", 10, stem="small", width=8)
    expected = sum(
        x.size
        for x in jax.tree.leaves(init_variables(wide, 0, (1, *view_shape(cfg.augment)))["params"])
    )
    assert row["params"] == expected
    steps = read_metrics(tmp_path / "runs" / "kd_wide" / "seed_0" / "metrics.jsonl")
    assert {k for k in steps[0] if k.startswith("loss/")} == {"loss/kd"}
    _, _, meta = load_model(tmp_path / "runs" / "kd_wide" / "seed_0" / "selected")
    assert meta["width"] == 8 and meta["method"] == "kd_wide"


def test_no_teachers_are_trained_when_no_method_uses_them(tmp_path):
    cfg = tiny_config.get_config()
    cfg.methods = ("supervised",)
    experiment.run(cfg, tmp_path)
    assert not (tmp_path / "teachers").exists()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["supervised"]


def test_mcl_okd_run_resumes_from_its_checkpoint_with_the_memory_bank(all_methods_run, tmp_path):
    cfg, reference, _ = all_methods_run  # 2 branch-based peers, 20 steps, checkpoints every 2
    run = "runs/mcl_okd/seed_0"
    step, ref_state = final_state(reference / run)
    assert step == 20
    ref_rows = json.loads((reference / "results.json").read_text())["rows"]
    # What is kept is the leader alone, as a plain ResNet scoring the reported accuracy.
    model, leader, _ = storage.load_model(reference / run / "selected")
    taskset, dataset = inputs.prepare_data(cfg)
    scorer = evaluate.Scorer(model, cfg.augment, 64, PLAIN.eval_logits)
    scores = scorer.logits(leader, dataset.test)
    row = next(r for r in ref_rows if r["method"] == "mcl_okd")
    kept = evaluate.accuracies(scores, dataset.test.labels, taskset)["merged_acc"]
    assert isinstance(model, ResNet) and kept == row["merged_acc"]  # the final leader
    assert row["selection"] == {
        "criterion": "final",
        "epoch": cfg.epochs,
        "score": None,
        "merged_acc": row["merged_acc"],
    }
    evals = [json.loads(line) for line in (reference / run / "metrics.jsonl").open()]
    last = [m for m in evals if "eval/merged_acc" in m][-1]
    ensemble_acc = next(r for r in ref_rows if r["method"] == "mcl_okd:ensemble")["merged_acc"]
    assert last["eval/ensemble/merged_acc"] == ensemble_acc  # logged beside the leader's
    student_params = sum(np.size(x) for x in jax.tree.leaves(leader["params"]))
    ensemble = next(r for r in ref_rows if r["method"] == "mcl_okd:ensemble")
    assert row["params"] == student_params < ensemble["params"] < 2 * student_params  # 1 trunk

    # The same run stopped after its checkpoint at step 16: later ones and the result gone.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for later in ("18", "20"):
        shutil.rmtree(resumed / run / "checkpoints" / later)
    (resumed / run / "result.json").unlink()
    step, at_16 = final_state(resumed / run)
    assert step == 16 and at_16["memory"].shape == (2, 200, 128)
    fresh = okd.init_memory_bank(jax.random.fold_in(jax.random.key(0), 3), 2, 200, 128)
    assert not np.allclose(at_16["memory"], fresh), "the checkpoint holds the trained bank"

    experiment.run(cfg, resumed)  # every other run is done: only mcl_okd resumes
    step, got_state = final_state(resumed / run)
    assert step == 20
    jax.tree.map(np.testing.assert_array_equal, ref_state, got_state)
    got_rows = json.loads((resumed / "results.json").read_text())["rows"]
    for ref, got in zip(ref_rows, got_rows, strict=True):
        ref.pop("wall_s", None), got.pop("wall_s", None)
        assert ref == got


def test_timing_json_accounts_for_every_second_of_every_run(all_methods_run):
    cfg, workdir, _ = all_methods_run
    timing = json.loads((workdir.parent / "all_methods_timing.json").read_text())
    cells = sum(c["seconds"] for c in timing["cells"])
    assert cells + timing["unaccounted_s"] == pytest.approx(timing["total_s"], abs=0.01)
    assert 0 <= timing["unaccounted_s"] < 0.05 * timing["total_s"]
    runs = timing["by_run"]
    for name in [f"amalgamation/{m} seed 0" for m in cfg.methods] + [
        "teachers/teacher task0",
        "teachers/teacher task1",
    ]:
        assert runs[name]["train_steps"] > 0, name
        assert runs[name]["evaluation"] > 0, name
        assert runs[name]["checkpoints"] > 0, name
    # Multi-term methods log their per-term diagnostics; single-term ones have none.
    assert runs["amalgamation/cka seed 0"]["diagnostics"] > 0
    assert "diagnostics" not in runs["amalgamation/kd seed 0"]
    # The first run compiles its step; the second teacher reuses the first one's.
    assert runs["teachers/teacher task0"]["compilations"] > 0
    assert runs["teachers/teacher task0"]["compile"] > 0
    assert runs["teachers/teacher task1"]["compilations"] == 0
    assert runs["figures"]["tsne"] > 0
    assert timing["compilations"] == sum(r["compilations"] for r in runs.values())
