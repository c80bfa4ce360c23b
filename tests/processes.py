"""Jobs of several real processes joined by `jax.distributed` over localhost, for the
multi-process tests: the environment that joins them, starting them, and collecting them."""

import socket
import subprocess

import pytest

from tests.main_process import REPO
from tests.xla_env import xla_flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def joined_env(base: dict, processes: int = 2) -> dict:
    """``base`` plus what makes ``processes`` processes of one CPU device each join."""
    return {
        **base,
        "XLA_FLAGS": xla_flags(1),
        "PYTHONUNBUFFERED": "1",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}",
        "JAX_NUM_PROCESSES": str(processes),
    }


def start_joined(command, env: dict, processes: int = 2) -> list[subprocess.Popen]:
    """``command`` started once per process id, stdout and stderr together as text."""
    return [
        subprocess.Popen(
            command,
            cwd=REPO,
            env={**env, "JAX_PROCESS_ID": str(i)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(processes)
    ]


def collect(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's output once it ends; on a timeout every process is killed and the
    test fails with the late one's output."""
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"timed out:\n{proc.communicate()[0][-3000:]}")
    return outs
