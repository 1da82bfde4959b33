"""``jax.numpy`` reference of the alignment: (token, slot) rows sorted by expert, padded."""

from __future__ import annotations

import jax.numpy as jnp

from jaxmoe.ops import checks

__all__ = ["max_padded_rows", "max_blocks", "moe_align_block_size"]


def max_padded_rows(num_rows: int, num_experts: int, block_size: int) -> int:
    """Static length ``P`` of ``sorted_token_ids`` for ``num_rows = M * k`` routed rows.

    Each non-empty expert adds at most one partly filled block, and no block is empty, so
    the used blocks number at most ``min(T, T // block_size + min(E, T))`` with ``T = num_rows``.
    """
    t = int(num_rows)
    max_blocks_ = min(t, t // block_size + min(int(num_experts), t))
    return max_blocks_ * block_size


def max_blocks(num_rows: int, num_experts: int, block_size: int) -> int:
    """Upper bound on the padded blocks: ``max_padded_rows(...) // block_size``."""
    return max_padded_rows(num_rows, num_experts, block_size) // block_size


def moe_align_block_size(topk_ids, num_experts, block_size):
    """Reference of :func:`jaxmoe.ops.moe_align_block_size` (see there for the contract)."""
    topk_ids = checks.as_ids(topk_ids, "topk_ids")
    m, k, e, block_size = checks.check_align_args(topk_ids, num_experts, block_size)
    t = m * k
    padded_rows = max_padded_rows(t, e, block_size)
    num_blocks = padded_rows // block_size

    flat = topk_ids.reshape(-1)
    valid = (flat >= 0) & (flat < e)
    expert_of_row = jnp.where(valid, flat, e).astype(jnp.int32)  # invalid rows sort last, into a bin we drop

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
