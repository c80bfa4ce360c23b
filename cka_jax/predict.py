r"""Classify images with the amalgamated student of a finished run.

    python -m cka_jax.predict --workdir=DIR image1.jpg image2.png ...

Prints each image's top-5 classes (union class names) with probabilities. The images get
the same host decoding (shorter side resize + center crop) and test transform as the test
set of the run that produced ``DIR/student/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from cka_jax.checkpoint import CheckpointError, load_model
from cka_jax.data import eval_preprocess
from cka_jax.data.imaging import decode_image

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a finished run (holds student/).")
flags.DEFINE_integer("top", 5, "How many classes to print per image.")
flags.mark_flag_as_required("workdir")


def predict_files(student_dir, paths, top: int = 5):
    """Returns, per image, a list of (class name, probability), best first."""
    model, variables, meta = load_model(student_dir)
    pre = dict(meta["preprocess"])
    size = int(meta.get("source_image_size", pre["out_size"]))
    channels = 1 if meta.get("source_channels", 3) == 1 else 3
    images = np.stack([decode_image(p, size, channels=channels) for p in paths])
    x = eval_preprocess(
        images, **{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()}
    )
    logits, _ = jax.jit(model.apply)(variables, x)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    names = meta["class_names"]
    out = []
    for p in probs:
        order = np.argsort(-p)[:top]
        out.append([(names[i], float(p[i])) for i in order])
    return out


def main(argv):
    paths = argv[1:]
    if not paths:
        print("error: give one or more image files to classify", file=sys.stderr)
        sys.exit(2)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        print(f"error: no such image file(s): {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    try:
        results = predict_files(Path(FLAGS.workdir) / "student", paths, FLAGS.top)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for path, result in zip(paths, results, strict=True):
        print(path)
        for name, prob in result:
            print(f"  {name:<24} {prob:.4f}")
        print()


if __name__ == "__main__":
    app.run(main)
