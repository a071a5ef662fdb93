"""tce_jax: tilted cross-entropy (TCE) for fair semantic segmentation, in JAX/Flax.

The loss functions live in :mod:`tce_jax.losses`, which depends on JAX alone and is re-exported
here::

    from tce_jax import tilted_ce
    loss = tilted_ce(logits, labels, t=1.0)

Training, data and models live in submodules (``tce_jax.train``, ``tce_jax.input_pipeline``,
``tce_jax.models``, ...), imported explicitly because they pull in TensorFlow and Flax.
"""

from tce_jax.losses import (
    CLASS_WEIGHT_SCHEMES,
    ClassStatistics,
    StochasticTCEState,
    class_balancing_weights,
    class_losses,
    class_sampling_probs,
    class_statistics,
    cross_entropy,
    lovasz_softmax,
    softmax_focal_loss,
    stochastic_tce,
    stochastic_tce_init,
    tilted_ce,
    weighted_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "CLASS_WEIGHT_SCHEMES",
    "ClassStatistics",
    "StochasticTCEState",
    "class_balancing_weights",
    "class_losses",
    "class_sampling_probs",
    "class_statistics",
    "cross_entropy",
    "lovasz_softmax",
    "softmax_focal_loss",
    "stochastic_tce",
    "stochastic_tce_init",
    "tilted_ce",
    "weighted_cross_entropy",
]
