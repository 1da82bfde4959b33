"""Routing and alignment in one launch, for decode-sized batches.

One program routes every row of the logits (at most a few row blocks) and then aligns the
ids it has just written, so a MoE layer's logits become ``sorted_token_ids`` /
``expert_ids`` with one kernel launch instead of two. The routing and alignment code is
the very code of the routing and alignment kernels; only the driver is new. The batch size
is a runtime argument: one compiled kernel serves every batch of a size class.
"""

import triton
import triton.language as tl

from ..alignment.kernels import _align_single
from ..routing.kernels import _topk_route_block


@triton.jit
def route_align_kernel(
    logits_ptr, bias_ptr, M, max_blocks,
    weights_ptr, ids_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    bases_ptr, end_real_ptr, block_ends_ptr,
    E: tl.constexpr, K: tl.constexpr, E_POW2: tl.constexpr, K_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, G_POW2: tl.constexpr, SCALE: tl.constexpr,
    GROUP_TOP2: tl.constexpr, NB: tl.constexpr, LOG2_NB: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    CHUNK: tl.constexpr, FILL: tl.constexpr,
):
    """logits [M, E] (+ bias [E]) -> topk_weights [M, K] f32, topk_ids [M, K] i32 and the
    alignment of those ids (outputs of ``moe_align_single_kernel``; the last three are scratch)."""
    for rb in range(0, (M + BLOCK_M - 1) // BLOCK_M):
        _topk_route_block(
            rb, logits_ptr, bias_ptr, weights_ptr, ids_ptr,
            M, E, K, E_POW2, K_POW2, BLOCK_M, SCORING, HAS_BIAS, RENORMALIZE, NUM_GROUPS, TOPK_GROUP, G_POW2,
            SCALE, GROUP_TOP2,
        )
    tl.debug_barrier()  # the ids stored above are read back by other threads below
    _align_single(ids_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
                  bases_ptr, end_real_ptr, block_ends_ptr, M * K, max_blocks, E, NB, LOG2_NB, BLOCK_SIZE,
                  CHUNK, FILL)
