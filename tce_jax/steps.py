"""The pure building blocks of training: state, model, optimizer, and the train / eval /
predict steps (`tce_jax.train` compiles and runs them).

One pure train step `(state, batch) -> (state, metrics)` is compiled (`tce_jax.parallel`)
either with `jax.jit` over a one-axis device `Mesh` (batch sharded on "data", state replicated;
the default) or with `jax.pmap(axis_name="batch")`. Both see the same global batch and give the
same numbers: under jit XLA reduces the loss statistics and BatchNorm moments over the global
batch by itself; under pmap the loss `psum`s its class statistics over `axis_name`, BatchNorm
uses the same axis name, and gradients are `pmean`ed (see `tce_jax.losses.tilted_ce`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from tce_jax import (
    accumulation,
    device_transforms,
    inference,
    losses,
    metrics,
    models,
    objectives,
    pretrained,
    sampling,
)


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


def create_model(config: ml_collections.ConfigDict, num_classes: int, bn_axis_name=None):
    dtype = jnp.bfloat16 if config.mixed_precision else jnp.float32
    kwargs = {}
    if models.is_deeplab(config.model.name):
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


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """SGD with momentum or AdamW at the learning rates of `schedule` (that of
    `create_learning_rate_schedule`, which the trainer also logs); weight decay on kernels only
    (not biases or norms). With `optimizer.head_lr_multiplier` m != 1, the updates of the model's
    decode head (`models.head_modules`) are multiplied by m: its learning rate is m times the
    schedule's, decoupled weight decay included (AdamW's update is -lr * (adam + wd * p)), as
    mmsegmentation's `lr_mult`."""
    opt = config.optimizer

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    if opt.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=opt.momentum),
        )
    else:
        tx = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=decay_mask)
    if opt.head_lr_multiplier == 1.0:
        return tx
    heads = models.head_modules(config.model.name)

    def head_mask(params):
        return traverse_util.path_aware_map(lambda path, _: path[0] in heads, params)

    return optax.chain(tx, optax.masked(optax.scale(opt.head_lr_multiplier), head_mask))


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
    seed: int = 0,
):
    """One optimisation step on the (global) batch; returns the new state and scalar metrics.

    With `sampling_probs_fn` (tce_state -> [C]), the state's class-sampling probabilities move
    on every `refresh_steps` steps (`tce_jax.sampling.advance_sampling_probs`). With
    `grad_accum_steps` k > 1 the batch runs as k micro-batches and `decomposition` (the same
    objective as `loss_fn`) gives the exact loss and gradient of the whole batch
    (`tce_jax.accumulation`). The uint8 images of the batch are jittered (when the batch
    carries `photometric` draws, `device_transforms.photometric_on_device`) and normalised
    (`normalise`) on the device first. The model's `dropout` rng (SegFormer's stochastic depth
    and dropout; the other models ignore it) is a function of (`seed`, step), and of the
    replica under pmap; every micro-batch of an accumulated step uses the same one.
    """
    dropout_rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if axis_name is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    if "photometric" in batch:
        jittered = device_transforms.photometric_on_device(batch["image"], batch["photometric"])
        batch = {**batch, "image": jittered}

    def apply_model(params, images):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            normalise(images),  # uint8 from the input pipeline
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
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


def create_train_step(config: ml_collections.ConfigDict, model, tx, axis_name=None):
    """`train_step` with the settings of `config`: its objective, the class-aware sampling's
    refresh, gradient accumulation and the input normalisation."""
    kwargs = {}
    if sampling.method(config.data) == "tilted":
        kwargs.update(
            sampling_probs_fn=functools.partial(sampling.class_probs, config),
            refresh_steps=config.data.sampling_refresh_steps,
        )
    if config.grad_accum_steps > 1:
        kwargs.update(
            grad_accum_steps=config.grad_accum_steps,
            decomposition=objectives.create_decomposition(config),
        )
    return functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_fn=objectives.create_loss_fn(config),
        axis_name=axis_name,
        normalise=device_transforms.device_normaliser(config.data),
        seed=config.seed,
        **kwargs,
    )


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
) -> dict[str, jax.Array]:
    """What one evaluation batch adds to the figures of `tce_jax.metrics`, over all devices:
    `matrix`, its confusion matrix [C, C] (int32, summed), and `image_counts`, each example's
    per-class TP, FP and FN [B, 3, C] (int32, gathered: the global batch's, on every device;
    all zero for padding, whose labels are ignored and whose `mask` is False).

    Whole-image or sliding-window (`mode`) logits of the canvas; with `resize`, each image's
    logits are resized to its label map's resolution before the argmax; with `tta_flip` or
    `tta_scales`, test-time augmentation (`tce_jax.inference`). `predict_kwargs`: those of
    `predict_step`.
    """
    predictions = predict_step(
        state, batch, model=model, label_shape=batch["label"].shape[-2:], **predict_kwargs
    )
    per_image = metrics.confusion_matrix(
        predictions,
        batch["label"],
        num_classes,
        mask=batch["mask"],
        ignore_index=ignore_index,
        per_example=True,
    )
    matrix, counts = per_image.sum(axis=0), metrics.class_counts(per_image)
    if axis_name is not None:
        matrix = jax.lax.psum(matrix, axis_name)
        counts = jax.lax.all_gather(counts, axis_name, axis=0, tiled=True)
    return {"matrix": matrix, "image_counts": counts}
