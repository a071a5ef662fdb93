"""Tilted cross-entropy and Stochastic TCE (docs/maths.md)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tce_jax.losses._statistics import ClassStatistics, _class_losses, class_statistics
from tce_jax.losses._validation import (
    AxisName,
    ClassWeighting,
    _check_choice,
    _check_class_weighting,
    _check_scalar,
)

__all__ = [
    "BATCH_LOSSES",
    "ESTIMATORS",
    "StochasticTCEState",
    "class_sampling_probs",
    "stochastic_tce",
    "stochastic_tce_from_statistics",
    "stochastic_tce_init",
    "tilted_ce",
    "tilted_ce_from_statistics",
]

# Stochastic TCE: how the running class losses average the batch ones, and what loss the batch
# takes (docs/maths.md).
ESTIMATORS = ("ema", "tilted")
BATCH_LOSSES = ("tilted", "ce")
# Above this value of max_c t (L_c - mean L) the tilted mean switches from the expm1 form
# (exact as t -> 0) to the max-shifted log-sum-exp form (no overflow for large |t|).
_EXPM1_LIMIT = 30.0


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
    stats = class_statistics(
        logits, labels, tau=tau, ignore_index=ignore_index, where=where, axis_name=axis_name
    )
    loss, aux = tilted_ce_from_statistics(stats, t=t, tau=tau, class_weighting=class_weighting)
    return (loss, aux) if return_aux else loss


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
    stats = class_statistics(
        logits, labels, tau=tau, ignore_index=ignore_index, where=where, axis_name=axis_name
    )
    return stochastic_tce_from_statistics(
        stats,
        state,
        t=t,
        lam=lam,
        tau=tau,
        class_weighting=class_weighting,
        estimator=estimator,
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
# The losses as functions of the class statistics of the whole batch.
#
# tilted_ce and stochastic_tce are class_statistics followed by these (as is
# weighted_cross_entropy by weighted_cross_entropy_from_statistics): the one place where each
# loss is evaluated. Exact gradient accumulation (tce_jax.accumulation) calls them on statistics
# assembled from parts (micro-batches). They are differentiable in `stats.loss_sum`, the only
# statistic that carries a gradient (the shift is a stabiliser under stop_gradient; the counts
# are integers).


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
    running_loss = jnp.where(present, blended, state.running_loss).astype(state.running_loss.dtype)
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
    new_state = jax.tree.map(lambda new, old: jnp.where(nonfinite, old, new), new_state, state)

    prior = _state_prior(new_state, weighting)
    weights = _tilted_weights(new_state.running_loss, prior, t)
    # The weights renormalised over the batch classes, computed in log space.
    if batch_loss == "tilted":
        batch_weights = _tilted_weights(new_state.running_loss, jnp.where(present, prior, 0.0), t)
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
