"""Models: torchvision-compatible ResNets and the heads the amalgamation methods train."""

from cka_jax.models.resnet import ARCHITECTURES, ResNet, create_model, feature_channels

__all__ = ["ARCHITECTURES", "ResNet", "create_model", "feature_channels"]
