"""The loss registry: names, the aux contract, and which losses accumulate exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_utils import assert_trees_close

from configs import default
from tce_jax import losses, objectives


def test_losses_are_the_registry_names_and_every_entry_builds():
    assert objectives.LOSSES == tuple(objectives.OBJECTIVES)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 5)), jnp.float32)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 5, size=(2, 4, 4)), jnp.int32)
    for name in objectives.LOSSES:
        config = default.get_config(name)
        config.loss.cb_counts = "9,5,3,0,1"  # class_balanced's (the trainer reads the data's)
        loss, _, aux = jax.jit(objectives.create_loss_fn(config))(
            logits, labels, losses.stochastic_tce_init(5), None
        )
        assert np.isfinite(float(loss)), name
        assert set(aux) <= set(objectives.AUX_KEYS), name
        assert {"class_loss", "num_invalid"} <= set(aux), name
        assert objectives.supports_accumulation(name) == (name not in ("lovasz", "ohem"))


def test_the_aux_contract_is_enforced_for_every_objective(monkeypatch):
    def make(aux):
        return objectives.Objective(lambda stats, state: (jnp.float32(0.0), state, aux))

    config = default.get_config("ce")
    state = losses.stochastic_tce_init(3)
    logits, labels = jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32)
    monkeypatch.setitem(objectives.OBJECTIVES, "ce", make({"x": 1}))
    with pytest.raises(KeyError, match=r"'ce' returns no \['class_loss', 'num_invalid'\]"):
        objectives.create_loss_fn(config)(logits, labels, state, None)
    full = {"class_loss": 1, "num_invalid": 0, "nonfinite_batch": True, "extra": 2}
    monkeypatch.setitem(objectives.OBJECTIVES, "ce", make(full))
    _, _, aux = objectives.create_loss_fn(config)(logits, labels, state, None)
    assert aux == {"class_loss": 1, "num_invalid": 0}  # only what the train step logs


def test_the_tilted_losses_are_the_entries_that_read_t_and_tau():
    """The sweep and the report read the tilted losses from the registry."""
    assert [n for n, o in objectives.OBJECTIVES.items() if o.tilted] == ["tce", "stochastic_tce"]


@pytest.mark.parametrize(
    "name, fields",
    [
        ("ce", {}),
        ("tce", {"t": 2.0, "tau": -0.7, "class_weighting": "uniform"}),
        ("stochastic_tce", {"t": 1.0, "tau": 0.5, "lam": 0.5}),
        ("weighted_ce", {"class_weights": "median_frequency"}),
        ("focal", {}),
        ("lovasz", {}),
        ("recall", {}),
        ("class_balanced", {"cb_counts": "9,5,3,0,1"}),
        ("ohem", {"ohem_thresh": 0.5, "ohem_min_kept": 2}),
        ("dice", {"dice_smooth": 0.5}),
    ],
)
def test_pmap_objective_equals_the_objective_of_the_whole_batch(name, fields):
    """Under pmap the statistics of the devices add up (at a common shift for tau != 0): every
    replica gets the loss, state and aux of the whole batch."""
    config = default.get_config(name)
    config.loss.update(fields)
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(8, 3, 3, 5)), jnp.float32)
    labels = rng.integers(0, 5, size=(8, 3, 3))
    labels[:2] = 4  # class 4 on two devices only
    labels[5, 0] = 255
    labels = jnp.asarray(labels, jnp.int32)
    loss_fn = objectives.create_loss_fn(config)
    state = losses.stochastic_tce_init(5)
    want = loss_fn(logits, labels, state, None)
    got = jax.pmap(
        lambda z, y: loss_fn(z, y, state, "devices"),
        axis_name="devices",
        devices=jax.devices()[:4],
    )(logits.reshape(4, 2, 3, 3, 5), labels.reshape(4, 2, 3, 3))
    for r in range(4):
        assert_trees_close(jax.tree.map(lambda x, r=r: x[r], got), want, rtol=1e-5, atol=1e-6)
