"""Your own dataset from a folder of images and PNG label maps: no builder to write.

``config.data.name = "folder"`` reads ``config.data.folder.root``, laid out as in
mmsegmentation's ``CustomDataset``::

    root/
      classes.txt            one class name per line; line k (from 0) is train id k
      palette.txt            optional: "R G B" per line, one per class (else a default palette)
      label_map.txt          optional: "raw_value train_id" per line (unlisted values -> 255)
      img_dir/{train,val,test}/**/x<img_suffix>        (val may also be called validation)
      ann_dir/{train,val,test}/**/x<seg_map_suffix>

An image ``x<img_suffix>`` (default ``.jpg``) pairs with the label map ``x<seg_map_suffix>``
(default ``.png``) of the same relative path; sub-folders are allowed. Label maps hold one
value per pixel: train ids ``0..C-1`` and 255 (ignored), or raw values turned into train ids
by ``label_map.txt`` / ``config.data.folder.label_map`` or by ``reduce_zero_label`` (0 -> 255,
k -> k - 1, as mmsegmentation). Grey PNGs are stored as they are; palette (``P``) and 16-bit
label maps are stored as 8-bit grey PNGs of their values.

The folder is prepared once, like the other datasets, into the TFDS dataset
``segmentation_folder/<folder name>_<fingerprint>`` (ArrayRecord, read by index). The
fingerprint covers the folder's path, file list, sizes and modification times, the suffixes
and the label mapping: changing any of them prepares a fresh copy instead of reading a stale
one. The class count and names come from the folder, so :func:`spec_fields` builds the
dataset's spec from the config at run time.

Checks, each failing with one line that names the file and the fix: a missing root, folder
or class file; images without label maps and label maps without images; an empty split; an
image and label map of different sizes; label values outside the declared classes; images or
label maps that TensorFlow's decoder (the one training uses) cannot read. Listing and pairing
are checked when the spec is built, sizes and label formats from the file headers before
preparation starts, values and decodability while each example is written.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from tce_jax.datasets import archives

TFDS_NAME = "segmentation_folder"
IMAGE_KEY = "image"
LABEL_KEY = "label"
IGNORE_LABEL = 255
IMG_DIR, ANN_DIR = "img_dir", "ann_dir"
CLASSES_FILE, PALETTE_FILE, LABEL_MAP_FILE = "classes.txt", "palette.txt", "label_map.txt"
# Our split names -> the folder names that hold them (mmsegmentation uses "val").
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}
_SHOWN = 5  # file names listed in an error message


def _error(message: str) -> archives.DatasetNotFoundError:
    return archives.DatasetNotFoundError(message)


def _shown(names) -> str:
    names = sorted(names)
    return ", ".join(names[:_SHOWN]) + (
        f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    )


# ---------------------------------------------------------------------------------------------
# Class names, palette and label mapping.


def read_class_names(root: str) -> tuple[str, ...]:
    """The lines of ``root/classes.txt`` (train id = line number), checked."""
    path = os.path.join(root, CLASSES_FILE)
    if not os.path.isfile(path):
        raise _error(
            f"{path} does not exist: write the class names there, one per line (line k, "
            "counted from 0, names train id k)."
        )
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f.read().rstrip("\n").split("\n")]
    if not names or names == [""]:
        raise _error(f"{path} is empty: write the class names there, one per line.")
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if blank:
        raise _error(f"{path}: line {blank[0]} is blank; every line must name a class.")
    repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if repeated:
        raise _error(f"{path} names {_shown(repeated)} more than once; class names must differ.")
    if len(names) > IGNORE_LABEL:
        raise _error(
            f"{path} lists {len(names)} classes; at most {IGNORE_LABEL} fit 8-bit label maps "
            f"with {IGNORE_LABEL} as the ignore label."
        )
    return tuple(names)


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map: distinct colours from the bits of the class index."""
    palette = []
    for index in range(num_classes):
        rgb, value = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette.append(tuple(rgb))
    return tuple(palette)


def read_palette(root: str, num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """``root/palette.txt`` ("R G B" per line, one per class) or the default palette."""
    path = os.path.join(root, PALETTE_FILE)
    if not os.path.isfile(path):
        return default_palette(num_classes)
    colours = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.replace(",", " ").split()
            if len(fields) != 3 or not all(v.isdigit() and int(v) <= 255 for v in fields):
                raise _error(
                    f"{path}: line {number} is {line.strip()!r}; expected three integers "
                    "0..255 (R G B)."
                )
            colours.append(tuple(int(v) for v in fields))
    if len(colours) != num_classes:
        raise _error(
            f"{path} has {len(colours)} colours but {CLASSES_FILE} lists {num_classes} classes: "
            "give one colour per class, or delete it for the default palette."
        )
    return tuple(colours)


def _parse_pairs(text: str, source: str, separator: str | None) -> dict[int, int]:
    pairs = {}
    for number, item in enumerate(text.split("\n" if separator is None else ","), start=1):
        item = item.split("#")[0].strip()
        if not item:
            continue
        fields = item.split() if separator is None else item.split(":")
        if len(fields) != 2 or not all(f.strip().isdigit() for f in fields):
            where = f"line {number}" if separator is None else f"item {item!r}"
            form = "'raw_value train_id'" if separator is None else "'raw:train_id,...'"
            raise _error(f"{source}: {where} is not of the form {form} with integers.")
        raw, train_id = (int(f) for f in fields)
        if raw in pairs:
            raise _error(f"{source} maps the raw value {raw} twice.")
        pairs[raw] = train_id
    return pairs


def label_lut(
    root: str, label_map: str, reduce_zero_label: bool, num_classes: int
) -> np.ndarray | None:
    """``uint8 [256]`` raw value -> train id, or None when raw values already are train ids.

    ``label_map`` (``"raw:id,raw:id"``, from the config) wins over ``root/label_map.txt``;
    unlisted values become ``IGNORE_LABEL``. ``reduce_zero_label``: 0 -> 255, k -> k - 1,
    255 stays 255 (mmsegmentation). Raises if a mapping targets an id outside the classes.
    """
    path = os.path.join(root, LABEL_MAP_FILE)
    if label_map:
        source = "config.data.folder.label_map"
        pairs = _parse_pairs(label_map, source, ",")
    elif os.path.isfile(path):
        source = path
        with open(path, encoding="utf-8") as f:
            pairs = _parse_pairs(f.read(), path, None)
    elif reduce_zero_label:
        lut = np.concatenate([[IGNORE_LABEL], np.arange(255)]).astype(np.uint8)
        lut[255] = IGNORE_LABEL
        return lut
    else:
        return None
    if reduce_zero_label:
        raise _error(
            f"{source} and config.data.folder.reduce_zero_label=True both map label values: "
            "keep one (write 0 -> 255 and k -> k-1 into the map, or drop the map)."
        )
    bad = {raw: i for raw, i in pairs.items() if raw > 255 or (i >= num_classes and i != 255)}
    if bad:
        raw, i = next(iter(bad.items()))
        raise _error(
            f"{source} maps {raw} -> {i}: raw values must be 0..255 and train ids 0.."
            f"{num_classes - 1} (the {num_classes} classes of {CLASSES_FILE}) or 255 (ignore)."
        )
    lut = np.full(256, IGNORE_LABEL, np.uint8)
    for raw, train_id in pairs.items():
        lut[raw] = train_id
    return lut


# ---------------------------------------------------------------------------------------------
# Listing and pairing.


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of the folder: TFDS split name, folder name, example ids (relative paths
    without suffix, sorted)."""

    name: str
    folder: str
    ids: tuple[str, ...]


def _walk(directory: str) -> list[str]:
    """Relative paths of the files under ``directory`` (recursive; hidden entries skipped)."""
    found = []
    for parent, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(parent, directory)
        for name in files:
            if not name.startswith("."):
                found.append(name if rel == "." else os.path.join(rel, name))
    return found


def _suffix_hint(files: list[str], suffix: str, field: str) -> str:
    others = collections.Counter(os.path.splitext(f)[1] for f in files if not f.endswith(suffix))
    if not others:
        return ""
    common = ", ".join(f"{count} '{ext}'" for ext, count in others.most_common(3))
    return f" (other files there: {common}; set config.data.folder.{field} if they are meant)"


def _strip(files: list[str], suffix: str) -> set[str]:
    return {f[: -len(suffix)] for f in files if f.endswith(suffix) and len(f) > len(suffix)}


def list_split(root: str, name: str, folder: str, img_suffix: str, seg_map_suffix: str) -> Split:
    """Pairs ``img_dir/<folder>`` with ``ann_dir/<folder>``; raises on unpaired files."""
    img_dir, ann_dir = os.path.join(root, IMG_DIR, folder), os.path.join(root, ANN_DIR, folder)
    if not os.path.isdir(ann_dir):
        raise _error(
            f"{img_dir} has no label folder {ann_dir}: every split needs its label maps "
            f"(move unlabelled images out of {root})."
        )
    image_files, label_files = _walk(img_dir), _walk(ann_dir)
    images, labels = _strip(image_files, img_suffix), _strip(label_files, seg_map_suffix)
    if not images:
        raise _error(
            f"{img_dir} holds no images ending {img_suffix!r}"
            f"{_suffix_hint(image_files, img_suffix, 'img_suffix')}."
        )
    if images - labels:
        missing = [f"{i}{img_suffix}" for i in images - labels]
        raise _error(
            f"{len(missing)} image(s) in {img_dir} have no label map {ann_dir}/<name>"
            f"{seg_map_suffix}: {_shown(missing)}"
            f"{_suffix_hint(label_files, seg_map_suffix, 'seg_map_suffix')}."
        )
    if labels - images:
        orphans = [f"{i}{seg_map_suffix}" for i in labels - images]
        raise _error(
            f"{len(orphans)} label map(s) in {ann_dir} have no image {img_dir}/<name>"
            f"{img_suffix}: {_shown(orphans)}{_suffix_hint(image_files, img_suffix, 'img_suffix')}."
        )
    return Split(name=name, folder=folder, ids=tuple(sorted(images)))


def list_splits(root: str, img_suffix: str, seg_map_suffix: str) -> dict[str, Split]:
    """The splits of ``root`` (train, validation, test: those present), paired and checked."""
    if not os.path.isdir(root):
        raise _error(
            f"The dataset folder {root!r} does not exist: set config.data.folder.root "
            f"(--config.data.folder.root=DIR) to a folder holding {IMG_DIR}/ and {ANN_DIR}/."
        )
    for sub in (IMG_DIR, ANN_DIR):
        if not os.path.isdir(os.path.join(root, sub)):
            held = _shown(os.listdir(root)) or "nothing"
            raise _error(
                f"{os.path.join(root, sub)} does not exist ({root} holds {held}): expected "
                f"{IMG_DIR}/{{train,val,test}} with the images and {ANN_DIR}/{{train,val,test}} "
                "with the label maps."
            )
    splits = {}
    for name, candidates in SPLIT_FOLDERS.items():
        present = [f for f in candidates if os.path.isdir(os.path.join(root, IMG_DIR, f))]
        if len(present) > 1:
            raise _error(
                f"{os.path.join(root, IMG_DIR)} holds both {' and '.join(present)}: keep one "
                f"folder for the {name} split."
            )
        if present:
            splits[name] = list_split(root, name, present[0], img_suffix, seg_map_suffix)
    if not splits:
        raise _error(
            f"{os.path.join(root, IMG_DIR)} holds no split folder: expected train, val (or "
            "validation) and optionally test."
        )
    return splits


def _stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def fingerprint(root, splits, img_suffix, seg_map_suffix, num_classes, lut) -> str:
    """A digest of everything the prepared data and its checks depend on."""
    files = {
        s.name: [
            [i, *_stat(os.path.join(root, IMG_DIR, s.folder, i + img_suffix)),
             *_stat(os.path.join(root, ANN_DIR, s.folder, i + seg_map_suffix))]
            for i in s.ids
        ]
        for s in splits.values()
    }  # fmt: skip
    blob = json.dumps(
        [os.path.abspath(root), img_suffix, seg_map_suffix, num_classes,
         None if lut is None else lut.tolist(), files]
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The spec and the TFDS builder config.


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """One folder's settings; its name (folder name + fingerprint) names the prepared data."""

    root: str = ""
    img_suffix: str = ".jpg"
    seg_map_suffix: str = ".png"
    num_classes: int = 0
    lut: tuple[int, ...] = ()  # empty: label values are train ids


# Configs of the folders described in this process, by name: TFDS resolves
# "segmentation_folder/<name>" through SegmentationFolder.builder_configs.
_CONFIGS: dict[str, FolderConfig] = {}


def _settings(config):
    folder = config.data.folder
    root = os.path.abspath(os.path.expanduser(folder.root)) if folder.root else ""
    if not root:
        raise _error(
            "config.data.name='folder' needs config.data.folder.root: the folder holding "
            f"{IMG_DIR}/ and {ANN_DIR}/ (--config.data.folder.root=DIR)."
        )
    return root, folder.img_suffix, folder.seg_map_suffix


def _check_config_splits(config, root: str, splits: dict[str, Split]) -> None:
    wanted = {
        "data.train_split": config.data.train_split,
        "data.eval_split": config.data.eval_split,
        **{f"data.final_eval_splits[{i}]": s for i, s in enumerate(config.data.final_eval_splits)},
    }
    for field, split in wanted.items():
        base = re.split(r"[\[\(]", split)[0]  # "train[:50%]" -> "train"
        if base not in splits:
            folders = "/".join(SPLIT_FOLDERS.get(base, (base,)))
            raise _error(
                f"config.{field}={split!r} but {os.path.join(root, IMG_DIR)} has no {folders} "
                f"folder (splits found: {', '.join(splits)}): add it, or set "
                f"--config.{field.split('[')[0]} to a split the folder has."
            )


def spec_fields(config) -> dict:
    """The ``DatasetSpec`` fields of ``config.data.folder`` (see the module docstring).

    Lists and pairs the files, reads the class names, palette and label mapping, and
    registers the folder's TFDS builder config. Raises `DatasetNotFoundError` on a bad folder.
    """
    root, img_suffix, seg_map_suffix = _settings(config)
    splits = list_splits(root, img_suffix, seg_map_suffix)
    _check_config_splits(config, root, splits)
    names = read_class_names(root)
    palette = read_palette(root, len(names))
    folder = config.data.folder
    lut = label_lut(root, folder.label_map, folder.reduce_zero_label, len(names))
    digest = fingerprint(root, splits, img_suffix, seg_map_suffix, len(names), lut)
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(root))[:40] or "root"
    builder_config = FolderConfig(
        name=f"{slug}_{digest}",
        description=f"Images and label maps of {root}",
        root=root,
        img_suffix=img_suffix,
        seg_map_suffix=seg_map_suffix,
        num_classes=len(names),
        lut=() if lut is None else tuple(int(v) for v in lut),
    )
    _CONFIGS[builder_config.name] = builder_config
    if lut is not None:
        lut.setflags(write=False)
    return dict(
        tfds_name=f"{TFDS_NAME}/{builder_config.name}",
        num_classes=len(names),
        class_names=names,
        palette=palette,
        image_key=IMAGE_KEY,
        label_key=LABEL_KEY,
        ignore_index=IGNORE_LABEL,
        label_map=lut,
    )


# ---------------------------------------------------------------------------------------------
# Reading and checking one example.


def _paths(cfg: FolderConfig, split: Split, example_id: str) -> tuple[str, str]:
    return (
        os.path.join(cfg.root, IMG_DIR, split.folder, example_id + cfg.img_suffix),
        os.path.join(cfg.root, ANN_DIR, split.folder, example_id + cfg.seg_map_suffix),
    )


# PIL modes of label maps whose values are the class indices (converted to 8-bit grey).
_INDEX_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


def check_headers(cfg: FolderConfig, split: Split) -> None:
    """Sizes and label formats of every pair from the file headers, before anything is
    decoded: fails in seconds on the common mistakes."""
    from PIL import Image, UnidentifiedImageError

    for example_id in split.ids:
        image_path, label_path = _paths(cfg, split, example_id)
        try:
            with Image.open(image_path) as image:
                image_size = image.size
        except (OSError, UnidentifiedImageError) as e:
            raise _error(f"Unreadable image {image_path}: {e}. Replace or remove it.") from e
        try:
            with Image.open(label_path) as label:
                label_size, mode = label.size, label.mode
        except (OSError, UnidentifiedImageError) as e:
            raise _error(f"Unreadable label map {label_path}: {e}. Replace or remove it.") from e
        if mode not in _INDEX_MODES:
            raise _error(
                f"Label map {label_path} is a {mode} image; expected one value per pixel (a "
                "grey, palette or 16-bit PNG of class values), not colours: convert colour-coded "
                "label maps to class indices first."
            )
        if image_size != label_size:
            raise _error(
                f"Size mismatch: {image_path} is {image_size[0]}x{image_size[1]} but its label "
                f"map {label_path} is {label_size[0]}x{label_size[1]} (width x height)."
            )


def _decode_image(path: str, data: bytes):
    """TensorFlow's decoding, as training does; images it cannot read (CMYK JPEG, TIFF) are
    stored as PNG if PIL reads them."""
    import tensorflow as tf
    from PIL import Image

    try:
        return data, tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    except tf.errors.OpError as e:
        tf_error = e.message.split("\n")[0]
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
    except OSError as e:
        raise _error(
            f"Unreadable image {path}: TensorFlow says {tf_error!r}, PIL says {e}. Replace or "
            "remove it."
        ) from e
    return _png(rgb), rgb


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_label(path: str, data: bytes) -> tuple[bytes, np.ndarray]:
    """The label map's bytes to store (an 8-bit grey PNG) and its values ``[H, W]``."""
    import tensorflow as tf
    from PIL import Image

    header = archives.png_header(data[:26])
    if header is not None and header[2:] == (8, 0):  # 8-bit grey PNG: stored as it is
        try:
            return data, tf.io.decode_png(data, channels=1).numpy()[..., 0]
        except tf.errors.OpError as e:
            raise _error(
                f"Unreadable label map {path}: TensorFlow's PNG decoder says "
                f"{e.message.splitlines()[0]!r}. Re-save or replace it."
            ) from e
    try:
        with Image.open(io.BytesIO(data)) as label:
            values = np.asarray(label)  # palette images give their indices
    except OSError as e:
        raise _error(f"Unreadable label map {path}: {e}. Re-save or replace it.") from e
    if values.max(initial=0) > 255:
        raise _error(
            f"Label map {path} holds the value {int(values.max())}; label values must be 0..255."
        )
    return _png(values.astype(np.uint8)), values.astype(np.uint8)


def read_example(cfg: FolderConfig, split: Split, example_id: str) -> dict:
    """One example, decoded once with TensorFlow's decoders and checked; the bytes to store."""
    image_path, label_path = _paths(cfg, split, example_id)
    with open(image_path, "rb") as f:
        image_bytes, image = _decode_image(image_path, f.read())
    with open(label_path, "rb") as f:
        label_bytes, values = _decode_label(label_path, f.read())
    if image.shape[:2] != values.shape:
        raise _error(
            f"Size mismatch: {image_path} is {image.shape[1]}x{image.shape[0]} but its label map "
            f"{label_path} is {values.shape[1]}x{values.shape[0]} (width x height)."
        )
    present = np.unique(values)
    train_ids = np.asarray(cfg.lut, np.int64)[present] if cfg.lut else present
    outside = present[(train_ids >= cfg.num_classes) & (train_ids != IGNORE_LABEL)]
    if outside.size:
        mapping = " after the label mapping" if cfg.lut else ""
        raise _error(
            f"Label map {label_path} holds the value(s) {', '.join(map(str, outside[:8]))}, "
            f"outside the {cfg.num_classes} classes of {CLASSES_FILE}{mapping} (train ids 0.."
            f"{cfg.num_classes - 1}, 255 = ignore): fix the label map, {CLASSES_FILE}, or the "
            "mapping (config.data.folder.reduce_zero_label / label_map)."
        )
    return {"image_id": example_id, IMAGE_KEY: image_bytes, LABEL_KEY: label_bytes}


class SegmentationFolder(tfds.core.GeneratorBasedBuilder):
    """Images and label maps from a folder in mmsegmentation's img_dir/ann_dir layout."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "img_dir/ann_dir folders with classes.txt."}

    @tfds.core.utils.classproperty
    @classmethod
    def builder_configs(cls) -> dict[str, FolderConfig]:
        """The folders described in this process by :func:`spec_fields` (not a fixed
        ``BUILDER_CONFIGS`` list), so that TFDS builds and reads them with this class."""
        return dict(_CONFIGS)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image_id": tfds.features.Text(doc="path under img_dir/<split>, no suffix"),
                    # As found in the folder (JPEG, PNG, ...): TensorFlow's decode_image reads
                    # any of them; images it cannot read are stored as PNG.
                    IMAGE_KEY: tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    LABEL_KEY: tfds.features.Image(
                        shape=(None, None, 1),
                        dtype=np.uint8,
                        encoding_format="png",
                        doc="raw label values (train ids after the spec's label_map)",
                    ),
                }
            ),
            supervised_keys=(IMAGE_KEY, LABEL_KEY),
            # Class names and colours are read from the folder at each run (renaming a class
            # needs no new preparation), so they are not stored here.
            metadata=tfds.core.MetadataDict(
                root=cfg.root, num_classes=cfg.num_classes, label_map=list(cfg.lut)
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # the files are read where they are
        cfg = self.builder_config
        splits = list_splits(cfg.root, cfg.img_suffix, cfg.seg_map_suffix)
        for split in splits.values():
            check_headers(cfg, split)
        return {name: self._generate_examples(split) for name, split in splits.items()}

    def _generate_examples(self, split: Split):
        cfg = self.builder_config
        for example_id in split.ids:
            yield example_id, read_example(cfg, split, example_id)
