"""One scoring of a fixed small model on a fixed split with 33 images, as a process of its
own: ``python -m tests.eval_process OUT.npz [BATCH_SIZE]``. Joins the other processes when
``JAX_COORDINATOR_ADDRESS`` is set; process 0 writes the logits and accuracies to OUT.npz.
Shared by the sharded-evaluation tests (in process and across processes)."""

import sys

import numpy as np

from cka_jax.config import model_config
from cka_jax.data import Split, TaskSet, augment_config

# Two tasks: union classes 0-2 and 3-4.
TASKS = TaskSet(names=("a", "b"), classes=((0, 1, 2), (3, 4)), class_names="vwxyz", num_classes=5)
NUM_IMAGES = 33  # a batch of 10 leaves 3 real rows in the last batch: one device's share is padding


def aug_config():
    aug = augment_config("mnist")
    aug.out_size = 16
    return aug


def fixture():
    """``(model, variables, split)``: a resnet10 with perturbed weights and statistics (no
    near-ties between logits) and 33 random 16 px images."""
    import jax

    from cka_jax.models.build import init_model
    from cka_jax.train.spec import view_shape

    m = model_config("resnet10", width=4, stem="small")
    model, variables = init_model(m, TASKS.num_classes, 0, view_shape(aug_config()), "test")
    rng = np.random.default_rng(1)
    variables = jax.tree.map(
        lambda a: np.asarray(a) * rng.uniform(0.5, 1.5, np.shape(a)).astype(np.float32),
        variables,
    )
    images = rng.integers(0, 256, (NUM_IMAGES, 16, 16, 1), dtype=np.uint8)
    labels = rng.integers(0, TASKS.num_classes, NUM_IMAGES)
    return model, variables, Split(images, labels)


def score(batch_size: int, devices=None) -> tuple[np.ndarray, dict]:
    """``(logits, accuracies)`` of the fixture scored in batches of ``batch_size``."""
    from cka_jax.evaluation import evaluate

    model, variables, split = fixture()
    scorer = evaluate.Scorer(model, aug_config(), batch_size, devices=devices)
    logits = scorer.logits(variables, split)
    return logits, evaluate.accuracies(logits, split.labels, TASKS)


def main(out: str, batch_size: int) -> None:
    import json

    import jax

    from cka_jax.config import distributed_config
    from cka_jax.infra import distributed

    distributed.initialize(distributed_config())
    logits, acc = score(batch_size)
    print(f"process {jax.process_index()} of {jax.process_count()}: {json.dumps(acc)}")
    if distributed.is_primary():
        np.savez(out, logits=logits, acc=json.dumps(acc))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
