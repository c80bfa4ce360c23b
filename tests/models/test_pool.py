"""The stem's max-pool: the same output as XLA's reduce_window max-pool, and the gradient
PyTorch's max_pool2d computes (to the first maximum of each window, ties included)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.models.pool import max_pool_3x3_s2


def reference_grad(x, g):
    """From the definition: each output's gradient goes to the first maximal element of its
    3x3 window (row-major) in the (-inf)-padded input, summed over windows."""
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    dxp = np.zeros_like(xp)
    for n in range(b):
        for ch in range(c):
            for i in range(g.shape[1]):
                for j in range(g.shape[2]):
                    window = xp[n, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, ch]
                    di, dj = np.unravel_index(np.argmax(window), window.shape)  # first max
                    dxp[n, 2 * i + di, 2 * j + dj, ch] += g[n, i, j, ch]
    return dxp[:, 1:-1, 1:-1]


@pytest.mark.parametrize("shape", [(2, 7, 7, 3), (1, 8, 6, 2), (2, 1, 1, 1), (1, 2, 5, 2)])
def test_max_pool_matches_reduce_window_and_routes_gradients_to_the_first_maximum(shape):
    rng = np.random.default_rng(0)
    # After ReLU, as in the stem: many windows tie at 0; round to get ties above 0 too.
    x = np.maximum(np.round(rng.normal(size=shape), 1), 0).astype(np.float32)
    want = nn.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    got, vjp = jax.vjp(max_pool_3x3_s2, jnp.asarray(x))
    np.testing.assert_array_equal(got, want)
    g = rng.normal(size=got.shape).astype(np.float32)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], reference_grad(x, g), rtol=1e-6, atol=1e-6)


def test_max_pool_propagates_nan_and_infinities_like_maximum():
    """The compare-and-select maximum keeps ``jnp.maximum``'s semantics: a NaN anywhere in a
    window makes its output NaN (whatever its position), infinities are ordinary values."""
    x = np.zeros((1, 6, 6, 4), np.float32)
    x[0, 0, 0, 0] = np.nan  # first element of its windows
    x[0, 3, 3, 1] = np.nan  # last element of a window, after larger values
    x[0, 2, 2, 1] = 5.0
    x[0, 1, 1, 2], x[0, 4, 4, 3] = np.inf, -np.inf
    want = nn.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    got = max_pool_3x3_s2(jnp.asarray(x))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).sum() == 1 + 4  # NaN at (0, 0) in 1 window, at (3, 3) in 4
    np.testing.assert_array_equal(got, want)  # NaNs compare equal here
