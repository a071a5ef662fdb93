"""ADE20K, the 150-class semantic segmentation benchmark (MIT SceneParsing, ADEChallengeData2016).

Our own TFDS builder, ``ade20k``: it reads the official ``ADEChallengeData2016.zip`` from the
manual directory (without extracting it) and stores, per example, ``image_id``
(``ADE_train_00000001``), ``image`` (the JPEG as released) and ``annotation`` (the PNG as
released: 0 = "other", ``k`` = class ``k`` of ``objectInfo150.txt``). Splits: ``train``
(20,210 images) and ``validation`` (2,000); the benchmark's test images have no public labels.

``LABEL_MAP`` turns annotations into train ids when examples are read: 0 -> 255 (ignored),
``k`` -> ``k - 1`` for ``k = 1..150`` (mmsegmentation's ``reduce_zero_label``).

TFDS's ``scene_parse150`` is *not* this benchmark: it holds the 2017 instance-segmentation
release (100 thing classes), so this builder exists.
"""

from __future__ import annotations

import functools
import io
import os
import re
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from tce_jax.datasets import archives
from tce_jax.datasets.spec import DatasetSpec

TFDS_NAME = "ade20k"
IMAGE_KEY = "image"
LABEL_KEY = "annotation"
IGNORE_LABEL = 255
ARCHIVE = "ADEChallengeData2016.zip"
ROOT = "ADEChallengeData2016"
SPLITS = {"train": "training", "validation": "validation"}  # TFDS split -> folder
OFFICIAL_COUNTS = {"training": 20210, "validation": 2000}

DOWNLOAD_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
HOW_TO_GET = (
    "Download ADEChallengeData2016.zip (923 MB) from the MIT Scene Parsing benchmark, "
    f"{DOWNLOAD_URL} (linked from "
    "http://sceneparsing.csail.mit.edu/), and put the zip file, as downloaded (not extracted), "
    "in the manual directory (config.data.manual_dir)."
)

# The "Name" column of the official objectInfo150.txt, in class order (annotation k = row k).
OBJECT_INFO_NAMES: tuple[str, ...] = (
    "wall", "building, edifice", "sky", "floor, flooring", "tree", "ceiling", "road, route",
    "bed", "windowpane, window", "grass", "cabinet", "sidewalk, pavement",
    "person, individual, someone, somebody, mortal, soul", "earth, ground",
    "door, double door", "table", "mountain, mount", "plant, flora, plant life",
    "curtain, drape, drapery, mantle, pall", "chair", "car, auto, automobile, machine, motorcar",
    "water", "painting, picture", "sofa, couch, lounge", "shelf", "house", "sea", "mirror",
    "rug, carpet, carpeting", "field", "armchair", "seat", "fence, fencing", "desk",
    "rock, stone", "wardrobe, closet, press", "lamp", "bathtub, bathing tub, bath, tub",
    "railing, rail", "cushion", "base, pedestal, stand", "box", "column, pillar",
    "signboard, sign", "chest of drawers, chest, bureau, dresser", "counter", "sand", "sink",
    "skyscraper", "fireplace, hearth, open fireplace", "refrigerator, icebox",
    "grandstand, covered stand", "path", "stairs, steps", "runway",
    "case, display case, showcase, vitrine", "pool table, billiard table, snooker table",
    "pillow", "screen door, screen", "stairway, staircase", "river", "bridge, span",
    "bookcase", "blind, screen", "coffee table, cocktail table",
    "toilet, can, commode, crapper, pot, potty, stool, throne", "flower", "book", "hill",
    "bench", "countertop", "stove, kitchen stove, range, kitchen range, cooking stove",
    "palm, palm tree", "kitchen island",
    "computer, computing machine, computing device, data processor, electronic computer, "
    "information processing system",
    "swivel chair", "boat", "bar", "arcade machine", "hovel, hut, hutch, shack, shanty",
    "bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, "
    "passenger vehicle",
    "towel", "light, light source", "truck, motortruck", "tower", "chandelier, pendant, pendent",
    "awning, sunshade, sunblind", "streetlight, street lamp", "booth, cubicle, stall, kiosk",
    "television receiver, television, television set, tv, tv set, idiot box, boob tube, "
    "telly, goggle box",
    "airplane, aeroplane, plane", "dirt track", "apparel, wearing apparel, dress, clothes",
    "pole", "land, ground, soil", "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "ottoman, pouf, pouffe, puff, hassock",
    "bottle", "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card",
    "stage", "van", "ship", "fountain",
    "conveyer belt, conveyor belt, conveyer, conveyor, transporter", "canopy",
    "washer, automatic washer, washing machine", "plaything, toy",
    "swimming pool, swimming bath, natatorium", "stool", "barrel, cask", "basket, handbasket",
    "waterfall, falls", "tent, collapsible shelter", "bag", "minibike, motorbike", "cradle",
    "oven", "ball", "food, solid food", "step, stair", "tank, storage tank",
    "trade name, brand name, brand, marque", "microwave, microwave oven", "pot, flowerpot",
    "animal, animate being, beast, brute, creature, fauna", "bicycle, bike, wheel, cycle",
    "lake", "dishwasher, dish washer, dishwashing machine",
    "screen, silver screen, projection screen", "blanket, cover", "sculpture",
    "hood, exhaust hood", "sconce", "vase", "traffic light, traffic signal, stoplight", "tray",
    "ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, "
    "trash barrel, trash bin",
    "fan", "pier, wharf, wharfage, dock", "crt screen", "plate", "monitor, monitoring device",
    "bulletin board, notice board", "shower", "radiator", "glass, drinking glass", "clock",
    "flag",
)  # fmt: skip
# Short names for reports and plots: the first synonym (as mmsegmentation's ADE20KDataset).
CLASS_NAMES: tuple[str, ...] = tuple(name.split(",")[0] for name in OBJECT_INFO_NAMES)
NUM_CLASSES = len(CLASS_NAMES)

# The benchmark's colour coding (color150 of the SceneParsing toolkit), in class order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82),
    (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230),
    (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224),
    (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255), (224, 255, 8), (102, 8, 255),
    (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153),
    (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200),
    (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0),
    (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255),
    (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0),
    (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163),
    (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0),
    (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31),
    (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163), (255, 204, 0),
    (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122),
    (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255),
    (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip
assert NUM_CLASSES == len(PALETTE) == 150


def _label_map() -> np.ndarray:
    lut = np.full(256, IGNORE_LABEL, np.uint8)
    lut[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)
    lut.setflags(write=False)
    return lut


# uint8 [256]: annotation value -> train id (0 "other" and anything above 150 -> 255).
LABEL_MAP: np.ndarray = _label_map()

_IMAGE_RE = re.compile(rf"^{ROOT}/images/(training|validation)/(ADE_(?:train|val)_\d+)\.jpg$")


def annotation_path(folder: str, image_id: str) -> str:
    return f"{ROOT}/annotations/{folder}/{image_id}.png"


def image_path(folder: str, image_id: str) -> str:
    return f"{ROOT}/images/{folder}/{image_id}.jpg"


def list_examples(archive: zipfile.ZipFile, archive_path: str) -> dict[str, list[str]]:
    """Image ids per folder (``training``, ``validation``), sorted; checks the layout.

    Raises `DatasetNotFoundError` if an image has no annotation or a folder is empty.
    """
    names = set(archive.namelist())
    ids: dict[str, list[str]] = {folder: [] for folder in OFFICIAL_COUNTS}
    for name in names:
        match = _IMAGE_RE.match(name)
        if match is None:
            continue
        folder, image_id = match.groups()
        if annotation_path(folder, image_id) not in names:
            raise archives.DatasetNotFoundError(
                f"{archive_path} has no {annotation_path(folder, image_id)}, the annotation of "
                f"{name}: the archive is incomplete or not the official release.\n{HOW_TO_GET}"
            )
        ids[folder].append(image_id)
    empty = [folder for folder, found in ids.items() if not found]
    if empty:
        top = sorted({n.split("/")[0] for n in names})
        raise archives.DatasetNotFoundError(
            f"{archive_path} holds no {ROOT}/images/<folder>/ADE_*.jpg images for "
            f"{', '.join(empty)} (top-level entries: {', '.join(top)}). Expected the official "
            f"{ARCHIVE} with {ROOT}/images/{{training,validation}} and "
            f"{ROOT}/annotations/{{training,validation}} "
            f"({OFFICIAL_COUNTS['training']} + {OFFICIAL_COUNTS['validation']} images). "
            "(ADE20K_2021_17_01.zip, the full ADE20K release, is a different dataset.)\n"
            f"{HOW_TO_GET}"
        )
    return {folder: sorted(found) for folder, found in ids.items()}


def check_manual_dir(manual_dir: str, *, decode: bool = True) -> dict[str, int]:
    """Checks ``ADEChallengeData2016.zip`` before preparation: present, a zip, the official
    layout, and a JPEG/grey-PNG header on every image/annotation.

    With ``decode``, every image and annotation is also read in full (checking the zip's
    CRC-32) and decoded with TensorFlow's decoders, in parallel (`archives.verify_members`),
    and each annotation is checked against its image: the same height and width, values
    ``0..150``. Preparation then stores the files without decoding them again.

    Returns:
      The number of images per folder (``training``, ``validation``).

    Raises:
      DatasetNotFoundError: naming the path, what was expected there and how to get it.
    """
    archives.require_manual_dir(manual_dir, (ARCHIVE,), HOW_TO_GET)
    path = os.path.join(manual_dir, ARCHIVE)
    with archives.open_zip(path, HOW_TO_GET) as archive:
        ids = list_examples(archive, path)
        for folder, found in ids.items():
            for image_id in found:
                _check_heads(archive, path, folder, image_id)
    if decode:
        _verify_examples(path, ids)
    return {folder: len(found) for folder, found in ids.items()}


def _check_annotation_values(member: str, array: np.ndarray) -> str | None:
    if member.endswith(".png") and array.max(initial=0) > NUM_CLASSES:
        return f"holds the value {int(array.max())} (annotations are 0..{NUM_CLASSES})"
    return None


def _verify_examples(path: str, ids: dict[str, list[str]]) -> None:
    pairs = [
        (image_path(folder, image_id), annotation_path(folder, image_id))
        for folder, found in ids.items()
        for image_id in found
    ]
    members = []
    for image, annotation in pairs:
        members += [(image, archives.IMAGE), (annotation, archives.LABEL)]
    shapes = archives.verify_members(path, members, DOWNLOAD_URL, check=_check_annotation_values)
    for image, annotation in pairs:
        if shapes[annotation] != shapes[image]:
            (h, w), (image_h, image_w) = shapes[annotation], shapes[image]
            raise archives.damaged_member_error(
                path,
                annotation,
                f"is {w}x{h} but its image {image} is {image_w}x{image_h}",
                DOWNLOAD_URL,
            )


def _read(archive: zipfile.ZipFile, archive_path: str, member: str, size: int = -1) -> bytes:
    return archives.read_member(archive, archive_path, member, DOWNLOAD_URL, size)


def _check_heads(archive, archive_path: str, folder: str, image_id: str) -> None:
    member = image_path(folder, image_id)
    head = _read(archive, archive_path, member, 64)
    if not head.startswith(archives.JPEG_SIGNATURE):
        raise archives.corrupt_member_error(
            archive_path,
            member,
            "a JPEG image",
            f"no JPEG header (first bytes {head[:8]!r})",
            DOWNLOAD_URL,
        )
    member = annotation_path(folder, image_id)
    head = _read(archive, archive_path, member, 64)
    header = archives.png_header(head)
    if header is None or header[2:] != (8, 0):
        raise archives.corrupt_member_error(
            archive_path,
            member,
            "an 8-bit grey PNG annotation",
            archives.describe_png(header, head),
            DOWNLOAD_URL,
        )


def read_example(
    archive: zipfile.ZipFile, archive_path: str, folder: str, image_id: str
) -> tuple[bytes, bytes]:
    """The image and annotation bytes of one example, as they are stored.

    The released JPEG and PNG, verified by `check_manual_dir` (not decoded again here),
    except that a JPEG that is neither RGB nor grey (e.g. CMYK) is converted to an RGB JPEG
    with PIL, so that every stored image is RGB or grey.
    """
    from PIL import Image

    image_member = image_path(folder, image_id)
    image_bytes = _read(archive, archive_path, image_member)
    label_bytes = _read(archive, archive_path, annotation_path(folder, image_id))
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:  # reads the header only
            if image.mode not in ("RGB", "L"):
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="JPEG", quality=100)
                image_bytes = buffer.getvalue()
    except OSError as e:
        raise archives.damaged_member_error(
            archive_path, image_member, f"is not a decodable JPEG ({e})", DOWNLOAD_URL
        ) from e
    return image_bytes, label_bytes


class Ade20k(tfds.core.GeneratorBasedBuilder):
    """ADE20K semantic segmentation benchmark (ADEChallengeData2016), 150 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "ADEChallengeData2016: train (20,210) and validation (2,000)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image_id": tfds.features.Text(doc="ADE_train_00000001, ADE_val_00000001"),
                    "image": tfds.features.Image(
                        shape=(None, None, 3), dtype=np.uint8, encoding_format="jpeg"
                    ),
                    "annotation": tfds.features.Image(
                        shape=(None, None, 1),
                        dtype=np.uint8,
                        encoding_format="png",
                        doc="0 = other (ignored), k = class k of objectInfo150 (1..150).",
                    ),
                }
            ),
            supervised_keys=("image", "annotation"),
            homepage="http://sceneparsing.csail.mit.edu/",
            metadata=tfds.core.MetadataDict(
                class_names=list(CLASS_NAMES),
                object_info_names=list(OBJECT_INFO_NAMES),
                palette=[list(c) for c in PALETTE],
                label_map="annotation 0 -> 255 (ignore), k -> k - 1",
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        check_manual_dir(manual_dir)  # decodes every file once: generation stores the bytes
        path = os.path.join(manual_dir, ARCHIVE)
        return {split: self._generate_examples(path, folder) for split, folder in SPLITS.items()}

    def _generate_examples(self, path: str, folder: str):
        with archives.open_zip(path, HOW_TO_GET) as archive:
            for image_id in list_examples(archive, path)[folder]:
                image, annotation = read_example(archive, path, folder, image_id)
                yield image_id, {"image_id": image_id, "image": image, "annotation": annotation}


SPEC = DatasetSpec(
    tfds_name=TFDS_NAME,
    num_classes=NUM_CLASSES,
    class_names=CLASS_NAMES,
    palette=PALETTE,
    image_key=IMAGE_KEY,
    label_key=LABEL_KEY,
    ignore_index=IGNORE_LABEL,
    label_map=LABEL_MAP,
    archives=(ARCHIVE,),
    # Quick checks only: the builder decodes every file itself (first thing it does).
    check_manual_dir=functools.partial(check_manual_dir, decode=False),
    source=DOWNLOAD_URL,
)
