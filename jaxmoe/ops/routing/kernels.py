"""Routing kernels: top-k softmax/sigmoid, grouped and biased top-k, fused sigmoid top-1.

``@triton.jit`` code only. Selection rules shared by every kernel (and by
``jaxmoe.reference.route``):

* scores are computed in fp32; experts are chosen on *biased* scores
  (``score + correction_bias``), weights come from the *unbiased* scores;
* equal scores pick the lower expert id (and the lower group id);
* a NaN score counts as ``-inf`` for selection, so every id is in ``[0, E)``;
  its weight stays NaN;
* padding lanes (``E <= lane < E_POW2``) can never be chosen: selection runs over an
  ``available`` mask rather than over sentinel values, so a real expert whose score is
  ``-inf`` still beats a padding lane.
"""

import triton
import triton.language as tl

SCORING_SOFTMAX = 0
SCORING_SIGMOID = 1


# Row reductions: tl.reduce with triton.language's own combine functions, i.e. what
# tl.max/tl.sum lower to on a GPU (minus their integer up-casting), which Triton's
# interpreter maps straight onto numpy whichever way the seam loads triton.language.
@triton.jit
def _rmax(x):
    return tl.reduce(x, 1, tl.standard._elementwise_max)


@triton.jit
def _rmin(x):
    return tl.reduce(x, 1, tl.standard._elementwise_min)


@triton.jit
def _rsum(x):
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def _argmax_lowest(sel, available, col, E_POW2: tl.constexpr):
    """Per row: the lowest lane among the available lanes holding the row's maximum."""
    masked = tl.where(available, sel, float("-inf"))
    best = _rmax(masked)
    hit = available & (masked == best[:, None])
    return _rmin(tl.where(hit, col, E_POW2))


# The key of a lane that can never be chosen: below every real lane's key.
_NO_KEY = tl.constexpr(-(2**63))


@triton.jit
def _pack(sel, available, col, E_POW2: tl.constexpr):
    """One int64 per lane whose signed order is "higher score first, then lower lane".

    High 32 bits: the fp32 score's bits made order-preserving for signed compare;
    low bits: ``E_POW2 - 1 - lane``. One max-reduction then yields both a row's best
    score and (ties to the lowest lane) its lane. ``sel`` must hold no NaN.
    """
    sel = tl.where(sel == 0.0, 0.0, sel)  # -0.0 and +0.0 are the same score
    bits = sel.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (E_POW2 - 1 - col).to(tl.int64)
    return tl.where(available, key, _NO_KEY)


@triton.jit
def _key_lane(key, E_POW2: tl.constexpr):
    return (E_POW2 - 1) - (key & (E_POW2 - 1)).to(tl.int32)


@triton.jit
def _key_score(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _topk_route_block(
    pid,
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    M,  # rows of the logits (a runtime argument)
    E: tl.constexpr,
    K: tl.constexpr,
    E_POW2: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    G_POW2: tl.constexpr,
    SCALE: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
    logit_bias_ptr=None,
    HAS_LOGIT_BIAS: tl.constexpr = False,
    SHARED: tl.constexpr = 0,
    S_POW2: tl.constexpr = 1,
):
    """Route rows [pid * BLOCK_M, (pid + 1) * BLOCK_M) of the logits.

    ``HAS_LOGIT_BIAS``: ``logit_bias_ptr``'s ``[E]`` is added to every logit row first (a
    router bias: it moves the scores and the weights, unlike the selection-only
    ``bias_ptr``). ``SHARED``: rows of the outputs are ``K + SHARED`` wide and the last
    ``SHARED`` slots name the shared experts ``E .. E + SHARED - 1`` with weight 1."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    col = tl.arange(0, E_POW2)
    col_ok = col < E
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(logits_ptr + rows[:, None] * E + col[None, :], mask=mask, other=float("-inf"))
    x = tl.where(row_ok[:, None], x.to(tl.float32), 0.0)  # rows past M: no -inf - -inf
    if HAS_LOGIT_BIAS:
        x = x + tl.load(logit_bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SCORING == 0:
        row_max = _rmax(x)
        ex = tl.exp(x - row_max[:, None])
        ex = tl.where(col_ok[None, :], ex, 0.0)
        row_sum = _rsum(ex)
        scores = ex / row_sum[:, None]
    else:
        scores = 1.0 / (1.0 + tl.exp(-x))

    sel = scores
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        sel = sel + bias[None, :]
    sel = tl.where(sel == sel, sel, float("-inf"))  # NaN never wins

    available = tl.broadcast_to(col_ok[None, :], (BLOCK_M, E_POW2))
    keys = _pack(sel, available, col, E_POW2)

    if NUM_GROUPS > 1:
        # Grouped routing: only experts of the best TOPK_GROUP groups compete.
        GROUP_SIZE: tl.constexpr = E // NUM_GROUPS
        gcol = tl.arange(0, G_POW2)
        if E == E_POW2 and NUM_GROUPS == G_POW2:
            # Power-of-two groups tile the row exactly: reduce each group along a third axis.
            gkeys3 = tl.reshape(keys, (BLOCK_M, NUM_GROUPS, GROUP_SIZE))
            best1 = tl.reduce(gkeys3, 2, tl.standard._elementwise_max)
            if GROUP_TOP2 and GROUP_SIZE > 1:
                # group_scoring="top2_sum" (DeepSeek-V3): the sum of its two best (biased) scores.
                rest = tl.where(gkeys3 == best1[:, :, None], _NO_KEY, gkeys3)
                best2 = tl.reduce(rest, 2, tl.standard._elementwise_max)
                group_scores = _key_score(best1) + _key_score(best2)
            else:
                group_scores = _key_score(best1)
        else:
            lane_group = col // GROUP_SIZE
            group_scores = tl.full((BLOCK_M, G_POW2), float("-inf"), tl.float32)
            for g in tl.static_range(NUM_GROUPS):
                in_g = (lane_group == g)[None, :] & available
                gkeys = tl.where(in_g, keys, _NO_KEY)
                best1 = _rmax(gkeys)
                if GROUP_TOP2 and GROUP_SIZE > 1:
                    best2 = _rmax(tl.where(gkeys == best1[:, None], _NO_KEY, gkeys))
                    gscore = _key_score(best1) + _key_score(best2)
                else:
                    # group_scoring="max" (DeepSeek-V2), and one-expert groups: the best expert's score.
                    gscore = _key_score(best1)
                group_scores = tl.where(gcol[None, :] == g, gscore[:, None], group_scores)
        group_scores = tl.where(group_scores == group_scores, group_scores, float("-inf"))
        group_available = tl.broadcast_to((gcol < NUM_GROUPS)[None, :], (BLOCK_M, G_POW2))
        gkeys = _pack(group_scores, group_available, gcol, G_POW2)
        chosen = tl.full((BLOCK_M, G_POW2), 0, tl.int32) != 0
        keep = tl.full((BLOCK_M, E_POW2), 0, tl.int32) != 0
        for _ in tl.static_range(TOPK_GROUP):
            gbest = _rmax(gkeys)
            hit = gkeys == gbest[:, None]
            gkeys = tl.where(hit, _NO_KEY, gkeys)
            if E == E_POW2 and NUM_GROUPS == G_POW2:
                chosen = chosen | hit
            else:
                keep = keep | ((col // GROUP_SIZE)[None, :] == _key_lane(gbest, G_POW2)[:, None])
        if E == E_POW2 and NUM_GROUPS == G_POW2:
            keep = tl.reshape(tl.broadcast_to(chosen[:, :, None], (BLOCK_M, NUM_GROUPS, GROUP_SIZE)),
                              (BLOCK_M, E_POW2))
        # Experts of dropped groups compete at -inf: below every kept expert, above padding.
        keys = tl.where(keep, keys, _pack(tl.full((BLOCK_M, E_POW2), float("-inf"), tl.float32), available,
                                          col, E_POW2))

    kcol = tl.arange(0, K_POW2)
    out_w = tl.full((BLOCK_M, K_POW2), 0.0, tl.float32)
    out_id = tl.full((BLOCK_M, K_POW2), 0, tl.int32)
    for r in tl.static_range(K):
        best = _rmax(keys)
        keys = tl.where(keys == best[:, None], _NO_KEY, keys)
        idx = _key_lane(best, E_POW2)
        # The weight is the chosen expert's unbiased score, recomputed from its logit.
        if HAS_LOGIT_BIAS:
            # the biased logit, from the row in registers (exact: a sum of one value and zeros)
            lg = tl.sum(tl.where(col[None, :] == idx[:, None], x, 0.0), axis=1)
        else:
            lg = tl.load(logits_ptr + rows * E + idx, mask=row_ok, other=0.0).to(tl.float32)
        if SCORING == 0:
            w = tl.exp(lg - row_max) / row_sum
        else:
            w = 1.0 / (1.0 + tl.exp(-lg))
        out_w = tl.where(kcol[None, :] == r, w[:, None], out_w)
        out_id = tl.where(kcol[None, :] == r, idx[:, None], out_id)

    if RENORMALIZE:
        total = _rsum(tl.where(kcol[None, :] < K, out_w, 0.0))
        out_w = out_w / total[:, None]
    if SCALE != 1.0:
        out_w = out_w * SCALE

    omask = row_ok[:, None] & (kcol < K)[None, :]
    offs = rows[:, None] * (K + SHARED) + kcol[None, :]
    tl.store(weights_ptr + offs, out_w, mask=omask)
    tl.store(ids_ptr + offs, out_id, mask=omask)
    if SHARED > 0:
        scol = tl.arange(0, S_POW2)
        smask = row_ok[:, None] & (scol < SHARED)[None, :]
        soffs = rows[:, None] * (K + SHARED) + K + scol[None, :]
        tl.store(weights_ptr + soffs, tl.full((BLOCK_M, S_POW2), 1.0, tl.float32), mask=smask)
        tl.store(ids_ptr + soffs, tl.broadcast_to(E + scol[None, :], (BLOCK_M, S_POW2)), mask=smask)


@triton.jit
def topk_route_kernel(
    logits_ptr,
    M,
    weights_ptr,
    ids_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    E_POW2: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SCORING: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    G_POW2: tl.constexpr,
    SCALE: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
):
    """logits [M, E] -> topk_weights [M, K] f32, topk_ids [M, K] i32 (no bias)."""
    _topk_route_block(
        tl.program_id(0).to(tl.int64), logits_ptr, logits_ptr, weights_ptr, ids_ptr,
        M, E, K, E_POW2, K_POW2, BLOCK_M, SCORING, False, RENORMALIZE, NUM_GROUPS, TOPK_GROUP, G_POW2, SCALE, GROUP_TOP2,
    )


@triton.jit
def topk_route_biased_kernel(
    logits_ptr,
    bias_ptr,
    M,
    weights_ptr,
    ids_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    E_POW2: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SCORING: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    G_POW2: tl.constexpr,
    SCALE: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
):
    """logits [M, E], correction_bias [E] -> topk_weights [M, K] f32, topk_ids [M, K] i32."""
    _topk_route_block(
        tl.program_id(0).to(tl.int64), logits_ptr, bias_ptr, weights_ptr, ids_ptr,
        M, E, K, E_POW2, K_POW2, BLOCK_M, SCORING, True, RENORMALIZE, NUM_GROUPS, TOPK_GROUP, G_POW2, SCALE, GROUP_TOP2,
    )


@triton.jit
def sigmoid_top1_kernel(
    x_ptr,
    w_ptr,
    M,
    weights_ptr,
    ids_ptr,
    D: tl.constexpr,
    E: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SHARED_EXPERT: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """x [M, D] @ w [D, E] -> sigmoid -> top-1, the logits never leave registers.

    Outputs [M, 1] (or [M, 2] with SHARED_EXPERT: column 1 is expert E with weight 1).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    col = tl.arange(0, E_POW2)
    col_ok = col < E
    kk = tl.arange(0, BLOCK_K)

    acc = tl.full((BLOCK_M, E_POW2), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_idx = k0 + kk
        k_ok = k_idx < D
        a = tl.load(x_ptr + rows[:, None] * D + k_idx[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(
            w_ptr + k_idx.to(tl.int64)[:, None] * E + col[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)

    scores = 1.0 / (1.0 + tl.exp(-acc))
    sel = tl.where(scores == scores, scores, float("-inf"))
    available = tl.broadcast_to(col_ok[None, :], (BLOCK_M, E_POW2))
    idx = _argmax_lowest(sel, available, col, E_POW2)
    w = _rsum(tl.where(col[None, :] == idx[:, None], scores, 0.0))

    if SHARED_EXPERT:
        tl.store(weights_ptr + rows * 2, w, mask=row_ok)
        tl.store(ids_ptr + rows * 2, idx, mask=row_ok)
        tl.store(weights_ptr + rows * 2 + 1, tl.full((BLOCK_M,), 1.0, tl.float32), mask=row_ok)
        tl.store(ids_ptr + rows * 2 + 1, tl.full((BLOCK_M,), E, tl.int32), mask=row_ok)
    else:
        tl.store(weights_ptr + rows, w, mask=row_ok)
        tl.store(ids_ptr + rows, idx, mask=row_ok)
