"""Building models from the config's model fields: fresh, or from a checkpoint; their
parameter counts and the description (``model.json``) saved beside their weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax.data.presets import eval_kwargs
from cka_jax.models.resnet import create_model, init_variables


def init_variables_of(model, seed: int, view_shape) -> dict:
    """``{'params', 'batch_stats'}`` of a fresh ``model`` for inputs of ``view_shape``."""
    variables = init_variables(model, seed, (1, *view_shape))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def init_model(m, num_classes: int, seed: int, view_shape, what: str, dtype=jnp.float32):
    """``(model, variables)`` for the model config ``m`` (arch, width, stem, checkpoint): a
    fresh model, or one starting from ``m.checkpoint`` (a new classifier when the
    checkpoint's class count differs, e.g. an ImageNet backbone)."""
    from cka_jax.models import storage  # storage builds models: imported here, not at the top

    model = create_model(m.arch, num_classes, stem=m.stem, width=m.width, dtype=dtype)
    variables = init_variables_of(model, seed, view_shape)
    if m.checkpoint:
        _, loaded, meta = storage.load_model(m.checkpoint)
        if meta["arch"] != m.arch:
            raise storage.CheckpointError(
                f"{what} checkpoint {m.checkpoint} is a {meta['arch']}, but the config asks "
                f"for a {m.arch}: set the {what}'s arch to {meta['arch']!r}"
            )
        fresh_fc = variables["params"]["fc"]
        variables = jax.tree.map(np.asarray, dict(loaded))
        variables["params"] = dict(variables["params"])
        if meta["num_classes"] != num_classes:
            variables["params"]["fc"] = fresh_fc
    return model, variables


def param_count(variables) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def model_meta(m, num_classes, aug_cfg, class_names, **extra) -> dict:
    """What ``model.json`` records of a model: architecture, classes and their names, and
    the preprocessing its inputs need (size, channels, mean, std)."""
    return {
        "arch": m.arch,
        "num_classes": int(num_classes),
        "width": int(m.width),
        "stem": m.stem,
        "channels": int(aug_cfg.channels),
        "image_size": int(aug_cfg.out_size),
        "class_names": list(class_names),
        "preprocess": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in eval_kwargs(aug_cfg).items()
        },
        **extra,
    }
