"""Preemption and crashes: SIGTERM or SIGINT during training finishes the step, writes its
checkpoint, flushes the metrics and exits with code 75; a SIGKILL loses what came after the
last checkpoint; either way the rerun ends bit-identical to a run never interrupted (states,
results.json, metrics.jsonl). Two joined processes compute what one process with two devices
does, and a signal to one of them stops both at the same step. The handlers live only as
long as a fit."""

import json
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from cka_jax.infra.preemption import EXIT_CODE, Preempted, StopRequests
from cka_jax.train.loop import FitOptions, fit
from tests.main_process import REPO, assert_same_run, final_state, main_command
from tests.processes import collect, joined_env
from tests.stages.test_selection import tiny_split
from tests.train.test_step_parallel import BATCH, build

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
TEACHER_RUNS = ("teachers/task0.run", "teachers/task1.run")
RUNS = ("runs/kd/seed_0", *TEACHER_RUNS)
STOPPED = re.compile(
    r"stopped: (.+): stopped (by \S+|with the other processes) after step (\d+) of (\d+)"
)


@pytest.fixture
def python_sigint_handler():
    """SIGINT as a fresh Python process has it (KeyboardInterrupt): a test worker may run
    with another handler (or SIGINT ignored) left by what ran before in it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_handlers_are_installed_for_the_block_only_and_a_second_signal_stops_at_once(
    python_sigint_handler,
):
    # signal.raise_signal, not os.kill(os.getpid()): a signal sent to the process may land
    # on another of its threads and be handled a little later, and two pending ones are
    # handled once; raised in this thread, each is handled before the next line.
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Preempted), StopRequests() as requests:
        assert signal.getsignal(signal.SIGTERM) == requests._handle
        signal.raise_signal(signal.SIGTERM)
        assert requests.signal_name == "SIGTERM"  # noted, nothing else: the loop acts on it
        raise Preempted("the loop's checkpoint is written")
    assert {s: signal.getsignal(s) for s in before} == before

    # The second signal is handled as without a handler (SIGINT: KeyboardInterrupt).
    with pytest.raises(KeyboardInterrupt), StopRequests():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before

    # A signal no loop acted on is delivered again when the block ends.
    with pytest.raises(KeyboardInterrupt), StopRequests():
        signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


def small_fit(run_dir, on_evaluate=lambda: None):
    spec, state, teacher_vars, _ = build("kd")

    def evaluate(variables):
        on_evaluate()
        return {"merged_acc": 50.0}

    return fit(
        name="t",
        spec=spec,
        options=FitOptions(parallelism="single", batch_size=BATCH, log_every=2, eval_every=1),
        student_variables={"params": state.params["student"], "batch_stats": state.batch_stats},
        teacher_variables=teacher_vars,
        split=tiny_split(3 * BATCH),  # 3 steps per epoch, checkpoints at epoch ends
        epochs=3,
        seed=0,
        run_dir=run_dir,
        evaluate=evaluate,
    )


def test_sigint_in_a_fit_stops_after_the_step_and_the_rerun_ends_identical(
    tmp_path, python_sigint_handler
):
    """In this process: Ctrl-C while epoch 1 is evaluated stops after step 3 with its
    checkpoint; the rerun continues from there to the uninterrupted run's end, bit for bit."""
    before = signal.getsignal(signal.SIGINT)
    reference = small_fit(tmp_path / "reference")
    interrupted = tmp_path / "interrupted"
    calls = []

    def ctrl_c_once():
        if not calls:
            signal.raise_signal(signal.SIGINT)
        calls.append(1)

    with pytest.raises(Preempted, match=r"t: stopped by SIGINT after step 3 of 9"):
        small_fit(interrupted, ctrl_c_once)
    assert signal.getsignal(signal.SIGINT) is before
    assert final_state(interrupted)[0] == 3
    resumed = small_fit(interrupted)
    jax.tree.map(np.testing.assert_array_equal, reference.variables, resumed.variables)
    assert resumed.history == reference.history
    metrics = [(d / "metrics.jsonl").read_text() for d in (tmp_path / "reference", interrupted)]
    assert metrics[0] == metrics[1]


def start(workdir, env=ENV):
    return subprocess.Popen(
        main_command(workdir),
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def signal_when(procs, ready, sig=signal.SIGTERM, delay=0.0, timeout=300):
    """Sends ``sig`` to the first of ``procs`` ``delay`` seconds after ``ready()``; returns
    each one's output."""
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("the run never got to the point to signal it:\n" + procs[0].stdout.read())
        time.sleep(0.05)
    time.sleep(delay)
    procs[0].send_signal(sig)
    return collect(procs, timeout)


def check_stopped(out, proc, workdir, run, why="by SIGTERM") -> int:
    """The run stopped with code 75 and a checkpoint of the step it names; returns it."""
    assert proc.returncode == EXIT_CODE, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    found = STOPPED.search(out)
    assert found, out[-3000:]
    step, total = int(found.group(3)), int(found.group(4))
    assert found.group(2) == why and 0 < step < total, found.group(0)
    assert final_state(workdir / run)[0] == step  # the checkpoint of the stop step
    # The metrics of every step up to it are flushed.
    lines = (workdir / run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "loss" in x] == list(range(1, step + 1))
    return step


def assert_same_metrics(reference, got, runs=RUNS):
    for run in runs:
        ref = (reference / run / "metrics.jsonl").read_text()
        assert (got / run / "metrics.jsonl").read_text() == ref, run


def checkpoint_steps(run_dir) -> list[int]:
    d = run_dir / "checkpoints"
    return [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.exists() else []


@pytest.mark.slow
def test_sigterm_mid_teacher_then_kill_mid_amalgamation_then_rerun_ends_bit_identical(
    tiny_main_run, tmp_path
):
    """A real `python -m cka_jax.main`: SIGTERM once the first teacher trains (a clean stop
    with its checkpoint); rerun and SIGKILL it mid-amalgamation once the student has a
    checkpoint past step 4 (a crash: whatever came after that checkpoint is lost); rerun to
    the end: the same states, results.json and metrics.jsonl as the uninterrupted run, so a
    repeated run with the same config and seed gives the same results too."""
    teacher = "teachers/task0.run"
    proc = start(tmp_path)
    (out,) = signal_when([proc], lambda: (tmp_path / teacher / "metrics.jsonl").exists())
    check_stopped(out, proc, tmp_path, teacher)

    student = tmp_path / "runs/kd/seed_0"
    proc = start(tmp_path)
    signal_when([proc], lambda: any(s >= 4 for s in checkpoint_steps(student)), signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert 4 <= max(checkpoint_steps(student)) < 20, "killed after the run had finished"

    done = subprocess.run(main_command(tmp_path), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kd seed 0: resuming from step" in done.stderr
    assert_same_run(tiny_main_run, tmp_path, RUNS)
    assert_same_metrics(tiny_main_run, tmp_path)
    assert not (tmp_path / "figures").exists()  # --config.figures=False
    assert "drawing figures" not in done.stderr


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_rerun_to_the_one_process_result(
    tiny_main_run, tmp_path
):
    """Two processes joined over localhost (one CPU device each, CPU collectives over gloo,
    each feeding its half of every batch); SIGTERM reaches process 1 only, mid-amalgamation.
    Both stop after the same step with code 75; rerun, they end as `tiny_main_run`, one
    uninterrupted process with two devices."""
    env = joined_env(ENV)

    def joined():
        return [start(tmp_path, {**env, "JAX_PROCESS_ID": str(i)}) for i in (1, 0)]

    run = "runs/kd/seed_0"
    procs = joined()  # process 1 first: it gets the signal
    # Process 0 opens metrics.jsonl once in the fit; process 1 is there too a moment later,
    # well before the first step has compiled.
    outs = signal_when(procs, lambda: (tmp_path / run / "metrics.jsonl").exists(), delay=2)
    stopped_at = [
        check_stopped(outs[0], procs[0], tmp_path, run, why="by SIGTERM"),
        check_stopped(outs[1], procs[1], tmp_path, run, why="with the other processes"),
    ]
    assert stopped_at[0] == stopped_at[1]
    procs = joined()  # processes 1 and 0
    logs = collect(procs, timeout=400)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    for i, log in zip((1, 0), logs, strict=True):
        assert f"process {i} of 2; 1 local / 2 global devices" in log
    assert "| kd |" in logs[1] and "| kd |" not in logs[0]  # process 0 reports
    # Every parameter, BatchNorm statistic and Adam moment after the last step, of the
    # student and of both teachers (trained by the two processes together), results.json
    # and the metrics: the two processes compute what one process with two devices does.
    assert_same_run(tiny_main_run, tmp_path, RUNS)
    assert_same_metrics(tiny_main_run, tmp_path)
