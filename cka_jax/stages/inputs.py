"""The experiment's inputs: its data sources loaded and split into the teachers' tasks, as
the config says (the first stage; every later stage and the report's redraw read it)."""

from __future__ import annotations

from cka_jax.data import DataNotFoundError, load_source, split_classes, union_of_datasets
from cka_jax.data.errors import DatasetsNotFoundError


def prepare_data(cfg):
    """Returns ``(taskset, dataset)`` with union labels laid out in teacher order."""
    if cfg.union:
        return union_of_datasets(load_union(cfg))
    dataset = load_source(cfg.data)
    class_lists = cfg.tasks.get("class_lists") or None
    try:
        return split_classes(
            dataset,
            None if class_lists else cfg.tasks.num_tasks,
            seed=cfg.tasks.seed,
            mode=cfg.tasks.mode,
            class_lists=class_lists,
        )
    except ValueError as err:
        raise ValueError(f"config.tasks does not give valid teacher tasks: {err}") from None


def load_union(cfg) -> list:
    """``config.data`` and each of ``config.union``, loaded; every missing one is named in
    one error, with the override that points at it."""
    sources = [("--config.data", cfg.data)]
    sources += [(f"--config.union[{i}]", c) for i, c in enumerate(cfg.union)]
    datasets, missing = [], []
    for flag, source in sources:
        try:
            datasets.append(load_source(source))
        except DataNotFoundError as err:
            field = next((f for f in ("root", "data_dir", "manual_dir") if f in source), "root")
            missing.append((f"{flag}.{field}=DIR", err))
    if len(missing) == 1:
        raise missing[0][1]
    if missing:
        raise DatasetsNotFoundError(missing)
    return datasets
