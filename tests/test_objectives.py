"""The loss registry: names, the aux contract, and which losses accumulate exactly."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from tce_jax import losses, objectives


def test_losses_are_the_registry_names_and_every_entry_builds():
    assert objectives.LOSSES == tuple(objectives.OBJECTIVES)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 5)), jnp.float32)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 5, size=(2, 4, 4)), jnp.int32)
    for name in objectives.LOSSES:
        config = default.get_config(name)
        loss, _, aux = objectives.create_loss_fn(config)(
            logits, labels, losses.stochastic_tce_init(5), None
        )
        assert np.isfinite(float(loss)), name
        assert set(aux) <= set(objectives.AUX_KEYS), name
        assert {"class_loss", "num_invalid"} <= set(aux), name
        assert objectives.supports_accumulation(name) == (name != "lovasz")


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
