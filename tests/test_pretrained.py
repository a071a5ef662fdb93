"""Pretrained backbones: torchvision -> Flax conversion (on a fabricated numpy state_dict with
torchvision's key names), the accepted file formats, mismatch errors, and the merge at init."""

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.flax
import safetensors.numpy
from flax import serialization, traverse_util

from configs import default
from tce_jax import models, pretrained, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchvision_resnet_state_dict(stage_sizes, width=64, seed=0):
    """A state_dict with the keys and shapes of torchvision's ResNet (Bottleneck), random
    values; written from torchvision's architecture, independently of our mapping."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, out_ch, in_ch, k):
        sd[f"{name}.weight"] = rng.standard_normal((out_ch, in_ch, k, k)).astype(np.float32)

    def bn(name, ch):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, ch).astype(np.float32)
        sd[f"{name}.bias"] = rng.standard_normal(ch).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.standard_normal(ch).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, ch).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(1000, np.int64)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    in_ch = width
    for s, blocks in enumerate(stage_sizes, start=1):
        planes = width * 2 ** (s - 1)
        for b in range(blocks):
            p = f"layer{s}.{b}"
            conv(f"{p}.conv1", planes, in_ch, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", planes * 4, in_ch, 1)
                bn(f"{p}.downsample.1", planes * 4)
            in_ch = planes * 4
    sd["fc.weight"] = np.zeros((1000, in_ch), np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


TINY_STAGES = (1, 2, 1, 1)
TinyResNet = functools.partial(models.ResNet, stage_sizes=TINY_STAGES, num_filters=8)


def tiny_deeplab():
    return models.DeepLabV3Plus(
        num_classes=3, backbone_cls=TinyResNet, aspp_features=8, low_level_features=4,
        decoder_features=8,
    )  # fmt: skip


def abstract_variables(model, size=32):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )


def backbone_of(variables):
    return {
        "params": variables["params"]["backbone"],
        "batch_stats": variables["batch_stats"]["backbone"],
    }


def load_converter():
    path = os.path.join(ROOT, "scripts", "convert_torchvision_resnet.py")
    spec = importlib.util.spec_from_file_location("convert_torchvision_resnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resnet50_state_dict_converts_to_exactly_our_backbone_tree():
    sd = torchvision_resnet_state_dict((3, 4, 6, 3))
    converted = pretrained.torchvision_to_flax(sd)
    expected = backbone_of(abstract_variables(models.DeepLabV3PlusResNet50(num_classes=19)))
    pretrained.check_backbone(expected, converted, source="test", model="resnet50")
    kernel = converted["params"]["layer3_0"]["downsample_conv"]["kernel"]
    np.testing.assert_array_equal(kernel, sd["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        converted["batch_stats"]["layer4_2"]["bn3"]["var"], sd["layer4.2.bn3.running_var"]
    )
    np.testing.assert_array_equal(converted["params"]["bn_init"]["scale"], sd["bn1.weight"])


def test_converted_stem_convolution_computes_torch_conv2d():
    """Flax's conv with the converted kernel equals torch's conv2d (cross-correlation over
    OIHW weights, stride 2, padding 3) computed by hand at a few output pixels."""
    sd = torchvision_resnet_state_dict(TINY_STAGES, width=8)
    kernel = pretrained.torchvision_to_flax(sd)["params"]["conv_init"]["kernel"]
    x = np.random.default_rng(1).standard_normal((1, 20, 20, 3)).astype(np.float32)
    conv = nn.Conv(8, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False)
    y = np.asarray(conv.apply({"params": {"kernel": kernel}}, x))
    w = sd["conv1.weight"]  # [O, I, kh, kw]
    padded = np.pad(x[0], ((3, 3), (3, 3), (0, 0)))
    for i, j, o in [(0, 0, 0), (4, 7, 5), (9, 9, 7)]:
        patch = padded[2 * i : 2 * i + 7, 2 * j : 2 * j + 7, :]  # [kh, kw, I]
        reference = np.einsum("hwi,ihw->", patch, w[o])
        np.testing.assert_allclose(y[0, i, j, o], reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "fmt", ["converter_npz", "torch_keys_npz", "torch_keys_safetensors", "msgpack", "orbax"]
)
def test_accepted_formats_load_the_same_variables(fmt, tmp_path):
    sd = torchvision_resnet_state_dict(TINY_STAGES, width=8)
    reference = pretrained.torchvision_to_flax(sd)
    if fmt == "converter_npz":
        path = str(tmp_path / "resnet.npz")
        load_converter().convert_state_dict({f"module.{k}": v for k, v in sd.items()}, path)
    elif fmt == "torch_keys_npz":
        path = str(tmp_path / "state_dict.npz")
        np.savez(path, **sd)
    elif fmt == "torch_keys_safetensors":
        path = str(tmp_path / "model.safetensors")
        safetensors.numpy.save_file(sd, path)
    elif fmt == "msgpack":
        path = str(tmp_path / "resnet.msgpack")
        with open(path, "wb") as f:
            f.write(serialization.msgpack_serialize(reference))
    else:
        path = str(tmp_path / "orbax")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, reference)
    assert_same_variables(pretrained.load_backbone_variables(path), reference)


def assert_resnet50_refused_for_resnet101(r50: str) -> None:
    """ResNet-50 weights in `r50` are refused for DeepLabV3+ ResNet-101, naming the file, the
    missing layers and both depths."""
    r101 = abstract_variables(models.DeepLabV3PlusResNet101(num_classes=19))
    with pytest.raises(pretrained.PretrainedMismatchError) as e:
        pretrained.load_for_model(r50, r101, model="deeplabv3plus_resnet101")
    message = str(e.value)
    assert r50 in message and "missing from the file" in message and "layer3_6" in message
    assert "ResNet-50" in message and "ResNet-101" in message


def test_mismatches_fail_with_a_clear_message(tmp_path):
    r50 = str(tmp_path / "resnet50.npz")
    pretrained.save_npz(
        r50, pretrained.torchvision_to_flat(torchvision_resnet_state_dict((3, 4, 6, 3)))
    )
    assert_resnet50_refused_for_resnet101(r50)

    with pytest.raises(pretrained.PretrainedMismatchError, match="not part of a torchvision"):
        pretrained.torchvision_to_flax({"conv1.weight": np.zeros((64, 3, 7, 7)), "head.w": 1.0})
    (tmp_path / "resnet101.pth").write_bytes(b"torch zip")
    with pytest.raises(pretrained.PretrainedMismatchError, match="convert_torchvision_resnet"):
        pretrained.load_backbone_variables(str(tmp_path / "resnet101.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.load_backbone_variables(str(tmp_path / "missing.npz"))
    unet = abstract_variables(models.create_model("unet_small", num_classes=3))
    with pytest.raises(pretrained.PretrainedMismatchError, match="no ResNet backbone"):
        pretrained.load_for_model(r50, unet, model="unet_small")


def test_init_state_puts_the_weights_into_the_backbone_only():
    config = default.get_config("tiny")
    config.data.crop_size = (32, 32)
    model = tiny_deeplab()
    tx = steps.create_optimizer(config, steps.create_learning_rate_schedule(config))
    loaded = pretrained.torchvision_to_flax(torchvision_resnet_state_dict(TINY_STAGES, width=8))
    pretrained.check_backbone(backbone_of(abstract_variables(model)), loaded, source="t", model="m")
    init = functools.partial(steps.init_state, config, model, tx, 3)
    fresh = jax.eval_shape(init, jax.random.key(0))
    state = jax.jit(init)(jax.random.key(0), loaded)
    flat = flatten({"params": state.params, "batch_stats": state.batch_stats})
    for key, value in flatten(loaded).items():
        collection, rest = key.split("/", 1)
        np.testing.assert_array_equal(flat[f"{collection}/backbone/{rest}"], value)
    # Same tree as a fresh init; the head stays randomly initialised.
    assert jax.tree.structure(state) == jax.tree.structure(fresh)
    assert np.asarray(state.params["classifier"]["kernel"]).std() > 0


def flatten(tree):
    """``{"params/conv_init/kernel": leaf, ...}``: the flat keys of the ``.npz`` format."""
    return traverse_util.flatten_dict(tree, sep="/")


def assert_same_variables(a, b):
    flat_a, flat_b = flatten(a), flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def test_safetensors_with_timm_extras_loads_like_the_npz_state_dict(tmp_path):
    """timm's torchvision ResNets carry the ImageNet classifier (fc.*) and, in some files,
    num_batches_tracked: both are dropped, as in the .npz route."""
    sd = torchvision_resnet_state_dict((3, 4, 6, 3))
    assert "fc.weight" in sd and "layer1.0.bn1.num_batches_tracked" in sd
    npz, st = str(tmp_path / "resnet50.npz"), str(tmp_path / "resnet50.safetensors")
    np.savez(npz, **sd)
    safetensors.numpy.save_file(sd, st)
    from_safetensors = pretrained.load_backbone_variables(st)
    assert_same_variables(from_safetensors, pretrained.load_backbone_variables(npz))
    expected = backbone_of(abstract_variables(models.DeepLabV3PlusResNet50(num_classes=19)))
    pretrained.check_backbone(expected, from_safetensors, source=st, model="resnet50")
    # Flat keys of our own tree (params/...) are read as they are, as in an .npz.
    ours = str(tmp_path / "ours.safetensors")
    # save_file writes the raw buffer: transposed kernels must be made contiguous first.
    flat = {k: np.ascontiguousarray(v) for k, v in flatten(from_safetensors).items()}
    safetensors.numpy.save_file(flat, ours)
    assert_same_variables(pretrained.load_backbone_variables(ours), from_safetensors)


def test_bfloat16_safetensors_are_read_as_float32(tmp_path):
    sd = torchvision_resnet_state_dict(TINY_STAGES, width=8)
    path = str(tmp_path / "bf16.safetensors")
    safetensors.flax.save_file({k: jnp.asarray(v, jnp.bfloat16) for k, v in sd.items()}, path)
    loaded = pretrained.load_backbone_variables(path)
    rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for k, v in sd.items()}
    assert_same_variables(loaded, pretrained.torchvision_to_flax(rounded))
    assert loaded["params"]["conv_init"]["kernel"].dtype == np.float32


def test_mismatching_safetensors_fail_like_the_npz(tmp_path):
    r50 = str(tmp_path / "resnet50.safetensors")
    safetensors.numpy.save_file(torchvision_resnet_state_dict((3, 4, 6, 3)), r50)
    assert_resnet50_refused_for_resnet101(r50)
    # timm's deep-stem variants (resnet50d: conv1.0/1/3...) are different networks.
    deep_stem = str(tmp_path / "resnet50d.safetensors")
    safetensors.numpy.save_file(
        {"conv1.0.weight": np.zeros((32, 3, 3, 3), np.float32), "fc.bias": np.zeros(3)},
        deep_stem,
    )
    with pytest.raises(pretrained.PretrainedMismatchError, match="conv1.0.weight"):
        pretrained.load_backbone_variables(deep_stem)
    truncated = str(tmp_path / "truncated.safetensors")
    with open(r50, "rb") as f:
        (tmp_path / "truncated.safetensors").write_bytes(f.read(1000))
    with pytest.raises(pretrained.PretrainedMismatchError, match="not a readable .safetensors"):
        pretrained.load_backbone_variables(truncated)
