"""Whole-image and sliding-window inference, with predictions resized to the label resolution.

Pure JAX, for any ``apply_fn(images [B, h, w, 3]) -> logits [B, h, w, C]``. Evaluation batches
hold images of different sizes padded into one canvas (bottom/right), so every function takes
each example's valid size as an array and compiles once per canvas:

* :func:`whole_image_logits`: the model on the whole canvas.
* :func:`sliding_window_logits`: windows of a fixed size with a fixed stride, placed over each
  example's valid region as mmsegmentation's ``slide`` mode does (the last window of a row or
  column is moved back to end at the image border); overlapping logits are averaged.
* :func:`resize_bilinear`: bilinear resizing with half-pixel centres and edge clamping, i.e.
  torch's ``interpolate(mode="bilinear", align_corners=False)`` without antialiasing, used by
  the field to bring logits back to the label resolution before the argmax.
* :func:`predict_labels`: all of it, returning int32 label predictions at label resolution,
  optionally with test-time augmentation (horizontal flip and several scales, see
  :func:`tta_probabilities`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

ApplyFn = Callable[[jax.Array], jax.Array]


def whole_image_logits(apply_fn: ApplyFn, images: jax.Array) -> jax.Array:
    """float32 ``[B, H, W, C]`` logits of the whole canvas ``images [B, H, W, 3]``."""
    return apply_fn(images).astype(jnp.float32)


def _num_windows(size, window: int, stride: int):
    """Windows per axis in mmsegmentation's ``slide`` mode: ``ceil((size - window) / stride) + 1``
    (1 when the image is no larger than the window), for int arrays."""
    return jnp.maximum(size - window + stride - 1, 0) // stride + 1


def sliding_window_logits(
    apply_fn: ApplyFn,
    images: jax.Array,
    *,
    window: tuple[int, int],
    stride: tuple[int, int],
    valid_size: jax.Array | None = None,
) -> jax.Array:
    """Sliding-window logits, averaged where windows overlap.

    Along each axis, window ``i`` of an example with valid size ``n`` starts at
    ``max(min(i * stride, n - window), 0)`` for ``i < ceil((n - window) / stride) + 1``; the
    model sees ``window``-sized crops of the canvas (zero padding beyond it when the canvas is
    smaller than a window). The windows run one after another (``lax.scan``), each on the
    whole batch, so memory does not grow with their number.

    Args:
      apply_fn: ``images [B, wh, ww, 3] -> logits [B, wh, ww, C]``.
      images: ``[B, H, W, 3]`` canvas.
      window: ``(wh, ww)`` window size.
      stride: ``(sh, sw)`` stride, positive.
      valid_size: int ``[B, 2]`` ``(height, width)`` of each example's image in the canvas
        (top-left aligned); default: the whole canvas.

    Returns:
      float32 ``[B, H, W, C]``; zero where no window covered a pixel (outside the valid region).
    """
    batch, height, width, channels = images.shape
    (wh, ww), (sh, sw) = window, stride
    if min(wh, ww, sh, sw) <= 0:
        raise ValueError(f"window {window} and stride {stride} must be positive.")
    pad_h, pad_w = max(wh - height, 0), max(ww - width, 0)
    if pad_h or pad_w:
        images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    if valid_size is None:
        valid_size = jnp.broadcast_to(jnp.array([height, width], jnp.int32), (batch, 2))
    valid_size = jnp.asarray(valid_size, jnp.int32)
    h, w = valid_size[:, 0], valid_size[:, 1]
    # Static window counts for the canvas (Python ints: no tracing).
    rows = max(height - wh + sh - 1, 0) // sh + 1
    cols = max(width - ww + sw - 1, 0) // sw + 1
    crop_shape = jax.ShapeDtypeStruct((batch, wh, ww, channels), images.dtype)
    num_classes = jax.eval_shape(apply_fn, crop_shape).shape[-1]

    crop = jax.vmap(lambda x, y0, x0: jax.lax.dynamic_slice(x, (y0, x0, 0), (wh, ww, channels)))

    def add(canvas, values, y0, x0):
        current = jax.lax.dynamic_slice(canvas, (y0, x0, 0), values.shape)
        return jax.lax.dynamic_update_slice(canvas, current + values, (y0, x0, 0))

    add = jax.vmap(add)

    def body(carry, k):
        sums, counts = carry
        i, j = k // cols, k % cols
        y0 = jnp.maximum(jnp.minimum(i * sh, h - wh), 0)
        x0 = jnp.maximum(jnp.minimum(j * sw, w - ww), 0)
        active = (i < _num_windows(h, wh, sh)) & (j < _num_windows(w, ww, sw))
        weight = active.astype(jnp.float32)[:, None, None, None]
        logits = apply_fn(crop(images, y0, x0)).astype(jnp.float32) * weight
        sums = add(sums, logits, y0, x0)
        counts = add(counts, jnp.broadcast_to(weight, (batch, wh, ww, 1)), y0, x0)
        return (sums, counts), None

    padded = images.shape[1:3]
    init = (
        jnp.zeros((batch, *padded, num_classes), jnp.float32),
        jnp.zeros((batch, *padded, 1), jnp.float32),
    )
    (sums, counts), _ = jax.lax.scan(body, init, jnp.arange(rows * cols))
    return (sums / jnp.maximum(counts, 1.0))[:, :height, :width]


def _source_indices(out_len: int, in_size: jax.Array, out_size: jax.Array):
    """Per example: the two source indices and the weight of the second, for each output
    position along one axis (torch's ``area_pixel_compute_source_index``)."""
    in_f = in_size.astype(jnp.float32)[:, None]
    scale = in_f / jnp.maximum(out_size, 1).astype(jnp.float32)[:, None]
    src = (jnp.arange(out_len, dtype=jnp.float32)[None, :] + 0.5) * scale - 0.5
    src = jnp.clip(src, 0.0, in_f - 1.0)
    i0 = jnp.floor(src)
    frac = src - i0
    i0 = i0.astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, in_size[:, None] - 1)
    return i0, i1, frac


def resize_bilinear(
    x: jax.Array, out_shape: tuple[int, int], in_size: jax.Array, out_size: jax.Array
) -> jax.Array:
    """Bilinear resize of each example's valid region to its own output size.

    Example ``b`` of ``x [B, H, W, C]`` has its data in ``x[b, :in_size[b, 0], :in_size[b, 1]]``;
    it is resized to ``out_size[b]`` and written top-left into an output of the static shape
    ``[B, *out_shape, C]`` (positions beyond ``out_size[b]`` repeat the edge; mask them).
    Half-pixel centres, source positions clamped to the valid region, no antialiasing:
    torch's ``F.interpolate(x, size, mode="bilinear", align_corners=False)``.

    Args:
      x: ``[B, H, W, C]`` float.
      out_shape: static ``(Ho, Wo)``.
      in_size: int ``[B, 2]``, ``1 <= in_size <= (H, W)``.
      out_size: int ``[B, 2]``, ``1 <= out_size <= out_shape``.
    """
    in_size = jnp.asarray(in_size, jnp.int32)
    out_size = jnp.asarray(out_size, jnp.int32)
    r0, r1, fr = _source_indices(out_shape[0], in_size[:, 0], out_size[:, 0])
    c0, c1, fc = _source_indices(out_shape[1], in_size[:, 1], out_size[:, 1])
    take_rows = jax.vmap(lambda img, idx: jnp.take(img, idx, axis=0))
    take_cols = jax.vmap(lambda img, idx: jnp.take(img, idx, axis=1))
    fr = fr[:, :, None, None].astype(x.dtype)
    fc = fc[:, None, :, None].astype(x.dtype)
    y = take_rows(x, r0) * (1 - fr) + take_rows(x, r1) * fr
    return take_cols(y, c0) * (1 - fc) + take_cols(y, c1) * fc


def _logits(apply_fn, images, image_size, mode, window, stride) -> jax.Array:
    """Whole-image or sliding-window logits of the canvas (see :func:`predict_labels`)."""
    if mode == "whole":
        return whole_image_logits(apply_fn, images)
    if mode == "sliding":
        if window is None or stride is None:
            raise ValueError("mode='sliding' needs window and stride.")
        return sliding_window_logits(
            apply_fn, images, window=window, stride=stride, valid_size=image_size
        )
    raise ValueError(f"Unknown inference mode {mode!r}; use 'whole' or 'sliding'.")


def _sizes(batch, canvas, label_shape, image_size, label_size, mask):
    """The optional per-example sizes and mask of :func:`predict_labels`, with defaults."""
    full = jnp.broadcast_to(jnp.array(canvas, jnp.int32), (batch, 2))
    image_size = full if image_size is None else jnp.asarray(image_size, jnp.int32)
    label_size = (
        jnp.broadcast_to(jnp.array(label_shape, jnp.int32), (batch, 2))
        if label_size is None
        else jnp.asarray(label_size, jnp.int32)
    )
    mask = jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask, bool)
    return image_size, label_size, mask


def flip_valid_region(x: jax.Array, width: jax.Array) -> jax.Array:
    """Each example of ``x [B, H, W, ...]`` mirrored left-right within its valid columns
    ``[0, width[b])`` (top-left aligned in the canvas); columns beyond stay where they are.
    Its own inverse."""
    cols = jnp.arange(x.shape[2])
    width = jnp.asarray(width, jnp.int32)[:, None]
    index = jnp.where(cols[None, :] < width, width - 1 - cols[None, :], cols[None, :])
    return jax.vmap(lambda img, idx: jnp.take(img, idx, axis=1))(x, index)


# Scaled canvases are padded (bottom/right) to a multiple of this, as evaluation canvases of
# images of different sizes are, so that models with strided stages accept them.
SCALED_CANVAS_MULTIPLE = 32


def scale_images(images: jax.Array, image_size: jax.Array, scale: float):
    """Each example's valid region bilinearly resized by ``scale`` (mmsegmentation's aug-test
    ``Resize``): to ``max(round(size * scale), 1)``, top-left in a canvas of
    ``round(canvas * scale)`` rounded up to a multiple of 32, zero (the normalised mean colour)
    beyond. Returns the scaled canvas and the scaled sizes (int32 ``[B, 2]``)."""
    if scale == 1.0:
        return images, image_size
    size = jnp.maximum(jnp.round(image_size.astype(jnp.float32) * scale), 1).astype(jnp.int32)
    step = SCALED_CANVAS_MULTIPLE
    canvas = tuple(-(-max(round(n * scale), 1) // step) * step for n in images.shape[1:3])
    scaled = resize_bilinear(images, canvas, image_size, size)
    rows = jnp.arange(canvas[0])[None, :, None] < size[:, 0, None, None]
    cols = jnp.arange(canvas[1])[None, None, :] < size[:, 1, None, None]
    return jnp.where((rows & cols)[..., None], scaled, 0).astype(images.dtype), size


def _augmented_logits(apply_fn, images, image_size, *, flip, scales, mode, window, stride):
    """[(logits of the scaled (and flipped back) canvas, valid size)] for every augmentation:
    each scale, unflipped then (with ``flip``) flipped."""
    outputs = []
    for scale in scales:
        scaled, size = scale_images(images, image_size, float(scale))
        for flipped in (False, True) if flip else (False,):
            x = flip_valid_region(scaled, size[:, 1]) if flipped else scaled
            logits = _logits(apply_fn, x, size, mode, window, stride)
            if flipped:
                logits = flip_valid_region(logits, size[:, 1])
            outputs.append((logits, size))
    return outputs


def _mean_probabilities(augmented, label_shape, label_size):
    """One example's mean softmax probabilities ``[*label_shape, C]`` over its augmentations
    (each ``(logits [h, w, C], valid size [2])``), each resized to ``label_size`` first."""
    total = 0.0
    for logits, size in augmented:
        resized = resize_bilinear(logits[None], tuple(label_shape), size[None], label_size[None])
        total = total + jax.nn.softmax(resized[0], axis=-1)
    return total / len(augmented)


def tta_probabilities(
    apply_fn: ApplyFn,
    images: jax.Array,
    *,
    label_shape: tuple[int, int],
    image_size: jax.Array | None = None,
    label_size: jax.Array | None = None,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> jax.Array:
    """float32 ``[B, *label_shape, C]`` class probabilities under test-time augmentation.

    mmsegmentation's aug-test (``SegTTAModel.merge_preds``; ``EncoderDecoder.aug_test`` before
    it): for each scale in ``scales`` and, with ``flip``, each of the image and its mirror
    image, the image's valid region is bilinearly resized by the scale
    (:func:`scale_images`), the model runs on it (``mode`` whole or sliding, windows of the
    same size as without scaling), its logits are flipped back, bilinearly resized to the label
    size and turned into softmax probabilities; the result is the mean of those probabilities
    (probabilities, not logits, are averaged). Arguments as in :func:`predict_labels`.
    """
    batch = images.shape[0]
    image_size, label_size, _ = _sizes(
        batch, images.shape[1:3], label_shape, image_size, label_size, None
    )
    augmented = _augmented_logits(
        apply_fn, images, image_size, flip=flip, scales=scales, mode=mode, window=window,
        stride=stride,
    )  # fmt: skip
    one = jax.vmap(lambda aug, dst: _mean_probabilities(aug, label_shape, dst))
    return one(augmented, label_size)


def predict_labels(
    apply_fn: ApplyFn,
    images: jax.Array,
    *,
    label_shape: tuple[int, int],
    image_size: jax.Array | None = None,
    label_size: jax.Array | None = None,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    mask: jax.Array | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> jax.Array:
    """int32 ``[B, *label_shape]`` predicted train ids at the label resolution.

    Logits of the canvas (``mode`` ``"whole"`` or ``"sliding"``), each example's valid region
    (``image_size``) bilinearly resized to its label size (``label_size``), then argmax. The
    resize runs one example at a time (``lax.map``), so only one ``[*label_shape, C]`` logit
    map is alive at once, and is skipped for examples whose ``mask`` (bool ``[B]``, optional)
    is False (padding of the last batch; their predictions are 0). When the canvas already has
    the label shape and no sizes are given, the logits are used as they are.

    With ``flip`` or ``scales`` other than ``(1.0,)``: the argmax of the test-time augmented
    probabilities of :func:`tta_probabilities`.
    """
    scales = tuple(float(s) for s in scales)
    if flip or scales != (1.0,):
        return _predict_augmented(
            apply_fn, images, label_shape=label_shape, image_size=image_size,
            label_size=label_size, mode=mode, window=window, stride=stride, mask=mask,
            flip=flip, scales=scales,
        )  # fmt: skip
    logits = _logits(apply_fn, images, image_size, mode, window, stride)
    batch, height, width = logits.shape[:3]
    if (height, width) == tuple(label_shape) and image_size is None and label_size is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    image_size, label_size, mask = _sizes(
        batch, (height, width), label_shape, image_size, label_size, mask
    )

    def one(args):
        x, src, dst, valid = args

        def predict():
            y = resize_bilinear(x[None], tuple(label_shape), src[None], dst[None])
            return jnp.argmax(y[0], axis=-1).astype(jnp.int32)

        return jax.lax.cond(valid, predict, lambda: jnp.zeros(label_shape, jnp.int32))

    return jax.lax.map(one, (logits, image_size, label_size, mask))


def _predict_augmented(apply_fn, images, *, label_shape, image_size, label_size, mask, **kw):
    """:func:`predict_labels` with test-time augmentation: the probabilities of one example
    at a time (``lax.map``), skipped where ``mask`` is False."""
    image_size, label_size, mask = _sizes(
        images.shape[0], images.shape[1:3], label_shape, image_size, label_size, mask
    )
    augmented = _augmented_logits(apply_fn, images, image_size, **kw)

    def one(args):
        aug, dst, valid = args

        def predict():
            probs = _mean_probabilities(aug, label_shape, dst)
            return jnp.argmax(probs, axis=-1).astype(jnp.int32)

        return jax.lax.cond(valid, predict, lambda: jnp.zeros(label_shape, jnp.int32))

    return jax.lax.map(one, (augmented, label_size, mask))
