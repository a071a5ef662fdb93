"""Inference: bilinear resizing back to the label resolution, sliding windows, predictions,
test-time augmentation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tce_jax import inference

# Jitted: one compilation per shape instead of one per operation.
resize_bilinear = jax.jit(inference.resize_bilinear, static_argnums=1)
image_resize = jax.jit(jax.image.resize, static_argnums=(1, 2))


def test_resize_bilinear_is_torch_bilinear_without_antialiasing():
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
    full = jnp.array([[5, 7], [5, 7]])
    up = resize_bilinear(x, (11, 16), full, jnp.array([[11, 16], [11, 16]]))
    np.testing.assert_allclose(up, image_resize(x, (2, 11, 16, 3), "bilinear"), atol=1e-6)
    down = resize_bilinear(x, (3, 4), full, jnp.array([[3, 4], [3, 4]]))
    reference = jax.jit(
        lambda x: jax.image.scale_and_translate(
            x,
            (2, 3, 4, 3),
            (1, 2),
            jnp.array([3 / 5, 4 / 7]),
            jnp.zeros(2),
            "linear",
            antialias=False,
        )  # fmt: skip
    )(x)
    np.testing.assert_allclose(down, reference, atol=1e-5)
    # torch.nn.functional.interpolate(x, size=(1, 2), mode="bilinear", align_corners=False)
    # on [[0, 1, 2, 3]] samples source columns 0.5 and 2.5: values 0.5 and 2.5.
    row = jnp.arange(4.0).reshape(1, 1, 4, 1)
    np.testing.assert_allclose(
        resize_bilinear(row, (1, 2), jnp.array([[1, 4]]), jnp.array([[1, 2]]))[0, 0, :, 0],
        [0.5, 2.5],
    )


def test_resize_reads_each_examples_valid_region_and_writes_its_own_size():
    x = jax.random.normal(jax.random.key(1), (2, 6, 9, 2))
    canvas = jnp.zeros((2, 8, 10, 2)).at[0, :5, :7].set(x[0, :5, :7]).at[1, :6, :9].set(x[1])
    out = resize_bilinear(
        canvas, (13, 20), jnp.array([[5, 7], [6, 9]]), jnp.array([[11, 16], [13, 20]])
    )
    np.testing.assert_allclose(
        out[0, :11, :16], image_resize(x[0, :5, :7], (11, 16, 2), "bilinear"), atol=1e-6
    )
    np.testing.assert_allclose(out[1], image_resize(x[1], (13, 20, 2), "bilinear"), atol=1e-6)


class PixelwiseModel(nn.Module):
    """A 1x1 conv: its receptive field (one pixel) lies inside any window."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(5, (1, 1))(x)


@pytest.fixture(scope="module")
def pixelwise():
    model = PixelwiseModel()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    return lambda images: model.apply(variables, images)


def test_sliding_windows_equal_the_whole_image_for_a_pixelwise_model(pixelwise):
    images = jax.random.normal(jax.random.key(2), (3, 40, 56, 3))
    whole = inference.whole_image_logits(pixelwise, images)
    valid = jnp.array([[40, 56], [33, 41], [12, 20]])  # the last is smaller than a window
    slide = jax.jit(
        lambda x, v: inference.sliding_window_logits(
            pixelwise, x, window=(16, 24), stride=(11, 16), valid_size=v
        )
    )(images, valid)
    for b, (h, w) in enumerate(np.asarray(valid)):
        np.testing.assert_allclose(slide[b, :h, :w], whole[b, :h, :w], rtol=1e-5, atol=1e-5)
    # The canvas itself smaller than the window: zero padding, then cropped back.
    small = images[:, :10, :12]
    slide_small = jax.jit(
        lambda x: inference.sliding_window_logits(pixelwise, x, window=(16, 24), stride=(8, 8))
    )
    np.testing.assert_allclose(slide_small(small), whole[:, :10, :12], rtol=1e-5, atol=1e-5)


def test_sliding_windows_follow_mmsegmentation_slide_mode():
    """Cityscapes 1024x2048 with 512x1024 windows and stride 341x682: 3 x 3 windows, the
    last row/column moved back to end at the border; overlaps averaged."""
    seen = []

    def record(images):  # logits = the window's top-left corner, as seen through its pixels
        seen.append(images.shape)
        return jnp.broadcast_to(images[..., :1], (*images.shape[:3], 2))

    images = jnp.zeros((1, 1024, 2048, 3)).at[..., 0].set(1.0)
    out = jax.jit(
        lambda x: inference.sliding_window_logits(record, x, window=(512, 1024), stride=(341, 682))
    )(images)
    assert seen[-1] == (1, 512, 1024, 3)
    np.testing.assert_allclose(out, 1.0)
    assert int(inference._num_windows(jnp.array(1024), 512, 341)) == 3
    assert int(inference._num_windows(jnp.array(2048), 1024, 682)) == 3
    assert int(inference._num_windows(jnp.array(300), 512, 341)) == 1


def test_predict_labels_at_label_resolution(pixelwise):
    images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    image_size = jnp.array([[16, 12], [10, 16]])
    label_size = jnp.array([[32, 24], [15, 24]])
    mask = jnp.array([True, True])
    predict = jax.jit(
        lambda *a: inference.predict_labels(
            pixelwise, a[0], label_shape=(32, 24), image_size=a[1], label_size=a[2], mask=a[3]
        )
    )
    predictions = predict(images, image_size, label_size, mask)
    logits = pixelwise(images)
    sizes = zip(image_size.tolist(), label_size.tolist(), strict=True)
    for b, ((ih, iw), (lh, lw)) in enumerate(sizes):
        resized = image_resize(logits[b, :ih, :iw], (lh, lw, 5), "bilinear")
        np.testing.assert_array_equal(predictions[b, :lh, :lw], jnp.argmax(resized, -1))
    # Padding examples (mask False) are not computed.
    skipped = predict(images, image_size, label_size, jnp.array([True, False]))
    assert (skipped[1] == 0).all()
    np.testing.assert_array_equal(skipped[0], predictions[0])
    # No sizes and a canvas of the label shape: the logits' argmax as it is.
    np.testing.assert_array_equal(
        inference.predict_labels(pixelwise, images, label_shape=(16, 16)),
        jnp.argmax(logits, -1),
    )


# ---------------------------------------------------------------------------------------------
# Test-time augmentation, against a hand computation in numpy.

MIX = np.random.default_rng(0).normal(size=(3, 4))  # pixel -> 4 logits
NEIGHBOUR = np.random.default_rng(1).normal(size=(3, 4))  # right neighbour -> logits


def linear_model(images):
    """Logits = the pixel's colour times MIX plus its right neighbour's times NEIGHBOUR (zero
    beyond the last column): linear in the pixels, and not mirror-symmetric, so a flip that
    is not undone, or undone in the wrong place, changes the result."""
    neighbour = jnp.pad(images[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0)))
    mix, right = (jnp.asarray(m, images.dtype) for m in (MIX, NEIGHBOUR))
    return images @ mix + neighbour @ right


def numpy_linear_model(image):
    neighbour = np.pad(image[:, 1:], ((0, 0), (0, 1), (0, 0)))
    return image @ MIX + neighbour @ NEIGHBOUR


def numpy_bilinear(x, out_h, out_w):
    """torch's interpolate(mode="bilinear", align_corners=False), no antialiasing, in float64."""

    def taps(out_len, in_len):
        src = (np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5
        src = np.clip(src, 0, in_len - 1)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, in_len - 1), src - i0

    r0, r1, fr = taps(out_h, x.shape[0])
    c0, c1, fc = taps(out_w, x.shape[1])
    y = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    return y[:, c0] * (1 - fc)[None, :, None] + y[:, c1] * fc[None, :, None]


def numpy_tta(image, label_hw, scales, flip):
    """mmsegmentation's aug-test by hand: mean softmax over scales and flips."""
    h, w = image.shape[:2]
    total = 0.0
    count = 0
    for s in scales:
        hs, ws = max(int(np.round(h * s)), 1), max(int(np.round(w * s)), 1)
        scaled = image if s == 1.0 else numpy_bilinear(image, hs, ws)
        for flipped in (False, True) if flip else (False,):
            x = scaled[:, ::-1] if flipped else scaled
            logits = numpy_linear_model(x)
            logits = logits[:, ::-1] if flipped else logits
            logits = numpy_bilinear(logits, *label_hw)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            total = total + e / e.sum(-1, keepdims=True)
            count += 1
    return total / count


@pytest.mark.parametrize(
    "scales, flip", [((1.0,), True), ((0.75, 1.0, 1.5), False), ((0.5, 1.25), True)]
)
def test_tta_probabilities_equal_a_hand_computation(scales, flip):
    rng = np.random.default_rng(2)
    image_size = np.array([[20, 28], [13, 17]])
    label_size = np.array([[40, 56], [13, 17]])
    canvas = np.zeros((2, 20, 32, 3), np.float32)  # zero beyond each valid region
    images = [rng.normal(size=(h, w, 3)) for h, w in image_size]
    for b, img in enumerate(images):
        canvas[b, : img.shape[0], : img.shape[1]] = img
    tta = dict(label_shape=(40, 56), flip=flip, scales=scales)
    probs = jax.jit(functools.partial(inference.tta_probabilities, linear_model, **tta))(
        canvas, image_size=image_size, label_size=label_size
    )
    for b, (lh, lw) in enumerate(label_size):
        expected = numpy_tta(images[b], (lh, lw), scales, flip)
        np.testing.assert_allclose(probs[b, :lh, :lw], expected, rtol=1e-4, atol=1e-5)
    # The predictions are the argmax of those probabilities; padding examples are skipped.
    predict = jax.jit(functools.partial(inference.predict_labels, linear_model, **tta))
    predictions = predict(
        canvas, image_size=image_size, label_size=label_size, mask=jnp.array([True, False])
    )
    np.testing.assert_array_equal(predictions[0], jnp.argmax(probs[0], -1))
    assert (predictions[1] == 0).all()


def test_flip_within_the_valid_region_is_its_own_inverse():
    x = jnp.arange(2 * 1 * 6, dtype=jnp.float32).reshape(2, 1, 6, 1)
    flipped = inference.flip_valid_region(x, jnp.array([4, 6]))
    np.testing.assert_array_equal(flipped[0, 0, :, 0], [3, 2, 1, 0, 4, 5])
    np.testing.assert_array_equal(flipped[1, 0, :, 0], [11, 10, 9, 8, 7, 6])
    np.testing.assert_array_equal(inference.flip_valid_region(flipped, jnp.array([4, 6])), x)


def test_without_augmentation_tta_is_the_plain_prediction(pixelwise):
    images = jax.random.normal(jax.random.key(4), (2, 16, 16, 3))
    sizes = {"image_size": jnp.array([[16, 12], [10, 16]])}
    sizes["label_size"] = jnp.array([[32, 24], [15, 24]])
    plain = inference.predict_labels(pixelwise, images, label_shape=(32, 24), **sizes)
    probs = inference.tta_probabilities(pixelwise, images, label_shape=(32, 24), **sizes)
    np.testing.assert_array_equal(plain[0], jnp.argmax(probs[0], -1))
    np.testing.assert_array_equal(plain[1, :15], jnp.argmax(probs[1, :15], -1))
