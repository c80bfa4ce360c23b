"""Every test process sees two CPU devices, so data-parallel code runs for real.

The suite runs in parallel workers (pytest-xdist, one test file per worker at a time); a
session fixture that starts a whole run is built once for all workers (`built_once`).
(JAX's persistent compilation cache is deliberately not used: on the CPU backend of
jax 0.10 a cached train step aborted the process when its outputs were fetched.)
"""

import fcntl
import os
import shutil

from tests.xla_env import xla_flags  # imports no jax

os.environ.setdefault("XLA_FLAGS", xla_flags(2))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402 - after the environment is set


def built_once(tmp_path_factory, name, build):
    """The directory ``name``, filled by ``build(directory)`` once for every xdist worker
    of this session: the first worker builds it under a file lock, the others wait and
    reuse it. Users of the directory only read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    directory = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            (root / f"{name}.done").touch()
    return directory


@pytest.fixture(scope="session")
def tiny_main_run(tmp_path_factory):
    """The tiny main job run once, start to end, in a fresh process with two CPU devices;
    what it printed is beside the workdir, in ``<workdir>.log``."""
    from tests.main_process import run_main

    def build(workdir):
        env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
        printed = run_main(workdir, "--config.figures=True", env=env)
        workdir.with_suffix(".log").write_text(printed)

    return built_once(tmp_path_factory, "tiny_main_run", build)


@pytest.fixture(scope="session")
def all_methods_run(tmp_path_factory):
    """The tiny main job in this process with every loss term and student kind:
    ``(config, workdir, table)``.
    The peer methods run 2 branch-based peers sharing all but the last stage (the cheapest;
    network-based peers are exercised by the step tests). Only tests/stages/test_experiment.py
    uses it, so one xdist worker builds it; a test there reruns the experiment in it."""
    from cka_jax.methods import BUILT_IN_METHODS
    from cka_jax.stages import experiment
    from tests import tiny_config

    cfg = tiny_config.get_config()
    # Every loss term and student kind once. Left out, as rows of terms that run here
    # (their rows are checked in test_methods): `independent` (DML without its mutual
    # term), the CKA ablations `cka_intra` / `cka_inter` and `mcl_okd_kd` (MCL-OKD + KD).
    cfg.methods = ("kd", "cfl", "cka", "supervised", "dml", "mcl_okd")
    assert set(cfg.methods) <= set(BUILT_IN_METHODS)
    cfg.loss.inter_kind = "mmd"
    cfg.peers.num_peers = 2
    cfg.peers.shared_stages = 3
    cfg.figures = True  # the t-SNE of a common space (cka's)
    workdir = tmp_path_factory.mktemp("all_methods")
    table = experiment.run(cfg, workdir)
    # A test reruns the job in this workdir, which rewrites timing.json: keep this run's.
    shutil.copy(workdir / "timing.json", workdir.parent / "all_methods_timing.json")
    return cfg, workdir, table
