"""The class index of a prepared split: per-example class counts and label sizes, cached next
to the TFDS data, and the positions of a process's shard in its split."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tce_jax.datasets import class_index


def test_class_index_counts_every_class_of_every_example_and_is_cached(prepared, monkeypatch):
    _, builder, spec = prepared
    index = class_index.load_class_index(builder, spec, "validation")
    source = builder.as_data_source(split="validation")
    assert index.counts.shape == (len(source), spec.num_classes)
    for i in range(len(source)):
        label = np.asarray(source[i][spec.label_key])[..., 0]
        np.testing.assert_array_equal(
            index.counts[i], np.bincount(label.ravel(), minlength=256)[: spec.num_classes]
        )
        np.testing.assert_array_equal(index.sizes[i], label.shape)
    np.testing.assert_array_equal(index.presence, index.counts > 0)
    path = class_index.index_path(builder.data_dir, "validation")
    assert os.path.dirname(path) == os.fspath(builder.data_dir) and os.path.exists(path)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(class_index, "compute_class_index", fail)
    cached = class_index.load_class_index(builder, spec, "validation")
    np.testing.assert_array_equal(cached.counts, index.counts)
    # A different label map makes the cache stale.
    remapped = dataclasses.replace(spec, label_map=np.roll(np.arange(256, dtype=np.uint8), 1))
    with pytest.raises(AssertionError, match="recomputed"):
        class_index.load_class_index(builder, remapped, "validation")


def test_shard_positions_point_at_the_same_examples(prepared):
    _, builder, _ = prepared
    full = builder.as_data_source(split="train")
    seen = []
    for shard in range(3):
        shard_split = tfds.split_for_jax_process("train", process_index=shard, process_count=3)
        positions = class_index.shard_positions(builder, "train", shard_split)
        part = builder.as_data_source(split=shard_split)
        assert len(positions) == len(part)
        for i in (0, len(part) - 1):
            assert part[i]["id"] == full[int(positions[i])]["id"]
        seen.extend(positions.tolist())
    assert sorted(seen) == list(range(len(full)))
