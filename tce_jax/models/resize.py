"""Bilinear resizing of feature maps and logits inside a model, without matmuls or scatters.

``jax.image.resize(x, shape, "bilinear")`` multiplies ``x`` by dense interpolation matrices at
``Precision.HIGHEST``; XLA's GPU compiler (Triton GEMM, jaxlib 0.10.2) fails on some of those
matmuls ("Couldn't find output tile sizes", e.g. the 4x upsampling of DeepLabV3+ logits to
512x1024 or 1024x2048). Gathering the two neighbours and interpolating avoids the matmul, but
differentiating a gather gives a scatter-add, which GPUs run as atomic (for bfloat16, a
compare-and-swap loop). :func:`resize_bilinear` therefore gathers in both directions: each
output row is a weighted sum of at most two input rows, and each input row of the gradient a
weighted sum of the few output rows it fed, both tables known when the model is traced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` float64 weights of 1-D linear interpolation with half-pixel
    centres and edge clamping (torch's ``interpolate(align_corners=False)``, no antialiasing):
    output ``p`` samples input position ``(p + 0.5) * in_size / out_size - 0.5``."""
    src = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    src = np.clip(src, 0.0, in_size - 1.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix


def _sparse_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nonzeros of each row of ``matrix [m, n]`` as ``(columns, weights)``, both
    ``[m, k]`` with ``k`` the most nonzeros of any row (padded with column 0, weight 0)."""
    nonzero = matrix != 0
    k = max(int(nonzero.sum(axis=1).max()), 1)
    columns = np.argsort(~nonzero, axis=1, kind="stable")[:, :k]
    return columns, np.take_along_axis(matrix, columns, axis=1)


def _apply_rows(x: jax.Array, axis: int, rows: tuple[np.ndarray, np.ndarray]) -> jax.Array:
    """``matrix @ x`` along ``axis``, with ``matrix`` given by :func:`_sparse_rows`."""
    columns, weights = rows
    shape = [1] * x.ndim
    shape[axis] = weights.shape[0]
    out = None
    for k in range(columns.shape[1]):
        w = jnp.asarray(weights[:, k].reshape(shape), x.dtype)
        term = jnp.take(x, columns[:, k], axis=axis) * w
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _resize_axis(x: jax.Array, axis: int, in_size: int, out_size: int) -> jax.Array:
    return _apply_rows(x, axis, _sparse_rows(interpolation_matrix(in_size, out_size)))


def _resize_axis_fwd(x, axis, in_size, out_size):
    return _resize_axis(x, axis, in_size, out_size), None


def _resize_axis_bwd(axis, in_size, out_size, _, g):
    # The map is linear: its gradient is the transposed matrix, applied by gathers as well.
    return (_apply_rows(g, axis, _sparse_rows(interpolation_matrix(in_size, out_size).T)),)


_resize_axis.defvjp(_resize_axis_fwd, _resize_axis_bwd)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``x [B, H, W, C]`` resized to ``[B, *size, C]``: bilinear, half-pixel centres, edge
    clamping, no antialiasing (torch's ``interpolate(mode="bilinear", align_corners=False)``;
    equal to ``jax.image.resize(..., "bilinear", antialias=False)``, and to its default when
    upsampling). Computed in ``x.dtype`` with gathers only, forward and backward."""
    for axis, out_size in zip((1, 2), size, strict=True):
        if x.shape[axis] != out_size:
            x = _resize_axis(x, axis, x.shape[axis], out_size)
    return x
