"""SegFormer (Xie et al., NeurIPS 2021): the Mix Transformer (MiT) encoder and the all-MLP decoder.

The network is the original one (NVlabs/SegFormer ``mix_transformer.py`` and
``segformer_head.py``), which Hugging Face transformers' ``SegformerForSemanticSegmentation``
reimplements. Per stage ``k = 1..4``: an overlapping patch embedding (a 7x7 stride-4 conv for
stage 1, 3x3 stride-2 convs after it, padding ``kernel // 2``, then LayerNorm), ``depths[k]``
transformer blocks (pre-norm efficient self-attention whose keys and values come from a
``sr_ratio x sr_ratio`` strided conv + LayerNorm of the tokens; Mix-FFN = Linear -> 3x3
depthwise conv -> GELU -> Linear; stochastic depth on both residual branches), then LayerNorm.
The decoder projects each stage to ``decoder_width`` channels, upsamples them to stage 1's
resolution (1/4), concatenates them from the deepest stage to stage 1, fuses them with a 1x1
conv + BatchNorm + ReLU, applies dropout 0.1 and a 1x1 classifier; the logits are then
upsampled (bilinear, half-pixel centres) to the input resolution, as DeepLabV3+'s.

LayerNorm epsilons are the original's: 1e-6 for the blocks' and the stages' norms
(``norm_layer=partial(nn.LayerNorm, eps=1e-6)``), torch's default 1e-5 for the patch
embeddings' and the spatial reductions' norms. (transformers uses 1e-5 everywhere.)

Variable tree (``params``; ``batch_stats`` holds only ``decode_head/bn``), with the original
``state_dict`` name each leaf comes from (``tce_jax.pretrained_segformer`` converts both the
original and the transformers names)::

    backbone/patch_embed{k}/proj/{kernel,bias}     patch_embed{k}.proj.{weight,bias}
    backbone/patch_embed{k}/norm/{scale,bias}      patch_embed{k}.norm.{weight,bias}
    backbone/block{k}_{j}/norm1, norm2             block{k}.{j}.norm1, norm2
    backbone/block{k}_{j}/attn/query, key, value   block{k}.{j}.attn.q, attn.kv (fused k, v)
    backbone/block{k}_{j}/attn/sr, sr_norm         block{k}.{j}.attn.sr, attn.norm (sr > 1)
    backbone/block{k}_{j}/attn/proj                block{k}.{j}.attn.proj
    backbone/block{k}_{j}/mlp/fc1, dwconv, fc2     block{k}.{j}.mlp.fc1, mlp.dwconv.dwconv, fc2
    backbone/norm{k}                               norm{k}
    decode_head/linear_c{k}                        decode_head.linear_c{k}.proj
    decode_head/linear_fuse/kernel                 decode_head.linear_fuse.conv.weight
    decode_head/bn                                 decode_head.linear_fuse.bn
    decode_head/classifier                         decode_head.linear_pred

with ``k = 1..4`` and ``j = 0..depths[k]-1``. Dense kernels are torch's Linear weight
transposed (``[in, out]``); conv kernels are HWIO (``w.transpose(2, 3, 1, 0)``), the depthwise
conv's ``[3, 3, 1, C]`` with ``feature_group_count = C``.

Training (``train=True``) draws stochastic depth and the decoder's dropout from the
``'dropout'`` rng (``model.apply(..., rngs={"dropout": key})``; the trainer passes one).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tce_jax.models.resize import resize_bilinear
from tce_jax.models.resnet import conv_and_norm, conv_kernel_init

# The original's initialisation: truncated normal (std 0.02) Linear weights, zero biases.
dense_kernel_init = nn.initializers.truncated_normal(0.02)
BLOCK_NORM_EPS = 1e-6  # the blocks' and the stages' LayerNorms (the original's norm_layer)
TORCH_NORM_EPS = 1e-5  # the patch embeddings' and spatial reductions' LayerNorms


class _Layers:
    """Dense (over the channels of a token map: `PointwiseDense`), conv and LayerNorm partials
    with a module's ``dtype`` and ``param_dtype``."""

    def __init__(self, module: nn.Module):
        dtypes = {"dtype": module.dtype, "param_dtype": module.param_dtype}
        self.dense = functools.partial(PointwiseDense, **dtypes)
        self.conv = functools.partial(nn.Conv, kernel_init=conv_kernel_init, **dtypes)
        self.norm = functools.partial(nn.LayerNorm, **dtypes)


class OverlapPatchEmbed(nn.Module):
    """``k x k`` conv with stride ``stride`` and padding ``k // 2`` (``proj``), then LayerNorm
    (``norm``): ``[B, H, W, C_in] -> [B, H', W', features]``."""

    features: int
    kernel_size: int
    stride: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = _Layers(self)
        k, s, p = self.kernel_size, self.stride, self.kernel_size // 2
        x = layers.conv(
            self.features, (k, k), strides=(s, s), padding=((p, p), (p, p)), name="proj"
        )(x)
        return layers.norm(epsilon=TORCH_NORM_EPS, name="norm")(x)


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention over the ``H x W`` tokens whose keys and values come from the
    tokens reduced ``sr_ratio`` times in each direction (strided conv ``sr`` + ``sr_norm``).
    The softmax runs in float32."""

    num_heads: int
    sr_ratio: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = _Layers(self)
        b, h, w, c = x.shape
        head_dim = c // self.num_heads
        kv = x
        if self.sr_ratio > 1:
            r = self.sr_ratio
            kv = layers.conv(c, (r, r), strides=(r, r), padding="VALID", name="sr")(kv)
            kv = layers.norm(epsilon=TORCH_NORM_EPS, name="sr_norm")(kv)

        def heads(name, tokens):  # [B, h, w, C] -> [B, h * w, heads, head_dim]
            return layers.dense(c, name=name)(tokens).reshape(b, -1, self.num_heads, head_dim)

        q, k, v = heads("query", x), heads("key", kv), heads("value", kv)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim**-0.5)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return HeadsProjection(c, self.dtype, self.param_dtype, name="proj")(y).reshape(b, h, w, c)


class PointwiseDense(nn.Module):
    """A ``Dense`` (its ``kernel [C_in, features]`` and ``bias``, its numbers) applied to a token
    map ``[B, H, W, C_in]`` as a 1x1 convolution: every per-token linear layer of SegFormer (the
    attention's query/key/value, Mix-FFN's fc1/fc2, the decoder's linear_c*). Why: as matmuls
    fused with what produces them, XLA's GPU compiler (jaxlib 0.10.2, A100 target, Triton GEMM)
    found no tiling for them at some token counts (ADE20K's whole-image evaluation at 704x704:
    "Couldn't find output tile sizes"); a convolution is not a Triton GEMM."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", dense_kernel_init, (x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(
            x, kernel[None, None], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + bias


class HeadsProjection(nn.Module):
    """The attention's output projection ``proj``: ``[B, N, heads, head_dim] -> [B, N, C]``,
    with a ``Dense``'s parameters (``kernel [heads * head_dim, C]``, ``bias [C]``) and its
    numbers, contracted over ``(heads, head_dim)`` without flattening them first. Why: XLA's GPU
    compiler (jaxlib 0.10.2, Triton GEMM) found no tiling for the flattened form's matmul fused
    with the attention at some token counts (ADE20K's whole-image evaluation at 704x704:
    "Couldn't find output tile sizes"); this form compiles."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        heads, head_dim = y.shape[-2:]
        kernel = self.param(
            "kernel", dense_kernel_init, (heads * head_dim, self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        y, kernel, bias = nn.dtypes.promote_dtype(y, kernel, bias, dtype=self.dtype)
        kernel = kernel.reshape(heads, head_dim, self.features)
        return jnp.einsum("bqhd,hdc->bqc", y, kernel) + bias


class MixFFN(nn.Module):
    """Linear (``fc1``, ``mlp_ratio`` x wider) -> 3x3 depthwise conv (``dwconv``) -> GELU
    (exact, as torch's ``nn.GELU()``) -> Linear (``fc2``)."""

    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = _Layers(self)
        hidden = x.shape[-1] * self.mlp_ratio
        y = layers.dense(hidden, name="fc1")(x)
        # The original initialises it with fan_out = 3 * 3 * C / groups = 9.
        y = layers.conv(
            hidden,
            (3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=hidden,
            kernel_init=nn.initializers.normal(math.sqrt(2.0 / 9)),
            name="dwconv",
        )(y)
        y = nn.gelu(y, approximate=False)
        return layers.dense(x.shape[-1], name="fc2")(y)


class MiTBlock(nn.Module):
    """``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``.

    Stochastic depth drops a whole residual branch per example with probability
    ``drop_path`` and rescales the kept ones by ``1 / (1 - drop_path)``; only when ``train``.
    """

    num_heads: int
    sr_ratio: int
    mlp_ratio: int = 4
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dtypes = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        norm = functools.partial(nn.LayerNorm, epsilon=BLOCK_NORM_EPS, **dtypes)
        # One draw per example, broadcast over H, W and C: the whole branch is dropped.
        drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)
        y = EfficientSelfAttention(self.num_heads, self.sr_ratio, name="attn", **dtypes)(
            norm(name="norm1")(x)
        )
        x = x + drop_path(y)
        y = MixFFN(self.mlp_ratio, name="mlp", **dtypes)(norm(name="norm2")(x))
        return x + drop_path(y)


class MixTransformer(nn.Module):
    """The MiT encoder: ``__call__(x, *, train)`` maps ``x: [B, H, W, 3]`` to the four stage
    outputs ``[B, ~H/s, ~W/s, widths[k]]`` for ``s = 4, 8, 16, 32`` (sizes as torch's convs
    give them: ``floor((n + 2p - k) / stride) + 1``).

    Attributes:
      depths: blocks per stage (B0: ``(2, 2, 2, 2)``).
      widths: channels per stage (B0: ``(32, 64, 160, 256)``).
      num_heads: attention heads per stage.
      sr_ratios: spatial reduction of keys and values per stage.
      mlp_ratio: Mix-FFN expansion.
      drop_path_rate: stochastic depth of the last block; block ``i`` of ``n`` gets
        ``drop_path_rate * i / (n - 1)``.
    """

    depths: Sequence[int]
    widths: Sequence[int]
    num_heads: Sequence[int] = (1, 2, 5, 8)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
        dtypes = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        inputs = x
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        outputs = []
        for stage, (depth, width) in enumerate(zip(self.depths, self.widths, strict=True)):
            k = stage + 1
            kernel, stride = (7, 4) if stage == 0 else (3, 2)
            x = OverlapPatchEmbed(width, kernel, stride, name=f"patch_embed{k}", **dtypes)(x)
            if min(x.shape[1:3]) < self.sr_ratios[stage]:
                raise ValueError(
                    f"SegFormer input {tuple(inputs.shape[1:3])} is too small: stage {k} is "
                    f"{tuple(x.shape[1:3])}, less than its spatial reduction "
                    f"{self.sr_ratios[stage]}; use inputs of at least 29 x 29."
                )
            for j in range(depth):
                x = MiTBlock(
                    self.num_heads[stage],
                    self.sr_ratios[stage],
                    self.mlp_ratio,
                    rates[sum(self.depths[:stage]) + j],
                    name=f"block{k}_{j}",
                    **dtypes,
                )(x, train=train)
            x = nn.LayerNorm(epsilon=BLOCK_NORM_EPS, name=f"norm{k}", **dtypes)(x)
            outputs.append(x)
        return outputs


class SegFormerHead(nn.Module):
    """The all-MLP decoder: ``__call__(features, *, train)`` maps the four stage outputs to
    logits ``[B, H/4, W/4, num_classes]`` (at stage 1's resolution)."""

    num_classes: int
    width: int
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], *, train: bool) -> jax.Array:
        conv, norm = conv_and_norm(self, train=train)
        layers = _Layers(self)
        size = features[0].shape[1:3]
        projected = [
            resize_bilinear(layers.dense(self.width, name=f"linear_c{k + 1}")(f), size)
            for k, f in enumerate(features)
        ]
        # The original concatenates [c4, c3, c2, c1]: the deepest stage first.
        y = jnp.concatenate(projected[::-1], axis=-1)
        y = nn.relu(norm(name="bn")(conv(self.width, (1, 1), name="linear_fuse")(y)))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        # Flax's default (LeCun normal) init, as DeepLabV3+'s classifier: He init with fan_out =
        # num_classes would start from logits of standard deviation ~7.
        return nn.Conv(
            self.num_classes,
            (1, 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(y)


class SegFormer(nn.Module):
    """SegFormer: ``__call__(x, *, train)`` maps images ``x: [B, H, W, 3]`` (normalised by the
    caller) to logits ``[B, H, W, num_classes]`` in ``dtype``.

    Attributes:
      num_classes: number of output classes.
      depths, widths: the encoder's blocks and channels per stage (``MixTransformer``).
      decoder_width: the decoder's channels (256 for B0/B1, 768 for B2-B5).
      num_heads, sr_ratios, mlp_ratio, drop_path_rate: see ``MixTransformer``.
      dropout_rate: dropout before the classifier.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); the logits come back in it.
      param_dtype: parameter dtype.
      bn_axis_name: ``axis_name`` of the decoder's ``nn.BatchNorm`` (global statistics under
        ``pmap``/``shard_map``; leave ``None`` under ``jit`` with sharded global arrays).
    """

    num_classes: int
    depths: Sequence[int]
    widths: Sequence[int]
    decoder_width: int
    num_heads: Sequence[int] = (1, 2, 5, 8)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    # The decode head (mmsegmentation's `decode_head`): see models.head_modules.
    head_modules: ClassVar[tuple[str, ...]] = ("decode_head",)

    @nn.nowrap
    def encoder(self, **kwargs) -> MixTransformer:
        """This model's encoder; unbound, a standalone module that takes the ``backbone``
        variables (``model.encoder().apply({"params": params["backbone"]}, x, train=False)``)."""
        return MixTransformer(
            self.depths,
            self.widths,
            self.num_heads,
            self.sr_ratios,
            self.mlp_ratio,
            self.drop_path_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **kwargs,
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        features = self.encoder(name="backbone")(x, train=train)
        y = SegFormerHead(
            self.num_classes,
            self.decoder_width,
            self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            bn_axis_name=self.bn_axis_name,
            name="decode_head",
        )(features, train=train)
        y = resize_bilinear(y, x.shape[1:3])
        return jnp.asarray(y, self.dtype)


_WIDE = (64, 128, 320, 512)
# The published variants (NVlabs mix_transformer.py mit_b0..mit_b5; decoder embed_dim of the
# released configs): name -> (depths, widths, decoder_width).
VARIANTS = {
    "b0": ((2, 2, 2, 2), (32, 64, 160, 256), 256),
    "b1": ((2, 2, 2, 2), _WIDE, 256),
    "b2": ((3, 4, 6, 3), _WIDE, 768),
    "b3": ((3, 4, 18, 3), _WIDE, 768),
    "b4": ((3, 8, 27, 3), _WIDE, 768),
    "b5": ((3, 6, 40, 3), _WIDE, 768),
}
SEGFORMERS = {
    f"segformer_{size}": functools.partial(
        SegFormer, depths=depths, widths=widths, decoder_width=decoder_width
    )
    for size, (depths, widths, decoder_width) in VARIANTS.items()
}
