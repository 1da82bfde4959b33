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
      dtype: dtype of every parameter: bf16 (the default), fp16 or fp32.

    Returns ``{"router": [D, E], "w1": [E, 2I, D], "w2": [E, D, I]}``, each drawn from a
    normal distribution scaled by ``1 / sqrt(fan_in)`` (``D`` for router and w1, ``I`` for w2).
    """
    sizes = {}
    for name, v in (("hidden", hidden), ("intermediate", intermediate), ("experts", experts)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
        sizes[name] = int(v)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32, got {dtype!r}") from None
    if dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32 (what the layer runs in), got {dtype}")
    key_dtype = getattr(key, "dtype", None)
    typed = key_dtype is not None and jnp.issubdtype(key_dtype, jax.dtypes.prng_key)
    if key_dtype is None or not (typed or key_dtype == jnp.uint32):
        raise TypeError(f"key must be a jax.random key (jax.random.key(seed)), got {type(key).__name__}"
                        f"{'' if key_dtype is None else f' of dtype {key_dtype}'}")
    if key.shape != (() if typed else (2,)):
        what = "a key array of shape" if typed else "a uint32 array (a legacy PRNGKey is [2]) of shape"
        raise ValueError(f"key must be one jax.random key (jax.random.key(seed)), got {what} {list(key.shape)}")
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
    mesh: Any = None,
    expert_axis: str | None = None,
    tensor_axis: str | None = None,
    data_axis: str | None = None,
    schedule: str | None = None,
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

      mesh: a ``jax.sharding.Mesh`` to run on (None: no sharding), with the names of its
        axes that carry the experts (``expert_axis``: ``w1``/``w2`` sharded over ``E``, the
        tokens over it too), the intermediate dim (``tensor_axis``: each device holds
        ``I / tp`` gate rows with the matching up rows and ``w2`` columns) and the batch
        (``data_axis``: tokens sharded over it). ``E`` must divide by the expert degree and
        ``I`` by the tensor degree; any ``M`` is padded to a multiple of the token shards.
        ``params['w1']`` may then also be its split view ``[E, 2, I, D]``, as
        :func:`jaxmoe.parallel.shard_params` places it; unplaced arrays are sharded by the call.
      schedule: with an ``expert_axis``, ``"allgather"`` (all-gather the tokens, every device
        applies its experts to all of them, reduce-scatter) or ``"all_to_all"`` (send each
        token only to the devices of its experts, with a worst-case buffer that never drops
        one); None picks the one :func:`jaxmoe.parallel.choose_schedule` models as sending
        fewer bytes. See ``docs/parallel.md``.

    Returns an array of ``x``'s shape and dtype; on a mesh, sharded over the token axes when
    ``x`` is ``[M, D]`` with ``M`` a multiple of the token shards, else replicated. The logits are
    ``jnp.dot(x, router, preferred_element_type=float32)`` (full fp32 precision).

    Differentiable in ``params`` and ``x`` on every implementation: the gradient reaches
    the router through the routing weights (the chosen ids are constants, so
    ``correction_bias`` gets none); on the kernels the experts' backward is Triton.
    """
    if mesh is not None:
        from jaxmoe.parallel.layer import sharded_moe_layer

        return sharded_moe_layer(params, x, top_k=top_k, mesh=mesh, expert_axis=expert_axis,
                                 tensor_axis=tensor_axis, data_axis=data_axis, schedule=schedule, scoring=scoring,
                                 renormalize=renormalize, activation=activation, implementation=implementation,
                                 num_expert_group=num_expert_group, topk_group=topk_group,
                                 correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor)
    if expert_axis is not None or tensor_axis is not None or data_axis is not None or schedule is not None:
        raise ValueError("expert_axis, tensor_axis, data_axis and schedule need a mesh (mesh=...)")
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
