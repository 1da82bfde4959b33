"""One compiled kernel serves every batch size of a config.

Batch-dependent sizes reach the kernels as runtime arguments, so what the planner
specializes on is the config (block sizes, tiles, flags), a few size classes, and, as
jax-triton does for any integer argument, whether a runtime size equals 1. The CPU test
counts the distinct compiled kernels the planner asks for over M = 1..256; the GPU test
lowers the layer for each M and counts what jax-triton really compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from jaxmoe.models import PRESETS
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.moe import triton as moe_triton

MS = range(1, 257)


def planned(preset_name: str, arch: str = "sm90", ms=MS) -> tuple[set, set]:
    """(distinct code keys of every launch moe_layer makes, distinct configs) over ``ms``."""
    p = PRESETS[preset_name]
    keys, configs = set(), set()
    bias = jnp.float32 if p.correction_bias else None
    for m in ms:
        configs.add(_config.select_config(m, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16, arch))
        for spec in moe_triton.plan_routed_moe(
                m, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16, arch, scoring=p.scoring,
                renormalize=p.renormalize, num_expert_group=p.num_expert_group, topk_group=p.topk_group,
                bias_dtype=bias, routed_scaling_factor=p.routed_scaling_factor):
            keys.add(spec.code_key())
    return keys, configs


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"])
def test_batch_sizes_share_compiled_kernels(preset):
    keys, configs = planned(preset)
    gemm = {k for k in keys if k[0] == "moe_gemm_kernel"}
    # each distinct config compiles its two GEMM stages once, for every M it serves (times
    # two where a tail-split flag differs inside the config's M range)
    assert len(gemm) <= 2 * 2 * len(configs), (len(gemm), len(configs))
    # everything else (routing, alignment) depends on a handful of size classes only
    assert len(keys - gemm) <= 12, sorted(k[0] for k in keys - gemm)
    assert len(keys) <= 4 * len(configs) + 12 < len(MS)


def test_a_runtime_size_never_enters_the_constexprs():
    """No constexpr of any launch may take as many values as there are batch sizes."""
    p = PRESETS["qwen3-30b-a3b"]
    seen: dict[tuple[str, str], set] = {}
    for m in MS:
        for spec in moe_triton.plan_routed_moe(m, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16,
                                               "sm90"):
            for name, value in spec.constexprs:
                seen.setdefault((spec.name, name), set()).add(value)
    assert max(len(v) for v in seen.values()) <= 4, {k: len(v) for k, v in seen.items() if len(v) > 4}


_COUNT_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    import jax_triton
    import jaxmoe
    from jaxmoe.models import PRESETS

    def compiled():
        import jax_triton.triton_lib as lib
        if hasattr(lib, "_COMPILED_KERNEL_CACHE"):  # jax-triton 0.3
            return len(lib._COMPILED_KERNEL_CACHE)
        from jaxmoe.ops.alignment import kernels as a
        from jaxmoe.ops.gemm import kernels as g
        from jaxmoe.ops.moe import kernels as f
        from jaxmoe.ops.routing import kernels as r
        fns = [a.moe_align_single_kernel, a.moe_align_count_kernel, a.moe_align_offsets_kernel,
               a.moe_align_scatter_kernel, g.moe_gemm_kernel, f.route_align_kernel, r.topk_route_kernel,
               r.topk_route_biased_kernel]
        return sum(len(getattr(fn, "_jT_kernel_cache", {})) for fn in fns)

    p = PRESETS[sys.argv[1]]
    params = jax.eval_shape(lambda: jaxmoe.init_moe_params(jax.random.key(0), hidden=p.hidden,
                            intermediate=p.intermediate, experts=p.experts))
    routing = p.routing_kwargs(jax.random.key(1))
    layer = jax.jit(lambda prm, x: jaxmoe.moe_layer(prm, x, implementation="triton", **routing))
    before = compiled()
    for m in range(1, int(sys.argv[2]) + 1):
        layer.lower(params, jax.ShapeDtypeStruct((m, p.hidden), jnp.bfloat16))  # lowering compiles the kernels
    print(json.dumps({"compiled": compiled() - before}))
""")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_gpu_compiles_no_more_kernels_than_planned(preset):
    """Lowering moe_layer for M = 1..256 compiles exactly the planner's distinct kernels."""
    keys, configs = planned(preset)
    env = dict(os.environ, JAXMOE_LINE_INFO="0")
    out = subprocess.run([sys.executable, "-c", _COUNT_SCRIPT, preset, str(max(MS))], capture_output=True,
                         text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = json.loads(out.stdout.strip().splitlines()[-1])["compiled"]
    print(f"{preset}: M=1..{max(MS)}: {compiled} Triton kernels compiled, {len(keys)} planned, "
          f"{len(configs)} configs")
    assert compiled == len(keys)
