"""A small U-Net for semantic segmentation (the fast CPU default model).

Encoder: per level two 3x3 conv-BN-ReLU blocks, then a 2x2 max-pool (except at the bottom).
Decoder: a 2x2 stride-2 transposed conv, concatenation with the encoder's skip feature, two
conv-BN-ReLU blocks. A 1x1 conv gives per-pixel logits at the input resolution.

Variable names: ``enc{i}/conv{1,2}/{conv,bn}``, ``up{i}``, ``dec{i}/conv{1,2}/{conv,bn}``,
``classifier``, with ``i = 0`` the full-resolution level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tce_jax.models.resnet import conv_and_norm

ModuleDef = Any


class ConvBNReLU(nn.Module):
    """``conv`` (k x k, stride 1, 'SAME', dilation) -> ``norm`` -> ReLU.

    Submodules are named ``conv`` and ``bn``. With stride 1, 'SAME' padding equals torch's
    ``padding=dilation * (k // 2)``.
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    kernel_size: int = 3
    dilation: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, d = self.kernel_size, self.dilation
        x = self.conv(self.features, (k, k), padding="SAME", kernel_dilation=(d, d), name="conv")(x)
        return nn.relu(self.norm(name="bn")(x))


class DoubleConv(nn.Module):
    """Two 3x3 ``ConvBNReLU`` blocks (``conv1``, ``conv2``) with ``features`` channels."""

    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvBNReLU(self.features, self.conv, self.norm, name="conv1")(x)
        return ConvBNReLU(self.features, self.conv, self.norm, name="conv2")(x)


class UNet(nn.Module):
    """U-Net: ``__call__(x, *, train)`` maps ``x: [B, H, W, C_in]`` to logits
    ``[B, H, W, num_classes]`` in ``dtype``.

    ``H`` and ``W`` must be divisible by ``2 ** (len(features) - 1)``.

    Attributes:
      num_classes: number of output classes.
      features: channels per level, top (full resolution) to bottom.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); the logits come back in it.
      param_dtype: parameter dtype.
      bn_axis_name: ``axis_name`` of every ``nn.BatchNorm`` (global statistics under
        ``pmap``/``shard_map``; leave ``None`` under ``jit`` with sharded global arrays).
    """

    num_classes: int
    features: Sequence[int] = (16, 32, 64, 128)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        factor = 2 ** (len(self.features) - 1)
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"UNet with {len(self.features)} levels needs NHWC input with H and W divisible "
                f"by {factor}; got shape {x.shape}. Crop or pad the images, or use fewer levels."
            )
        conv, norm = conv_and_norm(self, train=train)

        skips = []
        for i, f in enumerate(self.features):
            if i > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = DoubleConv(f, conv, norm, name=f"enc{i}")(x)
            skips.append(x)
        for i in reversed(range(len(self.features) - 1)):
            x = nn.ConvTranspose(
                self.features[i], (2, 2), strides=(2, 2), dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"up{i}",
            )(x)
            x = jnp.concatenate([skips[i], x], axis=-1)
            x = DoubleConv(self.features[i], conv, norm, name=f"dec{i}")(x)
        x = nn.Conv(
            self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
            name="classifier",
        )(x)
        return jnp.asarray(x, self.dtype)
