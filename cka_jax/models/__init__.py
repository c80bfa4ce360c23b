"""Models: torchvision-compatible ResNets, the heads the amalgamation methods train, and
MCL-OKD's peer networks.

The names below are imported on first use (PEP 562), so that `cka_jax.models.catalog`, which
the config reads, does not load flax and JAX.
"""

import importlib

_EXPORTS = {
    "MLP": "heads",
    "Adaption": "heads",
    "AmalgamationHeads": "heads",
    "ConvDecoder": "heads",
    "ResidualBlock": "heads",
    "SharedExtractor": "heads",
    "PeerNetworks": "peers",
    "ARCHITECTURES": "resnet",
    "ResNet": "resnet",
    "create_model": "resnet",
    "feature_channels": "resnet",
    "init_variables": "resnet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
