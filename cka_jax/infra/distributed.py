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
import numpy as np

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
    # SIGTERM is cka_jax's (`cka_jax.infra.preemption`: a checkpoint, then exit code 75).
    # JAX's preemption notifier would install a C handler that swallows SIGTERM whenever no
    # training runs (it only flags a sync point cka_jax does not poll), so a preempted job
    # would linger until SIGKILL instead of ending.
    jax.config.update("jax_enable_preemption_service", False)
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


def local_rows(sharding, batch_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` rows, sharded over its first axis by
    ``sharding``, that this process's devices hold: all of them for one process, else the
    contiguous block of its devices."""
    if jax.process_count() == 1:
        return slice(0, batch_size)
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    starts = sorted(idx[0].start or 0 for idx in index_map.values())
    stops = sorted(idx[0].stop or batch_size for idx in index_map.values())
    if any(b != a for a, b in zip(stops[:-1], starts[1:], strict=True)):
        raise ValueError("this process's devices do not hold a contiguous block of the batch")
    return slice(starts[0], stops[-1])


def put_rows(sharding, local: dict[str, np.ndarray], batch_size: int) -> dict:
    """Global arrays of ``batch_size`` rows sharded by ``sharding``, from this process's
    rows (`local_rows`) of each: the whole batch for one process."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
        for k, v in local.items()
    }
