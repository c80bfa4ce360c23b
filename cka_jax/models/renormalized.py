"""A frozen teacher whose inputs were normalised differently from the run's.

A ported teacher records the preprocessing it was trained with (``model.json``:
``preprocess.mean`` / ``std``). The run feeds every model the same views, normalised with
the run's mean m_r and std s_r; `Renormalized` maps them to the teacher's own normalisation
before its forward pass, per channel:

    x_t = (x_r * s_r + m_r - m_t) / s_t = x_r * (s_r / s_t) + (m_r - m_t) / s_t

so each teacher sees its inputs as in its own training. Image size and crop cannot be
changed per model this way (the views are shared); a mismatch there is a warning
(`cka_jax.stages.teachers`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Renormalized:
    """``model`` (a ResNet) behind a per-channel affine map of its input; everything else
    (feature channels, class count, ...) is the model's."""

    model: Any
    scale: tuple[float, ...]
    shift: tuple[float, ...]

    def apply(self, variables, x, **kwargs):
        x = x * jnp.asarray(self.scale, x.dtype) + jnp.asarray(self.shift, x.dtype)
        return self.model.apply(variables, x, **kwargs)

    def __getattr__(self, name):
        if name == "model":  # not yet set (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def renormalization(run_mean, run_std, teacher_mean, teacher_std):
    """``(scale, shift)`` per channel taking the run's normalisation to the teacher's."""
    m_r, s_r = np.asarray(run_mean, np.float64), np.asarray(run_std, np.float64)
    m_t, s_t = np.asarray(teacher_mean, np.float64), np.asarray(teacher_std, np.float64)
    scale, shift = s_r / s_t, (m_r - m_t) / s_t
    return tuple(float(v) for v in scale), tuple(float(v) for v in shift)
