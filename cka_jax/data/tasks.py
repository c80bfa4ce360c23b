"""Tasks: the class-disjoint label spaces of the teachers, and the union label space.

Union label ids are laid out task by task: task ``t`` owns the contiguous block
``[offsets[t], offsets[t] + sizes[t])`` and local id ``j`` of task ``t`` is union id
``offsets[t] + j``. Concatenating the teachers' logits in ``TaskSet.names`` order therefore
gives logits indexed by union id, with no permutation anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .base import Dataset, Split


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """Which union classes each teacher covers.

    Attributes:
      names: one per teacher, in the teachers' logit concatenation order.
      classes: per task, the union label ids it covers, in local-id order (contiguous).
      class_names: union class names, index = union id.
      num_classes: size of the union label space.
      source_classes: per task, the class ids in the source dataset(s) its local ids come
        from (for reports; ``split_classes`` relabels ``source_classes[t][j]`` -> union id
        ``offsets[t] + j``).
    """

    names: tuple[str, ...]
    classes: tuple[tuple[int, ...], ...]
    class_names: tuple[str, ...]
    num_classes: int
    source_classes: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "classes", tuple(tuple(int(c) for c in t) for t in self.classes))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(
            self, "source_classes", tuple(tuple(int(c) for c in t) for t in self.source_classes)
        )
        if len(self.names) != len(self.classes) or not self.names:
            raise ValueError(
                f"need one name per task: {len(self.names)} names, {len(self.classes)} class lists"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"task names must be unique, got {self.names}")
        start = 0
        for name, cls in zip(self.names, self.classes, strict=True):
            if not cls:
                raise ValueError(f"task {name!r} has no classes")
            if cls != tuple(range(start, start + len(cls))):
                raise ValueError(
                    f"task {name!r}: union ids must be the contiguous block "
                    f"{start}..{start + len(cls) - 1}, got {cls}"
                )
            start += len(cls)
        if start != self.num_classes or len(self.class_names) != self.num_classes:
            raise ValueError(
                f"tasks cover {start} classes, num_classes={self.num_classes}, "
                f"{len(self.class_names)} class names"
            )
        if self.source_classes and [len(s) for s in self.source_classes] != list(self.sizes):
            raise ValueError("source_classes must have one entry per class of each task")
        task = np.repeat(np.arange(len(self.classes)), self.sizes)
        object.__setattr__(self, "_task", task)
        object.__setattr__(
            self, "_local", np.arange(self.num_classes) - np.asarray(self.offsets)[task]
        )

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.classes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0,) + self.sizes[:-1]))

    @property
    def slices(self) -> tuple[slice, ...]:
        """``logits[..., slices[t]]`` are task t's classes."""
        return tuple(slice(o, o + n) for o, n in zip(self.offsets, self.sizes, strict=True))

    def _check(self, union_ids) -> np.ndarray:
        ids = np.asarray(union_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
            raise ValueError(f"union ids must lie in [0, {self.num_classes})")
        return ids

    def task_of(self, union_ids) -> np.ndarray:
        """Vectorised: union id -> index of the task that covers it."""
        return self._task[self._check(union_ids)]

    def local_id(self, union_ids) -> np.ndarray:
        """Vectorised: union id -> id within its task."""
        return self._local[self._check(union_ids)]

    def union_id(self, task: int, local_ids) -> np.ndarray:
        """Vectorised: (task, local id) -> union id."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must lie in [0, {self.num_tasks}), got {task}")
        local = np.asarray(local_ids)
        if local.size and (local.min() < 0 or local.max() >= self.sizes[task]):
            raise ValueError(f"local ids of task {task} must lie in [0, {self.sizes[task]})")
        return self.offsets[task] + local

    def to_dict(self) -> dict:
        """JSON-serialisable form (``TaskSet.from_dict`` reads it back)."""
        return {
            "names": list(self.names),
            "classes": [list(c) for c in self.classes],
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "source_classes": [list(c) for c in self.source_classes],
        }

    @classmethod
    def from_dict(cls, d: dict) -> TaskSet:
        return cls(
            names=tuple(d["names"]),
            classes=tuple(tuple(c) for c in d["classes"]),
            class_names=tuple(d["class_names"]),
            num_classes=int(d["num_classes"]),
            source_classes=tuple(tuple(c) for c in d.get("source_classes", ())),
        )


def _from_groups(names, groups, group_class_names, source_classes) -> TaskSet:
    offsets = np.cumsum([0] + [len(g) for g in groups])
    return TaskSet(
        names=tuple(names),
        classes=tuple(tuple(range(offsets[t], offsets[t + 1])) for t in range(len(groups))),
        class_names=tuple(n for g in group_class_names for n in g),
        num_classes=int(offsets[-1]),
        source_classes=tuple(tuple(int(c) for c in s) for s in source_classes),
    )


def _relabel(split: Split, mapping: np.ndarray) -> Split:
    """Maps labels through ``mapping`` (-1 = drop the image)."""
    new = mapping[split.labels]
    keep = new >= 0
    if keep.all():
        return Split(split.images, new.astype(np.int64))
    return Split(np.asarray(split.images[keep]), new[keep].astype(np.int64))


def split_classes(
    dataset: Dataset,
    num_tasks: int | None,
    *,
    seed: int = 0,
    mode: str = "shuffle",
    class_lists: Sequence[Sequence[int]] | None = None,
) -> tuple[TaskSet, Dataset]:
    """Splits one dataset's classes into ``num_tasks`` disjoint tasks.

    Modes: ``'shuffle'`` - a seeded permutation of the class ids cut into near-equal parts
    (each part sorted); ``'contiguous'`` - class ids 0..K-1 cut in order. ``class_lists``
    gives the parts explicitly (``num_tasks`` may then be None); classes in no list are
    dropped from the returned dataset.

    Returns the TaskSet and the dataset relabelled to union ids (task t's classes are the
    contiguous block ``taskset.slices[t]``).
    """
    k = dataset.num_classes
    if class_lists is not None:
        groups = [[int(c) for c in g] for g in class_lists]
        if num_tasks is not None and num_tasks != len(groups):
            raise ValueError(f"num_tasks={num_tasks} but {len(groups)} class lists were given")
        for t, g in enumerate(groups):
            if not g:
                raise ValueError(f"class list {t} is empty: every task needs a class")
            bad = [c for c in g if not 0 <= c < k]
            if bad:
                raise ValueError(f"class list {t} has ids {bad} outside [0, {k}) of {dataset.name}")
            if len(set(g)) != len(g):
                raise ValueError(f"class list {t} repeats a class: {g}")
        seen: dict[int, int] = {}
        for t, g in enumerate(groups):
            for c in g:
                if c in seen:
                    raise ValueError(
                        f"class {c} ({dataset.class_names[c]!r}) is in both "
                        f"class list {seen[c]} and {t}: tasks must be disjoint"
                    )
                seen[c] = t
    else:
        if num_tasks is None or int(num_tasks) < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks}")
        if num_tasks > k:
            raise ValueError(
                f"cannot split the {k} classes of {dataset.name} into {num_tasks} non-empty tasks"
            )
        if mode == "shuffle":
            order = np.random.default_rng(seed).permutation(k)
            groups = [sorted(int(c) for c in g) for g in np.array_split(order, num_tasks)]
        elif mode == "contiguous":
            groups = [g.tolist() for g in np.array_split(np.arange(k), num_tasks)]
        else:
            raise ValueError(f"mode must be 'shuffle' or 'contiguous', got {mode!r}")
    source = [c for g in groups for c in g]
    mapping = np.full(k, -1, np.int64)
    mapping[source] = np.arange(len(source))
    taskset = _from_groups(
        [f"task{t}" for t in range(len(groups))],
        groups,
        [[dataset.class_names[c] for c in g] for g in groups],
        groups,
    )
    relabelled = Dataset(
        name=dataset.name,
        class_names=taskset.class_names,
        train=_relabel(dataset.train, mapping),
        test=_relabel(dataset.test, mapping),
    )
    return taskset, relabelled


def _to_channels(split: Split, channels: int) -> Split:
    if split.images.shape[-1] == channels:
        return split
    return Split(np.repeat(np.asarray(split.images), channels, axis=-1), split.labels)


def union_of_datasets(datasets: Sequence[Dataset]) -> tuple[TaskSet, Dataset]:
    """Each dataset becomes one task (named after it); labels are offset into the union.

    The datasets must share the image height and width (decode them at the same
    ``image_size``); grayscale ones are tiled to RGB when any dataset is RGB.
    """
    datasets = list(datasets)
    if not datasets:
        raise ValueError("union_of_datasets needs at least one dataset")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique to name the tasks, got {names}")
    sizes = {d.name: d.image_shape[:2] for d in datasets}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"images differ in size across datasets {sizes}: load every source "
            "with the same image_size"
        )
    for d in datasets:
        if d.num_classes == 0:
            raise ValueError(f"dataset {d.name!r} has no classes")
    channels = max(d.image_shape[-1] for d in datasets)
    groups = [list(range(d.num_classes)) for d in datasets]
    taskset = _from_groups(names, groups, [d.class_names for d in datasets], groups)

    def merged(attr: str) -> Split:
        parts = [_to_channels(getattr(d, attr), channels) for d in datasets]
        return Split(
            np.concatenate([np.asarray(p.images) for p in parts]),
            np.concatenate(
                [
                    p.labels.astype(np.int64) + off
                    for p, off in zip(parts, taskset.offsets, strict=True)
                ]
            ),
        )

    union = Dataset(
        name="+".join(names),
        class_names=taskset.class_names,
        train=merged("train"),
        test=merged("test"),
    )
    return taskset, union


def task_subset(split: Split, taskset: TaskSet, task: int) -> Split:
    """The images of ``split`` (labelled with union ids) that belong to ``task``, with
    LOCAL labels 0..sizes[task]-1: what teacher ``task`` is trained and scored on."""
    if not 0 <= task < taskset.num_tasks:
        raise ValueError(f"task must lie in [0, {taskset.num_tasks}), got {task}")
    keep = np.flatnonzero(taskset.task_of(split.labels) == task)
    return Split(
        np.asarray(split.images[keep]), taskset.local_id(split.labels[keep]).astype(np.int64)
    )
