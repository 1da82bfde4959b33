"""Per-kernel device time of a jitted call, from the GPU's own timestamps (``jax.profiler``).

``bench --breakdown`` prints it for every timed cell, so a cell that misses its target can
be explained kernel by kernel.
"""

from __future__ import annotations

import collections
import glob
import tempfile
import time
from collections.abc import Callable, Sequence

import jax

__all__ = ["device_events", "kernel_breakdown", "format_breakdown"]


def device_events(fn: Callable[[], object], runs: int = 3) -> list[list[tuple[int, int, str]]]:
    """(start ns, duration ns, kernel name) of the GPU work of each of ``runs`` calls of
    ``fn`` (warm), calls told apart by idle gaps of more than a millisecond. Empty where
    the profiler records no device events (a CPU)."""
    from jax.profiler import ProfileData

    jax.block_until_ready(fn())
    out_dir = tempfile.mkdtemp(prefix="jaxmoe-trace-")
    jax.profiler.start_trace(out_dir)
    try:
        for _ in range(runs):
            jax.block_until_ready(fn())
            time.sleep(0.005)
    finally:
        jax.profiler.stop_trace()
    files = glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        return []
    data = ProfileData.from_file(files[0])
    events = sorted((e.start_ns, e.duration_ns, e.name)
                    for plane in data.planes if plane.name.startswith("/device:GPU")
                    for line in plane.lines if "stream" in line.name.lower()
                    for e in line.events)
    split: list[list[tuple[int, int, str]]] = [[]]
    for ev in events:
        if split[-1] and ev[0] - (split[-1][-1][0] + split[-1][-1][1]) > 1_000_000:
            split.append([])
        split[-1].append(ev)
    return [r for r in split if r]


def kernel_breakdown(fn: Callable[[], object], per_call: int = 1, runs: int = 3
                     ) -> tuple[float, float, list[tuple[str, float, float]]] | None:
    """``(span us, busy us, [(kernel, us, launches)])`` per ``per_call`` unit of the median
    run of ``fn``, kernels by descending time; None without device events."""
    recorded = device_events(fn, runs)
    if not recorded:
        return None
    spans = [(r[-1][0] + r[-1][1] - r[0][0]) for r in recorded]
    run = recorded[sorted(range(len(spans)), key=spans.__getitem__)[len(spans) // 2]]
    span = (run[-1][0] + run[-1][1] - run[0][0]) / 1e3 / per_call
    busy = sum(d for _, d, _ in run) / 1e3 / per_call
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for _, d, name in run:
        by_name[name].append(d / 1e3)
    kernels = sorted(((n, sum(ds) / per_call, len(ds) / per_call) for n, ds in by_name.items()), key=lambda t: -t[1])
    return span, busy, kernels


def format_breakdown(label: str, result: tuple[float, float, Sequence[tuple[str, float, float]]] | None,
                     top: int = 12) -> str:
    if result is None:
        return f"{label}: no device events recorded (a GPU with CUPTI is needed)"
    span, busy, kernels = result
    lines = [f"{label}: span {span:9.1f} us, kernels busy {busy:9.1f} us ({100 * busy / span if span else 0:4.1f}%)"]
    for name, us, count in kernels[:top]:
        lines.append(f"    {us:9.1f} us {100 * us / busy if busy else 0:5.1f}%  x{count:<4.1f} {name[:100]}")
    if len(kernels) > top:
        rest = sum(us for _, us, _ in kernels[top:])
        lines.append(f"    {rest:9.1f} us        {len(kernels) - top} more kernels")
    return "\n".join(lines)
