"""ResNets as Flax Linen modules whose layers match torchvision's one for one.

Shapes, strides and padding follow torchvision's ResNets exactly (`resnet18/34/50/101/152`,
`wide_resnet50_2/101_2`, `resnext50_32x4d`, `resnext101_32x8d`): convolutions use
explicit symmetric padding (``k // 2`` on each side) rather than 'SAME', which pads stride-2
convolutions and the 3x3/2 max-pool on one side only. Submodule names mirror torchvision's
parameter names (``layer1.0.conv1`` -> ``layer1_0/conv1``) so that `cka_jax.interop.port` is a
renaming plus a transpose.

BatchNorm uses torch's defaults: epsilon 1e-5 and momentum 0.1, which is Flax's 0.9 (Flax's
default 0.99 keeps short runs' running statistics near their initial values).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cka_jax.models.catalog import ARCHITECTURE_STAGES
from cka_jax.models.conv import Conv
from cka_jax.models.pool import max_pool_3x3_s2

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
BN_MOMENTUM = 0.9  # torch momentum 0.1
BN_EPSILON = 1e-5


def conv(
    features: int, kernel: int, stride: int = 1, *, name: str, dtype: Any, groups: int = 1
) -> Conv:
    """torchvision's bias-free convolution: ``kernel // 2`` padding on each side."""
    return Conv(
        features,
        kernel,
        stride,
        padding=kernel // 2,
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        groups=groups,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (torchvision `BasicBlock`, expansion 1). Like torchvision's, it
    has no grouped or widened variant: ``groups`` must be 1 and ``width_per_group`` 64."""

    features: int
    stride: int = 1
    norm: Callable[..., nn.Module] = nn.BatchNorm
    dtype: Any = jnp.float32
    groups: int = 1
    width_per_group: int = 64
    expansion = 1

    @nn.compact
    def __call__(self, x):
        if self.groups != 1 or self.width_per_group != 64:
            raise ValueError(
                f"BasicBlock supports only groups=1 and width_per_group=64 (as torchvision's), "
                f"got groups={self.groups}, width_per_group={self.width_per_group}; use "
                f"Bottleneck for wide and ResNeXt blocks"
            )
        identity = x
        y = conv(self.features, 3, self.stride, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv(self.features, 3, name="conv2", dtype=self.dtype)(y)
        y = self.norm(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            identity = conv(
                self.features, 1, self.stride, name="downsample_conv", dtype=self.dtype
            )(x)
            identity = self.norm(name="downsample_bn")(identity)
        return nn.relu(y + identity)


def bottleneck_width(features: int, groups: int = 1, width_per_group: int = 64) -> int:
    """Channels of a bottleneck's 1x1 -> 3x3 -> part, torchvision's formula:
    ``int(planes * (width_per_group / 64)) * groups`` with ``planes`` = ``features``."""
    return int(features * (width_per_group / 64.0)) * groups


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, as in torchvision's v1.5) -> 1x1 with expansion 4.

    The inner width is `bottleneck_width` (``features`` for plain ResNets, twice that for
    wide ones); with ``groups`` > 1 the 3x3 convolution is grouped (ResNeXt).
    """

    features: int
    stride: int = 1
    norm: Callable[..., nn.Module] = nn.BatchNorm
    dtype: Any = jnp.float32
    groups: int = 1
    width_per_group: int = 64
    expansion = 4

    @nn.compact
    def __call__(self, x):
        out_features = self.features * self.expansion
        inner = bottleneck_width(self.features, self.groups, self.width_per_group)
        identity = x
        y = conv(inner, 1, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv(inner, 3, self.stride, name="conv2", dtype=self.dtype, groups=self.groups)(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = conv(out_features, 1, name="conv3", dtype=self.dtype)(y)
        y = self.norm(name="bn3")(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            identity = conv(out_features, 1, self.stride, name="downsample_conv", dtype=self.dtype)(
                x
            )
            identity = self.norm(name="downsample_bn")(identity)
        return nn.relu(y + identity)


class ResNet(nn.Module):
    """A torchvision-compatible ResNet returning ``(logits, features)``.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for resnet18.
      block: `BasicBlock` or `Bottleneck`.
      num_classes: size of the classifier output.
      width: channels of the stem and the first stage's "planes" (64 in torchvision; smaller
        for tiny images). Stage s has planes ``width * 2**s``; its blocks output
        ``planes * block.expansion`` channels.
      groups, width_per_group: torchvision's arguments of the same names (1 and 64 for plain
        ResNets; 1 and 128 for wide ones; 32 and 4 for resnext50_32x4d). A bottleneck's
        inner width is ``int(planes * width_per_group / 64) * groups`` (`bottleneck_width`),
        so ``width`` scales wide and ResNeXt nets like plain ones.
      stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'small' (3x3/1 conv, no pool).
      bn_axis_name: when set, BatchNorm averages its batch statistics over this mapped axis
        (used by the pmap step, so that it matches one device holding the global batch).
      dtype: computation dtype (parameters stay float32).
      first_stage, last_stage: run only stages [first_stage, last_stage) (the stem with
        stage 0): a part of the network with the whole one's parameter names (MCL-OKD's
        branch-based peers share a trunk). With ``last_stage`` set, ``apply`` returns that
        stage's feature map alone; from ``first_stage`` > 0, it takes one.

    ``apply(variables, x, train=False)`` takes NHWC float images; ``features`` is the last
    stage's feature map (B, h, w, c) before pooling.
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module]
    num_classes: int
    width: int = 64
    stem: str = "imagenet"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    first_stage: int = 0
    last_stage: int | None = None
    groups: int = 1
    width_per_group: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            axis_name=self.bn_axis_name if train else None,
        )
        x = x.astype(self.dtype)
        if self.first_stage > 0:
            pass  # a branch: ``x`` is the shared trunk's feature map
        elif self.stem == "imagenet":
            x = conv(self.width, 7, 2, name="conv1", dtype=self.dtype)(x)
            x = nn.relu(norm(name="bn1")(x))
            x = max_pool_3x3_s2(x)
        elif self.stem == "small":
            x = conv(self.width, 3, 1, name="conv1", dtype=self.dtype)(x)
            x = nn.relu(norm(name="bn1")(x))
        else:
            raise ValueError(f"unknown stem {self.stem!r}: use 'imagenet' or 'small'")
        last = len(self.stage_sizes) if self.last_stage is None else self.last_stage
        for stage in range(self.first_stage, last):
            for index in range(self.stage_sizes[stage]):
                x = self.block(
                    features=self.width * 2**stage,
                    stride=2 if stage > 0 and index == 0 else 1,
                    norm=norm,
                    dtype=self.dtype,
                    groups=self.groups,
                    width_per_group=self.width_per_group,
                    name=f"layer{stage + 1}_{index}",
                )(x)
        if self.last_stage is not None:
            return x  # a trunk
        features = x
        pooled = jnp.mean(features, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled)
        return logits.astype(jnp.float32), features.astype(jnp.float32)


class Architecture(NamedTuple):
    """A ResNet family member: blocks per stage, block type and torchvision's ``groups`` and
    ``width_per_group`` (``ARCHITECTURES[name][0]`` is the stage sizes)."""

    stage_sizes: tuple[int, ...]
    block: type[nn.Module]
    groups: int = 1
    width_per_group: int = 64


# Blocks per stage come from `cka_jax.models.catalog` (which the config reads without JAX);
# here, each architecture's block and grouping.
_BLOCKS = {
    "resnet10": (BasicBlock, {}),  # small variant for tiny images and fast tests
    "resnet18": (BasicBlock, {}),
    "resnet34": (BasicBlock, {}),
    "resnet50": (Bottleneck, {}),
    "resnet101": (Bottleneck, {}),
    "resnet152": (Bottleneck, {}),
    "wide_resnet50_2": (Bottleneck, dict(width_per_group=128)),
    "wide_resnet101_2": (Bottleneck, dict(width_per_group=128)),
    "resnext50_32x4d": (Bottleneck, dict(groups=32, width_per_group=4)),
    "resnext101_32x8d": (Bottleneck, dict(groups=32, width_per_group=8)),
}
ARCHITECTURES = {
    name: Architecture(ARCHITECTURE_STAGES[name], block, **grouping)
    for name, (block, grouping) in _BLOCKS.items()
}


def create_model(
    name: str,
    num_classes: int,
    *,
    stem: str = "imagenet",
    width: int = 64,
    bn_axis_name: str | None = None,
    dtype: Any = jnp.float32,
) -> ResNet:
    """Returns the ResNet called ``name`` (one of `ARCHITECTURES`: 'resnet10', torchvision's
    'resnet18' ... 'resnet152', 'wide_resnet50_2', 'wide_resnet101_2', 'resnext50_32x4d',
    'resnext101_32x8d').

    ``width`` is the stem's and first stage's planes (64 = torchvision's model); wide and
    ResNeXt nets scale with it as torchvision's formula says (see `ResNet`): e.g.
    ``create_model('resnext50_32x4d', 10, width=32)`` has 3x3 convolutions of 32 groups of 2
    channels in its first stage.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    arch = ARCHITECTURES[name]
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if arch.block is Bottleneck and bottleneck_width(width, 1, arch.width_per_group) < 1:
        raise ValueError(
            f"width={width} is too small for {name}: its first-stage bottleneck would have "
            f"int({width} * {arch.width_per_group} / 64) = 0 channels per group; use a width "
            f"of at least {-(-64 // arch.width_per_group)}"
        )
    return ResNet(
        stage_sizes=arch.stage_sizes,
        block=arch.block,
        num_classes=num_classes,
        width=width,
        stem=stem,
        bn_axis_name=bn_axis_name,
        dtype=dtype,
        groups=arch.groups,
        width_per_group=arch.width_per_group,
    )


def init_variables(model: nn.Module, seed: int, input_shape) -> dict:
    """``model.init`` under jit, with an 'rbg' PRNG key: XLA's RngBitGenerator compiles in a
    quarter of the time the default threefry takes for a ResNet's many parameter shapes."""
    rng = jax.random.key(seed, impl="rbg")
    return _jitted_init(model)(rng, jnp.zeros(input_shape, jnp.float32))


@functools.cache
def _jitted_init(model: nn.Module):
    return jax.jit(model.init)


def feature_channels(model: ResNet) -> int:
    """Channels of the feature map ``model`` returns."""
    return model.width * 2 ** (len(model.stage_sizes) - 1) * model.block.expansion
