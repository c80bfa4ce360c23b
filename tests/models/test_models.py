"""ResNet shapes and parameter counts against torchvision's published numbers and models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.models import (
    ARCHITECTURES,
    AmalgamationHeads,
    create_model,
    feature_channels,
    init_variables,
)
from cka_jax.models.conv import IM2COL_MAX_OUTPUT_POSITIONS, Conv


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


# torchvision's deeper, wide and ResNeXt models: (name, parameters, 3x3 conv2 weight of
# layer1.0 as torch shapes it (out, in / groups, 3, 3)).
NEW_ARCHS = [
    ("resnet101", 44_549_160, (64, 64, 3, 3)),
    ("resnet152", 60_192_808, (64, 64, 3, 3)),
    ("wide_resnet50_2", 68_883_240, (128, 128, 3, 3)),
    ("wide_resnet101_2", 126_886_696, (128, 128, 3, 3)),
    ("resnext50_32x4d", 25_028_904, (128, 4, 3, 3)),
    ("resnext101_32x8d", 88_791_336, (256, 8, 3, 3)),
]


@pytest.mark.parametrize("name, params, conv2_shape", NEW_ARCHS)
def test_deep_wide_and_resnext_match_torchvision_parameters_and_shapes(name, params, conv2_shape):
    import torch  # torchvision's model is the reference (the [port] extra)
    import torchvision

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        reference = getattr(torchvision.models, name)(weights=None, num_classes=1000)
    assert sum(p.numel() for p in reference.parameters()) == params
    model = create_model(name, 1000)
    variables = abstract_init(model, (1, 64, 64, 3))
    assert param_count(variables["params"]) == params
    # Every tensor has torchvision's shape (OIHW -> HWIO for convolutions).
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    kernel = variables["params"]["layer1_0"]["conv2"]["kernel"].shape
    assert (kernel[3], kernel[2], kernel[0], kernel[1]) == conv2_shape
    assert torch_shapes["layer1.0.conv2.weight"] == conv2_shape
    last = f"layer4_{ARCHITECTURES[name].stage_sizes[-1] - 1}"
    for conv_name in ("conv1", "conv2", "conv3"):
        h, w, i, o = variables["params"][last][conv_name]["kernel"].shape
        torch_name = f"layer4.{ARCHITECTURES[name].stage_sizes[-1] - 1}.{conv_name}.weight"
        assert (o, i, h, w) == torch_shapes[torch_name], torch_name
    logits, features = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((2, 64, 64, 3))), variables
    )
    assert logits.shape == (2, 1000)
    assert features.shape == (2, 2, 2, 2048)
    assert feature_channels(model) == 2048


def test_architectures_agree_with_the_catalog_the_config_reads():
    from cka_jax.models.catalog import ARCHITECTURE_STAGES

    assert {k: v.stage_sizes for k, v in ARCHITECTURES.items()} == ARCHITECTURE_STAGES


@pytest.mark.parametrize(
    "name, width, inner",
    [("resnext50_32x4d", 32, 64), ("wide_resnet50_2", 16, 32), ("resnet50", 16, 16)],
)
def test_width_scales_wide_and_resnext_nets_with_torchvisions_formula(name, width, inner):
    model = create_model(name, 3, width=width)
    params = abstract_init(model, (1, 32, 32, 3))["params"]
    groups = ARCHITECTURES[name].groups
    assert params["conv1"]["kernel"].shape == (7, 7, 3, width)
    assert params["layer1_0"]["conv2"]["kernel"].shape == (3, 3, inner // groups, inner)
    assert params["layer1_0"]["conv3"]["kernel"].shape == (1, 1, inner, 4 * width)
    assert feature_channels(model) == 8 * width * 4


def test_too_narrow_resnext_and_grouped_basic_blocks_are_clear_errors():
    with pytest.raises(ValueError, match=r"width=8 is too small for resnext50_32x4d.*at least 16"):
        create_model("resnext50_32x4d", 10, width=8)
    with pytest.raises(ValueError, match="width must be >= 1"):
        create_model("resnet18", 10, width=0)
    from cka_jax.models.resnet import BasicBlock, ResNet

    model = ResNet(stage_sizes=(1,), block=BasicBlock, num_classes=2, groups=2)
    with pytest.raises(ValueError, match="BasicBlock supports only groups=1"):
        abstract_init(model, (1, 16, 16, 3))


@pytest.mark.parametrize(
    "size, stride, groups, cin, cout",
    [(2, 1, 4, 8, 12), (3, 2, 2, 6, 4), (1, 1, 8, 16, 8), (8, 1, 4, 8, 12), (9, 2, 3, 6, 9)],
)
def test_grouped_conv_matches_xla_feature_group_count_and_its_gradient(
    size, stride, groups, cin, cout
):
    """Both paths of `Conv` (im2col for tiny outputs, XLA's convolution otherwise)."""
    conv = Conv(cout, 3, stride, padding=1, use_bias=False, groups=groups)
    x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
    params = conv.init(jax.random.key(1), x)
    kernel = params["params"]["kernel"]
    assert kernel.shape == (3, 3, cin // groups, cout)
    out_size = (size + 2 - 3) // stride + 1
    uses_im2col = out_size**2 <= IM2COL_MAX_OUTPUT_POSITIONS
    assert ("conv_general_dilated" not in str(jax.make_jaxpr(conv.apply)(params, x))) == uses_im2col

    def reference(x, w):
        return jax.lax.conv_general_dilated(
            x,
            w,
            (stride, stride),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
            precision="highest",
        )

    # An independent reference too: each group convolved on its own and concatenated.
    per_group = [
        jax.lax.conv_general_dilated(
            x[..., g * (cin // groups) : (g + 1) * (cin // groups)],
            kernel[..., g * (cout // groups) : (g + 1) * (cout // groups)],
            (stride, stride),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision="highest",
        )
        for g in range(groups)
    ]
    ours = lambda x, w: conv.apply({"params": {"kernel": w}}, x)
    np.testing.assert_allclose(reference(x, kernel), jnp.concatenate(per_group, -1), atol=1e-5)
    np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), atol=1e-4)
    grads = [
        jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), (0, 1))(x, kernel)
        for f in (ours, reference)
    ]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_grouped_conv_rejects_channels_the_groups_do_not_divide():
    conv = Conv(8, 3, padding=1, groups=3, name="conv2")
    with pytest.raises(ValueError, match=r"'conv2': groups=3 .*input channels \(6\).*\(8\)"):
        conv.init(jax.random.key(0), jnp.ones((1, 4, 4, 6)))


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
