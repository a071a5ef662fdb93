"""The training objective named by `config.loss`: one place that maps names to loss functions.

Every objective has the signature `(logits, labels, tce_state, axis_name) -> (loss, tce_state,
aux)`, so the train step treats them alike: `tce_state` is the Stochastic TCE state (passed
through unchanged by the other losses) and `aux` holds what is logged (`AUX_KEYS`; the
registry checks that every objective returns `class_loss` and `num_invalid`, and passes on
nothing else):

* `class_loss` (`[C]`): the per-class losses of the batch. For TCE, Stochastic TCE and CE the
  mean pixel cross-entropy of each class (`L_c`, also what TCE tilts), for weighted CE the
  same, and for the focal, Lovász, OHEM and Dice losses also the per-class cross-entropy (a
  diagnostic: not what they minimise). 0 for classes absent from the batch.
* `class_weight` (`[C]`, where defined): the share of each class's mean loss in the
  gradient, `sum_c w_c grad L_c`: the tilted weights for TCE, the class frequencies of the batch
  for CE (what TCE gives at t = 0), `w_c n_c / sum w n` for weighted CE. Not logged for the
  focal, Lovász, OHEM and Dice losses, whose gradients do not decompose over the class means.

Every loss but Lovász and OHEM is computed one way: the additive statistics `S` of the batch
(`BatchStatistics`: the per-class statistics of `tce_jax.losses`, plus the sums and counts a
loss needs beyond them), then its finisher `F(S)`. The one-pass objective (`create_loss_fn`)
takes `S` of the whole batch, reduced over the devices; exact gradient accumulation
(`create_decomposition`, `tce_jax.accumulation`) sums `S` over micro-batches first. Both call
the same two functions.

The registry `OBJECTIVES` maps each `config.loss.name` to an `Objective`; `LOSSES` lists its
names (also the `:variant` syntax of the configs). Adding a loss: its maths in
`tce_jax.losses` (as a function of `losses.ClassStatistics` where it is one), one `Objective`
here (its finisher, the config fields it reads, and any statistics beyond the class ones), and
its config fields in `config_lib.get_base_config`, checked in `config_lib.validate_config`.
The names:

* `ce`: mean pixel cross-entropy (MCCE);
* `tce`, `stochastic_tce`: `loss.t`, `loss.tau`, `loss.class_weighting` (and `loss.lam`,
  `loss.estimator`, `loss.batch_loss`);
* `weighted_ce`: class-weighted CE; `loss.class_weights` is `'inverse_frequency'`,
  `'median_frequency'` or `'enet'` (weights from the global batch's class counts), or C
  comma-separated numbers (fixed weights);
* `focal`: softmax focal loss with `loss.focal_gamma`;
* `lovasz`: Lovász-softmax over the batch (classes present in the batch); it sorts the pixel
  errors of the whole batch, so it has no finisher and cannot be accumulated.
* `recall`: the recall loss, CE weighted by `1 - recall_c` of the batch's hard predictions
  (the true positives are extra counts);
* `class_balanced`: class-balanced CE with `loss.cb_beta` and `loss.cb_counts` (`'images'`
  or `'pixels'` of the training split, which the trainer reads once, `resolve_class_counts`;
  or C comma-separated numbers).
* `ohem`: CE over the hard pixels, `loss.ohem_thresh`, `loss.ohem_min_kept` (per image); its
  threshold is an order statistic of the whole batch: no finisher, no accumulation.
* `dice`: soft Dice over all classes, `loss.dice_smooth`, `loss.dice_exponent`; its per-class
  sums are additive (`sums`).

Config values are checked once, by `config_lib.validate_config`, before any of this runs.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from tce_jax import losses

LossFn = Callable[..., tuple[jax.Array, losses.StochasticTCEState, dict]]
# What an objective's aux may hold (the train step logs these), and what it must hold.
AUX_KEYS = ("objective", "class_loss", "class_weight", "num_invalid")
REQUIRED_AUX_KEYS = ("class_loss", "num_invalid")


def _numbers(value) -> np.ndarray | None:
    """Numbers from a sequence or "1,2.5,...": finite, non-negative, not all zero; else None."""
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        vector = np.array([float(x) for x in items], np.float64)
    except (TypeError, ValueError):
        return None
    if vector.size == 0 or not np.all(np.isfinite(vector)) or np.any(vector < 0):
        return None
    return vector if np.any(vector > 0) else None


def parse_class_weights(value) -> str | np.ndarray:
    """`config.loss.class_weights`: a scheme name, or numbers (a sequence or "1,2.5,...")."""
    if isinstance(value, str) and value in losses.CLASS_WEIGHT_SCHEMES:
        return value
    vector = _numbers(value)
    if vector is None:
        raise ValueError(
            f"config.loss.class_weights={value!r} is invalid: expected one of "
            f"{losses.CLASS_WEIGHT_SCHEMES} or one non-negative number per class, "
            "comma-separated (e.g. '1,2,0.5')."
        )
    return vector.astype(np.float32)


# `config.loss.cb_counts` that the trainer reads from the training split's class index
# (`tce_jax.datasets.class_index.ClassIndex`): the images containing each class, or its pixels.
CLASS_COUNT_SOURCES = {
    "images": lambda index: np.sum(index.presence, axis=0, dtype=np.int64),
    "pixels": lambda index: np.sum(index.counts, axis=0, dtype=np.int64),
}


def parse_class_counts(value) -> str | np.ndarray:
    """`config.loss.cb_counts`: a name of `CLASS_COUNT_SOURCES`, or numbers ("120,4,...")."""
    if isinstance(value, str) and value in CLASS_COUNT_SOURCES:
        return value
    vector = _numbers(value)
    if vector is None:
        raise ValueError(
            f"config.loss.cb_counts={value!r} is invalid: expected one of "
            f"{tuple(CLASS_COUNT_SOURCES)} (counted in the training split) or one non-negative "
            "count per class, comma-separated (e.g. '2975,120,0')."
        )
    return vector


def resolve_class_counts(
    config: ml_collections.ConfigDict, class_index: Callable[[], object]
) -> ml_collections.ConfigDict:
    """`config`, or for `loss.name='class_balanced'` with `loss.cb_counts` one of
    `CLASS_COUNT_SOURCES`, a copy whose `loss.cb_counts` holds those counts of
    `class_index()` (the training split's `ClassIndex`, read only then) as numbers: the
    weights are fixed for the whole run."""
    source = config.loss.cb_counts
    if config.loss.name != "class_balanced" or source not in CLASS_COUNT_SOURCES:
        return config
    counts = CLASS_COUNT_SOURCES[source](class_index())
    resolved = config.copy_and_resolve_references()
    resolved.loss.cb_counts = ",".join(str(int(n)) for n in counts)
    return resolved


# ---------------------------------------------------------------------------------------------
# Additive batch statistics, and how the statistics of parts add up.


class BatchStatistics(NamedTuple):
    """Statistics of (part of) a batch that add up over parts, and determine the objective.

    Attributes:
      classes: the per-class statistics (`losses.ClassStatistics`); for `tau != 0` their sums
        add up only once brought to a common shift (`at_shift`).
      sums: float sums that carry gradients (the focal loss sum).
      counts: integer sums (the image pixels of `'median_frequency'`).
    """

    classes: losses.ClassStatistics
    sums: dict[str, jax.Array]
    counts: dict[str, jax.Array]


def at_shift(classes: losses.ClassStatistics, shift: jax.Array) -> losses.ClassStatistics:
    """The statistics rewritten with ``shift`` (>= their own, present classes):
    ``S_c e^{own_c - shift_c}``, so that parts at one shift add up. Identity for ``tau = 0``."""
    present = classes.count > 0
    scale = jnp.where(present, jnp.exp(jnp.where(present, classes.shift - shift, 0.0)), 0.0)
    return classes._replace(loss_sum=classes.loss_sum * lax.stop_gradient(scale), shift=shift)


def sum_statistics(parts: BatchStatistics, axis_name) -> tuple[BatchStatistics, jax.Array]:
    """The statistics of the whole batch from those of its parts (leading axis), over the
    devices of ``axis_name`` too, and the common shift ``[C]`` at which the parts add up: the
    largest shift of each class where it is present (0 for absent classes)."""
    present = parts.classes.count > 0
    shift = jnp.max(jnp.where(present, parts.classes.shift, -jnp.inf), axis=0)
    if axis_name is not None:
        shift = lax.pmax(shift, axis_name)
    shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
    classes = at_shift(parts.classes, shift)
    summed = (classes.loss_sum, classes.count, classes.num_invalid, parts.sums, parts.counts)
    summed = jax.tree.map(lambda x: jnp.sum(x, 0), summed)
    if axis_name is not None:
        summed = lax.psum(summed, axis_name)
    loss_sum, count, num_invalid, sums, counts = summed
    classes = losses.ClassStatistics(loss_sum, count, jnp.where(count > 0, shift, 0.0), num_invalid)
    return BatchStatistics(classes, sums, counts), shift


# ---------------------------------------------------------------------------------------------
# The finishers, `(S, tce_state, **options) -> (loss, tce_state, aux)` of the statistics `S` of
# the whole batch, and the statistics some losses need beyond the class ones,
# `(logits, labels, classes, **options) -> (sums, counts)` of a part (`classes` its class
# statistics).


def _class_aux(classes: losses.ClassStatistics) -> dict:
    """The per-class CE of the batch and its invalid pixels, which every objective logs."""
    return {"class_loss": losses.class_losses(classes), "num_invalid": classes.num_invalid}


def _mean_over_valid(classes: losses.ClassStatistics, total: jax.Array) -> jax.Array:
    return total / jnp.maximum(jnp.sum(classes.count), 1).astype(classes.loss_sum.dtype)


def _ce(stats, tce_state):
    classes = stats.classes
    count = classes.count.astype(classes.loss_sum.dtype)
    aux = {**_class_aux(classes), "class_weight": _mean_over_valid(classes, count)}
    return _mean_over_valid(classes, jnp.sum(classes.loss_sum)), tce_state, aux


def _tce(stats, tce_state, **options):
    loss, aux = losses.tilted_ce_from_statistics(stats.classes, **options)
    return loss, tce_state, aux


def _stochastic_tce(stats, tce_state, **options):
    return losses.stochastic_tce_from_statistics(stats.classes, tce_state, **options)


def _weighted_ce(stats, tce_state, *, class_weights):
    loss, aux = losses.weighted_cross_entropy_from_statistics(
        stats.classes, class_weights=class_weights, image_pixels=stats.counts.get("image_pixels")
    )
    return loss, tce_state, aux


def _median_frequency_pixels(logits, labels, classes, *, class_weights):
    if isinstance(class_weights, str) and class_weights == "median_frequency":
        return {}, {"image_pixels": losses.class_image_pixels(logits, labels)}
    return {}, {}


def _focal(stats, tce_state, *, gamma):
    loss = _mean_over_valid(stats.classes, stats.sums["focal"])
    return loss, tce_state, _class_aux(stats.classes)


def _focal_sum(logits, labels, classes, *, gamma):
    # The part's sum of the focal losses: their mean times its valid pixel count.
    valid = jnp.maximum(jnp.sum(classes.count), 1).astype(jnp.float32)
    return {"focal": losses.softmax_focal_loss(logits, labels, gamma=gamma) * valid}, {}


def _recall(stats, tce_state):
    true_positives = stats.counts["true_positives"]
    loss, aux = losses.recall_cross_entropy_from_statistics(stats.classes, true_positives)
    return loss, tce_state, aux


def _true_positives(logits, labels, classes):
    return {}, {"true_positives": losses.class_true_positives(logits, labels)}


def _class_balanced(stats, tce_state, *, counts, beta):
    counts = parse_class_counts(counts)
    if isinstance(counts, str):  # the trainer replaces the name by the counts it reads
        raise ValueError(
            f"config.loss.cb_counts={counts!r} is counted in the training split, which only "
            "the trainer reads; here pass the counts: --config.loss.cb_counts=n_1,...,n_C."
        )
    num_classes = stats.classes.count.shape[-1]
    if counts.shape != (num_classes,):
        raise ValueError(
            f"config.loss.cb_counts has {counts.size} counts but the model has {num_classes} "
            f"classes: give one count per class (--config.loss.cb_counts=n_1,...,n_C)."
        )
    loss, aux = losses.class_balanced_cross_entropy_from_statistics(
        stats.classes, class_count=counts, beta=beta
    )
    return loss, tce_state, aux


def _dice(stats, tce_state, *, smooth, exponent):
    dice = losses.DiceStatistics(
        stats.sums["dice_intersection"], stats.sums["dice_prediction"], stats.classes.count
    )
    loss, _ = losses.dice_loss_from_statistics(dice, smooth=smooth)
    return loss, tce_state, _class_aux(stats.classes)


def _dice_sums(logits, labels, classes, *, smooth, exponent):
    dice = losses.dice_statistics(logits, labels, exponent=exponent)
    return {"dice_intersection": dice.intersection, "dice_prediction": dice.prediction}, {}


# ---------------------------------------------------------------------------------------------
# The registry: one entry per loss.


@dataclasses.dataclass(frozen=True)
class Objective:
    """One loss of the registry.

    Attributes:
      finish: the finisher `(S, tce_state, **options) -> (loss, tce_state, aux)`; None for a
        loss that is not a function of additive statistics (then `loss` is given).
      options: `config.loss -> dict`, the keyword arguments of `finish` (or `loss`); a `tau`
        among them is also the pixel-level tilt of the class statistics.
      extra: `(logits, labels, classes, **options) -> (sums, counts)`, the statistics of a part
        that `finish` needs beyond the class statistics `classes` of that part.
      tilted: whether the loss reads `loss.t` and `loss.tau` (the sweep and the report list
        these losses).
      loss: for a loss without `finish`, `(logits, labels, *, axis_name, **options) -> loss`.
    """

    finish: Callable | None = None
    options: Callable[[ml_collections.ConfigDict], dict] = lambda cfg: {}
    extra: Callable | None = None
    tilted: bool = False
    loss: Callable | None = None


def _fields(*names: str) -> Callable[[ml_collections.ConfigDict], dict]:
    """`config.loss -> {name: config.loss[name]}`, for losses whose arguments are config fields."""
    return lambda cfg: {name: cfg[name] for name in names}


OBJECTIVES: dict[str, Objective] = {
    "ce": Objective(_ce),
    "tce": Objective(_tce, _fields("t", "tau", "class_weighting"), tilted=True),
    "stochastic_tce": Objective(
        _stochastic_tce,
        _fields("t", "lam", "tau", "class_weighting", "estimator", "batch_loss"),
        tilted=True,
    ),
    "weighted_ce": Objective(
        _weighted_ce,
        lambda cfg: {"class_weights": parse_class_weights(cfg.class_weights)},
        _median_frequency_pixels,
    ),
    "focal": Objective(_focal, lambda cfg: {"gamma": float(cfg.focal_gamma)}, _focal_sum),
    "lovasz": Objective(loss=losses.lovasz_softmax),
    "recall": Objective(_recall, extra=_true_positives),
    "class_balanced": Objective(
        _class_balanced, lambda cfg: {"counts": cfg.cb_counts, "beta": float(cfg.cb_beta)}
    ),
    "ohem": Objective(
        options=lambda cfg: {"thresh": float(cfg.ohem_thresh), "min_kept": int(cfg.ohem_min_kept)},
        loss=losses.ohem_cross_entropy,
    ),
    "dice": Objective(
        _dice,
        lambda cfg: {"smooth": float(cfg.dice_smooth), "exponent": float(cfg.dice_exponent)},
        _dice_sums,
    ),
}
LOSSES = tuple(OBJECTIVES)
# The losses with a tilt `loss.t` (the sweep expands their t values; the report groups by it).
TILTED_LOSSES = tuple(name for name, o in OBJECTIVES.items() if o.tilted)


class Decomposition(NamedTuple):
    """The objective of `config.loss` as `finish(statistics(logits, labels), tce_state)`.

    `statistics(logits, labels, axis_name=None)` gives the `BatchStatistics` of a batch (reduced
    over `axis_name`, or of one part, to be summed with `sum_statistics`); `finish(S,
    tce_state)` returns what the loss function returns, `(loss, tce_state, aux)`, and is
    differentiable in `S.classes.loss_sum` and `S.sums`, through which the gradient flows.
    """

    statistics: Callable[..., BatchStatistics]
    finish: Callable[
        [BatchStatistics, losses.StochasticTCEState],
        tuple[jax.Array, losses.StochasticTCEState, dict],
    ]


def _checked_aux(name: str, aux: dict) -> dict:
    """The aux contract: the required keys are there; only `AUX_KEYS` are passed on."""
    missing = [k for k in REQUIRED_AUX_KEYS if k not in aux]
    if missing:
        raise KeyError(f"The objective {name!r} returns no {missing} in its aux (objectives.py).")
    return {k: aux[k] for k in AUX_KEYS if k in aux}


def _statistics_fn(entry: Objective, options: dict) -> Callable[..., BatchStatistics]:
    tau = float(options.get("tau", 0.0))

    def statistics(logits, labels, axis_name=None) -> BatchStatistics:
        classes = losses.class_statistics(logits, labels, tau=tau)
        sums, counts = (
            ({}, {}) if entry.extra is None else entry.extra(logits, labels, classes, **options)
        )
        stats = BatchStatistics(classes, sums, counts)
        if axis_name is None:
            return stats
        return sum_statistics(jax.tree.map(lambda x: x[None], stats), axis_name)[0]

    return statistics


def supports_accumulation(name: str) -> bool:
    """Whether loss `name` has an exact form over additive statistics (`grad_accum_steps`)."""
    return OBJECTIVES[name].finish is not None


def create_decomposition(config: ml_collections.ConfigDict) -> Decomposition:
    """The objective of `config.loss` as a function of additive batch statistics.

    `create_loss_fn(config)` is `finish(statistics(...))` of this on the whole batch.
    """
    name = config.loss.name
    entry = OBJECTIVES[name]
    if entry.finish is None:
        raise ValueError(
            f"loss.name={name!r} is not a function of additive statistics (it needs the whole "
            "batch at once: Lovász sorts its pixel errors, OHEM takes an order statistic of its "
            "probabilities), so it cannot be accumulated over micro-batches."
        )
    options = entry.options(config.loss)

    def finish(stats: BatchStatistics, tce_state):
        loss, tce_state, aux = entry.finish(stats, tce_state, **options)
        return loss, tce_state, _checked_aux(name, aux)

    return Decomposition(_statistics_fn(entry, options), finish)


def create_loss_fn(config: ml_collections.ConfigDict) -> LossFn:
    """`(logits, labels, tce_state, axis_name) -> (loss, tce_state, aux)` for config.loss."""
    name = config.loss.name
    entry = OBJECTIVES[name]
    if entry.finish is not None:
        decomposition = create_decomposition(config)

        def objective(logits, labels, tce_state, axis_name):
            stats = decomposition.statistics(logits, labels, axis_name)
            return decomposition.finish(stats, tce_state)

        return objective

    options = entry.options(config.loss)

    def pixel_objective(logits, labels, tce_state, axis_name):
        loss = entry.loss(logits, labels, axis_name=axis_name, **options)
        # What is logged: the per-class CE of the batch, without gradient.
        classes = losses.class_statistics(lax.stop_gradient(logits), labels, axis_name=axis_name)
        return loss, tce_state, _checked_aux(name, _class_aux(classes))

    return pixel_objective
