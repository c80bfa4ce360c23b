"""Label-free calibration of the frozen teachers: their outputs turned into union scores on
one scale, fitted once on the unlabelled training images before anything is distilled.

The teachers never saw each other's classes, so the concatenation of their logits (the
union score every method distils from) picks whichever teacher is most confident, and an
image outside a teacher's task often gets a confident answer. A calibration is a pair

    fit(outputs) -> params        on the teachers' outputs over unlabelled images (host)
    apply(params, logits, features) -> per-teacher union log-scores   (pure jnp, batched)

with ``logits`` a list of (B, K_t) teacher logits and ``features`` a list of (B, D_t) pooled
last-stage features, in task order. The union score of class k of teacher t is the t-th
block of the concatenated output. Several of them factor the union posterior as

    log p(k | x) = log p(t | x) + log softmax(z_t(x))_k,        k in task t,       (R)

a router ``p(t | x)`` over the teachers times each teacher's own posterior within its task;
they differ in the router. None reads a label.

  none             z_t unchanged (the concatenation CFL's and CKA's code distil from)
  softmax          log softmax(z_t): each teacher's posterior, argmax over all (ZipIt!,
                   Stoica et al., ICLR 2024): (R) with a uniform router
  mean_subtracted  z_t - mean_k z_tk per image (DMC, Zhang et al., WACV 2020)
  standardize      (z_t - mu_t) / sigma_t with one mean and std over all of teacher t's
                   logits on the images (never per image, which erases confidence)
  prior_em         standardize, then per-class priors of the union fitted by EM (Saerens,
                   Latinne and Decaestecker, "Adjusting the outputs of a classifier to new a
                   priori probabilities", Neural Computation 2002): log pi_k - log pi0_k added
  balanced_classes standardize, then one bias per union class such that the union softmax
                   puts equal mass on every class over the images: for class-balanced
                   unlabelled data (a stated assumption), a teacher that claims too many
                   of the other task's images is turned down class by class
  energy_em        (R) with p(t | x) the posterior of a T-component Gaussian mixture fitted
                   by EM on the vector of the teachers' standardized energies
                   E_t = logsumexp(z_t) (Liu et al., "Energy-based out-of-distribution
                   detection", NeurIPS 2020), component t seeded by the images teacher t is
                   most energetic on
  cluster_vote     (R) with p(t | x) the share of each teacher in the `standardize` routing of
                   the images of x's cluster: k-means on the teachers' joint pooled features.
                   Class-disjoint tasks put each class in one task, so a cluster of one class
                   votes as a whole and single images' routing errors are outvoted
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CALIBRATIONS: dict[str, Calibration] = {}
EPS = 1e-4  # floor of a router probability: log p(t | x) stays finite
EM_ITERATIONS = 200
EM_TOLERANCE = 1e-6  # on the mean absolute change of the responsibilities


class CalibrationError(ValueError):
    """A calibration that cannot be fitted (too few teachers, a teacher given no images)."""


@dataclasses.dataclass(frozen=True)
class TeacherOutputs:
    """The teachers' outputs on N unlabelled images: (N, K_t) logits and (N, D_t) pooled
    features per teacher, task order (float64 on the host)."""

    logits: tuple[np.ndarray, ...]
    features: tuple[np.ndarray, ...] = ()


@dataclasses.dataclass(frozen=True)
class Calibration:
    name: str
    fit: Callable[..., dict]  # (TeacherOutputs, **options) -> params (arrays, floats)
    apply: Callable[..., list]  # (params, logits list, features list) -> union log-scores
    needs_features: bool = False
    min_teachers: int = 1
    doc: str = ""


def register(name, fit, apply, *, needs_features=False, min_teachers=1, doc=""):
    CALIBRATIONS[name] = Calibration(name, fit, apply, needs_features, min_teachers, doc)


def _no_params(outputs, **_):
    return {}


# --- the router form (R) --------------------------------------------------------------------


def routed(log_router: jax.Array, logits: Sequence[jax.Array]) -> list[jax.Array]:
    """(R): ``log p(t|x) + log_softmax(z_t)`` per teacher; ``log_router`` is (B, T)."""
    return [log_router[:, t : t + 1] + jax.nn.log_softmax(z, -1) for t, z in enumerate(logits)]


def router_of(scores: Sequence[jax.Array]) -> jax.Array:
    """(B, T) share of each teacher's block in the softmax over all the union scores."""
    blocks = jnp.stack([jax.nn.logsumexp(s, -1) for s in scores], -1)
    return jax.nn.softmax(blocks, -1)


# --- no fit ---------------------------------------------------------------------------------


def apply_none(params, logits, features=()):
    return list(logits)


def apply_softmax(params, logits, features=()):
    return [jax.nn.log_softmax(z, -1) for z in logits]


def apply_mean_subtracted(params, logits, features=()):
    return [z - jnp.mean(z, -1, keepdims=True) for z in logits]


# --- standardize and prior EM ---------------------------------------------------------------


def fit_standardize(outputs: TeacherOutputs, **_) -> dict:
    """One mean and std per teacher over all of its logits on the images."""
    mean = [float(np.mean(z)) for z in outputs.logits]
    std = [float(np.std(z)) for z in outputs.logits]
    for t, s in enumerate(std):
        if not s > 0:
            raise CalibrationError(f"teacher {t}'s logits are constant over the images (std 0)")
    return {"mean": mean, "std": std}


def apply_standardize(params, logits, features=()):
    return [(z - m) / s for z, m, s in zip(logits, params["mean"], params["std"], strict=True)]


def saerens_priors(posteriors: np.ndarray, train_priors: np.ndarray, iterations=EM_ITERATIONS):
    """Saerens et al.'s EM: the class priors of unlabelled data from a classifier's posteriors
    (N, K) under ``train_priors`` (K,). Returns ``(priors, iterations run, converged)``."""
    priors = train_priors.copy()
    for i in range(1, iterations + 1):
        adjusted = posteriors * (priors / train_priors)
        adjusted /= adjusted.sum(-1, keepdims=True)
        new = adjusted.mean(0)
        change = float(np.abs(new - priors).max())
        priors = new
        if change < EM_TOLERANCE:
            return priors, i, True
    return priors, iterations, False


def fit_prior_em(outputs: TeacherOutputs, **_) -> dict:
    params = fit_standardize(outputs)
    union = np.concatenate(
        [np.asarray(s) for s in apply_standardize(params, outputs.logits)], -1
    ).astype(np.float64)
    posteriors = np.exp(union - union.max(-1, keepdims=True))
    posteriors /= posteriors.sum(-1, keepdims=True)
    train_priors = np.full(union.shape[1], 1.0 / union.shape[1])  # balanced tasks assumed
    priors, iterations, converged = saerens_priors(posteriors, train_priors)
    shift = np.log(np.maximum(priors, EPS)) - np.log(train_priors)
    return {
        **params,
        "log_prior_shift": shift.tolist(),
        "diagnostics": {"iterations": iterations, "converged": converged},
    }


def apply_prior_em(params, logits, features=()):
    scores = apply_standardize(params, logits)
    shift = jnp.asarray(params["log_prior_shift"], jnp.float32)
    out, start = [], 0
    for s in scores:
        out.append(s + shift[start : start + s.shape[-1]])
        start += s.shape[-1]
    return out


def balanced_biases(scores: np.ndarray, iterations=EM_ITERATIONS, tolerance=1e-4):
    """Per-class biases b (K,) under which the mean softmax of ``scores + b`` over the N
    images is uniform over the K classes (a Sinkhorn-style fixed point: each step divides
    a class's scores by its excess mass). Returns ``(b, iterations run, converged)``."""
    b = np.zeros(scores.shape[1])
    for i in range(1, iterations + 1):
        s = scores + b
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        mass = p.mean(0) * scores.shape[1]  # 1 for every class at the fixed point
        if float(np.abs(mass - 1).max()) < tolerance:
            return b - b.mean(), i, True
        b -= np.log(np.maximum(mass, 1e-12))
    return b - b.mean(), iterations, False


def fit_balanced_classes(outputs: TeacherOutputs, **_) -> dict:
    params = fit_standardize(outputs)
    union = np.concatenate([np.asarray(s) for s in apply_standardize(params, outputs.logits)], -1)
    bias, iterations, converged = balanced_biases(union.astype(np.float64))
    return {
        **params,
        "log_prior_shift": bias.tolist(),
        "diagnostics": {"iterations": iterations, "converged": converged},
    }


# --- energy mixture -------------------------------------------------------------------------


def energies(logits: Sequence) -> np.ndarray:
    """(N, T) float64 energies ``logsumexp(z_t)`` (high: the teacher recognises the image)."""
    out = []
    for z in logits:
        z = np.asarray(z, np.float64)
        top = z.max(-1, keepdims=True)
        out.append((top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[:, 0])
    return np.stack(out, -1)


def gaussian_mixture_em(x: np.ndarray, resp: np.ndarray, iterations=EM_ITERATIONS):
    """EM for a full-covariance Gaussian mixture on (N, d) ``x`` from initial responsibilities
    (N, T). Returns ``(weights, means, covariances, responsibilities, iterations, converged)``."""
    n, d = x.shape
    converged, done = False, 0
    for done in range(1, iterations + 1):  # noqa: B007  (the count is returned)
        weights = resp.sum(0) + 1e-12
        means = (resp.T @ x) / weights[:, None]
        covs = []
        for t in range(resp.shape[1]):
            c = x - means[t]
            covs.append((resp[:, t, None] * c).T @ c / weights[t] + 1e-6 * np.eye(d))
        weights = weights / n
        log_p = np.stack(
            [np.log(weights[t]) + _log_gauss(x, means[t], covs[t]) for t in range(len(covs))], -1
        )
        new = np.exp(log_p - log_p.max(-1, keepdims=True))
        new /= new.sum(-1, keepdims=True)
        change = float(np.abs(new - resp).mean())
        resp = new
        if change < EM_TOLERANCE:
            converged = True
            break
    return weights, means, np.stack(covs), resp, done, converged


def _log_gauss(x, mean, cov):
    c = x - mean
    sign, logdet = np.linalg.slogdet(cov)
    solved = np.linalg.solve(cov, c.T).T
    return -0.5 * (np.sum(c * solved, -1) + logdet + x.shape[1] * np.log(2 * np.pi))


def fit_energy_em(outputs: TeacherOutputs, **_) -> dict:
    e = energies(outputs.logits)
    mean, std = e.mean(0), e.std(0) + 1e-12
    x = (e - mean) / std
    # Component t starts as the images on which teacher t is the most energetic (z-scores).
    resp = np.eye(x.shape[1])[np.argmax(x, -1)]
    weights, means, covs, resp, iterations, converged = gaussian_mixture_em(x, resp)
    share = resp.mean(0)
    return {
        "energy_mean": mean.tolist(),
        "energy_std": std.tolist(),
        "weights": weights.tolist(),
        "means": means.tolist(),
        "precisions": np.linalg.inv(covs).tolist(),
        "log_norms": [
            float(-0.5 * (np.linalg.slogdet(c)[1] + len(c) * np.log(2 * np.pi))) for c in covs
        ],
        "diagnostics": {
            "iterations": iterations,
            "converged": converged,
            "image_share": share.tolist(),
        },
    }


def apply_energy_em(params, logits, features=()):
    e = jnp.stack([jax.nn.logsumexp(z, -1) for z in logits], -1)
    x = (e - jnp.asarray(params["energy_mean"])) / jnp.asarray(params["energy_std"])
    c = x[:, None, :] - jnp.asarray(params["means"], jnp.float32)[None]  # (B, T, T)
    quad = jnp.einsum("btd,tde,bte->bt", c, jnp.asarray(params["precisions"], jnp.float32), c)
    log_p = jnp.log(jnp.asarray(params["weights"])) + jnp.asarray(params["log_norms"]) - quad / 2
    return routed(jax.nn.log_softmax(log_p, -1), logits)


# --- cluster vote ---------------------------------------------------------------------------


def joint_features(features: Sequence) -> np.ndarray:
    """(N, sum D_t): each teacher's pooled features scaled to unit norm, side by side."""
    parts = [np.asarray(f, np.float64) for f in features]
    return np.concatenate(
        [f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-12) for f in parts], -1
    )


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; returns the (k, d) centroids."""
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=1, max_iter=iterations, random_state=seed).fit(x).cluster_centers_


def nearest(x, centroids):
    """Index of the nearest centroid of each row (jnp or numpy)."""
    xp = jnp if isinstance(x, jax.Array) else np
    d = (x * x).sum(-1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(-1)
    return xp.argmin(d, -1)


def fit_cluster_vote(outputs: TeacherOutputs, *, clusters_per_class: int = 4, seed=0, **_):
    if not outputs.features:
        raise CalibrationError("cluster_vote needs the teachers' pooled features")
    x = joint_features(outputs.features)
    num_classes = sum(z.shape[1] for z in outputs.logits)
    k = min(clusters_per_class * num_classes, len(x))
    centroids = kmeans(x, k, seed)
    assign = nearest(x, centroids)
    base = fit_standardize(outputs)
    shares = np.asarray(router_of(apply_standardize(base, outputs.logits)), np.float64)
    votes = np.full((k, shares.shape[1]), 1.0 / shares.shape[1])
    counts = np.bincount(assign, minlength=k)
    for c in np.flatnonzero(counts):
        votes[c] = shares[assign == c].mean(0)
    return {
        "centroids": centroids.astype(np.float32).tolist(),
        "log_votes": np.log(np.maximum(votes, EPS)).tolist(),
        "diagnostics": {
            "clusters": int(k),
            "empty_clusters": int((counts == 0).sum()),
            "image_share": (votes * counts[:, None]).sum(0).tolist(),
        },
    }


def apply_cluster_vote(params, logits, features):
    x = [f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-12) for f in features]
    assign = nearest(jnp.concatenate(x, -1), jnp.asarray(params["centroids"], jnp.float32))
    return routed(jnp.asarray(params["log_votes"], jnp.float32)[assign], logits)


register("none", _no_params, apply_none, doc="the raw concatenation")
register("softmax", _no_params, apply_softmax, doc="each teacher's log-softmax")
register("mean_subtracted", _no_params, apply_mean_subtracted, doc="logits minus their mean")
register("standardize", fit_standardize, apply_standardize, doc="one mean/std per teacher")
register("prior_em", fit_prior_em, apply_prior_em, doc="standardize + Saerens EM priors")
register(
    "balanced_classes",
    fit_balanced_classes,
    apply_prior_em,
    doc="standardize + per-class biases that balance the union's predicted class mass",
)
register("energy_em", fit_energy_em, apply_energy_em, min_teachers=2, doc="energy mixture")
register(
    "cluster_vote",
    fit_cluster_vote,
    apply_cluster_vote,
    needs_features=True,
    min_teachers=2,
    doc="k-means clusters vote",
)
