"""Per-pixel losses and the per-class statistics every loss reduces over the global batch."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tce_jax.losses._validation import (
    AxisName,
    _check_ignore_index,
    _check_inputs,
    _check_scalar,
)

__all__ = [
    "ClassStatistics",
    "class_losses",
    "class_statistics",
]


class ClassStatistics(NamedTuple):
    """Per-class sufficient statistics of the pixel losses (a pytree of arrays).

    Sums over pixels combine by addition (``tau == 0``) or by a shifted addition
    (``tau != 0``), so the statistics of a global batch can be assembled from per-device parts.

    Attributes:
      loss_sum: ``[C]`` float32 (float64 for float64 logits). For ``tau == 0`` the sum of the
        pixel losses of each class, ``S_c = sum_{i in V, y_i = c} l_i``; for ``tau != 0`` the
        shifted exponential sum
        ``S_c = sum_{i in V, y_i = c} exp(tau l_i - shift_c)``. Zero for absent classes.
      count: ``[C]`` int32 number of valid pixels of each class, ``n_c``.
      shift: ``[C]`` float32 stabilising shift ``shift_c = max_{y_i = c} tau l_i`` (under
        ``stop_gradient``); zero for ``tau == 0`` and for absent classes.
      num_invalid: int32 scalar, the pixels (among ``where``) whose label is neither
        ``ignore_index`` nor in ``[0, C)``. They are ignored by the loss; a non-zero value usually
        means a label-map bug.
    """

    loss_sum: jax.Array
    count: jax.Array
    shift: jax.Array
    num_invalid: jax.Array


# ----------------------------------------------------------------------------------------------
# Per-pixel losses and per-class statistics.


def _pixel_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``[N, C]`` logits (any float dtype), ``[N]`` labels in ``[0, C)`` -> ``[N]`` CE.

    Computed in float32 at least (bfloat16/float16 logits are upcast; float64 stays float64).
    ``logsumexp - z[y]``: the values of optax's integer-label cross-entropy, whose gradient
    takes seconds to compile on CPU (XLA constant-folds a scatter); this one a fraction of that.
    """
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return jax.nn.logsumexp(z, axis=-1) - _label_logits(z, labels)


def _label_logits(z: jax.Array, labels: jax.Array) -> jax.Array:
    """``[N]`` logits ``z_{i, y_i}``. The gradient of a gather is a scatter-add into ``[N, C]``:
    kept on CPU (where the gather is fastest), replaced by a fused compare-and-reduce over the
    class axis on GPU and TPU, whose gradient is a select (no scatter at all)."""
    return lax.platform_dependent(z, labels, cpu=_gather_label_logits, default=_select_label_logits)


def _gather_label_logits(z, labels):
    return jnp.take_along_axis(z, labels[:, None], axis=-1, mode="promise_in_bounds")[:, 0]


def _select_label_logits(z, labels):
    return jnp.sum(jnp.where(_class_mask(labels, z.shape[-1]), z, 0), axis=-1)


def _flat_pixels(logits, labels, where, ignore_index):
    """Flattens the pixels; returns ``(z [N, C], labels [N] in [0, C), valid [N], invalid [N])``.

    ``invalid`` marks the pixels (among ``where``) whose label is neither the ignore label nor in
    ``[0, C)``.
    """
    num_classes = logits.shape[-1]
    z = logits.reshape(-1, num_classes)
    y = labels.reshape(-1)
    if y.dtype.itemsize < 8:
        # Wider types exist only under jax_enable_x64; keep them, or a cast could wrap an
        # out-of-range label into [0, C).
        y = y.astype(jnp.int32)
    in_range = (y >= 0) & (y < num_classes)
    considered = jnp.ones(y.shape, bool) if where is None else where.reshape(-1)
    if ignore_index is not None:
        considered_labelled = considered & (y != ignore_index)
    else:
        considered_labelled = considered
    valid = considered_labelled & in_range
    invalid = considered_labelled & ~in_range
    # Invalid pixels read the logit of class 0: finite, and their loss is never used.
    safe_labels = jnp.where(valid, y, 0).astype(jnp.int32)
    return z, safe_labels, valid, invalid


# Per-class reductions. Every sum of pixel values into the C class bins goes through
# _per_class_sum (and the one max through _per_class_max), which pick their form per backend:
#
# * CPU: jax.ops.segment_sum / segment_max (a scatter), as fast as plain cross-entropy there.
# * GPU, TPU (every other backend): a compare-and-reduce, sum_i where(s_i == c, v_i, 0), that XLA
#   fuses into one reduction without materialising the [N, C] mask. On NVIDIA GPUs jaxlib
#   0.10.2 to 0.11.0 compile a floating-point scatter-add to a compare-and-swap loop, hundreds
#   to thousands of times slower when every pixel lands in one of a few bins (openxla/xla issue
#   46225, jax-ml/jax issue 38806), and few-bin scatters are slow on TPU as well. Its gradient
#   is the same kind of fused compare-and-reduce, so the backward pass has no scatter either.
#
# lax.platform_dependent lowers only the branch of the platform being compiled for (both under
# jit and jax.export), so neither backend pays for the other's form; tests/test_lowering.py
# checks the GPU and TPU lowerings from a CPU machine.


def _per_class_sum(values: jax.Array, segments: jax.Array, num_classes: int) -> jax.Array:
    """``[num_classes]`` sums ``out_c = sum_{i: segments_i = c} values_i``.

    ``values`` ``[N]`` (float or integer), ``segments`` ``[N]`` int32; segments outside
    ``[0, num_classes)`` are dropped (and get a zero gradient).
    """
    return lax.platform_dependent(
        values,
        segments,
        cpu=functools.partial(_segment_sum_form, num_classes=num_classes),
        default=functools.partial(_compare_sum_form, num_classes=num_classes),
    )


def _per_class_max(values: jax.Array, segments: jax.Array, num_classes: int) -> jax.Array:
    """``[num_classes]`` maxima of float ``values`` ``[N]`` by segment, ``-inf`` for empty
    segments; segments outside ``[0, num_classes)`` are dropped. Not differentiable: pass values
    under ``stop_gradient``."""
    return lax.platform_dependent(
        values,
        segments,
        cpu=functools.partial(_segment_max_form, num_classes=num_classes),
        default=functools.partial(_compare_max_form, num_classes=num_classes),
    )


def _segment_sum_form(values, segments, *, num_classes):
    return jax.ops.segment_sum(values, segments, num_segments=num_classes)


def _segment_max_form(values, segments, *, num_classes):
    return jax.ops.segment_max(values, segments, num_segments=num_classes)


def _class_mask(segments, num_classes):
    """``[N, C]`` bool ``segments_i == c``; fused into its consumer, never materialised."""
    return segments[:, None] == jnp.arange(num_classes, dtype=segments.dtype)


def _compare_max_form(values, segments, *, num_classes):
    masked = jnp.where(_class_mask(segments, num_classes), values[:, None], -jnp.inf)
    return jnp.max(masked, axis=0, initial=-jnp.inf)


def _compare_sum_form(values, segments, *, num_classes):
    # Plain autodiff is scatter-free here: the transpose of this select-and-reduce is a
    # broadcast-select-reduce over the class axis (grad_i = sum_c [s_i == c] g_c), which XLA
    # fuses like the forward. A jax.custom_vjp with a gather (g[s_i]) would read less, but
    # would forbid forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian) of every loss.
    mask = _class_mask(segments, num_classes)
    return jnp.sum(jnp.where(mask, values[:, None], 0), axis=0, dtype=values.dtype)


def _local_statistics(logits, labels, *, tau, ignore_index, where) -> ClassStatistics:
    num_classes = logits.shape[-1]
    z, safe_labels, valid, invalid = _flat_pixels(logits, labels, where, ignore_index)
    losses = _pixel_losses(z, safe_labels)
    # Invalid pixels go to segment C, which the per-class reductions drop (out of range); their
    # losses therefore get an exactly zero cotangent.
    segments = jnp.where(valid, safe_labels, num_classes)
    count = _per_class_sum(jnp.ones_like(segments), segments, num_classes)
    num_invalid = jnp.sum(invalid, dtype=jnp.int32)
    if tau == 0:
        loss_sum = _per_class_sum(losses, segments, num_classes)
        shift = jnp.zeros((num_classes,), losses.dtype)
    else:
        tilted = jnp.where(valid, tau * losses, 0.0)
        shift = _per_class_max(lax.stop_gradient(tilted), segments, num_classes)
        shift = jnp.where(count > 0, shift, 0.0)  # the max is -inf for absent classes
        # The where keeps exp finite for invalid pixels, whose cotangent is zero (else 0 * inf).
        exponent = jnp.where(valid, tilted - shift[safe_labels], 0.0)
        loss_sum = _per_class_sum(jnp.exp(exponent), segments, num_classes)
    return ClassStatistics(loss_sum, count, shift, num_invalid)


def _reduce_statistics(stats: ClassStatistics, *, tau, axis_name) -> ClassStatistics:
    """Sums the statistics over ``axis_name``, rescaling to a common shift when ``tau != 0``."""
    count = lax.psum(stats.count, axis_name)
    num_invalid = lax.psum(stats.num_invalid, axis_name)
    if tau == 0:
        return ClassStatistics(lax.psum(stats.loss_sum, axis_name), count, stats.shift, num_invalid)
    local_present = stats.count > 0
    local_shift = jnp.where(local_present, lax.stop_gradient(stats.shift), -jnp.inf)
    global_shift = lax.stop_gradient(lax.pmax(local_shift, axis_name))
    # A locally present class is globally present, so global_shift is finite where it is used.
    scale = jnp.where(
        local_present, jnp.exp(jnp.where(local_present, local_shift - global_shift, 0.0)), 0.0
    )
    loss_sum = lax.psum(stats.loss_sum * scale, axis_name)
    shift = jnp.where(count > 0, global_shift, 0.0)
    return ClassStatistics(loss_sum, count, shift, num_invalid)


def class_statistics(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    tau: float = 0.0,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> ClassStatistics:
    r"""Per-class sufficient statistics of the pixel cross-entropy over the global batch.

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any floating dtype (the loss is
        computed in float32).
      labels: ``[...]`` integer class ids. Pixels equal to ``ignore_index``, or outside
        ``[0, C)``, or masked out by ``where`` are not valid; out-of-range labels are counted in
        ``num_invalid``.
      tau: pixel-level tilt (a Python number). ``0`` gives the plain sums of pixel losses; else
        shifted sums of ``exp(tau l_i)``.
      ignore_index: the ignore label, or ``None`` for none.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: the ``pmap``/``shard_map`` axis name(s) to reduce over; ``None`` under ``jit``
        or on one device.

    Returns:
      A :class:`ClassStatistics` of the whole (global) batch, identical on every replica.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    tau = _check_scalar("tau", tau, allow_traced=False)
    ignore_index = _check_ignore_index(ignore_index)
    return _statistics(
        logits, labels, tau=tau, ignore_index=ignore_index, where=where, axis_name=axis_name
    )


def _statistics(logits, labels, *, tau, ignore_index, where, axis_name) -> ClassStatistics:
    stats = _local_statistics(logits, labels, tau=tau, ignore_index=ignore_index, where=where)
    if axis_name is not None:
        stats = _reduce_statistics(stats, tau=tau, axis_name=axis_name)
    return stats


def class_losses(stats: ClassStatistics, *, tau: float = 0.0) -> jax.Array:
    r"""Per-class losses ``L_c`` from the statistics; 0 for absent classes.

    .. math::
      L_c = S_c / n_c \quad (\tau = 0), \qquad
      L_c = (\mathrm{shift}_c + \log(S_c / n_c)) / \tau \quad (\tau \neq 0).

    Args:
      stats: the output of :func:`class_statistics` (with the same ``tau``).
      tau: the pixel-level tilt used for ``stats``.

    Returns:
      ``[C]`` float32 class losses; gradients are finite (zero for absent classes).
    """
    tau = _check_scalar("tau", tau, allow_traced=False)
    return _class_losses(stats, tau=tau)


def _class_losses(stats: ClassStatistics, *, tau) -> jax.Array:
    present = stats.count > 0
    count = jnp.where(present, stats.count, 1).astype(stats.loss_sum.dtype)
    if tau == 0:
        return jnp.where(present, stats.loss_sum / count, 0.0)
    # S_c >= 1 for a present class (its largest term is exp(0)); the where keeps log finite.
    loss_sum = jnp.where(present, stats.loss_sum, 1.0)
    return jnp.where(present, (stats.shift + jnp.log(loss_sum / count)) / tau, 0.0)
