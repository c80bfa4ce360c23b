"""The report: `results.json` (rows and per-method summary) and `results.md` (the paper's
Table 2 layout: one row per method, parameter count, merged and per-task accuracy, plus the
routing accuracy: how often the merged argmax falls in the image's own task)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from cka_jax.evaluation import evaluate
from cka_jax.infra.distributed import is_primary
from cka_jax.infra.files import write_json_atomic
from cka_jax.models import storage
from cka_jax.models.build import param_count
from cka_jax.stages import common_space, figures

log = logging.getLogger(__name__)


def teacher_rows(cfg, teachers, taskset, dataset, calibrator=None) -> list[dict]:
    """The report's rows for each teacher alone and for their ensemble; with a calibration
    (`cka_jax.stages.calibrate`), ``ensemble`` is the calibrated one and ``ensemble:none`` the
    raw concatenation beside it."""
    from cka_jax.stages.calibrate import teacher_outputs

    calibrated = calibrator is not None and calibrator.kind != "none"
    needs = calibrated and calibrator.needs_features
    outputs = teacher_outputs(teachers, dataset.test, cfg.augment, cfg.eval_batch_size, needs)
    rows = evaluate.teacher_rows(list(outputs.logits), dataset.test.labels, taskset)
    counts = [param_count(v) for _, v in teachers]
    # Each teacher, the ensemble, and the oracle-routed ensemble (with several teachers).
    params = [*counts, sum(counts), sum(counts)][: len(rows)]
    for row, n in zip(rows, params, strict=True):
        row.update(seed=None, params=n)
    if calibrated:
        ensemble = next(r for r in rows if r["method"] == "ensemble")
        raw = {**ensemble, "method": "ensemble:none"}
        scores = calibrator.union(outputs)
        ensemble.update(evaluate.accuracies(scores, dataset.test.labels, taskset))
        ensemble["calibration"] = calibrator.kind
        rows.insert(rows.index(ensemble) + 1, raw)
    elif calibrator is not None and calibrator.fallback:
        next(r for r in rows if r["method"] == "ensemble")["calibration_fallback"] = (
            calibrator.fallback
        )
    return rows


def export_student(workdir: Path, candidates: list[dict]) -> dict | None:
    """Copies one amalgamated student to workdir/student/ and returns its result row: among
    the result rows of the label-free runs (in ``config.methods`` and seed order), the best
    by the label-free selection score when they have one, else the first. Test accuracy
    plays no part."""
    if not candidates:
        return None
    scored = [r for r in candidates if r["selection"]["score"] is not None]
    best = max(scored, key=lambda r: r["selection"]["score"]) if scored else candidates[0]
    src = Path(workdir) / "runs" / best["method"] / f"seed_{best['seed']}" / "selected"
    _, variables, meta = storage.load_model(src)
    storage.save_model(Path(workdir) / "student", variables, meta)
    return best


def draw_figures(
    cfg, workdir: Path, candidates, exported, teachers, taskset, dataset
) -> list[Path]:
    """The workdir's figures (`cka_jax.stages.figures`); the t-SNE shows the common space of the
    run `common_space.figure_run` picks among the label-free ``candidates`` and the
    ``exported`` one. A figure that cannot be drawn is a warning: the results stand.
    Every process reads the checkpoints (orbax's reads are collective), process 0 draws."""
    space = None
    try:
        shown = common_space.figure_run(cfg, candidates, exported)
        if shown is not None:
            space = common_space.points(
                cfg, shown["method"], shown["seed"], teachers, taskset, dataset, workdir
            )
    except Exception as err:  # noqa: BLE001  (figures are extras: never lose a finished run)
        log.warning("common space not drawn (%s: %s)", type(err).__name__, err)
    if not is_primary():
        return []
    try:
        return figures.draw(workdir, space)
    except Exception as err:  # noqa: BLE001
        log.warning("figures not drawn (%s: %s)", type(err).__name__, err)
        return sorted((Path(workdir) / figures.FIGURES_DIR).glob("*.png"))


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


def write_report(
    workdir, rows: list[dict], task_names, *, title: str = "Results", figure_paths=()
) -> str:
    """Writes results.json and results.md (linking ``figure_paths``) into ``workdir``;
    returns the markdown table."""
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
        f"{evaluate.ORACLE_ROUTING}: the ensemble with each image scored by its own task's "
        "teacher, a bound that reads the labels (its merged accuracy is what a perfect router "
        "would reach). Students are the final ones (no test-set selection)."
    )
    links = "".join(
        f"\n![{Path(p).stem}]({Path(p).relative_to(workdir).as_posix()})\n" for p in figure_paths
    )
    figures_md = f"\n## Figures\n{links}" if links else ""
    (workdir / "results.md").write_text(f"# {title}\n\n{table}\n\n{note}\n{figures_md}")
    return table


def _load_teachers(cfg, taskset, workdir: Path) -> list:
    """The workdir's frozen teachers, loaded only (never trained); [] if any is missing."""
    from cka_jax.stages.teachers import teacher_model_configs
    from cka_jax.train.spec import compute_dtype

    loaded = []
    for name, m in zip(taskset.names, teacher_model_configs(cfg, taskset.num_tasks), strict=True):
        directory = m.checkpoint if m.checkpoint and not m.finetune else workdir / "teachers" / name
        if not storage.has_model(directory):
            return []
        model, variables, _ = storage.load_model(directory, dtype=compute_dtype(cfg))
        loaded.append((model, variables))
    return loaded


def _uses_labels(cfg, name: str) -> bool:
    from cka_jax.config import resolve_method
    from cka_jax.methods import build_method

    return build_method(*resolve_method(cfg, name)[:2]).uses_labels


def redraw(workdir) -> list[Path]:
    """Redraws the figures of a finished (or partial) workdir and rewrites its results.md."""
    import ml_collections

    from cka_jax.stages.inputs import prepare_data

    workdir = Path(workdir)
    missing = [f for f in ("config.json", "results.json") if not (workdir / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{workdir} has no {' or '.join(missing)}: give the --workdir of a run of "
            "python -m cka_jax.main"
        )
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    rows = json.loads((workdir / "results.json").read_text())["rows"]
    taskset, dataset = prepare_data(cfg)
    exported = None
    if storage.has_model(workdir / "student"):
        meta = json.loads((workdir / "student" / "model.json").read_text())
        key = (meta.get("method"), meta.get("seed"))
        exported = next((r for r in rows if (r["method"], r.get("seed")) == key), None)
    students = [r for r in rows if r.get("seed") is not None and "selection" in r]
    label_free = [r for r in students if not _uses_labels(cfg, r["method"])]
    teachers = _load_teachers(cfg, taskset, workdir)
    paths = draw_figures(cfg, workdir, label_free, exported, teachers, taskset, dataset)
    write_report(workdir, rows, taskset.names, title=cfg.name, figure_paths=paths)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cka_jax.report",
        description="Draws a workdir's figures (figures/*.png) and rewrites its results.md.",
    )
    parser.add_argument("--workdir", required=True, help="the --workdir of a main run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        paths = redraw(args.workdir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for path in paths:
        print(f"wrote {path}")
    print(f"wrote {Path(args.workdir) / 'results.md'}")


if __name__ == "__main__":
    main()
