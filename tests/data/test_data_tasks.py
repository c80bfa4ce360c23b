"""The task layer: disjoint label spaces, union ids, and their invariants."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cka_jax.data import Dataset, Split, TaskSet, split_classes, task_subset, union_of_datasets


def _dataset(k=10, per_class=3, size=4, channels=1, name="toy", seed=0):
    """Images carry their original label in pixel (0, 0) and a unique id in pixel (0, 1)."""
    rng = np.random.default_rng(seed)

    def split(n_per, offset):
        labels = rng.permutation(np.repeat(np.arange(k), n_per)).astype(np.int32)
        images = np.zeros((len(labels), size, size, channels), np.uint8)
        images[:, 0, 0, :] = labels[:, None]
        images[:, 0, 1, :] = (np.arange(len(labels)) + offset)[:, None] % 256
        return Split(images, labels)

    return Dataset(name, tuple(f"c{i}" for i in range(k)), split(per_class, 0), split(1, 100))


def _check_invariants(ts: TaskSet, k_used: int):
    all_ids = [c for cls in ts.classes for c in cls]
    assert sorted(all_ids) == list(range(ts.num_classes)) == list(range(k_used))  # disjoint, cover
    for t, (cls, sl) in enumerate(zip(ts.classes, ts.slices, strict=True)):
        assert list(cls) == list(range(sl.start, sl.stop))  # contiguous block
        ids = np.asarray(cls)
        np.testing.assert_array_equal(ts.task_of(ids), np.full(len(ids), t))
        np.testing.assert_array_equal(ts.local_id(ids), np.arange(len(ids)))
        np.testing.assert_array_equal(ts.union_id(t, np.arange(len(ids))), ids)
    every = np.arange(ts.num_classes)
    for t in range(ts.num_tasks):  # round trip union -> (task, local) -> union
        sel = ts.task_of(every) == t
        np.testing.assert_array_equal(ts.union_id(t, ts.local_id(every[sel])), every[sel])


def _check_relabel(ds: Dataset, ts: TaskSet, out: Dataset):
    for orig, new in ((ds.train, out.train), (ds.test, out.test)):
        assert len(new) == len(orig)
        t, j = ts.task_of(new.labels), ts.local_id(new.labels)
        source = np.array([ts.source_classes[a][b] for a, b in zip(t, j, strict=True)])
        np.testing.assert_array_equal(source, new.images[:, 0, 0, 0])  # original class
        np.testing.assert_array_equal(  # same images, in the same order
            new.images[:, 0, 1, 0], orig.images[:, 0, 1, 0]
        )
        names = np.asarray(out.class_names)[new.labels]
        np.testing.assert_array_equal(names, np.asarray(ds.class_names)[orig.labels])


def test_shuffle_split_is_disjoint_seeded_and_relabels():
    ds = _dataset(k=10)
    ts, out = split_classes(ds, 3, seed=1)
    assert ts.num_tasks == 3 and ts.sizes == (4, 3, 3) and ts.offsets == (0, 4, 7)
    assert ts.names == ("task0", "task1", "task2")
    _check_invariants(ts, 10)
    _check_relabel(ds, ts, out)
    assert out.num_classes == 10 and out.class_names == ts.class_names
    again, _ = split_classes(ds, 3, seed=1)
    assert again == ts
    other, _ = split_classes(ds, 3, seed=2)
    assert other.source_classes != ts.source_classes
    assert sorted(c for g in other.source_classes for c in g) == list(range(10))


def test_contiguous_split():
    ds = _dataset(k=10)
    ts, out = split_classes(ds, 2, mode="contiguous")
    assert ts.source_classes == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    np.testing.assert_array_equal(out.train.labels, ds.train.labels)  # identity relabel
    _check_invariants(ts, 10)


def test_explicit_class_lists_reorder_and_drop():
    ds = _dataset(k=6)
    ts, out = split_classes(ds, None, class_lists=[[4, 1], [0, 5]])
    assert ts.source_classes == ((4, 1), (0, 5))
    assert ts.class_names == ("c4", "c1", "c0", "c5")
    _check_invariants(ts, 4)
    kept = np.isin(ds.train.labels, [4, 1, 0, 5])
    assert len(out.train) == kept.sum()
    lookup = {4: 0, 1: 1, 0: 2, 5: 3}
    np.testing.assert_array_equal(out.train.labels, [lookup[c] for c in ds.train.labels[kept]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tasks=11), "cannot split the 10 classes"),
        (dict(num_tasks=0), "positive"),
        (dict(num_tasks=2, mode="random"), "mode"),
        (dict(num_tasks=None, class_lists=[[0, 1], [1, 2]]), "disjoint"),
        (dict(num_tasks=None, class_lists=[[0, 1], []]), "empty"),
        (dict(num_tasks=None, class_lists=[[0, 10]]), "outside"),
        (dict(num_tasks=None, class_lists=[[0, 0, 1]]), "repeats"),
        (dict(num_tasks=3, class_lists=[[0], [1]]), "num_tasks=3"),
    ],
)
def test_invalid_split_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_classes(_dataset(k=10), **kwargs)


def test_concatenated_teacher_logits_align_with_union_ids():
    ts, out = split_classes(_dataset(k=9), 3, seed=4)
    labels = out.test.labels
    # Teacher t votes for the local id of the image's class when it owns it, else nothing.
    logits = []
    for t in range(ts.num_tasks):
        mine = ts.task_of(labels) == t
        z = np.full((len(labels), ts.sizes[t]), -1.0)
        z[np.flatnonzero(mine), ts.local_id(labels[mine])] = 1.0
        logits.append(z)
    np.testing.assert_array_equal(np.concatenate(logits, axis=1).argmax(1), labels)


def test_task_subset_gives_local_labels():
    ds = _dataset(k=10)
    ts, out = split_classes(ds, 4, seed=0)
    total = 0
    for t in range(ts.num_tasks):
        sub = task_subset(out.train, ts, t)
        total += len(sub)
        assert sub.labels.min() >= 0 and sub.labels.max() < ts.sizes[t]
        source = np.asarray(ts.source_classes[t])[sub.labels]
        np.testing.assert_array_equal(source, sub.images[:, 0, 0, 0])
    assert total == len(out.train)
    with pytest.raises(ValueError):
        task_subset(out.train, ts, 4)


def test_union_of_datasets_offsets_labels_and_tiles_gray():
    a = _dataset(k=3, channels=1, name="digits")
    b = _dataset(k=4, channels=3, name="cars", seed=1)
    ts, u = union_of_datasets([a, b])
    assert ts.names == ("digits", "cars") and ts.offsets == (0, 3) and ts.num_classes == 7
    assert u.class_names == a.class_names + b.class_names
    assert u.train.images.shape[-1] == 3 and len(u.train) == len(a.train) + len(b.train)
    np.testing.assert_array_equal(u.train.labels[: len(a.train)], a.train.labels)
    np.testing.assert_array_equal(u.train.labels[len(a.train) :], b.train.labels + 3)
    np.testing.assert_array_equal(u.train.images[: len(a.train), ..., 2], a.train.images[..., 0])
    _check_invariants(ts, 7)
    sub = task_subset(u.test, ts, 1)
    np.testing.assert_array_equal(sub.labels, b.test.labels)


def test_union_errors():
    a = _dataset(k=3, name="a")
    with pytest.raises(ValueError, match="same image_size"):
        union_of_datasets([a, _dataset(k=3, size=8, name="b")])
    with pytest.raises(ValueError, match="unique"):
        union_of_datasets([a, _dataset(k=2, name="a")])
    with pytest.raises(ValueError):
        union_of_datasets([])


def test_taskset_validation_and_json_round_trip():
    ts, _ = split_classes(_dataset(k=5), 2, seed=0)
    assert TaskSet.from_dict(json.loads(json.dumps(ts.to_dict()))) == ts
    with pytest.raises(ValueError, match="contiguous"):
        TaskSet(("a", "b"), ((0, 2), (1,)), ("x", "y", "z"), 3)
    with pytest.raises(ValueError, match="no classes"):
        TaskSet(("a", "b"), ((0, 1), ()), ("x", "y"), 2)
    with pytest.raises(ValueError, match="union ids"):
        ts.task_of([5])
    with pytest.raises(ValueError, match="local ids"):
        ts.union_id(0, [3])


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 30), data=st.data())
def test_split_invariants_hold_for_any_size(k, data):
    n = data.draw(st.integers(1, k))
    mode = data.draw(st.sampled_from(["shuffle", "contiguous"]))
    ds = _dataset(k=k, per_class=1)
    ts, out = split_classes(ds, n, seed=data.draw(st.integers(0, 5)), mode=mode)
    _check_invariants(ts, k)
    _check_relabel(ds, ts, out)
    assert max(ts.sizes) - min(ts.sizes) <= 1  # near-equal parts


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 20), data=st.data())
def test_any_disjoint_class_lists_give_valid_tasks(k, data):
    """Any partition of any subset of the classes (in any order) into non-empty lists."""
    chosen = data.draw(st.permutations(range(k)).map(lambda p: p[: data.draw(st.integers(1, k))]))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(chosen) - 1))) if len(chosen) > 1 else [])
    lists = [list(chosen[a:b]) for a, b in zip([0, *cuts], [*cuts, len(chosen)], strict=True)]
    ds = _dataset(k=k, per_class=1)
    ts, out = split_classes(ds, None, class_lists=lists)
    _check_invariants(ts, len(chosen))
    kept = Dataset(  # the input restricted to the chosen classes, original labels
        ds.name,
        ds.class_names,
        *(sp.take(np.flatnonzero(np.isin(sp.labels, chosen))) for sp in (ds.train, ds.test)),
    )
    _check_relabel(kept, ts, out)
    assert [list(g) for g in ts.source_classes] == lists
    assert TaskSet.from_dict(json.loads(json.dumps(ts.to_dict()))) == ts
