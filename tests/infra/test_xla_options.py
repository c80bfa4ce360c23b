"""The CPU convolution kernels (`cka_jax.infra.xla_options`): applied per compilation, cached per
choice, and computing the same step as XLA's default kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.infra import xla_options


@pytest.fixture
def choice():
    before = xla_options.cpu_convolutions()
    yield xla_options.set_cpu_convolutions
    xla_options.set_cpu_convolutions(before)


def conv_loss(x, w):
    dims = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dims)
    return jnp.sum(jnp.tanh(y) ** 2)


def test_options_only_on_cpu_and_checked(choice):
    cpu = jax.devices("cpu")
    choice("eigen")
    assert xla_options.compiler_options(cpu) == {"xla_cpu_experimental_ynn_fusion_type": ""}
    choice("ynnpack")
    assert xla_options.compiler_options(cpu) is None

    class Gpu:
        platform = "gpu"

    choice("mixed")
    assert xla_options.compiler_options([Gpu()]) is None
    with pytest.raises(ValueError, match="must be one of"):
        choice("onednn")
    # 'auto': the measured winner by image size.
    choice("auto")
    assert xla_options.resolved(224) == "mixed" == xla_options.resolved(64)
    assert xla_options.resolved(32) == "ynnpack"
    assert xla_options.compiler_options(cpu, 28) is None
    mixed = xla_options.compiler_options(cpu, 224)["xla_cpu_experimental_ynn_fusion_type"]
    assert "CONVOLUTION" not in mixed and "ELTWISE" not in mixed


def test_every_choice_compiles_and_computes_the_same_gradients(choice):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (4, 20, 20, 8))
    w = jax.random.normal(kw, (3, 3, 8, 16)) * 0.1
    grads, texts = {}, {}
    for name in xla_options.CPU_CONVOLUTIONS:
        choice(name)
        options = xla_options.compiler_options(jax.devices()[:1])
        fn = jax.jit(jax.grad(conv_loss, (0, 1)), compiler_options=options)
        grads[name] = fn(x, w)
        texts[name] = fn.lower(x, w).compile().as_text()
    assert "ynn" not in texts["eigen"]  # every YNNPACK fusion off
    for name in ("eigen", "mixed"):
        for got, want in zip(grads[name], grads["ynnpack"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_functions_are_cached_per_choice(choice):
    """An evaluation forward (like the train step) compiled under one choice is not reused
    under another."""
    from cka_jax.evaluation import evaluate
    from tests.eval_process import aug_config, fixture

    model = fixture()[0]
    forwards = []
    for name in ("mixed", "eigen", "mixed"):
        choice(name)
        forwards.append(evaluate.Scorer(model, aug_config(), 8).forward)
    assert forwards[0] is forwards[2] and forwards[0] is not forwards[1]
