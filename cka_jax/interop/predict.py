r"""Classify images with the amalgamated student of a finished run.

    python -m cka_jax.predict --workdir=DIR image1.jpg image2.png ...

Prints each image's top-5 classes (union class names) with probabilities. The images get
the same host decoding (shorter side resize + center crop) and test transform as the test
set of the run that produced ``DIR/student/``.

A path that is missing, unreadable or not an image is reported by name on stderr and the
others are still classified; the exit code is then 1 (2 when no image could be read, or
``DIR/student/`` is missing).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from PIL import UnidentifiedImageError

from cka_jax.data import eval_preprocess
from cka_jax.data.imaging import decode_image
from cka_jax.infra.checkpoint import CheckpointError
from cka_jax.models.storage import load_model

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a finished run (holds student/).")
flags.DEFINE_integer("top", 5, "How many classes to print per image.")
flags.mark_flag_as_required("workdir")


class ImageReadError(ValueError):
    """An image file that is missing, unreadable or not an image (the message says which)."""


def read_image(path, size: int, channels: int) -> np.ndarray:
    """Decodes one image file, or raises `ImageReadError` saying why it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{path}: no such file")
    if p.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image file")
    try:
        return decode_image(str(p), size, channels=channels)
    except PermissionError:
        raise ImageReadError(f"{path}: not readable (permission denied)") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{path}: not an image (PIL reads JPEG, PNG, BMP, WebP, GIF, TIFF, ...)"
        ) from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a corrupt file
        raise ImageReadError(f"{path}: a corrupt or truncated image ({err})") from None


def predict_files(student_dir, paths, top: int = 5):
    """Returns ``(results, failures)``: per path, a list of (class name, probability), best
    first, or None for an image that could not be read; and ``{path: why}`` of those."""
    model, variables, meta = load_model(student_dir)
    pre = dict(meta["preprocess"])
    size = int(meta.get("source_image_size", pre["out_size"]))
    channels = 1 if meta.get("source_channels", 3) == 1 else 3
    images, failures = {}, {}
    for i, path in enumerate(paths):
        try:
            images[i] = read_image(path, size, channels)
        except ImageReadError as err:
            failures[path] = str(err)
    results = [None] * len(paths)
    if not images:
        return results, failures
    x = eval_preprocess(
        np.stack(list(images.values())),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()},
    )
    logits, _ = jax.jit(model.apply)(variables, x)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    names = meta["class_names"]
    for i, p in zip(images, probs, strict=True):
        order = np.argsort(-p)[:top]
        results[i] = [(names[j], float(p[j])) for j in order]
    return results, failures


def main(argv):
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's chatter on loading
    paths = argv[1:]
    if not paths:
        print("error: give one or more image files to classify", file=sys.stderr)
        sys.exit(2)
    try:
        results, failures = predict_files(Path(FLAGS.workdir) / "student", paths, FLAGS.top)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for path, result in zip(paths, results, strict=True):
        if result is None:
            print(f"error: {failures[path]}", file=sys.stderr)
            continue
        print(path)
        for name, prob in result:
            print(f"  {name:<24} {prob:.4f}")
        print()
    if failures:
        print(
            f"error: {len(failures)} of {len(paths)} images could not be read: "
            f"{', '.join(failures)}",
            file=sys.stderr,
        )
        sys.exit(1 if len(failures) < len(paths) else 2)


if __name__ == "__main__":
    app.run(main)
