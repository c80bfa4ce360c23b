"""Two processes joined by `jax.distributed` on localhost (CPU collectives over gloo), each
feeding its own half of every batch, compute the same run as one process with two devices;
and how the join is configured."""

import os
import socket
import subprocess

import jax
import pytest

from cka_jax import distributed
from cka_jax.config import distributed_config
from tests.main_process import REPO, assert_same_run, main_command
from tests.xla_env import xla_flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_compute_the_same_run_as_one_process_with_two_devices(
    tiny_main_run, tmp_path
):
    """`tiny_main_run` is one process with two CPU devices; here two processes with one
    device each join over localhost and run the same command."""
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(1),
        "PYTHONUNBUFFERED": "1",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
    }
    joined = [
        subprocess.Popen(
            main_command(tmp_path),
            cwd=REPO,
            env={**env, "JAX_PROCESS_ID": str(i)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = []
    for proc in joined:
        try:
            out, _ = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for p in joined:
                p.kill()
            pytest.fail(f"timed out:\n{proc.communicate()[0][-3000:]}")
        assert proc.returncode == 0, out[-3000:]
        logs.append(out)

    for i, log in enumerate(logs):
        assert f"process {i} of 2; 1 local / 2 global devices" in log
    assert "| kd |" in logs[0] and "| kd |" not in logs[1]  # process 0 reports
    # Every parameter, BatchNorm statistic and Adam moment after the last step, of the
    # student and of both teachers (trained by the two processes together), and results.json.
    runs = ("runs/kd/seed_0", "teachers/task0.run", "teachers/task1.run")
    assert_same_run(tiny_main_run, tmp_path, runs)


@pytest.mark.parametrize(
    "fields, env, expected",
    [
        ({}, {}, None),  # a single process: nothing to join
        (
            {"coordinator_address": "h0:1234", "num_processes": 4, "process_id": 3},
            {},
            {"coordinator_address": "h0:1234", "num_processes": 4, "process_id": 3},
        ),
        (  # the environment fills what the config leaves out
            {"process_id": 1},
            {"JAX_COORDINATOR_ADDRESS": "h0:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
            {"coordinator_address": "h0:9", "num_processes": 2, "process_id": 1},
        ),
        ({"initialize": True}, {}, {}),  # Slurm / Open MPI / TPU: JAX detects the rest
    ],
)
def test_initialize_joins_with_the_config_or_environment(monkeypatch, fields, env, expected):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    cfg = distributed_config()
    cfg.update(fields)
    distributed.initialize(cfg)
    assert calls == ([] if expected is None else [expected])


def test_failed_join_names_what_to_check(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    cfg = distributed_config()
    cfg.coordinator_address = "h0:1"
    with pytest.raises(distributed.DistributedInitError, match="JAX_NUM_PROCESSES='two'"):
        distributed.initialize(cfg)

    def refuse(**kwargs):
        raise RuntimeError("connection refused")

    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    with pytest.raises(distributed.DistributedInitError, match="connection refused.*process id"):
        distributed.initialize(cfg)
