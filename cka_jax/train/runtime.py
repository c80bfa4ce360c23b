"""Runs the one train step on devices: one device, a device mesh, or pmap.

'single' (jit), 'mesh' (jit with the batch sharded over a 'data' mesh axis; XLA inserts the
collectives) and 'pmap' (explicit all_gather of the outputs, pmean of the gradients,
BatchNorm statistics over the mapped axis) compute the same step. `Runner` places the state
and the batches and runs the step (and its diagnostics) in the chosen form.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cka_jax.infra.distributed import local_rows
from cka_jax.infra.xla_options import compiler_options, cpu_convolutions
from cka_jax.methods.choices import PARALLELISM
from cka_jax.train.step import StepSpec, TrainState, diagnose, train_step

PMAP_AXIS = "batch"
MESH_AXIS = "data"


def _mesh(devices, axis: str) -> Mesh:
    """The 1-D mesh of ``devices`` that the step's batch axis is sharded over."""
    return Mesh(np.array(devices), (axis,))


def _parallel(fn, spec: StepSpec, parallelism: str, devices: tuple, donate: tuple):
    """``fn(state, teacher_variables, batch, spec=, axis_name=)`` jitted (or pmapped) in
    one parallel form."""
    if parallelism == "pmap":
        pmap_student = spec.kind.with_bn_axis(spec.student, PMAP_AXIS)
        pmap_spec = dataclasses.replace(spec, student=pmap_student)
        mapped = lambda s, t, b: fn(s, t, b, spec=pmap_spec, axis_name=PMAP_AXIS)
        return jax.pmap(
            mapped,
            axis_name=PMAP_AXIS,
            in_axes=(0, None, 0),
            donate_argnums=donate,
            devices=devices,
        )
    plain = lambda s, t, b: fn(s, t, b, spec=spec)
    # pmap takes no compiler options: it keeps XLA's defaults.
    options = compiler_options(devices, spec.view_shape[0])
    if parallelism == "mesh":
        # The outputs stay whole on every device, so that every process of a multi-process
        # run can read them.
        replicated = NamedSharding(_mesh(devices, MESH_AXIS), P())
        return jax.jit(
            plain, donate_argnums=donate, out_shardings=replicated, compiler_options=options
        )
    return jax.jit(plain, donate_argnums=donate, compiler_options=options)


@functools.cache
def _step_function(spec: StepSpec, parallelism: str, devices: tuple, conv_kernels: str):
    """The jitted (or pmapped) step for ``spec``: one per distinct spec (and choice of CPU
    convolution kernels, `cka_jax.infra.xla_options`), so runs with equal specs in one process
    (seeds, tests) share XLA's compiled programs."""
    return _parallel(train_step, spec, parallelism, devices, donate=(0,))


def clear_compiled_steps() -> None:
    """Forgets every cached step (e.g. after swapping a model function for an A/B)."""
    _step_function.cache_clear()
    _diagnose_function.cache_clear()


@functools.cache
def _diagnose_function(spec: StepSpec, parallelism: str, devices: tuple, conv_kernels: str):
    return _parallel(diagnose, spec, parallelism, devices, donate=())


class Runner:
    """Places state and batches on the devices and runs the step in one parallel form."""

    def __init__(self, spec: StepSpec, parallelism: str, devices=None):
        if parallelism not in PARALLELISM:
            raise ValueError(f"parallelism must be one of {PARALLELISM}, got {parallelism!r}")
        if jax.process_count() > 1 and parallelism != "mesh":
            raise ValueError(
                f"parallelism={parallelism!r} runs on one process's devices, but "
                f"{jax.process_count()} processes were joined; use parallelism='mesh'"
            )
        self.devices = list(devices if devices is not None else jax.devices())
        if parallelism == "single":
            self.devices = self.devices[:1]
        self.parallelism = parallelism
        self.spec = spec
        axis = PMAP_AXIS if parallelism == "pmap" else MESH_AXIS
        self.mesh = _mesh(self.devices, axis)
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P(axis))
        self._step = _step_function(spec, parallelism, tuple(self.devices), cpu_convolutions())
        self.num_devices = len(self.devices)
        # Devices of this process: a process feeds num_local_devices / num_devices of a batch.
        me = jax.process_index()
        self.num_local_devices = sum(d.process_index == me for d in self.devices)

    def compile(self, state, teacher_variables, batch):
        """The step compiled ahead of time for these (placed) arguments; its
        ``cost_analysis()`` and ``memory_analysis()`` describe one update."""
        return self._step.lower(state, teacher_variables, batch).compile()

    def check_batch_size(self, batch_size: int):
        if batch_size % self.num_devices:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the {self.num_devices} devices; "
                "choose a multiple of the device count"
            )

    def put_state(self, state: TrainState):
        # From a host copy: the step donates its input, which must not alias the caller's.
        state = jax.device_get(state)
        if self.parallelism == "pmap":
            # pmap's arrays carry a leading device axis, sharded over the devices.
            n = self.num_devices
            state = jax.tree.map(lambda a: np.broadcast_to(a, (n, *np.shape(a))), state)
            return jax.device_put(state, self.sharded)
        return jax.device_put(state, self.replicated)

    def get_state(self, state: TrainState) -> TrainState:
        if self.parallelism == "pmap":
            state = jax.tree.map(lambda a: a[0], state)
        return jax.device_get(state)

    def put_replicated(self, tree):
        return jax.device_put(tree, self.replicated)

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch that this process feeds: all of them for one process,
        else the contiguous block its devices hold in the 'data' mesh axis."""
        return local_rows(self.sharded, batch_size)

    def put_batch(self, batch: dict):
        """Places a batch on the devices. ``batch`` holds this process's rows (`local_rows`)
        of the global batch: the whole batch for one process."""
        if self.parallelism == "pmap":
            n = self.num_devices
            batch = {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}
        if jax.process_count() == 1:
            return jax.device_put(batch, self.sharded)
        scale = self.num_devices // self.num_local_devices
        return {
            k: jax.make_array_from_process_local_data(
                self.sharded, v, (v.shape[0] * scale, *v.shape[1:])
            )
            for k, v in batch.items()
        }

    def step(self, state, teacher_variables, batch):
        """One update; metrics stay on the device (fetch them rarely)."""
        state, metrics = self._step(state, teacher_variables, batch)
        return state, self._first_device(metrics)

    def diagnose(self, state, teacher_variables, batch) -> dict:
        """The per-term diagnostics of the step at ``state`` (`step.diagnose`), on the device;
        compiled on first use, so runs that never ask pay nothing."""
        devices = tuple(self.devices)
        fn = _diagnose_function(self.spec, self.parallelism, devices, cpu_convolutions())
        return self._first_device(fn(state, teacher_variables, batch))

    def _first_device(self, tree):
        if self.parallelism == "pmap":
            return jax.tree.map(lambda a: a[0], tree)
        return tree
