"""Host-side image decoding to a fixed size, and the on-disk cache of decoded splits.

Decoding policy (``resize``):
  * ``'shorter_crop'`` (default): scale so the shorter side is ``image_size`` (bilinear,
    antialiased), then take the central ``image_size x image_size`` square. This is
    torchvision's ``Resize(s) + CenterCrop(s)``; on the device, RandomResizedCrop then
    samples from this square and the test transform center-crops it.
  * ``'stretch'``: resize straight to ``image_size x image_size`` (keeps the whole image,
    distorts the aspect ratio; useful for very wide images).

Decoded splits are cached as plain ``.npy`` files (memory-mapped when read back) under
``<cache root>/cka_jax_cache/<key>/``, where ``<key>`` hashes everything that changes the
arrays (source, files, size, policy), so a second run skips decoding entirely.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .base import Split

RESIZE_MODES = ("shorter_crop", "stretch")
CACHE_DIRNAME = "cka_jax_cache"
_CACHE_VERSION = 1


def _open(src: Any) -> Image.Image:
    if isinstance(src, np.ndarray):
        arr = src[..., 0] if src.ndim == 3 and src.shape[-1] == 1 else src
        return Image.fromarray(np.ascontiguousarray(arr))
    if isinstance(src, bytes | bytearray):
        return Image.open(io.BytesIO(src))
    return Image.open(src)


def decode_image(
    src: Any,
    image_size: int,
    *,
    resize: str = "shorter_crop",
    channels: int = 3,
    crop_bottom: int = 0,
) -> np.ndarray:
    """Decodes one image (path, encoded bytes or array) to (size, size, channels) uint8.

    ``crop_bottom`` removes that many rows (in the original resolution) from the bottom
    first, e.g. FGVC-Aircraft's 20-pixel copyright banner.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = _open(src)
    full_w, full_h = img.size
    if img.format == "JPEG":
        # Let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) when that still leaves
        # at least image_size pixels on each side: several times faster on large photos.
        img.draft("RGB" if channels == 3 else "L", (image_size, image_size + crop_bottom))
    img = img.convert("RGB" if channels == 3 else "L")
    if crop_bottom:
        rows = round(crop_bottom * img.size[1] / full_h)
        img = img.crop((0, 0, img.size[0], img.size[1] - rows))
    w, h = img.size
    if resize == "stretch":
        img = img.resize((image_size, image_size), Image.BILINEAR)
    else:
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def decode_many(
    sources: Sequence[Any],
    image_size: int,
    *,
    skip_errors: bool = False,
    workers: int | None = None,
    decode: Callable[..., np.ndarray] | None = None,
    **kwargs,
) -> tuple[np.ndarray, list[int]]:
    """Decodes many images in a thread pool (PIL releases the GIL while decoding), each with
    ``decode(source, image_size, **kwargs)`` (`decode_image` by default; a source may be a
    ``(path, extra)`` tuple for a custom ``decode``, named by its path in errors).

    Returns ``(images, failed)``: the stacked images of every source that decoded, and the
    indices of those that did not (only when ``skip_errors``; otherwise the first failure
    raises, naming the file).
    """
    decode = decode or decode_image
    channels = kwargs.get("channels", 3)
    out = np.zeros((len(sources), image_size, image_size, channels), np.uint8)
    ok = np.ones(len(sources), bool)

    def work(i: int) -> None:
        try:
            out[i] = decode(sources[i], image_size, **kwargs)
        except Exception as e:  # PIL raises many types for corrupt files
            if not skip_errors:
                raise ValueError(f"cannot decode image {source_name(sources, i)}: {e}") from e
            ok[i] = False

    workers = workers or min(8, os.cpu_count() or 1)
    if len(sources) < 64 or workers == 1:
        for i in range(len(sources)):
            work(i)
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(len(sources))))
    failed = np.flatnonzero(~ok).tolist()
    return (out[ok] if failed else out), failed


def source_name(sources: Sequence[Any], i: int) -> str:
    """How errors name source ``i``: its path (a tuple's first item), else its index."""
    source = sources[i][0] if isinstance(sources[i], tuple) else sources[i]
    return str(source) if isinstance(source, str | os.PathLike) else f"#{i}"


def decode_labelled(
    files: Sequence[Any], labels: np.ndarray, image_size: int, *, strict: bool, what: str, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes labelled image files. A corrupt or zero-byte file is skipped, and the count
    logged as a warning naming a few, or raises naming it when ``strict``."""
    images, failed = decode_many(files, image_size, skip_errors=not strict, **kwargs)
    if failed:
        logging.warning(
            "%s: skipped %d unreadable image(s) of %d, e.g. %s (set strict=True to stop instead)",
            what,
            len(failed),
            len(files),
            ", ".join(source_name(files, i) for i in failed[:3]),
        )
        labels = np.delete(labels, failed)
    return images, labels


def cache_key(**fields: Any) -> str:
    """A short stable hash of ``fields`` (JSON-serialisable values)."""
    blob = json.dumps({"v": _CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir_for(root: str | os.PathLike, cache_dir: str | None = None) -> str:
    return os.path.expanduser(cache_dir) if cache_dir else os.path.join(root, CACHE_DIRNAME)


def load_cached(path: str) -> tuple[dict[str, Split], dict] | None:
    """Reads a cache entry written by :func:`save_cached`; None when absent."""
    meta_file = os.path.join(path, "meta.json")
    if not os.path.exists(meta_file):
        return None
    with open(meta_file) as f:
        meta = json.load(f)
    splits = {
        s: Split(
            np.load(os.path.join(path, f"{s}_images.npy"), mmap_mode="r"),
            np.load(os.path.join(path, f"{s}_labels.npy")),
        )
        for s in meta["splits"]
    }
    return splits, meta


def save_cached(path: str, splits: dict[str, Split], meta: dict) -> None:
    """Writes the splits atomically (to a temporary directory, then renamed).

    A cache that cannot be written (read-only data directory) only logs a warning.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError as e:
        logging.warning("not caching decoded images in %s: %s", parent, e)
        return
    try:
        for s, split in splits.items():
            np.save(os.path.join(tmp, f"{s}_images.npy"), np.asarray(split.images))
            np.save(os.path.join(tmp, f"{s}_labels.npy"), np.asarray(split.labels))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "splits": list(splits)}, f, indent=1)
        os.replace(tmp, path)
    except OSError:  # another process won the race, or the disk is full
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(path, "meta.json")):
            raise


def cached(
    path: str | None,
    build: Callable[[], tuple[dict[str, Split], dict]],
) -> tuple[dict[str, Split], dict]:
    """Returns the cache entry at ``path``, building and saving it first if needed.

    ``path=None`` disables the cache.
    """
    if path is not None:
        hit = load_cached(path)
        if hit is not None:
            return hit
    splits, meta = build()
    if path is not None:
        save_cached(path, splits, meta)
    return splits, meta
