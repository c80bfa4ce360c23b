"""Shared settings of the CKA paper's fine-grained experiments (Sec. 5.1): resnet-18
teachers, Adam lr 5e-4 with cosine decay, weight decay 5e-4, batch 64, 100 epochs,
margin 0.4, loss weights 1/1/10/1, 224 px crops of 256 px images.

Each dataset has a source helper. The defaults read the official files directly (no
TensorFlow, no tfds); the roots default to folders under ``~/data`` and can be changed on
the command line (``--config.data.root=/data/stanford_cars``). To read a dataset that tfds
prepared instead, give ``tfds_source(...)``: ``tfds_source("cars196")``,
``tfds_source("caltech_birds2011")``, ``tfds_source("stanford_dogs")``; the paper configs
take it as ``--config=configs/cars.py:tfds`` (see docs/data.md).
"""

from cka_jax.config import base_config, model_config
from cka_jax.data import augment_config, default_source_config

# The official readers' source names and the tfds builders of the same datasets.
TFDS_NAMES = {
    "stanford_cars": "cars196",
    "cub200": "caltech_birds2011",
    "stanford_dogs": "stanford_dogs",
}
READERS = ("official", "tfds")


def tfds_source(tfds_name: str, data_dir: str = "~/tensorflow_datasets"):
    """A tfds dataset prepared as array_record under ``data_dir``."""
    source = default_source_config("tfds")
    source.tfds_name = tfds_name
    source.data_dir = data_dir
    return source


def aircraft_source(root: str = "~/data/fgvc-aircraft-2013b"):
    """FGVC-Aircraft from the extracted official fgvc-aircraft-2013b archive."""
    source = default_source_config("fgvc_aircraft")
    source.root = root
    return source


def cars_source(root: str = "~/data/stanford_cars"):
    """Stanford Cars from its official files: cars_train/, cars_test/, devkit/ and
    cars_test_annos_withlabels.mat under ``root``."""
    source = default_source_config("stanford_cars")
    source.root = root
    return source


def cub_source(root: str = "~/data/CUB_200_2011"):
    """CUB-200-2011 from the extracted official CUB_200_2011.tgz (``root`` may be the
    CUB_200_2011 folder or the one that holds it)."""
    source = default_source_config("cub200")
    source.root = root
    return source


def dogs_source(root: str = "~/data/stanford_dogs"):
    """Stanford Dogs from its official files: Images/ and lists/{train,test}_list.mat."""
    source = default_source_config("stanford_dogs")
    source.root = root
    return source


def paper_source(name: str, reader: str | None = None):
    """The source of dataset ``name`` ('stanford_cars', 'cub200', 'stanford_dogs') read by
    ``reader``: 'official' (the default: the official files) or 'tfds' (a tfds-prepared
    copy). The paper configs pass their ``get_config`` argument here."""
    reader = reader or "official"
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r} for {name}; use one of {READERS}")
    if reader == "tfds":
        return tfds_source(TFDS_NAMES[name])
    official = {"stanford_cars": cars_source, "cub200": cub_source, "stanford_dogs": dogs_source}
    return official[name]()


def paper_config(name: str, source, num_tasks: int = 2):
    """The paper's fine-grained experiment on ``source`` split into ``num_tasks`` tasks."""
    c = base_config()
    c.name = name
    c.data = source
    c.tasks.num_tasks = num_tasks
    c.tasks.mode = "shuffle"
    c.augment = augment_config("imagenet")
    c.teacher = model_config("resnet18")
    c.student = model_config("resnet18")
    c.teacher_epochs = 100
    c.epochs = 100
    c.methods = ("kd", "cfl", "cka_intra", "cka_inter", "cka")
    c.seeds = (0, 1, 2)
    return c
