"""The ceilings a roofline divides by: the device's copy bandwidth and matmul rates.

``bench`` measures them on the card it runs on at the start of a run
(:func:`measure_ceilings`): a device copy (an elementwise ``x + 1`` over a buffer far
larger than the L2 cache, bytes read + written) and square matmuls in bf16 and, where the
device multiplies fp8 (``float8_e4m3fn``), in fp8, each inside a ``lax.fori_loop`` so that
the loop's iterations are separate kernels. Two loop lengths are timed in alternation
(``block_until_ready``, warm) and the rate is the work of the extra iterations over the
difference of their fastest calls: the fixed cost of a call cancels, and time other work
adds does not count. Where a measurement fails or
gives no positive rate, the table of known devices (:data:`KNOWN_DEVICES`, values measured
on those cards) is used, else :data:`FALLBACK`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["Ceilings", "KNOWN_DEVICES", "FALLBACK", "measure_ceilings", "known_ceilings", "ceilings_for"]


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Peak rates of one device: bytes/s (copy, read + write), FLOP/s (bf16; fp8 or None)."""

    bytes_per_s: float
    bf16_flops: float
    fp8_flops: float | None
    source: str  # "measured", "table (<device kind>)" or "fallback"

    def describe(self) -> str:
        fp8 = f", fp8 {self.fp8_flops / 1e12:.4g} TFLOP/s" if self.fp8_flops else ", fp8 -"
        return (f"copy {self.bytes_per_s / 1e12:.3g} TB/s, bf16 {self.bf16_flops / 1e12:.4g} TFLOP/s{fp8} "
                f"[{self.source}]")


# Measured with this module's method (device kind as jax reports it): the H200 on
# 2026-12-01 (jax 0.11.2, 8192^3 bf16 matmul), the H100 SXM from the figures the bench
# used before it measured (fp8 not measured on either: None).
KNOWN_DEVICES: dict[str, Ceilings] = {
    "NVIDIA H200": Ceilings(4.21e12, 798e12, None, "table (NVIDIA H200)"),
    "NVIDIA H100 80GB HBM3": Ceilings(3.0e12, 790e12, None, "table (NVIDIA H100 80GB HBM3)"),
}
# An unknown device whose measurement failed: the H100's figures, said so in the header.
FALLBACK = Ceilings(3.0e12, 790e12, None, "fallback (H100 figures; not this device's)")


def _marginal_seconds(run: Callable[[int], Callable[[], object]], short: int, long: int, reps: int) -> float:
    """(fastest of ``reps`` calls of ``long`` iterations - fastest of ``short``) / (long - short),
    the calls alternated. The fastest calls, not the median: a ceiling is the best rate,
    and other work on the device or the host (a compile beside it, a loaded CPU) only ever
    adds time, which a median of differences can turn into a rate far too low or none."""
    f_short, f_long = run(short), run(long)
    for f in (f_short, f_long):
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for j, f in enumerate((f_short, f_long)):
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            best[j] = min(best[j], time.perf_counter() - t0)
    return (best[1] - best[0]) / (long - short)


def _loop(step: Callable, x: jax.Array, *consts: jax.Array) -> Callable[[int], Callable[[], object]]:
    def make(n: int):
        # the barrier keeps each iteration its own kernel (no fusion across an unrolled loop)
        body = lambda _, v, *c: jax.lax.optimization_barrier(step(v, *c))  # noqa: E731
        f = jax.jit(lambda x, *c: jax.lax.fori_loop(0, n, lambda i, v: body(i, v, *c), x))
        return functools.partial(f, x, *consts)

    return make


def copy_rate(nbytes: int, reps: int) -> float:
    """Bytes/s of ``x + 1`` over a bf16 buffer of ``nbytes`` (read + written)."""
    x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
    sec = _marginal_seconds(_loop(lambda v: v + jnp.bfloat16(1), x), 2, 10, reps)
    return 2 * x.size * 2 / sec


def matmul_rate(n: int, dtype: jnp.dtype, reps: int) -> float:
    """FLOP/s of ``[n, n] @ [n, n]`` in ``dtype`` (fp32 accumulation, the result cast back,
    the operand scaled so values stay of order 1)."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
    b = (jax.random.normal(key_b, (n, n), jnp.float32) * n**-0.5).astype(dtype)
    step = lambda v, b: jnp.dot(v, b, preferred_element_type=jnp.float32).astype(dtype)  # noqa: E731
    sec = _marginal_seconds(_loop(step, a, b), 1, 5, reps)
    return 2 * n**3 / sec


def known_ceilings(device_kind: str) -> Ceilings:
    """The table's ceilings for ``device_kind``, else :data:`FALLBACK`."""
    return KNOWN_DEVICES.get(device_kind, FALLBACK)


def measure_ceilings(*, small: bool = False, reps: int = 7) -> Ceilings:
    """Copy bandwidth and matmul rates of the default device, measured now (see the module
    docstring); ``small`` uses sizes a CPU runs in a second. A rate that cannot be measured
    comes from :func:`known_ceilings`; fp8 is None where the device has no fp8 matmul."""
    kind = jax.devices()[0].device_kind
    table = known_ceilings(kind)
    copy_bytes, n = (1 << 24, 256) if small else (1 << 31, 8192)
    try:
        bw = copy_rate(copy_bytes, reps)
        bf16 = matmul_rate(n, jnp.bfloat16, reps)
    except Exception:  # noqa: BLE001  (a device that cannot run the probe: the table says)
        return table
    if not (bw > 0 and bf16 > 0):
        return table
    fp8 = None
    if not small and jax.default_backend() == "gpu":
        try:
            fp8 = matmul_rate(n, jnp.float8_e4m3fn, reps)
        except Exception:  # noqa: BLE001  (no fp8 matmul on this device)
            fp8 = None
        # a "fp8" matmul no faster than bf16 was upcast (no fp8 tensor cores): not an fp8 rate
        if fp8 is not None and not fp8 > 1.2 * bf16:
            fp8 = None
    return Ceilings(bw, bf16, fp8, "measured")


def ceilings_for(mode: str) -> Ceilings:
    """``"measure"``: :func:`measure_ceilings` (small sizes on a CPU); ``"table"``:
    :func:`known_ceilings` of the default device."""
    if mode == "table":
        return known_ceilings(jax.devices()[0].device_kind)
    return measure_ceilings(small=jax.default_backend() == "cpu")
