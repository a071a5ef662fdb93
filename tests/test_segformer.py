"""SegFormer (tce_jax.models.segformer) against transformers' implementation, and its encoder
weights (tce_jax.pretrained_segformer) in both published layouts.

The reference fixture (tests/data/segformer_reference.{json,npz}) is made by
scripts/make_segformer_fixture.py with transformers' ``SegformerForSemanticSegmentation``: the
checkpoint layout of B0 and B2, their outputs on a random input, and the parameter counts of
B0-B5. The weights are not committed: ``random_state_dict`` of that script regenerates them.
"""

import functools
import importlib.util
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import random_variables
from safetensors.numpy import save_file

from tce_jax import config_lib, pretrained, pretrained_segformer
from tce_jax.models import create_model, is_segformer
from tce_jax.models.segformer import MiTBlock, SegFormer
from tce_jax.pretrained import PretrainedMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "tests", "data", "segformer_reference.json")) as f:
    MANIFEST = json.load(f)
REFERENCE = dict(np.load(os.path.join(ROOT, "tests", "data", "segformer_reference.npz")))
NUM_CLASSES = MANIFEST["num_classes"]


def _fixture_script():
    spec = importlib.util.spec_from_file_location(
        "make_segformer_fixture", os.path.join(ROOT, "scripts", "make_segformer_fixture.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_state_dict(variant: str) -> dict[str, np.ndarray]:
    """The weights the reference ran with, in transformers' checkpoint layout."""
    layout = MANIFEST["variants"][variant]["layout"]
    return _fixture_script().random_state_dict(layout, MANIFEST["seed"])


def abstract_variables(name: str, size: int = 64, num_classes: int = NUM_CLASSES):
    model = create_model(name, num_classes=num_classes)
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# --- numerics against transformers ----------------------------------------------------------


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_encoder_and_model_equal_transformers(variant, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(reference_state_dict(variant), str(path))
    name = f"segformer_{variant}"
    # The encoder through the config.model.pretrained loader, the head through the converter.
    encoder = pretrained_segformer.load_for_model(str(path), abstract_variables(name), model=name)
    variables = pretrained_segformer.state_dict_to_variables(pretrained.read_safetensors(path))
    assert_trees_equal(encoder["params"], variables["params"]["backbone"])
    variables["params"]["backbone"] = encoder["params"]

    model = create_model(name, num_classes=NUM_CLASSES)
    assert jax.tree.structure(variables) == jax.tree.structure(abstract_variables(name))

    @jax.jit
    def run(variables, images):
        return model.apply(
            variables,
            images,
            train=False,
            capture_intermediates=lambda module, _: module.name in ("backbone", "decode_head"),
        )

    logits, state = run(variables, REFERENCE["image"])
    stages = state["intermediates"]["backbone"]["__call__"][0]
    (quarter,) = state["intermediates"]["decode_head"]["__call__"]
    expected = [REFERENCE[f"{variant}/stage{k}"] for k in range(1, 5)]
    # The reference's activations are of order 1 (at most about 5); float32 rounding over
    # the blocks leaves differences of about 1e-5.
    for k, (ours, theirs) in enumerate(zip(stages, expected, strict=True)):
        assert ours.shape == theirs.shape, k
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4, err_msg=f"stage {k + 1}")
    np.testing.assert_allclose(
        quarter, REFERENCE[f"{variant}/logits_quarter"], rtol=1e-4, atol=1e-4
    )
    assert logits.shape == REFERENCE["image"].shape[:3] + (NUM_CLASSES,)
    np.testing.assert_allclose(logits, REFERENCE[f"{variant}/logits"], rtol=1e-4, atol=1e-4)


# --- the NVlabs layout ----------------------------------------------------------------------

# transformers' encoder/decoder names -> the original NVlabs/SegFormer ones (stages from 1).
_TO_NVLABS = [
    (r"^segformer\.encoder\.patch_embeddings\.(\d)\.layer_norm\.", "patch_embed{s}.norm."),
    (r"^segformer\.encoder\.patch_embeddings\.(\d)\.proj\.", "patch_embed{s}.proj."),
    (r"^segformer\.encoder\.layer_norm\.(\d)\.", "norm{s}."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.layer_norm_(\d)\.", "block{s}.{1}.norm{2}."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.query\.", "block{s}.{1}.attn.q."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.sr\.", "block{s}.{1}.attn.sr."),
    (
        r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.layer_norm\.",
        "block{s}.{1}.attn.norm.",
    ),
    (
        r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.output\.dense\.",
        "block{s}.{1}.attn.proj.",
    ),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.mlp\.dense(\d)\.", "block{s}.{1}.mlp.fc{2}."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.mlp\.dwconv\.", "block{s}.{1}.mlp.dwconv."),
    (r"^decode_head\.linear_c\.(\d)\.", "decode_head.linear_c{s}."),
    (r"^decode_head\.linear_fuse\.weight$", "decode_head.linear_fuse.conv.weight"),
    (r"^decode_head\.batch_norm\.", "decode_head.linear_fuse.bn."),
    (r"^decode_head\.classifier\.", "decode_head.linear_pred."),
]


def to_nvlabs(state_dict, *, prefix=""):
    """transformers' state_dict renamed to NVlabs names, query/key/value -> q and fused kv
    (keys' rows first); encoder keys get ``prefix`` (``"backbone."`` in NVlabs' segmentation
    checkpoints)."""
    out = {}
    for key, value in state_dict.items():
        kv = re.match(r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.key\.(\w+)$", key)
        if kv:
            s, j, leaf = int(kv.group(1)) + 1, kv.group(2), kv.group(3)
            value_key = key.replace(".self.key.", ".self.value.")
            fused = np.concatenate([value, state_dict[value_key]], axis=0)
            out[f"{prefix}block{s}.{j}.attn.kv.{leaf}"] = fused
            continue
        if ".attention.self.value." in key:
            continue
        for pattern, template in _TO_NVLABS:
            if match := re.match(pattern, key):
                groups = match.groups()
                name = template.format(*groups, s=int(groups[0]) + 1) if groups else template
                head = name.startswith("decode_head.")
                out[("" if head else prefix) + name + key[match.end() :]] = value
                break
        else:
            raise AssertionError(f"no NVlabs name for {key}")
    return out


def test_nvlabs_layout_loads_the_same_variables(tmp_path):
    transformers = reference_state_dict("b0")
    # A segmentation checkpoint of the original code: encoder under "backbone.", with the
    # decode head's unused conv_seg, and the ImageNet classifier of mit_b0.pth.
    nvlabs = to_nvlabs(transformers, prefix="backbone.")
    assert len(nvlabs) == len(transformers) - 2 * 8  # 8 blocks: key + value fused (w, b)
    extras = {
        "decode_head.conv_seg.weight": np.zeros((19, 128, 1, 1), np.float32),
        "head.weight": np.zeros((1000, 256), np.float32),
    }
    save_file(nvlabs | extras, str(tmp_path / "nvlabs.safetensors"))
    save_file(transformers, str(tmp_path / "transformers.safetensors"))
    abstract = abstract_variables("segformer_b0")
    loaded = {
        layout: pretrained_segformer.load_for_model(
            str(tmp_path / f"{layout}.safetensors"), abstract, model="segformer_b0"
        )
        for layout in ("nvlabs", "transformers")
    }
    assert_trees_equal(loaded["nvlabs"], loaded["transformers"])
    assert_trees_equal(
        pretrained_segformer.state_dict_to_variables(nvlabs | extras),
        pretrained_segformer.state_dict_to_variables(transformers),
    )


def test_mit_only_checkpoints_load_without_the_segformer_prefix(tmp_path):
    # transformers' SegformerModel / SegformerForImageClassification files (nvidia/mit-b0):
    # "encoder.*" or "segformer.encoder.*", and an ImageNet "classifier.*".
    encoder_only = {
        key.removeprefix("segformer."): value
        for key, value in reference_state_dict("b0").items()
        if key.startswith("segformer.")
    }
    encoder_only["classifier.weight"] = np.zeros((1000, 256), np.float32)
    save_file(encoder_only, str(tmp_path / "mit-b0.safetensors"))
    abstract = abstract_variables("segformer_b0")
    loaded = pretrained_segformer.load_for_model(
        str(tmp_path / "mit-b0.safetensors"), abstract, model="segformer_b0"
    )
    assert jax.tree.structure(loaded["params"]) == jax.tree.structure(
        abstract["params"]["backbone"]
    )
    assert loaded["batch_stats"] == {}


# --- mismatches -----------------------------------------------------------------------------


def test_mismatches_are_listed_in_one_error_before_any_weight_is_read(tmp_path, monkeypatch):
    weights = reference_state_dict("b0")
    del weights["segformer.encoder.block.1.0.mlp.dense1.weight"]
    weights["segformer.encoder.block.1.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    weights["segformer.encoder.layer_norm.3.bias"] = np.zeros(7, np.float32)
    path = tmp_path / "broken.safetensors"
    save_file(weights, str(path))

    def no_reading(path):
        raise AssertionError("weights read before the layout was checked")

    monkeypatch.setattr(pretrained_segformer, "read_safetensors", no_reading)
    with pytest.raises(PretrainedMismatchError) as err:
        pretrained_segformer.load_for_model(
            str(path), abstract_variables("segformer_b0"), model="segformer_b0"
        )
    message = str(err.value)
    assert "1 variable(s) missing from the file, in block2_0: params/block2_0/mlp/fc1/kernel" in (
        message
    )
    assert "unexpected variable(s) in the file" in message
    assert "segformer.encoder.block.1.0.mlp.extra.weight" in message
    assert "params/norm4/bias (file (7,), model (256,))" in message


def test_a_file_of_another_variant_is_named_in_the_error(tmp_path):
    path = tmp_path / "mit-b0.safetensors"
    save_file(reference_state_dict("b0"), str(path))
    with pytest.raises(PretrainedMismatchError) as err:
        pretrained_segformer.load_for_model(
            str(path), abstract_variables("segformer_b2"), model="segformer_b2"
        )
    message = str(err.value)
    assert "variable(s) missing from the file, in block1_2, block2_2" in message
    assert (
        "The file holds an MiT-B0 encoder (blocks per stage (2, 2, 2, 2), widths "
        "(32, 64, 160, 256)); segformer_b2 needs an MiT-B2 encoder (blocks per stage "
        "(3, 4, 6, 3), widths (64, 128, 320, 512))"
    ) in message


def test_files_that_cannot_be_read(tmp_path):
    abstract = abstract_variables("segformer_b0")
    with pytest.raises(FileNotFoundError, match="MiT encoder weights"):
        pretrained_segformer.load_for_model(str(tmp_path / "no.safetensors"), abstract, model="x")
    (tmp_path / "mit_b0.pth").write_bytes(b"torch")
    with pytest.raises(PretrainedMismatchError, match="Convert a PyTorch checkpoint"):
        pretrained_segformer.load_for_model(str(tmp_path / "mit_b0.pth"), abstract, model="x")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(PretrainedMismatchError, match="not a readable .safetensors file"):
        pretrained_segformer.load_for_model(str(tmp_path / "cut.safetensors"), abstract, model="x")


# --- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_variants_have_the_published_parameter_counts(variant):
    # Counted on transformers' models by the fixture script (BatchNorm running statistics
    # are not parameters); traced only.
    expected = MANIFEST["param_counts"][variant]
    name = f"segformer_{variant}"
    assert is_segformer(name)
    model = create_model(name, num_classes=19)
    params = abstract_variables(name, size=32)["params"]
    assert count(params["backbone"]) == expected["encoder"]
    assert count(params) == expected["total_19_classes"]
    # The classifier (a 1x1 conv with bias) is all that depends on the number of classes.
    per_class = model.decoder_width + 1
    assert count(params) + (150 - 19) * per_class == expected["total_150_classes"]


TinySegFormer = SegFormer(
    num_classes=3, depths=(1, 1, 1, 2), widths=(8, 16, 40, 64), decoder_width=16
)


def test_dropout_rng_is_drawn_only_when_training():
    x = np.random.RandomState(1).standard_normal((4, 32, 32, 3)).astype(np.float32)
    variables = random_variables(TinySegFormer, x)

    @functools.partial(jax.jit, static_argnums=2)
    def train(variables, key, rate):
        model = TinySegFormer.clone(drop_path_rate=rate, dropout_rate=rate)
        logits, _ = model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        return logits

    key1, key2 = jax.random.key(2), jax.random.key(3)
    assert not np.allclose(train(variables, key1, 0.1), train(variables, key2, 0.1))
    # Nothing else draws from it; evaluation needs none (traced only: run op by op, the
    # model took 15 s to compile each operation alone).
    np.testing.assert_array_equal(train(variables, key1, 0.0), train(variables, key2, 0.0))
    evaluate = functools.partial(TinySegFormer.apply, train=False)
    assert jax.eval_shape(evaluate, variables, x).shape == (4, 32, 32, 3)


def test_stochastic_depth_drops_whole_residual_branches():
    block = MiTBlock(num_heads=2, sr_ratio=2, drop_path=1.0)
    x = np.random.RandomState(1).standard_normal((3, 4, 4, 8)).astype(np.float32)
    variables = random_variables(block, x)
    apply = jax.jit(block.apply, static_argnames="train")
    # Both branches dropped: the block is the identity; only when training.
    np.testing.assert_array_equal(
        apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)}), x
    )
    assert not np.allclose(apply(variables, x, train=False), x)


def test_mixed_precision_keeps_float32_parameters():
    model = create_model("segformer_b0", num_classes=3, dtype="bfloat16")
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert logits.dtype == jnp.bfloat16 and logits.shape == (1, 32, 32, 3)


def test_a_pretrained_encoder_replaces_the_backbone_only():
    abstract = abstract_variables("segformer_b0", size=32)
    params, batch_stats = jax.tree.map(
        lambda a: np.zeros(a.shape, a.dtype), (abstract["params"], abstract["batch_stats"])
    )
    loaded = {
        "params": jax.tree.map(lambda a: np.ones(a.shape, a.dtype), params["backbone"]),
        "batch_stats": {},
    }
    new_params, new_stats = pretrained.replace_backbone(params, batch_stats, loaded)
    assert all(np.all(leaf == 1) for leaf in jax.tree.leaves(new_params["backbone"]))
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(new_params["decode_head"]))
    assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)


def test_config_accepts_a_pretrained_segformer_encoder():
    from configs import default

    config = default.get_config("tiny")
    config.model.name = "segformer_b0"
    config.model.pretrained = "/weights/mit-b0.safetensors"
    config_lib.validate_config(config)


def test_too_small_inputs_are_refused():
    model = create_model("segformer_b0", num_classes=3)
    with pytest.raises(ValueError, match=r"stage 1 is \(7, 7\), less than its spatial reduction 8"):
        jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), train=False)
        )
