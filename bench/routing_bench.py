"""Routing on the GPU: jaxmoe's Triton kernels against jax.lax.top_k-based routing.

Run from the repository root on a CUDA/ROCm machine:

    python bench/routing_bench.py            # the full table
    python bench/routing_bench.py --quick    # fewer repetitions

Two timings per case, both medians, in microseconds:

* ``graph``: R independent routing calls inside ONE jitted function (R separate inputs,
  so nothing is shared or hoisted), total / R: the GPU cost of a routing call inside a
  model, launch included, JAX's Python dispatch amortised away.
* ``call``: one jitted call, dispatched and waited for (``block_until_ready``): what a
  lone call costs from Python.

``kernels`` counts the device ops XLA kept in the compiled single-call function
(custom-calls and fusions and other non-trivial ops of the entry computation): the
Triton path should be 1. ``ok`` compares ids exactly and weights to 1e-5 relative
against ``jaxmoe.reference`` on the same input.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmoe import reference  # noqa: E402
from jaxmoe.ops.routing import triton as routing_triton  # noqa: E402

_TRIVIAL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def count_kernels(fn, *args) -> int:
    """Non-trivial instructions of the compiled entry computation (≈ kernel launches)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY") :]
    body = entry[entry.index("{") + 1 : entry.index("\n}")]
    n = 0
    for line in body.splitlines():
        if "=" not in line:
            continue
        m = re.search(r"\s([a-z][a-z0-9\-]*)\(", line.split("=", 1)[1])
        if m and m.group(1) not in _TRIVIAL:
            n += 1
    return n


def _median_us(run, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def time_fn(fn, inputs, reps: int, graph_r: int) -> tuple[float, float]:
    """(graph µs per call, standalone call µs) of ``fn(*inputs[0])``."""
    single = jax.jit(fn)
    many = jax.jit(lambda all_inputs: [fn(*a) for a in all_inputs])
    args = inputs[0]
    batch = inputs[:graph_r]
    for _ in range(3):  # compile and warm
        jax.block_until_ready(single(*args))
        jax.block_until_ready(many(batch))
    call = _median_us(lambda: single(*args), reps)
    graph = _median_us(lambda: many(batch), max(5, reps // 10)) / len(batch)
    return graph, call


def lax_topk_route(logits, k):
    """The obvious jnp routing: fp32 softmax, lax.top_k, renormalise."""
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, ids = jax.lax.top_k(scores, k)
    return w / w.sum(-1, keepdims=True), ids


def check_route(got, want) -> str:
    gw, gi = map(np.asarray, got)
    ww, wi = map(np.asarray, want)
    bad_ids = int((gi != wi).any(axis=-1).sum())
    ok_w = np.allclose(gw, ww, rtol=1e-5, atol=1e-30, equal_nan=True)
    if bad_ids == 0 and ok_w:
        return "ok"
    return f"FAIL ids:{bad_ids} rows w_max_rel:{np.nanmax(np.abs(gw - ww) / np.maximum(np.abs(ww), 1e-30)):.1e}"


def bench_topk(args) -> None:
    rng = np.random.default_rng(0)
    print("\n== top-k softmax routing (bf16 logits): jaxmoe Triton vs jax.lax.top_k ==")
    hdr = f"{'M':>6} {'E':>4} {'k':>3} | {'triton graph':>12} {'call':>8} {'kern':>4} | {'lax graph':>10} {'call':>8} {'kern':>4} | check"
    print(hdr)
    print("-" * len(hdr))
    for e, k in ((8, 2), (128, 8), (256, 8)):
        for m in args.ms:
            inputs = [(jnp.asarray(rng.standard_normal((m, e)), jnp.float32).astype(jnp.bfloat16),) for _ in range(args.graph_r)]
            tri = lambda x, k=k: routing_triton.route(x, k)  # noqa: E731
            lax = lambda x, k=k: lax_topk_route(x, k)  # noqa: E731
            status = check_route(jax.jit(tri)(*inputs[0]), jax.jit(lambda x: reference.route(x, k))(*inputs[0]))
            tg, tc = time_fn(tri, inputs, args.reps, args.graph_r)
            lg, lc = time_fn(lax, inputs, args.reps, args.graph_r)
            print(f"{m:>6} {e:>4} {k:>3} | {tg:>12.1f} {tc:>8.1f} {count_kernels(tri, *inputs[0]):>4} | "
                  f"{lg:>10.1f} {lc:>8.1f} {count_kernels(lax, *inputs[0]):>4} | {status}", flush=True)


def bench_grouped(args) -> None:
    rng = np.random.default_rng(1)
    print("\n== DeepSeek-V3 routing (E=256, 8 groups, topk_group=4, k=8, bias, x2.5): Triton vs reference (lax.top_k) ==")
    hdr = f"{'M':>6} | {'triton graph':>12} {'call':>8} {'kern':>4} | {'ref graph':>10} {'call':>8} {'kern':>4} | check"
    print(hdr)
    print("-" * len(hdr))
    kw = dict(scoring="sigmoid", num_expert_group=8, topk_group=4, routed_scaling_factor=2.5)
    for m in args.ms:
        inputs = [
            (jnp.asarray(rng.standard_normal((m, 256)), jnp.float32).astype(jnp.bfloat16),
             jnp.asarray(0.1 * rng.standard_normal(256), jnp.float32))
            for _ in range(args.graph_r)
        ]
        tri = lambda x, b: routing_triton.route(x, 8, correction_bias=b, **kw)  # noqa: E731
        ref = lambda x, b: reference.route(x, 8, correction_bias=b, **kw)  # noqa: E731
        status = check_route(jax.jit(tri)(*inputs[0]), jax.jit(ref)(*inputs[0]))
        tg, tc = time_fn(tri, inputs, args.reps, args.graph_r)
        rg, rc = time_fn(ref, inputs, args.reps, args.graph_r)
        print(f"{m:>6} | {tg:>12.1f} {tc:>8.1f} {count_kernels(tri, *inputs[0]):>4} | "
              f"{rg:>10.1f} {rc:>8.1f} {count_kernels(ref, *inputs[0]):>4} | {status}", flush=True)


def jnp_sigmoid_top1(x, w, shared_expert=False):
    logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
    scores = jax.nn.sigmoid(logits)
    ids = jnp.argmax(scores, axis=-1)[:, None].astype(jnp.int32)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if shared_expert:
        m = x.shape[0]
        ids = jnp.concatenate([ids, jnp.full((m, 1), w.shape[1], jnp.int32)], 1)
        weights = jnp.concatenate([weights, jnp.ones((m, 1), jnp.float32)], 1)
    return weights, ids


def bench_top1(args) -> None:
    rng = np.random.default_rng(2)
    print("\n== fused sigmoid top-1 router (bf16 x [M,D] @ w [D,E], shared expert): Triton vs jnp ==")
    hdr = f"{'M':>6} {'D':>5} {'E':>4} | {'triton graph':>12} {'call':>8} {'kern':>4} | {'jnp graph':>10} {'call':>8} {'kern':>4} | ids differ"
    print(hdr)
    print("-" * len(hdr))
    for d, e in ((5120, 16), (5120, 128)):
        for m in args.ms:
            inputs = [
                (jnp.asarray(rng.standard_normal((m, d)), jnp.float32).astype(jnp.bfloat16),
                 jnp.asarray(rng.standard_normal((d, e)) * 3 / np.sqrt(d), jnp.float32).astype(jnp.bfloat16))
                for _ in range(min(args.graph_r, 8))
            ]
            tri = lambda x, w: routing_triton.router_sigmoid_top1(x, w, shared_expert=True)  # noqa: E731
            ref = lambda x, w: jnp_sigmoid_top1(x, w, shared_expert=True)  # noqa: E731
            gw, gi = map(np.asarray, jax.jit(tri)(*inputs[0]))
            # float64 truth; near-ties (best two within 1e-5) may go either way.
            x64 = np.asarray(inputs[0][0].astype(jnp.float32), np.float64)
            w64 = np.asarray(inputs[0][1].astype(jnp.float32), np.float64)
            s = 1 / (1 + np.exp(-(x64 @ w64)))
            srt = np.sort(s, 1)
            clear = srt[:, -1] - srt[:, -2] > 1e-5
            differ = int((gi[clear, 0] != s.argmax(1)[clear]).sum())
            werr = float(np.max(np.abs(gw[:, 0] - s[np.arange(m), gi[:, 0]]) / s[np.arange(m), gi[:, 0]]))
            tg, tc = time_fn(tri, inputs, args.reps, len(inputs))
            rg, rc = time_fn(ref, inputs, args.reps, len(inputs))
            print(f"{m:>6} {d:>5} {e:>4} | {tg:>12.1f} {tc:>8.1f} {count_kernels(tri, *inputs[0]):>4} | "
                  f"{rg:>10.1f} {rc:>8.1f} {count_kernels(ref, *inputs[0]):>4} | {differ} (w rel err {werr:.1e})",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 16, 64, 4096, 8192])
    p.add_argument("--only", choices=["topk", "grouped", "top1"], nargs="+", default=["topk", "grouped", "top1"])
    args = p.parse_args()
    args.reps = 30 if args.quick else 200
    args.graph_r = 8 if args.quick else 32
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    if jax.default_backend() == "cpu":
        print("warning: no GPU; the Triton path runs in the interpreter, timings mean nothing", file=sys.stderr)
    if "topk" in args.only:
        bench_topk(args)
    if "grouped" in args.only:
        bench_grouped(args)
    if "top1" in args.only:
        bench_top1(args)


if __name__ == "__main__":
    main()
