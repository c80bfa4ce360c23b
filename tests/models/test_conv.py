"""The im2col path of `cka_jax.models.conv.Conv` computes what XLA's convolution computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.models.conv import IM2COL_MAX_OUTPUT_POSITIONS, Conv, _im2col_conv


@pytest.mark.parametrize(
    "size, kernel, stride, channels",
    [(2, 3, 1, 5), (4, 3, 2, 3), (3, 1, 2, 4), (7, 7, 2, 2), (5, 3, 1, 6), (1, 3, 1, 4)],
)
def test_im2col_matches_xla_convolution_and_its_gradient(size, kernel, stride, channels):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, size, size, channels))
    w = jax.random.normal(kw, (kernel, kernel, channels, 7))
    pad = ((kernel // 2, kernel // 2),) * 2

    def reference(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), pad, dimension_numbers=dims, precision="highest"
        )

    np.testing.assert_allclose(_im2col_conv(x, w, stride, pad), reference(x, w), atol=1e-4)
    grads = [
        jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), (0, 1))(x, w)
        for f in (lambda x, w: _im2col_conv(x, w, stride, pad), reference)
    ]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_conv_picks_im2col_only_for_tiny_outputs_with_flax_conv_parameters():
    conv = Conv(8, 3, padding=1, name="c")
    for size, im2col in ((2, True), (8, False)):
        x = jnp.ones((1, size, size, 4))
        params = conv.init(jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, params) == {"params": {"kernel": (3, 3, 4, 8), "bias": (8,)}}
        text = str(jax.make_jaxpr(conv.apply)(params, x))
        assert (
            ("conv_general_dilated" not in text)
            == im2col
            == (size**2 <= IM2COL_MAX_OUTPUT_POSITIONS)
        )


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [(32, 7, 2, 3), (33, 7, 2, 3), (9, 3, 2, 1), (10, 5, 3, 2), (7, 1, 2, 0)],
)
def test_space_to_depth_matches_xla_convolution_and_its_gradient(size, kernel, stride, padding):
    """The measured alternative stem (`benchmarks.formulations`): same values and
    gradients as the plain strided convolution, with the plain kernel's parameters."""
    from benchmarks.formulations import space_to_depth_conv

    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, size, size, 3))
    w = jax.random.normal(kw, (kernel, kernel, 3, 8))

    def reference(x, w):
        pads = ((padding, padding),) * 2
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), pads, dimension_numbers=dims, precision="highest"
        )

    def s2d(x, w):
        return space_to_depth_conv(x, w, stride, padding)

    np.testing.assert_allclose(s2d(x, w), reference(x, w), rtol=1e-4, atol=1e-4)
    grads = [
        jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), (0, 1))(x, w) for f in (s2d, reference)
    ]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
