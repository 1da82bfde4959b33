"""Plain ``jax.numpy`` references of every jaxmoe op.

These are the oracle the Triton kernels are tested against and the CPU fallback. They
are written for clarity, never for speed, but stay feasible in memory at real model
shapes: no per-token copy of expert weights is ever gathered; instead each expert is
applied densely to all rows and the result is kept only where the routing says so.

They follow the kernels' rounding model exactly (see :func:`fused_moe`), so the
tolerances in tests can stay tight. Matrix products use ``Precision.HIGHEST`` so that
fp32 means fp32 on GPUs too (no silent TF32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe import _validate
from jaxmoe.ops import max_padded_rows

__all__ = ["route", "moe_align_block_size", "moe_gemm", "fused_moe", "moe_layer"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _activation(name: str, gate: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(gate)
    return jax.nn.gelu(gate, approximate=False)  # the exact, erf-based gelu


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` with fp32 accumulation."""
    return jnp.einsum("mk,nk->mn", a, b, preferred_element_type=jnp.float32, precision=_HIGHEST)


# --------------------------------------------------------------------------- routing


def route(
    logits,
    top_k,
    *,
    scoring="softmax",
    renormalize=True,
    num_expert_group=None,
    topk_group=None,
    correction_bias=None,
    routed_scaling_factor=1.0,
):
    """Reference of :func:`jaxmoe.route` (see there for the full contract)."""
    logits = jnp.asarray(logits)
    _validate.check_route_args(
        logits,
        top_k,
        scoring=scoring,
        renormalize=renormalize,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        correction_bias=correction_bias,
        routed_scaling_factor=routed_scaling_factor,
    )
    m, e = logits.shape
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)

    # Selection runs on biased scores; NaN counts as -inf so every id stays in [0, E).
    # lax.top_k orders by value and breaks ties by the lower index.
    choice = scores if correction_bias is None else scores + jnp.asarray(correction_bias).astype(jnp.float32)
    choice = jnp.where(jnp.isnan(choice), -jnp.inf, choice)

    if num_expert_group is not None:
        groups = choice.reshape(m, num_expert_group, e // num_expert_group)
        if correction_bias is None:  # DeepSeek-V2: a group is as good as its best expert
            group_scores = groups.max(axis=-1)
        else:  # DeepSeek-V3: the sum of its two best biased scores
            group_scores = jax.lax.top_k(groups, min(2, groups.shape[-1]))[0].sum(axis=-1)
        group_scores = jnp.where(jnp.isnan(group_scores), -jnp.inf, group_scores)
        _, kept = jax.lax.top_k(group_scores, topk_group)
        keep = jnp.zeros((m, num_expert_group), bool).at[jnp.arange(m)[:, None], kept].set(True)
        choice = jnp.where(keep[:, :, None], groups, -jnp.inf).reshape(m, e)

    _, topk_ids = jax.lax.top_k(choice, top_k)
    topk_weights = jnp.take_along_axis(scores, topk_ids, axis=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(axis=-1, keepdims=True)
    topk_weights = topk_weights * jnp.asarray(routed_scaling_factor, jnp.float32)
    return topk_weights.astype(jnp.float32), topk_ids.astype(jnp.int32)


# --------------------------------------------------------------------------- align


def moe_align_block_size(topk_ids, num_experts, block_size):
    """Reference of :func:`jaxmoe.ops.moe_align_block_size` (see there for the contract)."""
    topk_ids = jnp.asarray(topk_ids)
    m, k, e, block_size = _validate.check_align_args(topk_ids, num_experts, block_size)
    t = m * k
    padded_rows = max_padded_rows(t, e, block_size)
    num_blocks = padded_rows // block_size

    flat = topk_ids.reshape(-1).astype(jnp.int32)
    valid = (flat >= 0) & (flat < e)
    expert_of_row = jnp.where(valid, flat, e)  # invalid rows sort last, into a bin we drop

    counts = jnp.zeros(e + 1, jnp.int32).at[expert_of_row].add(1)[:e]
    padded_counts = (counts + block_size - 1) // block_size * block_size
    start = jnp.cumsum(padded_counts) - padded_counts  # where each expert's rows begin
    unpadded_start = jnp.cumsum(counts) - counts
    num_tokens_post_padded = padded_counts.sum()

    # Rows grouped by expert, ascending row index within an expert (a stable sort).
    order = jnp.argsort(expert_of_row, stable=True).astype(jnp.int32)
    sorted_expert = expert_of_row[order]
    safe_expert = jnp.minimum(sorted_expert, e - 1)
    rank = jnp.arange(t, dtype=jnp.int32) - unpadded_start[safe_expert]
    dest = jnp.where(sorted_expert < e, start[safe_expert] + rank, padded_rows)  # invalid: dropped
    sorted_token_ids = jnp.full(padded_rows, t, jnp.int32).at[dest].set(order, mode="drop")

    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
    owner = jnp.searchsorted(jnp.cumsum(padded_counts), block_start, side="right").astype(jnp.int32)
    expert_ids = jnp.where(block_start < num_tokens_post_padded, owner, -1).astype(jnp.int32)
    return sorted_token_ids, expert_ids, num_tokens_post_padded.reshape(1).astype(jnp.int32)


# --------------------------------------------------------------------------- grouped GEMM


def moe_gemm(
    a,
    b,
    sorted_token_ids,
    expert_ids,
    num_tokens_post_padded,
    *,
    top_k,
    num_rows,
    block_size,
    topk_weights=None,
    activation=None,
):
    """Reference of :func:`jaxmoe.ops.moe_gemm` (see there for the contract)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    e, n, _, n_out = _validate.check_moe_gemm_args(
        a,
        b,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_padded,
        top_k=top_k,
        num_rows=num_rows,
        block_size=block_size,
        topk_weights=topk_weights,
        activation=activation,
    )
    out_dtype = a.dtype
    if num_rows == 0:
        return jnp.zeros((0, n_out), out_dtype)

    # Which expert each output row f belongs to (-1: no sorted position covers it).
    sorted_token_ids = jnp.asarray(sorted_token_ids).astype(jnp.int32)
    position = jnp.arange(sorted_token_ids.shape[0], dtype=jnp.int32)
    expert_of_position = jnp.asarray(expert_ids).astype(jnp.int32)[position // block_size]
    live = (
        (position < jnp.asarray(num_tokens_post_padded).astype(jnp.int32)[0])
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
            y = _dot_t(a, b[ex])[source_row]  # [num_rows, N] fp32: expert ex on every row
            if activation is not None:
                y = _activation(activation, y[:, : n // 2]) * y[:, n // 2 :]
            if topk_weights is not None:
                y = y * row_weight[:, None]
            return jnp.where((expert_of_row == ex)[:, None], y.astype(out_dtype), c)

        return jax.lax.cond(jnp.any(expert_of_row == ex), compute, lambda c: c, c)

    return jax.lax.fori_loop(0, e, one_expert, jnp.zeros((num_rows, n_out), out_dtype))


# --------------------------------------------------------------------------- fused MoE


def _fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, activation, compute_dtype):
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
    ids = topk_ids.astype(jnp.int32)
    weights = topk_weights.astype(jnp.float32)

    def one_expert(ex, rows):
        def compute(rows):
            gate_up = _dot_t(x, w1[ex].astype(compute_dtype))  # [M, 2I] fp32
            h = (_activation(activation, gate_up[:, :i]) * gate_up[:, i:]).astype(compute_dtype)
            y = _dot_t(h, w2[ex].astype(compute_dtype))  # [M, D] fp32
            y = (y[:, None, :] * weights[:, :, None]).astype(compute_dtype)  # [M, k, D]
            return jnp.where((ids == ex)[:, :, None], y, rows)

        return jax.lax.cond(jnp.any(ids == ex), compute, lambda r: r, rows)

    # One [D] row per (token, slot); a slot with an out-of-range id is never written.
    rows = jax.lax.fori_loop(0, e, one_expert, jnp.zeros((m, ids.shape[1], d), compute_dtype))
    return rows.astype(jnp.float32).sum(axis=1).astype(compute_dtype)


def fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu"):
    """Reference of :func:`jaxmoe.fused_moe` (see there for the contract)."""
    hidden_states, w1, w2 = jnp.asarray(hidden_states), jnp.asarray(w1), jnp.asarray(w2)
    topk_weights, topk_ids = jnp.asarray(topk_weights), jnp.asarray(topk_ids)
    _validate.check_fused_moe_args(hidden_states, w1, w2, topk_weights, topk_ids, activation)
    return _fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, activation, hidden_states.dtype)


def moe_layer(
    params,
    x,
    *,
    top_k,
    scoring="softmax",
    renormalize=True,
    activation="silu",
    num_expert_group=None,
    topk_group=None,
    correction_bias=None,
    routed_scaling_factor=1.0,
):
    """Reference of :func:`jaxmoe.moe_layer` (see there for the contract)."""
    x = jnp.asarray(x)
    _validate.check_layer_args(params, x, top_k)
    x2d = x.reshape(-1, x.shape[-1])
    logits = jnp.dot(x2d, params["router"], preferred_element_type=jnp.float32, precision=_HIGHEST)
    topk_weights, topk_ids = route(
        logits,
        top_k,
        scoring=scoring,
        renormalize=renormalize,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        correction_bias=correction_bias,
        routed_scaling_factor=routed_scaling_factor,
    )
    y = fused_moe(x2d, params["w1"], params["w2"], topk_weights, topk_ids, activation=activation)
    return y.reshape(x.shape)


# --------------------------------------------------------------------------- fused router


def router_sigmoid_top1(x, w, *, shared_expert=False):
    """Reference of :func:`jaxmoe.ops.router_sigmoid_top1` (see there for the contract)."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    logits = jnp.dot(x, w, preferred_element_type=jnp.float32, precision=_HIGHEST)
    scores = jax.nn.sigmoid(logits)
    # NaN counts as -inf; argmax takes the first maximum, i.e. the lower expert id.
    topk_ids = jnp.argmax(jnp.where(jnp.isnan(scores), -jnp.inf, scores), axis=-1)[:, None].astype(jnp.int32)
    topk_weights = jnp.take_along_axis(scores, topk_ids, axis=-1)
    if shared_expert:
        m, e = x.shape[0], w.shape[1]
        topk_ids = jnp.concatenate([topk_ids, jnp.full((m, 1), e, jnp.int32)], axis=-1)
        topk_weights = jnp.concatenate([topk_weights, jnp.ones((m, 1), jnp.float32)], axis=-1)
    return topk_weights, topk_ids


__all__ += ["router_sigmoid_top1"]
