"""Triton grouped GEMM: plans one ``moe_gemm_kernel`` launch and runs it.

The layer's weight shapes (K, N, strides, top_k, expert count) are compile-time constants;
the batch size (rows of C) is a runtime argument and the number of row blocks comes from
the grid, so one compiled kernel serves every batch size that selects the same tile.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.backends.launch import KernelLaunch, launch
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.gemm.config import GemmTile, a_scheme_for
from jaxmoe.types import FP8_MAX, INT8_MAX, QUANT_BLOCK, WEIGHT_SCHEMES, QuantizedWeights, RoutingData

__all__ = ["plan_gemm", "gemm", "splits_a", "split_k_tiles", "grouped_gemm", "plan_act_quant", "quantize_rows",
           "plan_act_backward", "act_backward", "plan_weight_grad", "weight_grad", "expert_offsets", "WEIGHT_GRAD_TILE"]



def _b_layout(b_shape: tuple[int, ...], transpose_b: bool) -> tuple[int, int, int, int, int]:
    """``(E, N, K, stride_n, stride_k)`` of a contiguous B read as ``[E, N, K]``: stored so
    (``transpose_b=False``) or as ``[E, K, N]`` (``transpose_b=True``, read through strides)."""
    if transpose_b:
        num_experts, k, n = b_shape
        return num_experts, n, k, 1, n
    num_experts, n, k = b_shape
    return num_experts, n, k, k, 1

def _sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def _activation_constexprs(activation: Any) -> dict[str, Any]:
    """``ACTIVATION`` (a name), ``ALPHA`` and ``LIMIT`` (the clamped SwiGLU's, else 0) of an activation."""
    from jaxmoe.types import ClampedSwiGLU

    if isinstance(activation, ClampedSwiGLU):
        return {"ACTIVATION": "clamped_swiglu", "ALPHA": activation.alpha, "LIMIT": activation.limit}
    if activation == "clamped_swiglu":
        return _activation_constexprs(ClampedSwiGLU())
    return {"ACTIVATION": activation or "none", "ALPHA": 0.0, "LIMIT": 0.0}


def _gate_up_constexprs(gate_up: str, n_out: int) -> dict[str, int]:
    """B index of gate j is ``j * GATE_STEP``, of its up ``+ UP_SHIFT``."""
    if gate_up not in ("concat", "interleaved"):
        raise ValueError(f"gate_up must be 'concat' or 'interleaved', got {gate_up!r}")
    return {"GATE_STEP": 2, "UP_SHIFT": 1} if gate_up == "interleaved" else {"GATE_STEP": 1, "UP_SHIFT": n_out}


A_SCHEMES = ("none", "fp8_token", "fp8_group", "int8_token")


def scale_layout(w_scheme: str, n: int, k: int) -> dict[str, int]:
    """``stride_se``, ``stride_sn``, ``GROUP_N``, ``GROUP_K`` of B's scales for ``[E, n, k]`` weights."""
    spec = WEIGHT_SCHEMES[w_scheme]
    if not spec.scale_axes:
        return {"stride_se": 0, "stride_sn": 0, "GROUP_N": 1, "GROUP_K": 1}
    scale_shape = spec.expected_scales((1, n, k // 2 if spec.packed else k))
    per_expert = int(np.prod(scale_shape[1:])) if len(scale_shape) > 1 else 1
    stride_sn = scale_shape[2] if len(scale_shape) == 3 else (1 if len(scale_shape) == 2 else 0)
    return {"stride_se": per_expert, "stride_sn": stride_sn, "GROUP_N": spec.group_n or 1,
            "GROUP_K": spec.group_k or 1}


def check_scheme_tile(w_scheme: str, a_scheme: str, block_k: int) -> None:
    """Raise unless a K tile of ``block_k`` can serve these schemes: per-K-block scales need
    the tile inside one group, 128-channel activation groups need the tile to be one group,
    mxfp4 needs whole 32-value scale groups, 8-bit dots need K tiles of at least 32."""
    spec = WEIGHT_SCHEMES[w_scheme]
    if w_scheme in ("fp8_block", "int4", "int4_zp") and spec.group_k % block_k:
        raise ValueError(f"weight scheme {w_scheme!r} needs block_k dividing {spec.group_k}, got {block_k}")
    if a_scheme == "fp8_group" and block_k != spec.group_k:
        raise ValueError(f"per-128-channel activation scales need block_k = {spec.group_k}, got {block_k}")
    if a_scheme != "none" and block_k < 32:
        raise ValueError(f"8-bit dots need block_k >= 32, got {block_k}")
    if w_scheme == "mxfp4" and block_k % spec.group_k:
        raise ValueError(f"mxfp4 weights need block_k a multiple of {spec.group_k} (whole scale groups), got {block_k}")


def _has_bias(bias: Any) -> bool:
    return bias is not None and bias is not False


def _bias_sds(bias: Any, num_experts: int, n: int, dtype: Any) -> jax.ShapeDtypeStruct:
    """The bias input of a plan: ``[E, N]`` in the bias's dtype (True: the GEMM's), else a
    size-1 fp32 placeholder. The kernel reads it as stored and adds it in fp32, so no call
    converts a bias first (an extra pass, and at decode sizes an extra launch)."""
    if not _has_bias(bias):
        return _sds((1,), jnp.float32)
    return _sds((num_experts, n), dtype if bias is True else jnp.dtype(bias))


def _bias_arg(bias: jax.Array | None) -> Any:
    """What a call passes to its plan for ``bias``: its dtype, or None."""
    return None if bias is None else jnp.dtype(bias.dtype)


def plan_gemm(*, a_shape: tuple[int, int], b_shape: tuple[int, int, int], dtype: Any, num_rows: int,
              top_k: int, block_m: int, num_blocks: int, tile: GemmTile, activation: Any,
              mul_routed_weight: bool, arch: str = "sm90", transpose_b: bool = False,
              out_dtype: Any = None, split_tail: bool = True, gate_up: str = "concat",
              bias: Any = False, w_scheme: str = "none", b_dtype: Any = None,
              act_quant: str | None = None, c_perm_k: int = 0) -> KernelLaunch:
    """One grouped GEMM: C[num_rows, N_out] from A rows gathered by sorted id and B[expert].

    ``b_shape`` is B's stored shape: ``[E, N, K]``, or with ``transpose_b`` ``[E, K, N]``
    (B read transposed through its strides, no copy: the backward's ``dy @ w2[e]`` and
    ``d gate_up @ w1[e]``, and the ``"in_out"`` weight layouts). ``out_dtype`` is C's dtype
    (default ``dtype``; fp32 keeps the accumulator unrounded). ``split_tail=False`` keeps
    mostly-padding blocks at full height (the backward's GEMMs: one compiled kernel fewer
    per tile). With an ``activation`` (a name or a :class:`~jaxmoe.ClampedSwiGLU`),
    ``gate_up`` says how B's N axis holds gate and up (``"concat"``: gate rows then up rows;
    ``"interleaved"``: alternating). ``bias``: an ``[E, N]`` bias input added in fp32 in the
    epilogue, read in its own dtype (a float dtype; True: ``dtype``); False or None: none.

    Quantized B: ``w_scheme`` (a key of ``WEIGHT_SCHEMES``; ``b_shape`` stays the logical
    ``[E, N, K]``, stored ``[out, in]``), ``b_dtype`` its stored values' dtype (the fp8 type
    of the arch), ``act_quant`` None, ``"fp8"`` or ``"int8"`` (A rounded per token in the kernel).

    ``tile.split_k`` = S > 1 (without an activation or ``act_quant``): S programs per C
    tile, each summing its range of K into ``C [S, num_rows, N_out]`` in fp32, which
    :func:`gemm` sums (more loads in flight where a decode layer has few tiles).

    int4 / int4_zp B with :func:`~jaxmoe.ops.gemm.config.int4_split` on: A is read with
    each K tile's even columns stored first (``A_SPLIT``; :func:`split_k_tiles` makes that
    layout). ``c_perm_k`` > 0 writes C's columns in that layout for a consumer whose K
    tiles are ``c_perm_k`` wide (stage 1 feeding such a stage 2; ``N_out`` a multiple of it).

    ``tile.prequant_a`` (with ``act_quant`` only): A arrives rounded to ``b_dtype`` by
    :func:`plan_act_quant`'s launch, with its fp32 scales as a second input (``[a_rows]``,
    or ``[a_rows, ceil(K / 128)]`` against fp8_block weights); else it is ``dtype`` and
    each program rounds its tiles itself.
    """
    from jaxmoe.ops.gemm import kernels

    a_rows, k = a_shape
    num_experts, n, k_b, stride_bn, stride_bk = _b_layout(b_shape, transpose_b)
    if k_b != k:
        raise ValueError(f"A has K={k} but B has K={k_b}")
    spec_w = WEIGHT_SCHEMES[w_scheme]
    a_scheme = a_scheme_for(w_scheme, act_quant)
    if w_scheme != "none":
        if transpose_b:
            raise ValueError("quantized weights are read untransposed only (no backward through them)")
        check_scheme_tile(w_scheme, a_scheme, tile.block_k)
        if spec_w.packed and k % 2:
            raise ValueError(f"4-bit weights need an even K, got {k}")
    b_dtype = jnp.dtype(dtype if w_scheme == "none" else b_dtype)
    if spec_w.packed:  # rows of K / 2 bytes
        stride_bn = k // 2
    n_out = n // 2 if activation else n
    if tile.prequant_a and a_scheme == "none":
        raise ValueError("prequant_a needs act_quant (it rounds A to 8 bits before the GEMM)")
    split = tile.split_k
    if split > 1 and (activation is not None or a_scheme != "none"):
        raise ValueError(f"split_k={split} needs a GEMM without a fused activation or act_quant "
                         f"(the activation and the per-token scales need all of K)")
    need = tile.shared_bytes(block_m, jnp.dtype(dtype).itemsize, activation is not None,
                             b_itemsize=None if w_scheme == "none" else 1)
    if need > _config.SHARED_MEMORY_LIMIT[arch]:
        # else the launch fails on the device with a driver error, or a compile error ahead of time
        raise ValueError(
            f"{tile} with BLOCK_M={block_m} needs {need} bytes of shared memory for its software pipeline, "
            f"more than the {_config.SHARED_MEMORY_LIMIT[arch]} a program gets on {arch}: "
            "use fewer num_stages or a smaller block_k or block_n")
    if c_perm_k and (c_perm_k % 2 or n_out % c_perm_k):
        raise ValueError(f"c_perm_k={c_perm_k} must be even and divide the output columns ({n_out})")
    n_blocks = -(-n_out // tile.block_n)
    positions = num_blocks * block_m
    constexprs = {
        "N_OUT": n_out, "K": k, "TOP_K": top_k, "NUM_EXPERTS": num_experts,
        "stride_am": k, "stride_be": n * (k // 2 if spec_w.packed else k), "stride_bn": stride_bn,
        "stride_bk": stride_bk, "stride_cm": n_out,
        **_gate_up_constexprs(gate_up if activation else "concat", n_out),
        "BLOCK_M": block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k,
        "GROUP_SIZE_M": tile.group_size_m, "FUSE_ACTIVATION": activation is not None,
        "ACTIVATION": None, "MUL_ROUTED_WEIGHT": mul_routed_weight,
        "NUM_XCDS": _config.NUM_XCDS[arch],
        "FP32_IEEE": jnp.dtype(dtype) == jnp.float32,
        "SPLIT_TAIL": _config.split_tail(num_rows, num_experts, block_m) if split_tail else 0,
        "HAS_BIAS": _has_bias(bias), "ALPHA": None, "LIMIT": None,
        "W_SCHEME": w_scheme, "A_SCHEME": a_scheme,
        "SWAP_AB": _config.swap_ab(w_scheme, a_scheme),
        "SCALED_DOT": _config.scaled_dot(w_scheme, jnp.dtype(dtype), arch),
        "PTX_CONVERT": not arch.startswith("gfx"),
        "SPLIT_K": split,
        "PREQUANT_A": tile.prequant_a, "stride_as": a_scale_groups(a_scheme, k),
        "FP8_MMA_ACC": _config.fp8_mma_accumulate(a_scheme),
        "B_DESC": _config.b_descriptor_view(
            arch=arch, w_scheme=w_scheme, a_scheme=a_scheme, transpose_b=transpose_b,
            fused=activation is not None, gate_up=gate_up, a_itemsize=jnp.dtype(dtype).itemsize,
            b_itemsize=b_dtype.itemsize, n=n, k=k, block_n=tile.block_n, block_k=tile.block_k,
            requested=tile.tma),
        "A_SPLIT": _config.int4_split(w_scheme=w_scheme, a_scheme=a_scheme, k=k, block_k=tile.block_k),
        "C_PERM_K": int(c_perm_k),
        "QMAX": (FP8_MAX[b_dtype.name] if a_scheme.startswith("fp8") else INT8_MAX if a_scheme != "none" else 1.0),
        **scale_layout(w_scheme, n, k),
    }
    constexprs.update(_activation_constexprs(activation))
    i32 = jnp.int32
    stored = (num_experts, n, k // 2) if spec_w.packed else tuple(b_shape)
    scales = spec_w.expected_scales(stored)
    scale_dtype = jnp.uint8 if w_scheme == "mxfp4" else jnp.float32
    if tile.prequant_a:
        a_args = (_sds((a_rows, k), b_dtype), _sds(act_quant_scales_shape(a_rows, k, a_scheme), jnp.float32))
    else:
        a_args = (_sds((a_rows, k), dtype), _sds((1,), jnp.float32))
    args = (
        *a_args, _sds(stored, b_dtype), _sds(scales or (1,), scale_dtype),
        _sds(scales if spec_w.zero_points else (1,), jnp.uint8), _sds((positions,), i32),
        _sds((num_blocks,), i32), _sds((1,), i32),
        _sds((num_rows,) if mul_routed_weight else (1,), jnp.float32),
        _bias_sds(bias, num_experts, n, dtype),
    )
    amd = {"waves_per_eu": 2 if block_m <= 32 else 0, "matrix_instr_nonkdim": 16, "kpack": 1}
    return KernelLaunch(
        kernels.moe_gemm_kernel, grid=(num_blocks * n_blocks * split,), args=args, scalars=(("num_rows", num_rows),),
        outs=(_sds((num_rows, n_out), out_dtype or dtype) if split == 1
              else _sds((split, num_rows, n_out), jnp.float32),),
        constexprs=tuple(constexprs.items()),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
        amd_options=tuple(amd.items()) if arch.startswith("gfx") else ())


ACT_GROUP = QUANT_BLOCK  # channels per activation scale of "fp8_group" (DeepSeek-V3's 1 x 128)
ACT_QUANT_ROWS = 8  # rows per program of the rounding pass
ACT_QUANT_BLOCK_K = 512  # columns a step of its per-token rounding


def a_scale_groups(a_scheme: str, k: int) -> int:
    """Scales per row of rounded A: ``ceil(K / 128)`` per-channel-group ones against
    fp8_block weights, else 1."""
    return -(-k // ACT_GROUP) if a_scheme == "fp8_group" else 1


def act_quant_scales_shape(rows: int, k: int, a_scheme: str) -> tuple[int, ...]:
    """The fp32 scales of ``[rows, K]`` activations rounded per ``a_scheme``."""
    return (rows, a_scale_groups(a_scheme, k)) if a_scheme == "fp8_group" else (rows,)


def plan_act_quant(*, rows: int, k: int, dtype: Any, a_scheme: str, q_dtype: Any) -> KernelLaunch:
    """``act_quant_kernel``: ``a [rows, K]`` in ``dtype`` rounded to ``q_dtype`` (fp8 or
    int8) with fp32 scales :func:`act_quant_scales_shape`, per ``a_scheme`` (``"fp8_token"``,
    ``"int8_token"``, ``"fp8_group"``): what a GEMM with ``tile.prequant_a`` reads. ``rows``
    is a runtime argument; one compiled kernel serves every row count."""
    from jaxmoe.backends.launch import next_pow2
    from jaxmoe.ops.gemm import kernels

    if a_scheme not in A_SCHEMES[1:]:
        raise ValueError(f"a_scheme must be one of {A_SCHEMES[1:]}, got {a_scheme!r}")
    q_dtype = jnp.dtype(q_dtype)
    qmax = FP8_MAX[q_dtype.name] if a_scheme.startswith("fp8") else INT8_MAX
    block_k = ACT_GROUP if a_scheme == "fp8_group" else min(ACT_QUANT_BLOCK_K, next_pow2(k))
    constexprs = {"K": k, "A_SCHEME": a_scheme, "QMAX": qmax, "GROUP_K": ACT_GROUP, "BLOCK_R": ACT_QUANT_ROWS,
                  "BLOCK_K": block_k}
    return KernelLaunch(kernels.act_quant_kernel, grid=(max(1, -(-rows // ACT_QUANT_ROWS)),),
                        args=(_sds((rows, k), dtype),), scalars=(("num_rows", rows),),
                        outs=(_sds((rows, k), q_dtype), _sds(act_quant_scales_shape(rows, k, a_scheme), jnp.float32)),
                        constexprs=tuple(constexprs.items()), num_warps=4, num_stages=1)


def quantize_rows(a: jax.Array, a_scheme: str, q_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(q, scales)``: ``a [rows, K]`` rounded once (:func:`plan_act_quant`)."""
    spec = plan_act_quant(rows=a.shape[0], k=a.shape[1], dtype=a.dtype, a_scheme=a_scheme, q_dtype=q_dtype)
    q, scales = launch(spec, a)
    return q, scales


class FP8ConversionWarning(UserWarning):
    """fp8 weights of the other e4m3 type than the kernels multiply on this platform: each
    call converts them (exactly), a pass over the weights that a one-time conversion saves."""


def kernel_weights(b: Any, arch: str) -> tuple[str, jax.Array, jax.Array, jax.Array]:
    """``(scheme, values, scales, zero_points)`` as the GEMM kernel reads them on ``arch``:
    fp8 values in the arch's fp8 type (:func:`jaxmoe.quantize.with_fp8_dtype` converts,
    exactly, a pass over the weights), scales in fp32 (uint8 for mxfp4), size-1
    placeholders where a scheme has none."""
    from jaxmoe.backends.platform import fp8_dtype
    from jaxmoe.quantize import with_fp8_dtype

    if not isinstance(b, QuantizedWeights) or b.scheme == "none":
        values = b.values if isinstance(b, QuantizedWeights) else b
        return "none", values, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.uint8)
    if b.scheme.startswith("fp8"):
        target = fp8_dtype(arch)
        if jnp.dtype(b.values.dtype) != target:
            warnings.warn(f"{b.scheme} weights in {jnp.dtype(b.values.dtype).name} are converted to {target.name}, "
                          f"the fp8 type the kernels multiply on {arch}, in every call (a pass over the weights): "
                          f"convert them once with jaxmoe.quantize.with_fp8_dtype(w, "
                          f"jaxmoe.backends.platform.fp8_dtype())", FP8ConversionWarning, stacklevel=2)
        b = with_fp8_dtype(b, target)
    scales = jnp.asarray(b.scales)
    scales = scales.astype(jnp.uint8 if b.scheme == "mxfp4" else jnp.float32)
    zeros = jnp.asarray(b.zero_points) if b.zero_points is not None else jnp.zeros((1,), jnp.uint8)
    return b.scheme, jnp.asarray(b.values), scales, zeros


def gemm(a: jax.Array, b: Any, routing: RoutingData, *, tile: GemmTile, arch: str,
         topk_weights: jax.Array | None, activation: Any, transpose_b: bool = False,
         out_dtype: Any = None, split_tail: bool = True, gate_up: str = "concat",
         bias: jax.Array | None = None, act_quant: str | None = None, a_split: bool = False,
         c_perm_k: int = 0) -> jax.Array:
    """One launch over ``routing``'s layout. Rows no live sorted position covers are left
    unwritten: the caller masks them (or, in the fused layer, never reads them). ``bias``:
    ``[E, N]`` any float (added in fp32 in the epilogue), or None. ``b`` is an array in
    ``a``'s dtype or a :class:`~jaxmoe.QuantizedWeights`; ``act_quant`` rounds ``a`` per
    token inside the kernel. Where the plan reads A split (:func:`splits_a`), ``a`` is put
    in that layout first unless ``a_split`` says it is already (a stage 1 wrote it with
    ``c_perm_k``); ``a_split`` where the plan does not split is a ValueError."""
    top_k = routing.top_k if a.shape[0] * routing.top_k == routing.num_rows else 1
    scheme, values, scales, zeros = kernel_weights(b, arch)
    spec = plan_gemm(a_shape=a.shape, b_shape=b.shape, dtype=a.dtype, num_rows=routing.num_rows, top_k=top_k,
                     block_m=routing.block_size, num_blocks=routing.num_blocks, tile=tile, activation=activation,
                     mul_routed_weight=topk_weights is not None, arch=arch, transpose_b=transpose_b,
                     out_dtype=out_dtype, split_tail=split_tail, gate_up=gate_up, bias=_bias_arg(bias),
                     w_scheme=scheme, b_dtype=values.dtype, act_quant=act_quant, c_perm_k=c_perm_k)
    if dict(spec.constexprs)["A_SPLIT"]:
        if not a_split:
            a = split_k_tiles(a, tile.block_k)
    elif a_split:
        raise ValueError("a_split=True: A arrives with its K tiles split, but this GEMM reads it as stored")
    weights = (topk_weights.reshape(-1).astype(jnp.float32) if topk_weights is not None
               else jnp.zeros((1,), jnp.float32))
    bias = bias if bias is not None else jnp.zeros((1,), jnp.float32)
    if tile.prequant_a:  # A rounded once, before the GEMM (plan_gemm has checked act_quant)
        a, a_scales = quantize_rows(a, a_scheme_for(scheme, act_quant), values.dtype)
    else:
        a_scales = jnp.zeros((1,), jnp.float32)
    (c,) = launch(spec, a, a_scales, values, scales, zeros, routing.sorted_token_ids.astype(jnp.int32),
                  routing.expert_ids.astype(jnp.int32),
                  routing.num_tokens_post_padded.reshape(1).astype(jnp.int32), weights, bias)
    if tile.split_k > 1:  # the K splits' fp32 partial sums
        c = jnp.sum(c, axis=0).astype(out_dtype or a.dtype)
    return c


def splits_a(b: Any, k: int, tile: GemmTile, act_quant: str | None = None) -> bool:
    """Whether :func:`gemm` with weights ``b`` (K = ``k``) and ``tile`` reads A with each K
    tile's even columns first (``A_SPLIT``)."""
    scheme = b.scheme if isinstance(b, QuantizedWeights) else "none"
    return _config.int4_split(w_scheme=scheme, a_scheme=a_scheme_for(scheme, act_quant), k=k, block_k=tile.block_k)


def split_k_tiles(a: jax.Array, block_k: int) -> jax.Array:
    """``a [rows, K]`` (K a multiple of ``block_k``, which is even) with each ``block_k``
    tile of columns reordered: its even columns, then its odd ones."""
    rows, k = a.shape
    return a.reshape(rows, k // block_k, block_k // 2, 2).swapaxes(2, 3).reshape(rows, k)


def covered_rows(routing: RoutingData) -> jax.Array:
    """``[num_rows] bool``: rows that some sorted position below the padded count, in a block
    of a valid expert, names (the rows a GEMM writes)."""
    positions = jnp.arange(routing.sorted_token_ids.shape[0], dtype=jnp.int32)
    block_expert = routing.expert_ids.astype(jnp.int32)[positions // routing.block_size]
    ids = routing.sorted_token_ids.astype(jnp.int32)
    live = ((positions < routing.num_tokens_post_padded.reshape(-1)[0].astype(jnp.int32))
            & (block_expert >= 0) & (block_expert < routing.num_experts) & (ids >= 0) & (ids < routing.num_rows))
    target = jnp.where(live, ids, routing.num_rows)
    return jnp.zeros((routing.num_rows,), bool).at[target].set(True, mode="drop")


def grouped_gemm(a: jax.Array, b: jax.Array, routing: RoutingData, *, topk_weights: jax.Array | None = None,
                 activation: str | None = None, tile: GemmTile | None = None) -> jax.Array:
    """Triton grouped GEMM; see :func:`jaxmoe.ops.grouped_gemm` for the contract (uncovered rows are 0)."""
    from jaxmoe.backends.platform import arch_for, default_platform

    n_out = b.shape[1] // 2 if activation else b.shape[1]
    if routing.num_rows == 0 or routing.num_blocks == 0:  # no row block: every row is uncovered, so 0
        return jnp.zeros((routing.num_rows, n_out), a.dtype)
    arch = arch_for(default_platform())
    if tile is None:
        tile = stage_tile(a, b, routing, activation, arch)
    c = gemm(a, b, routing, tile=tile, arch=arch, topk_weights=topk_weights, activation=activation)
    return jnp.where(covered_rows(routing)[:, None], c, jnp.zeros((), c.dtype))


def stage_tile(a: jax.Array, b: jax.Array, routing: RoutingData, activation: str | None, arch: str) -> GemmTile:
    """The tile the fused layer would use for this GEMM: stage 1 (activation fused, ``b`` is
    ``w1 [E, 2I, D]``) or stage 2 (``b`` is ``w2 [E, D, I]``), keyed by the layer's shape."""
    e, n, k = (int(d) for d in b.shape)
    m = max(routing.num_tokens, 1)
    if activation:
        tile = _config.select_config(m, routing.top_k, e, k, n // 2, a.dtype, arch).stage1
    else:
        tile = _config.select_config(m, routing.top_k, e, n, k, a.dtype, arch).stage2
    return _config._fit(tile, routing.block_size, a.dtype, arch, activation is not None)


# --------------------------------------------------------------------------- backward


def plan_act_backward(*, a_shape: tuple[int, int], b_shape: tuple[int, int, int], dtype: Any, num_rows: int,
                      top_k: int, block_m: int, num_blocks: int, tile: GemmTile, activation: Any,
                      arch: str = "sm90", transpose_b: bool = False, gate_up: str = "concat",
                      bias: Any = False) -> KernelLaunch:
    """Stage 1 backward, ``moe_gemm_act_bwd_kernel``: ``d gate_up [num_rows, 2I]`` (columns in
    B's gate/up order) from A ``[a_rows, K]`` (rows ``f // top_k``), ``B = w1 [E, 2I, K]``
    (``[E, K, 2I]`` with ``transpose_b``) and ``dh [num_rows, I]``, all in ``dtype``, plus an
    ``[E, 2I]`` bias input with ``bias`` (its dtype, or True: ``dtype``); the stage-1 tile
    (its pipeline needs the forward's shared memory)."""
    from jaxmoe.ops.gemm import kernels

    a_rows, k = a_shape
    num_experts, n, k_b, stride_bn, stride_bk = _b_layout(b_shape, transpose_b)
    if k_b != k or n % 2:
        raise ValueError(f"need A [rows, K] and B [E, 2I, K], got A{list(a_shape)} and B{list(b_shape)}")
    need = tile.shared_bytes(block_m, jnp.dtype(dtype).itemsize, True)
    if need > _config.SHARED_MEMORY_LIMIT[arch]:
        raise ValueError(f"{tile} with BLOCK_M={block_m} needs {need} bytes of shared memory, more than the "
                         f"{_config.SHARED_MEMORY_LIMIT[arch]} a program gets on {arch}")
    n_out = n // 2
    constexprs = {
        "N_OUT": n_out, "K": k, "TOP_K": top_k, "NUM_EXPERTS": num_experts,
        "stride_am": k, "stride_be": n * k, "stride_bn": stride_bn, "stride_bk": stride_bk,
        **_gate_up_constexprs(gate_up, n_out),
        "BLOCK_M": block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "GROUP_SIZE_M": tile.group_size_m,
        "ACTIVATION": None, "NUM_XCDS": _config.NUM_XCDS[arch], "FP32_IEEE": jnp.dtype(dtype) == jnp.float32,
        "HAS_BIAS": _has_bias(bias), "ALPHA": None, "LIMIT": None,
        "B_DESC": _config.b_descriptor_view(
            arch=arch, w_scheme="none", a_scheme="none", transpose_b=transpose_b, fused=True, gate_up=gate_up,
            a_itemsize=jnp.dtype(dtype).itemsize, b_itemsize=jnp.dtype(dtype).itemsize, n=n, k=k,
            block_n=tile.block_n, block_k=tile.block_k, requested=tile.tma),
    }
    constexprs.update(_activation_constexprs(activation))
    i32 = jnp.int32
    args = (_sds((a_rows, k), dtype), _sds(b_shape, dtype), _sds((num_rows, n_out), dtype),
            _sds((num_blocks * block_m,), i32), _sds((num_blocks,), i32), _sds((1,), i32),
            _bias_sds(bias, num_experts, n, dtype))
    amd = {"waves_per_eu": 2 if block_m <= 32 else 0, "matrix_instr_nonkdim": 16, "kpack": 1}
    return KernelLaunch(
        kernels.moe_gemm_act_bwd_kernel, grid=(num_blocks * -(-n_out // tile.block_n),), args=args,
        scalars=(("num_rows", num_rows),), outs=(_sds((num_rows, n), dtype),),
        constexprs=tuple(constexprs.items()), num_warps=tile.num_warps, num_stages=tile.num_stages,
        amd_options=tuple(amd.items()) if arch.startswith("gfx") else ())


def act_backward(a: jax.Array, w1: jax.Array, dh: jax.Array, routing: RoutingData, *, tile: GemmTile, arch: str,
                 activation: Any, transpose_b: bool = False, gate_up: str = "concat",
                 bias: jax.Array | None = None) -> jax.Array:
    """``d gate_up [num_rows, 2I]`` in ``a``'s dtype (columns in w1's gate/up order); rows no
    live sorted position covers are left unwritten."""
    top_k = routing.top_k if a.shape[0] * routing.top_k == routing.num_rows else 1
    spec = plan_act_backward(a_shape=a.shape, b_shape=w1.shape, dtype=a.dtype, num_rows=routing.num_rows,
                             top_k=top_k, block_m=routing.block_size, num_blocks=routing.num_blocks, tile=tile,
                             activation=activation, arch=arch, transpose_b=transpose_b, gate_up=gate_up,
                             bias=_bias_arg(bias))
    bias = bias if bias is not None else jnp.zeros((1,), jnp.float32)
    (c,) = launch(spec, a, w1, dh, routing.sorted_token_ids.astype(jnp.int32), routing.expert_ids.astype(jnp.int32),
                  routing.num_tokens_post_padded.reshape(1).astype(jnp.int32), bias)
    return c


# The weight-gradient tile (BLOCK_N, BLOCK_K, num_warps, num_stages, BLOCK_R) by BLOCK_M
# and arch: config.weight_grad_tile.
WEIGHT_GRAD_TILE = _config.WEIGHT_GRAD_TILE


def plan_weight_grad(*, g_shape: tuple[int, int], a_shape: tuple[int, int], num_experts: int, dtype: Any,
                     out_dtype: Any, num_rows: int, top_k_g: int, top_k_a: int, block_m: int, num_blocks: int,
                     mul_routed_weight: bool, arch: str | None = None,
                     tile: tuple[int, int, int, int, int] | None = None, k_group: int | None = None
                     ) -> KernelLaunch:
    """The grouped weight gradient, ``moe_weight_grad_kernel``: ``C [E, N, K]`` in
    ``out_dtype`` from ``G [g_rows, N]`` and ``A [a_rows, K]`` (both ``dtype``), programs of
    output tiles, the tile from :func:`~jaxmoe.ops.gemm.config.weight_grad_tile`
    (``arch`` None: the small tile, which fits every target) unless ``tile``
    ``(BLOCK_N, BLOCK_K, num_warps, num_stages, BLOCK_R)`` is given; each program runs
    ``k_group`` output tiles along K (None: :func:`~jaxmoe.ops.gemm.config.weight_grad_k_group`
    of the mean rows per expert)."""
    from jaxmoe.ops.gemm import kernels

    (g_rows, n), (a_rows, k) = g_shape, a_shape
    block_n, block_k, num_warps, num_stages, block_r = tile or _config.weight_grad_tile(block_m, dtype, arch)
    if block_m % block_r or block_r < 16:
        raise ValueError(f"BLOCK_M={block_m} must be a multiple of 16 for the weight gradient")
    num_k_blocks = -(-k // block_k)
    if k_group is None:
        k_group = _config.weight_grad_k_group(num_rows / num_experts, block_r, num_k_blocks)
    k_group = max(1, min(int(k_group), num_k_blocks))
    constexprs = {
        "N_OUT": n, "K": k, "TOP_K_G": top_k_g, "TOP_K_A": top_k_a, "NUM_EXPERTS": num_experts,
        "stride_gm": n, "stride_am": k, "BLOCK_R": block_r, "BLOCK_N": block_n, "BLOCK_K": block_k,
        "K_GROUP": k_group,
        "MUL_ROUTED_WEIGHT": mul_routed_weight, "FP32_IEEE": jnp.dtype(dtype) == jnp.float32,
    }
    i32 = jnp.int32
    args = (_sds(g_shape, dtype), _sds(a_shape, dtype), _sds((num_blocks * block_m,), i32),
            _sds((num_experts + 1,), i32), _sds((num_rows if mul_routed_weight else 1,), jnp.float32))
    grid = num_experts * -(-n // block_n) * -(-num_k_blocks // k_group)
    return KernelLaunch(kernels.moe_weight_grad_kernel, grid=(grid,), args=args, scalars=(("num_rows", num_rows),),
                        outs=(_sds((num_experts, n, k), out_dtype),), constexprs=tuple(constexprs.items()),
                        num_warps=num_warps, num_stages=num_stages)


def expert_offsets(routing: RoutingData) -> jax.Array:
    """``[E + 1] int32``: expert e's rows sit at sorted positions ``[off[e], off[e + 1])``.

    Relies on the layout's contract: the used blocks (below ``num_tokens_post_padded``) come
    grouped by ascending expert id. Blocks of ids outside ``[0, E)`` count for no expert.
    """
    e = routing.num_experts
    blocks = jnp.arange(routing.num_blocks, dtype=jnp.int32)
    ids = routing.expert_ids.astype(jnp.int32)
    used = ((blocks * routing.block_size < routing.num_tokens_post_padded.reshape(-1)[0].astype(jnp.int32))
            & (ids >= 0) & (ids < e))
    counts = jnp.zeros((e + 1,), jnp.int32).at[jnp.where(used, ids, e)].add(1)[:e]
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)]) * routing.block_size


def weight_grad(g: jax.Array, a: jax.Array, routing: RoutingData, *, out_dtype: Any,
                topk_weights: jax.Array | None = None, arch: str | None = None,
                tile: tuple[int, int, int, int, int] | None = None, k_group: int | None = None) -> jax.Array:
    """``C [E, N, K]``: per expert, the sum over its rows f of ``w_f * G[f]^T A[f]``, where
    a ``[M, *]`` operand is read at row ``f // top_k`` and a ``[M * top_k, *]`` one at ``f``.
    Deterministic; an expert without rows gets zeros. ``tile``, ``k_group``: see :func:`plan_weight_grad`."""
    def top_k_of(x: jax.Array) -> int:
        return routing.top_k if x.shape[0] * routing.top_k == routing.num_rows else 1

    spec = plan_weight_grad(g_shape=g.shape, a_shape=a.shape, num_experts=routing.num_experts, dtype=a.dtype,
                            out_dtype=out_dtype, num_rows=routing.num_rows, top_k_g=top_k_of(g), top_k_a=top_k_of(a),
                            block_m=routing.block_size, num_blocks=routing.num_blocks,
                            mul_routed_weight=topk_weights is not None, arch=arch, tile=tile,
                            k_group=k_group)
    weights = (topk_weights.reshape(-1).astype(jnp.float32) if topk_weights is not None
               else jnp.zeros((1,), jnp.float32))
    (c,) = launch(spec, g, a, routing.sorted_token_ids.astype(jnp.int32), expert_offsets(routing), weights)
    return c
