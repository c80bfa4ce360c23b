"""A 2-D convolution (NHWC, HWIO kernel) that stays fast on tiny feature maps.

XLA's CPU convolution is pathologically slow when the output map is tiny: a 3x3, 512-channel
convolution with a 2x2 output takes ~590 ms for a batch of 64 on 2 cores. The same product
written as im2col plus one matrix multiply takes ~5 ms (scripts/benchmark.py; measured in
docs/performance.md). ResNets meet such maps in their last stage whenever the input is small
(64 px through the ImageNet stem, 16 px digits). Larger maps keep `lax.conv_general_dilated`,
which is faster there. The parameters ('kernel' (kh, kw, in / groups, out), optional 'bias')
are exactly those of `flax.linen.Conv` (with ``feature_group_count=groups``), so checkpoints
and ported weights are unchanged.

Grouped convolutions (ResNeXt's 3x3) split the input and output channels into ``groups``
contiguous blocks, group g mapping input channels ``[g*in/groups, (g+1)*in/groups)`` to output
channels ``[g*out/groups, (g+1)*out/groups)``, as torch's ``groups`` and XLA's
``feature_group_count`` do; the im2col path computes them as one batched matmul per group.
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


def _im2col_conv(x, kernel, stride: int, padding, groups: int = 1):
    """``sum_{i,j,c} x[n, s*h + i, s*w + j, c] * kernel[i, j, c, o]`` as one matmul.

    With ``groups`` > 1, ``kernel`` is (kh, kw, in / groups, out) and output channel o only
    sees the input channels of its group (``o // (out / groups)``), as in XLA's
    ``feature_group_count``.
    """
    kh, kw, cin_per_group, cout = kernel.shape
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    patches = [
        x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
        for i in range(kh)
        for j in range(kw)
    ]
    # Patch channels are laid out (i, j, c), matching the kernel's reshape to (kh*kw*cin, cout).
    patches = jnp.concatenate(patches, axis=-1)
    if groups == 1:
        return patches @ kernel.reshape(kh * kw * cin_per_group, cout)
    n = patches.shape[0]
    # (n, h, w, i*j, group, c) times (i*j, c, group, o) -> (n, h, w, group, o): one matmul
    # per group; output channel g * (cout / groups) + o is group g's o-th.
    patches = patches.reshape(n, out_h, out_w, kh * kw, groups, cin_per_group)
    w = kernel.reshape(kh * kw, cin_per_group, groups, cout // groups)
    y = jnp.einsum("nhwpgc,pcgo->nhwgo", patches, w)
    return y.reshape(n, out_h, out_w, cout)


class Conv(nn.Module):
    """``nn.Conv`` with square kernel, equal strides, explicit padding and optional channel
    groups (``feature_group_count``; see the module doc)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        k, s, p, g = self.kernel_size, self.stride, self.padding, self.groups
        cin = x.shape[-1]
        if g < 1 or cin % g or self.features % g:
            raise ValueError(
                f"Conv '{self.name}': groups={g} must be >= 1 and divide both the input "
                f"channels ({cin}) and the output channels ({self.features})"
            )
        kernel = self.param("kernel", self.kernel_init, (k, k, cin // g, self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        pads = ((p, p), (p, p))
        out_h = (x.shape[1] + 2 * p - k) // s + 1
        out_w = (x.shape[2] + 2 * p - k) // s + 1
        if out_h * out_w <= IM2COL_MAX_OUTPUT_POSITIONS:
            y = _im2col_conv(x, kernel, s, pads, g)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                (s, s),
                pads,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=g,
            )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y
