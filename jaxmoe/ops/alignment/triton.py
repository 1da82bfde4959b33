"""Triton alignment: plans the launches of ``moe_align_block_size`` and runs them.

Up to ``ALIGN_CHUNK`` rows the whole alignment is one program (decode); beyond it three
launches (per-chunk counts, offsets, scatter plus padding fill). The batch size reaches
the kernels as runtime scalars; what is compiled depends on the expert count, the block
size and the size class of the single-program path only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.backends.launch import KernelLaunch, launch, next_pow2
from jaxmoe.ops.alignment.reference import max_blocks

__all__ = ["ALIGN_CHUNK", "SINGLE_CHUNKS", "plan_align", "moe_align_block_size"]

# Rows handled by one program of the alignment; up to this many the whole alignment is
# one launch, beyond it three.
ALIGN_CHUNK = 1024
# Size classes of the one-program path: rows are sorted in a tile of the smallest of
# these that holds them (a class is one compiled kernel for every batch that falls in it).
SINGLE_CHUNKS = (64, 256, ALIGN_CHUNK)


def _sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def _kernels() -> Any:
    from jaxmoe.ops.alignment import kernels

    return kernels


def bins(num_experts: int) -> int:
    """``NB``: a power of two with room for every expert and the overflow bin."""
    return next_pow2(num_experts + 1)


def single_chunk(num_rows: int) -> int:
    """The size class (``CHUNK``) of the one-program alignment of ``num_rows`` rows."""
    return next(c for c in SINGLE_CHUNKS if num_rows <= c)


def fill_width(block_size: int) -> int:
    return max(block_size, 256)


def plan_align(num_rows: int, num_experts: int, block_size: int) -> list[KernelLaunch]:
    """The launches of ``moe_align_block_size`` for ``num_rows`` = M * top_k ids."""
    kern = _kernels()
    nb = bins(num_experts)
    blocks = max_blocks(num_rows, num_experts, block_size)
    positions = blocks * block_size
    fill = fill_width(block_size)
    i32 = jnp.int32
    outs = (_sds((positions,), i32), _sds((blocks,), i32), _sds((1,), i32))
    layout = dict(NUM_EXPERTS=num_experts, NB=nb, LOG2_NB=nb.bit_length() - 1, BLOCK_SIZE=block_size)
    if num_rows <= ALIGN_CHUNK:
        return [KernelLaunch(
            kern.moe_align_single_kernel, grid=(1,),
            args=(_sds((num_rows,), i32),), scalars=(("num_rows", num_rows), ("max_blocks", blocks)),
            outs=outs + (_sds((nb,), i32),) * 3,
            constexprs=tuple({**layout, "CHUNK": single_chunk(num_rows), "FILL": fill}.items()),
            num_warps=4, num_stages=1)]
    chunks = -(-num_rows // ALIGN_CHUNK)
    count = KernelLaunch(
        kern.moe_align_count_kernel, grid=(chunks,),
        args=(_sds((num_rows,), i32),), scalars=(("num_rows", num_rows),), outs=(_sds((chunks, nb), i32),),
        constexprs=(("NUM_EXPERTS", num_experts), ("NB", nb), ("CHUNK", ALIGN_CHUNK)), num_warps=4, num_stages=1)
    offsets = KernelLaunch(
        kern.moe_align_offsets_kernel, grid=(1,),
        args=(_sds((chunks, nb), i32),), scalars=(("num_chunks", chunks),),
        outs=(_sds((chunks, nb), i32), _sds((nb,), i32), _sds((nb,), i32), _sds((1,), i32)),
        constexprs=(("NUM_EXPERTS", num_experts), ("NB", nb), ("BLOCK_SIZE", block_size)),
        num_warps=4, num_stages=1)
    scatter = KernelLaunch(
        kern.moe_align_scatter_kernel, grid=(chunks + -(-positions // fill),),
        args=(_sds((num_rows,), i32), _sds((chunks, nb), i32), _sds((nb,), i32), _sds((nb,), i32)),
        scalars=(("num_rows", num_rows), ("max_blocks", blocks), ("num_chunks", chunks)),
        outs=outs[:2],
        constexprs=tuple({**layout, "CHUNK": ALIGN_CHUNK, "FILL": fill}.items()),
        num_warps=4, num_stages=1)
    return [count, offsets, scatter]


def moe_align_block_size(topk_ids: jax.Array, num_experts: int, block_size: int
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Triton ``moe_align_block_size``; see :func:`jaxmoe.ops.moe_align_block_size` for the contract."""
    from jaxmoe.ops import checks

    ids = checks.as_ids(topk_ids, "topk_ids").reshape(-1)
    if ids.shape[0] == 0:  # no rows: nothing to launch
        empty = jnp.zeros((0,), jnp.int32)
        return empty, empty, jnp.zeros((1,), jnp.int32)
    plan = plan_align(ids.shape[0], num_experts, block_size)
    if len(plan) == 1:
        sorted_ids, expert_ids, padded, *_ = launch(plan[0], ids)
        return sorted_ids, expert_ids, padded
    count, offsets, scatter = plan
    (counts,) = launch(count, ids)
    bases, end_real, block_ends, padded = launch(offsets, counts)
    sorted_ids, expert_ids = launch(scatter, ids, bases, end_real, block_ends)
    return sorted_ids, expert_ids, padded
