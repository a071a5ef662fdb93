"""Tests for tce_jax.models: shapes, dtypes, parameter counts, dilation, BatchNorm behaviour.

The full-size DeepLabV3+ models are only traced (``jax.eval_shape``), never run; numerics are
checked on a tiny ResNet variant that goes through the same classes.
"""

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import random_variables

from tce_jax.models import (
    MODELS,
    DeepLabV3Plus,
    ResNet,
    ResNet50,
    ResNet101,
    create_model,
)
from tce_jax.models.resize import resize_bilinear

NUM_CLASSES = 19


def count_params(variables_or_params) -> int:
    """Number of scalar parameters of a ``params`` tree, or of the ``params`` of a variables
    dict (BatchNorm running statistics are not parameters); leaves may be arrays or
    ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``)."""
    tree = variables_or_params
    if isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# torchvision resnet50/resnet101 without the fc layer (25,557,032 - 2,049,000 and
# 44,549,160 - 2,049,000), BatchNorm weight+bias counted, running statistics not.
RESNET50_BACKBONE_PARAMS = 23_508_032
RESNET101_BACKBONE_PARAMS = 42_500_160


def deeplab_head_params(num_classes: int) -> int:
    """DeepLabV3+ head on a 2048-channel backbone, counted layer by layer (BN: 2 per channel)."""
    aspp = (
        2048 * 256 + 2 * 256  # 1x1 branch
        + 3 * (9 * 2048 * 256 + 2 * 256)  # three 3x3 atrous branches
        + 2048 * 256 + 2 * 256  # image pooling branch
        + 5 * 256 * 256 + 2 * 256  # 1x1 projection of the concatenation
    )
    decoder = (
        256 * 48 + 2 * 48  # low-level projection
        + 9 * (256 + 48) * 256 + 2 * 256  # first 3x3 fuse conv
        + 9 * 256 * 256 + 2 * 256  # second 3x3 fuse conv
    )
    classifier = 256 * num_classes + num_classes
    return aspp + decoder + classifier


# A tiny backbone through the real ResNet/DeepLabV3Plus code, cheap enough to run on CPU.
TinyResNet = functools.partial(ResNet, stage_sizes=(1, 2, 2, 2), num_filters=8)
TinyDeepLab = functools.partial(
    DeepLabV3Plus, backbone_cls=TinyResNet, aspp_features=16, low_level_features=8,
    decoder_features=16,
)


def _init_shapes(model, x):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# --- factory --------------------------------------------------------------------------------


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnet") as err:
        create_model("resnet9000", num_classes=3)
    for name in MODELS:
        assert name in str(err.value)


def test_create_model_passes_attributes():
    model = create_model(
        "deeplabv3plus_resnet50", num_classes=7, dtype="bfloat16", bn_axis_name="batch",
        output_stride=8,
    )
    assert isinstance(model, DeepLabV3Plus)
    assert (model.num_classes, model.output_stride, model.bn_axis_name) == (7, 8, "batch")
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32


# --- parameter counts and variable names (traced only) --------------------------------------


@pytest.mark.parametrize(
    "backbone, expected",
    [(ResNet50, RESNET50_BACKBONE_PARAMS), (ResNet101, RESNET101_BACKBONE_PARAMS)],
)
def test_resnet_backbone_matches_torchvision_param_count(backbone, expected):
    variables = _init_shapes(backbone(), jnp.zeros((1, 64, 64, 3)))
    assert count_params(variables) == expected
    assert count_params(variables["params"]) == expected
    # Running mean and var: as many as BN scales and biases (the backbone's convs have no bias).
    bn_params = sum(
        leaf.size
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
        if path[-1].key in ("scale", "bias")
    )
    assert count_params(variables["batch_stats"]) == bn_params


def test_resnet50_variable_names_follow_torchvision():
    variables = _init_shapes(ResNet50(), jnp.zeros((1, 64, 64, 3)))
    params, stats = variables["params"], variables["batch_stats"]
    stages = zip(range(1, 5), (3, 4, 6, 3), strict=True)
    blocks = {f"layer{s}_{b}" for s, n in stages for b in range(n)}
    assert set(params) == {"conv_init", "bn_init"} | blocks
    assert set(stats) == {"bn_init"} | blocks
    assert params["conv_init"]["kernel"].shape == (7, 7, 3, 64)
    for name in blocks:
        expected = {"conv1", "conv2", "conv3", "bn1", "bn2", "bn3"}
        if name.endswith("_0"):
            expected |= {"downsample_conv", "downsample_bn"}
        assert set(params[name]) == expected, name
        assert set(stats[name]) == {k for k in expected if "bn" in k}, name
        assert set(stats[name]["bn1"]) == {"mean", "var"}
        assert set(params[name]["bn1"]) == {"scale", "bias"}
    # HWIO kernels: torchvision's OIHW weights transposed.
    assert params["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert params["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, 1024, 2048)
    assert params["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)


@pytest.mark.parametrize(
    "name, backbone_params",
    [
        ("deeplabv3plus_resnet50", RESNET50_BACKBONE_PARAMS),
        ("deeplabv3plus_resnet101", RESNET101_BACKBONE_PARAMS),
    ],
)
def test_deeplab_param_count_and_bf16_output(name, backbone_params):
    model = create_model(name, num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 64, 96, 3))
    variables = _init_shapes(model, x)
    total = backbone_params + deeplab_head_params(NUM_CLASSES)
    assert count_params(variables) == total
    assert total == {"deeplabv3plus_resnet50": 40_351_667,
                     "deeplabv3plus_resnet101": 59_343_795}[name]
    assert count_params(variables["params"]["backbone"]) == backbone_params
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits, _ = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables
    )
    assert logits.shape == (2, 64, 96, NUM_CLASSES)
    assert logits.dtype == jnp.bfloat16


# --- output stride and dilation ------------------------------------------------------------


@pytest.mark.parametrize(
    "output_stride, size, low_hw, high_hw",
    [
        (8, (128, 128), (32, 32), (16, 16)),
        (16, (128, 128), (32, 32), (8, 8)),
        (32, (128, 128), (32, 32), (4, 4)),
        # torchvision's size arithmetic on odd sizes: ceil at every stride-2 layer.
        (32, (65, 97), (17, 25), (3, 4)),
        (16, (65, 97), (17, 25), (5, 7)),
    ],
)
def test_resnet_feature_sizes(output_stride, size, low_hw, high_hw):
    model = ResNet50(output_stride=output_stride)
    x = jnp.zeros((1, *size, 3))
    variables = _init_shapes(model, x)
    low, high = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert low.shape == (1, *low_hw, 256)
    assert high.shape == (1, *high_hw, 2048)


@pytest.mark.parametrize(
    "output_stride, expected",
    # Dilations of the 3x3 convs, block by block (stages of 1, 2, 2, 2 blocks). As torchvision's
    # replace_stride_with_dilation: a dilated stage's first block keeps the previous dilation.
    [(32, [1, 1, 1, 1, 1, 1, 1]), (16, [1, 1, 1, 1, 1, 1, 2]), (8, [1, 1, 1, 1, 2, 2, 4])],
)
def test_resnet_dilation_replaces_stride(output_stride, expected):
    model = TinyResNet(output_stride=output_stride)
    x = jnp.zeros((1, 64, 64, 3))
    variables = _init_shapes(model, x)
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    dilations = [
        e.params["rhs_dilation"][0] for e in convs if e.invars[1].aval.shape[:2] == (3, 3)
    ]
    assert dilations == expected


@pytest.mark.parametrize("output_stride, rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_deeplab_aspp_rates(output_stride, rates):
    model = create_model(
        "deeplabv3plus_resnet50", num_classes=NUM_CLASSES, output_stride=output_stride
    )
    assert model.aspp_rates == rates


def test_deeplab_rejects_output_stride_32():
    model = create_model("deeplabv3plus_resnet50", num_classes=NUM_CLASSES, output_stride=32)
    with pytest.raises(ValueError, match="output_stride"):
        _init_shapes(model, jnp.zeros((1, 64, 64, 3)))


# --- running the small models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_deeplab_variables():
    """Random variables of TinyDeepLab: the same for every output stride (dilation replaces
    stride) and compute dtype (float32 parameters)."""
    return random_variables(TinyDeepLab(num_classes=5), _images((2, 48, 80, 3)))


@pytest.mark.parametrize("output_stride, dtype", [(8, jnp.float32), (16, jnp.bfloat16)])
def test_tiny_deeplab_forward(output_stride, dtype, tiny_deeplab_variables):
    model = TinyDeepLab(num_classes=5, output_stride=output_stride, dtype=dtype)
    x = _images((2, 48, 80, 3))
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    logits, _ = apply(tiny_deeplab_variables, x)
    assert logits.shape == (2, 48, 80, 5) and logits.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(logits)))


# --- bilinear resizing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [
        ((5, 8), (11, 16)),  # up, odd to even
        ((6, 7), (24, 28)),  # up 4x, as DeepLabV3+ logits
        ((9, 9), (33, 33)),  # up, odd to odd
        ((5, 8), (3, 4)),  # down
        ((8, 7), (5, 7)),  # down along one axis only
    ],
)
def test_resize_bilinear_is_jax_image_resize_with_its_gradient(in_hw, out_hw):
    x = _images((2, *in_hw, 3))
    cotangent = _images((2, *out_hw, 3), seed=1)
    shape = (2, *out_hw, 3)

    # Half-pixel centres without antialiasing: torch's interpolate(align_corners=False).
    reference = functools.partial(jax.image.resize, shape=shape, method="bilinear", antialias=False)

    @jax.jit
    def value_and_gradient(x):
        y, vjp = jax.vjp(lambda x: resize_bilinear(x, out_hw), x)
        y_ref, vjp_ref = jax.vjp(reference, x)
        return y, vjp(cotangent)[0], y_ref, vjp_ref(cotangent)[0]

    y, dx, y_ref, dx_ref = value_and_gradient(x)
    # jax.image.resize computes the sampling positions in float32, we in float64.
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-5)
    if out_hw[0] >= in_hw[0] and out_hw[1] >= in_hw[1]:
        # Upsampling: the same as the default (antialiased) resize the models used before.
        default = jax.jit(jax.image.resize, static_argnums=(1, 2))(x, shape, "bilinear")
        np.testing.assert_allclose(y, default, atol=1e-5)


def test_resize_bilinear_uses_no_matmul_or_scatter_forward_or_backward():
    # XLA's GPU compiler fails to tile the matmuls of jax.image.resize at some sizes, and a
    # gather's gradient would be a (GPU-atomic) scatter-add.
    def loss(x):
        return jnp.sum(resize_bilinear(x, (512, 1024)).astype(jnp.float32) ** 2)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(jnp.zeros((1, 128, 256, 19), jnp.bfloat16)))
    assert "gather" in jaxpr
    assert "dot_general" not in jaxpr and "scatter" not in jaxpr


def test_resize_bilinear_keeps_dtype_and_skips_equal_sizes():
    x = _images((1, 4, 6, 2)).astype(jnp.bfloat16)
    assert resize_bilinear(x, (4, 6)) is x
    assert resize_bilinear(x, (8, 6)).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unet_forward_shape_and_dtype(dtype):
    model = create_model("unet_small", num_classes=NUM_CLASSES, dtype=dtype)
    x = _images((2, 32, 64, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    assert logits.shape == (2, 32, 64, NUM_CLASSES) and logits.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_unet_default_size():
    model = create_model("unet", num_classes=NUM_CLASSES)
    variables = _init_shapes(model, jnp.zeros((1, 64, 128, 3)))
    assert model.features == (16, 32, 64, 128)
    assert count_params(variables) == 483_043


def test_unet_rejects_indivisible_input():
    model = create_model("unet_small", num_classes=3)  # 3 levels: H, W divisible by 4
    with pytest.raises(ValueError, match="divisible by 4"):
        _init_shapes(model, jnp.zeros((1, 30, 64, 3)))


def test_unet_forward_backward():
    model = create_model("unet_small", num_classes=NUM_CLASSES)
    x = _images((2, 16, 32, 3))
    labels = jax.random.randint(jax.random.key(1), (2, 16, 32), 0, NUM_CLASSES)
    # Jitted: run eagerly, init would compile each of its operations on its own.
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)

    @jax.jit
    def loss_and_grad(params, batch_stats):
        def loss_fn(params):
            logits, new_state = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True,
                mutable=["batch_stats"],
            )
            logits = logits.astype(jnp.float32)
            picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked), new_state

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, _), grads = loss_and_grad(variables["params"], variables["batch_stats"])
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
    for leaf in jax.tree.leaves(jax.device_get(grads)):  # numpy: no program per leaf shape
        assert np.all(np.isfinite(leaf))
        assert np.abs(leaf).max() > 0.0


@pytest.fixture(scope="module")
def unet3_variables():
    """Initial variables of a 3-class unet_small (they do not depend on the input's batch size
    or values), initialised once and jitted: run eagerly, init compiles each operation alone."""
    model = create_model("unet_small", num_classes=3)
    init = jax.jit(functools.partial(model.init, train=False))
    return init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_train_updates_batch_stats_eval_does_not(unet3_variables):
    model = create_model("unet_small", num_classes=3)
    x = 2.0 + 3.0 * _images((2, 16, 16, 3))
    variables = unet3_variables
    old = variables["batch_stats"]

    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    _, train_state = apply(variables, x, train=True, mutable=("batch_stats",))
    _, eval_state = apply(variables, x, train=False, mutable=("batch_stats",))

    changed = jax.tree.leaves(
        jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(old),
                     jax.device_get(train_state["batch_stats"]))
    )  # fmt: skip
    assert all(changed)
    jax.tree.map(np.testing.assert_array_equal, old, eval_state["batch_stats"])
    # Eval mode needs no mutable collection at all.
    apply(variables, x, train=False)


# --- BatchNorm across devices ---------------------------------------------------------------


def test_bn_axis_name_gives_global_statistics_under_pmap(unet3_variables):
    num_devices, per_device = 4, 2
    devices = jax.devices()[:num_devices]
    assert len(devices) == num_devices
    # A different offset per example, so per-device statistics differ from global ones.
    x = _images((num_devices * per_device, 16, 16, 3))
    x = x + jnp.arange(num_devices * per_device, dtype=jnp.float32)[:, None, None, None]
    single = create_model("unet_small", num_classes=3)
    variables = unet3_variables
    ref_apply = jax.jit(functools.partial(single.apply, train=True, mutable=["batch_stats"]))
    ref_logits, ref_state = ref_apply(variables, x)

    def pmapped(bn_axis_name):
        model = create_model("unet_small", num_classes=3, bn_axis_name=bn_axis_name)
        fn = jax.pmap(
            functools.partial(model.apply, train=True, mutable=["batch_stats"]),
            axis_name="batch", in_axes=(None, 0), devices=devices,
        )
        logits, state = fn(variables, x.reshape(num_devices, per_device, *x.shape[1:]))
        return logits.reshape(x.shape[0], *logits.shape[2:]), state["batch_stats"]

    logits, stats = pmapped("batch")
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for d in range(num_devices):
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
            jax.tree.map(lambda a, d=d: a[d], stats), ref_state["batch_stats"],
        )

    # Control: without the axis name, each device normalises with its own statistics.
    local_logits, _ = pmapped(None)
    assert not np.allclose(local_logits, ref_logits, rtol=1e-4, atol=1e-4)
