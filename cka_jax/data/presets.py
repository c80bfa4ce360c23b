"""Augmentation settings: the presets and the keyword arguments they give the on-device
augmentation (`cka_jax.data.augment`). Plain Python, no JAX: configs import it."""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,) * 3
MNIST_STD = (0.3081,) * 3
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

TRAIN_KEYS = (
    "out_size",
    "channels",
    "mean",
    "std",
    "crop_scale",
    "ratio",
    "flip",
    "color_jitter",
    "jitter_prob",
    "grayscale_prob",
    "blur_prob",
    "blur_sigma",
    "blur_kernel",
)
EVAL_KEYS = ("out_size", "channels", "mean", "std", "crop_fraction")


def augment_config(preset: str = "imagenet") -> ml_collections.ConfigDict:
    """Augmentation defaults. ``'imagenet'``: 224 px natural images (the paper's recipe,
    SimCLR-style strengths). ``'mnist'``: gentle settings for 28 px digits (no flip, mild
    crops, brightness/contrast only, no blur), MNIST mean/std. ``'cifar'``: 32 px photographs
    (crops of 35-100% of the image, flips, colour jitter, no blur, which would erase 32 px
    detail), CIFAR-10 mean/std."""
    if preset == "imagenet":
        return ml_collections.ConfigDict(
            dict(
                out_size=224,
                channels=3,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                crop_scale=(0.08, 1.0),
                ratio=(3 / 4, 4 / 3),
                flip=True,
                color_jitter=(0.4, 0.4, 0.4, 0.1),
                jitter_prob=0.8,
                grayscale_prob=0.0,
                blur_prob=0.5,
                blur_sigma=(0.1, 2.0),
                blur_kernel=None,
                crop_fraction=0.875,
            )
        )
    if preset == "mnist":
        cfg = augment_config("imagenet")
        cfg.update(
            out_size=28,
            mean=MNIST_MEAN,
            std=MNIST_STD,
            crop_scale=(0.6, 1.0),
            flip=False,
            color_jitter=(0.4, 0.4, 0.0, 0.0),
            blur_prob=0.0,
            crop_fraction=1.0,
        )
        return cfg
    if preset == "cifar":
        cfg = augment_config("imagenet")
        cfg.update(
            out_size=32,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            crop_scale=(0.35, 1.0),
            blur_prob=0.0,
            crop_fraction=1.0,
        )
        return cfg
    raise ValueError(f"unknown augmentation preset {preset!r}; use 'imagenet', 'mnist' or 'cifar'")


def train_kwargs(cfg) -> dict:
    """The ``augment_batch``/``two_views`` keyword arguments in an augmentation config."""
    return {k: cfg[k] for k in TRAIN_KEYS if k in cfg}


def eval_kwargs(cfg) -> dict:
    """The ``eval_preprocess`` keyword arguments in an augmentation config."""
    return {k: cfg[k] for k in EVAL_KEYS if k in cfg}
