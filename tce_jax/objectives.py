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
* `tce`, `stochastic_tce`: `loss.t`, `loss.tau`, `loss.class_weighting` (and `loss.lam`);
* `weighted_ce`: class-weighted CE; `loss.class_weights` is `'inverse_frequency'`,
  `'median_frequency'` or `'enet'` (weights from the global batch's class counts), or C
  comma-separated numbers (fixed weights);
* `focal`: softmax focal loss with `loss.focal_gamma`;
* `lovasz`: Lovász-softmax over the batch (classes present in the batch).

The baselines' fields are optional in configs: absent, they take the defaults below.
"""

from collections.abc import Callable

import jax
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
            logits, labels, tce_state, lam=cfg.lam, axis_name=axis_name, **common
        )

    return stochastic
