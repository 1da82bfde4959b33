"""What the model features cost on top of the plain MoE layer, on the GPU.

    python bench/epilogue_cost.py [--model gpt-oss-120b --model deepseek-v3] [--m 1 --m 4096] [--reps 20]
                                  [--variant NAME ...] [--breakdown] [--out PREFIX]

For each model preset and batch size M, times ``moe_layer`` on the Triton kernels (bf16,
inside ``jax.jit``, warm; the time per layer is the marginal cost of one more layer in a
chain, as ``python -m jaxmoe bench`` measures it) for the plain layer (silu, weights
``[E, 2I, D]`` / ``[E, D, I]``, no biases) and for each feature variant:

* ``biases``: expert biases ``b1 [E, 2I]``, ``b2 [E, D]`` (and a router bias) in the epilogues;
* ``clamped_swiglu``: gpt-oss's activation instead of silu;
* ``layout``: weights stored ``in_out_interleaved`` (gpt-oss's ``gate_up_proj [E, D, 2I]``);
* ``gpt_oss``: all of gpt-oss's block at once as ``load_layer`` returns it (biases, the
  clamped SwiGLU, top-k then softmax; experts converted to ``[E, 2I, D]`` / ``[E, D, I]``);
* ``gpt_oss_stored``: the same with the experts as the checkpoint stores them
  (``load_layer(..., layout="stored")``: ``in_out_interleaved``);
* ``shared``: one shared expert of width I (DeepSeek-V3's), stacked after the routed ones
  (``stack_shared_experts``, ``shared_experts=1``: more slots of the routed launches);
  ``shared_dense``: the same expert as ``params["shared"]``, a dense MLP beside them. Both add real work, so
  they are compared with ``routed_plus_one``, the plain layer routing each token to
  ``top_k + 1`` experts (the same weight bytes at decode sizes and the same FLOPs), not
  with the plain layer; the shared expert's own bf16 roofline floor is printed beside.

Every variant is timed on the same routing: the chain feeds each layer's output to the next
only as ``2^-40 * y`` (:data:`jaxmoe.tools.bench.SAME_ROUTING_FEEDBACK`), which keeps the
layers in order without changing any layer's input, so a variant that computes other
outputs (biases, another activation) cannot route later batches to other experts and read
other bytes. The variants of a model and M are timed in rounds, in turn, and each one's median is
compared with its baseline's median (the plain layer's; ``routed_plus_one``'s for
``shared``); the target is a cost of at most 3 %. ``--breakdown`` also prints each
variant's kernels and their device time (one layer, from the profiler). Writes
``PREFIX.json`` (default ``epilogue_cost``). Run from the repository root on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import ClampedSwiGLU, moe_layer
from jaxmoe.layer import init_moe_params
from jaxmoe.models import PRESETS, stack_shared_experts
from jaxmoe.tools.bench import PEAK_BYTES_PER_S, PEAK_FLOPS, SAME_ROUTING_FEEDBACK, SETS, time_layer_detail
from jaxmoe.tools.timeline import format_breakdown, kernel_breakdown

VARIANTS = ("biases", "clamped_swiglu", "layout", "gpt_oss", "gpt_oss_stored", "routed_plus_one", "shared",
            "shared_dense")
BASELINE = {"shared": "routed_plus_one", "shared_dense": "routed_plus_one"}
TARGET = 0.03


def _interleave(w1: jax.Array) -> jax.Array:
    """``[E, 2I, D]`` gate rows then up rows -> ``[E, D, 2I]`` gate/up interleaved (made once, untimed)."""
    e, two_i, d = w1.shape
    i = two_i // 2
    return jnp.swapaxes(jnp.stack([w1[:, :i], w1[:, i:]], axis=2).reshape(e, two_i, d), 1, 2)


def variants(name: str, params: dict, routing: dict, key: jax.Array, chosen: Sequence[str] | None = None) -> dict:
    """name -> (params, moe_layer kwargs) of each variant in ``chosen`` (None: all), the
    weights shared where they can be; only the chosen variants' weights are made."""
    preset = PRESETS[name]
    e, d, i = preset.experts, preset.hidden, preset.intermediate
    k1, k2, k3, k4 = jax.random.split(key, 4)

    @functools.cache
    def biases() -> dict:
        return {"b1": 0.1 * jax.random.normal(k1, (e, 2 * i), jnp.float32).astype(jnp.bfloat16),
                "b2": 0.1 * jax.random.normal(k2, (e, d), jnp.float32).astype(jnp.bfloat16),
                "router_bias": 0.1 * jax.random.normal(k3, (e,), jnp.float32).astype(jnp.bfloat16)}

    @functools.cache
    def inter() -> dict:
        return {**params, "w1": _interleave(params["w1"]), "w2": jnp.swapaxes(params["w2"], 1, 2)}

    @functools.cache
    def dense() -> dict:
        shared = init_moe_params(k4, hidden=d, intermediate=i, experts=1, dtype=params["w1"].dtype)
        return {**params, "shared": {"w1": shared["w1"], "w2": shared["w2"]}}

    gpt = {key_: v for key_, v in routing.items() if key_ not in ("scoring", "renormalize")}
    if routing.get("num_expert_group") is None and routing.get("correction_bias") is None:
        gpt["scoring"] = "topk_softmax"

    def stacked() -> tuple:
        stacked_params, count = stack_shared_experts(dense())
        return stacked_params, {**routing, "shared_experts": count}

    builders = {
        "plain": lambda: (params, routing),
        "biases": lambda: ({**params, **biases()}, routing),
        "clamped_swiglu": lambda: (params, {**routing, "activation": ClampedSwiGLU()}),
        "layout": lambda: (inter(), {**routing, "layout": "in_out_interleaved"}),
        # as the loader returns it (experts converted to out_in), and as the checkpoint stores it
        "gpt_oss": lambda: ({**params, **biases()}, {**gpt, "activation": ClampedSwiGLU()}),
        "gpt_oss_stored": lambda: ({**inter(), **biases()}, {**gpt, "activation": ClampedSwiGLU(),
                                                             "layout": "in_out_interleaved"}),
        "shared_dense": lambda: (dense(), routing),
        "shared": stacked,
        "routed_plus_one": lambda: (params, {**routing, "top_k": routing["top_k"] + 1}),
    }
    return {v: build() for v, build in builders.items() if chosen is None or v in chosen}


def shared_floor_ms(name: str, m: int) -> float:
    preset = PRESETS[name]
    d, i = preset.hidden, preset.intermediate
    nbytes, flops = 3 * i * d * 2, 2 * m * 3 * i * d
    return max(nbytes / PEAK_BYTES_PER_S, flops / PEAK_FLOPS) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", choices=sorted(PRESETS))
    p.add_argument("--m", type=int, action="append")
    p.add_argument("--variant", action="append", choices=VARIANTS)
    p.add_argument("--reps", type=int, default=20, help="paired runs per timing")
    p.add_argument("--rounds", type=int, default=3, help="timings of each variant, in turn")
    p.add_argument("--breakdown", action="store_true", help="print each variant's kernels (profiler)")
    p.add_argument("--out", default="epilogue_cost")
    args = p.parse_args(argv)
    if jax.default_backend() not in ("gpu", "cuda", "rocm"):
        print("epilogue_cost: needs a GPU (the interpreter's times say nothing about epilogues)", file=sys.stderr)
        return 2
    models = args.model or ["gpt-oss-120b", "deepseek-v3"]
    ms = args.m or [1, 4096]
    chosen = ["plain", *(args.variant or VARIANTS)]
    chosen += [BASELINE[v] for v in chosen if v in BASELINE and BASELINE[v] not in chosen]
    results = []
    print(f"{'model':<14}{'M':>6}  {'variant':<16}{'ms':>10}{'cost':>9}  note")
    for name in models:
        preset = PRESETS[name]
        params = init_moe_params(jax.random.key(0), hidden=preset.hidden, intermediate=preset.intermediate,
                                 experts=preset.experts, dtype=jnp.bfloat16)
        routing = preset.routing_kwargs(jax.random.key(1))
        table = variants(name, params, routing, jax.random.key(2), chosen)
        for m in ms:
            xs = jax.random.normal(jax.random.key(m), (SETS, m, preset.hidden), jnp.float32).astype(jnp.bfloat16)
            times: dict[str, list[float]] = {v: [] for v in table}
            for _ in range(args.rounds):
                for v, (prm, kw) in table.items():
                    fn = (lambda kw_: lambda p_, x_: moe_layer(p_, x_, implementation="triton", **kw_))(kw)
                    times[v].append(time_layer_detail(fn, prm, xs, args.reps, feedback=SAME_ROUTING_FEEDBACK)[0] * 1e3)
            for v in table:
                t = statistics.median(times[v])
                baseline = BASELINE.get(v, "plain")
                cost = t / statistics.median(times[baseline]) - 1.0
                note = "" if v == "plain" else ("ok" if cost <= TARGET else f"over the {TARGET:.0%} target")
                if baseline != "plain":
                    note += f" (against {baseline})"
                if v.startswith("shared"):
                    note += (f"; its own floor {shared_floor_ms(name, m):.4f} ms, "
                             f"{t - statistics.median(times['plain']):.4f} ms over plain")
                print(f"{name:<14}{m:>6}  {v:<16}{t:>10.4f}{cost:>+9.2%}  {note}", flush=True)
                results.append({"model": name, "m": m, "variant": v, "time_ms": t, "cost": cost,
                                "baseline": baseline, "times_ms": times[v],
                                "device": jax.devices()[0].device_kind, "jax": jax.__version__})
            if args.breakdown:
                for v, (prm, kw) in table.items():
                    fn = jax.jit((lambda kw_: lambda p_, x_: moe_layer(p_, x_, implementation="triton", **kw_))(kw))
                    print(format_breakdown(f"{name} M={m} {v}", kernel_breakdown(lambda: fn(prm, xs[0]), runs=5)),
                          flush=True)
            with open(args.out + ".json", "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
