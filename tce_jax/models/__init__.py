"""Segmentation models (Flax Linen) and a name -> model factory.

Every model is called as ``model.apply(variables, x, train=..., mutable=[...])`` with
``x: float [B, H, W, C_in]`` (NHWC) and returns logits ``[B, H, W, num_classes]`` at the
input resolution, in the model's compute ``dtype``. Variables: ``params`` (``param_dtype``,
float32 by default; BatchNorm scale/bias included) and ``batch_stats`` (BatchNorm running
mean/var; mutable when ``train=True``). SegFormer's stochastic depth and dropout draw from the
``'dropout'`` rng when ``train=True`` (``rngs={"dropout": key}``; the other models need none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tce_jax.models.deeplab import (
    ASPP,
    Decoder,
    DeepLabV3Plus,
    DeepLabV3PlusResNet50,
    DeepLabV3PlusResNet101,
)
from tce_jax.models.resnet import Bottleneck, ResNet, ResNet50, ResNet101
from tce_jax.models.segformer import SEGFORMERS, MixTransformer, SegFormer
from tce_jax.models.unet import ConvBNReLU, DoubleConv, UNet

__all__ = [
    "ASPP",
    "Bottleneck",
    "ConvBNReLU",
    "Decoder",
    "DeepLabV3Plus",
    "DeepLabV3PlusResNet50",
    "DeepLabV3PlusResNet101",
    "DoubleConv",
    "MODELS",
    "MixTransformer",
    "ResNet",
    "ResNet50",
    "ResNet101",
    "SegFormer",
    "UNet",
    "create_model",
    "head_modules",
    "is_deeplab",
    "is_segformer",
]

MODELS: Mapping[str, Callable[..., nn.Module]] = {
    "unet": functools.partial(UNet, features=(16, 32, 64, 128)),
    # For tests and smoke runs: 3 levels, so H and W need only be divisible by 4.
    "unet_small": functools.partial(UNet, features=(8, 16, 32)),
    "deeplabv3plus_resnet50": DeepLabV3PlusResNet50,
    "deeplabv3plus_resnet101": DeepLabV3PlusResNet101,
    # SegFormer-B0 ... B5: segformer_b0, ..., segformer_b5.
    **SEGFORMERS,
}


def create_model(
    name: str,
    *,
    num_classes: int,
    dtype: Any = jnp.float32,
    bn_axis_name: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds the model called ``name`` (one of ``MODELS``).

    Args:
      name: ``'unet'``, ``'unet_small'``, ``'deeplabv3plus_resnet50'``,
        ``'deeplabv3plus_resnet101'`` or ``'segformer_b0'`` ... ``'segformer_b5'``.
      num_classes: number of output classes ``C`` (logits are ``[B, H, W, C]``).
      dtype: compute dtype, e.g. ``jnp.bfloat16`` or ``'bfloat16'`` for mixed precision
        (parameters stay float32).
      bn_axis_name: the ``pmap``/``shard_map`` axis name to average BatchNorm statistics over
        (``None`` under ``jit`` with sharded global arrays, where they are global anyway).
      **kwargs: further model attributes, e.g. ``output_stride=8`` for DeepLabV3+ or
        ``features=(...)`` for the U-Nets.

    Raises:
      ValueError: for an unknown ``name``.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model name {name!r}; valid names: {', '.join(sorted(MODELS))}.")
    return MODELS[name](
        num_classes=num_classes, dtype=jnp.dtype(dtype), bn_axis_name=bn_axis_name, **kwargs
    )


def is_deeplab(name: str) -> bool:
    """Whether ``name`` (a key of ``MODELS``) is a DeepLabV3+: it takes ``output_stride``, only
    its ResNet backbone can be pretrained, and it is a paper-scale model."""
    return getattr(MODELS.get(name), "func", None) is DeepLabV3Plus


def is_segformer(name: str) -> bool:
    """Whether ``name`` (a key of ``MODELS``) is a SegFormer (B0-B5): only its MiT encoder can
    be pretrained (`tce_jax.pretrained_segformer`)."""
    return getattr(MODELS.get(name), "func", None) is SegFormer


def head_modules(name: str) -> tuple[str, ...]:
    """The top-level parameter names of the decode head of the model called ``name`` (the
    model class's ``head_modules``; mmsegmentation's ``decode_head``): those whose learning
    rate ``optimizer.head_lr_multiplier`` scales. ``()`` for a model without one (the U-Nets)."""
    model = MODELS[name]
    return getattr(getattr(model, "func", model), "head_modules", ())
