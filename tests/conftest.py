"""Every test process sees two CPU devices, so data-parallel code runs for real.

(JAX's persistent compilation cache is deliberately not used: on the CPU backend of
jax 0.10 a cached train step aborted the process when its outputs were fetched.)
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402 - after the environment is set


@pytest.fixture(scope="session")
def tiny_main_run(tmp_path_factory):
    """The tiny main job run once, start to end, in a fresh process with two CPU devices."""
    from tests.main_process import run_main

    workdir = tmp_path_factory.mktemp("tiny_main_run")
    run_main(workdir, env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    return workdir
