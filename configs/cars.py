"""Stanford Cars split into two class-disjoint teacher tasks (the CKA paper's Table 2 setting).

Reads the official files (cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat;
see docs/data.md) from ~/data/stanford_cars, or from --config.data.root; without them this
config stops with an error naming the directory and files. ``--config=configs/cars.py:tfds``
reads tfds's prepared ``cars196`` instead.

    python -m cka_jax.main --config=configs/cars.py --workdir=runs/cars \
        --config.data.root=/data/stanford_cars
"""

from configs.paper_common import paper_config, paper_source


def get_config(reader=None):
    """The experiment; ``reader`` 'official' (default) or 'tfds' picks the data reader."""
    return paper_config("Stanford Cars, 2 teachers", paper_source("stanford_cars", reader))
