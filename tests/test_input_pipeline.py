"""Input pipeline: shapes and label values, determinism, exact resume, process-count invariance,
and evaluation covering every example exactly once."""

import numpy as np
import pytest

from tce_jax import input_pipeline

IGNORE = 255


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def layout(num_shards=1, index=0, count=1):
    return input_pipeline.Layout(num_shards, index, count)


def test_train_batches_have_the_right_shapes_and_labels(prepared):
    config, builder, spec = prepared
    (batch,) = take(input_pipeline.train_iterator(builder, spec, config, layout()), 1)
    h, w = config.data.crop_size
    assert batch["image"].shape == (config.global_batch_size, h, w, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (config.global_batch_size, h, w)
    values = set(np.unique(batch["label"]).tolist())
    assert values <= set(range(spec.num_classes)) | {IGNORE}
    assert len(values - {IGNORE}) >= 3
    # Normalised images: roughly zero-mean, not in [0, 255].
    assert -3 < batch["image"].mean() < 3 and batch["image"].max() < 10


def test_training_data_are_deterministic_and_resume_exactly(prepared):
    config, builder, spec = prepared
    first = take(input_pipeline.train_iterator(builder, spec, config, layout()), 5)
    again = take(input_pipeline.train_iterator(builder, spec, config, layout()), 5)
    resumed = take(input_pipeline.train_iterator(builder, spec, config, layout(), start_step=3), 2)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(first[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["label"], first[1]["label"])


def test_global_batch_does_not_depend_on_the_process_count(prepared):
    config, builder, spec = prepared
    one_process = take(input_pipeline.train_iterator(builder, spec, config, layout(2)), 2)
    parts = [
        take(input_pipeline.train_iterator(builder, spec, config, layout(2, p, 2)), 2)
        for p in range(2)
    ]
    for step in range(2):
        for key in ("image", "label"):
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(one_process[step][key], joined)


def test_epochs_visit_every_training_example_once(prepared):
    config, builder, spec = prepared
    n = input_pipeline.split_size(builder, config.data.train_split)
    index_fn = input_pipeline.epoch_index_fn({0: n}, 8, seed=0)
    steps = n // 8
    seen = np.concatenate([index_fn(0, s) for s in range(steps)])
    assert sorted(seen.tolist()) == list(range(steps * 8))
    assert not np.array_equal(seen, np.arange(steps * 8))  # shuffled


@pytest.mark.parametrize("process_count", [1, 3])
def test_evaluation_covers_every_example_once(prepared, process_count):
    config, builder, spec = prepared
    config = config.copy_and_resolve_references()
    config.data.eval_batch_size = 3 * process_count  # 16 examples: the last batch is padded
    split = config.data.eval_split
    reference = builder.as_data_source(split=split)
    expected_pixels = sum(
        int((np.asarray(reference[i]["label"]) != IGNORE).sum()) for i in range(len(reference))
    )
    valid_examples, valid_pixels, batches = 0, 0, []
    for p in range(process_count):
        part = list(
            input_pipeline.eval_iterator(
                builder, spec, config, split, layout(process_count, p, process_count)
            )
        )
        batches.append(len(part))
        for batch in part:
            valid_examples += int(batch["mask"].sum())
            valid_pixels += int((batch["label"] != IGNORE).sum())
            assert (batch["label"][~batch["mask"]] == IGNORE).all()
    assert valid_examples == len(reference)
    assert valid_pixels == expected_pixels
    assert len(set(batches)) == 1  # every process runs the same number of steps
