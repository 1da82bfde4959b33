"""``python -m jaxmoe tune``: search block configs of ``fused_moe`` on the current GPU.

For each M it times ``fused_moe`` (align + both GEMM stages + combine, routing excluded)
with every candidate :class:`~jaxmoe.ops.gemm.config.MoEConfig`, keeps the fastest, and merges the
winners into ``<out>/<arch>.json`` (``jaxmoe/configs`` by default), the file
``select_config`` reads. Point ``JAXMOE_CONFIG_DIR`` at another ``--out`` to try a table
before shipping it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe import reference
from jaxmoe.layer import init_moe_params
from jaxmoe.models import PRESETS
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.gemm.config import GemmTile, MoEConfig
from jaxmoe.ops.moe import triton as moe_triton
from jaxmoe.tools.bench import DTYPES, time_layer

TILES = (  # (block_n, block_k, group_size_m, num_warps, num_stages)
    (16, 128, 1, 4, 4),
    (16, 256, 1, 4, 3),
    (32, 128, 1, 4, 4),
    (32, 256, 1, 4, 3),
    (64, 256, 1, 4, 3),
    (64, 128, 1, 4, 5),
    (128, 128, 1, 4, 4),
    (64, 128, 1, 4, 4),
    (64, 64, 8, 4, 4),
    (128, 64, 8, 4, 4),
    (128, 64, 8, 8, 3),
    (128, 128, 8, 8, 3),
    (256, 64, 8, 8, 3),
)
# stage-2 tiles as wide as an 8-warp stage 1's accumulator (gate and up), tried with each
# 8-warp stage-1 tile: the shared tile list cannot reach them, since a 256-column stage 1
# does not fit the registers
WIDE_STAGE2 = (_config.WIDE_STAGE2, dataclasses.replace(_config.WIDE_STAGE2, num_stages=3))


def candidates(m: int, top_k: int, experts: int, hidden: int, inter: int, dtype: Any, arch: str) -> list[MoEConfig]:
    """BLOCK_M from the heuristic's pick and its neighbours, times the tile list, fitted to shared memory."""
    base = _config.heuristic_config(m, top_k, experts, hidden, inter, dtype, arch)
    block_ms = sorted({b for b in (base.block_m // 2, base.block_m, base.block_m * 2) if 16 <= b <= 128})
    out = [base]
    for block_m in block_ms:
        for t in TILES:
            tile = GemmTile(*t)
            config = MoEConfig(block_m, _config._fit(tile, block_m, dtype, arch, True),
                               _config._fit(tile, block_m, dtype, arch, False))
            if config not in out:
                out.append(config)
            if block_m == 128 and tile.num_warps == 8:
                for wide in WIDE_STAGE2:
                    paired = dataclasses.replace(config, stage2=_config._fit(wide, block_m, dtype, arch, False))
                    if paired not in out:
                        out.append(paired)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, choices=sorted(PRESETS))
    p.add_argument("--m", type=int, action="append", help="M values to tune (default 1 16 128 1024 4096)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="directory of <arch>.json (default: the package's configs)")
    p.add_argument("--seed-heuristic", choices=_config.ARCHS, metavar="ARCH",
                   help="write the heuristic's configs for ARCH, marked untuned, without timing anything "
                        "(no GPU needed): a starting table for a GPU that has not been tuned yet")


def seed_heuristic(arch: str, models: list[str], ms: tuple[int, ...], dtype: Any, path: pathlib.Path) -> None:
    """Write the heuristic's pick for each model and M into ``path``, marked untuned."""
    table: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    table["_comment"] = (f"UNTUNED: seeded from the heuristic by `python -m jaxmoe tune --seed-heuristic {arch}`; "
                         "run `python -m jaxmoe tune` on the GPU to replace it")
    for name in models:
        p = PRESETS[name]
        entry = table.setdefault(_config.shape_key(p.experts, p.hidden, p.intermediate, dtype), {})
        for m in ms:
            entry[str(m)] = _config.heuristic_config(m, p.top_k, p.experts, p.hidden, p.intermediate, dtype,
                                                     arch).to_json()
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _config._load.cache_clear()
    print(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    out_dir = pathlib.Path(args.out) if args.out else _config.config_dir()
    if args.seed_heuristic:
        out_dir.mkdir(parents=True, exist_ok=True)
        seed_heuristic(args.seed_heuristic, args.model, tuple(args.m or (1, 16, 128, 1024, 4096)), dtype,
                       out_dir / f"{args.seed_heuristic}.json")
        return 0
    if jax.default_backend() == "cpu":
        print("tune needs a GPU: it times real kernel launches", file=sys.stderr)
        return 2
    arch = moe_triton.current_arch()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{arch}.json"
    table: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault("_comment", f"tuned by `python -m jaxmoe tune` on {jax.devices()[0].device_kind}")
    for name in args.model:
        p = PRESETS[name]
        params = init_moe_params(jax.random.key(0), hidden=p.hidden, intermediate=p.intermediate,
                                 experts=p.experts, dtype=dtype)
        routing = p.routing_kwargs(jax.random.key(1))
        entry = table.setdefault(_config.shape_key(p.experts, p.hidden, p.intermediate, dtype), {})
        for m in args.m or (1, 16, 128, 1024, 4096):
            xs = jax.random.normal(jax.random.key(m), (4, m, p.hidden), jnp.float32).astype(dtype)
            logits = jnp.dot(xs[0], params["router"], preferred_element_type=jnp.float32)
            weights, ids = reference.route(logits, **routing)
            best: tuple[float, MoEConfig] | None = None
            for config in candidates(m, p.top_k, p.experts, p.hidden, p.intermediate, dtype, arch):
                def layer(prm, x, c=config):
                    return moe_triton.fused_moe(x, prm["w1"], prm["w2"], weights, ids, config=c)
                try:
                    t = time_layer(layer, params, xs, args.reps)
                except Exception as exc:  # a config the compiler or the card refuses
                    print(f"  {name} M={m} {config}: failed ({type(exc).__name__})", file=sys.stderr)
                    continue
                print(f"  {name} M={m} {t * 1e3:8.4f} ms  {config}", file=sys.stderr, flush=True)
                if best is None or t < best[0]:
                    best = (t, config)
            if best is not None:
                entry[str(m)] = best[1].to_json()
                print(f"{name} M={m}: best {best[0] * 1e3:.4f} ms {best[1]}", flush=True)
            path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _config._load.cache_clear()
    print(f"wrote {path}")
    return 0
