"""Grouped GEMM over expert-sorted rows, the core of both MoE stages.

Each program computes one (BLOCK_M x BLOCK_N) tile of C for one block of sorted rows,
all of which belong to one expert:

    C[f, n] = sum_k A[f // TOP_K, k] * B[e, n, k]        f = sorted_token_ids[i]

With ``FUSE_ACTIVATION`` (stage 1) the program computes the gate tile (B rows n) and the
up tile (B rows N_OUT + n) together, as one dot over a B tile whose columns interleave
the two, and writes act(gate) * up, so the [rows, 2I] intermediate never reaches memory.
With ``MUL_ROUTED_WEIGHT`` (stage 2) each row is scaled by its routing weight in fp32
before the store. Row offsets are int64: rows
times strides can pass 2^31.

Bad routing data cannot make a program read or write out of bounds: a sorted id outside
[0, num_rows) is padding, and a block whose expert is outside [0, NUM_EXPERTS) writes
zeros to its rows. The number of rows is a runtime argument and the number of row blocks
comes from the grid, so one compiled kernel serves every batch size of a config.

Quantized weights and activations: ``W_SCHEME`` names how B is stored (a key of
``jaxmoe.types.WEIGHT_SCHEMES``), ``A_SCHEME`` how A is rounded before the dot ("none",
"fp8_token", "fp8_group", "int8_token"); both are constexprs, so each combination compiles
to its own straight-line K loop (:func:`_mma`). Weight-only schemes turn the B tile into
A's dtype in registers (8-bit values and 4-bit integers exactly; mxfp4 as e2m1 * 2^e) and
run A's dot (int4 with B as the dot's first operand, ``SWAP_AB``, which sm_90 takes
from registers, its nibbles turned into bf16 pairs by inline PTX on NVIDIA
(``PTX_CONVERT``) and by integer and fp32 operations elsewhere, never by the slow
integer-to-float instructions; mxfp4 against bf16 A through Triton's ``tl.dot_scaled``, ``SCALED_DOT``,
whose sm_90 lowering does the same); w8a8 quantizes the A tile in registers with a per-token scale (a first pass
over the row's K finds its absmax) or, for "fp8_group", a per-token per-128-channel scale
from the tile itself (BLOCK_K = 128), and runs the fp8 (fp32 accumulator) or int8 (int32
accumulator) dot. With ``PREQUANT_A`` A arrives rounded already, with its scales
(``act_quant_kernel``, one pass before the GEMM: the same bits), and the K loop multiplies
8-bit tiles straight from shared memory; at large M, where each row block's A is read by
every column block, that saves re-rounding it per program. Per-channel and per-tensor
scales multiply the accumulator once after the K loop (:func:`_apply_scales`), per-block
and per-group ones each K step's partial product.

Padding: every expert's rows are padded to a multiple of BLOCK_M, so an expert's last
block is often mostly padding (with 130 rows and BLOCK_M = 128, the second block holds 2).
With ``SPLIT_TAIL`` = s > 0, a block whose valid rows all sit in its first BLOCK_M / 2
(or, for s = 2, BLOCK_M / 4) positions runs a tile of that many rows instead, so padding
costs a half (or a quarter) of the multiply work it would.

Split A for int4 (``A_SPLIT``, opt-in: ``JAXMOE_INT4_SPLIT=1``): A's K tiles are stored
with their even columns first, then their odd ones; a byte's low nibble (an even K value)
multiplies the first half, its high nibble the second, two half-depth dots on tiles the
asynchronous copy loaded, with no interleaving of the converted weights in registers.
``C_PERM_K`` > 0 has stage 1 write h's columns in that order for such a stage 2.

K split: with ``SPLIT_K`` = S > 1 (stage 2, no activation, no activation quantization)
S programs share each C tile, each summing a range of whole K tiles into its own fp32
copy of C, ``[S, rows, N]``, which the caller adds up (the bias goes into split 0's).
A decode layer's stage 2 over int4 weights has too few tiles to keep enough loads in
flight without it.

Epilogue options (compile-time): ``HAS_BIAS`` adds an expert bias in fp32 before the
activation (stage 1: ``b1 [E, 2I]`` in B's gate/up order) or before the routing weight
(stage 2: ``b2 [E, D]``, so the bias is weighted with its row, as gpt-oss does); the
``"clamped_swiglu"`` activation is gpt-oss's ``(clip(up) + 1) * g * sigmoid(ALPHA * g)``
with ``g = min(gate, LIMIT)``.

Weight layouts are strides, never copies: B's element (n, k) of an expert is at
``n * stride_bn + k * stride_bk`` (``[E, N, K]`` or, transposed, ``[E, K, N]``), and with
the fused activation gate j sits at B index ``j * GATE_STEP`` and its up at
``j * GATE_STEP + UP_SHIFT`` (gate rows then up rows: 1 and N_OUT; interleaved: 2 and 1).
"""

import triton
import triton.language as tl


@triton.jit
def _remap_for_xcds(pid, num_programs, NUM_XCDS: tl.constexpr):
    """Make consecutive logical tiles run on one XCD (AMD MI300: 8 dies, each with its own L2).

    The hardware hands program ids to XCDs round-robin; this bijection gives XCD x a
    contiguous range of logical ids instead. With NUM_XCDS == 1 (NVIDIA) it is the identity.
    """
    if NUM_XCDS == 1:
        return pid
    per_xcd = (num_programs + NUM_XCDS - 1) // NUM_XCDS
    full = num_programs % NUM_XCDS  # XCDs that get per_xcd programs; the rest get one fewer
    if full == 0:
        full = NUM_XCDS
    xcd = pid % NUM_XCDS
    local = pid // NUM_XCDS
    if xcd < full:
        return xcd * per_xcd + local
    return full * per_xcd + (xcd - full) * (per_xcd - 1) + local


@triton.jit
def _activation(gate, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        return gate / (1.0 + tl.exp(-gate))
    else:  # "gelu", exact (erf) form
        return 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))


FINITE_MAX = tl.constexpr(3.4028234663852886e38)  # fp32's largest finite value


@triton.jit
def _row_absmax(a_ptrs, a_mask, K: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row of A: ``(max |a| over the finite values of its K, NaN if the row holds a NaN or Inf else 0)``."""
    offs_k = tl.arange(0, BLOCK_K)
    amax = tl.zeros([ROWS], dtype=tl.float32)
    bad = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=a_mask[:, None] & (offs_k < K - k0)[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.where(tl.abs(a) <= FINITE_MAX, tl.abs(a), 0.0), axis=1))
        bad += tl.sum(a * 0.0, axis=1)
    return amax, bad


@triton.jit
def _inverse_scale(amax, QMAX: tl.constexpr):
    return tl.where(amax > 0, QMAX / tl.where(amax > 0, amax, 1.0), 0.0)


@triton.jit
def _group_scale(af, QMAX: tl.constexpr):
    """``(scale, QMAX / absmax)`` per row of fp32 activations ``af`` [R, C] (one 128-channel
    group): the absmax over finite values; a row holding a NaN or Inf gets a NaN scale."""
    amax = tl.max(tl.where(tl.abs(af) <= FINITE_MAX, tl.abs(af), 0.0), axis=1)
    return amax / QMAX + tl.sum(af * 0.0, axis=1), _inverse_scale(amax, QMAX)


@triton.jit
def _round_act(af, a_inv, A_SCHEME: tl.constexpr, QMAX: tl.constexpr, Q_DTYPE: tl.constexpr):
    """fp32 activations ``af`` [R, C] times their row's ``a_inv`` [R], rounded to
    ``Q_DTYPE``: to the nearest integer (ties away from zero) for int8, to fp8's nearest
    (ties to even) otherwise; NaN stays NaN (its row's scale is NaN too)."""
    y = af * a_inv[:, None]
    if A_SCHEME == "int8_token":
        return tl.clamp(tl.floor(y + 0.5), -QMAX, QMAX, propagate_nan=tl.PropagateNan.ALL).to(Q_DTYPE)
    return tl.clamp(y, -QMAX, QMAX, propagate_nan=tl.PropagateNan.ALL).to(Q_DTYPE)


@triton.jit
def act_quant_kernel(a_ptr, num_rows, q_ptr, s_ptr, K: tl.constexpr, A_SCHEME: tl.constexpr, QMAX: tl.constexpr,
                     GROUP_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """A ``[num_rows, K]`` rounded to 8 bits once, before a GEMM that reads it many times
    (``PREQUANT_A``): ``Q [num_rows, K]`` and fp32 scales, per row (``"fp8_token"``,
    ``"int8_token"``: ``S [num_rows]``) or per row and ``GROUP_K`` channels
    (``"fp8_group"``: ``S [num_rows, ceil(K / GROUP_K)]``, ``BLOCK_K == GROUP_K``). The same
    absmax, scale and rounding as the GEMM's in-tile quantization, so both give the same
    bits. A row (group) holding a NaN or Inf gets a NaN scale. Row offsets are int64."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < num_rows
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * K + offs_k[None, :]
    q_ptrs = q_ptr + rows[:, None] * K + offs_k[None, :]
    if A_SCHEME == "fp8_group":
        NUM_GROUPS: tl.constexpr = (K + GROUP_K - 1) // GROUP_K
        for g in range(0, NUM_GROUPS):
            mask = ok[:, None] & (offs_k < K - g * GROUP_K)[None, :]
            af = tl.load(a_ptrs + g * GROUP_K, mask=mask, other=0.0).to(tl.float32)
            scale, inv = _group_scale(af, QMAX)
            tl.store(q_ptrs + g * GROUP_K, _round_act(af, inv, A_SCHEME, QMAX, q_ptr.dtype.element_ty), mask=mask)
            tl.store(s_ptr + rows * NUM_GROUPS + g, scale, mask=ok)
    else:
        amax, bad = _row_absmax(a_ptrs, ok, K, BLOCK_R, BLOCK_K)
        a_inv = _inverse_scale(amax, QMAX)
        for k0 in range(0, K, BLOCK_K):
            mask = ok[:, None] & (offs_k < K - k0)[None, :]
            af = tl.load(a_ptrs + k0, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_ptrs + k0, _round_act(af, a_inv, A_SCHEME, QMAX, q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows, amax / QMAX + bad, mask=ok)


@triton.jit
def _nibbles(b):
    """The 4-bit values of a [W, BLOCK_K // 2] tile of bytes (two K values a byte, the even
    one in the low nibble) as a [W, BLOCK_K] tile: column k holds value k's nibble."""
    lo = b & 0xF
    hi = b >> 4
    return tl.reshape(tl.join(lo, hi), [b.shape[0], 2 * b.shape[1]])


@triton.jit
def _e2m1(nib):
    """fp32 values of e2m1 nibbles (sign bit 3, exponent bits 2-1, mantissa bit 0)."""
    exp = ((nib >> 1) & 3).to(tl.int32)
    man = (nib & 1).to(tl.int32)
    val = tl.where(exp == 0, man.to(tl.float32) * 0.5, ((2 + man) << exp).to(tl.float32) * 0.25)
    return tl.where(nib >= 8, -val, val)


@triton.jit
def _small_ints(q, offset):
    """``q - offset`` in fp32 for integers q in [0, 2^23) (4-bit values) and an fp32
    ``offset``, exactly, without an integer-to-float conversion (sm_90 runs those at a
    sixteenth of its fp32 rate): q sits in the mantissa of 2^23 + q, from which
    2^23 + offset is subtracted."""
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (offset + 8388608.0)


# Triton's interpreter runs no inline PTX: the module's interpreted copy (executed with
# the interpreter on) converts 4-bit values with plain operations.
INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))

# Nibble pairs to bf16 pairs, four bytes a time: each byte's low and high nibble are
# spread to 16-bit lanes by ``prmt`` and put into the mantissa of 128 (bf16 0x4300, whose
# last mantissa bit is worth 1) by ``lop3``, then 128 + offset is subtracted in bf16x2:
# int4 flips the sign bit as it goes in (q ^ 8, bits 0x4308) and subtracts 136; int4_zp
# or-s q in and subtracts 128 + z, z the second input's byte of the same element.
def _int4_ptx(zero_points: bool) -> str:
    if zero_points:
        regs, magic, lut = "t0, t1, u0, u1, z0, z1", "0x43004300", "0xEA"  # (q & 0xF) | magic
        subtrahend = ("prmt.b32 z0, $5, 0, 0x4140;\nprmt.b32 z1, $5, 0, 0x4342;\n"
                      "or.b32 z0, z0, 0x43004300;\nor.b32 z1, z1, 0x43004300;\n")
        z = ("z0", "z1", "z0", "z1")
    else:
        regs, magic, lut = "t0, t1, u0, u1, m", "0x43084308", "0x6A"  # (q & 0xF) ^ magic
        subtrahend = ""
        z = ("m",) * 4
    lines = [f".reg .b32 {regs};", "prmt.b32 t0, $4, 0, 0x4140;", "prmt.b32 t1, $4, 0, 0x4342;"]
    lines += subtrahend.splitlines()
    lines += ["shr.b32 u0, t0, 4;", "shr.b32 u1, t1, 4;"]
    lines += [f"lop3.b32 ${i}, {src}, 0x000F000F, {magic}, {lut};" for i, src in enumerate(("t0", "t1", "u0", "u1"))]
    if not zero_points:
        lines.append("mov.b32 m, 0x43084308;")
    lines += [f"sub.bf16x2 ${i}, ${i}, {r};" for i, r in enumerate(z)]
    return "\n{\n" + "\n".join(lines) + "\n}\n"


_INT4_PTX = tl.constexpr(_int4_ptx(False))
_INT4_ZP_PTX = tl.constexpr(_int4_ptx(True))


@triton.jit
def _int4_halves(b, z_ptrs, k0, col_ok, dtype: tl.constexpr, W_SCHEME: tl.constexpr, GROUP_K: tl.constexpr,
                 PTX_CONVERT: tl.constexpr):
    """``(even, odd)``: a [W, BLOCK_K // 2] tile of int4 / int4_zp bytes as two tiles of the
    same shape in ``dtype``, the low nibbles (K values 2j) and the high ones (2j + 1), less
    their zero points for int4_zp (one uint8 per column and GROUP_K, read at ``z_ptrs``).
    bf16 on NVIDIA by :data:`_INT4_PTX` / :data:`_INT4_ZP_PTX`; elsewhere by integer and
    fp32 operations (exact: |v| <= 15)."""
    if W_SCHEME == "int4_zp":
        z = tl.load(z_ptrs + k0 // GROUP_K, mask=col_ok, other=0).to(tl.uint8)
    if PTX_CONVERT and not INTERPRETED and dtype == tl.bfloat16:
        if W_SCHEME == "int4":
            even, odd = tl.inline_asm_elementwise(_INT4_PTX, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16),
                                                  is_pure=True, pack=4)
        else:
            even, odd = tl.inline_asm_elementwise(_INT4_ZP_PTX, "=r,=r,=r,=r,r,r",
                                                  [b, tl.broadcast_to(z[:, None], b.shape)],
                                                  dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    elif W_SCHEME == "int4":  # two's complement: (q ^ 8) - 8
        even = _small_ints((b & 0xF) ^ 8, 8.0).to(dtype)
        odd = _small_ints((b >> 4) ^ 8, 8.0).to(dtype)
    else:
        zf = z.to(tl.float32)[:, None]
        even = _small_ints(b & 0xF, zf).to(dtype)
        odd = _small_ints(b >> 4, zf).to(dtype)
    return even, odd


@triton.jit
def _e8m0(e):
    """2^(e - 127) in fp32 for uint8 exponents, from bits (0 -> 2^-127, 255 -> NaN)."""
    ei = e.to(tl.int32)
    bits = tl.where(ei == 0, 0x400000, ei << 23) | tl.where(ei == 255, 0x400000, 0)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mma(acc, a, b, a_inv, as_ptrs, a_ok, k0, s_ptrs, z_ptrs, col_ok, K: tl.constexpr, BLOCK_K: tl.constexpr,
         W_SCHEME: tl.constexpr, A_SCHEME: tl.constexpr, QMAX: tl.constexpr, GROUP_K: tl.constexpr,
         FP32_IEEE: tl.constexpr, SWAP_AB: tl.constexpr, SCALED_DOT: tl.constexpr, PTX_CONVERT: tl.constexpr,
         PREQUANT_A: tl.constexpr, FP8_MMA_ACC: tl.constexpr):
    """One K step: ``acc`` plus A tile ``a`` [R, BLOCK_K] times B tile ``b`` as stored
    (``W_SCHEME``): [BLOCK_K, W], or for the 4-bit schemes [W, BLOCK_K // 2] bytes, turned
    into A's dtype and transposed in registers. A is rounded per ``A_SCHEME`` (``a_inv``:
    per-row QMAX / absmax), or with ``PREQUANT_A`` arrives rounded (``as_ptrs``: its rows'
    scales; rows not ``a_ok`` read none). A per-K scale past K's last group is never read. With
    ``SWAP_AB`` ``acc`` is [W, R], C's transpose, and the converted B tile the dot's first
    operand; with ``SCALED_DOT`` mxfp4 B goes through ``tl.dot_scaled``."""
    if A_SCHEME == "none":
        if W_SCHEME == "int4" or W_SCHEME == "int4_zp":
            even, odd = _int4_halves(b, z_ptrs, k0, col_ok, a.dtype, W_SCHEME, GROUP_K, PTX_CONVERT)
            bw = tl.reshape(tl.join(even, odd), [b.shape[0], 2 * b.shape[1]])  # K values interleaved back
            if not SWAP_AB:
                bw = tl.trans(bw)
        elif W_SCHEME == "mxfp4":
            # one e8m0 exponent per GROUP_K (32) values: a [W, BLOCK_K // 32] tile, broadcast
            groups = k0 // GROUP_K + tl.arange(0, BLOCK_K // GROUP_K)
            e = tl.load(s_ptrs[:, None] + groups[None, :],
                        mask=col_ok[:, None] & (groups < (K + GROUP_K - 1) // GROUP_K)[None, :], other=127)
            if SCALED_DOT:
                # Triton's scaled dot: on sm_90 the e2m1 tile is converted in registers as the
                # MMA's first operand, the scale multiplied in bf16 (an exponent of 0 reads as
                # a zero scale, not 2^-127; 255 as NaN); the formats are constexprs, which
                # Triton 3.6's interpreter needs
                return tl.dot_scaled(a, None, tl.constexpr("bf16"), tl.trans(b), e, tl.constexpr("e2m1"), acc)
            scale = tl.reshape(tl.broadcast_to(_e8m0(e)[:, :, None], [e.shape[0], BLOCK_K // GROUP_K, GROUP_K]),
                               [e.shape[0], BLOCK_K])
            bw = tl.trans((_e2m1(_nibbles(b)) * scale).to(a.dtype))
        elif W_SCHEME == "none":
            bw = b
        else:  # fp8 and int8 values: exact in bf16, fp16 and fp32
            bw = b.to(tl.float32).to(a.dtype)
        # SWAP_AB: acc is C's transpose, [W, R], the converted B tile the MMA's first
        # operand, which sm_90 takes from registers (no round trip through shared memory)
        if SWAP_AB:
            lhs = bw
            rhs = tl.trans(a)
        else:
            lhs = a
            rhs = bw
        if W_SCHEME == "fp8_block" or W_SCHEME == "int4" or W_SCHEME == "int4_zp":
            s = tl.load(s_ptrs + k0 // GROUP_K, mask=col_ok, other=0.0)
            if FP32_IEEE:
                part = tl.dot(lhs, rhs, input_precision="ieee")
            else:
                part = tl.dot(lhs, rhs)
            if SWAP_AB:
                acc = acc + part * s[:, None]
            else:
                acc = acc + part * s[None, :]
        elif FP32_IEEE:
            acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
        else:
            acc = tl.dot(lhs, rhs, acc)
    else:
        if PREQUANT_A:
            qa = a
            if A_SCHEME == "fp8_group":  # this tile is the row's 128-channel group
                a_scale = tl.load(as_ptrs + k0 // GROUP_K, mask=a_ok, other=0.0)
        else:
            af = a.to(tl.float32)
            if A_SCHEME == "fp8_group":  # this tile is the row's 128-channel group
                a_scale, a_inv = _group_scale(af, QMAX)
            qa = _round_act(af, a_inv, A_SCHEME, QMAX, b.dtype)
        if A_SCHEME == "int8_token":
            acc = tl.dot(qa, b, acc, out_dtype=tl.int32)
        else:
            if A_SCHEME == "fp8_group":
                s = tl.load(s_ptrs + k0 // GROUP_K, mask=col_ok, other=0.0)
                acc = acc + tl.dot(qa, b) * (a_scale[:, None] * s[None, :])
            elif FP8_MMA_ACC:  # the sum over K inside the MMA (JAXMOE_FP8_FAST_ACCUM=1)
                acc = tl.dot(qa, b, acc)
            else:
                # a fresh fp32 partial per K tile, added in registers: Hopper's fp8 MMA keeps
                # fewer accumulator bits than fp32, so the sum over K must not stay inside it
                acc = acc + tl.dot(qa, b)
    return acc


@triton.jit
def _mma_int4_split(acc, a_even, a_odd, b, k0, s_ptrs, z_ptrs, col_ok, BLOCK_K: tl.constexpr, W_SCHEME: tl.constexpr,
                    GROUP_K: tl.constexpr, FP32_IEEE: tl.constexpr, PTX_CONVERT: tl.constexpr):
    """One K step of an int4 / int4_zp GEMM with ``A_SPLIT`` (``SWAP_AB``: ``acc`` is C's
    transpose, [W, R]): ``a_even`` / ``a_odd`` [R, BLOCK_K // 2] are A's even and odd K
    columns of this tile, each loaded as stored (A's K tiles hold their even columns
    first), and ``b`` [W, BLOCK_K // 2] bytes, whose low nibbles are the even K values and
    high nibbles the odd ones. Each nibble half converts where it lies and multiplies its
    half of A, so no converted tile is interleaved in registers."""
    lo, hi = _int4_halves(b, z_ptrs, k0, col_ok, a_even.dtype, W_SCHEME, GROUP_K, PTX_CONVERT)
    s = tl.load(s_ptrs + k0 // GROUP_K, mask=col_ok, other=0.0)
    if FP32_IEEE:
        part = tl.dot(lo, tl.trans(a_even), input_precision="ieee")
        part = tl.dot(hi, tl.trans(a_odd), part, input_precision="ieee")
    else:
        part = tl.dot(lo, tl.trans(a_even))
        part = tl.dot(hi, tl.trans(a_odd), part)
    return acc + part * s[:, None]


@triton.jit
def _apply_scales(acc, a_scale, s_ptrs, col_ok, W_SCHEME: tl.constexpr, A_SCHEME: tl.constexpr):
    """The fp32 accumulator times the per-token and the per-channel (or per-tensor) scales."""
    acc = acc.to(tl.float32)
    if A_SCHEME == "fp8_token" or A_SCHEME == "int8_token":
        acc = acc * a_scale[:, None]
    if W_SCHEME == "fp8" or W_SCHEME == "fp8_tensor" or W_SCHEME == "int8":
        acc = acc * tl.load(s_ptrs, mask=col_ok, other=0.0)[None, :]
    return acc


@triton.jit
def _gated(gate, up, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """Stage 1's ``h`` from the fp32 gate and up tiles."""
    if ACTIVATION == "clamped_swiglu":
        # where, not minimum: a NaN stays NaN
        g = tl.where(gate > LIMIT, LIMIT, gate)
        u = tl.where(up > LIMIT, LIMIT, tl.where(up < -LIMIT, -LIMIT, up))
        return (u + 1.0) * (g / (1.0 + tl.exp(-ALPHA * g)))
    else:
        return _activation(gate, ACTIVATION) * up


@triton.jit
def _block_of_program(N_OUT: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
                      NUM_XCDS: tl.constexpr, SPLIT_K: tl.constexpr):
    """``(pid_m, pid_n, pid_k)``: the row block, column block and K split this program computes.

    The grid is (row blocks x column blocks x K splits) in one axis, the splits of a tile
    adjacent; GROUP_SIZE_M row blocks share each column block in turn, so B tiles stay in
    L2 (after the XCD remap on AMD)."""
    num_n_blocks: tl.constexpr = (N_OUT + BLOCK_N - 1) // BLOCK_N
    pid = _remap_for_xcds(tl.program_id(0), tl.num_programs(0), NUM_XCDS)
    pid_k = pid % SPLIT_K
    pid = pid // SPLIT_K
    num_programs = tl.num_programs(0) // SPLIT_K
    per_group = GROUP_SIZE_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_SIZE_M
    group_rows = tl.minimum(num_programs // num_n_blocks - first_m, GROUP_SIZE_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows, pid_k


@triton.jit
def _block_expert(expert_ids_ptr, pid_m, NUM_EXPERTS: tl.constexpr):
    """``(expert, expert_ok)`` of row block ``pid_m``: an id outside [0, NUM_EXPERTS) reads
    as expert 0 (in bounds) with ``expert_ok`` False, so its rows are masked to zeros."""
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    expert_ok = (expert >= 0) & (expert < NUM_EXPERTS)
    return tl.where(expert_ok, expert, 0), expert_ok


@triton.jit
def _b_descriptor(b_ptr, B_DESC: tl.constexpr, NUM_EXPERTS: tl.constexpr, N_OUT: tl.constexpr, K: tl.constexpr,
                  stride_be: tl.constexpr, stride_bn: tl.constexpr, stride_bk: tl.constexpr,
                  FUSED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A device-side tensor descriptor over B (``B_DESC`` names the view; NVIDIA sm_90+
    loads its tiles by TMA, out-of-range elements as zeros): ``"nk"`` [E, N, K] and ``"kn"``
    [E, K, N] read [W, BLOCK_K] / [BLOCK_K, W] boxes (W = 2 * BLOCK_N for a ``FUSED``
    stage 1, whose B has N = 2 * N_OUT rows); ``"nk_gate_up"`` [E, 2, N_OUT, K] and
    ``"kn_gate_up"`` [E, K, 2, N_OUT] read stage 1's gate rows and up rows of one column
    block in one box, the gate half first."""
    N_B: tl.constexpr = 2 * N_OUT if FUSED else N_OUT
    W: tl.constexpr = 2 * BLOCK_N if FUSED else BLOCK_N
    if B_DESC == "nk":
        return tl.make_tensor_descriptor(b_ptr, shape=[NUM_EXPERTS, N_B, K],
                                         strides=[stride_be, stride_bn, 1], block_shape=[1, W, BLOCK_K])
    elif B_DESC == "kn":
        return tl.make_tensor_descriptor(b_ptr, shape=[NUM_EXPERTS, K, N_B],
                                         strides=[stride_be, stride_bk, 1], block_shape=[1, BLOCK_K, W])
    elif B_DESC == "nk_gate_up":
        return tl.make_tensor_descriptor(b_ptr, shape=[NUM_EXPERTS, 2, N_OUT, K],
                                         strides=[stride_be, N_OUT * stride_bn, stride_bn, 1],
                                         block_shape=[1, 2, BLOCK_N, BLOCK_K])
    else:  # "kn_gate_up"
        return tl.make_tensor_descriptor(b_ptr, shape=[NUM_EXPERTS, K, 2, N_OUT],
                                         strides=[stride_be, stride_bk, N_OUT, 1],
                                         block_shape=[1, BLOCK_K, 2, BLOCK_N])


@triton.jit
def _b_tile(b_desc, expert, n0, k0, B_DESC: tl.constexpr, W: tl.constexpr, BLOCK_K: tl.constexpr):
    """B's [BLOCK_K, W] tile at K offset ``k0`` of ``expert``'s columns from ``n0`` (the
    column block's first B row; gate row with the gate/up views) through ``b_desc``."""
    e = expert.to(tl.int32)
    if B_DESC == "nk":
        return tl.trans(tl.reshape(b_desc.load([e, n0, k0]), [W, BLOCK_K]))
    elif B_DESC == "kn":
        return tl.reshape(b_desc.load([e, k0, n0]), [BLOCK_K, W])
    elif B_DESC == "nk_gate_up":
        return tl.trans(tl.reshape(b_desc.load([e, 0, n0, k0]), [W, BLOCK_K]))
    else:
        return tl.reshape(b_desc.load([e, k0, 0, n0]), [BLOCK_K, W])


@triton.jit
def _gate_up_columns(pid_n, N_OUT: tl.constexpr, BLOCK_N: tl.constexpr, GATE_STEP: tl.constexpr,
                     UP_SHIFT: tl.constexpr, HALVES: tl.constexpr):
    """Stage 1's ``2 * BLOCK_N`` B columns of column block ``pid_n``: ``(gate_n, b_rows)``,
    each column's gate index and its B row. Gate and up alternate (``gate_n * GATE_STEP``,
    ``+ UP_SHIFT``), or with ``HALVES`` (a gate/up descriptor's box) the block's gate rows
    come first, then its up rows (B holds gate then up)."""
    j = tl.arange(0, 2 * BLOCK_N)
    if HALVES:
        gate_n = pid_n * BLOCK_N + j % BLOCK_N
        b_rows = gate_n + (j // BLOCK_N) * N_OUT
    else:
        gate_n = pid_n * BLOCK_N + j // 2
        b_rows = gate_n * GATE_STEP + (j % 2) * UP_SHIFT
    return gate_n, b_rows


@triton.jit
def _split_gate_up(acc, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HALVES: tl.constexpr):
    """The gate and up tiles ``[ROWS, BLOCK_N]`` of an accumulator in :func:`_gate_up_columns`' order."""
    if HALVES:
        return tl.split(tl.permute(tl.reshape(acc, [ROWS, 2, BLOCK_N]), [0, 2, 1]))
    else:
        return tl.split(tl.reshape(acc, [ROWS, BLOCK_N, 2]))


@triton.jit
def _tile(
    a_ptr, as_ptr, b_ptr, b_desc, bs_ptr, bz_ptr, sorted_token_ids_ptr, topk_weights_ptr, bias_ptr, c_ptr, row0, pid_n,
    pid_k, expert, expert_ok,
    num_rows,
    N_OUT: tl.constexpr, K: tl.constexpr, TOP_K: tl.constexpr,
    stride_am: tl.constexpr, stride_be: tl.constexpr, stride_bn: tl.constexpr, stride_bk: tl.constexpr,
    stride_cm: tl.constexpr, GATE_STEP: tl.constexpr, UP_SHIFT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FUSE_ACTIVATION: tl.constexpr, ACTIVATION: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    FP32_IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
    W_SCHEME: tl.constexpr, A_SCHEME: tl.constexpr, QMAX: tl.constexpr,
    stride_se: tl.constexpr, stride_sn: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    SWAP_AB: tl.constexpr, SCALED_DOT: tl.constexpr, PTX_CONVERT: tl.constexpr, SPLIT_K: tl.constexpr,
    PREQUANT_A: tl.constexpr, stride_as: tl.constexpr, FP8_MMA_ACC: tl.constexpr, B_DESC: tl.constexpr,
    A_SPLIT: tl.constexpr, C_PERM_K: tl.constexpr,
):
    """C rows of sorted positions [row0, row0 + ROWS), columns of column block pid_n, all of
    ``expert``; with ``SPLIT_K`` > 1 the sum over split ``pid_k``'s range of K only, into
    ``C[pid_k]`` (the bias in split 0's). B's tiles come through ``b_desc`` unless ``B_DESC``
    is ``"none"``; with a gate/up view the tile's gate columns come first, not alternating."""
    offs_m = row0 + tl.arange(0, ROWS)
    rows = tl.load(sorted_token_ids_ptr + offs_m).to(tl.int64)
    row_mask = (rows >= 0) & (rows < num_rows)
    # rows of a block without a valid expert multiply zeros (a row limit of 0 masks them all)
    a_mask = (rows >= 0) & (rows < num_rows * expert_ok.to(tl.int64))

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // TOP_K)[:, None] * stride_am + offs_k[None, :]
    b_base = b_ptr + expert * stride_be
    HALVES: tl.constexpr = B_DESC == "nk_gate_up" or B_DESC == "kn_gate_up"
    if FUSE_ACTIVATION:
        # One [BLOCK_K, 2 * BLOCK_N] B tile holding gate n and up n: a single wide dot
        # (measured on an H100 at least as fast as two dots of BLOCK_N, and faster at large
        # M); the epilogue pairs each gate column with its up column.
        gate_n, b_rows = _gate_up_columns(pid_n, N_OUT, BLOCK_N, GATE_STEP, UP_SHIFT, HALVES)
        b_cols_ok = gate_n < N_OUT
        W: tl.constexpr = 2 * BLOCK_N
    else:
        b_rows = offs_n
        b_cols_ok = n_mask
        W: tl.constexpr = BLOCK_N
    if SWAP_AB:
        acc = tl.zeros([W, ROWS], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, W], dtype=tl.float32)
    PACKED: tl.constexpr = W_SCHEME == "int4" or W_SCHEME == "int4_zp" or W_SCHEME == "mxfp4"
    if PACKED:
        # two values a byte along K (K even): a [W, BLOCK_K // 2] tile of whole bytes, each
        # column's K contiguous, so the loads are wide and asynchronous like 8-bit B's
        offs_kb = tl.arange(0, BLOCK_K // 2)
        b_ptrs = b_base + b_rows.to(tl.int64)[:, None] * stride_bn + offs_kb[None, :]
    elif B_DESC == "none":
        b_ptrs = b_base + b_rows.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    else:
        b_n0 = pid_n * BLOCK_N if HALVES else pid_n * W  # the box's first B row
    # the scales (and zero points) of B's columns: [E, N // GROUP_N, K groups] flattened
    s_ptrs = bs_ptr + expert * stride_se + (b_rows // GROUP_N).to(tl.int64) * stride_sn
    z_ptrs = bz_ptr + expert * stride_se + (b_rows // GROUP_N).to(tl.int64) * stride_sn
    a_inv = tl.zeros([ROWS], dtype=tl.float32)
    a_scale = tl.zeros([ROWS], dtype=tl.float32)
    as_ptrs = as_ptr + (rows // TOP_K) * stride_as  # A's scales, with PREQUANT_A
    if PREQUANT_A:
        if A_SCHEME == "fp8_token" or A_SCHEME == "int8_token":
            a_scale = tl.load(as_ptrs, mask=a_mask, other=0.0)
    elif A_SCHEME == "fp8_token" or A_SCHEME == "int8_token":
        amax, bad = _row_absmax(a_ptrs, a_mask, K, ROWS, BLOCK_K)
        a_inv = _inverse_scale(amax, QMAX)
        a_scale = amax / QMAX + bad
    if A_SCHEME == "int8_token":
        acc = acc.to(tl.int32)
    if HAS_BIAS:
        # B's N indices are the bias's; a block without a valid expert adds none (its rows
        # stay 0). Loaded before the K loop, so its latency is not added after it.
        n_total: tl.constexpr = 2 * N_OUT if FUSE_ACTIVATION else N_OUT
        bias = tl.load(bias_ptr + expert * n_total + b_rows, mask=b_cols_ok & expert_ok & (pid_k == 0), other=0.0)

    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:  # whole K tiles per split, so a split never starts inside a scale group
        K_SPLIT: tl.constexpr = ((K + SPLIT_K - 1) // SPLIT_K + BLOCK_K - 1) // BLOCK_K * BLOCK_K
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        a_ptrs += k_lo
        if PACKED:
            b_ptrs += k_lo // 2
        elif B_DESC == "none":
            b_ptrs += k_lo * stride_bk
    if A_SPLIT:  # [ROWS, BLOCK_K // 2]: the tile's first half (its even columns); + BLOCK_K // 2 the odd
        a_ptrs_half = a_ptr + (rows // TOP_K)[:, None] * stride_am + k_lo + tl.arange(0, BLOCK_K // 2)[None, :]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if K % BLOCK_K == 0:
            k_mask = tl.full([BLOCK_K], True, tl.int1)
        else:
            k_mask = offs_k < K - k0
        if A_SPLIT:  # K a multiple of BLOCK_K: whole tiles, each's even columns stored first
            a_even = tl.load(a_ptrs_half, mask=a_mask[:, None], other=0.0)
            a_odd = tl.load(a_ptrs_half + BLOCK_K // 2, mask=a_mask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=a_mask[:, None] & k_mask[None, :], other=0.0)
        if B_DESC != "none":
            b = _b_tile(b_desc, expert, b_n0, k0, B_DESC, W, BLOCK_K)
        elif PACKED:
            if K % BLOCK_K == 0:
                b = tl.load(b_ptrs, mask=b_cols_ok[:, None], other=0)
            else:
                b = tl.load(b_ptrs, mask=b_cols_ok[:, None] & (offs_kb < (K - k0) // 2)[None, :], other=0)
        elif W_SCHEME == "none" or W_SCHEME == "fp8" or W_SCHEME == "fp8_tensor" or W_SCHEME == "fp8_block":
            b = tl.load(b_ptrs, mask=k_mask[:, None] & b_cols_ok[None, :], other=0.0)
        else:  # int8 storage
            b = tl.load(b_ptrs, mask=k_mask[:, None] & b_cols_ok[None, :], other=0)
        if A_SPLIT:
            acc = _mma_int4_split(acc, a_even, a_odd, b, k0, s_ptrs, z_ptrs, b_cols_ok, BLOCK_K, W_SCHEME, GROUP_K,
                                  FP32_IEEE, PTX_CONVERT)
            a_ptrs_half += BLOCK_K
        else:
            acc = _mma(acc, a, b, a_inv, as_ptrs, a_mask, k0, s_ptrs, z_ptrs, b_cols_ok, K, BLOCK_K, W_SCHEME,
                       A_SCHEME, QMAX, GROUP_K, FP32_IEEE, SWAP_AB, SCALED_DOT, PTX_CONVERT, PREQUANT_A, FP8_MMA_ACC)
        a_ptrs += BLOCK_K
        if PACKED:
            b_ptrs += BLOCK_K // 2
        elif B_DESC == "none":
            b_ptrs += BLOCK_K * stride_bk
    if SWAP_AB:
        acc = tl.trans(acc)
    acc = _apply_scales(acc, a_scale, s_ptrs, b_cols_ok, W_SCHEME, A_SCHEME)

    if HAS_BIAS:
        acc = acc + bias.to(tl.float32)[None, :]
    if FUSE_ACTIVATION:
        gate, up = _split_gate_up(acc, ROWS, BLOCK_N, HALVES)
        acc = _gated(gate, up, ACTIVATION, ALPHA, LIMIT)
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
    if C_PERM_K > 0:
        # C's columns in the order a consumer with A_SPLIT and BLOCK_K = C_PERM_K reads:
        # each K tile's even columns first, then its odd ones (N_OUT a multiple of C_PERM_K)
        c_cols = (offs_n // C_PERM_K) * C_PERM_K + (offs_n % 2) * (C_PERM_K // 2) + (offs_n % C_PERM_K) // 2
    else:
        c_cols = offs_n
    c_ptrs = c_ptr + rows[:, None] * stride_cm + c_cols[None, :]
    if SPLIT_K > 1:
        c_ptrs += pid_k.to(tl.int64) * num_rows * stride_cm
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bz_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    topk_weights_ptr, bias_ptr,
    num_rows,  # M * top_k: rows of C; sorted ids outside [0, num_rows) are padding
    c_ptr,
    N_OUT: tl.constexpr,  # columns of C (I when the activation is fused, else N)
    K: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    stride_am: tl.constexpr, stride_be: tl.constexpr, stride_bn: tl.constexpr, stride_bk: tl.constexpr,
    stride_cm: tl.constexpr,
    GATE_STEP: tl.constexpr, UP_SHIFT: tl.constexpr,  # B index of gate j: j * GATE_STEP; its up: + UP_SHIFT
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    FUSE_ACTIVATION: tl.constexpr, ACTIVATION: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    NUM_XCDS: tl.constexpr,
    FP32_IEEE: tl.constexpr,  # fp32 operands multiplied exactly, not rounded to TF32
    SPLIT_TAIL: tl.constexpr,  # 0, 1 or 2: how many times a mostly-padding block may halve its rows
    HAS_BIAS: tl.constexpr,  # add bias_ptr's [E, N] expert bias in the epilogue
    ALPHA: tl.constexpr, LIMIT: tl.constexpr,  # the clamped SwiGLU's parameters (else unused)
    W_SCHEME: tl.constexpr,  # how B is stored: a key of jaxmoe.types.WEIGHT_SCHEMES
    A_SCHEME: tl.constexpr,  # how A is rounded: "none", "fp8_token", "fp8_group", "int8_token"
    QMAX: tl.constexpr,  # the quantized activations' largest magnitude (448, 240 or 127)
    stride_se: tl.constexpr, stride_sn: tl.constexpr,  # B's scales: per expert, per GROUP_N rows
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,  # rows and K values one scale covers
    SWAP_AB: tl.constexpr,  # int4 B: C's transpose accumulated, the converted B tile the first operand
    SCALED_DOT: tl.constexpr,  # mxfp4 B against bf16 A through tl.dot_scaled
    PTX_CONVERT: tl.constexpr,  # NVIDIA: int4 B converted to bf16 by inline PTX
    SPLIT_K: tl.constexpr,  # programs per tile, each summing a range of K into its own fp32 C [SPLIT_K, rows, N]
    PREQUANT_A: tl.constexpr,  # A arrives rounded to 8 bits (act_quant_kernel), its scales at as_ptr
    stride_as: tl.constexpr,  # A scales per row: 1, or K's 128-channel groups for "fp8_group"
    FP8_MMA_ACC: tl.constexpr,  # "fp8_token": the sum over K kept in the MMA's accumulator
    B_DESC: tl.constexpr,  # "none": B's tiles by pointers; else the descriptor view (_b_descriptor)
    A_SPLIT: tl.constexpr,  # int4 B (SWAP_AB): A's K tiles stored with their even columns first
    C_PERM_K: tl.constexpr,  # > 0: C's columns written in A_SPLIT's order for K tiles of C_PERM_K
):
    pid_m, pid_n, pid_k = _block_of_program(N_OUT, BLOCK_N, GROUP_SIZE_M, NUM_XCDS, SPLIT_K)
    row0 = pid_m * BLOCK_M
    if row0 >= tl.load(num_tokens_post_padded_ptr):
        return  # this row block holds no rows: the grid is sized for the worst case
    # No such expert: the block's rows are written as zeros through the one code path
    # (its A rows load as zeros against expert 0's weights, read in bounds).
    expert, expert_ok = _block_expert(expert_ids_ptr, pid_m, NUM_EXPERTS)
    if B_DESC != "none":
        b_desc = _b_descriptor(b_ptr, B_DESC, NUM_EXPERTS, N_OUT, K, stride_be, stride_bn, stride_bk,
                               FUSE_ACTIVATION, BLOCK_N, BLOCK_K)
    else:
        b_desc = b_ptr  # unused

    quarter = False  # compile-time False unless the kernel may split
    half = False
    if SPLIT_TAIL > 0:
        # Positions up to the last valid row of the block (any layout, not only padding last).
        pos = tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_token_ids_ptr + row0 + pos)
        used = tl.max(tl.where((ids >= 0) & (ids < num_rows), pos, 0), axis=0) + 1
        half = used <= BLOCK_M // 2
        if SPLIT_TAIL > 1:
            quarter = used <= BLOCK_M // 4
    if quarter:
        _tile(a_ptr, as_ptr, b_ptr, b_desc, bs_ptr, bz_ptr, sorted_token_ids_ptr, topk_weights_ptr, bias_ptr, c_ptr, row0,
              pid_n, pid_k, expert, expert_ok, num_rows, N_OUT, K, TOP_K, stride_am, stride_be, stride_bn, stride_bk,
              stride_cm,
              GATE_STEP, UP_SHIFT, BLOCK_M // 4, BLOCK_N, BLOCK_K, FUSE_ACTIVATION, ACTIVATION, MUL_ROUTED_WEIGHT,
              FP32_IEEE, HAS_BIAS, ALPHA, LIMIT, W_SCHEME, A_SCHEME, QMAX, stride_se, stride_sn, GROUP_N, GROUP_K,
              SWAP_AB, SCALED_DOT, PTX_CONVERT, SPLIT_K, PREQUANT_A, stride_as, FP8_MMA_ACC, B_DESC, A_SPLIT,
              C_PERM_K)
    elif half:
        _tile(a_ptr, as_ptr, b_ptr, b_desc, bs_ptr, bz_ptr, sorted_token_ids_ptr, topk_weights_ptr, bias_ptr, c_ptr, row0,
              pid_n, pid_k, expert, expert_ok, num_rows, N_OUT, K, TOP_K, stride_am, stride_be, stride_bn, stride_bk,
              stride_cm,
              GATE_STEP, UP_SHIFT, BLOCK_M // 2, BLOCK_N, BLOCK_K, FUSE_ACTIVATION, ACTIVATION, MUL_ROUTED_WEIGHT,
              FP32_IEEE, HAS_BIAS, ALPHA, LIMIT, W_SCHEME, A_SCHEME, QMAX, stride_se, stride_sn, GROUP_N, GROUP_K,
              SWAP_AB, SCALED_DOT, PTX_CONVERT, SPLIT_K, PREQUANT_A, stride_as, FP8_MMA_ACC, B_DESC, A_SPLIT,
              C_PERM_K)
    else:
        _tile(a_ptr, as_ptr, b_ptr, b_desc, bs_ptr, bz_ptr, sorted_token_ids_ptr, topk_weights_ptr, bias_ptr, c_ptr, row0,
              pid_n, pid_k, expert, expert_ok, num_rows, N_OUT, K, TOP_K, stride_am, stride_be, stride_bn, stride_bk,
              stride_cm,
              GATE_STEP, UP_SHIFT, BLOCK_M, BLOCK_N, BLOCK_K, FUSE_ACTIVATION, ACTIVATION, MUL_ROUTED_WEIGHT,
              FP32_IEEE, HAS_BIAS, ALPHA, LIMIT, W_SCHEME, A_SCHEME, QMAX, stride_se, stride_sn, GROUP_N, GROUP_K,
              SWAP_AB, SCALED_DOT, PTX_CONVERT, SPLIT_K, PREQUANT_A, stride_as, FP8_MMA_ACC, B_DESC, A_SPLIT,
              C_PERM_K)


# --------------------------------------------------------------------------- backward


@triton.jit
def _activation_and_derivative(gate, ACTIVATION: tl.constexpr):
    """``(act(gate), act'(gate))`` in fp32, the same act as :func:`_activation`."""
    if ACTIVATION == "silu":
        sig = 1.0 / (1.0 + tl.exp(-gate))
        return gate * sig, sig * (1.0 + gate * (1.0 - sig))
    else:  # "gelu", exact (erf) form: act' = Phi(g) + g * phi(g)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        return gate * cdf, cdf + gate * 0.3989422804014327 * tl.exp(-0.5 * gate * gate)


@triton.jit
def _gated_grads(gate, up, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """``(d h / d gate, d h / d up)`` in fp32 for :func:`_gated`'s ``h``."""
    if ACTIVATION == "clamped_swiglu":
        # the clamps pass the gradient where the value is inside them (boundaries included)
        over = gate > LIMIT
        g = tl.where(over, LIMIT, gate)
        u_out = (up > LIMIT) | (up < -LIMIT)
        u = tl.where(up > LIMIT, LIMIT, tl.where(up < -LIMIT, -LIMIT, up))
        sig = 1.0 / (1.0 + tl.exp(-ALPHA * g))
        glu = g * sig
        d_glu = sig * (1.0 + ALPHA * g * (1.0 - sig))
        return tl.where(over, 0.0, (u + 1.0) * d_glu), tl.where(u_out, 0.0, glu)
    else:
        act, act_grad = _activation_and_derivative(gate, ACTIVATION)
        return act_grad * up, act


@triton.jit
def moe_gemm_act_bwd_kernel(
    a_ptr, b_ptr, dh_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr, bias_ptr,
    num_rows,  # M * top_k: rows of dh and C; sorted ids outside [0, num_rows) are padding
    c_ptr,
    N_OUT: tl.constexpr,  # I: columns of dh; C has 2 * N_OUT
    K: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    stride_am: tl.constexpr, stride_be: tl.constexpr, stride_bn: tl.constexpr, stride_bk: tl.constexpr,
    GATE_STEP: tl.constexpr, UP_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    ACTIVATION: tl.constexpr, NUM_XCDS: tl.constexpr, FP32_IEEE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
    B_DESC: tl.constexpr,  # "none": B's tiles by pointers; else the descriptor view (_b_descriptor)
):
    """Stage 1 backward: the gate/up gradients of ``h = gated(gate, up)``, rows by expert.

    Recomputes the stage-1 pre-activation tile exactly as ``moe_gemm_kernel`` does
    (``gate_up[f] = A[f // TOP_K] @ B[e].T`` (+ the bias), gate and up columns interleaved
    in one dot, B read through the same strides), then, in the epilogue, with ``dh[f]``:

        C[f, n * GATE_STEP]            = dh[f, n] * dh/dgate[f, n]      (d gate)
        C[f, n * GATE_STEP + UP_SHIFT] = dh[f, n] * dh/dup[f, n]        (d up)

    (C's columns in B's gate/up order), so neither the pre-activation nor its gradient
    before the cast reaches memory. Rows of a block without a valid expert are written as
    zeros (their A rows and dh load as zeros). With a gate/up descriptor view the tile's
    gate columns come first, as in ``moe_gemm_kernel``.
    """
    # the forward kernel's schedule: the same (row block, column block) per program
    pid_m, pid_n, _ = _block_of_program(N_OUT, BLOCK_N, GROUP_SIZE_M, NUM_XCDS, 1)
    row0 = pid_m * BLOCK_M
    if row0 >= tl.load(num_tokens_post_padded_ptr):
        return
    expert, expert_ok = _block_expert(expert_ids_ptr, pid_m, NUM_EXPERTS)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_token_ids_ptr + offs_m).to(tl.int64)
    row_mask = (rows >= 0) & (rows < num_rows)
    a_mask = (rows >= 0) & (rows < num_rows * expert_ok.to(tl.int64))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // TOP_K)[:, None] * stride_am + offs_k[None, :]
    HALVES: tl.constexpr = B_DESC == "nk_gate_up" or B_DESC == "kn_gate_up"
    gate_n, b_rows = _gate_up_columns(pid_n, N_OUT, BLOCK_N, GATE_STEP, UP_SHIFT, HALVES)
    b_cols_ok = gate_n < N_OUT
    if B_DESC == "none":
        b_ptrs = b_ptr + expert * stride_be + b_rows.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    else:
        b_desc = _b_descriptor(b_ptr, B_DESC, NUM_EXPERTS, N_OUT, K, stride_be, stride_bn, stride_bk, True,
                               BLOCK_N, BLOCK_K)
        b_n0 = pid_n * BLOCK_N if HALVES else pid_n * 2 * BLOCK_N
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:
            k_mask = tl.full([BLOCK_K], True, tl.int1)
        else:
            k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=a_mask[:, None] & k_mask[None, :], other=0.0)
        if B_DESC == "none":
            b = tl.load(b_ptrs, mask=k_mask[:, None] & b_cols_ok[None, :], other=0.0)
            b_ptrs += BLOCK_K * stride_bk
        else:
            b = _b_tile(b_desc, expert, b_n0, k0, B_DESC, 2 * BLOCK_N, BLOCK_K)
        if FP32_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * (2 * N_OUT) + b_rows, mask=b_cols_ok & expert_ok, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    gate, up = _split_gate_up(acc, BLOCK_M, BLOCK_N, HALVES)
    d_gate, d_up = _gated_grads(gate, up, ACTIVATION, ALPHA, LIMIT)
    tile_mask = a_mask[:, None] & n_mask[None, :]
    dh = tl.load(dh_ptr + rows[:, None] * N_OUT + offs_n[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    store_mask = row_mask[:, None] & n_mask[None, :]
    c_ptrs = c_ptr + rows[:, None] * (2 * N_OUT) + (offs_n * GATE_STEP)[None, :]
    tl.store(c_ptrs, (dh * d_gate).to(c_ptr.dtype.element_ty), mask=store_mask)
    tl.store(c_ptrs + UP_SHIFT, (dh * d_up).to(c_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def moe_weight_grad_kernel(
    g_ptr, a_ptr, sorted_token_ids_ptr, expert_offsets_ptr, topk_weights_ptr,
    num_rows,  # M * top_k; sorted ids outside [0, num_rows) are padding
    c_ptr,
    N_OUT: tl.constexpr,  # rows of each expert's gradient (columns of G)
    K: tl.constexpr,  # columns of each expert's gradient (columns of A)
    TOP_K_G: tl.constexpr,  # row f reads G[f // TOP_K_G]
    TOP_K_A: tl.constexpr,  # and A[f // TOP_K_A]
    NUM_EXPERTS: tl.constexpr,
    stride_gm: tl.constexpr, stride_am: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_GROUP: tl.constexpr,  # output tiles along K per program
    MUL_ROUTED_WEIGHT: tl.constexpr, FP32_IEEE: tl.constexpr,
):
    """Grouped weight gradient: ``C[e] = sum over e's sorted rows f of G[f]^T A[f]``.

    ``C[e, n, k] = sum_f w_f * G[f // TOP_K_G, n] * A[f // TOP_K_A, k]`` over the rows f at
    sorted positions ``[expert_offsets[e], expert_offsets[e + 1])`` (``w_f`` the routing
    weight with ``MUL_ROUTED_WEIGHT``, else 1). Each program owns ``K_GROUP`` consecutive
    (BLOCK_N x BLOCK_K) tiles of one expert along K and walks, for each tile in turn, that
    expert's positions BLOCK_R at a time in order, in one flat loop (tile by tile, the
    epilogue of one tile inside it), so the loads of the next tile overlap the last steps
    of this one: an expert with few rows (many experts, or a small batch) is not a chain
    of programs each waiting on its first loads. Each step's row ids are loaded in the step
    before it, so that no operand load depends on a load of its own step: the pipeliner
    then prefetches the gathered operand tiles ``num_stages - 1`` steps ahead (with the ids
    loaded in their own step it kept two buffers, one step ahead, whatever the stages, and
    each step waited on its gathers). No atomics: the same sums in the same
    order on every run, and an expert without rows gets zeros. Only the expert's own rows
    are read, so a NaN in one token reaches only the experts it is routed to. Offsets are
    int64 (rows times strides, and experts times N_OUT * K, can pass 2^31).
    """
    num_n_blocks: tl.constexpr = (N_OUT + BLOCK_N - 1) // BLOCK_N
    num_k_blocks: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    num_k_groups: tl.constexpr = (num_k_blocks + K_GROUP - 1) // K_GROUP
    pid = tl.program_id(0)
    expert = pid // (num_n_blocks * num_k_groups)
    rest = pid % (num_n_blocks * num_k_groups)
    pid_n = rest // num_k_groups
    kb0 = (rest % num_k_groups) * K_GROUP
    tiles = tl.minimum(num_k_blocks - kb0, K_GROUP)

    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    steps = tl.maximum((end - start + BLOCK_R - 1) // BLOCK_R, 1)  # an expert without rows: one empty step
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    c_rows = c_ptr + expert.to(tl.int64) * (N_OUT * K) + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    pos = start + tl.arange(0, BLOCK_R)
    next_rows = tl.load(sorted_token_ids_ptr + pos, mask=pos < end, other=-1)
    for it in range(0, tiles * steps):
        step = it % steps
        offs_k = (kb0 + it // steps) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # this step's row ids, loaded in the last step
        rows = next_rows.to(tl.int64)
        ok = (pos < end) & (rows >= 0) & (rows < num_rows)
        pos = start + ((it + 1) % steps) * BLOCK_R + tl.arange(0, BLOCK_R)
        next_rows = tl.load(sorted_token_ids_ptr + pos, mask=pos < end, other=-1)
        g = tl.load(g_ptr + (rows // TOP_K_G)[:, None] * stride_gm + offs_n[None, :],
                    mask=ok[:, None] & n_mask[None, :], other=0.0)
        if MUL_ROUTED_WEIGHT:
            weight = tl.load(topk_weights_ptr + rows, mask=ok, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * weight[:, None]).to(g_ptr.dtype.element_ty)
        a = tl.load(a_ptr + (rows // TOP_K_A)[:, None] * stride_am + offs_k[None, :],
                    mask=ok[:, None] & k_mask[None, :], other=0.0)
        if FP32_IEEE:
            acc = tl.dot(tl.trans(g), a, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g), a, acc)
        if step == steps - 1:  # this tile's last rows: store it, start the next
            tl.store(c_rows + offs_k[None, :], acc.to(c_ptr.dtype.element_ty),
                     mask=n_mask[:, None] & k_mask[None, :])
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
