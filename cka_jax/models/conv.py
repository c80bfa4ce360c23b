"""A 2-D convolution (NHWC, HWIO kernel) that stays fast on tiny feature maps.

XLA's CPU convolution is pathologically slow when the output map is tiny: a 3x3, 512-channel
convolution with a 2x2 output takes ~590 ms for a batch of 64 on 2 cores. The same product
written as im2col plus one matrix multiply takes ~5 ms (scripts/benchmark.py; measured in
docs/performance.md). ResNets meet such maps in their last stage whenever the input is small
(64 px through the ImageNet stem, 16 px digits). Larger maps keep `lax.conv_general_dilated`,
which is faster there. The parameters ('kernel' (kh, kw, in, out), optional 'bias') are
exactly those of `flax.linen.Conv`, so checkpoints and ported weights are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# im2col when the output has at most this many positions (measured crossover: 2x2 is
# 10-100x faster as a matmul, 4x4 about even, 16x16 ~4x slower).
IM2COL_MAX_OUTPUT_POSITIONS = 4


def _im2col_conv(x, kernel, stride: int, padding):
    """``sum_{i,j,c} x[n, s*h + i, s*w + j, c] * kernel[i, j, c, o]`` as one matmul."""
    kh, kw, cin, cout = kernel.shape
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    patches = [
        x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
        for i in range(kh)
        for j in range(kw)
    ]
    # Patch channels are laid out (i, j, c), matching the kernel's reshape to (kh*kw*cin, cout).
    return jnp.concatenate(patches, axis=-1) @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Module):
    """``nn.Conv`` with square kernel, equal strides and explicit padding (see module doc)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, s, p = self.kernel_size, self.stride, self.padding
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        pads = ((p, p), (p, p))
        out_h = (x.shape[1] + 2 * p - k) // s + 1
        out_w = (x.shape[2] + 2 * p - k) // s + 1
        if out_h * out_w <= IM2COL_MAX_OUTPUT_POSITIONS:
            y = _im2col_conv(x, kernel, s, pads)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y
