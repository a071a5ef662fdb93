"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

One pure train step `(state, batch) -> (state, metrics)` is compiled (`tce_jax.parallel`)
either with `jax.jit` over a one-axis device `Mesh` (batch sharded on "data", state replicated;
the default) or with `jax.pmap(axis_name="batch")`. Both see the same global batch and give the
same numbers: under jit XLA reduces the loss statistics and BatchNorm moments over the global
batch by itself; under pmap the loss `psum`s its class statistics over `axis_name`, BatchNorm
uses the same axis name, and gradients are `pmean`ed (see `tce_jax.losses.tilted_ce`).

The step RNG is folded from the step number and the data of a step are a pure function of
(seed, step), so a run restored from its latest checkpoint continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from tce_jax import (
    accumulation,
    checkpointing,
    config_lib,
    datasets,
    device_transforms,
    inference,
    input_pipeline,
    losses,
    metrics,
    models,
    objectives,
    parallel,
    pretrained,
    profiling,
    sampling,
)
from tce_jax import workdir as workdir_lib


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of arrays (checkpointed whole)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    tce_state: losses.StochasticTCEState
    # [2, C] class-sampling probabilities of the current and the next refresh period
    # (tce_jax.sampling); used by tilted class-aware sampling, uniform otherwise.
    sampling_probs: jax.Array


# ---------------------------------------------------------------------------------------------
# Building blocks.


def create_model(config: ml_collections.ConfigDict, num_classes: int, bn_axis_name=None):
    dtype = jnp.bfloat16 if config.mixed_precision else jnp.float32
    kwargs = {}
    if config.model.name.startswith("deeplab"):
        kwargs["output_stride"] = config.model.output_stride
    return models.create_model(
        config.model.name,
        num_classes=num_classes,
        dtype=dtype,
        bn_axis_name=bn_axis_name,
        **kwargs,
    )


def create_learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up, then poly (power `poly_power`), cosine or constant decay."""
    opt = config.optimizer
    warmup = min(opt.warmup_steps, config.num_train_steps - 1)
    decay_steps = config.num_train_steps - warmup
    if opt.schedule == "poly":
        decay = optax.polynomial_schedule(opt.learning_rate, 0.0, opt.poly_power, decay_steps)
    elif opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.learning_rate, decay_steps)
    else:
        decay = optax.constant_schedule(opt.learning_rate)
    if warmup == 0:
        return decay
    ramp = optax.linear_schedule(0.0, opt.learning_rate, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum or AdamW; weight decay on kernels only (not biases or norms)."""
    opt = config.optimizer
    schedule = create_learning_rate_schedule(config)

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    if opt.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=opt.momentum),
        )
    return optax.adamw(schedule, weight_decay=opt.weight_decay, mask=decay_mask)


def init_state(config, model, tx, num_classes: int, rng: jax.Array, backbone=None) -> TrainState:
    """A fresh state; `backbone` (pretrained ResNet variables, see `tce_jax.pretrained`)
    replaces the randomly initialised backbone of a DeepLabV3+."""
    h, w = config.data.crop_size
    variables = model.init(rng, jnp.zeros((1, h, w, 3), jnp.float32), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if backbone is not None:
        params, batch_stats = pretrained.replace_backbone(params, batch_stats, backbone)
    tce_state = losses.stochastic_tce_init(num_classes)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        tce_state=tce_state,
        sampling_probs=sampling.init_sampling_probs(sampling.class_probs(config, tce_state)),
    )


def train_step(
    state: TrainState,
    batch,
    *,
    model,
    tx,
    loss_fn: objectives.LossFn,
    axis_name=None,
    sampling_probs_fn=None,
    refresh_steps: int = 0,
    grad_accum_steps: int = 1,
    decomposition: objectives.Decomposition | None = None,
    normalise=device_transforms.normalise_on_device,
):
    """One optimisation step on the (global) batch; returns the new state and scalar metrics.

    With `sampling_probs_fn` (tce_state -> [C]), the state's class-sampling probabilities move
    on every `refresh_steps` steps (`tce_jax.sampling.advance_sampling_probs`). With
    `grad_accum_steps` k > 1 the batch runs as k micro-batches and `decomposition` (the same
    objective as `loss_fn`) gives the exact loss and gradient of the whole batch
    (`tce_jax.accumulation`). The uint8 images of the batch are jittered (when the batch
    carries `photometric` draws, `device_transforms.photometric_on_device`) and normalised
    (`normalise`) on the device first.
    """
    if "photometric" in batch:
        jittered = device_transforms.photometric_on_device(batch["image"], batch["photometric"])
        batch = {**batch, "image": jittered}

    def apply_model(params, images):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            normalise(images),  # uint8 from the input pipeline
            train=True,
            mutable=["batch_stats"],
        )
        return logits, updates["batch_stats"]

    def objective(params):
        logits, batch_stats = apply_model(params, batch["image"])
        loss, tce_state, aux = loss_fn(logits, batch["label"], state.tce_state, axis_name)
        return loss, (batch_stats, tce_state, aux)

    if grad_accum_steps > 1:
        loss, grads, batch_stats, tce_state, aux = accumulation.value_and_grad(
            apply_model,
            state.params,
            batch,
            decomposition,
            state.tce_state,
            num_micro_batches=grad_accum_steps,
            axis_name=axis_name,
        )
    else:
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (loss, (batch_stats, tce_state, aux)), grads = grad_fn(state.params)
        if axis_name is not None:
            # The loss is the global one on every replica; see tce_jax.losses.tilted_ce.
            grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    probs = state.sampling_probs
    if sampling_probs_fn is not None:
        probs = sampling.advance_sampling_probs(
            probs, state.step + 1, sampling_probs_fn(tce_state), refresh_steps
        )
    new_state = TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
        tce_state=tce_state,
        sampling_probs=probs,
    )
    # aux holds what objectives.AUX_KEYS allows: the per-class figures that are logged.
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return new_state, step_metrics


def predict_step(
    state: TrainState,
    batch,
    *,
    model,
    label_shape: tuple[int, int],
    mode: str = "whole",
    window=None,
    stride=None,
    resize: bool = False,
    tta_flip: bool = False,
    tta_scales=(1.0,),
    normalise=device_transforms.normalise_on_device,
) -> jax.Array:
    """int32 [B, *label_shape] predicted train ids of one evaluation batch (see `eval_step`).

    The uint8 canvas is normalised (`normalise`) on the device first.
    """

    def apply_fn(images):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return model.apply(variables, images, train=False)

    sizes = {}
    if resize:
        sizes = {
            "image_size": batch["image_size"],
            "label_size": batch["label_size"],
            "mask": batch["mask"],
        }
    return inference.predict_labels(
        apply_fn,
        normalise(batch["image"]),  # the whole canvas, so windows pad with normalised zeros
        label_shape=label_shape,
        mode=mode,
        window=window,
        stride=stride,
        flip=tta_flip,
        scales=tta_scales,
        **sizes,
    )


def eval_step(
    state: TrainState,
    batch,
    *,
    model,
    num_classes: int,
    axis_name=None,
    ignore_index: int = 255,
    **predict_kwargs,
) -> jax.Array:
    """Confusion matrix [C, C] (int32) of one evaluation batch, summed over devices.

    Whole-image or sliding-window (`mode`) logits of the canvas; with `resize`, each image's
    logits are resized to its label map's resolution before the argmax; with `tta_flip` or
    `tta_scales`, test-time augmentation (`tce_jax.inference`). `predict_kwargs`: those of
    `predict_step`.
    """
    predictions = predict_step(
        state, batch, model=model, label_shape=batch["label"].shape[-2:], **predict_kwargs
    )
    matrix = metrics.confusion_matrix(
        predictions, batch["label"], num_classes, mask=batch["mask"], ignore_index=ignore_index
    )
    if axis_name is not None:
        matrix = jax.lax.psum(matrix, axis_name)
    return matrix


# ---------------------------------------------------------------------------------------------
# The loops.


class Trainer:
    """Holds what a run builds once: data, model, compiled steps, checkpoints, writers."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, *, prepare_data: bool = True
    ):
        config_lib.validate_config(config)
        self.config = config
        self.workdir = workdir
        self.num_shards = config_lib.validate_layout(
            config, num_devices=jax.device_count(), num_processes=jax.process_count()
        )
        self.layout = input_pipeline.Layout(
            self.num_shards, jax.process_index(), jax.process_count()
        )
        self.spec = datasets.get_dataset_spec(config.data.name, config)
        self.num_classes = self.spec.num_classes
        self.parallel = parallel.create_parallel(config)
        self.model = create_model(config, self.num_classes, self.parallel.axis_name)
        self.tx = create_optimizer(config)
        self.schedule = create_learning_rate_schedule(config)
        self.loss_fn = objectives.create_loss_fn(config)
        init = functools.partial(init_state, config, self.model, self.tx, self.num_classes)
        self._init = self.parallel.compile_init(init)
        self._abstract = jax.eval_shape(init, jax.random.key(0))
        sampling_kwargs = {}
        if config.data.class_aware_sampling:
            sampling_kwargs = dict(
                sampling_probs_fn=functools.partial(sampling.class_probs, config),
                refresh_steps=config.data.sampling_refresh_steps,
            )
        accumulation_kwargs = {}
        if config.grad_accum_steps > 1:
            accumulation_kwargs = dict(
                grad_accum_steps=config.grad_accum_steps,
                decomposition=objectives.create_decomposition(config),
            )
        self._train_step = self.parallel.compile_train(
            functools.partial(
                train_step,
                model=self.model,
                tx=self.tx,
                loss_fn=self.loss_fn,
                axis_name=self.parallel.axis_name,
                normalise=device_transforms.device_normaliser(config.data),
                **sampling_kwargs,
                **accumulation_kwargs,
            )
        )
        self._eval_steps: dict[bool, Any] = {}  # by EvalGeometry.resize
        self._eval_geometry: dict[str, input_pipeline.EvalGeometry] = {}
        self.manager = checkpointing.create_checkpoint_manager(
            os.path.join(workdir, "checkpoints"), config.keep_checkpoints
        )
        self.is_main = jax.process_index() == 0
        # Fail fast, before any data preparation: the weights must exist and fit the model.
        self.backbone = None
        if config.model.pretrained and self.manager.latest_step() is None:
            self.backbone = pretrained.load_for_model(
                config.model.pretrained,
                {"params": self._abstract.params, "batch_stats": self._abstract.batch_stats},
                model=config.model.name,
            )
        if prepare_data:  # now, before anything is compiled; else on first use
            _ = self.data

    @functools.cached_property
    def data(self) -> input_pipeline.Dataset:
        """The prepared dataset of `config.data.name` as this process reads it (prediction on
        image files uses none: `Trainer(..., prepare_data=False)`)."""
        return input_pipeline.Dataset.load(self.config, self.layout)

    # -- state -----------------------------------------------------------------------------

    def initial_state(self) -> TrainState:
        """The latest checkpoint in the workdir if there is one, else a fresh state (with the
        pretrained backbone of `config.model.pretrained`, if set)."""
        step = self.manager.latest_step()
        if step is None:
            state = self._init(jax.random.key(self.config.seed), self.backbone)
            return self.parallel.device_state(state)
        if self.is_main:
            print(f"Resuming from the checkpoint of step {step} in {self.workdir}", flush=True)
        return self.restore(step)

    def restore(self, step: int) -> TrainState:
        """The verified state of `step` (see `checkpointing.restore_checkpoint`)."""
        restored = checkpointing.restore_checkpoint(
            self.manager, step, self.parallel.abstract_state(self._abstract)
        )
        return self.parallel.device_state(restored)

    def save(self, state: TrainState, step: int, eval_figures: dict | None) -> None:
        """Starts saving `state` with its validation mIoU, if it was evaluated (for "best").

        A state with NaN or inf in it is never saved: Diverged is raised instead.
        """
        checkpoint_metrics = None
        if eval_figures:
            checkpoint_metrics = {checkpointing.BEST_METRIC: float(eval_figures["miou"])}
        try:
            checkpointing.save_checkpoint(
                self.manager, step, self.parallel.host_state(state), checkpoint_metrics
            )
        except checkpointing.NonFiniteStateError as e:
            raise self._diverged(step, f"the state has NaN/inf in {e.leaves[0]}") from None

    # -- evaluation ------------------------------------------------------------------------

    def predict_kwargs(self, geometry: input_pipeline.EvalGeometry) -> dict:
        """`predict_step`'s keyword arguments in evaluation (also those of `tce_jax.predict`)."""
        data = self.config.data
        return dict(
            model=self.model,
            mode=data.eval_mode,
            window=tuple(data.eval_window),
            stride=tuple(data.eval_stride),
            resize=geometry.resize,
            tta_flip=data.tta_flip,
            tta_scales=tuple(data.tta_scales),
            normalise=device_transforms.device_normaliser(data),
        )

    def _eval_step_for(self, geometry: input_pipeline.EvalGeometry):
        if geometry.resize not in self._eval_steps:
            self._eval_steps[geometry.resize] = self.parallel.compile_eval(
                functools.partial(
                    eval_step,
                    num_classes=self.num_classes,
                    axis_name=self.parallel.eval_axis_name,
                    ignore_index=self.spec.ignore_index,
                    **self.predict_kwargs(geometry),
                )
            )
        return self._eval_steps[geometry.resize]

    def evaluate(self, state: TrainState, split: str) -> dict:
        """The figures of docs/maths.md ("Metrics") over the whole split (every example once,
        padding masked), with predictions at the label maps' resolution."""
        if split not in self._eval_geometry:
            self._eval_geometry[split] = self.data.eval_geometry(split)
        geometry = self._eval_geometry[split]
        step_fn = self._eval_step_for(geometry)
        matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
        for batch in self.data.eval_iterator(split, geometry):
            batch_matrix = step_fn(state, self.parallel.put_batch(batch))
            matrix += np.asarray(self.parallel.fetch(batch_matrix), np.int64)
        figures = metrics.segmentation_figures(matrix)
        figures["confusion"] = matrix
        return figures

    # -- training --------------------------------------------------------------------------

    def train(self) -> TrainState:
        state = self.initial_state()
        start = self.parallel.current_step(state)
        sampler = self._start_sampler(state, start)
        data = self.data.train_iterator(start_step=start, index_fn=sampler)
        log = _TrainLog(self, start)
        try:
            with checkpointing.StopRequests(self.manager) as stop:
                state = self._run_steps(state, start, data, sampler, log, stop)
        except BaseException:
            # Let a save in flight finish (only checked states are saved) and stop Orbax's
            # threads, so that the error is the last thing printed.
            self.manager.close()
            raise
        finally:
            if sampler is not None:
                sampler.close()  # the reader may be waiting for a period beyond the last step
            data.close()  # release the tf.data iterator now, not during interpreter shutdown
        self.manager.wait_until_finished()
        log.writer.flush()
        return state

    def _start_sampler(self, state: TrainState, start: int):
        """Tilted class-aware sampling's `IndexFn`, started from the (restored) state; None
        when batches are drawn uniformly."""
        if not self.config.data.class_aware_sampling:
            return None
        sampler = self.data.class_aware_sampler()
        sampler.start(start, self.parallel.fetch(state.sampling_probs))
        return sampler

    def _run_steps(self, state, start: int, data, sampler, log, stop) -> TrainState:
        profiler = profiling.StepProfiler(
            self.workdir, self.config.profile_steps, start_step=start, enabled=self.is_main
        )
        unchecked = None  # (step, metrics) of a step whose loss was not yet checked
        for step in range(start + 1, self.config.num_train_steps + 1):
            state, step_metrics = self._train_step(state, self.parallel.put_batch(next(data)))
            profiler(step, state)
            if unchecked is not None:
                # The previous step is checked once this one is queued: the device stays
                # busy while the host waits.
                self._check_finite(*unchecked)
            unchecked = (step, step_metrics)
            log.add(step, step_metrics)
            due = _Due.at(step, self.config, sampler, stop.requested(step))
            if due:
                self._check_finite(*unchecked)  # before anything reads the state
                unchecked = None
                self._periodic(state, step, due, sampler, log, stop)
        profiler.close(state)
        return state

    def _periodic(self, state, step: int, due: _Due, sampler, log, stop) -> None:
        """What happens every so many steps: sampler refresh, logs, evaluation, checkpoint,
        and the stop a signal asked for."""
        if due.refresh:
            sampler.after_step(step, lambda: self.parallel.fetch(state.sampling_probs))
        if due.log:
            log.write(step)
        eval_figures = None
        if due.evaluate:
            eval_figures = self.evaluate(state, self.config.data.eval_split)
            self._log_eval(log.writer, step, self.config.data.eval_split, eval_figures)
        if due.save or due.stop:
            self.save(state, step, eval_figures)
        if due.stop:
            self.manager.wait_until_finished()
            raise checkpointing.Preempted(
                f"stopped at step {step} by {stop.reason}; checkpoint saved; "
                "rerun the same command to resume",
                stop.exit_code,
            )

    def _check_finite(self, step: int, step_metrics: dict) -> None:
        """Raises Diverged if the loss or gradient norm of `step` is NaN or infinite."""
        names = {"loss": "loss", "grad_norm": "gradient norm"}
        fetched = self.parallel.fetch({k: step_metrics[k] for k in names if k in step_metrics})
        for key, value in fetched.items():
            value = np.asarray(value, np.float64)
            if not np.isfinite(value).all():
                raise self._diverged(step, f"{names[key]} is {value[~np.isfinite(value)][0]}")

    def _diverged(self, step: int, problem: str) -> checkpointing.Diverged:
        self.manager.wait_until_finished()
        good = self.manager.latest_step()
        if good is None:
            where, fix = "no checkpoint yet", "rerun to start afresh"
        else:
            where = f"last good checkpoint: step {good} in {self.manager.directory}"
            fix = f"rerun to resume from step {good}"
        lr = self.config.optimizer.learning_rate
        return checkpointing.Diverged(
            f"{problem} at step {step}; nothing saved after step {step - 1} ({where}); "
            f"lower the learning rate (--config.optimizer.learning_rate, now {lr:g}) and {fix}, "
            "or use a new --workdir"
        )

    def _log_eval(self, writer, step: int, split: str, figures: dict) -> None:
        flat = metrics.flatten_figures(figures, self.spec.class_names)
        if self.is_main:
            writer.write_scalars(step, {f"{split}/{k}": v for k, v in flat.items()})
            workdir_lib.append_jsonl(
                os.path.join(self.workdir, "metrics.jsonl"), {"step": step, "split": split, **flat}
            )
            print(
                f"  eval {split} @ step {step}: mIoU {100 * flat['miou']:.1f}  "
                f"worst-class IoU {100 * flat['worst_iou']:.1f}  "
                f"pixel acc {100 * flat['pixel_accuracy']:.1f}",
                flush=True,
            )

    # -- final reports ---------------------------------------------------------------------

    def report(self, state: TrainState, splits) -> dict[str, dict]:
        """Evaluates `splits` and writes report.md / per_class.csv / final_metrics.json."""
        results = {}
        for split in splits:
            if split not in self.data.split_names:
                logging.warning("Split %r does not exist; not reported.", split)
                continue
            results[split] = self.evaluate(state, split)
        if self.is_main and results:
            config = self.config
            metrics.write_run_reports(
                self.workdir,
                results,
                self.spec.class_names,
                title=f"{config.loss.name} on {config.data.name}",
                extra={
                    "loss": config.loss.name,
                    "t": config.loss.t,
                    "step": self.parallel.current_step(state),
                },
            )
        return results


@dataclasses.dataclass(frozen=True)
class _Due:
    """What is due after a training step (all false on most steps)."""

    refresh: bool  # class-sampling probabilities of the next period
    log: bool
    evaluate: bool
    save: bool
    stop: bool  # a signal asked the run to stop

    @classmethod
    def at(cls, step: int, config, sampler, stop: bool) -> _Due:
        last = step == config.num_train_steps
        evaluate = step % config.eval_every_steps == 0 or last
        return cls(
            refresh=sampler is not None and sampler.refresh_due(step),
            log=step % config.log_every_steps == 0 or last,
            evaluate=evaluate,
            # An evaluated state is saved too, so that "best" can be any evaluated one.
            save=step % config.checkpoint_every_steps == 0 or last or evaluate,
            stop=stop,
        )

    def __bool__(self) -> bool:
        return any(dataclasses.astuple(self))


class _TrainLog:
    """Training metrics: kept per step on the device, averaged and written every
    `log_every_steps` (TensorBoard, train_metrics.jsonl, one progress line)."""

    def __init__(self, trainer: Trainer, start: int):
        self.trainer = trainer
        config = trainer.config
        self.writer = metric_writers.create_default_writer(
            trainer.workdir, just_logging=not trainer.is_main
        )
        if start == 0 and trainer.is_main:
            self.writer.write_hparams(_flat_hparams(config))
        self.progress = periodic_actions.ReportProgress(
            num_train_steps=config.num_train_steps,
            writer=self.writer,
            every_steps=config.log_every_steps,
            every_secs=None,
        )
        self.pending: list[dict] = []
        self.last_time, self.last_step = time.time(), start

    def add(self, step: int, step_metrics: dict) -> None:
        self.pending.append(step_metrics)
        self.progress(step)

    def write(self, step: int) -> None:
        trainer = self.trainer
        fetched = trainer.parallel.fetch(self.pending)
        self.pending = []
        mean = {k: np.mean([m[k] for m in fetched], axis=0) for k in fetched[0]}
        scalars = {f"train/{k}": float(v) for k, v in mean.items() if np.ndim(v) == 0}
        scalars["train/learning_rate"] = float(trainer.schedule(step - 1))
        for key in ("class_loss", "class_weight"):
            if key in mean:
                for name, value in zip(trainer.spec.class_names, mean[key], strict=True):
                    scalars[f"train/{key}/{name}"] = float(value)
        rate = (step - self.last_step) / max(time.time() - self.last_time, 1e-9)
        self.last_time, self.last_step = time.time(), step
        if trainer.is_main:
            self.writer.write_scalars(step, scalars)
            workdir_lib.append_jsonl(
                os.path.join(trainer.workdir, "train_metrics.jsonl"), {"step": step, **scalars}
            )
            self._print(step, scalars["train/loss"], rate)

    def _print(self, step: int, loss: float, rate: float) -> None:
        config = self.trainer.config
        remaining = (config.num_train_steps - step) / max(rate, 1e-9)
        print(
            f"[{config.loss.name}] step {step}/{config.num_train_steps}  "
            f"loss {loss:.4f}  {rate:.2f} steps/s  ETA {_format_seconds(remaining)}",
            flush=True,
        )


def _format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def _flat_hparams(config: ml_collections.ConfigDict) -> dict:
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                visit(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = (
                    value if isinstance(value, int | float | str | bool) else str(value)
                )

    visit("", config)
    return flat


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, dict]:
    """Trains (resuming from the workdir's latest checkpoint), then evaluates and reports.

    `workdir` is a local path or a `gs://` path (`tce_jax.workdir.resolve`). The run holds the
    workdir's lock, refuses to resume a checkpoint of a different experiment unless
    `allow_config_change`, and records config.json and provenance.jsonl (`tce_jax.workdir`).
    Returns the final figures per split of `config.data.final_eval_splits`.
    """
    config_lib.validate_config(config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    with workdir_lib.open_run(config, workdir, allow_config_change=allow_config_change):
        trainer = Trainer(config, workdir)
        state = trainer.train()
        results = trainer.report(state, tuple(config.data.final_eval_splits))
        trainer.manager.close()
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "best"):
    """Evaluates a checkpoint of the workdir and reports.

    `checkpoint`: "best" (the highest validation mIoU among the evaluated checkpoints),
    "latest", or a step number.
    """
    with workdir_lib.open_run(config, workdir, mode="evaluate", details={"checkpoint": checkpoint}):
        return _evaluate(config, workdir, checkpoint)


def _evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str):
    trainer = Trainer(config, workdir)
    manager = trainer.manager
    try:
        step = _checkpoint_step(manager, checkpoint)
        if trainer.is_main:
            print(f"Evaluating the checkpoint of step {step} ({checkpoint})", flush=True)
        state = trainer.restore(step)
        results = trainer.report(state, tuple(config.data.final_eval_splits))
    finally:
        manager.close()
    return results


def _checkpoint_step(manager, checkpoint: str) -> int:
    steps = list(manager.all_steps())
    if checkpoint == "best":
        step = manager.best_step()
        if step is None and steps:
            raise FileNotFoundError(
                f"No checkpoint in {manager.directory} was evaluated (steps there: {steps}), so "
                "none is 'best'. Pass --checkpoint=latest or a step number."
            )
    elif checkpoint == "latest":
        step = manager.latest_step()
    else:
        step = int(checkpoint) if checkpoint.isdigit() else None
    if step is None or step not in steps:
        raise FileNotFoundError(
            f"No checkpoint {checkpoint!r} in {manager.directory} (steps there: {steps}). "
            "Train first, or pass --checkpoint=latest|best|STEP."
        )
    return step
