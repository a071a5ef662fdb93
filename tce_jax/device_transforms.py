"""Image transforms that run on the device, inside the train and eval steps (jax.numpy).

Batches leave the input pipeline as uint8 (a quarter of the bytes of float32 to copy to the
device). The train step jitters them (`photometric_on_device`, with the draws the pipeline made
per example: `example_transforms.PHOTOMETRIC_SIZE` numbers each) and both steps normalise them
(`normalise_on_device`) before the model sees them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# ImageNet statistics of images in [0, 1]: the defaults of config.data.mean / config.data.std
# (`tce_jax.config_lib`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_on_device(images, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """float32 `(images / 255 - mean) / std` of uint8 (or 0..255) images [..., 3] (jax.numpy).

    Batches leave the input pipeline as uint8 (a quarter of the bytes of float32 to copy to
    the device); the train and eval steps call this first.
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _rgb_to_hsv(rgb):
    """TensorFlow's RGBToHSV kernel in jax.numpy: h in [0, 1), s in [0, 1], v = max(r, g, b)
    (any scale)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # The kernel's sector is the first channel equal to the maximum (r, then g, then b): an
    # argmax, not `r == max(r, g, b)`. XLA may compute a fused input once for the max and again
    # for the comparison, rounded differently (an FMA in one place only), and then no channel
    # equals the max: XLA:CPU's elemental emitters did so here, turning hues by a sector.
    top = jnp.argmax(rgb, axis=-1)
    v = jnp.max(rgb, axis=-1)
    spread = v - jnp.min(rgb, axis=-1)
    s = jnp.where(v > 0, spread / jnp.where(v > 0, v, 1.0), 0.0)
    norm = 1.0 / (6.0 * jnp.where(spread > 0, spread, 1.0))
    h_g, h_b = norm * (b - r) + 2 / 6, norm * (r - g) + 4 / 6
    h = jnp.where(top == 0, norm * (g - b), jnp.where(top == 1, h_g, h_b))
    h = jnp.where(spread > 0, h, 0.0)
    return jnp.where(h < 0, h + 1.0, h), s, v


def _hsv_to_rgb(h, s, v):
    """TensorFlow's HSVToRGB kernel in jax.numpy."""
    c = s * v
    m = v - c
    dh = h * 6.0
    sector = jnp.floor(dh)
    x = c * (1.0 - jnp.abs(jnp.mod(dh, 2.0) - 1.0))
    zero = jnp.zeros_like(c)
    # (r, g, b) before adding m, by the sector of the hue circle.
    table = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    rgb = [zero, zero, zero]
    for k, channels in enumerate(table):
        rgb = [jnp.where(sector == k, new, old) for new, old in zip(channels, rgb, strict=True)]
    return jnp.stack(rgb, axis=-1) + m[..., None]


def photometric_on_device(images, jitter) -> jax.Array:
    """float32 [B, h, w, 3] in 0..255: uint8 crops jittered as `example_transforms.train_augment`
    drew it.

    Per example (`jitter` float32 [B, PHOTOMETRIC_SIZE]): on the box of the crop that holds
    the image, brightness then contrast (about the box's mean after the brightness shift, as
    `tf.image.adjust_contrast` does on the crop), saturation and hue (TensorFlow's kernels,
    one HSV round trip), clipped to 0..255; the padding is left as it is. Runs in the train
    step, where it costs a fraction of the model's first convolution.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    jitter = jnp.asarray(jitter, jnp.float32)
    delta, factor, saturation, hue = (jitter[:, k, None, None, None] for k in range(4))
    h_idx = jnp.arange(x.shape[1])[None, :, None]
    w_idx = jnp.arange(x.shape[2])[None, None, :]
    box = jitter[:, 4:].astype(jnp.int32)
    inside = (
        (h_idx >= box[:, 0, None, None])
        & (h_idx < box[:, 1, None, None])
        & (w_idx >= box[:, 2, None, None])
        & (w_idx < box[:, 3, None, None])
    )[..., None]
    area = jnp.maximum(jnp.sum(inside, axis=(1, 2, 3), keepdims=True), 1)
    mean = jnp.sum(jnp.where(inside, x, 0.0), axis=(1, 2), keepdims=True) / area + delta
    # Brightness then contrast, ((x + delta) - mean) * factor + mean, as one affine map.
    y = x * factor + (mean * (1.0 - factor) + delta * factor)
    h, s, v = _rgb_to_hsv(y)
    s = jnp.clip(s * saturation[..., 0], 0.0, 1.0)
    h = h + hue[..., 0]
    h = h - jnp.floor(h)
    y = jnp.clip(_hsv_to_rgb(h, s, v), 0.0, 255.0)
    return jnp.where(inside, y, x)


def device_normaliser(data_config) -> Callable[[jax.Array], jax.Array]:
    """`normalise_on_device` with `data_config.mean` / `data_config.std`."""
    return functools.partial(
        normalise_on_device, mean=tuple(data_config.mean), std=tuple(data_config.std)
    )
