"""The report on constructed rows: per-method mean and sample std over seeds, the markdown
table's layout and cells, and which student is exported."""

import json

import numpy as np
import pytest

from cka_jax.stages import report


def row(method, seed, merged, routing, task0, task1, params=1000, **extra):
    return {
        "method": method,
        "seed": seed,
        "merged_acc": merged,
        "routing_acc": routing,
        "task_acc": {"task0": task0, "task1": task1},
        "params": params,
        **extra,
    }


ROWS = [
    row("teacher:task0", None, 48.0, 50.0, 96.0, None),
    row("kd", 0, 80.0, 85.0, 90.0, 88.0),
    row("kd", 1, 82.0, 86.0, 92.0, 86.0),
    row("kd", 2, 84.0, 90.0, 91.0, 90.0),
]


def test_summary_is_mean_and_sample_std_over_seeds():
    summary = report.summarize(ROWS)
    kd = summary["kd"]
    assert kd["merged_acc_mean"] == pytest.approx(82.0)
    assert kd["merged_acc_std"] == pytest.approx(np.std([80, 82, 84], ddof=1))
    assert kd["routing_acc_mean"] == pytest.approx(87.0)
    assert kd["task_acc_mean"] == pytest.approx({"task0": 91.0, "task1": 88.0})
    assert kd["seeds"] == [0, 1, 2]
    teacher = summary["teacher:task0"]
    assert teacher["merged_acc_std"] == 0.0 and teacher["task_acc_mean"]["task1"] is None


def test_markdown_table_lays_out_every_method():
    table = report.markdown_table(report.summarize(ROWS), ["task0", "task1"])
    lines = table.splitlines()
    assert lines[0] == "| Method | Params | Merged | Routing | task0 | task1 |"
    assert lines[2] == "| teacher:task0 | 1.0K | 48.00 | 50.00 | 96.00 | - |"
    assert lines[3] == "| kd | 1.0K | 82.00 ± 2.00 | 87.00 ± 2.65 | 91.00 ± 1.00 | 88.00 ± 2.00 |"
    assert report.params_text(2_500_000) == "2.50M" and report.params_text(None) == "-"


def test_write_report_writes_json_and_markdown(tmp_path):
    table = report.write_report(tmp_path, ROWS, ["task0", "task1"], title="T")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == ROWS and set(saved["summary"]) == {"teacher:task0", "kd"}
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# T\n") and table in md and "no test-set selection" in md


def test_export_takes_the_best_label_free_score_else_the_first_run(tmp_path, monkeypatch):
    copied = []
    monkeypatch.setattr(report.storage, "load_model", lambda src: (None, {"v": str(src)}, {}))
    monkeypatch.setattr(report.storage, "save_model", lambda dst, v, m: copied.append(v["v"]))
    final = {"criterion": "final", "epoch": 3, "score": None, "merged_acc": 0.0}
    runs = [row("kd", 0, 1, 1, 1, 1, selection=final), row("cka", 0, 9, 9, 9, 9, selection=final)]
    report.export_student(tmp_path, runs)  # no scores: the first run, whatever its accuracy
    assert copied[-1].endswith("runs/kd/seed_0/selected")
    scored = [
        {**r, "selection": {**final, "score": s}} for r, s in zip(runs, (40.0, 60.0), strict=True)
    ]
    report.export_student(tmp_path, scored)
    assert copied[-1].endswith("runs/cka/seed_0/selected")
    report.export_student(tmp_path, [])  # nothing label-free: nothing exported
    assert len(copied) == 2
