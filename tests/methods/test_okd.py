"""MCL-OKD's NCE contrast and memory bank against NumPy written from the paper's Eqs. 6, 9-11
and the momentum update of Wu et al. (loops over samples, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax import methods
from cka_jax.config import base_config
from cka_jax.methods import okd, terms


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_nce(anchors, memory, pos, neg, tau, n):
    """Eq. 11 for each anchor i with its positive pos[i] and negatives neg[i, :]."""
    a, mem = unit(np.float64(anchors)), unit(np.float64(memory))
    s = neg.shape[1]
    total = 0.0
    for i in range(len(a)):
        js = [pos[i], *neg[i]]
        h = [np.exp(a[i] @ mem[j] / tau) for j in js]  # Eq. 6
        z = n / (1 + s) * sum(h)  # Eq. 9, Z_i estimated from the 1 + S samples
        p = [(hj / z) / (hj / z + s / n) for hj in h]  # Eq. 10
        total += np.log(p[0] + 1e-7) + sum(np.log(1 - pk + 1e-7) for pk in p[1:])
    return -total / len(a)


@pytest.mark.parametrize("tau, s", [(0.1, 5), (0.07, 16), (1.0, 1)])
def test_nce_contrast_matches_eqs_9_to_11(tau, s):
    rng = np.random.default_rng(0)
    n, b, d = 50, 6, 8
    anchors = rng.normal(size=(b, d)).astype(np.float32)
    memory = rng.normal(size=(n, d)).astype(np.float32)
    pos = rng.permutation(n)[:b]
    neg = rng.integers(0, n, (b, s))
    got = okd.nce_contrast(anchors, memory, pos, neg, temperature=tau, num_data=n)
    want = reference_nce(anchors, memory, pos, neg, tau, n)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_nce_contrast_with_negatives_shared_by_the_batch_is_eq_11_for_each_anchor():
    rng = np.random.default_rng(4)
    n, b, s, d = 60, 5, 9, 8
    anchors = rng.normal(size=(b, d)).astype(np.float32)
    memory = rng.normal(size=(n, d)).astype(np.float32)
    pos = rng.permutation(n)[:b]
    shared = rng.integers(0, n, (s,))
    got = okd.nce_contrast(anchors, memory, pos, shared, temperature=0.1, num_data=n)
    want = reference_nce(anchors, memory, pos, np.tile(shared, (b, 1)), 0.1, n)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_mutual_kl_is_dml_from_each_peer_to_every_other():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 6, 4)).astype(np.float32)
    p = np.exp(np.float64(logits)) / np.exp(np.float64(logits)).sum(-1, keepdims=True)
    want = sum(
        np.mean(np.sum(p[j] * (np.log(p[j]) - np.log(p[i])), -1)) / 2
        for i in range(3)
        for j in range(3)
        if i != j
    )
    np.testing.assert_allclose(float(okd.mutual_kl(logits)), want, rtol=1e-5)
    # Each peer learns from the others' predictions as fixed targets.
    grad = jax.grad(lambda z: okd.mutual_kl(z))(jnp.asarray(logits))

    def kl_to_fixed_targets(z, targets):
        return sum(okd.losses.soft_target_kl(z, t, temperature=1.0) for t in targets) / 2

    for i in range(3):
        targets = np.delete(logits, i, axis=0)
        own = jax.grad(kl_to_fixed_targets)(jnp.asarray(logits[i]), targets)
        np.testing.assert_allclose(grad[i], own, rtol=1e-5, atol=1e-7)


def test_nce_contrast_is_lower_for_anchors_on_their_positives():
    rng = np.random.default_rng(1)
    n, b, s = 200, 8, 32
    memory = unit(rng.normal(size=(n, 16))).astype(np.float32)
    pos = np.arange(b)
    neg = rng.integers(b, n, (b, s))
    kwargs = dict(temperature=0.1, num_data=n)
    aligned = okd.nce_contrast(memory[pos], memory, pos, neg, **kwargs)
    unrelated = okd.nce_contrast(memory[pos + 100], memory, pos, neg, **kwargs)
    assert float(aligned) < float(unrelated)


def test_multi_view_contrast_is_the_full_graph_in_both_directions():
    rng = np.random.default_rng(2)
    m, n, b, s, d = 3, 40, 5, 7, 6
    emb = rng.normal(size=(m, b, d)).astype(np.float32)
    memory = rng.normal(size=(m, n, d)).astype(np.float32)
    idx = rng.permutation(n)[:b]
    neg = rng.integers(0, n, (m, m, b, s))
    got = okd.multi_view_contrast(emb, memory, idx, neg, temperature=0.1, num_data=n)
    want = sum(
        reference_nce(emb[a], memory[c], idx, neg[a, c], 0.1, n)
        for a in range(m)
        for c in range(m)
        if a != c
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_memory_bank_update_is_the_normalised_momentum_mix_of_the_batch_rows():
    rng = np.random.default_rng(3)
    m, n, b, d = 2, 30, 4, 5
    memory = unit(rng.normal(size=(m, n, d))).astype(np.float32)
    emb = rng.normal(size=(m, b, d)).astype(np.float32)
    idx = np.array([7, 0, 29, 12])
    got = np.asarray(okd.update_memory_bank(memory, idx, emb, momentum=0.5))
    want = np.float64(memory).copy()
    for v in range(m):
        for k, i in enumerate(idx):
            mixed = 0.5 * want[v, i] + 0.5 * unit(np.float64(emb[v, k]))
            want[v, i] = mixed / np.linalg.norm(mixed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(n), idx)
    np.testing.assert_array_equal(got[:, untouched], memory[:, untouched])
    # The bank is state, not a path for gradients into the embeddings.
    grad = jax.grad(lambda e: jnp.sum(okd.update_memory_bank(memory, idx, e, momentum=0.5)))
    np.testing.assert_array_equal(grad(jnp.asarray(emb)), 0.0)


def test_negatives_are_uniform_indices_of_the_training_set():
    neg = np.asarray(okd.sample_negatives(jax.random.key(0), (64, 256), 10))
    assert neg.shape == (64, 256) and neg.min() == 0 and neg.max() == 9
    counts = np.bincount(neg.ravel(), minlength=10) / neg.size
    np.testing.assert_allclose(counts, 0.1, atol=0.01)
    bank = np.asarray(okd.init_memory_bank(jax.random.key(1), 4, 100, 128))
    assert bank.shape == (4, 100, 128)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=-1), 1.0, rtol=1e-5)


def reference_objective(logits, labels, emb, memory, idx, neg, t, beta, tau, n):
    """Eq. 12 from Eqs. 1-5 (float64) and the reference NCE above."""
    logits = np.float64(logits)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = sum(-np.mean(log_softmax(lg)[np.arange(len(labels)), labels]) for lg in logits)
    log_e = log_softmax(logits.mean(0) / t)  # Eq. 4: softmax of the mean logits
    log_l = log_softmax(logits[-1] / t)  # Eq. 3: the leader, the last peer
    kl = np.mean(np.sum(np.exp(log_e) * (log_e - log_l), -1))  # Eq. 5
    m = len(logits)
    contrast = sum(
        reference_nce(emb[a], memory[c], idx, neg[a, c], tau, n)
        for a in range(m)
        for c in range(m)
        if a != c
    )
    return ce + t**2 * kl + beta * contrast


def mcl_okd_loss(logits, labels, emb, memory, idx, neg):
    """The `mcl_okd` method's row of terms, summed as the train step sums it."""
    cfg = base_config().loss
    cfg.update(okd_temperature=3.0, contrast_weight=0.025, nce_temperature=0.1)
    outputs = dict(
        logits=logits[-1],
        peer_logits=logits,
        labels=labels,
        embeddings=emb,
        memory=memory,
        index=idx,
        negative_index=neg,
    )
    return terms.total_loss(methods.build_method("mcl_okd", cfg), outputs, cfg)


def test_mcl_okd_method_is_eq_12_and_only_the_leader_learns_from_the_ensemble():
    rng = np.random.default_rng(4)
    m, n, b, c, s, d = 4, 60, 6, 5, 9, 8
    logits = rng.normal(size=(m, b, c)).astype(np.float32) * 2
    labels = rng.integers(0, c, b)
    emb = rng.normal(size=(m, b, d)).astype(np.float32)
    memory = rng.normal(size=(m, n, d)).astype(np.float32)
    idx = rng.permutation(n)[:b]
    neg = rng.integers(0, n, (m, m, b, s))
    total, values = mcl_okd_loss(logits, labels, emb, memory, idx, neg)
    want = reference_objective(logits, labels, emb, memory, idx, neg, 3.0, 0.025, 0.1, n)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert set(values) == {"peer_ce", "leader_kl", "contrast"}

    def objective(lg):
        return mcl_okd_loss(lg, labels, emb, memory, idx, neg)[0]

    grads = np.asarray(jax.grad(objective)(jnp.asarray(logits)))

    def ce_grad(lg):
        probs = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)
        return (probs - np.eye(c)[labels]) / b

    # A non-leader peer's logits get the gradient of its own cross-entropy only ...
    for peer in range(m - 1):
        np.testing.assert_allclose(grads[peer], ce_grad(logits[peer]), rtol=1e-4, atol=1e-6)
    # ... the leader's also that of the KL to the ensemble.
    assert np.abs(grads[-1] - ce_grad(logits[-1])).max() > 1e-3
