"""``jax.numpy`` reference of the grouped GEMM over expert-sorted rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.ops import checks
from jaxmoe.types import RoutingData

__all__ = ["apply_activation", "gated", "dot_t", "grouped_gemm", "round_to"]

HIGHEST = jax.lax.Precision.HIGHEST


def apply_activation(name: str, gate: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(gate)
    return jax.nn.gelu(gate, approximate=False)  # the exact, erf-based gelu


def gated(activation, gate: jax.Array, up: jax.Array) -> jax.Array:
    """The gated activation of stage 1 in fp32: ``act(gate) * up`` for ``"silu"``/``"gelu"``,
    gpt-oss's clamped form for a :class:`~jaxmoe.ClampedSwiGLU` (or ``"clamped_swiglu"``)."""
    activation = checks.resolve_activation(activation)
    if isinstance(activation, str):
        return apply_activation(activation, gate) * up
    limit, alpha = activation.limit, activation.alpha
    # where, not minimum/clip: a NaN stays NaN, and the gradient passes where the value is
    # inside the clamp, boundaries included (as torch.clamp's does)
    gate = jnp.where(gate > limit, limit, gate)
    up = jnp.where(up > limit, limit, jnp.where(up < -limit, -limit, up))
    return (up + 1.0) * (gate * jax.nn.sigmoid(alpha * gate))


def round_to(v: jax.Array, dtype) -> jax.Array:
    """``v`` rounded to ``dtype`` where a kernel rounds it (a store to a narrower dtype), a
    rounding XLA keeps: on a GPU XLA folds ``f32 -> narrow -> f32`` convert pairs into
    excess precision by default (``xla_allow_excess_precision``), which would leave a
    reference that rounds like the kernels not rounding at all. Same shape as ``v``."""
    out = v.astype(dtype)
    return out if out.dtype == v.dtype else jax.lax.optimization_barrier(out)


def dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` with fp32 accumulation (``Precision.HIGHEST``: fp32 means fp32 on GPUs too)."""
    return jnp.einsum("mk,nk->mn", a, b, preferred_element_type=jnp.float32, precision=HIGHEST)


def grouped_gemm(a, b, routing: RoutingData, *, topk_weights=None, activation=None, tile=None):
    """Reference of :func:`jaxmoe.ops.grouped_gemm` (see there for the contract; ``tile`` is ignored)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    e, n, _, n_out = checks.check_grouped_gemm_args(a, b, routing, topk_weights=topk_weights, activation=activation)
    num_rows = routing.num_rows
    out_dtype = a.dtype
    if num_rows == 0:
        return jnp.zeros((0, n_out), out_dtype)
    top_k = routing.top_k if a.shape[0] * routing.top_k == num_rows else 1

    # Which expert each output row f belongs to (-1: no live sorted position covers it).
    sorted_token_ids = routing.sorted_token_ids.astype(jnp.int32)
    position = jnp.arange(sorted_token_ids.shape[0], dtype=jnp.int32)
    expert_of_position = routing.expert_ids.astype(jnp.int32)[position // routing.block_size]
    live = (
        (position < routing.num_tokens_post_padded.astype(jnp.int32).reshape(-1)[0])
        & (sorted_token_ids >= 0)
        & (sorted_token_ids < num_rows)
        & (expert_of_position >= 0)
        & (expert_of_position < e)
    )
    target = jnp.where(live, sorted_token_ids, num_rows)
    expert_of_row = jnp.full(num_rows, -1, jnp.int32).at[target].set(expert_of_position, mode="drop")

    source_row = jnp.arange(num_rows, dtype=jnp.int32) // top_k
    if topk_weights is not None:
        row_weight = jnp.asarray(topk_weights).astype(jnp.float32).reshape(-1)

    def one_expert(ex, c):
        def compute(c):
            mine = expert_of_row == ex  # [num_rows]
            # Rows of a that no row of ex reads enter as zeros: their values (a NaN, say)
            # reach neither this expert's output nor the gradient of b[ex].
            used = jnp.zeros(a.shape[0], bool).at[source_row].max(mine)
            y = dot_t(jnp.where(used[:, None], a, jnp.zeros((), a.dtype)), b[ex])[source_row]  # [num_rows, N] fp32
            if activation is not None:
                y = gated(activation, y[:, : n // 2], y[:, n // 2 :])
            if topk_weights is not None:
                y = y * jnp.where(mine, row_weight, 0.0)[:, None]
            return jnp.where(mine[:, None], y.astype(out_dtype), c)

        return jax.lax.cond(jnp.any(expert_of_row == ex), compute, lambda c: c, c)

    # zeros_like: the carry has a's type, so the loop also runs inside shard_map (varying a)
    return jax.lax.fori_loop(0, e, one_expert, jnp.zeros_like(a, shape=(num_rows, n_out)))
