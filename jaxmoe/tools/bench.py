"""``python -m jaxmoe bench``: one whole MoE layer, per implementation, against the roofline.

What is timed: ``moe_layer`` (router matmul, routing, both expert GEMMs, combine) as a
model runs it: inside ``jax.jit``, applied to different input batches chained as a
residual stream (so activations are not all in cache, and each application depends on
the previous one). Two such jits, of ``SHORT`` and ``SETS`` layers, are timed in
alternation, warm, ``--reps`` times each with ``block_until_ready``; the reported time per
layer is the median paired difference / (SETS - SHORT): what one more layer costs in a
jitted model. The fixed cost of a jit call (Python dispatch, argument handling), which a
model pays once for all its layers, is reported apart as ``overhead_ms`` in the CSV/JSON
(see :func:`time_layer_detail`).

Peers in the same run: the jax.numpy reference (``implementation="reference"``), a
``jax.lax.ragged_dot`` pipeline (sort rows by expert, gather, ragged_dot, activation,
ragged_dot, weighted combine) with its weights pre-transposed to ragged_dot's layout
outside the timed region, and the same pipeline with tokamax's ``ragged_dot`` when tokamax
is importable, and the layer on PyTorch's grouped GEMMs (``torch._grouped_mm``; with
``--quant fp8|fp8_tensor --act-quant fp8`` also ``torch._scaled_grouped_mm``) when torch is
importable and sees the device (:mod:`jaxmoe.tools.torch_peer`, timed by the same method).
A peer that runs out of memory or fails is reported as such. After the
timed calls the chain's output is checked: a cell whose data overflowed to inf/NaN is
reported as ``non-finite`` instead of a time (the weights are scaled by 1/sqrt(fan_in),
so a residual chain stays finite).

Roofline: bytes = experts_hit * 3 * I * D * itemsize + 2 * M * D * itemsize
(experts_hit: distinct experts per timed layer, averaged, from that layer's own routing),
flops = 2 * M * k * 3 * I * D, floor = max(bytes / copy bandwidth, flops / matmul rate),
efficiency = floor / time, with the ceilings of the card the run is on, measured at the
start of the run (:mod:`jaxmoe.tools.ceilings`; ``--ceilings table`` takes the table of
known devices) and printed in the header.

``--mode train`` times one layer's forward and backward instead (:mod:`jaxmoe.tools.train_bench`).
``--breakdown`` prints each timed cell's per-kernel device time (:mod:`jaxmoe.tools.timeline`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import reference
from jaxmoe.layer import init_moe_params, moe_layer
from jaxmoe.models import PRESETS, ModelPreset
from jaxmoe.tools import CommandError, implementations, positive_int
from jaxmoe.tools import torch_peer
from jaxmoe.tools.ceilings import FALLBACK, Ceilings, ceilings_for

PEAK_BYTES_PER_S = FALLBACK.bytes_per_s  # used only where no ceilings are given
PEAK_FLOPS = FALLBACK.bf16_flops
SETS = 8  # input batches in the long chain
SHORT = 2  # ... and in the short one
IMPLEMENTATIONS = ("jaxmoe", "ragged_dot", "tokamax", "torch", "reference")
MODES = ("forward", "train")
DEFAULT_M = tuple(2**i for i in range(14))  # 1 .. 8192
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


@dataclasses.dataclass
class Row:
    model: str
    impl: str
    M: int
    N: int  # intermediate size I
    K: int  # hidden size D
    E: int
    top_k: int
    time_ms: float | None
    tflops: float | None
    bandwidth_gbs: float | None
    efficiency: float | None
    status: str
    speedup: dict[str, float] = dataclasses.field(default_factory=dict)
    overhead_ms: float | None = None  # fixed cost per jit call, not counted in time_ms
    experts_hit: float | None = None  # distinct experts per timed layer (mean), in the roofline
    mode: str = "forward"  # "forward" (the layer) or "train" (its forward and backward)


def experts_hit_per_layer(params: dict[str, jax.Array], xs: jax.Array, routing: dict[str, Any],
                          num_experts: int) -> list[int]:
    """Distinct experts each layer of the timed chain routes to.

    Layer s reads ``xs[s] + (layer s-1's output)`` (the residual stream of
    :func:`time_layer_detail`), so its routing, and the weight bytes it must read, differ
    from those of ``xs[s]`` alone; the roofline counts what each layer really hits. The
    outputs come from the default implementation (the kernels on a GPU), or from the
    reference where the kernels fail (their own cells then report the failure).
    """

    def route_ids(p, x):
        return reference.route(jnp.dot(x, p["router"], preferred_element_type=jnp.float32), **routing)[1]

    def chain_ids(p, xs, implementation):
        layer = functools.partial(moe_layer, implementation=implementation, **routing)
        return jnp.stack(_residual_stream(layer, p, xs, xs.shape[0], probe=lambda x: route_ids(p, x))[1])

    try:
        ids = np.asarray(jax.jit(functools.partial(chain_ids, implementation=None))(params, xs))
    except Exception:  # noqa: BLE001  (the kernels' own cells say what went wrong)
        ids = np.asarray(jax.jit(functools.partial(chain_ids, implementation="reference"))(params, xs))
    return [int(np.unique(layer_ids[(layer_ids >= 0) & (layer_ids < num_experts)]).size) for layer_ids in ids]


def roofline(preset: ModelPreset, m: int, experts_hit: float, itemsize: int,
             ceilings: Ceilings | None = None) -> tuple[float, float, float]:
    """(bytes, flops, floor seconds) of one layer's forward (see the module docstring)."""
    c = ceilings or FALLBACK
    d, i = preset.hidden, preset.intermediate
    nbytes = experts_hit * 3 * i * d * itemsize + 2 * m * d * itemsize
    flops = 2 * m * preset.top_k * 3 * i * d
    return nbytes, flops, max(nbytes / c.bytes_per_s, flops / c.bf16_flops)


def tokamax_ragged_dot() -> Callable | None:
    """tokamax's ``ragged_dot`` (Mosaic GPU implementation) when tokamax is importable, else None."""
    try:
        import tokamax
    except Exception:  # noqa: BLE001  (not installed, or its dependencies are not)
        return None

    def dot(lhs, rhs, group_sizes, preferred_element_type=None):
        return tokamax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type,
                                  implementation="mosaic")

    return dot


class NonFiniteError(RuntimeError):
    """The timed data overflowed: the time would be that of inf/NaN arithmetic."""


class PeerMismatch(RuntimeError):
    """A peer's layer output disagrees with jaxmoe's beyond the peer's tolerance."""


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here (the message says why)."""


def check_finite(tree: Any) -> None:
    """Raise :class:`NonFiniteError` if any floating leaf of ``tree`` holds an inf or NaN."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if leaves and not bool(jax.jit(lambda ls: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in ls])))(leaves)):
        raise NonFiniteError("the timed data hold inf or NaN")


def ragged_dot_layer(params: dict[str, jax.Array], x: jax.Array, routing: dict[str, Any],
                     activation: str = "silu", dot: Callable = jax.lax.ragged_dot) -> jax.Array:
    """The MoE layer a JAX user writes today with ``jax.lax.ragged_dot`` (or ``dot``, a
    function of the same contract, such as tokamax's).

    ``params["w1_t"]`` [E, D, 2I] and ``params["w2_t"]`` [E, I, D] are ragged_dot's layout.
    """
    m, d = x.shape
    e = params["w1_t"].shape[0]
    logits = jnp.dot(x, params["router"], preferred_element_type=jnp.float32)
    weights, ids = reference.route(logits, **routing)
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    rows = x[order // k]
    h = dot(rows, params["w1_t"], group_sizes, preferred_element_type=jnp.float32)
    i = h.shape[1] // 2
    act = jax.nn.silu if activation == "silu" else (lambda g: jax.nn.gelu(g, approximate=False))
    h = (act(h[:, :i]) * h[:, i:]).astype(x.dtype)
    y = dot(h, params["w2_t"], group_sizes, preferred_element_type=jnp.float32)
    y = y * weights.reshape(-1)[order][:, None]
    out = jnp.zeros((m * k, d), jnp.float32).at[order].set(y)
    return out.reshape(m, k, d).sum(axis=1).astype(x.dtype)


RAGGED_LAYOUT = ("ragged_dot", "tokamax")  # peers that take the weights in ragged_dot's layout


# --quant: the quantized layer is timed as one more implementation, "jaxmoe:<scheme>[+a<act>]",
# beside the bf16 kernels and the peers (which run the unquantized weights).
QUANTS = ("fp8", "fp8_tensor", "fp8_block", "int8", "int4", "int4_zp", "mxfp4")


def quant_label(quant: str, act_quant: str | None) -> str:
    return f"jaxmoe:{quant}" + (f"+a{act_quant}" if act_quant else "")


def quant_roofline(preset: ModelPreset, m: int, experts_hit: float, itemsize: int, quant: str,
                   act_quant: str | None, ceilings: Ceilings | None = None) -> tuple[float, float, float]:
    """The roofline of the quantized layer: weights at their stored bytes plus their scales
    (fp32; uint8 for mxfp4), activations at ``itemsize``; the compute floor at the card's
    fp8 rate with ``act_quant`` (twice bf16's where it was not measured: the dense ratio of
    the H100/H200 datasheets), else bf16's."""
    from jaxmoe.types import WEIGHT_SCHEMES

    c = ceilings or FALLBACK
    spec = WEIGHT_SCHEMES[quant]
    d, i = preset.hidden, preset.intermediate
    per_scale = 1 if quant == "mxfp4" else 4
    per_weight = spec.bits / 8 + per_scale / ((spec.group_n or i) * (spec.group_k or d))
    nbytes = experts_hit * 3 * i * d * per_weight + 2 * m * d * itemsize
    flops = 2 * m * preset.top_k * 3 * i * d
    rate = (c.fp8_flops or 2 * c.bf16_flops) if act_quant else c.bf16_flops
    return nbytes, flops, max(nbytes / c.bytes_per_s, flops / rate)


def _layer_fn(impl: str, preset: ModelPreset, routing: dict[str, Any], act_quant: str | None = None) -> Callable:
    if impl == "torch" or impl.startswith("torch:"):
        raise ValueError("the torch peer is not a JAX function: bench_model times it (torch_peer.time_chains)")
    if impl.startswith("jaxmoe:"):
        return lambda p, x: moe_layer(p, x, implementation="triton", act_quant=act_quant, **routing)
    if impl == "ragged_dot":
        return lambda p, x: ragged_dot_layer(p, x, routing)
    if impl == "tokamax":
        dot = tokamax_ragged_dot()
        if dot is None:
            raise ModuleNotFoundError("tokamax is not installed")
        return lambda p, x: ragged_dot_layer(p, x, routing, dot=dot)
    return lambda p, x: moe_layer(p, x, implementation="triton" if impl == "jaxmoe" else "reference", **routing)


def _residual_stream(fn: Callable, p: Any, xs: jax.Array, sets: int,
                     probe: Callable | None = None, feedback: float = 1.0) -> tuple[jax.Array, list[Any]]:
    """Apply ``fn`` to ``sets`` batches as a residual stream: layer s reads xs[s] + ``feedback``
    times the previous layer's output. Returns the last output and ``probe(x_s)`` of each
    layer's input."""
    y, probed = None, []
    for s in range(sets):
        x = xs[s] if y is None else xs[s] + (y if feedback == 1.0 else (feedback * y).astype(y.dtype))
        if probe is not None:
            probed.append(probe(x))
        y = fn(p, x)
    return y, probed


def _chain(fn: Callable, sets: int, feedback: float = 1.0) -> Callable:
    """jit of ``sets`` layer applications chained as a residual stream."""
    return jax.jit(lambda p, xs: _residual_stream(fn, p, xs, sets, feedback=feedback)[0])


# A feedback that keeps each layer waiting on the last while leaving its input xs[s] as it
# was: 2^-40 |y| is below half an ulp of a bf16 value x unless |x| < 2^-32 |y| (fp32: unless
# |x| < 2^-16 |y|; in fp16 the product is 0). Every variant of a layer then routes each
# chained batch alike, so comparing two variants does not compare two routings.
SAME_ROUTING_FEEDBACK = 2.0 ** -40


def time_layer_detail(fn: Callable, params: Any, xs: jax.Array, reps: int,
                      lock: contextlib.AbstractContextManager | None = None,
                      feedback: float = 1.0) -> tuple[float, float]:
    """(seconds per layer application, fixed seconds per jit call) of ``fn``.

    Two jitted chains apply the layer to the batches of ``xs`` [SETS, M, D] one after
    another as a residual stream (x_s + layer(previous)): each application depends on the
    last one, as in a model, so XLA cannot merge them and read the weights once for all;
    the short chain uses the first ``SHORT`` batches, the long one all ``SETS``. They are
    timed in alternation (``block_until_ready``, warm); the time per layer is the median of
    the paired differences divided by ``SETS - SHORT``: the marginal cost of one more layer
    in a jitted model. What every jit call pays once (Python dispatch, argument handling,
    the first launch), which a model pays once for all its layers, is the intercept,
    returned second. Where timer noise makes the difference meaningless (not positive, as
    with the CPU interpreter), the long chain's time / ``SETS`` is returned instead, with
    no intercept. ``lock``, when given, is held while the chains run (warm-up and timing;
    not while they compile), so processes that share a card can compile side by side and
    time one at a time without another's warm-up on the card.
    ``feedback`` scales the previous output in the stream (:data:`SAME_ROUTING_FEEDBACK`:
    every layer sees its own batch unchanged, so variants of a layer that compute
    different outputs still route the same tokens to the same experts).
    """
    sets = xs.shape[0]
    if sets <= SHORT:
        raise ValueError(f"need more than {SHORT} input batches, got {sets}")
    # compiled here (the Triton kernels too, while lowering), outside the lock
    short, long = (_chain(fn, n, feedback).lower(params, xs).compile() for n in (SHORT, sets))
    t_short, t_long = [], []
    out = None
    with lock or contextlib.nullcontext():
        for f in (short, long):  # warm up
            jax.block_until_ready(f(params, xs))
            jax.block_until_ready(f(params, xs))
        for _ in range(reps):
            for f, ts in ((short, t_short), (long, t_long)):
                t0 = time.perf_counter()
                out = jax.block_until_ready(f(params, xs))
                ts.append(time.perf_counter() - t0)
    check_finite(out)  # the long chain's last output: what the timed layers computed
    per_layer = statistics.median(b - a for a, b in zip(t_short, t_long)) / (sets - SHORT)
    if per_layer <= 0:
        return statistics.median(t_long) / sets, 0.0
    return per_layer, max(statistics.median(t_short) - SHORT * per_layer, 0.0)


def median_call_seconds(fn: Callable, *args: Any, reps: int = 20) -> float:
    """Median wall seconds of ``jax.jit(fn)(*args)`` over ``reps`` calls (warm,
    ``block_until_ready``): for sweeps that time one launch or one stage alone."""
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sweep_record(records: list[dict], rec: dict, prefix: str, measure: Callable[[dict], str], label: str) -> None:
    """One point of a sweep: ``measure(rec)`` fills in ``rec``'s numbers and returns the
    line to print; a candidate the compiler or the card refuses is printed as failed under
    ``label``, with the error in ``rec``. ``rec`` is appended to ``records`` and
    ``PREFIX.json`` rewritten, so a sweep cut short keeps what it measured."""
    try:
        line = measure(rec)
    except Exception as exc:  # noqa: BLE001  (a candidate the compiler or the card refuses)
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        line = f"{label}: failed {type(exc).__name__}: {str(exc)[:120]}"
    print(line, flush=True)
    records.append(rec)
    with open(f"{prefix}.json", "w") as f:
        json.dump(records, f, indent=1)


@contextlib.contextmanager
def card_lock(path: str | None):
    """An exclusive ``flock`` on ``path`` while the block runs (nothing for None): processes
    that share a card compile side by side and time one at a time."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def time_layer(fn: Callable, params: Any, xs: jax.Array, reps: int) -> float:
    """Seconds per layer application (see :func:`time_layer_detail`)."""
    return time_layer_detail(fn, params, xs, reps)[0]


def _failure(exc: Exception) -> str:
    if isinstance(exc, NonFiniteError):
        return "non-finite (inf/NaN in the timed data: time discarded)"
    if isinstance(exc, ModuleNotFoundError):
        return "not installed"
    if isinstance(exc, (PeerMismatch, PeerUnavailable)):
        return str(exc)
    msg = str(exc).lower()
    if "resource_exhausted" in msg or "out of memory" in msg:
        return "out of memory"
    return f"failed: {type(exc).__name__}"


def ragged_params(params: dict[str, jax.Array], impls: Sequence[str]) -> tuple[dict[str, jax.Array] | None, str]:
    """ragged_dot's own weight layout, made once outside the timed region (its best case), and
    the status of the peers that need it (their failure, if the copy does not fit)."""
    if not any(impl in RAGGED_LAYOUT for impl in impls):
        return None, "ok"
    try:
        params_rd = {"router": params["router"], "w1_t": jnp.swapaxes(params["w1"], 1, 2)}
        params_rd["w2_t"] = jnp.swapaxes(params["w2"], 1, 2)
        jax.block_until_ready(params_rd)
    except Exception as exc:  # the transposed copy itself may not fit beside the weights
        return None, _failure(exc) + " (weights in ragged_dot's layout)"
    return params_rd, "ok"


def bench_model(preset: ModelPreset, ms: Sequence[int], impls: Sequence[str], dtype: Any, reps: int,
                progress: Callable[[str], None], ceilings: Ceilings | None = None,
                breakdown: Callable[[str, Callable[[], object], int], None] | None = None,
                quant: str | None = None, act_quant: str | None = None) -> list[Row]:
    key = jax.random.key(0)
    params = init_moe_params(key, hidden=preset.hidden, intermediate=preset.intermediate,
                             experts=preset.experts, dtype=dtype)
    params_q = None
    if quant is not None:  # quantized once, outside the timed region, as a checkpoint would be
        from jaxmoe.quantize import quantize_weights

        params_q = {**params, "w1": quantize_weights(params["w1"], quant),
                    "w2": quantize_weights(params["w2"], quant)}
        jax.block_until_ready(params_q)
        impls = [*impls, quant_label(quant, act_quant)]
        if torch_peer.NAME in impls:  # torch on the same quantized weights, where it has a kernel
            impls.append(torch_peer.quant_label(quant, act_quant))
    routing = preset.routing_kwargs(jax.random.key(1))
    params_rd, rd_status = ragged_params(params, impls)
    itemsize = jnp.dtype(dtype).itemsize
    rows: list[Row] = []
    for m in ms:
        xs = jax.random.normal(jax.random.key(m), (SETS, m, preset.hidden), jnp.float32).astype(dtype)
        hits = experts_hit_per_layer(params, xs, routing, preset.experts)[SHORT:]  # the layers timed
        experts_hit = float(np.mean(hits))
        floors = {"": roofline(preset, m, experts_hit, itemsize, ceilings)}
        if quant is not None:
            floors[quant_label(quant, act_quant)] = quant_roofline(preset, m, experts_hit, itemsize, quant, act_quant,
                                                                   ceilings)
            floors[torch_peer.quant_label(quant, act_quant)] = floors[quant_label(quant, act_quant)]
        by_impl: dict[str, Row] = {}
        for impl in impls:
            nbytes, flops, floor = floors.get(impl, floors[""])
            progress(f"{preset.name} M={m} {impl} ...")
            row = Row(preset.name, impl, m, preset.intermediate, preset.hidden, preset.experts, preset.top_k,
                      None, None, None, None, "ok", experts_hit=experts_hit)
            try:
                if impl in RAGGED_LAYOUT and params_rd is None:
                    row.status = rd_status
                elif impl == torch_peer.NAME or impl.startswith(torch_peer.NAME + ":"):
                    quantized = impl != torch_peer.NAME
                    t, overhead = _time_torch(params_q if quantized else params, xs, routing, reps, progress,
                                              f"{preset.name} M={m} {impl}", quant if quantized else None,
                                              act_quant if quantized else None)
                else:
                    p = params_rd if impl in RAGGED_LAYOUT else params_q if impl.startswith("jaxmoe:") else params
                    fn = (_layer_fn(impl, preset, routing, act_quant) if impl.startswith("jaxmoe:")
                          else _layer_fn(impl, preset, routing))
                    t, overhead = time_layer_detail(fn, p, xs, reps)
                    if breakdown is not None:
                        chain = _chain(fn, SETS)
                        breakdown(f"{preset.name} M={m} {impl} (per layer of {SETS})",
                                  lambda: chain(p, xs), SETS)
                if row.status == "ok":
                    row.time_ms = t * 1e3
                    row.overhead_ms = overhead * 1e3
                    row.tflops = flops / t / 1e12
                    row.bandwidth_gbs = nbytes / t / 1e9
                    row.efficiency = floor / t
            except Exception as exc:  # a peer that fails is reported, the run goes on
                row.status = _failure(exc)
            by_impl[impl] = row
            rows.append(row)
            progress(f"{preset.name} M={m} {impl}: " + (
                f"{row.time_ms:.4f} ms, efficiency {row.efficiency:.2f}" if row.time_ms else row.status))
        record_speedups(by_impl)
        if quant is not None:
            record_speedups(by_impl, quant_label(quant, act_quant), [torch_peer.quant_label(quant, act_quant)])
    return rows


def _time_torch(params: dict[str, Any], xs: jax.Array, routing: dict[str, Any], reps: int,
                progress: Callable[[str], None], label: str, quant: str | None, act_quant: str | None
                ) -> tuple[float, float]:
    """(seconds per layer, fixed seconds per chain call) of the torch peer on these weights
    and batches, after checking its first batch's output against jaxmoe's layer; raises
    ``ModuleNotFoundError`` / ``RuntimeError`` with the reason where it cannot run."""
    from jaxmoe.tools.torch_peer import TOLERANCE, TorchLayer, relative_error, time_chains, to_torch, unavailable

    reason = unavailable(jax.default_backend(), quant, act_quant)
    if reason is not None:
        raise (ModuleNotFoundError if reason == "not installed" else PeerUnavailable)(reason)
    layer = TorchLayer(params, routing)
    ours = np.asarray(jax.jit(lambda p, x: moe_layer(p, x, act_quant=act_quant, **routing))(params, xs[0]),
                      np.float32)
    import torch

    with torch.no_grad():
        err = relative_error(layer(to_torch(xs[0])), ours)
    tol = TOLERANCE["fp8" if quant is not None else "bf16"]
    if not err <= tol:
        raise PeerMismatch(f"disagrees with jaxmoe: relative error {err:.2e} > {tol:.0e}")
    per_layer, overhead, _, how = time_chains(layer, to_torch(xs), reps, SHORT)
    progress(f"{label}: timed as a {how}, relative error against jaxmoe {err:.1e}")
    return per_layer, overhead


def record_speedups(by_impl: dict[str, Any], ours_name: str = "jaxmoe", peers: Sequence[str] | None = None) -> None:
    """On the row ``ours_name`` of one cell (jaxmoe's): each timed peer's time / ours
    (``peers``: those rows only; default every other row)."""
    ours = by_impl.get(ours_name)
    if ours and ours.time_ms:
        for impl, row in by_impl.items():
            if impl != ours_name and row.time_ms and (peers is None or impl in peers):
                ours.speedup[impl] = row.time_ms / ours.time_ms


def format_table(rows: Sequence[Row]) -> str:
    w = max([12] + [len(r.impl) + 1 for r in rows])  # the impl column fits "jaxmoe:fp8_block+afp8"
    head = (f"{'model':<16}{'impl':<{w}}{'M':>6}{'N':>7}{'K':>7}{'E':>5}{'top_k':>6}{'Time_(ms)':>11}"
            f"{'TFLOPS':>9}{'Bandwidth_(GB/s)':>18}{'eff':>7}  speed-up / status")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.time_ms is None:
            nums = f"{'-':>11}{'-':>9}{'-':>18}{'-':>7}  {r.status}"
        else:
            sp = " ".join(f"x{v:.2f} vs {k}" for k, v in r.speedup.items())
            nums = f"{r.time_ms:>11.4f}{r.tflops:>9.1f}{r.bandwidth_gbs:>18.0f}{r.efficiency:>7.2f}  {sp}"
        lines.append(f"{r.model:<16}{r.impl:<{w}}{r.M:>6}{r.N:>7}{r.K:>7}{r.E:>5}{r.top_k:>6}{nums}")
    return "\n".join(lines)


def write_outputs(rows: Sequence[Row], prefix: str) -> list[str]:
    written = []
    with open(prefix + ".json", "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    written.append(prefix + ".json")
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "impl", "M", "N", "K", "E", "top_k", "Time_(ms)", "TFLOPS", "Bandwidth_(GB/s)",
                    "efficiency", "status", "speedup", "overhead_ms", "experts_hit", "mode"])
        for r in rows:
            w.writerow([r.model, r.impl, r.M, r.N, r.K, r.E, r.top_k, r.time_ms, r.tflops, r.bandwidth_gbs,
                        r.efficiency, r.status, json.dumps(r.speedup), r.overhead_ms, r.experts_hit, r.mode])
    written.append(prefix + ".csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for impl in dict.fromkeys(r.impl for r in rows):
            pts = [(r.M, r.efficiency) for r in rows if r.model == model and r.impl == impl and r.efficiency]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_title(model)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("roofline efficiency")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=110)
    written.append(prefix + ".png")
    return written


def _write(rows: Sequence[Row], prefix: str) -> list[str]:
    try:
        return write_outputs(rows, prefix)
    except OSError as err:
        raise CommandError(f"--out {prefix!r}: cannot write the results: {err}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", choices=sorted(PRESETS), help="preset(s); default: all but tiny "
                   "on a GPU, tiny on a CPU")
    p.add_argument("--m", type=positive_int, action="append", help="batch size(s) M; default 1, 2, 4, ... 8192 "
                   "(on a CPU: 1, 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--impl", action="append", metavar="NAME[,NAME...]",
                   help=f"implementations, comma-separated or repeated, from {', '.join(IMPLEMENTATIONS)}; "
                        "default all")
    p.add_argument("--reps", type=positive_int, default=None,
                   help="timed calls per cell (default 20 on GPU, 2 on CPU)")
    p.add_argument("--out", default="bench_results", help="prefix of the .json/.csv/.png files written")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="also time the kernels with w1/w2 quantized to this weight scheme (row 'jaxmoe:<scheme>'), "
                        "against the roofline of the quantized bytes")
    p.add_argument("--act-quant", choices=("fp8", "int8"), default=None,
                   help="with --quant: activations rounded per token to fp8 or int8 in the kernels (w8a8)")
    p.add_argument("--mode", choices=MODES, default="forward",
                   help="forward: the layer (default); train: its forward and backward, grads of x, w1, w2 and "
                        "the router (default models Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3 at M = 4096, 16384)")
    p.add_argument("--ceilings", choices=("measure", "table"), default="measure",
                   help="the roofline's copy bandwidth and matmul rate: measured on this device at the start "
                        "(default), or the table of known devices")
    p.add_argument("--breakdown", action="store_true",
                   help="print each timed cell's per-kernel device time (needs a GPU with CUPTI)")


def _check_writable(prefix: str) -> None:
    """Fail before any timing if the result files cannot be written."""
    for suffix in (".json", ".csv"):
        path = prefix + suffix
        existed = os.path.exists(path)
        try:
            with open(path, "a"):
                pass
        except OSError as err:
            raise CommandError(f"--out {prefix!r}: cannot write {path}: {err.strerror or err}") from None
        if not existed:
            os.remove(path)


def default_implementations(mode: str) -> list[str]:
    """Every implementation that can run here (tokamax and torch only when importable); in
    train mode without the dense reference (E times the work of the experts, and out of
    memory on the large presets: ask for it with ``--impl``) and without torch (a forward
    peer only)."""
    impls = [i for i in IMPLEMENTATIONS if (i != "tokamax" or tokamax_ragged_dot() is not None)
             and (i != torch_peer.NAME or importlib.util.find_spec("torch") is not None)]
    return [i for i in impls if i not in ("reference", torch_peer.NAME)] if mode == "train" else impls


def _print_breakdown(label: str, fn: Callable[[], object], per_call: int) -> None:
    from jaxmoe.tools.timeline import format_breakdown, kernel_breakdown

    try:
        result = kernel_breakdown(fn, per_call=per_call)
    except Exception as exc:  # noqa: BLE001  (a breakdown that fails must not lose the run)
        print(f"{label}: breakdown failed: {type(exc).__name__}: {exc}", flush=True)
        return
    print(format_breakdown(label, result), flush=True)


def run(args: argparse.Namespace) -> int:
    mode = getattr(args, "mode", "forward")
    impls = implementations(args.impl, IMPLEMENTATIONS) or default_implementations(mode)
    quant, act_quant = getattr(args, "quant", None), getattr(args, "act_quant", None)
    if act_quant is not None:
        from jaxmoe.types import ACT_QUANT_SCHEMES

        if quant not in ACT_QUANT_SCHEMES[act_quant]:
            raise CommandError(f"--act-quant {act_quant} needs --quant one of "
                               f"{', '.join(ACT_QUANT_SCHEMES[act_quant])}, got {quant}")
    if quant is not None and mode == "train":
        raise CommandError("--quant times the forward only (the quantized kernels have no backward)")
    if torch_peer.NAME in impls:
        if mode == "train":
            raise CommandError("--impl torch: the torch peer times the forward only; leave it out of --mode train")
        # before JAX starts on a GPU: leave torch the memory JAX would otherwise take at start-up
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    _check_writable(args.out)
    on_cpu = jax.default_backend() == "cpu"
    if mode == "train":
        from jaxmoe.tools import train_bench

        models = args.model or (["tiny"] if on_cpu else list(train_bench.DEFAULT_MODELS))
        ms = args.m or ([8] if on_cpu else list(train_bench.DEFAULT_M))
    else:
        models = args.model or (["tiny"] if on_cpu else [n for n in PRESETS if n != "tiny"])
        ms = args.m or ([1, 8] if on_cpu else list(DEFAULT_M))
    reps = args.reps or (2 if on_cpu else 20)
    if on_cpu and any(n != "tiny" for n in models):
        print("note: on a CPU the kernels run in Triton's interpreter; only use small presets there", file=sys.stderr)
    ceilings = ceilings_for(getattr(args, "ceilings", "measure"))
    if mode == "train":
        method = (f"one layer's forward + backward (grads of x, w1, w2, router) inside jax.jit, time per step "
                  f"= median over {reps} rounds of calls on {train_bench.SETS if not on_cpu else 2} input batches, issued "
                  f"back to back and blocked on at each round's end, warm; efficiency = fwd+bwd roofline floor (three "
                  f"GEMM passes) / time")
    else:
        method = (f"whole layer inside jax.jit, time per layer = median over {reps} paired calls of (jit of "
                  f"{SETS} chained layers - jit of {SHORT}) / {SETS - SHORT}, warm, a different input batch "
                  f"per layer; efficiency = roofline floor / time")
    print(f"jaxmoe bench --mode {mode} on {jax.devices()[0].device_kind} ({jax.default_backend()}), {args.dtype}: "
          f"{method}", flush=True)
    print(f"ceilings: {ceilings.describe()}", flush=True)
    from jaxmoe.ops.gemm import config as gemm_config

    if quant is not None and gemm_config.fast_accum_applies(quant, act_quant):
        print(f"{gemm_config.FAST_ACCUM_ENV}=1: the fp8 GEMMs sum over K inside the fp8 MMA", flush=True)
    tma = gemm_config.tma_override()
    if tma is not None:
        print(f"{gemm_config.TMA_ENV}={int(tma)}: " + ("every GEMM that can reads the weights by TMA (sm_90)" if tma
                                                      else "no GEMM reads the weights by TMA"), flush=True)
    breakdown = _print_breakdown if getattr(args, "breakdown", False) else None
    rows: list[Row] = []
    start = time.perf_counter()
    for name in models:
        def progress(msg: str) -> None:
            print(f"  [{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

        if mode == "train":
            rows += train_bench.bench_model_train(PRESETS[name], ms, impls, DTYPES[args.dtype], reps, progress,
                                                  ceilings, breakdown)
        else:
            rows += bench_model(PRESETS[name], ms, impls, DTYPES[args.dtype], reps, progress, ceilings, breakdown,
                                quant=getattr(args, "quant", None), act_quant=getattr(args, "act_quant", None))
        _write(rows, args.out)  # after each model: a run cut short keeps what it measured
    print(format_table(rows))
    files = _write(rows, args.out)
    print("wrote " + ", ".join(files))
    return 0
