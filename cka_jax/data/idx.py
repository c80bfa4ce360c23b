"""IDX files: the format of MNIST, Fashion-MNIST and KMNIST (four files in one folder).

Layout (each file plain or gzip-compressed with a ``.gz`` suffix)::

    <root>/train-images-idx3-ubyte[.gz]   (N, 28, 28) unsigned bytes
           train-labels-idx1-ubyte[.gz]   (N,) unsigned bytes
           t10k-images-idx3-ubyte[.gz]
           t10k-labels-idx1-ubyte[.gz]

An IDX file is a 4-byte magic number - two zero bytes, a type byte (0x08 = unsigned byte)
and the number of dimensions - then one big-endian uint32 size per dimension, then the
data in row-major order. Only unsigned bytes are read (what these datasets use).

Fashion-MNIST installs offline on Debian/Ubuntu: ``apt-get install -y dataset-fashion-mnist``
puts the four ``.gz`` files under ``/usr/share/datasets/fashion-mnist/``; MNIST and KMNIST
are distributed as the same four files.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import ml_collections
import numpy as np

from .base import Dataset, Split
from .errors import DataNotFoundError
from .imaging import decode_many

NAME = "idx"
FILE_FIELDS = ("train_images", "train_labels", "test_images", "test_labels")
DEFAULT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# The IDX type byte: only 0x08 is read; the others are named in the error.
UNSIGNED_BYTE = 0x08
IDX_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short (int16)",
    0x0C: "int (int32)",
    0x0D: "float (float32)",
    0x0E: "double (float64)",
}
IMAGE_NDIM, LABEL_NDIM = 3, 1
NATIVE_SIZE = 28

FASHION_MNIST_CLASS_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

HINT = (
    "Fashion-MNIST installs offline on Debian/Ubuntu with "
    "`apt-get install -y dataset-fashion-mnist` (the four .gz files land in "
    "/usr/share/datasets/fashion-mnist/; point cfg.root there). MNIST and KMNIST ship as "
    "the same four IDX files (plain or .gz)."
)


def find_idx_file(root: str, stem: str) -> str | None:
    """The path of ``stem`` or ``stem.gz`` in ``root`` (the plain file when both exist)."""
    stem = str(stem)
    names = [stem[:-3], stem] if stem.endswith(".gz") else [stem, stem + ".gz"]
    for name in names:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def _read_bytes(path: str) -> bytes:
    """The file's content, gunzipped when its name ends in ``.gz``."""
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{path}: not a readable gzip file ({e}); the .gz file is damaged or "
            "incomplete: download it again (or gunzip it and drop the .gz suffix)"
        ) from e


def parse_idx(raw: bytes, ndim: int, path: str) -> np.ndarray:
    """Parses IDX bytes into a uint8 array of ``ndim`` dimensions; errors name ``path``."""
    if len(raw) < 4:
        raise ValueError(
            f"{path}: {len(raw)} bytes is too short for an IDX file (a 4-byte magic number "
            "and the sizes come first)"
        )
    zero0, zero1, dtype, got_ndim = raw[:4]
    if zero0 or zero1:
        hint = ""
        if raw[:2] == b"\x1f\x8b":
            hint = " (it is gzip-compressed: give it a .gz suffix, or gunzip it)"
        raise ValueError(
            f"{path}: not an IDX file: the magic number must start with two zero bytes, got "
            f"0x{zero0:02x} 0x{zero1:02x}{hint}"
        )
    if dtype != UNSIGNED_BYTE:
        kind = IDX_TYPES.get(dtype, "unknown")
        raise ValueError(
            f"{path}: IDX data type 0x{dtype:02x} ({kind}) is not supported; only 0x08 "
            "(unsigned byte), the type of MNIST, Fashion-MNIST and KMNIST, is read"
        )
    if got_ndim != ndim:
        what = "images (N, rows, cols)" if ndim == IMAGE_NDIM else "labels (N,)"
        raise ValueError(
            f"{path}: the IDX header gives {got_ndim} dimension(s), but {what} need {ndim}: "
            "is this the right file (an images file where labels belong, or the reverse)?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX header: {header} bytes expected (magic and {ndim} "
            f"size(s)), the file has {len(raw)}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "longer than its header says"
        raise ValueError(
            f"{path}: IDX data {problem}: the header's sizes {shape} need {expected} data "
            f"bytes after the {header}-byte header, the file has {actual}; download the file "
            "again"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Reads one IDX file (plain or ``.gz``) of unsigned bytes with ``ndim`` dimensions."""
    return parse_idx(_read_bytes(path), ndim, path)


def _dataset_name(root: str) -> str:
    """The folder's name ('fashion-mnist'); torchvision's ``<name>/raw/`` gives ``<name>``."""
    parts = os.path.normpath(root).split(os.sep)
    parts = [p for p in parts if p]
    if len(parts) > 1 and parts[-1] == "raw":
        return parts[-2]
    return parts[-1] if parts else NAME


def load_idx(cfg: ml_collections.ConfigDict) -> Dataset:
    """Loads the four IDX files of ``cfg.root`` (train/test images and labels).

    ``image_size`` None keeps the native size, another value resizes ('stretch');
    ``channels`` 3 replicates the gray channel. Labels are the stored bytes; ``class_names``
    None names them '0'..'9' (or up to the largest label when that is above 9).
    """
    channels = int(cfg.channels)
    if channels not in (1, 3):
        raise ValueError(f"{NAME} source: channels must be 1 or 3, got {cfg.channels!r}")
    stems = {k: str(cfg[k]) for k in FILE_FIELDS}
    if not cfg.root:
        raise DataNotFoundError(
            NAME,
            "<cfg.root is not set>",
            [f"{stems[k]}[.gz]" for k in FILE_FIELDS],
            hint="Set cfg.root to the folder that holds these files. " + HINT,
        )
    root = os.path.abspath(os.path.expanduser(str(cfg.root)))
    paths = {k: find_idx_file(root, stems[k]) for k in FILE_FIELDS}
    missing = [f"{stems[k]} (or {stems[k]}.gz)" for k in FILE_FIELDS if paths[k] is None]
    if missing:
        raise DataNotFoundError(NAME, root, missing, hint=HINT)

    splits = {}
    for split in ("train", "test"):
        images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = read_idx(images_path, IMAGE_NDIM)
        labels = read_idx(labels_path, LABEL_NDIM)
        if len(images) != len(labels):
            raise ValueError(
                f"{NAME}: {images_path} holds {len(images)} images but {labels_path} holds "
                f"{len(labels)} labels; the files must belong together"
            )
        splits[split] = [images[..., None], labels.astype(np.int32), labels_path]

    top = max((int(lab.max(initial=0)) for _, lab, _ in splits.values()), default=0)
    if cfg.class_names is None:
        class_names = tuple(str(i) for i in range(max(10, top + 1)))
    else:
        class_names = tuple(str(c) for c in cfg.class_names)
        for _, labels, labels_path in splits.values():
            if len(labels) and labels.max() >= len(class_names):
                raise ValueError(
                    f"{NAME}: {labels_path} has label {int(labels.max())}, but "
                    f"cfg.class_names names only {len(class_names)} classes (0.."
                    f"{len(class_names) - 1}); give one name per class"
                )

    out = {}
    for split, (images, labels, _) in splits.items():
        if cfg.image_size and int(cfg.image_size) != images.shape[1]:
            images, _ = decode_many(list(images), int(cfg.image_size), resize="stretch", channels=1)
        if channels == 3:
            images = np.repeat(images, 3, axis=-1)
        out[split] = Split(np.ascontiguousarray(images), labels)
    return Dataset(
        name=_dataset_name(root), class_names=class_names, train=out["train"], test=out["test"]
    )
