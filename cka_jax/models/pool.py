"""The ImageNet stem's 3x3 / stride-2 max-pool as elementwise maxima of strided slices.

XLA's CPU backend runs ``reduce_window`` (and the select-and-scatter of its gradient) far
slower than elementwise code: in the resnet-18 KD step at 64 px it was 110 ms of 870 ms of
op time, against 6 ms for PyTorch's max-pool (docs/performance.md). Here the forward pass
is the maximum of the nine shifted, strided views of the (-inf)-padded input, which XLA fuses
into one loop; the gradient goes to the first maximal element of each window in row-major
order, as torch.nn.functional.max_pool2d routes it, built from the same views.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

WINDOW, STRIDE, PAD = 3, 2, 1


def _out_size(n: int) -> int:
    return (n + 2 * PAD - WINDOW) // STRIDE + 1


def _windows(x):
    """The nine (B, Ho, Wo, C) views: element (i, j) of view (di, dj) is padded input
    (2i + di, 2j + dj)."""
    b, h, w, c = x.shape
    ho, wo = _out_size(h), _out_size(w)
    xp = jnp.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)), constant_values=-jnp.inf)
    views = []
    for di in range(WINDOW):
        for dj in range(WINDOW):
            stop = (b, di + STRIDE * (ho - 1) + 1, dj + STRIDE * (wo - 1) + 1, c)
            views.append(((di, dj), lax.slice(xp, (0, di, dj, 0), stop, (1, STRIDE, STRIDE, 1))))
    return views


def _maximum(a, b):
    """``jnp.maximum`` (NaN wins) as a compare and select: XLA's CPU loop for this is 1.4-1.9x
    faster than for ``maximum`` on the 224 px stem (docs/performance.md)."""
    return jnp.where((a > b) | (a != a), a, b)


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """``nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))`` for NHWC ``x``."""
    return functools.reduce(_maximum, (v for _, v in _windows(x)))


def _fwd(x):
    y = max_pool_3x3_s2(x)
    return y, (x, y)


def _bwd(residuals, g):
    x, y = residuals
    b, h, w, c = x.shape
    hp, wp = h + 2 * PAD, w + 2 * PAD
    zero = jnp.zeros((), g.dtype)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros((b, hp, wp, c), g.dtype)
    for (di, dj), view in _windows(x):
        first = (view == y) & ~taken  # the first maximal element of each window
        taken = taken | first
        part = jnp.where(first, g, zero)
        # Scatter back with interior padding: output (i, j) lands on (2i + di, 2j + dj).
        high_h = hp - (di + STRIDE * (y.shape[1] - 1) + 1)
        high_w = wp - (dj + STRIDE * (y.shape[2] - 1) + 1)
        config = ((0, 0, 0), (di, high_h, STRIDE - 1), (dj, high_w, STRIDE - 1), (0, 0, 0))
        dxp = dxp + lax.pad(part, zero, config)
    return (dxp[:, PAD : PAD + h, PAD : PAD + w, :],)


max_pool_3x3_s2.defvjp(_fwd, _bwd)
