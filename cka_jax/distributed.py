"""More than one process: JAX's multi-controller runtime, one process per host (or per GPU).

Every process runs the same program. `initialize` joins them into one JAX system before any
computation; the 'mesh' parallelism then spans every process's devices, each process feeds
its own rows of the global batch (`cka_jax.train.runtime.Runner.put_batch`), and XLA's
collectives (gloo on CPU, NCCL on GPU, ICI on TPU) make every process compute the same
step. Files in the workdir are written by process 0 only; orbax checkpoints are written by
every process together. The workdir must be on a filesystem every process sees.

Launch (the same command on every host, with its own process id):

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \
        python -m cka_jax.main --config=... --workdir=/shared/run

or set ``config.distributed`` (`cka_jax.config.distributed_config`). On Slurm, Open MPI
and Cloud TPU, JAX finds the three values itself: ``--config.distributed.initialize=True``
is enough.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


class DistributedInitError(RuntimeError):
    """The processes could not be joined (wrong address, count or id)."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedInitError(
            f"environment variable {name}={value!r} must be an integer"
        ) from None


def wants_initialize(dist_cfg) -> bool:
    return (
        bool(dist_cfg.initialize)
        or bool(dist_cfg.coordinator_address)
        or (ENV_ADDRESS in os.environ)
    )


def initialize(dist_cfg) -> None:
    """Joins this process to the others when the config or the environment asks for it.

    Must run before any JAX computation. A no-op for a single process.
    """
    if not wants_initialize(dist_cfg) or jax.distributed.is_initialized():
        return
    kwargs = {
        "coordinator_address": dist_cfg.coordinator_address or os.environ.get(ENV_ADDRESS),
        "num_processes": dist_cfg.num_processes
        if dist_cfg.num_processes is not None
        else _env_int(ENV_COUNT),
        "process_id": dist_cfg.process_id if dist_cfg.process_id is not None else _env_int(ENV_ID),
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as err:
        raise DistributedInitError(
            f"could not join the other processes ({err}). Give every process the same "
            f"coordinator address and process count and its own process id, via "
            f"config.distributed or {ENV_ADDRESS}/{ENV_COUNT}/{ENV_ID} (given: {kwargs})"
        ) from err
    log.info(
        "process %d of %d; %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_primary() -> bool:
    """Whether this process writes the workdir's files (reports, metrics, model exports)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
