"""Cross-entropy and the imbalance baselines: class-weighted CE, softmax focal loss,
Lovász-softmax (docs/experiments.md)."""

import jax
import jax.numpy as jnp
from jax import lax

from tce_jax.losses._statistics import (
    ClassStatistics,
    _class_losses,
    _flat_pixels,
    _per_class_sum,
    _pixel_losses,
    class_statistics,
)
from tce_jax.losses._validation import (
    AxisName,
    _check_ignore_index,
    _check_inputs,
    _check_scalar,
    _check_weight_vector,
)

__all__ = [
    "CLASS_WEIGHT_SCHEMES",
    "class_balancing_weights",
    "class_image_pixels",
    "cross_entropy",
    "lovasz_softmax",
    "softmax_focal_loss",
    "weighted_cross_entropy",
    "weighted_cross_entropy_from_statistics",
]


def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Multi-class cross-entropy (MCCE): the mean pixel loss over the valid pixels.

    .. math::
      \mathrm{MCCE} = \frac{1}{|V|} \sum_{i \in V} \big(\mathrm{logsumexp}(z_i) - z_{i, y_i}\big)

    0 (with a zero gradient) when no pixel is valid. With ``axis_name`` the sums are taken over
    the global batch; parallel conventions as for :func:`tilted_ce` (``pmean`` the gradients).

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.

    Returns:
      A float32 scalar.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    z, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    return _mean_over_valid(_pixel_losses(z, safe_labels), valid, axis_name)


def _mean_over_valid(pixel: jax.Array, valid: jax.Array, axis_name) -> jax.Array:
    """The mean of the ``[N]`` pixel values over the valid pixels of the global batch; 0 (with a
    zero gradient) when there are none."""
    total = jnp.sum(jnp.where(valid, pixel, 0.0))
    count = jnp.sum(valid, dtype=jnp.int32)
    if axis_name is not None:
        total = lax.psum(total, axis_name)
        count = lax.psum(count, axis_name)
    return total / jnp.maximum(count, 1).astype(total.dtype)


# ----------------------------------------------------------------------------------------------
# Baselines: class-weighted cross-entropy, softmax focal loss, Lovász-softmax.
#
# Same conventions as tilted_ce: class axis last, float32 inside, `ignore_index` and labels
# outside [0, C) ignored, `where` mask, statistics over the global batch with `axis_name`
# (pmap/shard_map; every replica returns the global loss, `pmean` the gradients).

CLASS_WEIGHT_SCHEMES = ("inverse_frequency", "median_frequency", "enet")


def class_balancing_weights(
    class_count: jax.typing.ArrayLike,
    *,
    scheme: str,
    image_pixels: jax.typing.ArrayLike | None = None,
    enet_c: float = 1.02,
) -> jax.Array:
    r"""Class weights from pixel counts, for :func:`weighted_cross_entropy`.

    With ``n_c`` the pixels of class ``c``, ``N = sum_c n_c`` and ``p_c = n_c / N``, over the
    present classes ``P = {c: n_c > 0}``:

    * ``'inverse_frequency'``: ``w_c = 1 / p_c``;
    * ``'median_frequency'`` (Eigen & Fergus, 2015): ``f_c = n_c / M_c`` with ``M_c`` the pixels
      of the images in which ``c`` is present (``image_pixels``; ``N`` when not given),
      ``w_c = median_{c' in P} f_{c'} / f_c``;
    * ``'enet'`` (Paszke et al., 2016): ``w_c = 1 / ln(enet_c + p_c)``, bounded by
      ``1 / ln(enet_c)`` (about 50.5 for the paper's 1.02).

    Pass dataset counts to get fixed weights (then give the result to
    :func:`weighted_cross_entropy` as a vector), or let that function use the batch's counts.

    Args:
      class_count: ``[C]`` pixel counts ``n_c`` (any numeric dtype).
      scheme: one of ``'inverse_frequency'``, ``'median_frequency'``, ``'enet'``.
      image_pixels: optional ``[C]`` ``M_c`` for ``'median_frequency'``.
      enet_c: the constant of ``'enet'``, > 1.

    Returns:
      ``[C]`` float32 weights, 0 for absent classes (all 0 when no class is present).
    """
    if scheme not in CLASS_WEIGHT_SCHEMES:
        raise ValueError(
            f"scheme must be one of {CLASS_WEIGHT_SCHEMES}, got {scheme!r}; for fixed weights "
            f"pass a [C] vector to weighted_cross_entropy(class_weights=...) instead."
        )
    enet_c = _check_scalar("enet_c", enet_c, allow_traced=False, low=1.0, low_open=True)
    count = jnp.asarray(class_count, jnp.float32)
    if count.ndim != 1:
        raise ValueError(f"class_count must have shape [C], got {count.shape}.")
    present = count > 0
    total = jnp.maximum(jnp.sum(count), 1.0)
    safe_count = jnp.where(present, count, 1.0)
    if scheme == "inverse_frequency":
        weights = total / safe_count
    elif scheme == "enet":
        weights = 1.0 / jnp.log(enet_c + count / total)
    else:
        if image_pixels is None:
            support = jnp.full_like(count, total)
        else:
            support = jnp.asarray(image_pixels, jnp.float32)
            if support.shape != count.shape:
                raise ValueError(
                    f"image_pixels must have the shape of class_count, {count.shape}, got "
                    f"{support.shape}."
                )
        freq = jnp.where(present, count / jnp.where(present, jnp.maximum(support, 1.0), 1.0), 0.0)
        median = jnp.nanmedian(jnp.where(present, freq, jnp.nan))
        weights = jnp.where(present, median, 0.0) / jnp.where(present, freq, 1.0)
    return jnp.where(present, weights, 0.0)


def weighted_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    class_weights: str | jax.typing.ArrayLike = "inverse_frequency",
    enet_c: float = 1.02,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""Class-weighted cross-entropy: the ``w_{y_i}``-weighted mean of the pixel losses.

    .. math::
      \mathrm{WCE} = \frac{\sum_{i \in V} w_{y_i} l_i}{\sum_{i \in V} w_{y_i}}
                   = \frac{\sum_c w_c S_c}{\sum_c w_c n_c},
      \qquad l_i = \mathrm{logsumexp}(z_i) - z_{i, y_i},

    normalised by the total weight (the convention of PyTorch's ``CrossEntropyLoss(weight=w)``),
    so only the ratios of the weights matter. Its gradient gives class ``c`` the share
    ``w_c n_c / sum_c' w_c' n_c'`` (``aux['class_weight']``). With a string ``class_weights``
    the weights come from the **class counts of the (global) batch**
    (:func:`class_balancing_weights`; under ``axis_name`` the counts are ``psum``-med first, so
    the weights are those of the whole global batch); ``'inverse_frequency'`` then equals the
    uniform mean of the class losses,
    ``tilted_ce(..., t=0, class_weighting='uniform')``. For ``'median_frequency'`` the leading
    axis of ``labels`` indexes the images (a 1-D ``labels`` is one image). For weights from
    dataset-wide counts, compute them once with :func:`class_balancing_weights` and pass the
    ``[C]`` vector.

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      class_weights: ``'inverse_frequency'``, ``'median_frequency'``, ``'enet'`` (from the batch
        counts) or a ``[C]`` array of non-negative weights (not all zero).
      enet_c: the constant of ``'enet'``.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.
      return_aux: also return ``class_loss``, ``class_count`` and ``class_weight`` (``[C]``
        gradient shares, as in :func:`tilted_ce`).

    Returns:
      A float32 scalar (0 with a zero gradient when no pixel is valid or every valid pixel has
      weight 0), or ``(loss, aux)``.
    """
    stats = class_statistics(
        logits, labels, ignore_index=ignore_index, where=where, axis_name=axis_name
    )
    image_pixels = None
    if isinstance(class_weights, str) and class_weights == "median_frequency":
        image_pixels = class_image_pixels(logits, labels, ignore_index=ignore_index, where=where)
        if axis_name is not None:
            image_pixels = lax.psum(image_pixels, axis_name)
    loss, aux = weighted_cross_entropy_from_statistics(
        stats, class_weights=class_weights, image_pixels=image_pixels, enet_c=enet_c
    )
    return (loss, aux) if return_aux else loss


def softmax_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Softmax (multi-class) focal loss (Lin et al., 2017), the mean over the valid pixels.

    .. math::
      \mathrm{FL} = \frac{1}{|V|} \sum_{i \in V} \alpha_{y_i} (1 - p_i)^\gamma\, l_i,
      \qquad p_i = \mathrm{softmax}(z_i)_{y_i} = e^{-l_i},

    with ``1 - p_i`` evaluated as ``-expm1(-l_i)`` (exact when ``p_i`` is close to 1).
    ``gamma = 0`` without ``alpha`` is the mean pixel cross-entropy. ``alpha`` (a ``[C]``
    vector) weights the classes without renormalising (the mean stays over ``|V|``).
    With ``axis_name`` the sum and the count are those of the global batch.

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      gamma: the focusing exponent, a Python number >= 0.
      alpha: optional ``[C]`` non-negative class weights.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.

    Returns:
      A float32 scalar; 0 with a zero gradient when no pixel is valid.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    gamma = _check_scalar("gamma", gamma, allow_traced=False, low=0.0)
    alpha = None if alpha is None else _check_weight_vector("alpha", alpha, logits.shape[-1])
    z, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    pixel = _pixel_losses(z, safe_labels)
    if gamma != 0:
        q = -jnp.expm1(-pixel)  # 1 - p, >= 0
        positive = q > 0
        # The inner where keeps the gradient of q**gamma finite at q = 0 (p = 1).
        modulating = jnp.where(positive, jnp.exp(gamma * jnp.log(jnp.where(positive, q, 1.0))), 0.0)
        pixel = modulating * pixel
    if alpha is not None:
        pixel = alpha[safe_labels] * pixel
    return _mean_over_valid(pixel, valid, axis_name)


def lovasz_softmax(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    classes: str = "present",
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Lovász-softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018), over the whole batch.

    The reference ``lovasz_softmax(probas, labels, classes='present', per_image=False)``: with
    ``p = softmax(z)``, for each class ``c`` the errors ``e_i = |[y_i = c] - p_{i,c}|`` of the
    valid pixels sorted in decreasing order, ``e_{(1)} >= e_{(2)} >= ...``, and the Jaccard
    loss ``J_k = 1 - |G_c \setminus \pi_{1..k}| / |G_c \cup \pi_{1..k}|`` of the first ``k``
    sorted pixels (``G_c`` the pixels of class ``c``),

    .. math::
      \mathrm{loss}_c = \sum_k e_{(k)} (J_k - J_{k-1}), \quad J_0 = 0, \qquad
      \mathrm{loss} = \mathrm{mean}_{c \in K} \mathrm{loss}_c,

    the Lovász extension of the Jaccard loss, with ``K`` the classes present in the batch
    (``classes='present'``) or all classes (``'all'``). The batch is flattened (the reference's
    ``per_image=False``); for the per-image variant, ``jax.vmap`` this function over the images
    and take the mean. Ties among the errors do not change the value.

    The sort is not decomposable into per-device statistics: with ``axis_name`` the errors of
    all replicas are ``all_gather``-ed and every replica sorts the global batch (memory and time
    of the global batch on each device). Gradients follow the :func:`tilted_ce` convention
    (``pmean`` them).

    Args:
      logits: ``[..., C]`` unnormalised log-probabilities, any float dtype (float32 inside).
      labels: ``[...]`` integer class ids; ``ignore_index`` and labels outside ``[0, C)`` are
        ignored.
      classes: ``'present'`` or ``'all'``.
      ignore_index: the ignore label, or ``None``.
      where: optional ``[...]`` boolean mask of the pixels to include.
      axis_name: ``pmap``/``shard_map`` axis name(s) over which the batch is split.

    Returns:
      A float32 scalar in ``[0, 1]``; 0 with a zero gradient when no pixel is valid.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    if classes not in ("present", "all"):
        raise ValueError(f"classes must be 'present' or 'all', got {classes!r}.")
    num_classes = logits.shape[-1]
    z, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    probs = jax.nn.softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)), axis=-1)
    fg = (safe_labels[:, None] == jnp.arange(num_classes)) & valid[:, None]  # [N, C]
    errors = jnp.abs(fg.astype(probs.dtype) - probs)
    weights = lax.stop_gradient(
        _lovasz_weights(lax.stop_gradient(errors), fg, valid, axis_name=axis_name)
    )
    per_class = jnp.sum(jnp.where(valid[:, None], errors * weights, 0.0), axis=0)
    count = jnp.sum(fg, axis=0, dtype=jnp.int32)
    num_valid = jnp.sum(valid, dtype=jnp.int32)
    if axis_name is not None:
        per_class = lax.psum(per_class, axis_name)
        count = lax.psum(count, axis_name)
        num_valid = lax.psum(num_valid, axis_name)
    included = count > 0 if classes == "present" else jnp.full((num_classes,), num_valid > 0)
    num_included = jnp.maximum(jnp.sum(included), 1).astype(per_class.dtype)
    return jnp.sum(jnp.where(included, per_class, 0.0)) / num_included


def _lovasz_weights(errors, fg, valid, *, axis_name) -> jax.Array:
    """``[N, C]`` weight ``J_k - J_{k-1}`` of each pixel's error at its sorted position ``k``.

    ``loss_c = sum_i e_i g_i`` is the reference's ``dot(errors_sorted, lovasz_grad(fg_sorted))``
    written in pixel order, which avoids sorting the (differentiable) errors: the rank of a
    pixel comes from one sort of integer keys and two binary searches, several times faster
    on CPU than a differentiable multi-operand sort. Non-negative float32 errors order like
    their bit patterns; the lowest bit is replaced by the foreground flag, so pixels of equal
    key (a tie block of ``m`` pixels, all foreground or all background) share the block's
    weight ``(J_end - J_start) / m``, which leaves the value unchanged (their errors agree to
    one ulp). With ``axis_name`` the keys of every replica are gathered (integers, no gradient)
    and each replica ranks its own pixels in the global order.
    """
    fg_int = fg.astype(jnp.int32)
    bits = lax.bitcast_convert_type(errors.astype(jnp.float32), jnp.int32)
    # Ascending order of -key = decreasing error; invalid pixels last.
    neg_key = jnp.where(valid[:, None], -((bits & ~1) | fg_int), jnp.iinfo(jnp.int32).max).T
    all_keys = neg_key
    if axis_name is not None:
        all_keys = lax.all_gather(neg_key, axis_name, axis=1, tiled=True)
    sorted_keys = jnp.sort(all_keys, axis=1)  # [C, N_global]
    sorted_fg = jnp.where(
        sorted_keys == jnp.iinfo(jnp.int32).max, 0, (-sorted_keys) & 1
    )  # (-key) & 1 is the foreground flag
    fg_before = jnp.concatenate(
        [jnp.zeros((sorted_keys.shape[0], 1), jnp.int32), jnp.cumsum(sorted_fg, axis=1)], axis=1
    )
    gts = fg_before[:, -1:]  # [C, 1] foreground pixels of each class (global)

    # First sorted position of each pixel's key (binary search), and the end of its tie block
    # (the next position holding a different key, by a reverse running minimum).
    left = jax.vmap(lambda row, values: jnp.searchsorted(row, values, method="scan"))(
        sorted_keys, neg_key
    )
    size = sorted_keys.shape[1]
    position = lax.broadcasted_iota(jnp.int32, sorted_keys.shape, 1)
    starts = jnp.concatenate(
        [sorted_keys[:, 1:] != sorted_keys[:, :-1], jnp.ones_like(sorted_keys[:, :1], bool)],
        axis=1,
    )  # starts[:, j]: position j + 1 begins a new block (or j is the last position)
    block_end = lax.cummin(jnp.where(starts, position + 1, size), axis=1, reverse=True)
    a = jnp.take_along_axis(fg_before, left, axis=1)  # foreground pixels ranked before
    b = left - a  # background pixels ranked before
    m = jnp.maximum(jnp.take_along_axis(block_end, left, axis=1) - left, 1)

    def jaccard(a, b):
        union = gts + b
        loss = 1.0 - (gts - a).astype(jnp.float32) / jnp.maximum(union, 1).astype(jnp.float32)
        return jnp.where(union > 0, loss, 0.0)

    fg_t = fg_int.T > 0
    end = jnp.where(fg_t, jaccard(a + m, b), jaccard(a, b + m))
    weights = (end - jaccard(a, b)) / m.astype(jnp.float32)
    return weights.T.astype(errors.dtype)


# ----------------------------------------------------------------------------------------------
# Weighted cross-entropy as a function of the batch statistics: weighted_cross_entropy is
# class_statistics (and class_image_pixels) followed by this; see the same section of tilted.py.


def weighted_cross_entropy_from_statistics(
    stats: ClassStatistics,
    *,
    class_weights: str | jax.typing.ArrayLike = "inverse_frequency",
    image_pixels: jax.typing.ArrayLike | None = None,
    enet_c: float = 1.02,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`weighted_cross_entropy` with ``return_aux=True``, from the batch statistics.

    Args:
      stats: ``[C]`` statistics of the batch with ``tau = 0``.
      class_weights, enet_c: as for :func:`weighted_cross_entropy`.
      image_pixels: for ``'median_frequency'``, the ``[C]`` valid pixels of the images that
        contain each class (:func:`class_image_pixels`, summed over the parts).

    Returns:
      ``(loss, aux)`` as :func:`weighted_cross_entropy` returns them.
    """
    num_classes = stats.count.shape[-1]
    if isinstance(class_weights, str):
        if class_weights not in CLASS_WEIGHT_SCHEMES:
            raise ValueError(
                f"class_weights must be one of {CLASS_WEIGHT_SCHEMES} or a [C] array of "
                f"non-negative weights, got {class_weights!r}."
            )
        if class_weights == "median_frequency" and image_pixels is None:
            raise ValueError(
                "class_weights='median_frequency' needs image_pixels (class_image_pixels of "
                "the batch); pass it, or use another scheme."
            )
        weights = class_balancing_weights(
            stats.count, scheme=class_weights, image_pixels=image_pixels, enet_c=enet_c
        )
    else:
        weights = _check_weight_vector("class_weights", class_weights, num_classes)
    weights = jnp.where(stats.count > 0, weights, 0.0)
    mass = weights * stats.count.astype(jnp.float32)
    total = jnp.sum(mass)
    share = mass / jnp.where(total > 0, total, 1.0)
    losses = _class_losses(stats, tau=0.0)
    aux = {
        "class_loss": losses,
        "class_count": stats.count,
        "class_weight": share,
        "num_invalid": stats.num_invalid,
    }
    return jnp.sum(share * losses), aux


def class_image_pixels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    ignore_index: int | None = 255,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """``[C]`` int32: for each class, the valid pixels of the images containing it.

    The ``M_c`` of ``'median_frequency'`` (:func:`class_balancing_weights`), with the leading
    axis of ``labels`` indexing the images (a 1-D ``labels`` is one image), as in
    :func:`weighted_cross_entropy`. It adds up over images, so the value of a batch is the sum
    over its parts; ``logits`` only give the class count. No ``axis_name``: ``psum`` the result.
    """
    logits, labels, where = _check_inputs(logits, labels, where)
    ignore_index = _check_ignore_index(ignore_index)
    num_classes = logits.shape[-1]
    _, safe_labels, valid, _ = _flat_pixels(logits, labels, where, ignore_index)
    segments = jnp.where(valid, safe_labels, num_classes)
    num_images = labels.shape[0] if labels.ndim >= 2 else 1
    per_image = jax.vmap(
        lambda segments: _per_class_sum(jnp.ones_like(segments), segments, num_classes)
    )(segments.reshape(num_images, -1))  # [B, C] valid pixels of each class in each image
    pixels = jnp.sum(per_image, axis=1, keepdims=True)
    return jnp.sum(jnp.where(per_image > 0, pixels, 0), axis=0)
