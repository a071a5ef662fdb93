"""ImageNet-pretrained ResNet-50/101 backbones from a local file (nothing is downloaded).

``config.model.pretrained`` names a file holding the backbone's variables. Accepted formats:

* ``.npz`` written by ``scripts/convert_torchvision_resnet.py`` from a torchvision checkpoint
  (``resnet50-*.pth`` / ``resnet101-*.pth``): flat keys ``params/conv_init/kernel``,
  ``batch_stats/bn_init/mean``, ... An ``.npz`` of a torchvision ``state_dict`` saved with
  numpy (keys ``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) is converted on load.
* ``.safetensors`` with torchvision's key names, as timm publishes torchvision's ImageNet
  ResNets (``resnet50.tv_in1k``, ``resnet101.tv2_in1k``, ...: ``model.safetensors``), read
  without torch and converted like the ``.npz`` state_dict (the classifier ``fc.*`` and
  ``num_batches_tracked`` are dropped); a file of our flat ``params/...`` keys is read as is.
* ``.msgpack``: ``flax.serialization.msgpack_serialize`` (or ``to_bytes``) of
  ``{"params": ..., "batch_stats": ...}`` of a :class:`tce_jax.models.ResNet`.
* an Orbax checkpoint directory (``ocp.StandardCheckpointer().save(path, tree)``) of the
  same tree.

In the tree formats the backbone may also sit under ``backbone`` (a whole DeepLabV3+, e.g. our
own checkpoints): only that subtree is used. The weights replace the model's ``backbone``
variables after initialisation (the ASPP, decoder and classifier stay randomly initialised);
a tree that does not match the model's backbone raises :class:`PretrainedMismatchError`
naming the missing, unexpected and mis-shaped variables.

The torchvision layout and the transposes are documented in ``tce_jax/models/resnet.py``.
torchvision's ResNets are "v1.5" (stride on the 3x3 conv) with a 7x7 stem, exactly our
ResNet; mmsegmentation's ``resnet50_v1c`` (three-conv stem) is a different network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

Tree = dict[str, Any]
FORMATS = (
    ".npz (from scripts/convert_torchvision_resnet.py, or a torchvision state_dict saved with "
    "numpy), .safetensors (torchvision key names, e.g. timm's resnet101.tv2_in1k), .msgpack "
    "(flax.serialization of {'params', 'batch_stats'}), or an Orbax checkpoint directory"
)


class PretrainedMismatchError(ValueError):
    """The pretrained variables do not fit the model's backbone."""


# ---------------------------------------------------------------------------------------------
# torchvision -> Flax names.

_BN_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_STEM_RE = re.compile(r"^(conv1|bn1)\.(\w+)$")
_BLOCK_RE = re.compile(r"^layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(\w+)$")


def _flax_path(key: str) -> tuple[str, ...] | None:
    """``(collection, module..., leaf)`` for a torchvision ResNet key; None for keys without a
    counterpart (``fc.*``, ``*.num_batches_tracked``); ``KeyError`` for unknown keys."""
    if key.startswith("fc.") or key.endswith(".num_batches_tracked"):
        return None
    if match := _STEM_RE.match(key):
        layer, leaf = match.groups()
        if layer == "conv1" and leaf == "weight":
            return ("params", "conv_init", "kernel")
        if layer == "bn1" and leaf in _BN_LEAVES:
            collection, name = _BN_LEAVES[leaf]
            return (collection, "bn_init", name)
    elif match := _BLOCK_RE.match(key):
        stage, block, layer, leaf = match.groups()
        module = f"layer{stage}_{block}"
        layer = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
            layer, layer
        )
        if layer.startswith("conv") or layer == "downsample_conv":
            if leaf == "weight":
                return ("params", module, layer, "kernel")
        elif leaf in _BN_LEAVES:
            collection, name = _BN_LEAVES[leaf]
            return (collection, module, layer, name)
    raise KeyError(key)


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops a DataParallel ``module.`` prefix; keeps only ``backbone.*`` of a torchvision
    segmentation model (e.g. ``deeplabv3_resnet101``), whose head we do not use."""
    items = {
        k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()
    }
    if any(k.startswith("backbone.") for k in items):
        items = {k[len("backbone.") :]: v for k, v in items.items() if k.startswith("backbone.")}
    return items


def torchvision_to_flat(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts a torchvision ResNet ``state_dict`` (arrays) to our backbone variables, as the
    flat arrays of the ``.npz`` format (``params/conv_init/kernel``, ...). Needs only numpy.

    Conv weights ``OIHW`` become ``HWIO`` kernels; BatchNorm ``weight/bias`` become
    ``params`` ``scale/bias`` and ``running_mean/var`` become ``batch_stats`` ``mean/var``.
    ``fc.*`` and ``num_batches_tracked`` are dropped.

    Args:
      state_dict: key -> array-like (numpy, or anything ``np.asarray`` accepts).

    Returns:
      ``{"params/<module>/.../<leaf>": float32 array, "batch_stats/...": ...}``, named as
      :class:`tce_jax.models.ResNet`.

    Raises:
      PretrainedMismatchError: keys that are not part of a torchvision ResNet.
    """
    flat = {}
    unknown = []
    for key, value in _strip_prefixes(state_dict).items():
        try:
            path = _flax_path(key)
        except KeyError:
            unknown.append(key)
            continue
        if path is None:
            continue
        array = np.asarray(value, np.float32)
        if path[-1] == "kernel":
            if array.ndim != 4:
                raise PretrainedMismatchError(
                    f"{key} has shape {array.shape}; a conv weight must be 4-D (O, I, H, W)."
                )
            array = array.transpose(2, 3, 1, 0)
        flat["/".join(path)] = array
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        raise PretrainedMismatchError(
            f"{len(unknown)} key(s) of the state_dict are not part of a torchvision ResNet "
            f"(conv1, bn1, layer1-4, fc): {shown}."
        )
    if not any(key.startswith("params/") for key in flat):
        raise PretrainedMismatchError("The state_dict holds no ResNet weights.")
    return flat


def torchvision_to_flax(state_dict: Mapping[str, Any]) -> Tree:
    """:func:`torchvision_to_flat` as ``{"params": ..., "batch_stats": ...}`` nested dicts."""
    from flax import traverse_util

    nested = traverse_util.unflatten_dict(torchvision_to_flat(state_dict), sep="/")
    return {"params": {}, "batch_stats": {}} | nested


# ---------------------------------------------------------------------------------------------
# Files.


def save_npz(path: str, flat: Mapping[str, Any]) -> None:
    """Writes flat arrays (:func:`torchvision_to_flat`) as the ``.npz`` format above."""
    with open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})


def _backbone_subtree(tree: Mapping, source: str) -> Tree:
    if "params" not in tree:
        raise PretrainedMismatchError(
            f"{source} holds no 'params' tree (top-level keys: {sorted(tree)}). Expected "
            f"{{'params': ..., 'batch_stats': ...}} of a ResNet backbone. Accepted: {FORMATS}."
        )
    params, stats = tree["params"], tree.get("batch_stats", {}) or {}
    if "backbone" in params:  # a whole DeepLabV3+ (e.g. one of our checkpoints)
        params, stats = params["backbone"], stats.get("backbone", {})
    return {"params": params, "batch_stats": stats}


def load_backbone_variables(path: str) -> Tree:
    """Reads backbone variables from ``path`` (any format listed in the module docstring).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` nested dicts of numpy arrays.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      PretrainedMismatchError: the file is in no accepted format, or holds no backbone.
    """
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"config.model.pretrained={path!r} does not exist. Give the path of a local file "
            f"with ImageNet ResNet weights; accepted: {FORMATS}. Nothing is downloaded: convert "
            "torchvision weights with `python scripts/convert_torchvision_resnet.py "
            "resnet101-63fe2227.pth resnet101.npz` (see docs/datasets.md)."
        )
    if os.path.isdir(path):
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(os.path.abspath(path))
        tree = _to_numpy(tree)
        return _backbone_subtree(tree, path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            flat = {key: f[key] for key in f.files}
        return _from_flat_arrays(flat, path)
    if suffix == ".safetensors":
        return _from_flat_arrays(read_safetensors(path), path)
    if suffix == ".msgpack":
        from flax import serialization

        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
        return _backbone_subtree(_to_numpy(tree), path)
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise PretrainedMismatchError(
            f"{path} is a PyTorch checkpoint, which tce_jax does not read (it does not depend "
            "on torch). Convert it once, where torch is installed: `python "
            f"scripts/convert_torchvision_resnet.py {path} {os.path.splitext(path)[0]}.npz`, "
            "and set config.model.pretrained to the .npz file (or use the weights' "
            ".safetensors release, e.g. timm's resnet101.tv2_in1k, which is read directly)."
        )
    raise PretrainedMismatchError(f"Cannot read {path}: accepted formats are {FORMATS}.")


def _from_flat_arrays(flat: Mapping[str, Any], path: str) -> Tree:
    """Backbone variables from flat arrays: our ``params/...`` keys as they are, anything
    else through the torchvision key mapping (one code path for .npz and .safetensors)."""
    if any("/" in key for key in flat):
        from flax import traverse_util

        return _backbone_subtree(traverse_util.unflatten_dict(flat, sep="/"), path)
    return torchvision_to_flax(flat)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file as numpy arrays (bfloat16 ones as float32)."""
    import safetensors
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(path)
    except TypeError:  # a dtype numpy lacks (bfloat16): read through JAX, then to float32
        import safetensors.flax

        return {k: np.asarray(v, np.float32) for k, v in safetensors.flax.load_file(path).items()}
    except safetensors.SafetensorError as e:
        raise _unreadable(path, e) from e


def read_safetensors_layout(path: str) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a ``.safetensors`` file, from its header alone."""
    import safetensors

    try:
        with safetensors.safe_open(path, framework="np") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except safetensors.SafetensorError as e:
        raise _unreadable(path, e) from e


def _unreadable(path: str, error: Exception) -> PretrainedMismatchError:
    return PretrainedMismatchError(
        f"{path} is not a readable .safetensors file ({error}): the download is incomplete or "
        "the file is not in the safetensors format. Download it again."
    )


def _to_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


# ---------------------------------------------------------------------------------------------
# Into the model.


def _blocks_per_stage(keys) -> tuple[int, ...]:
    blocks: dict[int, set[int]] = {}
    for key in keys:
        if match := re.match(r"^(?:params|batch_stats)/layer(\d)_(\d+)/", key):
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return tuple(len(blocks.get(s, ())) for s in range(1, 5))


_DEPTHS = {(3, 4, 6, 3): "ResNet-50", (3, 4, 23, 3): "ResNet-101", (3, 8, 36, 3): "ResNet-152"}


def check_backbone(
    expected: Mapping,
    loaded: Mapping,
    *,
    source: str,
    model: str,
    formats: str = FORMATS,
    hint: str | None = None,
) -> None:
    """Raises :class:`PretrainedMismatchError` unless ``loaded`` has exactly the variable
    names and shapes of ``expected`` (both ``{"params", "batch_stats"}`` trees of a backbone;
    either may hold ``jax.ShapeDtypeStruct`` leaves). The message ends with ``hint`` (e.g.
    the depths of file and model, where they differ) and the accepted ``formats``."""
    from flax import traverse_util

    def named_shapes(tree):
        return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}

    want, got = named_shapes(expected), named_shapes(loaded)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if not (missing or unexpected or shapes):
        return

    def natural(key):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]

    def show(keys, with_shapes=False):
        items = [f"{k} (file {got[k]}, model {want[k]})" if with_shapes else k for k in keys[:6]]
        return ", ".join(items) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    def blocks(keys):  # "params/layer3_6/conv1/kernel" -> "layer3_6"
        names = sorted({k.split("/")[1] if "/" in k else k for k in keys}, key=natural)
        return ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")

    lines = [f"The pretrained weights in {source} do not match the backbone of {model}:"]
    if missing:
        lines.append(
            f"  {len(missing)} variable(s) missing from the file, in {blocks(missing)}: "
            f"{show(sorted(missing, key=natural))}"
        )
    if unexpected:
        lines.append(
            f"  {len(unexpected)} unexpected variable(s) in the file, in {blocks(unexpected)}: "
            f"{show(sorted(unexpected, key=natural))}"
        )
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatch(es): {show(shapes, True)}")
    file_stages, model_stages = _blocks_per_stage(got), _blocks_per_stage(want)
    if file_stages != model_stages:
        lines.append(
            f"  The file holds a {_DEPTHS.get(file_stages, 'ResNet')} (blocks per stage "
            f"{file_stages}); the model needs a {_DEPTHS.get(model_stages, 'ResNet')} "
            f"({model_stages}): choose the matching config.model.name or weights file."
        )
    if hint:
        lines.append(f"  {hint}")
    lines.append(f"  Accepted formats: {formats}.")
    raise PretrainedMismatchError("\n".join(lines))


def replace_backbone(params: Mapping, batch_stats: Mapping, loaded: Mapping) -> tuple[Tree, Tree]:
    """``(params, batch_stats)`` with their ``backbone`` subtrees replaced by ``loaded``'s,
    cast to the dtypes of the replaced leaves. Works inside ``jit`` (a pytree rebuild)."""
    import jax

    def cast(new, old):
        return jax.numpy.asarray(new, old.dtype)

    params = dict(params)
    batch_stats = dict(batch_stats)
    params["backbone"] = jax.tree.map(cast, loaded["params"], params["backbone"])
    if "backbone" in batch_stats:  # a SegFormer's encoder has no BatchNorm
        batch_stats["backbone"] = jax.tree.map(
            cast, loaded["batch_stats"], batch_stats["backbone"]
        )
    return params, batch_stats


def load_for_model(path: str, abstract_variables: Mapping, *, model: str) -> Tree:
    """Loads ``path`` and checks it against a model's (abstract) variables.

    Args:
      path: the weights file (``config.model.pretrained``).
      abstract_variables: the model's ``{"params", "batch_stats"}`` (e.g. from
        ``jax.eval_shape(model.init, ...)``); must have a ``backbone`` subtree.
      model: the model's name, for messages.

    Returns:
      The backbone variables, ready for :func:`replace_backbone`.
    """
    params = abstract_variables.get("params", {})
    if "backbone" not in params:
        raise PretrainedMismatchError(
            f"config.model.pretrained={path!r} is set but {model} has no ResNet backbone: "
            "pretrained backbones are for the DeepLabV3+ models "
            "(deeplabv3plus_resnet50 / deeplabv3plus_resnet101). Unset config.model.pretrained."
        )
    expected = {
        "params": params["backbone"],
        "batch_stats": abstract_variables.get("batch_stats", {}).get("backbone", {}),
    }
    loaded = load_backbone_variables(path)
    check_backbone(expected, loaded, source=path, model=model)
    return loaded
