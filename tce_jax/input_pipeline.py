"""Input pipeline: TFDS (random access) -> tf.data (decode, augment) -> per-process numpy batches.

Datasets are prepared once in TFDS's ArrayRecord format so that any example can be read by
index. That lets the *trainer* decide which examples form each global batch, as a pure function
of `(seed, step, shard)`:

* resuming at step k needs no replay of the stream (exact, instant resume);
* the global batch does not depend on how many processes share the work: the data are cut into
  `num_shards` shards (`tfds.split_for_jax_process(split, process_index=s, process_count=S)`),
  every step takes `global_batch / S` examples from each shard, and each process reads only the
  shards it owns;
* tilted class-aware sampling can draw examples that contain a chosen class.

Random augmentation uses stateless TF ops seeded by `(seed, position in the global stream)`, so
it too is independent of the process layout and of restarts. Training crops are computed from
the source pixels of the crop window only (the same pixels as resizing the whole image first).
Examples are read by index, decoded and augmented in tf.data's parallel map threads.

Batches leave as uint8: images uint8 NHWC in 0..255 (a quarter of the bytes of float32), to be
normalised on the device (`normalise_on_device`, the first operation of the train and eval
steps); labels uint8 train ids `0..C-1` and `ignore_index` (255). Iterators are `Batches`:
close them (or use `with`) when done.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import re
import traceback
import weakref
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tce_jax import sampling
from tce_jax.datasets import class_index as class_index_lib

# Re-exported for callers: the error for missing or corrupt data, and dataset preparation
# (which lives in tce_jax.datasets.preparation).
from tce_jax.datasets.archives import DatasetNotFoundError  # noqa: F401
from tce_jax.datasets.preparation import load_builder  # noqa: F401

Batch = dict[str, np.ndarray]
# Maps (shard, step) to the within-shard indices of the examples of that step.
IndexFn = Callable[[int, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the global batch is split over data shards and processes."""

    num_shards: int
    process_index: int
    process_count: int

    @property
    def owned_shards(self) -> range:
        per_process = self.num_shards // self.process_count
        return range(self.process_index * per_process, (self.process_index + 1) * per_process)


def _shard_split(split: str, shard: int, num_shards: int):
    return tfds.split_for_jax_process(split, process_index=shard, process_count=num_shards)


def _data_source(builder, spec, split):
    # Images stay encoded here; decoding happens in parallel inside tf.data.
    skip = tfds.decode.SkipDecoding()
    return builder.as_data_source(
        split=split, decoders={spec.image_key: skip, spec.label_key: skip}
    )


def split_size(builder, split) -> int:
    return builder.info.splits[split].num_examples


def epoch_index_fn(shard_sizes: dict[int, int], batch_per_shard: int, seed: int) -> IndexFn:
    """Epoch-wise shuffling: each shard is walked through a fresh permutation per epoch."""

    @functools.lru_cache(maxsize=8)
    def permutation(shard: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, shard, epoch])
        return rng.permutation(shard_sizes[shard])

    def indices(shard: int, step: int) -> np.ndarray:
        n = shard_sizes[shard]
        positions = step * batch_per_shard + np.arange(batch_per_shard)
        out = np.empty(batch_per_shard, np.int64)
        for j, p in enumerate(positions):
            out[j] = permutation(shard, int(p // n))[p % n]
        return out

    return indices


def class_aware_sampler(
    builder, spec, config: ml_collections.ConfigDict, layout: Layout
) -> sampling.ClassAwareSampler:
    """The tilted class-aware `IndexFn` of this process's shards of the training split.

    The trainer posts its class probabilities (`ClassAwareSampler.post`) before it reads.
    """
    split = config.data.train_split
    presence = class_index_lib.get_class_index(builder, spec, split).presence
    shards = {}
    for s in layout.owned_shards:
        shard_split = _shard_split(split, s, layout.num_shards)
        shards[s] = presence[class_index_lib.shard_positions(builder, split, shard_split)]
    return sampling.ClassAwareSampler(
        shards,
        batch_per_shard=config.global_batch_size // layout.num_shards,
        seed=config.seed,
        refresh_steps=config.data.sampling_refresh_steps,
        num_steps=config.num_train_steps,
    )


# ---------------------------------------------------------------------------------------------
# Normalisation: on the device, as the first operation of the train and eval steps.

# ImageNet statistics of images in [0, 1]: the defaults of config.data.mean / config.data.std.
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
    v = jnp.max(rgb, axis=-1)
    spread = v - jnp.min(rgb, axis=-1)
    s = jnp.where(v > 0, spread / jnp.where(v > 0, v, 1.0), 0.0)
    norm = 1.0 / (6.0 * jnp.where(spread > 0, spread, 1.0))
    h = jnp.where(
        r == v, norm * (g - b), jnp.where(g == v, norm * (b - r) + 2 / 6, norm * (r - g) + 4 / 6)
    )
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
    """float32 [B, h, w, 3] in 0..255: uint8 crops jittered as `train_augment` drew it.

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
        (h_idx >= box[:, 0, None, None]) & (h_idx < box[:, 1, None, None])
        & (w_idx >= box[:, 2, None, None]) & (w_idx < box[:, 3, None, None])
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


def pad_colour(data_config) -> np.ndarray:
    """uint8 [3]: the colour that pads images, the mean colour rounded to 8 bits (it normalises
    to within 0.5 / 255 / std < 0.01 of 0)."""
    return np.round(np.clip(np.asarray(data_config.mean, np.float64), 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# tf.data transformations.


def _plain_graph(fn: Callable) -> Callable:
    """`fn` for `Dataset.map`, traced as written: its branches on tensors are `tf.cond`s
    already, so AutoGraph's source-to-source conversion (seconds of every process's start-up,
    re-parsing these functions) would change nothing."""
    return tf.autograph.experimental.do_not_convert(fn)


def _decode(spec, image_bytes, label_bytes, map_labels: bool = True):
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


def train_transform(spec, data_config) -> Callable:
    """`(image bytes, label bytes, seed int64 [2]) -> example dict` (see `train_augment`): what
    the training pipeline runs per example (decode, then `train_augment`)."""

    def transform(image_bytes, label_bytes, seed):
        image, label = _decode(spec, image_bytes, label_bytes, map_labels=False)
        return train_augment(
            image, label, seed, data_config, spec.ignore_index, label_map=spec.label_map
        )

    return transform


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
    crop = tf.constant([crop_h, crop_w], tf.int32)
    scale = tf.random.stateless_uniform([], seeds[0], data_config.min_scale, data_config.max_scale)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = scale * base_scale(hw, tuple(data_config.base_size))
    size = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    # The draw of stateless_random_crop([crop_h, crop_w, C]) on the padded [h', w', C] image.
    limit = tf.concat([tf.maximum(size, crop) - crop + 1, [1]], axis=0)
    offset = tf.random.stateless_uniform([3], seeds[1], maxval=tf.int32.max, dtype=tf.int32)
    offset = (offset % limit)[:2]
    rows = offset[0] + tf.range(crop_h)
    cols = offset[1] + tf.range(crop_w)
    inside = (rows < size[0])[:, None] & (cols < size[1])[None, :]

    in_hw = tf.shape(image)[:2]
    label = tf.gather(tf.reshape(label, in_hw), _nearest_taps(rows, in_hw[0], size[0]))
    label = tf.gather(label, _nearest_taps(cols, in_hw[1], size[1]), axis=1)
    label = _map_labels(label, label_map)
    label = tf.where(inside, label, tf.cast(ignore_index, tf.uint8))
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
# Iterators.


class Batches(Iterator[Batch]):
    """Numpy batches of a tf.data pipeline, released explicitly.

    A tf.data iterator whose destructor runs during interpreter shutdown (e.g. left in a
    traceback after a pipeline error) can hang or abort the process (exit 134): its threads
    call back into Python. So the pipeline is released by `close()` (or at the end of a `with`
    block), as soon as an exception (or the end of the data) leaves `next()`, and at
    interpreter exit at the latest (`atexit`, before shutdown). `on_close` runs first, e.g. to
    wake a reader blocked on class-sampling probabilities. A TensorFlow error (e.g. an image
    that does not decode) is raised as `DatasetNotFoundError` naming `source` (the data read).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        source: str,
        on_close: Callable[[], None] | None = None,
    ):
        self._iterator = dataset.as_numpy_iterator()
        self._source = source
        self._on_close = on_close
        _OPEN_ITERATORS.add(self)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            raise StopIteration
        try:
            return next(self._iterator)
        except tf.errors.OpError as e:
            _release_frames(e)
            self.close()
            # TF's message: "{{function_node ...}} [Error in user-defined function passed to
            # ... Iterator::...::ParallelMapV2: ]Invalid PNG data, size 1021\n\t [[{{node ...".
            message = re.sub(r"\{\{[^}]*\}\}\s*", "", e.message).strip().splitlines()[0]
            message = re.sub(r"^Error in user-defined function.*?Iterator::\S+: ", "", message)
            message = message.rstrip(". ")
            raise DatasetNotFoundError(
                f"The input pipeline failed reading {self._source}: {type(e).__name__}: "
                f"{message}. If the prepared data are corrupt, delete that directory and "
                "prepare the dataset again."
            ) from e
        except BaseException as e:
            _release_frames(e)
            self.close()
            raise

    def close(self) -> None:
        """Stops the pipeline's threads and frees its buffers; idempotent."""
        iterator, self._iterator = self._iterator, None
        _OPEN_ITERATORS.discard(self)
        if iterator is not None:
            if self._on_close is not None:
                self._on_close()
            del iterator  # the last reference: tf.data cancels and joins its threads here

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _release_frames(error: BaseException) -> None:
    """Drops the local variables of the finished frames in `error`'s traceback (it still prints
    them): they hold the tf.data iterator, and a traceback kept until interpreter exit (an
    uncaught error) would keep the iterator alive until shutdown."""
    traceback.clear_frames(error.__traceback__)


_OPEN_ITERATORS: weakref.WeakSet[Batches] = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for batches in list(_OPEN_ITERATORS):
        batches.close()


def _record_reader(sources: dict, spec) -> Callable:
    """tf.data map function `(shard, index) -> (image bytes, label bytes)`: reads one encoded
    example from `sources[shard]` (a TFDS data source, random access). It runs in tf.data's
    parallel map threads, so no single Python thread reads every example."""

    def read(shard, index):
        example = sources[int(shard)][int(index)]
        return (
            np.asarray(example[spec.image_key], dtype=object),
            np.asarray(example[spec.label_key], dtype=object),
        )

    def read_op(shard, index):
        image, label = tf.numpy_function(
            read, [shard, index], [tf.string, tf.string], stateful=False
        )
        return tf.ensure_shape(image, []), tf.ensure_shape(label, [])

    return read_op


def train_iterator(
    builder,
    spec,
    config: ml_collections.ConfigDict,
    layout: Layout,
    *,
    start_step: int = 0,
    index_fn: IndexFn | None = None,
) -> Batches:
    """This process's part of every global training batch from `start_step` on.

    Yields dicts with `image` uint8 [B, h, w, 3] (normalise on the device with
    `normalise_on_device`), `label` uint8 [B, h, w] and, with `data.photometric`,
    `photometric` float32 [B, PHOTOMETRIC_SIZE] (apply with `photometric_on_device`), where
    B = global_batch_size / process_count, rows ordered by shard. A Python generator walks
    the step's indices (`index_fn`, which may wait for class-sampling probabilities); reading,
    decoding and augmentation run in tf.data's parallel map. Close the iterator when done
    (`with` or `close()`); a `ClassAwareSampler` index_fn is closed with it.
    """
    split = config.data.train_split
    batch_per_shard = config.global_batch_size // layout.num_shards
    sources = {
        s: _data_source(builder, spec, _shard_split(split, s, layout.num_shards))
        for s in layout.owned_shards
    }
    if index_fn is None:
        sizes = {s: len(src) for s, src in sources.items()}
        index_fn = epoch_index_fn(sizes, batch_per_shard, config.seed)

    def step_indices():
        """(shard, index in shard, position in the global stream) of every local example."""
        step = start_step
        while True:
            for shard in sources:
                position = step * config.global_batch_size + shard * batch_per_shard
                yield {
                    "shard": np.full(batch_per_shard, shard, np.int32),
                    "index": np.asarray(index_fn(shard, step), np.int64),
                    "position": position + np.arange(batch_per_shard, dtype=np.int64),
                }
            step += 1

    read = _record_reader(sources, spec)
    augment = train_transform(spec, config.data)

    def transform(ex):
        seed = tf.stack([tf.constant(config.seed, tf.int64), ex["position"]])
        return augment(*read(ex["shard"], ex["index"]), seed)

    signature = {
        "shard": tf.TensorSpec([batch_per_shard], tf.int32),
        "index": tf.TensorSpec([batch_per_shard], tf.int64),
        "position": tf.TensorSpec([batch_per_shard], tf.int64),
    }
    ds = tf.data.Dataset.from_generator(step_indices, output_signature=signature).unbatch()
    ds = ds.map(_plain_graph(transform), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_per_shard * len(sources), drop_remainder=True)
    return Batches(
        ds.prefetch(config.data.prefetch),
        source=f"split {split!r} of {spec.tfds_name} in {builder.data_dir}",
        on_close=getattr(index_fn, "close", None),
    )


def num_eval_batches(builder, split: str, local_batch: int, process_count: int) -> int:
    """Batches every process runs so that the largest process part is covered."""
    largest = max(
        split_size(builder, _shard_split(split, p, process_count)) for p in range(process_count)
    )
    return math.ceil(largest / local_batch)


@dataclasses.dataclass(frozen=True)
class EvalGeometry:
    """The static shapes of an evaluation split's batches.

    Attributes:
      canvas: (H, W) into which the (rescaled) images are padded, bottom and right.
      label_shape: (H, W) into which the label maps are padded, with the ignore label.
      resize: whether predictions need resizing to the label resolution (False when every
        image has the canvas and label shape and is not rescaled: predictions are used as
        they are).
    """

    canvas: tuple[int, int]
    label_shape: tuple[int, int]
    resize: bool


def eval_geometry(builder, spec, config: ml_collections.ConfigDict, split) -> EvalGeometry:
    """Canvas and label shapes that hold every example of `split` (one compilation per split).

    Sizes come from the TFDS features when they are fixed (Cityscapes: 1024x2048), else from
    the split's class index (ADE20K). The automatic canvas is the largest rescaled image,
    rounded up to a multiple of 32 when sizes vary.
    """
    base_size = tuple(config.data.base_size)
    shape = builder.info.features[spec.label_key].shape
    if shape[0] is not None and shape[1] is not None:
        sizes = np.array([shape[:2]], np.int64)
    else:
        sizes = class_index_lib.get_class_index(builder, spec, split).sizes.astype(np.int64)
    label_shape = tuple(int(v) for v in sizes.max(axis=0))
    resized = rescaled_size(sizes, base_size) if base_size else sizes
    largest = tuple(int(v) for v in resized.max(axis=0))
    uniform = bool((resized == resized[0]).all())
    if config.data.eval_canvas:
        canvas = tuple(int(v) for v in config.data.eval_canvas)
        if canvas[0] < largest[0] or canvas[1] < largest[1]:
            raise ValueError(
                f"config.data.eval_canvas={canvas} is smaller than the largest evaluation "
                f"image of {split} ({largest[0]}x{largest[1]} after rescaling to "
                f"base_size={base_size}): use () for the automatic canvas, or a larger one."
            )
    else:
        canvas = largest if uniform else tuple(-(-v // 32) * 32 for v in largest)
    resize = not (
        uniform
        and tuple(int(v) for v in resized[0]) == canvas == label_shape
        and (sizes == sizes[0]).all()
    )
    return EvalGeometry(canvas=canvas, label_shape=label_shape, resize=resize)


def _pad_to(x, shape, value):
    """`x` [h, w, c] padded (bottom/right, with `value`: a scalar or one value per channel) or
    cropped to `shape` (H, W)."""
    x = x[: shape[0], : shape[1]]
    pad = [[0, shape[0] - tf.shape(x)[0]], [0, shape[1] - tf.shape(x)[1]], [0, 0]]
    inside = tf.pad(tf.ones_like(x[..., :1], tf.bool), pad, constant_values=False)
    x = tf.where(inside, tf.pad(x, pad), tf.cast(value, x.dtype))
    return tf.ensure_shape(x, [shape[0], shape[1], None])


def eval_iterator(
    builder,
    spec,
    config: ml_collections.ConfigDict,
    split: str,
    layout: Layout,
    geometry: EvalGeometry | None = None,
) -> Batches:
    """Every example of `split` exactly once across processes, in whole images.

    Images are rescaled to fit `config.data.base_size` (if set; bilinear, rounded to uint8)
    and padded into `geometry.canvas` with `pad_colour`; label maps keep their resolution,
    padded into `geometry.label_shape` with the ignore label. The last batches are padded with
    copies of an example whose `mask` is False and whose labels are all `ignore_index`, so
    every process runs the same number of steps and no example is dropped. Yields `image`
    uint8 [B, *canvas, 3] (normalise on the device), `label` uint8 [B, *label_shape], `mask`
    (bool [B]), `image_size` and `label_size` (int32 [B, 2]: the valid (height, width) of each
    image in the canvas and of each label map).
    """
    if geometry is None:
        geometry = eval_geometry(builder, spec, config, split)
    base_size = tuple(config.data.base_size)
    local_batch = config.data.eval_batch_size // layout.process_count
    shard = layout.process_index
    source = _data_source(builder, spec, _shard_split(split, shard, layout.process_count))
    total = num_eval_batches(builder, split, local_batch, layout.process_count) * local_batch
    read = _record_reader({shard: source}, spec)
    background = pad_colour(config.data)

    def transform(i):
        valid = i < len(source)
        image, label = _decode(spec, *read(shard, tf.where(valid, i, 0)))
        label = tf.where(valid, label, tf.cast(spec.ignore_index, tf.uint8))
        label_size = tf.shape(label)[:2]
        image_size = tf.shape(image)[:2]
        if base_size and geometry.resize:  # otherwise the rescaling is the identity
            hw = tf.cast(image_size, tf.float32)
            image_size = tf.maximum(tf.cast(tf.round(hw * base_scale(hw, base_size)), tf.int32), 1)
            image = _to_uint8(tf.image.resize(image, image_size, method="bilinear"))
        return {
            "image": _pad_to(image, geometry.canvas, background),
            "label": _pad_to(label, geometry.label_shape, spec.ignore_index)[..., 0],
            "mask": valid,
            "image_size": tf.minimum(image_size, geometry.canvas),
            "label_size": label_size,
        }

    ds = tf.data.Dataset.range(total)
    ds = ds.map(_plain_graph(transform), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)  # `total` is a multiple of it
    return Batches(
        ds.prefetch(config.data.prefetch),
        source=f"split {split!r} of {spec.tfds_name} in {builder.data_dir}",
    )
