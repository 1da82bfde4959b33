"""The decode path against the aligned path, per layer, at decode batch sizes.

    python bench/decode_bench.py [--model qwen3-30b-a3b ...] [--m 1 --m 2 ...] [--reps 30]

For each preset (default Qwen3-30B-A3B, Mixtral-8x7B, DeepSeek-V3) and M (default 1, 2, 4,
8, 16, 32, 64) it times ``moe_layer`` (router matmul, routing, experts; bf16) with the
kernels, once with ``JAXMOE_DECODE=1`` (the decode path) and once with ``JAXMOE_DECODE=0``
(the aligned path), as :func:`jaxmoe.tools.bench.time_layer_detail` does: the marginal
time of one more layer in a jitted residual chain of layers, each reading a different
input batch, median over ``--reps`` paired calls. The chains' outputs are checked finite
first (a chain that overflows would time garbage). It prints the table, and for each
preset and over all of them the largest M up to which the decode path is faster at every
M measured: the value for ``jaxmoe.ops.moe.decode.DECODE_MAX_TOKENS``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.layer import init_moe_params, moe_layer
from jaxmoe.models import PRESETS
from jaxmoe.ops.moe import decode
from jaxmoe.tools import bench

MODELS = ("qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3")
MS = (1, 2, 4, 8, 16, 32, 64)
PATHS = {"aligned": "0", "decode": "1"}


def time_path(path: str, layer, params, xs, reps: int) -> float:
    """Seconds per layer on ``path``; the environment is read while the chains are traced."""
    old = os.environ.get(decode.ENV)
    os.environ[decode.ENV] = PATHS[path]
    try:
        chained = jax.jit(lambda p, xs: bench._residual_stream(layer, p, xs, xs.shape[0])[0])
        out = np.asarray(jax.device_get(chained(params, xs)), np.float32)
        if not np.isfinite(out).all():
            raise RuntimeError(f"{path}: the chain's output is not finite: its timing would mean nothing")
        return bench.time_layer_detail(layer, params, xs, reps)[0]
    finally:
        if old is None:
            os.environ.pop(decode.ENV, None)
        else:
            os.environ[decode.ENV] = old


def largest_winning_m(times: dict[int, dict[str, float]], slack: float = 1.0) -> int:
    """The largest M up to which the decode path is faster at every M measured (0: never),
    or, with ``slack`` > 1, at most that factor slower."""
    best = 0
    for m in sorted(times):
        if times[m]["decode"] > slack * times[m]["aligned"]:
            break
        best = m
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", choices=sorted(PRESETS))
    p.add_argument("--m", type=int, action="append")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    models, ms = args.model or list(MODELS), sorted(args.m or MS)
    if max(ms) > decode.DECODE_TOKEN_LIMIT:
        p.error(f"--m beyond the decode path's limit {decode.DECODE_TOKEN_LIMIT}")
    print(f"decode bench on {jax.devices()[0].device_kind}, jax {jax.__version__}: moe_layer bf16, time per layer "
          f"= median over {args.reps} paired calls of (chain of {bench.SETS} layers - chain of {bench.SHORT}) / "
          f"{bench.SETS - bench.SHORT}; DECODE_MAX_TOKENS now {decode.DECODE_MAX_TOKENS}", flush=True)
    start = time.perf_counter()
    print(f"{'model':<16}{'M':>5}{'aligned us':>12}{'decode us':>11}{'aligned/decode':>16}")
    winners = {}
    all_times: dict[str, dict[int, dict[str, float]]] = {}
    for name in models:
        preset = PRESETS[name]
        params = init_moe_params(jax.random.key(0), hidden=preset.hidden, intermediate=preset.intermediate,
                                 experts=preset.experts, dtype=jnp.bfloat16)
        routing = preset.routing_kwargs(jax.random.key(1))

        def layer(prm, x, routing=routing):
            return moe_layer(prm, x, implementation="triton", **routing)

        times: dict[int, dict[str, float]] = {}
        for m in ms:
            # rotating inputs: a different batch per layer of the chain, finite and unit-scaled
            xs = jax.random.normal(jax.random.key(m), (bench.SETS, m, preset.hidden), jnp.float32).astype(jnp.bfloat16)
            times[m] = {path: time_path(path, layer, params, xs, args.reps) for path in PATHS}
            t = times[m]
            print(f"{name:<16}{m:>5}{t['aligned'] * 1e6:>12.1f}{t['decode'] * 1e6:>11.1f}"
                  f"{t['aligned'] / t['decode']:>16.2f}   [{time.perf_counter() - start:.0f}s]", flush=True)
        winners[name] = largest_winning_m(times)
        all_times[name] = times
        del params
    for name, m in winners.items():
        print(f"{name}: the decode path is faster at every M <= {m}" if m else f"{name}: the decode path never wins")
    within = min(largest_winning_m(t, 1.03) for t in all_times.values())
    print(f"threshold to choose (DECODE_MAX_TOKENS): {within} (the largest M where the decode path is faster for "
          f"every model, or at most 3 % slower; strictly faster for every model: {min(winners.values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
