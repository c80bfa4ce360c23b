"""Every test process sees two CPU devices, so data-parallel code runs for real.

(JAX's persistent compilation cache is deliberately not used: on the CPU backend of
jax 0.10 a cached train step aborted the process when its outputs were fetched.)
"""

import os

from tests.xla_env import xla_flags  # imports no jax

os.environ.setdefault("XLA_FLAGS", xla_flags(2))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402 - after the environment is set


@pytest.fixture(scope="session")
def tiny_main_run(tmp_path_factory):
    """The tiny main job run once, start to end, in a fresh process with two CPU devices;
    what it printed is beside the workdir, in ``<workdir>.log``."""
    from tests.main_process import run_main

    workdir = tmp_path_factory.mktemp("tiny_main_run")
    printed = run_main(workdir, env={**os.environ, "XLA_FLAGS": xla_flags(2)})
    workdir.with_suffix(".log").write_text(printed)
    return workdir


@pytest.fixture(scope="session")
def all_methods_run(tmp_path_factory):
    """The tiny main job in this process with every method: ``(config, workdir, table)``.
    The peer methods run 2 branch-based peers sharing all but the last stage (the cheapest;
    network-based peers are exercised by the step tests)."""
    from cka_jax import experiment
    from cka_jax.methods import BUILT_IN_METHODS
    from tests import tiny_config

    cfg = tiny_config.get_config()
    # Every method but `independent`: DML without its mutual term, nothing of its own to test.
    cfg.methods = tuple(m for m in BUILT_IN_METHODS if m != "independent")
    cfg.loss.inter_kind = "mmd"
    cfg.peers.num_peers = 2
    cfg.peers.shared_stages = 3
    workdir = tmp_path_factory.mktemp("all_methods")
    table = experiment.run(cfg, workdir)
    return cfg, workdir, table
