"""The routing weights' derivative: the kernel's weights as values, the derivative of their
recomputation at the chosen ids (ids are constants)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmoe.ops.routing import reference as routing_reference

__all__ = ["routing_weights"]


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _kernel_weights(logits, topk_ids, kernel_weights, options):
    return kernel_weights


@_kernel_weights.defjvp
def _kernel_weights_jvp(options, primals, tangents):
    logits, topk_ids, kernel_weights = primals
    d_logits = tangents[0]
    options = dict(options)
    shared = options.pop("shared_experts", 0)
    routed_ids = topk_ids[:, :topk_ids.shape[1] - shared] if shared else topk_ids
    _, d_weights = jax.jvp(lambda lg: routing_reference.weights_at(lg, routed_ids, **options), (logits,),
                           (d_logits,))
    if shared:  # the shared slots' weights are constants (1)
        d_weights = jnp.concatenate([d_weights, jnp.zeros((d_weights.shape[0], shared), d_weights.dtype)], axis=1)
    return kernel_weights, d_weights


def routing_weights(logits: jax.Array, topk_ids: jax.Array, kernel_weights: jax.Array, *, scoring: str,
                    renormalize: bool, routed_scaling_factor: float, shared_experts: int = 0) -> jax.Array:
    """The routing kernel's weights ``[M, k] float32``, differentiable in ``logits [M, E]``
    (with ``shared_experts`` S, ``[M, k + S]``: the last S slots are shared experts, whose
    weights are constants).

    The value is ``kernel_weights`` as they are (the kernel's and the gradient path's
    forward agree bitwise); the derivative is that of
    :func:`~jaxmoe.ops.routing.reference.weights_at` at the chosen ids (softmax or sigmoid
    scores, renormalized or not, times the static ``routed_scaling_factor``). Ids are
    constants: grouping and the correction bias change which experts are chosen, never
    the derivative, so the bias gets no gradient. The kernel must have been given
    ``jax.lax.stop_gradient`` of the logits.
    """
    options = (("scoring", scoring), ("renormalize", bool(renormalize)),
               ("routed_scaling_factor", float(routed_scaling_factor)), ("shared_experts", int(shared_experts)))
    return _kernel_weights(logits, topk_ids, kernel_weights, options)
