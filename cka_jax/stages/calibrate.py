"""The calibration stage: the frozen teachers' outputs on the student's unlabelled training
images, one `cka_jax.methods.calibration` fitted to them (``config.teacher_calibration``), saved as
``calibration.json`` in the workdir and read back on a rerun.

The fitted `Calibrator` is used wherever union scores are formed: the ensemble row, the
targets of every student method (inside the train step, `StepSpec.calibration`) and
selection by teacher agreement. A fit that fails, does not converge or gives a teacher
(almost) no images is a warning naming the teacher and the statistic, and the run falls
back to ``'none'`` (recorded in calibration.json and the report): never a NaN target.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cka_jax.data import eval_kwargs, eval_preprocess
from cka_jax.evaluation import evaluate
from cka_jax.infra.distributed import is_primary
from cka_jax.infra.files import write_json_atomic
from cka_jax.methods import calibration

log = logging.getLogger(__name__)
CALIBRATION_FILE = "calibration.json"
MIN_IMAGE_SHARE = 0.01  # a teacher routed fewer of the images than this: the fit failed


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: one per run
class Calibrator:
    """A fitted calibration: ``calibrator(logits, pooled features)`` gives the per-teacher
    union scores (jnp, inside the step); `union` does it on the host for a whole split."""

    kind: str
    params: dict
    fallback: str = ""  # why a failed fit fell back to 'none'

    @property
    def needs_features(self) -> bool:
        return calibration.CALIBRATIONS[self.kind].needs_features

    def __call__(self, logits, features=()):
        logits = [jnp.asarray(z, jnp.float32) for z in logits]
        features = [jnp.asarray(f, jnp.float32) for f in features]
        return calibration.CALIBRATIONS[self.kind].apply(self.params, logits, features)

    def union(self, outputs: calibration.TeacherOutputs, batch: int = 4096) -> np.ndarray:
        """(N, K) union scores of teacher outputs on N images."""
        n = len(outputs.logits[0])
        parts = []
        for i in range(0, n, batch):
            feats = [f[i : i + batch] for f in outputs.features] if self.needs_features else []
            scores = _jitted(self)([z[i : i + batch] for z in outputs.logits], feats)
            parts.append(np.concatenate([np.asarray(s) for s in scores], -1))
        return np.concatenate(parts)


NONE = Calibrator("none", {})


@functools.cache
def _jitted(calibrator: Calibrator):
    return jax.jit(calibrator.__call__)


def teacher_outputs(teachers, split, aug_cfg, batch_size: int, features: bool = True):
    """`calibration.TeacherOutputs` of ``[(model, variables)]`` on ``split`` (eval transform,
    sharded like `evaluate.Scorer`): logits and, with ``features``, pooled features."""
    kwargs = eval_kwargs(ml_collections.FrozenConfigDict(aug_cfg))
    n = jax.device_count()
    batch_size = -(-batch_size // n) * n
    logits, pooled = [], []
    for model, variables in teachers:

        def forward(v, images, model=model):
            z, f = model.apply(v, eval_preprocess(images, **kwargs))
            out = [z.astype(jnp.float32)]
            if features:
                out.append(f.astype(jnp.float32).mean(axis=(1, 2)))
            return jnp.concatenate(out, -1)

        out = evaluate.predict(evaluate.jit_gathered(forward), variables, split, batch_size)
        k = model.num_classes
        logits.append(out[:, :k].astype(np.float64))
        if features:
            pooled.append(out[:, k:].astype(np.float64))
    return calibration.TeacherOutputs(tuple(logits), tuple(pooled))


def options(cfg) -> dict:
    return {"clusters_per_class": int(cfg.calibration_clusters_per_class)}


def check_config(cfg, num_teachers: int) -> None:
    kind = cfg.teacher_calibration
    if kind not in calibration.CALIBRATIONS:
        raise ValueError(
            f"config.teacher_calibration={kind!r}; valid: {', '.join(calibration.CALIBRATIONS)}"
        )
    need = calibration.CALIBRATIONS[kind].min_teachers
    if num_teachers < need:
        raise ValueError(
            f"config.teacher_calibration={kind!r} routes between teachers and needs at least "
            f"{need}, but this experiment has {num_teachers}; use 'none' or 'standardize'"
        )


def get_calibrator(cfg, teachers, train, workdir: Path) -> Calibrator:
    """The fitted calibration of ``config.teacher_calibration`` on the unlabelled ``train``
    images (their labels are never read): read from the workdir when it was fitted there
    with the same choice, else fitted now and saved."""
    kind = cfg.teacher_calibration
    if kind == "none" or not teachers:
        return NONE
    check_config(cfg, len(teachers))
    path = Path(workdir) / CALIBRATION_FILE
    record = {"kind": kind, "options": options(cfg), "images": len(train)}
    if path.exists():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in record} == record:
            return from_record(saved)
    needs = calibration.CALIBRATIONS[kind].needs_features
    outputs = teacher_outputs(teachers, train, cfg.augment, cfg.eval_batch_size, needs)
    calibrator, diagnostics = fit(kind, outputs, options(cfg))
    record.update(params=calibrator.params, fallback=calibrator.fallback, diagnostics=diagnostics)
    if calibrator.fallback:
        record["params"] = {}
    if is_primary():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    return calibrator


def from_record(saved: dict) -> Calibrator:
    if saved.get("fallback"):
        return Calibrator("none", {}, saved["fallback"])
    return Calibrator(saved["kind"], saved["params"])


def fit(kind: str, outputs, opts: dict) -> tuple[Calibrator, dict]:
    """``(calibrator, diagnostics)``: a failed fit is a warning and the 'none' calibrator."""
    try:
        params = calibration.CALIBRATIONS[kind].fit(outputs, **opts)
    except calibration.CalibrationError as err:
        return _fallback(kind, str(err)), {}
    diagnostics = params.get("diagnostics", {})
    if diagnostics.get("converged") is False:
        reason = f"its EM did not converge in {diagnostics.get('iterations')} iterations"
        return _fallback(kind, reason), diagnostics
    calibrator = Calibrator(kind, params)
    scores = calibrator.union(outputs)
    if not np.all(np.isfinite(scores)):
        return _fallback(kind, "it gives non-finite union scores"), diagnostics
    share = evaluate_shares(scores, [z.shape[1] for z in outputs.logits])
    diagnostics = {**diagnostics, "routed_share": share}
    for t, s in enumerate(share):
        if s < MIN_IMAGE_SHARE:
            reason = f"teacher {t} gets {100 * s:.2f}% of the images (routed share)"
            return _fallback(kind, reason), diagnostics
    log.info(
        "teacher calibration %s fitted on %d images; routed share per teacher %s",
        kind,
        len(scores),
        [round(s, 3) for s in share],
    )
    return calibrator, diagnostics


def evaluate_shares(scores: np.ndarray, sizes) -> list[float]:
    """The share of images whose union argmax falls in each teacher's classes."""
    bounds = np.cumsum([0, *sizes])
    pred = np.argmax(scores, -1)
    return [
        float(np.mean((pred >= a) & (pred < b)))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _fallback(kind: str, reason: str) -> Calibrator:
    message = f"teacher calibration {kind!r} not used: {reason}; falling back to 'none'"
    log.warning(message)
    return Calibrator("none", {}, message)
