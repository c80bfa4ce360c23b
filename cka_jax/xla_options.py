"""XLA compiler options of the project's jitted functions (the train step, its diagnostics
and the evaluation forward), per compilation, so nothing process-wide (``XLA_FLAGS``)
changes.

On CPU, XLA 0.10 hands convolutions and dots to YNNPACK "fusions" by default. Its kernels
for stand-alone convolutions, which is what the weight gradients are, are 2-7x slower than
PyTorch's oneDNN and than XLA's own Eigen convolution at ResNet shapes, while its fused
forward convolutions and dots are as fast or faster (docs/performance.md, "224 px"). The
choice (``xla_cpu_experimental_ynn_fusion_type``):

- ``'mixed'``: YNNPACK for dots and the fusions around them (element-wise, reductions;
  forward convolutions fused with them), Eigen for stand-alone convolutions.
- ``'ynnpack'``: XLA's default.
- ``'eigen'``: YNNPACK off; Eigen computes every convolution and dot.
- ``'auto'`` (default): 'mixed' for images of at least `AUTO_MIXED_MIN_SIZE` px, else
  'ynnpack'. Measured in one process, steps interleaved: 'mixed' takes 0.78-0.95x
  'ynnpack''s time at 224 px, but 1.05-1.13x at 28 and 64 px (more of the step is small
  convolutions and dots there), so each shape gets its winner.

Other platforms (GPU, TPU) get no options. Set the choice with `set_cpu_convolutions` (or
the environment variable ``CKA_JAX_CPU_CONVOLUTIONS``) before the functions are first
compiled: compiled steps and evaluation forwards are cached per choice.
"""

from __future__ import annotations

import os

CPU_CONVOLUTIONS = ("auto", "mixed", "ynnpack", "eigen")
AUTO_MIXED_MIN_SIZE = 128  # px; measured: 224 gains, 64 and 28 lose
ENV = "CKA_JAX_CPU_CONVOLUTIONS"
_YNN = "xla_cpu_experimental_ynn_fusion_type"
_OPTIONS = {
    "eigen": {_YNN: ""},
    "ynnpack": {},
    # YNNPACK for dots and the fusions around them, not for stand-alone convolutions.
    "mixed": {
        _YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
    },
}

_choice = os.environ.get(ENV, "auto")


def _check(choice: str) -> str:
    if choice not in CPU_CONVOLUTIONS:
        raise ValueError(f"CPU convolutions must be one of {CPU_CONVOLUTIONS}, got {choice!r}")
    return choice


def set_cpu_convolutions(choice: str) -> None:
    """Which kernels compute CPU convolutions in functions compiled from now on."""
    global _choice
    _choice = _check(choice)


def cpu_convolutions() -> str:
    return _check(_choice)


def resolved(image_size: int | None) -> str:
    """The kernels the current choice gives a function whose inputs are ``image_size`` px
    ('auto' decided)."""
    choice = cpu_convolutions()
    if choice != "auto":
        return choice
    return "mixed" if image_size and image_size >= AUTO_MIXED_MIN_SIZE else "ynnpack"


def compiler_options(devices, image_size: int | None = None) -> dict | None:
    """``jax.jit(..., compiler_options=)`` for a function that runs on ``devices`` with
    inputs of ``image_size`` px."""
    if not devices or any(d.platform != "cpu" for d in devices):
        return None
    return dict(_OPTIONS[resolved(image_size)]) or None
