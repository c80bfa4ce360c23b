"""Faults: corrupt checkpoints, a process killed while writing one, interrupted model saves,
and bad inputs (teacher checkpoints that do not fit, invalid tasks, unusable workdirs)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cka_jax.infra.checkpoint import CheckpointError, RunCheckpoints
from cka_jax.infra.workdir import WorkdirError
from cka_jax.models import create_model, init_variables
from cka_jax.models.storage import MODEL_FILE, has_model, load_model, save_model
from cka_jax.stages import experiment
from tests import tiny_config
from tests.main_process import REPO, main_command


def fake_state(step: int):
    rng = np.random.default_rng(step)
    return {"w": rng.normal(size=(64, 64)).astype(np.float32), "n": np.int32(step)}


def data_files(step_dir: Path):
    """The files holding array bytes (orbax's OCDBT data files), largest first."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def flip_bytes(path: Path):
    data = bytearray(path.read_bytes())
    for i in (len(data) // 3, len(data) // 2):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero_bytes": lambda p: p.write_bytes(b""),
    "flipped_bytes": flip_bytes,  # orbax reads these silently; the saved digest catches it
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, corruption):
    ckpts = RunCheckpoints(tmp_path, max_to_keep=5)
    for step in (1, 2, 3):
        ckpts.save(step, fake_state(step), {"step": step})
    ckpts.close()
    CORRUPTIONS[corruption](data_files(tmp_path / "3")[0])

    ckpts = RunCheckpoints(tmp_path, max_to_keep=5)
    with caplog.at_level(logging.WARNING):
        state, meta = ckpts.restore_latest(fake_state(0))
    assert meta == {"step": 2}
    np.testing.assert_array_equal(state["w"], fake_state(2)["w"])
    assert f"checkpoint {tmp_path / '3'} is unreadable" in caplog.text
    # The bad one is set aside (kept for inspection), and step 3 can be saved again.
    assert (tmp_path / "3.unreadable").is_dir() and not (tmp_path / "3").exists()
    ckpts.save(3, fake_state(3), {"step": 3})
    state, meta = ckpts.restore_latest(fake_state(0))
    ckpts.close()
    assert meta == {"step": 3}
    np.testing.assert_array_equal(state["w"], fake_state(3)["w"])


WRITER = """
import sys
import numpy as np
from cka_jax.infra.checkpoint import RunCheckpoints

directory = sys.argv[1]
ckpts = RunCheckpoints(directory, max_to_keep=1000)
for step in range(1, 10_000):
    rng = np.random.default_rng(step)
    ckpts.save(step, {"w": rng.random((2, 1 << 20), np.float32)}, {"step": step})
"""


def test_process_killed_while_writing_a_checkpoint_leaves_only_complete_ones(tmp_path):
    """SIGKILL lands while orbax's temporary directory exists (a save in progress); what is
    loaded afterwards is the newest complete checkpoint, bit for bit."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env)
    in_flight = None
    deadline = time.time() + 120
    try:
        while in_flight is None and time.time() < deadline and proc.poll() is None:
            names = os.listdir(tmp_path) if tmp_path.exists() else []
            complete = [n for n in names if n.isdigit()]
            partial = [n for n in names if "orbax-checkpoint-tmp" in n]
            if partial and len(complete) >= 2:
                proc.send_signal(signal.SIGKILL)
                in_flight = partial[0]
            else:
                time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert in_flight is not None, "never caught a checkpoint write in progress"

    left = os.listdir(tmp_path)
    steps = sorted(int(n) for n in left if n.isdigit())
    ckpts = RunCheckpoints(tmp_path, max_to_keep=1000)
    assert sorted(ckpts.manager.all_steps()) == steps  # the half-written one is not a step
    state, meta = ckpts.restore_latest({"w": np.zeros((2, 1 << 20), np.float32)})
    newest = steps[-1]
    assert meta == {"step": newest}
    expected = np.random.default_rng(newest).random((2, 1 << 20), np.float32)
    np.testing.assert_array_equal(state["w"], expected)
    # A resumed run saves the next step over the debris.
    ckpts.save(newest + 1, {"w": expected}, {"step": newest + 1})
    assert ckpts.restore_latest({"w": expected})[1] == {"step": newest + 1}
    ckpts.close()


def tiny_model_variables(num_classes, seed=0):
    model = create_model("resnet10", num_classes, stem="small", width=4)
    return init_variables(model, seed, (1, 16, 16, 3))


def tiny_meta(num_classes, **overrides):
    meta = {"arch": "resnet10", "num_classes": num_classes, "width": 4, "stem": "small"}
    return {**meta, "channels": 3, "image_size": 16, **overrides}


@pytest.mark.parametrize("leftover", [".partial", ".old"])
def test_model_save_killed_between_its_renames_is_finished_on_next_use(tmp_path, leftover):
    target = tmp_path / "teacher"
    variables = tiny_model_variables(3)
    save_model(target, variables, tiny_meta(3))
    os.replace(target, target.with_name("teacher" + leftover))  # the state a kill leaves
    assert has_model(target)
    _, loaded, meta = load_model(target)
    assert meta["num_classes"] == 3
    np.testing.assert_array_equal(
        loaded["params"]["fc"]["kernel"], np.asarray(variables["params"]["fc"]["kernel"])
    )


def test_half_written_model_directory_is_never_loaded(tmp_path):
    save_model(tmp_path / "teacher", tiny_model_variables(3), tiny_meta(3))
    (tmp_path / "teacher" / MODEL_FILE).unlink()  # model.json is written last
    assert not has_model(tmp_path / "teacher")
    with pytest.raises(CheckpointError, match="no model checkpoint"):
        load_model(tmp_path / "teacher")


# --- bad inputs ---------------------------------------------------------------------------


def tiny(**overrides):
    cfg = tiny_config.get_config()
    cfg.teacher_epochs = 1
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.mark.parametrize(
    "num_classes, meta_overrides, teacher_fields, match",
    [
        (3, {}, {}, r"resnet10, 3 classes\) does not fit task 'task0', which has 5 classes"),
        (5, {"channels": 1}, {}, r"takes 1-channel images but task 'task0' feeds 3-channel"),
        (5, {}, {"arch": "resnet18"}, r"is a arch='resnet10' model but config.teachers\[0\]"),
    ],
)
def test_teacher_checkpoint_that_does_not_fit_the_task_is_refused(
    tmp_path, num_classes, meta_overrides, teacher_fields, match
):
    ckpt = tmp_path / "teacher"
    save_model(ckpt, tiny_model_variables(num_classes), tiny_meta(num_classes, **meta_overrides))
    cfg = tiny(teachers=({"checkpoint": str(ckpt), **teacher_fields}, {}))
    with pytest.raises(CheckpointError, match=match):
        experiment.run(cfg, tmp_path / "work")
    assert not (tmp_path / "work" / "runs").exists()  # refused before any training


@pytest.mark.parametrize(
    "tasks, match",
    [
        (dict(class_lists=((0, 1, 2), (2, 3))), r"class 2 .* is in both class list 0 and 1"),
        (dict(class_lists=((0, 1), ())), r"class list 1 is empty: every task needs a class"),
        (dict(num_tasks=11), r"cannot split the 10 classes"),
    ],
)
def test_tasks_that_overlap_or_leave_a_teacher_without_classes_are_refused(tmp_path, tasks, match):
    cfg = tiny()
    cfg.tasks.update(tasks)
    with pytest.raises(
        ValueError, match=rf"config.tasks does not give valid teacher tasks: .*{match}"
    ):
        experiment.run(cfg, tmp_path)
    assert not (tmp_path / "teachers").exists()


def test_workdir_blocked_by_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    for workdir in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(WorkdirError, match=f"{tmp_path / 'file'} is a file"):
            experiment.run(tiny(), workdir)


def test_unreadable_workdir_is_a_clear_cli_error_before_any_work(tmp_path):
    workdir = tmp_path / "locked"
    workdir.mkdir()
    workdir.chmod(0o500)  # read and enter, no writing
    prefix = ()
    if os.geteuid() == 0:
        # root ignores permissions unless it runs without the capability to override them.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        prefix = ("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}")
    try:
        done = subprocess.run(
            [*prefix, *main_command(workdir)], cwd=REPO, capture_output=True, text=True
        )
    finally:
        workdir.chmod(0o755)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: workdir {workdir} is not usable (Permission denied" in done.stderr
    assert "Traceback" not in done.stderr
    assert os.listdir(workdir) == []


# --- a corrupt checkpoint in a real run ---------------------------------------------------


@pytest.mark.slow
def test_run_resumes_past_a_corrupt_newest_checkpoint_to_the_same_result(tmp_path, caplog):
    cfg = tiny(checkpoint_every=4)
    experiment.run(cfg, tmp_path)
    reference = json.loads((tmp_path / "results.json").read_text())["rows"]

    run_dir = tmp_path / "runs" / "kd" / "seed_0"
    (run_dir / "result.json").unlink()  # as if killed right after the last checkpoint
    flip_bytes(data_files(run_dir / "checkpoints" / "20")[0])
    with caplog.at_level(logging.INFO):
        experiment.run(cfg, tmp_path)
    assert f"checkpoint {run_dir / 'checkpoints' / '20'} is unreadable" in caplog.text
    assert "kd seed 0: resuming from step 16" in caplog.text
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    for row in reference + rows:
        row.pop("wall_s", None)
    assert rows == reference
