r"""Online hard example mining (OHEM) cross-entropy over the global batch (docs/maths.md).

With ``p_i = softmax(z_i)_{y_i} = e^{-l_i}`` the true-class probability of a valid pixel,
``q_(1) <= q_(2) <= ... <= q_(M)`` those of the ``M`` valid pixels of the batch in increasing
order and ``K = min_kept * B`` (``min_kept`` per image, ``B`` images in the global batch),

.. math::
  T = \max(\mathrm{thresh}, q_{(K+1)}), \quad q_{(M+1)} = +\infty, \qquad
  \mathrm{kept} = \{i \in V : p_i < T\}, \qquad
  \mathrm{OHEM} = \frac{1}{|\mathrm{kept}|} \sum_{i \in \mathrm{kept}} l_i,

mmsegmentation's ``OHEMPixelSampler`` (``thresh=0.7``, ``min_kept=100000``): every pixel
predicted with less than ``thresh`` confidence, and at least the ``K`` hardest pixels (fewer
when pixels tie with ``q_(K+1)``: ties at the threshold are all left out). ``T`` carries no
gradient.

``q_(K+1)`` is an order statistic of the global batch, found without gathering the pixels: a
bisection on the bit patterns of the float32 probabilities (non-negative floats order like their
bits), each round counting the pixels at or below a candidate and summing that count over the
devices. It is exactly the value a sort of the whole batch gives.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tce_jax.losses._statistics import _flat_pixels, _pixel_losses
from tce_jax.losses._validation import (
    AxisName,
    _check_ignore_index,
    _check_inputs,
    _check_scalar,
)
from tce_jax.losses.baselines import _mean_over_valid

__all__ = ["ohem_cross_entropy", "ohem_threshold_rounds"]

# The bits of float32 1.0, the largest probability; ONE_BITS + 1 stands for "no pixel" (+inf).
_ONE_BITS = int(np.float32(1.0).view(np.int32))


def _thresh_bits(thresh: float) -> int:
    return int(np.float32(thresh).view(np.int32))


def ohem_threshold_rounds(thresh: float) -> int:
    """The bisection rounds (one ``psum`` of an int32 each) of :func:`ohem_cross_entropy`:
    ``ceil(log2(bits(1.0) - bits(thresh) + 2))``, 23 for ``thresh = 0.7``, at most 30."""
    thresh = _check_scalar("thresh", thresh, allow_traced=False, low=0.0, high=1.0)
    return math.ceil(math.log2(_ONE_BITS - _thresh_bits(thresh) + 2))


def _threshold_bits(keys, rank, *, thresh: float, axis_name) -> jax.Array:
    """The smallest ``b`` in ``[bits(thresh), bits(1.0)]`` with more than ``rank`` keys
    ``<= b`` over the global batch, or ``bits(1.0) + 1`` if there is none: the bits of ``T``.

    ``keys``: ``[N]`` int32 bits of the probabilities, ``INT32_MAX`` for invalid pixels. The
    predicate "more than ``rank`` keys ``<= b``" grows with ``b``; the search keeps
    ``lo < answer <= hi`` (``lo`` starts below the range, ``hi`` at the "none" sentinel, where
    the count is never taken) and halves ``hi - lo`` each round.
    """

    def count_at_most(bound):
        count = jnp.sum(keys <= bound, dtype=jnp.int32)
        return count if axis_name is None else lax.psum(count, axis_name)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        active = hi - lo > 1  # once hi = lo + 1 the answer is found; mid would be lo
        enough = count_at_most(mid) > rank
        return jnp.where(active & ~enough, mid, lo), jnp.where(active & enough, mid, hi)

    bounds = (jnp.int32(_thresh_bits(thresh) - 1), jnp.int32(_ONE_BITS + 1))
    return lax.fori_loop(0, ohem_threshold_rounds(thresh), halve, bounds)[1]


def ohem_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""OHEM cross-entropy: the mean pixel CE over the pixels whose true-class probability is
    below ``T = max(thresh, q_(K+1))`` (the module docstring), ``K = min_kept * B``.

    The leading axis of ``labels`` indexes the images (a 1-D ``labels`` is one image), so
    ``B`` is ``labels.shape[0]`` times the devices of ``axis_name``: ``min_kept`` is a count
    per image, as mmsegmentation's (whose ``min_kept * images`` is per GPU, with a threshold
    per GPU; here one threshold for the global batch). When the batch has at most ``K`` valid
    pixels every one is kept (mmsegmentation's ``sort_prob[min(K, M - 1)]`` then drops the
    easiest). The loss is the mean over the kept pixels (mmsegmentation's default cross-entropy
    divides the kept pixels' sum by all the batch's pixels instead).

    The threshold costs ``ohem_threshold_rounds(thresh)`` rounds (23 for 0.7), each a
    comparison over the pixels and, with ``axis_name`` (or under ``jit`` over a mesh), one
    all-reduce of an int32: it equals a sort of the global batch, exactly, without gathering
    it. The loss is not a function of additive statistics (``T`` needs the whole batch), so it
    cannot be accumulated over micro-batches.

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[B, ...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)``
        are ignored.
      thresh: the confidence below which a pixel is always kept, in ``[0, 1]``.
      min_kept: the hardest pixels kept per image, an int ``>= 0``.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.
      return_aux: also return ``threshold`` (``T`` as float32, ``inf`` when every valid pixel
        is kept) and ``num_kept`` (int32).

    Returns:
      A float32 scalar; 0 with a zero gradient when no pixel is kept. Or ``(loss, aux)``.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    thresh = _check_scalar("thresh", thresh, allow_traced=False, low=0.0, high=1.0)
    if isinstance(min_kept, bool) or not isinstance(min_kept, int | np.integer) or min_kept < 0:
        raise ValueError(f"min_kept must be an int >= 0 (pixels per image), got {min_kept!r}.")
    z, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    pixel = _pixel_losses(z, safe_labels)
    prob = jnp.exp(-lax.stop_gradient(pixel)).astype(jnp.float32)
    keys = jnp.where(valid, lax.bitcast_convert_type(prob, jnp.int32), jnp.iinfo(jnp.int32).max)
    num_images = labels.shape[0] if labels.ndim >= 2 else 1
    if axis_name is not None:
        num_images *= lax.psum(1, axis_name)  # a Python int: the number of devices
    # No batch holds more than INT32_MAX pixels: a larger K keeps them all, as INT32_MAX does.
    rank = min(int(min_kept) * num_images, np.iinfo(np.int32).max)
    bits = _threshold_bits(keys, rank, thresh=thresh, axis_name=axis_name)
    kept = keys < bits
    loss = _mean_over_valid(pixel, kept, axis_name)
    if not return_aux:
        return loss
    num_kept = jnp.sum(kept, dtype=jnp.int32)
    finite = lax.bitcast_convert_type(jnp.minimum(bits, _ONE_BITS), jnp.float32)
    threshold = jnp.where(bits > _ONE_BITS, jnp.inf, finite)
    aux = {
        "threshold": threshold,
        "num_kept": num_kept if axis_name is None else lax.psum(num_kept, axis_name),
    }
    return loss, aux
