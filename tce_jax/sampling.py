"""The training samplers beside uniform epochs (docs/maths.md): tilted class-aware sampling, Rare
Class Sampling and repeat-factor sampling.

``data.sampling`` chooses (:func:`method`; ``data.class_aware_sampling=True`` is ``'tilted'``).
Every sampler is an ``IndexFn(shard, step)`` for the input pipeline whose draw is a pure function
of ``(seed, shard, step)`` (and, tilted, of the posted probabilities): exact resume, and a global
batch that does not depend on the process count. Which images contain which class, and how many
of its pixels, comes from the class index (``tce_jax.datasets.class_index``).

Tilted class-aware sampling:

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

Fixed distributions, computed once from the class index of the whole training split:

* :class:`RareClassSampler` (DAFormer's Rare Class Sampling, ``'rcs'``): a class with
  ``P(c) = softmax((1 - f_c) / T)`` (:func:`rcs_class_probs`), then an image holding more than
  ``m`` of its pixels; the slot's :class:`Draw` names the class, and the input pipeline re-crops
  until the crop holds enough of it (``tce_jax.example_transforms.rare_class_seed``).
* :class:`RepeatFactorSampler` (LVIS's repeat-factor sampling, ``'repeat_factor'``): epochs in
  which image ``i`` appears ``r_i`` times in expectation (:func:`repeat_factors`), by
  detectron2's stochastic rounding.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

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


# ---------------------------------------------------------------------------------------------
# Rare Class Sampling and repeat-factor sampling: fixed distributions from the class index.

SAMPLINGS = ("uniform", "tilted", "rcs", "repeat_factor")
# DAFormer's training crop (512 x 512): `data.rcs_min_pixels` is given at its scale.
RCS_REFERENCE_CROP_PIXELS = 512 * 512
# Separate random streams for the repeat-factor epochs' rounding and order.
_ROUNDING_STREAM, _ORDER_STREAM = 0x7CE5B, 0x7CE5C


def method(data_config) -> str:
    """The run's sampler, one of `SAMPLINGS`: ``data.sampling``, where the older switch
    ``data.class_aware_sampling=True`` means ``'tilted'``."""
    return "tilted" if data_config.class_aware_sampling else data_config.sampling


class Draw(NamedTuple):
    """What an `IndexFn` may return instead of bare indices: the examples of a step and, per
    slot, the class its crop should hold (Rare Class Sampling's re-crop; -1: any crop)."""

    indices: np.ndarray
    crop_classes: np.ndarray


def rcs_min_pixels(data_config) -> float:
    """DAFormer's ``min_pixels`` for this run's crop: ``data.rcs_min_pixels`` (given for a
    512 x 512 crop) times ``crop_h * crop_w / 512**2``, so that it stays the same share of the
    crop."""
    crop_h, crop_w = data_config.crop_size
    return data_config.rcs_min_pixels * crop_h * crop_w / RCS_REFERENCE_CROP_PIXELS


def rcs_class_probs(counts: np.ndarray, temperature: float) -> np.ndarray:
    """``[C]`` Rare Class Sampling's ``P(c) = softmax((1 - f_c) / T)``, ``f_c`` the share of
    class ``c`` among the labelled pixels of ``counts`` (``[N, C]``, the class index), over the
    classes with pixels (DAFormer's classes are those in its statistics); 0 for the others."""
    total = np.asarray(counts, np.float64).sum(axis=0)
    present = total > 0
    if not present.any():
        raise ValueError("The training split has no labelled pixel: nothing to sample.")
    logits = np.where(present, (1.0 - total / total.sum()) / temperature, -np.inf)
    weights = np.exp(logits - logits[present].max())
    return weights / weights.sum()


def _rcs_candidates(class_counts: np.ndarray, min_pixels: float) -> np.ndarray:
    """The images a class is drawn from: those with more than ``min_pixels`` of its pixels
    (DAFormer), or, where none has that many, every image that contains it (DAFormer stops)."""
    above = np.flatnonzero(class_counts > min_pixels)
    return above if len(above) else np.flatnonzero(class_counts > 0)


class RareClassSampler:
    """``IndexFn(shard, step) -> Draw``: DAFormer's Rare Class Sampling, per shard.

    Every slot draws a class ``c ~ P`` (renormalised over the classes the shard's images
    contain) and, uniformly, one of the shard's images with more than ``min_pixels`` pixels of
    ``c`` (:func:`_rcs_candidates`); the `Draw` names ``c`` for the re-crop. A pure function of
    ``(seed, shard, step)`` (:func:`draw`).

    Args:
      counts: int ``[N_s, C]`` per owned shard ``s``: pixels of each class in each of its
        examples (rows in the shard's data-source order).
      probs: ``[C]`` class probabilities, :func:`rcs_class_probs` of the whole split.
      min_pixels: :func:`rcs_min_pixels`.
      batch_per_shard: examples drawn per shard and step.
      seed: the run's seed.
    """

    def __init__(
        self,
        counts: Mapping[int, np.ndarray],
        probs,
        *,
        min_pixels: float,
        batch_per_shard: int,
        seed: int,
    ):
        self.members = {
            shard: [_rcs_candidates(c[:, k], min_pixels) for k in range(c.shape[1])]
            for shard, c in counts.items()
        }
        self.probs = np.asarray(probs, np.float64)
        self.batch_per_shard = batch_per_shard
        self.seed = seed

    def __call__(self, shard: int, step: int) -> Draw:
        classes, indices = draw(
            self.members[shard],
            self.probs,
            seed=self.seed,
            shard=shard,
            step=step,
            batch=self.batch_per_shard,
        )
        return Draw(indices, classes.astype(np.int32))


def repeat_factors(presence: np.ndarray, threshold: float) -> np.ndarray:
    """``[N]`` LVIS's image repeat factors ``r_i = max_{c in i} max(1, sqrt(t / f_c))``, ``f_c``
    the fraction of the images of ``presence`` (bool ``[N, C]``) that contain class ``c``; 1 for
    an image without labelled pixels (detectron2's default)."""
    presence = np.asarray(presence, bool)
    with np.errstate(divide="ignore"):  # a class in no image: never an image's max
        class_factors = np.maximum(1.0, np.sqrt(threshold / presence.mean(axis=0)))
    return np.where(presence, class_factors, 1.0).max(axis=1, initial=1.0)


class RepeatFactorSampler:
    """``IndexFn(shard, step) -> indices``: LVIS's repeat-factor sampling, per shard.

    The shard's stream is a sequence of epochs, as detectron2's `RepeatFactorTrainingSampler`
    builds them: in epoch ``e`` image ``i`` appears ``floor(r_i)`` times plus once more with
    probability ``r_i - floor(r_i)`` (stochastic rounding: ``r_i`` times in expectation), in a
    random order; step ``k`` takes slots ``k B ... k B + B - 1`` of the stream. Epoch ``e`` is
    a pure function of ``(seed, shard, e)``, so step ``k`` is one of ``(seed, shard, k)``;
    locating it sums the lengths of the epochs before it (a rounding draw per epoch and image:
    milliseconds on resume).

    Args:
      factors: ``[N_s]`` per owned shard: :func:`repeat_factors` (of the whole split) of its
        examples, in the shard's data-source order.
      batch_per_shard: examples drawn per shard and step.
      seed: the run's seed.
    """

    def __init__(self, factors: Mapping[int, np.ndarray], *, batch_per_shard: int, seed: int):
        self.factors = {shard: np.asarray(r, np.float64) for shard, r in factors.items()}
        self.batch_per_shard = batch_per_shard
        self.seed = seed
        self._starts = {shard: [0] for shard in self.factors}  # first slot of epochs 0, 1, ...
        self.epoch = functools.lru_cache(maxsize=8)(self._epoch)  # a step spans <= 2 epochs

    def repeats(self, shard: int, epoch: int) -> np.ndarray:
        """int ``[N_s]``: how often each image of ``shard`` appears in ``epoch``."""
        r = self.factors[shard]
        rng = np.random.default_rng([self.seed, _ROUNDING_STREAM, shard, epoch])
        return (np.floor(r) + (rng.random(len(r)) < r - np.floor(r))).astype(np.int64)

    def _epoch(self, shard: int, epoch: int) -> np.ndarray:
        """int64: the images of ``epoch`` of ``shard``, in their drawn order (``self.epoch``,
        cached)."""
        images = np.repeat(np.arange(len(self.factors[shard])), self.repeats(shard, epoch))
        return np.random.default_rng([self.seed, _ORDER_STREAM, shard, epoch]).permutation(images)

    def __call__(self, shard: int, step: int) -> np.ndarray:
        positions = step * self.batch_per_shard + np.arange(self.batch_per_shard)
        starts = self._starts[shard]
        while starts[-1] <= positions[-1]:
            starts.append(starts[-1] + int(self.repeats(shard, len(starts) - 1).sum()))
        epochs = np.searchsorted(starts, positions, side="right") - 1
        slots = zip(epochs, positions, strict=True)
        return np.array([self.epoch(shard, int(e))[p - starts[e]] for e, p in slots], np.int64)
