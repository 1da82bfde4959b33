"""``jax.numpy`` reference of the fused MoE (the contract the kernels are held to).

Written for clarity, never for speed, but feasible in memory at real model shapes: no
per-token copy of expert weights is gathered; each expert is applied densely to all rows,
the rows of tokens not routed to it zeroed first, and the result kept only where the
routing says so. Zeroing the inputs (not only masking the outputs) keeps the gradient of
one expert's weights free of other tokens' values: a NaN or Inf in one token reaches
only the gradients of the experts it is routed to. It rounds where the kernels round
(see :func:`jaxmoe.fused_moe`), so tests can stay tight.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.ops import checks
from jaxmoe.ops.gemm.reference import HIGHEST, dot_t, gated, round_to
from jaxmoe.types import QUANT_BLOCK, QuantizedWeights

__all__ = ["fused_moe", "fused_moe_in", "unwrap_weights"]


def unwrap_weights(w: Any) -> Any:
    """The stored array of unquantized weights (``QuantizedWeights`` with scheme ``"none"``);
    quantized weights are returned as they are."""
    if isinstance(w, QuantizedWeights):
        return w.values if w.scheme == "none" else w
    return jnp.asarray(w)


def _act_group(w: Any) -> int | None:
    """The channels one activation scale covers: 128 against fp8_block weights, else the row."""
    return QUANT_BLOCK if isinstance(w, QuantizedWeights) and w.scheme == "fp8_block" else None


def _fp8_of(w: Any) -> Any:
    from jaxmoe.backends.platform import fp8_dtype

    return fp8_dtype()


def _varying_like(values, *others):
    """``values`` (a tuple) each made varying over every manual (shard_map) mesh axis that one
    of ``values`` or ``others`` varies over; unchanged outside shard_map."""
    axes = set().union(*(_vma(a) for a in (*values, *others)))
    out = []
    for v in values:
        missing = tuple(sorted(axes - _vma(v)))
        out.append(jax.lax.pcast(v, missing, to="varying") if missing else v)
    return tuple(out)


def _vma(a) -> frozenset:
    """The manual mesh axes ``a`` varies over (``.vma`` in older jax, ``.mat.varying`` in newer)."""
    aval = jax.typeof(a)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
    return frozenset(vma)


def split_gate_up(gate_up: jax.Array, layout: str) -> tuple[jax.Array, jax.Array]:
    """``(gate, up)`` of a ``[..., 2I]`` array in ``layout``'s gate/up order."""
    if layout.endswith("interleaved"):
        return gate_up[..., 0::2], gate_up[..., 1::2]
    i = gate_up.shape[-1] // 2
    return gate_up[..., :i], gate_up[..., i:]


def fused_moe_in(hidden_states, w1, w2, topk_weights, topk_ids, activation, compute_dtype, *, b1=None, b2=None,
                 layout="out_in", act_quant=None, act_groups=(None, None), fp8_dtype=None):
    """The two-stage MoE, one expert at a time, rounding to ``compute_dtype`` where the kernels round.

    ``w1``/``w2`` may be stored in another dtype (e.g. bf16 weights for an fp32 oracle):
    each expert's slice is cast to ``compute_dtype`` as it is used. ``QuantizedWeights`` are
    dequantized to fp32 one expert at a time (no fp32 copy of all experts is made); they and
    fp32 weights on either side make every product fp32. ``b1``/``b2`` are added
    in fp32 to the accumulators (``b2`` before the routing weight multiplies the row).
    ``act_quant`` rounds x and h (:func:`jaxmoe.quantize.quantize_activations`, groups of
    ``act_groups`` channels).
    """
    m, d = hidden_states.shape
    in_out = layout.startswith("in_out")
    e = w1.shape[0]
    if m == 0:
        return jnp.zeros((0, d), compute_dtype)
    x = hidden_states.astype(compute_dtype)
    # dequantized weights multiply in fp32, and so does a layer with fp32 weights on either side
    wide = [isinstance(w, QuantizedWeights) or w.dtype == jnp.float32 for w in (w1, w2)]
    operand = jnp.float32 if any(wide) else compute_dtype
    if act_quant is not None:
        from jaxmoe.quantize import quantize_activations

        def rounded(v, group):
            return quantize_activations(v, act_quant, fp8_dtype=fp8_dtype, group=group)
    else:
        def rounded(v, group):
            return v.astype(operand)
    ids = checks.as_ids(topk_ids, "topk_ids")
    weights = topk_weights.astype(jnp.float32)
    # Under shard_map every operand is made to vary over the same manual axes here, outside
    # the loop: an implicit cast inside the cond would transpose to a psum inside a branch
    # that only some devices take, and the backward would hang.
    bias1 = None if b1 is None else jnp.asarray(b1).astype(jnp.float32)
    bias2 = None if b2 is None else jnp.asarray(b2).astype(jnp.float32)
    leaves, tree = jax.tree.flatten((x, w1, w2, weights, ids, bias1, bias2))  # QuantizedWeights: each array
    x, w1, w2, weights, ids, bias1, bias2 = jax.tree.unflatten(tree, _varying_like(tuple(leaves)))

    def one_expert(ex, rows):
        def compute(rows):
            slot = ids == ex  # [M, k]
            # Tokens not routed to ex enter as zeros (and weigh 0): nothing of theirs, not
            # even a NaN, reaches this expert's output or its weights' gradient.
            xe = jnp.where(jnp.any(slot, axis=1)[:, None], x, jnp.zeros((), compute_dtype))
            we = jnp.where(slot, weights, 0.0)
            w1e, w2e = _expert(w1, ex, operand), _expert(w2, ex, operand)
            gate_up = _dot(rounded(xe, act_groups[0]), w1e, in_out)  # [M, 2I] fp32, in w1's gate/up order
            if bias1 is not None:
                gate_up = gate_up + bias1[ex]
            h = round_to(gated(activation, *split_gate_up(gate_up, layout)), compute_dtype)
            y = _dot(rounded(h, act_groups[1]), w2e, in_out)  # [M, D] fp32
            if bias2 is not None:
                y = y + bias2[ex]
            y = round_to(y[:, None, :] * we[:, :, None], compute_dtype)  # [M, k, D]
            return jnp.where(slot[:, :, None], y, rows)

        return jax.lax.cond(jnp.any(ids == ex), compute, lambda r: r, rows)

    # One [D] row per (token, slot); a slot with an out-of-range id is never written.
    # Under shard_map the zeros must vary over the manual axes the inputs vary over, or the
    # loop carry and the cond's branches would differ in type from the computed rows.
    (rows,) = _varying_like((jnp.zeros((m, ids.shape[1], d), compute_dtype),), x)
    rows = jax.lax.fori_loop(0, e, one_expert, rows)
    return rows.astype(jnp.float32).sum(axis=1).astype(compute_dtype)


def _expert(w: Any, ex: jax.Array, operand: Any) -> jax.Array:
    """Expert ``ex``'s ``[N, K]`` slice of ``w`` in ``operand``; quantized weights are
    dequantized (fp32) one expert at a time, never all at once."""
    if isinstance(w, QuantizedWeights):
        one = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, ex, 1, 0), w)
        return one.dequantize()[0]
    return w[ex].astype(operand)


def _dot(a, w, in_out: bool):
    """``a @ w.T`` for an ``[out, in]`` expert slice, ``a @ w`` for an ``[in, out]`` one; fp32 out."""
    if in_out:
        return jnp.einsum("mk,kn->mn", a, w, preferred_element_type=jnp.float32, precision=HIGHEST)
    return dot_t(a, w)


def fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu", b1=None, b2=None,
              layout="out_in", act_quant=None):
    """Reference of :func:`jaxmoe.fused_moe` (see there for the contract).

    Quantized weights are dequantized to fp32 and multiply the activations in fp32 (the
    kernels' products are exact too: 8-bit values, 4-bit integers and mxfp4 values are
    exact in bf16/fp16, the scales multiply fp32 sums); with ``act_quant`` x and h are
    rounded per token (per token and 128 channels against fp8_block weights) as the
    kernels round them, then dequantized."""
    hidden_states, topk_weights = jnp.asarray(hidden_states), jnp.asarray(topk_weights)
    w1, w2 = unwrap_weights(w1), unwrap_weights(w2)
    checks.check_fused_moe_args(hidden_states, w1, w2, topk_weights, topk_ids, activation, b1=b1, b2=b2,
                                layout=layout, act_quant=act_quant)
    groups = (_act_group(w1), _act_group(w2))
    fp8 = _fp8_of(w1)
    return fused_moe_in(hidden_states, w1, w2, topk_weights, topk_ids, activation, hidden_states.dtype, b1=b1,
                        b2=b2, layout=layout, act_quant=act_quant, act_groups=groups, fp8_dtype=fp8)
