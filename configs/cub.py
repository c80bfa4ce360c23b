"""CUB-200-2011 split into two class-disjoint teacher tasks (the CKA paper's Table 2 setting).

Reads the extracted official CUB_200_2011.tgz (see docs/data.md) from ~/data/CUB_200_2011,
or from --config.data.root; without it this config stops with an error naming the directory
and files. ``--config=configs/cub.py:tfds`` reads tfds's prepared ``caltech_birds2011``
instead.

    python -m cka_jax.main --config=configs/cub.py --workdir=runs/cub \
        --config.data.root=/data/CUB_200_2011
"""

from configs.paper_common import paper_config, paper_source


def get_config(reader=None):
    """The experiment; ``reader`` 'official' (default) or 'tfds' picks the data reader."""
    return paper_config("CUB-200-2011, 2 teachers", paper_source("cub200", reader))
