"""On-device augmentation: batched, jit-compiled jnp ops with one PRNG key per sample.

``augment_batch`` takes uint8 (B, H, W, C) images (C = 1 or 3) and returns normalised
float32 (B, out_size, out_size, channels). Per sample, in torchvision's order:
RandomResizedCrop -> HorizontalFlip -> ColorJitter (random order of brightness, contrast,
saturation, hue; applied with ``jitter_prob``) -> RandomGrayscale -> GaussianBlur
(``blur_prob``) -> Normalize. Every step can be switched off (``crop_scale=None``,
``flip=False``, ``color_jitter=None``, ``grayscale_prob=0``, ``blur_prob=0``).

Shapes never depend on data: each crop box is resampled to the fixed output size by two
small matrix products (bilinear weights, antialiased when shrinking: the weights of
``jax.image.scale_and_translate``), and the blur is a matrix product too, which keeps the
program small and fast on CPU as well as on accelerators.

Grayscale inputs stay single-channel through the geometric and blur steps (saturation and
hue are no-ops on gray images) and are tiled to 3 channels at the end when
``channels=3``; RGB inputs with ``channels=1`` are converted to luma.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .presets import (  # noqa: F401 - re-exported: the presets belong to the augmentation
    CIFAR10_MEAN,
    CIFAR10_STD,
    EVAL_KEYS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    TRAIN_KEYS,
    augment_config,
    eval_kwargs,
    train_kwargs,
)

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL and torchvision


# --- single-image ops (float32 in [0, 1], (H, W, C)) --------------------------------------

# Every random number a sample needs comes from ONE uniform draw of this many values (a
# single threefry call per sample keeps the compiled program small):
_U_AREA, _U_RATIO, _U_Y, _U_X = slice(0, 10), slice(10, 20), 20, 21
_U_FLIP, _U_JITTER_P, _U_FACTORS, _U_ORDER = 22, 23, slice(24, 28), slice(28, 32)
_U_GRAY, _U_BLUR_P, _U_SIGMA = 32, 33, 34
_NUM_U = 35


def _gray(img: jnp.ndarray) -> jnp.ndarray:
    if img.shape[-1] == 1:
        return img
    return jnp.tensordot(img, jnp.asarray(_LUMA, img.dtype), axes=([-1], [0]))[..., None]


def _resize_matrix(out_size: int, in_size: int, start, length) -> jnp.ndarray:
    """(out_size, in_size) weights resampling [start, start + length) of a 1-D signal.

    Bilinear (triangle kernel) with antialiasing when shrinking, pixel centres at i + 0.5,
    rows normalised over the pixels that exist: the same weights as
    ``jax.image.scale_and_translate(method='linear', antialias=True)``.
    """
    scale = out_size / length
    centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / scale
    dist = jnp.arange(in_size, dtype=jnp.float32)[None, :] + 0.5 - centre[:, None]
    w = jnp.maximum(0.0, 1.0 - jnp.abs(dist * jnp.minimum(scale, 1.0)))
    return w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def resample(img: jnp.ndarray, out_size: int, y0, x0, h, w) -> jnp.ndarray:
    """The box [y0, y0+h) x [x0, x0+w) (pixels; may be traced) resized to out_size^2."""
    my = _resize_matrix(out_size, img.shape[0], y0, h)
    mx = _resize_matrix(out_size, img.shape[1], x0, w)
    img = jnp.einsum("oh,hwc->owc", my, img, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,owc->opc", mx, img, precision=jax.lax.Precision.HIGHEST)


def _crop_box(u, height: int, width: int, scale, ratio):
    """torchvision's RandomResizedCrop.get_params (10 attempts, then a central fallback)."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[_U_AREA])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(lo + (hi - lo) * u[_U_RATIO])
    w = jnp.round(jnp.sqrt(target * aspect))
    h = jnp.round(jnp.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(ok)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    any_ok = ok.any()
    h = jnp.where(any_ok, h[first], fh)
    w = jnp.where(any_ok, w[first], fw)
    y0 = jnp.where(any_ok, jnp.floor(u[_U_Y] * (height - h + 1)), (height - fh) // 2)
    x0 = jnp.where(any_ok, jnp.floor(u[_U_X] * (width - w + 1)), (width - fw) // 2)
    return y0, x0, h, w


def _rgb_to_hsv(img):
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc = jnp.max(img, axis=-1)
    minc = jnp.min(img, axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    crd = jnp.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(eqc, 0.0, h)
    return jnp.mod(h / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h, s, v):
    # Closed form of the sector table: channel n in (5, 3, 1) for (r, g, b).
    k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0]) + h[..., None] * 6.0, 6.0)
    ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[..., None] * (1.0 - s[..., None] * ramp)


def adjust_hue(img, shift):
    """Rotates the hue of an RGB image (H, W, 3) in [0, 1] by ``shift`` turns (torchvision's
    ``adjust_hue``)."""
    h, s, v = _rgb_to_hsv(img)
    return _hsv_to_rgb(jnp.mod(h + shift, 1.0), s, v)


def _color_jitter(u, img, strengths):
    """torchvision ColorJitter: each enabled adjustment once, in a random order.

    Brightness, contrast and saturation are all ``clip(f * x + (1 - f) * ref)`` with
    ref = 0, the mean gray level, or the per-pixel gray level; hue rotates H in HSV. The
    linear steps before the hue step and those after it run in two masked scans, so hue is
    computed once per image whatever its position.
    """
    brightness, contrast, saturation, hue = strengths
    rgb = img.shape[-1] == 3
    ops = []  # (kind, low, high)
    if brightness > 0:
        ops.append(("brightness", max(0.0, 1 - brightness), 1 + brightness))
    if contrast > 0:
        ops.append(("contrast", max(0.0, 1 - contrast), 1 + contrast))
    if saturation > 0 and rgb:
        ops.append(("saturation", max(0.0, 1 - saturation), 1 + saturation))
    if hue > 0 and rgb:
        ops.append(("hue", -hue, hue))
    if not ops:
        return img
    kinds = [k for k, _, _ in ops]
    n = len(ops)
    lo = jnp.asarray([o[1] for o in ops], jnp.float32)
    hi = jnp.asarray([o[2] for o in ops], jnp.float32)
    factors = lo + (hi - lo) * u[_U_FACTORS][:n]
    order = jnp.argsort(u[_U_ORDER][:n])  # a uniformly random permutation of the ops
    hue_at = jnp.argmax(order == kinds.index("hue")) if "hue" in kinds else n

    def linear(x, j, apply):
        f = jnp.where(apply, factors[j], 1.0)
        ref = jnp.zeros((), x.dtype)
        if "contrast" in kinds:
            ref = jnp.where(j == kinds.index("contrast"), _gray(x).mean(), ref)
        if "saturation" in kinds:
            ref = jnp.where(j == kinds.index("saturation"), _gray(x), ref)
        return jnp.clip(f * x + (1.0 - f) * ref, 0.0, 1.0)

    def run(x, before_hue: bool):
        # The linear ops placed before (or after) the hue step, in their random order; a
        # scan keeps one copy of the step in the program.
        def step(x, t):
            j = order[t]
            apply = (t < hue_at) if before_hue else (t > hue_at)
            return linear(x, j, apply), None

        return jax.lax.scan(step, x, jnp.arange(n))[0]

    img = run(img, True)
    if "hue" in kinds:  # hue, the costly one, is computed once
        img = run(adjust_hue(img, factors[kinds.index("hue")]), False)
    return img


def _blur_matrix(size: int, sigma, kernel: int) -> jnp.ndarray:
    """(size, size) matrix of a 1-D Gaussian blur with reflect padding (torchvision's):
    entry (i, s) sums the taps of output i that read input s, directly or reflected."""
    r = kernel // 2
    norm = jnp.exp(-0.5 * (jnp.arange(-r, r + 1, dtype=jnp.float32) / sigma) ** 2).sum()
    i = jnp.arange(size)[:, None]
    s = jnp.arange(size)[None, :]

    def g(d):  # tap weight at offset d (0 outside the kernel)
        return jnp.where(jnp.abs(d) <= r, jnp.exp(-0.5 * (d / sigma) ** 2), 0.0) / norm

    return (
        g(s - i)
        + jnp.where(s >= 1, g(-s - i), 0.0)
        + jnp.where(s <= size - 2, g(2 * (size - 1) - s - i), 0.0)
    )


def blur(img, sigma, kernel: int):
    """Separable Gaussian blur of a square image, as two small matrix products."""
    m = _blur_matrix(img.shape[0], sigma, kernel)
    img = jnp.einsum("is,swc->iwc", m, img, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("jw,iwc->ijc", m, img, precision=jax.lax.Precision.HIGHEST)


def _finish(img, channels, mean, std):
    if channels == 3 and img.shape[-1] == 1:
        img = jnp.broadcast_to(img, (*img.shape[:-1], 3))
    elif channels == 1 and img.shape[-1] == 3:
        img = _gray(img)
    mean = jnp.asarray(mean[:channels], jnp.float32)
    std = jnp.asarray(std[:channels], jnp.float32)
    return (img - mean) / std


def _augment_one(
    key,
    image,
    *,
    out_size,
    channels,
    mean,
    std,
    crop_scale,
    ratio,
    flip,
    color_jitter,
    jitter_prob,
    grayscale_prob,
    blur_prob,
    blur_sigma,
    blur_kernel,
):
    u = jax.random.uniform(key, (_NUM_U,))
    img = image.astype(jnp.float32) / 255.0
    height, width = img.shape[:2]
    if crop_scale is not None:
        img = resample(img, out_size, *_crop_box(u, height, width, crop_scale, ratio))
    elif (height, width) != (out_size, out_size):
        img = resample(img, out_size, 0.0, 0.0, float(height), float(width))
    img = jnp.clip(img, 0.0, 1.0)
    if flip:
        img = jnp.where(u[_U_FLIP] < 0.5, img[:, ::-1], img)
    if color_jitter is not None and jitter_prob > 0:
        jittered = _color_jitter(u, img, color_jitter)
        img = jnp.where(u[_U_JITTER_P] < jitter_prob, jittered, img)
    if grayscale_prob > 0 and img.shape[-1] == 3:
        gray = jnp.broadcast_to(_gray(img), img.shape)
        img = jnp.where(u[_U_GRAY] < grayscale_prob, gray, img)
    if blur_prob > 0:
        sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[_U_SIGMA]
        img = jnp.where(u[_U_BLUR_P] < blur_prob, blur(img, sigma, blur_kernel), img)
    return _finish(img, channels, mean, std)


@functools.partial(jax.jit, static_argnames=TRAIN_KEYS)
def _augment_jit(keys, images, **kw):
    return jax.vmap(functools.partial(_augment_one, **kw))(keys, images)


def _pair(x, name) -> tuple[float, float] | None:
    if x is None:
        return None
    x = tuple(float(v) for v in x)
    if len(x) != 2 or x[0] > x[1]:
        raise ValueError(f"{name} must be a (low, high) pair, got {x}")
    return x


def _triple(x, name) -> tuple[float, ...]:
    x = tuple(float(v) for v in x)
    if len(x) == 1:
        x = x * 3
    if len(x) != 3:
        raise ValueError(f"{name} needs 1 or 3 values, got {x}")
    return x


def _check_images(images):
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W, C) with C in (1, 3), got {images.shape}")


def _train_static(
    *,
    out_size: int,
    channels: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: Sequence[float] | None = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip: bool = True,
    color_jitter: Sequence[float] | None = (0.4, 0.4, 0.4, 0.1),
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.0,
    blur_prob: float = 0.5,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    blur_kernel: int | None = None,
) -> dict:
    """Validates the augmentation arguments; returns them hashable (static for jit)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    jitter = None
    if color_jitter is not None:
        jitter = tuple(float(v) for v in color_jitter)
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(
                "color_jitter must be (brightness, contrast, saturation, hue) "
                f">= 0 with hue <= 0.5, got {color_jitter}"
            )
    if blur_kernel is None:
        blur_kernel = max(3, int(0.1 * out_size) // 2 * 2 + 1)
    if blur_kernel % 2 == 0 or blur_kernel < 1 or blur_kernel // 2 >= out_size:
        raise ValueError(
            f"blur_kernel must be an odd integer in [1, 2 * out_size), got {blur_kernel}"
        )
    return dict(
        out_size=int(out_size),
        channels=int(channels),
        mean=_triple(mean, "mean"),
        std=_triple(std, "std"),
        crop_scale=_pair(crop_scale, "crop_scale"),
        ratio=_pair(ratio, "ratio"),
        flip=bool(flip),
        color_jitter=jitter,
        jitter_prob=float(jitter_prob),
        grayscale_prob=float(grayscale_prob),
        blur_prob=float(blur_prob),
        blur_sigma=_pair(blur_sigma, "blur_sigma"),
        blur_kernel=int(blur_kernel),
    )


def augment_batch(key: jax.Array, images: jax.Array, **kw) -> jax.Array:
    """Random training views of uint8 images -> float32 (B, out_size, out_size, channels).

    ``key`` is split into one key per sample. Keyword arguments (defaults = the 'imagenet'
    preset):
      out_size: output side (required).
      channels: 3 (gray inputs tiled) or 1 (RGB inputs converted to luma).
      mean, std: normalisation (1 or 3 values), applied to [0, 1] pixels.
      crop_scale=(0.08, 1), ratio=(3/4, 4/3): RandomResizedCrop area fraction and aspect
        range; ``crop_scale=None`` = plain resize of the whole image.
      flip=True: random horizontal flip (p = 0.5). Digits and text must not be flipped.
      color_jitter=(0.4, 0.4, 0.4, 0.1): (brightness, contrast, saturation, hue) strengths
        as in torchvision; None = off. Applied with probability ``jitter_prob=0.8``.
      grayscale_prob=0: probability of converting an RGB view to gray.
      blur_prob=0.5, blur_sigma=(0.1, 2), blur_kernel=None: Gaussian blur probability,
        sigma range (output pixels) and odd kernel size (None = about 10% of out_size).
    """
    _check_images(images)
    return augment_with_keys(jax.random.split(key, images.shape[0]), images, **kw)


def augment_with_keys(keys: jax.Array, images: jax.Array, **kw) -> jax.Array:
    """``augment_batch`` with the per-sample keys given: ``keys[i]`` alone decides how
    image ``i`` is augmented (typed keys (B,) or raw uint32 keys (B, 2)). Deriving the keys
    from (step, dataset index) makes the views independent of how the batch is sharded."""
    _check_images(images)
    if keys.shape[0] != images.shape[0]:
        raise ValueError(f"{keys.shape[0]} keys for {images.shape[0]} images")
    return _augment_jit(keys, jnp.asarray(images), **_train_static(**kw))


def two_views(key: jax.Array, images: jax.Array, **kw) -> tuple[jax.Array, jax.Array]:
    """Two independently augmented views of the same images (for the contrastive losses)."""
    k1, k2 = jax.random.split(key)
    return augment_batch(k1, images, **kw), augment_batch(k2, images, **kw)


@functools.partial(jax.jit, static_argnames=EVAL_KEYS)
def _eval_jit(images, *, out_size, channels, mean, std, crop_fraction):
    img = images.astype(jnp.float32) / 255.0
    height, width = img.shape[1:3]
    side = crop_fraction * min(height, width)
    if (height, width) != (out_size, out_size) or side != out_size:
        my = _resize_matrix(out_size, height, (height - side) / 2, side)
        mx = _resize_matrix(out_size, width, (width - side) / 2, side)
        img = jnp.einsum("oh,bhwc->bowc", my, img, precision=jax.lax.Precision.HIGHEST)
        img = jnp.einsum("pw,bowc->bopc", mx, img, precision=jax.lax.Precision.HIGHEST)
    img = jnp.clip(img, 0.0, 1.0)
    return jax.vmap(lambda x: _finish(x, channels, mean, std))(img)


def eval_preprocess(
    images: jax.Array,
    *,
    out_size: int,
    channels: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_fraction: float = 0.875,
) -> jax.Array:
    """Deterministic test transform: the central square of ``crop_fraction`` of the shorter
    side, resized to ``out_size``, normalised (torchvision's Resize(out/crop_fraction) +
    CenterCrop(out)). With a 256 px cache and out_size 224 this is an exact 224 crop."""
    _check_images(images)
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must lie in (0, 1], got {crop_fraction}")
    return _eval_jit(
        jnp.asarray(images),
        out_size=int(out_size),
        channels=int(channels),
        mean=_triple(mean, "mean"),
        std=_triple(std, "std"),
        crop_fraction=float(crop_fraction),
    )
