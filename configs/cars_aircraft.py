"""The CKA paper's Table 5: a teacher trained on Stanford Cars (196 classes) and one on
FGVC-Aircraft (100 variants), amalgamated into a resnet-34 student over all 296 classes.

    python -m cka_jax.main --config=configs/cars_aircraft.py --workdir=runs/cars_aircraft \
        --config.union.0.root=/data/fgvc-aircraft-2013b

Teachers trained elsewhere (e.g. ported from PyTorch with scripts/port_torch_resnet.py) are
named per task: --config.teachers="({'checkpoint': 'cars_teacher'}, {'checkpoint': 'air'})".
"""

from configs.paper_common import aircraft_source, paper_config, tfds_source


def get_config():
    c = paper_config("Stanford Cars + FGVC-Aircraft", tfds_source("cars196"))
    # Each dataset of the union is one task; `data` is the first, `union` the others.
    c.union = (aircraft_source(),)
    c.student.arch = "resnet34"
    return c
