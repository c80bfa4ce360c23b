"""Stanford Dogs (120 breeds) from its official files, read with scipy (no TensorFlow).

Layout (``root`` is the folder that holds the extracted archives)::

    <root>/Images/<synset>-<breed>/<name>.jpg     from images.tar
           lists/train_list.mat                    from lists.tar (the .mat files may also
           lists/test_list.mat                     sit in <root> itself)

Each list holds ``file_list`` (N x 1 cell of paths relative to ``Images/``, e.g.
'n02085620-Chihuahua/n02085620_5927.jpg') and ``labels`` (N x 1, 1-based): label =
``labels - 1``. Class ``k`` is named after the image folder of its files, as written (e.g.
'n02085620-Chihuahua'); the official lists number the breeds in the sorted order of these
folders, so the ids and names match tfds's ``stanford_dogs`` (which lower-cases them).
Images keep the order of the lists.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from .base import Dataset, Split
from .cars import mat_int, mat_str, read_mat
from .errors import DataNotFoundError
from .imaging import cache_dir_for, cache_key, cached, decode_labelled

NAME = "stanford_dogs"
IMAGES_DIR = "Images"
LIST_FILES = {"train": "train_list.mat", "test": "test_list.mat"}
ARCHIVES = ("images.tar", "lists.tar")
HINT = (
    "These are Stanford Dogs' official files: extract images.tar into that folder "
    "(tar -xf images.tar -C <root>, giving Images/) and lists.tar into <root>/lists "
    "(mkdir <root>/lists && tar -xf lists.tar -C <root>/lists)."
)


def _list_path(root: str, split: str) -> str | None:
    """``<root>/lists/<split>_list.mat`` or ``<root>/<split>_list.mat``, or None."""
    for d in (os.path.join(root, "lists"), root):
        path = os.path.join(d, LIST_FILES[split])
        if os.path.isfile(path):
            return path
    return None


def find_files(root: str) -> dict[str, str]:
    """The image folder and the two list files under ``root``; raises naming what lacks."""
    paths = {"images": os.path.join(root, IMAGES_DIR)}
    missing = []
    if not os.path.isdir(paths["images"]):
        missing.append(f"{IMAGES_DIR}/<synset>-<breed>/<name>.jpg")
    for split, fname in LIST_FILES.items():
        paths[split] = _list_path(root, split)
        if paths[split] is None:
            missing.append(f"lists/{fname} (or {fname})")
    if missing:
        hint = HINT
        found = [a for a in ARCHIVES if os.path.isfile(os.path.join(root, a))]
        if found:
            hint = f"Found {', '.join(found)} in {root}: extract first. " + hint
        raise DataNotFoundError(NAME, root, missing, hint=hint)
    return paths


def read_list(path: str) -> list[tuple[str, int]]:
    """``(relative image path, label = labels - 1)`` of one list file, in its order."""
    mat = read_mat(path, ("file_list", "labels"))
    files, labels = mat["file_list"].reshape(-1), mat["labels"].reshape(-1)
    if len(files) != len(labels):
        raise ValueError(f"{path}: {len(files)} entries in file_list but {len(labels)} labels")
    out = []
    for n, (f, y) in enumerate(zip(files, labels, strict=True)):
        try:
            rel, label = mat_str(f), mat_int(y)
        except ValueError as e:
            raise ValueError(f"{path}: entry {n + 1}: {e}") from e
        if label < 1:
            raise ValueError(f"{path}: entry {n + 1} ({rel}) has label {label}; labels are 1-based")
        if "/" not in rel.replace("\\", "/"):
            raise ValueError(
                f"{path}: entry {n + 1} is {rel!r}; expected '<synset>-<breed>/<name>.jpg'"
            )
        out.append((rel.replace("\\", "/"), label - 1))
    return out


def class_names_of(lists: dict[str, list[tuple[str, int]]], paths: dict[str, str]) -> list[str]:
    """Class ``k``'s name is the folder of its images; one folder per label, none skipped."""
    folder_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    for split, entries in lists.items():
        for rel, label in entries:
            folder = rel.split("/")[0]
            if folder_of.setdefault(label, folder) != folder:
                raise ValueError(
                    f"{paths[split]}: label {label + 1} has images in both "
                    f"{folder_of[label]!r} and {folder!r}; each breed has one folder"
                )
            if label_of.setdefault(folder, label) != label:
                raise ValueError(
                    f"{paths[split]}: folder {folder!r} has labels {label_of[folder] + 1} and "
                    f"{label + 1}; each folder holds one breed"
                )
    k = max(folder_of, default=-1) + 1
    unnamed = [i + 1 for i in range(k) if i not in folder_of]
    if unnamed:
        raise ValueError(
            f"labels {unnamed[:5]} of 1..{k} have no image in {LIST_FILES['train']} or "
            f"{LIST_FILES['test']}, so they cannot be named; use the official lists"
        )
    return [folder_of[i] for i in range(k)]


def load_stanford_dogs(cfg: ml_collections.ConfigDict) -> Dataset:
    """Stanford Dogs from ``cfg.root`` (decoded once, then cached); labels = labels - 1."""
    if not cfg.root:
        raise DataNotFoundError(
            NAME,
            "<cfg.root is not set>",
            [f"{IMAGES_DIR}/<synset>-<breed>/<name>.jpg"]
            + [f"lists/{f}" for f in LIST_FILES.values()],
            hint="Set cfg.root to the folder that holds them. " + HINT,
        )
    root = os.path.abspath(os.path.expanduser(str(cfg.root)))
    paths = find_files(root)
    list_paths = {s: paths[s] for s in LIST_FILES}
    key = cache_key(
        source=NAME,
        root=root,
        size=cfg.image_size,
        resize=cfg.resize,
        channels=cfg.channels,
        strict=bool(cfg.strict),
        lists=[(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in list_paths.values()],
    )
    path = os.path.join(cache_dir_for(root, cfg.cache_dir), key) if cfg.cache else None

    def build():
        lists = {s: read_list(p) for s, p in list_paths.items()}
        class_names = class_names_of(lists, list_paths)
        files = {}

        def rel_path(rel: str) -> str:
            """The path of an image given relative to Images/."""
            return os.path.join(paths["images"], *rel.split("/"))

        for split, entries in lists.items():
            files[split] = [rel_path(rel) for rel, _ in entries]
            missing = [rel for rel, _ in entries if not os.path.isfile(rel_path(rel))]
            if missing:
                more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                raise DataNotFoundError(
                    NAME,
                    paths["images"],
                    missing[:5],
                    hint=f"{len(missing)} of the {len(entries)} images of {list_paths[split]} "
                    f"are missing{more}.",
                )
        out = {}
        for split, entries in lists.items():
            images, labels = decode_labelled(
                files[split],
                np.array([y for _, y in entries], np.int32),
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
