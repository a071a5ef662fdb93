"""Street scenes: a procedurally generated, class-imbalanced segmentation dataset.

The embedded default dataset of the project (docs/street_scenes.md): no download, pure numpy,
bit-identical for a given (split, index), exposed as the TFDS builder ``street_scenes`` so that it
runs through the same input pipeline as Cityscapes and ADE20K.

Each example is a 64x128 RGB view down a street, rendered with a pinhole camera over a ground
plane: sky, facades (buildings or park vegetation) on both sides and at the end of the street,
road and sidewalks, then "things" painted far to near (cars, poles, traffic signs, street trees,
pedestrians, cyclists, parked bicycles, unlabelled clutter). Object sizes follow the perspective,
so the same class appears at many scales. The design makes a fair test of class-balanced losses:

* pixel frequencies span more than two orders of magnitude (road and building: tens of percent;
  traffic sign, rider and bicycle: about 0.2%), see ``docs/street_scenes.md`` for measured values;
* ``person`` and ``rider`` share one clothing/skin palette and body shape; a rider is told apart
  only by context (the bicycle under it, the leaning torso, legs that do not reach the ground);
* ``pole`` is thin and painted in the greys of the facades, next to tree trunks (vegetation)
  of the same shape; ``traffic_sign`` and ``bicycle`` are a few pixels wide;
* colour alone is not enough: per-image palette jitter, textures, cast shadows, global
  illumination and sensor noise.

The ``rare`` configs (``street_scenes_rare``) add five rare classes after these eleven (wall,
truck, bus, train, motorcycle), each present in 3-8% of the scenes and then covering a real area.

Label maps hold train ids ``0..NUM_CLASSES-1`` and ``IGNORE_LABEL`` (255) for unlabelled pixels
(the ego vehicle's bonnet and street clutter), as in Cityscapes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from tce_jax.datasets.spec import DatasetSpec
from tce_jax.datasets.street_scenes_canvas import HEIGHT, WIDTH
from tce_jax.datasets.street_scenes_rare import CLASS_NAMES as RARE_CLASS_NAMES
from tce_jax.datasets.street_scenes_rare import generate_rare_scene
from tce_jax.datasets.street_scenes_render import (
    CLASS_NAMES,
    IGNORE_LABEL,
    NUM_CLASSES,
    SPLIT_SEEDS,
    generate_scene,
)

# Cityscapes colours of the same classes, for plots (not the rendered appearance).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (107, 142, 35),
    (70, 130, 180),
    (0, 0, 142),
    (153, 153, 153),
    (220, 220, 0),
    (220, 20, 60),
    (255, 0, 0),
    (119, 11, 32),
)
RARE_PALETTE = PALETTE + ((102, 102, 156), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230))


@dataclasses.dataclass(eq=False)
class StreetScenesConfig(tfds.core.BuilderConfig):
    """Split sizes, and whether the scenes hold the rare objects (`street_scenes_rare`); configs
    of the same kind draw the same example for the same (split, index)."""

    num_examples: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"train": 1000, "validation": 200, "test": 200}
    )
    rare: bool = False

    @property
    def class_names(self) -> tuple[str, ...]:
        return RARE_CLASS_NAMES if self.rare else CLASS_NAMES


class StreetScenes(tfds.core.GeneratorBasedBuilder):
    """Procedurally generated street scenes for class-imbalanced semantic segmentation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 11 classes, 64x128, train/validation/test."}
    BUILDER_CONFIGS = [
        StreetScenesConfig(
            name="default",
            description="1000 train, 200 validation and 200 test scenes.",
        ),
        StreetScenesConfig(
            name="small",
            description="The first 64/16/16 scenes of the default splits, for tests.",
            num_examples={"train": 64, "validation": 16, "test": 16},
        ),
        StreetScenesConfig(
            name="rare",
            description="The default scenes with rare objects (wall, truck, bus, train, "
            "motorcycle) in a few percent of them: 16 classes.",
            rare=True,
        ),
        StreetScenesConfig(
            name="rare_small",
            description="The first 64/16/16 scenes of the rare splits, for tests.",
            num_examples={"train": 64, "validation": 16, "test": 16},
            rare=True,
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        class_names = self.builder_config.class_names
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(HEIGHT, WIDTH, 3), dtype=np.uint8, encoding_format="png"
                    ),
                    "label": tfds.features.Image(
                        shape=(HEIGHT, WIDTH, 1),
                        dtype=np.uint8,
                        encoding_format="png",
                        doc=f"Train ids 0..{len(class_names) - 1}, {IGNORE_LABEL} = ignore.",
                    ),
                    "id": tfds.features.Text(doc="'<split>/<index>'"),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(
                class_names=list(class_names),
                palette=[list(c) for c in (RARE_PALETTE if self.builder_config.rare else PALETTE)],
                ignore_label=IGNORE_LABEL,
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the scenes are rendered.
        return {
            split: self._generate_examples(split=split, num=num)
            for split, num in self.builder_config.num_examples.items()
        }

    def _generate_examples(self, split: str, num: int):
        generate = generate_rare_scene if self.builder_config.rare else generate_scene
        for index in range(num):
            image, label = generate(SPLIT_SEEDS[split], index)
            yield index, {"image": image, "label": label[..., None], "id": f"{split}/{index:05d}"}


SPEC = DatasetSpec(
    tfds_name="street_scenes",
    num_classes=NUM_CLASSES,
    class_names=CLASS_NAMES,
    palette=PALETTE,
    image_key="image",
    label_key="label",
    ignore_index=IGNORE_LABEL,
)
SMALL_SPEC = dataclasses.replace(SPEC, tfds_name="street_scenes/small")
RARE_SPEC = dataclasses.replace(
    SPEC,
    tfds_name="street_scenes/rare",
    num_classes=len(RARE_CLASS_NAMES),
    class_names=RARE_CLASS_NAMES,
    palette=RARE_PALETTE,
)
RARE_SMALL_SPEC = dataclasses.replace(RARE_SPEC, tfds_name="street_scenes/rare_small")
