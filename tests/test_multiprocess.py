"""Two processes joined by `jax.distributed` on localhost (CPU collectives over gloo), each
feeding its own half of every batch, compute the same run as one process with two devices;
and how the join is configured."""

import os

import jax
import pytest

from cka_jax import distributed
from cka_jax.config import distributed_config
from tests.main_process import assert_same_run, main_command
from tests.processes import collect, joined_env, start_joined


@pytest.mark.slow
def test_two_processes_compute_the_same_run_as_one_process_with_two_devices(
    tiny_main_run, tmp_path
):
    """`tiny_main_run` is one process with two CPU devices; here two processes with one
    device each join over localhost and run the same command."""
    procs = start_joined(main_command(tmp_path), joined_env(os.environ))
    logs = collect(procs, timeout=400)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]

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
