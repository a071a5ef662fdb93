r"""Tilted cross-entropy (TCE) and its stochastic variant, as pure JAX functions.

Notation (docs/maths.md). Logits ``z`` of shape ``[..., C]`` (class axis last), integer
labels ``y`` of shape ``[...]``, an ignore label and an optional boolean ``where`` mask of shape
``[...]``. The valid pixels ``V`` are those with ``y != ignore_index``, ``0 <= y < C`` and
``where`` true. With the pixel loss ``l_i = logsumexp(z_i) - z_i[y_i]`` (float32 for any
logits dtype; float64 only for float64 logits under ``jax_enable_x64``),

.. math::

  n_c = |\{i \in V : y_i = c\}|, \qquad P = \{c : n_c > 0\}, \qquad
  L_c = \frac{1}{n_c} \sum_{i \in V, y_i = c} l_i
  \quad\text{or}\quad
  L_c = \frac{1}{\tau} \log \frac{1}{n_c} \sum_{i \in V, y_i = c} e^{\tau l_i},

  \mathrm{TCE}_t = \frac{1}{t} \log \sum_{c \in P} \pi_c e^{t L_c}, \qquad
  \mathrm{TCE}_0 = \sum_{c \in P} \pi_c L_c,

with a class prior ``pi`` over ``P`` (frequency, uniform or user weights). Its gradient is
``sum_c w_c grad L_c`` with the tilted class weights ``w = softmax_{c in P}(t L_c + log pi_c)``.

TCE is not an average of per-example or per-device values: every function here reduces the
per-class sufficient statistics (:class:`ClassStatistics`) over the whole batch before the tilt.

Parallelism:

* ``jax.jit`` over global arrays sharded on a ``Mesh``: call without ``axis_name``; XLA reduces
  the statistics across devices and the loss and gradient equal the single-device ones.
* ``jax.pmap(..., axis_name=name)``: pass ``axis_name=name``. Every replica returns the *global*
  loss. ``jax.grad`` inside the pmap then gives, on each replica, ``R`` times that replica's
  share of the global gradient (``R`` replicas; the transpose of ``psum`` is ``psum``), so the
  usual ``grads = jax.lax.pmean(grads, name)`` of the Flax examples yields the exact global
  gradient on every replica. Use ``pmean``, not ``psum`` (which would be ``R`` times too large).
  (Verified with jax 0.10.2; see ``tests/test_losses_parallel.py``.)
* ``jax.shard_map`` with ``axis_name``: with the default ``check_vma=True`` and replicated
  (``P()``) parameters, JAX inserts the reduction of the parameter gradient itself: the gradient
  is already the global one on every device (a further ``pmean`` is a no-op). With
  ``check_vma=False`` it behaves as ``pmap`` (``pmean`` the gradients).

Every loss that is a function of the class statistics is computed one way: its pixel-level
function (``tilted_ce``, ``stochastic_tce``, ``weighted_cross_entropy``) is
:func:`class_statistics` followed by its ``*_from_statistics`` form, which exact gradient
accumulation calls on the statistics of a batch assembled from parts.

Modules (everything public is re-exported here; import from ``tce_jax.losses``):

* ``tilted``: ``tilted_ce``, Stochastic TCE and tilted class-aware sampling probabilities;
* ``baselines``: ``cross_entropy`` and the imbalance baselines (class-weighted CE, softmax focal
  loss, Lovász-softmax);
* ``reweighted``: CE reweighted per class, the mean of ``w_{y_i} l_i``: the recall loss and
  class-balanced CE;
* ``ohem``: ``ohem_cross_entropy``, CE over the hard pixels (an exact global order statistic);
* ``dice``: ``dice_loss``, the soft Dice loss, and its additive statistics;
* ``_statistics``: per-pixel losses and the per-class statistics (and their GPU/TPU-safe
  reductions) that every loss reduces over the global batch;
* ``_validation``: the argument checks (trace time).
"""

# Each module lists its public names in its __all__: a new loss is exported by adding it there.
from tce_jax.losses import _statistics, baselines, dice, ohem, reweighted, tilted
from tce_jax.losses._statistics import *  # noqa: F403
from tce_jax.losses.baselines import *  # noqa: F403
from tce_jax.losses.dice import *  # noqa: F403
from tce_jax.losses.ohem import *  # noqa: F403
from tce_jax.losses.reweighted import *  # noqa: F403
from tce_jax.losses.tilted import *  # noqa: F403

__all__ = sorted(
    [
        *_statistics.__all__,
        *baselines.__all__,
        *dice.__all__,
        *ohem.__all__,
        *reweighted.__all__,
        *tilted.__all__,
    ]
)
