"""Where a job's wall time goes: per stage and per training run, by kind of work.

A job activates one `Timing` (`Timing.active`); code marks its work with
``with measure("evaluation"):`` and its scope with ``with stage("teachers"):`` or
``with run("kd seed 0"):``. Every second of the job lands in exactly one cell
(stage, run, category): a section's time is its own wall time less the sections nested in it
(exclusive time), and the time spent compiling inside it goes to ``compile`` instead
(JAX reports each trace, lowering and backend compilation through `jax.monitoring`; each
backend compilation is counted). What no section covers is ``unaccounted_s``.

Sections are wall clocks around calls that block: asynchronous device work is charged to
the section that waits for it, so the training loop blocks on the train state before it
starts an evaluation, diagnostics or checkpoint section (once per such event, not per step).
Without an active `Timing`, `measure`, `stage` and `run` do nothing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import jax

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_BACKEND_COMPILE = _COMPILE_EVENTS[2]
_active: Timing | None = None


@dataclasses.dataclass
class _Frame:
    key: tuple[str, str, str]  # (stage, run, category)
    started: float
    nested_s: float = 0.0  # wall time of the sections inside this one
    compile_s: float = 0.0  # compile time while this was the innermost section


class Timing:
    """The seconds of one job by (stage, run, category), and its compilation count."""

    def __init__(self):
        self.seconds: dict[tuple[str, str, str], float] = collections.defaultdict(float)
        self.compilations: dict[tuple[str, str], int] = collections.Counter()
        self.scope = ["", ""]  # the current (stage, run)
        self.frames: list[_Frame] = []
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def active(self):
        """Makes this the timing that `measure`, `stage`, `run` and compilations report to."""
        global _active
        _install_listener()
        previous, _active = _active, self
        try:
            yield self
        finally:
            _active = previous

    @contextlib.contextmanager
    def section(self, category: str, stage: str | None = None, run: str | None = None):
        saved = list(self.scope)
        if stage is not None:
            self.scope[:] = [stage, ""]
        if run is not None:
            self.scope[1] = run
        frame = _Frame((*self.scope, category), time.perf_counter())
        self.frames.append(frame)
        try:
            yield
        finally:
            self.frames.pop()
            wall = time.perf_counter() - frame.started
            stage_run = frame.key[:2]
            self.seconds[frame.key] += max(wall - frame.nested_s - frame.compile_s, 0.0)
            if frame.compile_s:
                self.seconds[(*stage_run, "compile")] += frame.compile_s
            if self.frames:
                self.frames[-1].nested_s += wall
            self.scope[:] = saved

    def on_compile(self, event: str, seconds: float) -> None:
        if not self.frames:
            return  # outside every section: part of unaccounted_s
        self.frames[-1].compile_s += seconds
        if event == _BACKEND_COMPILE:
            self.compilations[tuple(self.frames[-1].key[:2])] += 1

    def to_dict(self) -> dict:
        """The breakdown as written to timing.json (seconds, rounded to ms)."""
        total = time.perf_counter() - self.started
        cells = [
            {"stage": s, "run": r, "category": c, "seconds": round(v, 3)}
            for (s, r, c), v in self.seconds.items()
            if v > 0
        ]
        by_category = collections.defaultdict(float)
        for (_, _, category), value in self.seconds.items():
            by_category[category] += value
        runs = collections.defaultdict(lambda: collections.defaultdict(float))
        for (stage_name, run_name, category), value in self.seconds.items():
            runs[_label(stage_name, run_name)][category] += value
        compiled = collections.Counter()
        for (stage_name, run_name), count in self.compilations.items():
            compiled[_label(stage_name, run_name)] += count
        return {
            "total_s": round(total, 3),
            "unaccounted_s": round(total - sum(self.seconds.values()), 3),
            "compilations": sum(self.compilations.values()),
            "by_category": {k: round(v, 3) for k, v in sorted(by_category.items())},
            "by_run": {
                name: {
                    **{k: round(v, 3) for k, v in sorted(cats.items())},
                    "total": round(sum(cats.values()), 3),
                    "compilations": compiled[name],
                }
                for name, cats in runs.items()
            },
            "cells": cells,
        }

    def write(self, path: Path) -> dict:
        breakdown = self.to_dict()
        Path(path).write_text(json.dumps(breakdown, indent=2) + "\n")
        return breakdown


def _label(stage_name: str, run_name: str) -> str:
    return f"{stage_name}/{run_name}" if run_name else stage_name or "(no stage)"


def breakdown_text(breakdown: dict) -> str:
    """The breakdown as a few lines for the log: one per stage or run, then the totals."""
    lines = [f"time: {breakdown['total_s']:.1f} s in all, {breakdown['compilations']} compilations"]
    for name, cats in breakdown["by_run"].items():
        parts = ", ".join(
            f"{k} {v:.1f}"
            for k, v in sorted(cats.items(), key=lambda kv: -kv[1])
            if k not in ("total", "compilations") and v >= 0.05
        )
        lines.append(f"  {name}: {cats['total']:.1f} s ({parts})")
    totals = ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(breakdown["by_category"].items(), key=lambda kv: -kv[1])
    )
    lines.append(f"  by kind: {totals}, unaccounted {breakdown['unaccounted_s']:.1f} s")
    return "\n".join(lines)


def measure(category: str):
    """A section of ``category`` in the current stage and run (nothing without a timing)."""
    if _active is None:
        return contextlib.nullcontext()
    return _active.section(category)


def stage(name: str, category: str = "other"):
    """Work of stage ``name``; its time outside nested sections counts as ``category``."""
    if _active is None:
        return contextlib.nullcontext()
    return _active.section(category, stage=name)


def run(name: str):
    """A training run ``name`` inside the current stage; time outside its sections is 'other'."""
    if _active is None:
        return contextlib.nullcontext()
    return _active.section("other", run=name)


_listening = False


def _install_listener() -> None:
    global _listening
    if _listening:
        return

    def listener(event: str, seconds: float, **_) -> None:
        if _active is not None and event in _COMPILE_EVENTS:
            _active.on_compile(event, seconds)

    jax.monitoring.register_event_duration_secs_listener(listener)
    _listening = True
