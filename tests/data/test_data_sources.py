"""Data sources, loaded through ``load_source`` exactly as configs do.

Tiny archives are written in the official layouts in a temp dir. Every image is filled
with a gray level that encodes its class, so the tests check that each label belongs to
its image, not only the counts.
"""

import logging
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cka_jax.data import DataNotFoundError, default_source_config, load_source
from cka_jax.data.folder import ImageFolderError

# --- helpers ------------------------------------------------------------------------------

LEVEL = 40  # class c is drawn with gray level 20 + LEVEL * c


def _class_of(images):
    """Recovers the class from the mean gray level of the image centre."""
    h, w = images.shape[1:3]
    centre = images[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(len(images), -1)
    return np.round((centre.mean(axis=1) - 20) / LEVEL).astype(int)


def _save(path, level, size=(30, 24), banner=0):
    """A flat image (width, height) = size; optionally a white banner of `banner` rows."""
    w, h = size
    arr = np.full((h, w, 3), level, np.uint8)
    if banner:
        arr[-banner:] = 255
    Image.fromarray(arr).save(path)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def guard(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", guard)
    monkeypatch.setattr(socket, "create_connection", guard)


# FGVC-Aircraft: variants in a deliberately unsorted order (classes follow the file).
VARIANTS = ["A340-300", "707-320", "Cessna 172", "F-16A/B"]
FAMILY = {
    "A340-300": "A340",
    "707-320": "Boeing 707",
    "Cessna 172": "Cessna 172",
    "F-16A/B": "F-16A/B",
}
MAKER = {
    "A340-300": "Airbus",
    "707-320": "Boeing",
    "Cessna 172": "Cessna",
    "F-16A/B": "Lockheed Martin",
}
PER_SPLIT = {"train": 2, "val": 1, "test": 1}  # images per variant


def make_aircraft(root):
    """Writes root/fgvc-aircraft-2013b/data/ as the official archive lays it out.

    Images are 60x50 with the 20-row white copyright banner at the bottom; the variant
    index sets the gray level of the rest.
    """
    data = os.path.join(root, "fgvc-aircraft-2013b", "data")
    os.makedirs(os.path.join(data, "images"))
    families = sorted(set(FAMILY.values()))
    makers = sorted(set(MAKER.values()))
    for fname, names in [
        ("variants.txt", VARIANTS),
        ("families.txt", families),
        ("manufacturers.txt", makers),
    ]:
        with open(os.path.join(data, fname), "w") as f:
            f.write("".join(n + "\n" for n in names))
    rows = {s: [] for s in PER_SPLIT}
    image_id = 1000000
    for split, n in PER_SPLIT.items():
        for v, variant in enumerate(VARIANTS):
            for _ in range(n):
                image_id += 7
                _save(
                    os.path.join(data, "images", f"{image_id:07d}.jpg"),
                    20 + LEVEL * v,
                    size=(60, 50),
                    banner=20,
                )
                rows[split].append((f"{image_id:07d}", variant))
    rows["trainval"] = rows["train"] + rows["val"]
    for level, name_of in [
        ("variant", lambda v: v),
        ("family", FAMILY.get),
        ("manufacturer", MAKER.get),
    ]:
        for split, pairs in rows.items():
            with open(os.path.join(data, f"images_{level}_{split}.txt"), "w") as f:
                f.write("".join(f"{i} {name_of(v)}\n" for i, v in pairs))
    return data


def make_image_folder(root, classes=("zebra", "ant", "moth"), per_split=None):
    per_split = per_split or {"train": 3, "test": 2}
    for split, n in per_split.items():
        for c, name in enumerate(sorted(classes)):
            d = os.path.join(root, split, name)
            os.makedirs(d)
            for i in range(n):
                ext = "png" if i % 2 else "jpg"
                _save(os.path.join(d, f"img{i}.{ext}"), 20 + LEVEL * c, size=(30 + i, 24))


# --- embedded MNIST -----------------------------------------------------------------------


def test_embedded_mnist_loads_offline_with_a_fixed_stratified_split(no_network):
    cfg = default_source_config("mnist_embedded")
    ds = load_source(cfg)
    assert ds.name == "mnist_embedded" and ds.class_names == tuple("0123456789")
    assert ds.train.images.shape == (4000, 28, 28, 1) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [100] * 10)
    # Real digits: MNIST's mean intensity is 0.1307, and most pixels are background.
    assert abs(ds.train.images.mean() / 255 - 0.1307) < 0.01
    assert (ds.train.images == 0).mean() > 0.7
    # Same split on every run; 400 + 100 per class uses all 5,000, so no image is shared.
    again = load_source(cfg)
    np.testing.assert_array_equal(again.train.images, ds.train.images)
    np.testing.assert_array_equal(again.test.labels, ds.test.labels)
    train_rows = {x.tobytes() for x in ds.train.images}
    assert sum(x.tobytes() in train_rows for x in ds.test.images) <= 2  # (dupes in MNIST)


def test_embedded_mnist_split_options():
    small = load_source({"name": "mnist_embedded", "train_per_class": 10, "test_per_class": 5})
    np.testing.assert_array_equal(np.bincount(small.train.labels), [10] * 10)
    other = load_source(
        {"name": "mnist_embedded", "train_per_class": 10, "test_per_class": 5, "seed": 1}
    )
    assert not np.array_equal(small.train.images, other.train.images)
    with pytest.raises(ValueError, match="per class"):
        load_source({"name": "mnist_embedded", "train_per_class": 450, "test_per_class": 100})


def test_config_errors():
    with pytest.raises(ValueError, match="unknown data source"):
        load_source({"name": "imagenet"})
    with pytest.raises(ValueError, match="unknown field 'train_per_clas'"):
        load_source({"name": "mnist_embedded", "train_per_clas": 3})
    for name in ("mnist_embedded", "tfds", "fgvc_aircraft", "image_folder", "numpy"):
        assert default_source_config(name).name == name


# --- FGVC-Aircraft ------------------------------------------------------------------------


def test_aircraft_variant_level(tmp_path, no_network):
    make_aircraft(tmp_path)
    ds = load_source({"name": "fgvc_aircraft", "root": str(tmp_path), "image_size": 16})
    assert ds.name == "fgvc_aircraft"
    assert ds.class_names == tuple(VARIANTS)  # the order of variants.txt
    assert len(ds.train) == 4 * 3 and len(ds.test) == 4  # train = trainval
    assert ds.train.images.shape[1:] == (16, 16, 3)
    np.testing.assert_array_equal(_class_of(ds.train.images), ds.train.labels)
    np.testing.assert_array_equal(_class_of(ds.test.images), ds.test.labels)
    # The white banner is cropped: with 'stretch' the bottom rows would show it otherwise.
    full = load_source(
        {
            "name": "fgvc_aircraft",
            "root": str(tmp_path),
            "image_size": 16,
            "resize": "stretch",
            "cache": False,
        }
    )
    assert full.train.images[:, -1].max() < 200
    banner = load_source(
        {
            "name": "fgvc_aircraft",
            "root": str(tmp_path),
            "image_size": 16,
            "resize": "stretch",
            "crop_banner": False,
            "cache": False,
        }
    )
    assert banner.train.images[:, -1].min() > 240


def test_aircraft_skips_corrupt_and_empty_images_or_raises_when_strict(tmp_path, caplog):
    data = make_aircraft(tmp_path)
    with open(os.path.join(data, "images_variant_trainval.txt")) as f:
        ids = [line.split()[0] for line in f]
    (Path(data) / "images" / f"{ids[0]}.jpg").write_bytes(b"")  # zero bytes
    jpeg = (Path(data) / "images" / f"{ids[5]}.jpg").read_bytes()
    (Path(data) / "images" / f"{ids[5]}.jpg").write_bytes(jpeg[:40])  # truncated header
    with caplog.at_level(logging.WARNING):
        ds = load_source({"name": "fgvc_aircraft", "root": str(tmp_path), "image_size": 16})
    assert len(ds.train) == 4 * 3 - 2 and len(ds.test) == 4
    np.testing.assert_array_equal(_class_of(ds.train.images), ds.train.labels)  # stay aligned
    assert "fgvc_aircraft/trainval: skipped 2 unreadable image(s) of 12" in caplog.text
    assert f"{ids[0]}.jpg" in caplog.text
    strict = {"name": "fgvc_aircraft", "root": str(tmp_path), "image_size": 16, "strict": True}
    with pytest.raises(ValueError, match=f"cannot decode image .*({ids[0]}|{ids[5]}).jpg"):
        load_source(strict)


def test_aircraft_family_and_manufacturer_levels(tmp_path):
    make_aircraft(tmp_path)
    for level, mapping in [("family", FAMILY), ("manufacturer", MAKER)]:
        ds = load_source(
            {
                "name": "fgvc_aircraft",
                "root": str(tmp_path / "fgvc-aircraft-2013b"),
                "image_size": 8,
                "class_level": level,
            }
        )
        assert ds.class_names == tuple(sorted(set(mapping.values())))
        variant = _class_of(ds.train.images)
        want = [ds.class_names.index(mapping[VARIANTS[v]]) for v in variant]
        np.testing.assert_array_equal(ds.train.labels, want)
    official_train = load_source(
        {"name": "fgvc_aircraft", "root": str(tmp_path), "image_size": 8, "train_split": "train"}
    )
    assert len(official_train.train) == 4 * 2
    with pytest.raises(ValueError, match="class_level"):
        load_source({"name": "fgvc_aircraft", "root": str(tmp_path), "class_level": "model"})


def test_aircraft_cache_is_reused(tmp_path):
    data = make_aircraft(tmp_path)
    cfg = {"name": "fgvc_aircraft", "root": str(tmp_path), "image_size": 8}
    first = load_source(cfg)
    assert os.listdir(tmp_path / "cka_jax_cache")
    for f in os.listdir(os.path.join(data, "images")):  # decoding again would now fail
        os.remove(os.path.join(data, "images", f))
    second = load_source(cfg)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)


def test_aircraft_missing_files_are_named(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "fgvc_aircraft", "root": str(tmp_path)})
    msg = str(e.value)
    assert "fgvc_aircraft" in msg and str(tmp_path) in msg
    for f in ("variants.txt", "images_variant_trainval.txt", "images_variant_test.txt", "images/"):
        assert f in msg
    assert isinstance(e.value, FileNotFoundError)

    data = make_aircraft(tmp_path)
    os.remove(os.path.join(data, "images_variant_test.txt"))
    with pytest.raises(DataNotFoundError, match="images_variant_test.txt") as e:
        load_source({"name": "fgvc_aircraft", "root": str(tmp_path), "cache": False})
    assert e.value.directory == data and e.value.files == ("images_variant_test.txt",)

    first = open(os.path.join(data, "images_variant_train.txt")).readline().split()[0]
    os.remove(os.path.join(data, "images", f"{first}.jpg"))
    with pytest.raises(DataNotFoundError, match=f"images/{first}.jpg"):
        load_source(
            {
                "name": "fgvc_aircraft",
                "root": str(tmp_path),
                "cache": False,
                "test_split": "val",
                "train_split": "train",
            }
        )


def test_aircraft_unextracted_archive_hint(tmp_path):
    (tmp_path / "fgvc-aircraft-2013b.tar.gz").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match="tar -xzf"):
        load_source({"name": "fgvc_aircraft", "root": str(tmp_path)})


# --- image folder -------------------------------------------------------------------------


def test_image_folder(tmp_path, no_network):
    make_image_folder(tmp_path)
    ds = load_source({"name": "image_folder", "root": str(tmp_path), "image_size": 12})
    assert ds.class_names == ("ant", "moth", "zebra")
    assert len(ds.train) == 9 and len(ds.test) == 6
    assert ds.train.images.shape[1:] == (12, 12, 3)
    np.testing.assert_array_equal(_class_of(ds.train.images), ds.train.labels)
    np.testing.assert_array_equal(_class_of(ds.test.images), ds.test.labels)
    gray = load_source(
        {"name": "image_folder", "root": str(tmp_path), "image_size": 12, "channels": 1}
    )
    assert gray.train.images.shape[1:] == (12, 12, 1)


def test_image_folder_train_per_class_keeps_a_fixed_draw(tmp_path):
    make_image_folder(tmp_path, per_split={"train": 5, "test": 2})
    source = {"name": "image_folder", "root": str(tmp_path), "image_size": 12}
    full = load_source(source)
    part = load_source({**source, "train_per_class": 2})
    assert np.bincount(part.train.labels).tolist() == [2, 2, 2]
    assert len(part.test) == len(full.test) == 6  # the test split is untouched
    again = load_source({**source, "train_per_class": 2})
    np.testing.assert_array_equal(part.train.images, again.train.images)
    # Every kept image is one of the full split's, with its own label.
    rows = {img.tobytes(): y for img, y in zip(full.train.images, full.train.labels, strict=True)}
    kept = zip(part.train.images, part.train.labels, strict=True)
    assert all(rows[img.tobytes()] == y for img, y in kept)
    assert len(load_source({**source, "train_per_class": 9}).train) == 15  # at most all


def test_image_folder_skips_bad_images_or_raises_when_strict(tmp_path, caplog):
    make_image_folder(tmp_path)
    (tmp_path / "train" / "ant" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "moth" / "broken.png").write_bytes(b"not a png at all")
    with caplog.at_level(logging.WARNING):
        ds = load_source({"name": "image_folder", "root": str(tmp_path), "image_size": 8})
    assert len(ds.train) == 9
    np.testing.assert_array_equal(_class_of(ds.train.images), ds.train.labels)
    assert "/train: skipped 2 unreadable image(s) of 11" in caplog.text
    with pytest.raises(ValueError, match="empty.jpg|broken.png"):
        load_source(
            {"name": "image_folder", "root": str(tmp_path), "image_size": 8, "strict": True}
        )


def test_image_folder_missing(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "image_folder", "root": str(tmp_path)})
    assert str(tmp_path) in str(e.value) and "test/<class name>/" in str(e.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_folder_class_folder_without_images_is_named(tmp_path, split):
    make_image_folder(tmp_path)
    (tmp_path / split / "bee").mkdir()
    (tmp_path / split / "wasp").mkdir()
    (tmp_path / split / "wasp" / "notes.txt").write_text("no images here")
    if split == "test":  # a test class needs its training folder (with images)
        for name in ("bee", "wasp"):
            make_image_folder(tmp_path / "extra", classes=(name,), per_split={"train": 1})
            (tmp_path / "extra" / "train" / name).rename(tmp_path / "train" / name)
    with pytest.raises(ImageFolderError) as e:
        load_source({"name": "image_folder", "root": str(tmp_path), "image_size": 8})
    assert str(e.value) == (
        f"{tmp_path.name}: class folder(s) without images: {tmp_path / split / 'bee'}/ (empty), "
        f"{tmp_path / split / 'wasp'}/ (1 file(s), none an image). Each class folder needs "
        "image files (.jpg, .jpeg, .png, .bmp, .webp); add them or remove the folder"
    )


def test_image_folder_test_class_missing_from_train_is_named(tmp_path):
    make_image_folder(tmp_path)
    make_image_folder(tmp_path / "extra", classes=("bee",), per_split={"test": 1})
    (tmp_path / "extra" / "test" / "bee").rename(tmp_path / "test" / "bee")
    with pytest.raises(ImageFolderError, match=r"test class\(es\) \['bee'\] have no folder in"):
        load_source({"name": "image_folder", "root": str(tmp_path), "image_size": 8})


# --- numpy --------------------------------------------------------------------------------


def test_numpy_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8)
    x_test = rng.random((4, 6, 6, 3)).astype(np.float32)
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        x_train=x_train,
        y_train=np.arange(10) % 3,
        x_test=x_test,
        y_test=np.array([0, 1, 2, 2]),
    )
    ds = load_source({"name": "numpy", "path": str(path)})
    assert ds.name == "mine" and ds.class_names == ("0", "1", "2")
    np.testing.assert_array_equal(ds.train.images[..., 0], x_train)
    np.testing.assert_array_equal(ds.test.images, np.round(x_test * 255).astype(np.uint8))
    resized = load_source(
        {"name": "numpy", "path": str(path), "image_size": 12, "class_names": ("a", "b", "c")}
    )
    assert resized.train.images.shape == (10, 12, 12, 1) and resized.class_names[0] == "a"


def test_numpy_errors(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "numpy", "path": str(tmp_path / "nope.npz")})
    assert str(tmp_path) in str(e.value) and "nope.npz" in str(e.value)
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="y_train"):
        load_source({"name": "numpy", "path": str(tmp_path / "bad.npz")})


# --- tfds ---------------------------------------------------------------------------------

TFDS_FILES = {
    "cars196": [
        "cars_train.tgz",
        "cars_test.tgz",
        "car_devkit.tgz",
        "cars_test_annos_withlabels.mat",
    ],
    "caltech_birds2011": ["CUB_200_2011.tgz", "segmentations.tgz"],
    "stanford_dogs": ["images.tar", "annotation.tar", "lists.tar"],
}


@pytest.mark.parametrize("name", sorted(TFDS_FILES))
def test_tfds_missing_files_fail_fast_without_network(name, tmp_path, no_network):
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "tfds", "tfds_name": name, "data_dir": str(data_dir)})
    msg = str(e.value)
    manual = str(data_dir / "downloads" / "manual")
    assert name in msg and manual in msg
    assert e.value.directory == manual
    assert sorted(e.value.files) == sorted(TFDS_FILES[name])
    for f in TFDS_FILES[name]:
        assert f in msg


def test_tfds_cars196_through_mock_data(tmp_path, no_network):
    """tfds's mock_data replaces the prepared files (and download_and_prepare) with random
    examples; load_source runs its normal path: look for the manual files, prepare, read
    with tfds.data_source, decode, resize."""
    import tensorflow_datasets as tfds

    manual = tmp_path / "manual"
    manual.mkdir()
    for f in TFDS_FILES["cars196"]:
        (manual / f).write_bytes(b"placeholder")
    cfg = {
        "name": "tfds",
        "tfds_name": "cars196",
        "data_dir": str(tmp_path / "tfds"),
        "manual_dir": str(manual),
        "image_size": 10,
        "cache": False,
    }
    with tfds.testing.mock_data(num_examples=6):
        ds = load_source(cfg)
    assert ds.name == "cars196" and len(ds.class_names) == 196
    assert ds.class_names[0] == "AM General Hummer SUV 2000"
    assert ds.train.images.shape == (6, 10, 10, 3) and ds.train.images.dtype == np.uint8
    assert len(ds.test) == 6
    assert ds.train.labels.min() >= 0 and ds.train.labels.max() < 196


def test_tfds_builder_prepared_as_array_record_and_read_back(tmp_path, no_network):
    """The project's FGVC-Aircraft tfds builder, prepared for real (array_record, no
    TensorFlow) from a tiny official-layout archive in manual_dir, then read back through
    tfds.data_source by load_source."""
    make_aircraft(tmp_path / "manual")
    data_dir = tmp_path / "tfds"
    cfg = {
        "name": "tfds",
        "tfds_name": "fgvc_aircraft/variant",
        "data_dir": str(data_dir),
        "manual_dir": str(tmp_path / "manual"),
        "train_split": "train+val",
        "image_size": 16,
    }
    ds = load_source(cfg)
    assert ds.name == "fgvc_aircraft" and ds.class_names == tuple(VARIANTS)
    assert len(ds.train) == 12 and len(ds.test) == 4
    np.testing.assert_array_equal(_class_of(ds.train.images), ds.train.labels)
    np.testing.assert_array_equal(_class_of(ds.test.images), ds.test.labels)
    prepared = list((data_dir / "fgvc_aircraft" / "variant" / "1.0.0").iterdir())
    assert any(".array_record" in p.name for p in prepared)
    # Second call: already prepared, manual files no longer needed.
    shutil.rmtree(tmp_path / "manual")
    again = load_source(dict(cfg, cache=False))
    assert sorted(again.train.labels) == sorted(ds.train.labels)
