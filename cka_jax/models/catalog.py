"""The architectures `create_model` builds, by name: residual blocks per stage. Plain Python,
no JAX (the config validates architecture names and stage counts with it); the layer
details are in `cka_jax.models.resnet`."""

ARCHITECTURE_STAGES = {
    "resnet10": (1, 1, 1, 1),  # small variant for tiny images and fast tests (not torchvision)
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "wide_resnet50_2": (3, 4, 6, 3),
    "wide_resnet101_2": (3, 4, 23, 3),
    "resnext50_32x4d": (3, 4, 6, 3),
    "resnext101_32x8d": (3, 4, 23, 3),
}
