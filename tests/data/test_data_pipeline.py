"""Host batching order and on-device augmentation (cka_jax.data.pipeline / .augment)."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    Split,
    augment_batch,
    augment_config,
    augment_with_keys,
    epoch_order,
    eval_batches,
    eval_kwargs,
    eval_preprocess,
    num_batches,
    pipeline,
    train_batch,
    train_kwargs,
    two_views,
)
from cka_jax.data import augment as aug

# --- pipeline -----------------------------------------------------------------------------


def _split(n, size=4, channels=1):
    # Image i is filled with i % 256 and labelled i % 7, so a batch reveals its indices.
    images = (np.arange(n) % 256).astype(np.uint8)[:, None, None, None]
    images = np.broadcast_to(images, (n, size, size, channels)).copy()
    return Split(images, (np.arange(n) % 7).astype(np.int32))


def test_num_batches_drops_remainder():
    assert num_batches(10, 3) == 3
    assert num_batches(9, 3) == 3
    assert num_batches(2, 3) == 0
    with pytest.raises(ValueError):
        num_batches(10, 0)


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=3, epoch=0)
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    np.testing.assert_array_equal(a, epoch_order(50, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=4, epoch=0))
    with pytest.raises(ValueError):  # the cached order must not be modifiable
        a[0] = 7


def test_train_batch_visits_every_index_once_per_epoch():
    split = _split(23)
    b, steps = 5, num_batches(23, 5)
    for epoch in range(2):
        seen = []
        for s in range(epoch * steps, (epoch + 1) * steps):
            batch = train_batch(split, b, seed=1, step=s)
            assert batch["image"].shape == (b, 4, 4, 1) and batch["image"].dtype == np.uint8
            np.testing.assert_array_equal(batch["label"], batch["index"] % 7)
            np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["index"] % 256)
            seen += batch["index"].tolist()
        assert len(seen) == len(set(seen)) == steps * b  # 3 dropped, none repeated
        np.testing.assert_array_equal(seen, epoch_order(23, 1, epoch)[: steps * b])


def test_train_batch_is_resumable_from_seed_and_step():
    split = _split(40)
    run = [train_batch(split, 8, seed=5, step=s)["index"] for s in range(12)]
    pipeline._order.cache_clear()  # a fresh process resuming at step 7
    resumed = [train_batch(split, 8, seed=5, step=s)["index"] for s in range(7, 12)]
    for a, b in zip(run[7:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # Epoch 1 (steps 5..9) is a different order from epoch 0 (steps 0..4).
    assert not np.array_equal(np.concatenate(run[:5]), np.concatenate(run[5:10]))
    # Another seed, another order.
    assert not np.array_equal(run[0], train_batch(split, 8, seed=6, step=0)["index"])


def test_train_batch_errors():
    with pytest.raises(ValueError, match="larger than the split"):
        train_batch(_split(3), 4, seed=0, step=0)
    with pytest.raises(ValueError, match="non-negative"):
        train_batch(_split(8), 4, seed=0, step=-1)


@pytest.mark.parametrize("n,b", [(10, 4), (12, 4), (3, 8)])
def test_eval_batches_cover_every_image_once_with_masked_padding(n, b):
    split = _split(n)
    batches = list(eval_batches(split, b))
    assert len(batches) == -(-n // b)
    for batch in batches:  # static shapes
        assert batch["image"].shape == (b, 4, 4, 1) and batch["label"].shape == (b,)
        assert batch["mask"].shape == (b,)
    mask = np.concatenate([x["mask"] for x in batches])
    index = np.concatenate([x["index"] for x in batches])
    label = np.concatenate([x["label"] for x in batches])
    assert mask.sum() == n
    np.testing.assert_array_equal(index[mask == 1], np.arange(n))
    np.testing.assert_array_equal(label[mask == 1], split.labels)
    assert np.all(index[mask == 0] == -1)
    # A masked mean over the batches equals the plain mean over the split.
    values = np.concatenate([x["image"][:, 0, 0, 0] for x in batches]).astype(float)
    assert (values * mask).sum() / mask.sum() == pytest.approx(split.images[:, 0, 0, 0].mean())


# --- augmentation -------------------------------------------------------------------------

# One small configuration shared by most tests (each distinct configuration compiles once).
FULL = dict(
    out_size=16,
    crop_scale=(0.08, 1.0),
    flip=True,
    color_jitter=(0.4, 0.4, 0.4, 0.1),
    jitter_prob=0.8,
    grayscale_prob=0.2,
    blur_prob=0.5,
    blur_kernel=3,
)
OFF = dict(crop_scale=None, flip=False, color_jitter=None, blur_prob=0.0)


def _images(b=8, size=20, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (b, size, size, channels), dtype=np.uint8)


def _unnormalise(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return np.asarray(x) * np.asarray(std) + np.asarray(mean)


def test_augment_shapes_range_and_determinism():
    images = _images()
    key = jax.random.key(0)
    out = augment_batch(key, images, **FULL)
    assert out.shape == (8, 16, 16, 3) and out.dtype == jnp.float32
    pixels = _unnormalise(out)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert pixels.std() > 0.05  # not collapsed to a constant
    np.testing.assert_array_equal(out, augment_batch(key, images, **FULL))  # same key
    assert not np.allclose(out, augment_batch(jax.random.key(1), images, **FULL))


def test_two_views_differ_and_samples_get_their_own_keys():
    same = np.repeat(_images(b=1), 8, axis=0)  # eight copies of one image
    v1, v2 = two_views(jax.random.key(3), same, **FULL)
    assert v1.shape == v2.shape == (8, 16, 16, 3)
    assert not np.allclose(v1, v2)
    # Identical inputs in one batch are augmented differently (per-sample keys).
    assert all(not np.allclose(v1[0], v1[i]) for i in range(1, 8))
    w1, w2 = two_views(jax.random.key(3), same, **FULL)
    np.testing.assert_array_equal(v1, w1)
    np.testing.assert_array_equal(v2, w2)


def test_augment_with_keys_depends_only_on_each_samples_key_and_image():
    images = _images()
    keys = jax.random.split(jax.random.key(7), 8)
    out = augment_with_keys(keys, images, **FULL)
    np.testing.assert_array_equal(out, augment_batch(jax.random.key(7), images, **FULL))
    perm = np.random.default_rng(0).permutation(8)
    np.testing.assert_allclose(
        augment_with_keys(keys[perm], images[perm], **FULL), out[perm], atol=1e-6
    )
    changed = images.copy()
    changed[1:] = 255 - changed[1:]  # other rows change, row 0 must not
    np.testing.assert_allclose(augment_with_keys(keys, changed, **FULL)[0], out[0], atol=1e-6)
    raw = jax.random.key_data(keys)  # raw uint32 keys work too
    np.testing.assert_allclose(augment_with_keys(raw, images, **FULL), out, atol=1e-6)
    with pytest.raises(ValueError, match="keys"):
        augment_with_keys(keys[:3], images, **FULL)


def test_augment_works_inside_jit():
    f = jax.jit(lambda k, x: augment_batch(k, x, **FULL))
    images = _images()
    np.testing.assert_allclose(
        f(jax.random.key(2), images), augment_batch(jax.random.key(2), images, **FULL), atol=1e-5
    )


def test_everything_off_is_exactly_normalisation_and_gray_is_tiled():
    gray = _images(channels=1)
    out = augment_batch(jax.random.key(0), gray, out_size=20, mean=MNIST_MEAN, std=MNIST_STD, **OFF)
    expected = (gray / 255.0 - MNIST_MEAN[0]) / MNIST_STD[0]
    assert out.shape == (8, 20, 20, 3)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], expected[..., 0], atol=1e-5)
    one = augment_batch(jax.random.key(0), _images(), out_size=20, channels=1, **OFF)
    assert one.shape == (8, 20, 20, 1)


def test_full_area_crop_is_the_identity():
    images = _images()
    out = augment_batch(
        jax.random.key(0),
        images,
        out_size=20,
        crop_scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip=False,
        color_jitter=None,
        blur_prob=0.0,
    )
    np.testing.assert_allclose(_unnormalise(out), images / 255.0, atol=1e-5)


def test_random_crops_zoom_in():
    # A vertical black/white edge: crops of at most 25% of the area, resized up, see
    # widely varying white fractions, unlike the full image (always one half).
    images = np.zeros((16, 32, 32, 3), np.uint8)
    images[:, :, 16:] = 255
    out = _unnormalise(
        augment_batch(
            jax.random.key(0),
            images,
            out_size=32,
            crop_scale=(0.05, 0.25),
            flip=False,
            color_jitter=None,
            blur_prob=0.0,
        )
    )
    white = out.mean(axis=(1, 2, 3))
    assert white.max() - white.min() > 0.5


def test_flip_mirrors_about_half_of_the_images():
    images = _images(b=32, size=16)
    out = _unnormalise(
        augment_batch(jax.random.key(1), images, out_size=16, **dict(OFF, flip=True))
    )
    ref = images / 255.0
    same = np.isclose(out, ref, atol=1e-5).all(axis=(1, 2, 3))
    mirrored = np.isclose(out, ref[:, :, ::-1], atol=1e-5).all(axis=(1, 2, 3))
    assert np.all(same ^ mirrored)
    assert 4 <= mirrored.sum() <= 28


def test_brightness_jitter_scales_each_image_by_one_factor_in_range():
    images = np.full((16, 8, 8, 3), 100, np.uint8)
    out = _unnormalise(
        augment_batch(
            jax.random.key(0),
            images,
            out_size=8,
            **dict(OFF, color_jitter=(0.4, 0, 0, 0), jitter_prob=1.0),
        )
    )
    ratio = out / (100 / 255)
    per_image = ratio.reshape(16, -1)
    # One factor per image:
    np.testing.assert_allclose(
        per_image, np.broadcast_to(per_image[:, :1], per_image.shape), atol=1e-5
    )
    assert per_image.min() >= 0.6 - 1e-5 and per_image.max() <= 1.4 + 1e-5
    assert per_image[:, 0].std() > 0.05


def test_hue_matches_colorsys():
    x = np.random.default_rng(0).random((300, 3)).astype(np.float32)
    x[:3] = x[:3, :1]  # gray pixels have no hue
    got = np.asarray(jax.jit(aug.adjust_hue)(jnp.asarray(x), 0.13))
    want = [
        colorsys.hsv_to_rgb((h + 0.13) % 1, s, v)
        for h, s, v in (colorsys.rgb_to_hsv(*p) for p in x)
    ]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blur_matches_reflect_padded_convolution():
    rng = np.random.default_rng(0)
    img = rng.random((10, 10, 2)).astype(np.float32)
    sigma, k = 1.3, 5
    got = np.asarray(jax.jit(aug.blur, static_argnums=2)(jnp.asarray(img), sigma, k))
    taps = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
    taps /= taps.sum()
    want = np.pad(img, ((2, 2), (0, 0), (0, 0)), mode="reflect")
    want = sum(taps[i] * want[i : i + 10] for i in range(k))
    want = np.pad(want, ((0, 0), (2, 2), (0, 0)), mode="reflect")
    want = sum(taps[i] * want[:, i : i + 10] for i in range(k))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_resample_matches_jax_scale_and_translate():
    img = jnp.asarray(np.random.default_rng(1).random((20, 24, 3)), jnp.float32)
    out = 16

    @jax.jit
    def reference(scale, translation):
        return jax.image.scale_and_translate(
            img, (out, out, 3), (0, 1), scale, translation, method="linear", antialias=True
        )

    resample = jax.jit(lambda *a: aug.resample(a[0], out, *a[1:]))

    # Upsampling a small box, and shrinking the whole image (antialiased).
    for y0, x0, h, w in [(3.0, 5.0, 11.0, 7.0), (0.0, 0.0, 20.0, 24.0), (2.0, 1.0, 18.0, 23.0)]:
        got = resample(img, y0, x0, h, w)
        sy, sx = out / h, out / w
        want = reference(jnp.array([sy, sx]), jnp.array([-y0 * sy, -x0 * sx]))
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_eval_preprocess_is_a_deterministic_center_crop():
    images = _images(size=32)
    out = eval_preprocess(images, out_size=28, crop_fraction=0.875)
    np.testing.assert_array_equal(out, eval_preprocess(images, out_size=28, crop_fraction=0.875))
    np.testing.assert_allclose(_unnormalise(out), images[:, 2:30, 2:30] / 255.0, atol=1e-5)
    small = eval_preprocess(images, out_size=16, crop_fraction=0.5)  # crop 16 of 32: exact
    np.testing.assert_allclose(_unnormalise(small), images[:, 8:24, 8:24] / 255.0, atol=1e-5)
    gray = eval_preprocess(
        _images(channels=1, size=28), out_size=28, crop_fraction=1.0, mean=MNIST_MEAN, std=MNIST_STD
    )
    assert gray.shape == (8, 28, 28, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_augment_config_presets_and_kwargs():
    mnist = augment_config("mnist")
    assert mnist.flip is False and mnist.out_size == 28
    images = _images(b=4, size=28, channels=1)
    out = augment_batch(jax.random.key(0), images, **train_kwargs(mnist))
    assert out.shape == (4, 28, 28, 3)
    assert eval_preprocess(images, **eval_kwargs(mnist)).shape == (4, 28, 28, 3)
    imagenet = augment_config("imagenet")
    assert imagenet.out_size == 224 and imagenet.flip is True
    assert set(eval_kwargs(imagenet)) == {"out_size", "channels", "mean", "std", "crop_fraction"}
    with pytest.raises(ValueError):
        augment_config("nope")


def test_augment_rejects_bad_arguments():
    with pytest.raises(ValueError, match="images"):
        augment_batch(jax.random.key(0), np.zeros((4, 8, 8), np.uint8), out_size=8)
    with pytest.raises(ValueError, match="crop_scale"):
        augment_batch(jax.random.key(0), _images(), out_size=8, crop_scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="blur_kernel"):
        augment_batch(jax.random.key(0), _images(), out_size=8, blur_kernel=4)
    with pytest.raises(ValueError, match="crop_fraction"):
        eval_preprocess(_images(), out_size=8, crop_fraction=0.0)
