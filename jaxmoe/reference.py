"""Plain ``jax.numpy`` references of every jaxmoe op, with the public signatures.

They are the oracle the Triton kernels are tested against and what runs where no kernel
can. Each lives with its op (``jaxmoe/ops/<family>/reference.py``); this module gathers them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.ops.alignment.reference import moe_align_block_size
from jaxmoe.ops.gemm.reference import grouped_gemm
from jaxmoe.ops.moe.reference import fused_moe
from jaxmoe.ops.routing.reference import route, router_sigmoid_top1

__all__ = ["route", "router_sigmoid_top1", "moe_align_block_size", "moe_gemm", "grouped_gemm", "fused_moe",
           "moe_layer"]


def moe_gemm(a, b, sorted_token_ids, expert_ids, num_tokens_post_padded, *, top_k, num_rows, block_size,
             topk_weights=None, activation=None):
    """Reference of :func:`jaxmoe.ops.moe_gemm` (see there for the contract)."""
    from jaxmoe.ops.gemm import moe_gemm as public_moe_gemm

    return public_moe_gemm(a, b, sorted_token_ids, expert_ids, num_tokens_post_padded, top_k=top_k,
                           num_rows=num_rows, block_size=block_size, topk_weights=topk_weights,
                           activation=activation, implementation="reference")


def moe_layer(params: Any, x: Any, *, top_k: int, scoring: str = "softmax", renormalize: bool = True,
              activation: Any = "silu", num_expert_group: int | None = None, topk_group: int | None = None,
              correction_bias: Any = None, routed_scaling_factor: Any = 1.0, group_scoring: str | None = None,
              return_routing: bool = False, layout: str = "out_in"
              ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Reference of :func:`jaxmoe.moe_layer` (see there for the contract, shared experts and
    ``return_routing`` included): the layer with every op on its ``jax.numpy`` reference."""
    from jaxmoe.layer import moe_layer as layer

    return layer(params, jnp.asarray(x), top_k=top_k, scoring=scoring, renormalize=renormalize,
                 activation=activation, num_expert_group=num_expert_group, topk_group=topk_group,
                 correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
                 group_scoring=group_scoring, return_routing=return_routing, layout=layout,
                 implementation="reference")
