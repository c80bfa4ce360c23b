"""Loss terms of Contrastive Knowledge Amalgamation (CKA) and its baselines.

Every function here is pure ``jax.numpy``, jit-able and batch-first (axis 0 is the batch);
each returns a float32 scalar unless stated otherwise.  Inputs of any float dtype are
accepted (e.g. bfloat16 activations) and cast to float32 before any arithmetic.

Papers: "CKA" = "Contrastive Knowledge Amalgamation for Unsupervised Image Classification"
(Gao, Fu, Liu and Han, 2023); "CFL" = "Knowledge Amalgamation from Heterogeneous Networks by
Common Feature Learning" (Luo, Wang, Fang, Hu, Tao and Song, IJCAI 2019).

Where the CKA paper can be read more than one way, the functions take the reading as a
keyword argument whose default is the first version of this library (docs/method.md says
which reading the ``cka`` method uses, and the measurements behind the choice):

* ``normalize`` (Eq. 5's distance scale): ``'l2'`` unit-norm features, ``'none'`` the raw
  flattened features as written, ``'mean'`` raw distances divided by their mean;
* ``reduction`` (Eqs. 3 and 6): the negatives' terms averaged (``'mean'``) or summed
  (``'sum'``, as written);
* ``direction`` (Eq. 11): ``KL(teacher || student)`` as in Hinton et al.'s KD, or
  ``KL(student || teacher)`` as written.

Numerical notes:

* Matrix products use ``Precision.HIGHEST``: on GPUs the default float32 matmul may run in
  TF32 (~1e-3 relative error), which the sigma=0.001 MMD kernel cannot tolerate.
* Squared distances are never negative, a sample's distance to itself is exactly 0, and
  square roots are "safe" (finite gradient at 0), so a batch holding two identical samples
  still gives finite gradients.
* ``mmd`` computes squared distances from explicit differences (exact 0 for identical rows,
  no ``|a|^2 + |b|^2 - 2ab`` cancellation); XLA fuses the broadcast-subtract-reduce, so no
  (n, m, d) tensor is materialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from cka_jax.methods.choices import DISTANCE_KINDS, DISTANCE_SCALES, KL_DIRECTIONS, REDUCTIONS

__all__ = [
    "intra_contrast",
    "pairwise_distances",
    "transport_map",
    "inter_contrast",
    "mmd",
    "soft_target_kl",
    "reconstruction_loss",
    "cross_entropy",
]

DEFAULT_SIGMAS = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)
_NORM_EPS = 1e-12
_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------- helpers


def as_float32(x) -> jax.Array:
    """``x`` as a float32 array (every loss computes in float32)."""
    return jnp.asarray(x).astype(jnp.float32)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / max(||x||, eps)`` along ``axis`` (as torch's F.normalize), finite gradient at 0."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, _NORM_EPS**2))


def _safe_sqrt(d2: jax.Array) -> jax.Array:
    """``sqrt(d2)`` for ``d2 >= 0`` with value 0 and gradient 0 (not inf/nan) where ``d2 == 0``."""
    pos = d2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)


def _zero_diagonal(m: jax.Array) -> jax.Array:
    """Sets the diagonal of a square matrix to exactly 0 (gradient 0 there)."""
    return jnp.where(jnp.eye(m.shape[0], dtype=bool), 0.0, m)


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` for (n, d), (m, d) at full float32 precision."""
    return jnp.matmul(a, b.T, precision=_HIGHEST)


def _self_sq_dists(v: jax.Array) -> jax.Array:
    """Squared distances within one set of rows (n, d) -> (n, n) via the Gram matrix.

    ``|a|^2 + |b|^2 - 2ab`` with the norms taken from the Gram matrix's own diagonal,
    clamped at 0 and with an exactly-zero diagonal.
    """
    g = _gram(v, v)
    n = jnp.diagonal(g)
    return _zero_diagonal(jnp.maximum(n[:, None] + n[None, :] - 2.0 * g, 0.0))


@jax.custom_vjp
def _diff_sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    """Squared distances (n, d), (m, d) -> (n, m) from explicit differences.

    Exactly 0 where ``a_i == b_j`` (no ``|a|^2 + |b|^2 - 2ab`` cancellation). The forward
    pass is one fused broadcast-reduce; the gradient is analytic and uses matrix products,
    ``d/da_i = 2 sum_j g_ij (a_i - b_j)``: autodiff of the broadcast would materialise and
    reduce (n, m, d) tensors, ~30x slower on CPU at d = 2048.
    """
    return jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)


def _diff_sq_dists_fwd(a, b):
    d2 = _diff_sq_dists(a, b)
    return d2, (a, b, d2)


def _diff_sq_dists_bwd(residuals, g):
    a, b, d2 = residuals
    # Identical rows contribute g_ij * (a_i - b_j) = 0 exactly; in the matrix form they would
    # cancel only up to rounding, and the sigma=0.001 kernel makes their g_ij ~1e5.
    g = jnp.where(d2 == 0, 0.0, g)
    ga = 2.0 * (jnp.sum(g, axis=1)[:, None] * a - jnp.dot(g, b, precision=_HIGHEST))
    gb = 2.0 * (jnp.sum(g, axis=0)[:, None] * b - jnp.dot(g.T, a, precision=_HIGHEST))
    return ga, gb


_diff_sq_dists.defvjp(_diff_sq_dists_fwd, _diff_sq_dists_bwd)


def _multi_kernel(d2: jax.Array, sigmas: Sequence[float]) -> jax.Array:
    """Equal-weight Gaussian multi-kernel ``(1/m) sum_u exp(-d2 / (2 sigma_u^2))``."""
    if len(sigmas) == 0:
        raise ValueError("sigmas must not be empty")
    gammas = jnp.asarray([1.0 / (2.0 * float(s) ** 2) for s in sigmas], jnp.float32)
    # One fused broadcast-exp-reduce (XLA does not materialise the (..., m) tensor).
    return jnp.mean(jnp.exp(-d2[..., None] * gammas), axis=-1)


def _flatten(x: jax.Array) -> jax.Array:
    if x.ndim < 2:
        raise ValueError(f"expected a batch-first array with ndim >= 2, got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- CKA terms


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def _reduce_negatives(total: jax.Array, count: int, reduction: str) -> jax.Array:
    """A sum over ``count`` negatives, kept (``'sum'``) or averaged (``'mean'``)."""
    _check_choice("reduction", reduction, REDUCTIONS)
    return total if reduction == "sum" else total / max(count, 1)


def intra_contrast(z1, z2, *, margin: float = 0.4, reduction: str = "mean") -> jax.Array:
    r"""Margin-based intra-model contrastive loss (CKA, Eq. 3).

    ``z1``, ``z2`` (B, d) are the student's projections of two augmented views of the same
    B images; every row is L2-normalised here. With ``s`` the cosine similarity, the 2B
    anchors are the rows of ``z1`` and of ``z2``. For anchor ``z1_i`` the positive is
    ``z2_i`` (and vice versa) and the negatives are the other 2B - 2 rows of z1 and z2:

        loss_i = (1 - s(z1_i, z2_i)) + R_{neg} relu(s(z1_i, neg) - margin)

    Only negatives more similar than ``margin`` contribute (Eq. 3 writes the sum without the
    relu; the text says only pairs above the margin count). ``R`` is the reduction over the
    2B - 2 negatives: ``'mean'`` (default, the scale does not grow with B) or ``'sum'`` (Eq. 3
    as written, each negative weighing 2B - 2 times more). Returns the mean of ``loss_i``
    over all 2B anchors (z1 as anchors, then z2 as anchors).
    """
    z1, z2 = as_float32(z1), as_float32(z2)
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1, z2 must both be (B, d), got {z1.shape} and {z2.shape}")
    b = z1.shape[0]
    z1n, z2n = l2_normalize(z1), l2_normalize(z2)
    pos_cos = jnp.sum(z1n * z2n, axis=-1)  # (B,), the same for both views' anchors
    z = jnp.concatenate([z1n, z2n], axis=0)  # (2B, d)
    sim = _gram(z, z)  # (2B, 2B)
    idx = jnp.arange(2 * b)
    is_neg = (idx[:, None] != idx[None, :]) & (idx[None, :] != (idx[:, None] + b) % (2 * b))
    neg = jnp.where(is_neg, jax.nn.relu(sim - margin), 0.0)
    neg_term = _reduce_negatives(jnp.sum(neg, axis=1), 2 * b - 2, reduction)  # (2B,)
    pos_term = jnp.tile(1.0 - pos_cos, 2)  # (2B,)
    return jnp.mean(pos_term + neg_term)


def _mean_off_diagonal(d: jax.Array) -> jax.Array:
    b = d.shape[0]
    return jnp.sum(_zero_diagonal(d)) / max(b * (b - 1), 1)


def pairwise_distances(x, *, kind: str = "euclidean", normalize: str = "l2") -> jax.Array:
    r"""Distances between all samples of a batch, (B, ...) -> (B, B) (``d`` of CKA Eqs. 4-5).

    * ``'euclidean'``: each sample flattened, ``||a - b||_2``
      (``sqrt(max(|a|^2 + |b|^2 - 2ab, 0))`` with a safe square root).
    * ``'cosine'``: each sample flattened, ``1 - cos(a, b)`` (clamped at 0).
    * ``'mmd'``: ``x`` is (B, h, w, c) (any (B, ..., c)); sample a is the set of its h*w
      spatial vectors and ``D_ab = mmd(set_a, set_b)`` (biased multi-kernel MMD^2 with the
      default sigmas, CKA Eqs. 7-9 / CFL Eq. 2). Vectorised over all B*B pairs: one Gram
      matrix of all B*h*w spatial vectors, its kernel matrix block-averaged to M (B, B),
      ``D_ab = max(M_aa + M_bb - 2 M_ab, 0)``.

    ``normalize`` sets the scale of the distances (Eq. 5 leaves it open):

    * ``'l2'`` (default): each flattened sample (each spatial vector for ``'mmd'``) is
      L2-normalised first, so euclidean distances lie in [0, 2];
    * ``'none'``: the raw features, as Eq. 5 is written (their distances grow with the
      feature norm and dimension);
    * ``'mean'``: the raw-feature distances divided by their mean over the B(B-1) pairs
      i != j (as Relational KD, Park et al. 2019, normalises distances): invariant to a
      rescaling of the features, so a model cannot change the term by scaling its features.

    For ``'cosine'``, ``'l2'`` and ``'none'`` coincide. The diagonal (a sample's distance to
    itself) is exactly 0 for every kind.
    """
    x = as_float32(x)
    _check_choice("kind", kind, DISTANCE_KINDS)
    _check_choice("normalize", normalize, DISTANCE_SCALES)
    unit = l2_normalize if normalize == "l2" else (lambda v: v)
    if kind == "mmd":
        if x.ndim < 3:
            raise ValueError(f"kind='mmd' needs (B, h, w, c) feature maps, got shape {x.shape}")
        b, c = x.shape[0], x.shape[-1]
        v = unit(x.reshape(-1, c))  # (B*n, c), sample-major
        n = v.shape[0] // b
        k = _multi_kernel(_self_sq_dists(v), DEFAULT_SIGMAS)  # (B*n, B*n)
        m = jnp.mean(k.reshape(b, n, b, n), axis=(1, 3))  # (B, B) mean kernel per block
        dm = jnp.diagonal(m)
        d = _zero_diagonal(jnp.maximum(dm[:, None] + dm[None, :] - 2.0 * m, 0.0))
    elif kind == "cosine":
        v = l2_normalize(_flatten(x))
        d = _zero_diagonal(jnp.maximum(1.0 - _gram(v, v), 0.0))
    else:
        d = _zero_diagonal(_safe_sqrt(_self_sq_dists(unit(_flatten(x)))))
    if normalize == "mean":
        d = d / jnp.maximum(_mean_off_diagonal(d), _NORM_EPS)
    return d


def transport_map(
    x, *, kind: str = "euclidean", temperature: float = 1.0, normalize: str = "l2"
) -> jax.Array:
    r"""Transport map pi (B, B) of one model's batch (CKA Eq. 5).

        pi_ij = exp(-d(x_i, x_j) / T) / sum_{l != i} exp(-d(x_i, x_l) / T),  pi_ii = 0

    with ``d = pairwise_distances(x, kind=kind, normalize=normalize)``: a row-wise softmax
    with the diagonal excluded, so each row is a distribution over the other B - 1 samples
    (needs B >= 2). Eq. 5 sums over every j; with the diagonal included a sample is its own
    nearest neighbour (d = 0) and raw features give the identity map. The temperature T
    (Eq. 5 has none, i.e. T = 1) sets how peaked the rows are together with ``normalize``.
    """
    d = pairwise_distances(x, kind=kind, normalize=normalize)
    b = d.shape[0]
    if b < 2:
        raise ValueError("transport_map needs a batch of at least 2 samples")
    logits = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, -d / temperature)
    return jax.nn.softmax(logits, axis=-1)


def inter_contrast(
    student_feats,
    teacher_feats,
    *,
    kind: str = "euclidean",
    temperature: float = 1.0,
    normalize: str = "l2",
    reduction: str = "mean",
) -> jax.Array:
    r"""Distance-based inter-model contrastive loss for one teacher (CKA Eq. 6).

    ``P = transport_map(student_feats)``, ``Q = transport_map(teacher_feats)`` (with the
    same ``kind``, ``temperature`` and ``normalize``; distances are taken within each model,
    so the feature shapes may differ; the batch must match). Row k of P and row k of Q are a
    positive pair, ``Q_j`` (j != k) are negatives:

        loss = mean_k [ (1 - s(P_k, Q_k)) + R_{j != k} s(P_k, Q_j) ]

    with ``s`` the cosine similarity and ``R`` the reduction over the B - 1 negatives:
    ``'mean'`` (default) or ``'sum'`` (Eq. 6 as written). The method sums this over teachers.
    """
    kwargs = dict(kind=kind, temperature=temperature, normalize=normalize)
    p = transport_map(student_feats, **kwargs)
    q = transport_map(teacher_feats, **kwargs)
    if p.shape != q.shape:
        raise ValueError(f"student and teacher batch sizes differ: {p.shape[0]} vs {q.shape[0]}")
    b = p.shape[0]
    cos = _gram(l2_normalize(p), l2_normalize(q))  # (B, B): s(P_k, Q_j)
    pos = jnp.diagonal(cos)
    neg = _reduce_negatives(jnp.sum(cos, axis=1) - pos, b - 1, reduction)
    return jnp.mean((1.0 - pos) + neg)


def mmd(
    x,
    y,
    *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    normalize: bool = True,
) -> jax.Array:
    r"""Biased multi-kernel MMD^2 between two sets of samples (CKA Eqs. 7-9, CFL Eq. 2).

        K(a, b) = (1/m) sum_{u=1}^m exp(-||a - b||^2 / (2 sigma_u^2))   (equal convex weights)
        MMD^2 = mean_{i,j} K(x_i, x_j) + mean_{i,j} K(y_i, y_j) - 2 mean_{i,j} K(x_i, y_j)

    clamped at 0. Rows are flattened ((n, ...) -> (n, D)) and, when ``normalize``,
    L2-normalised first (CFL computes it on normalised features). ``x`` and ``y`` may have
    different batch sizes but the same per-sample size. The default sigmas are those of the
    CFL authors' code. Squared distances come from explicit differences, so identical rows
    are exactly 0 apart and ``mmd(x, x) == 0``.
    """
    x, y = _flatten(as_float32(x)), _flatten(as_float32(y))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y rows differ in size: {x.shape[1]} vs {y.shape[1]}")
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    # One distance matrix over the stacked samples, then its blocks: three separate
    # broadcast-reduces let XLA fuse (and recompute) the normalisation into each, ~30x slower.
    n, z = x.shape[0], jnp.concatenate([x, y])
    k = _multi_kernel(_diff_sq_dists(z, z), sigmas)
    kxx, kyy, kxy = jnp.mean(k[:n, :n]), jnp.mean(k[n:, n:]), jnp.mean(k[:n, n:])
    return jnp.maximum(kxx + kyy - 2.0 * kxy, 0.0)


def soft_target_kl(
    student_logits,
    teacher_logits,
    *,
    temperature: float = 1.0,
    direction: str = "teacher_student",
) -> jax.Array:
    r"""Soft-target distillation loss (CKA Eq. 11; Hinton et al.'s KD).

        T^2 * mean_batch KL( p || q ),   KL(p || q) = sum_c p_c (log p_c - log q_c)

    with ``direction='teacher_student'`` (default, Hinton et al.'s KD): p = softmax(teacher
    / T), q = softmax(student / T); ``'student_teacher'`` swaps them, KL(student || teacher),
    as Eq. 11 is written (mode-seeking: the student is pushed off classes the teachers rule
    out, rather than spread over every class they give mass to). Computed with
    ``log_softmax`` for stability. ``teacher_logits`` is the concatenation of all teachers'
    logits over the union label space, shape (B, C) like the student's.
    """
    _check_choice("direction", direction, KL_DIRECTIONS)
    s, t = as_float32(student_logits), as_float32(teacher_logits)
    if s.shape != t.shape:
        raise ValueError(f"student and teacher logits differ in shape: {s.shape} vs {t.shape}")
    log_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_t = jax.nn.log_softmax(t / temperature, axis=-1)
    log_p, log_q = (log_t, log_s) if direction == "teacher_student" else (log_s, log_t)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return temperature**2 * jnp.mean(kl)


def reconstruction_loss(reconstructed, target) -> jax.Array:
    r"""Reconstruction term of CFL (Eq. 4): teacher feature mapped back from the common space.

    The paper writes ``||F'_T - F_T||_2``; as in the CFL authors' code this is implemented
    as the mean squared error over all elements, ``mean((F'_T - F_T)^2)``.
    """
    r, t = as_float32(reconstructed), as_float32(target)
    if r.shape != t.shape:
        raise ValueError(f"reconstruction and target differ in shape: {r.shape} vs {t.shape}")
    return jnp.mean(jnp.square(r - t))


def cross_entropy(logits, labels) -> jax.Array:
    r"""Mean softmax cross-entropy with integer labels (supervised reference).

    ``mean_i [ -log softmax(logits_i)[labels_i] ]``; logits (B, C), labels (B,) in [0, C).
    """
    logits = as_float32(logits)
    labels = jnp.asarray(labels).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))
