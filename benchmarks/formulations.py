"""Convolution formulations measured against XLA's plain convolution and not adopted: kept
so that the measurements in docs/performance.md can be rerun (`scripts/benchmark_convs.py
--stem_formulation=s2d`) and are tested against the plain convolution (tests/models/test_conv.py).

The ImageNet stem as space-to-depth + a stride-1 4x4 convolution lost on this project's CPU
(its forward 2.7x slower than the plain 7x7/2, its weight gradient 1.3x slower; 224 px,
B = 16), so `cka_jax.models.conv.Conv` does not use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def space_to_depth_conv(x, kernel, stride: int, padding: int):
    """A stride-``s`` convolution (NHWC, HWIO, equal padding) as a stride-1 one: the padded
    input's ``s x s`` blocks become channels (space-to-depth) and the kernel, zero-padded to
    a multiple of ``s``, is rearranged to match (``ceil(k / s)`` square, ``s * s * cin``
    input channels). Same values as `lax.conv_general_dilated` up to summation order; the
    parameters stay ``kernel`` (k, k, cin, cout). For the ImageNet stem, a 7x7/2 conv on 3
    channels becomes a 4x4/1 conv on 12 (`space_to_depth_stem_conv`)."""
    n, h, w, cin = x.shape
    k, cout, s = kernel.shape[0], kernel.shape[-1], stride
    kb = -(-k // s)  # the rearranged kernel's size
    out_h, out_w = (h + 2 * padding - k) // s + 1, (w + 2 * padding - k) // s + 1
    # Output o reads padded rows s*o .. s*o + k - 1, i.e. blocks o .. o + kb - 1.
    need_h, need_w = s * (out_h + kb - 1), s * (out_w + kb - 1)
    x = jnp.pad(
        x,
        (
            (0, 0),
            (padding, max(need_h - h - padding, 0)),
            (padding, max(need_w - w - padding, 0)),
            (0, 0),
        ),
    )[:, :need_h, :need_w]
    x = x.reshape(n, need_h // s, s, need_w // s, s, cin).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, need_h // s, need_w // s, s * s * cin)
    kernel = jnp.pad(kernel, ((0, kb * s - k), (0, kb * s - k), (0, 0), (0, 0)))
    kernel = kernel.reshape(kb, s, kb, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    kernel = kernel.reshape(kb, kb, s * s * cin, cout)
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def space_to_depth_stem_conv(x, kernel):
    """The ImageNet stem's 7x7/2 convolution (padding 3) as space-to-depth + a 4x4/1 conv."""
    return space_to_depth_conv(x, kernel, 2, 3)
