"""Interrupted runs: a real process killed mid-training resumes to the same result, and a
loss that becomes NaN stops the run with the last good checkpoint kept."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cka_jax import experiment
from cka_jax.checkpoint import RunCheckpoints
from cka_jax.train.loop import NonFiniteLossError
from tests import tiny_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "tiny_config.py"


def main_command(workdir):
    return [
        sys.executable,
        "-m",
        "cka_jax.main",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        "--config.teacher_epochs=1",
    ]


def final_state(workdir):
    ckpts = RunCheckpoints(workdir / "runs" / "kd" / "seed_0" / "checkpoints")
    try:
        step = ckpts.manager.latest_step()
        restored = ckpts.manager.restore(step)
    finally:
        ckpts.close()
    return step, restored


def kill_when(proc, ready, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"run finished before it could be killed:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run never reached the point to kill it")


def checkpoint_steps(workdir):
    d = workdir / "runs" / "kd" / "seed_0" / "checkpoints"
    if not d.exists():
        return []
    return [int(p.name) for p in d.iterdir() if p.name.isdigit()]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "uninterrupted"
    subprocess.run(main_command(reference), cwd=REPO, env=env, check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"

    # Kill twice: once while a teacher trains, once in the middle of the amalgamation.
    def start():
        return subprocess.Popen(main_command(interrupted), cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip

    kill_when(start(), lambda: any((interrupted / "teachers").glob("task0.run/checkpoints/*")))
    kill_when(start(), lambda: any(s >= 4 for s in checkpoint_steps(interrupted)))
    killed_at = max(checkpoint_steps(interrupted))
    assert killed_at < 20, "killed after the run had finished"
    done = subprocess.run(
        main_command(interrupted), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step" in done.stderr

    ref_step, ref_state = final_state(reference)
    got_step, got_state = final_state(interrupted)
    assert ref_step == got_step == 20
    jax.tree.map(np.testing.assert_array_equal, ref_state["state"], got_state["state"])
    ref_rows = json.loads((reference / "results.json").read_text())["rows"]
    got_rows = json.loads((interrupted / "results.json").read_text())["rows"]
    for ref, got in zip(ref_rows, got_rows, strict=True):
        ref.pop("wall_s", None), got.pop("wall_s", None)
        assert ref == got


def test_nan_loss_stops_with_term_and_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config.get_config()
    cfg.teacher_epochs = 1
    cfg.epochs = 2
    cfg.checkpoint_every = 1
    cfg.optimizer.learning_rate = 1e30  # parameters overflow after the first update
    cfg.log_every = 1
    with pytest.raises(NonFiniteLossError, match=r"loss term '.+' became (nan|inf) at step \d+"):
        experiment.run(cfg, tmp_path)
    ckpts = RunCheckpoints(tmp_path / "runs" / "kd" / "seed_0" / "checkpoints")
    try:
        steps = ckpts.manager.all_steps()
        assert steps, "the last good checkpoint was kept"
        restored = ckpts.manager.restore(max(steps))
    finally:
        ckpts.close()
    leaves = jax.tree.leaves(restored["state"]["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
