"""tce_jax: tilted cross-entropy (TCE) for fair semantic segmentation, in JAX/Flax.

The loss functions live in :mod:`tce_jax.losses`, which depends on JAX alone and is re-exported
here::

    from tce_jax import tilted_ce
    loss = tilted_ce(logits, labels, t=1.0)

Training, data and models live in submodules (``tce_jax.train``, ``tce_jax.input_pipeline``,
``tce_jax.models``, ...), imported explicitly because they pull in TensorFlow and Flax.
"""

from tce_jax import losses as _losses
from tce_jax.losses import *  # noqa: F403 (the public API is exactly losses.__all__)

__version__ = "0.1.0"
__all__ = list(_losses.__all__)
