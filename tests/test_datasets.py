"""Tests for tce_jax.datasets: the street_scenes TFDS builder, the dataset registry, and the
verification of official archives (every file decoded; damaged files named)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import zipfile

import fake_archives
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import tce_jax.datasets as datasets
from experiments.street_scenes_frequencies import label_statistics
from tce_jax.datasets import archives
from tce_jax.datasets import street_scenes as ss
from tce_jax.datasets import street_scenes_render as render

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
    image, label = render.generate_scene(render.SPLIT_SEEDS["train"], 3)
    again = render.generate_scene(render.SPLIT_SEEDS["train"], 3)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(label, again[1])
    other_index = render.generate_scene(render.SPLIT_SEEDS["train"], 4)
    other_split = render.generate_scene(render.SPLIT_SEEDS["validation"], 3)
    assert not np.array_equal(image, other_index[0])
    assert not np.array_equal(image, other_split[0])


def test_generate_scene_golden_hash():
    # Pins the bytes of one scene: the generator draws only from numpy's PCG64 stream and uses
    # IEEE arithmetic, so this holds on every machine. A failure means the data changed (a new
    # generator version: bump StreetScenes.VERSION and the hash) or numpy changed its stream.
    image, label = render.generate_scene(render.SPLIT_SEEDS["train"], 0)
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
            ref_image, ref_label = render.generate_scene(render.SPLIT_SEEDS[split], index)
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
    pixels, images = label_statistics("train", 1000)
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
    classes = (render.PERSON, render.RIDER, render.SKY)
    mean = {c: images[labels == c].mean(axis=0) for c in classes}
    assert np.abs(mean[render.PERSON] - mean[render.RIDER]).max() < 25
    assert np.abs(mean[render.PERSON] - mean[render.SKY]).max() > 50


def test_registry_lookup():
    spec = datasets.get_dataset_spec("street_scenes")
    assert spec.tfds_name == "street_scenes"
    assert spec.num_classes == C >= 8
    assert spec.class_names == datasets.CLASS_NAMES == ss.CLASS_NAMES
    assert len(spec.palette) == C and all(len(rgb) == 3 for rgb in spec.palette)
    assert (spec.image_key, spec.label_key) == ("image", "label")
    assert spec.ignore_index == 255 and spec.label_map is None


def test_registry_unknown_name():
    with pytest.raises(ValueError, match=r"Unknown dataset 'citiscapes'.*street_scenes"):
        datasets.get_dataset_spec("citiscapes")


def test_spec_validates_its_fields():
    with pytest.raises(ValueError, match="num_classes=3"):
        datasets.DatasetSpec("x", 3, ("a", "b"), ((0, 0, 0),) * 2, "image", "label")


# --- archives: every file decoded as training decodes it, damaged ones named ---------------


def _zip(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


def _pictures():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), np.uint8)
    label = rng.integers(0, 19, (20, 30), np.uint8)
    return image, label


def test_verify_members_decodes_every_file(tmp_path):
    image, label = _pictures()
    path = _zip(
        tmp_path / "a.zip",
        {
            "x/image.png": fake_archives.png_bytes(image),
            "x/photo.jpg": fake_archives.jpeg_bytes(image),
            "x/label.png": fake_archives.png_bytes(label),
        },
    )
    members = [("x/image.png", "image"), ("x/photo.jpg", "image"), ("x/label.png", "label")]
    shapes = archives.verify_members(path, members, "https://example.org", workers=2)
    assert shapes == dict.fromkeys(["x/image.png", "x/photo.jpg", "x/label.png"], (20, 30))
    seen = {}

    def keep(member, array):
        seen[member] = array

    archives.verify_members(path, members, "https://example.org", check=keep)
    np.testing.assert_array_equal(seen["x/image.png"], image)  # the pixels, decoded by TF
    np.testing.assert_array_equal(seen["x/label.png"][..., 0], label)
    with pytest.raises(archives.DatasetNotFoundError, match="x/label.png is too dark; the arch"):
        archives.verify_members(
            path, members, "src", check=lambda m, a: "is too dark" if m == "x/label.png" else None
        )


def test_pil_reads_a_png_whose_chunk_crc_tensorflow_refuses():
    # Why preparation decodes with TensorFlow: PIL does not check chunk CRCs.
    broken = fake_archives.break_png_crc(fake_archives.png_bytes(_pictures()[1]))
    with Image.open(io.BytesIO(broken)) as image:
        image.load()
    with pytest.raises(tf.errors.InvalidArgumentError, match="Invalid PNG data"):
        tf.io.decode_png(broken)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (fake_archives.damage_png_body, r"is not a decodable PNG \(Invalid PNG data"),
        (fake_archives.break_png_crc, r"is not a decodable PNG \(Invalid PNG data"),
        (None, r"fails the zip's CRC-32 check"),
    ],
    ids=["png-body", "png-chunk-crc", "zip-crc"],
)
def test_verify_members_names_the_damaged_file_and_the_fix(tmp_path, damage, problem):
    image, label = _pictures()
    good, bad = fake_archives.png_bytes(image), fake_archives.png_bytes(label)
    path = _zip(
        tmp_path / "data.zip",
        {"d/a.png": good, "d/b.png": damage(bad) if damage else bad, "d/c.png": good},
    )
    if damage is None:
        fake_archives.flip_stored_byte(path, "d/b.png")
    members = [("d/a.png", "image"), ("d/b.png", "label"), ("d/c.png", "image")]
    with pytest.raises(archives.DatasetNotFoundError) as e:
        archives.verify_members(path, members, "https://example.org/data.zip", workers=2)
    fake_archives.assert_names_the_damage(
        str(e.value), str(path), "d/b.png", problem, "https://example.org/data.zip"
    )


def test_verify_members_names_a_cut_off_jpeg(tmp_path):
    photo = fake_archives.truncate(fake_archives.jpeg_bytes(_pictures()[0]))
    path = _zip(tmp_path / "p.zip", {"p/photo.jpg": photo})
    with pytest.raises(archives.DatasetNotFoundError, match=r"p/photo.jpg is not a decodable JPEG"):
        archives.verify_members(path, [("p/photo.jpg", "image")], "src")


def test_archive_fingerprint_follows_the_contents_not_the_file(tmp_path):
    image, label = _pictures()
    members = {"a.png": fake_archives.png_bytes(image), "b.png": fake_archives.png_bytes(label)}
    first = archives.archive_fingerprint(_zip(tmp_path / "1.zip", members))
    again = _zip(tmp_path / "2.zip", members)
    os.utime(again, (0, 0))  # another download of the same release
    assert archives.archive_fingerprint(again) == first
    members["b.png"] = fake_archives.png_bytes(label[:, ::-1].copy())
    changed = archives.archive_fingerprint(_zip(tmp_path / "3.zip", members))
    assert changed["sha256"] != first["sha256"] and changed["members"] == first["members"] == 2
