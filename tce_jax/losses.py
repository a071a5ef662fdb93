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
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "CLASS_WEIGHT_SCHEMES",
    "ClassStatistics",
    "StochasticTCEState",
    "class_balancing_weights",
    "class_image_pixels",
    "class_losses",
    "class_sampling_probs",
    "class_statistics",
    "cross_entropy",
    "lovasz_softmax",
    "softmax_focal_loss",
    "stochastic_tce",
    "stochastic_tce_from_statistics",
    "stochastic_tce_init",
    "tilted_ce",
    "tilted_ce_from_statistics",
    "weighted_cross_entropy",
    "weighted_cross_entropy_from_statistics",
]

ClassWeighting = str | jax.typing.ArrayLike
AxisName = Any  # a hashable axis name or a tuple of them, as for jax.lax.psum

_WEIGHTINGS = ("frequency", "uniform")
# Stochastic TCE: how the running class losses average the batch ones, and what loss the batch
# takes (docs/maths.md).
ESTIMATORS = ("ema", "tilted")
BATCH_LOSSES = ("tilted", "ce")
# Above this value of max_c t (L_c - mean L) the tilted mean switches from the expm1 form
# (exact as t -> 0) to the max-shifted log-sum-exp form (no overflow for large |t|).
_EXPM1_LIMIT = 30.0


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


class StochasticTCEState(NamedTuple):
    """Running per-class estimates of Stochastic TCE (docs/maths.md); lives in the train state.

    Attributes:
      running_loss: ``[C]`` float32 running class losses ``R_c`` (meaningful where ``seen``).
      running_freq: ``[C]`` float32 running class prior ``f_c``: the running class frequency for
        ``'frequency'``, 1 for ``'uniform'``, the given vector otherwise; 0 for unseen classes.
      seen: ``[C]`` bool, whether a class has had a valid pixel in any batch so far.
      step: int32 scalar, the number of updates.
    """

    running_loss: jax.Array
    running_freq: jax.Array
    seen: jax.Array
    step: jax.Array


# ----------------------------------------------------------------------------------------------
# Validation (trace time).


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_scalar(
    name: str,
    value,
    *,
    allow_traced: bool = True,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
):
    """Checks a scalar hyper-parameter; returns a Python float, or the tracer unchanged."""
    if _is_traced(value):
        if not allow_traced:
            raise TypeError(
                f"{name} must be a concrete number (it selects which statistics are computed); "
                f"got a traced value. Pass a Python float, or mark {name} static in jax.jit."
            )
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
        return value
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(
            f"{name} must be a scalar, got shape {arr.shape}; for per-example values use jax.vmap."
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value)}.")
    v = float(arr)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}.")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and v > high
    if too_low or too_high:
        left = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {left}{low}, {high}], got {v}.")
    return v


def _check_ignore_index(ignore_index) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
        raise TypeError(
            f"ignore_index must be a Python int or None, got {ignore_index!r} "
            f"of type {type(ignore_index)}."
        )
    if not -(2**31) <= int(ignore_index) < 2**31:
        raise ValueError(f"ignore_index must fit in int32, got {ignore_index}.")
    return int(ignore_index)


def _check_inputs(logits, labels, where):
    """Checks dtypes and shapes; returns the inputs as jax arrays."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a class axis (the last one) of size >= 1, got shape "
            f"{logits.shape}; for binary problems use two logits per pixel."
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"logits must be floating point (float32, bfloat16, ...), got {logits.dtype}; "
            f"convert them with logits.astype(jnp.float32)."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class ids, got dtype {labels.dtype}; "
            f"pass them as e.g. labels.astype(jnp.int32) (one-hot labels are not supported)."
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {logits.shape[:-1]} (class axis last, "
            f"no class axis in labels), got {labels.shape}."
        )
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(
                f"where must be a boolean mask, got dtype {where.dtype}; use e.g. where=mask > 0."
            )
        if where.shape != labels.shape:
            raise ValueError(
                f"where must have the shape of labels, {labels.shape}, got {where.shape}."
            )
    return logits, labels, where


def _check_weight_vector(name: str, vec, num_classes: int) -> jax.Array:
    """A ``[C]`` vector of non-negative, finite weights, not all zero, as float32."""
    if not (_is_traced(vec) or isinstance(vec, jax.Array)):
        vec = np.asarray(vec)
        if not (np.issubdtype(vec.dtype, np.number) and vec.dtype != bool):
            raise TypeError(f"{name} must be a [C] array of class weights, got {vec!r}.")
    if jnp.shape(vec) != (num_classes,):
        raise ValueError(
            f"{name} has shape {jnp.shape(vec)} but the logits have C = {num_classes} classes; "
            f"pass one non-negative weight per class, shape ({num_classes},)."
        )
    if not _is_traced(vec):
        host = np.asarray(vec, dtype=np.float64)
        if not np.all(np.isfinite(host)) or np.any(host < 0) or not np.any(host > 0):
            raise ValueError(
                f"{name} must be finite, non-negative and not all zero, got {host}."
            )
    return jnp.asarray(vec, jnp.float32)


def _check_class_weighting(class_weighting, num_classes: int):
    """Returns 'frequency', 'uniform' or a float32 [C] vector."""
    if isinstance(class_weighting, str):
        if class_weighting not in _WEIGHTINGS:
            raise ValueError(
                f"class_weighting must be 'frequency', 'uniform' or a [C] array of non-negative "
                f"class weights, got {class_weighting!r}."
            )
        return class_weighting
    return _check_weight_vector("class_weighting", class_weighting, num_classes)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")


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
    return lax.platform_dependent(
        z, labels, cpu=_gather_label_logits, default=_select_label_logits
    )


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
    return _statistics(logits, labels, tau=tau, ignore_index=ignore_index, where=where,
                       axis_name=axis_name)


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


# ----------------------------------------------------------------------------------------------
# The tilt.


def _class_prior(count: jax.Array, class_weighting, dtype) -> jax.Array:
    """``[C]`` prior ``pi`` normalised over the present classes (zero elsewhere, or all zero)."""
    present = count > 0
    if isinstance(class_weighting, str):
        if class_weighting == "frequency":
            raw = count.astype(dtype)
        else:
            raw = present.astype(dtype)
    else:
        raw = jnp.where(present, class_weighting.astype(dtype), 0.0)
    return _normalise(raw)


def _normalise(raw: jax.Array) -> jax.Array:
    total = jnp.sum(raw)
    return raw / jnp.where(total > 0, total, 1.0)


def _tilted_weights(values: jax.Array, prior: jax.Array, t) -> jax.Array:
    """``softmax_c(t values_c + log prior_c)`` over ``prior_c > 0`` (prior unnormalised is fine).

    Zero outside the support, all zero when the support is empty.
    """
    support = prior > 0
    scores = jnp.where(support, t * values + jnp.log(jnp.where(support, prior, 1.0)), -jnp.inf)
    top = jnp.max(scores)
    top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    unnormalised = jnp.where(support, jnp.exp(scores - top), 0.0)
    total = jnp.sum(unnormalised)
    return unnormalised / jnp.where(total > 0, total, 1.0)


def _tilted_mean(values: jax.Array, prior: jax.Array, t) -> jax.Array:
    r"""``(1/t) log sum_c prior_c exp(t values_c)``; ``sum_c prior_c values_c`` at ``t = 0``.

    ``prior`` is normalised over its support ``prior_c > 0`` (or all zero: the result is 0).
    With the prior mean ``m`` and ``u_c = t (values_c - m)`` this is
    ``m + log(sum_c prior_c e^{u_c}) / t``. While ``max u`` is moderate the log is evaluated as
    ``log1p(sum_c prior_c expm1(u_c))``, which stays exact as ``t -> 0`` (no cancellation in
    ``1/t``); beyond, as a max-shifted log-sum-exp, which cannot overflow for any ``t``. Every
    branch is finite wherever it is not selected, so ``jnp.where`` passes no NaN gradient, and
    ``t`` may be traced.
    """
    t = jnp.asarray(t, values.dtype)
    support = prior > 0
    mean = jnp.sum(prior * values)
    u = t * jnp.where(support, values - mean, 0.0)
    # >= 0 on a non-empty support (Jensen). Under stop_gradient, as in jax.nn.logsumexp: the
    # shift cancels mathematically, and the gradient of max (a mask `u == max` divided by its
    # count) can be 0/0 when XLA recomputes `u` with different rounding.
    u_max = lax.stop_gradient(jnp.max(jnp.where(support, u, -jnp.inf)))
    small = u_max <= _EXPM1_LIMIT  # also true for an empty support (-inf)
    log_small = jnp.log1p(jnp.sum(prior * jnp.expm1(jnp.minimum(u, _EXPM1_LIMIT))))
    shift = jnp.where(small, 0.0, u_max)
    shifted_sum = jnp.sum(jnp.where(support, prior * jnp.exp(u - shift), 0.0))
    log_large = shift + jnp.log(jnp.where(small, 1.0, shifted_sum))
    log_moment = jnp.where(small, log_small, log_large)
    is_zero = t == 0
    return mean + jnp.where(is_zero, 0.0, log_moment / jnp.where(is_zero, 1.0, t))


# ----------------------------------------------------------------------------------------------
# Public losses.


def tilted_ce(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    t: float | jax.Array,
    tau: float = 0.0,
    class_weighting: ClassWeighting = "frequency",
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""Tilted cross-entropy: an exponentially tilted mean of the per-class losses.

    .. math::
      \mathrm{TCE}_t = \frac{1}{t} \log \sum_{c \in P} \pi_c \exp(t L_c), \qquad
      \mathrm{TCE}_0 = \sum_{c \in P} \pi_c L_c,

    over the classes ``P`` present (with a valid pixel) in the whole batch, with ``L_c`` the mean
    pixel cross-entropy of class ``c`` (or its tilted mean for ``tau != 0``, see
    :func:`class_losses`) and the prior ``pi`` chosen by ``class_weighting``. ``t = 0`` with
    ``'frequency'`` is the mean pixel cross-entropy; ``t -> +inf`` tends to the worst class loss,
    ``t -> -inf`` to the best; the value is non-decreasing in ``t``. The gradient is
    ``sum_c w_c grad L_c`` with ``w = softmax_{c in P}(t L_c + log pi_c)``.

    A batch without valid pixels gives 0 with a zero gradient. The pixel loss is float32 whatever
    the logits' dtype (float64 for float64 logits); the tilt is evaluated in log space (no raw
    ``exp(t L)``), finite for large ``|t|``.

    Under ``jax.pmap`` pass ``axis_name``: every replica returns the global loss, and the exact
    global parameter gradient is ``jax.lax.pmean(grads, axis_name)`` of the per-replica
    gradients (the usual Flax recipe; not ``psum``). Under ``jit`` with sharded global arrays,
    leave ``axis_name=None``. See the module docstring.

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities (class axis last), any float dtype.
      labels: ``[...]`` integer class ids, shape ``logits.shape[:-1]``.
      t: class-level tilt; a Python float or a (traced) scalar. ``t > 0`` emphasises the worst
        classes, ``t < 0`` the best.
      tau: pixel-level tilt inside each class (hierarchical TERM); a Python float, 0 for the
        mean. Small non-zero ``|tau|`` (below about 1e-3) loses float32 precision: use 0.
      class_weighting: the prior ``pi``: ``'frequency'`` (``n_c / sum_P n``), ``'uniform'``
        (``1/|P|``) or a ``[C]`` array of non-negative weights, renormalised over ``P``.
      ignore_index: label of the pixels to ignore, or ``None``. Labels outside ``[0, C)`` are
        ignored as well, and counted in ``aux['num_invalid']``.
      where: optional ``[...]`` boolean mask; pixels where it is false are ignored.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.
      return_aux: also return a dict of per-class diagnostics.

    Returns:
      A float32 scalar, or ``(loss, aux)`` with ``aux`` holding ``class_loss`` (``[C]``, 0 for
      absent classes), ``class_count`` (``[C]`` int32), ``class_weight`` (``[C]`` tilted weights
      ``w``, 0 for absent classes) and ``num_invalid`` (int32 scalar), all global.

    Examples:
      >>> import jax.numpy as jnp
      >>> from tce_jax.losses import tilted_ce, cross_entropy
      >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0],
      ...                     [3.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
      >>> labels = jnp.array([0, 1, 0, 2])
      >>> print(f"{tilted_ce(logits, labels, t=0.0):.4f}")  # the mean pixel CE
      0.6870
      >>> print(f"{cross_entropy(logits, labels):.4f}")
      0.6870
      >>> print(f"{tilted_ce(logits, labels, t=1.0):.4f}")  # leans towards the worst class
      0.9685
      >>> loss, aux = tilted_ce(logits, labels, t=1.0, return_aux=True)
      >>> print(aux["class_count"], jnp.round(aux["class_weight"], 3))
      [2 1 1] [0.224 0.165 0.611]
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    t = _check_scalar("t", t)
    tau = _check_scalar("tau", tau, allow_traced=False)
    ignore_index = _check_ignore_index(ignore_index)
    weighting = _check_class_weighting(class_weighting, logits.shape[-1])
    stats = _statistics(
        logits, labels, tau=tau, ignore_index=ignore_index, where=where, axis_name=axis_name
    )
    losses = _class_losses(stats, tau=tau)
    prior = _class_prior(stats.count, weighting, losses.dtype)
    loss = _tilted_mean(losses, prior, t)
    if not return_aux:
        return loss
    aux = {
        "class_loss": losses,
        "class_count": stats.count,
        "class_weight": _tilted_weights(losses, prior, t),
        "num_invalid": stats.num_invalid,
    }
    return loss, aux


def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Multi-class cross-entropy (MCCE): the mean pixel loss over the valid pixels.

    .. math::
      \mathrm{MCCE} = \frac{1}{|V|} \sum_{i \in V} \big(\mathrm{logsumexp}(z_i) - z_{i, y_i}\big)

    0 (with a zero gradient) when no pixel is valid. With ``axis_name`` the sums are taken over
    the global batch; parallel conventions as for :func:`tilted_ce` (``pmean`` the gradients).

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.

    Returns:
      A float32 scalar.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    z, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    total = jnp.sum(jnp.where(valid, _pixel_losses(z, safe_labels), 0.0))
    count = jnp.sum(valid, dtype=jnp.int32)
    if axis_name is not None:
        total = lax.psum(total, axis_name)
        count = lax.psum(count, axis_name)
    return total / jnp.maximum(count, 1).astype(total.dtype)


# ----------------------------------------------------------------------------------------------
# Stochastic TCE.


def _tilted_average(old: jax.Array, new: jax.Array, lam: jax.Array, t) -> jax.Array:
    r"""``(1/t) log((1 - lam) e^{t old} + lam e^{t new})``, elementwise, for any ``t``.

    Written as ``old + g(u) / t`` with ``u = t (new - old)`` and
    ``g(u) = log((1 - lam) + lam e^u)``: ``log1p(lam expm1(u))`` for ``|u| < 1`` (relative
    precision as ``t -> 0``), a log-sum-exp otherwise (no overflow for large ``|u|``). ``t = 0``
    gives the limit, the EMA ``(1 - lam) old + lam new``.
    """
    t = jnp.asarray(t, jnp.float32)
    u = t * (new - old)
    small = jnp.abs(u) < 1.0
    g_small = jnp.log1p(lam * jnp.expm1(jnp.where(small, u, 0.0)))
    g_large = jnp.logaddexp(jnp.log1p(-lam), jnp.log(lam) + jnp.where(small, 0.0, u))
    g = jnp.where(small, g_small, g_large)
    ema = (1.0 - lam) * old + lam * new
    return jnp.where(t == 0, ema, old + g / jnp.where(t == 0, 1.0, t))


def stochastic_tce_init(num_classes: int) -> StochasticTCEState:
    """The initial :class:`StochasticTCEState` for ``num_classes`` classes: nothing seen yet."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise TypeError(f"num_classes must be a positive int, got {num_classes!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes}.")
    return StochasticTCEState(
        running_loss=jnp.zeros((num_classes,), jnp.float32),
        running_freq=jnp.zeros((num_classes,), jnp.float32),
        seen=jnp.zeros((num_classes,), bool),
        step=jnp.zeros((), jnp.int32),
    )


def _check_state(state, num_classes: int) -> StochasticTCEState:
    if not isinstance(state, StochasticTCEState):
        raise TypeError(
            f"state must be a StochasticTCEState (from stochastic_tce_init), got {type(state)}."
        )
    for name in ("running_loss", "running_freq", "seen"):
        shape = jnp.shape(getattr(state, name))
        if shape != (num_classes,):
            raise ValueError(
                f"state.{name} has shape {shape} but the logits have C = {num_classes} "
                f"classes; create the state with stochastic_tce_init({num_classes})."
            )
    return jax.tree.map(lax.stop_gradient, state)


def _state_prior(state: StochasticTCEState, weighting) -> jax.Array:
    """The (unnormalised) running prior ``f``, zero for unseen classes."""
    if isinstance(weighting, str):
        if weighting == "frequency":
            return jnp.where(state.seen, state.running_freq, 0.0)
        return state.seen.astype(jnp.float32)
    return jnp.where(state.seen, weighting, 0.0)


def stochastic_tce(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    state: StochasticTCEState,
    *,
    t: float | jax.Array,
    lam: float | jax.Array,
    tau: float = 0.0,
    class_weighting: ClassWeighting = "frequency",
    estimator: str = "ema",
    batch_loss: str = "tilted",
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> tuple[jax.Array, StochasticTCEState, dict[str, jax.Array]]:
    r"""Stochastic TCE: batch class losses, tilted by running per-class estimates.

    One step of Stochastic TCE (docs/maths.md; all statistics global, reduced over ``axis_name``):

    1. batch class losses ``L^B_c`` and counts ``n_c`` for the classes ``P_B`` of the batch;
    2. for ``c in P_B``, with ``estimator='ema'``: ``R_c <- (1 - lam) R_c + lam L^B_c``; with
       ``estimator='tilted'`` (TERM's running average of ``exp(t L)``):
       ``R_c <- (1/t) log((1 - lam) exp(t R_c) + lam exp(t L^B_c))``, evaluated in log space
       (no overflow for large ``|t|``; equal to the EMA at ``t = 0``). ``R_c <- L^B_c`` the
       first time ``c`` is seen; absent classes keep ``R_c``. The running prior ``f``: for
       ``'frequency'``, ``f_c <- (1 - lam) f_c + lam n_c / sum n`` for every class (a batch with
       no valid pixel leaves it unchanged); for ``'uniform'`` ``f_c = 1`` on the seen classes;
       for a vector, that vector on the seen classes;
    3. the state's tilted weights ``w_c = softmax_c(t R_c + log f_c)`` over the seen classes;
    4. the differentiable surrogate

       .. math::
         \ell = \frac{\sum_{c \in P_B} w_c L^B_c}{\sum_{c \in P_B} w_c}

       with ``w`` under ``stop_gradient`` (evaluated in log space, so it stays finite when the
       batch classes have tiny weights). With ``lam = 1`` its gradient is that of
       :func:`tilted_ce` on the batch. With ``batch_loss='ce'`` the surrogate is instead the
       plain mean ``sum_c n_c L^B_c / sum_c n_c`` (cross-entropy over the batch for
       ``tau = 0``): the form for batches drawn by tilted class-aware sampling, where the
       sampler carries the tilt (TERM's stochastic solver); the state is updated all the same.

    The state never receives gradients. Under ``pmap`` the new state is identical on every
    replica; gradients follow the :func:`tilted_ce` convention (``pmean`` them).

    Non-finite batch statistics never enter the state: when a batch class loss is NaN or
    infinite (NaN or infinite logits, an overflow), the state is returned unchanged (``step``
    included) and ``aux['nonfinite_batch']`` is true; the loss of that batch is then not
    finite either, so the caller can skip the update. Without this, one such batch would poison
    ``running_loss`` for the rest of training.

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype.
      labels: ``[...]`` integer class ids, shape ``logits.shape[:-1]``.
      state: the :class:`StochasticTCEState` of the previous step.
      t: class-level tilt, Python float or traced scalar.
      lam: the running-average rate in ``(0, 1]``; 1 forgets the past.
      tau: pixel-level tilt (Python float), as in :func:`tilted_ce`.
      class_weighting: ``'frequency'``, ``'uniform'`` or a ``[C]`` array of non-negative weights.
      estimator: ``'ema'`` or ``'tilted'``, the running average of the class losses (step 2).
      batch_loss: ``'tilted'`` (the surrogate of step 4) or ``'ce'`` (the plain batch mean).
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.

    Returns:
      ``(loss, new_state, aux)``: the float32 surrogate, the updated state, and ``aux`` with
      ``objective`` (the running tilted risk ``(1/t) log sum_c f_c exp(t R_c)`` over the seen
      classes, ``f`` normalised; the ``f``-weighted mean of ``R`` at ``t = 0``), ``class_loss``
      and ``class_count`` of the batch, ``class_weight`` (the state weights ``w``),
      ``num_invalid`` and ``nonfinite_batch`` (bool scalar: the batch statistics were not
      finite and the state was left unchanged).
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    num_classes = logits.shape[-1]
    t = _check_scalar("t", t)
    lam = _check_scalar("lam", lam, low=0.0, low_open=True, high=1.0)
    tau = _check_scalar("tau", tau, allow_traced=False)
    ignore_index = _check_ignore_index(ignore_index)
    weighting = _check_class_weighting(class_weighting, num_classes)
    state = _check_state(state, num_classes)

    stats = _statistics(
        logits, labels, tau=tau, ignore_index=ignore_index, where=where, axis_name=axis_name
    )
    return stochastic_tce_from_statistics(
        stats, state, t=t, lam=lam, tau=tau, class_weighting=weighting, estimator=estimator,
        batch_loss=batch_loss,
    )


def class_sampling_probs(
    state: StochasticTCEState,
    *,
    t: float | jax.Array,
    mix: float | jax.Array,
    class_weighting: ClassWeighting = "frequency",
) -> jax.Array:
    r"""Class probabilities for tilted class-aware sampling (docs/maths.md).

    .. math::
      p_c = (1 - \mathrm{mix})\, w_c + \mathrm{mix} / C, \qquad
      w_c = \mathrm{softmax}_{c\ \mathrm{seen}}(t R_c + \log f_c),

    the state's tilted weights mixed with the uniform distribution; uniform before any class
    has been seen. ``p`` sums to 1; for ``t > 0`` classes with a higher running loss are drawn
    more often.

    Args:
      state: a :class:`StochasticTCEState`.
      t: class-level tilt, Python float or traced scalar.
      mix: weight of the uniform distribution, in ``[0, 1]``.
      class_weighting: the prior used with ``state`` in :func:`stochastic_tce`.

    Returns:
      ``[C]`` float32 probabilities.
    """
    if not isinstance(state, StochasticTCEState):
        raise TypeError(
            f"state must be a StochasticTCEState (from stochastic_tce_init), got {type(state)}."
        )
    num_classes = jnp.shape(state.running_loss)[0]
    state = _check_state(state, num_classes)
    t = _check_scalar("t", t)
    mix = _check_scalar("mix", mix, low=0.0, high=1.0)
    weighting = _check_class_weighting(class_weighting, num_classes)
    prior = _state_prior(state, weighting)
    weights = _tilted_weights(state.running_loss, prior, t)
    probs = (1.0 - mix) * weights + mix / num_classes
    return jnp.where(jnp.any(prior > 0), probs, jnp.full((num_classes,), 1.0 / num_classes))


# ----------------------------------------------------------------------------------------------
# Baselines: class-weighted cross-entropy, softmax focal loss, Lovász-softmax.
#
# Same conventions as tilted_ce: class axis last, float32 inside, `ignore_index` and labels
# outside [0, C) ignored, `where` mask, statistics over the global batch with `axis_name`
# (pmap/shard_map; every replica returns the global loss, `pmean` the gradients).

CLASS_WEIGHT_SCHEMES = ("inverse_frequency", "median_frequency", "enet")


def class_balancing_weights(
    class_count: jax.typing.ArrayLike,
    *,
    scheme: str,
    image_pixels: jax.typing.ArrayLike | None = None,
    enet_c: float = 1.02,
) -> jax.Array:
    r"""Class weights from pixel counts, for :func:`weighted_cross_entropy`.

    With ``n_c`` the pixels of class ``c``, ``N = sum_c n_c`` and ``p_c = n_c / N``, over the
    present classes ``P = {c: n_c > 0}``:

    * ``'inverse_frequency'``: ``w_c = 1 / p_c``;
    * ``'median_frequency'`` (Eigen & Fergus, 2015): ``f_c = n_c / M_c`` with ``M_c`` the pixels
      of the images in which ``c`` is present (``image_pixels``; ``N`` when not given),
      ``w_c = median_{c' in P} f_{c'} / f_c``;
    * ``'enet'`` (Paszke et al., 2016): ``w_c = 1 / ln(enet_c + p_c)``, bounded by
      ``1 / ln(enet_c)`` (about 50.5 for the paper's 1.02).

    Pass dataset counts to get fixed weights (then give the result to
    :func:`weighted_cross_entropy` as a vector), or let that function use the batch's counts.

    Args:
      class_count: ``[C]`` pixel counts ``n_c`` (any numeric dtype).
      scheme: one of ``'inverse_frequency'``, ``'median_frequency'``, ``'enet'``.
      image_pixels: optional ``[C]`` ``M_c`` for ``'median_frequency'``.
      enet_c: the constant of ``'enet'``, > 1.

    Returns:
      ``[C]`` float32 weights, 0 for absent classes (all 0 when no class is present).
    """
    if scheme not in CLASS_WEIGHT_SCHEMES:
        raise ValueError(
            f"scheme must be one of {CLASS_WEIGHT_SCHEMES}, got {scheme!r}; for fixed weights "
            f"pass a [C] vector to weighted_cross_entropy(class_weights=...) instead."
        )
    enet_c = _check_scalar("enet_c", enet_c, allow_traced=False, low=1.0, low_open=True)
    count = jnp.asarray(class_count, jnp.float32)
    if count.ndim != 1:
        raise ValueError(f"class_count must have shape [C], got {count.shape}.")
    present = count > 0
    total = jnp.maximum(jnp.sum(count), 1.0)
    safe_count = jnp.where(present, count, 1.0)
    if scheme == "inverse_frequency":
        weights = total / safe_count
    elif scheme == "enet":
        weights = 1.0 / jnp.log(enet_c + count / total)
    else:
        if image_pixels is None:
            support = jnp.full_like(count, total)
        else:
            support = jnp.asarray(image_pixels, jnp.float32)
            if support.shape != count.shape:
                raise ValueError(
                    f"image_pixels must have the shape of class_count, {count.shape}, got "
                    f"{support.shape}."
                )
        freq = jnp.where(present, count / jnp.where(present, jnp.maximum(support, 1.0), 1.0), 0.0)
        median = jnp.nanmedian(jnp.where(present, freq, jnp.nan))
        weights = jnp.where(present, median, 0.0) / jnp.where(present, freq, 1.0)
    return jnp.where(present, weights, 0.0)


def _image_pixels(segments_2d: jax.Array, num_classes: int) -> jax.Array:
    """``[C]``: sum over images of the image's valid pixels, for the images containing ``c``.

    ``segments_2d`` is ``[B, P]`` with class ids for valid pixels and ``C`` elsewhere.
    """
    per_image = jax.vmap(
        lambda segments: _per_class_sum(jnp.ones_like(segments), segments, num_classes)
    )(segments_2d)  # [B, C] valid pixels of each class in each image
    pixels = jnp.sum(per_image, axis=1, keepdims=True)
    return jnp.sum(jnp.where(per_image > 0, pixels, 0), axis=0)


def weighted_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    class_weights: str | jax.typing.ArrayLike = "inverse_frequency",
    enet_c: float = 1.02,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""Class-weighted cross-entropy: the ``w_{y_i}``-weighted mean of the pixel losses.

    .. math::
      \mathrm{WCE} = \frac{\sum_{i \in V} w_{y_i} l_i}{\sum_{i \in V} w_{y_i}}
                   = \frac{\sum_c w_c S_c}{\sum_c w_c n_c},
      \qquad l_i = \mathrm{logsumexp}(z_i) - z_{i, y_i},

    normalised by the total weight (the convention of PyTorch's ``CrossEntropyLoss(weight=w)``),
    so only the ratios of the weights matter. Its gradient gives class ``c`` the share
    ``w_c n_c / sum_c' w_c' n_c'`` (``aux['class_weight']``). With a string ``class_weights``
    the weights come from the **class counts of the (global) batch**
    (:func:`class_balancing_weights`; under ``axis_name`` the counts are ``psum``-med first, so
    the weights are those of the whole global batch); ``'inverse_frequency'`` then equals the
    uniform mean of the class losses,
    ``tilted_ce(..., t=0, class_weighting='uniform')``. For ``'median_frequency'`` the leading
    axis of ``labels`` indexes the images (a 1-D ``labels`` is one image). For weights from
    dataset-wide counts, compute them once with :func:`class_balancing_weights` and pass the
    ``[C]`` vector.

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      class_weights: ``'inverse_frequency'``, ``'median_frequency'``, ``'enet'`` (from the batch
        counts) or a ``[C]`` array of non-negative weights (not all zero).
      enet_c: the constant of ``'enet'``.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.
      return_aux: also return ``class_loss``, ``class_count`` and ``class_weight`` (``[C]``
        gradient shares, as in :func:`tilted_ce`).

    Returns:
      A float32 scalar (0 with a zero gradient when no pixel is valid or every valid pixel has
      weight 0), or ``(loss, aux)``.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    num_classes = logits.shape[-1]
    if isinstance(class_weights, str):
        if class_weights not in CLASS_WEIGHT_SCHEMES:
            raise ValueError(
                f"class_weights must be one of {CLASS_WEIGHT_SCHEMES} or a [C] array of "
                f"non-negative weights, got {class_weights!r}."
            )
        vector = None
    else:
        vector = _check_weight_vector("class_weights", class_weights, num_classes)
    stats = _statistics(
        logits, labels, tau=0.0, ignore_index=ignore_index, where=where, axis_name=axis_name
    )
    if vector is not None:
        weights = vector
    elif class_weights == "median_frequency":
        _, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
        segments = jnp.where(valid, safe_labels, num_classes)
        num_images = labels.shape[0] if labels.ndim >= 2 else 1
        image_pixels = _image_pixels(segments.reshape(num_images, -1), num_classes)
        if axis_name is not None:
            image_pixels = lax.psum(image_pixels, axis_name)
        weights = class_balancing_weights(
            stats.count, scheme=class_weights, image_pixels=image_pixels
        )
    else:
        weights = class_balancing_weights(stats.count, scheme=class_weights, enet_c=enet_c)
    weights = jnp.where(stats.count > 0, weights, 0.0)
    mass = weights * stats.count.astype(jnp.float32)
    total = jnp.sum(mass)
    share = mass / jnp.where(total > 0, total, 1.0)
    losses = _class_losses(stats, tau=0.0)
    loss = jnp.sum(share * losses)
    if not return_aux:
        return loss
    aux = {
        "class_loss": losses,
        "class_count": stats.count,
        "class_weight": share,
        "num_invalid": stats.num_invalid,
    }
    return loss, aux


def softmax_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Softmax (multi-class) focal loss (Lin et al., 2017), the mean over the valid pixels.

    .. math::
      \mathrm{FL} = \frac{1}{|V|} \sum_{i \in V} \alpha_{y_i} (1 - p_i)^\gamma\, l_i,
      \qquad p_i = \mathrm{softmax}(z_i)_{y_i} = e^{-l_i},

    with ``1 - p_i`` evaluated as ``-expm1(-l_i)`` (exact when ``p_i`` is close to 1).
    ``gamma = 0`` without ``alpha`` is the mean pixel cross-entropy. ``alpha`` (a ``[C]``
    vector) weights the classes without renormalising (the mean stays over ``|V|``).
    With ``axis_name`` the sum and the count are those of the global batch.

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      gamma: the focusing exponent, a Python number >= 0.
      alpha: optional ``[C]`` non-negative class weights.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.

    Returns:
      A float32 scalar; 0 with a zero gradient when no pixel is valid.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    gamma = _check_scalar("gamma", gamma, allow_traced=False, low=0.0)
    alpha = None if alpha is None else _check_weight_vector("alpha", alpha, logits.shape[-1])
    z, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    pixel = _pixel_losses(z, safe_labels)
    if gamma != 0:
        q = -jnp.expm1(-pixel)  # 1 - p, >= 0
        positive = q > 0
        # The inner where keeps the gradient of q**gamma finite at q = 0 (p = 1).
        modulating = jnp.where(positive, jnp.exp(gamma * jnp.log(jnp.where(positive, q, 1.0))), 0.0)
        pixel = modulating * pixel
    if alpha is not None:
        pixel = alpha[safe_labels] * pixel
    total = jnp.sum(jnp.where(valid, pixel, 0.0))
    count = jnp.sum(valid, dtype=jnp.int32)
    if axis_name is not None:
        total = lax.psum(total, axis_name)
        count = lax.psum(count, axis_name)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def lovasz_softmax(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    classes: str = "present",
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Lovász-softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018), over the whole batch.

    The reference ``lovasz_softmax(probas, labels, classes='present', per_image=False)``: with
    ``p = softmax(z)``, for each class ``c`` the errors ``e_i = |[y_i = c] - p_{i,c}|`` of the
    valid pixels sorted in decreasing order, ``e_{(1)} >= e_{(2)} >= ...``, and the Jaccard
    loss ``J_k = 1 - |G_c \setminus \pi_{1..k}| / |G_c \cup \pi_{1..k}|`` of the first ``k``
    sorted pixels (``G_c`` the pixels of class ``c``),

    .. math::
      \mathrm{loss}_c = \sum_k e_{(k)} (J_k - J_{k-1}), \quad J_0 = 0, \qquad
      \mathrm{loss} = \mathrm{mean}_{c \in K} \mathrm{loss}_c,

    the Lovász extension of the Jaccard loss, with ``K`` the classes present in the batch
    (``classes='present'``) or all classes (``'all'``). The batch is flattened (the reference's
    ``per_image=False``); for the per-image variant, ``jax.vmap`` this function over the images
    and take the mean. Ties among the errors do not change the value.

    The sort is not decomposable into per-device statistics: with ``axis_name`` the errors of
    all replicas are ``all_gather``-ed and every replica sorts the global batch (memory and time
    of the global batch on each device). Gradients follow the :func:`tilted_ce` convention
    (``pmean`` them).

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      classes: ``'present'`` or ``'all'``.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.

    Returns:
      A float32 scalar in ``[0, 1]``; 0 with a zero gradient when no pixel is valid.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    if classes not in ("present", "all"):
        raise ValueError(f"classes must be 'present' or 'all', got {classes!r}.")
    num_classes = logits.shape[-1]
    z, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    probs = jax.nn.softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)), axis=-1)
    fg = (safe_labels[:, None] == jnp.arange(num_classes)) & valid[:, None]  # [N, C]
    errors = jnp.abs(fg.astype(probs.dtype) - probs)
    weights = lax.stop_gradient(
        _lovasz_weights(lax.stop_gradient(errors), fg, valid, axis_name=axis_name)
    )
    per_class = jnp.sum(jnp.where(valid[:, None], errors * weights, 0.0), axis=0)
    count = jnp.sum(fg, axis=0, dtype=jnp.int32)
    num_valid = jnp.sum(valid, dtype=jnp.int32)
    if axis_name is not None:
        per_class = lax.psum(per_class, axis_name)
        count = lax.psum(count, axis_name)
        num_valid = lax.psum(num_valid, axis_name)
    included = count > 0 if classes == "present" else jnp.full((num_classes,), num_valid > 0)
    num_included = jnp.maximum(jnp.sum(included), 1).astype(per_class.dtype)
    return jnp.sum(jnp.where(included, per_class, 0.0)) / num_included


def _lovasz_weights(errors, fg, valid, *, axis_name) -> jax.Array:
    """``[N, C]`` weight ``J_k - J_{k-1}`` of each pixel's error at its sorted position ``k``.

    ``loss_c = sum_i e_i g_i`` is the reference's ``dot(errors_sorted, lovasz_grad(fg_sorted))``
    written in pixel order, which avoids sorting the (differentiable) errors: the rank of a
    pixel comes from one sort of integer keys and two binary searches, several times faster
    on CPU than a differentiable multi-operand sort. Non-negative float32 errors order like
    their bit patterns; the lowest bit is replaced by the foreground flag, so pixels of equal
    key (a tie block of ``m`` pixels, all foreground or all background) share the block's
    weight ``(J_end - J_start) / m``, which leaves the value unchanged (their errors agree to
    one ulp). With ``axis_name`` the keys of every replica are gathered (integers, no gradient)
    and each replica ranks its own pixels in the global order.
    """
    fg_int = fg.astype(jnp.int32)
    bits = lax.bitcast_convert_type(errors.astype(jnp.float32), jnp.int32)
    # Ascending order of -key = decreasing error; invalid pixels last.
    neg_key = jnp.where(valid[:, None], -((bits & ~1) | fg_int), jnp.iinfo(jnp.int32).max).T
    all_keys = neg_key
    if axis_name is not None:
        all_keys = lax.all_gather(neg_key, axis_name, axis=1, tiled=True)
    sorted_keys = jnp.sort(all_keys, axis=1)  # [C, N_global]
    sorted_fg = jnp.where(
        sorted_keys == jnp.iinfo(jnp.int32).max, 0, (-sorted_keys) & 1
    )  # (-key) & 1 is the foreground flag
    fg_before = jnp.concatenate(
        [jnp.zeros((sorted_keys.shape[0], 1), jnp.int32), jnp.cumsum(sorted_fg, axis=1)], axis=1
    )
    gts = fg_before[:, -1:]  # [C, 1] foreground pixels of each class (global)

    # First sorted position of each pixel's key (binary search), and the end of its tie block
    # (the next position holding a different key, by a reverse running minimum).
    left = jax.vmap(lambda row, values: jnp.searchsorted(row, values, method="scan"))(
        sorted_keys, neg_key
    )
    size = sorted_keys.shape[1]
    position = lax.broadcasted_iota(jnp.int32, sorted_keys.shape, 1)
    starts = jnp.concatenate(
        [sorted_keys[:, 1:] != sorted_keys[:, :-1], jnp.ones_like(sorted_keys[:, :1], bool)],
        axis=1,
    )  # starts[:, j]: position j + 1 begins a new block (or j is the last position)
    block_end = lax.cummin(jnp.where(starts, position + 1, size), axis=1, reverse=True)
    a = jnp.take_along_axis(fg_before, left, axis=1)  # foreground pixels ranked before
    b = left - a  # background pixels ranked before
    m = jnp.maximum(jnp.take_along_axis(block_end, left, axis=1) - left, 1)

    def jaccard(a, b):
        union = gts + b
        loss = 1.0 - (gts - a).astype(jnp.float32) / jnp.maximum(union, 1).astype(jnp.float32)
        return jnp.where(union > 0, loss, 0.0)

    fg_t = fg_int.T > 0
    end = jnp.where(fg_t, jaccard(a + m, b), jaccard(a, b + m))
    weights = (end - jaccard(a, b)) / m.astype(jnp.float32)
    return weights.T.astype(errors.dtype)


# ----------------------------------------------------------------------------------------------
# Losses from class statistics assembled from parts (exact gradient accumulation).
#
# The same values and gradients as tilted_ce, stochastic_tce and weighted_cross_entropy, but
# evaluated from the ClassStatistics of a whole batch that was processed in parts (micro-batches,
# see tce_jax.accumulation). They are differentiable in `stats.loss_sum`, the only statistic that
# carries a gradient (the shift is a stabiliser under stop_gradient; the counts are integers).


def tilted_ce_from_statistics(
    stats: ClassStatistics,
    *,
    t: float | jax.Array,
    tau: float = 0.0,
    class_weighting: ClassWeighting = "frequency",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`tilted_ce` with ``return_aux=True``, from the statistics of the whole batch.

    Args:
      stats: ``[C]`` statistics of the batch (:func:`class_statistics` with the same ``tau``,
        or parts combined at a common shift).
      t, tau, class_weighting: as for :func:`tilted_ce`.

    Returns:
      ``(loss, aux)`` as :func:`tilted_ce` returns them.
    """
    t = _check_scalar("t", t)
    tau = _check_scalar("tau", tau, allow_traced=False)
    weighting = _check_class_weighting(class_weighting, stats.count.shape[-1])
    losses = _class_losses(stats, tau=tau)
    prior = _class_prior(stats.count, weighting, losses.dtype)
    aux = {
        "class_loss": losses,
        "class_count": stats.count,
        "class_weight": _tilted_weights(losses, prior, t),
        "num_invalid": stats.num_invalid,
    }
    return _tilted_mean(losses, prior, t), aux


def stochastic_tce_from_statistics(
    stats: ClassStatistics,
    state: StochasticTCEState,
    *,
    t: float | jax.Array,
    lam: float | jax.Array,
    tau: float = 0.0,
    class_weighting: ClassWeighting = "frequency",
    estimator: str = "ema",
    batch_loss: str = "tilted",
) -> tuple[jax.Array, StochasticTCEState, dict[str, jax.Array]]:
    """:func:`stochastic_tce` from the statistics of the whole batch: one state update.

    Args:
      stats: ``[C]`` statistics of the batch (with the same ``tau``).
      state, t, lam, tau, class_weighting, estimator, batch_loss: as for
        :func:`stochastic_tce`.

    Returns:
      ``(loss, new_state, aux)`` as :func:`stochastic_tce` returns them.
    """
    num_classes = stats.count.shape[-1]
    t = _check_scalar("t", t)
    lam = _check_scalar("lam", lam, low=0.0, low_open=True, high=1.0)
    tau = _check_scalar("tau", tau, allow_traced=False)
    weighting = _check_class_weighting(class_weighting, num_classes)
    _check_choice("estimator", estimator, ESTIMATORS)
    _check_choice("batch_loss", batch_loss, BATCH_LOSSES)
    state = _check_state(state, num_classes)
    batch_losses = _class_losses(stats, tau=tau)
    present = stats.count > 0
    batch_estimate = lax.stop_gradient(batch_losses)

    lam = jnp.asarray(lam, jnp.float32)
    if estimator == "ema":
        average = (1.0 - lam) * state.running_loss + lam * batch_estimate
    else:
        average = _tilted_average(state.running_loss, batch_estimate, lam, t)
    blended = jnp.where(state.seen, average, batch_estimate)
    running_loss = jnp.where(present, blended, state.running_loss).astype(
        state.running_loss.dtype
    )
    seen = state.seen | present
    if isinstance(weighting, str) and weighting == "frequency":
        total = jnp.sum(stats.count)
        freq = stats.count.astype(jnp.float32) / jnp.maximum(total, 1).astype(jnp.float32)
        running_freq = jnp.where(
            total > 0, (1.0 - lam) * state.running_freq + lam * freq, state.running_freq
        )
    elif isinstance(weighting, str):
        running_freq = seen.astype(jnp.float32)
    else:
        running_freq = jnp.where(seen, weighting, 0.0)
    running_freq = running_freq.astype(state.running_freq.dtype)
    new_state = StochasticTCEState(running_loss, running_freq, seen, state.step + 1)
    # Class losses are 0 for absent classes and counts are integers: one non-finite value
    # means the batch is broken (e.g. NaN logits), and it must not enter the running state.
    nonfinite = ~jnp.all(jnp.isfinite(batch_estimate))
    new_state = jax.tree.map(
        lambda new, old: jnp.where(nonfinite, old, new), new_state, state
    )

    prior = _state_prior(new_state, weighting)
    weights = _tilted_weights(new_state.running_loss, prior, t)
    # The weights renormalised over the batch classes, computed in log space.
    if batch_loss == "tilted":
        batch_weights = _tilted_weights(
            new_state.running_loss, jnp.where(present, prior, 0.0), t
        )
    else:  # the pixel-count weights: the plain mean over the batch's valid pixels
        batch_weights = _normalise(stats.count.astype(batch_losses.dtype))
    loss = jnp.sum(batch_weights * batch_losses)
    aux = {
        "objective": _tilted_mean(new_state.running_loss, _normalise(prior), t),
        "class_loss": batch_estimate,
        "class_count": stats.count,
        "class_weight": weights,
        "num_invalid": stats.num_invalid,
        "nonfinite_batch": nonfinite,
    }
    return loss, new_state, aux


def weighted_cross_entropy_from_statistics(
    stats: ClassStatistics,
    *,
    class_weights: str | jax.typing.ArrayLike = "inverse_frequency",
    image_pixels: jax.typing.ArrayLike | None = None,
    enet_c: float = 1.02,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`weighted_cross_entropy` with ``return_aux=True``, from the batch statistics.

    Args:
      stats: ``[C]`` statistics of the batch with ``tau = 0``.
      class_weights, enet_c: as for :func:`weighted_cross_entropy`.
      image_pixels: for ``'median_frequency'``, the ``[C]`` valid pixels of the images that
        contain each class (:func:`class_image_pixels`, summed over the parts).

    Returns:
      ``(loss, aux)`` as :func:`weighted_cross_entropy` returns them.
    """
    num_classes = stats.count.shape[-1]
    if isinstance(class_weights, str):
        if class_weights not in CLASS_WEIGHT_SCHEMES:
            raise ValueError(
                f"class_weights must be one of {CLASS_WEIGHT_SCHEMES} or a [C] array of "
                f"non-negative weights, got {class_weights!r}."
            )
        if class_weights == "median_frequency" and image_pixels is None:
            raise ValueError(
                "class_weights='median_frequency' needs image_pixels (class_image_pixels of "
                "the batch); pass it, or use another scheme."
            )
        weights = class_balancing_weights(
            stats.count, scheme=class_weights, image_pixels=image_pixels, enet_c=enet_c
        )
    else:
        weights = _check_weight_vector("class_weights", class_weights, num_classes)
    weights = jnp.where(stats.count > 0, weights, 0.0)
    mass = weights * stats.count.astype(jnp.float32)
    total = jnp.sum(mass)
    share = mass / jnp.where(total > 0, total, 1.0)
    losses = _class_losses(stats, tau=0.0)
    aux = {
        "class_loss": losses,
        "class_count": stats.count,
        "class_weight": share,
        "num_invalid": stats.num_invalid,
    }
    return jnp.sum(share * losses), aux


def class_image_pixels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """``[C]`` int32: for each class, the valid pixels of the images containing it.

    The ``M_c`` of ``'median_frequency'`` (:func:`class_balancing_weights`), with the leading
    axis of ``labels`` indexing the images (a 1-D ``labels`` is one image), as in
    :func:`weighted_cross_entropy`. It adds up over images, so the value of a batch is the sum
    over its parts; ``logits`` only give the class count. No ``axis_name``: ``psum`` the result.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    num_classes = logits.shape[-1]
    _, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    segments = jnp.where(valid, safe_labels, num_classes)
    num_images = labels.shape[0] if labels.ndim >= 2 else 1
    return _image_pixels(segments.reshape(num_images, -1), num_classes)
