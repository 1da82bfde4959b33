"""Where a MoE layer's time goes on the GPU: each stage timed alone.

    python bench/breakdown.py [--model mixtral-8x7b] [--m 1 --m 128]

For each model and M: the whole layer, fused_moe alone (routing precomputed), routing
alone, the alignment alone, and each GEMM stage alone, in microseconds per call (a jit of
8 calls on different inputs, warm, median of 20). The difference between the whole and
the sum of parts is launch and glue overhead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe import moe_layer, ops, reference, route  # noqa: E402
from jaxmoe.ops.gemm import config as _config  # noqa: E402
from jaxmoe.ops.gemm import triton as gemm_triton  # noqa: E402
from jaxmoe.ops.moe import triton as moe_triton  # noqa: E402
from jaxmoe.layer import init_moe_params  # noqa: E402
from jaxmoe.models import PRESETS  # noqa: E402
from jaxmoe.tools.bench import median_call_seconds  # noqa: E402

CALLS = 8


def per_call_us(fn, *args, reps: int = 20) -> float:
    return median_call_seconds(fn, *args, reps=reps) / CALLS * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append")
    ap.add_argument("--m", type=int, action="append")
    args = ap.parse_args()
    print(f"{'model':<15}{'M':>6}{'layer':>9}{'fused':>9}{'route':>9}{'align':>9}{'stage1':>9}{'stage2':>9}"
          f"{'floor':>9}  config")
    for name in args.model or ["mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b"]:
        p = PRESETS[name]
        params = init_moe_params(jax.random.key(0), hidden=p.hidden, intermediate=p.intermediate,
                                 experts=p.experts)
        routing = p.routing_kwargs(jax.random.key(1))
        for m in args.m or [1, 16, 128, 1024, 4096]:
            xs = jax.random.normal(jax.random.key(m), (CALLS, m, p.hidden), jnp.float32).astype(jnp.bfloat16)
            logits = jnp.einsum("smd,de->sme", xs, params["router"], preferred_element_type=jnp.float32)
            w, ids = jax.vmap(lambda lg: reference.route(lg, **routing))(logits)
            cfg = _config.select_config(m, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16,
                                        moe_triton.current_arch())
            layer = per_call_us(lambda prm, xs: [moe_layer(prm, xs[s], implementation="triton", **routing)
                                                 for s in range(CALLS)], params, xs)
            fused = per_call_us(lambda prm, xs, w, ids: [
                moe_triton.fused_moe(xs[s], prm["w1"], prm["w2"], w[s], ids[s]) for s in range(CALLS)],
                params, xs, w, ids)
            rkw = {k: v for k, v in routing.items() if k != "top_k"}
            rt = per_call_us(lambda lg: [route(lg[s], p.top_k, implementation="triton", **rkw)
                                         for s in range(CALLS)], logits)
            al = per_call_us(lambda ids: [ops.moe_align_block_size(ids[s], p.experts, cfg.block_m,
                                                                   implementation="triton")
                                          for s in range(CALLS)], ids)
            aligned = [ops.align(ids[s], p.experts, cfg.block_m, topk_weights=w[s], implementation="triton")
                       for s in range(CALLS)]
            h0 = jnp.zeros((m * p.top_k, p.intermediate), jnp.bfloat16) + 0.01
            arch = moe_triton.current_arch()
            s1 = per_call_us(lambda prm, xs: [
                gemm_triton.gemm(xs[s], prm["w1"], aligned[s], tile=cfg.stage1, arch=arch, topk_weights=None,
                                 activation="silu") for s in range(CALLS)], params, xs)
            s2 = per_call_us(lambda prm, h, w: [
                gemm_triton.gemm(h, prm["w2"], aligned[s], tile=cfg.stage2, arch=arch, topk_weights=w[s],
                                 activation=None) for s in range(CALLS)], params, h0, w)
            hit = len(set(jnp.unique(ids[0]).tolist()))
            nbytes = hit * 3 * p.intermediate * p.hidden * 2 + 2 * m * p.hidden * 2
            floor = max(nbytes / 3.0e12, 2 * m * p.top_k * 3 * p.intermediate * p.hidden / 790e12) * 1e6
            print(f"{name:<15}{m:>6}{layer:>9.1f}{fused:>9.1f}{rt:>9.1f}{al:>9.1f}{s1:>9.1f}{s2:>9.1f}"
                  f"{floor:>9.1f}  {cfg}", flush=True)


if __name__ == "__main__":
    main()
