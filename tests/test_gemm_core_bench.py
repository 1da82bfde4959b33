"""bench/gemm_core.py (a GPU tool: the grouped GEMM's K loop beside cuBLAS) on a CPU: its
kernel compiles for sm_90 in every variant it times, each variant loads as it says, and a
bad shape name ends in a usage error, not a traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gemm_core", ROOT / "bench" / "gemm_core.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile(mod, variant):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, a_tma, b_tma, ws, warps, stages, bm, bn, bk = variant
    e, _, n, k = mod.SHAPES["mixtral-8x7b-stage2"]
    constexprs = dict(E=e, N=n, K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, A_TMA=a_tma, B_TMA=b_tma, WS=ws,
                      STAGES=stages, GROUP_M=8)
    signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "ids_ptr": "*i32", "expert_ptr": "*i32",
                 "num_rows": "i32", **{name: "constexpr" for name in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    src = ASTSource(fn=mod.grouped_gemm_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ptr/ptr", "ptr/tma", "tma/tma", "ws"])
def test_every_variant_compiles_for_sm90_and_loads_as_named(which):
    mod = _module()
    variants = mod.VARIANTS + mod.WS_VARIANTS
    variant = next(v for v in variants if v[0].startswith(which if which != "ws" else "tma/tma ws"))
    ptx = _compile(mod, variant).asm["ptx"]
    tma_loads = ptx.count("cp.async.bulk.tensor")
    assert "wgmma.mma_async" in ptx
    if which == "ptr/ptr":
        assert tma_loads == 0 and ("cp.async.cg" in ptx or "cp.async.ca" in ptx)
    else:
        assert tma_loads > 0
    # warp specialisation: warpgroups that trade registers (a producer and its consumers)
    assert ("setmaxnreg" in ptx) == (which == "ws")


def test_a_bad_shape_is_a_usage_error():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gemm_core.py"), "no-such-shape"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown shape 'no-such-shape'" in out.stderr and "Traceback" not in out.stderr
