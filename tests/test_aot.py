"""Every MoE kernel, with every config the package can choose, compiles ahead of time for
gfx942 (MI300X), gfx950 (MI350X) and sm_90 (H100) on a machine without a GPU, and fits the
target's shared memory / LDS."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import pytest

from jaxmoe.backends import KernelLaunch, aot
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.moe import decode
from jaxmoe.ops.moe import triton as moe_triton
from jaxmoe.models import PRESETS

TARGETS = {"sm_90": "sm90", "gfx942": "gfx942", "gfx950": "gfx950"}
MS = (1, 16, 128, 1024, 4096)
DTYPES = (jnp.bfloat16, jnp.float32)  # fp16 tiles are the bf16 ones: same sizes, same code paths
# constexprs that only size the problem: configs differing in these alone compile to the
# same code up to constants (loop bounds, mask limits, strides), so one of them is compiled.
# What changes the code is kept: the tile, dtypes, flags, whether K and N are whole tiles
# (masks or not), a K loop shorter than the pipeline, how rows divide by TOP_K (not at
# all, a shift, a division), and which runtime sizes equal 1 (a constant on a real launch).
# Batch sizes are runtime arguments already, so they never multiply the compiles.
_SHAPE_ONLY = {"stride_am", "stride_be", "stride_bn", "stride_bk", "stride_cm", "stride_gm", "K", "N_OUT", "TOP_K",
               "TOP_K_G", "TOP_K_A", "NUM_EXPERTS", "UP_SHIFT"}


def _rows_class(top_k: int) -> str:
    return "one" if top_k == 1 else "pow2" if top_k & (top_k - 1) == 0 else "other"


def _key(spec: KernelLaunch):
    const = dict(spec.constexprs)
    # the weight gradient's K_GROUP bounds loops and scales a tile index: one tile or more
    shape_free = tuple((k, v if k != "K_GROUP" else v == 1) for k, v in spec.constexprs if k not in _SHAPE_ONLY)
    tiling = None
    if "BLOCK_K" in const and "N_OUT" not in const:  # A's rounding pass: whole K steps, one step or more
        tiling = (const["K"] % const["BLOCK_K"] == 0, const["K"] <= const["BLOCK_K"])
    elif "BLOCK_K" in const:
        tiling = (const["K"] % const["BLOCK_K"] == 0, const["N_OUT"] % const["BLOCK_N"] == 0,
                  # the GEMMs' K loop against the pipeline (the weight gradient loops over rows)
                  None if "BLOCK_R" in const else min(const["K"] // const["BLOCK_K"], spec.num_stages),
                  tuple(_rows_class(const[k]) for k in ("TOP_K", "TOP_K_G", "TOP_K_A") if k in const),
                  const.get("stride_bk", 1) == 1)  # B read transposed (the backward) or not
    ones = tuple(int(v) == 1 for _, v in spec.scalars)
    return (spec.name, tuple(a.dtype.name for a in (*spec.args, *spec.outs)), shape_free, tiling, ones,
            spec.num_warps, spec.num_stages)


def launches_for(arch: str) -> list[backends.KernelLaunch]:
    """The distinct launches fused_moe makes for every preset, M, dtype and activation on ``arch``,
    plus every entry of the arch's tuned config files (the arch's and each device's)."""
    seen = _distinct_over_presets(moe_triton.plan_fused_moe, arch)
    top_k = {(p.experts, p.hidden, p.intermediate): p.top_k for p in PRESETS.values()}
    tuned = [(shape, table) for path in package_tables(arch) for shape, table in _config._load(str(path)).items()]
    for shape, table in tuned:
        fields = dict(part.split("=") for part in shape.split(","))
        e, d, i = (int(fields[name]) for name in ("E", "D", "I"))
        dtype = jnp.dtype(fields["dtype"])
        for m, entry in table.items():
            config = _config.MoEConfig.from_json(entry)
            k = top_k.get((e, d, i), 8)
            for spec in moe_triton.plan_fused_moe(int(m), k, e, d, i, dtype, arch, config=config,
                                                  weights=fields.get("w", "none"), act_quant=fields.get("a")):
                seen.setdefault(_key(spec), spec)
    return list(seen.values())


def package_tables(arch: str) -> list:
    """The package's tuned tables for ``arch``: ``<arch>.json`` and every ``<arch>-<device>.json``."""
    return [_config.PACKAGE_CONFIGS / f"{arch}.json", *sorted(_config.PACKAGE_CONFIGS.glob(f"{arch}-*.json"))]


def backward_launches_for(arch: str) -> list[KernelLaunch]:
    """The distinct launches the backward of fused_moe makes for every preset, M, dtype and
    activation on ``arch`` (its tiles depend on BLOCK_M, dtype and arch only, so few), with
    stage 1's pre-activation recomputed (the default) and saved (``save_gate_up``)."""
    saved = functools.partial(moe_triton.plan_fused_moe_backward, save_gate_up=True)
    return list({**_distinct_over_presets(moe_triton.plan_fused_moe_backward, arch),
                 **_distinct_over_presets(saved, arch)}.values())


def _distinct_over_presets(plan, arch: str) -> dict:
    """``plan``'s launches for every preset, M, dtype and activation on ``arch``, one per code key."""
    seen: dict = {}
    for preset in PRESETS.values():
        for m in MS:
            for dtype in DTYPES:
                for activation in ("silu", "gelu"):
                    for spec in plan(m, preset.top_k, preset.experts, preset.hidden, preset.intermediate, dtype,
                                     arch, activation):
                        seen.setdefault(_key(spec), spec)
    return seen


def _compile_all(specs: list[KernelLaunch], target: str) -> None:
    arch = TARGETS[target]
    limit = _config.SHARED_MEMORY_LIMIT[arch]
    # Compiles run two at a time: much of each is ptxas / the LLVM backend outside the GIL
    # (1.6x faster on 2 cores); results are checked here, in order.
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        compiled_all = list(pool.map(lambda spec: aot.compile_aot(spec, target), specs))
    for spec, compiled in zip(specs, compiled_all):
        binary = compiled.asm["cubin" if target == "sm_90" else "hsaco"]
        assert len(binary) > 0, spec
        assert compiled.metadata.shared <= limit, (spec.name, dict(spec.constexprs), compiled.metadata.shared)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_moe_launch_compiles(target):
    specs = launches_for(TARGETS[target])
    assert len(specs) > 10
    _compile_all(specs, target)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_moe_backward_launch_compiles(target):
    specs = backward_launches_for(TARGETS[target])
    assert {spec.name for spec in specs} == {"moe_gemm_kernel", "moe_gemm_act_bwd_kernel", "moe_weight_grad_kernel"}
    _compile_all(specs, target)


# Quantized experts: every (weight scheme, act_quant) at the decode tile, the large-M tile
# for the schemes that serve prefill (w8a8 also at the decode tile with A rounded in a
# pass); Mixtral-8x7B's shape (whole tiles), DeepSeek-V3's for
# fp8_block, gpt-oss-120b's for the 4-bit ones (D = I = 2880: a partial K tile). On gfx942
# the fp8 values are e4m3fnuz, elsewhere e4m3fn (the plans pick the arch's type).
QUANT_COMBOS = [("fp8", None), ("fp8", "fp8"), ("fp8_tensor", None), ("fp8_tensor", "fp8"), ("fp8_block", None),
                ("fp8_block", "fp8"), ("int8", None), ("int8", "int8"), ("int4", None), ("int4_zp", None),
                ("mxfp4", None)]
QUANT_PREFILL = {("fp8", "fp8"), ("fp8_block", "fp8"), ("int8", "int8"), ("int4", None), ("mxfp4", None)}


def quantized_launches_for(arch: str) -> list[KernelLaunch]:
    shapes = {"fp8_block": PRESETS["deepseek-v3"], "int4": PRESETS["gpt-oss-120b"],
              "int4_zp": PRESETS["gpt-oss-120b"], "mxfp4": PRESETS["gpt-oss-120b"]}
    seen: dict = {}
    for weights, act_quant in QUANT_COMBOS:
        p = shapes.get(weights, PRESETS["mixtral-8x7b"])
        ms = (16, 4096) if (weights, act_quant) in QUANT_PREFILL else (16,)
        if act_quant is not None and (weights, act_quant) in QUANT_PREFILL:
            # the decode tiles at the first M that rounds A in a pass (32 rows per expert)
            ms = (*ms, p.experts * _config.PREQUANT_MIN_ROWS // p.top_k)
        if weights in _config.SPLIT_K_SCHEMES:
            ms = (1, *ms)  # M = 1: stage 2 split along K
        for m in ms:
            for spec in moe_triton.plan_fused_moe(m, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16,
                                                  arch, weights=weights, act_quant=act_quant):
                if spec.name in ("moe_gemm_kernel", "act_quant_kernel"):  # the GEMMs and A's rounding pass
                    seen.setdefault(_key(spec), spec)
    p = PRESETS["mixtral-8x7b"]
    with pytest.MonkeyPatch.context() as mp:  # the fp8 sum over K in the MMA too
        mp.setenv(_config.FAST_ACCUM_ENV, "1")
        for m in (16, 4096):
            for spec in moe_triton.plan_fused_moe(m, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16,
                                                  arch, weights="fp8", act_quant="fp8"):
                if spec.name == "moe_gemm_kernel":
                    seen.setdefault(_key(spec), spec)
    if not any(dict(s.constexprs).get("SPLIT_K", 1) > 1 for s in seen.values()):
        # the heuristic splits on NVIDIA only; a tuned table may split anywhere
        import dataclasses

        p = shapes["int4"]
        c = _config.select_config(1, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16, arch, "int4")
        c = dataclasses.replace(c, stage2=dataclasses.replace(c.stage2, split_k=2))
        spec = moe_triton.plan_fused_moe(1, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16, arch,
                                         config=c, weights="int4")[-1]
        seen.setdefault(_key(spec), spec)
    return list(seen.values())


def feature_launches_for(arch: str) -> list[KernelLaunch]:
    """gpt-oss's layer as the loader gives it (layout in_out_interleaved, expert biases, the
    clamped SwiGLU) at gpt-oss-120b's shape: the forward at M = 1 and 4096, the backward at
    M = 4096 (its tiles depend on BLOCK_M only), GEMM kernels only (the alignment's are the
    plain layer's), one per code key not already compiled by the plain layer's tests."""
    from jaxmoe.types import ClampedSwiGLU

    p = PRESETS["gpt-oss-120b"]
    plain = {**_distinct_over_presets(moe_triton.plan_fused_moe, arch),
             **{_key(s): s for s in backward_launches_for(arch)}}
    seen: dict = {}
    options = dict(layout="in_out_interleaved", biases=True)
    plans = [*moe_triton.plan_fused_moe(1, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16, arch,
                                        ClampedSwiGLU(), **options),
             *moe_triton.plan_fused_moe(4096, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16, arch,
                                        ClampedSwiGLU(), **options),
             *moe_triton.plan_fused_moe_backward(4096, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16,
                                                 arch, ClampedSwiGLU(), **options),
             *moe_triton.plan_fused_moe_backward(4096, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16,
                                                 arch, ClampedSwiGLU(), save_gate_up=True, **options)]
    for spec in plans:
        if spec.name.startswith("moe_") and "gemm" in spec.name or spec.name == "moe_weight_grad_kernel":
            key = _key(spec)
            if key not in plain:
                seen.setdefault(key, spec)
    return list(seen.values())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_quantized_launch_compiles(target):
    specs = quantized_launches_for(TARGETS[target])
    gemms = [s for s in specs if s.name == "moe_gemm_kernel"]
    fp8 = {spec.args[2].dtype.name for spec in gemms if dict(spec.constexprs)["W_SCHEME"].startswith("fp8")}
    assert fp8 == {"float8_e4m3fnuz" if target == "gfx942" else "float8_e4m3fn"}
    assert {dict(s.constexprs)["W_SCHEME"] for s in gemms} == {w for w, _ in QUANT_COMBOS}
    assert any(dict(s.constexprs)["SPLIT_K"] > 1 for s in gemms)
    # the prefill sizes of w8a8 read A rounded by a pass before each GEMM: every A scheme's pass
    assert {dict(s.constexprs)["A_SCHEME"] for s in gemms if dict(s.constexprs)["PREQUANT_A"]} == {
        "fp8_token", "fp8_group", "int8_token"}
    assert {dict(s.constexprs)["A_SCHEME"] for s in specs if s.name == "act_quant_kernel"} == {
        "fp8_token", "fp8_group", "int8_token"}
    assert len(gemms) >= 2 * len(QUANT_COMBOS)
    assert sum(dict(s.constexprs)["FP8_MMA_ACC"] for s in gemms) == 4  # both stages at M = 16 and 4096
    _compile_all(specs, target)


def _ptxas_report(ptx: str) -> str:
    """``ptxas -v``'s report on ``ptx`` compiled for sm_90a."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        return subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", src, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True).stderr


def _ptxas_spill_bytes(ptx: str) -> int:
    """Bytes a thread spills to local memory in ``ptx`` compiled for sm_90a (``ptxas -v``)."""
    import re

    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", _ptxas_report(ptx)))


# A few bytes of spill (ptxas keeps an address or two in local memory) cost nothing
# measurable; the tiles that kept two 128-register accumulators spilled 0.3-1.4 KB a thread.
# The most that passes: fp8_block stage 1 with A rounded before it, 128 x 64 (48 bytes: the
# rows' scale addresses, read every K step).
SPILL_LIMIT = 64


def test_fp8_sum_over_k_in_the_mma_keeps_an_mma_in_flight(monkeypatch):
    """sm_90: fp8 w8a8 at M = 4096 (A rounded before the GEMM) waits for each K step's MMA
    when each step's product is a fresh partial, and keeps one MMA group in flight across
    steps (``wgmma.wait_group 1``) with ``JAXMOE_FP8_FAST_ACCUM=1``."""
    p = PRESETS["mixtral-8x7b"]

    def stage2_ptx():
        spec = moe_triton.plan_fused_moe(4096, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16, "sm90",
                                         weights="fp8", act_quant="fp8")[-1]
        assert dict(spec.constexprs)["PREQUANT_A"]
        return aot.compile_aot(spec, "sm_90").asm["ptx"]

    assert "wgmma.wait_group.sync.aligned 1" not in stage2_ptx()
    monkeypatch.setenv(_config.FAST_ACCUM_ENV, "1")
    assert "wgmma.wait_group.sync.aligned 1" in stage2_ptx()


def test_weight_grad_loads_run_the_pipeline_deep():
    """sm_90: the weight gradient's gathered row loads are prefetched as far ahead as its
    stages allow: each operand gets one shared-memory buffer per stage. When a step's row
    ids were loaded in that step, the operand loads depended on a load in the same step and
    the pipeliner kept two buffers whatever the stages (a prefetch of one step)."""
    import re

    p = PRESETS["mixtral-8x7b"]
    spec = next(s for s in moe_triton.plan_fused_moe_backward(4096, p.top_k, p.experts, p.hidden, p.intermediate,
                                                               jnp.bfloat16, "sm90")
                if s.name == "moe_weight_grad_kernel")
    const = dict(spec.constexprs)
    ttgir = aot.compile_aot(spec, "sm_90").asm["ttgir"]
    buffers = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x(\d+)x(\d+)xbf16", ttgir)
    operand_buffers = sorted(int(n) for n, r, _ in buffers if int(r) == const["BLOCK_R"])
    assert spec.num_stages >= 3
    assert operand_buffers == [spec.num_stages, spec.num_stages], (spec.num_stages, buffers)


@pytest.mark.slow
def test_quantized_gemms_keep_registers_and_load_b_in_whole_bytes():
    """sm_90: no quantized GEMM spills more than ``SPILL_LIMIT`` bytes a thread, and the
    4-bit ones load B as whole bytes through the asynchronous-copy pipeline (a [K, N] tile
    at k // 2 was a single-byte load per element, outside it)."""
    specs = [s for s in quantized_launches_for("sm90")
             if s.name == "moe_gemm_kernel" and dict(s.constexprs)["W_SCHEME"] != "none"]
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        compiled = list(pool.map(lambda spec: aot.compile_aot(spec, "sm_90"), specs))
    spills = {}
    for spec, c in zip(specs, compiled):
        const = dict(spec.constexprs)
        name = (const["W_SCHEME"], const["A_SCHEME"], const["BLOCK_M"], const["BLOCK_N"], const["FUSE_ACTIVATION"])
        ptx = c.asm["ptx"]
        spills[name] = _ptxas_spill_bytes(ptx)
        if const["W_SCHEME"] in ("int4", "int4_zp", "mxfp4"):
            assert "cp.async" in ptx, name
            # single-byte loads are left for int4_zp's zero points and mxfp4's exponents
            # (one per column and group) only; the old [K, N] B tile took 64-256 of them
            if const["W_SCHEME"] != "mxfp4":  # int4 nibbles to bf16 by the inline PTX
                assert "0x43084308" in ptx or "0x43004300" in ptx, name
            byte_loads = ptx.count("ld.global.b8")
            assert byte_loads <= (4 if const["W_SCHEME"] in ("int4_zp", "mxfp4") else 0), (name, byte_loads)
    assert max(spills.values()) <= SPILL_LIMIT, {k: v for k, v in spills.items() if v > SPILL_LIMIT}


def int4_split_launches(arch: str) -> list[KernelLaunch]:
    """The int4 and int4_zp layers' GEMMs with ``JAXMOE_INT4_SPLIT=1`` (set by the caller):
    Mixtral-8x7B at M = 1 and 4096, both schemes, bf16 and fp32 activations (the PTX and
    the plain conversion), one launch per code key."""
    p = PRESETS["mixtral-8x7b"]
    seen: dict = {}
    for weights in ("int4", "int4_zp"):
        for m in (1, 4096):
            for dtype in (jnp.bfloat16, jnp.float32):
                for spec in moe_triton.plan_fused_moe(m, p.top_k, p.experts, p.hidden, p.intermediate, dtype, arch,
                                                      "silu", weights=weights):
                    if spec.name == "moe_gemm_kernel":
                        seen.setdefault(_key(spec), spec)
    return list(seen.values())


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_int4_split_launches_compile(target, monkeypatch):
    """``JAXMOE_INT4_SPLIT=1``: both stages of the int4 layers read A split (stage 1 writing
    h so for stage 2) and compile for every target; on sm_90 they keep their registers and
    the PTX conversion."""
    monkeypatch.setenv(_config.INT4_SPLIT_ENV, "1")
    specs = int4_split_launches(TARGETS[target])
    assert specs and all(dict(s.constexprs)["A_SPLIT"] for s in specs)
    assert any(dict(s.constexprs)["C_PERM_K"] for s in specs if dict(s.constexprs)["FUSE_ACTIVATION"])
    _compile_all(specs, target)
    if target == "sm_90":
        for spec in specs:
            if spec.args[0].dtype == jnp.bfloat16:
                ptx = aot.compile_aot(spec, "sm_90").asm["ptx"]
                assert "0x43084308" in ptx or "0x43004300" in ptx
                assert _ptxas_spill_bytes(ptx) <= SPILL_LIMIT


def tma_launches() -> dict[str, list[KernelLaunch]]:
    """The GEMM launches (stage-1 recompute of the backward included) that read B through
    tensor descriptors with ``JAXMOE_TMA=1`` (set by the caller), by view, one per A dtype, weight scheme and epilogue: Mixtral-8x7B's
    forward (each weight layout) and backward at M = 4096 in bf16 (fp16's code is the same
    but for the type), and its w8a8 fp8 and int8 and weight-only fp8 forward."""
    p = PRESETS["mixtral-8x7b"]
    args = (4096, p.top_k, p.experts, p.hidden, p.intermediate)
    specs = []
    for layout in ("out_in", "in_out", "in_out_interleaved", "out_in_interleaved"):
        specs += moe_triton.plan_fused_moe(*args, jnp.bfloat16, "sm90", "silu", layout=layout)
    specs += moe_triton.plan_fused_moe_backward(*args, jnp.bfloat16, "sm90", "silu")
    for weights, act_quant in (("fp8", "fp8"), ("int8", "int8"), ("fp8", None)):
        specs += moe_triton.plan_fused_moe(*args, jnp.bfloat16, "sm90", weights=weights, act_quant=act_quant)
    views: dict[str, dict] = {}
    for spec in specs:
        if spec.name in ("moe_gemm_kernel", "moe_gemm_act_bwd_kernel"):
            const = dict(spec.constexprs)
            # one launch per kernel, view, A dtype, weight scheme and epilogue (what changes the loads)
            kind = (spec.name, spec.args[0].dtype.name, const.get("W_SCHEME"), const.get("FUSE_ACTIVATION"))
            views.setdefault(const["B_DESC"], {}).setdefault(kind, spec)
    return {view: list(seen.values()) for view, seen in views.items()}


def test_tma_b_loads_compile_for_sm90(monkeypatch):
    """sm_90 with ``JAXMOE_TMA=1``: every GEMM of these layers reads B by TMA through one of
    the four descriptor views (the scratch its descriptor takes is Triton's global scratch),
    and keeps its registers: stage 1's bf16 tile at 8 warps drops from 254 registers to
    under 200."""
    monkeypatch.setenv(_config.TMA_ENV, "1")
    views = tma_launches()
    p = PRESETS["mixtral-8x7b"]
    fp32 = moe_triton.plan_fused_moe(4096, p.top_k, p.experts, p.hidden, p.intermediate, jnp.float32, "sm90", "silu")
    # fp32's exact product runs from registers: a descriptor's tile only adds spills
    assert {dict(s.constexprs)["B_DESC"] for s in fp32 if s.name == "moe_gemm_kernel"} == {"none"}
    assert any(s.name == "moe_gemm_act_bwd_kernel" for group in views.values() for s in group)
    assert set(views) == {"nk", "nk_gate_up", "kn", "kn_gate_up"}, set(views)
    specs = [spec for group in views.values() for spec in group]
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        compiled = list(pool.map(lambda spec: aot.compile_aot(spec, "sm_90"), specs))
    for spec, c in zip(specs, compiled):
        const = dict(spec.constexprs)
        name = (spec.name, const["B_DESC"], spec.args[0].dtype.name, const.get("W_SCHEME"), const.get("FUSE_ACTIVATION"))
        ptx = c.asm["ptx"]
        assert "cp.async.bulk.tensor" in ptx and c.metadata.global_scratch_size >= 128, name
        assert c.metadata.shared <= _config.SHARED_MEMORY_LIMIT["sm90"], name
        assert _ptxas_spill_bytes(ptx) <= SPILL_LIMIT, name
        if name == ("moe_gemm_kernel", "nk_gate_up", "bfloat16", "none", True) and spec.num_warps == 8:
            assert _ptxas_registers(ptx) < 200, name


def _ptxas_registers(ptx: str) -> int:
    """Registers a thread of ``ptx`` takes compiled for sm_90a (``ptxas -v``)."""
    import re

    return int(re.findall(r"Used (\d+) registers", _ptxas_report(ptx))[0])


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_feature_launch_compiles(target):
    specs = feature_launches_for(TARGETS[target])
    names = {spec.name for spec in specs}
    assert {"moe_gemm_kernel", "moe_gemm_act_bwd_kernel"} <= names, names  # the epilogues are new code
    assert any(dict(s.constexprs).get("HAS_BIAS") and dict(s.constexprs).get("ACTIVATION") == "clamped_swiglu"
               for s in specs)
    _compile_all(specs, target)


def test_heuristic_buckets_cover_every_block_m():
    picked = {_config.heuristic_config(m, 2, 8, 4096, 14336, jnp.bfloat16).block_m for m in (1, 64, 300, 4096)}
    assert picked == {16, 32, 64, 128}


# The decode path: shape constexprs of its kernels, and what else decides their code.
_DECODE_SHAPE_ONLY = {"D", "I", "E", "K"}


def _decode_key(spec: KernelLaunch):
    const = dict(spec.constexprs)
    tile = "BLOCK_N" if "BLOCK_N" in const else "BLOCK_D"
    cols = const["I"] if tile == "BLOCK_N" else const["D"]
    depth = const["D"] if tile == "BLOCK_N" else const["I"]
    masks = (cols % const[tile] == 0, depth % const["BLOCK_K"] == 0, _rows_class(const["K"]))
    shape_free = tuple((k, v) for k, v in spec.constexprs if k not in _DECODE_SHAPE_ONLY)
    return (spec.name, tuple(a.dtype.name for a in (*spec.args, *spec.outs)), shape_free, masks, spec.num_warps)


def decode_launches() -> list[KernelLaunch]:
    """One launch per code shape of the decode path over every preset, its routing and both
    activations (bf16: fp16 is the same code; tiles do not depend on M)."""
    seen: dict = {}
    for preset in PRESETS.values():
        routing = dict(scoring=preset.scoring, renormalize=preset.renormalize,
                       num_expert_group=preset.num_expert_group, topk_group=preset.topk_group,
                       bias_dtype=jnp.float32 if preset.correction_bias else None,
                       routed_scaling_factor=preset.routed_scaling_factor, group_scoring=preset.group_scoring)
        for activation in ("silu", "gelu"):
            shape = (1, preset.top_k, preset.experts, preset.hidden, preset.intermediate, jnp.bfloat16)
            for spec in (*decode.plan_decode(*shape, activation=activation),
                         *decode.plan_decode(*shape, activation=activation, routed=True, **routing)):
                seen.setdefault(_decode_key(spec), spec)
    return list(seen.values())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_decode_launch_compiles(target):
    specs = decode_launches()
    assert {s.name for s in specs} == {"moe_decode_gate_up_kernel", "moe_decode_route_gate_up_kernel",
                                       "moe_decode_down_kernel"}
    _compile_all(specs, target)


def test_decode_loops_are_software_pipelined():
    """sm_90: both decode K loops copy their weight tiles asynchronously into shared memory
    (``cp.async``: the loads of the next tiles are in flight while one is summed) wherever
    the loop has more than one step; a plain loop of loads that feed no dot is not
    pipelined, whatever the launch's num_stages."""
    def tiles(spec):  # K steps of the loop (one step: nothing to overlap)
        const = dict(spec.constexprs)
        return -(-const["D" if "BLOCK_N" in const else "I"] // const["BLOCK_K"])

    specs = [s for s in decode_launches()
             if s.name in ("moe_decode_gate_up_kernel", "moe_decode_down_kernel") and tiles(s) > 1]
    assert len({s.name for s in specs}) == 2
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        compiled = list(pool.map(lambda spec: aot.compile_aot(spec, "sm_90"), specs))
    for spec, c in zip(specs, compiled):
        ptx = c.asm["ptx"]
        assert "cp.async" in ptx and "cp.async.wait_group" in ptx, (spec.name, dict(spec.constexprs))
