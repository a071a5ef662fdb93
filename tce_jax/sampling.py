"""Tilted class-aware sampling (docs/maths.md).

* :class:`ClassAwareSampler`: an ``IndexFn(shard, step) -> indices`` for the input pipeline.
  Every example slot of a step draws a class ``c ~ p`` (among the classes present in the
  shard), then, uniformly, an image of the shard that contains ``c``. The draw is a pure
  function of ``(seed, shard, step, p)``; which images contain which class comes from the
  class index (``tce_jax.datasets.class_index``).
* ``p`` comes from the training state: ``p = (1 - mix) w + mix / C`` with the Stochastic TCE
  weights ``w`` (:func:`tce_jax.losses.class_sampling_probs`). It is refreshed every
  ``R = refresh_steps`` steps with a lag of one period, because tf.data reads ahead of
  training: data step ``d`` (the batch of update ``d + 1``) uses ``p_b``, ``b = d // R``, where
  ``p_0 = p_1`` come from the initial state and ``p_b`` (``b >= 2``) from the state after
  ``(b - 1) R`` updates. The train state keeps ``[p_b, p_{b+1}]`` for its current period ``b``
  (:func:`advance_sampling_probs`, checkpointed), so a resumed run draws the same batches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from tce_jax import losses

# A fixed key that separates the sampler's random stream from every other use of the seed.
_SAMPLER_STREAM = 0x7CE5A


# ---------------------------------------------------------------------------------------------
# The sampler.


def draw(
    members: Sequence[np.ndarray], probs, *, seed: int, shard: int, step: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """One step's class-aware draw for one shard; a pure function of its arguments.

    Args:
      members: ``C`` arrays; ``members[c]`` holds the (shard-local) indices of the examples
        that contain class ``c`` (possibly empty).
      probs: ``[C]`` class probabilities ``p`` (any non-negative weights; renormalised over the
        classes that have members; uniform over them if that leaves no mass).
      seed, shard, step: select the random stream, ``default_rng([seed, K, shard, step])``.
      batch: examples to draw.

    Returns:
      ``(classes, indices)``, int64 ``[batch]`` each: the class drawn for each slot and the
      example drawn among those that contain it.
    """
    available = np.array([len(m) > 0 for m in members])
    if not available.any():
        raise ValueError("No example of the shard contains any class: nothing to sample.")
    p = np.where(available, np.asarray(probs, np.float64), 0.0)
    if not np.isfinite(p).all() or p.sum() <= 0:
        p = available.astype(np.float64)
    cdf = np.cumsum(p)
    rng = np.random.default_rng([seed, _SAMPLER_STREAM, shard, step])
    classes = np.searchsorted(cdf, rng.random(batch) * cdf[-1], side="right")
    classes = np.minimum(classes, len(p) - 1)
    # Rounding at the top of the cdf could land on a trailing class without members.
    classes = np.where(available[classes], classes, np.flatnonzero(available)[-1])
    picks = rng.random(batch)
    indices = np.array(
        [members[c][int(u * len(members[c]))] for c, u in zip(classes, picks, strict=True)],
        np.int64,
    )
    return classes.astype(np.int64), indices


class SamplerTimeoutError(RuntimeError):
    """The input pipeline waited too long for the sampling probabilities of a period."""


class ClassAwareSampler:
    """``IndexFn(shard, step) -> indices`` drawing images by class (see the module docstring).

    The trainer posts the probabilities of each refresh period with :meth:`post`; the input
    pipeline's reader thread calls the sampler and blocks until the probabilities of the
    step's period are there.

    Args:
      presence: bool ``[N_s, C]`` per owned shard ``s``: which classes each of its examples
        contains (rows in the shard's data-source order).
      batch_per_shard: examples drawn per shard and step.
      seed: the run's seed.
      refresh_steps: ``R``, the refresh period in steps.
      num_steps: steps that training will consume; the reader may run ahead of it, and draws
        for later steps (never used) do not wait for probabilities.
      timeout: seconds :meth:`probs` waits before raising `SamplerTimeoutError`.
    """

    def __init__(
        self,
        presence: Mapping[int, np.ndarray],
        *,
        batch_per_shard: int,
        seed: int,
        refresh_steps: int,
        num_steps: int | None = None,
        timeout: float = 3600.0,
    ):
        self.members = {
            shard: [np.flatnonzero(p[:, c]) for c in range(p.shape[1])]
            for shard, p in presence.items()
        }
        for shard, members in self.members.items():
            if not any(len(m) for m in members):
                raise ValueError(
                    f"Shard {shard} has no labelled pixel of any class: class-aware sampling "
                    "cannot draw from it."
                )
        self.num_classes = len(next(iter(self.members.values())))
        self.batch_per_shard = batch_per_shard
        self.seed = seed
        self.refresh_steps = refresh_steps
        self.num_steps = num_steps
        self.timeout = timeout
        self._probs: dict[int, np.ndarray] = {}
        self._closed = False
        self._cond = threading.Condition()

    def period(self, step: int) -> int:
        return step // self.refresh_steps

    # The trainer's side: start at a step, then refresh after the steps that start a period.

    def start(self, step: int, sampling_probs) -> None:
        """Training starts (or resumes) after update ``step``: posts ``[p_b, p_{b+1}]`` of its
        period ``b``, the train state's ``sampling_probs``."""
        period = self.period(step)
        self.post(period, sampling_probs[0])
        self.post(period + 1, sampling_probs[1])

    def refresh_due(self, step: int) -> bool:
        """Whether update ``step`` starts a refresh period (see :meth:`after_step`)."""
        return step % self.refresh_steps == 0

    def after_step(self, step: int, read_sampling_probs: Callable[[], np.ndarray]) -> None:
        """After update ``step`` of a period start ``b R``, the state's ``p_{b+1}`` becomes the
        next period's probabilities; ``read_sampling_probs`` (the state's ``[2, C]``
        ``sampling_probs``) is called only then."""
        if self.refresh_due(step):
            self.post(self.period(step) + 1, read_sampling_probs()[1])

    def post(self, period: int, probs) -> None:
        """Makes ``probs`` (``[C]``) the class probabilities of refresh period ``period``."""
        probs = np.array(probs, np.float64)
        with self._cond:
            self._probs[period] = probs
            for old in [k for k in self._probs if k < period - 2]:
                del self._probs[old]
            self._cond.notify_all()

    def close(self) -> None:
        """Stops waiting: from now on, unposted periods draw classes uniformly. Call when
        training ends, so that a reader thread running ahead is not left blocked."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def probs(self, period: int) -> np.ndarray:
        """The posted probabilities of ``period``; waits for them if need be (uniform after
        :meth:`close`)."""
        with self._cond:
            ready = self._cond.wait_for(
                lambda: period in self._probs or self._closed, timeout=self.timeout
            )
            if ready and period not in self._probs:
                return np.ones(self.num_classes)
            if not ready:
                raise SamplerTimeoutError(
                    f"No class-sampling probabilities for refresh period {period} after "
                    f"{self.timeout:.0f} s (posted: {sorted(self._probs)}); the trainer must "
                    "post them (ClassAwareSampler.post) before the input pipeline needs them."
                )
            return self._probs[period]

    def __call__(self, shard: int, step: int) -> np.ndarray:
        if self.num_steps is not None and step >= self.num_steps:
            probs = np.ones(self.num_classes)  # read ahead past the end: never used
        else:
            probs = self.probs(self.period(step))
        _, indices = draw(
            self.members[shard],
            probs,
            seed=self.seed,
            shard=shard,
            step=step,
            batch=self.batch_per_shard,
        )
        return indices


# ---------------------------------------------------------------------------------------------
# The probabilities in the train state.


def class_probs(config, tce_state: losses.StochasticTCEState) -> jnp.ndarray:
    """``[C]`` probabilities of tilted class-aware sampling from the Stochastic TCE state, with
    the config's tilt, uniform share and class prior (``data.sampling_prior``)."""
    prior = config.data.sampling_prior
    return losses.class_sampling_probs(
        tce_state,
        t=config.loss.t,
        mix=config.data.sampling_mix,
        class_weighting=config.loss.class_weighting if prior == "loss" else "uniform",
    )


def init_sampling_probs(probs: jnp.ndarray) -> jnp.ndarray:
    """``[2, C]`` ``[p_0, p_1]`` for a fresh run: both from the initial state."""
    return jnp.stack([probs, probs]).astype(jnp.float32)


def advance_sampling_probs(
    sampling_probs: jnp.ndarray, new_step, fresh_probs: jnp.ndarray, refresh_steps: int
) -> jnp.ndarray:
    """The train state's ``[p_b, p_{b+1}]`` after the update that made the step ``new_step``.

    When ``new_step`` starts period ``b = new_step / R``, the pair moves on: ``p_b`` is the old
    ``p_{b+1}`` and the new ``p_{b+1}`` is ``fresh_probs``, computed from the state after this
    update. Otherwise nothing changes. Pure JAX; runs inside the train step.
    """
    rolled = jnp.stack([sampling_probs[1], fresh_probs.astype(sampling_probs.dtype)])
    return jnp.where(new_step % refresh_steps == 0, rolled, sampling_probs)
