"""The Stanford Cars, CUB-200-2011 and Stanford Dogs readers on tiny trees in the official
layouts: real JPEGs written with PIL and the ``.mat`` files written with scipy in the
devkits' layouts (1 x N struct arrays, N x 1 cell arrays of strings, N x 1 double labels).

Each image is filled with a gray level that encodes its class, so the tests check that
every label belongs to its image, not only the counts. The last test runs the paper's
Cars + FGVC-Aircraft config end to end on tiny trees in a process where importing
TensorFlow fails.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from cka_jax.data import DataNotFoundError, load_source
from cka_jax.data.cars import _pil_box
from cka_jax.stages.inputs import prepare_data

REPO = Path(__file__).resolve().parents[2]
LEVEL = 40  # class c is drawn with gray level 20 + LEVEL * c


def _class_of(images):
    """Recovers the class from the mean gray level of the image centre."""
    h, w = images.shape[1:3]
    centre = images[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(len(images), -1)
    return np.round((centre.mean(axis=1) - 20) / LEVEL).astype(int)


def _jpeg(path, level, size=(40, 30), box=None):
    """A JPEG of (width, height) ``size`` at gray ``level``; with ``box`` (0-based PIL box)
    only the box has that level and the rest is white."""
    w, h = size
    arr = np.full((h, w, 3), 255 if box else level, np.uint8)
    if box:
        left, top, right, bottom = box
        arr[top:bottom, left:right] = level
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


def _cell(strings, shape):
    """A MATLAB cell array of strings as scipy writes it (each cell a 1-element array)."""
    cell = np.empty(len(strings), object)
    for i, s in enumerate(strings):
        cell[i] = np.array([s])
    return cell.reshape(shape)


# --- Stanford Cars ------------------------------------------------------------------------

CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
# The classes (1-based, as in the .mat files) of the images 00001.jpg, 00002.jpg, ...
CAR_TRAIN = [3, 1, 2, 1, 3, 2, 2]
CAR_TEST = [2, 3, 1, 1, 2]
CAR_BOX = (11, 6, 30, 25)  # MATLAB 1-based inclusive x1, y1, x2, y2 in a 40 x 30 image
ANNO_DTYPE = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]


def _annotations(classes, with_class=True):
    """A 1 x N struct array like the devkit's ``annotations``."""
    dtype = ANNO_DTYPE if with_class else [d for d in ANNO_DTYPE if d[0] != "class"]
    annos = np.zeros((1, len(classes)), dtype=dtype)
    for i, c in enumerate(classes):
        box = [np.array([[v]], np.uint16) for v in CAR_BOX]
        cls = [np.array([[c]], np.uint8)] if with_class else []
        annos[0, i] = (*box, *cls, np.array([f"{i + 1:05d}.jpg"]))
    return annos


def make_cars(root, test_annos_in="root", train=CAR_TRAIN, test=CAR_TEST, classes=CAR_CLASSES):
    """Writes the extracted cars_train.tgz, cars_test.tgz, car_devkit.tgz and
    cars_test_annos_withlabels.mat (in ``root`` or in ``root/devkit``)."""
    devkit = os.path.join(root, "devkit")
    os.makedirs(devkit)
    scipy.io.savemat(
        os.path.join(devkit, "cars_meta.mat"), {"class_names": _cell(classes, (1, len(classes)))}
    )
    scipy.io.savemat(
        os.path.join(devkit, "cars_train_annos.mat"), {"annotations": _annotations(train)}
    )
    # The devkit's own test annotations have no class field (not used).
    scipy.io.savemat(
        os.path.join(devkit, "cars_test_annos.mat"),
        {"annotations": _annotations(test, with_class=False)},
    )
    where = root if test_annos_in == "root" else devkit
    scipy.io.savemat(
        os.path.join(where, "cars_test_annos_withlabels.mat"), {"annotations": _annotations(test)}
    )
    pil_box = (CAR_BOX[0] - 1, CAR_BOX[1] - 1, CAR_BOX[2], CAR_BOX[3])
    for folder, classes_of in (("cars_train", train), ("cars_test", test)):
        for i, c in enumerate(classes_of):
            _jpeg(os.path.join(root, folder, f"{i + 1:05d}.jpg"), 20 + LEVEL * (c - 1), box=pil_box)


def test_cars_classes_labels_and_splits(tmp_path):
    make_cars(tmp_path)
    ds = load_source({"name": "stanford_cars", "root": str(tmp_path), "image_size": 16})
    assert ds.name == "stanford_cars"
    assert ds.class_names == tuple(CAR_CLASSES)
    np.testing.assert_array_equal(ds.train.labels, np.array(CAR_TRAIN) - 1)
    np.testing.assert_array_equal(ds.test.labels, np.array(CAR_TEST) - 1)
    assert ds.train.images.shape == (len(CAR_TRAIN), 16, 16, 3)
    np.testing.assert_array_equal(_class_of(ds.train.images), ds.train.labels)
    np.testing.assert_array_equal(_class_of(ds.test.images), ds.test.labels)


def test_cars_test_labels_may_sit_in_the_devkit(tmp_path):
    make_cars(tmp_path, test_annos_in="devkit")
    ds = load_source({"name": "stanford_cars", "root": str(tmp_path), "image_size": 8})
    np.testing.assert_array_equal(ds.test.labels, np.array(CAR_TEST) - 1)


def test_cars_bounding_box_crop(tmp_path):
    make_cars(tmp_path)
    cfg = {"name": "stanford_cars", "root": str(tmp_path), "image_size": 16, "resize": "stretch"}
    whole = load_source(dict(cfg, cache=False))
    cropped = load_source(dict(cfg, crop_bbox=True, cache=False))
    assert whole.train.images[:, 0, 0].min() > 240  # the white surround is kept
    levels = 20 + LEVEL * cropped.train.labels
    diff = np.abs(cropped.train.images.astype(int) - levels[:, None, None, None])
    assert diff.max() < 20  # only the box, corner to corner
    np.testing.assert_array_equal(cropped.test.labels, np.array(CAR_TEST) - 1)
    # The devkit's boxes are MATLAB's 1-based inclusive pixel coordinates.
    assert _pil_box((11, 6, 30, 25), 40, 30) == (10, 5, 30, 25)
    assert _pil_box((1, 1, 50, 40), 40, 30) == (0, 0, 40, 30)  # clipped to the image
    with pytest.raises(ValueError, match="empty"):
        _pil_box((45, 1, 50, 10), 40, 30)


def test_cars_cache_is_reused(tmp_path):
    make_cars(tmp_path)
    cfg = {"name": "stanford_cars", "root": str(tmp_path), "image_size": 8}
    first = load_source(cfg)
    for f in os.listdir(tmp_path / "cars_train"):  # decoding again would now fail
        os.remove(tmp_path / "cars_train" / f)
    second = load_source(cfg)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.train.labels, second.train.labels)


def test_cars_skips_corrupt_images_or_raises_when_strict(tmp_path, caplog):
    make_cars(tmp_path)
    (tmp_path / "cars_train" / "00002.jpg").write_bytes(b"")
    cfg = {"name": "stanford_cars", "root": str(tmp_path), "image_size": 8, "cache": False}
    for crop in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ds = load_source(dict(cfg, crop_bbox=crop))
        np.testing.assert_array_equal(ds.train.labels, np.delete(np.array(CAR_TRAIN) - 1, 1))
        np.testing.assert_array_equal(_class_of(ds.train.images), ds.train.labels)
        assert "stanford_cars/train: skipped 1 unreadable image(s) of 7" in caplog.text
        assert "00002.jpg" in caplog.text
        with pytest.raises(ValueError, match="cannot decode image .*00002.jpg"):
            load_source(dict(cfg, crop_bbox=crop, strict=True))


def test_cars_missing_files_are_named(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "stanford_cars", "root": str(tmp_path)})
    err = e.value
    assert err.directory == str(tmp_path)
    assert err.files == (
        "devkit/cars_meta.mat",
        "devkit/cars_train_annos.mat",
        "cars_test_annos_withlabels.mat (or devkit/cars_test_annos_withlabels.mat)",
        "cars_train/<fname>.jpg (the train images)",
        "cars_test/<fname>.jpg (the test images)",
    )
    assert "car_devkit.tgz" in str(err) and "official" in str(err)

    make_cars(tmp_path)
    os.remove(tmp_path / "cars_test_annos_withlabels.mat")
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "stanford_cars", "root": str(tmp_path)})
    assert len(e.value.files) == 1 and "cars_test_annos_withlabels.mat" in e.value.files[0]
    assert "devkit/cars_test_annos.mat has no class labels" in str(e.value)


def test_cars_missing_images_and_bad_classes(tmp_path):
    make_cars(tmp_path)
    os.remove(tmp_path / "cars_test" / "00003.jpg")
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "stanford_cars", "root": str(tmp_path), "cache": False})
    assert e.value.files == ("00003.jpg",) and e.value.directory == str(tmp_path / "cars_test")

    bad = tmp_path / "bad"
    make_cars(bad, train=[1, 4])  # class 4 of 3
    with pytest.raises(
        ValueError, match="annotation 2 \\(00002.jpg\\) has class 4; classes are 1..3"
    ):
        load_source({"name": "stanford_cars", "root": str(bad)})


# --- CUB-200-2011 -------------------------------------------------------------------------

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# (image id, class id, is_training_image), in a deliberately mixed order.
CUB_IMAGES = [
    (1, 1, 1),
    (2, 1, 0),
    (3, 3, 1),
    (4, 2, 1),
    (5, 2, 0),
    (6, 3, 0),
    (7, 1, 1),
    (8, 2, 1),
    (9, 3, 1),
]


def make_cub(root):
    """Writes root/CUB_200_2011/ as CUB_200_2011.tgz extracts; returns its path."""
    data = os.path.join(root, "CUB_200_2011")
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    for image_id, cid, train in CUB_IMAGES:
        folder = CUB_CLASSES[cid - 1]
        rel = f"{folder}/{folder[4:]}_{image_id:04d}_{100 + image_id}.jpg"
        _jpeg(os.path.join(data, "images", rel), 20 + LEVEL * (cid - 1), size=(36, 28))
        lines["images.txt"].append(f"{image_id} {rel}")
        lines["image_class_labels.txt"].append(f"{image_id} {cid}")
        lines["train_test_split.txt"].append(f"{image_id} {train}")
    lines["classes.txt"] = [f"{i + 1} {name}" for i, name in enumerate(CUB_CLASSES)]
    for name, rows in lines.items():
        Path(data, name).write_text("".join(r + "\n" for r in rows))
    return data


@pytest.mark.parametrize("at", ["parent", "archive_dir"])
def test_cub_classes_labels_and_splits(tmp_path, at):
    data = make_cub(tmp_path)
    root = str(tmp_path) if at == "parent" else data
    ds = load_source({"name": "cub200", "root": root, "image_size": 12})
    assert ds.name == "cub200" and ds.class_names == tuple(CUB_CLASSES)
    np.testing.assert_array_equal(ds.train.labels, [c - 1 for _, c, t in CUB_IMAGES if t == 1])
    np.testing.assert_array_equal(ds.test.labels, [c - 1 for _, c, t in CUB_IMAGES if t == 0])
    np.testing.assert_array_equal(_class_of(ds.train.images), ds.train.labels)
    np.testing.assert_array_equal(_class_of(ds.test.images), ds.test.labels)
    assert ds.train.images.shape == (6, 12, 12, 3)


def test_cub_missing_and_inconsistent_files(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "cub200", "root": str(tmp_path)})
    for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        assert f"CUB_200_2011/{f}" in e.value.files
    assert "CUB_200_2011.tgz" in str(e.value)

    data = make_cub(tmp_path)
    os.remove(os.path.join(data, "train_test_split.txt"))
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "cub200", "root": str(tmp_path)})
    assert e.value.files == ("train_test_split.txt",) and e.value.directory == data

    Path(data, "train_test_split.txt").write_text("1 1\n2 0\n")
    with pytest.raises(ValueError, match="train_test_split.txt has no line for 7 image id"):
        load_source({"name": "cub200", "root": str(tmp_path), "cache": False})

    Path(data, "train_test_split.txt").write_text("".join(f"{i} 1\n" for i in range(1, 10)))
    os.remove(os.path.join(data, "images", CUB_CLASSES[1], "Laysan_Albatross_0004_104.jpg"))
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "cub200", "root": str(tmp_path), "cache": False})
    assert e.value.files == (
        os.path.join("images", CUB_CLASSES[1], "Laysan_Albatross_0004_104.jpg"),
    )


# --- Stanford Dogs ------------------------------------------------------------------------

# Label 1, 2, 3 (unsorted on purpose: names follow the labels, not the folders' order).
BREEDS = ["n02085782-Japanese_spaniel", "n02085620-Chihuahua", "n02085936-Maltese_dog"]
# (breed index, image number), in list order.
DOGS_TRAIN = [(0, 5927), (1, 1043), (2, 25), (0, 311), (2, 2604), (1, 77)]
DOGS_TEST = [(2, 3), (0, 10074), (1, 800)]


def _dogs_list(path, entries):
    """A train_list.mat / test_list.mat as lists.tar holds it."""
    rel = [f"{BREEDS[b]}/{BREEDS[b].split('-')[0]}_{n}.jpg" for b, n in entries]
    scipy.io.savemat(
        path,
        {
            "file_list": _cell(rel, (len(rel), 1)),
            "annotation_list": _cell([r[: -len(".jpg")] for r in rel], (len(rel), 1)),
            "labels": np.array([[b + 1] for b, _ in entries], np.float64),
        },
    )
    return rel


def make_dogs(root, lists_dir="lists"):
    """Writes root/Images/<synset>-<breed>/*.jpg and the lists (in root/lists or root)."""
    lists = os.path.join(root, lists_dir)
    os.makedirs(lists, exist_ok=True)
    for split, entries in (("train", DOGS_TRAIN), ("test", DOGS_TEST)):
        rel = _dogs_list(os.path.join(lists, f"{split}_list.mat"), entries)
        for (b, _), r in zip(entries, rel, strict=True):
            _jpeg(os.path.join(root, "Images", r), 20 + LEVEL * b, size=(30, 34))


@pytest.mark.parametrize("lists_dir", ["lists", "."])
def test_dogs_classes_labels_and_splits(tmp_path, lists_dir):
    make_dogs(tmp_path, lists_dir)
    ds = load_source({"name": "stanford_dogs", "root": str(tmp_path), "image_size": 12})
    assert ds.name == "stanford_dogs" and ds.class_names == tuple(BREEDS)
    np.testing.assert_array_equal(ds.train.labels, [b for b, _ in DOGS_TRAIN])
    np.testing.assert_array_equal(ds.test.labels, [b for b, _ in DOGS_TEST])
    np.testing.assert_array_equal(_class_of(ds.train.images), ds.train.labels)
    np.testing.assert_array_equal(_class_of(ds.test.images), ds.test.labels)
    gray = load_source(
        {"name": "stanford_dogs", "root": str(tmp_path), "image_size": 12, "channels": 1}
    )
    assert gray.test.images.shape == (3, 12, 12, 1)


def test_dogs_missing_files_and_inconsistent_lists(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "stanford_dogs", "root": str(tmp_path)})
    assert e.value.files == (
        "Images/<synset>-<breed>/<name>.jpg",
        "lists/train_list.mat (or train_list.mat)",
        "lists/test_list.mat (or test_list.mat)",
    )
    assert "images.tar" in str(e.value) and "lists.tar" in str(e.value)

    make_dogs(tmp_path)
    missing = f"{BREEDS[1]}/n02085620_800.jpg"
    os.remove(tmp_path / "Images" / missing)
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "stanford_dogs", "root": str(tmp_path)})
    assert e.value.files == (missing,) and e.value.directory == str(tmp_path / "Images")

    mat = scipy.io.loadmat(tmp_path / "lists" / "test_list.mat")
    mat = {k: v for k, v in mat.items() if not k.startswith("__")}  # loadmat's header keys
    mat["labels"][0, 0] = 2  # Maltese_dog's image labelled as the Japanese spaniel
    scipy.io.savemat(tmp_path / "lists" / "test_list.mat", mat)
    with pytest.raises(ValueError, match="label 2 has images in both"):
        load_source({"name": "stanford_dogs", "root": str(tmp_path)})


# --- the paper's Cars + FGVC-Aircraft config, end to end, without TensorFlow ---------------

AIR_VARIANTS = ["707-320", "A340-300"]


def make_tiny_aircraft(root, per_class=None):
    """A 2-variant fgvc-aircraft-2013b/data/ tree (images with the 20-row banner)."""
    per_class = per_class or {"trainval": 3, "test": 2}
    data = os.path.join(root, "fgvc-aircraft-2013b", "data")
    Path(data).mkdir(parents=True)
    Path(data, "variants.txt").write_text("".join(v + "\n" for v in AIR_VARIANTS))
    image_id = 1000000
    for split, n in per_class.items():
        rows = []
        for v, variant in enumerate(AIR_VARIANTS):
            for _ in range(n):
                image_id += 3
                _jpeg(os.path.join(data, "images", f"{image_id}.jpg"), 20 + LEVEL * v, (40, 52))
                rows.append(f"{image_id} {variant}\n")
        Path(data, f"images_variant_{split}.txt").write_text("".join(rows))


E2E_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys

    # As if TensorFlow and tfds were not installed: `import tensorflow` raises
    # ModuleNotFoundError and importlib.util.find_spec("tensorflow") returns None.
    BLOCKED = ("tensorflow", "tensorflow_datasets")
    for name in BLOCKED:
        sys.modules[name] = None
    repo, cars_root, air_root, workdir = sys.argv[1:]
    sys.path.insert(0, repo)
    from cka_jax.stages import experiment
    from cka_jax.stages import inputs
    from cka_jax.config import model_config

    cfg = importlib.import_module("configs.cars_aircraft").get_config()
    assert cfg.data.name == "stanford_cars" and cfg.union[0].name == "fgvc_aircraft"
    cfg.data.root, cfg.data.image_size = cars_root, 32
    cfg.union[0].root, cfg.union[0].image_size = air_root, 32
    cfg.augment.out_size = 32
    cfg.teacher = model_config("resnet10", width=4, stem="small")
    cfg.student = model_config("resnet10", width=4, stem="small")
    cfg.teacher_epochs, cfg.epochs = 1, 1
    cfg.batch_size, cfg.eval_batch_size = 4, 8
    cfg.methods, cfg.seeds, cfg.diagnostics = ("kd",), (0,), False
    experiment.run(cfg, workdir)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m])
    print("LOADED=" + json.dumps(loaded))
    """
)


@pytest.mark.slow
def test_cars_aircraft_config_runs_end_to_end_without_tensorflow(tmp_path):
    cars, air, workdir = tmp_path / "cars", tmp_path / "air", tmp_path / "run"
    make_cars(cars, train=[1, 2, 3] * 3, test=[1, 2, 3] * 2)
    make_tiny_aircraft(air)
    out = subprocess.run(
        [sys.executable, "-c", E2E_SCRIPT, str(REPO), str(cars), str(air), str(workdir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "LOADED=[]" in out.stdout
    results = json.loads((workdir / "results.json").read_text())
    kd = [r for r in results["rows"] if r["method"] == "kd"]
    assert len(kd) == 1 and kd[0]["seed"] == 0
    tasks = json.loads((workdir / "tasks.json").read_text())
    assert tasks["names"] == ["stanford_cars", "fgvc_aircraft"]
    assert [len(c) for c in tasks["classes"]] == [3, 2]


def test_cars_aircraft_names_every_missing_dataset_at_once(tmp_path):
    from configs import cars_aircraft

    cfg = cars_aircraft.get_config()
    cfg.data.root, cfg.union[0].root = str(tmp_path / "no_cars"), str(tmp_path / "no_air")
    with pytest.raises(DataNotFoundError) as err:
        prepare_data(cfg)
    text = str(err.value)
    assert "2 datasets of this config are missing" in text
    assert "--config.data.root=DIR" in text and "--config.union[0].root=DIR" in text
    assert "cars_meta.mat" in text and "variants.txt" in text  # each one's own files
    assert str(tmp_path / "no_cars") in text and str(tmp_path / "no_air") in text


def test_a_dotted_tuple_index_on_the_command_line_gets_the_bracket_form(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cka_jax.main",
            "--config=configs/cars_aircraft.py",
            f"--workdir={tmp_path}",
            "--config.union.0.root=/data/air",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "--config.union[0].root" in done.stderr and "Traceback" not in done.stderr
