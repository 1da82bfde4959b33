"""Gradients of the fused MoE's kernel path: a ``jax.custom_vjp`` around the experts, and
the routing weights' gradient to the router logits.

Forward (:func:`experts`, the data flow of :mod:`jaxmoe.ops.moe.triton`), rows ``f = t * k + j``
sorted by expert::

    h[f]   = act(x[t] @ w1[e].T [:I]) * (x[t] @ w1[e].T [I:])      stage 1   [M*k, I]
    y[f]   = w[f] * (h[f] @ w2[e].T)                              stage 2   [M*k, D]
    out[t] = sum_j y[t*k + j]                                               [M, D]

Backward, for ``dout [M, D]``, every GEMM a Triton launch over the forward's row layout, with
a tile by BLOCK_M, dtype, arch and output width (:func:`~jaxmoe.ops.gemm.config.backward_tile`):

1. ``g[f] = dout[t] @ w2[e]`` (``moe_gemm_kernel``, ``w2`` read transposed through its
   strides, fp32 out), unweighted; then in jnp ``d w[f] = <g[f], h[f]>`` (equal to
   ``<dout[t], h[f] @ w2[e].T>``, the unweighted stage-2 row dotted with dy, without a
   second GEMM or saved y rows) and ``dh[f] = w[f] * g[f]``, rounded to the input dtype.
2. ``d gate_up[f]`` (``moe_gemm_act_bwd_kernel``): stage 1's pre-activation recomputed
   tile by tile from ``x`` and ``w1``, the activation's derivative applied to ``dh`` in the
   epilogue; ``[M*k, 2I]`` in the input dtype.
3. ``dx[t] = sum_j d gate_up[t*k + j] @ w1[e]`` (``moe_gemm_kernel``, ``w1`` transposed, fp32
   rows, summed over the slots in jnp).
4. ``d w2[e] = sum_f (w[f] dout[t])^T h[f]`` (the rows ``w[f] dout[t]`` made in jnp,
   ``[M*k, D]`` in the input dtype) and ``d w1[e] = sum_f d gate_up[f]^T x[t]``
   (``moe_weight_grad_kernel``: programs of output tiles, rows in a fixed order).

Residuals: the inputs (``x``, ``w1``, ``w2``, the fp32 routing weights, the ids), the
layout (sorted ids, block experts, padded count) and stage 1's output ``h [M*k, I]`` in
the input dtype. With ``remat=True`` ``h`` is not saved: the backward runs stage 1 again
(one more launch, bitwise the same ``h``). Stage 1's pre-activation ``[M*k, 2I]`` is not
saved in either mode (step 2 recomputes it).

With ``save_gate_up=True`` (or ``JAXMOE_SAVE_GATE_UP=1``) the forward's stage 1 is a plain
GEMM whose pre-activation ``gate_up [M*k, 2I]`` (bias included) is rounded to the input
dtype and saved in place of ``h``; ``h`` is the activation of it in fp32 (jnp, rounded to
the input dtype), in the forward and again in the backward, and step 2 is the activation's
derivative at the saved ``gate_up`` (``jax.vjp`` of the same jnp activation) instead of a
GEMM that recomputes stage 1. Twice the default's residual memory (``2I`` against ``I`` per
row), one GEMM of the backward fewer. The forward rounds the pre-activation to the input
dtype before the activation (the default rounds only ``h``), so its output differs from
the default's within that rounding.

Expert biases (``b1 [E, 2I]`` before the activation, ``b2 [E, D]`` before the routing
weight) add, in jnp, ``<dout[t], b2[e]>`` to ``d w[f]``; their gradients are
``d b1[e] = sum_f d gate_up[f]`` and ``d b2[e] = sum_f w[f] dout[t]``, from the same
weight-gradient kernel (a column of ones as the other operand: deterministic, and only
the expert's own rows are read). The ``"in_out"`` layouts read each GEMM's B through the
other strides and swap the weight-gradient kernel's operands, so ``dw1 [E, D, 2I]`` and
``dw2 [E, I, D]`` come out in the stored layout; interleaved gate/up keeps ``d gate_up``'s
columns in w1's order, so steps 3 and 4 need no change.

Rows of ids outside ``[0, E)`` get zero gradients (their x rows and weights); experts
without rows get zero weight (and bias) gradients.

Quantized weights (any scheme but ``"none"``), frozen: the forward runs the quantized
kernels; gradients reach ``x``, the routing weights and the expert biases (a model trained
around frozen quantized experts, as QLoRA does) through the backward above on the weights
dequantized to x's dtype in the backward (a transient copy of the layer's experts, one
rounding of each weight to x's dtype), with stage 1's output recomputed from them and no
weight-gradient launches. Gradients with respect to the quantized weights themselves, and
any gradient through ``act_quant``, raise ``NotImplementedError`` when ``jax.grad`` /
``jax.vjp`` traces the layer (before anything runs), naming the ways out:
``implementation="reference"`` (JAX's autodiff through ``dequantize()``, rounding of the
activations passed straight through), or bf16 weights (``w.dequantize().astype(...)``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.backends.launch import match_varying
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.gemm import reference as gemm_reference
from jaxmoe.ops.gemm import triton as gemm_triton
from jaxmoe.ops.gemm.config import MoEConfig
from jaxmoe.ops.moe import reference as moe_reference
from jaxmoe.ops.routing import autodiff as routing_autodiff
from jaxmoe.types import QuantizedWeights, RoutingData

__all__ = ["experts", "experts_forward", "experts_fwd", "experts_bwd", "routing_weights", "SAVE_GATE_UP_ENV",
           "save_gate_up_from_env"]


# The environment variable that turns ``save_gate_up`` on where a call does not say.
SAVE_GATE_UP_ENV = "JAXMOE_SAVE_GATE_UP"


def save_gate_up_from_env() -> bool:
    """Whether ``JAXMOE_SAVE_GATE_UP`` asks the backward to save stage 1's pre-activation
    (unset, ``0``: no; ``1``: yes; anything else: a ValueError)."""
    return _config.env_flag(SAVE_GATE_UP_ENV)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the custom_vjp's rules need besides arrays (hashable: a nondiff argument)."""

    config: MoEConfig
    activation: Any  # a name or a ClampedSwiGLU
    arch: str
    remat: bool
    block_size: int
    num_experts: int
    top_k: int
    num_rows: int
    layout: str = "out_in"
    act_quant: str | None = None
    save_gate_up: bool = False

    @property
    def in_out(self) -> bool:
        return self.layout.startswith("in_out")

    @property
    def gate_up(self) -> str:
        return "interleaved" if self.layout.endswith("interleaved") else "concat"


def _routing(static: _Static, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids
             ) -> RoutingData:
    return RoutingData(sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids=topk_ids,
                       topk_weights=topk_weights, block_size=static.block_size, num_experts=static.num_experts,
                       top_k=static.top_k, num_rows=static.num_rows)


def _valid(routing: RoutingData) -> jax.Array:
    """``[M, k] bool``: slots whose id names an expert (the rows the GEMMs write)."""
    ids = routing.topk_ids
    return (ids >= 0) & (ids < routing.num_experts)


def _stage1(static: _Static, x: jax.Array, w1: Any, b1: jax.Array | None, routing: RoutingData,
            c_perm_k: int = 0) -> jax.Array:
    return gemm_triton.gemm(x, w1, routing, tile=static.config.stage1, arch=static.arch, topk_weights=None,
                            activation=static.activation, transpose_b=static.in_out, gate_up=static.gate_up,
                            bias=b1, act_quant=static.act_quant, c_perm_k=c_perm_k)


def _stage1_gate_up(static: _Static, x: jax.Array, w1: jax.Array, b1: jax.Array | None, routing: RoutingData
                    ) -> jax.Array:
    """Stage 1 without its activation: ``gate_up [M*k, 2I]`` (bias included) in x's dtype,
    in w1's gate/up order; rows of invalid ids unwritten, as in every GEMM (what reads them
    masks them)."""
    two_i = w1.shape[2] if static.in_out else w1.shape[1]
    tile = _config.backward_tiles(static.config, x.dtype, static.arch, hidden=x.shape[1],
                                  intermediate=two_i // 2, block_m=static.block_size).gate_up
    return gemm_triton.gemm(x, w1, routing, tile=tile, arch=static.arch, topk_weights=None, activation=None,
                            transpose_b=static.in_out, bias=b1, split_tail=False)


def _activate(static: _Static, gate_up: jax.Array) -> jax.Array:
    """Stage 1's gated activation of ``gate_up [M*k, 2I]`` (fp32 in and out), in jnp."""
    gate, up = moe_reference.split_gate_up(gate_up, static.layout)
    return gemm_reference.gated(static.activation, gate, up)


def experts_forward(static: _Static, x: jax.Array, w1: Any, w2: Any, b1: jax.Array | None,
                    b2: jax.Array | None, routing: RoutingData) -> tuple[jax.Array, jax.Array]:
    """Both GEMM stages and the sum over the k slots: ``(out [M, D], h [M*k, I])`` in x's
    dtype (``w1``/``w2`` arrays or :class:`~jaxmoe.QuantizedWeights`; ``static.act_quant``
    rounds x and h per token inside the kernels); with ``static.save_gate_up`` the second
    is stage 1's pre-activation ``gate_up [M*k, 2I]`` instead of ``h``. Where stage 2 reads
    its A split (int4 w2, :func:`~jaxmoe.ops.gemm.triton.splits_a`), stage 1 writes ``h``
    in that layout, and so it is returned (only the quantized path, which saves nothing
    for a backward, gets there)."""
    m, d = x.shape
    split2 = False
    if static.save_gate_up:
        gate_up = _stage1_gate_up(static, x, w1, b1, routing)
        h = _activate(static, gate_up.astype(jnp.float32)).astype(x.dtype)
    else:
        intermediate = w2.shape[1] if static.in_out else w2.shape[2]
        split2 = gemm_triton.splits_a(w2, intermediate, static.config.stage2, static.act_quant)
        h = _stage1(static, x, w1, b1, routing, c_perm_k=static.config.stage2.block_k if split2 else 0)
    y = gemm_triton.gemm(h, w2, routing, tile=static.config.stage2, arch=static.arch,
                         topk_weights=routing.topk_weights, activation=None, transpose_b=static.in_out, bias=b2,
                         act_quant=static.act_quant, a_split=split2)
    # Rows of out-of-range ids were never written: they contribute nothing.
    y = jnp.where(_valid(routing)[..., None], y.reshape(m, routing.top_k, d).astype(jnp.float32), 0.0)
    return jnp.sum(y, axis=1).astype(x.dtype), gate_up if static.save_gate_up else h


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _experts(static: _Static, x, w1, w2, b1, b2, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
             topk_ids):
    routing = _routing(static, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids)
    out, _ = experts_forward(static, x, w1, w2, b1, b2, routing)
    return out


def experts_fwd(static: _Static, x, w1, w2, b1, b2, topk_weights, sorted_token_ids, expert_ids,
                num_tokens_post_padded, topk_ids):
    routing = _routing(static, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids)
    out, saved = experts_forward(static, x, w1, w2, b1, b2, routing)  # h, or gate_up with save_gate_up
    residuals = (x, w1, w2, b1, b2, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids,
                 None if static.remat else saved)
    return out, residuals


def _bias_grad(g: jax.Array, routing: RoutingData, out_dtype: Any) -> jax.Array:
    """``[E, N]``: per expert, the sum over its rows f of ``g[f]`` (g ``[M*k, N]``), by the
    weight-gradient kernel against a column of ones."""
    ones = jnp.ones((routing.num_rows, 1), g.dtype)
    return gemm_triton.weight_grad(ones, g, routing, out_dtype=out_dtype)[:, 0, :]


def experts_bwd(static: _Static, residuals, dout, weight_grads: bool = True):
    """The cotangents of :func:`_experts`' arguments; ``weight_grads=False`` skips the
    weight-gradient launches (their cotangents come back None)."""
    x, w1, w2, b1, b2, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids, saved = residuals
    routing = _routing(static, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids)
    arch = static.arch
    m, d = x.shape
    k = static.top_k
    in_out = static.in_out
    dout = dout.astype(x.dtype)
    valid = _valid(routing).reshape(-1, 1)  # rows of invalid ids are unwritten by every GEMM: masked
    act_vjp = None
    if static.save_gate_up:  # saved is gate_up: h and the activation's derivative from it
        h, act_vjp = jax.vjp(lambda v: _activate(static, v), saved.astype(jnp.float32))
        h = h.astype(x.dtype)
    else:
        h = _stage1(static, x, w1, b1, routing) if saved is None else saved

    tiles = _config.backward_tiles(static.config, x.dtype, arch, hidden=d, intermediate=h.shape[1],
                                   block_m=static.block_size)
    g_tile, dx_tile, fused_tile = tiles.g, tiles.dx, tiles.act
    # 1. stage 2: g = dy @ w2[e] (unweighted, fp32), d w = <g, h> (+ <dy, b2[e]>), dh = w * g
    g = gemm_triton.gemm(dout, w2, routing, tile=g_tile, arch=arch, topk_weights=None, activation=None,
                         transpose_b=not in_out, out_dtype=jnp.float32, split_tail=False)
    g = jnp.where(valid, g, 0.0)
    d_weights = jnp.sum(g * h.astype(jnp.float32), axis=-1)
    if b2 is not None:
        per_expert = jnp.dot(dout.astype(jnp.float32), b2.astype(jnp.float32).T,
                             precision=jax.lax.Precision.HIGHEST)  # [M, E]: <dy[t], b2[e]>
        ids = jnp.clip(topk_ids, 0, static.num_experts - 1)
        d_weights = d_weights + jnp.take_along_axis(per_expert, ids, axis=1).reshape(-1)
    d_weights = jnp.where(valid[:, 0], d_weights, 0.0)
    dh = (g * topk_weights.reshape(-1, 1).astype(jnp.float32)).astype(x.dtype)
    # 2. stage 1: d gate_up through the activation's derivative, in w1's gate/up order
    if act_vjp is not None:
        (d_gate_up,) = act_vjp(dh.astype(jnp.float32))
        d_gate_up = jnp.where(valid, d_gate_up, 0.0).astype(x.dtype)
    else:
        d_gate_up = gemm_triton.act_backward(x, w1, dh, routing, tile=fused_tile, arch=arch,
                                             activation=static.activation, transpose_b=in_out,
                                             gate_up=static.gate_up, bias=b1)
    # 3. dx: d gate_up @ w1[e], summed over the slots in fp32
    dx_rows = gemm_triton.gemm(d_gate_up, w1, routing, tile=dx_tile, arch=arch, topk_weights=None,
                               activation=None, transpose_b=not in_out, out_dtype=jnp.float32, split_tail=False)
    dx = jnp.sum(jnp.where(valid, dx_rows, 0.0).reshape(m, k, d), axis=1).astype(x.dtype)
    # 4. weight gradients, per expert over its own rows, in the stored layout. d w2's rows
    # w[f] * dy[t] are made here, [M*k, D] in the input dtype (the same rounding as inside
    # the kernel): scaling each row in the kernel's K loop runs the operand through
    # registers and is slower than this pass (H200: 16-30 % on d w2).
    wdout = (dout.astype(jnp.float32)[:, None, :] * topk_weights.astype(jnp.float32)[..., None]
             ).reshape(m * k, d).astype(x.dtype)
    if not weight_grads:
        dw1 = dw2 = None
    elif in_out:
        dw2 = gemm_triton.weight_grad(h, wdout, routing, out_dtype=w2.dtype, arch=arch)
        dw1 = gemm_triton.weight_grad(x, d_gate_up, routing, out_dtype=w1.dtype, arch=arch)
    else:
        dw2 = gemm_triton.weight_grad(wdout, h, routing, out_dtype=w2.dtype, arch=arch)
        dw1 = gemm_triton.weight_grad(d_gate_up, x, routing, out_dtype=w1.dtype, arch=arch)
    db1 = None if b1 is None else _bias_grad(d_gate_up, routing, b1.dtype)
    db2 = None if b2 is None else _bias_grad(wdout, routing, b2.dtype)
    d_weights = d_weights.reshape(topk_weights.shape).astype(topk_weights.dtype)
    return dx, dw1, dw2, db1, db2, d_weights, None, None, None, None


_experts.defvjp(experts_fwd, experts_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _quantized_experts(static: _Static, x, w1, w2, b1, b2, topk_weights, sorted_token_ids, expert_ids,
                       num_tokens_post_padded, topk_ids):
    routing = _routing(static, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids)
    out, _ = experts_forward(static, x, w1, w2, b1, b2, routing)
    return out


_WAYS_OUT = ("differentiate implementation='reference' (autodiff through QuantizedWeights.dequantize(), "
             "activation rounding passed straight through) or use unquantized weights "
             "(w.dequantize().astype(jnp.bfloat16))")


def _perturbed(tree: Any) -> bool:
    """Whether any leaf of ``tree`` (of ``CustomVJPPrimal``) is being differentiated."""
    return any(getattr(leaf, "perturbed", False)
               for leaf in jax.tree.leaves(tree, is_leaf=lambda v: hasattr(v, "perturbed")))


def _quantized_fwd(static: _Static, *args):
    """Forward rule with symbolic zeros: knows which arguments are being differentiated."""
    x, w1, w2, b1, b2, topk_weights = args[:6]
    if _perturbed((w1, w2)):
        raise NotImplementedError("jaxmoe: gradients with respect to quantized weights are not implemented (the "
                                  "Triton backward treats them as frozen: gradients reach x, the routing weights "
                                  "and the biases); " + _WAYS_OUT)
    if static.act_quant is not None and _perturbed((x, b1, b2, topk_weights)):
        raise NotImplementedError(f"jaxmoe: gradients through act_quant={static.act_quant!r} on the Triton kernels "
                                  "are not implemented; " + _WAYS_OUT)
    values = jax.tree.map(lambda v: v.value, args, is_leaf=lambda v: hasattr(v, "perturbed"))
    return _quantized_experts(static, *values), values


def _quantized_bwd(static: _Static, residuals, dout):
    """Frozen quantized weights: the bf16 backward on the weights dequantized to x's dtype,
    stage 1's output recomputed from them (with the backward's fused tile at the rows'
    alignment), no weight gradients."""
    x, w1, w2, b1, b2, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids = residuals
    w1d, w2d = (w.dequantize().astype(x.dtype) for w in (w1, w2))
    tiles = _config.backward_tiles(static.config, x.dtype, static.arch, hidden=x.shape[1],
                                   intermediate=w2d.shape[2], block_m=static.block_size)
    plain = dataclasses.replace(static, config=dataclasses.replace(static.config, stage1=tiles.act), remat=True,
                                act_quant=None, save_gate_up=False)
    dx, _, _, db1, db2, d_weights, *_ = experts_bwd(
        plain, (x, w1d, w2d, b1, b2, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids,
                None), dout, weight_grads=False)
    return dx, None, None, db1, db2, d_weights, None, None, None, None


_quantized_experts.defvjp(_quantized_fwd, _quantized_bwd, symbolic_zeros=True)


def experts(x: jax.Array, w1: Any, w2: Any, routing: RoutingData, *, config: MoEConfig,
            activation: Any, arch: str, remat: bool = False, b1: jax.Array | None = None,
            b2: jax.Array | None = None, layout: str = "out_in", act_quant: str | None = None,
            save_gate_up: bool | None = None) -> jax.Array:
    """Both GEMM stages and the sum over the k slots, on aligned rows: ``[M, D]`` in x's dtype.

    Differentiable in ``x [M, D]``, ``w1``, ``w2`` (stored in ``layout``), the optional
    biases ``b1 [E, 2I]`` and ``b2 [E, D]``, and ``routing.topk_weights [M, k] float32`` by
    the Triton backward of this module; ``remat`` recomputes stage 1's output in the
    backward instead of saving it; ``save_gate_up`` saves stage 1's pre-activation instead
    (None: :data:`SAVE_GATE_UP_ENV`, read when the call is traced; quantized weights and
    ``act_quant``, whose backward recomputes stage 1 from the dequantized weights, ignore
    the variable and refuse True).
    Both: a ValueError.
    """
    from jaxmoe.ops import checks

    quantized = any(isinstance(w, QuantizedWeights) and w.scheme != "none" for w in (w1, w2))
    if quantized or act_quant is not None:
        # nothing saved for the backward: it recomputes stage 1 from the dequantized weights
        if save_gate_up:
            raise ValueError("save_gate_up=True saves stage 1's pre-activation for the backward; with quantized "
                             "weights the backward recomputes stage 1 from the dequantized weights (and act_quant "
                             "has none): it does not apply")
        save_gate_up = False
    elif save_gate_up is None:
        save_gate_up = save_gate_up_from_env()
    if remat and save_gate_up:
        raise ValueError("remat=True recomputes stage 1's output and save_gate_up saves its pre-activation: "
                         f"choose one (save_gate_up may come from {SAVE_GATE_UP_ENV})")
    static = _Static(config, checks.resolve_activation(activation), arch, bool(remat), routing.block_size,
                     routing.num_experts, routing.top_k, routing.num_rows, checks.check_layout(layout), act_quant,
                     bool(save_gate_up))
    if quantized or act_quant is not None:
        if static.in_out:
            raise ValueError(f"quantized weights are stored [out, in] (layout 'out_in' or 'out_in_interleaved'), "
                             f"got layout={layout!r}")
        # shard_map: the cotangents vary over every axis the data and weights do (see match_varying)
        leaves, tree = jax.tree.flatten((x, w1, w2, b1, b2, routing.topk_weights))
        x, w1, w2, b1, b2, topk_weights = jax.tree.unflatten(tree, match_varying(*leaves))
        return _quantized_experts(static, x, w1, w2, b1, b2, topk_weights, routing.sorted_token_ids,
                                  routing.expert_ids, routing.num_tokens_post_padded, routing.topk_ids)
    w1 = w1.values if isinstance(w1, QuantizedWeights) else w1
    w2 = w2.values if isinstance(w2, QuantizedWeights) else w2
    # shard_map: see match_varying
    x, w1, w2, b1, b2, topk_weights = match_varying(x, w1, w2, b1, b2, routing.topk_weights)
    return _experts(static, x, w1, w2, b1, b2, topk_weights, routing.sorted_token_ids, routing.expert_ids,
                    routing.num_tokens_post_padded, routing.topk_ids)


# --------------------------------------------------------------------------- routing

# The routing weights' derivative lives with the routing op (the routing kernel uses it too).
routing_weights = routing_autodiff.routing_weights
