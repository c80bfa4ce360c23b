"""Runs the reproduction study (configs/study.py) over seeds and writes its tables and figures.

    # natural images: CIFAR-10 (Table 2 + readings, 4 teachers) and Fashion-MNIST, 5 seeds
    python scripts/reproduce.py --cifar10=~/data/cifar10 \
        --fashion_mnist=/usr/share/datasets/fashion-mnist
    python scripts/reproduce.py --study=mnist         # the embedded-MNIST study, 3 seeds
    python scripts/reproduce.py --study=mnist --only=base --seeds=0  # one experiment, one seed
    python scripts/reproduce.py --study=mnist --dataset=dogs  # on a prepared paper dataset

Each (experiment, seed) is one `python -m cka_jax.main` process with its own workdir
(`<workdir>/<experiment>/seed_<s>`), so a killed study resumes where it stopped and a finished
run is not repeated. The seed selects the teachers' initialisation and labelled subset
(`tasks.seed`) as well as the students', so the spread over seeds covers the whole pipeline.

With ``--jobs=N > 1`` the runs go N at a time, each with single-threaded XLA: on a 2-core CPU
that is ~1.25x the throughput of one multi-threaded run, and a run's numbers do not depend on
what runs beside it. Same command, same machine -> same numbers.

Writes ``<out>/tables.md``, ``<out>/study.json`` (every row of every seed, wall times) and the
PNG figures (see study_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import study_report  # noqa: E402  (scripts/ is on sys.path when run as a script)

from configs import study  # noqa: E402

SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# Longest first, so the last runs of a parallel study overlap.
ORDER = (
    *study.STRONG_EXPERIMENTS,
    "cifar10",
    "fmnist",
    "cifar10_t4",
    "okd",
    "hard",
    "hetero",
    "base",
    "teachers4",
    "teachers3",
)
STUDIES = {
    "natural": dict(
        experiments=study.NATURAL_EXPERIMENTS,
        seeds="0,1,2,3,4",
        out="docs/results/natural",
        workdir="runs/study_natural",
    ),
    "mnist": dict(
        experiments=study.MNIST_EXPERIMENTS,
        seeds="0,1,2",
        out="docs/results/mnist",
        workdir="runs/study",
    ),
    # One set of teachers per layout, shared by the student seeds (`teacher_job`).
    "strong": dict(
        experiments=study.STRONG_EXPERIMENTS,
        seeds="0,1,2,3,4",
        out="runs/study_strong/report",
        workdir="runs/study_strong",
    ),
}
DATA_FLAGS = {
    "cifar10": ("cifar10",),
    "cifar10_t4": ("cifar10",),
    "fmnist": ("fashion_mnist",),
    "strong_mixed": ("cifar10",),
    "strong_mixed_calibrated": ("cifar10",),
    "strong_domain": ("cifar10",),
    "strong_union": ("cifar10", "fashion_mnist"),
}


def study_arg(experiment: str, dataset: str) -> str:
    return experiment + (f",{dataset}" if dataset else "")


def is_done(workdir: Path, methods) -> bool:
    results = workdir / "results.json"
    if not results.exists():
        return False
    done = {r["method"] for r in json.loads(results.read_text())["rows"]}
    return set(methods) <= done


def data_overrides(experiment: str, args) -> list[str]:
    """``--config.data.root=...`` (and ``union[i].root``) from the study's data flags."""
    roots = [getattr(args, flag) for flag in DATA_FLAGS.get(experiment, ())]
    fields = ["data"] + [f"union[{i}]" for i in range(len(roots) - 1)]
    return [
        f"--config.{field}.root={Path(root).expanduser()}"
        for field, root in zip(fields, roots, strict=True)
        if root
    ]


def launch(experiment: str, label: str, workdir: Path, overrides, args, repo: Path) -> dict:
    """One ``python -m cka_jax.main`` process into ``workdir`` (its output in log.txt)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.jobs > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA).strip()
    command = [
        sys.executable,
        "-m",
        "cka_jax.main",
        f"--config=configs/study.py:{study_arg(experiment, args.dataset)}",
        f"--workdir={workdir}",
        *overrides,
        *data_overrides(experiment, args),
        *[f"--config.{override}" for override in args.set],
    ]
    start = time.time()
    with open(workdir / "log.txt", "a") as log:
        code = subprocess.call(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    status = "ok" if code == 0 else f"failed (exit {code}); see {workdir / 'log.txt'}"
    print(f"{experiment} {label}: {status}, {wall:.0f} s", flush=True)
    return {"experiment": experiment, "seed": label, "status": status, "wall_s": round(wall, 1)}


def run_one(experiment, seed, args, repo: Path, shared_teachers=None) -> dict:
    """One (experiment, seed): its own teachers (``tasks.seed`` = seed), or those of the
    finished ``shared_teachers`` job (its record) with the tasks and held-out images of
    seed 0, so that only the student's seed varies."""
    workdir = Path(args.workdir).absolute() / experiment / f"seed_{seed}"
    methods = study.get_config(study_arg(experiment, args.dataset)).methods
    if is_done(workdir, methods):
        return {"experiment": experiment, "seed": seed, "status": "done before", "wall_s": 0}
    overrides = [f"--config.seeds=({seed},)"]
    if shared_teachers is None:
        overrides.append(f"--config.tasks.seed={seed}")
    else:
        teachers = shared_teachers
        if not teachers["status"].startswith(("ok", "done")):
            return {**teachers, "seed": seed, "status": f"teachers {teachers['status']}"}
        owner = study.SHARED_TEACHERS.get(experiment, experiment)
        overrides += ["--config.tasks.seed=0", teacher_checkpoints(teacher_dir(args, owner))]
    return launch(experiment, f"seed {seed}", workdir, overrides, args, repo)


def teacher_dir(args, experiment: str) -> Path:
    return Path(args.workdir).absolute() / experiment / "teachers"


def teacher_job(experiment, args, repo: Path) -> dict:
    """The experiment's teachers, trained once (``config.methods=()``: a teachers-only job)
    and shared by every student seed."""
    workdir = teacher_dir(args, experiment)
    if is_done(workdir, ()):
        return {"experiment": experiment, "seed": "teachers", "status": "done before", "wall_s": 0}
    return launch(experiment, "teachers", workdir, ["--config.methods=()"], args, repo)


def teacher_checkpoints(workdir: Path) -> str:
    """``--config.teachers=...`` naming each trained teacher of a teachers-only job."""
    names = json.loads((workdir / "tasks.json").read_text())["names"]
    entries = ", ".join(f"{{'checkpoint': '{workdir / 'teachers' / n}'}}" for n in names)
    return f"--config.teachers=({entries},)"


def run_all(experiments, seeds, args, repo: Path) -> list[dict]:
    """Every (experiment, seed), ``args.jobs`` at a time; with shared teachers (the strong
    study) see `run_shared`."""
    if args.study == "strong":
        return run_shared(experiments, seeds, args, repo)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        todo = [(e, s) for e in experiments for s in seeds]
        return list(pool.map(lambda es: run_one(*es, args, repo), todo))


def run_shared(experiments, seeds, args, repo: Path) -> list[dict]:
    """Jobs in the order [teachers of e, its seeds] for each experiment e; each worker takes
    the first job that is ready (a student seed once its teachers' job has finished), so no
    worker waits while another job could run, and the first experiment's students start as
    soon as its teachers exist. Experiments in `study.SHARED_TEACHERS` use another's."""
    owners = [study.SHARED_TEACHERS.get(e, e) for e in experiments]
    queue = []
    for e, owner in zip(experiments, owners, strict=True):
        if ("teachers", owner, None) not in queue:
            queue.append(("teachers", owner, None))
        queue += [("student", e, s) for s in seeds]
    done, records = {}, []
    ready = threading.Condition()

    def take():
        with ready:
            while True:
                for job in queue:
                    kind, e, _ = job
                    owner = study.SHARED_TEACHERS.get(e, e)
                    if kind == "teachers" or owner in done:
                        queue.remove(job)
                        return job, done.get(owner)
                if not queue:
                    return None, None
                ready.wait()

    def worker():
        while True:
            job, teachers = take()
            if job is None:
                return
            kind, e, seed = job
            if kind == "teachers":
                record = teacher_job(e, args, repo)
            else:
                record = run_one(e, seed, args, repo, teachers)
            with ready:
                records.append(record)
                if kind == "teachers":
                    done[e] = record
                ready.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="natural", choices=sorted(STUDIES))
    parser.add_argument("--workdir", default=None, help="default: runs/study_<study>")
    parser.add_argument("--out", default=None, help="default: docs/results/<study>")
    parser.add_argument("--seeds", default=None, help="default: 0-4 (natural, strong), 0-2 (mnist)")
    parser.add_argument("--only", default=None, help="comma-separated experiments of the study")
    parser.add_argument("--cifar10", default="", help="CIFAR-10 image folder (train/, test/)")
    parser.add_argument("--fashion_mnist", default="", help="folder of the 4 IDX files")
    parser.add_argument("--dataset", default="", help="mnist study: dogs | cars | cub | aircraft")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report_only", action="store_true", help="tables/figures only")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config override for every run, e.g. --set=epochs=1 (a quick smoke test)",
    )
    args = parser.parse_args()
    chosen = STUDIES[args.study]
    args.workdir = args.workdir or chosen["workdir"]
    args.out = args.out or chosen["out"]
    args.seeds = args.seeds or chosen["seeds"]
    args.only = args.only or ",".join(chosen["experiments"])
    repo = Path(__file__).resolve().parents[1]
    experiments = [e for e in ORDER if e in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(chosen["experiments"])
    if unknown:
        parser.error(
            f"unknown experiments {sorted(unknown)} for --study={args.study}; "
            f"valid: {chosen['experiments']}"
        )
    seeds = [int(s) for s in args.seeds.split(",")]

    start = time.time()
    runs = []
    if not args.report_only:
        runs = run_all(experiments, seeds, args, repo)
    failed = [r for r in runs if not r["status"].startswith(("ok", "done"))]
    study_wall = time.time() - start
    study_report.write(
        Path(args.workdir),
        Path(args.out),
        experiments=experiments,
        seeds=seeds,
        runs=runs,
        study_wall_s=study_wall,
        command=" ".join(["python", "scripts/reproduce.py", *sys.argv[1:]]),
        dataset=args.dataset,
    )
    print(f"study: {study_wall / 60:.1f} min; wrote {args.out}/tables.md and figures")
    if failed:
        sys.exit(f"{len(failed)} run(s) failed: " + "; ".join(r["status"] for r in failed))


if __name__ == "__main__":
    main()
