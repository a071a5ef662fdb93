"""Checks of the losses' arguments, at trace time: one clear error naming the argument."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ClassWeighting = str | jax.typing.ArrayLike
AxisName = Any  # a hashable axis name or a tuple of them, as for jax.lax.psum

_WEIGHTINGS = ("frequency", "uniform")

# ----------------------------------------------------------------------------------------------
# Validation (trace time).


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_scalar(
    name: str,
    value,
    *,
    allow_traced: bool = True,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
):
    """Checks a scalar hyper-parameter; returns a Python float, or the tracer unchanged."""
    if _is_traced(value):
        if not allow_traced:
            raise TypeError(
                f"{name} must be a concrete number (it selects which statistics are computed); "
                f"got a traced value. Pass a Python float, or mark {name} static in jax.jit."
            )
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
        return value
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(
            f"{name} must be a scalar, got shape {arr.shape}; for per-example values use jax.vmap."
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value)}.")
    v = float(arr)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}.")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and v > high
    if too_low or too_high:
        left = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {left}{low}, {high}], got {v}.")
    return v


def _check_ignore_index(ignore_index) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
        raise TypeError(
            f"ignore_index must be a Python int or None, got {ignore_index!r} "
            f"of type {type(ignore_index)}."
        )
    if not -(2**31) <= int(ignore_index) < 2**31:
        raise ValueError(f"ignore_index must fit in int32, got {ignore_index}.")
    return int(ignore_index)


def _check_inputs(logits, labels, where):
    """Checks dtypes and shapes; returns the inputs as jax arrays."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a class axis (the last one) of size >= 1, got shape "
            f"{logits.shape}; for binary problems use two logits per pixel."
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"logits must be floating point (float32, bfloat16, ...), got {logits.dtype}; "
            f"convert them with logits.astype(jnp.float32)."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class ids, got dtype {labels.dtype}; "
            f"pass them as e.g. labels.astype(jnp.int32) (one-hot labels are not supported)."
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {logits.shape[:-1]} (class axis last, "
            f"no class axis in labels), got {labels.shape}."
        )
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(
                f"where must be a boolean mask, got dtype {where.dtype}; use e.g. where=mask > 0."
            )
        if where.shape != labels.shape:
            raise ValueError(
                f"where must have the shape of labels, {labels.shape}, got {where.shape}."
            )
    return logits, labels, where


def _check_weight_vector(name: str, vec, num_classes: int) -> jax.Array:
    """A ``[C]`` vector of non-negative, finite weights, not all zero, as float32."""
    if not (_is_traced(vec) or isinstance(vec, jax.Array)):
        vec = np.asarray(vec)
        if not (np.issubdtype(vec.dtype, np.number) and vec.dtype != bool):
            raise TypeError(f"{name} must be a [C] array of class weights, got {vec!r}.")
    if jnp.shape(vec) != (num_classes,):
        raise ValueError(
            f"{name} has shape {jnp.shape(vec)} but the logits have C = {num_classes} classes; "
            f"pass one non-negative weight per class, shape ({num_classes},)."
        )
    if not _is_traced(vec):
        host = np.asarray(vec, dtype=np.float64)
        if not np.all(np.isfinite(host)) or np.any(host < 0) or not np.any(host > 0):
            raise ValueError(f"{name} must be finite, non-negative and not all zero, got {host}.")
    return jnp.asarray(vec, jnp.float32)


def _check_class_weighting(class_weighting, num_classes: int):
    """Returns 'frequency', 'uniform' or a float32 [C] vector."""
    if isinstance(class_weighting, str):
        if class_weighting not in _WEIGHTINGS:
            raise ValueError(
                f"class_weighting must be 'frequency', 'uniform' or a [C] array of non-negative "
                f"class weights, got {class_weighting!r}."
            )
        return class_weighting
    return _check_weight_vector("class_weighting", class_weighting, num_classes)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
