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
it too is independent of the process layout and of restarts. Labels use train ids `0..C-1` and
`ignore_index` (255); images are float32 NHWC, normalised.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tce_jax import sampling

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


def class_index(builder, spec, split) -> sampling.ClassIndex:
    """The class index of `split` (see `tce_jax.sampling`), cached next to the TFDS data.

    In multi-process runs process 0 computes it first; the others then read the cache.
    """
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            sampling.load_class_index(builder, spec, split)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"class index {spec.tfds_name} {split}")
    return sampling.load_class_index(builder, spec, split)


def class_aware_sampler(
    builder, spec, config: ml_collections.ConfigDict, layout: Layout
) -> sampling.ClassAwareSampler:
    """The tilted class-aware `IndexFn` of this process's shards of the training split.

    The trainer posts its class probabilities (`ClassAwareSampler.post`) before it reads.
    """
    split = config.data.train_split
    presence = class_index(builder, spec, split).presence
    shards = {}
    for s in layout.owned_shards:
        shard_split = _shard_split(split, s, layout.num_shards)
        shards[s] = presence[sampling.shard_positions(builder, split, shard_split)]
    return sampling.ClassAwareSampler(
        shards,
        batch_per_shard=config.global_batch_size // layout.num_shards,
        seed=config.seed,
        refresh_steps=config.data.sampling_refresh_steps,
        num_steps=config.num_train_steps,
    )


# ---------------------------------------------------------------------------------------------
# tf.data transformations.


def _decode(spec, image_bytes, label_bytes):
    # PNG (Cityscapes, street scenes) or JPEG (ADE20K) images; PNG label maps.
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    label = tf.io.decode_png(label_bytes, channels=1)
    if spec.label_map is not None:
        lut = tf.constant(np.asarray(spec.label_map, np.int32))
        label = tf.gather(lut, tf.cast(label, tf.int32))
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)


def _normalise(image, data_config):
    return (image - tf.constant(data_config.mean)) / tf.constant(data_config.std)


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


def train_augment(image, label, seed, data_config, ignore_index: int):
    """Random resize, pad (labels with `ignore_index`), crop, flip and photometric jitter.

    `image` float32 [H, W, 3] in [0, 1], `label` int32 [H, W, 1], `seed` int64 [2] for the
    stateless random ops. The image is resized by `base_scale` (fit `data_config.base_size`)
    times a random ratio in [min_scale, max_scale]. Returns the normalised crop and its labels
    [h, w].
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    crop_h, crop_w = data_config.crop_size
    scale = tf.random.stateless_uniform([], seeds[0], data_config.min_scale, data_config.max_scale)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = scale * base_scale(hw, tuple(data_config.base_size))
    size = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    image = tf.image.resize(image, size, method="bilinear")
    label = tf.image.resize(label, size, method="nearest")
    if data_config.photometric:
        image = _photometric(image, seeds[3])
    image = _normalise(image, data_config)
    pad_h = tf.maximum(crop_h - size[0], 0)
    pad_w = tf.maximum(crop_w - size[1], 0)
    paddings = [[0, pad_h], [0, pad_w], [0, 0]]
    image = tf.pad(image, paddings)  # 0 after normalisation = the mean colour
    label = tf.pad(label, paddings, constant_values=ignore_index)
    # Crop image and label together: labels (<= 255) are exact in float32.
    both = tf.concat([image, tf.cast(label, tf.float32)], axis=-1)
    both = tf.image.stateless_random_crop(both, [crop_h, crop_w, 4], seed=seeds[1])
    if data_config.flip:
        both = tf.image.stateless_random_flip_left_right(both, seed=seeds[2])
    return both[..., :3], tf.cast(both[..., 3], tf.int32)


def _photometric(image, seed):
    seeds = tf.random.experimental.stateless_split(seed, 4)
    image = tf.image.stateless_random_brightness(image, 32.0 / 255.0, seeds[0])
    image = tf.image.stateless_random_contrast(image, 0.5, 1.5, seeds[1])
    image = tf.image.stateless_random_saturation(image, 0.5, 1.5, seeds[2])
    image = tf.image.stateless_random_hue(image, 18.0 / 360.0, seeds[3])
    return tf.clip_by_value(image, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Iterators.


def _as_numpy_batches(generator, signature, map_fn, batch_size: int, prefetch: int):
    ds = tf.data.Dataset.from_generator(generator, output_signature=signature)
    ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(prefetch)
    return ds.as_numpy_iterator()


def _example_signature():
    return {
        "image": tf.TensorSpec([], tf.string),
        "label": tf.TensorSpec([], tf.string),
        "seed": tf.TensorSpec([2], tf.int64),
        "valid": tf.TensorSpec([], tf.bool),
    }


def train_iterator(
    builder,
    spec,
    config: ml_collections.ConfigDict,
    layout: Layout,
    *,
    start_step: int = 0,
    index_fn: IndexFn | None = None,
) -> Iterator[Batch]:
    """This process's part of every global training batch from `start_step` on.

    Yields dicts with `image` float32 [B, h, w, 3] and `label` int32 [B, h, w], where
    B = global_batch_size / process_count, rows ordered by shard.
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

    def generate():
        step = start_step
        while True:
            for shard, source in sources.items():
                for j, i in enumerate(index_fn(shard, step)):
                    example = source[int(i)]
                    position = step * config.global_batch_size + shard * batch_per_shard + j
                    yield {
                        "image": example[spec.image_key],
                        "label": example[spec.label_key],
                        "seed": np.array([config.seed, position], np.int64),
                        "valid": True,
                    }
            step += 1

    def transform(ex):
        image, label = _decode(spec, ex["image"], ex["label"])
        image, label = train_augment(image, label, ex["seed"], config.data, spec.ignore_index)
        return {"image": image, "label": label}

    local_batch = batch_per_shard * len(sources)
    return _as_numpy_batches(
        generate, _example_signature(), transform, local_batch, config.data.prefetch
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
        sizes = class_index(builder, spec, split).sizes.astype(np.int64)
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
    """`x` [h, w, c] padded (bottom/right, with `value`) or cropped to `shape` (H, W)."""
    x = x[: shape[0], : shape[1]]
    pad = [[0, shape[0] - tf.shape(x)[0]], [0, shape[1] - tf.shape(x)[1]], [0, 0]]
    x = tf.pad(x, pad, constant_values=value)
    return tf.ensure_shape(x, [shape[0], shape[1], None])


def eval_iterator(
    builder,
    spec,
    config: ml_collections.ConfigDict,
    split: str,
    layout: Layout,
    geometry: EvalGeometry | None = None,
) -> Iterator[Batch]:
    """Every example of `split` exactly once across processes, in whole images.

    Images are rescaled to fit `config.data.base_size` (if set), normalised and padded into
    `geometry.canvas`; label maps keep their resolution, padded into `geometry.label_shape`
    with the ignore label. The last batches are padded with copies of an example whose `mask`
    is False and whose labels are all `ignore_index`, so every process runs the same number
    of steps and no example is dropped. Yields `image` [B, *canvas, 3], `label`
    [B, *label_shape], `mask` (bool [B]), `image_size` and `label_size` (int32 [B, 2]: the
    valid (height, width) of each image in the canvas and of each label map).
    """
    if geometry is None:
        geometry = eval_geometry(builder, spec, config, split)
    base_size = tuple(config.data.base_size)
    local_batch = config.data.eval_batch_size // layout.process_count
    source = _data_source(
        builder, spec, _shard_split(split, layout.process_index, layout.process_count)
    )
    total = num_eval_batches(builder, split, local_batch, layout.process_count) * local_batch

    def generate():
        for i in range(total):
            example = source[i if i < len(source) else 0]
            yield {
                "image": example[spec.image_key],
                "label": example[spec.label_key],
                "seed": np.zeros(2, np.int64),
                "valid": i < len(source),
            }

    def transform(ex):
        image, label = _decode(spec, ex["image"], ex["label"])
        label = tf.where(ex["valid"], label, spec.ignore_index)
        label_size = tf.shape(label)[:2]
        image_size = tf.shape(image)[:2]
        if base_size and geometry.resize:  # otherwise the rescaling is the identity
            hw = tf.cast(image_size, tf.float32)
            image_size = tf.maximum(tf.cast(tf.round(hw * base_scale(hw, base_size)), tf.int32), 1)
            image = tf.image.resize(image, image_size, method="bilinear")
        image = _pad_to(_normalise(image, config.data), geometry.canvas, 0.0)
        return {
            "image": image,
            "label": _pad_to(label, geometry.label_shape, spec.ignore_index)[..., 0],
            "mask": ex["valid"],
            "image_size": tf.minimum(image_size, geometry.canvas),
            "label_size": label_size,
        }

    return _as_numpy_batches(
        generate, _example_signature(), transform, local_batch, config.data.prefetch
    )
