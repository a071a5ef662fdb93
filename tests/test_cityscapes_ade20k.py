"""Cityscapes and ADE20K through TFDS from fake official archives: splits, the official label
maps, archive checks (damaged files named, replaced archives extracted or detected again),
augmentation and evaluation at label resolution, and a few training steps of each small config.
What both datasets share is one test parametrized over them; the rest is per dataset."""

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from types import ModuleType

import fake_archives
import numpy as np
import pytest
import tensorflow_datasets as tfds
from cityscapesscripts.helpers import labels as cs_labels

from configs import ade20k as ade_config
from configs import cityscapes as cs_config
from tce_jax import datasets, example_transforms, input_pipeline, train
from tce_jax.datasets import ade20k, cityscapes, class_index

IGNORE = 255


@dataclasses.dataclass(frozen=True)
class Official:
    """What the shared tests need to know of one dataset."""

    config: ModuleType  # its config file
    write: Callable[..., dict]  # writes its fake archives (fake_archives)
    module: ModuleType  # tce_jax.datasets.<name>
    url: str  # where its damage messages send the user
    variants: str  # a small training config
    labelled: Callable[[dict], int]  # labelled pixels of the validation split, from `raw`


DATASETS = {
    "cityscapes": Official(
        cs_config,
        fake_archives.write_cityscapes,
        cityscapes,
        cityscapes.DOWNLOADS_PAGE,
        "stochastic_tce,sampling,slide,runlocal",
        # Every labelled pixel of the full-resolution validation label map.
        lambda raw: (
            cityscapes.LABEL_MAP[fake_archives.cityscapes_label_ids("frankfurt")] != IGNORE
        ).sum(),
    ),
    "ade20k": Official(
        ade_config,
        fake_archives.write_ade20k,
        ade20k,
        ade20k.DOWNLOAD_URL,
        "ce,runlocal",
        lambda raw: sum(
            int((ade20k.LABEL_MAP[raw[k]] != IGNORE).sum())
            for k in ("ADE_val_00000001", "ADE_val_00000002")
        ),
    ),
}


@pytest.fixture(scope="module")
def cityscapes_prepared(tmp_path_factory):
    """Fake archives in a manual dir, prepared by TFDS's cityscapes builder."""
    return fake_archives.prepare(
        tmp_path_factory.mktemp("cityscapes"),
        fake_archives.write_cityscapes,
        cs_config.get_config("tiny"),
    )


@pytest.fixture(scope="module")
def ade20k_prepared(tmp_path_factory):
    return fake_archives.prepare(
        tmp_path_factory.mktemp("ade20k"), fake_archives.write_ade20k, ade_config.get_config("tiny")
    )


# ---------------------------------------------------------------------------------------------
# Both datasets.


@pytest.mark.parametrize("name", DATASETS)
def test_small_config_trains_and_evaluates_at_label_resolution(name, request, tmp_path):
    dataset = DATASETS[name]
    prepared_config, *_, raw = request.getfixturevalue(f"{name}_prepared")
    config = dataset.config.get_config(dataset.variants)
    # Prepared once: training needs the archives no more.
    config.data.data_dir, config.data.manual_dir = prepared_config.data.data_dir, "/nonexistent"
    results = train.train_and_evaluate(config, str(tmp_path))
    confusion = results["validation"]["confusion"]
    num_classes = datasets.get_dataset_spec(name).num_classes
    assert confusion.shape == (num_classes, num_classes)
    assert confusion.sum() == dataset.labelled(raw)
    with open(tmp_path / "train_metrics.jsonl") as f:
        lines = [json.loads(x) for x in f]
    assert [x["step"] for x in lines] == [2, 4, 6]  # tiny: six steps, logged every two
    assert all(np.isfinite(x["train/loss"]) for x in lines)
    assert os.path.exists(tmp_path / "report.md")


def _extracted(tmp_path) -> list[str]:
    extracted = tmp_path / "tfds" / "downloads" / "extracted"
    return sorted(os.listdir(extracted)) if extracted.is_dir() else []


VAL_STEM = "frankfurt_000000_000294"
VAL_IMAGE = f"leftImg8bit/val/frankfurt/{VAL_STEM}_leftImg8bit.png"
VAL_LABEL = cityscapes.label_path("val", "frankfurt", VAL_STEM)
TRAIN_IMAGE = ade20k.image_path("training", "ADE_train_00000001")  # 48x64
TRAIN_ANNOTATION = ade20k.annotation_path("training", "ADE_train_00000001")


def _other_shape_png(data: bytes) -> bytes:
    return fake_archives.png_bytes(np.zeros((8, 8), np.uint8))


def _value_151(data: bytes) -> bytes:
    return fake_archives.png_bytes(np.full((48, 64), 151, np.uint8))


PNG_BROKEN = r"is not a decodable PNG \(Invalid PNG data"
ZIP_CRC = r"fails the zip's CRC-32 check"


@pytest.mark.parametrize(
    "name, archive, member, damage, problem",
    [
        ("cityscapes", cityscapes.LABELS_ZIP, VAL_LABEL, fake_archives.damage_png_body, PNG_BROKEN),
        # PIL reads these files (it ignores chunk CRCs); TensorFlow's decoder does not.
        ("cityscapes", cityscapes.IMAGES_ZIP, VAL_IMAGE, fake_archives.break_png_crc, PNG_BROKEN),
        ("cityscapes", cityscapes.IMAGES_ZIP, VAL_IMAGE, "zip", ZIP_CRC),
        # Not an image or label TFDS stores, but TFDS extracts it: its bad CRC is named too.
        (
            "cityscapes",
            cityscapes.LABELS_ZIP,
            f"gtFine/val/frankfurt/{VAL_STEM}_gtFine_polygons.json",
            "zip",
            ZIP_CRC,
        ),
        (
            "ade20k",
            ade20k.ARCHIVE,
            TRAIN_IMAGE,
            fake_archives.truncate,
            r"is not a decodable JPEG \(",
        ),
        ("ade20k", ade20k.ARCHIVE, TRAIN_ANNOTATION, fake_archives.damage_png_body, PNG_BROKEN),
        ("ade20k", ade20k.ARCHIVE, TRAIN_ANNOTATION, fake_archives.break_png_crc, PNG_BROKEN),
        ("ade20k", ade20k.ARCHIVE, TRAIN_ANNOTATION, "zip", ZIP_CRC),
        (
            "ade20k",
            ade20k.ARCHIVE,
            TRAIN_ANNOTATION,
            _other_shape_png,
            rf"is 8x8 but its image {TRAIN_IMAGE} is 64x48",
        ),
        (
            "ade20k",
            ade20k.ARCHIVE,
            TRAIN_ANNOTATION,
            _value_151,
            r"holds the value 151 \(annotations are 0\.\.150\)",
        ),
    ],
    ids=[
        "cityscapes-label-png-body",
        "cityscapes-image-png-chunk-crc",
        "cityscapes-image-zip-crc",
        "cityscapes-json-zip-crc",
        "ade20k-jpeg-cut-off",
        "ade20k-png-body",
        "ade20k-png-chunk-crc",
        "ade20k-zip-crc",
        "ade20k-shape",
        "ade20k-value",
    ],
)
def test_a_damaged_file_fails_preparation_naming_it_and_the_fix(
    tmp_path, name, archive, member, damage, problem
):
    dataset = DATASETS[name]
    config = dataset.config.get_config("runlocal")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.manual_dir = manual_dir = str(tmp_path / "manual")
    fake_archives.write_damaged(dataset.write, manual_dir, archive, member, damage)
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        input_pipeline.load_builder(config)
    archive_path = os.path.join(manual_dir, archive)
    fake_archives.assert_names_the_damage(str(e.value), archive_path, member, problem, dataset.url)
    builder = tfds.builder(datasets.get_dataset_spec(name).tfds_name, data_dir=config.data.data_dir)
    assert not builder.is_prepared()
    assert _extracted(tmp_path) == []  # no extracted copy left behind, complete or not
    if damage != "zip":  # (reading a small member's first bytes may already check its CRC)
        assert dataset.module.check_manual_dir(manual_dir, decode=False)  # quick checks cannot tell


# ---------------------------------------------------------------------------------------------
# Cityscapes.


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


def test_cityscapes_splits_and_examples(cityscapes_prepared):
    _, builder, spec, raw = cityscapes_prepared
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 2, "validation": 1, "test": 1,
    }  # fmt: skip
    source = builder.as_data_source(split="validation")
    example = source[0]
    assert example["image_id"].decode() == "frankfurt_000000_000294"
    assert example[spec.image_key].shape == (1024, 2048, 3)
    np.testing.assert_array_equal(example[spec.label_key][..., 0], raw["frankfurt_000000_000294"])


def test_labels_are_train_ids_of_the_official_table(cityscapes_prepared):
    config, builder, spec, raw = cityscapes_prepared
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


def test_training_crops_hold_train_ids_and_ignore_padding(cityscapes_prepared):
    config, builder, spec, _ = cityscapes_prepared
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


def test_cityscapes_archive_checks_name_the_path_and_the_fix(tmp_path):
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


def _config(tmp_path):
    config = cs_config.get_config("runlocal")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.manual_dir = str(tmp_path / "manual")
    return config


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


# ---------------------------------------------------------------------------------------------
# ADE20K.


def test_ade20k_label_map_names_and_palette():
    lut = ade20k.LABEL_MAP
    assert lut[0] == IGNORE
    np.testing.assert_array_equal(lut[1:151], np.arange(150))
    assert (lut[151:] == IGNORE).all()
    spec = datasets.get_dataset_spec("ade20k")
    assert spec.num_classes == 150 and spec.tfds_name == "ade20k"
    assert spec.class_names[:4] == ("wall", "building", "sky", "floor")
    assert spec.class_names[-1] == "flag" and len(set(spec.class_names)) == 150
    assert ade20k.OBJECT_INFO_NAMES[12].startswith("person, individual")
    assert spec.palette[0] == (120, 120, 120) and len(set(spec.palette)) > 140


def test_splits_and_examples_are_the_released_files(ade20k_prepared):
    _, builder, spec, raw = ade20k_prepared
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 4, "validation": 2,
    }  # fmt: skip
    source = builder.as_data_source(split="train")
    by_id = {source[i]["image_id"].decode(): source[i] for i in range(len(source))}
    assert sorted(by_id) == [f"ADE_train_0000000{k}" for k in range(1, 5)]
    for image_id, example in by_id.items():
        annotation = example[spec.label_key][..., 0]
        np.testing.assert_array_equal(annotation, raw[image_id])  # stored as released
        assert example[spec.image_key].shape == (*annotation.shape, 3)
    assert builder.info.metadata["class_names"][0] == "wall"


def test_pipeline_labels_and_evaluation_geometry(ade20k_prepared):
    config, builder, spec, raw = ade20k_prepared
    layout = input_pipeline.Layout(1, 0, 1)
    geometry = input_pipeline.Dataset(builder, spec, config, layout).eval_geometry("validation")
    # 48x72 -> 64x96 and 60x40 -> 96x64 (short side 64): canvas 96x96, labels up to 60x72.
    assert geometry == input_pipeline.EvalGeometry((96, 96), (60, 72), resize=True)
    config = config.copy_and_resolve_references()
    config.data.eval_batch_size = 4  # 2 examples, 2 padding
    data = input_pipeline.Dataset(builder, spec, config, layout)
    (batch,) = list(data.eval_iterator("validation"))
    np.testing.assert_array_equal(batch["mask"], [True, True, False, False])
    np.testing.assert_array_equal(batch["image_size"][:2], [[64, 96], [96, 64]])
    np.testing.assert_array_equal(batch["label_size"][:2], [[48, 72], [60, 40]])
    for k, image_id in enumerate(["ADE_val_00000001", "ADE_val_00000002"]):
        h, w = raw[image_id].shape
        np.testing.assert_array_equal(batch["label"][k, :h, :w], ade20k.LABEL_MAP[raw[image_id]])
        assert (batch["label"][k, h:] == IGNORE).all() and (
            batch["label"][k, :, w:] == IGNORE
        ).all()
    assert (batch["label"][2:] == IGNORE).all()
    # Canvas padding: the mean colour (within 0.01 of 0 once normalised).
    assert (batch["image"][0, 64:] == example_transforms.pad_colour(config.data)).all()


def test_augmentation_invariants(ade20k_prepared):
    config, builder, spec, _ = ade20k_prepared
    config = config.copy_and_resolve_references()
    config.data.crop_size = (64, 64)
    layout = input_pipeline.Layout(1, 0, 1)
    iterator = input_pipeline.Dataset(builder, spec, config, layout).train_iterator()
    batches = [next(iterator) for _ in range(3)]
    for batch in batches:
        assert batch["label"].shape == (8, 64, 64) and batch["image"].shape == (8, 64, 64, 3)
        assert set(np.unique(batch["label"])) <= set(range(150)) | {IGNORE}
    labels = np.concatenate([b["label"] for b in batches])
    assert {0, 2, 12, 20, 149} <= set(np.unique(labels))  # raw 1, 3, 13, 21, 150
    # At ratio 0.5 every image is at most 43 pixels high: 64x64 crops are padded with 255.
    config.data.min_scale = config.data.max_scale = 0.5
    config.data.flip = False
    batch = next(input_pipeline.Dataset(builder, spec, config, layout).train_iterator())
    assert (batch["label"][:, 48:] == IGNORE).all()
    assert (batch["image"][:, 48:] == example_transforms.pad_colour(config.data)).all()


def test_ade20k_archive_checks_name_the_path_and_the_fix(tmp_path):
    how = "ADEChallengeData2016.zip"
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="does not exist") as e:
        ade20k.check_manual_dir(str(tmp_path / "nowhere"))
    assert "sceneparsing" in str(e.value)

    dropped = ade20k.annotation_path("training", "ADE_train_00000003")
    fake_archives.write_ade20k(str(tmp_path / "incomplete"), drop=dropped)
    with pytest.raises(input_pipeline.DatasetNotFoundError, match=dropped) as e:
        ade20k.check_manual_dir(str(tmp_path / "incomplete"))
    assert how in str(e.value)

    corrupt = ade20k.annotation_path("validation", "ADE_val_00000002")
    fake_archives.write_ade20k(str(tmp_path / "corrupt"), corrupt=corrupt)
    with pytest.raises(input_pipeline.DatasetNotFoundError, match=corrupt) as e:
        ade20k.check_manual_dir(str(tmp_path / "corrupt"))
    assert "8-bit grey PNG" in str(e.value) and how in str(e.value)


def test_a_corrupt_jpeg_fails_preparation_with_its_path(tmp_path):
    # The header looks like a JPEG: only decoding (during preparation) finds the damage.
    corrupt = ade20k.image_path("training", "ADE_train_00000002")
    fake_archives.write_ade20k(str(tmp_path / "manual"), corrupt=corrupt)
    config = ade_config.get_config("runlocal")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.manual_dir = str(tmp_path / "manual")
    with pytest.raises(input_pipeline.DatasetNotFoundError, match=corrupt) as e:
        input_pipeline.load_builder(config)
    assert "decodable JPEG" in str(e.value)


def test_ade20k_class_index_of_the_training_split(ade20k_prepared):
    _, builder, spec, raw = ade20k_prepared
    index = class_index.get_class_index(builder, spec, "train")
    source = builder.as_data_source(split="train")
    for i in range(len(source)):
        mapped = ade20k.LABEL_MAP[raw[source[i]["image_id"].decode()]]
        np.testing.assert_array_equal(
            index.counts[i], np.bincount(mapped.ravel(), minlength=256)[:150]
        )
        np.testing.assert_array_equal(index.sizes[i], mapped.shape)
    assert os.path.exists(class_index.index_path(builder.data_dir, "train"))


def _annotations(builder, spec, split) -> dict[str, np.ndarray]:
    source = builder.as_data_source(split=split)
    return {
        source[i]["image_id"].decode(): source[i][spec.label_key][..., 0]
        for i in range(len(source))
    }


def test_a_dataset_prepared_from_another_archive_is_refused(tmp_path):
    config = ade_config.get_config("runlocal")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.manual_dir = manual_dir = str(tmp_path / "manual")
    fake_archives.write_ade20k(manual_dir)
    builder, _ = input_pipeline.load_builder(config)
    data_dir = str(builder.data_dir)
    fake_archives.write_ade20k(manual_dir)  # the same release, downloaded again
    input_pipeline.load_builder(config)  # accepted: same contents
    raw = fake_archives.write_ade20k(manual_dir, mirror=True)  # another release
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        input_pipeline.load_builder(config)
    message = str(e.value)
    assert f"{data_dir} was prepared from another {ade20k.ARCHIVE}" in message
    assert f"delete {data_dir}" in message and os.path.join(manual_dir, ade20k.ARCHIVE) in message
    assert "\n" not in message
    shutil.rmtree(data_dir)  # as the message says
    builder, spec = input_pipeline.load_builder(config)
    annotations = _annotations(builder, spec, "validation")
    for image_id, annotation in annotations.items():
        np.testing.assert_array_equal(annotation, raw[image_id])  # the new release's data
