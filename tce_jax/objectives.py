"""The training objective named by `config.loss`: one place that maps names to loss functions.

Every objective has the signature `(logits, labels, tce_state, axis_name) -> (loss, tce_state,
aux)`, so the train step treats them alike: `tce_state` is the Stochastic TCE state (passed
through unchanged by the other losses) and `aux` holds what is logged (per-class losses and
tilted weights for TCE).
"""

from collections.abc import Callable

import jax
import ml_collections

from tce_jax import losses

LossFn = Callable[..., tuple[jax.Array, losses.StochasticTCEState, dict]]

LOSSES = ("ce", "tce", "stochastic_tce")


def create_loss_fn(config: ml_collections.ConfigDict) -> LossFn:
    """`(logits, labels, tce_state, axis_name) -> (loss, tce_state, aux)` for config.loss."""
    cfg = config.loss
    if cfg.name == "ce":

        def ce(logits, labels, tce_state, axis_name):
            return losses.cross_entropy(logits, labels, axis_name=axis_name), tce_state, {}

        return ce
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
