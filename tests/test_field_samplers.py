"""Rare Class Sampling and repeat-factor sampling (docs/maths.md): the formulas against hand
computations, many drawn batches against them, determinism, resume and shard layouts, the
re-crop, the input pipeline's wiring and the config fields.

Frequencies are compared with chi-square tests. The draws are deterministic (fixed seeds), so
the tests cannot flake; the threshold p > 1e-4 is what a correct sampler passes for all but one
seed in 10^4, and a sampler off by a few percent on these sample sizes fails it.
"""

import math

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from configs import default
from tce_jax import config_lib, example_transforms, input_pipeline, sampling

P_MIN = 1e-4


def _chi_square_p(observed, expected_probs) -> float:
    """p-value of `observed` counts against the probabilities (the zero ones left out)."""
    observed = np.asarray(observed, np.float64)
    keep = np.asarray(expected_probs) > 0
    assert observed[~keep].sum() == 0, "drawn where the probability is 0"
    expected = np.asarray(expected_probs)[keep] / np.sum(expected_probs) * observed.sum()
    return stats.chisquare(observed[keep], expected).pvalue


def _counts():
    """Pixels of 5 classes in 40 images: class 0 everywhere (many pixels), class 1 in 10 images
    (200 pixels each), class 2 in 4 (2 of them above 50 pixels), class 3 in 2 images with 10
    pixels each (none above 50), class 4 in none."""
    counts = np.zeros((40, 5), np.int64)
    counts[:, 0] = 5000
    counts[::4, 1] = 200
    counts[[3, 11, 19, 27], 2] = [20, 80, 300, 40]
    counts[[5, 33], 3] = 10
    return counts


# ---------------------------------------------------------------------------------------------
# Rare Class Sampling.


def test_rcs_class_probs_are_the_softmax_of_one_minus_the_pixel_frequency():
    counts = np.array([[600, 60, 10, 0], [300, 30, 0, 0]])  # f = 0.9, 0.09, 0.01; class 3 absent
    for temperature in (0.01, 0.1, 1.0):
        z = [math.exp((1 - f) / temperature) for f in (0.9, 0.09, 0.01)]
        expected = [v / sum(z) for v in z] + [0.0]
        got = sampling.rcs_class_probs(counts, temperature)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300)
    # DAFormer's T = 0.01: the rarest class gets e^8 times the middle one, ~all of the mass.
    probs = sampling.rcs_class_probs(counts, 0.01)
    assert probs[2] > 0.999 and probs[1] / probs[0] == pytest.approx(math.exp(81))


def test_rcs_min_pixels_keep_their_share_of_the_crop():
    data = ml_collections.ConfigDict({"crop_size": (512, 512), "rcs_min_pixels": 3000})
    assert sampling.rcs_min_pixels(data) == 3000  # DAFormer's crop: DAFormer's value
    data.crop_size = (512, 1024)
    assert sampling.rcs_min_pixels(data) == 6000
    data.crop_size = (64, 128)
    assert sampling.rcs_min_pixels(data) == pytest.approx(3000 / 32)


def test_rare_class_sampler_draws_classes_by_p_and_images_holding_enough_of_them():
    counts = _counts()
    probs = np.array([0.1, 0.2, 0.3, 0.25, 0.15])  # class 4 has no image: renormalised away
    sampler = sampling.RareClassSampler(
        {0: counts}, probs, min_pixels=50, batch_per_shard=8, seed=3
    )
    draws = [sampler(0, step) for step in range(500)]
    classes = np.concatenate([d.crop_classes for d in draws])
    images = np.concatenate([d.indices for d in draws])
    assert _chi_square_p(np.bincount(classes, minlength=5), probs * [1, 1, 1, 1, 0]) > P_MIN
    # Images with more than min_pixels of the class, uniformly; class 3 has none above: all of
    # its images (DAFormer would stop there).
    candidates = {0: np.arange(40), 1: np.arange(0, 40, 4), 2: np.array([11, 19]),
                  3: np.array([5, 33])}  # fmt: skip
    for c, members in candidates.items():
        drawn = np.bincount(images[classes == c], minlength=40)
        assert set(np.flatnonzero(drawn)) <= set(members.tolist())
        assert _chi_square_p(drawn[members], np.ones(len(members))) > P_MIN


def test_rare_class_draws_are_pure_functions_of_seed_shard_and_step():
    counts = _counts()
    probs = sampling.rcs_class_probs(counts, 0.5)
    halves = {0: counts[:20], 1: counts[20:]}

    def sampler(shards, seed=0):
        return sampling.RareClassSampler(shards, probs, min_pixels=50, batch_per_shard=4, seed=seed)

    both = sampler(halves)
    # A process owning one shard draws what a process owning both draws for it; resuming at a
    # step draws it again; another seed, shard or step draws something else.
    for shard in (0, 1):
        alone = sampler({shard: halves[shard]})
        for step in (0, 7, 123):
            np.testing.assert_array_equal(alone(shard, step), both(shard, step))
    a = both(0, 7)
    for other in (sampler(halves, seed=1)(0, 7), both(1, 7), both(0, 8)):
        assert not np.array_equal(a.indices, other.indices)


# ---------------------------------------------------------------------------------------------
# Repeat-factor sampling.


def test_repeat_factors_follow_the_lvis_formula():
    presence = np.zeros((10, 3), bool)
    presence[:9, 0] = True  # f = 0.9
    presence[[1, 2], 1] = True  # f = 0.2
    presence[2, 2] = True  # f = 0.1; image 9 has no labelled pixel
    t = 0.5
    class_factor = [max(1.0, math.sqrt(t / f)) for f in (0.9, 0.2, 0.1)]
    expected = [
        max([class_factor[c] for c in range(3) if presence[i, c]], default=1.0) for i in range(10)
    ]
    np.testing.assert_allclose(sampling.repeat_factors(presence, t), expected, rtol=1e-12)
    assert expected[1] == pytest.approx(math.sqrt(2.5)) and expected[2] == pytest.approx(
        math.sqrt(5)
    )
    # LVIS's t = 0.001 repeats no image of a class in more than 0.1% of the images.
    np.testing.assert_array_equal(sampling.repeat_factors(presence, 0.001), np.ones(10))


def test_repeat_factor_epochs_round_stochastically_and_the_stream_follows_r():
    r = np.array([1.0, 1.0, 1.3, 1.5, 2.0, 2.7, 3.25, 1.0, 1.1, 4.0])
    sampler = sampling.RepeatFactorSampler({0: r}, batch_per_shard=8, seed=5)
    epochs = np.array([sampler.repeats(0, e) for e in range(2000)])
    assert ((epochs == np.floor(r)) | (epochs == np.floor(r) + 1)).all()
    q = r - np.floor(r)
    sigma = np.sqrt(q * (1 - q) / len(epochs))
    assert (np.abs(epochs.mean(axis=0) - r) <= 5 * sigma + 1e-12).all()
    # The stream is the epochs one after the other, each in a shuffled order.
    steps = 400
    stream = np.concatenate([sampler(0, step) for step in range(steps)])
    joined = np.concatenate([sampler.epoch(0, e) for e in range(steps * 8 // len(r) + 1)])
    np.testing.assert_array_equal(stream, joined[: len(stream)])
    first = sampler.epoch(0, 0)
    np.testing.assert_array_equal(np.bincount(first, minlength=len(r)), sampler.repeats(0, 0))
    assert not np.array_equal(first, np.sort(first))
    # Image frequencies follow r_i / sum(r) (the epochs make them closer than multinomial
    # draws, so the multinomial chi-square test is conservative).
    assert _chi_square_p(np.bincount(stream, minlength=len(r)), r) > P_MIN


def test_repeat_factor_steps_are_pure_functions_of_seed_shard_and_step():
    factors = {0: np.array([1.0, 2.5, 1.2, 3.0]), 1: np.array([1.7, 1.0, 1.0])}

    def sampler(shards, seed=0):
        return sampling.RepeatFactorSampler(shards, batch_per_shard=4, seed=seed)

    both = sampler(factors)
    sequential = [both(0, step) for step in range(30)]
    for shard in (0, 1):
        alone = sampler({shard: factors[shard]})
        for step in (29, 3, 17):  # resumed at any step, in any order: the same examples
            np.testing.assert_array_equal(alone(shard, step), both(shard, step))
    np.testing.assert_array_equal(sampler(factors)(0, 29), sequential[29])
    assert not np.array_equal(sampler(factors, seed=1)(0, 29), sequential[29])


# ---------------------------------------------------------------------------------------------
# The re-crop.


def _recrop_config(**fields):
    return ml_collections.ConfigDict(
        {
            "crop_size": (16, 32),
            "min_scale": 0.75,
            "max_scale": 1.5,
            "base_size": (),
            "flip": True,
            "photometric": False,
            "mean": (0.5, 0.5, 0.5),
        }
        | fields
    )


def test_recrop_keeps_the_first_crop_that_holds_enough_of_the_class():
    """DAFormer's loop: the first of 10 checked crops with more than min_pixels of the class,
    else the 11th; every crop checked against `train_augment`'s own output."""
    data = _recrop_config()
    label = np.zeros((32, 64, 1), np.uint8)
    label[:12, :20] = 3  # a corner: some crops hold much of it, most little or none
    label, image = tf.constant(label), tf.zeros((32, 64, 3), tf.uint8)
    min_pixels = 60.0
    # Graphs, as in the input pipeline.
    augment = tf.function(
        lambda s: example_transforms.train_augment(image, label, s, data, 255), autograph=False
    )
    recrop = tf.function(
        lambda s, c: example_transforms.rare_class_seed(label, s, c, min_pixels, data),
        autograph=False,
    )

    checks = example_transforms.CROP_CHECKS
    found = {"first": 0, "later": 0, "none": 0}
    for position in range(4):
        seed = tf.constant([7, position], tf.int64)
        attempts = [seed, *tf.random.experimental.stateless_split(seed, checks + 1)[1:]]
        crops = [augment(s)["label"].numpy() for s in attempts[:checks]]
        for c in (3, 5):  # class 5 is absent: every check fails
            passing = [k for k in range(checks) if np.sum(crops[k] == c) > min_pixels]
            k = passing[0] if passing else checks
            found["first" if k == 0 else "none" if not passing else "later"] += 1
            np.testing.assert_array_equal(recrop(seed, tf.constant(c)), attempts[k])
        # No class named: the seed stays, so the crop is the plain pipeline's.
        np.testing.assert_array_equal(recrop(seed, tf.constant(-1)), seed)
    assert all(found.values()), found  # the test saw every branch


# ---------------------------------------------------------------------------------------------
# The input pipeline and the config.


def _dataset(prepared, variant, num_shards=1, index=0, count=1, **fields):
    _, builder, spec = prepared
    config = default.get_config(f"{variant},tiny")
    config.data.data_dir = prepared[0].data.data_dir
    for field, value in fields.items():
        config.data[field] = value
    layout = input_pipeline.Layout(num_shards, index, count)
    return input_pipeline.Dataset(builder, spec, config, layout)


def _take(dataset, n, start_step=0):
    with dataset.train_iterator(start_step=start_step) as batches:
        return [next(batches)["label"] for _ in range(n)]


def test_pipeline_draws_with_the_configured_sampler_and_the_crops_hold_the_rare_classes(
    prepared,
):
    rcs = _dataset(prepared, "rcs", 2)
    assert isinstance(rcs.fixed_sampler(), sampling.RareClassSampler)
    assert isinstance(_dataset(prepared, "repeat_factor").fixed_sampler(),
                      sampling.RepeatFactorSampler)  # fmt: skip
    labels = _take(rcs, 3)
    # Exact resume, and the same global batch whatever the process count.
    parts = [_take(_dataset(prepared, "rcs", 2, p, 2), 2, start_step=1) for p in range(2)]
    for step in (1, 2):
        joined = np.concatenate([parts[0][step - 1], parts[1][step - 1]])
        np.testing.assert_array_equal(joined, labels[step])
    # The re-crop: more crops hold more than min_pixels * min_crop_ratio of their drawn class
    # than without it (same images, same classes).
    plain = _take(_dataset(prepared, "rcs", 2, rcs_min_crop_ratio=0.0), 3)
    threshold = sampling.rcs_min_pixels(rcs.config.data) * rcs.config.data.rcs_min_crop_ratio
    sampler = rcs.fixed_sampler()
    classes = [np.concatenate([sampler(s, step).crop_classes for s in (0, 1)]) for step in range(3)]

    def holding(batches):
        return sum(
            int(np.sum(label == c) > threshold)
            for step, batch in enumerate(batches)
            for label, c in zip(batch, classes[step], strict=True)
        )

    assert holding(labels) > holding(plain)
    assert holding(labels) >= 0.75 * len(labels) * len(labels[0])


def test_repeat_factor_pipeline_resumes_exactly(prepared):
    dataset = _dataset(prepared, "repeat_factor", repeat_factor_threshold=1.0)
    first = _take(dataset, 3)
    np.testing.assert_array_equal(_take(dataset, 1, start_step=2)[0], first[2])


def test_sampling_variants_and_fields():
    assert sampling.method(default.get_config("rcs,tiny").data) == "rcs"
    assert sampling.method(default.get_config("repeat_factor,tiny").data) == "repeat_factor"
    assert sampling.method(default.get_config("stochastic_tce,sampling,tiny").data) == "tilted"
    assert sampling.method(default.get_config("tiny").data) == "uniform"
    for variant in ("rcs", "repeat_factor", "stochastic_tce,sampling"):
        config_lib.validate_config(default.get_config(f"{variant},tiny"))
    config = default.get_config("stochastic_tce,tiny")
    config.data.sampling = "tilted"  # the same as class_aware_sampling=True
    config.loss.batch_loss = "ce"
    config_lib.validate_config(config)


@pytest.mark.parametrize(
    "variant,field,value,message",
    [
        ("", "sampling", "rare", "config.data.sampling='rare' is invalid: expected one of"),
        ("rcs", "class_aware_sampling", True, "expected False with data.sampling='rcs'"),
        ("", "sampling", "tilted", "expected another sampler unless loss.name='stochastic_tce'"),
        ("", "rcs_temperature", 0.0, "config.data.rcs_temperature=0.0 is invalid"),
        ("", "rcs_min_pixels", -1, "config.data.rcs_min_pixels=-1 is invalid"),
        ("", "rcs_min_crop_ratio", float("nan"), "config.data.rcs_min_crop_ratio=nan"),
        ("", "repeat_factor_threshold", 0.0, "config.data.repeat_factor_threshold=0.0 is"),
    ],
)
def test_bad_sampling_fields_name_the_field(variant, field, value, message):
    config = default.get_config(f"{variant},tiny")
    config.data[field] = value
    with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
        config_lib.validate_config(config)
