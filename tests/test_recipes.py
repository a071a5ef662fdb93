"""The optimizer's parameter groups (decode head learning rate) and the SegFormer recipes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from run_utils import assert_trees_close

from configs import ade20k, cityscapes, default
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


@pytest.mark.parametrize(
    "model, head",
    [
        ("segformer_b0", ("decode_head",)),
        ("deeplabv3plus_resnet50", ("aspp", "decoder", "classifier")),
        ("unet_small", ()),
    ],
)
def test_head_modules_are_top_level_modules_of_the_model(model, head):
    assert models.head_modules(model) == head
    net = models.create_model(model, num_classes=3)
    image = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lambda rng: net.init(rng, image, train=False), jax.random.key(0))
    assert set(head) < set(shapes["params"])


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


# ----------------------------------------------------------------------------------------------
# The SegFormer recipes (mmsegmentation's segformer_mit-b*_8xb*-160k_* configs).


def _schedule_values(config):
    opt = config.optimizer
    return (
        opt.name,
        opt.learning_rate,
        opt.weight_decay,
        opt.head_lr_multiplier,
        opt.schedule,
        opt.poly_power,
        opt.warmup_steps,
        config.num_train_steps,
    )


@pytest.mark.parametrize("size", range(6))
def test_segformer_recipes_have_the_published_values(size):
    schedule = ("adamw", 6e-5, 0.01, 10.0, "poly", 1.0, 1500, 160_000)
    ade = ade20k.get_config(f"segformer_b{size}")
    config_lib.validate_config(ade)
    assert ade.model.name == f"segformer_b{size}"
    assert _schedule_values(ade) == schedule
    assert (ade.data.crop_size, ade.global_batch_size, ade.data.eval_mode) == (
        (512, 512),
        16,
        "whole",
    )
    cs = cityscapes.get_config(f"tce,segformer_b{size}")
    config_lib.validate_config(cs)
    assert cs.model.name == f"segformer_b{size}" and cs.loss.name == "tce"
    assert _schedule_values(cs) == schedule
    data = cs.data
    assert (data.crop_size, cs.global_batch_size, data.base_size) == ((1024, 1024), 8, (1024, 2048))
    assert (data.eval_mode, data.eval_window, data.eval_stride) == (
        "sliding",
        (1024, 1024),
        (768, 768),
    )
    # The schedule: linear warm-up from 0 over 1500 steps, then linear (poly 1.0) decay to 0.
    lr = steps.create_learning_rate_schedule(cs)
    assert [float(lr(s)) for s in (0, 750, 1500, 80_750, 160_000)] == pytest.approx(
        [0.0, 3e-5, 6e-5, 3e-5, 0.0], rel=1e-6, abs=1e-12
    )


def test_the_deeplab_recipes_are_unchanged_by_the_segformer_variants():
    cs = cityscapes.get_config("tce")
    assert cs.model.name == "deeplabv3plus_resnet101" and cs.optimizer.head_lr_multiplier == 1.0
    assert (cs.data.crop_size, cs.num_train_steps, cs.data.eval_mode) == (
        (512, 1024),
        80_000,
        "whole",
    )


@pytest.mark.parametrize(
    "module, arg",
    [(default, "segformer,tiny"), (cityscapes, "segformer_b5,tiny"), (ade20k, "segformer_b2,tiny")],
)
def test_tiny_keeps_a_segformer_small(module, arg):
    """`tiny` with a SegFormer: SegFormer-B0 (whatever the size) in the usual six-step run."""
    config = module.get_config(arg)
    config_lib.validate_config(config)
    assert config.model.name == "segformer_b0"
    assert (config.num_train_steps, config.global_batch_size, config.optimizer.warmup_steps) == (
        6,
        8,
        1,
    )
    assert max(config.data.crop_size) <= 128


def test_embedded_segformer_variant():
    config = default.get_config("segformer")
    config_lib.validate_config(config)
    plain = default.get_config()
    assert config.model.name == "segformer_b0"
    config.model.name = "unet"
    assert config == plain  # nothing else changes
