r"""Exact gradient accumulation: the step of a global batch computed as k micro-batches.

`config.grad_accum_steps = k` runs the forward and backward passes of the model on k
micro-batches of the global batch, one at a time, so that activation memory is that of a
micro-batch. The loss, the gradient and the Stochastic TCE state update are those of the
one-pass step on the whole batch (up to float32 rounding).

Why not `optax.MultiSteps` (the mean of k micro-batch gradients): TCE is not a mean of
per-example losses. Its gradient is ``sum_i (w_{y_i} / n_{y_i}) grad l_i`` with tilted class
weights ``w`` and class counts ``n`` of the *whole* batch; averaging k separately tilted
micro-batch gradients optimises a different objective (each micro-batch tilted by its own
class losses, its rare classes weighted by their micro-batch counts).

How. Every objective except Lovász-softmax is ``F(S)`` of additive batch statistics ``S``
(per-class pixel counts and loss sums, `tce_jax.objectives.create_decomposition`):

1. pass 1, no gradients: the statistics ``S_j`` of every micro-batch (a loop over them),
   combined into ``S`` of the global batch (with ``tau != 0``, the exponential sums are brought
   to a common, global shift first, as `tce_jax.losses` does across devices);
2. ``loss = F(S)``, the new Stochastic TCE state (one update per global step) and the cotangent
   ``g = dF/dS`` (`jax.vjp`);
3. pass 2: a loop over the micro-batches accumulating the gradient of ``<g, S_j(params)>``.
   Since ``S = sum_j S_j``, the sum is ``dF/dparams`` exactly.

Costs: the forward pass runs twice (pass 2 recomputes it: the price of exactness), so a step
costs one more forward pass of the global batch than a plain step, for activation memory
divided by k. The micro-batches run in `lax.scan` loops, which is what bounds the memory; on
CPU, XLA runs convolutions inside loop bodies several times slower than outside (jax-ml/jax
issue 12868; measured 6-8x per step with the default U-Net), so accumulation is for
accelerators.

BatchNorm: each micro-batch normalises with its own statistics (as it would on a smaller
batch), so with BatchNorm the gradient is that of the micro-batch-normalised model, not of the
one-pass step. The running statistics kept are the mean of the k micro-batches' updates:
for the running mean that equals the update from the whole batch; the running variance misses
the spread between the micro-batch means.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tce_jax import losses, objectives

# (params, images) -> (logits, updated batch_stats)
ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]


def split_micro_batches(batch, num_micro_batches: int):
    """``[B, ...]`` leaves -> ``[k, B / k, ...]``; micro-batch j holds examples j, j + k, ...

    Strided rather than contiguous: a batch sharded over D devices in contiguous blocks (jit
    over a mesh) then has ``B / (k D)`` examples of every micro-batch on each device, so every
    device works on every micro-batch.
    """
    k = num_micro_batches

    def split(x):
        if x.shape[0] % k:
            raise ValueError(
                f"A batch of {x.shape[0]} examples does not split into grad_accum_steps={k} "
                "micro-batches; make the per-device batch a multiple of grad_accum_steps."
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _differentiable(stats: objectives.BatchStatistics):
    """The statistics through which gradients flow."""
    return stats.classes.loss_sum, stats.sums


def _replace_differentiable(stats: objectives.BatchStatistics, values):
    loss_sum, sums = values
    return stats._replace(classes=stats.classes._replace(loss_sum=loss_sum), sums=sums)


def _pairing(cotangent, values) -> jax.Array:
    """``<cotangent, values>`` over the leaves of two pytrees of the same structure."""
    products = jax.tree.map(lambda a, b: jnp.sum(a * b), cotangent, values)
    return sum(jax.tree.leaves(products), jnp.zeros((), jnp.float32))


def value_and_grad(
    apply_fn: ApplyFn,
    params,
    batch: dict,
    decomposition: objectives.Decomposition,
    tce_state: losses.StochasticTCEState,
    *,
    num_micro_batches: int,
    axis_name=None,
):
    """The loss and gradient of the objective on ``batch``, computed micro-batch by micro-batch.

    Args:
      apply_fn: ``(params, images [b, H, W, 3]) -> (logits [b, H, W, C], batch_stats)``, the
        model in training mode.
      params: the parameters to differentiate.
      batch: ``{"image": [B, H, W, 3], "label": [B, H, W]}`` (per device under ``pmap``).
      decomposition: the objective (`tce_jax.objectives.create_decomposition`).
      tce_state: the Stochastic TCE state before the step.
      num_micro_batches: k; ``B`` must be a multiple of it.
      axis_name: the ``pmap`` axis over which the batch is split, or None.

    Returns:
      ``(loss, grads, batch_stats, tce_state, aux)``: the loss of the global batch, the
      gradient of the global batch (already reduced over ``axis_name``: do not ``pmean`` it),
      the mean of the micro-batches' BatchNorm updates, the state updated once, and the
      loss function's ``aux``.
    """
    micro = split_micro_batches(batch, num_micro_batches)

    def statistics(p, micro_batch):
        logits, batch_stats = apply_fn(p, micro_batch["image"])
        return decomposition.statistics(logits, micro_batch["label"]), batch_stats

    # Pass 1: the statistics of the global batch, without gradients.
    stacked = lax.map(lambda micro_batch: statistics(params, micro_batch)[0], micro)
    total, shift = objectives.sum_statistics(stacked, axis_name)

    def finish(values):
        loss, new_state, aux = decomposition.finish(
            _replace_differentiable(total, values), tce_state
        )
        return loss, (new_state, aux)

    loss, finish_vjp, (new_state, aux) = jax.vjp(finish, _differentiable(total), has_aux=True)
    (cotangent,) = finish_vjp(jnp.ones_like(loss))

    # Pass 2: dF/dparams = sum_j <dF/dS, dS_j/dparams>, with S_j at the global shift.
    def accumulate(grads, micro_batch):
        def surrogate(p):
            part, batch_stats = statistics(p, micro_batch)
            part = part._replace(classes=objectives.at_shift(part.classes, shift))
            return _pairing(cotangent, _differentiable(part)), batch_stats

        micro_grads, batch_stats = jax.grad(surrogate, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads, micro_grads), batch_stats

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, batch_stats = lax.scan(accumulate, zeros, micro)
    if axis_name is not None:
        grads = lax.psum(grads, axis_name)  # each replica holds the part of its examples
    batch_stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), batch_stats)
    return loss, grads, batch_stats, new_state, aux
