"""JAX glue for the MoE Triton kernels: plan each launch from static shapes, run it.

``plan_*`` functions return :class:`~jaxmoe._launch.KernelLaunch` descriptions (used both
to run and, in CI, to compile every kernel ahead of time for gfx942, gfx950 and sm_90);
``moe_align_block_size``, ``moe_gemm`` and ``fused_moe`` run them inside ``jax.jit``.
Argument checking lives in the public wrappers (``jaxmoe.ops``, ``jaxmoe.fused_moe``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _config, _launch
from ._config import GemmTile, MoEConfig
from ._launch import KernelLaunch
from .kernels import moe_align as align_kernels
from .kernels import moe_gemm as gemm_kernels
from .ops import max_padded_rows

# Rows handled by one program of the alignment; up to this many the whole alignment is
# one launch (decode), beyond it three (count, offsets, scatter).
ALIGN_CHUNK = 1024


def _sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def max_blocks(num_rows: int, num_experts: int, block_size: int) -> int:
    """Upper bound on the padded blocks (``jaxmoe.ops.max_padded_rows`` / block_size)."""
    return max_padded_rows(num_rows, num_experts, block_size) // block_size


def current_arch() -> str:
    """The config arch of the default device: ``sm90`` on NVIDIA, ``gfx942``/``gfx950`` on AMD."""
    plat = _launch.platform()
    if plat == "rocm":
        kind = jax.devices()[0].device_kind.lower()
        return "gfx950" if ("mi35" in kind or "gfx950" in kind) else "gfx942"
    return "sm90"


# --------------------------------------------------------------------------- alignment


def plan_align(num_rows: int, num_experts: int, block_size: int) -> list[KernelLaunch]:
    """The launches of ``moe_align_block_size`` for ``num_rows`` = M * top_k ids."""
    nb = _next_pow2(num_experts + 1)
    blocks = max_blocks(num_rows, num_experts, block_size)
    positions = blocks * block_size
    fill = max(block_size, 256)
    i32 = jnp.int32
    common = dict(T=num_rows, NUM_EXPERTS=num_experts, NB=nb)
    outs = (_sds((positions,), i32), _sds((blocks,), i32), _sds((1,), i32))
    if num_rows <= ALIGN_CHUNK:
        chunk = max(_next_pow2(num_rows), 16)
        return [KernelLaunch(
            align_kernels.moe_align_single_kernel, grid=(1,),
            args=(_sds((num_rows,), i32),),
            outs=outs + (_sds((nb,), i32),) * 3,
            constexprs=tuple({**common, "LOG2_NB": nb.bit_length() - 1, "BLOCK_SIZE": block_size,
                              "MAX_BLOCKS": blocks, "CHUNK": chunk, "FILL": fill}.items()),
            num_warps=4, num_stages=1)]
    chunks = -(-num_rows // ALIGN_CHUNK)
    count = KernelLaunch(
        align_kernels.moe_align_count_kernel, grid=(chunks,),
        args=(_sds((num_rows,), i32),), outs=(_sds((chunks, nb), i32),),
        constexprs=tuple({**common, "CHUNK": ALIGN_CHUNK}.items()), num_warps=4, num_stages=1)
    offsets = KernelLaunch(
        align_kernels.moe_align_offsets_kernel, grid=(1,),
        args=(_sds((chunks, nb), i32),),
        outs=(_sds((chunks, nb), i32), _sds((nb,), i32), _sds((nb,), i32), _sds((1,), i32)),
        constexprs=(("NUM_CHUNKS", chunks), ("NUM_EXPERTS", num_experts), ("NB", nb), ("BLOCK_SIZE", block_size)),
        num_warps=4, num_stages=1)
    scatter = KernelLaunch(
        align_kernels.moe_align_scatter_kernel, grid=(chunks + -(-positions // fill),),
        args=(_sds((num_rows,), i32), _sds((chunks, nb), i32), _sds((nb,), i32), _sds((nb,), i32)),
        outs=outs[:2],
        constexprs=tuple({**common, "LOG2_NB": nb.bit_length() - 1, "BLOCK_SIZE": block_size,
                          "MAX_BLOCKS": blocks, "NUM_CHUNKS": chunks, "CHUNK": ALIGN_CHUNK,
                          "FILL": fill}.items()),
        num_warps=4, num_stages=1)
    return [count, offsets, scatter]


def moe_align_block_size(topk_ids: jax.Array, num_experts: int, block_size: int
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Triton ``moe_align_block_size``; see ``jaxmoe.ops.moe_align_block_size`` for the contract."""
    ids = topk_ids.reshape(-1).astype(jnp.int32)
    if ids.shape[0] == 0:  # no rows: nothing to launch
        empty = jnp.zeros((0,), jnp.int32)
        return empty, empty, jnp.zeros((1,), jnp.int32)
    plan = plan_align(ids.shape[0], num_experts, block_size)
    if len(plan) == 1:
        sorted_ids, expert_ids, padded, *_ = _launch.launch(plan[0], ids)
        return sorted_ids, expert_ids, padded
    count, offsets, scatter = plan
    (counts,) = _launch.launch(count, ids)
    bases, end_real, block_ends, padded = _launch.launch(offsets, counts)
    sorted_ids, expert_ids = _launch.launch(scatter, ids, bases, end_real, block_ends)
    return sorted_ids, expert_ids, padded


# --------------------------------------------------------------------------- grouped GEMM


def plan_gemm(*, a_shape: tuple[int, int], b_shape: tuple[int, int, int], dtype: Any, num_rows: int,
              top_k: int, block_m: int, num_blocks: int, tile: GemmTile, activation: str | None,
              mul_routed_weight: bool, arch: str = "sm90") -> KernelLaunch:
    """One grouped GEMM: C[num_rows, N_out] from A rows gathered by sorted id and B[expert]."""
    a_rows, k = a_shape
    num_experts, n, k_b = b_shape
    if k_b != k:
        raise ValueError(f"A has K={k} but B has K={k_b}")
    n_out = n // 2 if activation else n
    need = tile.shared_bytes(block_m, jnp.dtype(dtype).itemsize, activation is not None)
    if need > _config.SHARED_MEMORY_LIMIT[arch]:
        # else the launch fails on the device with a driver error, or a compile error ahead of time
        raise ValueError(
            f"{tile} with BLOCK_M={block_m} needs {need} bytes of shared memory for its software pipeline, "
            f"more than the {_config.SHARED_MEMORY_LIMIT[arch]} a program gets on {arch}: "
            "use fewer num_stages or a smaller block_k or block_n")
    n_blocks = -(-n_out // tile.block_n)
    positions = num_blocks * block_m
    constexprs = {
        "NUM_ROWS": num_rows, "N_OUT": n_out, "K": k, "TOP_K": top_k,
        "stride_am": k, "stride_be": n * k, "stride_bn": k, "stride_bk": 1, "stride_cm": n_out,
        "NUM_M_BLOCKS": num_blocks, "BLOCK_M": block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k,
        "GROUP_SIZE_M": tile.group_size_m, "FUSE_ACTIVATION": activation is not None,
        "ACTIVATION": activation or "none", "MUL_ROUTED_WEIGHT": mul_routed_weight,
        "NUM_XCDS": _config.NUM_XCDS[arch],
        "FP32_IEEE": jnp.dtype(dtype) == jnp.float32,
        "SPLIT_TAIL": _config.split_tail(num_rows, num_experts, block_m),
    }
    i32 = jnp.int32
    args = (
        _sds((a_rows, k), dtype), _sds((num_experts, n, k), dtype), _sds((positions,), i32),
        _sds((num_blocks,), i32), _sds((1,), i32),
        _sds((num_rows,) if mul_routed_weight else (1,), jnp.float32),
    )
    amd = {"waves_per_eu": 2 if block_m <= 32 else 0, "matrix_instr_nonkdim": 16, "kpack": 1}
    return KernelLaunch(
        gemm_kernels.moe_gemm_kernel, grid=(num_blocks * n_blocks,), args=args,
        outs=(_sds((num_rows, n_out), dtype),), constexprs=tuple(constexprs.items()),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
        amd_options=tuple(amd.items()) if arch.startswith("gfx") else ())


def _gemm(a: jax.Array, b: jax.Array, sorted_token_ids: jax.Array, expert_ids: jax.Array,
          num_tokens_post_padded: jax.Array, *, top_k: int, num_rows: int, block_m: int, tile: GemmTile,
          topk_weights: jax.Array | None, activation: str | None) -> jax.Array:
    spec = plan_gemm(a_shape=a.shape, b_shape=b.shape, dtype=a.dtype, num_rows=num_rows, top_k=top_k,
                     block_m=block_m, num_blocks=expert_ids.shape[0], tile=tile, activation=activation,
                     mul_routed_weight=topk_weights is not None, arch=current_arch())
    weights = (topk_weights.reshape(-1).astype(jnp.float32) if topk_weights is not None
               else jnp.zeros((1,), jnp.float32))
    (c,) = _launch.launch(spec, a, b, sorted_token_ids.astype(jnp.int32), expert_ids.astype(jnp.int32),
                          num_tokens_post_padded.reshape(1).astype(jnp.int32), weights)
    return c


def moe_gemm(a: jax.Array, b: jax.Array, sorted_token_ids: jax.Array, expert_ids: jax.Array,
             num_tokens_post_padded: jax.Array, *, top_k: int, num_rows: int, block_size: int,
             topk_weights: jax.Array | None = None, activation: str | None = None) -> jax.Array:
    """Triton grouped GEMM; see ``jaxmoe.ops.moe_gemm`` for the contract (rows no block covers are 0)."""
    n_out = b.shape[1] // 2 if activation else b.shape[1]
    if num_rows == 0 or expert_ids.shape[0] == 0:  # no row block: every row is uncovered, so 0
        return jnp.zeros((num_rows, n_out), a.dtype)
    config = _config.select_config(max(num_rows // top_k, 1), top_k, b.shape[0], a.shape[1], n_out, a.dtype,
                                   current_arch())
    tile = config.stage1 if activation else config.stage2
    c = _gemm(a, b, sorted_token_ids, expert_ids, num_tokens_post_padded, top_k=top_k, num_rows=num_rows,
              block_m=block_size, tile=tile, topk_weights=topk_weights, activation=activation)
    covered = jnp.zeros((num_rows,), bool).at[sorted_token_ids].set(True, mode="drop")
    return jnp.where(covered[:, None], c, jnp.zeros((), c.dtype))


# --------------------------------------------------------------------------- whole layer


def fused_moe(hidden_states: jax.Array, w1: jax.Array, w2: jax.Array, topk_weights: jax.Array,
              topk_ids: jax.Array, *, activation: str = "silu", config: MoEConfig | None = None) -> jax.Array:
    """Two-stage Triton MoE: align, gate/up GEMM with the activation fused, down GEMM with
    the routing weight fused, then the sum over the k slots. Shapes as ``jaxmoe.fused_moe``."""
    m, d = hidden_states.shape
    num_experts, two_i, _ = w1.shape
    top_k = topk_ids.shape[1]
    if m * top_k == 0:
        return jnp.zeros((m, d), hidden_states.dtype)
    if config is None:
        config = _config.select_config(m, top_k, num_experts, d, two_i // 2, hidden_states.dtype, current_arch())
    ids = topk_ids.astype(jnp.int32)
    aligned = moe_align_block_size(ids, num_experts, config.block_m)
    return _experts(hidden_states, w1, w2, topk_weights, ids, *aligned, config=config, activation=activation)


def _experts(hidden_states: jax.Array, w1: jax.Array, w2: jax.Array, topk_weights: jax.Array, ids: jax.Array,
             sorted_ids: jax.Array, expert_ids: jax.Array, padded: jax.Array, *, config: MoEConfig,
             activation: str) -> jax.Array:
    """Both GEMM stages and the sum over the k slots, on aligned rows."""
    m, d = hidden_states.shape
    num_experts = w1.shape[0]
    top_k = ids.shape[1]
    common = dict(num_rows=m * top_k, block_m=config.block_m)
    h = _gemm(hidden_states, w1, sorted_ids, expert_ids, padded, top_k=top_k, tile=config.stage1,
              topk_weights=None, activation=activation, **common)
    y = _gemm(h, w2, sorted_ids, expert_ids, padded, top_k=1, tile=config.stage2,
              topk_weights=topk_weights, activation=None, **common)
    # Rows of out-of-range ids were never written: they contribute nothing.
    valid = (ids >= 0) & (ids < num_experts)
    y = jnp.where(valid[..., None], y.reshape(m, top_k, d).astype(jnp.float32), 0.0)
    return jnp.sum(y, axis=1).astype(hidden_states.dtype)


# --------------------------------------------------------------------------- routing + experts

ROUTE_ALIGN_MAX_ROW_BLOCKS = 2  # rows one program routes before two launches win


def plan_route_align(m: int, num_experts: int, top_k: int, logits_dtype: Any, block_size: int, *,
                     scoring: str = "softmax", renormalize: bool = True, num_expert_group: int | None = None,
                     topk_group: int | None = None, bias_dtype: Any = None,
                     routed_scaling_factor: float = 1.0) -> KernelLaunch | None:
    """The single launch that routes ``[m, E]`` logits and aligns the chosen ids to
    ``block_size`` rows, or None where a routing launch plus an alignment launch serve
    better: more rows than one program routes in ``ROUTE_ALIGN_MAX_ROW_BLOCKS`` tiles, or
    more ids than one program aligns."""
    from . import _routing_triton
    from .kernels import route_align

    if m < 1:
        return None
    route = _routing_triton.plan_route(m, num_experts, top_k, logits_dtype, scoring=scoring,
                                       renormalize=renormalize, num_expert_group=num_expert_group,
                                       topk_group=topk_group, bias_dtype=bias_dtype,
                                       routed_scaling_factor=routed_scaling_factor)
    num_rows = m * top_k
    if num_rows > ALIGN_CHUNK:
        return None
    cx = dict(route.constexprs)
    block_m = max(1, min(_next_pow2(m), 2048 // cx["E_POW2"]))  # <= 16 fp32 values a thread at 4 warps
    row_blocks = -(-m // block_m)
    if row_blocks > ROUTE_ALIGN_MAX_ROW_BLOCKS:
        return None
    (align,) = plan_align(num_rows, num_experts, block_size)
    acx = dict(align.constexprs)
    constexprs = {**cx, "BLOCK_M": block_m, "HAS_BIAS": bias_dtype is not None, "NUM_ROW_BLOCKS": row_blocks,
                  **{key: acx[key] for key in ("NB", "LOG2_NB", "BLOCK_SIZE", "MAX_BLOCKS", "CHUNK", "FILL")}}
    bias = route.args[1] if bias_dtype is not None else _sds((1,), jnp.float32)
    return KernelLaunch(route_align.route_align_kernel, grid=(1,), args=(route.args[0], bias),
                        outs=route.outs + align.outs, constexprs=tuple(constexprs.items()), num_warps=4,
                        num_stages=1)


def routed_moe(hidden_states: jax.Array, w1: jax.Array, w2: jax.Array, logits: jax.Array, top_k: int, *,
               activation: str = "silu", scoring: str = "softmax", renormalize: bool = True,
               num_expert_group: int | None = None, topk_group: int | None = None,
               correction_bias: jax.Array | None = None, routed_scaling_factor: Any = 1.0) -> jax.Array:
    """Routing then experts, ``fused_moe(x, w1, w2, *route(logits, top_k, ...))``, with the
    routing and the alignment in one launch where the batch is small (decode)."""
    from . import _routing_triton

    m, d = hidden_states.shape
    num_experts, two_i, _ = w1.shape
    options = dict(scoring=scoring, renormalize=renormalize, num_expert_group=num_expert_group,
                   topk_group=topk_group)
    logits, bias = _routing_triton.kernel_inputs(logits, correction_bias)
    scale = _routing_triton._static_float(routed_scaling_factor)
    spec = None
    config = None
    if m * top_k and _routing_triton.kernel_serves(num_experts, top_k):
        config = _config.select_config(m, top_k, num_experts, d, two_i // 2, hidden_states.dtype, current_arch())
        spec = plan_route_align(m, num_experts, top_k, logits.dtype, config.block_m, **options,
                                bias_dtype=None if bias is None else bias.dtype,
                                routed_scaling_factor=1.0 if scale is None else scale)
    if spec is None:
        weights, ids = _routing_triton.route(logits, top_k, **options, correction_bias=correction_bias,
                                             routed_scaling_factor=routed_scaling_factor)
        return fused_moe(hidden_states, w1, w2, weights, ids, activation=activation, config=config)
    bias_arg = bias if bias is not None else jnp.zeros((1,), jnp.float32)
    weights, ids, sorted_ids, expert_ids, padded, *_ = _launch.launch(spec, logits, bias_arg)
    if scale is None:
        weights = weights * jnp.asarray(routed_scaling_factor, jnp.float32)
    return _experts(hidden_states, w1, w2, weights, ids, sorted_ids, expert_ids, padded, config=config,
                    activation=activation)


def plan_fused_moe(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int, dtype: Any,
                   arch: str, activation: str = "silu", config: MoEConfig | None = None) -> list[KernelLaunch]:
    """Every launch ``fused_moe`` makes for these shapes on ``arch`` (for AOT compilation)."""
    if config is None:
        config = _config.select_config(num_tokens, top_k, num_experts, hidden, intermediate, dtype, arch)
    num_rows = num_tokens * top_k
    blocks = max_blocks(num_rows, num_experts, config.block_m)
    common = dict(dtype=dtype, num_rows=num_rows, block_m=config.block_m, num_blocks=blocks, arch=arch)
    return [
        *plan_align(num_rows, num_experts, config.block_m),
        plan_gemm(a_shape=(num_tokens, hidden), b_shape=(num_experts, 2 * intermediate, hidden), top_k=top_k,
                  tile=config.stage1, activation=activation, mul_routed_weight=False, **common),
        plan_gemm(a_shape=(num_rows, intermediate), b_shape=(num_experts, hidden, intermediate), top_k=1,
                  tile=config.stage2, activation=None, mul_routed_weight=True, **common),
    ]


__all__ = ["moe_align_block_size", "moe_gemm", "fused_moe", "routed_moe", "plan_route_align", "plan_align", "plan_gemm", "plan_fused_moe",
           "max_blocks", "current_arch", "MoEConfig", "GemmTile"]
