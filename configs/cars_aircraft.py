"""The CKA paper's Table 5: a teacher trained on Stanford Cars (196 classes) and one on
FGVC-Aircraft (100 variants), amalgamated into a resnet-34 student over all 296 classes.

Both datasets are read from their official files (docs/data.md), by default from
~/data/stanford_cars and ~/data/fgvc-aircraft-2013b:

    python -m cka_jax.main --config=configs/cars_aircraft.py --workdir=runs/cars_aircraft \
        --config.data.root=/data/stanford_cars "--config.union[0].root=/data/fgvc-aircraft-2013b"

``--config=configs/cars_aircraft.py:tfds`` reads tfds's prepared ``cars196`` instead.
Teachers trained elsewhere (e.g. ported from PyTorch with scripts/port_torch_resnet.py) are
named per task: --config.teachers="({'checkpoint': 'cars_teacher'}, {'checkpoint': 'air'})".
"""

from configs.paper_common import aircraft_source, paper_config, paper_source


def get_config(reader=None):
    """The experiment; ``reader`` 'official' (default) or 'tfds' picks the Cars reader."""
    c = paper_config("Stanford Cars + FGVC-Aircraft", paper_source("stanford_cars", reader))
    # Each dataset of the union is one task; `data` is the first, `union` the others.
    c.union = (aircraft_source(),)
    c.student.arch = "resnet34"
    return c
