"""Tests for the rare-object street scenes (`street_scenes_rare`): the rare classes' shares and
areas, determinism, the TFDS config, the registry, the `:rare` config, and that the street
scenes themselves did not change."""

from __future__ import annotations

import hashlib
import importlib.util
import os

import numpy as np
import pytest
import run_utils
import tensorflow_datasets as tfds

import tce_jax.datasets as datasets
from tce_jax import config_lib
from tce_jax.datasets import street_scenes as ss
from tce_jax.datasets import street_scenes_rare as rare
from tce_jax.datasets import street_scenes_render as render

TRAIN = render.SPLIT_SEEDS["train"]
SAMPLE = 200  # scenes rendered for the share tests (about 2 s, both kinds)


def _rare_pixels(labels: np.ndarray) -> np.ndarray:
    return (labels >= render.NUM_CLASSES) & (labels != render.IGNORE_LABEL)


@pytest.fixture(scope="module")
def sample():
    """Labels of the first `SAMPLE` training scenes: (rare scenes, street scenes)."""
    return (
        np.stack([rare.generate_rare_scene(TRAIN, i)[1] for i in range(SAMPLE)]),
        np.stack([render.generate_scene(TRAIN, i)[1] for i in range(SAMPLE)]),
    )


def test_street_scenes_are_unchanged():
    # The digest of 45 street scenes (15 per split) taken before the rare scenes were added:
    # the old study's data stays byte-identical.
    digest = hashlib.sha256()
    for split_seed in render.SPLIT_SEEDS.values():
        for index in range(0, 100, 7):
            image, label = render.generate_scene(split_seed, index)
            digest.update(image.tobytes() + label.tobytes())
    assert digest.hexdigest() == "7a27230e9a23840c60f67d0d8010b918f1ebe53a46c03208df1119f40f60eeb1"


def test_classes_are_appended():
    assert rare.CLASS_NAMES[: render.NUM_CLASSES] == render.CLASS_NAMES
    assert rare.RARE_CLASS_NAMES == ("wall", "truck", "bus", "train", "motorcycle")
    assert rare.NUM_CLASSES == 16 and len(ss.RARE_PALETTE) == 16
    assert ss.RARE_PALETTE[: render.NUM_CLASSES] == ss.PALETTE


def test_rare_scene_is_deterministic():
    index = 24  # holds a bus (asserted)
    image, label = rare.generate_rare_scene(TRAIN, index)
    again = rare.generate_rare_scene(TRAIN, index)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(label, again[1])
    assert _rare_pixels(label).any()
    assert set(np.unique(label).tolist()) <= set(range(rare.NUM_CLASSES)) | {255}
    other_split = rare.generate_rare_scene(render.SPLIT_SEEDS["validation"], index)
    assert not np.array_equal(image, other_split[0])


def test_rare_classes_share_of_images_and_area(sample):
    labels, _ = sample
    for cls, p in rare.PRESENCE.items():
        pixels = (labels == cls).sum(axis=(1, 2))
        present = pixels > 0
        # The share of scenes holding it: Binomial(SAMPLE, p) / SAMPLE, within 4 sigma.
        tolerance = 4 * np.sqrt(p * (1 - p) / SAMPLE)
        assert abs(present.mean() - p) < tolerance, (rare.CLASS_NAMES[cls], present.mean(), p)
        assert 0.02 <= p <= 0.10
        assert present.any()
        # Where present, a real area: never a few pixels.
        assert pixels[present].min() >= rare.MIN_PIXELS == 32, rare.CLASS_NAMES[cls]
        assert np.median(pixels[present]) >= 50, rare.CLASS_NAMES[cls]


def test_frequent_classes_stay_as_they_are(sample):
    # A rare scene is its street scene with rare objects painted in: every other pixel keeps its
    # label (the motorcycles' riders are labelled rider, as in Cityscapes).
    labels, street = sample
    changed = labels != street
    allowed = [*range(render.NUM_CLASSES, rare.NUM_CLASSES), render.RIDER]
    assert np.isin(labels[changed], allowed).all()
    assert changed.mean() < 0.02
    without = ~_rare_pixels(labels).any(axis=(1, 2))  # about 3/4 of the scenes
    assert without.mean() > 0.6
    for index in np.flatnonzero(without)[:3]:
        image, _ = rare.generate_rare_scene(TRAIN, int(index))
        np.testing.assert_array_equal(image, render.generate_scene(TRAIN, int(index))[0])


def test_tfds_rare_small_config(tmp_path):
    builder = tfds.builder("street_scenes/rare_small", data_dir=tmp_path)
    builder.download_and_prepare()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 64,
        "validation": 16,
        "test": 16,
    }
    assert builder.info.metadata["class_names"] == list(rare.CLASS_NAMES)
    assert len(builder.info.metadata["palette"]) == 16
    examples = {
        ex["id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="validation"))
    }
    for index in (0, 9, 15):
        image, label = rare.generate_rare_scene(render.SPLIT_SEEDS["validation"], index)
        np.testing.assert_array_equal(examples[f"validation/{index:05d}"]["image"], image)
        np.testing.assert_array_equal(examples[f"validation/{index:05d}"]["label"][..., 0], label)
    full = tfds.builder("street_scenes/rare", data_dir=tmp_path)
    assert full.builder_config.num_examples == {"train": 1000, "validation": 200, "test": 200}
    assert full.builder_config.rare and not tfds.builder("street_scenes").builder_config.rare


def test_registry():
    for name, tfds_name in (
        ("street_scenes_rare", "street_scenes/rare"),
        ("street_scenes_rare_small", "street_scenes/rare_small"),
    ):
        spec = datasets.get_dataset_spec(name)
        assert spec.tfds_name == tfds_name
        assert spec.num_classes == 16 and spec.class_names == rare.CLASS_NAMES
        assert spec.palette == ss.RARE_PALETTE and spec.ignore_index == 255
    assert datasets.get_dataset_spec("street_scenes").num_classes == 11


def _default_config(variants: str):
    path = os.path.join(run_utils.ROOT, "configs", "default.py")
    spec = importlib.util.spec_from_file_location("default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variants)


def test_rare_config_variant():
    config = _default_config("rare")
    config_lib.validate_config(config)
    assert config.data.name == "street_scenes_rare"
    tiny = _default_config("ce,rare,tiny")
    config_lib.validate_config(tiny)
    assert tiny.data.name == "street_scenes_rare_small" and tiny.loss.name == "ce"
    assert _default_config("tiny").data.name == "street_scenes_small"
    assert _default_config("").data.name == "street_scenes"
