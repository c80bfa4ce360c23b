"""XLA compiler options of the project's jitted functions (the train step, its diagnostics
and the evaluation forward), per compilation, so nothing process-wide (``XLA_FLAGS``)
changes.

On CPU, XLA 0.10 hands convolutions and dots to YNNPACK "fusions" by default. Its kernels
for stand-alone convolutions, which is what the weight gradients are, are 2-7x slower than
PyTorch's oneDNN and than XLA's own Eigen convolution at ResNet shapes (docs/performance.md,
"224 px"). The choice (``xla_cpu_experimental_ynn_fusion_type``):

- ``'mixed'``: YNNPACK for dots and reductions (BatchNorm's statistics and gradient sums),
  Eigen for every convolution, XLA's own loops for the element-wise work. Handing the
  element-wise work to YNNPACK too (with the forward convolutions fused into it) was
  measured slower: 1.06x at 224 px, and 2.5x on the stem max-pool's gradient, whose
  interior-padded sums YNNPACK takes apart.
- ``'ynnpack'``: XLA's default.
- ``'eigen'``: YNNPACK off; Eigen computes every convolution, dot and reduction.
- ``'auto'`` (default): 'mixed' for images of at least `AUTO_MIXED_MIN_SIZE` px, else
  'ynnpack'. Measured in one process, steps interleaved, idle machine: 'mixed' takes
  0.66-0.75x 'ynnpack''s time at 224 and 64 px, and the same time at the default's 28 px, where
  'ynnpack' is kept so that small-image runs (the default, 28-32 px studies) compute
  exactly what they did before.

Other platforms (GPU, TPU) get no options. Set the choice with `set_cpu_convolutions` (or
the environment variable ``CKA_JAX_CPU_CONVOLUTIONS``) before the functions are first
compiled: compiled steps and evaluation forwards are cached per choice.
"""

from __future__ import annotations

import os

CPU_CONVOLUTIONS = ("auto", "mixed", "ynnpack", "eigen")
AUTO_MIXED_MIN_SIZE = 64  # px; measured: 224 and 64 gain, 28 is even
ENV = "CKA_JAX_CPU_CONVOLUTIONS"
_YNN = "xla_cpu_experimental_ynn_fusion_type"
_OPTIONS = {
    "eigen": {_YNN: ""},
    "ynnpack": {},
    # YNNPACK for dots and reductions only: convolutions to Eigen, element-wise to XLA.
    "mixed": {_YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
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
