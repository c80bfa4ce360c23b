"""The figures of a workdir, drawn as PNGs into ``figures/`` and linked from results.md:

- ``accuracy.png``: test accuracy against epoch for every run (teachers: their task's
  accuracy; students: merged, routing and per task);
- ``losses.png``: every loss term against step for every run (log scale where all are > 0);
- ``common_space.png``: a t-SNE of the common space on test images, for the exported
  student's run and the teachers: where the student and each teacher land for the same image,
  coloured by class. A method without a common space (KD, the supervised reference) gets the
  t-SNE of the exported student's pooled features instead.

The data come from each run's ``metrics.jsonl`` and checkpoints; the figures are reported
only and choose nothing. Drawn at the end of every main run and by
``python -m cka_jax.report --workdir=DIR``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cka_jax.infra.timing import measure

FIGURES_DIR = "figures"
MARKERS = "o^sDvP*Xh<>"
TSNE_IMAGES = 600  # test images in the t-SNE (per model), a seeded stratified sample

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (see `read_metrics_with_gaps`)."""
    return read_metrics_with_gaps(path)[0]


def read_metrics_with_gaps(path: Path) -> tuple[list[dict], list[int]]:
    """``(rows, gaps)`` of a ``metrics.jsonl``: a torn last line (a kill mid-write) is
    skipped in silence; any other line that is not JSON is skipped with a warning naming
    its line number, and listed in ``gaps``, since the series has a hole there."""
    lines = Path(path).read_text().splitlines()
    rows, gaps = [], []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                gaps.append(number)
                log.warning("%s: line %d is not JSON; skipped, the series has a gap", path, number)
    return rows, gaps


def runs_of(workdir: Path) -> list[tuple[str, list[dict]]]:
    """``(label, metrics rows)`` of every run in the workdir: teachers first, then the
    student runs in directory order."""
    workdir = Path(workdir)
    found = [
        (f"teacher {p.parent.name.removesuffix('.run')}", p)
        for p in sorted(workdir.glob("teachers/*.run/metrics.jsonl"))
    ]
    found += [
        (f"{p.parent.parent.name} {p.parent.name.replace('_', ' ')}", p)
        for p in sorted(workdir.glob("runs/*/seed_*/metrics.jsonl"))
    ]
    out = []
    for label, path in found:
        rows, gaps = read_metrics_with_gaps(path)
        if rows:
            out.append(
                (label + (f" (gap at line {', '.join(map(str, gaps))})" if gaps else ""), rows)
            )
    return out


def _grid(n: int, cols: int = 4, size=(3.6, 2.8)) -> tuple[Figure, list]:
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def accuracy_curves(rows: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
    """Epochs and ``{curve name: accuracies}`` from a run's evaluation rows. Rows without
    an ``epoch`` (older workdirs) are numbered 1, 2, ..."""
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    epochs = [float(r.get("epoch", i + 1)) for i, r in enumerate(evals)]
    curves: dict[str, list[float]] = {}
    for key in dict.fromkeys(k for r in evals for k in r if k.startswith("eval/")):
        name = key.removeprefix("eval/").removeprefix("task_acc/").removesuffix("_acc")
        if name == "selection_score" or not all(key in r for r in evals):
            continue
        curves[name] = [float(r[key]) for r in evals]
    return epochs, curves


def loss_curves(rows: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and ``{term: values}`` of a run's per-step loss terms (``loss/<term>``)."""
    steps_rows = [r for r in rows if "loss" in r]
    steps = [int(r["step"]) for r in steps_rows]
    keys = dict.fromkeys(k for r in steps_rows for k in r if k.startswith("loss/"))
    curves = {k.removeprefix("loss/"): [float(r.get(k, np.nan)) for r in steps_rows] for k in keys}
    return steps, curves or {"loss": [float(r["loss"]) for r in steps_rows]}


def draw_accuracy(runs, path: Path) -> Path | None:
    runs = [(label, *accuracy_curves(rows)) for label, rows in runs]
    runs = [r for r in runs if r[1]]
    if not runs:
        return None
    fig, axes = _grid(len(runs))
    for ax, (label, epochs, curves) in zip(axes, runs, strict=True):
        for name, values in curves.items():
            bold = name in ("merged", "acc")
            ax.plot(epochs, values, marker=".", lw=2 if bold else 1, label=name)
        ax.set(title=label, xlabel="epoch", ylabel="test accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=90)
    return path


def draw_losses(runs, path: Path) -> Path | None:
    runs = [(label, *loss_curves(rows)) for label, rows in runs]
    runs = [r for r in runs if r[1]]
    if not runs:
        return None
    fig, axes = _grid(len(runs))
    for ax, (label, steps, curves) in zip(axes, runs, strict=True):
        for name, values in curves.items():
            ax.plot(steps, values, lw=1, label=name)
        values = np.concatenate([np.asarray(v) for v in curves.values()])
        if np.all(values[np.isfinite(values)] > 0):
            ax.set_yscale("log")
        ax.set(title=label, xlabel="step", ylabel="loss term")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=90)
    return path


def stratified_sample(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """About ``count`` indices, the same share of every class, in a seeded order."""
    labels = np.asarray(labels)
    per_class = max(1, count // max(len(np.unique(labels)), 1))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def tsne(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of (N, d) points (scikit-learn, PCA initialisation, seeded)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 4)))
    with measure("tsne"):
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            np.asarray(points, np.float64)
        )


def draw_common_space(embedded: dict, labels, class_names, title: str, path: Path) -> Path:
    """Scatter of ``{model name: (N, 2) points}`` (the same N images per model): colour is
    the image's class, marker the model."""
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    cmap = "tab10" if len(class_names) <= 10 else "tab20" if len(class_names) <= 20 else "hsv"
    vmax = max(len(class_names) - 1, 1)
    for marker, (model, points) in zip(itertools.cycle(MARKERS), embedded.items(), strict=False):
        ax.scatter(
            *points.T,
            c=labels,
            cmap=cmap,
            vmin=0,
            vmax=vmax,
            marker=marker,
            s=9,
            alpha=0.7,
            linewidths=0,
            label=model,
        )
    legend = ax.legend(title="model (marker); colour: class", fontsize="small", markerscale=2)
    for handle in legend.legend_handles:
        handle.set_color("0.3")
    ax.set(title=title, xticks=[], yticks=[])
    fig.savefig(path, dpi=90)
    return path


def draw(workdir, common_space: dict | None = None) -> list[Path]:
    """Draws every figure of ``workdir`` it has data for; returns their paths.
    ``common_space``: ``{'points': {model: (N, d)}, 'labels', 'class_names', 'title'}``
    (`cka_jax.stages.common_space`), or None for no t-SNE."""
    out = Path(workdir) / FIGURES_DIR
    out.mkdir(exist_ok=True)
    runs = runs_of(workdir)
    paths = [draw_accuracy(runs, out / "accuracy.png"), draw_losses(runs, out / "losses.png")]
    if common_space:
        points = common_space["points"]
        names = list(points)
        flat = tsne(np.concatenate([points[n] for n in names]))
        sizes = np.cumsum([0] + [len(points[n]) for n in names])
        embedded = {n: flat[a:b] for n, a, b in zip(names, sizes[:-1], sizes[1:], strict=True)}
        paths.append(
            draw_common_space(
                embedded,
                common_space["labels"],
                common_space["class_names"],
                common_space["title"],
                out / "common_space.png",
            )
        )
    return [p for p in paths if p is not None]
