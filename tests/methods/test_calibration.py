"""Teacher calibrations against float64 references on synthetic teachers with known answers,
and the rule that none of them reads a label."""

import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.methods import calibration
from cka_jax.methods.calibration import CALIBRATIONS, TeacherOutputs


def two_teachers(n=4000, scale=(1.0, 3.0), priors=(0.5, 0.5), seed=0, sizes=(3, 2)):
    """Images of two tasks (3 + 2 classes) with the task drawn from ``priors``; each teacher
    is confident on its own task's images (logit margin 4 for the right class) and diffuse
    on the other's; teacher t's logits are multiplied by ``scale[t]``. Features: a task
    direction plus noise, so clusters of the joint features are task-pure."""
    rng = np.random.default_rng(seed)
    owner = rng.choice(2, size=n, p=priors)
    logits, features = [], []
    for t, k in enumerate(sizes):
        z = rng.normal(size=(n, k))
        mine = owner == t
        cls = rng.integers(0, k, size=n)
        z[np.flatnonzero(mine), cls[mine]] += 4.0
        logits.append(scale[t] * z)
        f = rng.normal(size=(n, 8)) * 0.3
        f[:, t] += np.where(mine, 2.0, -2.0)
        features.append(f)
    return TeacherOutputs(tuple(logits), tuple(features)), owner


def union(name, params, outputs):
    out = CALIBRATIONS[name].apply(
        params,
        [jnp.asarray(z, jnp.float32) for z in outputs.logits],
        [jnp.asarray(f, jnp.float32) for f in outputs.features],
    )
    return np.concatenate([np.asarray(s, np.float64) for s in out], -1)


def routing(scores, owner):
    return float(np.mean((np.argmax(scores, -1) >= 3) == (owner == 1)))


def test_standardize_recovers_the_scale_ratio():
    # Two teachers alike but for the scale of their logits.
    outputs, _ = two_teachers(scale=(1.0, 3.0), sizes=(3, 3))
    params = calibration.fit_standardize(outputs)
    assert params["std"][1] / params["std"][0] == pytest.approx(3.0, rel=0.05)
    # Reference in float64: (z - mean) / std over all of the teacher's logits.
    ref = [(z - z.mean()) / z.std() for z in outputs.logits]
    np.testing.assert_allclose(
        union("standardize", params, outputs), np.concatenate(ref, -1), rtol=1e-5, atol=1e-5
    )


def test_the_fixed_calibrations_match_their_formulas():
    outputs, _ = two_teachers(n=50)
    z = outputs.logits
    log_softmax = [x - x.max(-1, keepdims=True) for x in z]
    log_softmax = [x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in log_softmax]
    np.testing.assert_allclose(
        union("softmax", {}, outputs), np.concatenate(log_softmax, -1), rtol=1e-5, atol=1e-5
    )
    centred = [x - x.mean(-1, keepdims=True) for x in z]
    np.testing.assert_allclose(
        union("mean_subtracted", {}, outputs), np.concatenate(centred, -1), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(
        union("none", {}, outputs), np.concatenate(z, -1).astype(np.float32)
    )


def test_saerens_em_recovers_known_priors():
    rng = np.random.default_rng(1)
    k, n = 4, 20000
    true = np.array([0.5, 0.3, 0.15, 0.05])
    labels = rng.choice(k, size=n, p=true)
    # A calibrated classifier for balanced training priors: Bayes posteriors of 1-D
    # Gaussian classes under uniform priors.
    x = rng.normal(loc=2.0 * labels, scale=1.0)
    log_lik = -0.5 * (x[:, None] - 2.0 * np.arange(k)) ** 2
    post = np.exp(log_lik - log_lik.max(-1, keepdims=True))
    post /= post.sum(-1, keepdims=True)
    priors, _, converged = calibration.saerens_priors(post, np.full(k, 1 / k), iterations=2000)
    assert converged
    empirical = np.bincount(labels, minlength=k) / n
    np.testing.assert_allclose(priors, empirical, atol=0.01)


def test_the_routers_fix_a_teacher_that_shouts():
    # Teacher 2's logits are 3x larger: the raw concatenation routes to it too often.
    outputs, owner = two_teachers(scale=(1.0, 3.0))
    raw = routing(union("none", {}, outputs), owner)
    for name in ("standardize", "energy_em", "cluster_vote"):
        params = CALIBRATIONS[name].fit(outputs)
        assert routing(union(name, params, outputs), owner) > raw + 0.05, name
    params = CALIBRATIONS["cluster_vote"].fit(outputs, clusters_per_class=2)
    assert routing(union("cluster_vote", params, outputs), owner) > 0.99


def test_energy_em_matches_a_float64_mixture_posterior():
    outputs, _ = two_teachers(n=500)
    params = calibration.fit_energy_em(outputs)
    e = calibration.energies(outputs.logits)
    x = (e - np.asarray(params["energy_mean"])) / np.asarray(params["energy_std"])
    log_p = []
    for t in range(2):
        mean = np.asarray(params["means"][t])
        cov = np.linalg.inv(np.asarray(params["precisions"][t]))
        c = x - mean
        quad = np.sum(c * np.linalg.solve(cov, c.T).T, -1)
        log_p.append(
            np.log(params["weights"][t])
            - 0.5 * (quad + np.linalg.slogdet(cov)[1] + 2 * np.log(2 * np.pi))
        )
    log_p = np.stack(log_p, -1)
    log_router = (
        log_p
        - np.log(np.exp(log_p - log_p.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - log_p.max(-1, keepdims=True)
    )
    ref = []
    for t, z in enumerate(outputs.logits):
        ls = z - z.max(-1, keepdims=True)
        ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
        ref.append(log_router[:, t : t + 1] + ls)
    np.testing.assert_allclose(
        union("energy_em", params, outputs), np.concatenate(ref, -1), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("name", sorted(CALIBRATIONS))
def test_a_fit_does_not_depend_on_the_image_order(name):
    # A fit sees the images as a set: reordering them leaves the union scores unchanged.
    outputs, _ = two_teachers(n=600)
    params = CALIBRATIONS[name].fit(outputs)
    perm = np.random.default_rng(3).permutation(600)
    shuffled = TeacherOutputs(
        tuple(z[perm] for z in outputs.logits), tuple(f[perm] for f in outputs.features)
    )
    again = CALIBRATIONS[name].fit(shuffled)
    a, b = union(name, params, outputs), union(name, again, outputs)
    if name in ("cluster_vote", "energy_em"):  # iterative fits: equal up to float order
        assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) > 0.99
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
