"""ResNet shapes and parameter counts against torchvision's published numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.models import AmalgamationHeads, create_model, feature_channels, init_variables


def param_count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


@pytest.mark.parametrize(
    "name, params, channels",
    [("resnet18", 11_689_512, 512), ("resnet34", 21_797_672, 512), ("resnet50", 25_557_032, 2048)],
)
def test_torchvision_parameter_counts_and_feature_shapes(name, params, channels):
    model = create_model(name, 1000)
    variables = abstract_init(model, (1, 224, 224, 3))
    assert param_count(variables["params"]) == params
    logits, features = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3))), variables
    )
    assert logits.shape == (2, 1000)
    assert features.shape == (2, 7, 7, channels)
    assert feature_channels(model) == channels


def torch_conv_out(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


@pytest.mark.parametrize("size", [224, 225, 97, 64, 33])
def test_symmetric_padding_spatial_sizes_match_torch_formula(size):
    # torchvision: conv1 7x7/2 pad 3, maxpool 3x3/2 pad 1, then three stride-2 3x3 pad 1 stages.
    expected = torch_conv_out(size, 7, 2, 3)
    expected = torch_conv_out(expected, 3, 2, 1)
    for _ in range(3):
        expected = torch_conv_out(expected, 3, 2, 1)
    model = create_model("resnet18", 10)
    variables = abstract_init(model, (1, size, size, 3))
    _, features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, 3))), variables)
    assert features.shape[1:3] == (expected, expected)


def test_small_stem_keeps_resolution_and_width_scales_channels():
    model = create_model("resnet10", 7, stem="small", width=8)
    x = jnp.ones((3, 28, 28, 1))
    variables = init_variables(model, 0, x.shape)  # jitted: eager init takes seconds
    logits, features = jax.jit(model.apply)(variables, x)
    assert logits.shape == (3, 7)
    assert features.shape == (3, 4, 4, 64)  # 28 -> 28 -> 14 -> 7 -> 4, 8 * 8 channels
    assert set(variables) == {"params", "batch_stats"}


def test_train_mode_updates_batch_stats_with_torch_momentum():
    model = create_model("resnet10", 3, stem="small", width=4)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3)) * 3 + 5
    variables = init_variables(model, 0, x.shape)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    _, updates = apply(variables, x)
    mean0 = variables["batch_stats"]["bn1"]["mean"]
    mean1 = updates["batch_stats"]["bn1"]["mean"]
    # Reference: the stem conv output's batch mean, blended with momentum 0.9 (torch 0.1).
    conv_out = jax.lax.conv_general_dilated(
        x,
        variables["params"]["conv1"]["kernel"],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    batch_mean = conv_out.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(mean1, 0.9 * mean0 + 0.1 * batch_mean, rtol=1e-4, atol=1e-5)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet19", 10)


@pytest.mark.parametrize("common_space", ["cka", "cfl"])
def test_amalgamation_heads_shapes(common_space):
    heads = AmalgamationHeads(
        teacher_channels=(32, 64),
        common_space=common_space,
        projection=True,
        reconstruction=True,
    )
    s1 = jnp.ones((5, 4, 4, 16))
    s2 = jnp.zeros((5, 4, 4, 16))
    teachers = [jnp.ones((5, 4, 4, 32)), jnp.ones((5, 4, 4, 64))]
    variables = heads.init(jax.random.key(0), s1, teachers, s2)
    assert set(variables) == {"params"}
    out = heads.apply(variables, s1, teachers, s2)
    assert out["projection"].shape == (5, 128)
    assert out["projection_view2"].shape == (5, 128)
    if common_space == "cka":
        assert out["student_common"].shape == (5, 128)
        assert [r.shape for r in out["reconstruction"]] == [(5, 32), (5, 64)]
        assert [r.shape for r in out["reconstruction_target"]] == [(5, 32), (5, 64)]
    else:
        assert out["student_common"].shape == (5, 4, 4, 128)
        assert [r.shape for r in out["reconstruction"]] == [(5, 4, 4, 32), (5, 4, 4, 64)]
    assert [c.shape[-1] for c in out["teacher_common"]] == [128, 128]
    # The common-space extractor is shared: one set of weights for student and teachers.
    params = variables["params"]
    shared = "shared_mlp" if common_space == "cka" else "shared_extractor"
    assert shared in params
    assert {"adapt_student", "adapt_teacher0", "adapt_teacher1"} <= set(params)


def test_heads_build_only_what_the_method_uses():
    heads = AmalgamationHeads(teacher_channels=(8, 8))
    s = jnp.ones((2, 2, 2, 4))
    variables = heads.init(jax.random.key(0), s, [s * 2, s * 2])
    assert variables == {} or not variables.get("params")
