"""ResNet-50/101 backbones (torchvision layout) with dilation for output stride 8 or 16.

The network is torchvision's ``resnet50`` / ``resnet101`` without ``avgpool`` and ``fc``
("ResNet v1.5": the stride of a bottleneck sits on its 3x3 conv), with the same padding
arithmetic, so feature-map sizes equal torchvision's for any input size. For output stride 16
(8) the stride of the last stage (last two stages) is replaced by dilation exactly as
``torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True])``
(``[False, True, True]``) does: the first block of a dilated stage keeps the previous dilation,
the other blocks use the new one.

Variable tree (``params`` and ``batch_stats``), and the torchvision ``state_dict`` key each
leaf comes from (for converting ImageNet weights: a rename and a transpose)::

    conv_init/kernel                    conv1.weight
    bn_init/{scale,bias}                bn1.{weight,bias}
    bn_init/{mean,var}  (batch_stats)   bn1.{running_mean,running_var}
    layer{s}_{b}/conv{k}/kernel         layer{s}.{b}.conv{k}.weight          k = 1, 2, 3
    layer{s}_{b}/bn{k}/...              layer{s}.{b}.bn{k}.*
    layer{s}_{b}/downsample_conv/kernel layer{s}.{b}.downsample.0.weight    (b = 0 only)
    layer{s}_{b}/downsample_bn/...      layer{s}.{b}.downsample.1.*

with stages ``s = 1..4`` and blocks ``b = 0..n_s-1``. Conv kernels are HWIO: torch's OIHW
weight ``w`` becomes ``w.transpose(2, 3, 1, 0)``. BatchNorm ``weight`` -> ``scale``;
``num_batches_tracked`` has no counterpart. No conv has a bias.

Inputs are float NHWC images, normalised by the caller (ImageNet mean/std for pretrained
weights).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any

# He initialisation (fan_out, ReLU gain), as torchvision initialises its ResNet convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_and_norm(module: nn.Module, *, train: bool, **conv_kwargs):
    """The bias-free conv and the BatchNorm every model here uses, as partials.

    Both take the module's `dtype` / `param_dtype`; BatchNorm (momentum 0.9, eps 1e-5, as
    torchvision) uses running statistics unless `train`, and the module's `bn_axis_name` so
    that its statistics are global under `pmap`.
    """
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=module.dtype, param_dtype=module.param_dtype,
        kernel_init=conv_kernel_init, **conv_kwargs,
    )
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
        dtype=module.dtype, param_dtype=module.param_dtype, axis_name=module.bn_axis_name,
    )
    return conv, norm


def _pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric explicit padding, as torch's ``padding=p`` (XLA 'SAME' pads stride-2 convs
    asymmetrically, which would shift every feature map by half a pixel vs torchvision)."""
    return ((p, p), (p, p))


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck``: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), plus shortcut.

    Attributes:
      planes: width of the 1x1/3x3 convs; the block outputs ``4 * planes`` channels.
      conv: ``nn.Conv`` partial (dtype, init, no bias).
      norm: ``nn.BatchNorm`` partial (train mode, axis name, ...).
      strides: stride of the 3x3 conv and of the projection shortcut.
      dilation: dilation (and padding) of the 3x3 conv.
      downsample: whether the shortcut is a 1x1 conv + BN projection.
      zero_init_residual: initialise ``bn3``'s scale to 0 (off by default, as in torchvision).
    """

    planes: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    dilation: int = 1
    downsample: bool = False
    zero_init_residual: bool = False

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s, d = self.strides, self.dilation
        y = self.conv(self.planes, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(
            self.planes, (3, 3), strides=(s, s), padding=_pad(d), kernel_dilation=(d, d),
            name="conv2",
        )(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.planes * self.expansion, (1, 1), name="conv3")(y)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn3")(y)

        shortcut = x
        if self.downsample:
            shortcut = self.conv(
                self.planes * self.expansion, (1, 1), strides=(s, s), name="downsample_conv"
            )(x)
            shortcut = self.norm(name="downsample_bn")(shortcut)
        return nn.relu(shortcut + y)


class ResNet(nn.Module):
    """Dilated ResNet backbone (no pooling head, no classifier).

    ``__call__(x, *, train)`` maps images ``x: [B, H, W, 3]`` to ``(low_level, high_level)``:
    the output of stage 1 (``[B, ~H/4, ~W/4, 256]``) and of stage 4
    (``[B, ~H/os, ~W/os, 2048]``, ``os = output_stride``), both in ``dtype``.
    Sizes round up like torchvision's (``ceil`` at every stride-2 layer).

    Attributes:
      stage_sizes: bottleneck blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      output_stride: 32 (plain ResNet), 16 (dilate stage 4) or 8 (dilate stages 3 and 4).
      num_filters: width of the stem and of stage 1's bottlenecks (64 for ResNet-50/101).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
      param_dtype: parameter dtype.
      bn_axis_name: passed to every ``nn.BatchNorm`` as ``axis_name``: the ``pmap`` /
        ``shard_map`` axis over which batch statistics are averaged (global BatchNorm).
        Leave ``None`` under ``jit`` with sharded global arrays (statistics are global there).
      zero_init_residual: zero-initialise the last BN scale of every block.
    """

    stage_sizes: Sequence[int]
    output_stride: int = 32
    num_filters: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}.")
        conv, norm = conv_and_norm(self, train=train, padding="VALID")

        x = conv(self.num_filters, (7, 7), strides=(2, 2), padding=_pad(3), name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        # max_pool pads with -inf, like torch's MaxPool2d(3, 2, padding=1).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(1))

        stride_so_far, dilation = 4, 1
        low_level = x
        for i, num_blocks in enumerate(self.stage_sizes):
            stride = 1 if i == 0 else 2
            previous_dilation = dilation
            if stride > 1 and stride_so_far >= self.output_stride:
                dilation *= stride  # torchvision's replace_stride_with_dilation
                stride = 1
            else:
                stride_so_far *= stride
            planes = self.num_filters * 2**i
            for j in range(num_blocks):
                x = Bottleneck(
                    planes,
                    conv=conv,
                    norm=norm,
                    strides=stride if j == 0 else 1,
                    dilation=previous_dilation if j == 0 else dilation,
                    downsample=j == 0
                    and (stride != 1 or x.shape[-1] != planes * Bottleneck.expansion),
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{i + 1}_{j}",
                )(x)
            if i == 0:
                low_level = x
        return low_level, x


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
