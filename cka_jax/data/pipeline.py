"""Host-side batching: a seeded, resumable training order and padded evaluation batches.

The training order is a pure function of ``(seed, step)``: epoch ``e`` visits the images in
``epoch_order(n, seed, e)`` and step ``s`` is batch ``s % steps_per_epoch`` of epoch
``s // steps_per_epoch``. Resuming from a checkpoint at step ``s`` therefore continues with
exactly the batches an uninterrupted run would have seen. Batches are uint8 and small;
decoding happened once, when the source was loaded, and augmentation runs on the device
(``cka_jax.data.augment``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from .base import Split


def num_batches(n: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped for training)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return int(n) // int(batch_size)


@functools.lru_cache(maxsize=8)
def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng((int(seed), int(epoch))).permutation(n)
    order.flags.writeable = False
    return order


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(n)`` visited in ``epoch``; deterministic in (seed, epoch)."""
    if n < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"n, seed and epoch must be non-negative, got {n}, {seed}, {epoch}")
    return _order(int(n), int(seed), int(epoch))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the images in global training step ``step``."""
    steps = num_batches(n, batch_size)
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the split ({n} images)")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    epoch, pos = divmod(int(step), steps)
    return epoch_order(n, seed, epoch)[pos * batch_size : (pos + 1) * batch_size]


def train_batch(
    split: Split, batch_size: int, seed: int, step: int, rows: slice = slice(None)
) -> dict[str, np.ndarray]:
    """Training batch of global step ``step``: ``image`` uint8 (B, H, W, C), ``label`` (B,)
    and ``index`` (B,) (positions in ``split``). Fully determined by (seed, step).

    ``rows`` selects part of the batch: a process of a multi-process run reads only the
    images its devices train on."""
    idx = batch_indices(len(split), batch_size, seed, step)[rows]
    return {
        "image": np.asarray(split.images[idx]),
        "label": np.asarray(split.labels[idx]),
        "index": idx.copy(),
    }


def eval_batches(
    split: Split, batch_size: int, rows: slice = slice(None)
) -> Iterator[dict[str, np.ndarray]]:
    """Every image of ``split`` exactly once, in order, in batches of exactly
    ``batch_size``: the last batch is padded (zero images, label 0, index -1) and carries
    ``mask`` 0 there, so shapes stay static and every real image is scored.

    ``rows`` (a contiguous block of a batch) selects part of every batch: a process of a
    multi-process run reads only the images its devices score. Its padded rows, if any,
    are masked like the rest of the padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    first, last, step = rows.indices(batch_size)
    if step != 1:
        raise ValueError(f"rows must be a contiguous block of the batch, got {rows}")
    n, width = len(split), max(last - first, 0)
    for start in range(0, n, batch_size):
        lo = start + first
        hi = max(min(start + last, n), lo)
        real = hi - lo
        pad = width - real
        image = np.asarray(split.images[lo:hi])
        label = np.asarray(split.labels[lo:hi])
        index = np.arange(lo, hi)
        if pad:
            image = np.concatenate([image, np.zeros((pad, *split.image_shape), image.dtype)])
            label = np.concatenate([label, np.zeros(pad, label.dtype)])
            index = np.concatenate([index, np.full(pad, -1, index.dtype)])
        mask = np.zeros(width, np.float32)
        mask[:real] = 1.0
        yield {"image": image, "label": label, "mask": mask, "index": index}
