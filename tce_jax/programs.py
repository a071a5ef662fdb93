"""The compiled programs of a config: model, optimizer, and the train, eval and predict steps
(`tce_jax.steps`) compiled for a parallelism (`tce_jax.parallel`).

One place builds them for both of their users: the trainer (`tce_jax.train`, and prediction)
runs them on the devices JAX has; `--mode=compile` (`tce_jax.compile_mode`) lowers the very
same functions for a target's compile-only devices with abstract inputs
(`train_inputs` / `eval_inputs` / `predict_inputs`: the shapes the input pipeline delivers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from tce_jax import device_transforms, example_transforms, steps, train_metrics
from tce_jax.datasets.spec import DatasetSpec
from tce_jax.input_pipeline import EvalGeometry


def train_batch_shapes(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch as `input_pipeline.Dataset.train_iterator` delivers it."""
    b, (h, w) = config.global_batch_size, config.data.crop_size
    batch = {
        "image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((b, h, w), jnp.uint8),
    }
    if config.data.photometric:
        size = (b, example_transforms.PHOTOMETRIC_SIZE)
        batch["photometric"] = jax.ShapeDtypeStruct(size, jnp.float32)
    return batch


def eval_batch_shapes(
    config: ml_collections.ConfigDict, geometry: EvalGeometry, *, labels: bool = True
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global evaluation batch as `input_pipeline.Dataset.eval_iterator` delivers it for
    `geometry` (prediction's batches: without `label`)."""
    b = config.data.eval_batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((b, *geometry.canvas, 3), jnp.uint8),
        "mask": jax.ShapeDtypeStruct((b,), jnp.bool_),
        "image_size": jax.ShapeDtypeStruct((b, 2), jnp.int32),
        "label_size": jax.ShapeDtypeStruct((b, 2), jnp.int32),
    }
    if labels:
        batch["label"] = jax.ShapeDtypeStruct((b, *geometry.label_shape), jnp.uint8)
    return batch


class Programs:
    """Model, optimizer and compiled steps of `config` for `spec`'s dataset on `parallel`.

    Attributes:
      model, schedule: the Flax model and the learning-rate schedule.
      init: compiled `(rng, backbone) -> TrainState`.
      abstract_state: the state's shapes and dtypes (`jax.eval_shape` of `init`).
      train: the compiled train step `(state, batch) -> (state, figures)` (a clu Collection).
    """

    def __init__(self, config: ml_collections.ConfigDict, spec: DatasetSpec, parallel):
        self.config, self.spec, self.parallel = config, spec, parallel
        self.model = steps.create_model(config, spec.num_classes, parallel.axis_name)
        self.schedule = steps.create_learning_rate_schedule(config)
        tx = steps.create_optimizer(config, self.schedule)
        init = functools.partial(steps.init_state, config, self.model, tx, spec.num_classes)
        self.init = parallel.compile_init(init)
        self.abstract_state = jax.eval_shape(init, jax.random.key(0))
        step_fn = steps.create_train_step(config, self.model, tx, parallel.axis_name)
        # Its figures come as a clu Collection, merged on the host up to each log step.
        self.train = parallel.compile_train(train_metrics.collecting(step_fn, self.schedule))
        self._eval_steps: dict[tuple[bool, str], object] = {}

    def predict_kwargs(self, geometry: EvalGeometry, mode: str | None = None) -> dict:
        """`predict_step`'s keyword arguments in evaluation and prediction; `mode` (whole or
        sliding; default `config.data.eval_mode`)."""
        data = self.config.data
        return dict(
            model=self.model,
            mode=mode or data.eval_mode,
            window=tuple(data.eval_window),
            stride=tuple(data.eval_stride),
            resize=geometry.resize,
            tta_flip=data.tta_flip,
            tta_scales=tuple(data.tta_scales),
            normalise=device_transforms.device_normaliser(data),
        )

    def eval_step(self, geometry: EvalGeometry, mode: str | None = None):
        """The compiled `steps.eval_step` for batches of `geometry` (one per resize and mode):
        `(state, batch) -> {"matrix", "image_counts"}`, of the global batch."""
        key = (geometry.resize, mode or self.config.data.eval_mode)
        if key not in self._eval_steps:
            self._eval_steps[key] = self.parallel.compile_eval(
                functools.partial(
                    steps.eval_step,
                    num_classes=self.spec.num_classes,
                    axis_name=self.parallel.eval_axis_name,
                    ignore_index=self.spec.ignore_index,
                    **self.predict_kwargs(geometry, mode),
                )
            )
        return self._eval_steps[key]

    def predict_step(self, geometry: EvalGeometry):
        """The compiled `steps.predict_step` with the config's inference settings, its
        predictions sharded over devices like the batch."""
        step_fn = functools.partial(
            steps.predict_step, label_shape=geometry.label_shape, **self.predict_kwargs(geometry)
        )
        return self.parallel.compile_predict(step_fn)

    # -- abstract inputs, for lowering without data ------------------------------------------

    def train_inputs(self) -> tuple:
        return self.parallel.abstract_inputs(self.abstract_state, train_batch_shapes(self.config))

    def eval_inputs(self, geometry: EvalGeometry) -> tuple:
        batch = eval_batch_shapes(self.config, geometry)
        return self.parallel.abstract_inputs(self.abstract_state, batch)

    def predict_inputs(self, geometry: EvalGeometry) -> tuple:
        batch = eval_batch_shapes(self.config, geometry, labels=False)
        return self.parallel.abstract_inputs(self.abstract_state, batch)
