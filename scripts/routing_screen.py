"""Screens the teacher calibrations (cka_jax.calibration) by the ensemble they give, without
training any student: fitted on unlabelled training images, scored on held-out ones.

    python scripts/routing_screen.py --workdir=runs/study_strong/strong_mixed/teachers \
        [--out=screen.json]

The workdir is a run of `python -m cka_jax.main` whose teachers were trained with
``config.teacher_validation_fraction`` > 0: the images each teacher held out of its training
(unseen by every teacher) are the validation split; every other training image is the fit
set (its labels are never read by a calibration). The validation labels are read here only
to rank the calibrations, as a researcher choosing one; the test set is not read at all.
Also prints each teacher's energy AUROC (own-task vs other-task validation images), and a
linear task probe trained *with* the fit set's task labels: how much routing signal the
teachers' features hold.
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

from cka_jax import calibration, checkpoint, evaluate  # noqa: E402
from cka_jax.data import eval_kwargs, eval_preprocess  # noqa: E402
from cka_jax.experiment import prepare_data  # noqa: E402
from cka_jax.teachers import validation_indices  # noqa: E402


def teacher_outputs(models, split, aug_cfg, batch_size=500):
    """Per teacher, (N, K_t) logits and (N, D_t) pooled features, float64."""
    kwargs = eval_kwargs(ml_collections.FrozenConfigDict(aug_cfg))
    logits, features = [], []
    for model, variables in models:

        def forward(v, images, model=model):
            z, f = model.apply(v, eval_preprocess(images, **kwargs))
            return jax.numpy.concatenate([z, f.mean(axis=(1, 2))], -1)

        out = evaluate.predict(evaluate.jit_gathered(forward), variables, split, batch_size).astype(
            np.float64
        )
        k = model.num_classes
        logits.append(out[:, :k])
        features.append(out[:, k:])
    return calibration.TeacherOutputs(tuple(logits), tuple(features))


def auroc(scores, positive):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def score(name, params, outputs, labels, taskset):
    scores = calibration.CALIBRATIONS[name].apply(
        params,
        [jax.numpy.asarray(z, np.float32) for z in outputs.logits],
        [jax.numpy.asarray(f, np.float32) for f in outputs.features],
    )
    return evaluate.accuracies(np.concatenate([np.asarray(s) for s in scores], -1), labels, taskset)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default="")
    parser.add_argument("--clusters_per_class", default="1,2,4,8,16")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    taskset, dataset = prepare_data(cfg)
    models = [checkpoint.load_model(workdir / "teachers" / n)[:2] for n in taskset.names]
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
    oracle = evaluate.oracle_routing_scores(list(val_out.logits), val_split.labels, taskset)
    report["oracle"] = evaluate.accuracies(oracle, val_split.labels, taskset)
    rows = []
    candidates = [(n, {}) for n in calibration.CALIBRATIONS if n != "cluster_vote"]
    candidates += [
        ("cluster_vote", {"clusters_per_class": int(c)}) for c in args.clusters_per_class.split(",")
    ]
    for name, options in candidates:
        start = time.time()
        params = calibration.CALIBRATIONS[name].fit(fit_out, **options)
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
        f"{report['labelled_probe_routing']:.2f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
