"""Stanford Dogs split into two class-disjoint teacher tasks (the CKA paper's Table 2 setting).

Reads the official files (Images/ and lists/{train,test}_list.mat; see docs/data.md) from
~/data/stanford_dogs, or from --config.data.root; without them this config stops with an
error naming the directory and files. ``--config=configs/dogs.py:tfds`` reads tfds's
prepared ``stanford_dogs`` instead.

    python -m cka_jax.main --config=configs/dogs.py --workdir=runs/dogs \
        --config.data.root=/data/stanford_dogs
"""

from configs.paper_common import paper_config, paper_source


def get_config(reader=None):
    """The experiment; ``reader`` 'official' (default) or 'tfds' picks the data reader."""
    return paper_config("Stanford Dogs, 2 teachers", paper_source("stanford_dogs", reader))
