"""Alignment: (token, slot) rows grouped by expert, each expert padded to the GEMM block.

``moe_align_block_size`` returns the seed's triple; :func:`align` the same layout as a
:class:`~jaxmoe.types.RoutingData` that the grouped GEMMs take.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.ops import checks
from jaxmoe.ops.alignment import reference, triton
from jaxmoe.ops.alignment.reference import max_blocks, max_padded_rows
from jaxmoe.ops.base import Op, triton_implementation
from jaxmoe.types import RoutingData

__all__ = ["ALIGN", "align", "moe_align_block_size", "max_padded_rows", "max_blocks"]

ALIGN = Op("moe_align_block_size", check=checks.check_align_args, reference=reference.moe_align_block_size,
           implementations=[triton_implementation(triton.moe_align_block_size)])


def moe_align_block_size(topk_ids: Any, num_experts: int, block_size: int, *, implementation: Any = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sort the (token, slot) rows by expert, each expert padded to a multiple of ``block_size``.

    Args:
      topk_ids: ``[M, k]`` integer expert ids (ids outside the int32 range count as invalid).
      num_experts: ``E``, a Python int.
      block_size: the GEMM's BLOCK_M, a power of two >= 16.
      implementation: None (best available), ``"triton"``, ``"reference"`` or a sequence
        of them (the first that serves).

    Returns ``(sorted_token_ids [P] int32, expert_ids [P // block_size] int32,
    num_tokens_post_padded [1] int32)`` with ``T = M * k`` and
    ``P = max_padded_rows(T, E, block_size)`` (static, for ``jax.jit``).

    A row is a flat index ``f = token * k + slot``. For each expert ``e`` in ascending
    order, its rows in ascending ``f`` fill ``ceil(count_e / block_size)`` blocks, padded
    with the sentinel ``T``; experts without rows get no blocks. ``expert_ids`` holds ``e``
    for each used block and ``-1`` for the unused blocks at the end, where
    ``sorted_token_ids`` is all ``T``. ``num_tokens_post_padded[0]`` counts the rows of the
    used blocks. Rows whose id is outside ``[0, E)`` are placed nowhere.
    """
    return ALIGN(topk_ids, num_experts, block_size, implementation=implementation)


def align(topk_ids: Any, num_experts: int, block_size: int, *, topk_weights: Any = None,
          implementation: Any = None) -> RoutingData:
    """:func:`moe_align_block_size` as a :class:`~jaxmoe.types.RoutingData`.

    ``topk_weights`` (``[M, k]`` float, optional) travel with the layout, in fp32.
    """
    checks.check_align_args(topk_ids, num_experts, block_size)
    m, k = (int(d) for d in topk_ids.shape)
    if topk_weights is not None:
        checks.check_weights_like_ids(topk_weights, topk_ids)
        topk_weights = jnp.asarray(topk_weights).astype(jnp.float32)
    ids = checks.as_ids(topk_ids, "topk_ids")
    layout = moe_align_block_size(ids, num_experts, block_size, implementation=implementation)
    return RoutingData(*layout, topk_ids=ids, topk_weights=topk_weights, block_size=block_size,
                       num_experts=num_experts, top_k=k, num_rows=m * k)
