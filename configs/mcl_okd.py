"""MCL-OKD on the embedded MNIST digits: 4 peer networks trained with labels, the leader kept.

    python -m cka_jax.main --config=configs/mcl_okd.py --workdir=runs/mcl_okd

The default's networks (resnet10 of width 16, 28 px digits) trained on 50 labelled digits
per class and scored on 400 per class, as the study's `okd` experiment at the default's
scale: the network trained alone, DML and MCL-OKD (each peer method reports its leader and
the ensemble of its peers). No teachers: none of these methods uses one.
"""

from configs.default import get_config as default_config


def get_config():
    c = default_config()
    c.name = "MCL-OKD on embedded MNIST (50 labelled digits per class)"
    c.data.train_per_class = 50
    c.data.test_per_class = 400
    c.epochs = 40  # 7 steps per epoch
    c.eval_every = 10
    c.methods = ("supervised", "dml", "mcl_okd")
    return c
