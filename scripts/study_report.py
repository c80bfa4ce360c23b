"""Tables and figures of the reproduction study, from the runs' results.json / metrics.jsonl.

Writes into ``out``:
  tables.md                 Table 2 (per setting), Table 3, Table 4, more teachers, wall times;
                            every row's paired difference to Vanilla KD with its 95%
                            t-interval, and the smallest difference the design can detect
  study.json                every row of every seed, the runs' wall times, the machine
  accuracy_vs_epoch.png     merged test accuracy after each epoch, mean over seeds
  table2_bars.png           the Table 2 analogues with +-1 std error bars
  tsne_common_space.png     t-SNE of student and teacher features in the learned common space
  gradient_shares.png       CKA's per-term gradient shares over training (natural study)
"""

from __future__ import annotations

import functools
import json
import os
import platform
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cka_jax import methods
from cka_jax.config import resolve_method  # noqa: E402
from cka_jax.data import eval_kwargs, eval_preprocess  # noqa: E402
from cka_jax.models import (
    create_model,  # noqa: E402
    storage,
)
from cka_jax.stages import (  # noqa: E402
    inputs,
    report,
    teachers,  # noqa: E402
)
from cka_jax.train.step import build_heads  # noqa: E402
from cka_jax.train.students import PeerStudent  # noqa: E402
from configs import study  # noqa: E402

TABLE2 = ("supervised", "teachers", "ensemble", "kd", "cfl", "cka_intra", "cka_inter", "cka")
LABELS = {
    "supervised": "Supervised",
    "ensemble": "Ensemble",
    "ensemble:none": "Ensemble, uncalibrated",
    "oracle_routing": "Ensemble, oracle routing (reads labels: a bound)",
    "kd": "Vanilla KD",
    "cfl": "CFL",
    "cka_intra": "CKA-Intra",
    "cka_inter": "CKA-Inter",
    "cka": "CKA",
}
SETTINGS = {
    "base": "teachers on 25% of their digits",
    "hard": "teachers on 10% of their digits",
    "cifar10": "CIFAR-10, 2 teachers",
    "cifar10_t4": "CIFAR-10, 4 teachers",
    "fmnist": "Fashion-MNIST, 2 teachers",
    "strong_mixed": "CIFAR-10 classes 0-4 | 5-9 (animals and vehicles mixed), strong teachers",
    "strong_mixed_calibrated": "the same teachers, targets calibrated for routing",
    "strong_domain": "CIFAR-10 vehicles | animals, strong teachers",
    "strong_union": "CIFAR-10 + Fashion-MNIST, one strong teacher each",
}
STRONG_TABLE = (
    "teachers",
    "ensemble",
    "oracle_routing",
    "kd",
    "cfl",
    "cka_intra",
    "cka_inter",
    "cka",
    "supervised",
)
# The paper's claims in a setting: (claim, method, reference); "holds" when the paired
# 95% interval of merged(method) - merged(reference) lies above 0.
CLAIMS = (
    ("CKA > KD", "cka", "kd"),
    ("CKA > CFL", "cka", "cfl"),
    ("CKA > CKA-Intra", "cka", "cka_intra"),
    ("CKA > CKA-Inter", "cka", "cka_inter"),
    ("KD >= ensemble", "kd", "ensemble"),
    ("CKA >= ensemble", "cka", "ensemble"),
)
POWER = 0.8  # of the minimum detectable difference
ALPHA = 0.05


def label(method: str) -> str:
    if method.startswith("teacher:task"):
        return f"Teacher {int(method.removeprefix('teacher:task')) + 1}"
    return LABELS.get(method, method)


def run_dir(workdir: Path, experiment: str, seed: int) -> Path:
    return workdir / experiment / f"seed_{seed}"


def load_rows(workdir: Path, experiment: str, seeds) -> list[dict]:
    rows = []
    for seed in seeds:
        path = run_dir(workdir, experiment, seed) / "results.json"
        if path.exists():
            for row in json.loads(path.read_text())["rows"]:
                rows.append({**row, "seed": seed})
    return rows


def ordered(summary: dict, order) -> list[str]:
    out = []
    for name in order:
        if name == "teachers":
            out += [m for m in summary if m.startswith("teacher:")]
        elif name in summary:
            out.append(name)
    return out


def paired_diffs(rows: list[dict], method: str, reference: str = "kd") -> list[float]:
    """``merged(method) - merged(reference)`` on each seed both ran (a row of the teachers,
    e.g. the ensemble, pairs with every seed of its workdir).

    Each seed has its own teachers, so the spread across seeds is mostly the teachers'; the
    paired difference removes it and is what tells two methods apart."""
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["method"], {})[r["seed"]] = r["merged_acc"]
    if method not in by_seed or reference not in by_seed:
        return []
    seeds = sorted(set(by_seed[method]) & set(by_seed[reference]))
    return [by_seed[method][s] - by_seed[reference][s] for s in seeds]


def paired_stats(diffs: list[float]) -> dict | None:
    """Mean, sample std, the 95% t-interval of the mean paired difference, and the minimum
    detectable difference: the true mean difference a paired two-sided t-test at level
    ALPHA finds with probability POWER, given this std and n,
    ``(t_{1-ALPHA/2, n-1} + t_{POWER, n-1}) * sd / sqrt(n)``."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return None
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    se = sd / np.sqrt(n)
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1) * se)
    mde = float((stats.t.ppf(1 - ALPHA / 2, n - 1) + stats.t.ppf(POWER, n - 1)) * se)
    return {"n": n, "mean": mean, "sd": sd, "ci": (mean - half, mean + half), "mde": mde}


def verdict(st: dict | None) -> str:
    """'higher' / 'lower' when the 95% interval excludes 0, else 'cannot be told apart'."""
    if st is None:
        return "-"
    low, high = st["ci"]
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "cannot be told apart"


def claim_verdict(rows, method, reference, *, at_least=False) -> str:
    """'holds' / 'does not hold' / 'cannot be told apart' for merged(method) > (or >=)
    merged(reference), from the paired 95% interval; with the interval."""
    st = paired_stats(paired_diffs(rows, method, reference))
    if st is None:
        return "-"
    low, high = st["ci"]
    if at_least:  # ">=": holds unless the interval lies below 0
        word = "does not hold" if high < 0 else ("holds" if low > 0 else "cannot be told apart")
    else:
        word = "holds" if low > 0 else ("does not hold" if high < 0 else "cannot be told apart")
    return f"{word}: {st['mean']:+.2f} [{low:+.2f}, {high:+.2f}], detectable Δ {st['mde']:.2f}"


def verdicts(rows) -> str:
    lines = ["| Claim | Verdict: paired Δ [95% interval] |", "|---|---|"]
    for claim, method, reference in CLAIMS:
        verdict_text = claim_verdict(rows, method, reference, at_least=">=" in claim)
        lines.append(f"| {claim} | {verdict_text} |")
    return "\n".join(lines)


def strong_sections(summaries: dict, rows: dict) -> list[str]:
    sections = []
    for exp in ("strong_mixed", "strong_domain", "strong_union"):
        if exp not in summaries:
            continue
        teachers = [
            f"{label(m)} {next(v for v in s['task_acc_mean'].values() if v is not None):.1f}%"
            for m, s in summaries[exp].items()
            if m.startswith("teacher:")
        ]
        names = ordered(summaries[exp], STRONG_TABLE)
        sections.append(
            f"## `{exp}`: {SETTINGS[exp]}\n\nTeachers within their task: "
            + ", ".join(teachers)
            + ".\n\n"
            + table(summaries[exp], names, rows=rows[exp])
            + "\n\nAgainst the ensemble (paired by seed):\n\n"
            + table(summaries[exp], names, rows=rows[exp], reference="ensemble")
            + "\n\n"
            + verdicts(rows[exp])
        )
    if "strong_mixed_calibrated" in summaries and "strong_mixed" in summaries:
        sections.append(calibrated_section(summaries, rows))
    return sections


def calibrated_section(summaries: dict, rows: dict) -> str:
    """Routing: the calibrated ensemble and students beside the uncalibrated ones (the same
    teachers, seeds paired), against the uncalibrated ensemble."""
    plain, cal = rows["strong_mixed"], rows["strong_mixed_calibrated"]
    merged = [
        {**r, "method": "ensemble:none"} if r["method"] == "ensemble" else r
        for r in plain
        if r["method"] in ("ensemble", "kd", "cka", "oracle_routing", "supervised")
    ]
    merged += [
        {**r, "method": f"{r['method']}:calibrated"}
        for r in cal
        if r["method"] in ("ensemble", "kd", "cka")
    ]
    summary = report.summarize(merged)
    names = [
        n
        for n in (
            "ensemble:none",
            "ensemble:calibrated",
            "kd",
            "kd:calibrated",
            "cka",
            "cka:calibrated",
            "oracle_routing",
            "supervised",
        )
        if n in summary
    ]
    kind = study.STUDY_CALIBRATION
    titles = [
        label(n.removesuffix(":calibrated")) + (f", calibrated ({kind})" if ":cal" in n else "")
        for n in names
    ]
    return f"## Routing (`strong_mixed`, calibration `{kind}`)\n\n" + table(
        summary, names, titles=titles, rows=merged, reference="ensemble:none"
    )


def table(summary: dict, names, *, titles=None, rows=None, reference="kd") -> str:
    task_names = list(summary[names[0]]["task_acc_mean"])
    ref = label(reference)
    paired = [f"Δ vs {ref} (paired)", "95% interval", "detectable Δ"] if rows else []
    header = ["Method", "Params", "Merged", *paired, "Routing", *task_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, name in enumerate(names):
        s = summary[name]
        n = len(s["seeds"])
        cells = [titles[i] if titles else label(name), report.params_text(s["params"])]
        cells.append(report.cell(s["merged_acc_mean"], s["merged_acc_std"], n))
        if rows:
            st = paired_stats(paired_diffs(rows, name, reference)) if name != reference else None
            if st is None:
                cells += ["-", "-", "-"]
            else:
                cells += [
                    f"{st['mean']:+.2f} ± {st['sd']:.2f}",
                    f"[{st['ci'][0]:+.2f}, {st['ci'][1]:+.2f}]",
                    f"{st['mde']:.2f}",
                ]
        cells.append(report.cell(s.get("routing_acc_mean"), s.get("routing_acc_std"), n))
        cells += [report.cell(s["task_acc_mean"][t], s["task_acc_std"][t], n) for t in task_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def titled_table(summary: dict, entries, rows, reference="kd") -> str:
    """A table of ``(title, method)`` entries, leaving out methods that did not run."""
    entries = [(title, name) for title, name in entries if name in summary]
    titles = [t for t, _ in entries]
    return table(summary, [n for _, n in entries], titles=titles, rows=rows, reference=reference)


def okd_table(summary: dict, rows) -> str:
    """MCL-OKD's comparison: the leader (the deployed peer) and the ensemble of all peers
    for each peer method, against the same network trained alone (paired by seed)."""
    entries = [("Network trained alone (supervised)", "supervised")]
    for name, title in (
        ("independent", "4 independent peers"),
        ("dml", "DML (mutual KL)"),
        ("mcl_okd", "MCL-OKD"),
        ("mcl_okd_kd", "MCL-OKD + KD from the teachers"),
        ("independent_branch", "Branch-based: 4 independent branches"),
        ("mcl_okd_branch", "Branch-based: MCL-OKD"),
    ):
        ensemble = name + PeerStudent.ENSEMBLE_SUFFIX
        entries += [(f"{title}: leader", name), (f"{title}: ensemble", ensemble)]
    entries += [(f"Teacher {t + 1}", f"teacher:task{t}") for t in range(2)]
    return titled_table(summary, entries, rows, reference="supervised")


def table3(summary: dict, rows) -> str:
    """Ablations and readings: each row against full CKA's Table 2 neighbours (paired)."""
    return titled_table(
        summary,
        [
            ("CKA (all terms, Eq. 12; Eq. 5 as chosen: mean-scaled, T = 0.2)", "cka"),
            ("without intra-model contrast (= CKA-Inter)", "cka_inter"),
            ("without inter-model contrast (= CKA-Intra)", "cka_intra"),
            ("without alignment (MMD, Eq. 6)", "cka_no_align"),
            ("without reconstruction guard", "cka_no_recon"),
            ("Eq. 5 as first implemented: l2 features, T = 1 (inert maps)", "cka_l2_t1"),
            ("Eq. 5 as written: raw features, T = 1", "cka_raw_t1"),
            ("CKA-Inter, euclidean distance", "cka_inter"),
            ("CKA-Inter, cosine distance", "cka_inter_cosine"),
            ("CKA-Inter, MMD distance", "cka_inter_mmd"),
        ],
        rows,
    )


def table4(summary: dict, cfg, rows) -> str:
    models = teachers.teacher_model_configs(cfg, len(cfg.teachers))
    entries = [
        (f"Teacher {t + 1} ({m.arch}, width {m.width})", f"teacher:task{t}")
        for t, m in enumerate(models)
    ]
    entries += [("Ensemble", "ensemble"), (f"Vanilla KD (student width {cfg.student.width})", "kd")]
    widths = {"cka": cfg.student.width, **{n: v.student.width for n, v in cfg.variants.items()}}
    entries += [
        (f"CKA (student width {w})", n) for n, w in sorted(widths.items(), key=lambda x: x[1])
    ]
    return titled_table(summary, entries, rows)


def teachers_table(summaries: dict) -> str:
    """Merged accuracy against the number of teachers (CFL Table 6)."""
    lines = [
        "| Teachers | Teacher task acc. (mean) | Ensemble | Vanilla KD | CKA |",
        "|---|---|---|---|---|",
    ]
    for n, summary in summaries.items():
        teacher_acc = [
            np.mean([v for v in s["task_acc_mean"].values() if v is not None])
            for m, s in summary.items()
            if m.startswith("teacher:")
        ]
        cells = [str(n), f"{np.mean(teacher_acc):.2f}"]
        for method in ("ensemble", "kd", "cka"):
            s = summary[method]
            cells.append(report.cell(s["merged_acc_mean"], s["merged_acc_std"], len(s["seeds"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2_section(exp: str, summaries: dict, rows: dict) -> str:
    return f"## Table 2 analogue, `{exp}` ({SETTINGS[exp]})\n\n" + table(
        summaries[exp], ordered(summaries[exp], TABLE2), rows=rows[exp]
    )


def natural_sections(summaries: dict, rows: dict) -> list[str]:
    sections = [table2_section(e, summaries, rows) for e in ("cifar10", "fmnist") if e in summaries]
    if "cifar10" in summaries and "cka_l2_t1" in summaries["cifar10"]:
        sections.append(
            "## Table 3 analogue: Eq. 5's readings and the inter distances (`cifar10`)\n\n"
            + table3(summaries["cifar10"], rows["cifar10"])
        )
    if "cifar10_t4" in summaries:
        sections.append(
            "## Four teachers (`cifar10_t4`)\n\n"
            + table(
                summaries["cifar10_t4"],
                ordered(summaries["cifar10_t4"], TABLE2),
                rows=rows["cifar10_t4"],
            )
        )
        if "cifar10" in summaries:
            sections.append(
                "## More teachers on CIFAR-10\n\n"
                + teachers_table({2: summaries["cifar10"], 4: summaries["cifar10_t4"]})
            )
    return sections


def mnist_sections(summaries: dict, rows: dict, suffix: str) -> list[str]:
    sections = [table2_section(e, summaries, rows) for e in ("base", "hard") if e in summaries]
    if "hard" in summaries and "cka_no_align" in summaries["hard"]:
        sections.append(
            "## Table 3 analogue: ablations (`hard`)\n\n" + table3(summaries["hard"], rows["hard"])
        )
    if "hetero" in summaries:
        cfg = study.get_config("hetero" + suffix)
        sections.append(
            "## Table 4 analogue: heterogeneous teachers, students of three sizes (`hetero`)"
            "\n\n" + table4(summaries["hetero"], cfg, rows["hetero"])
        )
    if "okd" in summaries:
        sections.append(
            "## MCL-OKD: online distillation among 4 peers (`okd`, 50 labelled digits per "
            "class)\n\n" + okd_table(summaries["okd"], rows["okd"])
        )
    counts = {2: "hard", 3: "teachers3", 4: "teachers4"}
    more = {n: summaries[e] for n, e in counts.items() if e in summaries}
    if len(more) > 1:
        sections.append(
            "## More teachers (CFL Table 6), weak-teacher setting\n\n" + teachers_table(more)
        )
    return sections


# --- figures ------------------------------------------------------------------------------


def epoch_curves(workdir: Path, experiment: str, seeds, method: str, key="eval/merged_acc"):
    curves = []
    for seed in seeds:
        path = run_dir(workdir, experiment, seed) / "runs" / method / f"seed_{seed}"
        path = path / "metrics.jsonl"
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            curves.append([x[key] for x in lines if key in x])
    curves = [c for c in curves if c]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    return np.mean([c[:length] for c in curves], axis=0)


CURVE_NAMES = {
    "eval/merged_acc": ("accuracy_vs_epoch", "merged test acc. (%)"),
    "eval/selection_score": ("agreement_vs_epoch", "agreement with teachers, held-out (%)"),
}


def plot_curves(workdir, out: Path, experiments, seeds, summaries, key="eval/merged_acc", tag=""):
    """Mean over seeds of ``key`` after each epoch, one panel per experiment: test accuracy,
    or (``eval/selection_score``) the label-free curve: agreement with the teachers on
    held-out training images."""
    stem, ylabel = CURVE_NAMES[key]
    fig, axes = plt.subplots(1, len(experiments), figsize=(6 * len(experiments), 4.2))
    for ax, exp in zip(np.atleast_1d(axes), experiments, strict=True):
        for method in ("supervised", "kd", "cfl", "cka_intra", "cka_inter", "cka"):
            curve = epoch_curves(workdir, exp, seeds, method, key)
            if curve is not None:
                ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", label=label(method))
        ensemble = summaries[exp].get("ensemble")
        if ensemble and key == "eval/merged_acc":
            ax.axhline(ensemble["merged_acc_mean"], color="k", ls="--", label="Ensemble")
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.set_title(textwrap.fill(f"{exp}: {SETTINGS.get(exp, '')}", 60), fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}{'_' + tag if tag else ''}.png", dpi=110)
    plt.close(fig)


def plot_bars(out: Path, summaries, experiments):
    fig, ax = plt.subplots(figsize=(11, 4.2))
    names = ordered(summaries[experiments[0]], TABLE2)
    width = 0.8 / len(experiments)
    for i, exp in enumerate(experiments):
        s = summaries[exp]
        means = [s[n]["merged_acc_mean"] for n in names]
        stds = [s[n]["merged_acc_std"] for n in names]
        x = np.arange(len(names)) + (i - (len(experiments) - 1) / 2) * width
        ax.bar(x, means, width, yerr=stds, capsize=3, label=f"{exp}: {SETTINGS.get(exp, '')}")
    ax.set_xticks(np.arange(len(names)), [label(n) for n in names], rotation=20)
    ax.set_ylabel("merged accuracy (%), mean ± std over seeds")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "table2_bars.png", dpi=110)
    plt.close(fig)


def common_space_features(workdir: Path, experiment_arg: str, seed: int, method_name: str, n=500):
    """Student and teacher features in the method's common space on ``n`` test images."""
    import orbax.checkpoint as ocp

    cfg = study.get_config(experiment_arg)
    cfg.seeds, cfg.tasks.seed = (seed,), seed
    base = run_dir(workdir, experiment_arg.split(",")[0], seed)
    if "root" in cfg.data:  # where the run read its data (e.g. --cifar10=DIR)
        cfg.data.root = json.loads((base / "config.json").read_text())["data"]["root"]
    taskset, dataset = inputs.prepare_data(cfg)
    frozen = [storage.load_model(base / "teachers" / name)[:2] for name in taskset.names]
    method_base, loss_cfg, student_cfg = resolve_method(cfg, method_name)
    method = methods.build_method(method_base, loss_cfg)
    heads = build_heads(method, tuple(m for m, _ in frozen))
    student = create_model(
        student_cfg.arch, taskset.num_classes, stem=student_cfg.stem, width=student_cfg.width
    )
    manager = ocp.CheckpointManager(base / "runs" / method_name / f"seed_{seed}" / "checkpoints")
    state = manager.restore(
        manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )["state"]
    manager.close()
    student_vars = {"params": state["params"]["student"], "batch_stats": state["batch_stats"]}
    preprocess = functools.partial(eval_preprocess, **eval_kwargs(cfg.augment))

    @jax.jit
    def forward(images):
        x = preprocess(images)
        s_feat = student.apply(student_vars, x)[1]
        t_feats = [m.apply(v, x)[1] for m, v in frozen]
        common = heads.apply({"params": state["params"]["heads"]}, s_feat, t_feats)
        pool = lambda f: f.mean(axis=(1, 2)) if f.ndim == 4 else f
        return [pool(common["student_common"])] + [pool(f) for f in common["teacher_common"]]

    index = np.sort(np.random.default_rng(0).permutation(len(dataset.test))[:n])
    test = dataset.test.take(index)
    chunks = [forward(test.images[i : i + 100]) for i in range(0, len(test), 100)]
    features = [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
    return features, test.labels


def plot_tsne(workdir, out: Path, experiment_arg: str, seed: int, method_names):
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(method_names), figsize=(6.5 * len(method_names), 5.5))
    markers = ["o", "^", "s", "D", "v"]
    for ax, method in zip(np.atleast_1d(axes), method_names, strict=True):
        features, labels = common_space_features(workdir, experiment_arg, seed, method)
        embedded = TSNE(2, init="pca", random_state=0, perplexity=30).fit_transform(
            np.concatenate(features)
        )
        n = len(labels)
        for k in range(len(features)):
            who = "student" if k == 0 else f"teacher {k}"
            part = embedded[k * n : (k + 1) * n]
            ax.scatter(
                *part.T,
                c=labels,
                cmap="tab10",
                vmin=0,
                vmax=9,
                s=9,
                marker=markers[k],
                alpha=0.7,
                label=who,
            )
        ax.set(title=f"{label(method)}: common space (t-SNE), {experiment_arg} seed {seed}")
        ax.set_xticks([])
        ax.set_yticks([])
        legend = ax.legend(fontsize=8, markerscale=2)
        for handle in legend.legend_handles:
            handle.set_color("gray")
    fig.tight_layout()
    fig.savefig(out / "tsne_common_space.png", dpi=110)
    plt.close(fig)


def plot_gradient_shares(workdir: Path, out: Path, experiment: str, seeds, method="cka"):
    """Each CKA term's share of the student's gradient against the step, mean over seeds."""
    per_seed = []
    for seed in seeds:
        path = run_dir(workdir, experiment, seed) / "runs" / method / f"seed_{seed}"
        path = path / "metrics.jsonl"
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            per_seed.append([x for x in lines if any(k.startswith("grad_share/") for k in x)])
    per_seed = [p for p in per_seed if p]
    if not per_seed:
        return
    length = min(len(p) for p in per_seed)
    steps = [x["step"] for x in per_seed[0][:length]]
    terms = sorted(k.removeprefix("grad_share/") for k in per_seed[0][0] if "grad_share/" in k)
    fig, ax = plt.subplots(figsize=(7, 4))
    for term in terms:
        share = np.mean([[x[f"grad_share/{term}"] for x in p[:length]] for p in per_seed], 0)
        ax.plot(steps, share, marker=".", label=term)
    ax.axhline(0.05, color="k", ls=":", lw=1, label="5%")
    ax.set(
        title=f"{label(method)} on {experiment}: share of the student's gradient, "
        f"mean over {len(per_seed)} seeds",
        xlabel="step",
        ylabel="|w_k grad term_k| / sum",
        ylim=(0, 1),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gradient_shares.png", dpi=110)
    plt.close(fig)


# --- the report ---------------------------------------------------------------------------


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def write(workdir, out, *, experiments, seeds, runs, study_wall_s, command, dataset=""):
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "study.json"
    commands = [{"command": command, "wall_s": round(study_wall_s, 1)}]
    ran = [r for r in runs if r.get("wall_s")]
    if previous.exists():
        # Runs not repeated by this command keep the wall times measured when they ran.
        old = json.loads(previous.read_text())
        old_commands = old.get("commands") or [
            {"command": old["command"], "wall_s": old["study_wall_s"]}
        ]
        redone = {(r["experiment"], r["seed"]) for r in ran}
        runs = [r for r in old["runs"] if (r["experiment"], r["seed"]) not in redone] + ran
        commands = old_commands + (commands if ran else [])
        experiments = list(dict.fromkeys([*experiments, *old["rows"]]))
    rows = {e: load_rows(workdir, e, seeds) for e in experiments}
    summaries = {e: report.summarize(r) for e, r in rows.items() if r}
    suffix = f",{dataset}" if dataset else ""
    ran_by = "; ".join(f"`{c['command']}` ({c['wall_s'] / 60:.1f} min)" for c in commands)
    sections = [
        f"Commands: {ran_by}. Seeds {seeds}; accuracy in % on the union test set, "
        "mean ± sample std over seeds. Δ: the paired difference to Vanilla KD on the same "
        f"seed (mean ± std), its 95% t-interval, and the smallest true difference a paired "
        f"t-test at 5% detects with {POWER:.0%} power given that spread."
    ]
    sections += strong_sections(summaries, rows)
    sections += natural_sections(summaries, rows)
    sections += mnist_sections(summaries, rows, suffix)
    walls = [r for r in runs if r.get("wall_s")]
    if walls:
        lines = ["| Experiment | Seed | Wall (s) |", "|---|---|---|"]
        lines += [f"| {r['experiment']} | {r['seed']} | {r['wall_s']:.0f} |" for r in walls]
        sections.append("## Wall time per run\n\n" + "\n".join(lines))
    (out / "tables.md").write_text("\n\n".join(sections) + "\n")
    study_json = {
        "commands": commands,
        "seeds": list(seeds),
        "machine": machine(),
        "runs": runs,
        "rows": rows,
        "summaries": summaries,
    }
    previous.write_text(json.dumps(study_json, indent=1, sort_keys=True))
    strong = [e for e in ("strong_mixed", "strong_domain", "strong_union") if e in summaries]
    if strong:
        plot_curves(workdir, out, strong, seeds, summaries, "eval/merged_acc", "strong")
        plot_curves(workdir, out, strong, seeds, summaries, "eval/selection_score", "strong")
    table2 = [e for e in ("cifar10", "fmnist", "base", "hard") if e in summaries]
    if table2:
        plot_curves(workdir, out, table2, seeds, summaries)
        plot_bars(out, summaries, table2)
    tsne = next((e for e in ("cifar10", "hard") if e in summaries), None)
    if tsne:
        present = [m for m in ("cfl", "cka") if m in summaries[tsne]]
        if present:
            plot_tsne(workdir, out, tsne + ("" if tsne == "cifar10" else suffix), seeds[0], present)
    if "cifar10" in summaries:
        plot_gradient_shares(workdir, out, "cifar10", seeds)
