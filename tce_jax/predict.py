r"""Predictions of a trained checkpoint, written as PNG files.

    python -m tce_jax.main --config=configs/cityscapes.py --workdir=workdirs/cs_tce \
        --mode=predict --checkpoint=best --predict_split=validation
    python -m tce_jax.main --config=configs/cityscapes.py --workdir=workdirs/cs_tce \
        --mode=predict --predict_images=/data/my_photos --predict_dir=/tmp/out

The model and its checkpoint are restored as `tce_jax.train.evaluate` restores them, and every
batch goes through the evaluation's prediction step (`tce_jax.steps.predict_step`: whole or
sliding-window inference as `config.data.eval_mode` says, test-time augmentation as
`config.data.tta_flip` / `tta_scales` say), so the predictions of a split are exactly those
evaluation scores. Predictions have each image's original resolution. For every image `NAME`,
under the output directory:

* `trainIds/NAME_trainIds.png`: uint8 train ids (255 where ignored);
* `color/NAME_color.png`: the train ids in the dataset's palette (`DatasetSpec.palette`);
* `overlay/NAME_overlay.png`: that colour map blended over the image (`OVERLAY_ALPHA`);
* Cityscapes only, `labelIds/NAME_labelIds.png`: the official label ids, as cityscapesscripts'
  `evalPixelLevelSemanticLabeling` and the Cityscapes test server read them (`NAME` is
  `<city>_<seq>_<frame>`; point `CITYSCAPES_RESULTS` at that folder alone: the evaluator takes
  every `<city>_<seq>_<frame>*.png` below it for that image).

`NAME` is the example's id in the prepared dataset (Cityscapes `frankfurt_000000_000294`,
ADE20K `ADE_val_00000001`, street scenes `00003`) or, for a folder of images, the file's path
below the folder without its extension (and without Cityscapes' `_leftImg8bit`). In
multi-process runs each process predicts and writes its own part of the images.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import math
import os
import time
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
from etils import epath
from PIL import Image

from tce_jax import example_transforms, input_pipeline, train, train_metrics
from tce_jax import workdir as workdir_lib
from tce_jax.datasets import cityscapes

OVERLAY_ALPHA = 0.5  # weight of the colour map in the overlay
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Features that name an example, in the order they are looked for.
ID_FEATURES = ("image_id", "id")
# Cityscapes image files end in this; predictions are named without it.
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit"


class PredictInputError(ValueError):
    """A --predict_* argument names nothing usable; the message says what to pass."""


# ---------------------------------------------------------------------------------------------
# Label files.


def cityscapes_label_ids() -> np.ndarray:
    """uint8 [256]: train id -> Cityscapes label id, the inverse of the official table
    (`cityscapesscripts.helpers.labels`); train id 255 (ignored) -> 0 (`unlabeled`)."""
    from cityscapesscripts.helpers import labels as cs_labels

    lut = np.zeros(256, np.uint8)
    for label in cs_labels.labels:
        if 0 <= label.trainId < cityscapes.IGNORE_LABEL:
            lut[label.trainId] = label.id
    return lut


def colour_table(palette) -> np.ndarray:
    """uint8 [256, 3]: train id -> its palette colour; black for ids beyond the palette (255)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return lut


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 `(1 - alpha) * image + alpha * colours`, rounded."""
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.round(blend).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class PredictionWriter:
    """Writes the PNG files of each prediction from a few threads (PNG encoding releases the
    GIL), at most `max_pending` images behind the caller."""

    def __init__(self, output_dir: str, spec, *, max_pending: int = 16, threads: int = 4):
        self.root = epath.Path(output_dir)
        self.colours = colour_table(spec.palette)
        self.label_ids = cityscapes_label_ids() if _is_cityscapes(spec) else None
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._pending: list[concurrent.futures.Future] = []
        self._max_pending = max_pending

    def submit(self, name: str, train_ids: np.ndarray, image: Callable[[], np.ndarray]) -> None:
        """Queues the files of `name`: `train_ids` uint8 [H, W]; `image()` the RGB image
        [H, W, 3] for the overlay (called in a writer thread)."""
        while len(self._pending) >= self._max_pending:
            self._pending.pop(0).result()  # re-raises a failed write here
        self._pending.append(self._pool.submit(self._write, name, train_ids, image))

    def _write(self, name: str, train_ids: np.ndarray, image) -> None:
        colours = self.colours[train_ids]
        rgb = image()
        if rgb.shape[:2] != train_ids.shape:
            raise ValueError(
                f"{name}: image of size {rgb.shape[:2]} but prediction of size {train_ids.shape}"
            )
        files = {
            "trainIds": train_ids,
            "color": colours,
            "overlay": overlay(rgb, colours),
        }
        if self.label_ids is not None:
            files["labelIds"] = self.label_ids[train_ids]
        for kind, array in files.items():
            path = self.root / kind / f"{name}_{kind}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png(array))

    def close(self) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(wait=True)


def _is_cityscapes(spec) -> bool:
    return spec.tfds_name == cityscapes.TFDS_NAME


# ---------------------------------------------------------------------------------------------
# Inputs: batches as evaluation builds them, and what each row is.


@dataclasses.dataclass(frozen=True)
class Row:
    """One image of a batch: its output name and a loader of its original RGB image."""

    name: str
    image: Callable[[], np.ndarray]


def _decode_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _example_name(example, id_feature: str | None, index: int, split: str) -> str:
    """The example's id (street scenes' `validation/00003` without the split; a folder
    dataset's path, with its subfolders), or its index in the split without one."""
    if id_feature is None:
        return f"{index:06d}"
    value = example[id_feature]
    value = value.decode() if isinstance(value, bytes) else str(value)
    return value.removeprefix(f"{split}/")


def split_batches(data: input_pipeline.Dataset, split: str):
    """(geometry, iterator of (batch, [Row or None per row]), number of images of this
    process) for this process's part of a split: `data.eval_iterator`'s batches, each row
    named by the example's id (or, without one, its index in the split)."""
    spec = data.spec
    if split not in data.split_names:
        raise PredictInputError(
            f"--predict_split={split!r}: {spec.tfds_name} has the splits "
            f"{sorted(data.split_names)}; pass one of them, or --predict_images=DIR."
        )
    geometry = data.eval_geometry(split)
    features = data.builder.info.features
    id_feature = next((f for f in ID_FEATURES if f in features), None)
    # This process's contiguous part of the split, the one evaluation reads.
    offset, source = data.eval_part(split)

    def rows(first: int, count: int) -> list[Row | None]:
        out = []
        for i in range(first, first + count):
            if i >= len(source):
                out.append(None)  # padding of the last batch
                continue
            example = source[i]
            out.append(
                Row(
                    _example_name(example, id_feature, offset + i, split),
                    functools.partial(_decode_rgb, example[spec.image_key]),
                )
            )
        return out

    def generate():
        first = 0
        for batch in data.eval_iterator(split, geometry):
            count = len(batch["mask"])
            batch.pop("label")  # predictions need none
            yield batch, rows(first, count)
            first += count

    return geometry, generate(), len(source)


def list_images(images_dir: str) -> list[str]:
    """Image files (png, jpg) below `images_dir`, relative to it, sorted."""
    if not os.path.isdir(images_dir):
        raise PredictInputError(
            f"--predict_images={images_dir!r} is not a directory: pass a folder of .png/.jpg "
            "images (searched recursively)."
        )
    found = []
    for root, _, files in os.walk(images_dir):
        for f in files:
            if f.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, f), images_dir))
    if not found:
        raise PredictInputError(
            f"--predict_images={images_dir!r} holds no {'/'.join(IMAGE_SUFFIXES)} files."
        )
    return sorted(found)


def image_name(relative_path: str) -> str:
    """Output name of an image file: its path without extension (and `_leftImg8bit`)."""
    stem = os.path.splitext(relative_path)[0]
    return stem.removesuffix(CITYSCAPES_IMAGE_SUFFIX)


def _canvas_example(image: np.ndarray, geometry, config) -> dict:
    """One image as `Dataset.eval_iterator` delivers it (`example_transforms.canvas_image`):
    rescaled to fit `config.data.base_size` (rounded to uint8) and padded into the canvas with
    the pad colour (normalised on the device by the step)."""
    canvas, image_size = example_transforms.canvas_image(
        tf.convert_to_tensor(image, tf.uint8), geometry.canvas, geometry.resize, config.data
    )
    return {
        "image": canvas.numpy(),
        "mask": True,
        "image_size": image_size.numpy(),
        "label_size": np.array(image.shape[:2], np.int32),
    }


def _read_image(path: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            return _decode_rgb(f.read())
    except (OSError, ValueError) as e:  # PIL's errors for unreadable or truncated files
        raise PredictInputError(f"Cannot read the image {path}: {e}; fix or remove it.") from e


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file's header."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError) as e:
        raise PredictInputError(f"Cannot read the image {path}: {e}; fix or remove it.") from e


def images_batches(images_dir: str, config, layout: input_pipeline.Layout):
    """(geometry, iterator of (batch, rows), number of images of this process) for a folder:
    process i takes every i-th image; every process runs the same number of batches, the
    last ones padded with masked rows."""
    files = list_images(images_dir)
    sizes = np.array([_image_size(os.path.join(images_dir, f)) for f in files], np.int64)
    # Predictions at the original sizes, the canvas by evaluation's rule.
    geometry = input_pipeline.canvas_geometry(sizes, config.data)
    local_batch = config.data.eval_batch_size // layout.process_count
    mine = files[layout.process_index :: layout.process_count]
    num_batches = math.ceil(math.ceil(len(files) / layout.process_count) / local_batch)

    def load(relative: str) -> dict:
        return _canvas_example(_read_image(os.path.join(images_dir, relative)), geometry, config)

    def generate():
        with concurrent.futures.ThreadPoolExecutor(4) as pool:

            def submit(b: int) -> list[concurrent.futures.Future]:
                return [pool.submit(load, f) for f in mine[b * local_batch : (b + 1) * local_batch]]

            upcoming = submit(0)
            for b in range(num_batches):
                current, upcoming = upcoming, submit(b + 1)  # read one batch ahead
                names = mine[b * local_batch : (b + 1) * local_batch]
                examples = [c.result() for c in current]
                rows: list[Row | None] = [
                    Row(image_name(f), functools.partial(_read_image, os.path.join(images_dir, f)))
                    for f in names
                ]
                padding = {**(examples[0] if examples else _blank(geometry, config)), "mask": False}
                examples += [padding] * (local_batch - len(examples))
                rows += [None] * (local_batch - len(rows))
                yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}, rows

    return geometry, generate(), len(mine)


def _blank(geometry, config) -> dict:
    """A padding row for a batch without any image of this process: the canvas in the pad
    colour (uint8, as every other batch: all processes must feed the same types)."""
    canvas = np.broadcast_to(example_transforms.pad_colour(config.data), (*geometry.canvas, 3))
    return {
        "image": canvas.copy(),
        "mask": False,
        "image_size": np.array(geometry.canvas, np.int32),
        "label_size": np.array(geometry.label_shape, np.int32),
    }


# ---------------------------------------------------------------------------------------------
# The command.


def default_output_dir(workdir: str, split: str | None, images_dir: str | None) -> str:
    """`<workdir>/predictions/<split or the images folder's name>`."""
    what = os.path.basename(os.path.normpath(images_dir)) if images_dir else split
    return os.path.join(workdir, "predictions", what)


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    checkpoint: str = "best",
    split: str | None = None,
    images_dir: str | None = None,
    output_dir: str | None = None,
    log_every: int = 50,
) -> str:
    """Writes the predictions of a checkpoint of `workdir` ("best", "latest" or a step) for a
    split of the configured dataset (default `config.data.eval_split`) or for the images below
    `images_dir`, under `output_dir` (default `default_output_dir`); see the module docstring.
    Prints a progress line every `log_every` images. Returns the output directory."""
    if split and images_dir:
        raise PredictInputError("Pass either --predict_split or --predict_images, not both.")
    split = split or (None if images_dir else config.data.eval_split)
    output_dir = output_dir or default_output_dir(workdir, split, images_dir)
    details = {"checkpoint": checkpoint, "predict": images_dir or split, "output": output_dir}
    # Held like an evaluation: the lock (no training writes checkpoints meanwhile) and a
    # provenance record.
    with workdir_lib.open_run(config, workdir, mode="predict", details=details):
        _predict(config, workdir, checkpoint, split, images_dir, output_dir, log_every)
    return output_dir


def _predict(config, workdir, checkpoint, split, images_dir, output_dir, log_every) -> None:
    trainer = train.Trainer(config, workdir, prepare_data=images_dir is None)
    try:
        step = train._checkpoint_step(trainer.manager, checkpoint)
        if images_dir:
            geometry, batches, total = images_batches(images_dir, config, trainer.layout)
        else:
            geometry, batches, total = split_batches(trainer.data, split)
        if trainer.is_main:
            source = images_dir or f"split {split!r} of {trainer.spec.tfds_name}"
            print(
                f"Predicting {source} with the checkpoint of step {step} ({checkpoint}) into "
                f"{output_dir}",
                flush=True,
            )
        state = trainer.restore(step)
        _run(trainer, state, geometry, batches, total, output_dir, log_every)
    finally:
        trainer.manager.close()


def _run(trainer, state, geometry, batches: Iterator, total: int, output_dir, log_every) -> None:
    step_fn = trainer.programs.predict_step(geometry)
    writer = PredictionWriter(output_dir, trainer.spec)
    done, start, last_log = 0, time.time(), 0
    try:
        for batch, rows in batches:
            predictions = trainer.parallel.local_rows(
                step_fn(state, trainer.parallel.put_batch(batch))
            )
            for row, label_size, prediction in zip(
                rows, batch["label_size"], predictions, strict=True
            ):
                if row is None:
                    continue
                h, w = (int(v) for v in label_size)
                writer.submit(row.name, prediction[:h, :w].astype(np.uint8), row.image)
                done += 1
            if trainer.is_main and (done - last_log >= log_every or done == total):
                last_log = done
                rate = done / max(time.time() - start, 1e-9)
                print(
                    f"  predicted {done}/{total} images  {rate:.2f} images/s  "
                    f"ETA {train_metrics.format_duration((total - done) / max(rate, 1e-9))}",
                    flush=True,
                )
    finally:
        writer.close()
