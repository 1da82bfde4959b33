"""The grouped GEMM's core loop against cuBLAS on the same shapes (PyTorch and Triton, no JAX).

    python bench/gemm_core.py [SHAPE ...] [--ws] [--reps 20]

A plain grouped GEMM over expert-sorted rows (``E`` experts of ``R`` rows each, ``C[rows of e]
= A[rows of e] @ B[e]^T``, bf16 in, fp32 accumulator, bf16 out) in the loads that
``moe_gemm_kernel`` can take, without its epilogue (no activation, no routing weight), so
that its K loop can be set beside cuBLAS's batched GEMM (``torch.bmm``) on the very same
problem:

* ``ptr/ptr``: A's rows gathered by pointers (the MoE stages' A), B by pointers;
* ``ptr/tma``: A gathered, B's tiles by TMA (``JAXMOE_TMA=1`` / a table's ``tma``);
* ``tma/tma``: A's rows contiguous (already sorted), both by TMA;
* with ``--ws`` also ``tma/tma`` under Triton's warp specialisation
  (``tl.range(..., warp_specialize=True)``, 4 warps: a producer warpgroup and two consumer
  warpgroups on sm_90), which needs every load of the loop to be a descriptor load. These
  run last: a fault in one leaves the CUDA context unusable.

Each variant's output is compared with cuBLAS's (relative Frobenius error) and timed with
CUDA events (median of ``--reps`` samples of 5 launches). Shapes: each preset's stage 1
(``N = 2I``, ``K = D``) and stage 2 (``N = D``, ``K = I``) at M = 4096 with rows spread
evenly over the experts. Needs an sm_90 GPU, PyTorch and Triton >= 3.4.
"""

from __future__ import annotations

import argparse
import statistics

import triton
import triton.language as tl


@triton.jit
def grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, ids_ptr, expert_ptr, num_rows,
                        E: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        A_TMA: tl.constexpr, B_TMA: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
                        GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of C per program. A [num_rows, K] (rows ``ids`` of it,
    gathered, or contiguous with ``A_TMA``), B [E, N, K], C [num_rows, N]; row block i is
    expert ``expert[i]``'s. N a multiple of BLOCK_N, K of BLOCK_K, num_rows of BLOCK_M."""
    pid = tl.program_id(0)
    num_n: tl.constexpr = N // BLOCK_N
    num_m = num_rows // BLOCK_M
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    e = tl.load(expert_ptr + pid_m).to(tl.int32)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if A_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[num_rows, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    else:
        rows = tl.load(ids_ptr + offs_m).to(tl.int64)
        a_ptrs = a_ptr + rows[:, None] * K + offs_k[None, :]
    if B_TMA:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E, N, K], strides=[N * K, K, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    else:
        b_ptrs = b_ptr + e.to(tl.int64) * N * K + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        if A_TMA:
            a = a_desc.load([pid_m * BLOCK_M, k])
        else:
            a = tl.load(a_ptrs + k)
        if B_TMA:
            b = tl.trans(tl.reshape(b_desc.load([e, pid_n * BLOCK_N, k]), [BLOCK_N, BLOCK_K]))
        else:
            b = tl.load(b_ptrs + k)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(tl.bfloat16))


SHAPES = {  # name: (E, rows per expert at M = 4096, N, K)
    "mixtral-8x7b-stage1": (8, 1024, 28672, 4096),
    "mixtral-8x7b-stage2": (8, 1024, 4096, 14336),
    "qwen3-30b-a3b-stage1": (128, 256, 1536, 2048),
    "qwen3-30b-a3b-stage2": (128, 256, 2048, 768),
    "deepseek-v3-stage1": (256, 128, 4096, 7168),
    "deepseek-v3-stage2": (256, 128, 7168, 2048),
}
# name, A by TMA, B by TMA, warp-specialised, warps, stages, BLOCK_M, BLOCK_N, BLOCK_K
VARIANTS = [
    ("ptr/ptr 8w 3s", False, False, False, 8, 3, 128, 256, 64),
    ("ptr/tma 8w 4s", False, True, False, 8, 4, 128, 256, 64),
    ("tma/tma 8w 4s", True, True, False, 8, 4, 128, 256, 64),
]
WS_VARIANTS = [
    ("tma/tma ws 4w 3s", True, True, True, 4, 3, 128, 256, 64),
    ("tma/tma ws 4w 4s", True, True, True, 4, 4, 128, 256, 64),
    ("tma/tma ws 4w 2s k128", True, True, True, 4, 2, 128, 256, 128),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", nargs="*", help=f"default: all of {', '.join(SHAPES)}")
    ap.add_argument("--ws", action="store_true", help="also the warp-specialised variants (run last)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    unknown = [s for s in args.shape if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {unknown[0]!r}; known: {', '.join(SHAPES)}")
    import torch

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))

    def timed(fn, inner: int = 5) -> float:
        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(args.reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / inner)
        return statistics.median(samples)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    variants = VARIANTS + (WS_VARIANTS if args.ws else [])
    shapes = args.shape or list(SHAPES)
    # every shape's plain variants first, the warp-specialised ones at the end
    plan = [(s, v) for s in shapes for v in VARIANTS] + [(s, v) for s in shapes for v in variants[len(VARIANTS):]]
    data: dict[str, tuple] = {}
    for shape, variant in plan:
        E, R, N, K = SHAPES[shape]
        rows = E * R
        if shape not in data:
            data.clear()
            torch.cuda.empty_cache()
            gen = torch.Generator(device="cuda").manual_seed(0)
            a = (torch.randn(rows, K, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
            b = (torch.randn(E, N, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16)
            ids = torch.randperm(rows, device="cuda", dtype=torch.int32, generator=gen)
            a_sorted = a[ids.long()].contiguous()
            experts = (torch.arange(rows // 128, device="cuda", dtype=torch.int32) * 128 // R).to(torch.int32)
            ref = torch.bmm(a_sorted.view(E, R, K), b.transpose(1, 2)).view(rows, N)
            t = timed(lambda: torch.bmm(a_sorted.view(E, R, K), b.transpose(1, 2)))
            flops = 2.0 * rows * N * K
            print(f"{shape}: E={E} R={R} N={N} K={K}; cuBLAS bmm {t:.3f} ms, {flops / t / 1e9:.0f} TFLOP/s", flush=True)
            data[shape] = (a, b, ids, a_sorted, experts, ref, flops)
        a, b, ids, a_sorted, experts, ref, flops = data[shape]
        name, a_tma, b_tma, ws, warps, stages, bm, bn, bk = variant
        c = torch.full((rows, N), float("nan"), device="cuda", dtype=torch.bfloat16)  # unwritten tiles show
        grid = (rows // bm * (N // bn),)
        src = a_sorted if a_tma else a

        def launch():
            grouped_gemm_kernel[grid](src, b, c, ids, experts, rows, E, N, K, bm, bn, bk, a_tma, b_tma, ws, stages, 8,
                                      num_warps=warps, num_stages=stages)
        try:
            launch()
            torch.cuda.synchronize()
            err = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
            t = timed(launch)
            print(f"  {name:24s} {t:.3f} ms  {flops / t / 1e9:4.0f} TFLOP/s  error vs cuBLAS {err:.1e}", flush=True)
        except Exception as ex:  # noqa: BLE001 - report and stop: a fault leaves the context unusable
            print(f"  {name:24s} failed: {type(ex).__name__}: {str(ex).splitlines()[0][:200]}", flush=True)
            if "illegal" in str(ex):
                return


if __name__ == "__main__":
    main()
