"""Image folder source: ``root/<split>/<class>/*.jpg|png``; class names sorted."""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from .base import Dataset, Split
from .errors import DataNotFoundError
from .imaging import cache_dir_for, cache_key, cached, decode_labelled

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_image_folder(root: str, split: str) -> tuple[list[str], list[str]]:
    """Returns (class names, file paths) of ``root/split``: one sub-folder per class."""
    split_dir = os.path.join(root, split)
    classes = sorted(
        d
        for d in os.listdir(split_dir)
        if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith(".")
    )
    files = []
    for c in classes:
        for dirpath, _, names in os.walk(os.path.join(split_dir, c)):
            files += [
                os.path.join(dirpath, n)
                for n in sorted(names)
                if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
            ]
    return classes, sorted(files)


class ImageFolderError(ValueError):
    """An image folder whose class folders do not make a dataset (the message says why)."""


def check_class_folders(name: str, split_dir: str, classes, files) -> None:
    """Every class folder must hold at least one image (IMAGE_EXTENSIONS, any depth)."""
    counts = dict.fromkeys(classes, 0)
    for f in files:
        counts[os.path.relpath(f, split_dir).split(os.sep)[0]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        others = {c: sum(len(n) for _, _, n in os.walk(os.path.join(split_dir, c))) for c in empty}
        detail = ", ".join(
            f"{os.path.join(split_dir, c)}/ "
            + (f"({others[c]} file(s), none an image)" if others[c] else "(empty)")
            for c in empty
        )
        raise ImageFolderError(
            f"{name}: class folder(s) without images: {detail}. Each class folder needs "
            f"image files ({', '.join(IMAGE_EXTENSIONS)}); add them or remove the folder"
        )


def load_image_folder(cfg: ml_collections.ConfigDict) -> Dataset:
    """Loads ``root/{train_split,test_split}/<class>/*`` (decoded once, then cached).

    A corrupt or zero-byte image is skipped with a warning, or raises when ``cfg.strict``.
    A class folder without images, or a test class without a training folder, raises
    `ImageFolderError` naming them.
    """
    if not cfg.root:
        raise ValueError("image_folder source: set cfg.root")
    root = os.path.abspath(os.path.expanduser(str(cfg.root)))
    name = os.path.basename(root.rstrip(os.sep)) or "image_folder"
    splits = {"train": cfg.train_split, "test": cfg.test_split}
    missing = [s for s in splits.values() if not os.path.isdir(os.path.join(root, s))]
    if missing:
        raise DataNotFoundError(
            name,
            root,
            [f"{s}/<class name>/<image>.jpg (or .png)" for s in missing],
            hint="One sub-folder per class in each split folder; the same class names in both.",
        )
    listing = {k: list_image_folder(root, s) for k, s in splits.items()}
    class_names = listing["train"][0]
    if not class_names:
        raise DataNotFoundError(
            name, os.path.join(root, cfg.train_split), ["<class name>/<image>.jpg (or .png)"]
        )
    extra = sorted(set(listing["test"][0]) - set(class_names))
    if extra:
        raise ImageFolderError(
            f"{name}: test class(es) {extra} have no folder in {root}/{cfg.train_split}/: "
            f"the student could never learn them. Add {cfg.train_split}/<class>/ with "
            f"training images for each, or remove them from {cfg.test_split}/"
        )
    for k, split in splits.items():
        check_class_folders(name, os.path.join(root, split), *listing[k])
    index = {c: i for i, c in enumerate(class_names)}

    def label_of(path: str, split: str) -> int:
        rel = os.path.relpath(path, os.path.join(root, split))
        return index[rel.split(os.sep)[0]]

    def fingerprint(path: str) -> tuple:
        st = os.stat(path)
        return os.path.relpath(path, root), st.st_size, st.st_mtime_ns

    key = cache_key(
        source="image_folder",
        root=root,
        size=cfg.image_size,
        resize=cfg.resize,
        channels=cfg.channels,
        strict=bool(cfg.strict),
        files=[fingerprint(p) for k in listing for p in listing[k][1]],
    )
    path = os.path.join(cache_dir_for(root, cfg.cache_dir), key) if cfg.cache else None

    def build():
        out = {}
        for k, split in splits.items():
            files = listing[k][1]
            labels = np.array([label_of(p, split) for p in files], np.int32)
            images, labels = decode_labelled(
                files,
                labels,
                int(cfg.image_size),
                strict=bool(cfg.strict),
                what=f"{name}/{split}",
                resize=cfg.resize,
                channels=int(cfg.channels),
            )
            out[k] = Split(images, labels)
        return out, {"class_names": class_names}

    data, meta = cached(path, build)
    return Dataset(
        name=name, class_names=tuple(meta["class_names"]), train=data["train"], test=data["test"]
    )
