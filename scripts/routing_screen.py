"""Screens the teacher calibrations (cka_jax.methods.calibration) by the ensemble they give, without
training any student: fitted on unlabelled training images, scored on held-out ones.

    python scripts/routing_screen.py --workdir=runs/study_strong/strong_mixed/teachers \
        [--out=screen.json] [--test]

The workdir is a run of `python -m cka_jax.main` whose teachers were trained with
``config.teacher_validation_fraction`` > 0: the images each teacher held out of its training
(unseen by every teacher) are the validation split; every other training image is the fit
set (its labels are never read by a calibration). The validation labels are read here only
to rank the calibrations, as a researcher choosing one; without ``--test`` the test set is
not read at all.
Also prints each teacher's energy AUROC (own-task vs other-task validation images), and a
linear task probe trained *with* the fit set's task labels: how much routing signal the
teachers' features hold; and a self-trained router (the same probe trained on the confident
pseudo task labels of the `standardize` ensemble instead: no label read). With ``--test``,
every calibration fitted on the fit set is also scored on the test images, with its paired
difference to 'none' (for the report, once the choice has been made on validation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cka_jax.evaluation import evaluate  # noqa: E402
from cka_jax.methods import calibration
from cka_jax.models import storage
from cka_jax.stages import calibrate
from cka_jax.stages.inputs import prepare_data  # noqa: E402
from cka_jax.stages.teachers import validation_indices  # noqa: E402


def teacher_outputs(models, split, aug_cfg, batch_size=500):
    """Per teacher, (N, K_t) logits and (N, D_t) pooled features, float64."""
    return calibrate.teacher_outputs(models, split, aug_cfg, batch_size, features=True)


def paired_difference(correct, reference):
    """Mean paired difference (points) of two per-image 0/1 vectors on the same images, its
    95% interval (normal, over images) and the difference detectable at 5% with 80% power."""
    d = 100.0 * (np.asarray(correct, float) - np.asarray(reference, float))
    se = d.std(ddof=1) / np.sqrt(len(d))
    return (
        float(d.mean()),
        (float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)),
        float(2.8 * se),
    )


def auroc(scores, positive):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def score(name, params, outputs, labels, taskset):
    return evaluate.accuracies(union_scores(name, params, outputs), labels, taskset)


def self_trained_router(x_fit, x_val, fit_std, val_std, val_labels, taskset, shares):
    """A label-free learned router: a logistic task classifier on the teachers' outputs
    ``x`` (standardized columns) trained on the pseudo task labels of the `standardize`
    ensemble, keeping per pseudo-task the ``share`` most confident images (margin between
    the two highest teacher blocks). Scored on the validation images as the ensemble routed
    by it (each teacher's own argmax within its classes)."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x_fit.mean(0), x_fit.std(0) + 1e-9
    x_fit, x_val = (x_fit - mean) / scale, (x_val - mean) / scale
    tops = np.stack([z.max(-1) for z in fit_std], -1)
    pseudo = np.argmax(tops, -1)
    margin = np.sort(tops, -1)[:, -1] - np.sort(tops, -1)[:, -2]
    offsets = np.cumsum([0, *[z.shape[1] for z in val_std]])[:-1]
    within = np.stack([o + np.argmax(z, -1) for o, z in zip(offsets, val_std, strict=True)], -1)
    owner = taskset.task_of(val_labels)
    rows = []
    for share in shares:
        keep = []
        for t in range(len(fit_std)):
            mine = np.flatnonzero(pseudo == t)
            keep.append(mine[np.argsort(-margin[mine])[: int(share * len(mine))]])
        keep = np.concatenate(keep)
        route = LogisticRegression(max_iter=3000).fit(x_fit[keep], pseudo[keep]).predict(x_val)
        pred = within[np.arange(len(route)), route]
        rows.append(
            {
                "share": share,
                "merged_acc": float(100 * np.mean(pred == np.asarray(val_labels))),
                "routing_acc": float(100 * np.mean(route == owner)),
            }
        )
        print(
            f"self-trained router, {share:.0%} most confident pseudo-labels: val merged "
            f"{rows[-1]['merged_acc']:6.2f} routing {rows[-1]['routing_acc']:6.2f}",
            flush=True,
        )
    return rows


def union_scores(name, params, outputs) -> np.ndarray:
    scores = calibration.CALIBRATIONS[name].apply(
        params,
        [jax.numpy.asarray(z, np.float32) for z in outputs.logits],
        [jax.numpy.asarray(f, np.float32) for f in outputs.features],
    )
    return np.concatenate([np.asarray(s) for s in scores], -1)


def test_rows(fitted, test_out, labels, taskset) -> list[dict]:
    """Each fitted calibration's ensemble on the test images: merged and routing accuracy and
    their paired difference to 'none' (same teachers, same images)."""
    labels = np.asarray(labels)
    owner = taskset.task_of(labels)
    correct = {}
    for name, options, params in fitted:
        pred = np.argmax(union_scores(name, params, test_out), -1)
        correct[name, json.dumps(options)] = (pred == labels, taskset.task_of(pred) == owner)
    base = correct["none", "{}"]
    rows = []
    for (name, options), (merged, routing) in correct.items():
        dm, ci, detectable = paired_difference(merged, base[0])
        rows.append(
            {
                "calibration": name,
                "options": json.loads(options),
                "merged_acc": 100 * float(merged.mean()),
                "routing_acc": 100 * float(routing.mean()),
                "delta_merged_vs_none": dm,
                "ci95": ci,
                "detectable": detectable,
            }
        )
        print(
            f"test {name:16s} {options:28s} merged {rows[-1]['merged_acc']:6.2f} routing "
            f"{rows[-1]['routing_acc']:6.2f} | vs none {dm:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] "
            f"detectable {detectable:.2f}",
            flush=True,
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default="")
    parser.add_argument("--clusters_per_class", default="1,2,4,8,16")
    parser.add_argument(
        "--test",
        action="store_true",
        help="after the screen, also score every calibration on the test set (for the report, "
        "once the choice is made: paired differences to 'none' over the test images)",
    )
    args = parser.parse_args()
    workdir = Path(args.workdir)
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    taskset, dataset = prepare_data(cfg)
    models = [storage.load_model(workdir / "teachers" / n)[:2] for n in taskset.names]
    val = np.concatenate(
        [
            validation_indices(cfg, taskset, dataset.train.labels, t)
            for t in range(taskset.num_tasks)
        ]
    )
    if not len(val):
        sys.exit("the teachers held out no images: train them with teacher_validation_fraction")
    fit_index = np.setdiff1d(np.arange(len(dataset.train)), val)
    fit_split, val_split = dataset.train.take(fit_index), dataset.train.take(np.sort(val))
    start = time.time()
    fit_out = teacher_outputs(models, fit_split, cfg.augment)
    val_out = teacher_outputs(models, val_split, cfg.augment)
    print(
        f"teacher outputs on {len(fit_split)} fit / {len(val_split)} validation images: "
        f"{time.time() - start:.0f} s"
    )
    owner = taskset.task_of(val_split.labels)
    energy = calibration.energies(val_out.logits)
    report = {"workdir": str(workdir), "fit_images": len(fit_split), "val_images": len(val)}
    report["energy_auroc"] = [auroc(energy[:, t], owner == t) for t in range(taskset.num_tasks)]
    from sklearn.linear_model import LogisticRegression

    x_fit = calibration.joint_features(fit_out.features)
    probe = LogisticRegression(max_iter=2000).fit(x_fit, taskset.task_of(fit_split.labels))
    report["labelled_probe_routing"] = float(
        100 * np.mean(probe.predict(calibration.joint_features(val_out.features)) == owner)
    )
    # The richer probe: features, each teacher's standardized logits and energy, with labels.
    std = calibration.fit_standardize(fit_out)

    def everything(out):
        z = [np.asarray(a) for a in calibration.apply_standardize(std, out.logits)]
        e = calibration.energies(out.logits)
        return np.concatenate([calibration.joint_features(out.features), *z, e], -1)

    probe = LogisticRegression(max_iter=4000).fit(
        everything(fit_out), taskset.task_of(fit_split.labels)
    )
    report["labelled_probe_all_outputs_routing"] = float(
        100 * np.mean(probe.predict(everything(val_out)) == owner)
    )
    report["self_trained_router"] = self_trained_router(
        everything(fit_out),
        everything(val_out),
        [np.asarray(z) for z in calibration.apply_standardize(std, fit_out.logits)],
        [np.asarray(z) for z in calibration.apply_standardize(std, val_out.logits)],
        val_split.labels,
        taskset,
        (0.3, 0.5, 0.7, 1.0),
    )
    oracle = evaluate.oracle_routing_scores(list(val_out.logits), val_split.labels, taskset)
    report["oracle"] = evaluate.accuracies(oracle, val_split.labels, taskset)
    rows, fitted = [], []
    candidates = [(n, {}) for n in calibration.CALIBRATIONS if n != "cluster_vote"]
    candidates += [
        ("cluster_vote", {"clusters_per_class": int(c)}) for c in args.clusters_per_class.split(",")
    ]
    for name, options in candidates:
        start = time.time()
        params = calibration.CALIBRATIONS[name].fit(fit_out, **options)
        fitted.append((name, options, params))
        fit_s = time.time() - start
        val_acc = score(name, params, val_out, val_split.labels, taskset)
        fit_acc = score(name, params, fit_out, fit_split.labels, taskset)
        rows.append(
            {
                "calibration": name,
                "options": options,
                "val": val_acc,
                "fit_images": fit_acc,
                "fit_s": round(fit_s, 1),
                "diagnostics": params.get("diagnostics", {}),
            }
        )
        print(
            f"{name:16s} {json.dumps(options):28s} val merged {val_acc['merged_acc']:6.2f} "
            f"routing {val_acc['routing_acc']:6.2f} | fit-set routing "
            f"{fit_acc['routing_acc']:6.2f} | fit {fit_s:.1f} s",
            flush=True,
        )
    report["rows"] = rows
    print(
        f"oracle routing: merged {report['oracle']['merged_acc']:.2f}; energy AUROC "
        f"{[round(a, 3) for a in report['energy_auroc']]}; labelled linear probe routing "
        f"{report['labelled_probe_routing']:.2f} (features, logits and energies: "
        f"{report['labelled_probe_all_outputs_routing']:.2f})"
    )
    if args.test:
        report["test"] = test_rows(
            fitted, teacher_outputs(models, dataset.test, cfg.augment), dataset.test.labels, taskset
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
