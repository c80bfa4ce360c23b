"""How the join of several processes (`jax.distributed`) is configured. Two real joined
processes computing the same run as one process with two devices, through a preemption, are
tested in test_preemption.py; their sharded evaluation in test_evaluate_sharded.py."""

import jax
import pytest

from cka_jax.config import distributed_config
from cka_jax.infra import distributed


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
