"""A seconds-long experiment on 200 embedded MNIST digits, for end-to-end tests."""

from cka_jax.config import base_config, model_config
from cka_jax.data import augment_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.data.train_per_class = 20
    c.data.test_per_class = 8
    c.data.image_size = 16
    c.augment = augment_config("mnist")
    c.augment.out_size = 16
    c.teacher = model_config("resnet10", width=4, stem="small")
    c.student = model_config("resnet10", width=4, stem="small")
    c.teacher_epochs = 2
    c.epochs = 2
    c.batch_size = 20
    c.eval_batch_size = 100
    c.optimizer.learning_rate = 3e-3
    c.teacher_optimizer.learning_rate = 3e-3
    c.methods = ("kd",)
    c.log_every = 5
    c.checkpoint_every = 2
    # Figures cost about a quarter of a tiny run; the runs that test them turn them on.
    c.figures = False
    return c
