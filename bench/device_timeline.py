"""Device-side timeline of MoE layers: each kernel's GPU time and the idle gaps between them.

    python bench/device_timeline.py --cell qwen3-30b-a3b:1 --cell mixtral-8x7b:16 [--routing]

Runs 4 layers chained as a residual stream inside one jit under ``jax.profiler`` (CUPTI),
5 times, and reports the median run per layer: the span from the first kernel's start to
the last kernel's end, the time kernels were busy, and each kernel's share. Idle time is
launch overhead the host did not hide. ``--routing`` adds the routing kernels alone
(8 independent calls in one jit, E=256) beside ``jax.lax.top_k`` on the same input.
Tracing itself adds a little host time per launch, so spans here are upper bounds.
"""

from __future__ import annotations

import argparse
import collections
import glob
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import ProfileData

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe import moe_layer, route  # noqa: E402
from jaxmoe.layer import init_moe_params  # noqa: E402
from jaxmoe.models import PRESETS  # noqa: E402

CHAIN = 4


def device_runs(fn, args, runs: int = 5) -> list[list[tuple[int, int, str]]]:
    """(start ns, duration ns, kernel name) of each run's GPU work, runs split by idle time."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    out_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(out_dir)
    for _ in range(runs):
        jax.block_until_ready(fn(*args))
        time.sleep(0.003)
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True)[0])
    events = sorted(
        (e.start_ns, e.duration_ns, e.name)
        for plane in data.planes if plane.name.startswith("/device:GPU")
        for line in plane.lines if "stream" in line.name.lower()
        for e in line.events
    )
    split: list[list[tuple[int, int, str]]] = [[]]
    for ev in events:
        if split[-1] and ev[0] - (split[-1][-1][0] + split[-1][-1][1]) > 1_000_000:  # > 1 ms apart
            split.append([])
        split[-1].append(ev)
    return [r for r in split if r]


def report(label: str, fn, args, per: int) -> None:
    runs = device_runs(fn, args)
    if not runs:
        print(f"{label}: no GPU events (is this a GPU with CUPTI?)")
        return
    spans = [(r[-1][0] + r[-1][1] - r[0][0]) / 1e3 for r in runs]
    run = runs[int(np.argsort(spans)[len(spans) // 2])]
    span = (run[-1][0] + run[-1][1] - run[0][0]) / 1e3
    busy = sum(d for _, d, _ in run) / 1e3
    kernels: dict[str, list[float]] = collections.defaultdict(list)
    for _, d, name in run:
        kernels[name].append(d / 1e3)
    print(f"{label}: span {span / per:8.1f} us, kernels busy {busy / per:8.1f} us, idle {100 * (1 - busy / span):4.1f}%,"
          f" {len(run) / per:.1f} kernels (per call)")
    for name, ds in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
        print(f"    {sum(ds) / per:8.1f} us  x{len(ds) / per:<4.1f} {name[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", action="append", default=[], help="MODEL:M, e.g. qwen3-30b-a3b:1")
    ap.add_argument("--routing", action="store_true")
    args = ap.parse_args()
    if jax.default_backend() == "cpu":
        sys.exit("needs a GPU: this reads the GPU's own kernel timestamps")
    for cell in args.cell:
        name, m = cell.split(":")
        p, m = PRESETS[name], int(m)
        params = init_moe_params(jax.random.key(0), hidden=p.hidden, intermediate=p.intermediate, experts=p.experts)
        routing = p.routing_kwargs(jax.random.key(1))
        xs = jax.random.normal(jax.random.key(m), (CHAIN, m, p.hidden), jnp.bfloat16)

        def chain(prm, xs, routing=routing):
            h = xs[0]
            for i in range(CHAIN):  # each layer reads the last one's output (xs[i] * 0: every input stays live)
                h = (h + moe_layer(prm, h, implementation="triton", **routing)) * 0.5 + xs[i] * 0.0
            return h

        report(f"{name} M={m}, one layer", jax.jit(chain), (params, xs), CHAIN)
        del params
    if args.routing:
        rng = np.random.default_rng(0)
        for m in (1, 64, 4096):
            xs = [jnp.asarray(rng.standard_normal((m, 256)), jnp.float32).astype(jnp.bfloat16) for _ in range(8)]
            bias = jnp.asarray(0.1 * rng.standard_normal(256), jnp.float32)
            report(f"route softmax top-8, E=256, M={m}",
                   jax.jit(lambda xs: [route(x, 8, implementation="triton") for x in xs]), (xs,), 8)
            report(f"route DeepSeek-V3 (8 groups, top-4 groups, bias), M={m}",
                   jax.jit(lambda xs, b: [route(x, 8, scoring="sigmoid", num_expert_group=8, topk_group=4,
                                                correction_bias=b, routed_scaling_factor=2.5,
                                                implementation="triton") for x in xs]), (xs, bias), 8)
            report(f"jax.lax.top_k softmax top-8, E=256, M={m}",
                   jax.jit(lambda xs: [jax.lax.top_k(jax.nn.softmax(x.astype(jnp.float32), -1), 8) for x in xs]),
                   (xs,), 8)


if __name__ == "__main__":
    main()
