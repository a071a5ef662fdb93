"""Input pipeline: shapes and label values, determinism, exact resume, process-count invariance,
evaluation covering every example exactly once, crop-first augmentation against resize-then-crop,
normalisation on the device, and pipeline errors."""

import glob
import os
import shutil
import weakref

import jax
import ml_collections
import numpy as np
import pytest
import run_utils
import tensorflow as tf

from tce_jax import device_transforms, example_transforms, input_pipeline

IGNORE = 255


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def dataset(prepared, num_shards=1, index=0, count=1, config=None):
    """The prepared data as process `index` of `count` reads them (`num_shards` shards)."""
    default_config, builder, spec = prepared
    layout = input_pipeline.Layout(num_shards, index, count)
    return input_pipeline.Dataset(builder, spec, config or default_config, layout)


def test_train_batches_have_the_right_shapes_and_labels(prepared):
    config, _, spec = prepared
    (batch,) = take(dataset(prepared).train_iterator(), 1)
    h, w = config.data.crop_size
    assert batch["image"].shape == (config.global_batch_size, h, w, 3)
    assert batch["image"].dtype == np.uint8  # normalised on the device
    assert batch["label"].shape == (config.global_batch_size, h, w)
    assert batch["label"].dtype == np.uint8
    values = set(np.unique(batch["label"]).tolist())
    assert values <= set(range(spec.num_classes)) | {IGNORE}
    assert len(values - {IGNORE}) >= 3
    # Normalised on the device: roughly zero-mean, not in [0, 255].
    image = np.asarray(device_transforms.normalise_on_device(batch["image"]))
    assert -3 < image.mean() < 3 and image.max() < 10


def test_training_data_are_deterministic_and_resume_exactly(prepared):
    first = take(dataset(prepared).train_iterator(), 5)
    again = take(dataset(prepared).train_iterator(), 5)
    resumed = take(dataset(prepared).train_iterator(start_step=3), 2)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(first[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["label"], first[1]["label"])


def test_global_batch_does_not_depend_on_the_process_count(prepared):
    one_process = take(dataset(prepared, 2).train_iterator(), 2)
    parts = [take(dataset(prepared, 2, p, 2).train_iterator(), 2) for p in range(2)]
    for step in range(2):
        for key in ("image", "label"):
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(one_process[step][key], joined)


def test_epochs_visit_every_training_example_once(prepared):
    config = prepared[0]
    n = dataset(prepared).split_size(config.data.train_split)
    index_fn = input_pipeline.epoch_index_fn({0: n}, 8, seed=0)
    steps = n // 8
    seen = np.concatenate([index_fn(0, s) for s in range(steps)])
    assert sorted(seen.tolist()) == list(range(steps * 8))
    assert not np.array_equal(seen, np.arange(steps * 8))  # shuffled


@pytest.mark.parametrize("process_count", [1, 3])
def test_evaluation_covers_every_example_once(prepared, process_count):
    config, builder, _ = prepared
    config = config.copy_and_resolve_references()
    config.data.eval_batch_size = 3 * process_count  # 16 examples: the last batch is padded
    split = config.data.eval_split
    reference = builder.as_data_source(split=split)
    expected_pixels = sum(
        int((np.asarray(reference[i]["label"]) != IGNORE).sum()) for i in range(len(reference))
    )
    valid_examples, valid_pixels, batches = 0, 0, []
    for p in range(process_count):
        data = dataset(prepared, process_count, p, process_count, config)
        part = list(data.eval_iterator(split))
        batches.append(len(part))
        for batch in part:
            valid_examples += int(batch["mask"].sum())
            valid_pixels += int((batch["label"] != IGNORE).sum())
            assert (batch["label"][~batch["mask"]] == IGNORE).all()
    assert valid_examples == len(reference)
    assert valid_pixels == expected_pixels
    assert len(set(batches)) == 1  # every process runs the same number of steps


# ---------------------------------------------------------------------------------------------
# Crop-first augmentation against the straightforward resize-then-crop.


def resize_then_crop(image, label, seed, data_config, ignore_index, label_map=None):
    """The slow reference: resize the whole image, pad, crop and flip (the stateless TF ops, in
    that order), then jitter the image's part of the crop with the stateless TF ops. Returns
    float images in [0, 1] (padding: the pad colour, not jittered) and int32 labels."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    crop_h, crop_w = data_config.crop_size
    image = tf.cast(image, tf.float32) / 255.0
    if label_map is not None:
        label = tf.gather(tf.constant(label_map), tf.cast(label, tf.int32))
    scale = tf.random.stateless_uniform([], seeds[0], data_config.min_scale, data_config.max_scale)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = scale * example_transforms.base_scale(hw, tuple(data_config.base_size))
    size = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    image = tf.image.resize(image, size, method="bilinear")
    label = tf.cast(tf.image.resize(label, size, method="nearest"), tf.int32)
    paddings = [[0, tf.maximum(crop_h - size[0], 0)], [0, tf.maximum(crop_w - size[1], 0)], [0, 0]]
    colour = example_transforms.pad_colour(data_config).astype(np.float32) / 255.0
    image = tf.stack(
        [tf.pad(image[..., c], paddings[:2], constant_values=colour[c]) for c in range(3)], -1
    )
    label = tf.pad(label, paddings, constant_values=ignore_index)
    inside = tf.pad(tf.ones(tf.concat([size, [1]], 0)), paddings)  # 1 on the image, 0 on padding
    both = tf.concat([image, tf.cast(label, tf.float32), inside], axis=-1)
    both = tf.image.stateless_random_crop(both, [crop_h, crop_w, 5], seed=seeds[1])
    if data_config.flip:
        both = tf.image.stateless_random_flip_left_right(both, seed=seeds[2])
    image, label, inside = both[..., :3].numpy(), both[..., 3].numpy(), both[..., 4].numpy()
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return image, label.astype(np.int32), box


def tf_jitter(image, box, seed):
    """The stateless TF photometric ops on the image's part (`box`) of a float crop in [0, 1],
    with the seeds `train_augment` uses; the padding left as it is."""
    jitter = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_split(seed, 4)[3], 4
    )
    part = tf.image.stateless_random_brightness(image[box], 32.0 / 255.0, jitter[0])
    part = tf.image.stateless_random_contrast(part, 0.5, 1.5, jitter[1])
    part = tf.image.stateless_random_saturation(part, 0.5, 1.5, jitter[2])
    part = tf.image.stateless_random_hue(part, 18.0 / 360.0, jitter[3])
    out = image.copy()
    out[box] = tf.clip_by_value(part, 0.0, 1.0).numpy()
    return out


# As the train step runs it: compiled (one program per crop size, not one per operation).
photometric_on_device = jax.jit(device_transforms.photometric_on_device)


@pytest.mark.parametrize("photometric", [False, True])
@pytest.mark.parametrize(
    "image_size, crop_size, scales, base_size",
    [
        ((37, 53), (32, 48), (0.3, 2.5), ()),  # padded crops and upsampling
        ((64, 128), (32, 64), (0.5, 2.0), ()),
        ((50, 30), (24, 24), (1.0, 1.0), ()),
        ((96, 160), (24, 40), (0.6, 0.9), ()),  # downsampled, mostly inner windows
        ((45, 70), (40, 40), (0.5, 2.0), (40, 80)),
    ],
)
def test_crop_first_equals_resize_then_crop(photometric, image_size, crop_size, scales, base_size):
    data_config = ml_collections.ConfigDict(
        {
            "crop_size": crop_size,
            "min_scale": scales[0],
            "max_scale": scales[1],
            "base_size": base_size,
            "photometric": photometric,
            "flip": True,
            "mean": device_transforms.IMAGENET_MEAN,
        }
    )
    rng = np.random.default_rng(len(image_size) + image_size[0])
    for k in range(8):
        image = rng.integers(0, 256, (*image_size, 3), dtype=np.uint8)
        label = rng.integers(0, 12, (*image_size, 1), dtype=np.uint8)
        label[rng.random(label.shape) < 0.1] = IGNORE
        seed = tf.constant([7, k], tf.int64)
        # Odd k: raw labels through ADE20K's kind of table, 0 -> ignore and v -> v - 1 (so 255
        # -> 254: the padding's ignore label must not go through it).
        lut = ((np.arange(256) - 1) % 256).astype(np.uint8) if k % 2 else None
        want_image, want_label, box = resize_then_crop(image, label, seed, data_config, IGNORE, lut)
        got = example_transforms.train_augment(
            tf.constant(image), tf.constant(label), seed, data_config, IGNORE, label_map=lut
        )
        assert got["image"].dtype == tf.uint8 and got["label"].dtype == tf.uint8
        np.testing.assert_array_equal(got["label"].numpy(), want_label)
        # Rounded to uint8 (0.5) after float32 rounding of the sampling positions (the box
        # maths of crop_and_resize; measured below 0.03 levels). On these noise images a
        # misalignment of 0.01 pixel would already differ by about 2 levels.
        crop = got["image"].numpy()
        np.testing.assert_allclose(crop, want_image * 255, rtol=0, atol=0.55)
        assert ("photometric" in got) == photometric
        if photometric:
            # Drawn on the host, applied on the device: TF's ops on the same crop, padding
            # untouched (float32 HSV round trips differ by far less than a level).
            jittered = photometric_on_device(crop[None], got["photometric"].numpy()[None])[0]
            want = tf_jitter(crop.astype(np.float32) / 255, box, seed) * 255
            np.testing.assert_allclose(np.asarray(jittered), want, rtol=0, atol=0.02)


def test_photometric_jitter_does_not_depend_on_how_xla_fuses_it():
    """The hue sector is chosen without comparing floats that XLA may compute twice: compiled
    with XLA:CPU's elemental emitters (which recompute the brightness/contrast map inside the
    HSV fusions, rounded differently), the jitter equals the default compilation's."""
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    # Brightness delta, contrast factor, saturation factor, hue shift; the image's box.
    jitter = np.array(
        [[10.0, 1.3, 1.2, 0.05, 0, 8, 0, 8], [-5.0, 0.8, 0.9, -0.1, 1, 7, 2, 6]], np.float32
    )
    lowered = jax.jit(device_transforms.photometric_on_device).lower(images, jitter)
    # Both named: the test process's own default is the elemental emitters (conftest.py).
    compiled = {
        fusion: lowered.compile(compiler_options={"xla_cpu_use_fusion_emitters": fusion})
        for fusion in (True, False)
    }
    default, elemental = (compiled[fusion](images, jitter) for fusion in (True, False))
    np.testing.assert_allclose(np.asarray(elemental), np.asarray(default), rtol=0, atol=0.01)


def test_normalising_on_the_device_matches_the_float_pipeline():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    mean, std = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)
    want = (images.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    got = device_transforms.normalise_on_device(images, mean, std)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    # The pad colour stands for the mean colour: within 0.5 / 255 / std of 0.
    config = ml_collections.ConfigDict({"mean": mean, "std": std})
    padded = device_transforms.device_normaliser(config)(example_transforms.pad_colour(config))
    assert np.abs(np.asarray(padded)).max() <= 0.5 / 255 / min(std) + 1e-6


# ---------------------------------------------------------------------------------------------
# Errors in the pipeline: a clear error, the iterator released, the CLI exits.


def test_a_pipeline_error_is_named_and_releases_the_iterator():
    png = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    damaged = png[:40] + b"\0" * 20 + png[60:]
    ds = tf.data.Dataset.from_tensor_slices([png, damaged]).map(tf.io.decode_png)
    batches = input_pipeline.Batches(ds, source="the test images")
    assert next(batches).shape == (8, 8, 3)
    tf_iterator = weakref.ref(batches._iterator)
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="the test images") as e:
        next(batches)
    assert "Invalid PNG" in str(e.value)
    # Released at once, although the error (and its traceback) lives on: an uncaught error
    # keeps it until interpreter exit, when destroying a tf.data iterator can hang.
    assert tf_iterator() is None
    with pytest.raises(StopIteration):
        next(batches)


def corrupt_training_images(data_dir):
    """Rewrites every training record of the prepared street scenes with a damaged PNG (its
    header and first chunk overwritten), as a disk error after preparation would."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    (path,) = glob.glob(os.path.join(data_dir, "**", "*-train.array_record-*"), recursive=True)
    reader = ArrayRecordReader(path)
    options, records = reader.writer_options_string(), reader.read_all()
    reader.close()
    writer = ArrayRecordWriter(path, options)
    for record in records:
        example = tf.train.Example.FromString(record)
        image = example.features.feature["image"].bytes_list
        image.value[0] = image.value[0][:40] + b"\0" * 60 + image.value[0][100:]
        writer.write(example.SerializeToString())
    writer.close()


def test_cli_exits_with_the_error_when_an_image_is_corrupt(small_data_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(small_data_dir, data_dir)
    corrupt_training_images(data_dir)
    # A hang fails at the timeout.
    run = run_utils.run_main(*run_utils.run_flags(tmp_path / "workdir", data_dir), timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "The input pipeline failed reading split 'train'" in run.stderr
    assert "Invalid PNG" in run.stderr
    # The tf.data iterator was released before shutdown, not finalised during it.
    assert "interpreter state is not initialized" not in run.stderr
