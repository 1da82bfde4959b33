"""The fused MoE op: routed tokens through their experts' gated MLPs, summed over the slots."""

from __future__ import annotations

from jaxmoe import _dispatch, _validate

__all__ = ["fused_moe"]


def fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu", implementation=None):
    """Apply each token's ``k`` routed experts and sum their weighted outputs.

    Args:
      hidden_states: ``[M, D]`` in bf16, fp16 or fp32.
      w1: ``[E, 2I, D]`` in ``hidden_states``' dtype: per expert the gate rows (first I)
        then the up rows (last I), PyTorch ``Linear`` ``[out, in]`` layout.
      w2: ``[E, D, I]`` in ``hidden_states``' dtype.
      topk_weights: ``[M, k]`` routing weights, any float dtype (used in fp32).
      topk_ids: ``[M, k]`` expert ids, any integer dtype (used as int32).
      activation: ``"silu"`` (``silu(gate) * up``) or ``"gelu"`` (``gelu(gate) * up``, the
        exact erf-based gelu).
      implementation: None (best available), ``"triton"`` or ``"reference"``.

    Returns:
      ``[M, D]`` in ``hidden_states``' dtype:
      ``y[t] = sum_j topk_weights[t, j] * w2[e] @ act(w1[e] @ x[t])`` with ``e = topk_ids[t, j]``.

    Rounding model (the kernels and the reference agree on it): stage 1 accumulates
    ``x @ w1[e].T`` in fp32, applies the activation in fp32 and rounds ``h`` to the input
    dtype; stage 2 accumulates ``h @ w2[e].T`` in fp32, multiplies by the routing weight in
    fp32 and rounds each (token, slot) row to the input dtype; the k rows are summed in
    fp32 and rounded once more.

    Invalid ids: an id outside ``[0, E)`` cannot be checked under ``jax.jit``; its
    (token, slot) contributes nothing (a token whose ids are all invalid gets zeros).
    ``M = 0`` returns an empty ``[0, D]`` array.
    """
    _validate.check_fused_moe_args(hidden_states, w1, w2, topk_weights, topk_ids, activation)
    kernel = _dispatch.kernel_for("_moe_triton", "fused_moe", implementation)
    if kernel is None:
        from jaxmoe import reference

        kernel = reference.fused_moe
    return kernel(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation)
