"""Tests for tce_jax.datasets: the street_scenes TFDS builder and the dataset registry."""

from __future__ import annotations

import hashlib
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tce_jax.datasets as datasets
from tce_jax.datasets import street_scenes as ss

C = ss.NUM_CLASSES


def _build(data_dir) -> tfds.core.DatasetBuilder:
    """Builds the small config with the network switched off: nothing may be downloaded."""

    def no_network(*args, **kwargs):
        raise AssertionError("street_scenes tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        builder = tfds.builder("street_scenes/small", data_dir=data_dir)
        builder.download_and_prepare()
    return builder


def _read(builder, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        ex["id"].decode(): (ex["image"], ex["label"])
        for ex in tfds.as_numpy(builder.as_dataset(split=split))
    }


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("tfds_a"))


@pytest.fixture(scope="module")
def train(builder):
    return _read(builder, "train")


def test_generate_scene_is_deterministic():
    image, label = ss.generate_scene(ss.SPLIT_SEEDS["train"], 3)
    again = ss.generate_scene(ss.SPLIT_SEEDS["train"], 3)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(label, again[1])
    other_index = ss.generate_scene(ss.SPLIT_SEEDS["train"], 4)
    other_split = ss.generate_scene(ss.SPLIT_SEEDS["validation"], 3)
    assert not np.array_equal(image, other_index[0])
    assert not np.array_equal(image, other_split[0])


def test_generate_scene_golden_hash():
    # Pins the bytes of one scene: the generator draws only from numpy's PCG64 stream and uses
    # IEEE arithmetic, so this holds on every machine. A failure means the data changed (a new
    # generator version: bump StreetScenes.VERSION and the hash) or numpy changed its stream.
    image, label = ss.generate_scene(ss.SPLIT_SEEDS["train"], 0)
    digest = hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest()
    assert digest == "8b7bae63d5d15339cb733aa454a7ab9a1c255b9ec833eb2cba79944745d5cba6"


def test_two_builds_are_identical(builder, tmp_path):
    other = _build(tmp_path)
    for split in ("train", "validation", "test"):
        a, b = _read(builder, split), _read(other, split)
        assert a.keys() == b.keys()
        for key, (image, label) in a.items():
            np.testing.assert_array_equal(image, b[key][0], err_msg=key)
            np.testing.assert_array_equal(label, b[key][1], err_msg=key)


def test_examples_are_the_generator_output(builder, train):
    # PNG round trip is lossless, and the small config holds the first scenes of each split.
    for split in ("train", "test"):
        examples = train if split == "train" else _read(builder, split)
        for index in (0, 7, 15):
            image, label = examples[f"{split}/{index:05d}"]
            ref_image, ref_label = ss.generate_scene(ss.SPLIT_SEEDS[split], index)
            np.testing.assert_array_equal(image, ref_image)
            np.testing.assert_array_equal(label[..., 0], ref_label)


def test_splits_and_sizes(builder):
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 64,
        "validation": 16,
        "test": 16,
    }
    default = tfds.builder("street_scenes", data_dir=builder.data_dir_root)
    assert default.builder_config.name == "default"
    assert default.builder_config.num_examples == {"train": 1000, "validation": 200, "test": 200}
    assert str(default.version) == "1.0.0" and "1.0.0" in default.release_notes
    assert builder.info.metadata["class_names"] == list(ss.CLASS_NAMES)
    assert builder.info.supervised_keys == ("image", "label")


def test_image_and_label_format(train):
    assert len(train) == 64
    for image, label in train.values():
        assert image.dtype == np.uint8 and image.shape == (64, 128, 3)
        assert label.dtype == np.uint8 and label.shape == (64, 128, 1)
        values = set(np.unique(label).tolist())
        assert values <= set(range(C)) | {ss.IGNORE_LABEL}, values
    labels = np.stack([label for _, label in train.values()])
    assert (labels == ss.IGNORE_LABEL).any()  # the ignore label is exercised


def _frequencies(pixel_counts) -> np.ndarray:
    """Per-class share of the labelled pixels, from pixel counts per label value [256]."""
    return pixel_counts[:C] / pixel_counts[:C].sum()


def test_class_frequencies_small_train_split(train):
    labels = np.stack([label for _, label in train.values()])
    freq = _frequencies(np.bincount(labels.ravel(), minlength=256))
    assert (freq > 0).all(), dict(zip(ss.CLASS_NAMES, freq, strict=True))
    assert freq.max() / freq.min() >= 100


def test_class_frequencies_full_train_split():
    # The documented imbalance, measured on all 1000 training scenes (docs/street_scenes.md).
    pixels, images = ss.label_statistics("train", 1000)
    assert (images[:C] > 0).all()
    freq = dict(zip(ss.CLASS_NAMES, _frequencies(pixels), strict=True))
    assert max(freq.values()) / min(freq.values()) >= 100
    for stuff in ("road", "building"):
        assert freq[stuff] > 0.2  # large stuff classes: tens of percent
    for rare in ("traffic_sign", "rider", "bicycle"):
        assert 0.0005 < freq[rare] < 0.005, (rare, freq[rare])
    # The look-alike pair: riders are rarer than the pedestrians they resemble; both are rare.
    assert freq["rider"] < freq["person"] / 2 < 0.01
    assert freq["pole"] < 0.02


def test_person_and_rider_look_alike(train):
    # Same clothes and skin palette: their mean colours are close, unlike person vs. sky.
    images = np.stack([image for image, _ in train.values()]).astype(np.float64)
    labels = np.stack([label[..., 0] for _, label in train.values()])
    mean = {c: images[labels == c].mean(axis=0) for c in (ss.PERSON, ss.RIDER, ss.SKY)}
    assert np.abs(mean[ss.PERSON] - mean[ss.RIDER]).max() < 25
    assert np.abs(mean[ss.PERSON] - mean[ss.SKY]).max() > 50


def test_registry_lookup():
    spec = datasets.get_dataset_spec("street_scenes")
    assert spec.tfds_name == "street_scenes"
    assert spec.num_classes == C >= 8
    assert spec.class_names == datasets.CLASS_NAMES == ss.CLASS_NAMES
    assert len(spec.palette) == C and all(len(rgb) == 3 for rgb in spec.palette)
    assert (spec.image_key, spec.label_key) == ("image", "label")
    assert spec.splits == {"train": "train", "validation": "validation", "test": "test"}
    assert spec.ignore_index == 255 and spec.label_map is None


def test_registry_unknown_name():
    with pytest.raises(ValueError, match=r"Unknown dataset 'citiscapes'.*street_scenes"):
        datasets.get_dataset_spec("citiscapes")


def test_spec_validates_its_fields():
    with pytest.raises(ValueError, match="num_classes=3"):
        datasets.DatasetSpec("x", 3, ("a", "b"), ((0, 0, 0),) * 2, "image", "label", {})
