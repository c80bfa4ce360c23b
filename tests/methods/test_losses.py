"""Tests of cka_jax.methods.losses against independent float64 NumPy references (written from the
papers' equations, with explicit loops; every reading of an ambiguous equation has its own),
plus known values, gradients (against central differences of the references) and jit."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.methods import losses

SIGMAS = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)
RTOL, ATOL = 1e-5, 1e-6
KINDS = ("euclidean", "cosine", "mmd")

# Jitted wrappers, compiled once per shape and kind (far cheaper than eager op-by-op dispatch
# on a small CPU). margin and temperature stay traced, so they need not be static. Eager
# execution is checked against jit in test_jit_matches_eager.
intra_contrast = jax.jit(losses.intra_contrast, static_argnames=("reduction",))
pairwise_distances = jax.jit(losses.pairwise_distances, static_argnames=("kind", "normalize"))
transport_map = jax.jit(losses.transport_map, static_argnames=("kind", "normalize"))
inter_contrast = jax.jit(losses.inter_contrast, static_argnames=("kind", "normalize", "reduction"))
mmd = jax.jit(losses.mmd, static_argnames=("sigmas", "normalize"))
soft_target_kl = jax.jit(losses.soft_target_kl, static_argnames=("direction",))
reconstruction_loss = jax.jit(losses.reconstruction_loss)
cross_entropy = jax.jit(losses.cross_entropy)


def _rand(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------- float64 references


def ref_normalize(v):
    v = np.asarray(v, np.float64)
    return v / max(np.linalg.norm(v), 1e-12)


def ref_cos(a, b):
    return float(np.dot(ref_normalize(a), ref_normalize(b)))


def ref_intra(z1, z2, margin, reduction="mean"):
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    b = len(z1)
    total = []
    for anchors, others in ((z1, z2), (z2, z1)):
        for i in range(b):
            a = anchors[i]
            others_i = [j for j in range(b) if j != i]
            negs = [anchors[j] for j in others_i] + [others[j] for j in others_i]
            assert len(negs) == 2 * b - 2
            hinge = [max(ref_cos(a, n) - margin, 0.0) for n in negs]
            neg = np.sum(hinge) if reduction == "sum" else np.mean(hinge)
            total.append((1.0 - ref_cos(a, others[i])) + neg)
    return np.mean(total)


def ref_kernel(a, b, sigmas):
    d2 = float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return np.mean([np.exp(-d2 / (2 * s**2)) for s in sigmas])


def ref_mmd(x, y, sigmas=SIGMAS, normalize=True):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if normalize:
        x = np.stack([ref_normalize(r) for r in x])
        y = np.stack([ref_normalize(r) for r in y])
    kxx = np.mean([ref_kernel(a, b, sigmas) for a in x for b in x])
    kyy = np.mean([ref_kernel(a, b, sigmas) for a in y for b in y])
    kxy = np.mean([ref_kernel(a, b, sigmas) for a in x for b in y])
    return max(kxx + kyy - 2 * kxy, 0.0)


def ref_pairwise(x, kind, normalize="l2"):
    x = np.asarray(x, np.float64)
    b = len(x)
    d = np.zeros((b, b))
    unit = ref_normalize if normalize == "l2" else (lambda v: v)
    for i, j in itertools.product(range(b), range(b)):
        if kind == "euclidean":
            d[i, j] = np.linalg.norm(unit(x[i].ravel()) - unit(x[j].ravel()))
        elif kind == "cosine":
            d[i, j] = 1.0 - ref_cos(x[i].ravel(), x[j].ravel())
        else:
            c = x.shape[-1]
            d[i, j] = ref_mmd(x[i].reshape(-1, c), x[j].reshape(-1, c), normalize=normalize == "l2")
    if normalize == "mean":
        d = d / (d.sum() / (b * (b - 1)))  # the diagonal is 0
    return d


def ref_transport(x, kind, temperature, normalize="l2"):
    d = ref_pairwise(x, kind, normalize)
    b = len(d)
    pi = np.zeros((b, b))
    for i in range(b):
        others = [j for j in range(b) if j != i]
        e = np.array([np.exp(-(d[i, j] - d[i, others].min()) / temperature) for j in others])
        pi[i, others] = e / e.sum()
    return pi


def ref_inter(s, t, kind, temperature, normalize="l2", reduction="mean"):
    p = ref_transport(s, kind, temperature, normalize)
    q = ref_transport(t, kind, temperature, normalize)
    b = len(p)
    terms = []
    for k in range(b):
        negs = [ref_cos(p[k], q[j]) for j in range(b) if j != k]
        neg = np.sum(negs) if reduction == "sum" else np.mean(negs)
        terms.append((1.0 - ref_cos(p[k], q[k])) + neg)
    return np.mean(terms)


def ref_log_softmax(v):
    v = np.asarray(v, np.float64)
    m = v.max()
    return v - m - np.log(np.sum(np.exp(v - m)))


def ref_kl(s, t, temperature, direction="teacher_student"):
    kls = []
    for si, ti in zip(s, t, strict=True):
        log_t, log_s = ref_log_softmax(ti / temperature), ref_log_softmax(si / temperature)
        lp, lq = (log_t, log_s) if direction == "teacher_student" else (log_s, log_t)
        kls.append(np.sum(np.exp(lp) * (lp - lq)))
    return temperature**2 * np.mean(kls)


def ref_grad(f, x, eps=1e-6):
    """Central differences of a float64 scalar function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        g[i] = (f(up) - f(down)) / (2 * eps)
    return g


def ref_ce(logits, labels):
    return np.mean([-ref_log_softmax(lg)[y] for lg, y in zip(logits, labels, strict=True)])


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    actual = np.asarray(actual)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------- against references


@pytest.mark.parametrize("shape", [(2, 3), (5, 3), (8, 16)])
@pytest.mark.parametrize("margin", [0.4, 0.0])
def test_intra_contrast_matches_reference(shape, margin):
    # Low dimensions give many negatives on both sides of the margin.
    z1, z2 = _rand(0, shape), _rand(1, shape, scale=3.0)
    assert_close(intra_contrast(z1, z2, margin=margin), ref_intra(z1, z2, margin))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 1, 1, 3), (5, 2, 2, 3), (4, 3, 1, 6)])
def test_pairwise_distances_matches_reference(kind, shape):
    x = _rand(2, shape)
    d = pairwise_distances(x, kind=kind)
    assert d.shape == (shape[0], shape[0])
    assert_close(d, ref_pairwise(x, kind))
    assert np.all(np.diag(np.asarray(d)) == 0.0)


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_pairwise_distances_flattens_2d(kind):
    x = _rand(3, (6, 7), scale=5.0)
    assert_close(pairwise_distances(x, kind=kind), ref_pairwise(x, kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.1])
@pytest.mark.parametrize("shape", [(2, 2, 1, 3), (6, 2, 2, 4)])
def test_transport_map_matches_reference(kind, temperature, shape):
    x = _rand(4, shape)
    pi = np.asarray(transport_map(x, kind=kind, temperature=temperature))
    assert_close(pi, ref_transport(x, kind, temperature))
    assert np.all(np.diag(pi) == 0.0)
    np.testing.assert_allclose(pi.sum(axis=1), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "b, s_shape, t_shape",
    [(2, (1, 1, 5), (2, 2, 3)), (5, (2, 2, 3), (1, 3, 7)), (7, (2, 1, 4), (3, 3, 2))],
)
def test_inter_contrast_matches_reference(kind, b, s_shape, t_shape):
    s, t = _rand(5, (b, *s_shape)), _rand(6, (b, *t_shape))
    # Temperature 0.1 sharpens the maps so that the loss is not near-constant.
    for temperature in (1.0, 0.1):
        got = inter_contrast(s, t, kind=kind, temperature=temperature)
        assert_close(got, ref_inter(s, t, kind, temperature))


# ----------------------------------------------------------------- readings (options)

SCALES = ("l2", "none", "mean")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("margin", [0.4, 0.0])
def test_intra_contrast_reductions_match_reference(reduction, margin):
    z1, z2 = _rand(40, (5, 3)), _rand(41, (5, 3), scale=3.0)
    got = intra_contrast(z1, z2, margin=margin, reduction=reduction)
    assert_close(got, ref_intra(z1, z2, margin, reduction))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize", SCALES)
def test_pairwise_distances_scales_match_reference(kind, normalize):
    # Raw features of norm ~2-6, so 'none' differs from 'l2'; small enough for the MMD kernels.
    x = _rand(42, (5, 2, 2, 3), scale=0.3 if kind == "mmd" else 2.0)
    d = pairwise_distances(x, kind=kind, normalize=normalize)
    assert_close(d, ref_pairwise(x, kind, normalize), rtol=2e-5)
    assert np.all(np.diag(np.asarray(d)) == 0.0)


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_mean_scale_is_invariant_to_feature_scale(kind):
    x = _rand(43, (6, 4))
    a = np.asarray(pairwise_distances(x, kind=kind, normalize="mean"))
    b = np.asarray(pairwise_distances(7.5 * x, kind=kind, normalize="mean"))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_allclose(a[off].mean(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize", SCALES)
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_transport_map_scales_match_reference(kind, normalize, temperature):
    x = _rand(44, (6, 2, 1, 3), scale=0.3 if kind == "mmd" else 2.0)
    pi = np.asarray(transport_map(x, kind=kind, temperature=temperature, normalize=normalize))
    assert_close(pi, ref_transport(x, kind, temperature, normalize), atol=2e-6)
    assert np.all(np.diag(pi) == 0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize", SCALES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inter_contrast_readings_match_reference(kind, normalize, reduction):
    scale = 0.3 if kind == "mmd" else 1.5
    s, t = _rand(45, (6, 2, 1, 3), scale), _rand(46, (6, 1, 3, 2), scale)
    kw = dict(kind=kind, normalize=normalize, reduction=reduction)
    for temperature in (1.0, 0.2):
        got = inter_contrast(s, t, temperature=temperature, **kw)
        assert_close(got, ref_inter(s, t, kind, temperature, normalize, reduction), rtol=2e-5)


@pytest.mark.parametrize("direction", ["teacher_student", "student_teacher"])
def test_soft_target_kl_directions_match_reference(direction):
    s, t = _rand(47, (6, 10), 3.0), _rand(48, (6, 10), 3.0)
    for temperature in (1.0, 4.0):
        got = soft_target_kl(s, t, temperature=temperature, direction=direction)
        assert_close(got, ref_kl(s, t, temperature, direction))
    other = "student_teacher" if direction == "teacher_student" else "teacher_student"
    assert not np.isclose(float(got), ref_kl(s, t, 4.0, other), rtol=1e-3)


def _grad_check(jax_fn, ref_fn, x, rtol=2e-3, atol=2e-5):
    got = np.asarray(jax.jit(jax.grad(jax_fn))(jnp.asarray(x)))
    np.testing.assert_allclose(got, ref_grad(ref_fn, x), rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_intra_contrast_gradients_match_reference(reduction):
    z2 = _rand(49, (4, 3), 2.0)
    _grad_check(
        lambda a: losses.intra_contrast(a, z2, margin=0.0, reduction=reduction),
        lambda a: ref_intra(a, z2, 0.0, reduction),
        _rand(50, (4, 3)),
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize", SCALES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inter_contrast_gradients_match_reference(kind, normalize, reduction):
    scale = 0.3 if kind == "mmd" else 1.5
    # 4 channels: for 'mmd', spatial unit vectors of 2 channels come close enough that the
    # sigma = 0.001 kernel turns float32 rounding into visible gradient error.
    t = _rand(51, (5, 1, 2, 4), scale)
    kw = dict(kind=kind, temperature=0.5, normalize=normalize, reduction=reduction)
    _grad_check(
        lambda a: losses.inter_contrast(a, t, **kw),
        lambda a: ref_inter(a, t, kind, 0.5, normalize, reduction),
        _rand(52, (5, 1, 2, 4), scale),
    )


@pytest.mark.parametrize("direction", ["teacher_student", "student_teacher"])
def test_soft_target_kl_gradients_match_reference(direction):
    t = _rand(53, (3, 5), 2.0)
    _grad_check(
        lambda a: losses.soft_target_kl(a, t, temperature=2.0, direction=direction),
        lambda a: ref_kl(a, t, 2.0, direction),
        _rand(54, (3, 5), 2.0),
    )


def test_default_readings_are_the_first_version():
    """The defaults of the public functions stay l2 / mean / teacher_student (calls written
    before the options existed keep their results bit for bit)."""
    x, y = _rand(55, (6, 2, 2, 3)), _rand(56, (6, 3, 1, 2))
    z1, z2 = _rand(57, (6, 4)), _rand(58, (6, 4))
    for kind in KINDS:
        assert np.array_equal(
            inter_contrast(x, y, kind=kind),
            inter_contrast(x, y, kind=kind, normalize="l2", reduction="mean"),
        )
    assert np.array_equal(intra_contrast(z1, z2), intra_contrast(z1, z2, reduction="mean"))
    assert np.array_equal(
        soft_target_kl(z1, z2), soft_target_kl(z1, z2, direction="teacher_student")
    )


def test_unknown_readings_are_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="normalize"):
        losses.pairwise_distances(x, normalize="max")
    with pytest.raises(ValueError, match="reduction"):
        losses.intra_contrast(x, x, reduction="median")
    with pytest.raises(ValueError, match="direction"):
        losses.soft_target_kl(x, x, direction="both")


@pytest.mark.parametrize(
    "x_shape, y_shape", [((5, 4), (3, 4)), ((2, 2, 3), (6, 2, 3)), ((8, 16), (8, 16))]
)
@pytest.mark.parametrize("normalize, sigmas", [(True, SIGMAS), (False, (0.5, 1.5))])
def test_mmd_matches_reference(x_shape, y_shape, normalize, sigmas):
    scale = 1.0 if normalize else 0.3
    x, y = _rand(7, x_shape, scale), _rand(8, y_shape, scale) + 0.2
    got = mmd(x, y, sigmas=sigmas, normalize=normalize)
    assert_close(got, ref_mmd(x, y, sigmas, normalize))


def test_mmd_close_pairs_small_sigma():
    # y_i is x_i moved by ~1e-4: only the sigma=0.001 kernel sees it, and it needs accurate
    # small squared distances (|a|^2 + |b|^2 - 2ab in float32 is off by ~1e-7, i.e. 10%).
    x = _rand(9, (6, 8))
    y = x + _rand(10, (6, 8), scale=1e-4)
    expected = ref_mmd(x, y, (0.001,))
    assert expected > 1e-3
    assert_close(mmd(x, y, sigmas=(0.001,)), expected, rtol=2e-3)


def test_soft_target_kl_matches_reference():
    for b, c, temperature in [(2, 3, 1.0), (6, 10, 4.0), (4, 7, 0.5)]:
        s, t = _rand(b, (b, c), 3.0), _rand(b + 1, (b, c), 3.0)
        got = soft_target_kl(s, t, temperature=temperature)
        assert_close(got, ref_kl(s, t, temperature))
        # Direction of the KL: teacher is the target distribution.
        assert not np.isclose(float(got), ref_kl(t, s, temperature), rtol=1e-3)


@pytest.mark.parametrize("shape", [(2, 3), (4, 3, 3, 5)])
def test_reconstruction_loss_matches_reference(shape):
    r, t = _rand(11, shape), _rand(12, shape)
    expected = np.mean((r.astype(np.float64) - t.astype(np.float64)) ** 2)
    assert_close(reconstruction_loss(r, t), expected)


@pytest.mark.parametrize("b, c", [(2, 3), (9, 10)])
def test_cross_entropy_matches_reference(b, c):
    logits = _rand(13, (b, c), 3.0)
    labels = np.random.default_rng(14).integers(0, c, size=b)
    assert_close(cross_entropy(logits, labels), ref_ce(logits, labels))


# ----------------------------------------------------------------- known values


@pytest.mark.parametrize("sigmas", [SIGMAS, (0.001,)])
@pytest.mark.parametrize("normalize", [True, False])
def test_mmd_of_identical_sets_is_zero(sigmas, normalize):
    x = _rand(15, (16, 4, 4, 8))
    assert abs(float(mmd(x, x, sigmas=sigmas, normalize=normalize))) < 1e-6
    assert abs(float(mmd(x, x.copy()[::-1], sigmas=sigmas, normalize=normalize))) < 1e-6


def test_intra_contrast_identical_separated_views_is_zero():
    z = np.eye(5, 8, dtype=np.float32) * np.float32([1, 2, 4, 0.5, 8])[:, None]
    assert float(intra_contrast(z, z, margin=0.4)) == 0.0


def test_intra_contrast_collapsed_batch():
    # All rows identical: every negative has cos 1, contributing (1 - margin) each.
    z = np.ones((4, 3), np.float32)
    np.testing.assert_allclose(float(intra_contrast(z, z, margin=0.4)), 0.6, rtol=1e-6)


def test_inter_contrast_known_values():
    # B = 2: both maps are [[0, 1], [1, 0]], so positives have cos 1 and negatives cos 0.
    s, t = _rand(16, (2, 5)), _rand(17, (2, 2, 2, 3))
    for kind in KINDS:
        if kind == "mmd":
            s_k = s.reshape(2, 1, 1, 5)
        else:
            s_k = s
        assert abs(float(inter_contrast(s_k, t, kind=kind))) < 1e-6
    # Identical features in both models: loss = mean_k mean_{j!=k} cos(P_k, P_j).
    x = _rand(18, (5, 6))
    p = ref_transport(x, "euclidean", 1.0)
    neg = [[ref_cos(p[k], p[j]) for j in range(5) if j != k] for k in range(5)]
    expected = np.mean([np.mean(row) for row in neg])
    assert_close(inter_contrast(x, x), expected)


def test_soft_target_kl_identical_logits_is_zero():
    s = _rand(19, (5, 7), 4.0)
    for temperature in (1.0, 3.0):
        assert abs(float(soft_target_kl(s, s, temperature=temperature))) < 1e-6


def test_pairwise_distances_identical_samples():
    x = _rand(20, (4, 2, 2, 3))
    x[2] = x[0]
    for kind in KINDS:
        d = np.asarray(pairwise_distances(x, kind=kind))
        assert np.all(np.diag(d) == 0.0)
        assert np.all(d >= 0.0)
        np.testing.assert_allclose(d, d.T, atol=1e-6)
        assert abs(d[0, 2]) < 1e-3


def test_invalid_arguments():
    with pytest.raises(ValueError):
        pairwise_distances(np.zeros((3, 4), np.float32), kind="manhattan")
    with pytest.raises(ValueError):
        pairwise_distances(np.zeros((3, 4), np.float32), kind="mmd")
    with pytest.raises(ValueError):
        inter_contrast(np.zeros((3, 4), np.float32), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError):
        mmd(np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32))


# ----------------------------------------------------------------- gradients, jit, dtypes


def _dup(seed, shape):
    """Random batch whose samples 0 and 1 are identical."""
    x = _rand(seed, shape)
    x[1] = x[0]
    return x


def _grad_cases():
    """name -> (functions of one array, input shape). Raw (unjitted) library functions."""
    w = _rand(21, (4, 4))
    cases = {
        "intra": (
            [
                lambda a: losses.intra_contrast(a, a[::-1] * 2.0),
                lambda a: losses.intra_contrast(a, a),  # identical views
            ],
            (4, 5),
        ),
        # Different sizes; y shares rows with x (identical rows across the two sets).
        "mmd_loss": ([lambda a: losses.mmd(a, a[1:])], (4, 5)),
        "logits": (
            [
                lambda a: losses.soft_target_kl(a, a[::-1]),
                lambda a: losses.reconstruction_loss(a, a[::-1]),
                lambda a: losses.cross_entropy(a, jnp.array([0, 1, 2, 3])),
            ],
            (4, 5),
        ),
    }
    for kind in KINDS:
        cases[f"distances_{kind}"] = (
            [
                lambda a, k=kind: jnp.sum(w * losses.pairwise_distances(a, kind=k)),
                lambda a, k=kind: jnp.sum(w * losses.transport_map(a, kind=k)),
                lambda a, k=kind: losses.inter_contrast(a, a[..., :2] ** 2, kind=k),
            ],
            (4, 2, 2, 3),
        )
    return cases


GRAD_CASES = _grad_cases()


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_finite_with_duplicate_samples(name):
    fns, shape = GRAD_CASES[name]
    # One compile for all functions of a case (XLA shares their common subexpressions).
    grads = jax.jit(lambda a: [jax.grad(f)(a) for f in fns])
    for x in (_rand(22, shape), _dup(23, shape)):
        for i, g in enumerate(grads(jnp.asarray(x))):
            g = np.asarray(g)
            assert g.shape == x.shape
            assert np.all(np.isfinite(g)), (name, i)
            assert np.any(g != 0.0), (name, i)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite_with_zero_vectors(kind):
    x = _rand(24, (3, 2, 2, 4))
    x[0, 0, 0] = 0.0  # a zero spatial vector (as after a ReLU)
    x[1] = 0.0  # an all-zero sample
    g = jax.jit(jax.grad(lambda a: jnp.sum(transport_map(a, kind=kind)[0] ** 2)))(x)
    assert np.all(np.isfinite(np.asarray(g)))


def test_eager_matches_jit():
    # Everything else runs under jax.jit; eager (op-by-op) dispatch is slow on this small CPU,
    # so it is only spot-checked.
    z1, z2 = _rand(25, (4, 3)), _rand(26, (4, 3))
    np.testing.assert_allclose(
        losses.intra_contrast(z1, z2), intra_contrast(z1, z2), rtol=1e-6, atol=1e-7
    )


def test_jit_with_keyword_arguments():
    x, y = _rand(26, (4, 2, 2, 3)), _rand(27, (4, 1, 3, 2))
    f = jax.jit(lambda a, b: inter_contrast(a, b, kind="mmd", temperature=0.5))
    assert_close(f(x, y), ref_inter(x, y, "mmd", 0.5))


def test_bfloat16_inputs_give_float32_losses():
    a, b = jnp.asarray(_rand(28, (4, 2, 2, 3)), jnp.bfloat16), jnp.asarray(_rand(29, (4, 5)))
    b = b.astype(jnp.bfloat16)
    outs = [
        intra_contrast(b, b[::-1]),
        inter_contrast(a, b, kind="cosine"),
        mmd(b, b[:2]),
        soft_target_kl(b, b[::-1]),
        reconstruction_loss(a, a),
        cross_entropy(b, jnp.array([0, 1, 2, 3])),
    ]
    for out in outs:
        assert out.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(out)))
