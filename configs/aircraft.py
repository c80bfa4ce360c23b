"""FGVC-Aircraft (variant level, 100 classes) split into two class-disjoint teacher tasks.

Point `data.root` at the unpacked official fgvc-aircraft-2013b archive (see docs/data.md).

    python -m cka_jax.main --config=configs/aircraft.py --workdir=runs/aircraft \
        --config.data.root=/data/fgvc-aircraft-2013b
"""

from configs.paper_common import aircraft_source, paper_config


def get_config():
    return paper_config("FGVC-Aircraft, 2 teachers", aircraft_source())
