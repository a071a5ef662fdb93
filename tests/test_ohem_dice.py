"""OHEM cross-entropy and the soft Dice loss: against numpy computations of their definitions
(docs/maths.md) on hand-made cases, where the references (mmsegmentation,
segmentation_models_pytorch) differ from our documented choice, exact across device layouts
(one device, jit over a mesh, pmap, shard_map on the 8 fake CPU devices), Dice under exact
gradient accumulation, OHEM refusing it, and their config fields."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import cityscapes, default
from tce_jax import accumulation, config_lib, losses, objectives
from tce_jax.losses import _statistics

IGNORE = 255
AXIS = "batch"
NUM_DEVICES = 8


def make_case(seed, shape=(4, 3, 5), num_classes=4, *, scale=2.0, absent=(3,), ignore=0.2):
    """Random logits; skewed labels with an absent class, ignored and out-of-range pixels."""
    rng = np.random.default_rng(seed)
    p = np.exp(-0.6 * np.arange(num_classes))
    p[list(absent)] = 0.0
    labels = rng.choice(num_classes, size=shape, p=p / p.sum())
    labels[rng.random(shape) < ignore] = IGNORE
    labels.reshape(-1)[0] = num_classes + 1  # out of range: not valid
    logits = (scale * rng.normal(size=shape + (num_classes,))).astype(np.float32)
    return logits, labels.astype(np.int32)


def np_flat(logits, labels):
    z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    valid = (y >= 0) & (y < z.shape[1]) & (y != IGNORE)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs, np.where(valid, y, 0), valid


# ----------------------------------------------------------------------------------------------
# OHEM.


def np_ohem(logits, labels, thresh, min_kept):
    """(loss, kept pixels, threshold): the definition, with a sort of the whole batch."""
    probs, y, valid = np_flat(logits, labels)
    p = probs[np.arange(len(y)), y]
    ce = -np.log(p)
    ranked = np.sort(p[valid])
    k = min_kept * labels.shape[0]
    threshold = max(thresh, ranked[k] if k < len(ranked) else np.inf)
    kept = valid & (p < threshold)
    return (ce[kept].mean() if kept.any() else 0.0), int(kept.sum()), threshold


jit_ohem = jax.jit(
    functools.partial(losses.ohem_cross_entropy, return_aux=True),
    static_argnames=("thresh", "min_kept"),
)


def tied_case():
    """Two images of two classes whose true-class probabilities are 0.1 (three pixels), 0.5
    (four pixels of equal logits: a tie) and 0.9 (five), and two ignored pixels."""
    rows = (
        [([np.log(1 / 9), 0.0], 0)] * 3
        + [([0.0, 0.0], 0)] * 4
        + [([0.0, np.log(9.0)], 1)] * 5
        + [([0.0, 0.0], IGNORE)] * 2
    )
    perm = np.random.default_rng(0).permutation(len(rows))
    logits = np.array([rows[i][0] for i in perm], np.float32).reshape(2, 7, 2)
    labels = np.array([rows[i][1] for i in perm], np.int32).reshape(2, 7)
    return logits, labels


@pytest.mark.parametrize(
    "case, thresh, min_kept, expected_kept",
    [
        ("random", 0.7, 2, None),  # thresh binds
        ("random", 0.05, 5, 20),  # min_kept binds: the K = 5 * 4 hardest
        ("random", 0.0, 0, 0),  # T = max(0, the hardest pixel's p): nothing is below it
        ("random", 0.7, 1000, "all"),  # min_kept above the valid pixels: all kept
        ("ignored", 0.7, 2, 0),  # no valid pixel
        ("tied", 0.3, 2, 3),  # q_(5) = 0.5 is tied: the tie is left out, 3 < K = 4 kept
        ("tied", 0.3, 4, 7),  # q_(9) = 0.9: the whole 0.5 tie is kept
        ("tied", 0.45, 0, 3),  # T = thresh
    ],
)
def test_ohem_matches_the_definition(case, thresh, min_kept, expected_kept):
    if case == "tied":
        logits, labels = tied_case()
    else:
        logits, labels = make_case(0)
        if case == "ignored":
            labels[:] = IGNORE
    want, num_kept, threshold = np_ohem(logits, labels, thresh, min_kept)
    loss, aux = jit_ohem(logits, labels, thresh=thresh, min_kept=min_kept)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    assert int(aux["num_kept"]) == num_kept
    np.testing.assert_allclose(aux["threshold"], threshold, rtol=1e-6)
    if expected_kept == "all":
        expected_kept = int(np_flat(logits, labels)[2].sum())
        np.testing.assert_allclose(loss, jax.jit(losses.cross_entropy)(logits, labels), rtol=1e-6)
    if expected_kept is not None:
        assert num_kept == expected_kept


def test_ohem_keeps_every_pixel_where_mmsegmentation_drops_the_easiest():
    """With at most K valid pixels mmsegmentation's threshold is the easiest pixel's
    probability (`sort_prob[min(K, M - 1)]`), which drops it; ours keeps every pixel."""
    logits, labels = make_case(1)
    probs, y, valid = np_flat(logits, labels)
    p = np.sort(probs[np.arange(len(y)), y][valid])
    mmseg_threshold = max(0.1, p[min(1000 * labels.shape[0], len(p) - 1)])
    assert int(np.sum(p < mmseg_threshold)) == len(p) - 1
    _, aux = jit_ohem(logits, labels, thresh=0.1, min_kept=1000)
    assert int(aux["num_kept"]) == len(p) and np.isinf(aux["threshold"])


@jax.jit
def sorted_probabilities(logits, labels):
    """The valid pixels' float32 true-class probabilities as the loss computes them, sorted
    (invalid pixels last, as +inf)."""
    z, safe, valid, _ = _statistics._flat_pixels(logits, labels, None, IGNORE)
    prob = jnp.exp(-_statistics._pixel_losses(z, safe)).astype(jnp.float32)
    return jnp.sort(jnp.where(valid, prob, jnp.inf))


def test_ohem_threshold_is_the_sorted_order_statistic_bit_for_bit():
    logits, labels = make_case(2, shape=(4, 8, 8), scale=3.0)
    logits[1, :4] = logits[1, 4:]  # whole rows of tied pixels
    labels[1, :4] = labels[1, 4:]
    ranked = np.asarray(sorted_probabilities(logits, labels))
    for min_kept in (0, 7, 40, 1000):
        k = min_kept * labels.shape[0]
        _, aux = jit_ohem(logits, labels, thresh=0.0, min_kept=min_kept)
        assert aux["threshold"] == ranked[min(k, ranked.size - 1)], min_kept
    for thresh in (0.0, 0.7, 1.0):
        assert losses.ohem_threshold_rounds(thresh) == int(
            np.ceil(np.log2(0x3F800000 - np.float32(thresh).view(np.int32) + 2))
        )


def ohem_of_logits(logits, labels):
    return losses.ohem_cross_entropy(logits, labels, thresh=0.6, min_kept=3)


def test_ohem_gradient_flows_through_the_kept_pixels_only():
    logits, labels = make_case(3)
    grad = jax.jit(jax.grad(ohem_of_logits))(logits, labels)
    probs, y, valid = np_flat(logits, labels)
    p = probs[np.arange(len(y)), y]
    _, num_kept, threshold = np_ohem(logits, labels, 0.6, 3)
    kept = valid & (p < threshold)
    onehot = np.eye(logits.shape[-1])[y]
    want = np.where(kept[:, None], probs - onehot, 0.0) / num_kept  # d mean CE / d logits
    np.testing.assert_allclose(np.asarray(grad).reshape(want.shape), want, atol=1e-6)
    empty = jax.jit(jax.grad(ohem_of_logits))(logits, labels * 0 + IGNORE)
    assert np.all(np.asarray(empty) == 0)


# ----------------------------------------------------------------------------------------------
# Dice.


def np_dice(logits, labels, smooth=1.0, exponent=2.0, classes="all"):
    probs, y, valid = np_flat(logits, labels)
    onehot = (y[:, None] == np.arange(probs.shape[1])) & valid[:, None]
    intersection = np.sum(probs * onehot, 0)
    cardinality = np.sum(probs**exponent * valid[:, None], 0) + onehot.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = 1 - (2 * intersection + smooth) / (cardinality + smooth)
    per_class = np.where(cardinality + smooth > 0, per_class, 0.0)
    included = np.ones(probs.shape[1], bool) if classes == "all" else onehot.sum(0) > 0
    return per_class[included].mean() if included.any() else 0.0


jit_dice = jax.jit(losses.dice_loss, static_argnames=("smooth", "exponent", "classes"))


@pytest.mark.parametrize(
    "smooth, exponent, classes, ignored",
    [
        (1.0, 2.0, "all", False),  # mmsegmentation's setting; class 3 absent
        (1.0, 2.0, "present", False),
        (0.0, 1.0, "all", False),
        (0.5, 1.5, "present", False),
        (1.0, 2.0, "all", True),  # no valid pixel: 0
        (0.0, 2.0, "all", True),  # ... also with a zero denominator
        (0.0, 1.0, "present", True),
    ],
)
def test_dice_matches_the_definition(smooth, exponent, classes, ignored):
    logits, labels = make_case(4)
    if ignored:
        labels[:] = IGNORE
    got = jit_dice(logits, labels, smooth=smooth, exponent=exponent, classes=classes)
    np.testing.assert_allclose(got, np_dice(logits, labels, smooth, exponent, classes), rtol=1e-5)
    if ignored:
        assert float(got) == 0.0


def test_dice_averages_over_all_classes_by_default():
    """Our default, mmsegmentation's: an absent class counts, with ``1 - s / (P_c + s)``."""
    logits, labels = make_case(5)
    probs, _, valid = np_flat(logits, labels)
    absent_term = 1 - 1 / (np.sum(probs[valid, 3] ** 2) + 1)
    all_classes = float(jit_dice(logits, labels))
    present = float(jit_dice(logits, labels, classes="present"))
    np.testing.assert_allclose(all_classes, (3 * present + absent_term) / 4, rtol=1e-5)
    assert absent_term > 0.01


def mmseg_v0_dice(logits, labels, smooth=1.0, exponent=2.0):
    """mmsegmentation 0.x's DiceLoss: per image, ignored pixels in the denominator (with the
    target one-hot of label C - 1), the mean over all C classes, then over the images."""
    num_classes = logits.shape[-1]
    total = 0.0
    for z, y in zip(logits, labels, strict=True):
        probs, _, _ = np_flat(z, y)
        target = np.eye(num_classes)[np.clip(y.reshape(-1), 0, num_classes - 1)]
        valid = y.reshape(-1) != IGNORE
        num = 2 * np.sum(probs * target * valid[:, None], 0) + smooth
        den = np.sum(probs**exponent + target**exponent, 0) + smooth
        total += np.mean(1 - num / den)
    return total / len(logits)


def test_dice_equals_the_references_where_they_agree_and_pins_where_they_differ():
    logits, labels = make_case(6, ignore=0.0)
    labels.reshape(-1)[0] = 0  # no invalid pixel
    # One image, no ignored pixel: mmsegmentation 0.x's per-image Dice is ours.
    one = jit_dice(logits[:1], labels[:1])
    np.testing.assert_allclose(one, mmseg_v0_dice(logits[:1], labels[:1]), rtol=1e-5)
    # Several images: ours sums over the whole batch, mmsegmentation averages per image.
    assert abs(float(jit_dice(logits, labels)) - mmseg_v0_dice(logits, labels)) > 1e-3
    # Ignored pixels: left out of every sum here, in mmsegmentation's denominator.
    labels[0, 0] = IGNORE
    ours = np_dice(logits[:1], labels[:1])
    np.testing.assert_allclose(jit_dice(logits[:1], labels[:1]), ours, rtol=1e-5)
    assert abs(ours - mmseg_v0_dice(logits[:1], labels[:1])) > 1e-3
    # segmentation_models_pytorch (smooth 0, exponent 1, batch sums): equal when every class is
    # present; it zeroes an absent class's term but still divides by C.
    labels = np.arange(labels.size).reshape(labels.shape) % logits.shape[-1]
    probs, y, _ = np_flat(logits, labels)
    onehot = np.eye(logits.shape[-1])[y]
    smp = np.mean(1 - 2 * np.sum(probs * onehot, 0) / np.sum(probs + onehot, 0))
    np.testing.assert_allclose(jit_dice(logits, labels, smooth=0.0, exponent=1.0), smp, rtol=1e-5)


def test_dice_gradients_are_finite_with_saturated_probabilities():
    logits, labels = make_case(7, scale=200.0)  # softmax probabilities of exactly 0 and 1
    grad = jax.jit(jax.grad(jit_dice), static_argnames=("smooth", "exponent"))
    for exponent, smooth in ((1.0, 0.0), (2.0, 1.0)):
        assert np.all(np.isfinite(grad(logits, labels, smooth=smooth, exponent=exponent)))
    ignored = grad(logits, labels * 0 + IGNORE, smooth=0.0, exponent=1.0)
    assert np.all(np.asarray(ignored) == 0)


# ----------------------------------------------------------------------------------------------
# Device layouts: one device, jit over a mesh, pmap, shard_map.

FEATURES = 3
LAYOUT_LOSSES = {
    "ohem": functools.partial(losses.ohem_cross_entropy, thresh=0.2, min_kept=4),
    "dice": losses.dice_loss,
}


def layout_data():
    _, labels = make_case(8, shape=(NUM_DEVICES, 3, 4))
    labels[-1] = IGNORE  # a device without a valid pixel
    rng = np.random.default_rng(9)
    x = rng.normal(size=labels.shape + (FEATURES,)).astype(np.float32)
    params = {"w": rng.normal(size=(FEATURES, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    return params, x, labels


def loss_of_params(params, x, labels, name, axis_name=None):
    return LAYOUT_LOSSES[name](x @ params["w"] + params["b"], labels, axis_name=axis_name)


def assert_close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want)


@pytest.mark.parametrize("name", list(LAYOUT_LOSSES))
def test_every_layout_gives_the_loss_and_gradient_of_the_global_batch(name):
    params, x, labels = layout_data()
    value_and_grad = jax.value_and_grad(loss_of_params)
    want = jax.jit(value_and_grad, static_argnums=3)(params, x, labels, name)

    mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), (AXIS,))
    sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    on_mesh = jax.jit(value_and_grad, static_argnums=3)(
        jax.device_put(params, replicated),
        jax.device_put(x, sharded),
        jax.device_put(labels, sharded),
        name,
    )
    assert_close(on_mesh, want)

    def per_device(params, x, labels):
        loss, grads = value_and_grad(params, x, labels, name, AXIS)
        return loss, lax.pmean(grads, AXIS)

    def split(a):
        return a.reshape(NUM_DEVICES, -1, *a.shape[1:])

    replicas = jax.tree.map(lambda a: np.broadcast_to(a, (NUM_DEVICES, *a.shape)), params)
    pmapped = jax.pmap(per_device, axis_name=AXIS)(replicas, split(x), split(labels))
    for r in range(NUM_DEVICES):
        assert_close(jax.tree.map(lambda a, r=r: a[r], pmapped), want)

    # shard_map with replicated parameters (check_vma): the gradient is already the global one.
    shard_mapped = jax.jit(
        jax.shard_map(
            functools.partial(value_and_grad, name=name, axis_name=AXIS),
            mesh=mesh,
            in_specs=(P(), P(AXIS), P(AXIS)),
            out_specs=(P(), P()),
        )
    )(params, x, labels)
    assert_close(shard_mapped, want)


def test_ohem_kept_pixels_are_the_same_on_every_layout():
    """The threshold is exact, not close: the same pixels are kept on one device and on 8."""
    params, x, labels = layout_data()
    logits = x @ params["w"]
    fn = functools.partial(losses.ohem_cross_entropy, thresh=0.0, min_kept=3, return_aux=True)
    _, want = jax.jit(fn)(logits, labels)
    _, got = jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS)(
        logits.reshape(NUM_DEVICES, 1, 3, 4, 4), labels.reshape(NUM_DEVICES, 1, 3, 4)
    )
    assert np.all(got["threshold"] == want["threshold"])
    assert np.all(got["num_kept"] == want["num_kept"]) and int(want["num_kept"]) > 0


# ----------------------------------------------------------------------------------------------
# Objectives, configs and gradient accumulation.


def test_objectives_are_the_loss_functions_of_the_config_fields():
    logits, labels = make_case(10)
    config = default.get_config("ohem")
    config.loss.update(ohem_thresh=0.4, ohem_min_kept=3)
    state = losses.stochastic_tce_init(4)
    loss, _, aux = jax.jit(objectives.create_loss_fn(config))(logits, labels, state, None)
    want = jit_ohem(logits, labels, thresh=0.4, min_kept=3)[0]
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert set(aux) == {"class_loss", "num_invalid"}
    config = default.get_config("dice")
    config.loss.update(dice_smooth=0.5, dice_exponent=1.0)
    loss, _, aux = jax.jit(objectives.create_loss_fn(config))(logits, labels, state, None)
    np.testing.assert_allclose(loss, np_dice(logits, labels, 0.5, 1.0), rtol=1e-5)
    assert int(aux["num_invalid"]) == 1
    assert not objectives.supports_accumulation("ohem")
    assert objectives.supports_accumulation("dice")


def test_dice_accumulated_over_micro_batches_equals_one_pass():
    config = default.get_config("dice")
    config.loss.update(dice_smooth=0.5, dice_exponent=2.0)
    params, x, labels = layout_data()
    batch = {"image": x, "label": labels}
    decomposition = objectives.create_decomposition(config)
    loss_fn = objectives.create_loss_fn(config)
    state = losses.stochastic_tce_init(4)

    def apply_fn(p, images):
        return images @ p["w"] + p["b"], {}

    def whole(p):
        return loss_fn(apply_fn(p, x)[0], labels, state, None)[0]

    loss, grads = jax.jit(jax.value_and_grad(whole))(params)
    got_loss, got_grads, *_ = jax.jit(
        functools.partial(accumulation.value_and_grad, num_micro_batches=4),
        static_argnums=(0, 3),
    )(apply_fn, params, batch, decomposition, state)
    np.testing.assert_allclose(got_loss, loss, rtol=2e-6)
    assert_close(got_grads, grads)


def test_ohem_refuses_gradient_accumulation_in_one_line():
    config = default.get_config("ohem")
    config.grad_accum_steps = 2
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate_config(config)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("config.grad_accum_steps=2 is invalid: expected 1 with ")
    assert "loss.name='ohem'" in message
    with pytest.raises(ValueError, match="OHEM takes an order statistic"):
        objectives.create_decomposition(config)
    config.loss.name = "dice"
    config_lib.validate_config(config)


def test_config_fields_and_variants():
    config = default.get_config("ohem")
    assert config.loss.name == "ohem"
    assert (config.loss.ohem_thresh, config.loss.ohem_min_kept) == (0.7, 1562)
    assert cityscapes.get_config("ohem").loss.ohem_min_kept == 100_000  # mmsegmentation's
    config = default.get_config("dice,tiny")
    assert (config.loss.name, config.loss.dice_smooth, config.loss.dice_exponent) == (
        "dice",
        1.0,
        2.0,
    )
    config_lib.validate_config(config)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("ohem_thresh", 1.5, "a number in [0, 1]"),
        ("ohem_thresh", -0.1, "a number in [0, 1]"),
        ("ohem_min_kept", -1, "an integer >= 0"),
        ("ohem_min_kept", True, "an integer >= 0"),
        ("dice_smooth", -1.0, "a number >= 0"),
        ("dice_smooth", float("nan"), "a number >= 0"),
        ("dice_exponent", 0.5, "a number >= 1"),
    ],
)
def test_bad_config_values_are_one_line_errors(field, value, expected):
    config = default.get_config("tiny")
    config.loss[field] = value
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate_config(config)
    message = str(error.value)
    assert "\n" not in message and f"config.loss.{field}=" in message and expected in message
    assert f"--config.loss.{field}=" in message


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda z, y: losses.ohem_cross_entropy(z, y, thresh=1.5), r"thresh must lie in"),
        (lambda z, y: losses.ohem_cross_entropy(z, y, min_kept=-1), "min_kept must be an int"),
        (lambda z, y: losses.ohem_cross_entropy(z, y, min_kept=2.0), "min_kept must be an int"),
        (lambda z, y: jit_dice(z, y, exponent=0.5), r"exponent must lie in"),
        (lambda z, y: jit_dice(z, y, smooth=-1.0), r"smooth must lie in"),
        (lambda z, y: jit_dice(z, y, classes="some"), "classes must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match):
    logits, labels = make_case(11, shape=(1, 2, 2))
    with pytest.raises(ValueError, match=match):
        call(logits, labels)
