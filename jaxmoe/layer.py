"""A functional, Flax-free MoE layer: parameters are a plain dict pytree.

One layer, as one visible flow::

    x [..., D] -> x2d [M, D] -> logits = x2d @ router [M, E] (fp32)
      -> route (top-k weights and ids) -> align (rows by expert) -> stage 1 (x @ w1, act)
      -> stage 2 (h @ w2, routing weight) -> sum over k -> y [..., D]

On the kernel path routing and alignment share one launch at decode sizes
(:data:`jaxmoe.ops.moe.ROUTED_MOE`), a router bias added inside it. Shared experts come in
two forms:

* stacked (``shared_experts=S``: the last S experts of ``w1``/``w2``, as
  :func:`jaxmoe.models.stack_shared_experts` makes them): every token takes them as S
  more slots of the routed launches, which then have no launch of their own;
* ``params["shared"]``: a dense ``jax.numpy`` MLP beside the routed launches.

On the H200 the stacked form was 3-8 % faster at gpt-oss-120b's shape and within 2 % of
the dense one at DeepSeek-V3's (``bench/RESULTS.md``).
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
from jaxmoe.ops.gemm.reference import gated
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


def _check_shared(params: dict[str, Any], d: int, dtype: Any, shared_experts: int = 0) -> None:
    """Checks the optional ``params["shared"]`` and ``params["shared_gate"]``."""
    shared = params.get("shared")
    if "shared_gate" in params and shared is None and not shared_experts:
        raise ValueError("params['shared_gate'] needs shared experts to gate (params['shared'] or shared_experts=...)")
    if shared is None:
        if "shared_gate" in params:
            _check_shared_gate(params["shared_gate"], d)
        return
    if not isinstance(shared, dict) or not {"w1", "w2"} <= set(shared):
        raise TypeError("params['shared'] must be a dict with keys 'w1' [S, 2Is, D] and 'w2' [S, D, Is]")
    w1, w2 = shared["w1"], shared["w2"]
    for name, w in (("w1", w1), ("w2", w2)):
        if getattr(w, "ndim", None) != 3:
            raise ValueError(f"params['shared']['{name}'] must be 3-D, got shape {getattr(w, 'shape', None)}")
        if jnp.dtype(w.dtype) != jnp.dtype(dtype):
            raise TypeError(f"params['shared']['{name}'] must have the dtype of params['w1'] ({jnp.dtype(dtype)}), "
                            f"got {w.dtype}")
    s, two_i, dw = w1.shape
    if dw != d or two_i % 2 or two_i == 0:
        raise ValueError(f"params['shared']['w1'] must be [S, 2Is, D={d}], got {list(w1.shape)}")
    if tuple(w2.shape) != (s, d, two_i // 2):
        raise ValueError(f"params['shared']['w2'] must be [S, D, Is] = {[s, d, two_i // 2]}, got {list(w2.shape)}")
    if "shared_gate" in params:
        _check_shared_gate(params["shared_gate"], d)


def _check_shared_gate(g: Any, d: int) -> None:
    if tuple(getattr(g, "shape", ())) != (d, 1):
        raise ValueError(f"params['shared_gate'] must be [D, 1] = [{d}, 1], got {getattr(g, 'shape', None)}")


def _shared_gate(params: dict[str, Any], x2d: jax.Array) -> jax.Array:
    """``sigmoid(x @ shared_gate)`` ``[M, 1]`` fp32 (Qwen2-MoE's gate of the shared experts)."""
    g = jnp.dot(x2d, params["shared_gate"], preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    return jax.nn.sigmoid(g)


def _shared_experts(params: dict[str, Any], x2d: jax.Array, activation: str) -> jax.Array:
    """The shared experts' summed output ``[M, D]`` in fp32 (gated when ``shared_gate`` is given).

    Per expert: ``h = act(x @ gate.T) * (x @ up.T)`` accumulated in fp32 and rounded to the
    input dtype (the rounding model of :func:`jaxmoe.fused_moe`), then ``h @ w2.T`` in fp32.
    """
    w1, w2 = params["shared"]["w1"], params["shared"]["w2"]
    i = w1.shape[1] // 2
    hi = jax.lax.Precision.HIGHEST
    gate_up = jnp.einsum("md,sjd->smj", x2d, w1, preferred_element_type=jnp.float32, precision=hi)
    h = gated(activation, gate_up[..., :i], gate_up[..., i:]).astype(x2d.dtype)
    out = jnp.einsum("smi,sdi->md", h, w2, preferred_element_type=jnp.float32, precision=hi)
    if "shared_gate" in params:
        out = _shared_gate(params, x2d) * out
    return out


def moe_layer(
    params: dict[str, Any],
    x: Any,
    *,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    activation: Any = "silu",
    implementation: Any = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: Any = None,
    routed_scaling_factor: Any = 1.0,
    group_scoring: str | None = None,
    return_routing: bool = False,
    layout: str = "out_in",
    shared_experts: int = 0,
    mesh: Any = None,
    expert_axis: str | None = None,
    tensor_axis: str | None = None,
    data_axis: str | None = None,
    schedule: str | None = None,
    act_quant: str | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """One MoE layer: router matmul, :func:`jaxmoe.route`, :func:`jaxmoe.fused_moe`, plus
    optional shared experts.

    Args:
      params: a dict from :func:`init_moe_params` (``router [D, E]``, ``w1 [E, 2I, D]``,
        ``w2 [E, D, I]``), optionally with shared experts
        ``"shared": {"w1": [S, 2Is, D], "w2": [S, D, Is]}`` (gate rows then up rows, in
        ``w1``'s dtype) applied to every token and added to the routed output, and
        ``"shared_gate": [D, 1]`` (Qwen2-MoE) scaling their sum by ``sigmoid(x @ shared_gate)``.
        Shared experts are a dense ``jax.numpy`` MLP on every implementation, computed
        beside the routed launch (not fused into it). Optional expert biases ``"b1" [E, 2I]``
        and ``"b2" [E, D]`` (see :func:`jaxmoe.fused_moe`) and a router bias
        ``"router_bias" [E]`` added to the logits (gpt-oss).
      x: ``[..., D]`` in ``w1``'s dtype (bf16, fp16 or fp32; any of them with quantized
        ``w1``/``w2``, :class:`~jaxmoe.QuantizedWeights` from :func:`jaxmoe.quantize_weights`);
        leading dims are flattened into tokens and restored.
      act_quant: None, ``"fp8"`` or ``"int8"``: activations rounded per token inside the
        kernels, see :func:`jaxmoe.fused_moe` (on a mesh with a ``tensor_axis``, ``h``
        per token from each device's slice of it: ``docs/parallel.md``).
      top_k, scoring, renormalize, num_expert_group, topk_group, correction_bias,
        routed_scaling_factor, group_scoring: routing options, see :func:`jaxmoe.route`.
      activation: ``"silu"``, ``"gelu"``, ``"clamped_swiglu"`` or a :class:`~jaxmoe.ClampedSwiGLU`,
        see :func:`jaxmoe.fused_moe` (shared experts use it too).
      layout: how ``params["w1"]``/``params["w2"]`` are stored (see :func:`jaxmoe.fused_moe`);
        ``params["shared"]`` is always ``[S, 2Is, D]`` gate rows then up rows.
      shared_experts: S >= 0: the last S experts of ``params["w1"]``/``params["w2"]`` (then
        ``[E + S, ...]`` against a router ``[D, E]``; expert biases ``[E + S, ...]`` too) are
        shared experts, taken by every token with weight 1 (times
        ``sigmoid(x @ shared_gate)`` when ``params["shared_gate"]`` is given) in the same
        launches as the routed ones. :func:`jaxmoe.models.stack_shared_experts` turns
        ``params["shared"]`` into this form (``load_layer(..., stack_shared=True)`` too).
      implementation: None (best available), ``"triton"``, ``"reference"`` or a sequence
        of them; used for both the routing and the experts.
      return_routing: also return the routing, for auxiliary losses (load balancing,
        router z-loss) without a second router pass.

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

      On a mesh, shared experts (``params["shared"]``; not stacked ones) are replicated
      and applied to each device's own tokens, and ``return_routing`` gives each device's
      tokens' routing, sharded like the output; expert biases are sharded like the
      weights, a router bias replicated, and every activation (the clamped SwiGLU too) is
      taken. Quantized weights are sharded array by array as the weights they stand for
      (``docs/parallel.md``). The mesh path takes no ``layout`` other than ``"out_in"``.

    Returns an array of ``x``'s shape and dtype; on a mesh, sharded over the token axes when
    ``x`` is ``[M, D]`` with ``M`` a multiple of the token shards, else replicated. The logits are
    ``jnp.dot(x, router, preferred_element_type=float32)`` (full fp32 precision), plus
    ``router_bias`` in fp32 when given. With
    ``return_routing``: ``(y, routing)`` where ``routing`` is ``{"logits": [M, E] float32,
    "topk_ids": [M, top_k] int32, "topk_weights": [M, top_k] float32}`` over the ``M``
    flattened tokens. With shared experts the routed output (in ``x``'s dtype) and the fp32
    shared output are added in fp32 and rounded once; stacked shared experts are more
    slots: each (token, slot) row rounded, the rows summed in fp32 and rounded once.

    Differentiable in ``params`` and ``x`` on every implementation: the gradient reaches
    the router through the routing weights (the chosen ids are constants, so
    ``correction_bias`` gets none); on the kernels the experts' backward is Triton.
    """
    if mesh is not None:
        from jaxmoe.parallel.layer import sharded_moe_layer

        if layout != "out_in":
            raise NotImplementedError(f"moe_layer(mesh=...) takes only layout='out_in' yet, got layout={layout!r}; "
                                      "transpose the weights to [E, 2I, D] / [E, D, I] or run without a mesh")
        if shared_experts:
            raise NotImplementedError("moe_layer(mesh=...) takes shared experts as params['shared'] (replicated), "
                                      "not stacked (shared_experts=...): pass stack_shared=False to "
                                      "jaxmoe.models.load_layer, or split them off with "
                                      "jaxmoe.models.unstack_shared_experts")
        return sharded_moe_layer(params, x, top_k=top_k, mesh=mesh, expert_axis=expert_axis,
                                 tensor_axis=tensor_axis, data_axis=data_axis, schedule=schedule, scoring=scoring,
                                 renormalize=renormalize, activation=activation, implementation=implementation,
                                 num_expert_group=num_expert_group, topk_group=topk_group,
                                 correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
                                 group_scoring=group_scoring, return_routing=return_routing, act_quant=act_quant)
    if expert_axis is not None or tensor_axis is not None or data_axis is not None or schedule is not None:
        raise ValueError("expert_axis, tensor_axis, data_axis and schedule need a mesh (mesh=...)")
    check_implementation(implementation)
    if isinstance(params, dict) and hasattr(params.get("w1"), "shape"):  # else check_layer_args says what is wrong
        checks.check_shared_experts(shared_experts, params["w1"].shape[0])
    d, _, _ = checks.check_layer_args(params, x, top_k, layout, shared_experts)
    if shared_experts and params.get("shared") is not None:
        raise ValueError("give shared experts either stacked in w1/w2 (shared_experts=...) or as params['shared'], "
                         "not both")
    checks.check_act_quant(act_quant, params["w1"], params["w2"], x.dtype, ("params['w1']", "params['w2']"),
                           layout=layout)
    _check_shared(params, d, x.dtype, shared_experts)
    if not isinstance(return_routing, bool):
        raise TypeError(f"return_routing must be a bool, got {type(return_routing).__name__}")
    x2d = x.reshape(-1, x.shape[-1])
    logits = jnp.dot(
        x2d, params["router"], preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    router_bias = params.get("router_bias")
    shared_weights = None
    if shared_experts and "shared_gate" in params:
        shared_weights = jnp.broadcast_to(_shared_gate(params, x2d), (x2d.shape[0], shared_experts))
    # the router bias is added to the logits inside the routing launch
    out = ROUTED_MOE(x2d, params["w1"], params["w2"], logits, top_k, activation=activation, scoring=scoring,
                     renormalize=renormalize, num_expert_group=num_expert_group, topk_group=topk_group,
                     correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
                     group_scoring=group_scoring, return_routing=return_routing, b1=params.get("b1"),
                     b2=params.get("b2"), layout=layout, act_quant=act_quant, logit_bias=router_bias,
                     shared_experts=shared_experts, shared_weights=shared_weights, implementation=implementation)
    y, topk_weights, topk_ids = out if return_routing else (out, None, None)
    if params.get("shared") is not None:
        y = (y.astype(jnp.float32) + _shared_experts(params, x2d, activation)).astype(y.dtype)
    y = y.reshape(x.shape)
    if return_routing:
        if router_bias is not None:
            logits = logits + router_bias.astype(jnp.float32)
        return y, {"logits": logits, "topk_ids": topk_ids, "topk_weights": topk_weights}
    return y
