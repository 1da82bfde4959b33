"""Gradients of the Triton grouped GEMM used alone (:func:`jaxmoe.ops.grouped_gemm`,
:func:`jaxmoe.ops.moe_gemm`): a ``jax.custom_vjp`` whose backward runs the same kernels as
the fused layer's (:mod:`jaxmoe.ops.moe.backward`), over the forward's row layout.

Forward, for a covered row ``f`` of expert ``e`` reading ``a[r]`` (``r = f // top_k``, or
``f`` when ``a`` has a row per output row) and weight ``w_f`` (1 without ``topk_weights``)::

    no activation:  c[f] = w_f * (a[r] @ b[e].T)
    activation:     c[f] = w_f * act(gate[f]) * up[f],   (gate, up)[f] = a[r] @ b[e].T

Backward, for ``dc [num_rows, N_out]``:

* no activation: ``g[f] = dc[f] @ b[e]`` (``moe_gemm_kernel``, ``b`` read transposed, fp32
  rows); ``da[r] = sum_f w_f g[f]`` (fp32, the slots summed in jnp);
  ``d w_f = <g[f], a[r]>``; ``db[e] = sum_f w_f dc[f]^T a[r]`` (``moe_weight_grad_kernel``).
* activation: ``d (gate, up)[f]`` from ``w_f dc[f]`` (``moe_gemm_act_bwd_kernel``, the
  pre-activation recomputed in its epilogue), then ``da`` and ``db`` as above from it;
  ``d w_f = <dc[f], act(gate[f]) * up[f]>`` (the unweighted forward, run again).

Residuals: ``a``, ``b``, the weights and the layout; nothing the size of ``c``. Rows no live
sorted position covers are 0 in the forward, so they get no gradient; the weight gradient
is deterministic (no atomics) and an expert without rows gets zeros.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.backends.launch import match_varying
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.gemm import triton as gemm_triton
from jaxmoe.ops.gemm.config import GemmTile
from jaxmoe.types import RoutingData

__all__ = ["grouped_gemm"]


@dataclasses.dataclass(frozen=True)
class _Static:
    activation: str | None
    tile: GemmTile | None
    has_weights: bool
    block_size: int
    num_experts: int
    top_k: int
    num_rows: int


def _routing(static: _Static, sorted_token_ids, expert_ids, num_tokens_post_padded) -> RoutingData:
    return RoutingData(sorted_token_ids, expert_ids, num_tokens_post_padded, topk_ids=None, topk_weights=None,
                       block_size=static.block_size, num_experts=static.num_experts, top_k=static.top_k,
                       num_rows=static.num_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped(static: _Static, a, b, weights, sorted_token_ids, expert_ids, num_tokens_post_padded):
    routing = _routing(static, sorted_token_ids, expert_ids, num_tokens_post_padded)
    return gemm_triton.grouped_gemm(a, b, routing, topk_weights=weights if static.has_weights else None,
                                    activation=static.activation, tile=static.tile)


def _fwd(static, a, b, weights, sorted_token_ids, expert_ids, num_tokens_post_padded):
    c = _grouped(static, a, b, weights, sorted_token_ids, expert_ids, num_tokens_post_padded)
    return c, (a, b, weights, sorted_token_ids, expert_ids, num_tokens_post_padded)


def _bwd(static, residuals, dc):
    from jaxmoe.backends.platform import arch_for, default_platform

    a, b, weights, sorted_token_ids, expert_ids, num_tokens_post_padded = residuals
    routing = _routing(static, sorted_token_ids, expert_ids, num_tokens_post_padded)
    arch = arch_for(default_platform())
    num_rows = static.num_rows
    a_top_k = static.top_k if a.shape[0] * static.top_k == num_rows else 1
    covered = gemm_triton.covered_rows(routing)[:, None]
    w = (weights.reshape(-1, 1).astype(jnp.float32) if static.has_weights
         else jnp.ones((num_rows, 1), jnp.float32))
    dc = jnp.where(covered, dc.astype(jnp.float32), 0.0)
    tile = _config.backward_tile(static.block_size, a.dtype, arch, fused=False, n_out=a.shape[1])
    if static.activation:
        fused_tile = _config.backward_tile(static.block_size, a.dtype, arch, fused=True)
        d_gate_up = gemm_triton.act_backward(a, b, (dc * w).astype(a.dtype), routing, tile=fused_tile, arch=arch,
                                             activation=static.activation)
        d_gate_up = jnp.where(covered, d_gate_up, jnp.zeros((), d_gate_up.dtype))
        g = gemm_triton.gemm(d_gate_up, b, routing, tile=tile, arch=arch, topk_weights=None, activation=None,
                             transpose_b=True, out_dtype=jnp.float32, split_tail=False)
        da_rows = jnp.where(covered, g, 0.0)
        db = gemm_triton.weight_grad(d_gate_up, a, routing, out_dtype=b.dtype, arch=arch)
        if static.has_weights:  # <dc, act(gate) * up>: the unweighted forward again
            h = gemm_triton.grouped_gemm(a, b, routing, activation=static.activation, tile=static.tile)
            d_w = jnp.sum(dc * h.astype(jnp.float32), axis=-1)
    else:
        g = gemm_triton.gemm(dc.astype(a.dtype), b, routing, tile=tile, arch=arch, topk_weights=None,
                             activation=None, transpose_b=True, out_dtype=jnp.float32, split_tail=False)
        g = jnp.where(covered, g, 0.0)
        da_rows = g * w
        db = gemm_triton.weight_grad(dc.astype(a.dtype), a, routing, out_dtype=b.dtype,
                                     topk_weights=weights if static.has_weights else None, arch=arch)
        if static.has_weights:
            a_rows = a if a_top_k == 1 else jnp.repeat(a, a_top_k, axis=0)
            d_w = jnp.sum(g * a_rows.astype(jnp.float32), axis=-1)
    da = da_rows.reshape(a.shape[0], a_top_k, a.shape[1]).sum(axis=1) if a_top_k > 1 else da_rows
    d_weights = (d_w.reshape(weights.shape).astype(weights.dtype) if static.has_weights
                 else jnp.zeros_like(weights))
    return da.astype(a.dtype), db, d_weights, None, None, None


_grouped.defvjp(_fwd, _bwd)


def grouped_gemm(a: jax.Array, b: jax.Array, routing: RoutingData, *, topk_weights: jax.Array | None = None,
                 activation: str | None = None, tile: GemmTile | None = None) -> jax.Array:
    """The Triton grouped GEMM (:func:`jaxmoe.ops.grouped_gemm`'s contract), differentiable
    in ``a [A_rows, K]``, ``b [E, N, K]`` and ``topk_weights [M, k]`` by Triton kernels."""
    if routing.num_rows == 0 or routing.num_blocks == 0:
        return gemm_triton.grouped_gemm(a, b, routing, topk_weights=topk_weights, activation=activation, tile=tile)
    static = _Static(activation, tile, topk_weights is not None, routing.block_size, routing.num_experts,
                     routing.top_k, routing.num_rows)
    weights = jnp.asarray(topk_weights) if topk_weights is not None else jnp.zeros((1,), jnp.float32)
    a, b, weights = match_varying(a, b, weights)  # inside shard_map: see match_varying
    return _grouped(static, a, b, weights, routing.sorted_token_ids, routing.expert_ids,
                    routing.num_tokens_post_padded)
