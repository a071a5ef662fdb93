"""`DatasetSpec`: everything the input pipeline and preparation need to know of a dataset.

Each dataset module builds its own spec (`cityscapes.SPEC`, `ade20k.SPEC`,
`street_scenes.SPEC`; `folder.spec_fields` from the config); `tce_jax.datasets` registers them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


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
      ignore_index: the train id of unlabelled pixels.
      label_map: ``uint8 [256]`` look-up table from raw label values to train ids
        (``ignore_index`` for void), or ``None`` when raw values already are train ids.
      archives: the official archives the dataset is prepared from (file names in the manual
        directory); empty for generated datasets.
      check_manual_dir: ``check(manual_dir)``, run before TFDS prepares the dataset: raises
        ``DatasetNotFoundError`` naming a missing or damaged archive (and the file in it), so
        that a wrong directory fails here rather than deep inside TFDS; ``None`` if nothing
        needs checking.
      source: where to download the archives again (for error messages).
    """

    tfds_name: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    image_key: str
    label_key: str
    ignore_index: int = 255
    label_map: np.ndarray | None = None
    archives: tuple[str, ...] = ()
    check_manual_dir: Callable[[str], object] | None = None
    source: str = "the dataset's official site"

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
