"""A functional, Flax-free MoE layer: parameters are a plain dict pytree."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxmoe import _dispatch, _validate
from jaxmoe.fused_moe import fused_moe
from jaxmoe.routing import route

__all__ = ["init_moe_params", "moe_layer"]


def init_moe_params(key, *, hidden, intermediate, experts, dtype=jnp.bfloat16):
    """Random parameters of one MoE layer.

    Args:
      key: a ``jax.random`` key.
      hidden: ``D``; intermediate: ``I`` (per expert); experts: ``E``.
      dtype: dtype of every parameter (bf16 by default).

    Returns ``{"router": [D, E], "w1": [E, 2I, D], "w2": [E, D, I]}``, each drawn from a
    normal distribution scaled by ``1 / sqrt(fan_in)`` (``D`` for router and w1, ``I`` for w2).
    """
    for name, v in (("hidden", hidden), ("intermediate", intermediate), ("experts", experts)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    k_router, k_w1, k_w2 = jax.random.split(key, 3)
    d, i, e = hidden, intermediate, experts

    def normal(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def per_expert(k, shape, fan_in):
        # one expert at a time: DeepSeek-V3's w1 drawn whole in fp32 would take 28 GiB
        return jax.lax.map(lambda ke: normal(ke, shape, fan_in), jax.random.split(k, e))

    return {
        "router": normal(k_router, (d, e), d),
        "w1": per_expert(k_w1, (2 * i, d), d),
        "w2": per_expert(k_w2, (d, i), i),
    }


def moe_layer(
    params,
    x,
    *,
    top_k,
    scoring="softmax",
    renormalize=True,
    activation="silu",
    implementation=None,
    num_expert_group=None,
    topk_group=None,
    correction_bias=None,
    routed_scaling_factor=1.0,
):
    """One MoE layer: router matmul, :func:`jaxmoe.route`, :func:`jaxmoe.fused_moe`.

    Args:
      params: a dict from :func:`init_moe_params` (``router [D, E]``, ``w1 [E, 2I, D]``,
        ``w2 [E, D, I]``).
      x: ``[..., D]`` in ``w1``'s dtype (bf16, fp16 or fp32); leading dims are flattened
        into tokens and restored.
      top_k, scoring, renormalize, num_expert_group, topk_group, correction_bias,
        routed_scaling_factor: routing options, see :func:`jaxmoe.route`.
      activation: ``"silu"`` or ``"gelu"``, see :func:`jaxmoe.fused_moe`.
      implementation: None (best available), ``"triton"`` or ``"reference"``; used for
        both the routing and the experts.

    Returns an array of ``x``'s shape and dtype. The logits are
    ``jnp.dot(x, router, preferred_element_type=float32)`` (full fp32 precision).
    """
    _validate.check_implementation(implementation)
    _validate.check_layer_args(params, x, top_k)
    x2d = x.reshape(-1, x.shape[-1])
    logits = jnp.dot(
        x2d, params["router"], preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    options = dict(
        scoring=scoring,
        renormalize=renormalize,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        correction_bias=correction_bias,
        routed_scaling_factor=routed_scaling_factor,
    )
    routed = _dispatch.kernel_for("_moe_triton", "routed_moe", implementation)
    if routed is not None:
        # The kernels' own path: routing and alignment share one launch at decode sizes.
        _validate.check_route_args(logits, top_k, **options)
        _validate.check_activation(activation)
        y = routed(x2d, params["w1"], params["w2"], logits, top_k, activation=activation, **options)
    else:
        topk_weights, topk_ids = route(logits, top_k, **options, implementation=implementation)
        y = fused_moe(x2d, params["w1"], params["w2"], topk_weights, topk_ids, activation=activation,
                      implementation=implementation)
    return y.reshape(x.shape)
