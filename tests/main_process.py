"""The tiny main job as a real `python -m cka_jax.main` process, and how to read its end
state; shared by the resume, determinism, fault and multi-process tests."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from cka_jax.infra.checkpoint import RunCheckpoints

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "tiny_config.py"
# 2 teachers trained for 1 epoch, then kd for 2 epochs of 10 steps (no figures: tiny_config).
TINY_ARGS = (f"--config={CONFIG}", "--config.teacher_epochs=1")


def main_command(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "cka_jax.main", *TINY_ARGS, f"--workdir={workdir}", *extra]


def run_main(workdir, *extra, env=None) -> str:
    """Runs the tiny main job to the end; returns what it printed (stdout + stderr)."""
    done = subprocess.run(
        main_command(workdir, *extra),
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout + done.stderr


def final_state(run_dir):
    """``(step, state)`` of the newest checkpoint of a training run directory."""
    ckpts = RunCheckpoints(Path(run_dir) / "checkpoints")
    try:
        step = ckpts.manager.latest_step()
        return step, ckpts.manager.restore(step)["state"]
    finally:
        ckpts.close()


def assert_same_run(reference, got, runs=("runs/kd/seed_0",)):
    """Bit-identical final training states of ``runs`` and the same results.json but wall
    times, for two workdirs of the tiny main job."""
    for run in runs:
        ref_step, ref_state = final_state(Path(reference) / run)
        got_step, got_state = final_state(Path(got) / run)
        assert ref_step == got_step, run
        jax.tree.map(np.testing.assert_array_equal, ref_state, got_state)
    ref_rows = json.loads((Path(reference) / "results.json").read_text())["rows"]
    got_rows = json.loads((Path(got) / "results.json").read_text())["rows"]
    for ref, row in zip(ref_rows, got_rows, strict=True):
        ref.pop("wall_s", None), row.pop("wall_s", None)
        assert ref == row
