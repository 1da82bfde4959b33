"""The decode path of the fused MoE: a whole layer in two launches, without alignment.

At decode sizes a layer reads a few experts' weights once and does little else, so the
fixed host cost of each launch (routing, alignment, two GEMMs, the combine) dominates a
small model's layer. This path makes two launches (a grid-wide barrier inside one launch
would need a cooperative launch, which jax-triton does not make):

* **A** (stage 1): ``h [M*k, I] = act(x @ gate.T) * (x @ up.T)``, one program per
  (token, slot) row and ``BLOCK_N`` columns, grid ``(M*k, cdiv(I, BLOCK_N))``. From router
  logits (:func:`routed_moe`) each program first routes its own token with the routing
  kernel's code (a few hundred flops) and writes ``topk_weights``/``topk_ids`` once per
  token; from given ids (:func:`fused_moe`) it reads its id.
* **B** (stage 2 + routing weight + combine): ``y [M, D]``, one program per token and
  ``BLOCK_D`` columns, grid ``(M, cdiv(D, BLOCK_D))``, holding the token's k slots in one
  tile and summing them in registers in a fixed order: deterministic, no float atomics,
  no ``[M*k, D]`` rows in memory.

Both are GEMVs whose weight tiles are read along their contiguous dimension, with the
columns split so that, at M = 1, hundreds of programs stream weights (Qwen3-30B-A3B:
384 in A, 256 in B). Rows of one expert are not grouped: each (token, slot) reads its
expert's rows, so a batch whose tokens share experts reads them more than once (from L2
when the programs run together, grid order making that likely). That is why the path
serves small batches only: :data:`DECODE_MAX_TOKENS`, which is 0 (the path is taken only
when asked for) because on the H200 the aligned path is faster even at M = 1.

Which path a call takes: :func:`choose` (the ``decode=`` argument of the Triton functions,
True or False, where True raises if the path cannot serve the call; else ``JAXMOE_DECODE``:
``1`` wherever the path serves, ``0`` never, unset or ``auto`` the size rule);
``JAXMOE_LOG_CONFIG=1`` prints each choice and its reason. It serves bf16 and fp16
unquantized weights, silu and gelu, any routing the routing kernel takes (softmax or
sigmoid top-k, renormalized or not, groups, a correction bias, a Python-float
``routed_scaling_factor``), up to :data:`DECODE_TOKEN_LIMIT` tokens; anything else runs
the aligned path.

Forward only: under ``jax.grad``/``jax.vjp`` both functions run the aligned two-GEMM path
and its Triton backward (a ``jax.custom_vjp`` whose primal is this path and whose forward
rule is the aligned path's own ``jax.vjp``), so gradients are exactly the aligned path's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.backends.launch import KernelLaunch, launch, next_pow2
from jaxmoe.ops import checks
from jaxmoe.ops.gemm.config import log_configs
from jaxmoe.ops.routing import triton as routing_triton

__all__ = ["DECODE_MAX_TOKENS", "DECODE_TOKEN_LIMIT", "DECODE_DTYPES", "Choice", "choose", "plan_decode",
           "fused_moe", "routed_moe"]

# The size rule: batches of at most this many tokens take the decode path when nothing
# forces a path; bench/decode_bench.py prints the largest M where the decode path is
# faster for every preset. 0, so the rule never picks it: on an H200 (jax 0.11.2,
# triton 3.6.0) the aligned path is faster at every M measured (Qwen3-30B-A3B M = 1, 2, 4:
# 42.6/64.8/96.9 us against 57.6/97.0/137.3 us; Mixtral-8x7B M = 1: 0.18 against 0.27 ms,
# 2.6 TB/s), and no other card has been measured. Those times are of K loops that were not
# software-pipelined (_STAGES = 1); the pipelined loops have not been timed on a GPU, and
# bench/decode_bench.py on a card is what should set this value. JAXMOE_DECODE=1 or
# decode=True still take the path.
DECODE_MAX_TOKENS = 0
# Past this the path is never taken, even when forced: its scratch (one [k] row per
# program of launch A) and its repeated weight reads grow with M.
DECODE_TOKEN_LIMIT = 256
DECODE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ENV = "JAXMOE_DECODE"

# Programs of stage 2 at M = 1: enough to keep every SM of an H100/H200 (132) streaming.
_TARGET_PROGRAMS = 256
_TILE_ELEMENTS = 4096  # per weight tile of stage 1 (gate and up each); 8192 in stage 2
# Stages of both K loops (tl.range): two 16 KB tiles in flight per program while a third is
# summed (sm_90: 33 KB of shared memory and about 104 registers a thread in stage 1, so
# four programs an SM). With one stage the loop is not pipelined: its loads wait for the
# previous tile's sums.
_STAGES = 3


def _kernels() -> Any:
    from jaxmoe.ops.moe import kernels

    return kernels


# --------------------------------------------------------------------------- which path


@dataclasses.dataclass(frozen=True)
class Choice:
    """Whether a call takes the decode path (``decode``) and why (``reason``)."""

    decode: bool
    reason: str


def _forced(decode: bool | None) -> tuple[bool | None, str]:
    if decode is not None:
        if not isinstance(decode, bool):
            raise TypeError(f"decode must be None, True or False, got {decode!r}")
        return decode, f"decode={decode}"
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("", "auto"):
        return None, ""
    if env in ("1", "true", "on", "yes"):
        return True, f"{ENV}={env}"
    if env in ("0", "false", "off", "no"):
        return False, f"{ENV}={env}"
    raise ValueError(f"{ENV} must be unset, auto, 1 or 0, got {os.environ[ENV]!r}")


def features_in_use(activation: Any, layout: str, b1: Any, b2: Any) -> tuple[str, ...]:
    """The layer features of a call that the decode path does not have (it takes the plain
    ``silu``/``gelu`` layer in the ``out_in`` layout without biases)."""
    out = []
    if not isinstance(activation, str) or activation not in ("silu", "gelu"):
        out.append(f"activation={activation!r}")
    if layout != "out_in":
        out.append(f"layout={layout!r}")
    if b1 is not None and b1 is not False:
        out.append("b1")
    if b2 is not None and b2 is not False:
        out.append("b2")
    return tuple(out)


def unsupported(m: int, dtype: Any, *, routed_scale: float | None = 1.0, num_experts: int = 1, top_k: int = 1,
                config: Any = None, features: tuple[str, ...] = ()) -> str | None:
    """Why the decode path cannot serve this call, or None."""
    if features:
        return f"{', '.join(features)} (the decode path takes the plain silu/gelu layer)"
    if config is not None:
        return "an explicit config (the aligned path's tiles)"
    if jnp.dtype(dtype) not in DECODE_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (the decode path takes bfloat16 and float16)"
    if m < 1:
        return "no tokens"
    if m > DECODE_TOKEN_LIMIT:
        return f"M={m} > DECODE_TOKEN_LIMIT={DECODE_TOKEN_LIMIT}"
    if routed_scale is None:
        return "a traced routed_scaling_factor"
    if not routing_triton.kernel_serves(num_experts, top_k):
        return f"E={num_experts}, top_k={top_k}: beyond the routing kernel"
    return None


def choose(m: int, dtype: Any, *, decode: bool | None = None, **limits: Any) -> Choice:
    """The path a call of ``m`` tokens takes: ``decode`` (an argument) forces one, and
    ``decode=True`` where the path cannot serve raises, naming why; else ``JAXMOE_DECODE``
    (``1``: the decode path wherever it serves, ``0``: never); else the size rule
    ``m <= DECODE_MAX_TOKENS`` where it serves."""
    forced, why = _forced(decode)
    reason = unsupported(m, dtype, **limits)
    if forced is True:
        if reason is None:
            return Choice(True, why)
        if decode is True:
            raise ValueError(f"{why}: the decode path cannot serve this call: {reason}")
        return Choice(False, f"{why}, but {reason}")  # the environment forces it only where it serves
    if forced is False:
        return Choice(False, why)
    if reason is not None:
        return Choice(False, reason)
    if m <= DECODE_MAX_TOKENS:
        return Choice(True, f"M={m} <= DECODE_MAX_TOKENS={DECODE_MAX_TOKENS}")
    return Choice(False, f"M={m} > DECODE_MAX_TOKENS={DECODE_MAX_TOKENS}")


def log_choice(what: str, m: int, top_k: int, w1_shape: tuple[int, ...], dtype: Any, choice: Choice,
               launches: list[KernelLaunch] | None = None) -> None:
    """With ``JAXMOE_LOG_CONFIG=1``: print the path a call takes, why, and its launches."""
    if not log_configs():
        return
    e, two_i, d = w1_shape
    path = "decode" if choice.decode else "aligned"
    detail = ""
    if launches:
        tiles = ("BLOCK_N", "BLOCK_D", "BLOCK_K")
        detail = " launches: " + ", ".join(
            f"{s.name} grid={s.grid} " + " ".join(f"{n}={v}" for n, v in s.constexprs if n in tiles)
            for s in launches)
    print(f"jaxmoe: {what} M={m} k={top_k} E={e} D={d} I={two_i // 2} {jnp.dtype(dtype).name} "
          f"path={path} ({choice.reason}){detail}", file=sys.stderr)


# --------------------------------------------------------------------------- plans


def _stage1_tiles(d: int, i: int) -> tuple[int, int]:
    # 16 columns of gate and of up per program: at M = 1 that is k * I / 16 programs
    # (Qwen3-30B-A3B: 384), each streaming two [16, 256] tiles per step. Independent of M,
    # so one compiled kernel serves every batch size.
    block_n = min(16, max(2, next_pow2(i)))
    block_k = min(256, max(16, next_pow2(d)), max(16, _TILE_ELEMENTS // block_n))
    return block_n, block_k


def _stage2_tiles(d: int, i: int, k_pow2: int) -> tuple[int, int]:
    # The widest column block that still gives >= _TARGET_PROGRAMS programs at M = 1.
    block_d = 16
    while block_d > 4 and -(-d // block_d) < _TARGET_PROGRAMS:
        block_d //= 2
    block_d = min(block_d, max(2, next_pow2(d)))
    block_k = min(512, max(16, next_pow2(i)), max(16, 2 * _TILE_ELEMENTS // (k_pow2 * block_d)))
    return block_d, block_k


def plan_decode(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int, dtype: Any, *,
                activation: str = "silu", routed: bool = False, logits_dtype: Any = jnp.float32,
                scoring: str = "softmax", renormalize: bool = True, num_expert_group: int | None = None,
                topk_group: int | None = None, bias_dtype: Any = None, routed_scaling_factor: float = 1.0,
                group_scoring: str | None = None) -> list[KernelLaunch]:
    """Launches A and B of the decode path (see the module doc) for these shapes: stage 1
    from given ids, or, with ``routed``, from ``[M, E]`` logits with these routing options."""
    m, k, e, d, i = (int(v) for v in (num_tokens, top_k, num_experts, hidden, intermediate))
    if m < 1 or k < 1:
        raise ValueError(f"the decode path needs M >= 1 and top_k >= 1, got M={m}, top_k={k}")
    dtype = jnp.dtype(dtype)
    rows = m * k
    block_n, block_k = _stage1_tiles(d, i)
    x = jax.ShapeDtypeStruct((m, d), dtype)
    w1 = jax.ShapeDtypeStruct((e, 2 * i, d), dtype)
    h = jax.ShapeDtypeStruct((rows, i), dtype)
    weights = jax.ShapeDtypeStruct((m, k), jnp.float32)
    ids = jax.ShapeDtypeStruct((m, k), jnp.int32)
    grid1 = (rows, -(-i // block_n))
    common = (("D", d), ("I", i), ("E", e), ("K", k), ("BLOCK_N", block_n), ("BLOCK_K", block_k),
              ("ACTIVATION", activation), ("STAGES", _STAGES))
    kern = _kernels()
    if routed:
        route = routing_triton.plan_route(m, e, k, logits_dtype, scoring=scoring, renormalize=renormalize,
                                          num_expert_group=num_expert_group, topk_group=topk_group,
                                          bias_dtype=bias_dtype, routed_scaling_factor=routed_scaling_factor,
                                          group_scoring=group_scoring)
        rc = dict(route.constexprs)
        scratch = grid1[0] * grid1[1] * k
        bias = route.args[1] if bias_dtype is not None else jax.ShapeDtypeStruct((1,), jnp.float32)
        stage1 = KernelLaunch(
            kern.moe_decode_route_gate_up_kernel, grid=grid1, args=(x, w1, route.args[0], bias),
            outs=(h, weights, ids, jax.ShapeDtypeStruct((scratch,), jnp.float32),
                  jax.ShapeDtypeStruct((scratch,), jnp.int32)),
            constexprs=common + tuple((name, rc[name]) for name in (
                "E_POW2", "K_POW2", "SCORING")) + (("HAS_BIAS", bias_dtype is not None),) + tuple(
                (name, rc[name]) for name in ("RENORMALIZE", "NUM_GROUPS", "TOPK_GROUP", "G_POW2", "SCALE",
                                              "GROUP_TOP2")),
            num_warps=4, num_stages=_STAGES)
    else:
        stage1 = KernelLaunch(kern.moe_decode_gate_up_kernel, grid=grid1, args=(x, w1, ids), outs=(h,),
                              constexprs=common, num_warps=4, num_stages=_STAGES)
    k_pow2 = next_pow2(k)
    block_d, block_k2 = _stage2_tiles(d, i, k_pow2)
    stage2 = KernelLaunch(
        kern.moe_decode_down_kernel, grid=(m, -(-d // block_d)),
        args=(h, jax.ShapeDtypeStruct((e, d, i), dtype), weights, ids), outs=(jax.ShapeDtypeStruct((m, d), dtype),),
        constexprs=(("D", d), ("I", i), ("E", e), ("K", k), ("K_POW2", k_pow2), ("BLOCK_D", block_d),
                    ("BLOCK_K", block_k2), ("STAGES", _STAGES)),
        num_warps=4 if k_pow2 * block_d * block_k2 <= 4096 else 8, num_stages=_STAGES)
    return [stage1, stage2]


# --------------------------------------------------------------------------- the two ops


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the custom_vjp needs besides arrays: the launches and the aligned path to
    differentiate (a module-level function and hashable options)."""

    launches: tuple[KernelLaunch, ...]
    aligned: Callable[..., Any]
    options: tuple[tuple[str, Any], ...]


def _run_fused(static: _Static, x, w1, w2, topk_weights, topk_ids):
    stage1, stage2 = static.launches
    (h,) = launch(stage1, x, w1, topk_ids)
    (y,) = launch(stage2, h, w2, topk_weights, topk_ids)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static: _Static, x, w1, w2, topk_weights, topk_ids):
    return _run_fused(static, x, w1, w2, topk_weights, topk_ids)


def _fused_fwd(static: _Static, x, w1, w2, topk_weights, topk_ids):
    def aligned(x, w1, w2, topk_weights):
        return static.aligned(x, w1, w2, topk_weights, topk_ids, **dict(static.options))

    y, vjp = jax.vjp(aligned, x, w1, w2, topk_weights)
    return y, vjp


def _fused_bwd(static: _Static, vjp, dy):
    return (*vjp(dy), None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_moe(hidden_states: jax.Array, w1: jax.Array, w2: jax.Array, topk_weights: jax.Array,
              topk_ids: jax.Array, *, activation: str, aligned: Callable[..., Any],
              aligned_options: tuple[tuple[str, Any], ...] = (), choice: Choice | None = None) -> jax.Array:
    """The decode path of :func:`jaxmoe.fused_moe`: ``[M, D]`` from ``hidden_states [M, D]``
    (bf16/fp16), ``w1 [E, 2I, D]``, ``w2 [E, D, I]``, ``topk_weights [M, k]`` (any float) and
    ``topk_ids [M, k]`` (any int), in two launches.

    ``aligned(x, w1, w2, topk_weights, topk_ids, **aligned_options)`` is the aligned path:
    what runs, and is differentiated, under ``jax.grad``."""
    m, d = hidden_states.shape
    e, two_i, _ = w1.shape
    ids = checks.as_ids(topk_ids, "topk_ids")
    weights = topk_weights.astype(jnp.float32)
    launches = plan_decode(m, ids.shape[1], e, d, two_i // 2, hidden_states.dtype, activation=activation)
    log_choice("fused_moe", m, ids.shape[1], w1.shape, hidden_states.dtype, choice or Choice(True, "called"),
               launches)
    static = _Static(tuple(launches), aligned, tuple(aligned_options))
    return _fused(static, hidden_states, w1, w2, weights, ids)


def _run_routed(static: _Static, x, w1, w2, logits, bias):
    stage1, stage2 = static.launches
    bias_arg = bias if bias is not None else jnp.zeros((1,), jnp.float32)
    h, weights, ids, _, _ = launch(stage1, x, w1, logits, bias_arg)
    (y,) = launch(stage2, h, w2, weights, ids)
    return y, weights, ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _routed(static: _Static, x, w1, w2, logits, bias):
    return _run_routed(static, x, w1, w2, logits, bias)


def _routed_fwd(static: _Static, x, w1, w2, logits, bias):
    def aligned(x, w1, w2, logits):
        return static.aligned(x, w1, w2, logits, correction_bias=bias, **dict(static.options))

    out, vjp = jax.vjp(aligned, x, w1, w2, logits)
    return out, vjp


def _routed_bwd(static: _Static, vjp, cotangents):
    return (*vjp(cotangents), None)  # the bias chooses experts only: no gradient (as on the aligned path)


_routed.defvjp(_routed_fwd, _routed_bwd)


def routed_moe(hidden_states: jax.Array, w1: jax.Array, w2: jax.Array, logits: jax.Array, top_k: int, *,
               activation: str, correction_bias: jax.Array | None, aligned: Callable[..., Any],
               routing: dict[str, Any], aligned_options: tuple[tuple[str, Any], ...] = (),
               choice: Choice | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The decode path of routed MoE: ``(y [M, D], topk_weights [M, k] f32, topk_ids [M, k]
    i32)`` from ``hidden_states [M, D]`` (bf16/fp16), ``w1``, ``w2`` and ``logits [M, E]``
    (any float; the kernels read fp32, bf16 and fp16 as they are, others as fp32), routed
    with ``routing`` (:func:`jaxmoe.route`'s options but the bias, ``routed_scaling_factor``
    a Python float), in two launches.

    ``aligned(x, w1, w2, logits, correction_bias=..., top_k=..., activation=..., **routing,
    **aligned_options)`` returns the same triple on the aligned path: what runs, and is
    differentiated, under ``jax.grad``."""
    m, d = hidden_states.shape
    e, two_i, _ = w1.shape
    logits, bias = routing_triton.kernel_inputs(logits, correction_bias)
    launches = plan_decode(m, top_k, e, d, two_i // 2, hidden_states.dtype, activation=activation, routed=True,
                           logits_dtype=logits.dtype, bias_dtype=None if bias is None else bias.dtype, **routing)
    log_choice("routed_moe", m, top_k, w1.shape, hidden_states.dtype, choice or Choice(True, "called"), launches)
    options = {**routing, **dict(aligned_options), "top_k": int(top_k), "activation": activation}
    static = _Static(tuple(launches), aligned, tuple(sorted(options.items())))
    return _routed(static, hidden_states, w1, w2, logits, bias)
