"""CUB-200-2011 (200 bird species) from the official ``CUB_200_2011`` archive layout.

Layout (the extracted ``CUB_200_2011.tgz``; ``root`` may point at ``CUB_200_2011/`` or at
the folder that holds it)::

    CUB_200_2011/
        images/<class dir>/<name>.jpg
        images.txt                 "<image id> <path relative to images/>"
        image_class_labels.txt     "<image id> <class id, 1-based>"
        train_test_split.txt       "<image id> <1 = train, 0 = test>"
        classes.txt                "<class id> <class dir name>"

Class names are kept exactly as ``classes.txt`` gives them, number prefix included (e.g.
'001.Black_footed_Albatross', the image folder's name). Labels follow the class ids:
label = the class's rank in ``classes.txt`` sorted by id, i.e. ``class id - 1`` for the
official file. Images keep the order of ``images.txt`` within each split.
"""

from __future__ import annotations

import collections
import os

import ml_collections
import numpy as np

from .base import Dataset, Split
from .errors import DataNotFoundError
from .imaging import cache_dir_for, cache_key, cached, decode_labelled

NAME = "cub200"
ARCHIVE_DIR = "CUB_200_2011"
ARCHIVE_FILE = "CUB_200_2011.tgz"
LIST_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
HINT = (
    f"These are the files of the official {ARCHIVE_FILE} (from Caltech's CUB-200-2011 page): "
    f"extract it (tar -xzf {ARCHIVE_FILE}) and point cfg.root at {ARCHIVE_DIR}/ or at the "
    "folder that holds it."
)


def find_data_dir(root: str) -> str:
    """The ``CUB_200_2011/`` folder at or under ``root``; raises naming what is missing."""
    for d in (os.path.join(root, ARCHIVE_DIR), root):
        if os.path.isfile(os.path.join(d, "images.txt")) or os.path.isfile(
            os.path.join(d, "classes.txt")
        ):
            missing = [f for f in LIST_FILES if not os.path.isfile(os.path.join(d, f))]
            if not os.path.isdir(os.path.join(d, "images")):
                missing.insert(0, "images/<class dir>/<name>.jpg")
            if missing:
                raise DataNotFoundError(NAME, d, missing, hint=HINT)
            return d
    hint = HINT
    for d in (root, os.path.dirname(root)):
        if os.path.isfile(os.path.join(d, ARCHIVE_FILE)):
            hint = (
                f"Found {ARCHIVE_FILE}: extract it first "
                f"(tar -xzf {os.path.join(d, ARCHIVE_FILE)} -C {d})."
            )
    files = [f"{ARCHIVE_DIR}/images/<class dir>/<name>.jpg"]
    files += [f"{ARCHIVE_DIR}/{f}" for f in LIST_FILES]
    raise DataNotFoundError(NAME, root, files, hint=hint)


def read_pairs(path: str) -> list[tuple[int, str]]:
    """``(id, rest of the line)`` of a CUB list file, in file order; errors name the line."""
    pairs = []
    name = os.path.basename(path)
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            first, _, rest = line.partition(" ")
            rest = rest.strip()
            if not rest or not first.isdigit():
                raise ValueError(
                    f"{path} line {n}: expected '<id> <value>', got {line!r} (is {name} "
                    "from the official archive?)"
                )
            pairs.append((int(first), rest))
    counts = collections.Counter(i for i, _ in pairs)
    dup = sorted(i for i, k in counts.items() if k > 1)
    if dup:
        raise ValueError(f"{path}: ids {dup[:5]} appear more than once")
    return pairs


def read_int_map(path: str) -> dict[int, int]:
    """``{image id: integer}`` of ``image_class_labels.txt`` or ``train_test_split.txt``."""
    out = {}
    for image_id, value in read_pairs(path):
        if not value.isdigit():
            raise ValueError(f"{path}: image {image_id} has {value!r} where an integer belongs")
        out[image_id] = int(value)
    return out


def read_dataset(data_dir: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """``(class names, {'train'|'test': [(image path, label)]})`` from the four lists."""
    classes = sorted(read_pairs(os.path.join(data_dir, "classes.txt")))
    class_names = [name for _, name in classes]
    label_of_class = {cid: rank for rank, (cid, _) in enumerate(classes)}
    images = read_pairs(os.path.join(data_dir, "images.txt"))
    labels_path = os.path.join(data_dir, "image_class_labels.txt")
    split_path = os.path.join(data_dir, "train_test_split.txt")
    class_of, is_train = read_int_map(labels_path), read_int_map(split_path)
    for path, table in ((labels_path, class_of), (split_path, is_train)):
        lacking = [i for i, _ in images if i not in table]
        if lacking:
            raise ValueError(
                f"{path} has no line for {len(lacking)} image id(s) of images.txt, e.g. "
                f"{lacking[:5]}; the list files must come from the same archive"
            )
    out = {"train": [], "test": []}
    for image_id, rel in images:
        cid, flag = class_of[image_id], is_train[image_id]
        if cid not in label_of_class:
            raise ValueError(f"{labels_path}: image {image_id} has class {cid}, not in classes.txt")
        if flag not in (0, 1):
            raise ValueError(f"{split_path}: image {image_id} has {flag}; expected 1 or 0")
        path = os.path.join(data_dir, "images", *rel.split("/"))
        out["train" if flag == 1 else "test"].append((path, label_of_class[cid]))
    return class_names, out


def check_images(data_dir: str, examples: list[tuple[str, int]], split: str) -> None:
    """Raises DataNotFoundError naming (up to 5 of) the listed images that are missing."""
    missing = [p for p, _ in examples if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataNotFoundError(
            NAME,
            data_dir,
            [os.path.relpath(p, data_dir) for p in missing[:5]],
            hint=f"{len(missing)} of the {len(examples)} {split} images listed in images.txt "
            f"are missing{more}.",
        )


def load_cub200(cfg: ml_collections.ConfigDict) -> Dataset:
    """CUB-200-2011 from ``cfg.root`` (decoded once, then cached); official train/test split."""
    if not cfg.root:
        raise DataNotFoundError(
            NAME,
            "<cfg.root is not set>",
            [f"{ARCHIVE_DIR}/images/<class dir>/<name>.jpg"]
            + [f"{ARCHIVE_DIR}/{f}" for f in LIST_FILES],
            hint="Set cfg.root to the folder that holds CUB_200_2011/. " + HINT,
        )
    root = os.path.abspath(os.path.expanduser(str(cfg.root)))
    data_dir = find_data_dir(root)
    lists = [os.path.join(data_dir, f) for f in LIST_FILES]
    key = cache_key(
        source=NAME,
        data_dir=data_dir,
        size=cfg.image_size,
        resize=cfg.resize,
        channels=cfg.channels,
        strict=bool(cfg.strict),
        lists=[(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in lists],
    )
    path = os.path.join(cache_dir_for(root, cfg.cache_dir), key) if cfg.cache else None

    def build():
        class_names, examples = read_dataset(data_dir)
        for split, ex in examples.items():
            check_images(data_dir, ex, split)
        out = {}
        for split, ex in examples.items():
            images, labels = decode_labelled(
                [p for p, _ in ex],
                np.array([y for _, y in ex], np.int32),
                int(cfg.image_size),
                strict=bool(cfg.strict),
                what=f"{NAME}/{split}",
                resize=cfg.resize,
                channels=int(cfg.channels),
            )
            out[split] = Split(images, labels)
        return out, {"class_names": class_names}

    data, meta = cached(path, build)
    return Dataset(
        name=NAME, class_names=tuple(meta["class_names"]), train=data["train"], test=data["test"]
    )
