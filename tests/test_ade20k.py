"""ADE20K (ADEChallengeData2016) through our TFDS builder, from a fake official archive:
splits, the 0 -> 255 / k -> k-1 label map, archive checks (every file decoded, damaged files
named, replaced archives detected), augmentation and evaluation of
images of many sizes, and a few training steps of the small config."""

import json
import os
import re
import shutil

import fake_archives
import numpy as np
import pytest

from configs import ade20k as ade_config
from tce_jax import datasets, example_transforms, input_pipeline, train
from tce_jax.datasets import ade20k, class_index

IGNORE = 255


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return fake_archives.prepare(
        tmp_path_factory.mktemp("ade20k"), fake_archives.write_ade20k, ade_config.get_config("tiny")
    )


def test_label_map_names_and_palette():
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


def test_splits_and_examples_are_the_released_files(prepared):
    _, builder, spec, raw = prepared
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


def test_pipeline_labels_and_evaluation_geometry(prepared):
    config, builder, spec, raw = prepared
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


def test_augmentation_invariants(prepared):
    config, builder, spec, _ = prepared
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


def test_archive_checks_name_the_path_and_the_fix(tmp_path):
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


def test_class_index_of_the_training_split(prepared):
    _, builder, spec, raw = prepared
    index = class_index.get_class_index(builder, spec, "train")
    source = builder.as_data_source(split="train")
    for i in range(len(source)):
        mapped = ade20k.LABEL_MAP[raw[source[i]["image_id"].decode()]]
        np.testing.assert_array_equal(
            index.counts[i], np.bincount(mapped.ravel(), minlength=256)[:150]
        )
        np.testing.assert_array_equal(index.sizes[i], mapped.shape)
    assert os.path.exists(class_index.index_path(builder.data_dir, "train"))


def test_small_config_trains_and_evaluates_at_label_resolution(prepared, tmp_path):
    config = ade_config.get_config("ce,runlocal")
    config.data.data_dir = prepared[0].data.data_dir
    results = train.train_and_evaluate(config, str(tmp_path))
    confusion = results["validation"]["confusion"]
    raw = prepared[3]
    labelled = sum(
        int((ade20k.LABEL_MAP[raw[k]] != IGNORE).sum())
        for k in ("ADE_val_00000001", "ADE_val_00000002")
    )
    assert confusion.shape == (150, 150) and confusion.sum() == labelled
    with open(tmp_path / "train_metrics.jsonl") as f:
        lines = [json.loads(x) for x in f]
    assert [x["step"] for x in lines] == [2, 4, 6]  # tiny: six steps, logged every two
    assert all(np.isfinite(x["train/loss"]) for x in lines)


def _other_shape_png(data: bytes) -> bytes:
    return fake_archives.png_bytes(np.zeros((8, 8), np.uint8))


def _value_151(data: bytes) -> bytes:
    return fake_archives.png_bytes(np.full((48, 64), 151, np.uint8))


TRAIN_IMAGE = ade20k.image_path("training", "ADE_train_00000001")  # 48x64
TRAIN_ANNOTATION = ade20k.annotation_path("training", "ADE_train_00000001")


@pytest.mark.parametrize(
    "member, damage, problem",
    [
        (TRAIN_IMAGE, fake_archives.truncate, r"is not a decodable JPEG \("),
        (TRAIN_ANNOTATION, fake_archives.damage_png_body, r"is not a decodable PNG \(Invalid PNG"),
        # PIL reads this annotation (it ignores chunk CRCs); training's decoder does not.
        (TRAIN_ANNOTATION, fake_archives.break_png_crc, r"is not a decodable PNG \(Invalid PNG"),
        (TRAIN_ANNOTATION, "zip", r"fails the zip's CRC-32 check"),
        (TRAIN_ANNOTATION, _other_shape_png, rf"is 8x8 but its image {TRAIN_IMAGE} is 64x48"),
        (TRAIN_ANNOTATION, _value_151, r"holds the value 151 \(annotations are 0\.\.150\)"),
    ],
    ids=["jpeg-cut-off", "png-body", "png-chunk-crc", "zip-crc", "shape", "value"],
)
def test_a_damaged_file_is_named_with_the_fix(tmp_path, member, damage, problem):
    manual_dir = str(tmp_path / "manual")
    if damage == "zip":
        fake_archives.write_ade20k(manual_dir)
        fake_archives.flip_stored_byte(os.path.join(manual_dir, ade20k.ARCHIVE), member)
    else:
        fake_archives.write_ade20k(manual_dir, damage={member: damage})
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        ade20k.check_manual_dir(manual_dir)
    message = str(e.value)
    assert re.match(rf"ADEChallengeData2016\.zip: {re.escape(member)} {problem}", message), message
    assert message.endswith(
        f"; the archive is damaged: download it again from {ade20k.DOWNLOAD_URL} and replace "
        f"{os.path.join(manual_dir, ade20k.ARCHIVE)}"
    )
    assert "\n" not in message
    if damage != "zip":  # (reading a small member's first bytes may already check its CRC)
        assert ade20k.check_manual_dir(manual_dir, decode=False)  # quick checks cannot tell


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
