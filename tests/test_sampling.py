"""Tilted class-aware sampling: the cached class index, the draw's frequencies and determinism,
and the probability hand-over between trainer and reader (an exactly resumed class-aware run:
tests/test_train.py)."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from tce_jax import losses, sampling


def _members():
    """5 classes over 40 images: class 0 everywhere, 1 in 10 images, 2 in 3, 3 in 1, 4 none."""
    presence = np.zeros((40, 5), bool)
    presence[:, 0] = True
    presence[::4, 1] = True
    presence[[5, 17, 33], 2] = True
    presence[22, 3] = True
    return presence, [np.flatnonzero(presence[:, c]) for c in range(5)]


def test_draw_follows_the_class_probabilities_and_is_deterministic():
    presence, members = _members()
    p = np.array([0.1, 0.2, 0.3, 0.25, 0.15])  # class 4 has no image: renormalised away
    classes, indices = [], []
    for step in range(500):
        c, i = sampling.draw(members, p, seed=3, shard=0, step=step, batch=8)
        classes.append(c)
        indices.append(i)
    classes, indices = np.concatenate(classes), np.concatenate(indices)
    assert presence[indices, classes].all()  # every image contains its class
    expected = np.append(p[:4] / p[:4].sum(), 0.0)
    frequency = np.bincount(classes, minlength=5) / len(classes)
    sigma = np.sqrt(expected * (1 - expected) / len(classes))
    assert (np.abs(frequency - expected) <= 5 * sigma + 1e-12).all(), (frequency, expected)
    # Within class 1, its 10 images are drawn uniformly.
    images = np.bincount(indices[classes == 1], minlength=40)[members[1]]
    assert images.min() > 0.5 * images.mean()
    # A pure function of (seed, shard, step, p).
    a = sampling.draw(members, p, seed=3, shard=0, step=7, batch=8)
    b = sampling.draw(members, p.astype(np.float32), seed=3, shard=0, step=7, batch=8)
    np.testing.assert_array_equal(a[1], b[1])
    for other in (dict(seed=4, shard=0, step=7), dict(seed=3, shard=1, step=7),
                  dict(seed=3, shard=0, step=8)):  # fmt: skip
        assert not np.array_equal(a[1], sampling.draw(members, p, batch=8, **other)[1])


def test_sampling_prior_chooses_the_class_prior_of_the_draw():
    """'loss' keeps the frequency prior (road dominates the draw); 'uniform' draws by the running
    losses alone, so the rare, badly classified class is drawn most."""
    config = default.get_config("stochastic_tce")
    config.loss.t, config.data.sampling_mix = 1.0, 0.2
    state = losses.StochasticTCEState(
        running_loss=jnp.array([0.1, 0.5, 3.0]),
        running_freq=jnp.array([0.90, 0.09, 0.01]),
        seen=jnp.array([True, True, True]),
        step=jnp.array(10, jnp.int32),
    )
    config.data.sampling_prior = "loss"
    by_loss = np.asarray(sampling.class_probs(config, state))
    config.data.sampling_prior = "uniform"
    by_uniform = np.asarray(sampling.class_probs(config, state))
    for probs, prior in ((by_loss, np.array([0.90, 0.09, 0.01])), (by_uniform, np.ones(3))):
        w = prior * np.exp(np.array([0.1, 0.5, 3.0]))
        np.testing.assert_allclose(probs, 0.8 * w / w.sum() + 0.2 / 3, rtol=1e-5)
    assert by_loss.argmax() == 0 and by_uniform.argmax() == 2


def test_sampler_waits_for_the_trainer_and_stops_waiting_when_closed():
    presence, _ = _members()
    sampler = sampling.ClassAwareSampler(
        {0: presence}, batch_per_shard=4, seed=0, refresh_steps=2, num_steps=6, timeout=30
    )
    uniform = np.full(5, 0.2)
    sampler.post(0, uniform)
    sampler.post(1, uniform)
    first = [sampler(0, step) for step in range(4)]
    assert all(len(x) == 4 for x in first)
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("x", sampler(0, 4)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # waiting for period 2
    only_class_3 = np.array([0, 0, 0, 1.0, 0])
    sampler.post(2, only_class_3)
    reader.join(10)
    np.testing.assert_array_equal(result["x"], [22, 22, 22, 22])
    assert len(sampler(0, 6)) == 4  # past num_steps: never used, does not wait
    sampler.timeout = 0.05
    with pytest.raises(sampling.SamplerTimeoutError, match="refresh period 3"):
        sampler.probs(3)
    sampler.close()  # training ended: a reader running ahead must not block
    np.testing.assert_array_equal(sampler.probs(3), np.ones(5))


def test_trainer_side_start_and_after_step_post_the_right_periods():
    presence, _ = _members()
    sampler = sampling.ClassAwareSampler(
        {0: presence}, batch_per_shard=2, seed=0, refresh_steps=4, num_steps=100
    )
    sampler.start(7, np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]]))  # resumed in period 1
    assert sorted(sampler._probs) == [1, 2]
    np.testing.assert_array_equal(sampler.probs(1), [1, 0, 0, 0, 0])
    reads = []

    def read():
        reads.append(1)
        return np.array([[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]])

    sampler.after_step(7, read)  # not a period start: the state is not even read
    assert not reads and not sampler.refresh_due(7)
    sampler.after_step(8, read)  # update 8 starts period 2: p_3 is the state's second row
    assert reads == [1] and sampler.refresh_due(8)
    np.testing.assert_array_equal(sampler.probs(3), [0, 0, 1, 0, 0])


def test_advance_sampling_probs_moves_on_at_period_starts():
    probs = jnp.stack([jnp.full(3, 1 / 3), jnp.array([0.2, 0.3, 0.5])])
    fresh = jnp.array([0.6, 0.3, 0.1])
    unchanged = sampling.advance_sampling_probs(probs, 3, fresh, 4)
    np.testing.assert_array_equal(unchanged, probs)
    rolled = sampling.advance_sampling_probs(probs, 8, fresh, 4)
    np.testing.assert_array_equal(rolled, jnp.stack([probs[1], fresh]))
