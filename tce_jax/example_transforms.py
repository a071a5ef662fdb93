"""Per-example TensorFlow transforms of the input pipeline, run in tf.data's map threads.

Decoding (`decode`), the training augmentation (`train_transform`, `train_augment`: random
resize, crop, flip and the photometric draws that the train step applies on the device, see
`tce_jax.device_transforms`) and the evaluation canvas (`canvas_image`, `pad_to`). Random
draws are stateless, seeded by the caller, so they depend on the seed alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf


def pad_colour(data_config) -> np.ndarray:
    """uint8 [3]: the colour that pads images, the mean colour rounded to 8 bits (it normalises
    to within 0.5 / 255 / std < 0.01 of 0)."""
    return np.round(np.clip(np.asarray(data_config.mean, np.float64), 0, 1) * 255).astype(np.uint8)


def decode(spec, image_bytes, label_bytes, map_labels: bool = True):
    """uint8 image [H, W, 3] and uint8 label map [H, W, 1] from the encoded bytes: train ids,
    or the raw values with `map_labels=False` (map them later with `_map_labels`)."""
    # PNG (Cityscapes, street scenes) or JPEG (ADE20K) images; PNG label maps.
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    label = tf.io.decode_png(label_bytes, channels=1)
    return image, _map_labels(label, spec.label_map) if map_labels else label


def _map_labels(label, label_map):
    """Raw uint8 label values -> train ids through the [256] look-up table `label_map`."""
    if label_map is None:
        return label
    lut = tf.constant(np.asarray(label_map, np.uint8))
    return tf.gather(lut, tf.cast(label, tf.int32))


def train_transform(spec, data_config, min_crop_pixels: float | None = None) -> Callable:
    """`(image bytes, label bytes, seed int64 [2], crop class = -1) -> example dict` (see
    `train_augment`): what the training pipeline runs per example (decode, then
    `train_augment`). With `min_crop_pixels` (Rare Class Sampling), the crop is first re-drawn
    until it holds more than that many pixels of the crop class (`rare_class_seed`)."""

    def transform(image_bytes, label_bytes, seed, crop_class=-1):
        image, label = decode(spec, image_bytes, label_bytes, map_labels=False)
        if min_crop_pixels is not None:
            seed = rare_class_seed(
                label, seed, crop_class, min_crop_pixels, data_config, spec.label_map
            )
        return train_augment(
            image, label, seed, data_config, spec.ignore_index, label_map=spec.label_map
        )

    return transform


# Rare Class Sampling (DAFormer) checks up to this many crops for the drawn class, and keeps
# the next one if none of them holds enough of it.
CROP_CHECKS = 10


def rare_class_seed(label, seed, crop_class, min_pixels: float, data_config, label_map=None):
    """The seed `train_augment` should crop with: DAFormer's re-crop, deterministic.

    Attempt `k` is `train_augment`'s draw with seed `s_k`: `s_0 = seed`, `s_k` the `k`-th of
    `stateless_split(seed, CROP_CHECKS + 1)`. The first of attempts `0 .. CROP_CHECKS - 1`
    whose crop holds more than `min_pixels` pixels of `crop_class` (int32 scalar) is kept,
    else attempt `CROP_CHECKS`; only the crops' label windows are computed. `crop_class < 0`
    keeps `seed`. `label`: uint8 [H, W, 1], raw values mapped by `label_map` ([256] or None).
    """
    splits = tf.random.experimental.stateless_split(seed, CROP_CHECKS + 1)

    def seed_of(k):
        return tf.where(k == 0, seed, splits[k])

    def holds_enough(k):
        seeds = tf.random.experimental.stateless_split(seed_of(k), 4)
        size, offset = _crop_geometry(tf.shape(label)[:2], seeds, data_config)
        # Padding gets 255, never a class.
        window = _crop_label(label, size, offset, data_config.crop_size, 255, label_map)
        count = tf.reduce_sum(tf.cast(tf.cast(window, tf.int32) == crop_class, tf.int32))
        return tf.cast(count, tf.float32) > min_pixels

    def searching(k):
        return tf.cond(k < CROP_CHECKS, lambda: tf.logical_not(holds_enough(k)), lambda: False)

    crop_class = tf.cast(crop_class, tf.int32)
    attempt = tf.cond(
        crop_class < 0,
        lambda: tf.constant(0),
        lambda: tf.while_loop(searching, lambda k: (k + 1,), (tf.constant(0),))[0],
    )
    return seed_of(attempt)


def _to_uint8(image):
    """float in 0..255 (clipped) -> uint8, rounded to the nearest level (the images' own
    resolution)."""
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def base_scale(hw, base_size):
    """Factor that rescales an image of size `hw` (height, width), keeping its aspect ratio,
    to fit `base_size` = (short, long): min(long / max(h, w), short / min(h, w)) (mmcv's
    `rescale_size`); 1 for `base_size=()`. Works on TF tensors and numpy arrays (float32)."""
    if not base_size:
        return 1.0
    short, long = (np.float32(v) for v in base_size)
    if isinstance(hw, tf.Tensor):
        h, w = hw[0], hw[1]
        return tf.minimum(long / tf.maximum(h, w), short / tf.minimum(h, w))
    hw = np.asarray(hw, np.float32)
    h, w = hw[..., 0], hw[..., 1]
    return np.minimum(long / np.maximum(h, w), short / np.minimum(h, w))


def rescaled_size(hw, base_size) -> np.ndarray:
    """int [..., 2]: the size evaluation resizes images of size `hw` to (numpy)."""
    hw = np.asarray(hw, np.float32)
    scale = np.asarray(base_scale(hw, base_size), np.float32)[..., None]
    return np.maximum(np.round(hw * scale), 1).astype(np.int64)


# The crop is computed in the coordinates of the original image: only the crop window is
# resized, with the sampling positions `tf.image.resize` uses for the whole image (its
# kernels' formulas, in float32), so the output equals resize-then-crop.


def _nearest_taps(positions, in_size, out_size):
    """Source indices of nearest-neighbour `tf.image.resize` (half-pixel centres):
    `min(floor((p + 0.5) * in / out), in - 1)`."""
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    src = tf.floor((tf.cast(positions, tf.float32) + 0.5) * scale)
    return tf.clip_by_value(tf.cast(src, tf.int32), 0, in_size - 1)


def _source_span(first, last, in_size, out_size):
    """Source positions of output positions `first` and `last` of bilinear `tf.image.resize`
    from `in_size` to `out_size` (half-pixel centres: `(p + 0.5) * in / out - 0.5`), and the
    source pixels [lo, hi] they interpolate from."""
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    start = (tf.cast(first, tf.float32) + 0.5) * scale - 0.5
    stop = (tf.cast(last, tf.float32) + 0.5) * scale - 0.5
    lo = tf.clip_by_value(tf.cast(tf.floor(start), tf.int32), 0, in_size - 1)
    hi = tf.clip_by_value(tf.cast(tf.math.ceil(stop), tf.int32), lo, in_size - 1)
    return start, stop, lo, hi


def _resize_window(image, offset, window, size):
    """float32 [*window, 3] in 0..255: the `window` (h, w) at `offset` (y, x) of `image` (uint8
    [H, W, 3]) bilinearly resized to `size`, computed from the source pixels it needs only.

    `tf.image.resize` samples source position `(p + 0.5) * in / out - 0.5` for output `p`,
    clamped to the image; `tf.image.crop_and_resize` samples a box's positions linearly. So
    the box spans the window's first and last positions in the needed source region, padded
    by one replicated edge pixel where positions fall outside the image (which reproduces the
    clamping; only when upsampling). Positions beyond `size` are outside the box (0; the
    caller pads them).
    """
    in_hw = tf.shape(image)[:2]
    last = offset + tf.constant(window, tf.int32) - 1
    y0, y1, top, bottom = _source_span(offset[0], last[0], in_hw[0], size[0])
    x0, x1, left, right = _source_span(offset[1], last[1], in_hw[1], size[1])
    region = image[top : bottom + 1, left : right + 1]
    # Pad when a position is within a pixel of the border (or beyond it: clamped), so that
    # float rounding of the box never puts one outside; skip the copy otherwise.
    limit = tf.cast(in_hw - 2, tf.float32)
    clamped = (tf.minimum(y0, x0) < 1) | (y1 > limit[0]) | (x1 > limit[1])
    margin = tf.cast(clamped, tf.float32)
    region = tf.cond(
        clamped,
        lambda: tf.pad(region, [[1, 1], [1, 1], [0, 0]], mode="SYMMETRIC"),  # edge copies
        lambda: region,
    )
    extent = tf.cast(tf.shape(region)[:2] - 1, tf.float32)
    box = tf.stack(
        [
            (y0 - tf.cast(top, tf.float32) + margin) / extent[0],
            (x0 - tf.cast(left, tf.float32) + margin) / extent[1],
            (y1 - tf.cast(top, tf.float32) + margin) / extent[0],
            (x1 - tf.cast(left, tf.float32) + margin) / extent[1],
        ]
    )
    crop = tf.image.crop_and_resize(region[None], box[None], [0], window, method="bilinear")
    return crop[0]


def _crop_geometry(in_hw, seeds, data_config):
    """The random resize and crop of `train_augment` for an image of size `in_hw` (int32 [2]),
    drawn with `seeds[0]` and `seeds[1]`: the resized size (h', w') and the crop's offset
    (y, x) in it (int32 [2] each)."""
    crop = tf.constant(data_config.crop_size, tf.int32)
    scale = tf.random.stateless_uniform([], seeds[0], data_config.min_scale, data_config.max_scale)
    hw = tf.cast(in_hw, tf.float32)
    scale = scale * base_scale(hw, tuple(data_config.base_size))
    size = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    # The draw of stateless_random_crop([crop_h, crop_w, C]) on the padded [h', w', C] image.
    limit = tf.concat([tf.maximum(size, crop) - crop + 1, [1]], axis=0)
    offset = tf.random.stateless_uniform([3], seeds[1], maxval=tf.int32.max, dtype=tf.int32)
    return size, (offset % limit)[:2]


def _crop_positions(size, offset, crop_size):
    """The rows and columns of the crop window in the resized image, and bool [crop_h, crop_w]:
    which of its pixels are inside the image (the others are padding)."""
    rows = offset[0] + tf.range(crop_size[0])
    cols = offset[1] + tf.range(crop_size[1])
    return rows, cols, (rows < size[0])[:, None] & (cols < size[1])[None, :]


def _crop_label(label, size, offset, crop_size, ignore_index: int, label_map):
    """uint8 [crop_h, crop_w]: the crop window at `offset` of `label` (uint8 [H, W, 1], raw
    values) resized to `size` (nearest), mapped by `label_map`; `ignore_index` outside the
    image."""
    rows, cols, inside = _crop_positions(size, offset, crop_size)
    in_hw = tf.shape(label)[:2]
    label = tf.gather(tf.reshape(label, in_hw), _nearest_taps(rows, in_hw[0], size[0]))
    label = tf.gather(label, _nearest_taps(cols, in_hw[1], size[1]), axis=1)
    label = _map_labels(label, label_map)
    return tf.where(inside, label, tf.cast(ignore_index, tf.uint8))


def train_augment(image, label, seed, data_config, ignore_index: int, label_map=None) -> dict:
    """Random resize, crop (padded: labels with `ignore_index`), flip; photometric jitter drawn.

    `image` uint8 [H, W, 3], `label` uint8 [H, W, 1], `seed` int64 [2] for the stateless
    random ops. The image is resized by `base_scale` (fit `data_config.base_size`) times a
    random ratio in [min_scale, max_scale] to (h', w'), padded to at least the crop size,
    and a random window is cropped (`tf.image.stateless_random_crop`'s draw). Only that window
    is computed: the same pixels as resizing the whole image first (bilinear; labels nearest),
    at a fraction of the cost. With `label_map` ([256] look-up table), `label` holds raw
    values, mapped to train ids after cropping (a quarter of the pixels).

    Returns `{"image": uint8 [h, w, 3] (padding has `pad_colour`), "label": uint8 [h, w]}`,
    and with `data_config.photometric` also `"photometric"`: float32 [PHOTOMETRIC_SIZE], the
    jitter drawn for this example, which the train step applies on the device
    (`photometric_on_device`): the pipeline's most expensive per-pixel work otherwise.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    crop_h, crop_w = data_config.crop_size
    size, offset = _crop_geometry(tf.shape(image)[:2], seeds, data_config)
    _, _, inside = _crop_positions(size, offset, (crop_h, crop_w))
    label = _crop_label(label, size, offset, (crop_h, crop_w), ignore_index, label_map)
    window = _resize_window(image, offset, (crop_h, crop_w), size)
    window = tf.where(inside[..., None], _to_uint8(window), pad_colour(data_config))
    both = tf.concat([window, label[..., None]], axis=-1)
    # The draw of tf.image.stateless_random_flip_left_right, made here to know the side of
    # the padding after the flip.
    flip = tf.random.stateless_uniform([], seeds[2], 0.0, 1.0) < 0.5
    if data_config.flip:
        both = tf.cond(flip, lambda: tf.reverse(both, axis=[1]), lambda: both)
    example = {"image": both[..., :3], "label": both[..., 3]}
    if data_config.photometric:
        crop = tf.constant([crop_h, crop_w], tf.int32)
        valid = tf.minimum(size - offset, crop)  # the image's part of the crop: its top rows
        flipped = tf.logical_and(flip, bool(data_config.flip))
        first_col = tf.where(flipped, crop_w - valid[1], 0)
        box = tf.stack([0, valid[0], first_col, first_col + valid[1]])
        example["photometric"] = _photometric_draw(seeds[3], box)
    return example


# The photometric jitter of an example: brightness delta (0..255 units), contrast factor,
# saturation factor, hue delta (turns), then the box [row0, row1, col0, col1) of the crop that
# holds the image (the rest is padding, left unchanged).
PHOTOMETRIC_SIZE = 8


def _photometric_draw(seed, box):
    """The draws of `tf.image.stateless_random_brightness` (32/255), `_contrast` (0.5-1.5),
    `_saturation` (0.5-1.5) and `_hue` (18/360) with the seeds split from `seed`, and `box`."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    return tf.concat(
        [
            [
                tf.random.stateless_uniform([], seeds[0], -32.0 / 255.0, 32.0 / 255.0) * 255.0,
                tf.random.stateless_uniform([], seeds[1], 0.5, 1.5),
                tf.random.stateless_uniform([], seeds[2], 0.5, 1.5),
                tf.random.stateless_uniform([], seeds[3], -18.0 / 360.0, 18.0 / 360.0),
            ],
            tf.cast(box, tf.float32),
        ],
        axis=0,
    )


# ---------------------------------------------------------------------------------------------
# The evaluation canvas.


def pad_to(x, shape, value):
    """`x` [h, w, c] padded (bottom/right, with `value`: a scalar or one value per channel) or
    cropped to `shape` (H, W)."""
    x = x[: shape[0], : shape[1]]
    pad = [[0, shape[0] - tf.shape(x)[0]], [0, shape[1] - tf.shape(x)[1]], [0, 0]]
    inside = tf.pad(tf.ones_like(x[..., :1], tf.bool), pad, constant_values=False)
    x = tf.where(inside, tf.pad(x, pad), tf.cast(value, x.dtype))
    return tf.ensure_shape(x, [shape[0], shape[1], None])


def canvas_image(image, canvas, rescale: bool, data_config):
    """`image` (uint8 [H, W, 3]) as evaluation feeds it: with `rescale`, resized to fit
    `data_config.base_size` (if set; bilinear, rounded to uint8), then padded into `canvas`
    (H, W) with `pad_colour`. Returns the uint8 [*canvas, 3] canvas and int32 [2], the valid
    (height, width) of the image in it."""
    image_size = tf.shape(image)[:2]
    base_size = tuple(data_config.base_size)
    if base_size and rescale:  # otherwise the rescaling is the identity
        hw = tf.cast(image_size, tf.float32)
        image_size = tf.maximum(tf.cast(tf.round(hw * base_scale(hw, base_size)), tf.int32), 1)
        image = _to_uint8(tf.image.resize(image, image_size, method="bilinear"))
    return pad_to(image, canvas, pad_colour(data_config)), tf.minimum(image_size, canvas)
