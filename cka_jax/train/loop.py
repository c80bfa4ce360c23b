"""The training loop shared by teacher training and every amalgamation method.

`fit` runs the one train step over a seeded, resumable batch order; fetches metrics from the
device every `log_every` steps (no host sync per step); every `diagnose_every` steps logs what
each loss term contributes (`cka_jax.diagnostics`, a separate jitted function, so the step
itself is unchanged); checks every loss term for NaN/inf before any checkpoint is written;
evaluates at each epoch end; checkpoints every `checkpoint_every` steps and at the end; and
resumes from the newest loadable checkpoint.

Model selection never looks at the test set: ``evaluate`` (test accuracy) only reports. The
kept model is the final one, or, with ``select``, the best by that label-free score.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from cka_jax.checkpoint import RunCheckpoints, save_model
from cka_jax.data import num_batches, train_batch
from cka_jax.distributed import is_primary
from cka_jax.train.step import Runner, StepSpec, create_train_state

log = logging.getLogger(__name__)


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
            # A resumed run rewrites what came after its checkpoint.
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
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
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


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
    parallelism: str,
    student_variables: dict,
    teacher_variables: list,
    split,
    batch_size: int,
    epochs: int,
    seed: int,
    run_dir,
    evaluate: Callable[[dict], dict] | None = None,
    log_every: int = 50,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    selected_dir=None,
    selected_meta: dict | None = None,
    select: Callable[[dict], float] | None = None,
    deploy: Callable[[dict], dict] | None = None,
    eval_every: int = 1,
    diagnose_every: int = 0,
) -> FitResult:
    """Trains ``spec.student`` (and heads) on ``split``; resumes from ``run_dir``.

    Args:
      evaluate: student variables -> metrics dict (test accuracies); run at every
        ``eval_every``-th epoch end and the last. Reported only: it never chooses a model.
      selected_dir: where the kept model is saved: the final one, or with ``select`` (student
        variables -> a label-free score, higher is better; run at the same epoch ends) the
        best by that score.
      checkpoint_every: steps between checkpoints (0 = at each epoch end); always at the end.
      deploy: trained variables -> the variables of the model that is kept (MCL-OKD's leader
        of its peers); what ``selected_dir`` and the result hold. ``evaluate`` sees them all.
      diagnose_every: steps between per-term diagnostics (0 = none).
    """
    deploy = deploy or (lambda variables: variables)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(spec, parallelism)
    runner.check_batch_size(batch_size)
    steps_per_epoch = num_batches(len(split), batch_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{name}: batch_size {batch_size} is larger than the training split "
            f"({len(split)} images); lower batch_size"
        )
    total_steps = epochs * steps_per_epoch
    checkpoint_every = checkpoint_every or steps_per_epoch
    state = create_train_state(spec, student_variables, teacher_variables, jax.random.key(seed))
    checkpoints = RunCheckpoints(run_dir / "checkpoints", max_to_keep=keep_checkpoints)
    meta = {"history": [], "selected": None, "diagnostics": []}
    restored = checkpoints.restore_latest(jax.device_get(state))
    if restored is not None:
        state, meta = restored
        meta.setdefault("selected", None)
        meta.setdefault("diagnostics", [])
        log.info("%s: resuming from step %d", name, int(state.step))
    start = int(state.step)
    metrics_log = MetricsLog(run_dir, start, enabled=is_primary())
    state = runner.put_state(state)
    teacher_variables = runner.put_replicated(teacher_variables)
    rows = runner.local_rows(batch_size)

    pending: list[tuple[int, dict]] = []
    pending_diagnostics: list[tuple[int, dict]] = []
    t_start = time.time()
    t_window, steps_window = time.time(), 0

    def flush():
        nonlocal t_window, steps_window
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (step, _), values in zip(pending, fetched, strict=True):
            values = {k: float(v) for k, v in values.items()}
            for key in sorted(values, key=lambda k: (k == "loss", k)):
                if not math.isfinite(values[key]):
                    latest = checkpoints.manager.latest_step()
                    raise NonFiniteLossError(
                        f"{name}: loss term '{key}' became {values[key]} at step {step}; "
                        f"stopped. The last good checkpoint (step {latest}) is kept in "
                        f"{checkpoints.directory}. Lower the learning rate or check the inputs."
                    )
            metrics_log.write(step, values)
        for step, values in jax.device_get(pending_diagnostics):
            values = {k: round(float(v), 6) for k, v in values.items()}
            metrics_log.write(step, values)
            meta["diagnostics"].append({"step": step, **values})
        last_step, last = pending[-1][0], {k: float(v) for k, v in fetched[-1].items()}
        elapsed = time.time() - t_window
        rate = steps_window * batch_size / max(elapsed, 1e-9)
        eta = (total_steps - last_step) * batch_size / max(rate, 1e-9)
        terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in last.items() if k.startswith("loss/"))
        shares = ""
        if pending_diagnostics:
            latest = meta["diagnostics"][-1]
            shares = " grad share " + " ".join(
                f"{k[11:]} {v:.2f}" for k, v in latest.items() if k.startswith("grad_share/")
            )
        log.info(
            "[%s] step %d/%d epoch %d loss %.4f (%s)%s %.0f img/s ETA %s",
            name, last_step, total_steps, (last_step - 1) // steps_per_epoch + 1,
            last["loss"], terms, shares, rate, _format_eta(eta),
        )  # fmt: skip
        pending.clear()
        pending_diagnostics.clear()
        t_window, steps_window = time.time(), 0

    def evaluate_and_select(done: int, epoch: int):
        host = _student_variables(runner.get_state(state))
        record = {"epoch": epoch, "step": done, **(evaluate(host) if evaluate else {})}
        score = select(host) if select is not None else None
        if score is not None:
            record["selection_score"] = score
        meta["history"].append(record)
        scores = {k: v for k, v in record.items() if k not in ("epoch", "step")}
        metrics_log.write(done, _scalars(scores, "eval/"))
        log.info("[%s] epoch %d eval %s", name, epoch, _rounded(record))
        if selected_dir is None:
            return
        final = done == total_steps
        improved = score is not None and (
            meta["selected"] is None or score > meta["selected"]["score"]
        )
        if improved or (select is None and final):
            meta["selected"] = {"epoch": epoch, "step": done, "score": score}
            save_model(selected_dir, deploy(host), selected_meta or {})

    try:
        for step in range(start, total_steps):
            batch = runner.put_batch(train_batch(split, batch_size, seed, step, rows))
            if diagnose_every and (step + 1) % diagnose_every == 0:
                # The step about to run, term by term (on its own state and batch).
                diagnosis = runner.diagnose(state, teacher_variables, batch)
                pending_diagnostics.append((step + 1, diagnosis))
            state, metrics = runner.step(state, teacher_variables, batch)
            pending.append((step + 1, metrics))
            steps_window += 1
            done = step + 1
            epoch_end = done % steps_per_epoch == 0
            if len(pending) >= log_every or epoch_end or done == total_steps:
                flush()
            epoch = done // steps_per_epoch
            if epoch_end and (epoch % eval_every == 0 or done == total_steps):
                evaluate_and_select(done, epoch)
            if done % checkpoint_every == 0 or done == total_steps:
                flush()
                checkpoints.save(done, runner.get_state(state), meta)
        flush()
    finally:
        metrics_log.close()
        checkpoints.close()
    final = runner.get_state(state)
    return FitResult(
        variables=deploy(_student_variables(final)),
        history=meta["history"],
        selected=meta["selected"],
        diagnostics=meta["diagnostics"],
        wall_s=time.time() - t_start,
    )


def _rounded(value, digits: int = 2):
    """Numbers rounded for the log (nested dicts too)."""
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, digits)
    return value
