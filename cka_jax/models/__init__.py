"""Models: torchvision-compatible ResNets, the heads the amalgamation methods train, and
MCL-OKD's peer networks."""

from cka_jax.models.heads import (
    MLP,
    Adaption,
    AmalgamationHeads,
    ConvDecoder,
    ResidualBlock,
    SharedExtractor,
)
from cka_jax.models.peers import PeerNetworks, with_bn_axis_name
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
    "PeerNetworks",
    "ResNet",
    "ResidualBlock",
    "SharedExtractor",
    "create_model",
    "feature_channels",
    "init_variables",
    "with_bn_axis_name",
]
