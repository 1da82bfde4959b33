"""Routing: router logits to each token's experts and weights."""

from __future__ import annotations

from typing import Any

import jax

from jaxmoe.ops import checks
from jaxmoe.ops.base import Op, triton_implementation
from jaxmoe.ops.routing import reference, triton

__all__ = ["ROUTE", "SIGMOID_TOP1", "route", "router_sigmoid_top1"]

ROUTE = Op("route", check=checks.check_route_args, reference=reference.route,
           implementations=[triton_implementation(triton.route, supports=triton.unsupported_route)])
SIGMOID_TOP1 = Op("router_sigmoid_top1", check=checks.check_sigmoid_top1_args,
                  reference=reference.router_sigmoid_top1,
                  implementations=[triton_implementation(triton.router_sigmoid_top1,
                                                         supports=triton.unsupported_sigmoid_top1)])


def route(
    logits: Any,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: Any = None,
    routed_scaling_factor: Any = 1.0,
    group_scoring: str | None = None,
    implementation: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Pick ``top_k`` experts per token and their weights.

    Args:
      logits: ``[M, E]`` router logits, any float dtype; everything is computed in fp32.
      top_k: experts per token, ``1 <= top_k <= E`` (a Python int).
      scoring: ``"softmax"`` (scores = softmax over the E logits) or ``"sigmoid"``
        (scores = sigmoid of each logit).
      renormalize: divide the chosen weights by their sum (so they sum to 1).
      num_expert_group, topk_group: grouped routing (DeepSeek-V2/V3); both or neither.
        The E experts form ``num_expert_group`` groups of consecutive ids (it must divide
        E); only the best ``topk_group`` groups compete, and ``top_k`` must be at most
        ``topk_group * E / num_expert_group``. A group's score follows ``group_scoring``.
      correction_bias: optional ``[E]`` float bias added to the scores for the selection
        only (DeepSeek-V3's load-balancing bias); the weights use the unbiased scores.
      routed_scaling_factor: multiplies the weights, after the renormalization (a number or
        a float scalar array, which may be traced).
      group_scoring: how grouped routing scores a group: ``"max"`` (the best of its
        experts' biased scores, DeepSeek-V2) or ``"top2_sum"`` (the sum of its two best
        biased scores, DeepSeek-V3; a one-expert group scores that expert). None (the
        default) picks ``"top2_sum"`` when ``correction_bias`` is given, else ``"max"``,
        with a :class:`~jaxmoe.ops.checks.GroupScoringWarning` (pass the rule to say which).
        Ignored without groups.
      implementation: None (best available), ``"triton"``, ``"reference"`` or a sequence of
        them (the first that serves these arguments). The kernel takes up to 4096 experts
        and ``top_k <= 64``.

    Returns:
      ``(topk_weights [M, top_k] float32, topk_ids [M, top_k] int32)``.

    Behaviour, identical in the reference and the kernels:

    * Ties are deterministic: of equal scores the LOWER expert id wins (and of equal group
      scores the lower group id). A row's ids come ordered by descending (biased) score,
      equal scores by ascending id.
    * NaN scores count as ``-inf`` in the selection, so every id is in ``[0, E)``; when
      fewer than ``top_k`` experts have a usable score, the remaining slots go to the
      lowest ids among the rest (experts of dropped groups included). The weights of such
      rows may be NaN (they are the unbiased scores, renormalized).
    """
    return ROUTE(logits, top_k, scoring=scoring, renormalize=renormalize, num_expert_group=num_expert_group,
                 topk_group=topk_group, correction_bias=correction_bias,
                 routed_scaling_factor=routed_scaling_factor, group_scoring=group_scoring,
                 implementation=implementation)


def router_sigmoid_top1(x: Any, w: Any, *, shared_expert: bool = False, implementation: Any = None
                        ) -> tuple[jax.Array, jax.Array]:
    """The sigmoid top-1 router, fused with its matmul (Llama-4 style routing).

    Args:
      x: ``[M, D]`` hidden states (bf16, fp16 or fp32).
      w: ``[D, E]`` router weight (bf16, fp16 or fp32).
      shared_expert: append a shared expert (id ``E``, weight 1.0) to every token.
      implementation: None (best available), ``"triton"``, ``"reference"`` or a sequence.
        The kernel takes up to 1024 experts.

    Returns ``(topk_weights [M, 1] float32, topk_ids [M, 1] int32)``, or ``[M, 2]`` with
    ``shared_expert``: ``topk_ids[:, 0] = argmax_e sigmoid(x @ w)`` (fp32 accumulation;
    ties go to the lower id; a NaN score never wins) and ``topk_weights[:, 0]`` its
    sigmoid score. The Triton kernel keeps the logits in registers: one launch, no
    ``[M, E]`` round trip through memory.
    """
    return SIGMOID_TOP1(x, w, shared_expert=shared_expert, implementation=implementation)
