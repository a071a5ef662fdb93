"""Tiny stand-ins for the official Cityscapes and ADE20K archives, in their exact layouts.

Same zip names, folder structure and file names as the releases, real label ids (including
ids that map to the ignore label), a few images per split. Cityscapes images are full size
(1024x2048), which TFDS's builder declares; they are smooth, so PNG encoding is fast.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from tce_jax.datasets import ade20k, cityscapes

CS_H, CS_W = cityscapes.HEIGHT, cityscapes.WIDTH

# (split folder, city, sequence, frame): two cities in train, as in the release.
CITYSCAPES_IMAGES = (
    ("train", "aachen", "000000", "000019"),
    ("train", "bochum", "000000", "000313"),
    ("val", "frankfurt", "000000", "000294"),
    ("test", "berlin", "000000", "000019"),
)
# Label ids of the "things" painted into each image (besides road, sky, building, void):
# aachen has car + traffic sign, bochum person + rider + bicycle.
CITYSCAPES_THINGS = {
    "aachen": (26, 20),
    "bochum": (24, 25, 33),
    "frankfurt": (26, 24),
    "berlin": (),
}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _png_chunks(png: bytes):
    """``(offset, data length, type)`` of each chunk of a PNG file."""
    pos = len(b"\x89PNG\r\n\x1a\n")
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        yield pos, length, png[pos + 4 : pos + 8]
        pos += 12 + length  # length, type, data, CRC


def _first_idat(png: bytes) -> tuple[int, int]:
    return next((pos, n) for pos, n, kind in _png_chunks(png) if kind == b"IDAT")


def damage_png_body(png: bytes) -> bytes:
    """Overwrites 16 bytes in the middle of the image data and fixes the chunk's CRC.

    The header and every chunk CRC stay valid: only inflating the image data fails (as in a
    file damaged before it was packed, whose zip CRC-32 matches the damaged bytes).
    """
    png = bytearray(png)
    pos, n = _first_idat(png)
    start = pos + 8 + n // 2
    png[start : start + min(16, n // 4)] = b"\xff" * min(16, n // 4)
    png[pos + 8 + n : pos + 12 + n] = struct.pack(">I", zlib.crc32(png[pos + 4 : pos + 8 + n]))
    return bytes(png)


def break_png_crc(png: bytes) -> bytes:
    """Flips the CRC of the image data chunk: PIL still decodes the file, TensorFlow refuses."""
    png = bytearray(png)
    pos, n = _first_idat(png)
    png[pos + 8 + n] ^= 0xFF
    return bytes(png)


def truncate(data: bytes) -> bytes:
    """The first half of a file (a cut-off image)."""
    return data[: len(data) // 2]


def flip_stored_byte(zip_path: str, member: str) -> None:
    """Changes one byte of ``member`` inside the zip file (stored uncompressed), in place: the
    member's bytes no longer match the CRC-32 the zip recorded (damage in transit)."""
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(member)
    assert info.compress_type == zipfile.ZIP_STORED
    with open(zip_path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the local file header; the data follow its name and extra field
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def write_damaged(write: Callable[..., dict], manual_dir: str, archive: str, member, damage):
    """Writes fake archives with `write` (`write_cityscapes`, `write_ade20k`) into `manual_dir`,
    `member` of `archive` damaged: in transit (`damage == "zip"`: its bytes no longer match the
    zip's CRC-32) or before packing (`damage` rewrites its bytes: the CRC-32 matches, the file
    does not decode)."""
    if damage == "zip":
        write(manual_dir)
        flip_stored_byte(os.path.join(manual_dir, archive), member)
    else:
        write(manual_dir, damage={member: damage})


def assert_names_the_damage(message: str, archive_path: str, member: str, problem: str, url):
    """`message` (one line) names `member` of the archive and its `problem` (a regex), and says
    to download the archive again from `url` and replace it."""
    archive = os.path.basename(archive_path)
    assert re.match(rf"{re.escape(archive)}: {re.escape(member)} {problem}", message), message
    assert message.endswith(
        f"; the archive is damaged: download it again from {url} and replace {archive_path}"
    )
    assert "\n" not in message


def cityscapes_label_ids(city: str) -> np.ndarray:
    """uint8 [1024, 2048] official label ids of one fake image."""
    ids = np.zeros((CS_H, CS_W), np.uint8)  # 0 = unlabeled
    if city == "berlin":  # the released test labels are void
        return ids
    ids[:300] = 23  # sky
    ids[300:600] = 11  # building
    ids[600:] = 7  # road
    ids[600:, :300] = 8  # sidewalk
    ids[950:] = 1  # ego vehicle -> ignore
    ids[560:600, 1000:1400] = 9  # parking -> ignore
    for k, label_id in enumerate(CITYSCAPES_THINGS[city]):
        x = 500 + 350 * k
        ids[650:850, x : x + 200] = label_id
    if city == "frankfurt":  # every label id of the table, in 60-pixel columns
        for label_id in range(34):
            ids[880:940, 60 * label_id : 60 * (label_id + 1)] = label_id
    return ids


def cityscapes_image(ids: np.ndarray) -> np.ndarray:
    """An RGB image that shows the labels (learnable), with a smooth gradient."""
    colours = np.zeros((256, 3), np.uint8)
    for label in cityscapes.cs_labels.labels:
        if 0 <= label.id < 256:
            colours[label.id] = label.color
    image = colours[ids].astype(np.int32)
    image[..., 2] = (image[..., 2] + np.arange(CS_W)[None, :] // 16) % 256
    return image.astype(np.uint8)


def write_cityscapes(
    manual_dir: str,
    *,
    corrupt: str | None = None,
    damage: dict[str, Callable[[bytes], bytes]] | None = None,
    mirror: bool = False,
) -> dict[str, np.ndarray]:
    """Writes leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into `manual_dir`.

    Args:
      corrupt: optional member name (of either zip) whose content is replaced by garbage.
      damage: optional ``{member name: function}``: the member's bytes pass through the
        function before they are packed (e.g. `damage_png_body`).
      mirror: mirror every image and label map left-right (another release of the data).

    Returns:
      image id -> label ids, for every image written.
    """
    os.makedirs(manual_dir, exist_ok=True)
    labels = {}
    images_zip = os.path.join(manual_dir, cityscapes.IMAGES_ZIP)
    labels_zip = os.path.join(manual_dir, cityscapes.LABELS_ZIP)
    with zipfile.ZipFile(images_zip, "w") as zi, zipfile.ZipFile(labels_zip, "w") as zl:
        for archive in (zi, zl):
            archive.writestr("README", "The Cityscapes Dataset (fake, for tests).\n")
            archive.writestr("license.txt", "Test fixture.\n")
        for split, city, seq, frame in CITYSCAPES_IMAGES:
            stem = f"{city}_{seq}_{frame}"
            ids = cityscapes_label_ids(city)
            if mirror:
                ids = np.ascontiguousarray(ids[:, ::-1])
            labels[stem] = ids
            members = {
                (zi, f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"): png_bytes(
                    cityscapes_image(ids)
                ),
                (zl, cityscapes.label_path(split, city, stem)): png_bytes(ids),
                (zl, f"gtFine/{split}/{city}/{stem}_gtFine_instanceIds.png"): png_bytes(
                    ids.astype(np.uint16) * 1000
                ),
                (zl, f"gtFine/{split}/{city}/{stem}_gtFine_color.png"): png_bytes(
                    cityscapes_image(ids)
                ),
                (zl, f"gtFine/{split}/{city}/{stem}_gtFine_polygons.json"): json.dumps(
                    {"imgHeight": CS_H, "imgWidth": CS_W, "objects": []}
                ).encode(),
            }
            for (archive, name), data in members.items():
                data = (damage or {}).get(name, lambda x: x)(data)
                archive.writestr(name, b"not a png at all" if name == corrupt else data)
    return labels


# (folder, image id, height, width, annotation values painted in): varied sizes and shapes.
ADE20K_IMAGES = (
    ("training", "ADE_train_00000001", 48, 64, (1, 3)),
    ("training", "ADE_train_00000002", 64, 48, (1, 13)),
    ("training", "ADE_train_00000003", 40, 80, (4, 150)),
    ("training", "ADE_train_00000004", 56, 56, (3, 21)),
    ("validation", "ADE_val_00000001", 48, 72, (1, 3, 150)),
    ("validation", "ADE_val_00000002", 60, 40, (13, 21)),
)


def ade20k_annotation(height: int, width: int, values) -> np.ndarray:
    """uint8 annotation: vertical bands of `values`, with a border of 0 ("other")."""
    ann = np.zeros((height, width), np.uint8)
    bands = np.array_split(np.arange(width), len(values))
    for value, cols in zip(values, bands, strict=True):
        ann[4:-4, cols] = value
    return ann


def ade20k_image(ann: np.ndarray, grey: bool = False) -> np.ndarray:
    palette = np.zeros((256, 3), np.uint8)
    palette[1:151] = np.asarray(ade20k.PALETTE, np.uint8)
    image = palette[ann]
    return image.mean(axis=-1).astype(np.uint8) if grey else image


def write_ade20k(
    manual_dir: str,
    *,
    corrupt: str | None = None,
    drop: str | None = None,
    damage: dict[str, Callable[[bytes], bytes]] | None = None,
    mirror: bool = False,
) -> dict[str, np.ndarray]:
    """Writes ADEChallengeData2016.zip into `manual_dir`.

    Args:
      corrupt: optional member name whose content is replaced by garbage.
      drop: optional member name left out of the archive.
      damage: optional ``{member name: function}``: the member's bytes pass through the
        function before they are packed.
      mirror: mirror every image and annotation left-right (another release of the data).

    Returns:
      image id -> raw annotation.
    """
    os.makedirs(manual_dir, exist_ok=True)
    annotations = {}
    root = ade20k.ROOT
    with zipfile.ZipFile(os.path.join(manual_dir, ade20k.ARCHIVE), "w") as archive:
        archive.writestr(f"{root}/", b"")
        archive.writestr(
            f"{root}/objectInfo150.txt",
            "Idx\tRatio\tTrain\tVal\tName\n"
            + "".join(f"{k + 1}\t0.0\t0\t0\t{n}\n" for k, n in enumerate(ade20k.OBJECT_INFO_NAMES)),
        )
        archive.writestr(f"{root}/sceneCategories.txt", "ADE_train_00000001 airport_terminal\n")
        for k, (folder, image_id, h, w, values) in enumerate(ADE20K_IMAGES):
            ann = ade20k_annotation(h, w, values)
            if mirror:
                ann = np.ascontiguousarray(ann[:, ::-1])
            annotations[image_id] = ann
            members = {
                ade20k.image_path(folder, image_id): jpeg_bytes(ade20k_image(ann, grey=k == 1)),
                ade20k.annotation_path(folder, image_id): png_bytes(ann),
            }
            for name, data in members.items():
                data = (damage or {}).get(name, lambda x: x)(data)
                if name != drop:
                    archive.writestr(name, b"\xff\xd8\xff garbage" if name == corrupt else data)
    return annotations


def prepare(root, write: Callable[[str], dict], config) -> tuple:
    """Writes fake archives with `write` into `root/manual` and prepares them into `root/tfds`
    with `config` (a real-dataset config). Returns (config, builder, spec, what `write`
    returned)."""
    from tce_jax import input_pipeline

    manual_dir = str(root / "manual")
    raw = write(manual_dir)
    config.data.data_dir = str(root / "tfds")
    config.data.manual_dir = manual_dir
    builder, spec = input_pipeline.load_builder(config)
    return config, builder, spec, raw
