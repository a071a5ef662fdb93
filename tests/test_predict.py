"""--mode=predict: prediction files of a checkpoint, for a split or a folder of images."""

import os

import numpy as np
import pytest
from PIL import Image
from run_utils import read_jsonl, run_main_in_process

from tce_jax import input_pipeline, predict, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def checkpointed(prepared, tmp_path_factory):
    """(config, workdir with one checkpoint (step 1, the best), its validation confusion
    matrix from the trainer's evaluation)."""
    config, _, _ = prepared
    config = config.copy_and_resolve_references()
    workdir = str(tmp_path_factory.mktemp("predict_workdir"))
    trainer = train.Trainer(config, workdir)
    state = trainer.initial_state()  # freshly initialised weights: predictions vary by pixel
    trainer.save(state, 1, {"miou": 0.5})
    trainer.manager.wait_until_finished()
    confusion = trainer.evaluate(state, "validation")["confusion"]
    trainer.manager.close()
    return config, workdir, confusion


@pytest.fixture(scope="module")
def split_predictions(checkpointed):
    config, workdir, _ = checkpointed
    return predict.predict(config, workdir, checkpoint="best", split="validation")


def validation_examples(builder):
    """[(name, image, label)] of the validation split, named as the predictions are."""
    source = builder.as_data_source("validation")
    out = []
    for i in range(len(source)):
        ex = source[i]
        name = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
        out.append((name.rsplit("/", 1)[-1], ex["image"], ex["label"][..., 0]))
    return out


def confusion_of_files(output_dir, builder, spec) -> tuple[np.ndarray, set]:
    """Confusion matrix (rows: label) of the trainIds files against the validation labels,
    and the classes predicted."""
    c = spec.num_classes
    matrix = np.zeros((c, c), np.int64)
    seen = set()
    for name, _, label in validation_examples(builder):
        train_ids = read_png(os.path.join(output_dir, "trainIds", f"{name}_trainIds.png"))
        assert train_ids.dtype == np.uint8 and train_ids.shape == label.shape
        valid = label != spec.ignore_index
        matrix += np.bincount(
            label[valid].astype(np.int64) * c + train_ids[valid], minlength=c * c
        ).reshape(c, c)
        seen.update(np.unique(train_ids).tolist())
    return matrix, seen


def test_split_predictions_are_the_evaluated_ones(checkpointed, split_predictions, prepared):
    config, workdir, confusion = checkpointed
    _, builder, spec = prepared
    assert split_predictions == os.path.join(workdir, "predictions", "validation")
    matrix, seen = confusion_of_files(split_predictions, builder, spec)
    for name, image, _ in validation_examples(builder):
        train_ids = read_png(os.path.join(split_predictions, "trainIds", f"{name}_trainIds.png"))
        colours = read_png(os.path.join(split_predictions, "color", f"{name}_color.png"))
        np.testing.assert_array_equal(colours, np.asarray(spec.palette, np.uint8)[train_ids])
        blend = read_png(os.path.join(split_predictions, "overlay", f"{name}_overlay.png"))
        expected = np.round(0.5 * image.astype(np.float64) + 0.5 * colours).astype(np.uint8)
        np.testing.assert_allclose(blend, expected, atol=1)  # float32 vs float64 rounding
    # The same pixels, in the same files as the examples they belong to, as evaluation counts.
    np.testing.assert_array_equal(matrix, confusion)
    assert len(seen) > 1  # a per-example mix-up of names would change the matrix
    assert sorted(os.listdir(split_predictions)) == ["color", "overlay", "trainIds"]


def test_pmap_writes_the_same_predictions(checkpointed, prepared, tmp_path):
    config, workdir, confusion = checkpointed
    _, builder, spec = prepared
    config = config.copy_and_resolve_references()
    config.parallelism = "pmap"
    out = predict.predict(config, workdir, split="validation", output_dir=str(tmp_path))
    np.testing.assert_array_equal(confusion_of_files(out, builder, spec)[0], confusion)


def test_tta_reaches_evaluation_and_prediction(checkpointed, prepared, tmp_path):
    """With flip and a second scale, evaluation scores other predictions than without, and
    prediction writes exactly those."""
    config, workdir, confusion = checkpointed
    _, builder, spec = prepared
    config = config.copy_and_resolve_references()
    config.data.tta_flip = True
    config.data.tta_scales = (1.0, 0.5)
    trainer = train.Trainer(config, workdir)
    tta_confusion = trainer.evaluate(trainer.restore(1), "validation")["confusion"]
    trainer.manager.close()
    assert not np.array_equal(tta_confusion, confusion)
    out = predict.predict(config, workdir, checkpoint="1", output_dir=str(tmp_path / "tta"))
    np.testing.assert_array_equal(confusion_of_files(out, builder, spec)[0], tta_confusion)


def test_image_folder_predictions_at_original_size(checkpointed, split_predictions, prepared):
    """The validation images as files (in a subfolder, with Cityscapes' `_leftImg8bit`) and a
    smaller JPEG: the same predictions as from the split, and the JPEG's at its own size."""
    config, workdir, _ = checkpointed
    _, builder, spec = prepared
    folder = os.path.join(workdir, "my_images")
    examples = validation_examples(builder)
    for k, (name, image, _) in enumerate(examples):
        sub = os.path.join(folder, "city" if k % 2 else "")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(image).save(os.path.join(sub, f"{name}_leftImg8bit.png"))
    Image.fromarray(examples[0][1][:40, :100]).save(os.path.join(folder, "odd.jpg"))

    out = predict.predict(config, workdir, checkpoint="latest", images_dir=folder)
    assert out == os.path.join(workdir, "predictions", "my_images")
    for k, (name, _, _) in enumerate(examples):
        relative = os.path.join("city" if k % 2 else "", f"{name}_trainIds.png")
        np.testing.assert_array_equal(
            read_png(os.path.join(out, "trainIds", relative)),
            read_png(os.path.join(split_predictions, "trainIds", f"{name}_trainIds.png")),
        )
    odd = read_png(os.path.join(out, "trainIds", "odd_trainIds.png"))
    assert odd.shape == (40, 100)
    assert read_png(os.path.join(out, "overlay", "odd_overlay.png")).shape == (40, 100, 3)


def test_processes_split_the_images_between_them(prepared, tmp_path):
    config, builder, spec = prepared
    for k, size in enumerate([(8, 8), (16, 8), (8, 24), (8, 8), (32, 32)]):
        Image.fromarray(np.full((*size, 3), k, np.uint8)).save(tmp_path / f"im{k}.png")
    names = [f"im{k}" for k in range(5)]

    def run(make):
        parts = []
        for p in range(2):
            _, batches, total = make(input_pipeline.Layout(2, p, 2))
            batches = list(batches)
            rows = [r.name for _, rs in batches for r in rs if r is not None]
            assert len(rows) == total
            parts.append((rows, len(batches)))
        assert parts[0][1] == parts[1][1]  # every process runs the same number of steps
        return parts[0][0], parts[1][0]

    first, second = run(lambda layout: predict.images_batches(str(tmp_path), config, layout))
    assert first == names[0::2] and second == names[1::2]
    # One image: process 1 has none, yet feeds a batch of the same shapes and types (masked).
    single = tmp_path / "single"
    single.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(single / "only.png")
    batches = [
        list(predict.images_batches(str(single), config, input_pipeline.Layout(2, p, 2))[1])
        for p in range(2)
    ]
    (batch0, _), (batch1, rows1) = batches[0][0], batches[1][0]
    assert [r is None for r in rows1] == [True] * 4 and not batch1["mask"].any()
    for key in batch0:
        assert (batch1[key].dtype, batch1[key].shape) == (batch0[key].dtype, batch0[key].shape)
    first, second = run(
        lambda layout: predict.split_batches(
            input_pipeline.Dataset(builder, spec, config, layout), "validation"
        )
    )
    expected = [name for name, _, _ in validation_examples(builder)]
    assert first + second == expected


def test_image_folder_geometry_follows_evaluation():
    config = train.config_lib.get_base_config()
    same = input_pipeline.canvas_geometry(np.array([[64, 128], [64, 128]]), config.data)
    assert same == input_pipeline.EvalGeometry((64, 128), (64, 128), resize=False)
    mixed = input_pipeline.canvas_geometry(np.array([[40, 100], [64, 90]]), config.data)
    assert mixed == input_pipeline.EvalGeometry((64, 128), (64, 100), resize=True)
    config.data.base_size = (32, 64)  # rescale to fit 32 x 64
    scaled = input_pipeline.canvas_geometry(np.array([[64, 128]]), config.data)
    assert scaled == input_pipeline.EvalGeometry((32, 64), (64, 128), resize=True)


def test_bad_inputs_name_the_flag(checkpointed, tmp_path):
    config, workdir, _ = checkpointed
    bad = predict.PredictInputError
    with pytest.raises(bad, match="--predict_images=.* holds no"):
        predict.predict(config, workdir, images_dir=str(tmp_path))
    with pytest.raises(bad, match="is not a directory"):
        predict.predict(config, workdir, images_dir=str(tmp_path / "missing"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(bad, match="Cannot read the image .*broken.png"):
        predict.predict(config, workdir, images_dir=str(tmp_path))
    with pytest.raises(bad, match="--predict_split='training'"):
        predict.predict(config, workdir, split="training")
    with pytest.raises(FileNotFoundError, match="No checkpoint '7'"):
        predict.predict(config, workdir, checkpoint="7")


def test_command_line_predicts_a_folder_without_the_dataset(checkpointed, tmp_path):
    """--mode=predict on a folder of images reads no dataset: the TFDS data dir stays empty."""
    config, workdir, _ = checkpointed
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((64, 128, 3), 40 * k, np.uint8)).save(folder / f"p{k}.jpg")
    empty_data_dir = tmp_path / "tfds"
    empty_data_dir.mkdir()
    common = [
        f"--config={ROOT}/configs/default.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={empty_data_dir}",
        "--mode=predict",
        "--checkpoint=1",
    ]
    result = run_main_in_process(
        *common, f"--predict_images={folder}", f"--predict_dir={tmp_path / 'out'}"
    )
    assert result.returncode == 0, result.stderr
    assert "predicted 3/3 images" in result.stdout
    assert sorted(os.listdir(tmp_path / "out" / "color")) == [f"p{k}_color.png" for k in range(3)]
    assert not os.listdir(empty_data_dir)
    last = read_jsonl(os.path.join(workdir, "provenance.jsonl"))[-1]
    assert (last["mode"], last["checkpoint"], last["predict"]) == ("predict", "1", str(folder))
    # A folder without images: one line on stderr, no traceback.
    empty = run_main_in_process(*common, f"--predict_images={empty_data_dir}")
    assert empty.returncode == 1
    assert empty.stderr.strip().splitlines()[-1].startswith("error: --predict_images=")
    assert "Traceback" not in empty.stderr
