"""``jax.numpy`` reference of the fused MoE (the contract the kernels are held to).

Written for clarity, never for speed, but feasible in memory at real model shapes: no
per-token copy of expert weights is gathered; each expert is applied densely to all rows,
the rows of tokens not routed to it zeroed first, and the result kept only where the
routing says so. Zeroing the inputs (not only masking the outputs) keeps the gradient of
one expert's weights free of other tokens' values: a NaN or Inf in one token reaches
only the gradients of the experts it is routed to. It rounds where the kernels round
(see :func:`jaxmoe.fused_moe`), so tests can stay tight.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.ops import checks
from jaxmoe.ops.gemm.reference import apply_activation, dot_t
from jaxmoe.types import QuantizedWeights

__all__ = ["fused_moe", "fused_moe_in", "unwrap_weights"]


def unwrap_weights(w: Any) -> Any:
    """The stored array of unquantized weights (``QuantizedWeights`` with scheme ``"none"``)."""
    if isinstance(w, QuantizedWeights):
        if w.scheme != "none":
            raise NotImplementedError(f"weight scheme {w.scheme!r} is not implemented")
        return w.values
    return jnp.asarray(w)


def fused_moe_in(hidden_states, w1, w2, topk_weights, topk_ids, activation, compute_dtype):
    """The two-stage MoE, one expert at a time, rounding to ``compute_dtype`` where the kernels round.

    ``w1``/``w2`` may be stored in another dtype (e.g. bf16 weights for an fp32 oracle):
    each expert's slice is cast to ``compute_dtype`` as it is used.
    """
    m, d = hidden_states.shape
    e, two_i, _ = w1.shape
    i = two_i // 2
    if m == 0:
        return jnp.zeros((0, d), compute_dtype)
    x = hidden_states.astype(compute_dtype)
    ids = checks.as_ids(topk_ids, "topk_ids")
    weights = topk_weights.astype(jnp.float32)

    def one_expert(ex, rows):
        def compute(rows):
            slot = ids == ex  # [M, k]
            # Tokens not routed to ex enter as zeros (and weigh 0): nothing of theirs, not
            # even a NaN, reaches this expert's output or its weights' gradient.
            xe = jnp.where(jnp.any(slot, axis=1)[:, None], x, jnp.zeros((), compute_dtype))
            we = jnp.where(slot, weights, 0.0)
            gate_up = dot_t(xe, w1[ex].astype(compute_dtype))  # [M, 2I] fp32
            h = (apply_activation(activation, gate_up[:, :i]) * gate_up[:, i:]).astype(compute_dtype)
            y = dot_t(h, w2[ex].astype(compute_dtype))  # [M, D] fp32
            y = (y[:, None, :] * we[:, :, None]).astype(compute_dtype)  # [M, k, D]
            return jnp.where(slot[:, :, None], y, rows)

        return jax.lax.cond(jnp.any(ids == ex), compute, lambda r: r, rows)

    # One [D] row per (token, slot); a slot with an out-of-range id is never written.
    # zeros_like: the carry has x's type, so the loop also runs inside shard_map (varying x)
    rows = jax.lax.fori_loop(0, e, one_expert, jnp.zeros_like(x, shape=(m, ids.shape[1], d)))
    return rows.astype(jnp.float32).sum(axis=1).astype(compute_dtype)


def fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu"):
    """Reference of :func:`jaxmoe.fused_moe` (see there for the contract)."""
    hidden_states, topk_weights = jnp.asarray(hidden_states), jnp.asarray(topk_weights)
    w1, w2 = unwrap_weights(w1), unwrap_weights(w2)
    checks.check_fused_moe_args(hidden_states, w1, w2, topk_weights, topk_ids, activation)
    return fused_moe_in(hidden_states, w1, w2, topk_weights, topk_ids, activation, hidden_states.dtype)
