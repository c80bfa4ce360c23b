"""The report: `results.json` (rows and per-method summary) and `results.md` (the paper's
Table 2 layout: one row per method, parameter count, merged and per-task accuracy, plus the
routing accuracy: how often the merged argmax falls in the image's own task)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cka_jax import checkpoint, evaluate
from cka_jax.distributed import is_primary
from cka_jax.files import write_json_atomic
from cka_jax.models.build import param_count


def teacher_rows(cfg, teachers, taskset, dataset) -> list[dict]:
    """The report's rows for each teacher alone and for their ensemble."""
    teacher_logits = [
        evaluate.Scorer(model, cfg.augment, cfg.eval_batch_size).logits(variables, dataset.test)
        for model, variables in teachers
    ]
    rows = evaluate.teacher_rows(teacher_logits, dataset.test.labels, taskset)
    counts = [param_count(v) for _, v in teachers]
    for row, n in zip(rows, [*counts, sum(counts)], strict=True):
        row.update(seed=None, params=n)
    return rows


def export_student(workdir: Path, candidates: list[dict]) -> None:
    """Copies one amalgamated student to workdir/student/: among the result rows of the
    label-free runs (in ``config.methods`` and seed order), the best by the label-free
    selection score when they have one, else the first. Test accuracy plays no part."""
    if not candidates:
        return
    scored = [r for r in candidates if r["selection"]["score"] is not None]
    best = max(scored, key=lambda r: r["selection"]["score"]) if scored else candidates[0]
    src = Path(workdir) / "runs" / best["method"] / f"seed_{best['seed']}" / "selected"
    _, variables, meta = checkpoint.load_model(src)
    checkpoint.save_model(Path(workdir) / "student", variables, meta)


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    # Sample standard deviation across seeds (0 for a single seed).
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def summarize(rows: list[dict]) -> dict:
    """Per method: mean and std over seeds of merged and per-task accuracy."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        mean, std = _mean_std([r["merged_acc"] for r in group])
        routing_mean, routing_std = _mean_std([r.get("routing_acc") for r in group])
        tasks = list(group[0]["task_acc"])
        task_stats = {t: _mean_std([r["task_acc"][t] for r in group]) for t in tasks}
        summary[method] = {
            "merged_acc_mean": mean,
            "merged_acc_std": std,
            "routing_acc_mean": routing_mean,
            "routing_acc_std": routing_std,
            "task_acc_mean": {t: s[0] for t, s in task_stats.items()},
            "task_acc_std": {t: s[1] for t, s in task_stats.items()},
            "params": group[0].get("params"),
            "seeds": [r.get("seed") for r in group],
        }
    return summary


def cell(mean, std, n):
    if mean is None:
        return "-"
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"


def params_text(n):
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def markdown_table(summary: dict, task_names) -> str:
    header = ["Method", "Params", "Merged", "Routing", *task_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, s in summary.items():
        n = len(s["seeds"])
        cells = [
            method,
            params_text(s["params"]),
            cell(s["merged_acc_mean"], s["merged_acc_std"], n),
            cell(s["routing_acc_mean"], s["routing_acc_std"], n),
        ]
        cells += [cell(s["task_acc_mean"][t], s["task_acc_std"][t], n) for t in task_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(workdir, rows: list[dict], task_names, *, title: str = "Results") -> str:
    """Writes results.json and results.md into ``workdir``; returns the markdown table."""
    workdir = Path(workdir)
    summary = summarize(rows)
    table = markdown_table(summary, list(task_names))
    if not is_primary():  # process 0 writes the report of a multi-process run
        return table
    write_json_atomic(workdir / "results.json", {"rows": rows, "summary": summary})
    note = (
        "Accuracy in percent on the union test set (merged: argmax over all classes; per task: "
        "argmax within the task's classes; routing: share of images whose merged argmax falls "
        "in their own task's classes). Mean ± sample std over seeds where several ran. "
        "Teacher rows score one teacher alone (its probabilities outside its classes are 0). "
        "Students are the final ones (no test-set selection)."
    )
    (workdir / "results.md").write_text(f"# {title}\n\n{table}\n\n{note}\n")
    return table
