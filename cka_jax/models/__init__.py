"""Models: torchvision-compatible ResNets and the heads the amalgamation methods train."""

from cka_jax.models.heads import (
    MLP,
    Adaption,
    AmalgamationHeads,
    ConvDecoder,
    ResidualBlock,
    SharedExtractor,
)
from cka_jax.models.resnet import (
    ARCHITECTURES,
    ResNet,
    create_model,
    feature_channels,
    init_variables,
)

__all__ = [
    "ARCHITECTURES",
    "MLP",
    "Adaption",
    "AmalgamationHeads",
    "ConvDecoder",
    "ResNet",
    "ResidualBlock",
    "SharedExtractor",
    "create_model",
    "feature_channels",
    "init_variables",
]
