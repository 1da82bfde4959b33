"""A sweep of the quantized GEMMs' tiles at decode sizes, stage by stage, on the GPU.

    python bench/quant_tiles.py --quant int8 --model mixtral-8x7b --m 1 --m 128 [--reps 20]
                                [--lock FILE] [--out PREFIX]

For each weight scheme, model preset and M it times ``fused_moe`` (alignment, both GEMM
stages and the combine; the routing is computed once outside) with the heuristic's config,
then with each candidate tile in place of stage 1's (stage 2 kept) and in place of stage
2's (stage 1 kept), for the heuristic's BLOCK_M and, where the heuristic picks more than
16, half of it. Times are the marginal cost of one more layer in a jitted chain
(``jaxmoe.tools.bench.time_layer_detail``); the stage deltas say what each tile
buys on its own stage. Writes ``PREFIX.json``: one record per timed config, with the
layer's weight-byte roofline at the copy rate given by ``--bytes-per-s``.

Several processes can share one card: each compiles and warms its configs on its own and
holds ``--lock`` (an ``flock``) only while it times, so no two timings overlap.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp

from jaxmoe import reference
from jaxmoe.layer import init_moe_params
from jaxmoe.models import PRESETS
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.gemm.config import GemmTile, MoEConfig
from jaxmoe.ops.moe import triton as moe_triton
from jaxmoe.quantize import quantize_weights
from jaxmoe.tools.bench import (SETS, SHORT, card_lock, experts_hit_per_layer, quant_roofline, sweep_record,
                                time_layer_detail)
from jaxmoe.tools.ceilings import Ceilings

# (block_n, block_k, num_warps, num_stages): B tiles of 4-32 KB a stage, the bf16 decode
# tiles (64 x 128, 32 x 256) among them
TILES = {
    "8bit": ((64, 128, 4, 4), (32, 256, 4, 4), (64, 256, 4, 3), (64, 256, 4, 4), (32, 512, 4, 3),
             (128, 128, 4, 4), (128, 256, 4, 3), (64, 256, 8, 4)),
    # int4 and int4_zp K tiles stay inside one 128-value scale group
    "int4": ((64, 128, 4, 4), (64, 128, 4, 6), (128, 128, 4, 4), (128, 128, 4, 6), (256, 128, 4, 4),
             (128, 128, 8, 4), (32, 128, 4, 8), (256, 128, 8, 4)),
    "mxfp4": ((64, 128, 4, 4), (64, 256, 4, 4), (32, 256, 4, 4), (64, 512, 4, 3), (128, 256, 4, 3),
              (128, 128, 4, 6), (32, 512, 4, 4), (128, 512, 4, 2)),
}


def tiles_for(quant: str) -> tuple[tuple[int, int, int, int], ...]:
    if quant in ("int4", "int4_zp"):
        return TILES["int4"]
    if quant == "mxfp4":
        return TILES["mxfp4"]
    return TILES["8bit"]


def candidate_configs(preset, m: int, quant: str, arch: str, dtype) -> list[tuple[str, MoEConfig]]:
    """The heuristic's config, then each tile of :data:`TILES` in place of one stage's."""
    heur = _config.heuristic_config(m, preset.top_k, preset.experts, preset.hidden, preset.intermediate, dtype,
                                    arch, quant)
    configs: list[tuple[str, MoEConfig]] = [("heuristic", heur)]
    for bm in [heur.block_m] + ([heur.block_m // 2] if heur.block_m > 16 else []):
        base = dataclasses.replace(heur, block_m=bm)
        for bn, bk, warps, stages in tiles_for(quant):
            tile = GemmTile(block_n=bn, block_k=bk, group_size_m=1, num_warps=warps, num_stages=stages)
            tile = _config.fit_scheme(tile, quant, None)
            s1 = _config._fit(tile, bm, dtype, arch, True, 1, quant)
            s2 = _config._fit(tile, bm, dtype, arch, False, 1, quant)
            for label, c in (("stage1", MoEConfig(bm, s1, base.stage2)), ("stage2", MoEConfig(bm, base.stage1, s2))):
                if c not in [x for _, x in configs]:
                    configs.append((label, c))
    return configs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", action="append", required=True)
    p.add_argument("--model", action="append", choices=sorted(PRESETS), required=True)
    p.add_argument("--m", type=int, action="append", required=True)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--lock", default=None)
    p.add_argument("--only-heuristic", action="store_true", help="time the heuristic's config alone")
    p.add_argument("--bytes-per-s", type=float, default=4.21e12, help="the card's copy rate for the roofline")
    p.add_argument("--out", default="quant_tiles")
    p.add_argument("--split-k-max", type=int, default=None,
                   help="the most K splits the heuristic gives a decode stage 2 (1: none; default: the package's)")
    p.add_argument("--split-k-programs", type=int, default=None,
                   help="the programs a split decode stage 2 may reach (default: the package's SPLIT_K_PROGRAMS)")
    p.add_argument("--split-k-schemes", default=None,
                   help="comma-separated weight schemes whose decode stage 2 the heuristic splits along K "
                        "(default: the package's SPLIT_K_SCHEMES)")
    args = p.parse_args()
    if args.split_k_schemes is not None:
        _config.SPLIT_K_SCHEMES = tuple(s for s in args.split_k_schemes.split(",") if s)
    if args.split_k_max is not None:
        _config.SPLIT_K_MAX = args.split_k_max
    if args.split_k_programs is not None:
        _config.SPLIT_K_PROGRAMS = args.split_k_programs
    ceilings = Ceilings(args.bytes_per_s, 798e12, None, "given")
    arch = moe_triton.current_arch()
    dtype = jnp.bfloat16
    records = []
    for name in args.model:
        preset = PRESETS[name]
        base_params = init_moe_params(jax.random.key(0), hidden=preset.hidden, intermediate=preset.intermediate,
                                      experts=preset.experts, dtype=dtype)
        routing = preset.routing_kwargs(jax.random.key(1))
        for quant in args.quant:
            params = {**base_params, "w1": quantize_weights(base_params["w1"], quant),
                      "w2": quantize_weights(base_params["w2"], quant)}
            jax.block_until_ready(params)
            for m in args.m:
                xs = jax.random.normal(jax.random.key(m), (SETS, m, preset.hidden), jnp.float32).astype(dtype)
                hits = experts_hit_per_layer(base_params, xs, routing, preset.experts)[SHORT:]
                floor = quant_roofline(preset, m, sum(hits) / len(hits), 2, quant, None, ceilings)[2]
                logits = jnp.dot(xs[0], base_params["router"], preferred_element_type=jnp.float32)
                weights, ids = reference.route(logits, **routing)
                configs = candidate_configs(preset, m, quant, arch, dtype)
                if args.only_heuristic:
                    configs = configs[:1]
                for label, c in configs:
                    def layer(prm, x, c=c):
                        return moe_triton.fused_moe(x, prm["w1"], prm["w2"], weights, ids, config=c)
                    rec = {"model": name, "quant": quant, "m": m, "varied": label,
                           "config": c.to_json(), "floor_ms": floor * 1e3}
                    def measure(rec, layer=layer, label=label, c=c):
                        t = time_layer_detail(layer, params, xs, args.reps, lock=card_lock(args.lock))[0]
                        rec.update(ms=t * 1e3, efficiency=floor / t)
                        return f"{name} {quant} M={m} {label:9s} {t * 1e3:8.4f} ms  eff {floor / t:5.2f}  {c}"

                    sweep_record(records, rec, args.out, measure, f"{name} {quant} M={m} {label} {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
