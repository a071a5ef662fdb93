"""Pretrained SegFormer (MiT) encoders from a local ``.safetensors`` file (nothing is downloaded).

``config.model.pretrained`` of a ``segformer_b*`` model names a ``.safetensors`` file in either
of the two published key layouts, read without torch:

* Hugging Face transformers (``nvidia/mit-b0`` ... ``nvidia/mit-b5``, ``nvidia/segformer-*``):
  ``segformer.encoder.patch_embeddings.{s}.proj``, ``...block.{s}.{j}.attention.self.query``,
  ``.key``, ``.value``, ``.sr``, ``.layer_norm``, ``attention.output.dense``, ``mlp.dense1``,
  ``mlp.dwconv.dwconv``, ``mlp.dense2``, ``layer_norm_1/2``, ``encoder.layer_norm.{s}``
  (stages ``s = 0..3``), with or without the ``segformer.`` prefix;
* the original NVlabs/SegFormer names (its ImageNet ``mit_b*.pth`` and segmentation
  checkpoints, saved as safetensors: see docs/segformer.md): ``patch_embed{k}.proj``,
  ``block{k}.{j}.attn.q``, ``attn.kv`` (keys and values fused: split on load), ``attn.sr``,
  ``attn.norm``, ``attn.proj``, ``mlp.fc1``, ``mlp.dwconv.dwconv``, ``mlp.fc2``,
  ``norm1/2``, ``norm{k}`` (stages ``k = 1..4``), with or without ``backbone.``.

Only the encoder is loaded; a whole segmentation model's decode head, an ImageNet classifier
(``classifier.*``, ``head.*``) and ``num_batches_tracked`` are skipped (the decoder and the
classifier stay randomly initialised, as DeepLabV3+'s head does). The file's header (names
and shapes) is checked against the model first: every missing, unexpected or mis-shaped
variable is listed in one :class:`~tce_jax.pretrained.PretrainedMismatchError` before any
weight is read.

:func:`state_dict_to_variables` converts a whole model, decode head included (the tests use it
to compare with transformers' ``SegformerForSemanticSegmentation``). The layout and the
transposes are documented in ``tce_jax/models/segformer.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from tce_jax.pretrained import (
    PretrainedMismatchError,
    check_backbone,
    read_safetensors,
    read_safetensors_layout,
)

FORMATS = (
    ".safetensors with Hugging Face transformers' SegFormer key names (e.g. nvidia/mit-b0) or "
    "the original NVlabs/SegFormer names (patch_embed1, block1.0.attn.q, attn.kv, ...)"
)

# Module name patterns -> (our module path, kind). "{s}" is the stage (1..4), "{j}" the block
# and "{kv}" a half of a fused kv; transformers counts stages from 0, NVlabs from 1.
_BLOCK = r"block\.(\d)\.(\d+)\."
_TRANSFORMERS = [
    (r"encoder\.patch_embeddings\.(\d)\.proj", "backbone/patch_embed{s}/proj", "conv"),
    (r"encoder\.patch_embeddings\.(\d)\.layer_norm", "backbone/patch_embed{s}/norm", "norm"),
    (r"encoder\." + _BLOCK + "layer_norm_1", "backbone/block{s}_{j}/norm1", "norm"),
    (r"encoder\." + _BLOCK + "layer_norm_2", "backbone/block{s}_{j}/norm2", "norm"),
    (
        r"encoder\." + _BLOCK + r"attention\.self\.query",
        "backbone/block{s}_{j}/attn/query",
        "dense",
    ),
    (r"encoder\." + _BLOCK + r"attention\.self\.key", "backbone/block{s}_{j}/attn/key", "dense"),
    (
        r"encoder\." + _BLOCK + r"attention\.self\.value",
        "backbone/block{s}_{j}/attn/value",
        "dense",
    ),
    (r"encoder\." + _BLOCK + r"attention\.self\.sr", "backbone/block{s}_{j}/attn/sr", "conv"),
    (
        r"encoder\." + _BLOCK + r"attention\.self\.layer_norm",
        "backbone/block{s}_{j}/attn/sr_norm",
        "norm",
    ),
    (
        r"encoder\." + _BLOCK + r"attention\.output\.dense",
        "backbone/block{s}_{j}/attn/proj",
        "dense",
    ),
    (r"encoder\." + _BLOCK + r"mlp\.dense1", "backbone/block{s}_{j}/mlp/fc1", "dense"),
    (r"encoder\." + _BLOCK + r"mlp\.dwconv\.dwconv", "backbone/block{s}_{j}/mlp/dwconv", "conv"),
    (r"encoder\." + _BLOCK + r"mlp\.dense2", "backbone/block{s}_{j}/mlp/fc2", "dense"),
    (r"encoder\.layer_norm\.(\d)", "backbone/norm{s}", "norm"),
    (r"decode_head\.linear_c\.(\d)\.proj", "decode_head/linear_c{s}", "dense"),
    (r"decode_head\.linear_fuse", "decode_head/linear_fuse", "conv"),
    (r"decode_head\.batch_norm", "decode_head/bn", "batch_norm"),
    (r"decode_head\.classifier", "decode_head/classifier", "conv"),
]
_NVLABS = [
    (r"patch_embed(\d)\.proj", "backbone/patch_embed{s}/proj", "conv"),
    (r"patch_embed(\d)\.norm", "backbone/patch_embed{s}/norm", "norm"),
    (r"block(\d)\.(\d+)\.norm1", "backbone/block{s}_{j}/norm1", "norm"),
    (r"block(\d)\.(\d+)\.norm2", "backbone/block{s}_{j}/norm2", "norm"),
    (r"block(\d)\.(\d+)\.attn\.q", "backbone/block{s}_{j}/attn/query", "dense"),
    (r"block(\d)\.(\d+)\.attn\.kv", "backbone/block{s}_{j}/attn/{kv}", "dense_kv"),
    (r"block(\d)\.(\d+)\.attn\.sr", "backbone/block{s}_{j}/attn/sr", "conv"),
    (r"block(\d)\.(\d+)\.attn\.norm", "backbone/block{s}_{j}/attn/sr_norm", "norm"),
    (r"block(\d)\.(\d+)\.attn\.proj", "backbone/block{s}_{j}/attn/proj", "dense"),
    (r"block(\d)\.(\d+)\.mlp\.fc1", "backbone/block{s}_{j}/mlp/fc1", "dense"),
    (r"block(\d)\.(\d+)\.mlp\.dwconv\.dwconv", "backbone/block{s}_{j}/mlp/dwconv", "conv"),
    (r"block(\d)\.(\d+)\.mlp\.fc2", "backbone/block{s}_{j}/mlp/fc2", "dense"),
    (r"norm(\d)", "backbone/norm{s}", "norm"),
    (r"decode_head\.linear_c(\d)\.proj", "decode_head/linear_c{s}", "dense"),
    (r"decode_head\.linear_fuse\.conv", "decode_head/linear_fuse", "conv"),
    (r"decode_head\.linear_fuse\.bn", "decode_head/bn", "batch_norm"),
    (r"decode_head\.linear_pred", "decode_head/classifier", "conv"),
]
_RULES = [(re.compile(p + "$"), path, kind, 1) for p, path, kind in _TRANSFORMERS] + [
    (re.compile(p + "$"), path, kind, 0) for p, path, kind in _NVLABS
]
# Keys without a counterpart: BatchNorm counters, ImageNet classifiers (transformers'
# SegformerForImageClassification, NVlabs' mit_b* head) and NVlabs' unused conv_seg.
_SKIPPED = re.compile(r"(^|\.)num_batches_tracked$|^(classifier|head|decode_head\.conv_seg)\.")
# Leaf name -> (collection, our leaf) for each kind; "weight" of a Linear/conv is its kernel.
_LEAVES = {
    "dense": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "norm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "batch_norm": {
        "weight": ("params", "scale"),
        "bias": ("params", "bias"),
        "running_mean": ("batch_stats", "mean"),
        "running_var": ("batch_stats", "var"),
    },
}
_LEAVES["dense_kv"] = _LEAVES["dense"]


class Source(NamedTuple):
    """Where one of our variables comes from: a tensor of the file, and for NVlabs' fused
    ``attn.kv`` which half of its output rows (0: keys, 1: values; None: all of it)."""

    key: str
    kind: str
    half: int | None = None


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "segformer.", "backbone."):
        key = key.removeprefix(prefix)
    return key


def _targets(key: str) -> dict[str, Source] | None:
    """Our flat variable names (``params/backbone/...``) for the file's ``key``; ``{}`` for a
    key that is skipped; None for a key that is not part of a SegFormer."""
    name = _strip_prefix(key)
    if _SKIPPED.search(name):
        return {}
    module, _, leaf = name.rpartition(".")
    for pattern, template, kind, offset in _RULES:
        match = pattern.match(module)
        if match is None or leaf not in _LEAVES[kind]:
            continue
        numbers = [int(g) for g in match.groups()]
        fields = {"s": numbers[0] + offset} if numbers else {}
        if len(numbers) > 1:
            fields["j"] = numbers[1]
        collection, our_leaf = _LEAVES[kind][leaf]
        if kind == "dense_kv":  # NVlabs' fused kv: keys, then values
            halves = {
                f"{collection}/{template.format(**fields, kv=kv)}/{our_leaf}": i
                for i, kv in enumerate(("key", "value"))
            }
            return {path: Source(key, kind, i) for path, i in halves.items()}
        return {f"{collection}/{template.format(**fields)}/{our_leaf}": Source(key, kind)}
    return None


def plan(layout: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Source], list[str]]:
    """``(sources, unknown)``: our flat variable name -> its :class:`Source` for every tensor
    of a checkpoint ``layout`` (key -> shape), and the keys that are not part of a SegFormer."""
    sources, unknown = {}, []
    for key in layout:
        targets = _targets(key)
        if targets is None:
            unknown.append(key)
        else:
            sources.update(targets)
    return sources, unknown


def convert(source: Source, array: np.ndarray) -> np.ndarray:
    """Torch layout -> ours: Linear ``[out, in]`` -> ``[in, out]``; conv ``[out, in, kh, kw]``
    (a depthwise one ``[C, 1, 3, 3]``) -> ``[kh, kw, in, out]``; the ``half``-th half of a
    fused ``kv``'s output rows (keys first, as the original splits them)."""
    if source.half is not None:
        rows = array.shape[0] // 2
        array = array[source.half * rows : (source.half + 1) * rows]
    if source.kind in ("dense", "dense_kv") and array.ndim == 2:
        array = array.T
    elif source.kind == "conv" and array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)
    return array


def _shape_tree(sources: Mapping[str, Source], layout: Mapping[str, tuple[int, ...]]):
    """The nested ``{"params", "batch_stats"}`` tree of our variables' shapes, from the file's
    header alone (a zero-strided stand-in goes through :func:`convert`)."""
    from flax import traverse_util

    flat = {
        name: _abstract(convert(source, np.broadcast_to(np.float32(0), layout[source.key])).shape)
        for name, source in sources.items()
    }
    return {"params": {}, "batch_stats": {}} | traverse_util.unflatten_dict(flat, sep="/")


def _abstract(shape: tuple[int, ...]):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), np.float32)


def state_dict_to_variables(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A whole SegFormer ``state_dict`` (either layout; arrays) as our variables
    ``{"params": {"backbone", "decode_head"}, "batch_stats": {"decode_head"}}`` of float32
    numpy arrays (only the parts the state_dict holds).

    Raises:
      PretrainedMismatchError: keys that are not part of a SegFormer.
    """
    from flax import traverse_util

    sources, unknown = plan({key: np.shape(value) for key, value in state_dict.items()})
    if unknown:
        raise PretrainedMismatchError(
            f"{len(unknown)} key(s) are not part of a SegFormer: {', '.join(sorted(unknown)[:8])}"
        )
    flat = {
        name: np.asarray(convert(source, np.asarray(state_dict[source.key])), np.float32)
        for name, source in sources.items()
    }
    return {"params": {}, "batch_stats": {}} | traverse_util.unflatten_dict(flat, sep="/")


def _describe(backbone: Mapping) -> str:
    """The encoder a tree of its variables (or their shapes) holds, for messages: ``an MiT-B0
    encoder (blocks per stage (2, 2, 2, 2), widths (32, 64, 160, 256))``."""
    from tce_jax.models.segformer import VARIANTS

    blocks: dict[int, int] = {}
    for name in backbone:
        if match := re.match(r"^block(\d)_(\d+)$", name):
            stage = int(match.group(1))
            blocks[stage] = max(blocks.get(stage, 0), int(match.group(2)) + 1)
    depths = tuple(blocks.get(k, 0) for k in range(1, 5))
    widths = tuple(
        int(np.shape(backbone[f"norm{k}"]["scale"])[0]) if f"norm{k}" in backbone else 0
        for k in range(1, 5)
    )
    names = [
        f"MiT-{size.upper()} " for size, (d, w, _) in VARIANTS.items() if (d, w) == (depths, widths)
    ]
    return f"an {''.join(names)}encoder (blocks per stage {depths}, widths {widths})"


def load_for_model(path: str, abstract_variables: Mapping, *, model: str) -> dict[str, Any]:
    """Loads the MiT encoder of ``path`` for a SegFormer, checked against its variables.

    Args:
      path: the ``.safetensors`` file (``config.model.pretrained``).
      abstract_variables: the model's ``{"params", "batch_stats"}`` (e.g. from
        ``jax.eval_shape(model.init, ...)``), with a ``backbone`` subtree.
      model: the model's name, for messages.

    Returns:
      ``{"params": <backbone params>, "batch_stats": {}}`` as float32 numpy arrays, ready for
      :func:`tce_jax.pretrained.replace_backbone`.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      PretrainedMismatchError: the file is no ``.safetensors`` file, or its encoder does not
        fit the model (all mismatches listed, nothing read yet).
    """
    from flax import traverse_util

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config.model.pretrained={path!r} does not exist. Give the path of a local file "
            f"with MiT encoder weights: {FORMATS}. Nothing is downloaded (see docs/segformer.md)."
        )
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise PretrainedMismatchError(
            f"Cannot read {path}: SegFormer encoders are read from {FORMATS}. Convert a PyTorch "
            "checkpoint (.pth) once where torch is installed, as docs/segformer.md shows."
        )
    layout = read_safetensors_layout(path)
    sources, unknown = plan(layout)
    sources = {k: v for k, v in sources.items() if k.startswith("params/backbone/")}
    loaded = _shape_tree(sources, layout)
    loaded["params"] = loaded["params"].get("backbone", {})
    expected = {"params": abstract_variables["params"]["backbone"], "batch_stats": {}}
    held, needed = _describe(loaded["params"]), _describe(expected["params"])
    check_backbone(
        expected,
        loaded | {key: _abstract(layout[key]) for key in unknown},
        source=path,
        model=model,
        formats=FORMATS,
        hint=None
        if held == needed
        else f"The file holds {held}; {model} needs {needed}: choose the matching "
        "config.model.name or weights file.",
    )
    arrays = read_safetensors(path)
    flat = {
        name.removeprefix("params/backbone/"): np.asarray(
            convert(source, arrays[source.key]), np.float32
        )
        for name, source in sources.items()
    }
    return {"params": traverse_util.unflatten_dict(flat, sep="/"), "batch_stats": {}}
