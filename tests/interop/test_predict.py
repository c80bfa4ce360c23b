"""`python -m cka_jax.predict` on a mix of good and bad paths: every missing, unreadable or
non-image path is named, the good ones are still classified, and the exit code says so."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cka_jax.config import model_config
from cka_jax.data import augment_config
from cka_jax.models import create_model, init_variables
from cka_jax.models.build import model_meta
from cka_jax.models.storage import save_model
from tests.main_process import REPO

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir holding only an (untrained) exported 3-class student for 16 px images."""
    workdir = tmp_path_factory.mktemp("predict")
    aug = augment_config("mnist")
    aug.out_size = 16
    m = model_config("resnet10", width=4, stem="small")
    model = create_model("resnet10", len(CLASSES), stem="small", width=4)
    variables = init_variables(model, 0, (1, 16, 16, int(aug.channels)))
    meta = model_meta(m, len(CLASSES), aug, CLASSES, source_image_size=16, source_channels=1)
    save_model(workdir / "student", variables, meta)
    return workdir


def predict(workdir, *paths):
    return subprocess.run(
        [sys.executable, "-m", "cka_jax.interop.predict", f"--workdir={workdir}", *map(str, paths)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def good_image(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24), np.uint8)).save(path)
    return path


def test_bad_paths_are_named_and_the_good_ones_still_classified(workdir, tmp_path):
    good = [good_image(tmp_path / "one.png"), good_image(tmp_path / "two.jpg")]
    (tmp_path / "notes.png").write_text("not an image at all\n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    (tmp_path / "folder.png").mkdir()
    bad = {
        tmp_path / "missing.png": "no such file",
        tmp_path / "notes.png": "not an image",
        truncated: "a corrupt or truncated image",
        tmp_path / "folder.png": "is a directory, not an image file",
    }
    done = predict(workdir, good[0], *bad, good[1])
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    blocks = [b.splitlines() for b in done.stdout.strip().split("\n\n")]
    assert [b[0] for b in blocks] == [str(p) for p in good]
    assert all(len(b) == 4 and {line.split()[0] for line in b[1:]} == set(CLASSES) for b in blocks)
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 5, done.stderr
    for line, (path, why) in zip(errors, bad.items(), strict=False):
        assert line.startswith(f"error: {path}: {why}"), done.stderr
    assert errors[-1] == f"error: 4 of 6 images could not be read: {', '.join(map(str, bad))}"


def test_no_readable_image_is_exit_code_2(workdir, tmp_path):
    done = predict(workdir, tmp_path / "missing.png")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {tmp_path / 'missing.png'}: no such file",
        f"error: 1 of 1 images could not be read: {tmp_path / 'missing.png'}",
    ]
