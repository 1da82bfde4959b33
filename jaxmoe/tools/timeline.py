"""Per-kernel device time of a jitted call, from the GPU's own timestamps (``jax.profiler``).

``bench --breakdown`` prints it for every timed cell, so a cell that misses its target can
be explained kernel by kernel, with the longest stretches where the device ran nothing
and the kernels either side of each.
"""

from __future__ import annotations

import collections
import glob
import tempfile
import time
from collections.abc import Callable, Sequence

import jax

__all__ = ["device_events", "summarize", "kernel_breakdown", "format_breakdown"]


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


Breakdown = tuple[float, float, list[tuple[str, float, float]], list[tuple[float, str, str]]]


def summarize(run: Sequence[tuple[int, int, str]], per_call: int = 1, gaps: int = 5) -> Breakdown:
    """``(span us, busy us, [(kernel, us, launches)], [(idle us, kernel before, kernel
    after)])`` of one run's device events (start ns, duration ns, name): the span and the
    kernels per ``per_call`` unit, kernels by descending time; the ``gaps`` longest
    stretches with no event running (overlapping events count as busy), longest first, in
    microseconds of the whole run."""
    events = sorted(run)
    span = (max(t + d for t, d, _ in events) - events[0][0]) / 1e3 / per_call
    busy = sum(d for _, d, _ in events) / 1e3 / per_call
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for _, d, name in events:
        by_name[name].append(d / 1e3)
    kernels = sorted(((n, sum(ds) / per_call, len(ds) / per_call) for n, ds in by_name.items()), key=lambda t: -t[1])
    idle = []
    end, last = events[0][0] + events[0][1], events[0][2]
    for t, d, name in events[1:]:
        if t > end:
            idle.append(((t - end) / 1e3, last, name))
        if t + d >= end:
            end, last = t + d, name
    return span, busy, kernels, sorted(idle, key=lambda g: -g[0])[:gaps]


def kernel_breakdown(fn: Callable[[], object], per_call: int = 1, runs: int = 3) -> Breakdown | None:
    """:func:`summarize` of the median run (by span) of ``fn``; None without device events."""
    recorded = device_events(fn, runs)
    if not recorded:
        return None
    spans = [(r[-1][0] + r[-1][1] - r[0][0]) for r in recorded]
    run = recorded[sorted(range(len(spans)), key=spans.__getitem__)[len(spans) // 2]]
    return summarize(run, per_call)


def format_breakdown(label: str, result: Breakdown | None, top: int = 12) -> str:
    if result is None:
        return f"{label}: no device events recorded (a GPU with CUPTI is needed)"
    span, busy, kernels, gaps = result
    lines = [f"{label}: span {span:9.1f} us, kernels busy {busy:9.1f} us ({100 * busy / span if span else 0:4.1f}%)"]
    for name, us, count in kernels[:top]:
        lines.append(f"    {us:9.1f} us {100 * us / busy if busy else 0:5.1f}%  x{count:<4.1f} {name[:100]}")
    if len(kernels) > top:
        rest = sum(us for _, us, _ in kernels[top:])
        lines.append(f"    {rest:9.1f} us        {len(kernels) - top} more kernels")
    for us, before, after in gaps:
        if us >= 1.0:
            lines.append(f"    idle {us:9.1f} us between {before[:45]} and {after[:45]}")
    return "\n".join(lines)
