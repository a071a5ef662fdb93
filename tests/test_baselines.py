"""The baseline losses of tce_jax.losses (class-weighted CE, softmax focal loss, Lovász-softmax)
against independent numpy float64 references; their global exactness under pmap; their
objectives (config names).

The Lovász reference is a line-by-line numpy port of Berman et al.'s PyTorch code
(`lovasz_losses.py`: `lovasz_grad`, `lovasz_softmax_flat`, `flatten_probas`, with
`classes='present'|'all'`, `per_image=False`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from configs import default
from tce_jax import config_lib, objectives
from tce_jax.losses import (
    class_balancing_weights,
    cross_entropy,
    lovasz_softmax,
    softmax_focal_loss,
    tilted_ce,
    weighted_cross_entropy,
)

IGNORE = 255
# Compiled once per signature: eager op-by-op dispatch dominates these small tests otherwise.
jit_lovasz = jax.jit(lovasz_softmax, static_argnames=("classes", "ignore_index", "axis_name"))
jit_wce_scheme = jax.jit(weighted_cross_entropy,
                         static_argnames=("class_weights", "ignore_index", "axis_name"))


def make_case(seed, shape=(3, 5, 6), num_classes=5, *, absent=(4,), ignore_frac=0.15,
              scale=2.0):
    """Skewed labels with an absent class, ignored and out-of-range pixels, random logits."""
    rng = np.random.default_rng(seed)
    p = np.exp(-0.7 * np.arange(num_classes))
    p[list(absent)] = 0.0
    labels = rng.choice(num_classes, size=shape, p=p / p.sum())
    labels[rng.random(shape) < ignore_frac] = IGNORE
    labels.reshape(-1)[0] = num_classes + 2  # out of range: ignored
    logits = (scale * rng.normal(size=shape + (num_classes,))).astype(np.float32)
    return logits, labels.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# numpy float64 references.


def np_flat(logits, labels, where=None, ignore_index=IGNORE):
    z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    valid = (y >= 0) & (y < z.shape[1]) & (y != ignore_index)
    if where is not None:
        valid &= np.asarray(where).reshape(-1)
    return z, y, valid


def np_pixel_ce(z, y):
    top = z.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(-1))
    return lse - z[np.arange(len(y)), np.where((y >= 0) & (y < z.shape[1]), y, 0)]


def np_class_weights(labels, valid, num_classes, scheme, enet_c=1.02):
    """The published definitions, computed per image with python loops where it helps."""
    y = np.asarray(labels).astype(np.int64)
    images = y.reshape(y.shape[0], -1) if y.ndim >= 2 else y.reshape(1, -1)
    valid_images = valid.reshape(images.shape)
    count = np.bincount(y.reshape(-1)[valid], minlength=num_classes).astype(np.float64)
    p = count / count.sum()
    w = np.zeros(num_classes)
    present = count > 0
    if scheme == "inverse_frequency":
        w[present] = 1.0 / p[present]
    elif scheme == "enet":
        w[present] = 1.0 / np.log(enet_c + p[present])
    else:  # Eigen & Fergus: freq(c) = pixels of c / pixels of the images where c is present
        support = np.zeros(num_classes)
        for img, ok in zip(images, valid_images, strict=True):
            for c in set(img[ok].tolist()):
                support[c] += ok.sum()
        freq = np.where(present, count / np.maximum(support, 1), 0.0)
        w[present] = np.median(freq[present]) / freq[present]
    return w


def np_weighted_ce(logits, labels, class_weights, where=None):
    z, y, valid = np_flat(logits, labels, where)
    if isinstance(class_weights, str):
        w = np_class_weights(labels, valid, z.shape[1], class_weights)
    else:
        w = np.asarray(class_weights, np.float64)
    pixel = np_pixel_ce(z, y)
    wi = w[np.where(valid, y, 0)] * valid
    return float(np.sum(wi * pixel) / np.sum(wi)) if np.sum(wi) > 0 else 0.0


def np_focal(logits, labels, gamma, alpha=None, where=None):
    z, y, valid = np_flat(logits, labels, where)
    pixel = np_pixel_ce(z, y)
    prob = np.exp(-pixel)
    fl = (1.0 - prob) ** gamma * pixel
    if alpha is not None:
        fl = np.asarray(alpha, np.float64)[np.where(valid, y, 0)] * fl
    return float(np.sum(fl[valid]) / max(valid.sum(), 1))


# Berman et al.'s reference (PyTorch), ported to numpy without changes to the logic.
def ref_lovasz_grad(gt_sorted):
    p = len(gt_sorted)
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if p > 1:  # cover 1-pixel case
        jaccard[1:p] = jaccard[1:p] - jaccard[0:-1]
    return jaccard


def ref_lovasz_softmax_flat(probas, labels, classes="present"):
    if probas.size == 0:
        return 0.0
    num_classes = probas.shape[1]
    losses = []
    class_to_sum = list(range(num_classes)) if classes in ["all", "present"] else classes
    for c in class_to_sum:
        fg = (labels == c).astype(np.float64)
        if classes == "present" and fg.sum() == 0:
            continue
        class_pred = probas[:, c]
        errors = np.abs(fg - class_pred)
        perm = np.argsort(-errors, kind="stable")
        losses.append(np.dot(errors[perm], ref_lovasz_grad(fg[perm])))
    return float(np.mean(losses)) if losses else 0.0


def ref_lovasz_softmax(logits, labels, classes="present", where=None):
    z, y, valid = np_flat(logits, labels, where)  # flatten_probas, with ignore
    probas = np.exp(z - z.max(-1, keepdims=True))
    probas /= probas.sum(-1, keepdims=True)
    return ref_lovasz_softmax_flat(probas[valid], y[valid], classes)


def numeric_grad(f, x, eps=1e-5):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += eps
        lo[i] -= eps
        grad[i] = (f(hi) - f(lo)) / (2 * eps)
    return grad


# ----------------------------------------------------------------------------------------------
# Class-weighted cross-entropy.


@pytest.mark.parametrize("scheme", ["inverse_frequency", "median_frequency", "enet"])
@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_ce_matches_reference(scheme, seed):
    logits, labels = make_case(seed)
    # Image 0 without class 1, so the median-frequency support differs from the batch size.
    labels[0][labels[0] == 1] = 0
    value = jax.jit(functools.partial(weighted_cross_entropy, class_weights=scheme))(
        logits, labels)
    np.testing.assert_allclose(value, np_weighted_ce(logits, labels, scheme), rtol=2e-6)


def test_weighted_ce_schemes_differ_and_relate_to_tce():
    logits, labels = make_case(3)
    labels[0][labels[0] == 2] = 0
    values = {s: float(jit_wce_scheme(logits, labels, class_weights=s))
              for s in ("inverse_frequency", "median_frequency", "enet")}
    assert len(set(values.values())) == 3
    # Inverse frequency (normalised) is the uniform mean of the class losses: TCE at t = 0.
    np.testing.assert_allclose(values["inverse_frequency"],
                               tilted_ce(logits, labels, t=0.0, class_weighting="uniform"),
                               rtol=1e-6)
    # Equal weights give plain cross-entropy.
    np.testing.assert_allclose(weighted_cross_entropy(logits, labels, class_weights=np.ones(5)),
                               cross_entropy(logits, labels), rtol=1e-6)


def test_weighted_ce_given_vector_where_and_aux():
    logits, labels = make_case(4)
    where = np.random.default_rng(0).random(labels.shape) < 0.7
    w = np.array([0.5, 1.0, 2.0, 4.0, 3.0])
    loss, aux = weighted_cross_entropy(logits, labels, class_weights=w, where=where,
                                       return_aux=True)
    np.testing.assert_allclose(loss, np_weighted_ce(logits, labels, w, where), rtol=2e-6)
    _, y, valid = np_flat(logits, labels, where)
    count = np.bincount(y[valid], minlength=5)
    np.testing.assert_array_equal(aux["class_count"], count)
    np.testing.assert_allclose(aux["class_weight"], w * count / np.sum(w * count), rtol=1e-6)
    np.testing.assert_allclose(np.sum(aux["class_weight"] * aux["class_loss"]), loss, rtol=1e-6)


def test_class_balancing_weights_on_dataset_counts():
    count = np.array([700.0, 200.0, 100.0, 0.0])
    np.testing.assert_allclose(class_balancing_weights(count, scheme="inverse_frequency"),
                               [1000 / 700, 5.0, 10.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(class_balancing_weights(count, scheme="enet"),
                               [1 / np.log(1.72), 1 / np.log(1.22), 1 / np.log(1.12), 0.0],
                               rtol=1e-6)
    # Without image_pixels: median(p) / p_c.
    np.testing.assert_allclose(class_balancing_weights(count, scheme="median_frequency"),
                               [0.2 / 0.7, 1.0, 2.0, 0.0], rtol=1e-6)
    support = np.array([1000.0, 400.0, 100.0, 0.0])  # f = 0.7, 0.5, 1.0
    np.testing.assert_allclose(
        class_balancing_weights(count, scheme="median_frequency", image_pixels=support),
        [0.7 / 0.7, 0.7 / 0.5, 0.7 / 1.0, 0.0], rtol=1e-6)
    # Fixed weights from dataset counts, then used as a vector.
    logits, labels = make_case(5, num_classes=4, absent=())
    w = class_balancing_weights(count, scheme="enet")
    np.testing.assert_allclose(weighted_cross_entropy(logits, labels, class_weights=w),
                               np_weighted_ce(logits, labels, np.asarray(w)), rtol=2e-6)


# ----------------------------------------------------------------------------------------------
# Focal loss.


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_focal_matches_reference(gamma):
    logits, labels = make_case(6)
    value = jax.jit(functools.partial(softmax_focal_loss, gamma=gamma))(logits, labels)
    np.testing.assert_allclose(value, np_focal(logits, labels, gamma), rtol=2e-6)


def test_focal_gamma0_is_ce_and_alpha_where():
    logits, labels = make_case(7)
    np.testing.assert_allclose(softmax_focal_loss(logits, labels, gamma=0.0),
                               cross_entropy(logits, labels), rtol=1e-6)
    where = np.random.default_rng(1).random(labels.shape) < 0.5
    alpha = np.array([0.25, 1.0, 1.0, 2.0, 0.5])
    np.testing.assert_allclose(
        softmax_focal_loss(logits, labels, gamma=2.0, alpha=alpha, where=where),
        np_focal(logits, labels, 2.0, alpha, where), rtol=2e-6)


def test_focal_gradient_finite_at_certain_pixels():
    """p = 1 exactly (1 - p = 0): the gradient of (1 - p)^gamma must stay finite (0)."""
    logits = jnp.array([[100.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = jnp.array([0, 1])
    for gamma in (0.5, 2.0):
        grad = jax.grad(lambda z, g=gamma: softmax_focal_loss(z, labels, gamma=g))(logits)
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad[0], 0.0, atol=1e-30)


# ----------------------------------------------------------------------------------------------
# Lovász-softmax.


@pytest.mark.parametrize("classes", ["present", "all"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_matches_berman_reference(seed, classes):
    logits, labels = make_case(seed)
    value = jax.jit(functools.partial(lovasz_softmax, classes=classes))(logits, labels)
    np.testing.assert_allclose(value, ref_lovasz_softmax(logits, labels, classes), rtol=1e-5,
                               atol=1e-7)


def test_lovasz_where_ties_and_gradient():
    logits, labels = make_case(8, shape=(2, 3, 4), num_classes=4, absent=())
    where = np.random.default_rng(2).random(labels.shape) < 0.8
    np.testing.assert_allclose(jit_lovasz(logits, labels, where=where),
                               ref_lovasz_softmax(logits, labels, where=where), rtol=1e-5)
    # Ties (equal logits everywhere, or logits from a few values) do not change the value.
    flat = np.zeros_like(logits)
    np.testing.assert_allclose(jit_lovasz(flat, labels),
                               ref_lovasz_softmax(flat, labels), rtol=1e-6)
    big_logits, big_labels = make_case(14, shape=(4, 8, 8), num_classes=4, absent=())
    coarse = np.round(big_logits / 2.0).astype(np.float32)
    np.testing.assert_allclose(jit_lovasz(coarse, big_labels),
                               ref_lovasz_softmax(coarse, big_labels), rtol=1e-6)
    # The gradient: the reference is piecewise linear in the errors, so central differences in
    # float64 are exact away from ties.
    grad = jax.grad(lambda z: jit_lovasz(z, labels, where=where))(logits)
    expected = numeric_grad(lambda z: ref_lovasz_softmax(z, labels, where=where), logits)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-5)


def test_lovasz_perfect_prediction_is_zero_and_worst_is_one():
    labels = np.array([[0, 1], [2, 1]])
    perfect = 50.0 * np.eye(3, dtype=np.float32)[labels]
    assert float(jit_lovasz(perfect, labels)) == pytest.approx(0.0, abs=1e-6)
    wrong = 50.0 * np.eye(3, dtype=np.float32)[(labels + 1) % 3]
    assert float(jit_lovasz(wrong, labels)) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Common conventions: no valid pixel, bf16, float64 gradients, errors.

BASELINES = {
    "wce_inverse": functools.partial(weighted_cross_entropy, class_weights="inverse_frequency"),
    "wce_median": functools.partial(weighted_cross_entropy, class_weights="median_frequency"),
    "wce_enet": functools.partial(weighted_cross_entropy, class_weights="enet"),
    "focal": functools.partial(softmax_focal_loss, gamma=2.0),
    "lovasz": lovasz_softmax,
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_no_valid_pixel_gives_zero_loss_and_gradient(name):
    logits, labels = make_case(9)
    labels[:] = IGNORE
    value, grad = jax.jit(jax.value_and_grad(BASELINES[name]))(logits, labels)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    where = np.zeros(labels.shape, bool)
    value, grad = jax.value_and_grad(BASELINES[name])(logits, make_case(9)[1], where=where)
    assert float(value) == 0.0 and np.all(grad == 0.0)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_bfloat16_logits_give_float32_loss(name):
    logits, labels = make_case(10)
    value = BASELINES[name](jnp.asarray(logits, jnp.bfloat16), labels)
    assert value.dtype == jnp.float32
    expected = BASELINES[name](np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), labels)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_check_grads_float64():
    logits, labels = make_case(11, shape=(2, 3), num_classes=4, absent=())
    with jax.enable_x64(True):
        z = jnp.asarray(logits, jnp.float64)
        for name in ("wce_inverse", "wce_median", "wce_enet", "focal"):
            check_grads(jax.jit(lambda z, f=BASELINES[name]: f(z, labels)), (z,), order=1,
                        modes=("rev",))
        assert lovasz_softmax(z, labels).dtype == jnp.float64


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda z, y: weighted_cross_entropy(z, y, class_weights="inverse"), ValueError,
         "inverse_frequency"),
        (lambda z, y: weighted_cross_entropy(z, y, class_weights=np.ones(3)), ValueError,
         r"shape \(3,\)"),
        (lambda z, y: weighted_cross_entropy(z, y, class_weights=-np.ones(5)), ValueError,
         "non-negative"),
        (lambda z, y: softmax_focal_loss(z, y, gamma=-1.0), ValueError, "gamma"),
        (lambda z, y: softmax_focal_loss(z, y, alpha=np.ones(2)), ValueError, r"shape \(2,\)"),
        (lambda z, y: lovasz_softmax(z, y, classes="some"), ValueError, "present"),
        (lambda z, y: lovasz_softmax(z, y.astype(np.float32)), TypeError, "integer"),
        (lambda z, y: class_balancing_weights(np.ones(3), scheme="x"), ValueError, "scheme"),
        (lambda z, y: class_balancing_weights(np.ones(3), scheme="enet", enet_c=1.0),
         ValueError, "enet_c"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    logits, labels = make_case(12)
    with pytest.raises(error, match=match):
        call(logits, labels)


# ----------------------------------------------------------------------------------------------
# Global exactness under pmap (the convention of tilted_ce: global loss on every replica,
# pmean of the per-replica parameter gradients is the global gradient).

AXIS = "batch"


def linear_data(seed=0, batch=8, num_classes=5, features=3):
    rng = np.random.default_rng(seed)
    _, labels = make_case(seed, shape=(batch, 3, 4), num_classes=num_classes)
    labels[batch - 1] = IGNORE  # one replica (of 8) without a valid pixel
    labels[1][labels[1] == 1] = 0  # images differ in their classes (median frequency)
    x = rng.normal(size=(batch, 3, 4, features)).astype(np.float32)
    params = {"w": rng.normal(size=(features, num_classes)).astype(np.float32),
              "b": rng.normal(size=(num_classes,)).astype(np.float32)}
    return params, x, labels


def objective(params, x, labels, name, axis_name=None):
    return BASELINES[name](x @ params["w"] + params["b"], labels, axis_name=axis_name)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_pmap_matches_single_device(name):
    num_devices = 4
    params, x, labels = linear_data()
    loss, grads = jax.jit(jax.value_and_grad(objective), static_argnums=3)(
        params, x, labels, name)

    def step(params, x, labels):
        value, g = jax.value_and_grad(objective)(params, x, labels, name, AXIS)
        return value, lax.pmean(g, AXIS)

    p_loss, p_grads = jax.pmap(step, axis_name=AXIS, devices=jax.devices()[:num_devices])(
        jax.tree.map(lambda a: np.broadcast_to(a, (num_devices,) + a.shape), params),
        x.reshape(num_devices, -1, *x.shape[1:]),
        labels.reshape(num_devices, -1, *labels.shape[1:]),
    )
    for r in range(num_devices):
        np.testing.assert_allclose(p_loss[r], loss, rtol=2e-6)
        jax.tree.map(lambda a, b, r=r: np.testing.assert_allclose(a[r], b, rtol=2e-5, atol=1e-6),
                     p_grads, grads)


# ----------------------------------------------------------------------------------------------
# Objectives: config names.


@pytest.mark.parametrize(
    "name, fields, expected",
    [
        ("weighted_ce", {}, lambda z, y: weighted_cross_entropy(z, y)),
        ("weighted_ce", {"class_weights": "enet"},
         lambda z, y: weighted_cross_entropy(z, y, class_weights="enet")),
        ("weighted_ce", {"class_weights": "1,2,3,4,5"},
         lambda z, y: weighted_cross_entropy(z, y, class_weights=np.arange(1.0, 6.0))),
        ("focal", {}, lambda z, y: softmax_focal_loss(z, y, gamma=2.0)),
        ("focal", {"focal_gamma": 0.5}, lambda z, y: softmax_focal_loss(z, y, gamma=0.5)),
        ("lovasz", {}, lambda z, y: lovasz_softmax(z, y)),
        ("ce", {}, lambda z, y: cross_entropy(z, y)),
    ],
)
def test_objectives_select_the_baselines(name, fields, expected):
    config = default.get_config(name)
    with config.loss.unlocked():
        config.loss.update(fields)
    logits, labels = make_case(13)
    state = object()  # passed through unchanged
    loss, new_state, aux = objectives.create_loss_fn(config)(logits, labels, state, None)
    assert new_state is state
    np.testing.assert_allclose(loss, expected(logits, labels), rtol=1e-6)
    # Every objective logs the per-class cross-entropy of the batch.
    _, y, valid = np_flat(logits, labels)
    ce = np_pixel_ce(*np_flat(logits, labels)[:2])
    for c in range(4):
        np.testing.assert_allclose(aux["class_loss"][c], ce[valid & (y == c)].mean(), rtol=1e-5)
    assert float(aux["class_loss"][4]) == 0.0  # absent


def test_bad_baseline_fields_are_rejected_once_by_the_config_check():
    """Validation happens in config_lib, before any objective is built."""
    config = default.get_config("weighted_ce")
    with config.loss.unlocked():
        config.loss.class_weights = "median"
    with pytest.raises(ValueError, match="loss.class_weights"):
        config_lib.validate_config(config)
    config = default.get_config("focal")
    with config.loss.unlocked():
        config.loss.focal_gamma = -2.0
    with pytest.raises(ValueError, match="loss.focal_gamma"):
        config_lib.validate_config(config)
