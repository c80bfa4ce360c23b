"""The in-memory dataset structures every source returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compare by identity
class Split:
    """One split, decoded to fixed-size uint8 images in host memory.

    Attributes:
      images: (N, H, W, C) uint8, C = 1 (grayscale) or 3 (RGB). May be a read-only
        ``np.memmap`` when it comes from the on-disk cache.
      labels: (N,) integer labels in the owning dataset's class ids 0..K-1.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be (N, H, W, C) with C in (1, 3), got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def take(self, indices: np.ndarray) -> Split:
        """The sub-split at ``indices`` (a copy)."""
        indices = np.asarray(indices)
        return Split(np.asarray(self.images[indices]), np.asarray(self.labels[indices]))

    def per_class(self, count: Callable[[int], int], seed: int) -> Split:
        """The first ``count(n_c)`` images of each class c (n_c images) in a seeded order,
        kept in dataset order."""
        order = np.random.default_rng(seed).permutation(len(self))
        keep = []
        for c in np.unique(self.labels):
            members = order[self.labels[order] == c]
            keep.append(members[: count(len(members))])
        return self.take(np.sort(np.concatenate(keep)))


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compare by identity
class Dataset:
    """A labelled dataset with a train and a test split over the same classes."""

    name: str
    class_names: tuple[str, ...]
    train: Split
    test: Split

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        k = len(self.class_names)
        for split_name, split in (("train", self.train), ("test", self.test)):
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= k):
                raise ValueError(
                    f"{self.name}: {split_name} labels must lie in [0, {k}), got "
                    f"[{split.labels.min()}, {split.labels.max()}]"
                )
        if self.train.image_shape[:2] != self.test.image_shape[:2]:
            raise ValueError(
                f"{self.name}: train and test image sizes differ: "
                f"{self.train.image_shape} vs {self.test.image_shape}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape
