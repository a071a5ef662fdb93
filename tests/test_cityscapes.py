"""Cityscapes through TFDS from fake official archives: splits, the official label table,
archive checks (damaged files named, replaced archives extracted again), evaluation at full
resolution, and a few training steps of the small config."""

import json
import os
import re
import shutil

import fake_archives
import numpy as np
import pytest
import tensorflow_datasets as tfds
from cityscapesscripts.helpers import labels as cs_labels

from configs import cityscapes as cs_config
from tce_jax import datasets, example_transforms, input_pipeline, train
from tce_jax.datasets import cityscapes

IGNORE = 255


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Fake archives in a manual dir, prepared by TFDS's cityscapes builder."""
    return fake_archives.prepare(
        tmp_path_factory.mktemp("cityscapes"),
        fake_archives.write_cityscapes,
        cs_config.get_config("tiny"),
    )


def test_label_map_is_the_official_table():
    lut = cityscapes.LABEL_MAP
    assert lut.shape == (256,) and lut.dtype == np.uint8
    for label in cs_labels.labels:
        if label.id < 0:
            continue  # license plate: id -1, not a value of the label PNGs
        expected = label.trainId if 0 <= label.trainId < IGNORE else IGNORE
        assert lut[label.id] == expected, label.name
    assert (lut[34:] == IGNORE).all()
    assert sorted(set(lut.tolist()) - {IGNORE}) == list(range(19))
    assert cityscapes.CLASS_NAMES[:3] == ("road", "sidewalk", "building")
    assert cityscapes.CLASS_NAMES[-1] == "bicycle" and len(cityscapes.CLASS_NAMES) == 19
    assert cityscapes.PALETTE[0] == (128, 64, 128)
    spec = datasets.get_dataset_spec("cityscapes")
    assert spec.tfds_name == "cityscapes/semantic_segmentation"
    assert spec.class_names == cityscapes.CLASS_NAMES and spec.palette == cityscapes.PALETTE


def test_splits_and_examples(prepared):
    _, builder, spec, raw = prepared
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 2, "validation": 1, "test": 1,
    }  # fmt: skip
    source = builder.as_data_source(split="validation")
    example = source[0]
    assert example["image_id"].decode() == "frankfurt_000000_000294"
    assert example[spec.image_key].shape == (1024, 2048, 3)
    np.testing.assert_array_equal(example[spec.label_key][..., 0], raw["frankfurt_000000_000294"])


def test_labels_are_train_ids_of_the_official_table(prepared):
    config, builder, spec, raw = prepared
    layout = input_pipeline.Layout(1, 0, 1)
    config = config.copy_and_resolve_references()
    config.data.eval_batch_size = 1
    (batch,) = list(
        input_pipeline.Dataset(builder, spec, config, layout).eval_iterator("validation")
    )
    label = batch["label"][0]
    ids = raw["frankfurt_000000_000294"]
    assert label.shape == ids.shape == (1024, 2048)  # full resolution, not the 128x256 canvas
    expected = np.vectorize(
        lambda i: (
            cs_labels.id2label[i].trainId if 0 <= cs_labels.id2label[i].trainId < 255 else IGNORE
        )
    )(np.arange(34))
    np.testing.assert_array_equal(label, expected[ids])
    assert set(np.unique(label)) == set(range(19)) | {IGNORE}
    assert batch["image"].shape == (1, 128, 256, 3)  # rescaled to base_size (128, 256)
    np.testing.assert_array_equal(batch["image_size"][0], (128, 256))
    np.testing.assert_array_equal(batch["label_size"][0], (1024, 2048))


def test_training_crops_hold_train_ids_and_ignore_padding(prepared):
    config, builder, spec, _ = prepared
    config = config.copy_and_resolve_references()
    config.data.min_scale = config.data.max_scale = 0.25  # 32x64 images, 64x128 crops
    config.data.flip = False
    layout = input_pipeline.Layout(1, 0, 1)
    batch = next(input_pipeline.Dataset(builder, spec, config, layout).train_iterator())
    labels = batch["label"]
    assert labels.shape == (8, 64, 128)
    assert set(np.unique(labels)) <= set(range(19)) | {IGNORE}
    assert (labels[:, 32:] == IGNORE).all() and (labels[:, :, 64:] == IGNORE).all()
    # Padded with the mean colour (within 0.01 of 0 once normalised).
    assert (batch["image"][:, 32:] == example_transforms.pad_colour(config.data)).all()
    assert len(set(np.unique(labels[:, :32, :64])) - {IGNORE}) >= 3


def test_archive_checks_name_the_path_and_the_fix(tmp_path):
    how = "cityscapes-dataset.com"
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="does not exist") as e:
        cityscapes.check_manual_dir(str(tmp_path / "nowhere"))
    assert how in str(e.value) and "leftImg8bit_trainvaltest.zip" in str(e.value)

    only_images = tmp_path / "only_images"
    fake_archives.write_cityscapes(str(only_images))
    os.remove(only_images / "gtFine_trainvaltest.zip")
    os.makedirs(only_images / "gtFine_trainvaltest")
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        cityscapes.check_manual_dir(str(only_images))
    message = str(e.value)
    assert str(only_images / "gtFine_trainvaltest.zip") in message and how in message
    assert "extracted folder" in message

    member = "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png"
    corrupt = tmp_path / "corrupt"
    fake_archives.write_cityscapes(str(corrupt), corrupt=member)
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        cityscapes.check_manual_dir(str(corrupt))
    message = str(e.value)
    assert member in message and "2048x1024 8-bit RGB PNG" in message and how in message

    truncated = tmp_path / "truncated"
    shutil.copytree(corrupt, truncated)
    with open(truncated / "gtFine_trainvaltest.zip", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="not a readable zip"):
        cityscapes.check_manual_dir(str(truncated))


def test_load_builder_fails_fast_on_a_wrong_manual_dir(tmp_path):
    config = cs_config.get_config("runlocal")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.manual_dir = str(tmp_path)
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="it holds nothing"):
        input_pipeline.load_builder(config)
    assert not os.path.exists(tmp_path / "tfds" / "cityscapes" / "semantic_segmentation")


def test_small_config_trains_with_sampling_and_sliding_evaluation(prepared, tmp_path):
    config, *_ = prepared
    config = cs_config.get_config("stochastic_tce,sampling,slide,runlocal")
    config.data.data_dir, config.data.manual_dir = prepared[0].data.data_dir, "/nonexistent"
    results = train.train_and_evaluate(config, str(tmp_path))
    figures = results["validation"]
    assert figures["confusion"].shape == (19, 19)
    # Every labelled pixel of the full-resolution validation label map was counted.
    label = fake_archives.cityscapes_label_ids("frankfurt")
    assert figures["confusion"].sum() == (cityscapes.LABEL_MAP[label] != IGNORE).sum()
    with open(tmp_path / "train_metrics.jsonl") as f:
        lines = [json.loads(x) for x in f]
    assert [x["step"] for x in lines] == [2, 4, 6]  # tiny: six steps, logged every two
    assert all(np.isfinite(x["train/loss"]) for x in lines)
    assert os.path.exists(tmp_path / "report.md")


VAL_STEM = "frankfurt_000000_000294"
VAL_IMAGE = f"leftImg8bit/val/frankfurt/{VAL_STEM}_leftImg8bit.png"
VAL_LABEL = cityscapes.label_path("val", "frankfurt", VAL_STEM)


def _config(tmp_path):
    config = cs_config.get_config("runlocal")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.manual_dir = str(tmp_path / "manual")
    return config


def _extracted(tmp_path) -> list[str]:
    extracted = tmp_path / "tfds" / "downloads" / "extracted"
    return sorted(os.listdir(extracted)) if extracted.is_dir() else []


@pytest.mark.parametrize(
    "zip_name, member, damage, problem",
    [
        (
            cityscapes.LABELS_ZIP,
            VAL_LABEL,
            fake_archives.damage_png_body,
            r"is not a decodable PNG \(Invalid PNG data",
        ),
        (
            cityscapes.IMAGES_ZIP,
            VAL_IMAGE,
            fake_archives.break_png_crc,  # PIL reads this file; TensorFlow does not
            r"is not a decodable PNG \(Invalid PNG data",
        ),
        (cityscapes.IMAGES_ZIP, VAL_IMAGE, "zip", r"fails the zip's CRC-32 check"),
        # Not an image or label TFDS stores, but TFDS extracts it: its bad CRC is named too.
        (
            cityscapes.LABELS_ZIP,
            f"gtFine/val/frankfurt/{VAL_STEM}_gtFine_polygons.json",
            "zip",
            r"fails the zip's CRC-32 check",
        ),
    ],
    ids=["label-png-body", "image-png-chunk-crc", "image-zip-crc", "json-zip-crc"],
)
def test_a_damaged_file_fails_preparation_naming_it(tmp_path, zip_name, member, damage, problem):
    config = _config(tmp_path)
    manual_dir = config.data.manual_dir
    if damage == "zip":  # damaged in transit: the bytes no longer match the zip's CRC-32
        fake_archives.write_cityscapes(manual_dir)
        fake_archives.flip_stored_byte(os.path.join(manual_dir, zip_name), member)
    else:  # damaged before packing: the zip's CRC-32 matches, the PNG does not decode
        fake_archives.write_cityscapes(manual_dir, damage={member: damage})
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        input_pipeline.load_builder(config)
    message = str(e.value)
    assert re.match(rf"{re.escape(zip_name)}: {re.escape(member)} {problem}", message), message
    assert message.endswith(
        "; the archive is damaged: download it again from "
        f"https://www.cityscapes-dataset.com/downloads/ and replace "
        f"{os.path.join(manual_dir, zip_name)}"
    )
    assert "\n" not in message
    builder = tfds.builder(cityscapes.TFDS_NAME, data_dir=config.data.data_dir)
    assert not builder.is_prepared()
    assert _extracted(tmp_path) == []  # no extracted copy left behind, complete or not


def test_a_replaced_archive_is_extracted_again(tmp_path):
    config = _config(tmp_path)
    manual_dir = config.data.manual_dir
    fake_archives.write_cityscapes(manual_dir, damage={VAL_LABEL: fake_archives.damage_png_body})
    with pytest.raises(input_pipeline.DatasetNotFoundError, match=re.escape(VAL_LABEL)):
        input_pipeline.load_builder(config)
    assert _extracted(tmp_path) == []  # checked before TFDS extracts anything
    # Earlier versions (or a preparation that crashed after extracting) left TFDS's extraction
    # of the damaged archives, under the archives' file names only.
    downloads = tmp_path / "tfds" / "downloads"
    tfds.download.DownloadManager(download_dir=downloads).extract(
        [os.path.join(manual_dir, name) for name in cityscapes.ARCHIVES]
    )
    assert _extracted(tmp_path) == [f"ZIP.{name}" for name in sorted(cityscapes.ARCHIVES)]
    # The user downloads the archives again; this release differs (mirrored) in every file.
    raw = fake_archives.write_cityscapes(manual_dir, mirror=True)
    builder, spec = input_pipeline.load_builder(config)
    example = builder.as_data_source(split="validation")[0]
    np.testing.assert_array_equal(example[spec.label_key][..., 0], raw[VAL_STEM])
    expected_image = fake_archives.cityscapes_image(raw[VAL_STEM])
    np.testing.assert_array_equal(example[spec.image_key], expected_image)
    assert _extracted(tmp_path) == []  # the extracted copy (as large as the zips) is removed
