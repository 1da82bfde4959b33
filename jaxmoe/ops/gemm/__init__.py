"""The grouped GEMM over expert-sorted rows: the core of both MoE stages."""

from __future__ import annotations

from typing import Any

import jax

from jaxmoe.ops import checks
from jaxmoe.ops.base import Op, triton_implementation
from jaxmoe.ops.gemm import backward, reference, triton
from jaxmoe.ops.gemm.config import GemmTile, MoEConfig
from jaxmoe.types import RoutingData

__all__ = ["GROUPED_GEMM", "grouped_gemm", "moe_gemm", "GemmTile", "MoEConfig"]

# The kernel path differentiates through its own Triton backward (ops/gemm/backward.py).
GROUPED_GEMM = Op("grouped_gemm", check=checks.check_grouped_gemm_args, reference=reference.grouped_gemm,
                  implementations=[triton_implementation(backward.grouped_gemm)],
                  vjp=(backward._fwd, backward._bwd))


def grouped_gemm(a: Any, b: Any, routing: RoutingData, *, topk_weights: Any = None, activation: str | None = None,
                 tile: GemmTile | None = None, implementation: Any = None) -> jax.Array:
    """One grouped GEMM over the rows of ``routing`` (from :func:`jaxmoe.ops.align`).

    Args:
      a: ``[A_rows, K]`` bf16/fp16/fp32: the ``M`` tokens (stage 1; output row ``f`` reads
        ``a[f // top_k]``) or the ``M * k`` rows (stage 2; row ``f`` reads ``a[f]``).
      b: ``[E, N, K]`` in ``a``'s dtype (per expert ``[out, in]``, as ``w1`` / ``w2``).
      routing: the layout, aligned for ``E`` experts.
      topk_weights: optional ``[M, k]`` float routing weights, multiplied into row ``f`` as
        ``topk_weights.flat[f]`` in fp32.
      activation: None, ``"silu"`` or ``"gelu"``: the fused gate/up epilogue
        ``act(c[:, :N/2]) * c[:, N/2:]`` (gelu is the exact, erf-based one).
      tile: the kernel's tile; None picks the fused layer's tile for this stage and shape.
      implementation: None (best available), ``"triton"``, ``"reference"`` or a sequence.

    Returns ``c [M * k, N]`` (``[M * k, N // 2]`` with an activation) in ``a``'s dtype: for
    each sorted position ``i < num_tokens_post_padded`` whose ``f = sorted_token_ids[i]`` is
    in ``[0, M * k)`` and whose block's expert ``e`` is in ``[0, E)``,
    ``c[f] = a[row] @ b[e].T`` accumulated in fp32, the epilogue in fp32, rounded once to
    ``a``'s dtype. Rows no such position covers are 0.

    Gradients: differentiable in ``a``, ``b`` and ``topk_weights`` (the reference by JAX's
    autodiff, the kernels by Triton kernels, :mod:`jaxmoe.ops.gemm.backward`); uncovered
    rows get no gradient, experts without rows zero weight gradients. ``moe_gemm`` too.
    """
    return GROUPED_GEMM(a, b, routing, topk_weights=topk_weights, activation=activation, tile=tile,
                        implementation=implementation)


def moe_gemm(a: Any, b: Any, sorted_token_ids: Any, expert_ids: Any, num_tokens_post_padded: Any, *, top_k: int,
             num_rows: int, block_size: int, topk_weights: Any = None, activation: str | None = None,
             implementation: Any = None) -> jax.Array:
    """:func:`grouped_gemm` on the seed's triple from :func:`jaxmoe.ops.moe_align_block_size`.

    Args:
      a: ``[A_rows, K]``; output row ``f`` reads ``a[f // top_k]`` (stage 1: the tokens with
        ``top_k = k``; stage 2: the ``M * k`` rows with ``top_k = 1``).
      b: ``[E, N, K]`` in ``a``'s dtype.
      sorted_token_ids, expert_ids, num_tokens_post_padded: the alignment.
      top_k: rows of the output per row of ``a``; num_rows: output rows (static);
      block_size: the ``block_size`` the rows were aligned with.
      topk_weights, activation, implementation: as :func:`grouped_gemm`.

    Returns ``c [num_rows, N]`` (``[num_rows, N // 2]`` with an activation), as :func:`grouped_gemm`.
    """
    e, _, _, n_out = checks.check_moe_gemm_args(
        a, b, sorted_token_ids, expert_ids, num_tokens_post_padded, top_k=top_k, num_rows=num_rows,
        block_size=block_size, topk_weights=topk_weights, activation=activation)
    import jax.numpy as jnp

    a = jnp.asarray(a)
    if num_rows == 0:
        return jnp.zeros((0, n_out), a.dtype)
    if a.shape[0] * top_k != num_rows:  # fewer output rows than a's rows name: gather them as stage-2 rows
        a = a[jnp.arange(num_rows) // top_k]
        top_k = 1
    if top_k == 1 and topk_weights is not None:  # stage 2: the layer's k is the weights' width
        top_k = int(topk_weights.shape[1])
    routing = RoutingData(
        checks.as_ids(sorted_token_ids, "sorted_token_ids"), checks.as_ids(expert_ids, "expert_ids"),
        checks.as_ids(num_tokens_post_padded, "num_tokens_post_padded"), topk_ids=None, topk_weights=None,
        block_size=block_size, num_experts=e, top_k=top_k, num_rows=num_rows)
    return grouped_gemm(a, b, routing, topk_weights=topk_weights, activation=activation,
                        implementation=implementation)
