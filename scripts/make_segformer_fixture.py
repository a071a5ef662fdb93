"""Writes the SegFormer reference fixture of tests/test_segformer.py from transformers' model.

The reference is Hugging Face transformers' ``SegformerForSemanticSegmentation`` (PyTorch), an
implementation written outside this project. For SegFormer-B0 and B2 (the published depths,
widths and decoder widths; 19 classes) the script

1. builds the model once to learn its checkpoint layout: the key names and shapes that
   ``save_pretrained`` writes (the layout of the published ``nvidia/segformer-*`` and
   ``nvidia/mit-*`` files);
2. fills that layout with random weights from :func:`random_state_dict` (numpy only; the test
   regenerates the same arrays, so no weights are committed) and loads them back with
   ``from_pretrained``, which must use every key;
3. sets the LayerNorm epsilons to the original SegFormer's (1e-6 in the blocks and after each
   stage; transformers uses torch's default 1e-5 everywhere) and runs the model in eval mode
   (float32, eager attention) on a random ``[2, 3, 64, 64]`` input;
4. stores the input, the four encoder stage outputs, the decoder's logits (at 1/4 of the input,
   as transformers returns them) and those logits upsampled to the input size (bilinear,
   ``align_corners=False``) in ``tests/data/segformer_reference.npz``, and the layout, the
   settings and the parameter counts of B0-B5 (from transformers' models, for 19 and 150
   classes) in ``tests/data/segformer_reference.json``.

Rerun it (from the repository root) in a separate environment with PyTorch and transformers;
tce_jax itself does not depend on them::

    python3 -m venv /tmp/segformer-ref
    /tmp/segformer-ref/bin/pip install torch transformers safetensors numpy
    /tmp/segformer-ref/bin/python scripts/make_segformer_fixture.py

The committed fixture was made with torch 2.13.0 (CPU), transformers 5.25.0, numpy 2
(the JSON file records the versions). Only numpy is needed to import this module: the test
imports :func:`random_state_dict` from it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np

SEED = 0
NUM_CLASSES = 19
INPUT_SHAPE = (2, 3, 64, 64)  # NCHW, as transformers takes it
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, os.pardir, "tests", "data"))
NPZ_PATH = os.path.join(DATA, "segformer_reference.npz")
JSON_PATH = os.path.join(DATA, "segformer_reference.json")

# transformers SegformerConfig fields of the published variants (the NVlabs mit_b0..mit_b5
# depths and widths; decoder width 256 for B0/B1 and 768 for B2-B5). The fixture runs B0 and
# B2; all six are built for their parameter counts.
WIDE = [64, 128, 320, 512]
VARIANTS = {
    "b0": {"depths": [2, 2, 2, 2], "hidden_sizes": [32, 64, 160, 256], "decoder_hidden_size": 256},
    "b1": {"depths": [2, 2, 2, 2], "hidden_sizes": WIDE, "decoder_hidden_size": 256},
    "b2": {"depths": [3, 4, 6, 3], "hidden_sizes": WIDE, "decoder_hidden_size": 768},
    "b3": {"depths": [3, 4, 18, 3], "hidden_sizes": WIDE, "decoder_hidden_size": 768},
    "b4": {"depths": [3, 8, 27, 3], "hidden_sizes": WIDE, "decoder_hidden_size": 768},
    "b5": {"depths": [3, 6, 40, 3], "hidden_sizes": WIDE, "decoder_hidden_size": 768},
}
FIXTURE_VARIANTS = ("b0", "b2")
ORIGINAL_BLOCK_EPS = 1e-6


def random_state_dict(shapes: dict[str, list[int]], seed: int = SEED) -> dict[str, np.ndarray]:
    """Random weights for a checkpoint layout ``{key: shape}``, the same on every machine
    (``np.random.RandomState``'s streams are frozen), keys taken in sorted order.

    Linear and conv weights ``[out, in, ...]``: normal with std ``1 / sqrt(prod(shape[1:]))``
    (activations keep their scale through the blocks); one-dimensional weights (LayerNorm,
    BatchNorm scales): ``1 + 0.1 * normal``; biases and BatchNorm running means:
    ``0.1 * normal``; running variances: uniform in [0.5, 1.5]; ``num_batches_tracked``: 0.
    All float32 except ``num_batches_tracked`` (int64).
    """
    rng = np.random.RandomState(seed)
    arrays = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            arrays[key] = np.zeros(shape, np.int64)
            continue
        if leaf == "running_var":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf in ("bias", "running_mean"):
            value = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        arrays[key] = value.astype(np.float32)
    return arrays


def _config(variant: str, num_labels: int = NUM_CLASSES):
    from transformers import SegformerConfig

    return SegformerConfig(num_labels=num_labels, **VARIANTS[variant])


def _layout(model) -> dict[str, list[int]]:
    """The checkpoint keys and shapes ``save_pretrained`` writes for ``model``."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with safe_open(os.path.join(tmp, "model.safetensors"), "np") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}


def _set_original_epsilons(model, depths) -> None:
    """The blocks' two LayerNorms and each stage's final LayerNorm get eps 1e-6, as the
    original SegFormer's ``norm_layer``; the patch embeddings' and spatial reductions' keep
    1e-5 (the original's ``nn.LayerNorm(dim)``)."""
    import torch

    pattern = re.compile(r"(\.layernorm_(before|after)|^segformer\.stages\.\d+\.layer_norm)$")
    changed = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and pattern.search(name):
            module.eps = ORIGINAL_BLOCK_EPS
            changed += 1
    expected = 2 * sum(depths) + len(depths)
    if changed != expected:
        raise RuntimeError(
            f"Set eps on {changed} LayerNorms, expected {expected}: transformers' module names "
            "changed; update the pattern of _set_original_epsilons."
        )


def _reference(variant: str, image):
    """``(layout, outputs)`` of transformers' model with :func:`random_state_dict` weights."""
    import torch
    from safetensors.numpy import save_file
    from transformers import SegformerForSemanticSegmentation

    torch.manual_seed(SEED)
    layout = _layout(SegformerForSemanticSegmentation(_config(variant)))
    with tempfile.TemporaryDirectory() as tmp:
        _config(variant).save_pretrained(tmp)
        save_file(random_state_dict(layout), os.path.join(tmp, "model.safetensors"))
        model, info = SegformerForSemanticSegmentation.from_pretrained(
            tmp, output_loading_info=True, attn_implementation="eager"
        )
    unused = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if unused or info.get("error_msgs"):
        raise RuntimeError(f"from_pretrained did not use the layout exactly: {info}")
    model = model.float().eval()
    _set_original_epsilons(model, VARIANTS[variant]["depths"])
    with torch.no_grad():
        out = model(torch.from_numpy(image), output_hidden_states=True)
        upsampled = torch.nn.functional.interpolate(
            out.logits, size=image.shape[2:], mode="bilinear", align_corners=False
        )

    def nhwc(t):
        return t.permute(0, 2, 3, 1).numpy().astype(np.float32)

    outputs = {f"stage{k + 1}": nhwc(h) for k, h in enumerate(out.hidden_states)}
    outputs.update(logits_quarter=nhwc(out.logits), logits=nhwc(upsampled))
    return layout, outputs


def _param_counts() -> dict[str, dict[str, int]]:
    """Trainable parameters of transformers' B0-B5: encoder, and the whole model for 19
    (Cityscapes) and 150 (ADE20K) classes."""
    from transformers import SegformerForSemanticSegmentation

    counts = {}
    for variant in VARIANTS:
        entry = {}
        for classes in (19, 150):
            model = SegformerForSemanticSegmentation(_config(variant, classes))
            entry[f"total_{classes}_classes"] = sum(p.numel() for p in model.parameters())
            entry["encoder"] = sum(p.numel() for p in model.segformer.parameters())
        counts[variant] = entry
    return counts


def main() -> None:
    import safetensors
    import torch
    import transformers

    image = np.random.RandomState(SEED + 1).standard_normal(INPUT_SHAPE).astype(np.float32)
    arrays = {"image": image.transpose(0, 2, 3, 1)}  # NHWC, as tce_jax takes it
    manifest = {
        "made_by": "scripts/make_segformer_fixture.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "seed": SEED,
        "num_classes": NUM_CLASSES,
        "block_layer_norm_eps": ORIGINAL_BLOCK_EPS,
        "variants": {},
        "param_counts": _param_counts(),
    }
    for variant in FIXTURE_VARIANTS:
        layout, outputs = _reference(variant, image)
        manifest["variants"][variant] = {"config": VARIANTS[variant], "layout": layout}
        arrays.update({f"{variant}/{name}": value for name, value in outputs.items()})
    os.makedirs(DATA, exist_ok=True)
    np.savez_compressed(NPZ_PATH, **arrays)
    with open(JSON_PATH, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"Wrote {NPZ_PATH} and {JSON_PATH}.")


if __name__ == "__main__":
    main()
