"""The fused MoE: routed tokens through their experts' gated MLPs, summed over the slots."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.ops import checks
from jaxmoe.ops.base import Op, triton_implementation
from jaxmoe.ops.moe import backward, reference, triton
from jaxmoe.ops.routing import reference as routing_reference

__all__ = ["FUSED_MOE", "ROUTED_MOE", "fused_moe"]


def _check_routed(x: Any, w1: Any, w2: Any, logits: Any, top_k: int, *, activation: Any = "silu",
                  return_routing: bool = False, b1: Any = None, b2: Any = None, layout: str = "out_in",
                  act_quant: str | None = None, logit_bias: Any = None, shared_experts: Any = 0,
                  shared_weights: Any = None, **routing: Any) -> None:
    m, _, e, _ = checks.check_experts_args(x, w1, w2, layout=layout, b1=b1, b2=b2)
    checks.check_act_quant(act_quant, w1, w2, x.dtype, layout=layout)
    shared = checks.check_shared_experts(shared_experts, e, shared_weights, m)
    lm, le = checks.check_route_args(logits, top_k, **routing)
    if (lm, le) != (m, e - shared):
        raise ValueError(f"logits must be [M, E] = [{m}, {e - shared}] (tokens of hidden_states, experts of w1"
                         f"{f' less the {shared} shared ones' if shared else ''}), got {[lm, le]}")
    if logit_bias is not None:
        bs, bd = checks._shape_dtype("logit_bias", logit_bias)
        checks._require_float_dtype("logit_bias", bd)
        if tuple(bs) != (le,):
            raise ValueError(f"logit_bias must be [E] = [{le}], got {list(bs)}")
    checks.check_activation(activation)
    if not isinstance(return_routing, bool):
        raise TypeError(f"return_routing must be a bool, got {type(return_routing).__name__}")


def _routed_reference(x: Any, w1: Any, w2: Any, logits: Any, top_k: int, *, activation: Any = "silu",
                      return_routing: bool = False, b1: Any = None, b2: Any = None, layout: str = "out_in",
                      act_quant: str | None = None, logit_bias: Any = None, shared_experts: int = 0,
                      shared_weights: Any = None, **routing: Any
                      ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """``fused_moe(x, w1, w2, *route(logits + logit_bias, ...))``, every token also taking the
    ``shared_experts`` last experts of w1/w2 (weight 1 or ``shared_weights``); with
    ``return_routing`` also the routed ``topk_weights [M, k]`` f32 and ``topk_ids [M, k]`` i32."""
    if logit_bias is not None:
        logits = logits.astype(jnp.float32) + logit_bias.astype(jnp.float32)
    topk_weights, topk_ids = routing_reference.route(logits, top_k, **routing)
    weights, ids = topk_weights, topk_ids
    if shared_experts:
        m, e = logits.shape
        sw = (jnp.ones((m, shared_experts), jnp.float32) if shared_weights is None
              else shared_weights.astype(jnp.float32))
        weights = jnp.concatenate([topk_weights, sw], axis=1)
        ids = jnp.concatenate([topk_ids, jnp.broadcast_to(jnp.arange(e, e + shared_experts, dtype=topk_ids.dtype),
                                                          (m, shared_experts))], axis=1)
    y = reference.fused_moe(x, w1, w2, weights, ids, activation=activation, b1=b1, b2=b2, layout=layout,
                            act_quant=act_quant)
    return (y, topk_weights, topk_ids) if return_routing else y


# Both kernel paths are differentiable: a jax.custom_vjp on the experts (its rules are the
# ops' vjp) and the routing weights recomputed in jnp at the chosen ids (ops/moe/backward.py).
FUSED_MOE = Op("fused_moe", check=checks.check_fused_moe_args, reference=reference.fused_moe,
               implementations=[triton_implementation(triton.fused_moe)],
               vjp=(backward.experts_fwd, backward.experts_bwd))
# Routing and experts as one op, so the kernels can route and align in one launch (decode).
ROUTED_MOE = Op("routed_moe", check=_check_routed, reference=_routed_reference,
                implementations=[triton_implementation(triton.routed_moe)],
                vjp=(backward.experts_fwd, backward.experts_bwd))


def fused_moe(hidden_states: Any, w1: Any, w2: Any, topk_weights: Any, topk_ids: Any, *, activation: Any = "silu",
              b1: Any = None, b2: Any = None, layout: str = "out_in", act_quant: str | None = None,
              implementation: Any = None) -> jax.Array:
    """Apply each token's ``k`` routed experts and sum their weighted outputs.

    Args:
      hidden_states: ``[M, D]`` in bf16, fp16 or fp32.
      w1: ``[E, 2I, D]`` in ``hidden_states``' dtype: per expert the gate rows (first I)
        then the up rows (last I), PyTorch ``Linear`` ``[out, in]`` layout; or a
        :class:`~jaxmoe.QuantizedWeights` of such weights (any scheme, e.g. from
        :func:`jaxmoe.quantize_weights`; see ``docs/quantization.md``; quantized weights
        are stored ``[out, in]``). Other layouts: see ``layout``.
      w2: ``[E, D, I]`` likewise.
      act_quant: None (weight-only: activations stay in their dtype), ``"fp8"`` (with fp8,
        fp8_tensor or fp8_block weights) or ``"int8"`` (with int8 weights): x and the
        intermediate h are rounded per token inside the kernels, with a dynamic scale
        (per token and 128 channels against fp8_block weights, as DeepSeek-V3), and the
        8-bit dot runs (:func:`jaxmoe.quantize.quantize_activations` gives the math).
      topk_weights: ``[M, k]`` routing weights, any float dtype (used in fp32).
      topk_ids: ``[M, k]`` expert ids, any integer dtype (used as int32; ids outside the
        int32 range count as invalid).
      activation: ``"silu"`` (``silu(gate) * up``), ``"gelu"`` (``gelu(gate) * up``, the
        exact erf-based gelu), or gpt-oss's clamped SwiGLU: ``"clamped_swiglu"`` or a
        :class:`~jaxmoe.ClampedSwiGLU` ``(alpha, limit)``:
        ``(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``.
      b1: optional ``[E, 2I]`` expert bias of stage 1 (any float dtype, added in fp32 to
        ``x @ w1[e]`` before the activation), its 2I axis in ``w1``'s gate/up order.
      b2: optional ``[E, D]`` expert bias of stage 2, added before the routing weight:
        ``topk_weights * (h @ w2[e] + b2[e])`` (as gpt-oss computes it).
      layout: how ``w1``/``w2`` are stored, read through strides (never copied):
        ``"out_in"`` (default: ``w1 [E, 2I, D]`` gate rows then up rows, ``w2 [E, D, I]``),
        ``"out_in_interleaved"`` (the same shapes, w1's rows alternating gate, up),
        ``"in_out"`` (``w1 [E, D, 2I]`` gate columns then up columns, ``w2 [E, I, D]``:
        ``x @ w``) and ``"in_out_interleaved"`` (gpt-oss's ``gate_up_proj [E, D, 2I]``,
        gate j at column 2j, up j at 2j + 1; ``down_proj [E, I, D]``).
      implementation: None (best available), ``"triton"``, ``"reference"`` or a sequence
        of them (the first that serves).

    Returns:
      ``[M, D]`` in ``hidden_states``' dtype:
      ``y[t] = sum_j topk_weights[t, j] * (w2[e] @ gated(w1[e] @ x[t] + b1[e]) + b2[e])`` with
      ``e = topk_ids[t, j]`` (absent biases are 0).

    Rounding model (the kernels and the reference agree on it): stage 1 accumulates
    ``x @ w1[e].T`` in fp32, applies the activation in fp32 and rounds ``h`` to the input
    dtype; stage 2 accumulates ``h @ w2[e].T`` in fp32, multiplies by the routing weight in
    fp32 and rounds each (token, slot) row to the input dtype; the k rows are summed in
    fp32 and rounded once more.

    Invalid ids: an id outside ``[0, E)`` cannot be checked under ``jax.jit``; its
    (token, slot) contributes nothing (a token whose ids are all invalid gets zeros).
    ``M = 0`` returns an empty ``[0, D]`` array.

    Quantized weights multiply as their dequantized fp32 values (the kernels' products are
    exact: 8-bit values and 4-bit integers are exact in bf16/fp16, scales multiply fp32
    sums); with ``act_quant`` the rounding of x and h is the one extra step.

    Gradients: differentiable in ``hidden_states``, ``w1``, ``w2``, ``b1``, ``b2`` and ``topk_weights``
    (``jax.grad``, ``jax.vjp``, ``jax.checkpoint``); the reference by JAX's autodiff, the
    kernels by Triton kernels (:mod:`jaxmoe.ops.moe.backward`, which lists what the forward
    saves). Invalid ids get zero gradients; experts without rows zero weight gradients.
    With quantized weights the kernels treat them as frozen: gradients reach
    ``hidden_states``, the biases and ``topk_weights``; gradients of the quantized weights
    themselves, or through ``act_quant``, raise ``NotImplementedError`` naming the way out
    (the reference differentiates).
    """
    return FUSED_MOE(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation, b1=b1, b2=b2,
                     layout=layout, act_quant=act_quant, implementation=implementation)
