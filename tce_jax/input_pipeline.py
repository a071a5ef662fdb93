"""Input pipeline: TFDS (random access) -> tf.data (decode, augment) -> per-process numpy batches.

Datasets are prepared once in TFDS's ArrayRecord format so that any example can be read by
index. That lets the *trainer* decide which examples form each global batch, as a pure function
of `(seed, step, shard)`:

* resuming at step k needs no replay of the stream (exact, instant resume);
* the global batch does not depend on how many processes share the work: the data are cut into
  `num_shards` shards (`tfds.split_for_jax_process(split, process_index=s, process_count=S)`),
  every step takes `global_batch / S` examples from each shard, and each process reads only the
  shards it owns;
* the class-aware samplers (`tce_jax.sampling`: tilted, Rare Class Sampling, repeat factors)
  can draw examples that contain a chosen class.

Random augmentation uses stateless TF ops seeded by `(seed, position in the global stream)`, so
it too is independent of the process layout and of restarts. Training crops are computed from
the source pixels of the crop window only (the same pixels as resizing the whole image first).
Examples are read by index, decoded and augmented in tf.data's parallel map threads (the
per-example transforms are in `tce_jax.example_transforms`).

`Dataset` is the handle that training, evaluation and prediction use (after Scenic's
`dataset_utils.Dataset`): the prepared builder, the spec, the config and the process layout,
with the training and evaluation iterators, the evaluation geometry, the class-aware sampler
and the split sizes.

Batches leave as uint8: images uint8 NHWC in 0..255 (a quarter of the bytes of float32), to be
normalised on the device (`tce_jax.device_transforms`, the first operation of the train and
eval steps); labels uint8 train ids `0..C-1` and `ignore_index` (255). Iterators are `Batches`:
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

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tce_jax import example_transforms, sampling
from tce_jax.datasets import class_index as class_index_lib

# Re-exported for callers: the error for missing or corrupt data, and dataset preparation
# (which lives in tce_jax.datasets.preparation).
from tce_jax.datasets.archives import DatasetNotFoundError  # noqa: F401
from tce_jax.datasets.preparation import load_builder
from tce_jax.datasets.spec import DatasetSpec

Batch = dict[str, np.ndarray]
# Maps (shard, step) to the within-shard indices of the examples of that step, or to a
# `sampling.Draw` that also names the class each example's crop should hold.
IndexFn = Callable[[int, int], "np.ndarray | sampling.Draw"]


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


def _plain_graph(fn: Callable) -> Callable:
    """`fn` for `Dataset.map`, traced as written: its branches on tensors are `tf.cond`s
    already, so AutoGraph's source-to-source conversion (seconds of every process's start-up,
    re-parsing these functions) would change nothing."""
    return tf.autograph.experimental.do_not_convert(fn)


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


# ---------------------------------------------------------------------------------------------
# Evaluation geometry.


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


def canvas_geometry(sizes, data_config, images: str = "image") -> EvalGeometry:
    """The geometry of evaluating images of `sizes` (int [N, 2], also their label maps' sizes).

    The automatic canvas is the largest rescaled image (`data_config.base_size`), rounded up
    to a multiple of 32 when sizes vary; `data_config.eval_canvas` sets one, which must hold
    every rescaled image (`images` names them in the error).
    """
    base_size = tuple(data_config.base_size)
    sizes = np.asarray(sizes, np.int64)
    label_shape = tuple(int(v) for v in sizes.max(axis=0))
    resized = example_transforms.rescaled_size(sizes, base_size) if base_size else sizes
    largest = tuple(int(v) for v in resized.max(axis=0))
    uniform = bool((resized == resized[0]).all())
    if data_config.eval_canvas:
        canvas = tuple(int(v) for v in data_config.eval_canvas)
        if canvas[0] < largest[0] or canvas[1] < largest[1]:
            raise ValueError(
                f"config.data.eval_canvas={canvas} is smaller than the largest {images} "
                f"({largest[0]}x{largest[1]} after rescaling to base_size={base_size}): use () "
                "for the automatic canvas, or a larger one."
            )
    else:
        canvas = largest if uniform else tuple(-(-v // 32) * 32 for v in largest)
    resize = not (uniform and largest == canvas == label_shape and (sizes == sizes[0]).all())
    return EvalGeometry(canvas=canvas, label_shape=label_shape, resize=resize)


# ---------------------------------------------------------------------------------------------
# The dataset handle.


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset as this process reads it: its iterators and what describes them.

    Attributes:
      builder: the prepared TFDS builder (`Dataset.load` prepares it).
      spec: the dataset's `DatasetSpec`.
      config: the run's config (`data`, `global_batch_size`, `seed`, `num_train_steps`).
      layout: how the global batch is split over data shards and processes.
    """

    builder: tfds.core.DatasetBuilder
    spec: DatasetSpec
    config: ml_collections.ConfigDict
    layout: Layout

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, layout: Layout) -> Dataset:
        """The dataset of `config.data.name`, prepared first if needed (`load_builder`)."""
        builder, spec = load_builder(config)
        return cls(builder, spec, config, layout)

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(self.builder.info.splits)

    def split_size(self, split: str) -> int:
        """Examples in `split` (a split name or a TFDS sub-split such as a shard's)."""
        return self.builder.info.splits[split].num_examples

    def _source(self, split: str):
        return _data_source(self.builder, self.spec, split)

    def _describe(self, split: str) -> str:
        return f"split {split!r} of {self.spec.tfds_name} in {self.builder.data_dir}"

    # -- training ----------------------------------------------------------------------------

    def train_iterator(self, *, start_step: int = 0, index_fn: IndexFn | None = None) -> Batches:
        """This process's part of every global training batch from `start_step` on.

        Yields dicts with `image` uint8 [B, h, w, 3] (normalise on the device with
        `device_transforms.normalise_on_device`), `label` uint8 [B, h, w] and, with
        `data.photometric`, `photometric` float32 [B, PHOTOMETRIC_SIZE] (apply with
        `device_transforms.photometric_on_device`), where B = global_batch_size /
        process_count, rows ordered by shard. A Python generator walks the step's indices
        (`index_fn`, default `fixed_sampler()`; it may wait for class-sampling probabilities);
        reading, decoding and augmentation run in tf.data's parallel map. Close the iterator
        when done (`with` or `close()`); a `ClassAwareSampler` index_fn is closed with it.
        """
        config, layout = self.config, self.layout
        split = config.data.train_split
        batch_per_shard = config.global_batch_size // layout.num_shards
        sources = {
            s: self._source(_shard_split(split, s, layout.num_shards)) for s in layout.owned_shards
        }
        if index_fn is None:
            index_fn = self.fixed_sampler()

        def step_indices():
            """(shard, index in shard, position in the global stream) of every local example."""
            step = start_step
            while True:
                for shard in sources:
                    position = step * config.global_batch_size + shard * batch_per_shard
                    drawn = index_fn(shard, step)
                    if not isinstance(drawn, sampling.Draw):
                        drawn = sampling.Draw(drawn, np.full(batch_per_shard, -1))
                    yield {
                        "shard": np.full(batch_per_shard, shard, np.int32),
                        "index": np.asarray(drawn.indices, np.int64),
                        "position": position + np.arange(batch_per_shard, dtype=np.int64),
                        "crop_class": np.asarray(drawn.crop_classes, np.int32),
                    }
                step += 1

        read = _record_reader(sources, self.spec)
        recrop = sampling.method(config.data) == "rcs" and config.data.rcs_min_crop_ratio > 0
        augment = example_transforms.train_transform(
            self.spec,
            config.data,
            min_crop_pixels=(
                sampling.rcs_min_pixels(config.data) * config.data.rcs_min_crop_ratio
                if recrop
                else None
            ),
        )

        def transform(ex):
            seed = tf.stack([tf.constant(config.seed, tf.int64), ex["position"]])
            return augment(*read(ex["shard"], ex["index"]), seed, ex["crop_class"])

        signature = {
            "shard": tf.TensorSpec([batch_per_shard], tf.int32),
            "index": tf.TensorSpec([batch_per_shard], tf.int64),
            "position": tf.TensorSpec([batch_per_shard], tf.int64),
            "crop_class": tf.TensorSpec([batch_per_shard], tf.int32),
        }
        ds = tf.data.Dataset.from_generator(step_indices, output_signature=signature).unbatch()
        ds = ds.map(
            _plain_graph(transform), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        ds = ds.batch(batch_per_shard * len(sources), drop_remainder=True)
        # No tf.data autotuner on this endless pipeline: its optimising thread made `close()`
        # wait up to 8 s at the end of training (measured on the Cityscapes and ADE20K test
        # data). The map then runs at tf.data's default parallelism, which delivered as many
        # examples/s as the autotuner on the embedded data (2 cores).
        options = tf.data.Options()
        options.autotune.enabled = False
        return Batches(
            ds.prefetch(config.data.prefetch).with_options(options),
            source=self._describe(split),
            on_close=getattr(index_fn, "close", None),
        )

    def _owned_rows(self, per_example: np.ndarray) -> dict[int, np.ndarray]:
        """`per_example` (rows of the training split, in its data-source order) cut into this
        process's shards: shard -> its rows, in the shard's data-source order."""
        split = self.config.data.train_split
        shards = {}
        for s in self.layout.owned_shards:
            shard_split = _shard_split(split, s, self.layout.num_shards)
            positions = class_index_lib.shard_positions(self.builder, split, shard_split)
            shards[s] = per_example[positions]
        return shards

    def _train_class_index(self) -> class_index_lib.ClassIndex:
        split = self.config.data.train_split
        return class_index_lib.get_class_index(self.builder, self.spec, split)

    def class_aware_sampler(self) -> sampling.ClassAwareSampler:
        """The tilted class-aware `IndexFn` of this process's shards of the training split.

        The trainer posts its class probabilities (`ClassAwareSampler.post`) before it reads.
        """
        config, layout = self.config, self.layout
        return sampling.ClassAwareSampler(
            self._owned_rows(self._train_class_index().presence),
            batch_per_shard=config.global_batch_size // layout.num_shards,
            seed=config.seed,
            refresh_steps=config.data.sampling_refresh_steps,
            num_steps=config.num_train_steps,
        )

    def fixed_sampler(self) -> IndexFn:
        """The `IndexFn` of a sampler that needs no training state (`sampling.method`):
        shuffled epochs (uniform), Rare Class Sampling or repeat-factor sampling, the latter
        two from the class index of the whole training split."""
        data, layout = self.config.data, self.layout
        batch_per_shard = self.config.global_batch_size // layout.num_shards
        method = sampling.method(data)
        if method == "rcs":
            counts = self._train_class_index().counts
            return sampling.RareClassSampler(
                self._owned_rows(counts),
                sampling.rcs_class_probs(counts, data.rcs_temperature),
                min_pixels=sampling.rcs_min_pixels(data),
                batch_per_shard=batch_per_shard,
                seed=self.config.seed,
            )
        if method == "repeat_factor":
            presence = self._train_class_index().presence
            factors = sampling.repeat_factors(presence, data.repeat_factor_threshold)
            return sampling.RepeatFactorSampler(
                self._owned_rows(factors), batch_per_shard=batch_per_shard, seed=self.config.seed
            )
        split = data.train_split
        sizes = {
            s: self.split_size(_shard_split(split, s, layout.num_shards))
            for s in layout.owned_shards
        }
        return epoch_index_fn(sizes, batch_per_shard, self.config.seed)

    # -- evaluation --------------------------------------------------------------------------

    def eval_geometry(self, split: str) -> EvalGeometry:
        """Canvas and label shapes that hold every example of `split` (one compilation per
        split), by `canvas_geometry`'s rule.

        Sizes come from the TFDS features when they are fixed (Cityscapes: 1024x2048), else
        from the split's class index (ADE20K).
        """
        shape = self.builder.info.features[self.spec.label_key].shape
        if shape[0] is not None and shape[1] is not None:
            sizes = np.array([shape[:2]], np.int64)
        else:
            index = class_index_lib.get_class_index(self.builder, self.spec, split)
            sizes = index.sizes.astype(np.int64)
        return canvas_geometry(sizes, self.config.data, f"evaluation image of {split}")

    def _eval_parts(self, split: str) -> list[str]:
        """The TFDS sub-splits of `split` that the processes evaluate, in process order."""
        count = self.layout.process_count
        return [_shard_split(split, p, count) for p in range(count)]

    def eval_part(self, split: str) -> tuple[int, object]:
        """This process's contiguous part of `split`, the one `eval_iterator` reads: the index
        in the split of its first example, and its data source (random access, images and
        label maps still encoded)."""
        parts = self._eval_parts(split)
        index = self.layout.process_index
        offset = sum(self.split_size(s) for s in parts[:index])
        return offset, self._source(parts[index])

    def num_eval_batches(self, split: str) -> int:
        """Batches every process runs so that the largest process part is covered."""
        local_batch = self.config.data.eval_batch_size // self.layout.process_count
        largest = max(self.split_size(s) for s in self._eval_parts(split))
        return math.ceil(largest / local_batch)

    def eval_iterator(self, split: str, geometry: EvalGeometry | None = None) -> Batches:
        """Every example of `split` exactly once across processes, in whole images.

        Images are rescaled to fit `config.data.base_size` (if set; bilinear, rounded to
        uint8) and padded into `geometry.canvas` with `pad_colour`
        (`example_transforms.canvas_image`); label maps keep their resolution, padded into
        `geometry.label_shape` with the ignore label. The last batches are padded with copies
        of an example whose `mask` is False and whose labels are all `ignore_index`, so every
        process runs the same number of steps and no example is dropped. Yields `image` uint8
        [B, *canvas, 3] (normalise on the device), `label` uint8 [B, *label_shape], `mask`
        (bool [B]), `image_size` and `label_size` (int32 [B, 2]: the valid (height, width) of
        each image in the canvas and of each label map).
        """
        if geometry is None:
            geometry = self.eval_geometry(split)
        spec, data_config = self.spec, self.config.data
        local_batch = data_config.eval_batch_size // self.layout.process_count
        shard = self.layout.process_index
        _, source = self.eval_part(split)
        total = self.num_eval_batches(split) * local_batch
        read = _record_reader({shard: source}, spec)

        def transform(i):
            valid = i < len(source)
            image, label = example_transforms.decode(spec, *read(shard, tf.where(valid, i, 0)))
            label = tf.where(valid, label, tf.cast(spec.ignore_index, tf.uint8))
            canvas, image_size = example_transforms.canvas_image(
                image, geometry.canvas, geometry.resize, data_config
            )
            padded = example_transforms.pad_to(label, geometry.label_shape, spec.ignore_index)
            return {
                "image": canvas,
                "label": padded[..., 0],
                "mask": valid,
                "image_size": image_size,
                "label_size": tf.shape(label)[:2],
            }

        ds = tf.data.Dataset.range(total)
        ds = ds.map(
            _plain_graph(transform), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        ds = ds.batch(local_batch, drop_remainder=True)  # `total` is a multiple of it
        return Batches(ds.prefetch(data_config.prefetch), source=self._describe(split))
