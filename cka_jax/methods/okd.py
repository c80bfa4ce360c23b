"""MCL-OKD's multi-view contrast (Yang, An, Hu, Zhu, Xu and Xu, "Multi-view Contrastive
Learning for Online Knowledge Distillation"): the NCE loss between peer networks' embeddings
and the memory bank of every training sample's embedding.

Pure ``jax.numpy``, batch-first, jit-able. The memory bank is an array (M, N, d), one row of
unit vectors per peer network and training sample; it belongs to the train state and is
updated functionally inside the step (`update_memory_bank`).

Conventions, as in the authors' practice (CRD / Wu et al. [27], which the paper follows):
* the anchor is the current embedding of view a; the positive and the S negatives are
  view b's memory-bank rows (the positive at the anchor's own index, the negatives at
  indices drawn uniformly over the N training samples, with replacement; the anchor's own
  index may be drawn, with probability 1/N);
* Z_i is estimated per anchor from its 1 + S scores, ``Z_i = N / (1 + S) * sum_j h_ij``
  ("we dynamically compute it from {x^i, {x^{i,s}}}", below Eq. 10).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cka_jax.methods import losses

_EPS = 1e-7  # inside the logs of Eq. 11, as CRD's NCE criterion


def _unit(x) -> jax.Array:
    """Rows L2-normalised in float32 (the losses' own normalisation)."""
    return losses.l2_normalize(losses.as_float32(x))


def sample_negatives(key, shape, num_data: int) -> jax.Array:
    """Indices of negatives, uniform over the N training samples (p_n = 1/N of Eq. 10), with
    replacement: ``shape`` (..., S) shared by a batch, or (..., B, S) one set per anchor."""
    return jax.random.randint(key, shape, 0, num_data)


def nce_contrast(anchors, memory, positive_index, negative_index, *, temperature, num_data):
    r"""NCE approximation of the contrastive loss from view a to view b (MCL-OKD Eqs. 6, 9-11).

    ``anchors`` (B, d): view a's current embeddings; ``memory`` (N, d): view b's memory bank
    (unit rows); ``positive_index`` (B,): each anchor's own sample index; ``negative_index``
    (B, S) negatives per anchor, or (S,) one uniform draw shared by the batch (each anchor
    still has S uniform negatives; one (B, d) x (d, S) product instead of a (B, S, d) gather).

        h_ij = exp(cos(a_i, m_j) / tau)                                    (Eq. 6)
        Z_i  = N / (1 + S) * (h_{i,i} + sum_s h_{i,(i,s)})                 (Eq. 9, estimated)
        P_ij = (h_ij / Z_i) / (h_ij / Z_i + S / N)                         (Eq. 10)
        loss = -mean_i [ log P_{i,i} + sum_s log(1 - P_{i,(i,s)}) ]        (Eq. 11)

    with ``+1e-7`` inside each log. Returns a float32 scalar.
    """
    a = _unit(anchors)
    memory = jnp.asarray(memory)
    s = negative_index.shape[-1]
    hi = lax.Precision.HIGHEST
    cos_pos = jnp.sum(a * _unit(memory[positive_index]), axis=-1, keepdims=True)  # (B, 1)
    negatives = _unit(memory[negative_index])
    if negative_index.ndim == 1:
        cos_neg = jnp.einsum("bd,sd->bs", a, negatives, precision=hi)
    else:
        cos_neg = jnp.einsum("bd,bsd->bs", a, negatives, precision=hi)
    h = jnp.exp(jnp.concatenate([cos_pos, cos_neg], axis=1) / temperature)  # (B, 1 + S)
    # Z_i stops no gradient: it is part of the model's density, as in Eq. 10.
    z = num_data / (1 + s) * jnp.sum(h, axis=1, keepdims=True)
    p_model = h / z
    p_data = p_model / (p_model + s / num_data)
    log_pos = jnp.log(p_data[:, 0] + _EPS)
    log_neg = jnp.sum(jnp.log(1.0 - p_data[:, 1:] + _EPS), axis=1)
    return -jnp.mean(log_pos + log_neg)


def multi_view_contrast(embeddings, memory, index, negative_index, *, temperature, num_data):
    r"""Full-graph MCL loss over M views: ``sum_{a<b} L(a->b) + L(b->a)`` (Sec. 3, Eq. 12's
    L_contrast). ``embeddings`` (M, B, d) current; ``memory`` (M, N, d);
    ``negative_index`` (M, M, [B,] S): the negatives drawn for each ordered pair (a, b)."""
    m = embeddings.shape[0]
    total = jnp.zeros((), jnp.float32)
    for a in range(m):  # M is a static handful (4): a Python loop over views, not samples
        for b in range(m):
            if a != b:
                total = total + nce_contrast(
                    embeddings[a],
                    memory[b],
                    index,
                    negative_index[a, b],
                    temperature=temperature,
                    num_data=num_data,
                )
    return total


def update_memory_bank(memory, index, embeddings, *, momentum: float):
    r"""Momentum update of the rows ``index`` of every view's bank (Wu et al. [27], CRD):

        m_{v,i} <- normalize(momentum * m_{v,i} + (1 - momentum) * normalize(e_{v,i}))

    ``memory`` (M, N, d), ``index`` (B,) distinct sample indices, ``embeddings`` (M, B, d).
    Returns the new bank; the embeddings enter without gradient."""
    memory = jnp.asarray(memory)
    e = _unit(lax.stop_gradient(embeddings))
    mixed = momentum * memory[:, index] + (1.0 - momentum) * e
    return memory.at[:, index].set(_unit(mixed))


def init_memory_bank(key, num_views: int, num_data: int, dim: int) -> jax.Array:
    """A bank of random unit vectors (M, N, d), as CRD initialises it."""
    return _unit(jax.random.normal(key, (num_views, num_data, dim)))


def peer_cross_entropy(logits, labels) -> jax.Array:
    r"""Every peer learns from the labels (Eqs. 1-2): ``sum_m CE(softmax(f_m), y)``.
    ``logits`` (M, B, C), ``labels`` (B,)."""
    return sum(losses.cross_entropy(logits[m], labels) for m in range(logits.shape[0]))


def ensemble_to_leader_kl(logits, *, temperature: float) -> jax.Array:
    r"""The online teacher distils into the leader only (Eqs. 3-5):

        T^2 KL( softmax(mean_m f_m / T) || softmax(f_M / T) )

    The naive ensemble of Eq. 4 (mean of the M peers' logits) is a target: no gradient flows
    through it, so the other peers do not learn from it (the paper's remedy for the
    homogenisation ONE suffers from). ``logits`` (M, B, C); the last peer is the leader."""
    ensemble = lax.stop_gradient(jnp.mean(jnp.asarray(logits, jnp.float32), axis=0))
    return losses.soft_target_kl(logits[-1], ensemble, temperature=temperature)


def mutual_kl(logits, *, temperature: float = 1.0) -> jax.Array:
    r"""Deep Mutual Learning (Zhang et al. 2018, MCL-OKD's [30]): every peer matches each
    other peer's (detached) prediction,

        sum_m 1/(M-1) sum_{n != m} T^2 KL( softmax(f_n / T) || softmax(f_m / T) ).

    ``logits`` (M, B, C)."""
    m = logits.shape[0]
    targets = lax.stop_gradient(logits)
    return sum(
        losses.soft_target_kl(logits[i], targets[j], temperature=temperature) / (m - 1)
        for i in range(m)  # M is a static handful: a loop over peers, not samples
        for j in range(m)
        if i != j
    )
