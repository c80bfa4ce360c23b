"""Trainable heads of the amalgamation methods (the teachers' backbones stay frozen).

- CKA (Gao, Fu, Liu and Han, "Contrastive Knowledge Amalgamation for Unsupervised Image
  Classification", Sec. 4.2): per model a 1x1 conv adaption to 256 channels, global
  average pooling, then a shared MLP to the 128-d common space; a 2-layer projection MLP on
  the student's pooled features for the intra-model contrast (Eq. 3).
- CFL (Luo et al. 2019, Sec. 4.1, Fig. 2): per model a 1x1 conv adaption (+ReLU) to 256
  channels and a shared extractor of three residual blocks (1x1/3x3 convs, stride 1) to 128
  channels, kept spatial; per teacher a decoder maps the common feature back to the teacher's
  original feature map for the reconstruction loss (Eq. 4).

The heads hold no BatchNorm, so the frozen teachers' side has no running statistics to update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cka_jax.models.conv import Conv


class MLP(nn.Module):
    """Dense -> ReLU -> Dense."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
        return nn.Dense(self.out, dtype=self.dtype, name="out")(x)


class Adaption(nn.Module):
    """1x1 convolution to a fixed channel count, so models of any width meet in one space."""

    features: int = 256
    relu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv(self.features, 1, dtype=self.dtype, name="conv")(x)
        return nn.relu(x) if self.relu else x


class ResidualBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 convolutions (stride 1) with a (projected) identity shortcut."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.relu(Conv(self.features, 1, dtype=self.dtype, name="conv1")(x))
        y = nn.relu(Conv(self.features, 3, padding=1, dtype=self.dtype, name="conv2")(y))
        y = Conv(self.features, 1, dtype=self.dtype, name="conv3")(y)
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = Conv(self.features, 1, dtype=self.dtype, name="shortcut")(x)
        return nn.relu(y + shortcut)


class SharedExtractor(nn.Module):
    """CFL's shared extractor: three residual blocks to ``features`` channels."""

    features: int = 128
    num_blocks: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_blocks):
            x = ResidualBlock(self.features, dtype=self.dtype, name=f"block{i}")(x)
        return x


class ConvDecoder(nn.Module):
    """Maps a CFL common feature map back to a teacher's feature map (1x1 convs)."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(Conv(self.hidden, 1, dtype=self.dtype, name="conv1")(x))
        return Conv(self.out, 1, dtype=self.dtype, name="conv2")(x)


class AmalgamationHeads(nn.Module):
    """All trainable heads a method needs, created only when used.

    Attributes:
      teacher_channels: channels of each teacher's feature map, in task order.
      common_space: None, 'cka' (pooled 128-d vectors) or 'cfl' (spatial 128-channel maps).
      projection: whether to build the student's projection head (intra-model contrast).
      reconstruction: whether to build the per-teacher decoders (CFL Eq. 4; CKA's guard).
      adapted_maps: whether to return the 1x1-adapted maps (CKA's inter-model contrast on
        the common space's c x h x w maps).

    ``__call__(student_features, teacher_features, student_features_view2=None)`` returns a
    dict with, where built: 'student_common' and 'teacher_common' (list), 'reconstruction'
    and 'reconstruction_target' (lists, per teacher), 'projection' (and 'projection_view2'),
    'student_adapted' and 'teacher_adapted' (list).
    """

    teacher_channels: Sequence[int]
    common_space: str | None = None
    projection: bool = False
    reconstruction: bool = False
    adapted_maps: bool = False
    adapt_dim: int = 256
    common_dim: int = 128
    projection_dim: int = 128
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32

    @nn.compact
    def __call__(self, student_features, teacher_features, student_features_view2=None):
        if len(teacher_features) != len(self.teacher_channels):
            raise ValueError(
                f"got {len(teacher_features)} teacher feature maps for "
                f"{len(self.teacher_channels)} teachers"
            )
        out = {}
        if self.projection:
            projector = MLP(self.adapt_dim, self.projection_dim, self.dtype, name="projection")
            out["projection"] = projector(jnp.mean(student_features, axis=(1, 2)))
            if student_features_view2 is not None:
                out["projection_view2"] = projector(jnp.mean(student_features_view2, axis=(1, 2)))
        if self.common_space is None:
            return out
        adapted_maps = {}
        if self.common_space == "cka":
            shared = MLP(self.adapt_dim, self.common_dim, self.dtype, name="shared_mlp")

            def to_common(features, name):
                adapted = Adaption(self.adapt_dim, relu=True, dtype=self.dtype, name=name)(features)
                if self.adapted_maps:
                    adapted_maps[name] = adapted
                return shared(jnp.mean(adapted, axis=(1, 2)))

            targets = [jnp.mean(f, axis=(1, 2)) for f in teacher_features]
            decoders = [
                MLP(self.adapt_dim, c, self.dtype, name=f"decoder{t}")
                for t, c in enumerate(self.teacher_channels)
            ]
        elif self.common_space == "cfl":
            shared = SharedExtractor(self.common_dim, dtype=self.dtype, name="shared_extractor")

            def to_common(features, name):
                adapted = Adaption(self.adapt_dim, relu=True, dtype=self.dtype, name=name)(features)
                return shared(adapted)

            targets = list(teacher_features)
            decoders = [
                ConvDecoder(self.adapt_dim, c, self.dtype, name=f"decoder{t}")
                for t, c in enumerate(self.teacher_channels)
            ]
        else:
            raise ValueError(f"unknown common_space {self.common_space!r}: use 'cka' or 'cfl'")
        out["student_common"] = to_common(student_features, "adapt_student")
        out["teacher_common"] = [
            to_common(f, f"adapt_teacher{t}") for t, f in enumerate(teacher_features)
        ]
        if self.adapted_maps:
            if self.common_space != "cka":
                raise ValueError("adapted_maps needs common_space='cka'")
            out["student_adapted"] = adapted_maps["adapt_student"]
            out["teacher_adapted"] = [
                adapted_maps[f"adapt_teacher{t}"] for t in range(len(teacher_features))
            ]
        if self.reconstruction:
            out["reconstruction"] = [
                d(c) for d, c in zip(decoders, out["teacher_common"], strict=True)
            ]
            out["reconstruction_target"] = targets
        return out
