"""``python -m jaxmoe check``: one MoE layer per implementation against an fp32 reference.

Runs on the default device, with the same bf16 parameters for every implementation, and
prints each one's error and median warm time; exits non-zero if any fails or raises.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import numpy as np

from jaxmoe.tools import implementations, positive_int

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOLERANCE = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4}
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
    p.set_defaults(func=check)


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
    tol = TOLERANCE[args.dtype]

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

    want = jax.jit(functools.partial(_fp32_reference, routing=routing, activation=activation))(params, x)
    want = np.asarray(want, np.float64)
    if dtype != jnp.bfloat16:  # same values in the run's dtype; drop the bf16 copy to save memory
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
        x = x.astype(dtype)
    want_norm = float(np.linalg.norm(want)) or 1.0

    device = jax.devices()[0]
    print(f"jaxmoe {jaxmoe.__version__} check: {preset.name}  E={preset.experts} k={preset.top_k} "
          f"D={preset.hidden} I={preset.intermediate} routing={preset.scoring}"
          f"{' grouped' if preset.num_expert_group else ''}  M={m}  dtype={args.dtype}")
    print(f"device: {device.device_kind} ({default_platform()})")
    for note in notes:
        print(f"note: {note}")
    print(f"reference: fp32 from the same bf16 parameters; tolerance ||out-ref||/||ref|| <= {tol:g}")
    print()

    rows = []
    failed = False
    for impl in impls:
        try:
            fn = jax.jit(functools.partial(jaxmoe.moe_layer, implementation=impl, activation=activation, **routing))
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
