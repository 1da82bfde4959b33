"""``python -m jaxmoe check``: one MoE layer per implementation against an fp32 reference.

Runs on the default device, with the same bf16 parameters for every implementation, and
prints each one's error and median warm time; exits non-zero if any fails or raises.
``--quant SCHEME [--act-quant fp8|int8]`` quantizes ``w1``/``w2`` first: the reference is
then the fp32 layer on the same quantized weights (dequantized), with the same rounding of
the activations under ``--act-quant``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import numpy as np

from jaxmoe.tools import CommandError, implementations, positive_int

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOLERANCE = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4}
# With activations rounded to 8 bits: where the reference's h and a kernel's differ by one
# ulp of the activation dtype, the next rounding step (1/16 relative for e4m3, 1/127 of the
# row's absmax for int8) can round one element differently (tests/test_quant.py).
ACT_QUANT_TOLERANCE = 2e-2
CPU_HIDDEN, CPU_INTERMEDIATE = 128, 256  # the tiny preset's matrices


# --------------------------------------------------------------------------- check


def add_parser(sub: argparse._SubParsersAction) -> None:
    from jaxmoe.models import PRESETS

    p = sub.add_parser("check", help="run one MoE layer with each implementation and compare with the reference")
    p.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help="layer shape and routing (default: mixtral-8x7b on a GPU, tiny on a CPU)")
    p.add_argument("--m", type=positive_int, default=None, help="tokens (default: 128 on a GPU, 16 on a CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation and weight dtype")
    p.add_argument("--impl", action="append", default=None, metavar="NAME[,NAME...]",
                   help="implementations to run, comma-separated or repeated: implementation= values of "
                        "moe_layer such as reference, triton (default: reference, and triton when available)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per implementation (default: adaptive, 3..20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", choices=QUANT_SCHEMES, default=None,
                   help="quantize w1/w2 to this weight scheme first (the reference uses the same quantized weights)")
    p.add_argument("--act-quant", choices=("fp8", "int8"), default=None,
                   help="with --quant: activations rounded per token to fp8 or int8 (w8a8)")
    p.set_defaults(func=check)


QUANT_SCHEMES = ("fp8", "fp8_tensor", "fp8_block", "int8", "int4", "int4_zp", "mxfp4")


def _fp32_reference(params, x, routing: dict, activation: str):
    """The layer in fp32 from the (bf16) parameters, one expert cast to fp32 at a time."""
    import jax
    import jax.numpy as jnp

    from jaxmoe import reference
    from jaxmoe.ops.moe.reference import fused_moe_in

    x32 = x.astype(jnp.float32)
    logits = jnp.dot(x32, params["router"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    weights, ids = reference.route(logits, **routing)
    return fused_moe_in(x32, params["w1"], params["w2"], weights, ids, activation, jnp.float32)


def _time_ms(fn: Callable[[], object], repeats: int | None) -> float:
    times: list[float] = []
    budget_end = time.perf_counter() + 2.0
    while True:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if repeats is not None:
            if len(times) >= repeats:
                break
        elif len(times) >= 20 or (len(times) >= 3 and time.perf_counter() > budget_end):
            break
    return statistics.median(times)


def check(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import jaxmoe
    from jaxmoe.backends.platform import default_platform, triton_available
    from jaxmoe.models import get_preset

    chosen = implementations(args.impl)  # before any work: `--impl ,` names nothing
    quant, act_quant = getattr(args, "quant", None), getattr(args, "act_quant", None)
    if act_quant is not None:
        from jaxmoe.types import ACT_QUANT_SCHEMES

        if quant not in ACT_QUANT_SCHEMES[act_quant]:
            raise CommandError(f"--act-quant {act_quant} needs --quant one of {', '.join(ACT_QUANT_SCHEMES[act_quant])}"
                               f", got {quant}")
    on_cpu = jax.default_backend() == "cpu"
    model = args.model or ("tiny" if on_cpu else "mixtral-8x7b")
    preset = get_preset(model)
    notes = []
    if on_cpu and (preset.hidden, preset.intermediate) != (CPU_HIDDEN, CPU_INTERMEDIATE):
        preset = preset.scaled(CPU_HIDDEN, CPU_INTERMEDIATE)
        notes.append(f"on a CPU, {model} is scaled down to tiny matrices (D={CPU_HIDDEN}, I={CPU_INTERMEDIATE}); "
                     "its experts, top_k and routing are kept")
    m = args.m if args.m is not None else (16 if on_cpu else 128)
    dtype = jnp.dtype(DTYPES[args.dtype])
    tol = max(TOLERANCE[args.dtype], ACT_QUANT_TOLERANCE) if act_quant else TOLERANCE[args.dtype]

    if chosen:
        impls = chosen
    else:
        impls = ["reference"]
        if triton_available():
            impls.append("triton")
        else:
            notes.append("triton: not available here (no triton package)")
    if on_cpu and "triton" in impls:
        notes.append("triton on a CPU runs through Triton's interpreter: correct but slow, timings are not speed")

    key_params, key_x, key_bias = jax.random.split(jax.random.key(args.seed), 3)
    params = jaxmoe.init_moe_params(key_params, hidden=preset.hidden, intermediate=preset.intermediate,
                                    experts=preset.experts, dtype=jnp.bfloat16)
    x = jax.random.normal(key_x, (m, preset.hidden), jnp.float32).astype(jnp.bfloat16)
    routing = preset.routing_kwargs(key_bias)
    activation = "silu"

    if quant is not None:  # quantized once, from the bf16 weights; the reference reads the same
        params = {**params, "w1": jaxmoe.quantize_weights(params["w1"], quant),
                  "w2": jaxmoe.quantize_weights(params["w2"], quant)}
        want = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x.astype(jnp.float32), implementation="reference",
                                                     activation=activation, act_quant=act_quant, **routing))(params, x)
    else:
        want = jax.jit(functools.partial(_fp32_reference, routing=routing, activation=activation))(params, x)
    want = np.asarray(want, np.float64)
    if dtype != jnp.bfloat16:  # same values in the run's dtype; drop the bf16 copy to save memory
        params = {k: (v if isinstance(v, jaxmoe.QuantizedWeights) else jax.tree_util.tree_map(
            lambda a: a.astype(dtype), v)) for k, v in params.items()}
        x = x.astype(dtype)
    want_norm = float(np.linalg.norm(want)) or 1.0

    device = jax.devices()[0]
    print(f"jaxmoe {jaxmoe.__version__} check: {preset.name}  E={preset.experts} k={preset.top_k} "
          f"D={preset.hidden} I={preset.intermediate} routing={preset.scoring}"
          f"{' grouped' if preset.num_expert_group else ''}  M={m}  dtype={args.dtype}"
          + (f"  weights={quant}" + (f" act_quant={act_quant}" if act_quant else "") if quant else ""))
    print(f"device: {device.device_kind} ({default_platform()})")
    for note in notes:
        print(f"note: {note}")
    source = f"the same {quant} weights, dequantized" if quant else "the same bf16 parameters"
    rounding = f", activations rounded to {act_quant} as the kernels round them" if act_quant else ""
    print(f"reference: fp32 from {source}{rounding}; tolerance ||out-ref||/||ref|| <= {tol:g}")
    print()

    rows = []
    failed = False
    for impl in impls:
        try:
            fn = jax.jit(functools.partial(jaxmoe.moe_layer, implementation=impl, activation=activation,
                                           act_quant=act_quant, **routing))
            out = fn(params, x)
            out.block_until_ready()
            got = np.asarray(out.astype(jnp.float32), np.float64)
            max_abs = float(np.max(np.abs(got - want))) if got.size else 0.0
            rel = float(np.linalg.norm(got - want)) / want_norm
            ms = _time_ms(lambda: fn(params, x).block_until_ready(), args.repeats)
            ok = bool(np.isfinite(rel) and rel <= tol)
            rows.append((impl, f"{max_abs:.3e}", f"{rel:.3e}", f"{ms:.3f}", "pass" if ok else "FAIL"))
        except Exception as err:  # noqa: BLE001 - report it in the row, go on with the others
            ok = False
            msg = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            rows.append((impl, "-", "-", "-", f"ERROR {msg[:200]}"))
        failed |= not ok

    header = ("implementation", "max abs err", "rel err", "time ms", "result")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(4)]
    for r in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 1 if failed else 0
