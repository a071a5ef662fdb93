"""What training and evaluation measure, as CLU metrics (`clu.metrics`).

* The train step's figures (`collecting`): one `clu.metrics.Collection` per step, built inside
  the compiled step (a `StepAverage` per figure of `steps.train_step`, the learning rate as a
  `LastValue`), fetched to the host and merged there step by step; `compute()` at a log step
  gives the averages since the last one.
* An evaluation (`Evaluation`): its confusion matrix (`ConfusionMatrix`), merged by addition
  over the batches in exact int64 counts, and every image's per-class counts (`ImageCounts`),
  collected; `compute()` gives the figures of `tce_jax.metrics`, dataset-level and fine-grained.

Also `format_duration`, the one way a duration is printed (progress lines, the sweep).

(No `from __future__ import annotations` here: a clu `Collection` reads its metrics' classes
from its fields' annotations.)
"""

from collections.abc import Callable

import flax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

from tce_jax import metrics


@flax.struct.dataclass
class StepAverage(clu_metrics.Average):
    """The average over steps of a figure in its own shape, a scalar or a per-class vector
    (`clu.metrics.Average` would average a vector's classes together too)."""

    @classmethod
    def from_model_output(cls, values, **_) -> "StepAverage":
        return cls(total=jnp.asarray(values, jnp.float32), count=jnp.ones((), jnp.int32))


def collecting(step_fn: Callable, schedule: optax.Schedule) -> Callable:
    """`step_fn` (`steps.train_step` with its settings) with its figures as a Collection: a
    `StepAverage` of each, and the step's learning rate (`schedule`) as a `LastValue`."""

    def step(state, batch):
        learning_rate = schedule(state.step)  # the rate of this update (optax counts from 0)
        state, step_metrics = step_fn(state, batch)
        collection = clu_metrics.Collection.create(
            **{name: StepAverage.from_output(name) for name in step_metrics},
            learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
        )
        return state, collection.single_from_model_output(
            **step_metrics, learning_rate=learning_rate
        )

    return step


def train_scalars(figures: dict, class_names) -> dict[str, float]:
    """The computed train figures as the scalars that are written: "train/NAME" for a scalar,
    "train/NAME/CLASS" for each class of a per-class vector."""
    scalars = {f"train/{k}": float(v) for k, v in figures.items() if np.ndim(v) == 0}
    for key, value in figures.items():
        if np.ndim(value) == 1:
            for name, x in zip(class_names, value, strict=True):
                scalars[f"train/{key}/{name}"] = float(x)
    return scalars


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """The confusion matrix [C, C] of an evaluation (rows: labels, columns: predictions), in
    exact int64 counts on the host, merged by addition over the evaluation's batches."""

    matrix: np.ndarray

    @classmethod
    def empty(cls, num_classes: int = 0) -> "ConfusionMatrix":
        return cls(matrix=np.zeros((num_classes, num_classes), np.int64))

    @classmethod
    def from_model_output(cls, matrix, **_) -> "ConfusionMatrix":
        """`matrix`: a batch's (fetched) matrix of `steps.eval_step`."""
        return cls(matrix=np.asarray(matrix, np.int64))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return type(self)(matrix=self.matrix + other.matrix)

    def compute(self) -> dict:
        """The figures of docs/maths.md ("Metrics"), and the matrix itself as "confusion"."""
        return {**metrics.segmentation_figures(self.matrix), "confusion": self.matrix}


@flax.struct.dataclass
class ImageCounts(clu_metrics.Metric):
    """Every evaluated image's per-class TP, FP and FN ([3, C] rows of `steps.eval_step`'s
    `image_counts`, padding included), collected on the host in batch order."""

    rows: tuple[np.ndarray, ...]

    @classmethod
    def empty(cls) -> "ImageCounts":
        return cls(rows=())

    @classmethod
    def from_model_output(cls, image_counts, **_) -> "ImageCounts":
        return cls(rows=(np.asarray(image_counts),))

    def merge(self, other: "ImageCounts") -> "ImageCounts":
        return type(self)(rows=self.rows + other.rows)

    def compute(self) -> dict:
        """The fine-grained figures (`metrics.fine_grained_figures`; padding rows, all zero,
        are dropped there with the images that have no labelled pixel)."""
        counts = np.concatenate(self.rows) if self.rows else np.zeros((0, 3, 0), np.int64)
        return metrics.fine_grained_figures(counts)


@flax.struct.dataclass
class Evaluation(clu_metrics.Collection):
    """An evaluation's metrics, from the fetched outputs of `steps.eval_step`, batch by batch."""

    confusion: ConfusionMatrix
    images: ImageCounts

    @classmethod
    def empty(cls, num_classes: int = 0) -> "Evaluation":
        return super().empty().replace(confusion=ConfusionMatrix.empty(num_classes))

    def compute(self) -> dict:
        """Every figure of docs/maths.md ("Metrics"), and the confusion matrix as "confusion"."""
        return {**self.confusion.compute(), **self.images.compute()}


def format_duration(seconds: float) -> str:
    """'1h05m' or '4m07s'."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
