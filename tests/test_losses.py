"""Tests of tce_jax.losses against an independent numpy float64 reference (docs/maths.md).

Parallel exactness (pmap, sharded jit, shard_map) lives in test_losses_parallel.py.
"""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from tce_jax import losses
from tce_jax.losses import (
    StochasticTCEState,
    class_losses,
    class_sampling_probs,
    class_statistics,
    cross_entropy,
    stochastic_tce,
    stochastic_tce_init,
    tilted_ce,
)
from tce_jax.losses import _statistics as statistics_lib

IGNORE = 255

# ----------------------------------------------------------------------------------------------
# The numpy float64 reference, written from docs/maths.md and nothing else.


def np_valid(labels, num_classes, ignore_index=IGNORE, where=None):
    y = np.asarray(labels).astype(np.int64)
    valid = (y >= 0) & (y < num_classes)
    if ignore_index is not None:
        valid &= y != ignore_index
    if where is not None:
        valid &= np.asarray(where)
    return valid


def np_prior(count, weighting):
    present = count > 0
    if isinstance(weighting, str) and weighting == "frequency":
        raw = count.astype(np.float64)
    elif isinstance(weighting, str) and weighting == "uniform":
        raw = present.astype(np.float64)
    else:
        raw = np.where(present, np.asarray(weighting, np.float64), 0.0)
    return raw / raw.sum() if raw.sum() > 0 else raw


def np_tilted(values, prior, t):
    """(TCE_t, weights) over the support of a normalised prior, float64."""
    support = prior > 0
    weights = np.zeros_like(values)
    if not support.any():
        return 0.0, weights
    if t == 0:
        return float(np.sum(prior * values)), prior.copy()
    scores = t * values[support] + np.log(prior[support])
    top = scores.max()
    e = np.exp(scores - top)
    weights[support] = e / e.sum()
    return float((top + np.log(e.sum())) / t), weights


def np_tce(logits, labels, *, t, tau=0.0, weighting="frequency", ignore_index=IGNORE,
           where=None):
    """Returns dict(loss, grad, class_loss, count, weight, num_invalid) in float64.

    The gradient is analytic: dTCE/dz_i = w_c a_i (softmax(z_i) - onehot(y_i)) with c = y_i and
    a_i = dL_c/dl_i = 1/n_c (tau = 0) or exp(tau l_i) / sum_{y_j = c} exp(tau l_j).
    """
    z = np.asarray(logits, np.float64)
    num_classes = z.shape[-1]
    zf = z.reshape(-1, num_classes)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    considered = np.ones(y.shape, bool) if where is None else np.asarray(where).reshape(-1)
    valid = np_valid(y, num_classes, ignore_index, considered)
    labelled = considered if ignore_index is None else considered & (y != ignore_index)
    num_invalid = int(np.sum(labelled & ~valid))
    top = zf.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(zf - top).sum(-1))
    probs = np.exp(zf - lse[:, None])
    yi = np.where(valid, y, 0)
    pixel = lse - zf[np.arange(len(y)), yi]
    count = np.bincount(y[valid], minlength=num_classes)
    class_loss = np.zeros(num_classes)
    dldpix = np.zeros(len(y))
    for c in range(num_classes):
        idx = valid & (y == c)
        if not idx.any():
            continue
        if tau == 0:
            class_loss[c] = pixel[idx].mean()
            dldpix[idx] = 1.0 / idx.sum()
        else:
            s = tau * pixel[idx]
            e = np.exp(s - s.max())
            class_loss[c] = (s.max() + np.log(e.mean())) / tau
            dldpix[idx] = e / e.sum()
    prior = np_prior(count, weighting)
    loss, weight = np_tilted(class_loss, prior, t)
    onehot = np.eye(num_classes)[yi]
    grad = (weight[yi] * dldpix * valid)[:, None] * (probs - onehot)
    return dict(loss=loss, grad=grad.reshape(z.shape), class_loss=class_loss, count=count,
                weight=weight, num_invalid=num_invalid)


def np_ce(logits, labels, ignore_index=IGNORE, where=None):
    r = np_tce(logits, labels, t=0.0, ignore_index=ignore_index, where=where)
    return r["loss"]


def make_case(seed, shape, num_classes, *, skew=0.0, absent=(), ignore_frac=0.1,
              invalid_frac=0.0, scale=2.0, dtype=np.float32):
    """Random logits/labels: skewed class frequencies, absent classes, ignored/invalid pixels."""
    rng = np.random.default_rng(seed)
    p = np.exp(-skew * np.arange(num_classes))
    p[list(absent)] = 0.0
    labels = rng.choice(num_classes, size=shape, p=p / p.sum()).astype(np.int32)
    r = rng.random(shape)
    labels[r < ignore_frac] = IGNORE
    bad = (r >= ignore_frac) & (r < ignore_frac + invalid_frac)
    labels[bad] = rng.choice([-1, num_classes, num_classes + 7], size=int(bad.sum()))
    # A per-class offset so that the class losses differ.
    logits = rng.normal(size=shape + (num_classes,)) * scale + rng.normal(size=num_classes)
    return logits.astype(dtype), labels


CASES = {
    "flat": dict(seed=0, shape=(40,), num_classes=3),
    "skewed_absent": dict(seed=1, shape=(3, 5, 6), num_classes=8, skew=0.6, absent=(2, 5),
                          ignore_frac=0.15, invalid_frac=0.05),
    "many_classes": dict(seed=2, shape=(2, 4, 4), num_classes=21, skew=0.15, absent=(0,)),
    "images": dict(seed=3, shape=(2, 3, 4, 5), num_classes=4, skew=1.5, ignore_frac=0.3),
}
T_VALUES = (-3.0, 0.0, 1e-3, 0.5, 2.0, 10.0)


def vector_weights(num_classes, seed=7):
    return np.random.default_rng(seed).uniform(0.2, 3.0, size=num_classes).astype(np.float32)


def weighting_arg(weighting, num_classes):
    return vector_weights(num_classes) if weighting == "vector" else weighting


@functools.partial(jax.jit, static_argnames=("tau", "weighting", "ignore_index"))
def tce_vg(logits, labels, t, vec, where=None, *, tau=0.0, weighting="frequency",
           ignore_index=IGNORE):
    """Jitted value, aux and logits-gradient of tilted_ce; t (and the weight vector) traced."""
    cw = vec if weighting == "vector" else weighting

    def f(z):
        return tilted_ce(z, labels, t=t, tau=tau, class_weighting=cw, ignore_index=ignore_index,
                         where=where, return_aux=True)

    (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(logits)
    return loss, aux, grad


# Eager calls compile every primitive separately; the tests mostly go through these.
jit_tce = jax.jit(tilted_ce, static_argnames=("tau", "class_weighting", "ignore_index",
                                              "return_aux"))
jit_ce = jax.jit(cross_entropy, static_argnames=("ignore_index",))


def assert_matches_reference(logits, labels, *, t, tau, weighting, where=None,
                             ignore_index=IGNORE, rtol=2e-5, gtol=1e-4):
    num_classes = logits.shape[-1]
    vec = vector_weights(num_classes)
    loss, aux, grad = tce_vg(logits, labels, t, vec, where, tau=tau, weighting=weighting,
                             ignore_index=ignore_index)
    ref = np_tce(np.asarray(logits, np.float64), labels, t=t, tau=tau,
                 weighting=weighting_arg(weighting, num_classes), where=where,
                 ignore_index=ignore_index)
    context = f"t={t} tau={tau} weighting={weighting}"
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, ref["loss"], rtol=rtol, atol=rtol, err_msg=context)
    np.testing.assert_array_equal(aux["class_count"], ref["count"], err_msg=context)
    np.testing.assert_allclose(aux["class_loss"], ref["class_loss"], rtol=rtol, atol=rtol,
                               err_msg=context)
    np.testing.assert_allclose(aux["class_weight"], ref["weight"], rtol=1e-4, atol=1e-6,
                               err_msg=context)
    assert int(aux["num_invalid"]) == ref["num_invalid"]
    scale = np.abs(ref["grad"]).max() + 1e-12
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref["grad"], rtol=gtol,
                               atol=gtol * scale, err_msg=context)
    return ref


# ----------------------------------------------------------------------------------------------
# Values and gradients against the reference.


def test_reference_gradient_matches_finite_differences():
    """The analytic gradient of the numpy reference is itself right (central differences)."""
    logits, labels = make_case(11, (12,), 4, skew=0.5, ignore_frac=0.2)
    logits = logits.astype(np.float64)
    for tau, weighting, t in [(0.0, "frequency", 1.5), (0.8, "uniform", -2.0),
                              (-1.2, vector_weights(4), 0.0)]:
        ref = np_tce(logits, labels, t=t, tau=tau, weighting=weighting)
        numeric = np.zeros_like(logits)
        eps = 1e-6
        for idx in np.ndindex(logits.shape):
            up, down = logits.copy(), logits.copy()
            up[idx] += eps
            down[idx] -= eps
            numeric[idx] = (np_tce(up, labels, t=t, tau=tau, weighting=weighting)["loss"]
                            - np_tce(down, labels, t=t, tau=tau, weighting=weighting)["loss"]
                            ) / (2 * eps)
        np.testing.assert_allclose(ref["grad"], numeric, atol=1e-7)


@pytest.mark.parametrize("weighting", ["frequency", "uniform", "vector"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tilted_ce_matches_reference(case, weighting):
    logits, labels = make_case(**CASES[case])
    for t in T_VALUES:
        assert_matches_reference(logits, labels, t=t, tau=0.0, weighting=weighting)


@pytest.mark.parametrize("tau", [0.7, -1.5])  # a large tau: test_large_tilt_is_finite
@pytest.mark.parametrize("case", ["skewed_absent", "images"])
def test_pixel_tilt_matches_reference(case, tau):
    logits, labels = make_case(**CASES[case])
    for weighting in ("frequency", "uniform"):
        for t in (-1.0, 0.0, 2.0):
            assert_matches_reference(logits, labels, t=t, tau=tau, weighting=weighting)


def test_python_float_and_traced_t_agree():
    logits, labels = make_case(**CASES["images"])
    eager = tilted_ce(logits, labels, t=2.0)
    jitted = jax.jit(lambda t: tilted_ce(logits, labels, t=t))(2.0)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    as_array = tilted_ce(logits, labels, t=np.float32(2.0))
    np.testing.assert_allclose(eager, as_array, rtol=1e-6)


def test_check_grads_float64():
    """Finite differences in float64 (float64 logits stay float64 under jax_enable_x64)."""
    logits, labels = make_case(5, (3, 4), 4, skew=0.5, ignore_frac=0.2)
    with jax.enable_x64(True):
        z = jnp.asarray(logits, jnp.float64)
        for order, modes, kwargs in ((2, ("rev",), dict(t=1.5)),
                                     (1, ("fwd", "rev"), dict(t=-2.0, tau=0.9)),
                                     (1, ("rev",), dict(t=0.0, class_weighting="uniform")),
                                     (1, ("rev",), dict(t=1e-3))):
            check_grads(jax.jit(lambda z, kw=kwargs: tilted_ce(z, labels, **kw)), (z,),
                        order=order, modes=modes)
        check_grads(jax.jit(lambda z: cross_entropy(z, labels)), (z,), order=1, modes=("rev",))
        assert jit_tce(z, labels, t=1.0).dtype == jnp.float64


# ----------------------------------------------------------------------------------------------
# The properties docs/maths.md lists.


@pytest.mark.parametrize("case", ["skewed_absent", "images"])
def test_t0_frequency_is_mean_cross_entropy(case):
    logits, labels = make_case(**CASES[case])
    valid = np_valid(labels, logits.shape[-1])
    per_pixel = optax.losses.softmax_cross_entropy_with_integer_labels(logits[valid],
                                                                       labels[valid])
    expected = float(jnp.mean(per_pixel))
    loss, _, g_tce = tce_vg(logits, labels, 0.0, None)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    ce, g_ce = jax.jit(jax.value_and_grad(cross_entropy))(logits, labels)
    np.testing.assert_allclose(ce, expected, rtol=1e-6)
    np.testing.assert_allclose(ce, np_ce(logits, labels), rtol=1e-6)
    np.testing.assert_allclose(g_tce, g_ce, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("weighting", ["frequency", "uniform", "vector"])
def test_limits_in_t(weighting):
    logits, labels = make_case(**CASES["skewed_absent"])
    cw = weighting_arg(weighting, logits.shape[-1])
    vec = vector_weights(logits.shape[-1])
    ref = np_tce(logits, labels, t=1.0, weighting=cw)
    present = ref["count"] > 0
    prior = np_prior(ref["count"], cw)
    worst, best = ref["class_loss"][present].max(), ref["class_loss"][present].min()
    for t in (1e3, 1e4, 1e6):
        value = float(tce_vg(logits, labels, t, vec, weighting=weighting)[0])
        # TCE_t lies in [max L + log(pi_max)/t, max L].
        slack = -np.log(prior[present].min()) / t + 1e-5
        assert worst - slack <= value <= worst + 1e-5, (t, value, worst)
        value = float(tce_vg(logits, labels, -t, vec, weighting=weighting)[0])
        assert best - 1e-5 <= value <= best + slack, (-t, value, best)


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_monotone_in_t(tau):
    logits, labels = make_case(**CASES["skewed_absent"])
    ts = np.concatenate([np.linspace(-40.0, 40.0, 41), [-1e-4, -1e-6, 1e-6, 1e-4]])
    ts = np.sort(ts).astype(np.float32)
    values = jax.jit(jax.vmap(lambda t: tilted_ce(logits, labels, t=t, tau=tau)))(ts)
    assert np.all(np.diff(np.asarray(values)) >= -1e-6), values
    # Precise through t = 0, where (1/t) log(...) would cancel catastrophically.
    near_zero = np.abs(ts) < 1e-3
    expected = [np_tce(logits, labels, t=float(t), tau=tau)["loss"] for t in ts[near_zero]]
    np.testing.assert_allclose(values[near_zero], expected, rtol=0, atol=2e-6)


def test_permutation_of_class_ids():
    logits, labels = make_case(**CASES["skewed_absent"])
    num_classes = logits.shape[-1]
    perm = np.random.default_rng(0).permutation(num_classes)  # new class j = old class perm[j]
    inverse = np.argsort(perm)
    valid = np_valid(labels, num_classes)
    new_labels = np.where(valid, inverse[np.where(valid, labels, 0)], labels)
    new_logits = logits[..., perm]
    vec = vector_weights(num_classes)
    for weighting in ("frequency", "uniform", "vector"):
        loss, aux, grad = tce_vg(logits, labels, 1.5, vec, weighting=weighting)
        loss_p, aux_p, grad_p = tce_vg(new_logits, new_labels, 1.5, vec[perm],
                                       weighting=weighting)
        np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
        np.testing.assert_allclose(aux_p["class_weight"], aux["class_weight"][perm], rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(grad_p, grad[..., perm], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("weighting", ["frequency", "uniform", "vector"])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_no_valid_pixel_gives_zero_loss_and_gradient(weighting, tau):
    logits, labels = make_case(8, (2, 3, 3), 4)
    num_classes = logits.shape[-1]
    vec = vector_weights(num_classes)
    everywhere = np.ones(labels.shape, bool)  # (one compilation for the three inputs)
    inputs = [
        (np.full_like(labels, IGNORE), everywhere),  # all ignored
        (labels, np.zeros(labels.shape, bool)),  # all masked out
        (np.full_like(labels, num_classes), everywhere),  # all out of range
    ]
    for bad_labels, where in inputs:
        for t in (-100.0, 0.0, 1.0, 100.0):
            loss, aux, grad = tce_vg(logits, bad_labels, t, vec, where, tau=tau,
                                     weighting=weighting)
            assert float(loss) == 0.0
            assert np.all(np.asarray(grad) == 0.0)
            for value in aux.values():
                assert np.all(np.isfinite(np.asarray(value, np.float64)))
            np.testing.assert_array_equal(aux["class_weight"], 0.0)
    loss, grad = jax.jit(jax.value_and_grad(cross_entropy))(logits, np.full_like(labels, IGNORE))
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_where_mask():
    logits, labels = make_case(**CASES["images"])
    where = np.random.default_rng(1).random(labels.shape) < 0.6
    masked = np.where(where, labels, IGNORE)
    for t in (-1.0, 0.0, 3.0):
        ref = assert_matches_reference(logits, labels, t=t, tau=0.0, weighting="frequency",
                                       where=where)
        np.testing.assert_allclose(jit_tce(logits, masked, t=t), ref["loss"], rtol=2e-5)
        np.testing.assert_allclose(jit_tce(logits, labels, t=t, where=where),
                                   jit_tce(logits, masked, t=t), rtol=1e-6)
    np.testing.assert_allclose(jit_ce(logits, labels, where=where),
                               np_ce(logits, labels, where=where), rtol=1e-6)


def test_invalid_labels_are_ignored_and_counted():
    logits, labels = make_case(9, (30,), 4, ignore_frac=0.0)
    labels[:3] = [-1, 4, 99]  # out of range: ignored, counted
    labels[3:5] = IGNORE  # ignore label: ignored, not counted
    where = np.ones(labels.shape, bool)
    where[0] = False  # masked out: not counted
    loss, aux = jit_tce(logits, labels, t=1.0, where=where, return_aux=True)
    assert int(aux["num_invalid"]) == 2
    clean = np.where(np_valid(labels, 4, where=where), labels, IGNORE)
    np.testing.assert_allclose(loss, jit_tce(logits, clean, t=1.0), rtol=1e-6)
    stats = class_statistics(logits, labels, ignore_index=None)
    assert int(stats.num_invalid) == 5  # 255 is out of range too when nothing is ignored
    # uint8 labels (common for segmentation masks) behave the same.
    u8 = np.where(labels < 0, IGNORE, labels).astype(np.uint8)
    _, aux8 = jit_tce(logits, u8, t=1.0, return_aux=True)
    np.testing.assert_array_equal(aux8["class_count"], np.bincount(
        u8[u8 < 4], minlength=4))


@pytest.mark.parametrize("t", [-2.0, 1.0, 100.0])
def test_bfloat16_logits(t):
    logits, labels = make_case(**CASES["skewed_absent"])
    z16 = jnp.asarray(logits, jnp.bfloat16)
    loss, grad = tce_vg(z16, labels, t, None)[::2]
    assert loss.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    ref = np_tce(np.asarray(z16.astype(jnp.float32), np.float64), labels, t=t)
    np.testing.assert_allclose(loss, ref["loss"], rtol=2e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref["grad"], rtol=2e-2,
                               atol=1e-2 * np.abs(ref["grad"]).max())


@pytest.mark.parametrize("t", [-100.0, 100.0])
@pytest.mark.parametrize("tau", [0.0, 5.0])
def test_large_tilt_is_finite(t, tau):
    logits, labels = make_case(4, (3, 5, 5), 6, skew=0.5, scale=10.0)
    assert_matches_reference(logits, labels, t=t, tau=tau, weighting="frequency")
    for dtype in (jnp.bfloat16, jnp.float16):
        loss, _, grad = tce_vg(jnp.asarray(logits, dtype), labels, t, None, tau=tau)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_vmap_gives_per_example_tce():
    logits, labels = make_case(**CASES["images"])
    values = jax.jit(jax.vmap(lambda z, y: tilted_ce(z, y, t=2.0, class_weighting="uniform")))(
        logits, labels)
    expected = [np_tce(logits[i], labels[i], t=2.0, weighting="uniform")["loss"]
                for i in range(len(labels))]
    np.testing.assert_allclose(values, expected, rtol=2e-5)
    grads = jax.jit(jax.vmap(jax.grad(lambda z, y: tilted_ce(z, y, t=2.0))))(logits, labels)
    for i in range(len(labels)):
        ref = np_tce(logits[i], labels[i], t=2.0)["grad"]
        np.testing.assert_allclose(grads[i], ref, rtol=1e-4, atol=1e-6)


def test_class_statistics_and_losses():
    logits, labels = make_case(**CASES["skewed_absent"])
    ref = np_tce(logits, labels, t=0.0)
    stats_fn = jax.jit(class_statistics, static_argnames=("tau",))
    stats = stats_fn(logits, labels)
    np.testing.assert_array_equal(stats.count, ref["count"])
    np.testing.assert_allclose(stats.loss_sum, ref["class_loss"] * ref["count"], rtol=1e-5)
    np.testing.assert_array_equal(stats.shift, 0.0)
    np.testing.assert_allclose(class_losses(stats), ref["class_loss"], rtol=1e-5)
    assert int(stats.num_invalid) == ref["num_invalid"]
    for tau in (2.0, -2.0):
        ref = np_tce(logits, labels, t=0.0, tau=tau)
        stats = stats_fn(logits, labels, tau=tau)
        np.testing.assert_allclose(class_losses(stats, tau=tau), ref["class_loss"], rtol=1e-5)
        absent = ref["count"] == 0
        np.testing.assert_array_equal(stats.shift[absent], 0.0)
        np.testing.assert_array_equal(stats.loss_sum[absent], 0.0)
        assert np.all(np.asarray(stats.loss_sum)[~absent] >= 1.0)  # the max term is exp(0)


def test_docstring_examples():
    from tce_jax.losses import tilted

    result = doctest.testmod(tilted, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------------------
# Stochastic TCE.


def _batch(seed, classes, num_classes=5, shape=(2, 4, 4)):
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.asarray(classes), size=shape).astype(np.int32)
    labels[rng.random(shape) < 0.1] = IGNORE
    logits = (rng.normal(size=shape + (num_classes,)) * 2).astype(np.float32)
    return logits, labels


STOCHASTIC_OPTIONS = ("weighting", "estimator", "batch_loss")


@functools.partial(jax.jit, static_argnames=STOCHASTIC_OPTIONS)
def stce(logits, labels, state, t, lam, *, weighting="frequency", estimator="ema",
         batch_loss="tilted"):
    """Jitted stochastic_tce with traced t and lam; 'vector' uses vector_weights(C)."""
    cw = weighting_arg(weighting, logits.shape[-1])
    return stochastic_tce(logits, labels, state, t=t, lam=lam, class_weighting=cw,
                          estimator=estimator, batch_loss=batch_loss)


@functools.partial(jax.jit, static_argnames=STOCHASTIC_OPTIONS)
def stce_vg(logits, labels, state, t, lam, *, weighting="frequency", estimator="ema",
            batch_loss="tilted"):
    """Value, (new_state, aux) and logits-gradient of the stochastic surrogate."""

    def f(z):
        loss, new_state, aux = stochastic_tce(z, labels, state, t=t, lam=lam,
                                              class_weighting=weighting_arg(weighting,
                                                                            z.shape[-1]),
                                              estimator=estimator, batch_loss=batch_loss)
        return loss, (new_state, aux)

    (loss, (new_state, aux)), grad = jax.value_and_grad(f, has_aux=True)(logits)
    return loss, new_state, aux, grad


def test_stochastic_state_update_semantics():
    num_classes, lam, t = 5, 0.25, 1.5
    state = stochastic_tce_init(num_classes)
    assert not np.any(state.seen) and int(state.step) == 0
    z1, y1 = _batch(0, [0, 1])
    ref1 = np_tce(z1, y1, t=t)
    _, s1, aux1 = stce(z1, y1, state, t, lam)
    # First sighting: R_c = L_c^B; unseen classes stay at 0.
    np.testing.assert_array_equal(s1.seen, [True, True, False, False, False])
    np.testing.assert_allclose(s1.running_loss, ref1["class_loss"], rtol=1e-5)
    freq1 = ref1["count"] / ref1["count"].sum()
    np.testing.assert_allclose(s1.running_freq, lam * freq1, rtol=1e-6)
    assert int(s1.step) == 1
    z2, y2 = _batch(1, [1, 2])
    ref2 = np_tce(z2, y2, t=t)
    loss2, s2, aux2 = stce(z2, y2, s1, t, lam)
    expected_r = np.array(s1.running_loss, np.float64)
    expected_r[1] = (1 - lam) * expected_r[1] + lam * ref2["class_loss"][1]
    expected_r[2] = ref2["class_loss"][2]  # first sighting
    np.testing.assert_allclose(s2.running_loss, expected_r, rtol=1e-5)
    assert float(s2.running_loss[0]) == float(s1.running_loss[0])  # absent: kept
    expected_f = (1 - lam) * np.asarray(s1.running_freq) + lam * ref2["count"] / ref2[
        "count"].sum()
    np.testing.assert_allclose(s2.running_freq, expected_f, rtol=1e-6)
    np.testing.assert_array_equal(s2.seen, [True, True, True, False, False])
    # The state weights, the surrogate and the objective.
    f_norm = expected_f / expected_f.sum()
    objective, weights = np_tilted(expected_r, f_norm, t)
    np.testing.assert_allclose(aux2["class_weight"], weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux2["objective"], objective, rtol=1e-5)
    batch_w = weights * (ref2["count"] > 0)
    np.testing.assert_allclose(
        loss2, np.sum(batch_w * ref2["class_loss"]) / batch_w.sum(), rtol=1e-5)
    np.testing.assert_allclose(aux2["class_loss"], ref2["class_loss"], rtol=1e-5)
    np.testing.assert_array_equal(aux2["class_count"], ref2["count"])
    # t = 0: the objective is the f-weighted mean of R.
    _, _, aux0 = stce(z2, y2, s1, 0.0, lam)
    np.testing.assert_allclose(aux0["objective"], np.sum(f_norm * expected_r), rtol=1e-5)


@pytest.mark.parametrize("weighting", ["uniform", "vector"])
def test_stochastic_uniform_and_vector_priors(weighting):
    num_classes, lam = 5, 0.5
    z1, y1 = _batch(0, [0, 3])
    z2, y2 = _batch(1, [1])
    _, state, _ = stce(z1, y1, stochastic_tce_init(num_classes), 1.0, lam, weighting=weighting)
    _, state, aux = stce(z2, y2, state, 1.0, lam, weighting=weighting)
    seen = np.array([True, True, False, True, False])
    base = np.ones(num_classes) if weighting == "uniform" else vector_weights(num_classes)
    np.testing.assert_allclose(state.running_freq, np.where(seen, base, 0.0), rtol=1e-6)
    _, weights = np_tilted(np.asarray(state.running_loss, np.float64),
                           np_prior(seen.astype(int), np.where(seen, base, 0.0)), 1.0)
    np.testing.assert_allclose(aux["class_weight"], weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weighting", ["frequency", "uniform", "vector"])
def test_stochastic_lam_one_is_batch_tce(weighting):
    num_classes = 5
    z0, y0 = _batch(3, [0, 1, 2, 3, 4])
    _, state, _ = stce(z0, y0, stochastic_tce_init(num_classes), 2.0, 0.3, weighting=weighting)
    z, y = _batch(4, [1, 2, 4])  # classes 0 and 3 seen before but absent now
    loss, new_state, aux, grad = stce_vg(z, y, state, 2.0, 1.0, weighting=weighting)
    ref = np_tce(z, y, t=2.0, weighting=weighting_arg(weighting, num_classes))
    np.testing.assert_allclose(grad, ref["grad"], rtol=1e-4, atol=1e-6)
    present = ref["count"] > 0
    w = np.asarray(aux["class_weight"], np.float64)
    np.testing.assert_allclose(w[present] / w[present].sum(), ref["weight"][present],
                               rtol=1e-5)
    if weighting == "frequency":  # absent classes have f = 0: the weights are the batch ones
        np.testing.assert_allclose(w, ref["weight"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_state.running_loss[present], ref["class_loss"][present],
                               rtol=1e-5)
    np.testing.assert_allclose(loss, np.sum(ref["weight"] * ref["class_loss"]), rtol=1e-5)


def test_stochastic_state_gets_no_gradient():
    z, y = _batch(5, [0, 2, 3])
    _, state, _ = stce(z, y, stochastic_tce_init(5), 1.0, 0.5)

    def through_state(running_loss):
        s = state._replace(running_loss=running_loss)
        loss, new_state, aux = stochastic_tce(z, y, s, t=3.0, lam=0.5)
        return loss + jnp.sum(new_state.running_loss) + aux["objective"]

    np.testing.assert_array_equal(jax.jit(jax.grad(through_state))(state.running_loss), 0.0)

    def new_state_of_logits(z):
        _, new_state, aux = stochastic_tce(z, y, state, t=3.0, lam=0.5)
        return jnp.sum(new_state.running_loss) + jnp.sum(new_state.running_freq) + aux[
            "objective"]

    np.testing.assert_array_equal(jax.jit(jax.grad(new_state_of_logits))(z), 0.0)


def test_stochastic_no_valid_pixel():
    z, y = _batch(6, [0, 1])
    _, state, _ = stce(z, y, stochastic_tce_init(5), 1.0, 0.5)
    ignored = np.full_like(y, IGNORE)
    for t in (-100.0, 0.0, 100.0):
        loss, new_state, _, grad = stce_vg(z, ignored, state, t, 0.5)
        assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
        for a, b in zip(new_state[:3], state[:3], strict=True):
            np.testing.assert_array_equal(a, b)
        assert int(new_state.step) == int(state.step) + 1
    loss, new_state, aux = stce(z, ignored, stochastic_tce_init(5), 1.0, 0.5)
    assert float(loss) == 0.0 and float(aux["objective"]) == 0.0


def test_stochastic_eager_python_floats_match_jit():
    z, y = _batch(7, [0, 1, 4])
    loss, state, _ = stce(z, y, stochastic_tce_init(5), 1.0, 0.5)
    loss_e, state_e, _ = stochastic_tce(z, y, stochastic_tce_init(5), t=1.0, lam=0.5)
    np.testing.assert_allclose(loss, loss_e, rtol=1e-6)
    np.testing.assert_allclose(state.running_loss, state_e.running_loss, rtol=1e-6)
    assert jax.tree.map(lambda a: a.dtype, state) == jax.tree.map(
        lambda a: a.dtype, stochastic_tce_init(5))


def test_class_sampling_probs():
    num_classes = 5
    state = stochastic_tce_init(num_classes)
    np.testing.assert_allclose(class_sampling_probs(state, t=1.0, mix=0.2), 0.2)
    state = StochasticTCEState(
        running_loss=jnp.array([0.5, 3.0, 1.0, 2.0, 9.0]),
        running_freq=jnp.array([0.4, 0.1, 0.3, 0.2, 0.0]),
        seen=jnp.array([True, True, True, True, False]),
        step=jnp.array(3, jnp.int32))
    for t in (-2.0, 0.0, 1.0, 50.0):
        for mix in (0.0, 0.3, 1.0):
            for weighting in ("frequency", "uniform", "vector"):
                cw = weighting_arg(weighting, num_classes)
                probs = np.asarray(class_sampling_probs(state, t=t, mix=mix,
                                                        class_weighting=cw), np.float64)
                np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
                seen = np.asarray(state.seen)
                f = {"frequency": np.asarray(state.running_freq),
                     "uniform": np.ones(num_classes), "vector": cw}[weighting]
                _, w = np_tilted(np.asarray(state.running_loss, np.float64),
                                 np_prior(seen.astype(int), np.where(seen, f, 0.0)), t)
                np.testing.assert_allclose(probs, (1 - mix) * w + mix / num_classes,
                                           rtol=1e-5, atol=1e-7)
    # t > 0 prefers the high-loss classes (uniform prior: ordered as R over the seen classes).
    probs = np.asarray(class_sampling_probs(state, t=1.0, mix=0.1, class_weighting="uniform"))
    order = np.argsort(np.asarray(state.running_loss)[:4])
    assert np.all(np.diff(probs[:4][order]) > 0)
    assert probs[4] == pytest.approx(0.1 / num_classes)  # unseen: only the uniform share


def test_stochastic_nonfinite_batch_leaves_the_state_unchanged():
    """A NaN batch, then a finite one: the same state as the finite batch alone."""
    num_classes, t, lam = 5, 1.5, 0.25
    z1, y1 = _batch(10, [0, 1, 2])
    z2, y2 = _batch(11, [1, 3])
    labelled = np.argwhere(y2 != IGNORE)
    nan_logits = z2.copy()
    nan_logits[tuple(labelled[0])] = np.nan  # one pixel: its class loss (the batch) is NaN
    inf_logits = z2.copy()
    inf_logits[tuple(labelled[-1]) + (0,)] = np.inf  # its loss is inf - inf
    _, s1, aux1 = stce(z1, y1, stochastic_tce_init(num_classes), t, lam)
    assert not bool(aux1["nonfinite_batch"])
    expected_loss, expected, _ = stce(z2, y2, s1, t, lam)
    for broken in (nan_logits, inf_logits):
        loss, skipped, aux = stce(broken, y2, s1, t, lam)
        assert bool(aux["nonfinite_batch"]) and not np.isfinite(float(loss))
        for got, want in zip(skipped, s1, strict=True):  # R, f, seen and step as before
            np.testing.assert_array_equal(got, want)
        assert np.isfinite(float(aux["objective"]))  # the running risk of the kept state
        after_loss, after, after_aux = stce(z2, y2, skipped, t, lam)
        assert not bool(after_aux["nonfinite_batch"])
        np.testing.assert_array_equal(after_loss, expected_loss)
        for got, want in zip(after, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    # And the finite update itself is the reference one (first sighting of class 3).
    ref = np_tce(z2, y2, t=t)
    np.testing.assert_allclose(expected.running_loss[3], ref["class_loss"][3], rtol=1e-5)
    np.testing.assert_allclose(
        expected.running_loss[1],
        (1 - lam) * s1.running_loss[1] + lam * ref["class_loss"][1],
        rtol=1e-5,
    )


def np_tilted_average(old, new, lam, t):
    """TERM's running tilted average (1/t) log((1 - lam) e^{t old} + lam e^{t new}), float64."""
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    if t == 0:
        return (1 - lam) * old + lam * new
    top = np.maximum(t * old, t * new)
    return (top + np.log((1 - lam) * np.exp(t * old - top) + lam * np.exp(t * new - top))) / t


@pytest.mark.parametrize("t", [-2.0, 0.0, 0.5, 3.0, 60.0])
def test_stochastic_tilted_estimator_matches_float64_reference(t):
    """Five batches (classes appearing and disappearing): the running losses, the state
    weights and the surrogate follow TERM's tilted running average computed in float64."""
    num_classes, lam = 5, 0.3
    state = stochastic_tce_init(num_classes)
    running = np.zeros(num_classes)
    seen = np.zeros(num_classes, bool)
    freq = np.zeros(num_classes)
    for step, classes in enumerate([[0, 1], [1, 2, 3], [0, 3], [4, 1], [0, 1, 2, 3, 4]]):
        z, y = _batch(20 + step, classes)
        z = z * 3  # class losses spread over several nats: large t (L_c - R_c) arguments
        ref = np_tce(z, y, t=t)
        present = ref["count"] > 0
        average = np_tilted_average(running, ref["class_loss"], lam, t)
        running = np.where(present, np.where(seen, average, ref["class_loss"]), running)
        seen |= present
        freq = (1 - lam) * freq + lam * ref["count"] / ref["count"].sum()
        loss, state, aux = stce(z, y, state, t, lam, estimator="tilted")
        np.testing.assert_allclose(state.running_loss, running, rtol=2e-5, atol=1e-5)
        _, weights = np_tilted(running, np_prior(seen.astype(int), np.where(seen, freq, 0)), t)
        np.testing.assert_allclose(aux["class_weight"], weights, rtol=1e-4, atol=1e-7)
        batch_w = weights * present
        np.testing.assert_allclose(
            loss, np.sum(batch_w * ref["class_loss"]) / batch_w.sum(), rtol=1e-4, atol=1e-6)
    assert np.isfinite(np.asarray(state.running_loss)).all()


def test_stochastic_tilted_estimator_tends_to_the_ema_as_t_goes_to_zero():
    num_classes, lam = 5, 0.3
    z1, y1 = _batch(30, [0, 1, 2])
    z2, y2 = _batch(31, [1, 2, 3])
    _, s1, _ = stce(z1, y1, stochastic_tce_init(num_classes), 0.0, lam)
    _, ema, _ = stce(z2, y2, s1, 0.0, lam, estimator="ema")
    _, at_zero, _ = stce(z2, y2, s1, 0.0, lam, estimator="tilted")
    np.testing.assert_array_equal(at_zero.running_loss, ema.running_loss)
    for t in (1e-3, -1e-3, 1e-6):
        _, near, _ = stce(z2, y2, s1, t, lam, estimator="tilted")
        spread = np.ptp(np.asarray(s1.running_loss)) + 1.0
        np.testing.assert_allclose(near.running_loss, ema.running_loss,
                                   atol=abs(t) * spread ** 2 + 1e-6)
    # Above the EMA for t > 0 (a log-mean-exp), below it for t < 0, where a class changed.
    _, up, _ = stce(z2, y2, s1, 2.0, lam, estimator="tilted")
    _, down, _ = stce(z2, y2, s1, -2.0, lam, estimator="tilted")
    changed = np.asarray(s1.seen & (np.abs(ema.running_loss - s1.running_loss) > 1e-3))
    assert changed.any()
    assert np.all(np.asarray(up.running_loss)[changed] > np.asarray(ema.running_loss)[changed])
    assert np.all(np.asarray(down.running_loss)[changed] < np.asarray(ema.running_loss)[changed])


@pytest.mark.parametrize("estimator", ["ema", "tilted"])
def test_stochastic_batch_loss_ce_is_cross_entropy_with_the_same_state(estimator):
    """batch_loss='ce': value and gradient of plain CE over the batch; the state (and the
    weights the sampler reads) are those of the tilted form."""
    num_classes, t, lam = 5, 2.0, 0.3
    z0, y0 = _batch(40, [0, 1, 2, 3])
    _, state, _ = stce(z0, y0, stochastic_tce_init(num_classes), t, lam, estimator=estimator)
    z, y = _batch(41, [1, 2, 4])
    loss, new_state, aux, grad = stce_vg(z, y, state, t, lam, estimator=estimator,
                                         batch_loss="ce")
    ce_loss, ce_grad = jax.value_and_grad(cross_entropy)(z, y)
    np.testing.assert_allclose(loss, ce_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, ce_grad, rtol=1e-5, atol=1e-8)
    ref = np_tce(z, y, t=0.0)
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)  # TCE_0 with counts: the mean
    _, tilted_state, tilted_aux = stce(z, y, state, t, lam, estimator=estimator)
    for got, want in zip(new_state, tilted_state, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(aux["class_weight"], tilted_aux["class_weight"])


def test_stochastic_rejects_unknown_estimator_and_batch_loss():
    z, y = _batch(0, [0, 1])
    state = stochastic_tce_init(5)
    with pytest.raises(ValueError, match="estimator must be one of 'ema', 'tilted'"):
        stochastic_tce(z, y, state, t=1.0, lam=0.1, estimator="tilt")
    with pytest.raises(ValueError, match="batch_loss must be one of 'tilted', 'ce'"):
        stochastic_tce(z, y, state, t=1.0, lam=0.1, batch_loss="mean")


# ----------------------------------------------------------------------------------------------
# Per-class reductions: the CPU form (segment_sum, a scatter) and the GPU/TPU form
# (compare-and-reduce, gather gradient) against numpy, and the losses with either form.

REDUCTION_FORMS = {
    "cpu": (statistics_lib._segment_sum_form, statistics_lib._segment_max_form),
    "accelerator": (statistics_lib._compare_sum_form, statistics_lib._compare_max_form),
}


def _segment_case(seed, n, num_classes):
    """Values and segments in [0, C] (C = dropped, as for invalid pixels); class 2 absent."""
    rng = np.random.default_rng(seed)
    segments = rng.integers(0, num_classes + 1, size=n).astype(np.int32)
    segments[segments == 2] = num_classes
    values = (rng.normal(size=n) * 3).astype(np.float32)
    return values, segments


def np_segment_sums(values, segments, num_classes):
    keep = segments < num_classes
    return np.bincount(segments[keep], weights=np.asarray(values[keep], np.float64),
                       minlength=num_classes)


def np_segment_max(values, segments, num_classes):
    return np.array([values[segments == c].max() if np.any(segments == c) else -np.inf
                     for c in range(num_classes)])


@pytest.mark.parametrize("form", list(REDUCTION_FORMS))
def test_per_class_reduction_forms_match_numpy(form):
    sum_form, max_form = REDUCTION_FORMS[form]
    num_classes = 7
    values, segments = _segment_case(0, 500, num_classes)
    sums = jax.jit(functools.partial(sum_form, num_classes=num_classes))
    np.testing.assert_allclose(sums(values, segments),
                               np_segment_sums(values, segments, num_classes), rtol=1e-5,
                               atol=1e-5)
    counts = sums(np.ones_like(segments), segments)
    assert counts.dtype == jnp.int32
    np.testing.assert_array_equal(counts, np_segment_sums(np.ones_like(segments), segments,
                                                          num_classes))
    maxima = jax.jit(functools.partial(max_form, num_classes=num_classes))(values, segments)
    np.testing.assert_array_equal(maxima, np_segment_max(values, segments, num_classes))
    # d/dv sum_c w_c out_c = w[segment_i], zero for dropped segments.
    w = np.random.default_rng(1).normal(size=num_classes).astype(np.float32)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(w * sum_form(v, segments,
                                                           num_classes=num_classes))))(values)
    expected = np.where(segments < num_classes, w[np.minimum(segments, num_classes - 1)], 0.0)
    np.testing.assert_array_equal(grad, expected)
    # Forward mode too (jax.jvp, jax.jacfwd, jax.hessian of the losses): the sum is linear.
    tangent = np.random.default_rng(2).normal(size=values.shape).astype(np.float32)
    _, out_tangent = jax.jit(lambda v, dv: jax.jvp(
        lambda u: sum_form(u, segments, num_classes=num_classes), (v,), (dv,)))(values, tangent)
    np.testing.assert_allclose(out_tangent, np_segment_sums(tangent, segments, num_classes),
                               rtol=1e-5, atol=1e-5)


def test_per_class_sum_under_vmap_grad_and_jit():
    """The platform-dependent helper composes with vmap (batched rows) and grad."""
    num_classes = 5
    rows = [_segment_case(seed, 64, num_classes) for seed in range(3)]
    values = np.stack([v for v, _ in rows])
    segments = np.stack([s for _, s in rows])
    w = np.linspace(-1.0, 2.0, num_classes, dtype=np.float32)

    def weighted(v, s):
        return jnp.sum(w * statistics_lib._per_class_sum(v, s, num_classes))

    batched = jax.jit(jax.vmap(jax.value_and_grad(weighted)))(values, segments)
    for r, (v, s) in enumerate(rows):
        np.testing.assert_allclose(batched[0][r], np.dot(w, np_segment_sums(v, s, num_classes)),
                                   rtol=1e-5)
        np.testing.assert_array_equal(
            batched[1][r], np.where(s < num_classes, w[np.minimum(s, num_classes - 1)], 0.0))
    per_class_sum = statistics_lib._per_class_sum
    per_row = jax.vmap(lambda v, s: per_class_sum(v, s, num_classes))(values, segments)
    np.testing.assert_allclose(per_row, [np_segment_sums(v, s, num_classes) for v, s in rows],
                               rtol=1e-5, atol=1e-5)


def force_accelerator_forms(monkeypatch):
    """Makes the CPU branches of the platform-dependent helpers run the GPU/TPU forms."""
    stats = statistics_lib
    monkeypatch.setattr(stats, "_segment_sum_form", stats._compare_sum_form)
    monkeypatch.setattr(stats, "_segment_max_form", stats._compare_max_form)
    monkeypatch.setattr(stats, "_gather_label_logits", stats._select_label_logits)


SCATTER_FREE_LOSSES = {
    "tce": functools.partial(tilted_ce, t=2.0, return_aux=True),
    "tce_tau": functools.partial(tilted_ce, t=-1.0, tau=0.7, class_weighting="uniform",
                                 return_aux=True),
    "statistics_tau": functools.partial(class_statistics, tau=-0.5),
    "wce_median": functools.partial(losses.weighted_cross_entropy,
                                    class_weights="median_frequency", return_aux=True),
    "stochastic_tau": lambda z, y: stochastic_tce(z, y, stochastic_tce_init(z.shape[-1]), t=1.0,
                                                  lam=0.5, tau=0.5),
    "ce": cross_entropy,
    "focal": functools.partial(losses.softmax_focal_loss, gamma=2.0),
    "lovasz": losses.lovasz_softmax,
}


def _value_and_logit_grad(fn, logits, labels):
    """A fresh jit (no cache shared with other tests) of fn's outputs and d(first)/d(logits),
    and the program's StableHLO text."""
    def first(z):
        out = fn(z, labels)
        scalar = jnp.sum(out[0]) if isinstance(out, tuple) else out
        return scalar, out

    compiled = jax.jit(jax.value_and_grad(first, has_aux=True))
    return compiled(logits), compiled.lower(logits).as_text()


@pytest.mark.parametrize("name", list(SCATTER_FREE_LOSSES))
def test_losses_are_the_same_with_the_accelerator_form(name, monkeypatch):
    """On CPU, forcing the GPU/TPU branch gives the CPU branch's values and gradients."""
    logits, labels = make_case(**CASES["skewed_absent"])
    fn = SCATTER_FREE_LOSSES[name]
    ((_, expected), expected_grad), _ = _value_and_logit_grad(fn, logits, labels)
    force_accelerator_forms(monkeypatch)
    ((_, got), got_grad), program = _value_and_logit_grad(fn, logits, labels)
    assert '"stablehlo.scatter"' not in program  # the forms really were swapped
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got, expected)
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Errors.

_Z = np.zeros((2, 3, 4), np.float32)
_Y = np.zeros((2, 3), np.int32)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: tilted_ce(_Z.astype(np.int32), _Y, t=1.0), TypeError, "logits must be floating"),
        (lambda: tilted_ce(np.zeros((2, 0)), _Y[:, 0], t=1.0), ValueError, "class axis"),
        (lambda: tilted_ce(np.float32(1.0), _Y, t=1.0), ValueError, "class axis"),
        (lambda: tilted_ce(_Z, _Y.astype(np.float32), t=1.0), TypeError, "labels must be integer"),
        (lambda: tilted_ce(_Z, _Y[..., None], t=1.0), ValueError, r"labels must have shape"),
        (lambda: tilted_ce(_Z, _Y[0], t=1.0), ValueError, r"logits.shape\[:-1\]"),
        (lambda: tilted_ce(_Z, _Y, t=1.0, where=_Y), TypeError, "where must be a boolean"),
        (lambda: tilted_ce(_Z, _Y, t=1.0, where=np.ones((3,), bool)), ValueError,
         "where must have the shape"),
        (lambda: tilted_ce(_Z, _Y, t=1.0, class_weighting="freq"), ValueError,
         "class_weighting must be 'frequency', 'uniform'"),
        (lambda: tilted_ce(_Z, _Y, t=1.0, class_weighting=np.ones(3)), ValueError,
         r"class_weighting has shape \(3,\) but the logits have C = 4"),
        (lambda: tilted_ce(_Z, _Y, t=1.0, class_weighting=-np.ones(4)), ValueError,
         "non-negative"),
        (lambda: tilted_ce(_Z, _Y, t=1.0, class_weighting=None), TypeError, "class_weighting"),
        (lambda: tilted_ce(_Z, _Y, t=float("nan")), ValueError, "t must be finite"),
        (lambda: tilted_ce(_Z, _Y, t=float("inf")), ValueError, "t must be finite"),
        (lambda: tilted_ce(_Z, _Y, t=np.ones(2)), ValueError, "t must be a scalar"),
        (lambda: tilted_ce(_Z, _Y, t="1"), TypeError, "t must be a real number"),
        (lambda: tilted_ce(_Z, _Y, t=1.0, tau=float("inf")), ValueError, "tau must be finite"),
        (lambda: jax.jit(lambda tau: tilted_ce(_Z, _Y, t=1.0, tau=tau))(1.0), TypeError,
         "tau must be a concrete number"),
        (lambda: tilted_ce(_Z, _Y, t=1.0, ignore_index=2.5), TypeError, "ignore_index"),
        (lambda: cross_entropy(_Z, _Y.astype(bool)), TypeError, "labels must be integer"),
        (lambda: class_statistics(_Z, _Y, tau=float("nan")), ValueError, "tau must be finite"),
        (lambda: stochastic_tce(_Z, _Y, stochastic_tce_init(4), t=1.0, lam=0.0), ValueError,
         r"lam must lie in \(0.0, 1.0\]"),
        (lambda: stochastic_tce(_Z, _Y, stochastic_tce_init(4), t=1.0, lam=1.5), ValueError,
         r"lam must lie in"),
        (lambda: stochastic_tce(_Z, _Y, stochastic_tce_init(4), t=1.0, lam=float("nan")),
         ValueError, "lam must be finite"),
        (lambda: stochastic_tce(_Z, _Y, stochastic_tce_init(3), t=1.0, lam=0.5), ValueError,
         r"stochastic_tce_init\(4\)"),
        (lambda: stochastic_tce(_Z, _Y, (1, 2), t=1.0, lam=0.5), TypeError,
         "state must be a StochasticTCEState"),
        (lambda: stochastic_tce_init(0), ValueError, "num_classes must be a positive int"),
        (lambda: stochastic_tce_init(2.0), TypeError, "num_classes must be a positive int"),
        (lambda: class_sampling_probs(stochastic_tce_init(4), t=1.0, mix=1.5), ValueError,
         r"mix must lie in \[0.0, 1.0\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_package_exports_the_loss_api_without_heavy_imports():
    import os
    import subprocess
    import sys

    import tce_jax

    assert tce_jax.__version__ == "0.1.0"
    for name in losses.__all__:
        assert getattr(tce_jax, name) is getattr(losses, name)
    code = ("import sys, tce_jax; heavy = {'tensorflow', 'tensorflow_datasets', 'flax', 'optax'}"
            " & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
