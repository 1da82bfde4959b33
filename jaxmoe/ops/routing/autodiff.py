"""The routing weights' derivative: the kernel's weights as values, the derivative of their
recomputation at the chosen ids (ids are constants)."""

from __future__ import annotations

import functools

import jax

from jaxmoe.ops.routing import reference as routing_reference

__all__ = ["routing_weights"]


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _kernel_weights(logits, topk_ids, kernel_weights, options):
    return kernel_weights


@_kernel_weights.defjvp
def _kernel_weights_jvp(options, primals, tangents):
    logits, topk_ids, kernel_weights = primals
    d_logits = tangents[0]
    _, d_weights = jax.jvp(lambda lg: routing_reference.weights_at(lg, topk_ids, **dict(options)), (logits,),
                           (d_logits,))
    return kernel_weights, d_weights


def routing_weights(logits: jax.Array, topk_ids: jax.Array, kernel_weights: jax.Array, *, scoring: str,
                    renormalize: bool, routed_scaling_factor: float) -> jax.Array:
    """The routing kernel's weights ``[M, k] float32``, differentiable in ``logits [M, E]``.

    The value is ``kernel_weights`` as they are (the kernel's and the gradient path's
    forward agree bitwise); the derivative is that of
    :func:`~jaxmoe.ops.routing.reference.weights_at` at the chosen ids (softmax or sigmoid
    scores, renormalized or not, times the static ``routed_scaling_factor``). Ids are
    constants: grouping and the correction bias change which experts are chosen, never
    the derivative, so the bias gets no gradient. The kernel must have been given
    ``jax.lax.stop_gradient`` of the logits.
    """
    options = (("scoring", scoring), ("renormalize", bool(renormalize)),
               ("routed_scaling_factor", float(routed_scaling_factor)))
    return _kernel_weights(logits, topk_ids, kernel_weights, options)
