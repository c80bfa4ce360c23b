"""What the user sees while a job runs: a line per stage and a whole-job progress line.

A job is its units of work: each teacher trained now and each (method, seed) student run.
After every unit the job line says how many are done, the time so far and an estimate of
the time left: the mean time of the finished units of the same kind (teacher or student)
times the units of that kind still to run. Units found finished in the workdir (a resumed
job) count as done and take no time in the estimate.
"""

from __future__ import annotations

import logging
import time

from cka_jax.infra.distributed import is_primary

log = logging.getLogger("cka_jax.infra.progress")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class JobProgress:
    """Stage lines and the job line (`stage`, `start`, `finish`); logs on process 0 only."""

    def __init__(self, teachers: int = 0, students: int = 0):
        self.todo = {"teacher": teachers, "student": students}
        self.durations: dict[str, list[float]] = {"teacher": [], "student": []}
        self.done = 0
        self.started = time.time()
        self.current: tuple[str, float] | None = None

    @property
    def total(self) -> int:
        """Units not finished yet."""
        return sum(self.todo.values())

    def add(self, kind: str, count: int) -> None:
        self.todo[kind] += count

    def _log(self, message: str, *args) -> None:
        if is_primary():
            log.info(message, *args)

    def stage(self, text: str, *args) -> None:
        """A stage line: ``== <text>``."""
        self._log("== " + text, *args)

    def start(self, kind: str, label: str) -> None:
        """Unit ``label`` of ``kind`` ('teacher' or 'student') begins: ``run k of n``."""
        self.current = (kind, time.time())
        self._log("== %s (run %d of %d)", label, self.done + 1, self.done + self.total)

    def finish(self, cached: bool = False) -> None:
        """The current unit ended; ``cached``: it was found finished in the workdir."""
        (kind, began), now = self.current, time.time()
        self.current = None
        self.done += 1
        if not cached:
            self.durations[kind].append(now - began)
        self.todo[kind] -= 1
        self._log(
            "job: %d of %d runs done, %s elapsed, %s",
            self.done,
            self.done + self.total,
            format_duration(now - self.started),
            self.eta_text(),
        )

    def eta_seconds(self) -> float | None:
        """Estimated time left, or None while a kind with units left has no timed unit."""
        left = 0.0
        for kind, count in self.todo.items():
            if count == 0:
                continue
            if not self.durations[kind]:
                return None
            left += count * sum(self.durations[kind]) / len(self.durations[kind])
        return left

    def eta_text(self) -> str:
        if self.total == 0:
            return "job finished"
        eta = self.eta_seconds()
        if eta is None:
            return "ETA after the first run of each kind"
        return f"ETA {format_duration(eta)}"
