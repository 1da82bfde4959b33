"""An independent float64 numpy oracle, written apart from jaxmoe.reference: plain loops
over tokens, slots and sorted positions, no shared code, no rounding model."""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf)


def activation(name: str, gate: np.ndarray) -> np.ndarray:
    if name == "silu":
        return gate / (1.0 + np.exp(-gate))
    return 0.5 * gate * (1.0 + _erf(gate / math.sqrt(2.0)))


def route(logits, top_k, *, scoring="softmax", renormalize=True, num_expert_group=None, topk_group=None,
          correction_bias=None, routed_scaling_factor=1.0, group_scoring=None):
    if group_scoring is None:
        group_scoring = "max" if correction_bias is None else "top2_sum"
    logits = np.asarray(logits, np.float64)
    m, e = logits.shape
    bias = np.zeros(e) if correction_bias is None else np.asarray(correction_bias, np.float64)
    weights = np.zeros((m, top_k))
    ids = np.zeros((m, top_k), np.int64)
    for t in range(m):
        row = logits[t]
        if scoring == "softmax":
            z = np.exp(row - np.max(row))
            scores = z / np.sum(z)
        else:
            scores = 1.0 / (1.0 + np.exp(-row))
        biased = [(-math.inf if math.isnan(v) else float(v)) for v in scores + bias]
        allowed = set(range(e))
        if num_expert_group is not None:
            size = e // num_expert_group
            group_score = []
            for g in range(num_expert_group):
                members = sorted(biased[g * size:(g + 1) * size], reverse=True)
                s = sum(members[:2]) if group_scoring == "top2_sum" else members[0]
                group_score.append(-math.inf if math.isnan(s) else s)
            kept = sorted(range(num_expert_group), key=lambda g: (-group_score[g], g))[:topk_group]
            allowed = {x for g in kept for x in range(g * size, (g + 1) * size)}
        effective = [biased[x] if x in allowed else -math.inf for x in range(e)]
        chosen = sorted(range(e), key=lambda x: (-effective[x], x))[:top_k]
        w = np.array([scores[x] for x in chosen])
        if renormalize:
            w = w / w.sum()
        weights[t] = w * routed_scaling_factor
        ids[t] = chosen
    return weights, ids


def moe_align_block_size(topk_ids, num_experts, block_size):
    flat = np.asarray(topk_ids).reshape(-1)
    t = flat.size
    sorted_ids, expert_ids = [], []
    for ex in range(num_experts):
        rows = [f for f in range(t) if flat[f] == ex]
        if not rows:
            continue
        while len(rows) % block_size:
            rows.append(t)
        sorted_ids += rows
        expert_ids += [ex] * (len(rows) // block_size)
    return np.array(sorted_ids, np.int64), np.array(expert_ids, np.int64), len(sorted_ids)


def moe_gemm(a, b, sorted_token_ids, expert_ids, num_tokens_post_padded, *, top_k, num_rows, block_size,
             topk_weights=None, activation_name=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = b.shape[1]
    out = np.zeros((num_rows, n if activation_name is None else n // 2))
    sorted_token_ids, expert_ids = np.asarray(sorted_token_ids), np.asarray(expert_ids)
    flat_w = None if topk_weights is None else np.asarray(topk_weights, np.float64).reshape(-1)
    for i in range(int(np.asarray(num_tokens_post_padded).reshape(-1)[0])):
        f, ex = int(sorted_token_ids[i]), int(expert_ids[i // block_size])
        if not (0 <= f < num_rows and 0 <= ex < b.shape[0]):
            continue
        c = b[ex] @ a[f // top_k]
        if activation_name is not None:
            c = activation(activation_name, c[: n // 2]) * c[n // 2:]
        if flat_w is not None:
            c = c * flat_w[f]
        out[f] = c
    return out


def fused_moe(x, w1, w2, topk_weights, topk_ids, activation_name="silu"):
    x, w1, w2 = (np.asarray(v, np.float64) for v in (x, w1, w2))
    topk_weights, topk_ids = np.asarray(topk_weights, np.float64), np.asarray(topk_ids)
    m, d = x.shape
    e, two_i, _ = w1.shape
    i = two_i // 2
    out = np.zeros((m, d))
    for t in range(m):
        for j in range(topk_ids.shape[1]):
            ex = int(topk_ids[t, j])
            if not 0 <= ex < e:
                continue  # an invalid id contributes nothing
            gate_up = w1[ex] @ x[t]
            h = activation(activation_name, gate_up[:i]) * gate_up[i:]
            out[t] += topk_weights[t, j] * (w2[ex] @ h)
    return out


def gpt_oss_moe(x, router_weight, router_bias, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, top_k,
                alpha=1.702, limit=7.0):
    """gpt-oss's MoE block (``GptOssMLP``) in float64, token by token, from the published
    modelling code: router ``logits = x @ W.T + b``; the top-k logits, then a softmax over
    them; per chosen expert ``gate_up = x @ gate_up_proj[e] + bias`` ([E, D, 2I], gate at
    even and up at odd columns), the gate clamped above at ``limit``, up to
    ``[-limit, limit]``, ``(up + 1) * gate * sigmoid(alpha * gate)``, then ``@ down_proj[e]
    + down_bias`` ([E, I, D]) times the routing weight. Returns ``(y [M, D], ids [M, k])``,
    ids in descending logit order."""
    x = np.asarray(x, np.float64)
    w, b = np.asarray(router_weight, np.float64), np.asarray(router_bias, np.float64)
    gu, gub = np.asarray(gate_up_proj, np.float64), np.asarray(gate_up_proj_bias, np.float64)
    dn, dnb = np.asarray(down_proj, np.float64), np.asarray(down_proj_bias, np.float64)
    m, d = x.shape
    y = np.zeros((m, d))
    ids = np.zeros((m, top_k), np.int64)
    for t in range(m):
        logits = w @ x[t] + b
        chosen = sorted(range(len(logits)), key=lambda e: (-logits[e], e))[:top_k]
        top = np.array([logits[e] for e in chosen])
        z = np.exp(top - top.max())
        weights = z / z.sum()
        ids[t] = chosen
        for e, weight in zip(chosen, weights):
            gate_up = x[t] @ gu[e] + gub[e]
            gate, up = gate_up[0::2], gate_up[1::2]
            gate = np.minimum(gate, limit)
            up = np.clip(up, -limit, limit)
            h = (up + 1.0) * gate / (1.0 + np.exp(-alpha * gate))
            y[t] += weight * (h @ dn[e] + dnb[e])
    return y, ids


def fused_moe_with(x, w1, w2, topk_weights, topk_ids, *, layout="out_in", b1=None, b2=None, activation_name="silu",
                   alpha=1.702, limit=7.0):
    """The fused MoE for every weight layout, expert bias and activation, in float64:
    the per-expert matrices are read out of the stored layout by index, one token and slot
    at a time. ``activation_name`` "clamped_swiglu" is gpt-oss's form."""
    x, w1, w2 = (np.asarray(v, np.float64) for v in (x, w1, w2))
    topk_weights, topk_ids = np.asarray(topk_weights, np.float64), np.asarray(topk_ids)
    m, d = x.shape
    e = w1.shape[0]
    in_out, interleaved = layout.startswith("in_out"), layout.endswith("interleaved")
    two_i = w1.shape[2] if in_out else w1.shape[1]
    i = two_i // 2
    gate_idx = [2 * j if interleaved else j for j in range(i)]
    up_idx = [2 * j + 1 if interleaved else i + j for j in range(i)]
    out = np.zeros((m, d))
    for t in range(m):
        for s in range(topk_ids.shape[1]):
            ex = int(topk_ids[t, s])
            if not 0 <= ex < e:
                continue
            a = w1[ex].T if in_out else w1[ex]  # [2I, D]
            gate_up = a @ x[t] + (0.0 if b1 is None else np.asarray(b1, np.float64)[ex])
            gate, up = gate_up[gate_idx], gate_up[up_idx]
            if activation_name == "clamped_swiglu":
                gate = np.minimum(gate, limit)
                up = np.clip(up, -limit, limit)
                h = (up + 1.0) * gate / (1.0 + np.exp(-alpha * gate))
            else:
                h = activation(activation_name, gate) * up
            down = w2[ex].T if in_out else w2[ex]  # [D, I]
            row = down @ h + (0.0 if b2 is None else np.asarray(b2, np.float64)[ex])
            out[t] += topk_weights[t, s] * row
    return out
