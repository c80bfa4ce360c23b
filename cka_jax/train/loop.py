"""The training loop shared by teacher training and every amalgamation method.

`fit` runs the one train step over a seeded, resumable batch order; fetches metrics from the
device every `log_every` steps (no host sync per step); every `log_every` steps logs what
each loss term contributes (`cka_jax.methods.diagnostics`, a separate jitted function, so the step
itself is unchanged); checks every loss term for NaN/inf before any checkpoint is written;
evaluates at each epoch end; checkpoints every `checkpoint_every` steps and at the end; and
resumes from the newest loadable checkpoint. SIGTERM or SIGINT (a cluster preempting the job,
Ctrl-C) ends the step in flight, writes a checkpoint of it and raises `Preempted`
(`cka_jax.infra.preemption`); every process of a multi-process run stops at the same step.

Model selection never looks at the test set: ``evaluate`` (test accuracy) only reports. The
kept model (`Keep`) is the final one, or, with ``Keep.select``, the best by that label-free
score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from cka_jax.data import num_batches, train_batch
from cka_jax.infra.checkpoint import DiskFullError, RunCheckpoints
from cka_jax.infra.distributed import is_primary
from cka_jax.infra.files import disk_full_message, is_disk_full
from cka_jax.infra.preemption import Preempted, StopAgreement, StopRequests
from cka_jax.infra.timing import measure
from cka_jax.infra.timing import run as timed_run
from cka_jax.models.storage import save_model
from cka_jax.train.runtime import Runner
from cka_jax.train.step import StepSpec, create_train_state

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How every training run of an experiment is driven: built once from the config
    (`FitOptions.from_config`), shared by the teachers and every method."""

    parallelism: str = "mesh"
    batch_size: int = 64
    log_every: int = 50  # steps between metric fetches (and diagnostics, when on)
    eval_every: int = 1  # epochs between evaluations; the last epoch always
    checkpoint_every: int = 0  # steps; 0 = at each epoch end; always at the end
    keep_checkpoints: int = 3
    diagnostics: bool = True  # per-term diagnostics every log_every steps (multi-term runs)

    @classmethod
    def from_config(cls, cfg) -> FitOptions:
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Keep:
    """What a run keeps besides its checkpoints: the model saved in ``directory`` (the
    final one, or with ``select`` (variables -> a label-free score, higher is better) the
    best by that score), described by ``meta``, after ``deploy`` (trained variables -> the
    variables of the kept network, e.g. MCL-OKD's leader)."""

    directory: Path | None = None
    meta: dict | None = None
    select: Callable[[dict], float] | None = None
    deploy: Callable[[dict], dict] = lambda variables: variables


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class FitResult:
    variables: dict  # the final student variables (host numpy)
    history: list[dict]  # one evaluation per evaluated epoch
    selected: dict | None  # {'epoch', 'step', 'score'} of the kept model (score None: final)
    diagnostics: list[dict]  # the per-term diagnostics, one dict per logged step
    wall_s: float


def _student_variables(state) -> dict:
    return {"params": state.params["student"], "batch_stats": state.batch_stats}


class MetricsLog:
    """Per-step metrics as JSON lines (and TensorBoard events when tensorboardX is there)."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool = True):
        self.enabled = enabled  # only process 0 of a multi-process run writes
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            # A resumed run rewrites what came after its checkpoint (and a last line torn by
            # a killed process).
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        with self._disk_full_as_error():
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # optional
            self.tb = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self._disk_full_as_error():
            self.file.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)

    def flush(self) -> None:
        """Hands the written lines to the OS, so that a killed process keeps them."""
        if self.enabled:
            with self._disk_full_as_error():
                self.file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        try:
            with self._disk_full_as_error():
                self.file.close()
        finally:
            if self.tb is not None:
                self.tb.close()

    @contextlib.contextmanager
    def _disk_full_as_error(self):
        """A metrics line the disk has no room for is a `DiskFullError`, not a traceback."""
        try:
            yield
        except OSError as err:
            if not is_disk_full(err):
                raise
            kept = "The run's checkpoints are intact."
            raise DiskFullError(disk_full_message("metrics", self.path, None, kept)) from err


def _scalars(result: dict, prefix: str) -> dict:
    """The scalar entries of an evaluation, nested ones (a peer ensemble's) flattened."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif np.isscalar(value):
            out[prefix + key] = value
    return out


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fit(
    *,
    name: str,
    spec: StepSpec,
    options: FitOptions,
    student_variables: dict,
    teacher_variables: list,
    split,
    epochs: int,
    seed: int,
    run_dir,
    evaluate: Callable[[dict], dict] | None = None,
    keep: Keep = Keep(),
) -> FitResult:
    """Trains ``spec.student`` (and heads) on ``split``; resumes from ``run_dir``.

    ``evaluate`` (student variables -> test metrics) runs at every ``eval_every``-th epoch
    end and the last; it is reported only and never chooses a model (``keep.select`` does).
    """
    return _Fit(name, spec, options, split, epochs, seed, Path(run_dir), evaluate, keep).run(
        student_variables, teacher_variables
    )


class _Fit:
    """One training run: the step loop, its logging, evaluation, model keeping and
    checkpoints (`fit`)."""

    def __init__(self, name, spec, options, split, epochs, seed, run_dir, evaluate, keep):
        self.name, self.spec, self.options, self.split = name, spec, options, split
        self.seed, self.run_dir, self.evaluate, self.keep = seed, run_dir, evaluate, keep
        run_dir.mkdir(parents=True, exist_ok=True)
        self.runner = Runner(spec, options.parallelism)
        self.runner.check_batch_size(options.batch_size)
        self.steps_per_epoch = num_batches(len(split), options.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{name}: batch_size {options.batch_size} is larger than the training split "
                f"({len(split)} images); lower batch_size"
            )
        self.total_steps = epochs * self.steps_per_epoch
        self.checkpoint_every = options.checkpoint_every or self.steps_per_epoch
        # A single term's share is 1 by construction: nothing to diagnose.
        diagnose = options.diagnostics and len(spec.method.terms) > 1
        self.diagnose_every = options.log_every if diagnose else 0
        self.pending: list[tuple[int, dict]] = []
        self.pending_diagnostics: list[tuple[int, dict]] = []

    def run(self, student_variables, teacher_variables) -> FitResult:
        # SIGTERM/SIGINT are handled for the whole fit, and only then (a stop elsewhere loses
        # no work); one that comes before the first step stops the run after it.
        with StopRequests() as requests, timed_run(self.name):
            return self._run(student_variables, teacher_variables, requests)

    def _run(self, student_variables, teacher_variables, requests: StopRequests) -> FitResult:
        spec, runner, options = self.spec, self.runner, self.options
        with measure("setup"):
            state = create_train_state(
                spec, student_variables, teacher_variables, jax.random.key(self.seed)
            )
        with measure("checkpoints"):
            self.checkpoints = RunCheckpoints(
                self.run_dir / "checkpoints", max_to_keep=options.keep_checkpoints
            )
            self.meta = {"history": [], "selected": None, "diagnostics": []}
            restored = self.checkpoints.restore_latest(jax.device_get(state))
        if restored is not None:
            state, meta = restored
            self.meta.update(meta)
            log.info("%s: resuming from step %d", self.name, int(state.step))
        start = int(state.step)
        self.saved_step = start if restored is not None else None
        with measure("logging"):  # (the first run imports tensorboardX)
            self.metrics_log = MetricsLog(self.run_dir, start, enabled=is_primary())
        self.state = runner.put_state(state)
        teachers = runner.put_replicated(teacher_variables)
        self.t_start = self.t_window = time.time()
        self.steps_window = 0
        try:
            with measure("train_steps"):
                self._loop(start, teachers, requests)
        finally:
            try:
                self.metrics_log.close()
            finally:
                self.checkpoints.close()
        final = runner.get_state(self.state)
        return FitResult(
            variables=self.keep.deploy(_student_variables(final)),
            history=self.meta["history"],
            selected=self.meta["selected"],
            diagnostics=self.meta["diagnostics"],
            wall_s=time.time() - self.t_start,
        )

    def _loop(self, start: int, teachers, requests: StopRequests) -> None:
        """The steps from ``start``; stops early (`Preempted`) when asked to."""
        stop = StopAgreement(requests)
        for step in range(start, self.total_steps):
            self._step(step, teachers)
            if stop.after_step():
                self._stop(step + 1, requests)
        self._flush()
        if stop.at_end():  # asked during the last step: its checkpoint is written already
            self._stop(self.total_steps, requests)

    def _stop(self, done: int, requests: StopRequests) -> None:
        """Ends a run asked to stop after step ``done``: its metrics flushed, its checkpoint
        written (unless it was a checkpoint step), then `Preempted`."""
        self._flush()
        if self.saved_step != done:
            self._save(done)
        why = f"by {requests.signal_name}" if requests.signal_name else "with the other processes"
        raise Preempted(
            f"{self.name}: stopped {why} after step {done} of {self.total_steps}; its "
            f"checkpoint is in {self.checkpoints.directory}. Rerun the same command to "
            "resume from it."
        )

    def _save(self, done: int) -> None:
        # The metrics of every step up to a checkpoint are on disk before it is: a run killed
        # after it resumes there with the whole metrics history.
        jax.block_until_ready(self.state)  # the steps before it are train time
        with measure("checkpoints"):
            self.metrics_log.flush()
            self.checkpoints.save(done, self.runner.get_state(self.state), self.meta)
        self.saved_step = done

    def _step(self, step: int, teachers) -> None:
        runner, batch_size = self.runner, self.options.batch_size
        rows = runner.local_rows(batch_size)
        with measure("input"):
            batch = runner.put_batch(train_batch(self.split, batch_size, self.seed, step, rows))
        if self.diagnose_every and (step + 1) % self.diagnose_every == 0:
            # The step about to run, term by term (on its own state and batch).
            jax.block_until_ready(self.state)
            with measure("diagnostics"):
                diagnosis = jax.block_until_ready(runner.diagnose(self.state, teachers, batch))
            self.pending_diagnostics.append((step + 1, diagnosis))
        self.state, metrics = runner.step(self.state, teachers, batch)
        self.pending.append((step + 1, metrics))
        self.steps_window += 1
        done = step + 1
        epoch_end = done % self.steps_per_epoch == 0
        if len(self.pending) >= self.options.log_every or epoch_end or done == self.total_steps:
            self._flush()
        epoch = done // self.steps_per_epoch
        if epoch_end and (epoch % self.options.eval_every == 0 or done == self.total_steps):
            self._evaluate_and_keep(done, epoch)
        if done % self.checkpoint_every == 0 or done == self.total_steps:
            self._flush()
            self._save(done)

    def _flush(self) -> None:
        """Fetches the pending metrics (one host sync), checks them, logs them."""
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        schedule = self.spec.learning_rate
        lines = []  # (step, 0: metrics / 1: diagnostics, values)
        for (step, _), values in zip(self.pending, fetched, strict=True):
            values = {k: float(v) for k, v in values.items()}
            self._check_finite(step, values)
            if schedule is not None:  # the rate of this step's update (count step - 1)
                values["lr"] = float(schedule(step - 1))
            lines.append((step, 0, values))
        for step, values in jax.device_get(self.pending_diagnostics):
            values = {k: round(float(v), 6) for k, v in values.items()}
            lines.append((step, 1, values))
            self.meta["diagnostics"].append({"step": step, **values})
        # In step order, so that metrics.jsonl does not depend on which steps were fetched
        # together (a resumed run fetches at other steps than an uninterrupted one).
        for step, _, values in sorted(lines, key=lambda line: line[:2]):
            self.metrics_log.write(step, values)
        self._log_progress({k: float(v) for k, v in fetched[-1].items()})
        self.pending.clear()
        self.pending_diagnostics.clear()
        self.t_window, self.steps_window = time.time(), 0

    def _check_finite(self, step: int, values: dict) -> None:
        for key in sorted(values, key=lambda k: (k == "loss", k)):
            if not math.isfinite(values[key]):
                latest = self.checkpoints.manager.latest_step()
                raise NonFiniteLossError(
                    f"{self.name}: loss term '{key}' became {values[key]} at step {step}; "
                    f"stopped. The last good checkpoint (step {latest}) is kept in "
                    f"{self.checkpoints.directory}. Lower the learning rate or check the inputs."
                )

    def _log_progress(self, last: dict) -> None:
        last_step, batch_size = self.pending[-1][0], self.options.batch_size
        rate = self.steps_window * batch_size / max(time.time() - self.t_window, 1e-9)
        eta = (self.total_steps - last_step) * batch_size / max(rate, 1e-9)
        terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in last.items() if k.startswith("loss/"))
        shares = ""
        if self.pending_diagnostics:
            latest = self.meta["diagnostics"][-1]
            shares = " grad share " + " ".join(
                f"{k[11:]} {v:.2f}" for k, v in latest.items() if k.startswith("grad_share/")
            )
        log.info(
            "[%s] step %d/%d epoch %d loss %.4f (%s)%s %.0f img/s ETA %s",
            self.name,
            last_step,
            self.total_steps,
            (last_step - 1) // self.steps_per_epoch + 1,
            last["loss"],
            terms,
            shares,
            rate,
            _format_eta(eta),
        )

    def _evaluate_and_keep(self, done: int, epoch: int) -> None:
        host = _student_variables(self.runner.get_state(self.state))
        with measure("evaluation"):
            measured = self.evaluate(host) if self.evaluate else {}
        record = {"epoch": epoch, "step": done, **measured}
        keep = self.keep
        with measure("selection"):
            score = keep.select(host) if keep.select is not None else None
        if score is not None:
            record["selection_score"] = score
        self.meta["history"].append(record)
        scores = {k: v for k, v in record.items() if k not in ("epoch", "step")}
        self.metrics_log.write(done, {"epoch": epoch, **_scalars(scores, "eval/")})
        log.info("[%s] epoch %d eval %s", self.name, epoch, _rounded(record))
        if keep.directory is None:
            return
        selected = self.meta["selected"]
        improved = score is not None and (selected is None or score > selected["score"])
        if improved or (keep.select is None and done == self.total_steps):
            self.meta["selected"] = {"epoch": epoch, "step": done, "score": score}
            with measure("checkpoints"):
                save_model(keep.directory, keep.deploy(host), keep.meta or {})


def _rounded(value, digits: int = 2):
    """Numbers rounded for the log (nested dicts too)."""
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, digits)
    return value
