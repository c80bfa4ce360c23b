"""One train step on one device, over a 'data' mesh and under pmap gives the same result."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cka_jax import methods
from cka_jax.config import base_config
from cka_jax.models import PeerNetworks, ResNet, init_variables
from cka_jax.models.resnet import BasicBlock
from cka_jax.train.runtime import Runner
from cka_jax.train.step import StepSpec, build_heads, create_train_state

BATCH = 8
SHAPE = (8, 8, 3)
NUM_DATA = 100  # training-set size (MCL-OKD's memory bank rows)
# Plain SGD: Adam's g/|g| would turn float32 rounding of near-zero gradients into lr-sized
# parameter differences, hiding what this test compares. One object, so that equal specs
# built by other tests share this module's compiled steps.
SGD = optax.sgd(0.05)


def loss_config(**overrides):
    """The library's loss defaults, with a sharper KD, a lighter reconstruction guard and a
    small memory bank draw."""
    cfg = base_config().loss
    cfg.update(dict(kd_temperature=2.0, recon_weight=1.0, nce_negatives=16))
    cfg.update(overrides)
    return ml_collections.FrozenConfigDict(cfg)


def noisy_views(keys, images):
    noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(keys)
    return images.astype(jnp.float32) / 255.0 + 0.1 * noise


def tiny_resnet(num_classes, width):
    # Two stages keep compile time low; the step code is the same for any depth.
    return ResNet(
        stage_sizes=(1, 1), block=BasicBlock, num_classes=num_classes, width=width, stem="small"
    )


def build(method_name, **loss_overrides):
    loss_cfg = loss_config(**loss_overrides)
    method = methods.build_method(method_name, loss_cfg)
    teachers = (tiny_resnet(3, width=4), tiny_resnet(2, width=8))
    teacher_vars = [init_variables(t, 10 + i, (1, *SHAPE)) for i, t in enumerate(teachers)]
    student = tiny_resnet(5, width=4)
    if method.peers:
        student = PeerNetworks(student, num_peers=3, embed_dim=8)
    student_vars = init_variables(student, 0, (1, *SHAPE))
    spec = StepSpec(
        student=student,
        teachers=teachers if method.uses_teachers else (),
        heads=build_heads(method, teachers),
        method=method,
        loss_cfg=loss_cfg,
        augment=noisy_views,
        view_shape=SHAPE,
        tx=SGD,
        num_data=NUM_DATA,
    )
    if not method.uses_teachers:
        teacher_vars = []
    state = create_train_state(spec, student_vars, teacher_vars, jax.random.key(1))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (BATCH, *SHAPE), dtype=np.uint8),
        "label": rng.integers(0, 5, (BATCH,)).astype(np.int32),
        "index": rng.permutation(NUM_DATA)[:BATCH].astype(np.int32),
    }
    return spec, state, teacher_vars, batch


def assert_same_update(before, ref, got):
    ref_update = np.asarray(ref) - np.asarray(before)
    got_update = np.asarray(got) - np.asarray(before)
    scale = np.abs(ref_update).max()
    np.testing.assert_allclose(got_update, ref_update, rtol=1e-3, atol=2e-3 * scale + 1e-7)


def run_steps(spec, state, teacher_vars, batch, parallelism, steps=2):
    runner = Runner(spec, parallelism)
    state = runner.put_state(state)
    teacher_vars = runner.put_replicated(teacher_vars)
    states, history = [], []
    for _ in range(steps):
        state, metrics = runner.step(state, teacher_vars, runner.put_batch(batch))
        history.append(jax.device_get(metrics))
        states.append(runner.get_state(state))
    return states, history


@pytest.mark.parametrize(
    "method_name, overrides",
    # cka holds every term but 'ce' (kd, intra, inter, align, recon); mcl_okd the peer terms
    # of MCL-OKD (peer_ce, leader_kl, contrast with its memory bank).
    [
        ("cfl", {}),
        ("cka", {}),
        ("supervised", {}),
        ("mcl_okd", {}),
    ],
)
def test_single_mesh_and_pmap_compute_the_same_step(method_name, overrides):
    assert jax.device_count() == 2, "conftest forces two CPU devices"
    spec, state, teacher_vars, batch = build(method_name, **overrides)
    results = {
        mode: run_steps(spec, state, teacher_vars, batch, mode)
        for mode in ("single", "mesh", "pmap")
    }
    ref_states, ref_metrics = results["single"]
    assert [int(s.step) for s in ref_states] == [1, 2]
    ref_state = ref_states[0]  # parameters after one step; the second step checks losses
    for mode in ("mesh", "pmap"):
        got_states, got_metrics = results[mode]
        got_state = got_states[0]
        for step, (ref, got) in enumerate(zip(ref_metrics, got_metrics, strict=True)):
            assert set(ref) == set(got)
            # Step 1 starts from identical parameters; step 2 inherits step 1's rounding
            # (and carries the updated BatchNorm statistics and optimiser state through).
            rtol = 2e-4 if step == 0 else 1e-3
            for key in ref:
                np.testing.assert_allclose(got[key], ref[key], rtol=rtol, atol=1e-5, err_msg=key)
        # Compare the parameter updates leaf by leaf, relative to each leaf's largest update:
        # the sigma=0.001 MMD kernel amplifies float32 reduction-order rounding, so an
        # absolute bound on single elements would measure rounding, not the step.
        jax.tree.map(
            lambda before, ref, got: assert_same_update(before, ref, got),
            state.params,
            ref_state.params,
            got_state.params,
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
            ref_state.batch_stats,
            got_state.batch_stats,
        )
        # MCL-OKD's memory bank: the same rows updated the same way (both steps).
        for ref_s, got_s in zip(ref_states, got_states, strict=True):
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                ref_s.memory,
                got_s.memory,
            )
    if spec.method.memory_bank:
        changed = np.any(np.asarray(ref_state.memory) != np.asarray(state.memory), axis=(0, 2))
        np.testing.assert_array_equal(np.flatnonzero(changed), np.sort(batch["index"]))
    # The step did something: parameters moved and every loss term is finite.
    moved = jax.tree.map(
        lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
        state.params["student"],
        ref_state.params["student"],
    )
    assert max(jax.tree.leaves(moved)) > 0
    expected_terms = {f"loss/{k}" for k in spec.method.weights}
    assert expected_terms <= set(ref_metrics[0])
    assert all(np.isfinite(v) for v in ref_metrics[0].values())


def test_batch_not_divisible_by_devices_is_a_clear_error():
    spec, *_ = build("kd")
    with pytest.raises(ValueError, match="divisible"):
        Runner(spec, "mesh").check_batch_size(7)
