"""Scoring sharded over devices and processes gives the same logits and accuracies as one
device: each device scores its share of every batch, the padding of the last batch (here
all of one device's share) is dropped, and every process gets every logit."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from cka_jax.data import eval_batches
from tests.eval_process import NUM_IMAGES, fixture, score
from tests.processes import collect, joined_env, start_joined


@pytest.fixture(scope="module")
def one_device():
    return score(10, devices=jax.devices()[:1])


def assert_same_scores(got, reference):
    logits, acc = got
    assert logits.shape == reference[0].shape == (NUM_IMAGES, 5)
    np.testing.assert_allclose(logits, reference[0], rtol=1e-5, atol=1e-5)
    assert acc == reference[1]


@pytest.mark.parametrize("batch_size", [10, 9])  # 9 is rounded up to 10 for two devices
def test_two_devices_score_like_one(one_device, batch_size):
    assert jax.device_count() == 2  # conftest forces two CPU devices
    assert_same_scores(score(batch_size), one_device)


def test_one_device_scores_every_image_in_any_batch_size(one_device):
    assert_same_scores(score(NUM_IMAGES + 7, devices=jax.devices()[:1]), one_device)
    assert_same_scores(score(1, devices=jax.devices()[:1]), one_device)  # image by image


def test_rows_of_eval_batches_partition_every_batch():
    _, _, split = fixture()
    whole = list(eval_batches(split, 10))
    halves = [list(eval_batches(split, 10, rows)) for rows in (slice(0, 5), slice(5, 10))]
    for full, a, b in zip(whole, *halves, strict=True):
        for key in full:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), full[key])
    # The last batch: 3 real images, all in the first half.
    assert halves[0][-1]["mask"].tolist() == [1, 1, 1, 0, 0]
    assert halves[1][-1]["mask"].sum() == 0 and halves[1][-1]["image"].shape == (5, 16, 16, 1)


@pytest.mark.slow
def test_two_processes_score_like_one_device(one_device, tmp_path):
    """Two processes with one CPU device each, joined over localhost: each reads and scores
    its half of every batch; process 0 ends with every logit."""
    out = tmp_path / "scores.npz"
    command = [sys.executable, "-m", "tests.eval_process", str(out), "10"]
    procs = start_joined(command, joined_env(os.environ))
    logs = collect(procs, timeout=300)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    saved = np.load(out)
    assert_same_scores((saved["logits"], json.loads(str(saved["acc"]))), one_device)
    # Process 1 computed the same accuracies from the gathered logits.
    assert f"process 1 of 2: {saved['acc']}" in logs[1]
