"""The routing front end: logits to (topk_weights, topk_ids)."""

from __future__ import annotations

from jaxmoe import _dispatch, _validate

__all__ = ["route"]


def route(
    logits,
    top_k,
    *,
    scoring="softmax",
    renormalize=True,
    num_expert_group=None,
    topk_group=None,
    correction_bias=None,
    routed_scaling_factor=1.0,
    implementation=None,
):
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
        ``topk_group * E / num_expert_group``. A group's score is the max of its experts'
        scores (V2), or, when ``correction_bias`` is given, the sum of its two best biased
        scores (V3).
      correction_bias: optional ``[E]`` float bias added to the scores for the selection
        only (DeepSeek-V3's load-balancing bias); the weights use the unbiased scores.
      routed_scaling_factor: multiplies the weights, after the renormalization (a number or
        a float scalar array, which may be traced).
      implementation: None (best available), ``"triton"`` or ``"reference"``.

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
    options = dict(
        scoring=scoring,
        renormalize=renormalize,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        correction_bias=correction_bias,
        routed_scaling_factor=routed_scaling_factor,
    )
    _validate.check_route_args(logits, top_k, **options)
    kernel = _dispatch.kernel_for("_routing_triton", "route", implementation)
    if kernel is None:
        from jaxmoe import reference

        kernel = reference.route
    return kernel(logits, top_k, **options)
