"""Data layer: sources -> tasks -> host batches -> on-device augmentation.

  * ``load_source(cfg)`` / ``default_source_config(name)``: decoded, fixed-size datasets
    (embedded MNIST, tfds, FGVC-Aircraft, image folders, numpy arrays).
  * ``split_classes`` / ``union_of_datasets`` -> ``TaskSet``: the teachers' disjoint label
    spaces laid out as contiguous blocks of the union label space.
  * ``train_batch`` / ``eval_batches``: seeded, resumable host batches.
  * ``augment_batch`` / ``two_views`` / ``eval_preprocess``: jitted jnp augmentation.
See docs/data.md.
"""

import importlib

from .base import Dataset, Split
from .errors import DataNotFoundError, DataPreparationError
from .pipeline import batch_indices, epoch_order, eval_batches, num_batches, train_batch
from .presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    augment_config,
    eval_kwargs,
    train_kwargs,
)
from .sources import SOURCES, default_source_config, load_source
from .tasks import TaskSet, split_classes, task_subset, union_of_datasets

# The on-device augmentation needs JAX: imported on first use, so that reading a config
# (which imports the presets and source defaults above) does not load JAX.
_AUGMENT = ("augment_batch", "augment_with_keys", "eval_preprocess", "two_views")


def __getattr__(name: str):
    if name in _AUGMENT:
        return getattr(importlib.import_module(".augment", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "SOURCES",
    "DataNotFoundError",
    "DataPreparationError",
    "Dataset",
    "Split",
    "TaskSet",
    "augment_batch",
    "augment_config",
    "augment_with_keys",
    "batch_indices",
    "default_source_config",
    "epoch_order",
    "eval_batches",
    "eval_kwargs",
    "eval_preprocess",
    "load_source",
    "num_batches",
    "split_classes",
    "task_subset",
    "train_batch",
    "train_kwargs",
    "two_views",
    "union_of_datasets",
]
