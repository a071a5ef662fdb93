r"""Soft Dice loss over the global batch (Milletari et al., V-Net, 2016; docs/maths.md).

With ``p_i = softmax(z_i)``, the valid pixels ``V`` and ``y_{ic} = [y_i = c]``, per class

.. math::
  I_c = \sum_{i \in V} p_{ic} y_{ic}, \qquad P_c = \sum_{i \in V} p_{ic}^e, \qquad
  n_c = \sum_{i \in V} y_{ic}^e = |\{i \in V : y_i = c\}|,

  D_c = 1 - \frac{2 I_c + s}{P_c + n_c + s}, \qquad
  \mathrm{Dice} = \frac{1}{|K|} \sum_{c \in K} D_c,

with the smoothing ``s`` and exponent ``e`` of mmsegmentation's ``DiceLoss`` (defaults 1 and 2)
and ``K`` all ``C`` classes (mmsegmentation) or the classes present in the batch. The sums are
additive over pixels, so a batch's loss comes from the sums of its parts
(:func:`dice_loss_from_statistics`): exact under ``axis_name`` and under gradient accumulation.
Every per-class sum is a dense reduction over the pixels of ``[N, C]`` values: no scatter.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tce_jax.losses._statistics import _flat_pixels
from tce_jax.losses._validation import (
    AxisName,
    _check_choice,
    _check_ignore_index,
    _check_inputs,
    _check_scalar,
)

__all__ = [
    "DICE_CLASSES",
    "DiceStatistics",
    "dice_loss",
    "dice_loss_from_statistics",
    "dice_statistics",
]

DICE_CLASSES = ("all", "present")


class DiceStatistics(NamedTuple):
    """The additive per-class sums of the soft Dice loss (a pytree of ``[C]`` arrays).

    Attributes:
      intersection: ``I_c = sum_{i in V} p_{ic} [y_i = c]`` (float32).
      prediction: ``P_c = sum_{i in V} p_{ic}^e`` (float32).
      count: ``n_c``, the valid pixels of class ``c`` (int32).
    """

    intersection: jax.Array
    prediction: jax.Array
    count: jax.Array


def dice_statistics(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    exponent: float = 2.0,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> DiceStatistics:
    """The :class:`DiceStatistics` of a batch (of the global batch with ``axis_name``).

    Arguments as for :func:`dice_loss`. Statistics of parts add up (``jax.tree.map(jnp.add,
    ...)``) to those of the whole.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    exponent = _check_scalar("exponent", exponent, allow_traced=False, low=1.0)
    num_classes = logits.shape[-1]
    z, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    probs = jax.nn.softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)), axis=-1)
    target = (safe_labels[:, None] == jnp.arange(num_classes)) & valid[:, None]  # [N, C]
    # The inner where keeps p ** e (and its gradient) out of ignored pixels entirely.
    powered = jnp.where(valid[:, None], probs, 0.0) ** exponent
    stats = DiceStatistics(
        intersection=jnp.sum(jnp.where(target, probs, 0.0), axis=0),
        prediction=jnp.sum(powered, axis=0),
        count=jnp.sum(target, axis=0, dtype=jnp.int32),
    )
    return stats if axis_name is None else lax.psum(stats, axis_name)


def dice_loss_from_statistics(
    stats: DiceStatistics, *, smooth: float = 1.0, classes: str = "all"
) -> tuple[jax.Array, jax.Array]:
    """The soft Dice loss of a batch from its :class:`DiceStatistics`.

    Returns:
      ``(loss, class_dice_loss)``: the float32 scalar and the ``[C]`` per-class ``D_c`` (0 for a
      class whose denominator is 0, possible only with ``smooth = 0``).
    """
    smooth = _check_scalar("smooth", smooth, allow_traced=False, low=0.0)
    _check_choice("classes", classes, DICE_CLASSES)
    numerator = 2.0 * stats.intersection + smooth
    denominator = stats.prediction + stats.count.astype(stats.prediction.dtype) + smooth
    defined = denominator > 0
    per_class = jnp.where(defined, 1.0 - numerator / jnp.where(defined, denominator, 1.0), 0.0)
    if classes == "all":
        included = jnp.ones(per_class.shape, bool)
    else:
        included = stats.count > 0
    total = jnp.sum(jnp.where(included, per_class, 0.0))
    return total / jnp.maximum(jnp.sum(included), 1).astype(total.dtype), per_class


def dice_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    smooth: float = 1.0,
    exponent: float = 2.0,
    classes: str = "all",
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Soft Dice loss: ``1 - (2 I_c + s) / (P_c + n_c + s)`` per class, averaged over classes.

    Probabilities are the softmax of the logits; the sums run over the valid pixels of the whole
    (global) batch, as segmentation_models_pytorch's ``DiceLoss`` (``dims=(0, 2)``), not image
    by image as mmsegmentation 0.x's. Ignored pixels are left out of every sum (mmsegmentation
    0.x keeps their probabilities in ``P_c``). ``classes='all'`` averages over all ``C`` classes,
    as mmsegmentation does: a class absent from the batch contributes ``1 - s / (P_c + s)``,
    which penalises predicting it. ``classes='present'`` averages over the classes present in
    the batch (segmentation_models_pytorch zeroes absent classes but still divides by ``C``).

    With ``axis_name`` the sums are ``psum``-med; parallel conventions as for
    :func:`tilted_ce` (every replica returns the global loss; ``pmean`` the gradients).

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      smooth: ``s >= 0``, added to numerator and denominator (mmsegmentation: 1).
      exponent: ``e >= 1`` of the probabilities in the denominator (mmsegmentation: 2; 1 is
        the "naive" Dice of segmentation_models_pytorch).
      classes: ``'all'`` or ``'present'``.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.

    Returns:
      A float32 scalar in ``[0, 1]``; 0 with a zero gradient when no pixel is valid.
    """
    smooth = _check_scalar("smooth", smooth, allow_traced=False, low=0.0)
    _check_choice("classes", classes, DICE_CLASSES)
    stats = dice_statistics(
        logits,
        labels,
        exponent=exponent,
        ignore_index=ignore_index,
        where=where,
        axis_name=axis_name,
    )
    return dice_loss_from_statistics(stats, smooth=smooth, classes=classes)[0]
