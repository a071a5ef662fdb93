"""The training objective named by `config.loss`: one place that maps names to loss functions.

Every objective has the signature `(logits, labels, tce_state, axis_name) -> (loss, tce_state,
aux)`, so the train step treats them alike: `tce_state` is the Stochastic TCE state (passed
through unchanged by the other losses) and `aux` holds what is logged (`AUX_KEYS`; the
registry checks that every objective returns `class_loss` and `num_invalid`, and passes on
nothing else):

* `class_loss` (`[C]`): the per-class losses of the batch. For TCE, Stochastic TCE and CE the
  mean pixel cross-entropy of each class (`L_c`, also what TCE tilts), for weighted CE the
  same, and for the focal and Lovász losses also the per-class cross-entropy (a diagnostic:
  not what they minimise). 0 for classes absent from the batch.
* `class_weight` (`[C]`, where defined): the share of each class's mean loss in the
  gradient, `sum_c w_c grad L_c`: the tilted weights for TCE, the class frequencies of the batch
  for CE (what TCE gives at t = 0), `w_c n_c / sum w n` for weighted CE. Not logged for the
  focal and Lovász losses, whose gradients do not decompose over the class means.

The registry `OBJECTIVES` maps each `config.loss.name` to an `Objective` (its loss function
and, where it exists, its form over additive batch statistics); `LOSSES` lists its names (also
the `:variant` syntax of the configs). Adding a loss: the maths in `tce_jax.losses`, one
`Objective` here (and its config fields in `config_lib.get_base_config`, checked in
`config_lib.validate_config`). The names:

* `ce`: mean pixel cross-entropy (MCCE);
* `tce`, `stochastic_tce`: `loss.t`, `loss.tau`, `loss.class_weighting` (and `loss.lam`,
  `loss.estimator`, `loss.batch_loss`);
* `weighted_ce`: class-weighted CE; `loss.class_weights` is `'inverse_frequency'`,
  `'median_frequency'` or `'enet'` (weights from the global batch's class counts), or C
  comma-separated numbers (fixed weights);
* `focal`: softmax focal loss with `loss.focal_gamma`;
* `lovasz`: Lovász-softmax over the batch (classes present in the batch).

`create_decomposition` gives the same objectives (all but Lovász) as functions of additive
batch statistics, for exact gradient accumulation (`tce_jax.accumulation`). Config values are
checked once, by `config_lib.validate_config`, before any of this runs.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tce_jax import losses

LossFn = Callable[..., tuple[jax.Array, losses.StochasticTCEState, dict]]
# What an objective's aux may hold (the train step logs these), and what it must hold.
AUX_KEYS = ("objective", "class_loss", "class_weight", "num_invalid")
REQUIRED_AUX_KEYS = ("class_loss", "num_invalid")


def parse_class_weights(value) -> str | np.ndarray:
    """`config.loss.class_weights`: a scheme name, or numbers (a sequence or "1,2.5,...")."""
    if isinstance(value, str) and value in losses.CLASS_WEIGHT_SCHEMES:
        return value
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        vector = np.array([float(x) for x in items], np.float32)
    except (TypeError, ValueError):
        vector = None
    if vector is None or vector.size == 0 or not np.all(np.isfinite(vector)) or np.any(
        vector < 0
    ) or not np.any(vector > 0):
        raise ValueError(
            f"config.loss.class_weights={value!r} is invalid: expected one of "
            f"{losses.CLASS_WEIGHT_SCHEMES} or one non-negative number per class, "
            "comma-separated (e.g. '1,2,0.5')."
        )
    return vector


def _batch_class_aux(logits, labels, axis_name, *, with_weight: bool) -> dict:
    """Per-class CE of the (global) batch, for logging; no gradient flows through it."""
    stats = losses.class_statistics(jax.lax.stop_gradient(logits), labels, axis_name=axis_name)
    aux = {"class_loss": losses.class_losses(stats), "num_invalid": stats.num_invalid}
    if with_weight:
        count = stats.count.astype(aux["class_loss"].dtype)
        aux["class_weight"] = count / jnp.maximum(count.sum(), 1.0)
    return aux


# ---------------------------------------------------------------------------------------------
# The objectives as functions of additive batch statistics (exact gradient accumulation).


class BatchStatistics(NamedTuple):
    """Statistics of (part of) a batch that add up over parts, and determine the objective.

    Attributes:
      classes: the per-class statistics (`losses.ClassStatistics`); for `tau != 0` their sums
        add up only once brought to a common shift (`tce_jax.accumulation`).
      sums: float sums that carry gradients (the focal loss sum).
      counts: integer sums (the image pixels of `'median_frequency'`).
    """

    classes: losses.ClassStatistics
    sums: dict[str, jax.Array]
    counts: dict[str, jax.Array]


class Decomposition(NamedTuple):
    """The objective of `create_loss_fn` as `finish(S, tce_state)`, with `S` the
    `BatchStatistics` of the whole batch: the sum of `statistics(logits, labels)` over its parts.

    `finish` returns what the loss function returns, `(loss, tce_state, aux)`, and is
    differentiable in `S.classes.loss_sum` and `S.sums`, through which the gradient flows.
    """

    tau: float
    statistics: Callable[[jax.Array, jax.Array], BatchStatistics]
    finish: Callable[
        [BatchStatistics, losses.StochasticTCEState],
        tuple[jax.Array, losses.StochasticTCEState, dict],
    ]


def _mean_over_valid(classes: losses.ClassStatistics, total: jax.Array) -> jax.Array:
    return total / jnp.maximum(jnp.sum(classes.count), 1).astype(classes.loss_sum.dtype)


def _statistics_aux(classes: losses.ClassStatistics) -> dict:
    """What `_batch_class_aux` logs, from the statistics of the whole batch."""
    return {"class_loss": losses.class_losses(classes), "num_invalid": classes.num_invalid}


# ---------------------------------------------------------------------------------------------
# The registry: one entry per loss.
#
# `loss(cfg)` returns the loss function; `finish(cfg)`, where the loss has an exact form over
# additive statistics, returns `finish(S, tce_state)` of `Decomposition`, and `extra(cfg)` the
# sums and counts it needs beyond the class statistics, `(logits, labels, classes) -> (sums,
# counts)`.


@dataclasses.dataclass(frozen=True)
class Objective:
    loss: Callable[[ml_collections.ConfigDict], LossFn]
    finish: Callable[[ml_collections.ConfigDict], Callable] | None = None
    extra: Callable[[ml_collections.ConfigDict], Callable] | None = None
    tilted: bool = False  # reads loss.t and loss.tau


def _ce(cfg):
    def ce(logits, labels, tce_state, axis_name):
        loss = losses.cross_entropy(logits, labels, axis_name=axis_name)
        return loss, tce_state, _batch_class_aux(logits, labels, axis_name, with_weight=True)

    return ce


def _ce_finish(cfg):
    def finish(stats, tce_state):
        classes = stats.classes
        aux = _statistics_aux(classes)
        count = classes.count.astype(classes.loss_sum.dtype)
        aux["class_weight"] = _mean_over_valid(classes, count)
        return _mean_over_valid(classes, jnp.sum(classes.loss_sum)), tce_state, aux

    return finish


def _tce(cfg):
    def tce(logits, labels, tce_state, axis_name):
        loss, aux = losses.tilted_ce(
            logits, labels, t=cfg.t, tau=cfg.tau, class_weighting=cfg.class_weighting,
            axis_name=axis_name, return_aux=True,
        )
        return loss, tce_state, aux

    return tce


def _tce_finish(cfg):
    def finish(stats, tce_state):
        loss, aux = losses.tilted_ce_from_statistics(
            stats.classes, t=cfg.t, tau=cfg.tau, class_weighting=cfg.class_weighting
        )
        return loss, tce_state, aux

    return finish


def _stochastic_options(cfg) -> dict:
    return dict(
        t=cfg.t, lam=cfg.lam, tau=cfg.tau, class_weighting=cfg.class_weighting,
        estimator=cfg.estimator, batch_loss=cfg.batch_loss,
    )


def _stochastic_tce(cfg):
    def stochastic_tce(logits, labels, tce_state, axis_name):
        return losses.stochastic_tce(
            logits, labels, tce_state, axis_name=axis_name, **_stochastic_options(cfg)
        )

    return stochastic_tce


def _stochastic_tce_finish(cfg):
    def finish(stats, tce_state):
        return losses.stochastic_tce_from_statistics(
            stats.classes, tce_state, **_stochastic_options(cfg)
        )

    return finish


def _weighted_ce(cfg):
    class_weights = parse_class_weights(cfg.class_weights)

    def weighted_ce(logits, labels, tce_state, axis_name):
        loss, aux = losses.weighted_cross_entropy(
            logits, labels, class_weights=class_weights, axis_name=axis_name, return_aux=True
        )
        return loss, tce_state, aux

    return weighted_ce


def _weighted_ce_finish(cfg):
    class_weights = parse_class_weights(cfg.class_weights)

    def finish(stats, tce_state):
        loss, aux = losses.weighted_cross_entropy_from_statistics(
            stats.classes, class_weights=class_weights,
            image_pixels=stats.counts.get("image_pixels"),
        )
        return loss, tce_state, aux

    return finish


def _weighted_ce_extra(cfg):
    median = cfg.class_weights == "median_frequency"

    def extra(logits, labels, classes):
        if not median:
            return {}, {}
        return {}, {"image_pixels": losses.class_image_pixels(logits, labels)}

    return extra


def _focal(cfg):
    def focal(logits, labels, tce_state, axis_name):
        loss = losses.softmax_focal_loss(
            logits, labels, gamma=float(cfg.focal_gamma), axis_name=axis_name
        )
        return loss, tce_state, _batch_class_aux(logits, labels, axis_name, with_weight=False)

    return focal


def _focal_finish(cfg):
    def finish(stats, tce_state):
        aux = _statistics_aux(stats.classes)
        return _mean_over_valid(stats.classes, stats.sums["focal"]), tce_state, aux

    return finish


def _focal_extra(cfg):
    def extra(logits, labels, classes):
        # The local sum of the focal losses: their mean times the valid pixel count.
        valid = jnp.maximum(jnp.sum(classes.count), 1).astype(jnp.float32)
        mean = losses.softmax_focal_loss(logits, labels, gamma=float(cfg.focal_gamma))
        return {"focal": mean * valid}, {}

    return extra


def _lovasz(cfg):
    def lovasz(logits, labels, tce_state, axis_name):
        loss = losses.lovasz_softmax(logits, labels, axis_name=axis_name)
        return loss, tce_state, _batch_class_aux(logits, labels, axis_name, with_weight=False)

    return lovasz


OBJECTIVES: dict[str, Objective] = {
    "ce": Objective(_ce, _ce_finish),
    "tce": Objective(_tce, _tce_finish, tilted=True),
    "stochastic_tce": Objective(_stochastic_tce, _stochastic_tce_finish, tilted=True),
    "weighted_ce": Objective(_weighted_ce, _weighted_ce_finish, _weighted_ce_extra),
    "focal": Objective(_focal, _focal_finish, _focal_extra),
    # Sorts the pixel errors of the whole batch: no form over additive statistics.
    "lovasz": Objective(_lovasz),
}
LOSSES = tuple(OBJECTIVES)


def _checked_aux(name: str, aux: dict) -> dict:
    """The aux contract: the required keys are there; only `AUX_KEYS` are passed on."""
    missing = [k for k in REQUIRED_AUX_KEYS if k not in aux]
    if missing:
        raise KeyError(f"The objective {name!r} returns no {missing} in its aux (objectives.py).")
    return {k: aux[k] for k in AUX_KEYS if k in aux}


def create_loss_fn(config: ml_collections.ConfigDict) -> LossFn:
    """`(logits, labels, tce_state, axis_name) -> (loss, tce_state, aux)` for config.loss."""
    name = config.loss.name
    loss_fn = OBJECTIVES[name].loss(config.loss)

    def objective(logits, labels, tce_state, axis_name):
        loss, tce_state, aux = loss_fn(logits, labels, tce_state, axis_name)
        return loss, tce_state, _checked_aux(name, aux)

    return objective


def supports_accumulation(name: str) -> bool:
    """Whether loss `name` has an exact form over additive statistics (`grad_accum_steps`)."""
    return OBJECTIVES[name].finish is not None


def create_decomposition(config: ml_collections.ConfigDict) -> Decomposition:
    """The objective of `config.loss` as a function of additive batch statistics.

    Equals `create_loss_fn(config)` on the same (global) batch, loss, gradient and state.
    """
    cfg = config.loss
    entry = OBJECTIVES[cfg.name]
    if entry.finish is None:
        raise ValueError(
            f"loss.name={cfg.name!r} is not a function of additive statistics (the Lovász "
            "loss sorts the pixel errors of the whole batch), so it cannot be accumulated "
            "over micro-batches."
        )
    tau = float(cfg.tau) if entry.tilted else 0.0
    extra = entry.extra(cfg) if entry.extra is not None else None
    finish = entry.finish(cfg)

    def statistics(logits, labels) -> BatchStatistics:
        classes = losses.class_statistics(logits, labels, tau=tau)
        sums, counts = extra(logits, labels, classes) if extra is not None else ({}, {})
        return BatchStatistics(classes, sums, counts)

    def finish_checked(stats: BatchStatistics, tce_state):
        loss, tce_state, aux = finish(stats, tce_state)
        return loss, tce_state, _checked_aux(cfg.name, aux)

    return Decomposition(tau, statistics, finish_checked)
