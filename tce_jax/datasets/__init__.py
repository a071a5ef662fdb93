"""Datasets: TFDS builders we own and the registry the input pipeline reads.

Importing this package registers our TFDS builders (``street_scenes``, ``ade20k``); Cityscapes
uses TFDS's own ``cityscapes`` builder with the official label table.
``get_dataset_spec(name, config)`` tells the input pipeline which TFDS dataset to load, which
features hold the image and the label map, how raw label values map to train ids, and the class
names and colours for reports.
``folder`` (a user's img_dir/ann_dir folder, ``tce_jax.datasets.folder``) has its spec built
from ``config.data.folder`` at run time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from tce_jax.datasets import ade20k, cityscapes, folder, street_scenes
from tce_jax.datasets.street_scenes import CLASS_NAMES, StreetScenes

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "DatasetSpec",
    "StreetScenes",
    "get_dataset_spec",
]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one segmentation dataset from TFDS.

    Attributes:
      tfds_name: TFDS name, with config if any (``"street_scenes"``,
        ``"cityscapes/semantic_segmentation"``).
      num_classes: number of train ids C; labels are ``0..C-1`` after ``label_map``.
      class_names: ``C`` names, in train-id order.
      palette: ``C`` RGB colours, for plots.
      image_key: feature name of the RGB image.
      label_key: feature name of the label map.
      splits: our split names (``"train"``, ``"validation"``, ``"test"``) -> TFDS split names.
      ignore_index: the train id of unlabelled pixels.
      label_map: ``uint8 [256]`` look-up table from raw label values to train ids
        (``ignore_index`` for void), or ``None`` when raw values already are train ids.
      archives: the official archives the dataset is prepared from (file names in the manual
        directory); empty for generated datasets.
    """

    tfds_name: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    image_key: str
    label_key: str
    splits: dict[str, str]
    ignore_index: int = 255
    label_map: np.ndarray | None = None
    archives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError(
                f"{self.tfds_name}: num_classes={self.num_classes} but "
                f"{len(self.class_names)} class names and {len(self.palette)} palette colours."
            )
        if self.label_map is not None and np.shape(self.label_map) != (256,):
            raise ValueError(
                f"{self.tfds_name}: label_map must have shape (256,), got "
                f"{np.shape(self.label_map)}."
            )


# name -> spec. Real datasets (Cityscapes, ADE20K) are added here as plain entries.
_STREET_SCENES = DatasetSpec(
    tfds_name="street_scenes",
    num_classes=street_scenes.NUM_CLASSES,
    class_names=street_scenes.CLASS_NAMES,
    palette=street_scenes.PALETTE,
    image_key="image",
    label_key="label",
    splits={"train": "train", "validation": "validation", "test": "test"},
    ignore_index=street_scenes.IGNORE_LABEL,
)

# name -> spec. Real datasets (Cityscapes, ADE20K) are added here as plain entries.
DATASETS: dict[str, DatasetSpec] = {
    "street_scenes": _STREET_SCENES,
    # The first 64/16/16 scenes, for tests and smoke runs.
    "street_scenes_small": dataclasses.replace(_STREET_SCENES, tfds_name="street_scenes/small"),
    # TFDS's own builder; the official label ids are mapped to the 19 train ids when read.
    "cityscapes": DatasetSpec(
        tfds_name=cityscapes.TFDS_NAME,
        num_classes=cityscapes.NUM_CLASSES,
        class_names=cityscapes.CLASS_NAMES,
        palette=cityscapes.PALETTE,
        image_key=cityscapes.IMAGE_KEY,
        label_key=cityscapes.LABEL_KEY,
        splits={"train": "train", "validation": "validation", "test": "test"},
        ignore_index=cityscapes.IGNORE_LABEL,
        label_map=cityscapes.LABEL_MAP,
        archives=cityscapes.ARCHIVES,
    ),
    # Our builder of ADEChallengeData2016; annotation 0 -> 255, k -> k - 1 when read.
    "ade20k": DatasetSpec(
        tfds_name=ade20k.TFDS_NAME,
        num_classes=ade20k.NUM_CLASSES,
        class_names=ade20k.CLASS_NAMES,
        palette=ade20k.PALETTE,
        image_key=ade20k.IMAGE_KEY,
        label_key=ade20k.LABEL_KEY,
        splits={"train": "train", "validation": "validation"},
        ignore_index=ade20k.IGNORE_LABEL,
        label_map=ade20k.LABEL_MAP,
        archives=(ade20k.ARCHIVE,),
    ),
}


# name -> function of the config that builds the spec (datasets described by the config).
SPEC_FACTORIES: dict[str, Callable[..., DatasetSpec]] = {
    "folder": lambda config: DatasetSpec(**folder.spec_fields(config)),
}


def get_dataset_spec(name: str, config=None) -> DatasetSpec:
    """The spec of dataset ``name``: registered, or built from ``config`` (``folder``).

    ``ValueError`` naming the known datasets for an unknown name.
    """
    if name in SPEC_FACTORIES:
        if config is None:
            raise ValueError(
                f"Dataset {name!r} is described by config.data.{name}: call "
                f"get_dataset_spec({name!r}, config)."
            )
        return SPEC_FACTORIES[name](config)
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted([*DATASETS, *SPEC_FACTORIES]))
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: {known}. "
            "Add a DatasetSpec to tce_jax.datasets.DATASETS to register another."
        ) from None
