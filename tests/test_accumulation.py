"""Exact gradient accumulation: k micro-batches give the one-pass step on the whole batch.

The reference is `steps.train_step` with `grad_accum_steps=1` on the whole batch (the loss
functions themselves are checked against numpy in test_losses.py). The model has no
BatchNorm, so the comparison is exact: with BatchNorm each micro-batch normalises with its own
statistics, a different function. It does keep a BatchNorm-like running mean of its input in
`batch_stats`, to pin the running statistics kept under accumulation (the mean of the
micro-batches' updates, which for a running mean equals the one-pass update).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from run_utils import assert_trees_close, latest_checkpoint

from configs import default
from tce_jax import accumulation, config_lib, losses, objectives, parallel, steps, train

NUM_CLASSES = 5
IGNORE = 255
AXIS = parallel.PMAP_AXIS


class TinySegmenter(nn.Module):
    """Two convolutions, no normalisation; a running mean of the input as `batch_stats`."""

    num_classes: int = NUM_CLASSES
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool):
        running = self.variable("batch_stats", "mean", jnp.zeros, (x.shape[-1],))
        if train and not self.is_initializing():
            batch_mean = jnp.mean(x, axis=(0, 1, 2))
            if self.axis_name is not None:
                batch_mean = jax.lax.pmean(batch_mean, self.axis_name)
            running.value = 0.9 * running.value + 0.1 * batch_mean
        h = nn.tanh(nn.Conv(6, (3, 3))(x))
        return nn.Conv(self.num_classes, (1, 1))(h)


def make_batch(batch=8, seed=0):
    """Skewed labels with ignored pixels; class 4 appears in one image only (so in one
    micro-batch), which is where a per-micro-batch tilt differs most from the global one."""
    rng = np.random.default_rng(seed)
    p = np.array([0.6, 0.25, 0.1, 0.05, 0.0])
    labels = rng.choice(NUM_CLASSES, size=(batch, 6, 6), p=p)
    labels[rng.random(labels.shape) < 0.1] = IGNORE
    labels[3, :2, :2] = 4
    images = rng.normal(size=(batch, 6, 6, 3)).astype(np.float32)
    return {"image": images, "label": labels.astype(np.int32)}


def loss_config(name, **fields) -> ml_collections.ConfigDict:
    config = default.get_config(name)
    for key, value in fields.items():
        config.loss[key] = value
    return config


CASES = {
    "ce": loss_config("ce"),
    "tce": loss_config("tce", t=2.0),
    "tce_tau": loss_config("tce", t=-1.5, tau=0.7, class_weighting="uniform"),
    "stochastic_tce": loss_config("stochastic_tce", t=1.0, lam=0.5),
    "stochastic_tce_tau": loss_config("stochastic_tce", t=3.0, tau=-0.5, lam=0.3),
    "stochastic_tce_tilted_ce": loss_config(
        "stochastic_tce", t=2.0, lam=0.4, estimator="tilted", batch_loss="ce"
    ),
    "weighted_ce": loss_config("weighted_ce", class_weights="median_frequency"),
    "weighted_ce_vector": loss_config("weighted_ce", class_weights="1,2,0.5,3,4"),
    "focal": loss_config("focal", focal_gamma=2.0),
    "recall": loss_config("recall"),
    "class_balanced": loss_config("class_balanced", cb_counts="500,90,40,3,0", cb_beta=0.99),
}


def initial_state(model, tx, images, config) -> steps.TrainState:
    variables = model.init(jax.random.key(1), jnp.asarray(images[:1]), train=False)
    tce_state = losses.stochastic_tce_init(NUM_CLASSES)
    if config.loss.name == "stochastic_tce":
        # A state that has seen a few classes, so the running estimates matter.
        tce_state = tce_state._replace(
            running_loss=jnp.array([0.5, 1.0, 2.0, 0.0, 0.0]),
            running_freq=jnp.array([0.6, 0.3, 0.1, 0.0, 0.0]),
            seen=jnp.array([True, True, True, False, False]),
            step=jnp.array(7, jnp.int32),
        )
    return steps.TrainState(
        step=jnp.array(7, jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        tce_state=tce_state,
        sampling_probs=jnp.zeros((2, NUM_CLASSES)),
    )


def step_fn(config, model, tx, grad_accum_steps, axis_name=None):
    kwargs = {}
    if grad_accum_steps > 1:
        kwargs = dict(
            grad_accum_steps=grad_accum_steps,
            decomposition=objectives.create_decomposition(config),
        )
    return functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        loss_fn=objectives.create_loss_fn(config),
        axis_name=axis_name,
        **kwargs,
    )


def assert_steps_equal(got, want):
    (got_state, got_metrics), (want_state, want_metrics) = got, want
    assert_trees_close(got_metrics, want_metrics, rtol=2e-5, atol=2e-6)
    assert_trees_close(
        jax.device_get(got_state.params), jax.device_get(want_state.params), rtol=2e-5, atol=2e-6
    )
    assert_trees_close(got_state.tce_state._asdict(), want_state.tce_state._asdict(),
                       rtol=2e-5, atol=2e-6)
    assert_trees_close(got_state.batch_stats, want_state.batch_stats, rtol=1e-6, atol=1e-7)
    assert int(got_state.step) == int(want_state.step)


@pytest.mark.parametrize("case", sorted(CASES))
def test_jit_accumulated_step_equals_one_pass(case):
    config = CASES[case]
    model, tx = TinySegmenter(), optax.sgd(0.5)
    batch = make_batch()
    state = initial_state(model, tx, batch["image"], config)
    want = jax.jit(step_fn(config, model, tx, 1))(state, batch)
    got = jax.jit(step_fn(config, model, tx, 4))(state, batch)
    assert_steps_equal(got, want)
    assert int(got[0].step) == 8
    if config.loss.name == "stochastic_tce":
        assert int(got[0].tce_state.step) == 8  # one update per global step, not per micro-batch


def test_gradients_equal_one_pass_and_differ_from_mean_of_micro_batches():
    """The accumulated gradient is the whole batch's, not optax.MultiSteps' mean of the
    micro-batch gradients (which tilts each micro-batch by its own class losses)."""
    config = CASES["tce"]
    model = TinySegmenter()
    batch = make_batch()
    params = model.init(jax.random.key(1), jnp.asarray(batch["image"][:1]), train=False)
    loss_fn = objectives.create_loss_fn(config)
    tce_state = losses.stochastic_tce_init(NUM_CLASSES)

    def apply_fn(p, images):
        logits, updates = model.apply(
            {"params": p, "batch_stats": params["batch_stats"]}, images, train=True,
            mutable=["batch_stats"],
        )
        return logits, updates["batch_stats"]

    def whole(p, b):
        return loss_fn(apply_fn(p, b["image"])[0], b["label"], tce_state, None)[0]

    loss, grads = jax.jit(jax.value_and_grad(whole))(params["params"], batch)
    got_loss, got_grads, *_ = jax.jit(
        functools.partial(accumulation.value_and_grad, num_micro_batches=2),
        static_argnums=(0, 3),
    )(apply_fn, params["params"], batch, objectives.create_decomposition(config), tce_state)
    np.testing.assert_allclose(got_loss, loss, rtol=2e-6)
    assert_trees_close(got_grads, grads, rtol=2e-5, atol=1e-6)

    micro = accumulation.split_micro_batches(batch, 2)
    mean_of_micro = jax.tree.map(
        lambda *g: sum(g) / 2,
        *[jax.jit(jax.grad(whole))(params["params"], jax.tree.map(lambda x, j=j: x[j], micro))
          for j in range(2)],
    )
    differences = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b))),
        jax.device_get(mean_of_micro), jax.device_get(grads),
    ))
    assert max(differences) > 0.05, differences


@pytest.mark.parametrize("case", ["tce_tau", "stochastic_tce", "weighted_ce", "ce"])
def test_pmap_accumulated_step_equals_one_pass(case):
    config = CASES[case]
    num_devices = 4
    tx = optax.sgd(0.5)
    model = TinySegmenter(axis_name=AXIS)
    batch = make_batch()
    state = initial_state(TinySegmenter(), tx, batch["image"], config)
    want = jax.jit(step_fn(config, TinySegmenter(), tx, 1))(state, batch)

    devices = jax.devices()[:num_devices]
    step = jax.pmap(step_fn(config, model, tx, 2, AXIS), axis_name=AXIS, devices=devices)
    replicated = jax.tree.map(lambda x: np.broadcast_to(x, (num_devices, *x.shape)), state)
    sharded = jax.tree.map(lambda x: x.reshape(num_devices, -1, *x.shape[1:]), batch)
    got_state, got_metrics = step(replicated, sharded)
    for r in range(num_devices):
        replica = (jax.tree.map(lambda x, r=r: x[r], got_state),
                   jax.tree.map(lambda x, r=r: x[r], got_metrics))
        assert_steps_equal(replica, want)


def test_mesh_jit_accumulated_step_equals_one_pass():
    """jit over the 8-device mesh, batch sharded: each device holds part of every micro-batch."""
    config = CASES["stochastic_tce_tau"]
    model, tx = TinySegmenter(), optax.sgd(0.5)
    batch = make_batch(batch=16, seed=1)
    state = initial_state(model, tx, batch["image"], config)
    want = jax.jit(step_fn(config, model, tx, 1))(state, batch)
    mesh = parallel.MeshParallel()
    step = mesh.compile_train(step_fn(config, model, tx, 2))
    state_on_mesh = jax.device_put(state, mesh.replicated)
    got = step(state_on_mesh, mesh.put_batch(batch))
    assert_steps_equal(got, want)


def test_micro_batches_are_strided():
    batch = {"x": np.arange(8)}
    micro = accumulation.split_micro_batches(batch, 2)
    np.testing.assert_array_equal(micro["x"], [[0, 2, 4, 6], [1, 3, 5, 7]])
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        accumulation.split_micro_batches(batch, 3)


def test_config_validation():
    config = default.get_config("tiny")
    for bad in (0, -1):
        config.grad_accum_steps = bad
        with pytest.raises(config_lib.ConfigError, match="config.grad_accum_steps"):
            config_lib.validate_config(config)
    config.grad_accum_steps = 2
    config_lib.validate_config(config)
    config.loss.name = "lovasz"
    with pytest.raises(config_lib.ConfigError, match="grad_accum_steps=2 is invalid.*lovasz"):
        config_lib.validate_config(config)
    with pytest.raises(ValueError, match="not a function of additive statistics"):
        objectives.create_decomposition(config)
    config.loss.name = "tce"
    config.global_batch_size = 8
    with pytest.raises(config_lib.ConfigError, match="grad_accum_steps=2 is invalid"):
        config_lib.validate_layout(config, num_devices=8, num_processes=1)
    config_lib.validate_layout(config, num_devices=4, num_processes=1)


def test_tiny_run_with_accumulation(small_data_dir, tmp_path):
    """End to end, the tiny UNet (BatchNorm) with two micro-batches per step."""
    config = default.get_config("stochastic_tce,tiny")
    config.data.data_dir = small_data_dir
    config.global_batch_size = 16  # 8 devices x 2 micro-batches of one image
    config.grad_accum_steps = 2
    # Two steps of half-size crops: on CPU an accumulated step of this model takes seconds
    # (XLA:CPU runs the convolutions of a loop body slowly; 16x32 crops took 8 CPU-seconds less
    # than the tiny config's 32x64), and two steps show the state advancing once per step.
    config.data.crop_size = (16, 32)
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.data.final_eval_splits = ("validation",)
    results = train.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= results["validation"]["miou"] <= 1.0
    step, state = latest_checkpoint(str(tmp_path))
    assert step == config.num_train_steps
    assert int(state["tce_state"]["step"]) == config.num_train_steps
    assert np.all(np.isfinite(state["tce_state"]["running_loss"]))


def test_nonfinite_batch_leaves_the_stochastic_state_unchanged():
    """As in the one-pass stochastic_tce: a broken batch never enters the running state."""
    config = CASES["stochastic_tce"]
    model, tx = TinySegmenter(), optax.sgd(0.5)
    batch = make_batch()
    batch["image"][5, 0, 0, 0] = np.nan
    state = initial_state(model, tx, batch["image"], config)
    got_state, metrics = jax.jit(step_fn(config, model, tx, 4))(state, batch)
    assert not np.isfinite(metrics["loss"])
    assert_trees_close(got_state.tce_state._asdict(), state.tce_state._asdict())
