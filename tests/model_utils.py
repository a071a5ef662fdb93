"""Helpers shared by the model tests."""

import jax
import numpy as np


def random_variables(module, x, seed=0):
    """Variables of ``module`` for input ``x``, random in [0.7, 1.3] (positive variances),
    without compiling the initialisers (a jitted init of a small ResNet took 5 s to compile)."""
    rng = np.random.RandomState(seed)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
    return jax.tree.map(lambda a: 1 + 0.3 * rng.uniform(-1, 1, a.shape), abstract)
