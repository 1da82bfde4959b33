"""Triton routing: plans :class:`~jaxmoe.backends.launch.KernelLaunch`es and runs them.

One launch per routing call, whatever the mode (softmax/sigmoid, bias, groups,
renormalization, scaling all fold into compile-time switches of one kernel). The number
of tokens is a runtime argument; the row-block height is one of a few size classes.

Behaviour on bad numbers (the reference agrees): a NaN score counts as ``-inf`` when
experts are chosen, so every id is in ``[0, E)``; the chosen expert's weight is its
(NaN) score. A softmax row with a NaN or ``+inf`` logit, or with every logit ``-inf``,
is all NaN, so that row gets ids ``0..k-1`` (ties go to the lower id) and NaN weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.backends.launch import KernelLaunch, launch, next_pow2
from jaxmoe.ops import checks

__all__ = [
    "route",
    "kernel_inputs",
    "kernel_serves",
    "kernel_scoring",
    "unsupported_route",
    "unsupported_sigmoid_top1",
    "router_sigmoid_top1",
    "plan_route",
    "plan_sigmoid_top1",
    "aot_launches",
    "MAX_EXPERTS",
    "MAX_TOP_K",
    "MAX_TOP1_EXPERTS",
]

MAX_EXPERTS = 4096  # one row of logits lives in registers; 512 is the tuned range
MAX_TOP_K = 64
MAX_TOP1_EXPERTS = 1024  # the fused router keeps a [BLOCK_M >= 16, E] fp32 tile in registers
_SCORINGS = {"softmax": 0, "sigmoid": 1}
# Enough programs to fill an H100 (132 SMs) / MI300X (304 CUs) before blocks grow.
_TARGET_PROGRAMS = 256


def _kernels() -> Any:
    from jaxmoe.ops.routing import kernels as routing

    return routing


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """The static choices of a top-k routing launch, for the table in the bench."""

    block_m: int
    e_pow2: int
    num_warps: int


def _route_blocks(m: int, e: int) -> RoutePlan:
    e_pow2 = max(2, next_pow2(e))
    # Keep a block's [BLOCK_M, E_POW2] tile near 1K fp32 values (16 per thread at 2 warps),
    # then shrink BLOCK_M while that still leaves enough programs to fill the GPU. Measured
    # on an H100 at M=4096, E=256: 4 rows x 2 warps beat 8 x 4 and 2..32 rows x 1..8 warps.
    # The row count picks one of a few block heights (a compiled kernel each), never more.
    block_m = max(1, 1024 // e_pow2)
    while block_m > 1 and -(-m // block_m) < _TARGET_PROGRAMS and block_m * e_pow2 > 256:
        block_m //= 2
    tile = block_m * e_pow2
    num_warps = 2 if tile <= 1024 else 4 if tile <= 2048 else 8
    return RoutePlan(block_m, e_pow2, num_warps)


def plan_route(
    m: int,
    num_experts: int,
    top_k: int,
    logits_dtype: Any = jnp.float32,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    bias_dtype: Any = None,
    routed_scaling_factor: float = 1.0,
    group_scoring: str | None = None,
) -> KernelLaunch:
    """The launch that routes ``m`` rows of ``[m, num_experts]`` logits (``bias_dtype``
    None means no ``correction_bias``; ``group_scoring`` None means the default rule of
    :func:`jaxmoe.ops.checks.resolve_group_scoring`)."""
    e, k = int(num_experts), int(top_k)
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be one of {sorted(_SCORINGS)}, got {scoring!r}")
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"the Triton routing kernel takes 1..{MAX_EXPERTS} experts, got {e}")
    if not 1 <= k <= min(e, MAX_TOP_K):
        raise ValueError(f"top_k must be in [1, min(E={e}, {MAX_TOP_K})], got {k}")
    groups, topk_groups = 1, 1
    if num_expert_group is not None or topk_group is not None:
        if num_expert_group is None or topk_group is None:
            raise ValueError("num_expert_group and topk_group go together")
        groups, topk_groups = int(num_expert_group), int(topk_group)
        if groups < 1 or e % groups:
            raise ValueError(f"num_expert_group={groups} must divide the {e} experts")
        if not 1 <= topk_groups <= groups:
            raise ValueError(f"topk_group must be in [1, num_expert_group={groups}], got {topk_groups}")
        if topk_groups == groups:
            groups, topk_groups = 1, 1  # every group survives: plain top-k
    if group_scoring is not None and group_scoring not in checks.GROUP_SCORINGS:
        raise ValueError(f"group_scoring must be None or one of {checks.GROUP_SCORINGS}, got {group_scoring!r}")
    group_scoring = checks.resolve_group_scoring(group_scoring, bias_dtype)  # only whether a bias exists counts
    # Without groups the rule is moot: one compiled kernel serves both.
    group_top2 = groups > 1 and group_scoring == "top2_sum"
    plan = _route_blocks(m, e)
    k_pow2 = max(2, next_pow2(k))
    kern = _kernels()
    logits = jax.ShapeDtypeStruct((m, e), jnp.dtype(logits_dtype))
    args: tuple[jax.ShapeDtypeStruct, ...] = (logits,)
    kernel = kern.topk_route_kernel
    if bias_dtype is not None:
        args = (logits, jax.ShapeDtypeStruct((e,), jnp.dtype(bias_dtype)))
        kernel = kern.topk_route_biased_kernel
    return KernelLaunch(
        kernel=kernel,
        grid=(-(-m // plan.block_m),),
        args=args,
        scalars=(("M", m),),
        outs=(jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((m, k), jnp.int32)),
        constexprs=(
            ("E", e),
            ("K", k),
            ("E_POW2", plan.e_pow2),
            ("K_POW2", k_pow2),
            ("BLOCK_M", plan.block_m),
            ("SCORING", _SCORINGS[scoring]),
            ("RENORMALIZE", bool(renormalize)),
            ("NUM_GROUPS", groups),
            ("TOPK_GROUP", topk_groups),
            ("G_POW2", max(2, next_pow2(groups))),
            ("SCALE", float(routed_scaling_factor)),
            ("GROUP_TOP2", group_top2),
        ),
        num_warps=plan.num_warps,
        num_stages=1,
    )


def _static_float(value: Any) -> float | None:
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def kernel_inputs(logits: jax.Array, correction_bias: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """The logits ``[..., E]`` and the bias ``[E]`` (or None) in dtypes the routing kernels
    read: fp32, bf16 and fp16 as they are, any other dtype as fp32."""

    def readable(x: jax.Array) -> jax.Array:
        return x if x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16) else x.astype(jnp.float32)

    logits = readable(jnp.asarray(logits))
    if correction_bias is None:
        return logits, None
    bias = jnp.asarray(correction_bias)
    if bias.shape != (logits.shape[-1],):
        raise ValueError(f"correction_bias must have shape ({logits.shape[-1]},), got {bias.shape}")
    return logits, readable(bias)


def kernel_scoring(scoring: str) -> str:
    """The kernel's scoring mode for a routing ``scoring``: ``"topk_softmax"`` (top-k of the
    logits, then a softmax over the k, gpt-oss) picks the same ids as softmax-then-top-k
    and, renormalized, the same weights up to rounding, so the kernel computes it as that."""
    return "softmax" if scoring == "topk_softmax" else scoring


def kernel_serves(num_experts: int, top_k: int) -> bool:
    """Whether the routing kernels take this size (beyond it the reference serves)."""
    return num_experts <= MAX_EXPERTS and top_k <= MAX_TOP_K


def unsupported_route(logits: Any, top_k: int, **_: Any) -> str | None:
    """Why the routing kernel cannot serve these arguments, or None."""
    e = int(logits.shape[-1])
    if not kernel_serves(e, int(top_k)):
        return f"the kernel keeps a row of logits in registers: at most {MAX_EXPERTS} experts and top_k {MAX_TOP_K}"
    return None


def unsupported_sigmoid_top1(x: Any, w: Any, **_: Any) -> str | None:
    """Why the fused top-1 router cannot serve these arguments, or None."""
    if int(w.shape[1]) > MAX_TOP1_EXPERTS:
        return f"the fused router keeps a [16, E] tile in registers: at most {MAX_TOP1_EXPERTS} experts"
    return None


def route(
    logits: jax.Array,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: jax.Array | None = None,
    routed_scaling_factor: float = 1.0,
    group_scoring: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Triton routing: logits ``[..., E]`` -> (topk_weights ``[..., k]`` f32, topk_ids ``[..., k]`` i32).

    Semantics of :func:`jaxmoe.route`; one kernel launch. ``routed_scaling_factor`` is
    folded into the kernel when it is a Python number (a traced one costs a multiply).
    Differentiable in ``logits`` (and a traced ``routed_scaling_factor``): the weights'
    derivative is that of their recomputation at the kernel's ids
    (:func:`~jaxmoe.ops.routing.autodiff.routing_weights`); ``correction_bias`` gets none.
    """
    from jaxmoe.ops.routing import autodiff

    logits = jnp.asarray(logits)
    if logits.ndim < 1:
        raise ValueError(f"logits must be [..., E], got shape {logits.shape}")
    lead, e = logits.shape[:-1], logits.shape[-1]
    m = int(np.prod(lead, dtype=np.int64))
    k = int(top_k)
    diff_logits = logits
    # the kernel sees constants: the gradient reaches the logits through routing_weights only
    logits, bias = kernel_inputs(jax.lax.stop_gradient(logits),
                                 None if correction_bias is None else jax.lax.stop_gradient(correction_bias))
    if m == 0:
        return jnp.zeros((*lead, k), jnp.float32), jnp.zeros((*lead, k), jnp.int32)
    scale = _static_float(routed_scaling_factor)
    spec = plan_route(
        m,
        e,
        k,
        logits.dtype,
        scoring=kernel_scoring(scoring),
        renormalize=renormalize,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        bias_dtype=None if bias is None else bias.dtype,
        routed_scaling_factor=1.0 if scale is None else scale,
        group_scoring=group_scoring,
    )
    flat = logits.reshape(m, e)
    weights, ids = launch(spec, flat, bias) if bias is not None else launch(spec, flat)
    weights = autodiff.routing_weights(diff_logits.reshape(m, e), ids, weights, scoring=scoring,
                                       renormalize=renormalize, routed_scaling_factor=1.0 if scale is None else scale)
    if scale is None:
        weights = weights * jnp.asarray(routed_scaling_factor, jnp.float32)
    return weights.reshape(*lead, k), ids.reshape(*lead, k)


# --------------------------------------------------------------------------- sigmoid top-1


def _top1_blocks(m: int, e_pow2: int) -> tuple[int, int, int]:
    # tl.dot wants every tile dimension >= 16.
    cap = max(16, min(64, 8192 // e_pow2))
    block_m = 16
    while block_m < cap and -(-m // (2 * block_m)) >= 132:
        block_m *= 2
    block_k = 128 if e_pow2 <= 64 else 64
    num_warps = 4 if e_pow2 * block_m <= 4096 else 8
    return block_m, block_k, num_warps


def plan_sigmoid_top1(
    m: int,
    hidden: int,
    num_experts: int,
    x_dtype: Any = jnp.bfloat16,
    w_dtype: Any = None,
    *,
    shared_expert: bool = False,
) -> KernelLaunch:
    """The launch of the fused ``sigmoid(x @ w)`` top-1 router."""
    d, e = int(hidden), int(num_experts)
    if not 1 <= e <= MAX_TOP1_EXPERTS:
        raise ValueError(f"the fused sigmoid top-1 router takes 1..{MAX_TOP1_EXPERTS} experts, got {e}")
    x_dtype = jnp.dtype(x_dtype)
    w_dtype = x_dtype if w_dtype is None else jnp.dtype(w_dtype)
    e_pow2 = max(16, next_pow2(e))
    block_m, block_k, num_warps = _top1_blocks(m, e_pow2)
    cols = 2 if shared_expert else 1
    return KernelLaunch(
        kernel=_kernels().sigmoid_top1_kernel,
        grid=(-(-m // block_m),),
        args=(jax.ShapeDtypeStruct((m, d), x_dtype), jax.ShapeDtypeStruct((d, e), w_dtype)),
        scalars=(("M", m),),
        outs=(jax.ShapeDtypeStruct((m, cols), jnp.float32), jax.ShapeDtypeStruct((m, cols), jnp.int32)),
        constexprs=(
            ("D", d),
            ("E", e),
            ("E_POW2", e_pow2),
            ("BLOCK_M", block_m),
            ("BLOCK_K", block_k),
            ("SHARED_EXPERT", bool(shared_expert)),
            ("DOT_F32", bool(x_dtype == jnp.float32 or w_dtype == jnp.float32)),
        ),
        num_warps=num_warps,
        num_stages=2,
    )


def router_sigmoid_top1(
    x: jax.Array, w: jax.Array, *, shared_expert: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Fused router: ``sigmoid(x [M, D] @ w [D, E])`` and its top-1, in one launch.

    Returns (topk_weights ``[M, 1]`` f32, topk_ids ``[M, 1]`` i32), or ``[M, 2]`` with
    ``shared_expert=True``, whose second column is the shared expert (id E, weight 1).
    The matmul accumulates in fp32 (IEEE fp32 products when either operand is fp32).
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"need x [M, D] and w [D, E], got x{list(x.shape)} and w{list(w.shape)}")
    for name, a in (("x", x), ("w", w)):
        if a.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {a.dtype}")
    m, e = x.shape[0], w.shape[1]
    cols = 2 if shared_expert else 1
    if m == 0:
        return jnp.zeros((0, cols), jnp.float32), jnp.zeros((0, cols), jnp.int32)
    spec = plan_sigmoid_top1(m, x.shape[1], e, x.dtype, w.dtype, shared_expert=shared_expert)
    weights, ids = launch(spec, x, w)
    return weights, ids


# --------------------------------------------------------------------------- AOT


def aot_launches(
    ms: tuple[int, ...] = (1, 16, 64, 4096, 8192),
    dtypes: tuple[Any, ...] = (jnp.bfloat16, jnp.float32),
) -> list[KernelLaunch]:
    """Every routing launch the package picks for a representative set of shapes.

    Distinct kernels/constexpr sets only (block sizes depend on M, so a spread of M
    covers every tile shape the planner chooses).
    """
    seen: dict[Any, KernelLaunch] = {}

    def add(spec: KernelLaunch) -> None:
        seen.setdefault(spec.code_key(), spec)

    for m in ms:
        for dt in dtypes:
            for e, k in ((8, 2), (64, 6), (128, 8), (256, 8), (384, 8), (512, 16)):
                for scoring in ("softmax", "sigmoid"):
                    add(plan_route(m, e, k, dt, scoring=scoring))
            add(plan_route(m, 256, 8, dt, scoring="sigmoid", num_expert_group=8, topk_group=4,
                           bias_dtype=jnp.float32, routed_scaling_factor=2.5))
            add(plan_route(m, 160, 6, dt, scoring="softmax", num_expert_group=8, topk_group=3))
            # the explicit group rules against the defaults: V3 scoring without a bias, V2 with one
            add(plan_route(m, 256, 8, dt, scoring="sigmoid", num_expert_group=8, topk_group=4,
                           routed_scaling_factor=2.5, group_scoring="top2_sum"))
            add(plan_route(m, 160, 6, dt, scoring="softmax", num_expert_group=8, topk_group=3,
                           bias_dtype=jnp.float32, group_scoring="max"))
            add(plan_route(m, 128, 8, dt, scoring="sigmoid", renormalize=False, bias_dtype=jnp.float32))
            for e in (16, 128):
                add(plan_sigmoid_top1(m, 5120, e, dt, shared_expert=True))
                add(plan_sigmoid_top1(m, 5120, e, dt))
    return list(seen.values())
