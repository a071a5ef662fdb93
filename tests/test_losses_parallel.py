"""Global exactness of the losses on 4 and 8 fake CPU devices (conftest provides 8).

The reference is the single-device computation on the whole batch (itself checked against numpy
float64 in test_losses.py). A tiny linear "model" gives the losses a parameter gradient, so the
pmap gradient convention (every replica returns the global loss; `lax.pmean` of the per-replica
parameter gradients gives the global gradient) is pinned, not just the value.
"""

import functools

import jax
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tce_jax.losses import cross_entropy, stochastic_tce, stochastic_tce_init, tilted_ce

IGNORE = 255
NUM_CLASSES = 6
FEATURES = 3
AXIS = "batch"


def make_data(batch=8, height=3, width=4, seed=0):
    """Images of a skewed, partly absent label distribution; one image entirely ignored."""
    rng = np.random.default_rng(seed)
    p = np.exp(-0.5 * np.arange(NUM_CLASSES))
    p[4] = 0.0  # absent everywhere
    labels = rng.choice(NUM_CLASSES, size=(batch, height, width), p=p / p.sum())
    labels[rng.random(labels.shape) < 0.15] = IGNORE
    labels[batch - 1] = IGNORE  # a replica (on 8 devices) without a valid pixel
    labels[0, 0, 0] = NUM_CLASSES + 3  # out of range: counted in num_invalid
    x = rng.normal(size=(batch, height, width, FEATURES)).astype(np.float32)
    params = {
        "w": rng.normal(size=(FEATURES, NUM_CLASSES)).astype(np.float32),
        "b": rng.normal(size=(NUM_CLASSES,)).astype(np.float32),
    }
    return params, x, labels.astype(np.int32)


def model(params, x):
    return x @ params["w"] + params["b"]


LOSSES = {
    "tce": dict(t=1.5),
    "tce_tau": dict(t=-2.0, tau=1.0, class_weighting="uniform"),
    "tce_large_t": dict(t=50.0, tau=-0.5),
}


def loss_fn(params, x, labels, kind, axis_name=None):
    logits = model(params, x)
    if kind == "ce":
        return cross_entropy(logits, labels, axis_name=axis_name), {}
    loss, aux = tilted_ce(logits, labels, axis_name=axis_name, return_aux=True, **LOSSES[kind])
    return loss, aux


@functools.partial(jax.jit, static_argnames=("kind",))
def single_device(params, x, labels, kind):
    return jax.value_and_grad(loss_fn, has_aux=True)(params, x, labels, kind)


def assert_tree_close(actual, expected, rtol=2e-5, atol=1e-6):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
                 actual, expected)


@functools.cache
def pmapped(kind, num_devices):
    def step(params, x, labels):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, x, labels, kind, axis_name=AXIS)
        # The usual Flax recipe; also return the raw per-replica gradient to pin the convention.
        return loss, aux, lax.pmean(grads, AXIS), grads

    return jax.pmap(step, axis_name=AXIS, devices=jax.devices()[:num_devices])


def shard(x, n):
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def replicate(tree, n):
    return jax.tree.map(lambda a: np.broadcast_to(a, (n,) + a.shape), tree)


@pytest.mark.parametrize("kind", ["tce", "tce_tau", "tce_large_t", "ce"])
@pytest.mark.parametrize("num_devices", [4, 8])
def test_pmap_matches_single_device(num_devices, kind):
    params, x, labels = make_data()
    (loss, aux), grads = single_device(params, x, labels, kind)
    step = pmapped(kind, num_devices)
    p_loss, p_aux, p_grads, raw_grads = step(replicate(params, num_devices),
                                             shard(x, num_devices), shard(labels, num_devices))
    for r in range(num_devices):
        np.testing.assert_allclose(p_loss[r], loss, rtol=2e-6)
        assert_tree_close(jax.tree.map(lambda a, r=r: a[r], p_aux), aux)
        assert_tree_close(jax.tree.map(lambda a, r=r: a[r], p_grads), grads)
    # psum would be num_devices times too large: the per-replica gradients sum to R * grad.
    assert_tree_close(jax.tree.map(lambda a: a.sum(0), raw_grads),
                      jax.tree.map(lambda g: num_devices * g, grads), rtol=1e-4, atol=1e-5)
    if kind != "ce":
        assert int(p_aux["num_invalid"][0]) == 1
        np.testing.assert_array_equal(p_aux["class_count"][0], np.bincount(
            labels[(labels >= 0) & (labels < NUM_CLASSES)], minlength=NUM_CLASSES))


@pytest.mark.parametrize("num_devices", [4, 8])
def test_jit_over_sharded_global_arrays(num_devices):
    params, x, labels = make_data()
    mesh = Mesh(np.array(jax.devices()[:num_devices]), (AXIS,))
    batch_sharding = NamedSharding(mesh, P(AXIS))
    x_s = jax.device_put(x, batch_sharding)
    labels_s = jax.device_put(labels, batch_sharding)
    params_r = jax.device_put(params, NamedSharding(mesh, P()))
    for kind in ("tce", "tce_tau"):
        (loss, aux), grads = single_device(params, x, labels, kind)
        (s_loss, s_aux), s_grads = jax.jit(
            jax.value_and_grad(loss_fn, has_aux=True), static_argnums=3)(
                params_r, x_s, labels_s, kind)
        np.testing.assert_allclose(s_loss, loss, rtol=2e-6)
        assert_tree_close(s_aux, aux)
        assert_tree_close(s_grads, grads)
        # The gradient w.r.t. sharded logits equals the single-device one and stays sharded.
        logits = model(params, x)
        logits_s = jax.device_put(logits, batch_sharding)
        f = jax.value_and_grad(lambda z, y, kw=LOSSES[kind]: tilted_ce(z, y, **kw))
        value, grad = jax.jit(f)(logits, labels)
        s_value, s_grad = jax.jit(f)(logits_s, labels_s)
        np.testing.assert_allclose(s_value, value, rtol=2e-6)
        np.testing.assert_allclose(s_grad, grad, rtol=2e-5, atol=1e-7)
        assert s_grad.sharding.is_equivalent_to(batch_sharding, s_grad.ndim)


def shard_map_tce(params, x, labels, num_devices):
    """Loss and parameter gradient of TCE under jit(shard_map) over `num_devices` devices
    (check_vma=True, replicated parameters: no pmean)."""
    mesh = Mesh(np.array(jax.devices()[:num_devices]), (AXIS,))
    batch_sharding = NamedSharding(mesh, P(AXIS))

    def local(params, x, labels):
        return jax.value_and_grad(lambda p: loss_fn(p, x, labels, "tce", axis_name=AXIS)[0])(
            params)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                              out_specs=(P(), P())))
    return f(jax.device_put(params, NamedSharding(mesh, P())),
             jax.device_put(x, batch_sharding), jax.device_put(labels, batch_sharding))


def test_shard_map_gradient_is_already_global():
    """shard_map (check_vma=True, replicated params): no pmean needed, as documented."""
    num_devices = 4
    params, x, labels = make_data()
    (loss, _), grads = single_device(params, x, labels, "tce")
    s_loss, s_grads = shard_map_tce(params, x, labels, num_devices)
    np.testing.assert_allclose(s_loss, loss, rtol=2e-6)
    assert_tree_close(s_grads, grads)


@pytest.mark.parametrize("num_devices", [4, 8])
def test_stochastic_tce_under_pmap(num_devices):
    params, x, labels = make_data()
    kwargs = dict(t=2.0, lam=0.5, tau=0.5)

    def local(params, x, labels, state, axis_name=None):
        def f(p):
            loss, new_state, aux = stochastic_tce(model(p, x), labels, state,
                                                  axis_name=axis_name, **kwargs)
            return loss, (new_state, aux)

        (loss, (new_state, aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
        if axis_name is not None:
            grads = lax.pmean(grads, axis_name)
        return loss, new_state, aux, grads

    single = jax.jit(local)
    step = jax.pmap(functools.partial(local, axis_name=AXIS), axis_name=AXIS,
                    devices=jax.devices()[:num_devices])
    state = stochastic_tce_init(NUM_CLASSES)
    p_state = replicate(state, num_devices)
    for seed in (1, 2):  # two steps: the second one blends into the first one's state
        _, x, labels = make_data(seed=seed)
        loss, state, aux, grads = single(params, x, labels, state)
        p_loss, p_state, p_aux, p_grads = step(replicate(params, num_devices),
                                               shard(x, num_devices),
                                               shard(labels, num_devices), p_state)
        for leaf in jax.tree.leaves(p_state):  # identical (bitwise) on every replica
            assert all(np.array_equal(leaf[0], leaf[r]) for r in range(num_devices))
        assert_tree_close(jax.tree.map(lambda a: a[0], p_state), state)
        for r in range(num_devices):
            np.testing.assert_allclose(p_loss[r], loss, rtol=2e-6)
            assert_tree_close(jax.tree.map(lambda a, r=r: a[r], p_grads), grads)
            np.testing.assert_allclose(p_aux["objective"][r], aux["objective"], rtol=2e-6)


def test_accelerator_form_under_pmap_and_shard_map(monkeypatch):
    """The GPU/TPU per-class reductions (forced on CPU) are exact across 8 replicas too."""
    from tce_jax.losses import _statistics as statistics_lib

    num_devices = 8
    params, x, labels = make_data()
    expected = {kind: single_device(params, x, labels, kind) for kind in ("tce_tau", "tce")}
    stats = statistics_lib
    monkeypatch.setattr(stats, "_segment_sum_form", stats._compare_sum_form)
    monkeypatch.setattr(stats, "_segment_max_form", stats._compare_max_form)
    monkeypatch.setattr(stats, "_gather_label_logits", stats._select_label_logits)

    def step(params, x, labels):  # a new function: no compilation shared with other tests
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, x, labels, "tce_tau", axis_name=AXIS)
        return loss, aux, lax.pmean(grads, AXIS)

    p_loss, p_aux, p_grads = jax.pmap(step, axis_name=AXIS)(
        replicate(params, num_devices), shard(x, num_devices), shard(labels, num_devices))
    (loss, aux), grads = expected["tce_tau"]
    for r in range(num_devices):
        np.testing.assert_allclose(p_loss[r], loss, rtol=2e-6)
        assert_tree_close(jax.tree.map(lambda a, r=r: a[r], p_aux), aux)
        assert_tree_close(jax.tree.map(lambda a, r=r: a[r], p_grads), grads)

    s_loss, s_grads = shard_map_tce(params, x, labels, num_devices)
    (loss, _), grads = expected["tce"]
    np.testing.assert_allclose(s_loss, loss, rtol=2e-6)
    assert_tree_close(s_grads, grads)
