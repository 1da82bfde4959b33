"""A sweep of the training backward's tiles on the GPU, launch by launch.

    python bench/backward_tiles.py --model mixtral-8x7b --m 4096 [--reps 10] [--lock FILE]
                                   [--role dgrad2 ...] [--out PREFIX]

For each model preset and M it routes a random batch with the preset's routing, aligns it
at the forward's BLOCK_M, and times each launch of :mod:`jaxmoe.ops.moe.backward` alone,
with the tile the config picks today and with each candidate of :data:`GEMM_TILES`,
:data:`ACT_TILES` or :data:`WGRAD_TILES`:

* ``dgrad2``: ``g = dy @ w2[e]`` (``moe_gemm_kernel``, w2 read transposed, fp32 rows);
* ``act``: ``d gate_up`` (``moe_gemm_act_bwd_kernel``, stage 1 recomputed);
* ``dgrad1``: ``d gate_up @ w1[e]`` (``moe_gemm_kernel``, w1 read transposed, fp32 rows);
* ``wgrad2`` / ``wgrad1``: ``d w2`` / ``d w1`` (``moe_weight_grad_kernel``), ``d w2`` from rows
  ``w * dy`` [M*k, D] as the backward passes them (no routing weight in the kernel).

A jitted call runs the launch on ``SETS`` different activation sets (the weights are far
larger than the L2), warm; the time per launch is the median over ``reps`` calls divided
by ``SETS``. TFLOP/s counts the launch's useful FLOPs (``2 * rows * N * K``, padding
excluded). Writes ``PREFIX.json``, one record per timed tile. ``--lock``: see
:func:`jaxmoe.tools.bench.card_lock`. Run it with JAX's default allocator: under
``XLA_PYTHON_CLIENT_ALLOCATOR=platform`` every call allocates its outputs afresh, and for
the weight gradients (outputs the size of the weights) that, not the kernel, is what the
time measures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe import ops, reference  # noqa: E402
from jaxmoe.layer import init_moe_params  # noqa: E402
from jaxmoe.models import PRESETS  # noqa: E402
from jaxmoe.ops.gemm import config as _config  # noqa: E402
from jaxmoe.ops.gemm import triton as gemm_triton  # noqa: E402
from jaxmoe.ops.gemm.config import GemmTile  # noqa: E402
from jaxmoe.ops.moe import triton as moe_triton  # noqa: E402
from jaxmoe.tools.bench import card_lock, median_call_seconds, sweep_record  # noqa: E402

SETS = 4
ROLES = ("dgrad2", "act", "dgrad1", "wgrad2", "wgrad1")
# (block_n, block_k, group_size_m, num_warps, num_stages)
GEMM_TILES = ((128, 64, 8, 8, 3), (128, 64, 8, 8, 4), (256, 64, 8, 8, 3), (256, 64, 8, 8, 4))
ACT_TILES = ((128, 64, 8, 8, 3), (128, 64, 8, 8, 4))
# (BLOCK_N, BLOCK_K, num_warps, num_stages, BLOCK_R), each with one output tile per program
# and with the heuristic's K groups (None)
WGRAD_TILES = ((128, 128, 8, 3, 64), (128, 128, 8, 4, 64), (128, 128, 4, 3, 64), (128, 128, 4, 4, 64),
               (128, 128, 4, 5, 32), (128, 64, 4, 4, 64), (128, 256, 8, 3, 64), (128, 256, 8, 4, 64),
               (256, 128, 8, 4, 64), (128, 128, 8, 3, 128), (128, 256, 4, 3, 64), (128, 256, 8, 2, 64))
K_GROUPS = (1, None)


def per_launch_s(fn, args, reps: int) -> float:
    # a few elements of each output: one launch's output live at a time
    return median_call_seconds(lambda *a: [o.reshape(-1)[:8] for o in fn(*a)], *args, reps=reps) / SETS


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=sorted(PRESETS), required=True)
    p.add_argument("--m", type=int, action="append", required=True)
    p.add_argument("--role", action="append", choices=ROLES)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--lock", default=None)
    p.add_argument("--out", default="backward_tiles")
    args = p.parse_args()
    arch = moe_triton.current_arch()
    dtype = jnp.bfloat16
    records = []
    for name in args.model:
        pr = PRESETS[name]
        params = init_moe_params(jax.random.key(0), hidden=pr.hidden, intermediate=pr.intermediate,
                                 experts=pr.experts, dtype=dtype)
        w1, w2 = params["w1"], params["w2"]
        routing_kw = pr.routing_kwargs(jax.random.key(1))
        d, i, k = pr.hidden, pr.intermediate, pr.top_k
        for m in args.m:
            cfg = _config.select_config(m, k, pr.experts, d, i, dtype, arch)
            keys = jax.random.split(jax.random.key(m), 5)

            def rnd(key, shape, scale=1.0):
                return (scale * jax.random.normal(key, (SETS, *shape), jnp.float32)).astype(dtype)

            xs = rnd(keys[0], (m, d))
            logits = jnp.dot(xs[0], params["router"], preferred_element_type=jnp.float32)
            weights, ids = reference.route(logits, **routing_kw)
            routing = ops.align(ids, pr.experts, cfg.block_m, topk_weights=weights, implementation="triton")
            dys, hs = rnd(keys[1], (m, d)), rnd(keys[2], (m * k, i))
            wdys = rnd(keys[1], (m * k, d))  # the rows w * dy of the backward's d w2
            dhs, dgus = rnd(keys[3], (m * k, i), 0.1), rnd(keys[4], (m * k, 2 * i), 0.1)
            rows = int(jnp.sum((ids >= 0) & (ids < pr.experts)))
            flops = {"dgrad2": 2 * rows * i * d, "act": 2 * rows * 2 * i * d, "dgrad1": 2 * rows * 2 * i * d,
                     "wgrad2": 2 * rows * i * d, "wgrad1": 2 * rows * 2 * i * d}
            gemm_now = {"dgrad2": _config.backward_tile(cfg.block_m, dtype, arch, fused=False, n_out=i),
                        "dgrad1": _config.backward_tile(cfg.block_m, dtype, arch, fused=False, n_out=d)}
            act_now = _config.backward_tile(cfg.block_m, dtype, arch, fused=True)
            wgrad_now = _config.weight_grad_tile(cfg.block_m, dtype, arch)

            def gemm_tiles(fused, role=None):
                out = [("now", act_now if fused else gemm_now[role])]
                for bn, bk, g, warps, stages in (ACT_TILES if fused else GEMM_TILES):
                    t = _config._fit(GemmTile(bn, bk, g, warps, stages), cfg.block_m, dtype, arch, fused)
                    if t not in [x for _, x in out]:
                        out.append(("cand", t))
                return out

            def wgrad_tiles(n_w, k_w):
                out = [("now", (*wgrad_now, None))]
                for t in WGRAD_TILES:
                    if cfg.block_m % t[4]:
                        continue
                    heur = _config.weight_grad_k_group(m * k / pr.experts, t[4], -(-k_w // t[1]))
                    for kg in K_GROUPS:
                        kg = heur if kg is None else 2 * heur if kg == "2x" else kg
                        if (*t, kg) not in [x for _, x in out] and not (kg == heur and t == wgrad_now):
                            out.append(("cand", (*t, kg)))
                return out

            def launches(role):
                if role == "dgrad2":
                    for label, t in gemm_tiles(False, role):
                        yield label, t, (lambda w, a, t=t: [gemm_triton.gemm(
                            a[s], w, routing, tile=t, arch=arch, topk_weights=None, activation=None,
                            transpose_b=True, out_dtype=jnp.float32, split_tail=False) for s in range(SETS)]), (w2, dys)
                elif role == "dgrad1":
                    for label, t in gemm_tiles(False, role):
                        yield label, t, (lambda w, a, t=t: [gemm_triton.gemm(
                            a[s], w, routing, tile=t, arch=arch, topk_weights=None, activation=None,
                            transpose_b=True, out_dtype=jnp.float32, split_tail=False) for s in range(SETS)]), (w1, dgus)
                elif role == "act":
                    for label, t in gemm_tiles(True):
                        yield label, t, (lambda w, a, g, t=t: [gemm_triton.act_backward(
                            a[s], w, g[s], routing, tile=t, arch=arch, activation="silu")
                            for s in range(SETS)]), (w1, xs, dhs)
                elif role == "wgrad2":
                    for label, t in wgrad_tiles(d, i):
                        yield label, t, (lambda g, a, t=t: [gemm_triton.weight_grad(
                            g[s], a[s], routing, out_dtype=dtype, arch=arch, tile=t[:5],
                            k_group=t[5]) for s in range(SETS)]), (wdys, hs)
                else:
                    for label, t in wgrad_tiles(2 * i, d):
                        yield label, t, (lambda g, a, t=t: [gemm_triton.weight_grad(
                            g[s], a[s], routing, out_dtype=dtype, arch=arch, tile=t[:5], k_group=t[5])
                            for s in range(SETS)]), (dgus, xs)

            for role in args.role or ROLES:
                for label, t, fn, fargs in launches(role):
                    rec = {"model": name, "m": m, "block_m": cfg.block_m, "role": role, "label": label,
                           "tile": list(t) if isinstance(t, tuple) else [t.block_n, t.block_k, t.group_size_m,
                                                                          t.num_warps, t.num_stages]}
                    def measure(rec, fn=fn, fargs=fargs, role=role, label=label):
                        jax.jit(lambda *a: [o.reshape(-1)[:8] for o in fn(*a)]).lower(*fargs).compile()  # run nothing
                        with card_lock(args.lock):
                            s = per_launch_s(fn, fargs, args.reps)
                        rec.update(ms=s * 1e3, tflops=flops[role] / s / 1e12)
                        return (f"{name} M={m} {role:7s} {label:4s} {rec['tile']} {s * 1e3:8.3f} ms "
                                f"{flops[role] / s / 1e12:6.1f} TF/s")

                    sweep_record(records, rec, args.out, measure, f"{name} M={m} {role} {rec['tile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
