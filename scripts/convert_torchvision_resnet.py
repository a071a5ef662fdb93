r"""Converts torchvision ImageNet ResNet-50/101 weights to the .npz that tce_jax loads.

Run once, where PyTorch and numpy are installed (tce_jax itself never imports torch; this
script needs neither JAX nor TensorFlow):

    python scripts/convert_torchvision_resnet.py resnet101-63fe2227.pth resnet101.npz
    # then train with --config.model.pretrained=/path/to/resnet101.npz

The input is a torchvision ``state_dict`` (``torch.save(model.state_dict(), path)``, e.g. the
files torchvision downloads to ``~/.cache/torch/hub/checkpoints/``: ``resnet50-0676ba61.pth``,
``resnet50-11ad3fa6.pth``, ``resnet101-63fe2227.pth``, ``resnet101-cd907fc2.pth``); wrappers
``{"state_dict": ...}`` / ``{"model": ...}`` and ``module.`` / ``backbone.`` prefixes are
accepted. The output holds ``params/...`` and ``batch_stats/...`` arrays named as
``tce_jax.models.ResNet`` (see ``tce_jax/models/resnet.py`` for the mapping); ``fc`` is dropped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping

import numpy as np

# tce_jax/pretrained.py needs only numpy at import time: load it by path, so that this script
# runs where torch is installed without JAX or TensorFlow.
_PRETRAINED = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tce_jax", "pretrained.py"
)
_spec = importlib.util.spec_from_file_location("tce_jax_pretrained", _PRETRAINED)
pretrained = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrained)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a torchvision checkpoint with torch (imported here only) as numpy arrays."""
    try:
        import torch
    except ImportError:
        sys.exit("This converter needs PyTorch (pip install torch); tce_jax itself does not.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    return {k: v.detach().cpu().numpy() for k, v in checkpoint.items() if hasattr(v, "numpy")}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], output: str) -> dict:
    """Converts a numpy state_dict and writes ``output`` (.npz); returns its flat arrays."""
    flat = pretrained.torchvision_to_flat(state_dict)
    pretrained.save_npz(output, flat)
    return flat


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision ResNet checkpoint (.pth)")
    parser.add_argument("output", help="where to write the .npz")
    args = parser.parse_args(argv)
    flat = convert_state_dict(load_torch_state_dict(args.input), args.output)
    stages = pretrained._blocks_per_stage(flat)
    print(
        f"Wrote {args.output}: {len(flat)} arrays, "
        f"{sum(v.size for v in flat.values()) / 1e6:.1f}M values, "
        f"{pretrained._DEPTHS.get(stages, 'ResNet')} (blocks per stage {stages})."
    )


if __name__ == "__main__":
    main()
