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

from collections.abc import Callable

from tce_jax.datasets import ade20k, cityscapes, folder, street_scenes
from tce_jax.datasets.spec import DatasetSpec
from tce_jax.datasets.street_scenes import CLASS_NAMES, StreetScenes

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "DatasetSpec",
    "StreetScenes",
    "get_dataset_spec",
]


# name -> spec: each dataset module builds its own (a new dataset adds one line here).
DATASETS: dict[str, DatasetSpec] = {
    "street_scenes": street_scenes.SPEC,
    # The first 64/16/16 scenes, for tests and smoke runs.
    "street_scenes_small": street_scenes.SMALL_SPEC,
    # The same scenes with rare objects (wall, truck, bus, train, motorcycle): 16 classes.
    "street_scenes_rare": street_scenes.RARE_SPEC,
    "street_scenes_rare_small": street_scenes.RARE_SMALL_SPEC,
    # TFDS's own builder; the official label ids are mapped to the 19 train ids when read.
    "cityscapes": cityscapes.SPEC,
    # Our builder of ADEChallengeData2016; annotation 0 -> 255, k -> k - 1 when read.
    "ade20k": ade20k.SPEC,
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
