"""The ``idx`` source (MNIST / Fashion-MNIST / KMNIST files), loaded through ``load_source``.

Every file is written here byte by byte in the IDX format (magic number, big-endian sizes,
data), plain or gzip-compressed, so the reader is checked against the format itself.
"""

import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from cka_jax.data import DataNotFoundError, default_source_config, load_source
from cka_jax.data.idx import FASHION_MNIST_CLASS_NAMES

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
N_TRAIN, N_TEST = 7, 4


def idx_bytes(array, *, type_byte=0x08, ndim=None, first=(0, 0)):
    """The IDX encoding of ``array``: 2 zero bytes, type, ndim, big-endian uint32 sizes, data.

    ``type_byte``, ``ndim`` and ``first`` (the two leading bytes) can be set wrong on purpose.
    """
    array = np.asarray(array, np.uint8)
    ndim = array.ndim if ndim is None else ndim
    header = struct.pack(">BBBB", first[0], first[1], type_byte, ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes(order="C")


def write(path, data: bytes, gz: bool = False):
    """Writes ``data`` to ``path`` (gzip-compressed to ``path.gz`` when ``gz``)."""
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
        return f"{path}.gz"
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def make_tree(root, *, gz=False, size=(28, 28), seed=0):
    """Writes the four files in ``root``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (N_TRAIN, *size), dtype=np.uint8),
        "train_labels": np.array([3, 0, 9, 1, 1, 7, 2], np.uint8),
        "test_images": rng.integers(0, 256, (N_TEST, *size), dtype=np.uint8),
        "test_labels": np.array([9, 4, 0, 5], np.uint8),
    }
    os.makedirs(root, exist_ok=True)
    for key, arr in arrays.items():
        write(os.path.join(root, FILES[key]), idx_bytes(arr), gz=gz)
    return arrays


# --- loading ------------------------------------------------------------------------------


def test_defaults():
    cfg = default_source_config("idx")
    assert cfg.name == "idx" and cfg.root is None and cfg.image_size is None
    assert cfg.channels == 1 and cfg.class_names is None
    for key, stem in FILES.items():
        assert cfg[key] == stem


@pytest.mark.parametrize("gz", [False, True])
def test_loads_the_exact_images_and_labels(tmp_path, gz):
    root = tmp_path / "fashion-mnist"
    arrays = make_tree(root, gz=gz)
    ds = load_source({"name": "idx", "root": str(root)})
    assert ds.name == "fashion-mnist"
    assert ds.class_names == tuple("0123456789")
    for split in ("train", "test"):
        got = getattr(ds, split)
        assert got.images.dtype == np.uint8 and got.images.shape[1:] == (28, 28, 1)
        np.testing.assert_array_equal(got.images[..., 0], arrays[f"{split}_images"])
        np.testing.assert_array_equal(got.labels, arrays[f"{split}_labels"])


def test_hand_written_bytes_are_parsed_row_major(tmp_path):
    """A 2-image, 2x3 file and its labels spelled out byte by byte."""
    images = struct.pack(">BBBBIII", 0, 0, 0x08, 3, 2, 2, 3) + bytes(range(10, 22))
    labels = struct.pack(">BBBBI", 0, 0, 0x08, 1, 2) + bytes([4, 1])
    for split in ("train", "t10k"):
        write(tmp_path / f"{split}-images-idx3-ubyte", images)
        write(tmp_path / f"{split}-labels-idx1-ubyte", labels)
    ds = load_source({"name": "idx", "root": str(tmp_path)})
    np.testing.assert_array_equal(
        ds.train.images[..., 0], [[[10, 11, 12], [13, 14, 15]], [[16, 17, 18], [19, 20, 21]]]
    )
    np.testing.assert_array_equal(ds.test.labels, [4, 1])


def test_plain_and_gz_files_mix_and_plain_wins_when_both_exist(tmp_path):
    arrays = make_tree(tmp_path, gz=True)
    # An uncompressed train-images file next to the .gz one: the plain file is read.
    other = (255 - arrays["train_images"]).astype(np.uint8)
    write(tmp_path / FILES["train_images"], idx_bytes(other))
    ds = load_source({"name": "idx", "root": str(tmp_path)})
    np.testing.assert_array_equal(ds.train.images[..., 0], other)
    np.testing.assert_array_equal(ds.test.images[..., 0], arrays["test_images"])


def test_custom_file_names_with_or_without_gz_suffix(tmp_path):
    arrays = make_tree(tmp_path / "std", gz=True)
    custom = tmp_path / "custom"
    custom.mkdir()
    for key, stem in FILES.items():
        os.rename(tmp_path / "std" / f"{stem}.gz", custom / f"my-{key}.gz")
    cfg = {"name": "idx", "root": str(custom)}
    cfg.update({k: f"my-{k}" for k in FILES})
    cfg["test_labels"] = "my-test_labels.gz"  # a stem given with its suffix is found too
    ds = load_source(cfg)
    np.testing.assert_array_equal(ds.train.labels, arrays["train_labels"])
    np.testing.assert_array_equal(ds.test.labels, arrays["test_labels"])


def test_class_names(tmp_path):
    make_tree(tmp_path)
    ds = load_source(
        {"name": "idx", "root": str(tmp_path), "class_names": FASHION_MNIST_CLASS_NAMES}
    )
    assert ds.class_names == FASHION_MNIST_CLASS_NAMES
    assert len(FASHION_MNIST_CLASS_NAMES) == 10 and ds.class_names[9] == "ankle boot"
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte has label 9.*names only 5"):
        load_source({"name": "idx", "root": str(tmp_path), "class_names": tuple("abcde")})


def test_resize_and_channels(tmp_path):
    arrays = make_tree(tmp_path)
    ds = load_source({"name": "idx", "root": str(tmp_path), "image_size": 14, "channels": 3})
    assert ds.train.images.shape == (N_TRAIN, 14, 14, 3)
    for c in (1, 2):  # the gray channel replicated
        np.testing.assert_array_equal(ds.train.images[..., c], ds.train.images[..., 0])
    want = [
        np.asarray(Image.fromarray(x).resize((14, 14), Image.BILINEAR))
        for x in arrays["test_images"]
    ]
    np.testing.assert_array_equal(ds.test.images[..., 0], np.stack(want))
    np.testing.assert_array_equal(ds.test.labels, arrays["test_labels"])
    native = load_source({"name": "idx", "root": str(tmp_path), "image_size": 28, "channels": 3})
    np.testing.assert_array_equal(native.train.images[..., 2], arrays["train_images"])
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_source({"name": "idx", "root": str(tmp_path), "channels": 2})


def test_torchvision_raw_folder_is_named_after_its_parent(tmp_path):
    make_tree(tmp_path / "KMNIST" / "raw")
    assert load_source({"name": "idx", "root": str(tmp_path / "KMNIST" / "raw")}).name == "KMNIST"


# --- errors -------------------------------------------------------------------------------


def test_truncated_data_names_the_file_and_byte_counts(tmp_path):
    make_tree(tmp_path)
    path = tmp_path / FILES["train_images"]
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])
    with pytest.raises(ValueError) as e:
        load_source({"name": "idx", "root": str(tmp_path)})
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg
    assert f"need {N_TRAIN * 28 * 28} data bytes" in msg
    assert f"the file has {N_TRAIN * 28 * 28 - 5}" in msg


def test_truncated_gz_data_and_header(tmp_path):
    make_tree(tmp_path, gz=True)
    path = tmp_path / (FILES["test_labels"] + ".gz")
    write(tmp_path / FILES["test_labels"], struct.pack(">BBBBI", 0, 0, 8, 1, 6) + b"\x01\x02", True)
    with pytest.raises(ValueError, match=f"{path}: IDX data truncated.*need 6 .*has 2"):
        load_source({"name": "idx", "root": str(tmp_path)})
    write(tmp_path / FILES["test_labels"], b"\x00\x00\x08\x01\x00\x00", True)
    with pytest.raises(ValueError, match=f"{path}: truncated IDX header: 8 bytes expected"):
        load_source({"name": "idx", "root": str(tmp_path)})
    path.write_bytes(path.read_bytes()[:12])  # a damaged gzip stream
    with pytest.raises(ValueError, match=f"{path}: not a readable gzip file"):
        load_source({"name": "idx", "root": str(tmp_path)})


def test_extra_bytes_are_an_error(tmp_path):
    make_tree(tmp_path)
    path = tmp_path / FILES["test_labels"]
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match=f"{path}: IDX data longer than .*need 4 .*has 5"):
        load_source({"name": "idx", "root": str(tmp_path)})


@pytest.mark.parametrize(
    "key, kwargs, message",
    [
        ("train_images", dict(first=(0, 1)), "two zero bytes, got 0x00 0x01"),
        ("test_labels", dict(first=(8, 0)), "two zero bytes, got 0x08 0x00"),
        ("train_images", dict(type_byte=0x0D), r"type 0x0d \(float \(float32\)\) is not supp"),
        ("test_labels", dict(type_byte=0x09), r"type 0x09 \(signed byte\)"),
        ("train_labels", dict(type_byte=0x42), r"type 0x42 \(unknown\)"),
        ("test_images", dict(ndim=2), "gives 2 dimension.*images .* need 3"),
        ("train_labels", dict(ndim=3), "gives 3 dimension.*labels .* need 1"),
    ],
)
def test_wrong_magic_names_the_file(tmp_path, key, kwargs, message):
    arrays = make_tree(tmp_path)
    path = tmp_path / FILES[key]
    path.write_bytes(idx_bytes(arrays[key], **kwargs))  # only the named header byte is wrong
    with pytest.raises(ValueError, match=message) as e:
        load_source({"name": "idx", "root": str(tmp_path)})
    assert str(path) in str(e.value)


def test_a_gzip_file_without_suffix_is_named(tmp_path):
    arrays = make_tree(tmp_path)
    path = tmp_path / FILES["train_labels"]
    path.write_bytes(gzip.compress(idx_bytes(arrays["train_labels"])))
    with pytest.raises(ValueError, match="gzip-compressed: give it a .gz suffix") as e:
        load_source({"name": "idx", "root": str(tmp_path)})
    assert str(path) in str(e.value)


def test_mismatched_counts_name_both_files(tmp_path):
    arrays = make_tree(tmp_path)
    write(tmp_path / FILES["test_labels"], idx_bytes(arrays["test_labels"][:3]))
    with pytest.raises(ValueError) as e:
        load_source({"name": "idx", "root": str(tmp_path)})
    msg = str(e.value)
    assert f"{tmp_path / FILES['test_images']} holds {N_TEST} images" in msg
    assert f"{tmp_path / FILES['test_labels']} holds 3 labels" in msg


def test_missing_files_are_listed_with_the_fashion_mnist_hint(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "idx", "root": str(tmp_path)})
    err = e.value
    assert isinstance(err, FileNotFoundError)
    assert err.directory == str(tmp_path)
    assert err.files == tuple(f"{s} (or {s}.gz)" for s in FILES.values())
    msg = str(err)
    assert str(tmp_path) in msg
    for stem in FILES.values():
        assert stem in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "/usr/share/datasets/fashion-mnist/" in msg
    assert "MNIST and KMNIST" in msg

    make_tree(tmp_path, gz=True)
    os.remove(tmp_path / (FILES["test_images"] + ".gz"))
    with pytest.raises(DataNotFoundError) as e:
        load_source({"name": "idx", "root": str(tmp_path)})
    assert e.value.files == (f"{FILES['test_images']} (or {FILES['test_images']}.gz)",)

    with pytest.raises(DataNotFoundError, match="cfg.root is not set"):
        load_source({"name": "idx"})
