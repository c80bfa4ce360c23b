"""A workdir remembers what produced it, one run uses it at a time, and a misspelled config
field on the command line is one line: real processes on real workdirs (issue 20)."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import pytest

from cka_jax.infra.version import code_version, describe
from cka_jax.infra.workdir import LOCK_FILE, WorkdirError, WorkdirLock
from cka_jax.stages import experiment
from cka_jax.stages.fingerprints import StaleWorkdirError, check_stages
from tests import tiny_config
from tests.main_process import REPO, main_command

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def tiny():
    """The config of `main_command`'s runs (tests/tiny_config.py, teacher_epochs=1)."""
    cfg = tiny_config.get_config()
    cfg.teacher_epochs = 1
    return cfg


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- the lock -----------------------------------------------------------------------------


def test_lock_names_its_holder_and_is_released_even_on_an_error(tmp_path):
    with WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["started"] and "command" in holder
        with pytest.raises(WorkdirError, match=rf"in use by another run: process {os.getpid()}"):
            WorkdirLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RuntimeError), WorkdirLock(tmp_path):
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize(
    "holder",
    [
        lambda: {"pid": dead_pid(), "host": socket.gethostname(), "started": "earlier"},
        lambda: "",  # a writer killed between creating the file and writing it
    ],
    ids=["dead_process", "empty_file"],
)
def test_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog, holder):
    record = holder()
    (tmp_path / LOCK_FILE).write_text(json.dumps(record) if record else "")
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"took over {tmp_path / LOCK_FILE}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere"}))
    with pytest.raises(WorkdirError, match=rf"on elsewhere.*delete {tmp_path / LOCK_FILE}"):
        WorkdirLock(tmp_path).__enter__()
    assert (tmp_path / LOCK_FILE).exists()


# --- real processes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two `python -m cka_jax.main` started on one workdir, the second once the first
    trains: ``(workdir, first, second, second's seconds, whether the first still ran)``."""
    workdir = tmp_path_factory.mktemp("two_runs")
    first = subprocess.Popen(
        main_command(workdir), cwd=REPO, env=ENV, text=True, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while not (workdir / "teachers" / "task0.run" / "fingerprint.json").exists():
        assert first.poll() is None and time.time() < deadline, "the first run never trained"
        time.sleep(0.05)
    config_before = (workdir / "config.json").read_text()
    start = time.time()
    second = subprocess.run(
        main_command(workdir), cwd=REPO, env=ENV, text=True, capture_output=True
    )
    elapsed = time.time() - start
    first_running = first.poll() is None
    assert (workdir / "config.json").read_text() == config_before
    _, first_err = first.communicate(timeout=600)
    first.stderr_text = first_err
    return workdir, first, second, elapsed, first_running


@pytest.mark.slow
def test_second_run_on_a_workdir_exits_at_once_naming_the_first(two_runs):
    workdir, first, second, elapsed, first_running = two_runs
    assert second.returncode == 2, second.stderr[-2000:]
    assert first_running and elapsed < 60  # it did not wait for the first run
    lines = second.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: workdir {workdir} is in use by another run: ")
    assert f"process {first.pid} on {socket.gethostname()}" in lines[-1]
    assert "cka_jax.main" in lines[-1] and "Traceback" not in second.stderr
    # The first finishes untouched, and lets go of the workdir.
    assert first.returncode == 0, first.stderr_text[-3000:]
    assert json.loads((workdir / "results.json").read_text())["rows"][-1]["method"] == "kd"
    assert not (workdir / LOCK_FILE).exists()


@pytest.fixture
def finished(two_runs, tmp_path):
    """A copy of the finished tiny workdir, to change."""
    workdir = tmp_path / "work"
    shutil.copytree(two_runs[0], workdir)
    return workdir


def mtimes(workdir):
    return {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_rerun_with_another_config_is_refused_before_any_work_listing_the_fields(finished):
    config = (finished / "config.json").read_text()
    before = mtimes(finished)
    changed = ("--config.epochs=3", "--config.student.width=8", "--config.loss.kd_temperature=2")
    done = subprocess.run(
        main_command(finished, *changed), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"error: workdir {finished} holds results of another config" in done.stderr
    assert (
        "  runs/kd/seed_0: epochs: 2 -> 3; loss.kd_temperature: 1.0 -> 2.0; "
        "student.width: 4 -> 8\n" in done.stderr
    )
    assert "teachers/" not in done.stderr  # the teachers do not read those fields
    assert "choose a new --workdir" in done.stderr and "--discard_stale" in done.stderr
    assert (finished / "config.json").read_text() == config  # never the config of others
    assert mtimes(finished) == before and not (finished / LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "field, value, listed",
    [
        ("epochs", 3, ["runs/kd/seed_0: epochs: 2 -> 3"]),
        ("teacher.width", 8, ["teachers/task0: teacher.width: 4 -> 8", "teachers/task1: "]),
        ("loss.kd_temperature", 4.0, ["runs/kd/seed_0: loss.kd_temperature: 1.0 -> 4.0"]),
        ("tasks.seed", 1, ["teachers/task0: tasks.seed: 0 -> 1", "runs/kd/seed_0: "]),
    ],
)
def test_each_changed_field_is_listed(finished, field, value, listed):
    cfg = tiny()
    cfg.update_from_flattened_dict({field: value})
    with pytest.raises(StaleWorkdirError) as info:
        experiment.run(cfg, finished)
    for line in listed:
        assert f"\n  {line}" in str(info.value)


@pytest.mark.slow
def test_rerun_with_another_log_every_is_accepted_and_takes_over_a_stale_lock(finished):
    """Fields that cannot change numbers may differ; a lock left by a killed run (its pid
    gone) is taken over with a warning."""
    before = mtimes(finished)
    (finished / LOCK_FILE).write_text(
        json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "earlier"})
    )
    extra = ("--config.log_every=3", "--config.eval_every=2", "--config.keep_checkpoints=1")
    done = subprocess.run(
        main_command(finished, *extra), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"took over {finished / LOCK_FILE}" in done.stderr
    assert "| kd |" in done.stdout
    assert not (finished / LOCK_FILE).exists()
    # Nothing retrained; config.json now says log_every=3 (it changes no number).
    for path in ("teachers/task0/model.json", "runs/kd/seed_0/result.json"):
        assert before[finished / path] == (finished / path).stat().st_mtime_ns
    assert json.loads((finished / "config.json").read_text())["log_every"] == 3


@pytest.mark.slow
def test_discard_stale_deletes_and_reruns_only_the_stale_stages(finished):
    teacher = finished / "teachers" / "task0" / "model.json"
    teacher_mtime = teacher.stat().st_mtime_ns
    old_rows = json.loads((finished / "results.json").read_text())["rows"]
    cfg = tiny()
    cfg.epochs = 1
    experiment.run(cfg, finished, discard_stale=True)
    assert teacher.stat().st_mtime_ns == teacher_mtime  # the teachers fit: kept
    fingerprint = json.loads((finished / "runs/kd/seed_0/fingerprint.json").read_text())
    assert fingerprint["fields"]["epochs"] == 1
    assert json.loads((finished / "config.json").read_text())["epochs"] == 1
    rows = json.loads((finished / "results.json").read_text())["rows"]
    assert rows[:4] == old_rows[:4]  # teacher, ensemble and oracle-routing rows
    kd, old_kd = ({r["method"]: r for r in table}["kd"] for table in (rows, old_rows))
    assert kd["selection"]["epoch"] == 1 != old_kd["selection"]["epoch"]


@pytest.mark.slow
def test_workdir_of_an_older_version_is_checked_against_its_config_json(finished):
    """Without fingerprint.json a stage is compared with config.json, then adopts it."""
    for path in finished.rglob("fingerprint.json"):
        path.unlink()
    cfg = tiny()
    cfg.epochs = 3
    with pytest.raises(StaleWorkdirError, match=r"runs/kd/seed_0 \(recorded in config.json"):
        experiment.run(cfg, finished)
    assert not list(finished.rglob("fingerprint.json"))
    experiment.run(tiny(), finished)  # the config it came from: accepted, nothing retrains
    assert len(list(finished.rglob("fingerprint.json"))) == 3


@pytest.mark.slow
def test_a_stage_of_other_code_is_kept_with_a_warning_naming_both_versions(finished, caplog):
    """Each fingerprint records the package version and commit; a rerun by other code keeps
    the stages whose fields agree, and says that the table now mixes two versions."""
    path = finished / "runs" / "kd" / "seed_0" / "fingerprint.json"
    record = json.loads(path.read_text())
    assert record["code"] == code_version() and record["code"]["package"]
    record["code"] = {"package": "0.0.1", "commit": "0123456789abcdef"}
    path.write_text(json.dumps(record))
    before = mtimes(finished)
    with caplog.at_level(logging.WARNING):
        check_stages(tiny(), finished)
    assert mtimes(finished) == before  # kept, nothing deleted or rewritten
    [warning] = [r.getMessage() for r in caplog.records if "different code" in r.getMessage()]
    assert "runs/kd/seed_0" in warning and "cka-jax 0.0.1 at commit 0123456789ab" in warning
    assert describe(code_version()) in warning


@pytest.mark.slow
def test_execution_only_changes_keep_every_stage_with_a_note(finished, caplog):
    """Another parallelism, device count or log cadence computes the same numbers: the
    stages are kept and the change is noted; a field that changes numbers still refuses."""
    path = finished / "teachers" / "task0.run" / "fingerprint.json"
    record = json.loads(path.read_text())
    assert record["execution"]["parallelism"] == tiny().parallelism
    record["execution"].update(devices=8, processes=2)  # as if trained on 8 devices
    path.write_text(json.dumps(record))
    cfg = tiny()
    cfg.parallelism = "pmap" if cfg.parallelism != "pmap" else "mesh"
    cfg.log_every = cfg.log_every + 1
    before = mtimes(finished)
    with caplog.at_level(logging.WARNING):
        assert check_stages(cfg, finished) == []
    assert mtimes(finished) == before
    notes = [r.getMessage() for r in caplog.records if "execution settings" in r.getMessage()]
    teacher = next(n for n in notes if "teachers/task0" in n)
    assert f"parallelism: {tiny().parallelism} -> {cfg.parallelism}" in teacher
    assert f"devices: 8 -> {jax.device_count()}" in teacher and "log_every" in teacher
    assert any("runs/kd/seed_0" in n for n in notes)
    cfg.epochs += 1
    with pytest.raises(StaleWorkdirError, match="epochs"):
        check_stages(cfg, finished)


# --- a misspelled config field on the command line ----------------------------------------


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.epoch=3", "config has no field 'epoch'; did you mean 'epochs'? valid fields: "),
        (
            "--config.student.widht=32",
            "config.student has no field 'widht'; did you mean 'width'? valid fields: arch, "
            "checkpoint, finetune, stem, width",
        ),
        ("--config.studnet.width=32", "config has no field 'studnet'; did you mean 'student'?"),
        ("--config.data.image_sise=8", "config.data has no field 'image_sise'; did you mean"),
        ("--config.distributed.initialise=True", "config.distributed has no field 'initialise'"),
    ],
)
def test_misspelled_config_field_is_one_line_with_exit_code_2(tmp_path, flag, message):
    done = subprocess.run(
        main_command(tmp_path / "work", flag), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag.split('=')[0]}: {message}")
    assert "Traceback" not in done.stderr and not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    "path, message",
    [
        ("epohcs", "config has no field 'epohcs'; did you mean 'epochs'?"),
        ("loss.kd_temprature", "config.loss has no field 'kd_temprature'; did you mean"),
        ("selection.critrion", "config.selection has no field 'critrion'; did you mean 'crit"),
        ("tasks.num_task", "config.tasks has no field 'num_task'; did you mean 'num_tasks'?"),
        ("variants.cka_w4.studnet", "config.variants.cka_w4 has no field 'studnet'; did you"),
        ("variants.cka_w4.student.widht", "config.variants.cka_w4.student has no field 'widht"),
        ("variants.nope.loss", "config.variants has no field 'nope'; valid fields: cka_w4"),
        ("student.width", None),
        ("teachers[0].width", None),  # into a tuple: config_flags' own check
    ],
)
def test_unknown_field_names_the_closest_and_the_valid_fields_at_every_level(path, message):
    from cka_jax.config import unknown_field

    cfg = tiny()
    cfg.variants = {"cka_w4": {"method": "cka", "student": {"width": 4}}}
    found = unknown_field(cfg, path)
    assert found == message if message is None else found.startswith(message), found


JOINED = """
import sys
import jax
from cka_jax.infra import distributed
from cka_jax.config import distributed_config
from cka_jax.infra.workdir import WorkdirError, WorkdirLock

distributed.initialize(distributed_config())  # from JAX_COORDINATOR_ADDRESS etc.
try:
    with WorkdirLock(sys.argv[1]):
        print("locked", jax.process_index(), flush=True)
except WorkdirError as err:
    print("refused", jax.process_index(), err, flush=True)
"""


@pytest.mark.parametrize("held", [False, True])
def test_a_job_of_two_processes_takes_one_lock_and_fails_together(tmp_path, held):
    """Process 0 takes the lock for the job; when it cannot, process 1 learns so too."""
    from tests.processes import collect, joined_env, start_joined

    if held:  # a live holder: this test's own process
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"})
        )
    procs = start_joined([sys.executable, "-c", JOINED, str(tmp_path)], joined_env(ENV))
    outs = collect(procs, timeout=300)
    if held:
        assert "refused 0 workdir" in outs[0] and "is in use by another run" in outs[0]
        assert f"refused 1 process 0 could not lock workdir {tmp_path}" in outs[1], outs
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    else:
        assert "locked 0" in outs[0] and "locked 1" in outs[1], outs
        assert not (tmp_path / LOCK_FILE).exists()
