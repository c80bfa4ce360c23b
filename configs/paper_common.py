"""Shared settings of the CKA paper's fine-grained experiments (Sec. 5.1): resnet-18
teachers, Adam lr 5e-4 with cosine decay, weight decay 5e-4, batch 64, 100 epochs,
margin 0.4, loss weights 1/1/10/1, 224 px crops of 256 px images."""

from cka_jax.config import base_config, model_config
from cka_jax.data import augment_config, default_source_config


def tfds_source(tfds_name: str, data_dir: str = "~/tensorflow_datasets"):
    source = default_source_config("tfds")
    source.tfds_name = tfds_name
    source.data_dir = data_dir
    return source


def aircraft_source(root: str = "~/data/fgvc-aircraft-2013b"):
    source = default_source_config("fgvc_aircraft")
    source.root = root
    return source


def paper_config(name: str, source, num_tasks: int = 2):
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
