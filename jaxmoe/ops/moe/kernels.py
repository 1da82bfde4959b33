"""Kernels of the fused MoE's own launches, for decode-sized batches.

``route_align_kernel``: one program routes every row of the logits (at most a few row
blocks) and then aligns the ids it has just written, so a MoE layer's logits become
``sorted_token_ids`` / ``expert_ids`` with one kernel launch instead of two. The routing
and alignment code is the very code of the routing and alignment kernels; only the
driver is new. The batch size is a runtime argument: one compiled kernel serves every
batch of a size class.

``moe_decode_*``: the decode path, a whole layer in two launches without alignment.
Stage 1 (``moe_decode_gate_up_kernel``, or ``moe_decode_route_gate_up_kernel`` which
first routes its token from the logits) runs one program per (token, slot) row and
``BLOCK_N`` columns of ``h``; stage 2 (``moe_decode_down_kernel``) one program per token
and ``BLOCK_D`` columns of ``y``, looping over the token's ``K`` slots in one tile, so the
combine over k is a register sum in a fixed order (no atomics, no ``[M*k, D]`` rows).
Both are GEMVs with fp32 accumulation over weight tiles read along their contiguous
dimension, the K loop a ``tl.range`` of ``STAGES`` stages: with more than one, Triton
software-pipelines its loads (on sm_90 asynchronous copies into shared memory, ``STAGES - 1``
tiles in flight while one is summed); a plain loop of loads that feed no dot is not
pipelined, and each program then waits out the memory latency once per tile. Every id
outside ``[0, E)`` masks its loads (no memory is touched for it) and contributes nothing. Expert offsets are int64 (``E * 2I * D`` passes 2^31).
"""

import triton
import triton.language as tl

from ..alignment.kernels import _align_single
from ..gemm.kernels import _activation
from ..routing.kernels import _topk_route_block


@triton.jit
def route_align_kernel(
    logits_ptr, bias_ptr, logit_bias_ptr, M, max_blocks,
    weights_ptr, ids_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    bases_ptr, end_real_ptr, block_ends_ptr,
    E: tl.constexpr, K: tl.constexpr, E_POW2: tl.constexpr, K_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, G_POW2: tl.constexpr, SCALE: tl.constexpr,
    GROUP_TOP2: tl.constexpr, NB: tl.constexpr, LOG2_NB: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    CHUNK: tl.constexpr, FILL: tl.constexpr,
    HAS_LOGIT_BIAS: tl.constexpr, SHARED: tl.constexpr, S_POW2: tl.constexpr,
):
    """logits [M, E] (+ a router bias [E] with HAS_LOGIT_BIAS; + a selection bias [E] with
    HAS_BIAS) -> topk_weights [M, K + SHARED] f32, topk_ids [M, K + SHARED] i32 (slots K..
    name the shared experts E.., weight 1) and the alignment of those ids over E + SHARED
    experts (outputs of ``moe_align_single_kernel``; the last three are scratch)."""
    for rb in range(0, (M + BLOCK_M - 1) // BLOCK_M):
        _topk_route_block(
            rb, logits_ptr, bias_ptr, weights_ptr, ids_ptr,
            M, E, K, E_POW2, K_POW2, BLOCK_M, SCORING, HAS_BIAS, RENORMALIZE, NUM_GROUPS, TOPK_GROUP, G_POW2,
            SCALE, GROUP_TOP2, logit_bias_ptr, HAS_LOGIT_BIAS, SHARED, S_POW2,
        )
    tl.debug_barrier()  # the ids stored above are read back by other threads below
    _align_single(ids_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
                  bases_ptr, end_real_ptr, block_ends_ptr, M * (K + SHARED), max_blocks, E + SHARED, NB, LOG2_NB,
                  BLOCK_SIZE, CHUNK, FILL)


# --------------------------------------------------------------------------- decode path


@triton.jit
def _decode_gate_up(x_ptr, w1_ptr, h_ptr, row, expert, pid_n,
                    D: tl.constexpr, I: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACTIVATION: tl.constexpr, STAGES: tl.constexpr):
    """h[row, n-block] = act(x[t] . gate rows) * (x[t] . up rows) of ``expert``, t = row // K;
    zeros for an expert outside [0, E) (whose weights are then never read)."""
    valid = (expert >= 0) & (expert < E)
    e = tl.where(valid, expert, 0).to(tl.int64)
    row = row.to(tl.int64)
    t = row // K
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    gate_base = w1_ptr + e * (2 * I * D) + n.to(tl.int64)[:, None] * D
    up_base = gate_base + I * D
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in tl.range(0, D, BLOCK_K, num_stages=STAGES):
        k_idx = k0 + kk
        k_ok = k_idx < D
        xv = tl.load(x_ptr + t * D + k_idx, mask=k_ok & valid, other=0.0).to(tl.float32)
        w_mask = (n_ok & valid)[:, None] & k_ok[None, :]
        wg = tl.load(gate_base + k_idx[None, :], mask=w_mask, other=0.0).to(tl.float32)
        wu = tl.load(up_base + k_idx[None, :], mask=w_mask, other=0.0).to(tl.float32)
        acc_g += wg * xv[None, :]
        acc_u += wu * xv[None, :]
    gate = tl.sum(acc_g, axis=1)
    up = tl.sum(acc_u, axis=1)
    h = tl.where(valid, _activation(gate, ACTIVATION) * up, 0.0)
    tl.store(h_ptr + row * I + n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def moe_decode_gate_up_kernel(
    x_ptr, w1_ptr, ids_ptr,
    h_ptr,
    D: tl.constexpr, I: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACTIVATION: tl.constexpr, STAGES: tl.constexpr,
):
    """x [M, D], w1 [E, 2I, D], topk_ids [M, K] i32 -> h [M*K, I]; grid (M*K, cdiv(I, BLOCK_N))."""
    row = tl.program_id(0)
    expert = tl.load(ids_ptr + row)
    _decode_gate_up(x_ptr, w1_ptr, h_ptr, row, expert, tl.program_id(1), D, I, E, K, BLOCK_N, BLOCK_K,
                    ACTIVATION, STAGES)


@triton.jit
def moe_decode_route_gate_up_kernel(
    x_ptr, w1_ptr, logits_ptr, bias_ptr,
    h_ptr, weights_ptr, ids_ptr, scratch_weights_ptr, scratch_ids_ptr,
    D: tl.constexpr, I: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACTIVATION: tl.constexpr, STAGES: tl.constexpr,
    E_POW2: tl.constexpr, K_POW2: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr, NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, G_POW2: tl.constexpr,
    SCALE: tl.constexpr, GROUP_TOP2: tl.constexpr,
):
    """x [M, D], w1 [E, 2I, D], logits [M, E] (+ bias [E]) -> h [M*K, I], topk_weights [M, K]
    f32, topk_ids [M, K] i32 (the last two outputs are scratch, one [K] row per program).

    Every program routes its own token with the routing kernel's code (so the ids are
    bitwise those of ``topk_route_kernel``) into its own scratch row, which no other
    program touches; the program of slot 0 and column block 0 copies it to the outputs."""
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = (row // K).to(tl.int64)
    j = row % K
    mine = (pid_n.to(tl.int64) * tl.num_programs(0) + row) * K
    _topk_route_block(
        0, logits_ptr + t * E, bias_ptr, scratch_weights_ptr + mine, scratch_ids_ptr + mine,
        1, E, K, E_POW2, K_POW2, 1, SCORING, HAS_BIAS, RENORMALIZE, NUM_GROUPS, TOPK_GROUP, G_POW2,
        SCALE, GROUP_TOP2,
    )
    tl.debug_barrier()  # the row stored above is read back by other threads of this program
    expert = tl.load(scratch_ids_ptr + mine + j)
    if (pid_n == 0) & (j == 0):
        kcol = tl.arange(0, K_POW2)
        k_ok = kcol < K
        tl.store(weights_ptr + t * K + kcol, tl.load(scratch_weights_ptr + mine + kcol, mask=k_ok), mask=k_ok)
        tl.store(ids_ptr + t * K + kcol, tl.load(scratch_ids_ptr + mine + kcol, mask=k_ok), mask=k_ok)
    _decode_gate_up(x_ptr, w1_ptr, h_ptr, row, expert, pid_n, D, I, E, K, BLOCK_N, BLOCK_K, ACTIVATION, STAGES)


@triton.jit
def moe_decode_down_kernel(
    h_ptr, w2_ptr, weights_ptr, ids_ptr,
    y_ptr,
    D: tl.constexpr, I: tl.constexpr, E: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    """h [M*K, I], w2 [E, D, I], topk_weights [M, K] f32, topk_ids [M, K] i32 -> y [M, D];
    grid (M, cdiv(D, BLOCK_D)).

    y[t, d] = sum_j round(w[t, j] * (h[t*K + j] . w2[e_j, d])) over the valid slots j, the
    K slots held as one [K_POW2, BLOCK_D, BLOCK_K] tile (rounded per slot to the output
    dtype, summed in fp32 and rounded once: the rounding model of the two-stage path)."""
    t = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    j = tl.arange(0, K_POW2)
    slot_ok = j < K
    expert = tl.load(ids_ptr + t * K + j, mask=slot_ok, other=-1)
    valid = slot_ok & (expert >= 0) & (expert < E)
    e = tl.where(valid, expert, 0).to(tl.int64)
    w = tl.load(weights_ptr + t * K + j, mask=valid, other=0.0).to(tl.float32)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    kk = tl.arange(0, BLOCK_K)
    w_base = w2_ptr + e[:, None, None] * (D * I) + d.to(tl.int64)[None, :, None] * I  # [K_POW2, BLOCK_D, 1]
    h_base = h_ptr + (t * K + j).to(tl.int64)[:, None] * I  # [K_POW2, 1]
    row_mask = valid[:, None, None] & d_ok[None, :, None]
    acc = tl.zeros((K_POW2, BLOCK_D, BLOCK_K), tl.float32)
    for k0 in tl.range(0, I, BLOCK_K, num_stages=STAGES):
        k_idx = k0 + kk
        k_ok = k_idx < I
        hv = tl.load(h_base + k_idx[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w_base + k_idx[None, None, :], mask=row_mask & k_ok[None, None, :], other=0.0)
        acc += wv.to(tl.float32) * hv[:, None, :]
    rows = tl.sum(acc, axis=2) * w[:, None]  # [K_POW2, BLOCK_D], one per (slot, column)
    rows = rows.to(y_ptr.dtype.element_ty).to(tl.float32)
    out = tl.sum(tl.where(valid[:, None], rows, 0.0), axis=0)
    tl.store(y_ptr + t * D + d, out.to(y_ptr.dtype.element_ty), mask=d_ok)
