"""A full disk, for real: a small tmpfs mounted for the test (needs root, or the test is
skipped saying so). A checkpoint, a model save or an export that finds no space is an error
naming the path and the space it needs, with no traceback; what was saved before stays
loadable, and once there is space the run resumes from it and ends as one never stopped."""

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.infra.checkpoint import DiskFullError, RunCheckpoints
from cka_jax.interop import export
from cka_jax.models import create_model
from cka_jax.models.storage import load_model, save_model
from tests.main_process import REPO, assert_same_run, main_command
from tests.train.test_preemption import RUNS, assert_same_metrics

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
FULL = r"no space left on the disk to write .+ \(it needs about [\d.]+ [KM]?B, [\d.]+ [KM]?B free"


@pytest.fixture
def disk(tmp_path):
    """A 16 MB tmpfs at ``tmp_path / 'disk'``, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fills ``disk`` but about ``leave`` bytes; returns the filler file."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with filler.open("ab") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def partial_writes(directory: Path) -> list[Path]:
    """Orbax's temporary directories, `save_model`'s ``.partial`` and the exports' ``.tmp``."""
    return [
        p
        for p in directory.rglob("*")
        if "orbax-checkpoint-tmp" in p.name or p.name.endswith((".partial", ".tmp"))
    ]


def state(step: int):
    return {"w": np.random.default_rng(step).random((1 << 17,), np.float32), "n": np.int32(step)}


def test_checkpoint_on_a_full_disk_keeps_the_previous_ones(disk, caplog):
    ckpts = RunCheckpoints(disk / "ckpts")
    ckpts.save(1, state(1), {"step": 1})
    ckpts.save(2, state(2), {"step": 2})
    filler = fill(disk, dir_bytes(disk / "ckpts" / "2") // 2)
    with caplog.at_level(logging.ERROR), pytest.raises(DiskFullError, match=FULL) as err:
        ckpts.save(3, state(3), {"step": 3})
    assert str(disk / "ckpts" / "3") in str(err.value)
    assert "512.0 KB" in str(err.value)  # the state's bytes (2**17 float32 + an int32)
    assert "Traceback" not in caplog.text  # orbax's own reports of it are dropped
    assert partial_writes(disk) == []  # the partial step is removed, its space free again
    ckpts.close()

    ckpts = RunCheckpoints(disk / "ckpts")
    restored, meta = ckpts.restore_latest(state(0))
    assert meta == {"step": 2} and sorted(ckpts.manager.all_steps()) == [1, 2]
    np.testing.assert_array_equal(restored["w"], state(2)["w"])
    filler.unlink()  # space again: step 3 saves
    ckpts.save(3, state(3), {"step": 3})
    assert ckpts.restore_latest(state(0))[1] == {"step": 3}
    ckpts.close()


def small_model():
    model = create_model("resnet10", 5, stem="small", width=8)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), dict(shapes))


META = {"arch": "resnet10", "num_classes": 5, "width": 8, "stem": "small", "image_size": 16}


def test_model_save_and_export_on_a_full_disk_keep_what_was_there(disk, capsys):
    old, new = small_model(), jax.tree.map(lambda x: x + 1, small_model())
    save_model(disk / "model", old, META)
    filler = fill(disk, 4096)
    with pytest.raises(DiskFullError, match=FULL) as err:
        save_model(disk / "model", new, META)
    assert str(disk / "model") in str(err.value)
    assert partial_writes(disk) == []
    _, variables, _ = load_model(disk / "model")  # the model saved before, intact
    jax.tree.map(np.testing.assert_array_equal, variables, old)

    out = disk / "export" / "student"
    code = export.main(["--model_dir", str(disk / "model"), "--format=safetensors", f"--out={out}"])
    assert code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: no space left on the disk to write the export to ")
    assert str(out) in message and "it needs about" in message
    assert partial_writes(disk) == []
    filler.unlink()
    assert (
        export.main(["--model_dir", str(disk / "model"), "--format=safetensors", f"--out={out}"])
        == 0
    )


@pytest.mark.slow
def test_disk_full_mid_run_stops_clearly_and_the_rerun_with_space_ends_identical(
    tiny_main_run, disk
):
    """A real run on the tmpfs is paused once the student's first checkpoint exists, the
    disk filled to less than a checkpoint's room, and the run let go: it stops with exit
    code 2 and a one-line error; freed, the same command resumes and ends as the
    uninterrupted run."""
    workdir = disk / "work"
    checkpoints = workdir / "runs" / "kd" / "seed_0" / "checkpoints"
    proc = subprocess.Popen(
        main_command(workdir),
        cwd=REPO,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the student never wrote a checkpoint:\n" + proc.communicate()[0])
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    newest = max((p for p in checkpoints.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    filler = fill(disk, dir_bytes(newest) // 3)
    proc.send_signal(signal.SIGCONT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(workdir) in errors[0], out[-3000:]
    assert "no space left on the disk" in errors[0] and "rerun the same command" in errors[0]
    assert partial_writes(workdir) == []
    # Every checkpoint left is complete and loads; the newest is where the rerun resumes.
    ckpts = RunCheckpoints(checkpoints)
    steps = sorted(ckpts.manager.all_steps())
    ckpts.close()
    assert steps and max(steps) < 20

    filler.unlink()
    done = subprocess.run(main_command(workdir), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"kd seed 0: resuming from step {max(steps)}" in done.stderr
    assert "unreadable" not in done.stderr
    assert_same_run(tiny_main_run, workdir, RUNS)
    assert_same_metrics(tiny_main_run, workdir)
    json.loads((workdir / "results.json").read_text())  # the report is whole
