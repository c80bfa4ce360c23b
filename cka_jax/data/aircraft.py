"""FGVC-Aircraft from the official ``fgvc-aircraft-2013b`` archive layout.

Layout (the extracted archive; ``root`` may point at the folder that holds
``fgvc-aircraft-2013b/``, at ``fgvc-aircraft-2013b/`` itself, or at its ``data/``)::

    fgvc-aircraft-2013b/data/
        images/<image id>.jpg
        variants.txt  families.txt  manufacturers.txt          one class name per line
        images_variant_{train,val,trainval,test}.txt          "<image id> <class name>"
        images_family_{train,val,trainval,test}.txt
        images_manufacturer_{train,val,trainval,test}.txt

Classes are numbered in the order of ``<level>s.txt`` (as torchvision does). The official
images carry a 20-pixel copyright banner along the bottom; like the common loaders we crop
it (``crop_banner=True``) before resizing.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from .base import Dataset, Split
from .errors import DataNotFoundError
from .imaging import cache_dir_for, cache_key, cached, decode_labelled

NAME = "fgvc_aircraft"
ARCHIVE_DIR = "fgvc-aircraft-2013b"
ARCHIVE_FILE = "fgvc-aircraft-2013b.tar.gz"
CLASS_LEVELS = ("variant", "family", "manufacturer")
SPLITS = ("train", "val", "trainval", "test")
BANNER_PIXELS = 20
_PLURAL = {"variant": "variants", "family": "families", "manufacturer": "manufacturers"}


def classes_file(level: str) -> str:
    return f"{_PLURAL[level]}.txt"


def split_file(level: str, split: str) -> str:
    return f"images_{level}_{split}.txt"


def required_files(level: str, splits: tuple[str, ...]) -> list[str]:
    """The files (relative to ``data/``) needed for ``level`` and ``splits``."""
    return ["images/<image id>.jpg", classes_file(level), *[split_file(level, s) for s in splits]]


def _check_level_split(level: str, splits: tuple[str, ...]) -> None:
    if level not in CLASS_LEVELS:
        raise ValueError(f"{NAME}: class_level must be one of {CLASS_LEVELS}, got {level!r}")
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"{NAME}: split must be one of {SPLITS}, got {s!r}")


def find_data_dir(root: str, level: str = "variant", splits=("trainval", "test")) -> str:
    """Returns the archive's ``data/`` folder under ``root``, or raises DataNotFoundError."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    candidates = [os.path.join(root, ARCHIVE_DIR, "data"), os.path.join(root, "data"), root]
    for d in candidates:
        if os.path.isfile(os.path.join(d, classes_file(level))):
            missing = [
                f
                for f in required_files(level, splits)[1:]
                if not os.path.isfile(os.path.join(d, f))
            ]
            if not os.path.isdir(os.path.join(d, "images")):
                missing.insert(0, "images/<image id>.jpg")
            if missing:
                raise DataNotFoundError(NAME, d, missing)
            return d
    hint = ""
    for archive_dir in (root, os.path.dirname(root)):
        if os.path.isfile(os.path.join(archive_dir, ARCHIVE_FILE)):
            hint = (
                f"Found {ARCHIVE_FILE}: extract it first "
                f"(tar -xzf {os.path.join(archive_dir, ARCHIVE_FILE)} -C {archive_dir})."
            )
    files = [f"{ARCHIVE_DIR}/data/{f}" for f in required_files(level, splits)]
    raise DataNotFoundError(
        NAME,
        root,
        files,
        hint=hint
        or f"Download {ARCHIVE_FILE} from "
        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and extract it there.",
    )


def read_classes(data_dir: str, level: str) -> list[str]:
    with open(os.path.join(data_dir, classes_file(level))) as f:
        return [line.strip() for line in f if line.strip()]


def read_split(data_dir: str, level: str, split: str) -> list[tuple[str, str]]:
    """``(image id, class name)`` pairs of one split list, in file order."""
    pairs = []
    with open(os.path.join(data_dir, split_file(level, split))) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            image_id, _, cls = line.partition(" ")
            if not cls:
                raise ValueError(
                    f"{split_file(level, split)} line {n}: expected "
                    f"'<image id> <class name>', got {line!r}"
                )
            pairs.append((image_id, cls.strip()))
    return pairs


def examples(data_dir: str, level: str, split: str, class_names: list[str]):
    """``(image id, image path, label)`` of ``split``; missing images raise."""
    index = {c: i for i, c in enumerate(class_names)}
    out, missing = [], []
    for image_id, cls in read_split(data_dir, level, split):
        if cls not in index:
            raise ValueError(
                f"{split_file(level, split)}: class {cls!r} is not in {classes_file(level)}"
            )
        path = os.path.join(data_dir, "images", f"{image_id}.jpg")
        if not os.path.isfile(path):
            missing.append(f"images/{image_id}.jpg")
        out.append((image_id, path, index[cls]))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataNotFoundError(
            NAME,
            data_dir,
            missing[:5],
            hint=f"{len(missing)} images of {split_file(level, split)} are missing{more}.",
        )
    return out


def load_fgvc_aircraft(cfg: ml_collections.ConfigDict) -> Dataset:
    """FGVC-Aircraft at ``cfg.class_level``; train = ``cfg.train_split`` (trainval)."""
    level = str(cfg.class_level)
    splits = {"train": str(cfg.train_split), "test": str(cfg.test_split)}
    _check_level_split(level, tuple(splits.values()))
    if not cfg.root:
        raise DataNotFoundError(
            NAME,
            "<cfg.root is not set>",
            [f"{ARCHIVE_DIR}/data/{f}" for f in required_files(level, tuple(splits.values()))],
            hint="Set cfg.root to the folder that holds fgvc-aircraft-2013b/.",
        )
    root = os.path.abspath(os.path.expanduser(str(cfg.root)))
    data_dir = find_data_dir(root, level, tuple(splits.values()))
    class_names = read_classes(data_dir, level)
    listed = [os.path.join(data_dir, split_file(level, s)) for s in splits.values()]
    key = cache_key(
        source=NAME,
        data_dir=data_dir,
        level=level,
        splits=splits,
        size=cfg.image_size,
        resize=cfg.resize,
        channels=cfg.channels,
        crop_banner=bool(cfg.crop_banner),
        strict=bool(cfg.strict),
        lists=[(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in listed],
    )
    path = os.path.join(cache_dir_for(root, cfg.cache_dir), key) if cfg.cache else None

    def build():
        out = {}
        for k, split in splits.items():
            ex = examples(data_dir, level, split, class_names)
            images, labels = decode_labelled(
                [p for _, p, _ in ex],
                np.array([y for _, _, y in ex], np.int32),
                int(cfg.image_size),
                strict=bool(cfg.strict),
                what=f"{NAME}/{split}",
                resize=cfg.resize,
                channels=int(cfg.channels),
                crop_bottom=BANNER_PIXELS if cfg.crop_banner else 0,
            )
            out[k] = Split(images, labels)
        return out, {"class_names": class_names}

    data, meta = cached(path, build)
    return Dataset(
        name=NAME, class_names=tuple(meta["class_names"]), train=data["train"], test=data["test"]
    )
