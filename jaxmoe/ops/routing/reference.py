"""``jax.numpy`` references of the routing ops (the contract the kernels are held to)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.ops import checks

__all__ = ["route", "router_sigmoid_top1", "weights_at"]

_HIGHEST = jax.lax.Precision.HIGHEST


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
    group_scoring=None,
):
    """Reference of :func:`jaxmoe.route` (see there for the full contract)."""
    logits = jnp.asarray(logits)
    checks.check_route_args(
        logits,
        top_k,
        scoring=scoring,
        renormalize=renormalize,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        correction_bias=correction_bias,
        routed_scaling_factor=routed_scaling_factor,
        group_scoring=group_scoring,
    )
    m, e = logits.shape
    logits = logits.astype(jnp.float32)
    if scoring == "topk_softmax":  # gpt-oss: top-k of the logits, then a softmax over those k
        # chosen by softmax score (the same order as the logits'), so rows with a NaN or +inf
        # logit choose as softmax does (ids 0..k-1), as the kernels do
        scores = jax.nn.softmax(logits, axis=-1)
        _, topk_ids = jax.lax.top_k(jnp.where(jnp.isnan(scores), -jnp.inf, scores), top_k)
        topk_weights = jax.nn.softmax(jnp.take_along_axis(logits, topk_ids, axis=-1), axis=-1)
        topk_weights = topk_weights * jnp.asarray(routed_scaling_factor, jnp.float32)
        return topk_weights.astype(jnp.float32), topk_ids.astype(jnp.int32)
    scores = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)

    # Selection runs on biased scores; NaN counts as -inf so every id stays in [0, E).
    # lax.top_k orders by value and breaks ties by the lower index.
    choice = scores if correction_bias is None else scores + jnp.asarray(correction_bias).astype(jnp.float32)
    choice = jnp.where(jnp.isnan(choice), -jnp.inf, choice)

    if num_expert_group is not None:
        groups = choice.reshape(m, num_expert_group, e // num_expert_group)
        if checks.resolve_group_scoring(group_scoring, correction_bias) == "max":
            group_scores = groups.max(axis=-1)  # DeepSeek-V2: a group is as good as its best expert
        else:  # DeepSeek-V3: the sum of its two best (biased) scores
            group_scores = jax.lax.top_k(groups, min(2, groups.shape[-1]))[0].sum(axis=-1)
        group_scores = jnp.where(jnp.isnan(group_scores), -jnp.inf, group_scores)
        _, kept = jax.lax.top_k(group_scores, topk_group)
        keep = jnp.zeros((m, num_expert_group), bool).at[jnp.arange(m)[:, None], kept].set(True)
        choice = jnp.where(keep[:, :, None], groups, -jnp.inf).reshape(m, e)

    _, topk_ids = jax.lax.top_k(choice, top_k)
    topk_weights = jnp.take_along_axis(scores, topk_ids, axis=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(axis=-1, keepdims=True)
    topk_weights = topk_weights * jnp.asarray(routed_scaling_factor, jnp.float32)
    return topk_weights.astype(jnp.float32), topk_ids.astype(jnp.int32)


def weights_at(logits, topk_ids, *, scoring="softmax", renormalize=True, routed_scaling_factor=1.0):
    """The routing weights ``[M, k] float32`` of given ids ``[M, k]``: what :func:`route`
    computes once it has chosen them (scores of all ``E`` logits, taken at the ids,
    renormalized, scaled). Differentiable in ``logits`` (and a traced scale); the ids, and
    hence grouping and ``correction_bias``, enter as constants."""
    logits = jnp.asarray(logits).astype(jnp.float32)
    ids = jnp.asarray(topk_ids).astype(jnp.int32)
    if scoring == "topk_softmax":
        weights = jax.nn.softmax(jnp.take_along_axis(logits, ids, axis=-1), axis=-1)
        return weights * jnp.asarray(routed_scaling_factor, jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights * jnp.asarray(routed_scaling_factor, jnp.float32)


def router_sigmoid_top1(x, w, *, shared_expert=False):
    """Reference of :func:`jaxmoe.ops.router_sigmoid_top1` (see there for the contract)."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    checks.check_sigmoid_top1_args(x, w, shared_expert=shared_expert)
    logits = jnp.dot(x, w, preferred_element_type=jnp.float32, precision=_HIGHEST)
    scores = jax.nn.sigmoid(logits)
    # NaN counts as -inf; argmax takes the first maximum, i.e. the lower expert id.
    topk_ids = jnp.argmax(jnp.where(jnp.isnan(scores), -jnp.inf, scores), axis=-1)[:, None].astype(jnp.int32)
    topk_weights = jnp.take_along_axis(scores, topk_ids, axis=-1)
    if shared_expert:
        m, e = x.shape[0], w.shape[1]
        topk_ids = jnp.concatenate([topk_ids, jnp.full((m, 1), e, jnp.int32)], axis=-1)
        topk_weights = jnp.concatenate([topk_weights, jnp.ones((m, 1), jnp.float32)], axis=-1)
    return topk_weights, topk_ids
