"""The class-frequency table of docs/street_scenes.md, measured on the rendered scenes.

    python experiments/street_scenes_frequencies.py [--split=train] [--num_examples=1000] [--rare]

Renders the first ``--num_examples`` scenes of a split (about 4 s for 1000; no TFDS build
needed: the builder writes exactly these scenes) and prints the table and the ratio of the most
to the least frequent class. ``--rare``: the rare-object scenes (``street_scenes_rare``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from tce_jax.datasets import street_scenes_rare
from tce_jax.datasets.street_scenes_render import (
    CLASS_NAMES,
    IGNORE_LABEL,
    SPLIT_SEEDS,
    generate_scene,
)


def label_statistics(
    split: str = "train", num_examples: int = 1000, rare: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts and image counts per label value over the first scenes of a split
    (of the rare-object scenes if ``rare``).

    Returns:
      ``(pixels, images)``, both ``int64 [256]`` indexed by label value (train ids and 255):
      the number of pixels with that label, and the number of scenes that contain it.
      Pixel frequencies over the labelled pixels are ``pixels[:C] / pixels[:C].sum()``.
    """
    pixels = np.zeros(256, np.int64)
    images = np.zeros(256, np.int64)
    generate = street_scenes_rare.generate_rare_scene if rare else generate_scene
    for index in range(num_examples):
        counts = np.bincount(generate(SPLIT_SEEDS[split], index)[1].ravel(), minlength=256)
        pixels += counts
        images += counts > 0
    return pixels, images


def frequency_table(split: str = "train", num_examples: int = 1000, rare: bool = False) -> str:
    """The measured class frequencies of a split as a Markdown table."""
    pixels, images = label_statistics(split, num_examples, rare)
    names = street_scenes_rare.CLASS_NAMES if rare else CLASS_NAMES
    num_classes = len(names)
    labelled = pixels[:num_classes].sum()
    rows = [
        "| id | class | % of labelled pixels | % of all pixels | % of images |",
        "|---:|---|---:|---:|---:|",
    ]
    for k in [*range(num_classes), IGNORE_LABEL]:
        name = names[k] if k < num_classes else "(ignore)"
        share = f"{100 * pixels[k] / labelled:.3f}" if k < num_classes else "-"
        rows.append(
            f"| {k} | {name} | {share} | {100 * pixels[k] / pixels.sum():.3f} "
            f"| {100 * images[k] / num_examples:.1f} |"
        )
    freq = pixels[:num_classes] / labelled
    rows.append(f"\nmax/min pixel frequency ratio: {freq.max() / freq.min():.0f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="train", choices=sorted(SPLIT_SEEDS))
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--rare", action="store_true", help="the rare-object scenes")
    args = parser.parse_args(argv)
    print(frequency_table(args.split, args.num_examples, args.rare))


if __name__ == "__main__":
    main()
