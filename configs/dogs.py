"""Stanford Dogs split into two class-disjoint teacher tasks (the CKA paper's Table 2 setting).

The data must be prepared by tfds once (see docs/data.md for the files to place in
manual_dir); without it this config stops with an error naming the directory and files.

    python -m cka_jax.main --config=configs/dogs.py --workdir=runs/dogs
"""

from configs.paper_common import paper_config, tfds_source


def get_config():
    return paper_config("Stanford Dogs, 2 teachers", tfds_source("stanford_dogs"))
