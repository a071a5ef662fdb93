"""The recall loss and class-balanced CE: against numpy computations of their definitions, our
choices where the reference code differs, device layouts, accumulation and the config."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_losses_parallel import make_data, model, replicate, shard

from configs import default
from tce_jax import config_lib, losses, objectives
from tce_jax.datasets.class_index import ClassIndex

IGNORE = 255


def numpy_pixel_losses(logits, labels, where=None):
    """float64 ``(l [N], y [N], valid [N], hard predictions [N])`` of the flattened pixels."""
    z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    y = np.asarray(labels).reshape(-1)
    valid = (y >= 0) & (y < z.shape[-1])
    if where is not None:
        valid &= np.asarray(where).reshape(-1)
    safe = np.where(valid, y, 0)
    top = z.max(-1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(-1))
    return lse - z[np.arange(len(y)), safe], safe, valid, z.argmax(-1)


def numpy_recall_loss(logits, labels, where=None):
    """The paper's definition: the mean over valid pixels of (1 - recall_{y_i}) l_i."""
    pixel, y, valid, pred = numpy_pixel_losses(logits, labels, where)
    weight = np.zeros(logits.shape[-1])
    for c in range(logits.shape[-1]):
        members = valid & (y == c)
        if members.any():
            weight[c] = 1.0 - np.mean(pred[members] == c)
    return np.sum(np.where(valid, weight[y] * pixel, 0.0)) / max(valid.sum(), 1), weight


def numpy_class_balanced_weights(counts, beta):
    """Cui et al.: (1 - beta) / (1 - beta^n), normalised to sum to the counted classes."""
    counts = np.asarray(counts, np.float64)
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = (1.0 - beta) / (1.0 - beta ** counts[present])
    return weights * present.sum() / weights.sum()


def hand_case():
    """Two 2x3 images, C = 4: class 3 absent; ties; ignored and out-of-range pixels."""
    logits = np.zeros((2, 2, 3, 4), np.float32)
    labels = np.array([[[0, 0, 1], [2, 255, 7]], [[1, 1, 2], [0, 2, 2]]], np.int32)
    logits[0, 0, 0] = [3, 1, 0, 0]  # class 0 right
    logits[0, 0, 1] = [1, 1, 1, 1]  # a tie: argmax is the first class, 0: right
    logits[0, 0, 2] = [2, 2, 0, 0]  # a tie between 0 and 1 for a class-1 pixel: 0, wrong
    logits[0, 1, 0] = [0, 0, 5, 0]  # class 2 right
    logits[1, 0, 0] = [0, 4, 0, 1]  # class 1 right
    logits[1, 0, 1] = [0, 0, 0, 2]  # class 1 predicted as the absent class 3
    logits[1, 0, 2] = [1, 0, 0.5, 0]  # class 2 wrong
    logits[1, 1, 0] = [0, 3, 0, 0]  # class 0 wrong
    logits[1, 1, 1] = [0, 0, 1, 0]  # class 2 right
    logits[1, 1, 2] = [0, 0, 0.2, 0.2]  # class 2 tie with 3: 2 comes first, right
    return jnp.asarray(logits), jnp.asarray(labels)


# ----------------------------------------------------------------------------------------------
# The recall loss.


def test_recall_loss_matches_the_definition_on_a_hand_made_case():
    logits, labels = hand_case()
    loss, aux = losses.recall_cross_entropy(logits, labels, return_aux=True)
    want, weight = numpy_recall_loss(logits, labels)
    # Recalls: class 0 2/3 (one tie won), class 1 1/3 (a tie lost), class 2 3/4, class 3 absent.
    np.testing.assert_allclose(weight, [1 / 3, 2 / 3, 1 / 4, 0.0])
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    tp = losses.class_true_positives(logits, labels)
    np.testing.assert_array_equal(tp, [2, 1, 3, 0])
    np.testing.assert_array_equal(aux["class_count"], [3, 3, 4, 0])
    assert int(aux["num_invalid"]) == 1  # the label 7
    # The gradient shares: FN_c / |V|, the coefficients of grad L_c.
    np.testing.assert_allclose(aux["class_weight"], np.array([1, 2, 1, 0]) / 10, rtol=1e-6)
    # where: dropping the second image changes both the recalls and the mean.
    where = jnp.asarray(np.arange(2)[:, None, None] == np.zeros((2, 2, 3), int))
    np.testing.assert_allclose(
        losses.recall_cross_entropy(logits, labels, where=where),
        numpy_recall_loss(logits, labels, np.asarray(where))[0],
        rtol=1e-6,
    )


def test_recall_weights_carry_no_gradient():
    """The gradient is that of sum_i w_{y_i} l_i / |V| with w held fixed."""
    logits, labels = hand_case()
    _, weight = numpy_recall_loss(logits, labels)
    grad = jax.grad(losses.recall_cross_entropy)(logits, labels)
    z = logits.reshape(-1, 4)
    y = labels.reshape(-1)
    valid = (y >= 0) & (y < 4)
    expected = (jax.nn.softmax(z) - jax.nn.one_hot(jnp.where(valid, y, 0), 4)) * jnp.where(
        valid, jnp.asarray(weight, jnp.float32)[jnp.where(valid, y, 0)], 0.0
    )[:, None]
    np.testing.assert_allclose(grad.reshape(-1, 4), expected / 10, atol=1e-7)


def test_recall_loss_choices_where_the_reference_code_differs():
    """Pinned: a perfectly recalled class weighs 0 (the reference's counters start at 1, which
    gives it 1 / GT_c), and the mean is over the valid pixels (the reference's `mean()` also
    counts the ignored ones)."""
    logits, labels = hand_case()
    perfect = jax.nn.one_hot(jnp.where(labels < 4, labels, 0), 4) * 5.0
    assert float(losses.recall_cross_entropy(perfect, labels)) == 0.0
    ignored = jnp.asarray(np.where(np.arange(6).reshape(2, 3) < 3, IGNORE, 0))
    labels_more_ignored = jnp.concatenate([labels, ignored[None]], 0)
    logits_more = jnp.concatenate([logits, jnp.zeros((1, 2, 3, 4))], 0)
    # Adding an image with 3 ignored pixels and 3 class-0 pixels predicted as class 0 (a tie):
    # same loss sum, 3 more valid pixels, recall of class 0 up.
    want, _ = numpy_recall_loss(logits_more, labels_more_ignored)
    np.testing.assert_allclose(
        losses.recall_cross_entropy(logits_more, labels_more_ignored), want, rtol=1e-6
    )


def test_all_pixels_ignored_gives_zero_loss_and_gradient():
    logits, _ = hand_case()
    labels = jnp.full(logits.shape[:-1], IGNORE, jnp.int32)
    for fn in (
        losses.recall_cross_entropy,
        functools.partial(losses.class_balanced_cross_entropy, class_count=[1, 2, 3, 4]),
    ):
        value, grad = jax.value_and_grad(fn)(logits, labels)
        assert float(value) == 0.0
        assert not np.any(grad)


# ----------------------------------------------------------------------------------------------
# Class-balanced CE.


def test_class_balanced_weights_match_the_definition():
    counts = np.array([2975, 1500, 120, 7, 0])
    for beta in (0.0, 0.9, 0.999, 0.9999):
        np.testing.assert_allclose(
            losses.class_balanced_weights(counts, beta=beta),
            numpy_class_balanced_weights(counts, beta),
            rtol=2e-5,
        )
    # beta = 0: uniform over the counted classes; beta = 1: inverse frequency; n = 0: weight 0.
    np.testing.assert_allclose(losses.class_balanced_weights(counts, beta=0.0), [1, 1, 1, 1, 0])
    inverse = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    np.testing.assert_allclose(
        losses.class_balanced_weights(counts, beta=1.0), inverse * 4 / inverse.sum(), rtol=1e-6
    )


def test_class_balanced_weights_are_stable_for_large_counts():
    """Pixel counts: exact near beta = 1 (expm1), and uniform for any usual beta (saturation)."""
    pixels = np.array([1e9, 3e8, 2e7])
    beta = 1.0 - 1e-9
    effective = -np.expm1(pixels * np.log1p(-(1.0 - beta))) / (1.0 - beta)
    want = (1.0 / effective) * 3 / np.sum(1.0 / effective)
    np.testing.assert_allclose(losses.class_balanced_weights(pixels, beta=beta), want, rtol=1e-5)
    np.testing.assert_allclose(losses.class_balanced_weights(pixels, beta=0.9999), [1, 1, 1])


def test_class_balanced_loss_matches_the_definition():
    """The mean over the valid pixels of w_{y_i} l_i (not normalised by the total weight)."""
    logits, labels = hand_case()
    counts = [300, 20, 50, 4]
    loss, aux = losses.class_balanced_cross_entropy(
        logits, labels, class_count=counts, beta=0.99, return_aux=True
    )
    pixel, y, valid, _ = numpy_pixel_losses(logits, labels)
    weight = numpy_class_balanced_weights(counts, 0.99)
    np.testing.assert_allclose(loss, np.sum(weight[y] * pixel * valid) / valid.sum(), rtol=1e-6)
    np.testing.assert_allclose(aux["class_weight"], weight * [3, 3, 4, 0] / 10, rtol=1e-5)
    with pytest.raises(ValueError, match=r"class_count has shape \(3,\)"):
        losses.class_balanced_cross_entropy(logits, labels, class_count=[1, 2, 3])
    with pytest.raises(ValueError, match=r"beta must lie in \[0.0, 1.0\]"):
        losses.class_balanced_cross_entropy(logits, labels, class_count=counts, beta=1.5)


# ----------------------------------------------------------------------------------------------
# Device layouts: one device, jit over a mesh, pmap, shard_map (8 fake CPU devices).

LAYOUT_LOSSES = {
    "recall": losses.recall_cross_entropy,
    "class_balanced": functools.partial(
        losses.class_balanced_cross_entropy, class_count=[900, 300, 40, 9, 0, 2], beta=0.999
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_LOSSES))
def test_layouts_give_the_single_device_loss_and_gradient(name):
    fn = LAYOUT_LOSSES[name]
    params, x, labels = make_data()
    n = 8

    def objective(params, x, labels, axis_name=None):
        return fn(model(params, x), labels, axis_name=axis_name)

    loss, grads = jax.jit(jax.value_and_grad(objective))(params, x, labels)
    mesh = Mesh(np.array(jax.devices()[:n]), ("batch",))
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P("batch")))
    params_r = jax.device_put(params, NamedSharding(mesh, P()))
    m_loss, m_grads = jax.jit(jax.value_and_grad(objective))(params_r, put(x), put(labels))

    def per_replica(params, x, labels):
        value, g = jax.value_and_grad(objective)(params, x, labels, "batch")
        return value, lax.pmean(g, "batch")

    p_loss, p_grads = jax.pmap(per_replica, axis_name="batch", devices=jax.devices()[:n])(
        replicate(params, n), shard(x, n), shard(labels, n)
    )
    s_loss, s_grads = jax.jit(
        jax.shard_map(
            lambda p, x, y: jax.value_and_grad(objective)(p, x, y, "batch"),
            mesh=mesh,
            in_specs=(P(), P("batch"), P("batch")),
            out_specs=(P(), P()),
        )
    )(params_r, put(x), put(labels))
    for got_loss, got_grads in [
        (m_loss, m_grads),
        (s_loss, s_grads),
        *[(p_loss[r], jax.tree.map(lambda g, r=r: g[r], p_grads)) for r in range(n)],
    ]:
        np.testing.assert_allclose(got_loss, loss, rtol=2e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got_grads, grads
        )


# ----------------------------------------------------------------------------------------------
# The objective and the config (exact accumulation: test_accumulation.py's CASES).


def test_config_variants_fields_and_one_line_errors():
    for name in ("recall", "class_balanced"):
        config = default.get_config(f"{name},tiny")
        assert config.loss.name == name
        config_lib.validate_config(config)
    config = default.get_config("class_balanced,tiny")
    for field, value, message in [
        ("cb_beta", 1.5, "config.loss.cb_beta=1.5 is invalid: expected a number in [0, 1]"),
        ("cb_beta", float("nan"), "config.loss.cb_beta=nan is invalid"),
        ("cb_counts", "image", "config.loss.cb_counts='image' is invalid: expected one of "),
        ("cb_counts", "3,-1", "--config.loss.cb_counts=..."),
    ]:
        bad = config.copy_and_resolve_references()
        bad.loss[field] = value
        with pytest.raises(config_lib.ConfigError, match=re.escape(message)) as error:
            config_lib.validate_config(bad)
        assert "\n" not in str(error.value)


def test_class_counts_come_from_the_training_split_and_are_fixed():
    config = default.get_config("class_balanced,tiny")
    index = ClassIndex(
        counts=np.array([[10, 0, 5], [3, 4, 0], [7, 0, 0]], np.int32),
        sizes=np.full((3, 2), 4, np.int32),
    )
    resolved = objectives.resolve_class_counts(config, lambda: index)
    assert resolved.loss.cb_counts == "3,1,1"  # images containing each class
    assert config.loss.cb_counts == "images"  # the run's config (config.json) is unchanged
    config.loss.cb_counts = "pixels"
    assert objectives.resolve_class_counts(config, lambda: index).loss.cb_counts == "20,4,5"
    for other in (default.get_config("ce"), resolved):  # nothing to read: the same config
        assert objectives.resolve_class_counts(other, lambda: 1 / 0) is other
    logits = jnp.zeros((2, 3))
    labels = jnp.array([0, 2], jnp.int32)
    state = losses.stochastic_tce_init(3)
    loss, _, aux = objectives.create_loss_fn(resolved)(logits, labels, state, None)
    weights = numpy_class_balanced_weights([3, 1, 1], resolved.loss.cb_beta)
    np.testing.assert_allclose(loss, np.log(3) * (weights[0] + weights[2]) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="cb_counts='pixels' is counted in the training split"):
        objectives.create_loss_fn(config)(logits, labels, state, None)
    resolved.loss.cb_counts = "3,1"
    with pytest.raises(ValueError, match="cb_counts has 2 counts but the model has 3 classes"):
        objectives.create_loss_fn(resolved)(logits, labels, state, None)
