"""Stanford Cars (196 classes) from its official files, read with scipy (no TensorFlow).

Layout (``root`` is the folder that holds the extracted archives)::

    <root>/cars_train/<fname>.jpg                    from cars_train.tgz (8,144 images)
           cars_test/<fname>.jpg                     from cars_test.tgz (8,041 images)
           devkit/cars_meta.mat                      from car_devkit.tgz: class_names, 1 x 196
           devkit/cars_train_annos.mat               annotations, 1 x N struct array
           cars_test_annos_withlabels.mat            distributed on its own; may also sit
                                                     in devkit/

Each annotation has the fields ``bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname``.
Classes are 1-based in the ``.mat`` files: label = ``class - 1``, and class ``k`` is named
``class_names[k - 1]`` of ``cars_meta.mat`` (e.g. 'AM General Hummer SUV 2000'), the same
ids and names as tfds's ``cars196``. Images keep the annotations' order. With
``crop_bbox=True`` each image is cropped to its box (MATLAB's 1-based inclusive pixel
coordinates) before resizing.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from PIL import Image

from .base import Dataset, Split
from .errors import DataNotFoundError
from .imaging import cache_dir_for, cache_key, cached, decode_image, decode_labelled

NAME = "stanford_cars"
META = "devkit/cars_meta.mat"
TRAIN_ANNOS = "devkit/cars_train_annos.mat"
TEST_ANNOS = "cars_test_annos_withlabels.mat"
IMAGE_DIRS = {"train": "cars_train", "test": "cars_test"}
ARCHIVES = ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz")
ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
HINT = (
    "These are Stanford Cars' official files: extract cars_train.tgz, cars_test.tgz and "
    "car_devkit.tgz into that folder (tar -xzf <archive> -C <root>) and put "
    "cars_test_annos_withlabels.mat (distributed separately from the devkit) there or in "
    "devkit/."
)


# --- .mat helpers (also used by the Stanford Dogs reader) ---------------------------------


def read_mat(path: str, keys: tuple[str, ...]) -> dict:
    """``scipy.io.loadmat(path)``, checked to hold ``keys``; errors name the file."""
    import scipy.io  # scipy is a core dependency; imported here to keep `import` light

    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5) files
        raise ValueError(
            f"{path}: cannot read this .mat file ({e}); the official files are MATLAB v5 "
            "files: use the original file"
        ) from e
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... on damage
        raise ValueError(
            f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e}); the file "
            "is damaged or incomplete: use the original file"
        ) from e
    missing = [k for k in keys if k not in mat]
    if missing:
        have = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path} lacks the variable(s) {missing}; it holds {have}")
    return mat


def mat_value(x):
    """The single value inside a loaded MATLAB cell/array (``[[14]]``, ``['a.jpg']``)."""
    while isinstance(x, np.ndarray):
        if x.size != 1:
            raise ValueError(f"expected a single value, got an array of shape {x.shape}")
        x = x.reshape(-1)[0]
    return x.item() if isinstance(x, np.generic) else x


def mat_str(x) -> str:
    """A string stored in a MATLAB cell (``array(['n02085620-Chihuahua'])``)."""
    value = mat_value(x)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def mat_int(x) -> int:
    """An integer stored in a MATLAB array (``array([[14]], dtype=uint8)``, doubles too)."""
    value = mat_value(x)
    if isinstance(value, str) or float(value) != int(value):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


# --- Stanford Cars ------------------------------------------------------------------------


def _test_annos_path(root: str) -> str | None:
    """Where ``cars_test_annos_withlabels.mat`` is: ``root`` or ``root/devkit``, or None."""
    for d in (root, os.path.join(root, "devkit")):
        path = os.path.join(d, TEST_ANNOS)
        if os.path.isfile(path):
            return path
    return None


def find_files(root: str) -> dict[str, str]:
    """The paths of the meta, annotation files and image folders; raises when any lacks."""
    paths = {
        "meta": os.path.join(root, META),
        "train_annos": os.path.join(root, TRAIN_ANNOS),
        "test_annos": _test_annos_path(root),
        "train": os.path.join(root, IMAGE_DIRS["train"]),
        "test": os.path.join(root, IMAGE_DIRS["test"]),
    }
    missing = []
    for key, rel in (("meta", META), ("train_annos", TRAIN_ANNOS)):
        if not os.path.isfile(paths[key]):
            missing.append(rel)
    if paths["test_annos"] is None:
        missing.append(f"{TEST_ANNOS} (or devkit/{TEST_ANNOS})")
    for split, d in IMAGE_DIRS.items():
        if not os.path.isdir(paths[split]):
            missing.append(f"{d}/<fname>.jpg (the {split} images)")
    if missing:
        hint = HINT
        found = [a for a in ARCHIVES if os.path.isfile(os.path.join(root, a))]
        if found:
            hint = f"Found {', '.join(found)}: extract it (tar -xzf <archive> -C {root}). " + hint
        if paths["test_annos"] is None and os.path.isfile(
            os.path.join(root, "devkit", "cars_test_annos.mat")
        ):
            hint += (
                " devkit/cars_test_annos.mat has no class labels: the test split needs "
                f"{TEST_ANNOS}."
            )
        raise DataNotFoundError(NAME, root, missing, hint=hint)
    return paths


def read_class_names(meta_path: str) -> list[str]:
    """The 196 class names of ``cars_meta.mat`` (cell ``class_names``), class 1 first."""
    cells = read_mat(meta_path, ("class_names",))["class_names"]
    try:
        return [mat_str(c) for c in cells.reshape(-1)]
    except ValueError as e:
        raise ValueError(f"{meta_path}: class_names must be a cell array of strings: {e}") from e


def read_annotations(path: str, num_classes: int) -> list[dict]:
    """The ``annotations`` struct array: dicts with the box, ``label`` (class - 1), fname."""
    annos = read_mat(path, ("annotations",))["annotations"]
    names = annos.dtype.names or ()
    lacking = [f for f in ANNOTATION_FIELDS if f not in names]
    if lacking:
        raise ValueError(
            f"{path}: the annotations struct lacks the field(s) {lacking} (it has "
            f"{list(names)}); the test split needs {TEST_ANNOS}, the file with labels"
        )
    out = []
    for n, a in enumerate(annos.reshape(-1)):
        try:
            cls = mat_int(a["class"])
            row = {
                "fname": mat_str(a["fname"]),
                "box": tuple(mat_int(a[f]) for f in ANNOTATION_FIELDS[:4]),
                "label": cls - 1,
            }
        except ValueError as e:
            raise ValueError(f"{path}: annotation {n + 1}: {e}") from e
        if not 1 <= cls <= num_classes:
            raise ValueError(
                f"{path}: annotation {n + 1} ({row['fname']}) has class {cls}; classes are "
                f"1..{num_classes} (the class_names of {META})"
            )
        out.append(row)
    return out


def check_images(image_dir: str, annos: list[dict], split: str) -> list[str]:
    """The image paths of ``annos``; missing images raise DataNotFoundError naming them."""
    files = [os.path.join(image_dir, a["fname"]) for a in annos]
    missing = [a["fname"] for a, p in zip(annos, files, strict=True) if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        hint = f"{len(missing)} of the {len(files)} {split} images are missing{more}."
        nested = os.path.join(image_dir, os.path.basename(image_dir))
        if os.path.isdir(nested):
            hint += f" The images seem to sit one level deeper, in {nested}: move them up."
        raise DataNotFoundError(NAME, image_dir, missing[:5], hint=hint)
    return files


def _pil_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, ...]:
    """MATLAB's 1-based inclusive (x1, y1, x2, y2) as PIL's box, clipped to the image."""
    x1, y1, x2, y2 = box
    left, top = min(max(x1 - 1, 0), width), min(max(y1 - 1, 0), height)
    right, bottom = min(max(x2, left), width), min(max(y2, top), height)
    if right - left < 1 or bottom - top < 1:
        raise ValueError(f"bounding box {box} is empty inside the {width}x{height} image")
    return left, top, right, bottom


def decode_cropped(path: str, box, image_size: int, **kwargs) -> np.ndarray:
    """Decodes ``path`` cropped to its annotated ``box``, then resized as configured."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    crop = img.crop(_pil_box(box, *img.size))
    return decode_image(np.asarray(crop), image_size, **kwargs)


def decode_boxes(
    files: list[str],
    boxes: list[tuple],
    labels: np.ndarray,
    image_size: int,
    *,
    strict: bool,
    what: str,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Like ``decode_labelled`` but each image cropped to its box first: unreadable images
    are skipped and counted in a warning, or raise naming the file when ``strict``."""
    return decode_labelled(
        list(zip(files, boxes, strict=True)),
        labels,
        image_size,
        strict=strict,
        what=what,
        decode=_decode_pair,
        **kwargs,
    )


def _decode_pair(source: tuple, image_size: int, **kwargs) -> np.ndarray:
    path, box = source
    return decode_cropped(path, box, image_size, **kwargs)


def _fingerprint(path: str) -> tuple:
    """(path, size, mtime) of a file, for the cache key."""
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


def load_stanford_cars(cfg: ml_collections.ConfigDict) -> Dataset:
    """Stanford Cars from ``cfg.root`` (decoded once, then cached); labels = class - 1."""
    if not cfg.root:
        raise DataNotFoundError(
            NAME,
            "<cfg.root is not set>",
            [META, TRAIN_ANNOS, TEST_ANNOS, "cars_train/", "cars_test/"],
            hint="Set cfg.root to the folder that holds them. " + HINT,
        )
    root = os.path.abspath(os.path.expanduser(str(cfg.root)))
    paths = find_files(root)
    annos_files = {"train": paths["train_annos"], "test": paths["test_annos"]}
    key = cache_key(
        source=NAME,
        root=root,
        size=cfg.image_size,
        resize=cfg.resize,
        channels=cfg.channels,
        crop_bbox=bool(cfg.crop_bbox),
        strict=bool(cfg.strict),
        lists=[_fingerprint(p) for p in (paths["meta"], *annos_files.values())],
    )
    path = os.path.join(cache_dir_for(root, cfg.cache_dir), key) if cfg.cache else None

    def build():
        class_names = read_class_names(paths["meta"])
        annos = {s: read_annotations(p, len(class_names)) for s, p in annos_files.items()}
        files = {s: check_images(paths[s], annos[s], s) for s in annos}
        out = {}
        for split in ("train", "test"):
            labels = np.array([a["label"] for a in annos[split]], np.int32)
            kwargs = dict(
                strict=bool(cfg.strict),
                what=f"{NAME}/{split}",
                resize=cfg.resize,
                channels=int(cfg.channels),
            )
            if cfg.crop_bbox:
                boxes = [a["box"] for a in annos[split]]
                images, labels = decode_boxes(
                    files[split], boxes, labels, int(cfg.image_size), **kwargs
                )
            else:
                images, labels = decode_labelled(
                    files[split], labels, int(cfg.image_size), **kwargs
                )
            out[split] = Split(images, labels)
        return out, {"class_names": class_names}

    data, meta = cached(path, build)
    return Dataset(
        name=NAME, class_names=tuple(meta["class_names"]), train=data["train"], test=data["test"]
    )
