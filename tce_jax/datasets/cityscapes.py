"""Cityscapes (fine annotations): label table, class names, palette and archive checks.

The data come from TFDS's own builder ``cityscapes/semantic_segmentation``, which reads the two
official archives ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` from the
manual directory and stores, per example, ``image_id``, ``image_left`` (1024x2048 RGB PNG) and
``segmentation_label`` (1024x2048 ``*_gtFine_labelIds.png``: raw Cityscapes label ids).

Label ids are mapped to the 19 evaluation classes (train ids ``0..18``) by ``LABEL_MAP``, built
from the official table in ``cityscapesscripts.helpers.labels``; every other id (void classes,
``license plate`` = -1, ids not in the table) becomes 255. The mapping is applied when examples
are read (``DatasetSpec.label_map``), so the prepared data stay the official label ids.

The test split's released labels are void everywhere (the benchmark server holds the real
ones): evaluate on ``validation``.
"""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np
from cityscapesscripts.helpers import labels as cs_labels

from tce_jax.datasets import archives
from tce_jax.datasets.spec import DatasetSpec

TFDS_NAME = "cityscapes/semantic_segmentation"
IMAGE_KEY = "image_left"
LABEL_KEY = "segmentation_label"
IGNORE_LABEL = 255
HEIGHT, WIDTH = 1024, 2048

# Train ids 0..18 in order, from the official table (labels with trainId 255 or -1 are void).
_EVAL_LABELS = sorted(
    (label for label in cs_labels.labels if 0 <= label.trainId < IGNORE_LABEL),
    key=lambda label: label.trainId,
)
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in _EVAL_LABELS)
PALETTE: tuple[tuple[int, int, int], ...] = tuple(tuple(label.color) for label in _EVAL_LABELS)
NUM_CLASSES = len(CLASS_NAMES)
assert [label.trainId for label in _EVAL_LABELS] == list(range(NUM_CLASSES)) == list(range(19))


def _label_map() -> np.ndarray:
    lut = np.full(256, IGNORE_LABEL, np.uint8)
    for label in cs_labels.labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < IGNORE_LABEL:
            lut[label.id] = label.trainId
    lut.setflags(write=False)
    return lut


# uint8 [256]: Cityscapes label id -> train id (255 = ignore).
LABEL_MAP: np.ndarray = _label_map()

SPLITS = {"train": "train", "validation": "val", "test": "test"}  # TFDS split -> folder
# Example counts of the official release, for messages.
OFFICIAL_COUNTS = {"train": 2975, "val": 500, "test": 1525}
IMAGES_ZIP = "leftImg8bit_trainvaltest.zip"
LABELS_ZIP = "gtFine_trainvaltest.zip"
ARCHIVES = (IMAGES_ZIP, LABELS_ZIP)

DOWNLOADS_PAGE = "https://www.cityscapes-dataset.com/downloads/"
HOW_TO_GET = (
    "Cityscapes needs a free account: register and log in at "
    "https://www.cityscapes-dataset.com/login/, then download leftImg8bit_trainvaltest.zip "
    "(11 GB) and gtFine_trainvaltest.zip (241 MB) from "
    "https://www.cityscapes-dataset.com/downloads/ and put both zip files, as downloaded (not "
    "extracted), in the manual directory (config.data.manual_dir)."
)

# The file names TFDS's builder relies on (its regex for image ids is [a-z\-]+_\d+_\d+).
_IMAGE_RE = re.compile(
    r"^leftImg8bit/(train|val|test)/([^/]+)/(([a-z\-]+)_(\d+)_(\d+))_leftImg8bit\.png$"
)


def label_path(split_folder: str, city: str, stem: str) -> str:
    """The member name of an image's label map in ``gtFine_trainvaltest.zip``."""
    return f"gtFine/{split_folder}/{city}/{stem}_gtFine_labelIds.png"


def check_manual_dir(manual_dir: str, *, decode: bool = True) -> dict[str, int]:
    """Checks the two official archives before TFDS extracts and reads them.

    TFDS's builder stores the files as they are, without decoding them, so this is where a
    damaged file is caught. Checks that both zips exist and open, that every
    ``leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` has its
    ``gtFine/.../*_gtFine_labelIds.png``, and reads the PNG header of each: 2048x1024 8-bit
    RGB images, 2048x1024 8-bit grey labels. With ``decode``, every image and label map is
    then read in full (checking the zip's CRC-32) and decoded with TensorFlow's PNG decoder,
    in parallel (`archives.verify_members`): one decode per file.

    Returns:
      The number of images per split folder (``train``, ``val``, ``test``).

    Raises:
      DatasetNotFoundError: naming the path, what was expected there and how to get it.
    """
    archives.require_manual_dir(manual_dir, ARCHIVES, HOW_TO_GET)
    images_path = os.path.join(manual_dir, IMAGES_ZIP)
    labels_path = os.path.join(manual_dir, LABELS_ZIP)
    with (
        archives.open_zip(images_path, HOW_TO_GET) as images,
        archives.open_zip(labels_path, HOW_TO_GET) as labels,
    ):
        pairs = _check_pairs(images, images_path, labels, labels_path)
    if decode:
        # Labels first: the smaller archive, so a damaged one is found within seconds.
        label_members = [(label, archives.LABEL) for _, label in pairs]
        archives.verify_members(labels_path, label_members, DOWNLOADS_PAGE)
        image_members = [(image, archives.IMAGE) for image, _ in pairs]
        archives.verify_members(images_path, image_members, DOWNLOADS_PAGE)
    counts = dict.fromkeys(OFFICIAL_COUNTS, 0)
    for image, _ in pairs:
        counts[image.split("/")[1]] += 1
    return counts


def _check_pairs(
    images: zipfile.ZipFile, images_path: str, labels: zipfile.ZipFile, labels_path: str
) -> list[tuple[str, str]]:
    """``(image member, label member)`` of every image, after the layout and header checks."""
    label_names = set(labels.namelist())
    counts = dict.fromkeys(OFFICIAL_COUNTS, 0)
    pairs = []
    for name in images.namelist():
        if not name.startswith("leftImg8bit/") or name.endswith("/"):
            continue  # README, license.txt and directory entries
        match = _IMAGE_RE.match(name)
        if match is None:
            raise archives.corrupt_member_error(
                images_path,
                name,
                "only leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png "
                "files under leftImg8bit/",
                "a file with another name",
                DOWNLOADS_PAGE,
            )
        split, city, stem = match.group(1), match.group(2), match.group(3)
        label = label_path(split, city, stem)
        if label not in label_names:
            raise archives.DatasetNotFoundError(
                f"{labels_path} has no {label}, the label map of {name} in {images_path}: "
                "the two archives do not belong together or one is incomplete. Use the "
                f"official gtFine_trainvaltest.zip (fine annotations).\n{HOW_TO_GET}"
            )
        counts[split] += 1
        pairs.append((name, label))
    empty = [split for split, n in counts.items() if n == 0]
    if empty:
        top = sorted({n.split("/")[0] for n in images.namelist()})
        raise archives.DatasetNotFoundError(
            f"{images_path} holds no leftImg8bit/<split>/<city>/*_leftImg8bit.png images for "
            f"the split folder(s) {', '.join(empty)} (top-level entries: {', '.join(top)}). "
            f"Expected the official leftImg8bit_trainvaltest.zip with train, val and test "
            f"({', '.join(f'{k}: {v}' for k, v in OFFICIAL_COUNTS.items())} images).\n"
            f"{HOW_TO_GET}"
        )
    for image_name, label_name in pairs:
        _check_png(images, images_path, image_name, colours=(2, 6), what="RGB")
        _check_png(labels, labels_path, label_name, colours=(0,), what="grey (label ids)")
    return pairs


def _check_png(archive, archive_path: str, member: str, *, colours, what: str) -> None:
    head = archives.read_member(archive, archive_path, member, DOWNLOADS_PAGE, 64)
    header = archives.png_header(head)
    if header is None or header[:3] != (WIDTH, HEIGHT, 8) or header[3] not in colours:
        raise archives.corrupt_member_error(
            archive_path,
            member,
            f"a {WIDTH}x{HEIGHT} 8-bit {what} PNG",
            archives.describe_png(header, head),
            DOWNLOADS_PAGE,
        )


SPEC = DatasetSpec(
    tfds_name=TFDS_NAME,
    num_classes=NUM_CLASSES,
    class_names=CLASS_NAMES,
    palette=PALETTE,
    image_key=IMAGE_KEY,
    label_key=LABEL_KEY,
    ignore_index=IGNORE_LABEL,
    label_map=LABEL_MAP,
    archives=ARCHIVES,
    # TFDS's Cityscapes builder stores the files without decoding them: decode every one here.
    check_manual_dir=check_manual_dir,
    source=DOWNLOADS_PAGE,
)
