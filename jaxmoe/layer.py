"""A functional, Flax-free MoE layer: parameters are a plain dict pytree.

One layer, as one visible flow::

    x [..., D] -> x2d [M, D] -> logits = x2d @ router [M, E] (fp32)
      -> route (top-k weights and ids) -> align (rows by expert) -> stage 1 (x @ w1, act)
      -> stage 2 (h @ w2, routing weight) -> sum over k -> y [..., D]

On the kernel path routing and alignment share one launch at decode sizes
(:data:`jaxmoe.ops.moe.ROUTED_MOE`).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.ops import checks
from jaxmoe.ops.base import check_implementation
from jaxmoe.ops.moe import ROUTED_MOE

__all__ = ["init_moe_params", "moe_layer"]


def init_moe_params(key: Any, *, hidden: int, intermediate: int, experts: int, dtype: Any = jnp.bfloat16
                    ) -> dict[str, jax.Array]:
    """Random parameters of one MoE layer.

    Args:
      key: a ``jax.random`` key (a typed key from ``jax.random.key`` or a legacy uint32
        ``PRNGKey``).
      hidden: ``D``; intermediate: ``I`` (per expert); experts: ``E``; Python or numpy ints.
      dtype: dtype of every parameter (bf16 by default).

    Returns ``{"router": [D, E], "w1": [E, 2I, D], "w2": [E, D, I]}``, each drawn from a
    normal distribution scaled by ``1 / sqrt(fan_in)`` (``D`` for router and w1, ``I`` for w2).
    """
    sizes = {}
    for name, v in (("hidden", hidden), ("intermediate", intermediate), ("experts", experts)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
        sizes[name] = int(v)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    key_dtype = getattr(key, "dtype", None)
    if key_dtype is None or not (jnp.issubdtype(key_dtype, jax.dtypes.prng_key)
                                 or (key_dtype == jnp.uint32 and key.shape == (2,))):
        raise TypeError(f"key must be a jax.random key (jax.random.key(seed)), got {type(key).__name__}"
                        f"{'' if key_dtype is None else f' of dtype {key_dtype}'}")
    k_router, k_w1, k_w2 = jax.random.split(key, 3)
    d, i, e = sizes["hidden"], sizes["intermediate"], sizes["experts"]

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
    params: dict[str, Any],
    x: Any,
    *,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    activation: str = "silu",
    implementation: Any = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: Any = None,
    routed_scaling_factor: Any = 1.0,
) -> jax.Array:
    """One MoE layer: router matmul, :func:`jaxmoe.route`, :func:`jaxmoe.fused_moe`.

    Args:
      params: a dict from :func:`init_moe_params` (``router [D, E]``, ``w1 [E, 2I, D]``,
        ``w2 [E, D, I]``).
      x: ``[..., D]`` in ``w1``'s dtype (bf16, fp16 or fp32); leading dims are flattened
        into tokens and restored.
      top_k, scoring, renormalize, num_expert_group, topk_group, correction_bias,
        routed_scaling_factor: routing options, see :func:`jaxmoe.route`.
      activation: ``"silu"`` or ``"gelu"``, see :func:`jaxmoe.fused_moe`.
      implementation: None (best available), ``"triton"``, ``"reference"`` or a sequence
        of them; used for both the routing and the experts.

    Returns an array of ``x``'s shape and dtype. The logits are
    ``jnp.dot(x, router, preferred_element_type=float32)`` (full fp32 precision).

    Differentiable in ``params`` and ``x`` on every implementation: the gradient reaches
    the router through the routing weights (the chosen ids are constants, so
    ``correction_bias`` gets none); on the kernels the experts' backward is Triton.
    """
    check_implementation(implementation)
    checks.check_layer_args(params, x, top_k)
    x2d = x.reshape(-1, x.shape[-1])
    logits = jnp.dot(
        x2d, params["router"], preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    y = ROUTED_MOE(x2d, params["w1"], params["w2"], logits, top_k, activation=activation, scoring=scoring,
                   renormalize=renormalize, num_expert_group=num_expert_group, topk_group=topk_group,
                   correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
                   implementation=implementation)
    return y.reshape(x.shape)
