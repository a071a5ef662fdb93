r"""Cross-entropy reweighted per class: the recall loss and class-balanced CE (docs/maths.md).

Both are a mean over the valid pixels ``V`` of ``w_{y_i} l_i`` (``l_i`` the pixel cross-entropy),
so both are functions of the class statistics (``S_c``, ``n_c``; :func:`class_statistics`) and
their weights,

.. math::
  \mathrm{loss} = \frac{1}{|V|} \sum_{i \in V} w_{y_i} l_i = \frac{1}{|V|} \sum_c w_c S_c,

unlike :func:`weighted_cross_entropy`, which divides by the total weight ``sum_c w_c n_c``.
Their weights carry no gradient:

* the recall loss (Tian et al., ICRA 2022): ``w_c = 1 - TP_c / n_c``, one minus the recall of
  class ``c`` in the hard predictions of the (global) batch; ``TP_c``
  (:func:`class_true_positives`) adds up over parts, like ``n_c``;
* class-balanced CE (Cui et al., CVPR 2019): fixed weights from class counts and ``beta``
  (:func:`class_balanced_weights`), e.g. the training images that contain each class.

Same conventions as the other losses: class axis last, float32 inside, ``ignore_index`` and
labels outside ``[0, C)`` ignored, ``where`` mask, ``axis_name`` for the global batch under
pmap/shard_map (every replica returns the global loss; ``pmean`` the gradients).
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from tce_jax.losses._statistics import (
    ClassStatistics,
    _class_losses,
    _flat_pixels,
    _per_class_sum,
    class_statistics,
)
from tce_jax.losses._validation import (
    AxisName,
    _check_ignore_index,
    _check_inputs,
    _check_scalar,
    _check_weight_vector,
)

__all__ = [
    "class_balanced_cross_entropy",
    "class_balanced_weights",
    "class_balanced_cross_entropy_from_statistics",
    "class_true_positives",
    "recall_cross_entropy",
    "recall_cross_entropy_from_statistics",
]


def _pixel_weighted_mean(
    stats: ClassStatistics, class_weights: jax.typing.ArrayLike
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""``(1 / |V|) sum_c w_c S_c``, the mean over the valid pixels of ``w_{y_i} l_i``: the
    finisher of both losses. The weights are not normalised (contrast
    :func:`weighted_cross_entropy_from_statistics`).

    Args:
      stats: ``[C]`` statistics of the batch with ``tau = 0``.
      class_weights: ``[C]`` float weights ``w_c`` (under ``stop_gradient``).

    Returns:
      ``(loss, aux)``: a float32 scalar (0 with a zero gradient when no pixel is valid) and
      ``class_loss`` (``L_c``), ``class_count`` (``n_c``), ``class_weight`` (``w_c n_c /
      |V|``, the coefficient of ``grad L_c`` in the gradient) and ``num_invalid``.
    """
    dtype = stats.loss_sum.dtype
    weights = lax.stop_gradient(jnp.asarray(class_weights, dtype))
    valid = jnp.maximum(jnp.sum(stats.count), 1).astype(dtype)
    aux = {
        "class_loss": _class_losses(stats, tau=0.0),
        "class_count": stats.count,
        "class_weight": weights * stats.count.astype(dtype) / valid,
        "num_invalid": stats.num_invalid,
    }
    return jnp.sum(weights * stats.loss_sum) / valid, aux


# ----------------------------------------------------------------------------------------------
# The recall loss.


def class_true_positives(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """``[C]`` int32 ``TP_c``: the valid pixels of class ``c`` whose hard prediction is ``c``.

    The hard prediction is ``argmax_k z_{i,k}``, the first largest logit on ties (``jnp.argmax``).
    It adds up over parts of a batch; no ``axis_name``: ``psum`` the result.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    num_classes = logits.shape[-1]
    z, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    hit = valid & (jnp.argmax(z, axis=-1) == safe_labels)
    # Misses go to segment C, which the per-class sum drops.
    return _per_class_sum(
        jnp.ones_like(safe_labels), jnp.where(hit, safe_labels, num_classes), num_classes
    )


def recall_cross_entropy_from_statistics(
    stats: ClassStatistics, true_positives: jax.typing.ArrayLike
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`recall_cross_entropy` with ``return_aux=True``, from the batch statistics.

    Args:
      stats: ``[C]`` statistics of the batch with ``tau = 0``.
      true_positives: ``[C]`` ``TP_c`` of the same batch (:func:`class_true_positives`, summed
        over the parts).
    """
    present = stats.count > 0
    count = jnp.where(present, stats.count, 1)
    # FN_c / n_c = 1 - recall_c, from integers; 0 for classes absent from the batch.
    weights = jnp.where(present, (count - true_positives) / count, 0.0)
    return _pixel_weighted_mean(stats, weights)


def recall_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""Recall loss (Tian et al., "Striking the right balance", ICRA 2022).

    .. math::
      \mathrm{RL} = \frac{1}{|V|} \sum_{i \in V} (1 - R_{y_i})\, l_i, \qquad
      R_c = \frac{TP_c}{n_c} = \frac{TP_c}{TP_c + FN_c},

    with ``R_c`` the recall of class ``c`` in the hard predictions of the (global) batch,
    counted over its valid pixels (:func:`class_true_positives`), under ``stop_gradient``.
    A class predicted perfectly gets weight 0; a class absent from the batch has no pixel (its
    weight, 0, does not matter). Where the reference code differs (the ignore label, the
    denominator): docs/maths.md.

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored (neither in the recall nor in the mean).
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.
      return_aux: also return ``class_loss``, ``class_count``, ``class_weight`` (``w_c n_c /
        |V|``, the coefficient of ``grad L_c`` in the gradient) and ``num_invalid``.

    Returns:
      A float32 scalar (0 with a zero gradient when no pixel is valid), or ``(loss, aux)``.
    """
    stats = class_statistics(
        logits, labels, ignore_index=ignore_index, where=where, axis_name=axis_name
    )
    true_positives = class_true_positives(logits, labels, ignore_index=ignore_index, where=where)
    if axis_name is not None:
        true_positives = lax.psum(true_positives, axis_name)
    loss, aux = recall_cross_entropy_from_statistics(stats, true_positives)
    return (loss, aux) if return_aux else loss


# ----------------------------------------------------------------------------------------------
# Class-balanced cross-entropy.


def class_balanced_weights(class_count: jax.typing.ArrayLike, *, beta: float) -> jax.Array:
    r"""Class-balanced weights by the effective number of samples (Cui et al., CVPR 2019).

    .. math::
      E_c = \frac{1 - \beta^{n_c}}{1 - \beta}, \qquad
      w_c = \frac{|P|\, E_c^{-1}}{\sum_{c' \in P} E_{c'}^{-1}} \quad (c \in P), \qquad
      w_c = 0 \quad (n_c = 0),

    with ``P = {c: n_c > 0}``: weights that sum to ``|P|`` (``C`` when every class is counted,
    the reference's normalisation). ``beta = 0`` gives uniform weights, ``beta -> 1`` (and
    ``beta = 1``, ``E_c = n_c``) inverse-frequency weights. ``1 - beta^n`` is evaluated as
    ``-expm1(n log beta)``, exact for ``beta`` near 1 and large ``n``; but ``E_c`` saturates
    at ``1 / (1 - beta)`` once ``n_c >> 1 / (1 - beta)``: with pixel counts (1e7 to 1e9) every
    ``beta < 1 - 1e-8`` gives uniform weights, hence counts of images (docs/maths.md).

    Args:
      class_count: ``[C]`` non-negative counts ``n_c`` (any numeric dtype).
      beta: a Python number in ``[0, 1]``.

    Returns:
      ``[C]`` float32 weights (all 0 when no class is counted).
    """
    beta = _check_scalar("beta", beta, allow_traced=False, low=0.0, high=1.0)
    count = jnp.asarray(class_count, jnp.float32)
    if count.ndim != 1:
        raise ValueError(f"class_count must have shape [C], got {count.shape}.")
    present = count > 0
    safe_count = jnp.where(present, count, 1.0)
    if beta == 1.0:
        effective = safe_count
    else:
        log_beta = math.log(beta) if beta > 0 else -math.inf  # beta = 0: beta^n = 0
        effective = -jnp.expm1(safe_count * log_beta) / (1.0 - beta)
    inverse = jnp.where(present, 1.0 / effective, 0.0)
    total = jnp.sum(inverse)
    return inverse * jnp.sum(present) / jnp.where(total > 0, total, 1.0)


def class_balanced_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    class_count: jax.typing.ArrayLike,
    beta: float = 0.9999,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""Class-balanced softmax cross-entropy (Cui et al., CVPR 2019).

    .. math::
      \mathrm{CB} = \frac{1}{|V|} \sum_{i \in V} w_{y_i} l_i,

    with the fixed weights ``w = class_balanced_weights(class_count, beta=beta)``: pass counts
    of the training set (the trainer passes the training images that contain each class). The
    mean is over the valid pixels, as the reference's (``tf.losses.softmax_cross_entropy``
    divides by the samples of non-zero weight).

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      class_count: ``[C]`` non-negative counts, not all zero.
      beta: the effective-number parameter, in ``[0, 1]``.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.
      return_aux: also return ``class_loss``, ``class_count``, ``class_weight`` (``w_c n_c /
        |V|``, the coefficient of ``grad L_c`` in the gradient) and ``num_invalid``.

    Returns:
      A float32 scalar (0 with a zero gradient when no pixel is valid), or ``(loss, aux)``.
    """
    stats = class_statistics(
        logits, labels, ignore_index=ignore_index, where=where, axis_name=axis_name
    )
    loss, aux = class_balanced_cross_entropy_from_statistics(
        stats, class_count=class_count, beta=beta
    )
    return (loss, aux) if return_aux else loss


def class_balanced_cross_entropy_from_statistics(
    stats: ClassStatistics, *, class_count: jax.typing.ArrayLike, beta: float = 0.9999
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`class_balanced_cross_entropy` with ``return_aux=True``, from the batch statistics
    (``tau = 0``)."""
    count = _check_weight_vector("class_count", class_count, stats.count.shape[0])
    return _pixel_weighted_mean(stats, class_balanced_weights(count, beta=beta))
