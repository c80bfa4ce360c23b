"""Interrupted and repeated runs: the same config and seed give the same results in a fresh
process; a real process killed twice (while a teacher trains, then mid-amalgamation) and
restarted ends with the same result; a loss that becomes NaN stops the run with the last
good checkpoint kept."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from cka_jax import experiment
from cka_jax.checkpoint import RunCheckpoints
from cka_jax.train.loop import NonFiniteLossError
from tests import tiny_config
from tests.main_process import REPO, assert_same_run, final_state, main_command, run_main


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


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_results_twice(tiny_main_run, tmp_path):
    run_main(tmp_path, env=ENV)
    assert_same_run(tiny_main_run, tmp_path, runs=("runs/kd/seed_0", "teachers/task0.run"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_main_run, tmp_path):
    interrupted = tmp_path / "interrupted"

    # Kill twice: once while a teacher trains, once in the middle of the amalgamation.
    def start():
        return subprocess.Popen(
            main_command(interrupted),
            cwd=REPO,
            env=ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    kill_when(start(), lambda: any((interrupted / "teachers").glob("task0.run/checkpoints/*")))
    kill_when(start(), lambda: any(s >= 4 for s in checkpoint_steps(interrupted)))
    killed_at = max(checkpoint_steps(interrupted))
    assert killed_at < 20, "killed after the run had finished"
    done = subprocess.run(
        main_command(interrupted), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step" in done.stderr
    assert final_state(interrupted / "runs" / "kd" / "seed_0")[0] == 20
    runs = ("runs/kd/seed_0", "teachers/task0.run", "teachers/task1.run")
    assert_same_run(tiny_main_run, interrupted, runs)


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
