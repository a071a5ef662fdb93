"""A user's folder in mmsegmentation's img_dir/ann_dir layout (data.name='folder'): the spec
from classes.txt/palette.txt, preparation through TFDS, batches through the input pipeline,
label mappings, a short training run, and one clear error per kind of broken folder."""

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import folder as folder_config
from tce_jax import config_lib, datasets, input_pipeline, train
from tce_jax.datasets import folder

H, W = 32, 48
CLASSES = ("background", "road", "car")
IGNORE = 255


def write_image(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def write_folder(root, splits=(("train", 6), ("val", 3)), *, img_suffix=".png", values=None):
    """Images (lossless PNG unless img_suffix says otherwise) and grey label maps of random
    train ids 0..2 with an ignored band; one train label map in a sub-folder is a palette PNG,
    one validation label map a 16-bit PNG.

    Returns {(split folder, id): (image array, label array)}.
    """
    rng = np.random.default_rng(0)
    values = np.array(values if values is not None else [0, 1, 2])
    raw = {}
    for split, count in splits:
        for i in range(count):
            example_id = f"city{i % 2}/im{i}" if split == "train" else f"im{i}"
            image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            label = values[rng.integers(0, len(values), (H, W))].astype(np.uint8)
            label[:3] = IGNORE
            write_image(os.path.join(root, "img_dir", split, example_id + img_suffix), image)
            label_path = os.path.join(root, "ann_dir", split, example_id + ".png")
            if split == "train" and i == 1:  # a palette PNG: its indices are the labels
                palette_image = Image.frombytes("P", (W, H), label.tobytes())
                palette_image.putpalette(list(np.random.default_rng(1).integers(0, 256, 768)))
                assert np.array_equal(np.asarray(palette_image), label)
                os.makedirs(os.path.dirname(label_path), exist_ok=True)
                palette_image.save(label_path)
            elif split == "val" and i == 1:
                write_image(label_path, label.astype(np.uint16))
                with Image.open(label_path) as written:
                    assert written.mode == "I;16"  # a 16-bit grey PNG
            else:
                write_image(label_path, label)
            raw[(split, example_id)] = (image, label)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    return raw


def folder_cfg(root, data_dir, variant="tiny", **fields):
    config = folder_config.get_config(variant)
    config.data.folder.root = str(root)
    config.data.folder.img_suffix = ".png"  # lossless images compare exactly
    config.data.data_dir = str(data_dir)
    for key, value in fields.items():
        config.data.folder[key] = value
    return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("folder")
    raw = write_folder(str(base / "my_data"))
    with open(base / "my_data" / "palette.txt", "w") as f:
        f.write("0 0 0\n128 64 128\n0 0 142\n")
    config = folder_cfg(base / "my_data", base / "tfds")
    builder, spec = input_pipeline.load_builder(config)
    return config, builder, spec, raw


def test_spec_comes_from_the_folder(prepared):
    config, builder, spec, _ = prepared
    assert spec.num_classes == 3 and spec.class_names == CLASSES
    assert spec.palette == ((0, 0, 0), (128, 64, 128), (0, 0, 142))
    assert spec.label_map is None and spec.ignore_index == IGNORE
    assert spec.tfds_name.startswith("segmentation_folder/my_data_")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 6, "validation": 3,
    }  # fmt: skip
    assert builder.info.metadata["num_classes"] == 3
    # The registry needs the config for a folder, and lists "folder" among the datasets.
    with pytest.raises(ValueError, match="described by config.data.folder"):
        datasets.get_dataset_spec("folder")
    with pytest.raises(ValueError, match="folder"):
        datasets.get_dataset_spec("no_such_dataset")


def test_default_palette_is_the_voc_colour_map():
    # The first entries of PASCAL VOC's colour map, as published with the dataset.
    assert folder.default_palette(6) == (
        (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
    )  # fmt: skip
    assert len(set(folder.default_palette(255))) == 255


def test_examples_are_stored_as_found_and_palette_labels_as_indices(prepared):
    _, builder, spec, raw = prepared
    source = builder.as_data_source(split="train")
    by_id = {source[i]["image_id"].decode(): source[i] for i in range(len(source))}
    expected = {i: arrays for (split, i), arrays in raw.items() if split == "train"}
    assert sorted(by_id) == sorted(expected)
    for example_id, (image, label) in expected.items():
        np.testing.assert_array_equal(by_id[example_id][spec.image_key], image)
        np.testing.assert_array_equal(by_id[example_id][spec.label_key][..., 0], label)


def test_batches_through_the_input_pipeline(prepared):
    config, builder, spec, raw = prepared
    layout = input_pipeline.Layout(num_shards=1, process_index=0, process_count=1)
    data = input_pipeline.Dataset(builder, spec, config, layout)
    batch = next(data.train_iterator())
    assert batch["image"].shape == (8, *config.data.crop_size, 3)
    assert set(np.unique(batch["label"])) <= {0, 1, 2, IGNORE}
    geometry = data.eval_geometry("validation")
    assert geometry.label_shape == (H, W)
    batch = next(data.eval_iterator("validation"))
    source = builder.as_data_source(split="validation")
    for row in range(3):
        example_id = source[row]["image_id"].decode()
        np.testing.assert_array_equal(batch["label"][row], raw[("val", example_id)][1])
    assert batch["mask"].tolist() == [True] * 3 + [False] * 5


@pytest.mark.parametrize(
    "fields,values,lut",
    [
        # mmsegmentation's reduce_zero_label: 0 -> 255, k -> k - 1, 255 stays 255.
        ({"reduce_zero_label": True}, [0, 1, 2, 3], {0: 255, 1: 0, 2: 1, 3: 2, 255: 255}),
        # An explicit map; every value it does not list (here 0 and 9) is ignored.
        (
            {"label_map": "7:0, 8:1,26:2"},
            [0, 7, 8, 9, 26],
            {0: 255, 7: 0, 8: 1, 9: 255, 26: 2, 255: 255},
        ),
    ],
)
def test_label_mappings_turn_raw_values_into_train_ids(tmp_path, fields, values, lut):
    splits = (("train", 2), ("val", 2))
    raw = write_folder(str(tmp_path / "raw"), splits, values=values, img_suffix=".jpg")
    config = folder_cfg(tmp_path / "raw", tmp_path / "tfds", img_suffix=".jpg", **fields)
    builder, spec = input_pipeline.load_builder(config)
    layout = input_pipeline.Layout(num_shards=1, process_index=0, process_count=1)
    data = input_pipeline.Dataset(builder, spec, config, layout)
    batch = next(data.eval_iterator("validation"))
    source = builder.as_data_source(split="validation")
    for row in range(2):
        label = raw[("val", source[row]["image_id"].decode())][1]
        expected = np.vectorize(lut.__getitem__)(label)
        np.testing.assert_array_equal(batch["label"][row], expected)


def test_label_map_file_is_read(tmp_path):
    write_folder(str(tmp_path / "d"), values=[0, 10, 20])
    (tmp_path / "d" / "label_map.txt").write_text("# raw train_id\n10 1\n20 2\n0 0\n")
    spec = datasets.get_dataset_spec("folder", folder_cfg(tmp_path / "d", tmp_path / "t"))
    expected = np.full(256, IGNORE)
    expected[[0, 10, 20]] = [0, 1, 2]
    np.testing.assert_array_equal(spec.label_map, expected)
    # The config field wins over the file.
    config = folder_cfg(tmp_path / "d", tmp_path / "t", label_map="10:0")
    assert datasets.get_dataset_spec("folder", config).label_map[10] == 0


def test_changing_the_folder_prepares_a_fresh_copy(tmp_path):
    write_folder(str(tmp_path / "d"))
    config = folder_cfg(tmp_path / "d", tmp_path / "t")
    before = datasets.get_dataset_spec("folder", config).tfds_name
    assert datasets.get_dataset_spec("folder", config).tfds_name == before
    label = tmp_path / "d" / "ann_dir" / "val" / "im0.png"
    write_image(str(label), np.zeros((H, W), np.uint8))
    os.utime(label, ns=(1, 1))  # a different modification time, whatever the clock
    assert datasets.get_dataset_spec("folder", config).tfds_name != before


def test_short_training_run_on_the_folder(prepared, tmp_path):
    config, *_ = prepared
    results = train.train_and_evaluate(config, str(tmp_path / "workdir"))
    assert set(results) == {"validation"}
    assert 0.0 <= results["validation"]["miou"] <= 1.0
    with open(tmp_path / "workdir" / "per_class.csv") as f:
        table = f.read()
    assert all(name in table for name in CLASSES)


# ---------------------------------------------------------------------------------------------
# Broken folders: one clear error each, naming the file.


def spec_error(root, data_dir, **fields):
    config = folder_cfg(root, data_dir, **fields)
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        datasets.get_dataset_spec("folder", config)
    return str(e.value)


def prepare_error(root, data_dir):
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        input_pipeline.load_builder(folder_cfg(root, data_dir))
    return str(e.value)


def test_missing_root_folders_and_files(tmp_path):
    assert "config.data.folder.root" in spec_error("", tmp_path / "t")
    assert "does not exist" in spec_error(tmp_path / "nowhere", tmp_path / "t")
    write_folder(str(tmp_path / "d"))
    shutil.rmtree(tmp_path / "d" / "ann_dir" / "val")
    message = spec_error(tmp_path / "d", tmp_path / "t")
    assert os.path.join(str(tmp_path / "d"), "ann_dir", "val") in message
    shutil.rmtree(tmp_path / "d" / "ann_dir")
    assert "ann_dir does not exist" in spec_error(tmp_path / "d", tmp_path / "t")
    write_folder(str(tmp_path / "e"))
    os.remove(tmp_path / "e" / "classes.txt")
    assert "classes.txt does not exist" in spec_error(tmp_path / "e", tmp_path / "t")


def test_unpaired_files_are_named(tmp_path):
    write_folder(str(tmp_path / "d"))
    os.remove(tmp_path / "d" / "ann_dir" / "train" / "city0" / "im2.png")
    message = spec_error(tmp_path / "d", tmp_path / "t")
    assert "1 image(s)" in message and "city0/im2.png" in message and "no label map" in message
    write_folder(str(tmp_path / "e"))
    os.remove(tmp_path / "e" / "img_dir" / "val" / "im1.png")
    message = spec_error(tmp_path / "e", tmp_path / "t")
    assert "1 label map(s)" in message and "im1.png" in message and "no image" in message


def test_wrong_suffix_says_which_field_to_set(tmp_path):
    write_folder(str(tmp_path / "d"))
    message = spec_error(tmp_path / "d", tmp_path / "t", img_suffix=".jpg")
    assert "no images ending '.jpg'" in message and "'.png'" in message
    assert "config.data.folder.img_suffix" in message


def test_missing_evaluation_split_names_the_config_field(tmp_path):
    write_folder(str(tmp_path / "d"), (("train", 2),))
    message = spec_error(tmp_path / "d", tmp_path / "t")
    assert "config.data.eval_split='validation'" in message and "val/validation" in message


def test_bad_class_palette_and_map_files(tmp_path):
    write_folder(str(tmp_path / "d"))
    (tmp_path / "d" / "palette.txt").write_text("0 0 0\n1 2 3\n")
    assert "2 colours but classes.txt lists 3" in spec_error(tmp_path / "d", tmp_path / "t")
    os.remove(tmp_path / "d" / "palette.txt")
    (tmp_path / "d" / "classes.txt").write_text("a\n\nc\n")
    assert "line 2 is blank" in spec_error(tmp_path / "d", tmp_path / "t")
    (tmp_path / "d" / "classes.txt").write_text("a\nb\nc\n")
    message = spec_error(tmp_path / "d", tmp_path / "t", label_map="7:3")
    assert "maps 7 -> 3" in message
    with pytest.raises(config_lib.ConfigError, match="data.folder.label_map"):
        config_lib.validate_config(
            folder_cfg(tmp_path / "d", tmp_path / "t", label_map="7:1", reduce_zero_label=True)
        )


def test_size_mismatch_fails_before_preparation(tmp_path):
    write_folder(str(tmp_path / "d"))
    label = tmp_path / "d" / "ann_dir" / "val" / "im2.png"
    write_image(str(label), np.zeros((H, W - 1), np.uint8))
    message = prepare_error(tmp_path / "d", tmp_path / "t")
    assert "Size mismatch" in message and str(label) in message and "47x32" in message
    assert not list((tmp_path / "t").rglob("*.array_record*"))  # nothing was written


def test_labels_outside_the_classes_are_named(tmp_path):
    write_folder(str(tmp_path / "d"))
    label = tmp_path / "d" / "ann_dir" / "val" / "im1.png"
    values = np.zeros((H, W), np.uint8)
    values[5, 5] = 3  # classes.txt lists 3 classes: 0..2
    write_image(str(label), values)
    message = prepare_error(tmp_path / "d", tmp_path / "t")
    assert str(label) in message and "value(s) 3" in message and "3 classes" in message


def test_colour_label_maps_are_refused(tmp_path):
    write_folder(str(tmp_path / "d"))
    label = tmp_path / "d" / "ann_dir" / "val" / "im0.png"
    write_image(str(label), np.zeros((H, W, 3), np.uint8))
    message = prepare_error(tmp_path / "d", tmp_path / "t")
    assert str(label) in message and "RGB" in message and "class indices" in message


def test_unreadable_images_are_named(tmp_path):
    write_folder(str(tmp_path / "d"))
    image = tmp_path / "d" / "img_dir" / "train" / "city1" / "im3.png"
    image.write_bytes(b"not an image at all")
    message = prepare_error(tmp_path / "d", tmp_path / "t")
    assert "Unreadable image" in message and str(image) in message


def test_label_png_that_only_pil_reads_is_named(tmp_path):
    """PIL skips chunk CRCs; TensorFlow's decoder, the one training uses, does not."""
    write_folder(str(tmp_path / "d"))
    label = tmp_path / "d" / "ann_dir" / "val" / "im2.png"
    data = bytearray(label.read_bytes())
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    data[idat + 4 + length] ^= 0xFF  # corrupt the IDAT chunk's CRC
    label.write_bytes(bytes(data))
    with Image.open(io.BytesIO(bytes(data))) as pil_label:
        pil_label.load()  # PIL still reads it
    message = prepare_error(tmp_path / "d", tmp_path / "t")
    assert "Unreadable label map" in message and str(label) in message
