"""Preemption: SIGTERM or SIGINT during training stops the run cleanly and resumably.

Clusters preempt a job by sending SIGTERM and, after a grace period (30 s by default on
Kubernetes and Slurm), SIGKILL. Without a handler the process dies at once and the steps
since the last checkpoint are lost. During `cka_jax.train.loop.fit` (and only then: the
handlers are installed for one fit and the previous ones restored after it) the first
SIGTERM or SIGINT (Ctrl-C) is noted, the step in flight finishes, the loop writes a
checkpoint of that step, flushes the metrics and raises `Preempted`; ``python -m
cka_jax.main`` then exits with `EXIT_CODE`. Rerunning the same command resumes from that
checkpoint and ends bit-identical to a run never interrupted. A second signal stops at once,
as if no handler were installed (SIGTERM kills the process, SIGINT raises
KeyboardInterrupt), without a checkpoint.

Several processes (`cka_jax.infra.distributed`) must stop at the same step, since every step is a
collective computation and the checkpoint is written by all of them together, although the
signal may reach only some of them. After every step each process contributes its "stop
requested" flag to a tiny all-reduce (a max over one int per device, outside the train
step); its result is read one step later, so the host never waits for the device inside the
step loop, and every process reads the same value after the same step and stops there: the
step after the one at which the first flag was seen. One process needs no agreement: a
Python flag, read after every step.

`EXIT_CODE` is 75, sysexits.h's EX_TEMPFAIL ("a temporary failure; the user is invited to
retry"): the run did not fail and loses nothing when rerun. It differs from 0 (the run is
not finished, so a scheduler must not count it as done), from 1 (a crash) and 2 (a user
error, `cka_jax.main`), and from 143/130 (128 + the signal: killed without saving), so a job
script can requeue on 75 alone.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

EXIT_CODE = 75  # EX_TEMPFAIL: stopped cleanly, rerun to resume
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):  # noqa: N818 - what happened, not an error
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; rerun to resume."""

    exit_code = EXIT_CODE


class StopRequests:
    """Installs handlers for SIGTERM and SIGINT while in its ``with`` block (main thread
    only: Python delivers signals there; elsewhere nothing is installed); ``received`` is
    the first signal's number, or None."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()
        if exc_type is None and self.received is not None:
            # It came after the last check, so nothing stopped for it: deliver it again to
            # the handler now in place (the default one ends the process; the run's final
            # checkpoint is written, so a rerun resumes from there).
            signal.raise_signal(self.received)

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second signal: stop now, as without a handler
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        # os.write, not logging or print: a buffered stream may be mid-write in this thread.
        os.write(
            2,
            f"{time.strftime('%H:%M:%S')} {signal.Signals(signum).name} received: stopping "
            "after the current step with a checkpoint (send it again to stop at once, "
            "without one)\n".encode(),
        )


class StopAgreement:
    """Whether to stop after the step just run; the same answer in every process."""

    def __init__(self, requests: StopRequests):
        self.requests = requests
        self.multi = jax.process_count() > 1
        self.pending = None  # the all-reduce started after the previous step
        if self.multi:
            devices = jax.devices()
            mesh = Mesh(np.array(devices), ("processes",))
            self._sharding = NamedSharding(mesh, P("processes"))
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
            self._count = len(devices)

    def after_step(self) -> bool:
        """Called after every step: True when every process is to stop now."""
        if not self.multi:
            return self.requests.received is not None
        started, previous = self._start(), self.pending
        self.pending = started
        return previous is not None and self._read(previous)

    def at_end(self) -> bool:
        """Called once after the last step: True when a stop was requested anywhere (the
        flags as they are now; they are never cleared)."""
        if not self.multi:
            return self.requests.received is not None
        self.pending = None
        return self._read(self._start())

    def _start(self):
        flags = np.full((self._count,), int(self.requests.received is not None), np.int32)
        local = jax.make_array_from_callback(flags.shape, self._sharding, lambda i: flags[i])
        return self._any(local)

    @staticmethod
    def _read(result) -> bool:
        return bool(np.asarray(result.addressable_data(0)))
