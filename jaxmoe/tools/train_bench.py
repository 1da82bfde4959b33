"""``python -m jaxmoe bench --mode train``: one MoE layer's forward and backward, per
implementation, against a fwd+bwd roofline.

What is timed: ``jax.value_and_grad`` of ``loss = sum(layer(params, x) * c)`` (fp32) in
``x``, ``w1``, ``w2`` and the router, inside ``jax.jit``: the router matmul, routing, both
expert GEMMs and the combine forward, then their backward. Each call takes a different
input batch and cotangent (``SETS`` of them in rotation, so activations are not all in
cache; the weights, read by every call, are far larger than the L2). The batches are
sliced before the timing. A round issues one call per batch back to back, as a training
loop issues its steps, and is blocked on at its end: the host's dispatch of a call
overlaps the device's work on the previous one. Each call drops the previous call's
gradients (each the size of the weights) before it is issued, so at most two calls' are
live. The time per step is the median over ``reps`` rounds of a round's time divided by
its calls. After the timed calls the last call's loss and gradients are checked to be
finite.

Peers in the same run, with the same routing function (``jaxmoe.reference.route``'s
contract; jaxmoe routes with its kernel): ``jax.lax.ragged_dot``'s autodiff on the pipeline
of :func:`jaxmoe.tools.bench.ragged_dot_layer` (weights in its own layout, made outside
the timed region; their gradients come in that layout), and the same pipeline with
tokamax's ``ragged_dot`` when tokamax is importable.

Roofline (:func:`train_roofline`): the three GEMM passes of training, each
``2 * M * k * 3 * I * D`` FLOPs (forward ``x w1ᵀ`` and ``h w2ᵀ``; backward data
``dy w2`` and ``d(gate, up) w1``; backward weights ``dyᵀ h`` and ``d(gate, up)ᵀ x``);
bytes: each pass moves the experts' weights once (read twice, the gradient written once:
``3 * experts_hit * 3 * I * D * itemsize``) and two ``[M, D]`` activations (x and y; dy
and dx; x and dy): ``3 * 2 * M * D * itemsize``. Not counted: the ``[M*k, I]``
intermediates (saved or recomputed), the routing, the router's gradient (``M * D * E``
FLOPs, small beside the experts), and the stage-1 recomputation jaxmoe's backward does
(``2 * M * k * 2I * D`` more FLOPs). floor = max(bytes / copy bandwidth, FLOPs / bf16
matmul rate), efficiency = floor / time, with the ceilings of the card the run is on.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import reference
from jaxmoe.layer import init_moe_params, moe_layer
from jaxmoe.models import ModelPreset
from jaxmoe.tools import bench
from jaxmoe.tools.ceilings import FALLBACK, Ceilings

__all__ = ["DEFAULT_MODELS", "DEFAULT_M", "SETS", "train_roofline", "train_step", "time_step", "bench_model_train"]

DEFAULT_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")
DEFAULT_M = (4096, 16384)
SETS = 4  # input batches (and cotangents) in rotation; 2 on a CPU (the interpreter is slow)


def train_roofline(preset: ModelPreset, m: int, experts_hit: float, itemsize: int,
                   ceilings: Ceilings | None = None) -> tuple[float, float, float]:
    """(bytes, FLOPs, floor seconds) of one layer's forward + backward: three GEMM passes
    (see the module docstring for what is counted)."""
    c = ceilings or FALLBACK
    d, i = preset.hidden, preset.intermediate
    nbytes = 3 * (experts_hit * 3 * i * d + 2 * m * d) * itemsize
    flops = 3 * 2 * m * preset.top_k * 3 * i * d
    return nbytes, flops, max(nbytes / c.bytes_per_s, flops / c.bf16_flops)


def _layer(impl: str, routing: dict[str, Any]) -> Callable:
    if impl == "jaxmoe":
        return lambda p, x: moe_layer(p, x, implementation="triton", **routing)
    if impl == "reference":
        return lambda p, x: moe_layer(p, x, implementation="reference", **routing)
    return bench._layer_fn(impl, None, routing)  # ragged_dot, tokamax: the forward bench's pipelines


def train_step(impl: str, routing: dict[str, Any]) -> Callable:
    """jit of ``(params, x, c) -> (loss, (grads of params, grad of x))`` for ``impl``."""
    layer = _layer(impl, routing)

    def loss(p, x, c):
        return jnp.sum(layer(p, x).astype(jnp.float32) * c)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def time_step(step: Callable, params: Any, xs: jax.Array, cs: jax.Array, reps: int) -> tuple[float, Any]:
    """(median seconds per call over ``reps`` rounds of ``len(xs)`` calls issued back to
    back, the last output);
    raises :class:`~jaxmoe.tools.bench.NonFiniteError` if that output holds inf/NaN."""
    sets = xs.shape[0]
    batches = [jax.block_until_ready((xs[s], cs[s])) for s in range(sets)]  # sliced outside the timing
    out = None
    warm = 1 if jax.default_backend() == "cpu" else 2
    for s in range(min(warm, sets)):  # compile and warm up
        out = jax.block_until_ready(step(params, *batches[s]))
    rounds = []
    for _ in range(reps):
        out = None
        t0 = time.perf_counter()
        for x, c in batches:
            out = None  # the last call's gradients are dropped before the next call is issued
            out = step(params, x, c)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - t0) / sets)
    bench.check_finite(out)
    return statistics.median(rounds), out


def bench_model_train(preset: ModelPreset, ms: Sequence[int], impls: Sequence[str], dtype: Any, reps: int,
                      progress: Callable[[str], None], ceilings: Ceilings | None = None,
                      breakdown: Callable[[str, Callable[[], object], int], None] | None = None
                      ) -> list[bench.Row]:
    """The train-mode cells of one preset: one :class:`~jaxmoe.tools.bench.Row` per M and
    implementation (``mode="train"``), the speed-ups on jaxmoe's rows."""
    params = init_moe_params(jax.random.key(0), hidden=preset.hidden, intermediate=preset.intermediate,
                             experts=preset.experts, dtype=dtype)
    routing = preset.routing_kwargs(jax.random.key(1))
    params_rd, rd_status = bench.ragged_params(params, impls)
    itemsize = jnp.dtype(dtype).itemsize
    rows: list[bench.Row] = []
    sets = 2 if jax.default_backend() == "cpu" else SETS
    for m in ms:
        xs = jax.random.normal(jax.random.key(m), (sets, m, preset.hidden), jnp.float32).astype(dtype)
        cs = jax.random.normal(jax.random.key(m + 1), (sets, m, preset.hidden), jnp.float32)
        hits = []
        for s in range(sets):
            ids = np.asarray(jax.jit(lambda p, x: reference.route(
                jnp.dot(x, p["router"], preferred_element_type=jnp.float32), **routing)[1])(params, xs[s]))
            hits.append(np.unique(ids[(ids >= 0) & (ids < preset.experts)]).size)
        experts_hit = float(np.mean(hits))
        nbytes, flops, floor = train_roofline(preset, m, experts_hit, itemsize, ceilings)
        by_impl: dict[str, bench.Row] = {}
        for impl in impls:
            progress(f"{preset.name} M={m} {impl} (train) ...")
            row = bench.Row(preset.name, impl, m, preset.intermediate, preset.hidden, preset.experts, preset.top_k,
                            None, None, None, None, "ok", experts_hit=experts_hit, mode="train")
            try:
                if impl in bench.RAGGED_LAYOUT and params_rd is None:
                    row.status = rd_status
                else:
                    p = params_rd if impl in bench.RAGGED_LAYOUT else params
                    step = train_step(impl, routing)
                    t, _ = time_step(step, p, xs, cs, reps)
                    row.time_ms = t * 1e3
                    row.tflops = flops / t / 1e12
                    row.bandwidth_gbs = nbytes / t / 1e9
                    row.efficiency = floor / t
                    if breakdown is not None:
                        x0, c0 = jax.block_until_ready((xs[0], cs[0]))
                        breakdown(f"{preset.name} M={m} {impl} (train step)", lambda: step(p, x0, c0), 1)
            except Exception as exc:  # a peer that fails is reported, the run goes on
                row.status = bench._failure(exc)
            by_impl[impl] = row
            rows.append(row)
            progress(f"{preset.name} M={m} {impl} (train): " + (
                f"{row.time_ms:.3f} ms, efficiency {row.efficiency:.2f}" if row.time_ms else row.status))
        bench.record_speedups(by_impl)
    return rows
