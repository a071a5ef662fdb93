"""DeepLabV3+ (Chen et al., ECCV 2018) on a dilated ResNet backbone.

Backbone (``backbone``, see ``resnet.py`` for its variable names and the torchvision mapping)
-> ASPP on the stride-``output_stride`` feature (``aspp``) -> decoder that fuses the upsampled
ASPP output with a 48-channel projection of the stride-4 feature (``decoder``) -> 1x1
classifier -> bilinear upsampling to the input resolution. The head follows the paper's
decoder (two 3x3 convs); there is no dropout, so training needs no ``dropout`` rng.

Head variable names: ``aspp/{branch0, atrous1, atrous2, atrous3, pool, project}/{conv,bn}``,
``decoder/{low_level, fuse1, fuse2}/{conv,bn}``, ``classifier``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from tce_jax.models.resize import resize_bilinear
from tce_jax.models.resnet import ResNet50, ResNet101, conv_and_norm
from tce_jax.models.unet import ConvBNReLU

ModuleDef = Any


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per rate, image pooling;
    concatenated and projected to ``features`` channels by a 1x1 conv-BN-ReLU."""

    rates: Sequence[int]
    conv: ModuleDef
    norm: ModuleDef
    features: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branches = [ConvBNReLU(self.features, self.conv, self.norm, 1, name="branch0")(x)]
        for k, rate in enumerate(self.rates):
            branches.append(
                ConvBNReLU(self.features, self.conv, self.norm, 3, rate, name=f"atrous{k + 1}")(x)
            )
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = ConvBNReLU(self.features, self.conv, self.norm, 1, name="pool")(pooled)
        # Bilinear upsampling of a 1x1 map is a broadcast.
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        y = jnp.concatenate(branches, axis=-1)
        return ConvBNReLU(self.features, self.conv, self.norm, 1, name="project")(y)


class Decoder(nn.Module):
    """DeepLabV3+ decoder: project the low-level feature to ``low_level_features`` channels,
    upsample the ASPP output (bilinear) to its size, concatenate, two 3x3 conv-BN-ReLU."""

    conv: ModuleDef
    norm: ModuleDef
    low_level_features: int = 48
    features: int = 256

    @nn.compact
    def __call__(self, high: jax.Array, low: jax.Array) -> jax.Array:
        low = ConvBNReLU(self.low_level_features, self.conv, self.norm, 1, name="low_level")(low)
        high = resize_bilinear(high, low.shape[1:3])
        y = jnp.concatenate([high.astype(low.dtype), low], axis=-1)
        y = ConvBNReLU(self.features, self.conv, self.norm, 3, name="fuse1")(y)
        return ConvBNReLU(self.features, self.conv, self.norm, 3, name="fuse2")(y)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: ``__call__(x, *, train)`` maps images ``x: [B, H, W, 3]`` (normalised by
    the caller) to logits ``[B, H, W, num_classes]`` in ``dtype``.

    Attributes:
      num_classes: number of output classes.
      backbone_cls: a ``ResNet`` partial (``ResNet50``, ``ResNet101``); built with this
        model's ``output_stride``, ``dtype``, ``param_dtype`` and ``bn_axis_name``.
      output_stride: 16 or 8 (stride of the feature ASPP sees).
      atrous_rates: ASPP rates at output stride 16; scaled by ``16 / output_stride``
        (so (12, 24, 36) at output stride 8).
      aspp_features, low_level_features, decoder_features: head widths (256, 48, 256).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); the logits come back in it.
      param_dtype: parameter dtype.
      bn_axis_name: ``axis_name`` of every ``nn.BatchNorm`` (global statistics under
        ``pmap``/``shard_map``; leave ``None`` under ``jit`` with sharded global arrays).
    """

    num_classes: int
    backbone_cls: ModuleDef
    output_stride: int = 16
    atrous_rates: Sequence[int] = (6, 12, 18)
    aspp_features: int = 256
    low_level_features: int = 48
    decoder_features: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    # The decode head (mmsegmentation's DepthwiseSeparableASPPHead): see models.head_modules.
    head_modules: ClassVar[tuple[str, ...]] = ("aspp", "decoder", "classifier")

    @property
    def aspp_rates(self) -> tuple[int, ...]:
        """The ASPP dilation rates used at this model's output stride."""
        if self.output_stride not in (8, 16):
            raise ValueError(f"DeepLabV3+ output_stride must be 8 or 16, got {self.output_stride}.")
        return tuple(r * 16 // self.output_stride for r in self.atrous_rates)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        rates = self.aspp_rates
        conv, norm = conv_and_norm(self, train=train)
        low, high = self.backbone_cls(
            output_stride=self.output_stride, dtype=self.dtype, param_dtype=self.param_dtype,
            bn_axis_name=self.bn_axis_name, name="backbone",
        )(x, train=train)
        y = ASPP(rates, conv, norm, self.aspp_features, name="aspp")(high)
        y = Decoder(conv, norm, self.low_level_features, self.decoder_features, name="decoder")(
            y, low
        )
        y = nn.Conv(
            self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
            name="classifier",
        )(y)
        # Half-pixel-centre bilinear, as torch's interpolate(align_corners=False).
        y = resize_bilinear(y, x.shape[1:3])
        return jnp.asarray(y, self.dtype)


DeepLabV3PlusResNet50 = functools.partial(DeepLabV3Plus, backbone_cls=ResNet50)
DeepLabV3PlusResNet101 = functools.partial(DeepLabV3Plus, backbone_cls=ResNet101)
