"""The optimizer's parameter groups (decode head learning rate) and the SegFormer recipes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from run_utils import assert_trees_close

from configs import default
from tce_jax import config_lib, models, steps

# Parameters shaped as a model's: a backbone, a decode head of two modules, 1-D biases/norms.
PARAMS = {
    "backbone": {"conv": {"kernel": jnp.full((3, 3, 2, 4), 0.5)}, "bn": {"scale": jnp.ones(4)}},
    "aspp": {"conv": {"kernel": jnp.full((1, 1, 4, 4), -0.25)}},
    "classifier": {"kernel": jnp.full((4, 3), 0.75), "bias": jnp.full(3, 0.1)},
}
HEAD = ("aspp", "classifier")


def _grads(i):
    """A different, deterministic gradient at every step."""
    return jax.tree.map(lambda p: jnp.sin(p + i) + 0.3, PARAMS)


def _updates(tx, num_steps=4):
    """The updates of `num_steps` steps of `tx` from PARAMS (each applied before the next)."""
    params, state, out = PARAMS, tx.init(PARAMS), []
    update = jax.jit(tx.update)
    for i in range(num_steps):
        updates, state = update(_grads(i), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out, state


def _config(name="adamw", multiplier=1.0, model="deeplabv3plus_resnet50"):
    config = default.get_config()
    opt = config.optimizer
    opt.name, opt.learning_rate, opt.weight_decay, opt.warmup_steps = name, 0.1, 0.05, 2
    opt.head_lr_multiplier = multiplier
    config.model.name = model
    config.num_train_steps = 10
    return config


def test_deeplab_head_modules_are_its_top_level_head():
    assert models.head_modules("deeplabv3plus_resnet101") == ("aspp", "decoder", "classifier")
    assert models.head_modules("unet") == ()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_multiplier_one_is_the_single_learning_rate_optimizer(name):
    """head_lr_multiplier=1.0: the same updates and the same optimizer-state tree (checkpoints
    unchanged) as the optimizer without parameter groups."""
    config = _config(name)
    schedule = steps.create_learning_rate_schedule(config)
    opt = config.optimizer
    mask = jax.tree.map(lambda p: p.ndim > 1, PARAMS)
    if name == "sgd":
        reference = optax.chain(
            optax.add_decayed_weights(opt.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=opt.momentum),
        )
    else:
        reference = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=mask)
    got, got_state = _updates(steps.create_optimizer(config, schedule))
    want, want_state = _updates(reference)
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    assert_trees_close(got, want)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_head_multiplier_is_a_head_learning_rate_decay_included(monkeypatch, name):
    """head_lr_multiplier=10 equals separate optimizers (optax.multi_transform): the head at 10x
    the schedule's learning rate (AdamW's decoupled decay lr * wd * p too, as PyTorch's AdamW
    with mmsegmentation's lr_mult), the rest at the schedule's; no decay on 1-D params."""
    monkeypatch.setitem(models.MODELS, "fake", type("Fake", (), {"head_modules": HEAD}))
    config = _config(name, 10.0, "fake")
    schedule = steps.create_learning_rate_schedule(config)
    opt = config.optimizer

    def group(lr, weight_decay):
        if name == "sgd":
            return optax.chain(
                optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=opt.momentum)
            )
        return optax.adamw(lr, weight_decay=weight_decay)

    def head_lr(step):
        return 10.0 * schedule(step)

    def label(path, p):
        return ("head" if path[0] in HEAD else "body") + ("" if p.ndim > 1 else "_no_decay")

    reference = optax.multi_transform(
        {
            "head": group(head_lr, opt.weight_decay),
            "body": group(schedule, opt.weight_decay),
            "head_no_decay": group(head_lr, 0.0),
            "body_no_decay": group(schedule, 0.0),
        },
        traverse_util.path_aware_map(label, PARAMS),
    )
    got, _ = _updates(steps.create_optimizer(config, schedule))
    want, _ = _updates(reference)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-9)
    # After one step at the same parameters: the head moves 10x as far as with one learning
    # rate, the backbone as far.
    config.optimizer.head_lr_multiplier = 1.0
    plain, _ = _updates(steps.create_optimizer(config, schedule), num_steps=2)
    ten_times = jax.tree.map(lambda u: 10 * u, plain[1]["classifier"])
    assert_trees_close(got[1]["classifier"], ten_times, rtol=1e-6)
    assert_trees_close(got[1]["backbone"], plain[1]["backbone"])


@pytest.mark.parametrize(
    "model, multiplier, message",
    [
        ("unet", 10.0, "1.0 with model.name='unet' (it has no decode head)"),
        ("deeplabv3plus_resnet50", 0.0, "expected a number > 0"),
    ],
)
def test_head_multiplier_is_validated(model, multiplier, message):
    config = _config("adamw", multiplier, model)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.validate_config(config)
    config.optimizer.head_lr_multiplier = 1.0
    config_lib.validate_config(config)


def test_head_multiplier_changes_only_the_head_of_a_deeplab():
    config = _config("adamw", 10.0, "deeplabv3plus_resnet50")
    config_lib.validate_config(config)
    names = ("backbone", "aspp", "decoder", "classifier")
    params = {name: {"kernel": np.ones((2, 2), np.float32)} for name in names}
    tx = steps.create_optimizer(config, optax.constant_schedule(0.1))
    updates, _ = tx.update(params, tx.init(params), params)
    first = {name: float(updates[name]["kernel"][0, 0]) for name in names}
    ratio = {name: first[name] / first["backbone"] for name in names}
    assert ratio == pytest.approx({"backbone": 1, "aspp": 10, "decoder": 10, "classifier": 10})
