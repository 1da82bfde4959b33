"""Triton fused MoE: alignment, stage 1 (gate/up with the activation), stage 2 (down with
the routing weight), and the sum over the k slots; with the routing folded into the
alignment's launch at small sizes (:func:`routed_moe`); at decode sizes both take the
two-launch decode path of :mod:`jaxmoe.ops.moe.decode` instead.

``plan_*`` functions return :class:`~jaxmoe.backends.launch.KernelLaunch` descriptions, used
both to run and, in CI, to compile every kernel ahead of time for gfx942, gfx950 and sm_90.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.backends.launch import KernelLaunch, launch, next_pow2
from jaxmoe.backends.platform import arch_for, default_platform
from jaxmoe.ops import checks
from jaxmoe.ops.alignment import triton as align_triton
from jaxmoe.ops.alignment.reference import max_blocks
from jaxmoe.ops.moe import backward
from jaxmoe.ops.moe import decode as _decode
from jaxmoe.ops.moe.reference import unwrap_weights
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.gemm import triton as gemm_triton
from jaxmoe.ops.gemm.config import MoEConfig
from jaxmoe.ops.routing import triton as routing_triton
from jaxmoe.types import QuantizedWeights, RoutingData

__all__ = ["fused_moe", "routed_moe", "experts", "plan_route_align", "plan_fused_moe", "plan_fused_moe_backward",
           "plan_routed_moe", "current_arch",
           "ROUTE_ALIGN_MAX_ROW_BLOCKS"]


def current_arch() -> str:
    """The config arch kernels are planned for here (that of the default platform)."""
    return arch_for(default_platform())


def _layer_config(m: int, top_k: int, w1: Any, dtype: Any, arch: str, layout: str = "out_in",
                  act_quant: str | None = None) -> MoEConfig:
    num_experts, two_i, d = w1.shape
    if layout.startswith("in_out"):
        num_experts, d, two_i = w1.shape
    return _config.select_config(m, top_k, num_experts, d, two_i // 2, dtype, arch, weight_scheme(w1), act_quant)


def weight_scheme(w: Any) -> str:
    """The weight scheme of ``w1``/``w2`` as the kernels see it (plain arrays: ``"none"``)."""
    return w.scheme if isinstance(w, QuantizedWeights) else "none"


def _quant_features(w1: Any, w2: Any, act_quant: str | None) -> tuple[str, ...]:
    """Quantized weights and activations, which only the aligned path's kernels take."""
    out = [f"{name} scheme {weight_scheme(w)!r}" for name, w in (("w1", w1), ("w2", w2)) if weight_scheme(w) != "none"]
    return tuple(out) + ((f"act_quant={act_quant!r}",) if act_quant is not None else ())


def fused_moe(hidden_states: jax.Array, w1: Any, w2: Any, topk_weights: jax.Array, topk_ids: jax.Array, *,
              activation: Any = "silu", config: MoEConfig | None = None, remat: bool = False,
              b1: jax.Array | None = None, b2: jax.Array | None = None, layout: str = "out_in",
              decode: bool | None = None, act_quant: str | None = None,
              save_gate_up: bool | None = None) -> jax.Array:
    """Two-stage Triton MoE; shapes and contract as :func:`jaxmoe.fused_moe`. ``config``
    overrides the tuned or heuristic block configuration (the tuner passes candidates).
    ``decode``: True/False forces the decode path (:mod:`jaxmoe.ops.moe.decode`) or the
    aligned one; None lets ``JAXMOE_DECODE`` or the size rule choose. Quantized
    ``w1``/``w2`` (and ``act_quant``) run the aligned path's quantized K loops; their
    gradients are refused (:mod:`jaxmoe.ops.moe.backward`).

    Differentiable in ``hidden_states``, ``w1``, ``w2``, ``b1``, ``b2`` and ``topk_weights``
    through Triton kernels (:mod:`jaxmoe.ops.moe.backward`, which says what is saved);
    ``remat=True`` recomputes stage 1's output ``[M*k, I]`` in the backward instead of saving it;
    ``save_gate_up=True`` saves stage 1's pre-activation ``[M*k, 2I]`` instead, so that the
    backward runs no stage-1 GEMM (None: ``JAXMOE_SAVE_GATE_UP``)."""
    w1, w2 = unwrap_weights(w1), unwrap_weights(w2)
    m, d = hidden_states.shape
    top_k = topk_ids.shape[1]
    if m * top_k == 0:
        return jnp.zeros((m, d), hidden_states.dtype)
    choice = _decode.choose(m, hidden_states.dtype, decode=decode, config=config,
                            features=_decode.features_in_use(activation, layout, b1, b2)
                            + _quant_features(w1, w2, act_quant))
    if choice.decode:
        return _decode.fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation,
                                 aligned=_fused_aligned, choice=choice,
                                 aligned_options=(("activation", activation), ("remat", remat),
                                                  ("save_gate_up", save_gate_up)))
    _decode.log_choice("fused_moe", m, top_k, w1.shape, hidden_states.dtype, choice)
    arch = current_arch()
    if config is None:
        config = _layer_config(m, top_k, w1, hidden_states.dtype, arch, layout, act_quant)
    ids = checks.as_ids(topk_ids, "topk_ids")
    aligned = align_triton.moe_align_block_size(ids, w1.shape[0], config.block_m)
    routing = RoutingData(*aligned, topk_ids=ids, topk_weights=topk_weights.astype(jnp.float32),
                          block_size=config.block_m, num_experts=w1.shape[0], top_k=top_k, num_rows=m * top_k)
    return experts(hidden_states, w1, w2, routing, config=config, activation=activation, arch=arch, remat=remat,
                   b1=b1, b2=b2, layout=layout, act_quant=act_quant, save_gate_up=save_gate_up)


def _fused_aligned(hidden_states: jax.Array, w1: jax.Array, w2: jax.Array, topk_weights: jax.Array,
                   topk_ids: jax.Array, *, activation: str, remat: bool, save_gate_up: bool | None = None
                   ) -> jax.Array:
    """:func:`fused_moe` on the aligned path (what the decode path differentiates)."""
    return fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation, remat=remat,
                     decode=False, save_gate_up=save_gate_up)


def experts(hidden_states: jax.Array, w1: Any, w2: Any, routing: RoutingData, *, config: MoEConfig,
            activation: Any, arch: str, remat: bool = False, b1: jax.Array | None = None,
            b2: jax.Array | None = None, layout: str = "out_in", act_quant: str | None = None,
            save_gate_up: bool | None = None) -> jax.Array:
    """Both GEMM stages and the sum over the k slots, on aligned rows; differentiable by the
    Triton backward of :mod:`jaxmoe.ops.moe.backward` (``remat``, ``save_gate_up``: see there)."""
    return backward.experts(hidden_states, w1, w2, routing, config=config, activation=activation, arch=arch,
                            remat=remat, b1=b1, b2=b2, layout=layout, act_quant=act_quant,
                            save_gate_up=save_gate_up)


# --------------------------------------------------------------------------- routing + experts

ROUTE_ALIGN_MAX_ROW_BLOCKS = 2  # rows one program routes before two launches win


def plan_route_align(m: int, num_experts: int, top_k: int, logits_dtype: Any, block_size: int, *,
                     scoring: str = "softmax", renormalize: bool = True, num_expert_group: int | None = None,
                     topk_group: int | None = None, bias_dtype: Any = None,
                     routed_scaling_factor: float = 1.0, group_scoring: str | None = None,
                     logit_bias_dtype: Any = None, shared_experts: int = 0) -> KernelLaunch | None:
    """The single launch that routes ``[m, E]`` logits and aligns the chosen ids to
    ``block_size`` rows, or None where a routing launch plus an alignment launch serve
    better: more rows than one program routes in ``ROUTE_ALIGN_MAX_ROW_BLOCKS`` tiles, or
    more ids than one program aligns. ``logit_bias_dtype``: with a router bias ``[E]``
    added to the logits in the kernel (None: none). ``shared_experts`` S: every token also
    takes the experts ``E .. E + S - 1`` with weight 1 (slots ``top_k ..``), aligned with
    the routed ones over ``E + S`` experts."""
    from jaxmoe.ops.moe import kernels

    if m < 1:
        return None
    route = routing_triton.plan_route(m, num_experts, top_k, logits_dtype, scoring=scoring,
                                      renormalize=renormalize, num_expert_group=num_expert_group,
                                      topk_group=topk_group, bias_dtype=bias_dtype,
                                      routed_scaling_factor=routed_scaling_factor, group_scoring=group_scoring)
    shared = int(shared_experts)
    slots, all_experts = top_k + shared, num_experts + shared
    num_rows = m * slots
    if num_rows > align_triton.ALIGN_CHUNK:
        return None
    cx = dict(route.constexprs)
    block_m = max(1, 2048 // cx["E_POW2"])  # <= 16 fp32 values a thread at 4 warps
    if -(-m // block_m) > ROUTE_ALIGN_MAX_ROW_BLOCKS:
        return None
    (align,) = align_triton.plan_align(num_rows, all_experts, block_size)
    acx = dict(align.constexprs)
    constexprs = {**cx, "BLOCK_M": block_m, "HAS_BIAS": bias_dtype is not None,
                  **{key: acx[key] for key in ("NB", "LOG2_NB", "BLOCK_SIZE", "CHUNK", "FILL")},
                  "HAS_LOGIT_BIAS": logit_bias_dtype is not None, "SHARED": shared,
                  "S_POW2": next_pow2(shared)}
    placeholder = jax.ShapeDtypeStruct((1,), jnp.float32)
    bias = route.args[1] if bias_dtype is not None else placeholder
    logit_bias = (placeholder if logit_bias_dtype is None
                  else jax.ShapeDtypeStruct((num_experts,), jnp.dtype(logit_bias_dtype)))
    outs = (jax.ShapeDtypeStruct((m, slots), jnp.float32), jax.ShapeDtypeStruct((m, slots), jnp.int32))
    return KernelLaunch(kernels.route_align_kernel, grid=(1,), args=(route.args[0], bias, logit_bias),
                        scalars=(("M", m), ("max_blocks", max_blocks(num_rows, all_experts, block_size))),
                        outs=outs + align.outs, constexprs=tuple(constexprs.items()), num_warps=4,
                        num_stages=1)


def routed_moe(hidden_states: jax.Array, w1: Any, w2: Any, logits: jax.Array, top_k: int, *,
               activation: Any = "silu", scoring: str = "softmax", renormalize: bool = True,
               num_expert_group: int | None = None, topk_group: int | None = None,
               correction_bias: jax.Array | None = None, routed_scaling_factor: Any = 1.0,
               remat: bool = False, group_scoring: str | None = None, return_routing: bool = False,
               b1: jax.Array | None = None, b2: jax.Array | None = None, layout: str = "out_in",
               decode: bool | None = None, act_quant: str | None = None, logit_bias: jax.Array | None = None,
               shared_experts: int = 0, shared_weights: jax.Array | None = None
               ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Routing then experts, ``fused_moe(x, w1, w2, *route(logits, top_k, ...))``, with the
    routing and the alignment in one launch where the batch is small, and at decode sizes
    in the two launches of :mod:`jaxmoe.ops.moe.decode` (``decode``: as in
    :func:`fused_moe`). Beyond what
    the routing kernel serves (``E > 4096`` or ``top_k > 64``) the reference routes and the
    kernels compute the experts. ``return_routing`` returns ``(y, topk_weights, topk_ids)``
    (the routed slots only).

    ``logit_bias [E]``: a router bias added to the logits (in fp32, inside the routing
    launch where it can be). ``shared_experts`` S: ``w1``/``w2`` hold ``E + S`` experts
    against ``logits [M, E]``; every token also takes experts ``E .. E + S - 1`` in the
    same launches, with weight 1 or ``shared_weights [M, S]`` (float).

    Differentiable in ``hidden_states``, ``w1``, ``w2``, ``logits``, ``logit_bias``,
    ``shared_weights`` and a traced ``routed_scaling_factor``: the experts by the Triton
    backward, the routing weights by differentiating their recomputation at the chosen ids
    (:func:`~jaxmoe.ops.moe.backward.routing_weights`); ``correction_bias`` gets none."""
    w1, w2 = unwrap_weights(w1), unwrap_weights(w2)
    m, d = hidden_states.shape
    shared = int(shared_experts)
    num_experts = w1.shape[0] - shared  # routed experts, the logits' columns
    slots = top_k + shared
    expert_options = dict(b1=b1, b2=b2, layout=layout, act_quant=act_quant)
    weight_scoring = scoring
    # top-k of the logits then a softmax over the k is the same choice and, mathematically,
    # the same weights as softmax, top-k, renormalize: the kernels compute the latter
    scoring = routing_triton.kernel_scoring(scoring)
    options = dict(scoring=scoring, renormalize=renormalize, num_expert_group=num_expert_group,
                   topk_group=topk_group, group_scoring=group_scoring)
    scale = routing_triton._static_float(routed_scaling_factor)
    # The logits the weights are differentiated through (the kernel adds the bias itself).
    diff_logits = logits if logit_bias is None else logits.astype(jnp.float32) + logit_bias.astype(jnp.float32)
    if m * top_k:
        features = _decode.features_in_use(activation, layout, b1, b2) + _quant_features(w1, w2, act_quant)
        features += ("shared experts in the launch",) * bool(shared)
        choice = _decode.choose(m, hidden_states.dtype, decode=decode, routed_scale=scale, num_experts=num_experts,
                                top_k=top_k, features=features)
        if choice.decode:
            y, weights, ids = _decode.routed_moe(
                hidden_states, w1, w2, diff_logits, top_k, activation=activation, correction_bias=correction_bias,
                aligned=_routed_aligned, routing={**options, "routed_scaling_factor": scale},
                aligned_options=(("remat", remat),), choice=choice)
            return (y, weights, ids) if return_routing else y
        _decode.log_choice("routed_moe", m, slots, w1.shape, hidden_states.dtype, choice)
    weight_options = dict(scoring=weight_scoring, renormalize=renormalize,
                          routed_scaling_factor=1.0 if scale is None else scale, shared_experts=shared)
    # The kernels see constants: the gradient reaches the logits through routing_weights only.
    kernel_logits, bias = routing_triton.kernel_inputs(jax.lax.stop_gradient(logits),
                                                       None if correction_bias is None
                                                       else jax.lax.stop_gradient(correction_bias))
    arch = current_arch()
    spec = None
    config = None
    if m * top_k and routing_triton.kernel_serves(num_experts, top_k):
        config = _layer_config(m, slots, w1, hidden_states.dtype, arch, layout, act_quant)
        spec = plan_route_align(m, num_experts, top_k, kernel_logits.dtype, config.block_m, **options,
                                bias_dtype=None if bias is None else bias.dtype,
                                routed_scaling_factor=1.0 if scale is None else scale,
                                logit_bias_dtype=None if logit_bias is None else logit_bias.dtype,
                                shared_experts=shared)

    def with_shared_weights(weights: jax.Array) -> jax.Array:
        # shared_weights replace the shared slots' 1s (after routing_weights, so they keep
        # their own gradient)
        if shared_weights is None:
            return weights
        return jnp.concatenate([weights[:, :top_k], shared_weights.astype(jnp.float32)], axis=1)

    def finish(weights: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        # a traced routed_scaling_factor scales the routed slots only
        if scale is None:
            factor = jnp.asarray(routed_scaling_factor, jnp.float32)
            weights = weights * (factor if not shared else
                                 jnp.concatenate([jnp.full((top_k,), factor), jnp.ones((shared,), jnp.float32)]))
        return with_shared_weights(weights), ids

    def routed_only(y: jax.Array, weights: jax.Array, ids: jax.Array):
        if not return_routing:
            return y
        return (y, weights[:, :top_k], ids[:, :top_k]) if shared else (y, weights, ids)

    if spec is None:
        from jaxmoe.ops.routing import ROUTE

        route_logits = (kernel_logits if logit_bias is None
                        else jax.lax.stop_gradient(diff_logits))
        if not routing_triton.kernel_serves(num_experts, top_k):  # the reference routes, differentiably
            weights, ids = ROUTE.implementations["reference"].fn(
                diff_logits, top_k, **{**options, "scoring": weight_scoring}, correction_bias=correction_bias,
                routed_scaling_factor=routed_scaling_factor)
            weights, ids = _append_shared(weights, ids, num_experts, shared)
            weights = with_shared_weights(weights)  # the reference scaled the routed slots already
        else:
            weights, ids = ROUTE.implementations["triton"].fn(route_logits, top_k, **options, correction_bias=bias,
                                                              routed_scaling_factor=1.0 if scale is None else scale)
            weights, ids = _append_shared(weights, ids, num_experts, shared)
            weights = backward.routing_weights(diff_logits, ids, weights, **weight_options)
            weights, ids = finish(weights, ids)
        y = fused_moe(hidden_states, w1, w2, weights, ids, activation=activation, config=config, remat=remat,
                      **expert_options)
        return routed_only(y, weights, ids)
    bias_arg = bias if bias is not None else jnp.zeros((1,), jnp.float32)
    logit_bias_arg = jax.lax.stop_gradient(logit_bias) if logit_bias is not None else jnp.zeros((1,), jnp.float32)
    weights, ids, sorted_ids, expert_ids, padded, *_ = launch(spec, kernel_logits, bias_arg, logit_bias_arg)
    weights = backward.routing_weights(diff_logits, ids, weights, **weight_options)
    weights, ids = finish(weights, ids)
    routing = RoutingData(sorted_ids, expert_ids, padded, topk_ids=ids, topk_weights=weights,
                          block_size=config.block_m, num_experts=num_experts + shared, top_k=slots,
                          num_rows=m * slots)
    y = experts(hidden_states, w1, w2, routing, config=config, activation=activation, arch=arch, remat=remat,
                **expert_options)
    return routed_only(y, weights, ids)


def _append_shared(weights: jax.Array, ids: jax.Array, num_experts: int, shared: int
                   ) -> tuple[jax.Array, jax.Array]:
    """``[M, k]`` routing -> ``[M, k + shared]`` with the shared experts ``E ..`` at weight 1."""
    if not shared:
        return weights, ids
    m = ids.shape[0]
    shared_ids = jnp.broadcast_to(jnp.arange(num_experts, num_experts + shared, dtype=ids.dtype), (m, shared))
    return (jnp.concatenate([weights, jnp.ones((m, shared), weights.dtype)], axis=1),
            jnp.concatenate([ids, shared_ids], axis=1))


def _routed_aligned(hidden_states: jax.Array, w1: jax.Array, w2: jax.Array, logits: jax.Array, *, top_k: int,
                    **options: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`routed_moe` on the aligned path, with its routing (what the decode path differentiates)."""
    return routed_moe(hidden_states, w1, w2, logits, top_k, **options, return_routing=True, decode=False)


def plan_fused_moe(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int, dtype: Any,
                   arch: str, activation: Any = "silu", config: MoEConfig | None = None, *,
                   layout: str = "out_in", biases: bool = False, weights: str = "none",
                   act_quant: str | None = None) -> list[KernelLaunch]:
    """Every launch ``fused_moe`` makes for these shapes on ``arch`` on its aligned path (for
    AOT compilation; the decode path's are :func:`jaxmoe.ops.moe.decode.plan_decode`'s);
    ``biases``: with ``b1`` and ``b2``; ``weights``: ``w1``/``w2``'s weight scheme (fp8 in
    the arch's fp8 type), with ``act_quant``."""
    from jaxmoe.backends.platform import fp8_dtype

    if config is None:
        config = _config.select_config(num_tokens, top_k, num_experts, hidden, intermediate, dtype, arch, weights,
                                       act_quant)
    num_rows = num_tokens * top_k
    blocks = max_blocks(num_rows, num_experts, config.block_m)
    b_dtype = {"fp8": fp8_dtype(arch), "int8": jnp.int8, "none": dtype}.get(weights.split("_")[0], jnp.uint8)
    common = dict(dtype=dtype, num_rows=num_rows, block_m=config.block_m, num_blocks=blocks, arch=arch)
    if weights != "none" or act_quant is not None:
        common.update(w_scheme=weights, b_dtype=b_dtype, act_quant=act_quant)
    in_out = layout.startswith("in_out")
    w1_shape, w2_shape = checks.layout_shapes(layout, num_experts, hidden, intermediate)
    gate_up = "interleaved" if layout.endswith("interleaved") else "concat"
    a_scheme = gemm_triton.a_scheme_for(weights, act_quant)

    def rounding(tile: Any, rows: int, k: int) -> list[KernelLaunch]:  # A rounded before a GEMM
        return ([gemm_triton.plan_act_quant(rows=rows, k=k, dtype=dtype, a_scheme=a_scheme, q_dtype=b_dtype)]
                if tile.prequant_a else [])

    # stage 2 reading its A split (int4): stage 1 writes h in that layout
    split2 = _config.int4_split(w_scheme=weights, a_scheme=a_scheme, k=intermediate, block_k=config.stage2.block_k)
    return [
        *align_triton.plan_align(num_rows, num_experts, config.block_m),
        *rounding(config.stage1, num_tokens, hidden),
        gemm_triton.plan_gemm(a_shape=(num_tokens, hidden), b_shape=w1_shape, top_k=top_k, tile=config.stage1,
                              activation=activation, mul_routed_weight=False, transpose_b=in_out, gate_up=gate_up,
                              bias=biases, c_perm_k=config.stage2.block_k if split2 else 0, **common),
        *rounding(config.stage2, num_rows, intermediate),
        gemm_triton.plan_gemm(a_shape=(num_rows, intermediate), b_shape=w2_shape, top_k=1, tile=config.stage2,
                              activation=None, mul_routed_weight=True, transpose_b=in_out, bias=biases, **common),
    ]


def plan_fused_moe_backward(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int,
                            dtype: Any, arch: str, activation: Any = "silu", config: MoEConfig | None = None, *,
                            layout: str = "out_in", biases: bool = False,
                            save_gate_up: bool = False) -> list[KernelLaunch]:
    """Every launch the backward of ``fused_moe`` makes for these shapes on ``arch`` (for AOT
    compilation): stage 2 backward, stage 1 backward, dx, d w2, d w1 (and, with ``biases``,
    d b1 and d b2). With ``remat`` it also repeats the forward's stage-1 launch, already
    among :func:`plan_fused_moe`'s. With ``save_gate_up`` the stage-1 backward is no launch
    and the forward's stage 1 is a plain GEMM, listed in its place."""
    if config is None:
        config = _config.select_config(num_tokens, top_k, num_experts, hidden, intermediate, dtype, arch)
    num_rows = num_tokens * top_k
    blocks = max_blocks(num_rows, num_experts, config.block_m)
    common = dict(dtype=dtype, num_rows=num_rows, block_m=config.block_m, num_blocks=blocks)
    grad = dict(num_experts=num_experts, dtype=dtype, out_dtype=dtype, num_rows=num_rows, block_m=config.block_m,
                num_blocks=blocks, arch=arch)
    tiles = _config.backward_tiles(config, dtype, arch, hidden, intermediate)
    g_tile, dx_tile, fused_tile = tiles.g, tiles.dx, tiles.act
    in_out = layout.startswith("in_out")
    w1_shape, w2_shape = checks.layout_shapes(layout, num_experts, hidden, intermediate)
    gate_up = "interleaved" if layout.endswith("interleaved") else "concat"
    x_rows, h_rows, gu_rows = (num_tokens, hidden), (num_rows, intermediate), (num_rows, 2 * intermediate)
    wdy_rows = (num_rows, hidden)  # w[f] * dy[t], made in jnp for d w2 and d b2
    if save_gate_up:  # the forward's stage 1 without its activation (backward.experts_forward)
        gu_tile = tiles.gate_up
        stage1 = gemm_triton.plan_gemm(a_shape=x_rows, b_shape=w1_shape, top_k=top_k, tile=gu_tile, activation=None,
                                       mul_routed_weight=False, transpose_b=in_out, split_tail=False, bias=biases,
                                       arch=arch, **common)
    else:
        stage1 = gemm_triton.plan_act_backward(a_shape=x_rows, b_shape=w1_shape, top_k=top_k, tile=fused_tile,
                                               activation=activation, arch=arch, transpose_b=in_out,
                                               gate_up=gate_up, bias=biases, **common)
    plans = [
        gemm_triton.plan_gemm(a_shape=x_rows, b_shape=w2_shape, top_k=top_k, tile=g_tile, activation=None,
                              mul_routed_weight=False, transpose_b=not in_out, out_dtype=jnp.float32,
                              split_tail=False, arch=arch, **common),
        stage1,
        gemm_triton.plan_gemm(a_shape=gu_rows, b_shape=w1_shape, top_k=1, tile=dx_tile, activation=None,
                              mul_routed_weight=False, transpose_b=not in_out, out_dtype=jnp.float32,
                              split_tail=False, arch=arch, **common),
    ]
    if in_out:
        plans += [gemm_triton.plan_weight_grad(g_shape=h_rows, a_shape=wdy_rows, top_k_g=1, top_k_a=1,
                                               mul_routed_weight=False, **grad),
                  gemm_triton.plan_weight_grad(g_shape=x_rows, a_shape=gu_rows, top_k_g=top_k, top_k_a=1,
                                               mul_routed_weight=False, **grad)]
    else:
        plans += [gemm_triton.plan_weight_grad(g_shape=wdy_rows, a_shape=h_rows, top_k_g=1, top_k_a=1,
                                               mul_routed_weight=False, **grad),
                  gemm_triton.plan_weight_grad(g_shape=gu_rows, a_shape=x_rows, top_k_g=1, top_k_a=top_k,
                                               mul_routed_weight=False, **grad)]
    if biases:  # d b1 and d b2: a column of ones against d gate_up and w * dy
        ones = (num_rows, 1)
        plans += [gemm_triton.plan_weight_grad(g_shape=ones, a_shape=gu_rows, top_k_g=1, top_k_a=1,
                                               mul_routed_weight=False, **grad),
                  gemm_triton.plan_weight_grad(g_shape=ones, a_shape=wdy_rows, top_k_g=1, top_k_a=1,
                                               mul_routed_weight=False, **grad)]
    return plans


def plan_routed_moe(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int, dtype: Any,
                    arch: str, *, activation: str = "silu", logits_dtype: Any = jnp.float32, scoring: str = "softmax",
                    renormalize: bool = True, num_expert_group: int | None = None, topk_group: int | None = None,
                    bias_dtype: Any = None, routed_scaling_factor: float = 1.0,
                    group_scoring: str | None = None, layout: str = "out_in", biases: bool = False,
                    weights: str = "none", act_quant: str | None = None, logit_bias_dtype: Any = None,
                    shared_experts: int = 0) -> list[KernelLaunch]:
    """Every launch :func:`routed_moe` (the kernel path of ``moe_layer``) makes for these shapes,
    on the path the size rule (or ``JAXMOE_DECODE``) picks; ``num_experts`` counts the routed
    experts, ``shared_experts`` the stacked shared ones taken in the same launches."""
    if num_tokens * top_k == 0:
        return []
    scoring = routing_triton.kernel_scoring(scoring)
    options = dict(scoring=scoring, renormalize=renormalize, num_expert_group=num_expert_group,
                   topk_group=topk_group, bias_dtype=bias_dtype, routed_scaling_factor=routed_scaling_factor,
                   group_scoring=group_scoring)
    features = _decode.features_in_use(activation, layout, biases, biases)
    features += (f"weights={weights!r}",) * (weights != "none") + (f"act_quant={act_quant!r}",) * (act_quant is not None)
    features += ("shared experts in the launch",) * bool(shared_experts)
    if _decode.choose(num_tokens, dtype, num_experts=num_experts, top_k=top_k, features=features).decode:
        return _decode.plan_decode(num_tokens, top_k, num_experts, hidden, intermediate, dtype, activation=activation,
                                   routed=True, logits_dtype=logits_dtype, **options)
    slots, all_experts = top_k + shared_experts, num_experts + shared_experts
    config = _config.select_config(num_tokens, slots, all_experts, hidden, intermediate, dtype, arch, weights,
                                   act_quant)
    experts_plan = plan_fused_moe(num_tokens, slots, all_experts, hidden, intermediate, dtype, arch, activation,
                                  config=config, layout=layout, biases=biases, weights=weights, act_quant=act_quant)
    fused = plan_route_align(num_tokens, num_experts, top_k, logits_dtype, config.block_m, **options,
                             logit_bias_dtype=logit_bias_dtype, shared_experts=shared_experts)
    if fused is not None:  # the routing launch aligns too
        aligning = len(align_triton.plan_align(num_tokens * slots, all_experts, config.block_m))
        return [fused, *experts_plan[aligning:]]
    return [routing_triton.plan_route(num_tokens, num_experts, top_k, logits_dtype, **options), *experts_plan]
