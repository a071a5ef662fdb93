"""The training objective named by `config.loss`: one place that maps names to loss functions.

Every objective has the signature `(logits, labels, tce_state, axis_name) -> (loss, tce_state,
aux)`, so the train step treats them alike: `tce_state` is the Stochastic TCE state (passed
through unchanged by the other losses) and `aux` holds what is logged:

* `class_loss` (`[C]`): the per-class losses of the batch. For TCE, Stochastic TCE and CE the
  mean pixel cross-entropy of each class (`L_c`, also what TCE tilts), for weighted CE the
  same, and for the focal and Lovász losses also the per-class cross-entropy (a diagnostic:
  not what they minimise). 0 for classes absent from the batch.
* `class_weight` (`[C]`, where defined): the share of each class's mean loss in the
  gradient, `sum_c w_c grad L_c`: the tilted weights for TCE, the class frequencies of the batch
  for CE (what TCE gives at t = 0), `w_c n_c / sum w n` for weighted CE. Not logged for the
  focal and Lovász losses, whose gradients do not decompose over the class means.

Names (`LOSSES`, also the `:variant` syntax of the configs):

* `ce`: mean pixel cross-entropy (MCCE);
* `tce`, `stochastic_tce`: `loss.t`, `loss.tau`, `loss.class_weighting` (and `loss.lam`,
  `loss.estimator`, `loss.batch_loss`);
* `weighted_ce`: class-weighted CE; `loss.class_weights` is `'inverse_frequency'`,
  `'median_frequency'` or `'enet'` (weights from the global batch's class counts), or C
  comma-separated numbers (fixed weights);
* `focal`: softmax focal loss with `loss.focal_gamma`;
* `lovasz`: Lovász-softmax over the batch (classes present in the batch).

The baselines' fields are optional in configs: absent, they take the defaults below.

`create_decomposition` writes the same objectives (all but Lovász) as functions of additive
batch statistics, for exact gradient accumulation (`tce_jax.accumulation`).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tce_jax import losses

LossFn = Callable[..., tuple[jax.Array, losses.StochasticTCEState, dict]]

LOSSES = ("ce", "tce", "stochastic_tce", "weighted_ce", "focal", "lovasz")

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


def _focal_gamma(config_loss) -> float:
    gamma = config_loss.focal_gamma
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not gamma >= 0:
        raise ValueError(
            f"config.loss.focal_gamma={gamma!r} is invalid: expected a number >= 0."
        )
    return float(gamma)


def _batch_class_aux(logits, labels, axis_name, *, with_weight: bool) -> dict:
    """Per-class CE of the (global) batch, for logging; no gradient flows through it."""
    stats = losses.class_statistics(jax.lax.stop_gradient(logits), labels, axis_name=axis_name)
    aux = {"class_loss": losses.class_losses(stats), "num_invalid": stats.num_invalid}
    if with_weight:
        count = stats.count.astype(aux["class_loss"].dtype)
        aux["class_weight"] = count / jax.numpy.maximum(count.sum(), 1.0)
    return aux


def create_loss_fn(config: ml_collections.ConfigDict) -> LossFn:
    """`(logits, labels, tce_state, axis_name) -> (loss, tce_state, aux)` for config.loss."""
    cfg = config.loss
    if cfg.name == "ce":

        def ce(logits, labels, tce_state, axis_name):
            loss = losses.cross_entropy(logits, labels, axis_name=axis_name)
            return loss, tce_state, _batch_class_aux(logits, labels, axis_name, with_weight=True)

        return ce
    if cfg.name == "weighted_ce":
        class_weights = parse_class_weights(cfg.class_weights)

        def weighted_ce(logits, labels, tce_state, axis_name):
            loss, aux = losses.weighted_cross_entropy(
                logits, labels, class_weights=class_weights, axis_name=axis_name,
                return_aux=True,
            )
            aux = {k: aux[k] for k in ("class_loss", "class_weight", "num_invalid")}
            return loss, tce_state, aux

        return weighted_ce
    if cfg.name == "focal":
        gamma = _focal_gamma(cfg)

        def focal(logits, labels, tce_state, axis_name):
            loss = losses.softmax_focal_loss(logits, labels, gamma=gamma, axis_name=axis_name)
            return loss, tce_state, _batch_class_aux(logits, labels, axis_name, with_weight=False)

        return focal
    if cfg.name == "lovasz":

        def lovasz(logits, labels, tce_state, axis_name):
            loss = losses.lovasz_softmax(logits, labels, axis_name=axis_name)
            return loss, tce_state, _batch_class_aux(logits, labels, axis_name, with_weight=False)

        return lovasz
    common = dict(t=cfg.t, tau=cfg.tau, class_weighting=cfg.class_weighting)
    if cfg.name == "tce":

        def tce(logits, labels, tce_state, axis_name):
            loss, aux = losses.tilted_ce(
                logits, labels, axis_name=axis_name, return_aux=True, **common
            )
            return loss, tce_state, aux

        return tce

    def stochastic(logits, labels, tce_state, axis_name):
        return losses.stochastic_tce(
            logits, labels, tce_state, lam=cfg.lam, estimator=cfg.estimator,
            batch_loss=cfg.batch_loss, axis_name=axis_name, **common
        )

    return stochastic


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


def create_decomposition(config: ml_collections.ConfigDict) -> Decomposition:
    """The objective of `config.loss` as a function of additive batch statistics.

    Equals `create_loss_fn(config)` on the same (global) batch, loss, gradient and state. The
    Lovász loss sorts the errors of the whole batch and has no such form.
    """
    cfg = config.loss
    if cfg.name == "lovasz":
        raise ValueError(
            "loss.name='lovasz' sorts the pixel errors of the whole batch: it is not a function "
            "of additive statistics, so it cannot be accumulated over micro-batches."
        )
    tau = float(cfg.tau) if cfg.name in ("tce", "stochastic_tce") else 0.0
    gamma = _focal_gamma(cfg) if cfg.name == "focal" else None
    class_weights = parse_class_weights(cfg.class_weights) if cfg.name == "weighted_ce" else None
    median = isinstance(class_weights, str) and class_weights == "median_frequency"

    def statistics(logits, labels) -> BatchStatistics:
        classes = losses.class_statistics(logits, labels, tau=tau)
        sums, counts = {}, {}
        if gamma is not None:
            # The local sum of the focal losses: their mean times the valid pixel count.
            valid = jnp.maximum(jnp.sum(classes.count), 1).astype(jnp.float32)
            sums["focal"] = losses.softmax_focal_loss(logits, labels, gamma=gamma) * valid
        if median:
            counts["image_pixels"] = losses.class_image_pixels(logits, labels)
        return BatchStatistics(classes, sums, counts)

    def finish(stats: BatchStatistics, tce_state):
        classes = stats.classes
        if cfg.name == "tce":
            loss, aux = losses.tilted_ce_from_statistics(
                classes, t=cfg.t, tau=tau, class_weighting=cfg.class_weighting
            )
            return loss, tce_state, aux
        if cfg.name == "stochastic_tce":
            return losses.stochastic_tce_from_statistics(
                classes, tce_state, t=cfg.t, lam=cfg.lam, tau=tau,
                class_weighting=cfg.class_weighting, estimator=cfg.estimator,
                batch_loss=cfg.batch_loss,
            )
        if cfg.name == "weighted_ce":
            loss, aux = losses.weighted_cross_entropy_from_statistics(
                classes, class_weights=class_weights, image_pixels=stats.counts.get("image_pixels")
            )
            aux = {k: aux[k] for k in ("class_loss", "class_weight", "num_invalid")}
            return loss, tce_state, aux
        # ce and focal: means over the valid pixels.
        valid = jnp.maximum(jnp.sum(classes.count), 1).astype(classes.loss_sum.dtype)
        aux = {"class_loss": losses.class_losses(classes), "num_invalid": classes.num_invalid}
        if cfg.name == "focal":
            return stats.sums["focal"] / valid, tce_state, aux
        aux["class_weight"] = classes.count.astype(valid.dtype) / valid
        return jnp.sum(classes.loss_sum) / valid, tce_state, aux

    return Decomposition(tau, statistics, finish)
