"""The building blocks of a fused MoE layer, one op each.

``moe_align_block_size`` groups the (token, slot) rows by expert and pads each group to a
multiple of the GEMM block; ``moe_gemm`` runs one grouped GEMM over those sorted rows.
:func:`jaxmoe.fused_moe` is stage 1 (``moe_gemm`` with the fused activation) then stage 2
(``moe_gemm`` with the routing weight) then a sum over the k slots.
"""

from __future__ import annotations

from jaxmoe import _dispatch, _validate

__all__ = ["max_padded_rows", "moe_align_block_size", "moe_gemm"]


def max_padded_rows(num_rows: int, num_experts: int, block_size: int) -> int:
    """Static length ``P`` of ``sorted_token_ids`` for ``num_rows = M * k`` routed rows.

    Each non-empty expert adds at most one partly filled block, and no block is empty, so
    the used blocks number at most ``min(T, T // block_size + min(E, T))`` with ``T = num_rows``.
    """
    t = int(num_rows)
    max_blocks = min(t, t // block_size + min(int(num_experts), t))
    return max_blocks * block_size


def moe_align_block_size(topk_ids, num_experts, block_size, *, implementation=None):
    """Sort the (token, slot) rows by expert, each expert padded to a multiple of ``block_size``.

    Args:
      topk_ids: ``[M, k]`` integer expert ids (used as int32).
      num_experts: ``E``, a Python int.
      block_size: the GEMM's BLOCK_M, a power of two >= 16.
      implementation: None (best available), ``"triton"`` or ``"reference"``.

    Returns ``(sorted_token_ids [P] int32, expert_ids [P // block_size] int32,
    num_tokens_post_padded [1] int32)`` with ``T = M * k`` and
    ``P = max_padded_rows(T, E, block_size)`` (static, for ``jax.jit``).

    A row is a flat index ``f = token * k + slot``. For each expert ``e`` in ascending
    order, its rows in ascending ``f`` fill ``ceil(count_e / block_size)`` blocks, padded
    with the sentinel ``T``; experts without rows get no blocks. ``expert_ids`` holds ``e``
    for each used block and ``-1`` for the unused blocks at the end, where
    ``sorted_token_ids`` is all ``T``. ``num_tokens_post_padded[0]`` counts the rows of the
    used blocks. Rows whose id is outside ``[0, E)`` are placed nowhere.
    """
    _validate.check_align_args(topk_ids, num_experts, block_size)
    kernel = _dispatch.kernel_for("_moe_triton", "moe_align_block_size", implementation)
    if kernel is not None:
        return kernel(topk_ids, num_experts, block_size)
    from jaxmoe import reference

    return reference.moe_align_block_size(topk_ids, num_experts, block_size)


def moe_gemm(
    a,
    b,
    sorted_token_ids,
    expert_ids,
    num_tokens_post_padded,
    *,
    top_k,
    num_rows,
    block_size,
    topk_weights=None,
    activation=None,
    implementation=None,
):
    """One grouped GEMM over rows sorted by :func:`moe_align_block_size`.

    Args:
      a: ``[A_rows, K]`` bf16/fp16/fp32; row ``f`` of the output reads ``a[f // top_k]``
        (stage 1: the tokens with ``top_k = k``; stage 2: the ``M * k`` rows with ``top_k = 1``).
      b: ``[E, N, K]`` in ``a``'s dtype (per expert ``[out, in]``, as ``w1`` / ``w2``).
      sorted_token_ids, expert_ids, num_tokens_post_padded: from :func:`moe_align_block_size`.
      top_k: rows of the output per row of ``a``.
      num_rows: output rows, ``M * k`` (static).
      block_size: the ``block_size`` the rows were aligned with.
      topk_weights: optional ``[M, k]`` float routing weights, multiplied into row ``f`` as
        ``topk_weights.flat[f]`` in fp32.
      activation: None, ``"silu"`` or ``"gelu"``: the fused gate/up epilogue
        ``act(c[:, :N/2]) * c[:, N/2:]`` (gelu is the exact, erf-based one).
      implementation: None (best available), ``"triton"`` or ``"reference"``.

    Returns ``c [num_rows, N]`` (``[num_rows, N // 2]`` with an activation) in ``a``'s dtype:
    for each sorted position ``i < num_tokens_post_padded`` whose ``f = sorted_token_ids[i]``
    is ``< num_rows`` and whose block's expert ``e = expert_ids[i // block_size]`` is in
    ``[0, E)``, ``c[f] = a[f // top_k] @ b[e].T`` accumulated in fp32, the epilogue in
    fp32, rounded once to ``a``'s dtype. Rows no sorted position covers are 0.
    """
    arrays = (a, b, sorted_token_ids, expert_ids, num_tokens_post_padded)
    options = dict(top_k=top_k, num_rows=num_rows, block_size=block_size, topk_weights=topk_weights,
                   activation=activation)
    _validate.check_moe_gemm_args(*arrays, **options)
    kernel = _dispatch.kernel_for("_moe_triton", "moe_gemm", implementation)
    if kernel is None:
        from jaxmoe import reference

        kernel = reference.moe_gemm
    return kernel(*arrays, **options)


def router_sigmoid_top1(x, w, *, shared_expert=False, implementation=None):
    """The sigmoid top-1 router, fused with its matmul (Llama-4 style routing).

    Args:
      x: ``[M, D]`` hidden states (bf16, fp16 or fp32).
      w: ``[D, E]`` router weight (bf16, fp16 or fp32).
      shared_expert: append a shared expert (id ``E``, weight 1.0) to every token.
      implementation: None (best available), ``"triton"`` or ``"reference"``.

    Returns ``(topk_weights [M, 1] float32, topk_ids [M, 1] int32)``, or ``[M, 2]`` with
    ``shared_expert``: ``topk_ids[:, 0] = argmax_e sigmoid(x @ w)`` (fp32 accumulation;
    ties go to the lower id; a NaN score never wins) and ``topk_weights[:, 0]`` its
    sigmoid score. The Triton kernel keeps the logits in registers: one launch, no
    ``[M, E]`` round trip through memory.
    """
    import numpy as np

    for name, a in (("x", x), ("w", w)):
        shape = getattr(a, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"{name} must be a 2-D array ({'[M, D]' if name == 'x' else '[D, E]'}), got shape {shape}")
        if np.dtype(a.dtype).name not in ("bfloat16", "float16", "float32"):
            raise TypeError(f"{name} must be bfloat16, float16 or float32, got {a.dtype}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x [M, D] and w [D, E] disagree on D: x{list(x.shape)}, w{list(w.shape)}")
    if w.shape[1] < 1:
        raise ValueError(f"w must have at least one expert column, got shape {list(w.shape)}")
    if not isinstance(shared_expert, (bool, np.bool_)):
        raise TypeError(f"shared_expert must be a bool, got {type(shared_expert).__name__}")
    kernel = _dispatch.kernel_for("_routing_triton", "router_sigmoid_top1", implementation)
    if kernel is None:
        from jaxmoe import reference

        kernel = reference.router_sigmoid_top1
    return kernel(x, w, shared_expert=bool(shared_expert))


__all__ += ["router_sigmoid_top1"]
