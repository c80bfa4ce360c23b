"""tfds datasets prepared as array_record and read with ``tfds.data_source`` (no TensorFlow).

``load_tfds`` never starts a network download unless ``cfg.download=True``:
  1. If ``<data_dir>/<name>/<version>/`` is prepared, it is read directly.
  2. Otherwise, if every archive the builder needs is in ``manual_dir`` (default
     ``<data_dir>/downloads/manual``), tfds prepares the dataset from them once
     (``file_format='array_record'``); no URL is fetched because tfds uses a manually
     placed file whenever its name matches.
  3. Otherwise :class:`DataNotFoundError` names the directory and the files to put there.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from .base import Dataset, Split
from .errors import DataNotFoundError, DataPreparationError
from .imaging import cache_dir_for, cache_key, cached, decode_many

# The files each tfds builder downloads, by the names tfds looks for in manual_dir
# (from the builders' registered checksums, tensorflow-datasets 4.9).
MANUAL_FILES: dict[str, tuple[str, ...]] = {
    # The Stanford URLs are dead; the files circulate as mirrors (e.g. Kaggle).
    "cars196": (
        "cars_train.tgz",
        "cars_test.tgz",
        "car_devkit.tgz",
        "cars_test_annos_withlabels.mat",
    ),
    "caltech_birds2011": ("CUB_200_2011.tgz", "segmentations.tgz"),
    "stanford_dogs": ("images.tar", "annotation.tar", "lists.tar"),
}
_CHUNK = 256


def default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _base_name(tfds_name: str) -> str:
    return tfds_name.split("/")[0].split(":")[0]


def _check_manual_files(name: str, data_dir: str, manual_dir: str) -> None:
    base = _base_name(name)
    if base == "fgvc_aircraft":
        from . import aircraft

        level = name.split("/")[1].split(":")[0] if "/" in name else "variant"
        aircraft.find_data_dir(manual_dir, level, ("train", "val", "test"))
        return
    prepared_hint = (
        f"Alternatively copy an already prepared {base}/ (array_record) into {data_dir}."
    )
    if base not in MANUAL_FILES:
        raise DataNotFoundError(
            name,
            data_dir,
            [f"{base}/<version>/ (prepared with file_format=array_record)"],
            hint=(
                f"Prepare it once: tfds build {name} --data_dir={data_dir} "
                "--file_format=array_record (or set cfg.download=True to let tfds "
                "download it now)."
            ),
        )
    missing = [f for f in MANUAL_FILES[base] if not os.path.exists(os.path.join(manual_dir, f))]
    if missing:
        raise DataNotFoundError(
            name,
            manual_dir,
            missing,
            hint=(
                f"tfds then prepares {name} from them into {data_dir} on first use. "
                + prepared_hint
            ),
        )


def _prepare(builder, name: str, data_dir: str, manual_dir: str, download: bool) -> None:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    if not download:
        _check_manual_files(name, data_dir, manual_dir)
    # try_download_gcs=False: never fetch tfds's pre-built copy from Google Cloud Storage.
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as e:
        raise DataPreparationError(
            f"Preparing {name!r}: a file in {manual_dir} differs from the original that tfds "
            f"knows (sha256 checksum). Use the original archives, not repackaged ones.\n{e}"
        ) from e
    except ImportError as e:
        raise DataPreparationError(
            f"Preparing {name!r} from {manual_dir} failed on a missing module ({e}). "
            "tfds's own builders (cars196, caltech_birds2011, stanford_dogs) need "
            "TensorFlow and importlib_resources while preparing: pip install tensorflow "
            "importlib_resources, prepare once, then uninstall; reading the prepared "
            f"array_record files in {data_dir} needs neither."
        ) from e


def load_tfds(cfg: ml_collections.ConfigDict) -> Dataset:
    import tensorflow_datasets as tfds

    from . import aircraft_tfds  # noqa: F401  (registers fgvc_aircraft with tfds)

    name = str(cfg.tfds_name)
    data_dir = os.path.abspath(os.path.expanduser(str(cfg.data_dir or default_data_dir())))
    manual_dir = os.path.abspath(
        os.path.expanduser(str(cfg.manual_dir or os.path.join(data_dir, "downloads", "manual")))
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"tfds has no dataset named {name!r}: {e}") from e
    if not builder.is_prepared():
        _prepare(builder, name, data_dir, manual_dir, bool(cfg.download))
    elif builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DataPreparationError(
            f"{name} in {builder.data_dir} was prepared as {builder.info.file_format.value}; "
            "tfds.data_source reads array_record only: prepare it again with "
            f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`."
        )
    splits = {"train": str(cfg.train_split), "test": str(cfg.test_split)}
    sources = tfds.data_source(name, split=list(splits.values()), data_dir=data_dir, download=False)
    class_names = list(sources[0].dataset_info.features[cfg.label_key].names)
    key = cache_key(
        source="tfds",
        name=name,
        version=str(builder.version),
        data_dir=data_dir,
        splits=splits,
        size=cfg.image_size,
        resize=cfg.resize,
        channels=cfg.channels,
        n=[len(s) for s in sources],
    )
    path = os.path.join(cache_dir_for(data_dir, cfg.cache_dir), key) if cfg.cache else None

    def build():
        out = {}
        for k, source in zip(splits, sources, strict=True):
            images, labels = [], []
            for start in range(0, len(source), _CHUNK):
                rows = [source[i] for i in range(start, min(start + _CHUNK, len(source)))]
                decoded, _ = decode_many(
                    [np.asarray(r[cfg.image_key]) for r in rows],
                    int(cfg.image_size),
                    resize=cfg.resize,
                    channels=int(cfg.channels),
                )
                images.append(decoded)
                labels += [int(r[cfg.label_key]) for r in rows]
            size, ch = int(cfg.image_size), int(cfg.channels)
            out[k] = Split(
                np.concatenate(images) if images else np.zeros((0, size, size, ch), np.uint8),
                np.array(labels, np.int64),
            )
        return out, {"class_names": class_names}

    data, meta = cached(path, build)
    return Dataset(
        name=_base_name(name),
        class_names=tuple(meta["class_names"]),
        train=data["train"],
        test=data["test"],
    )
