"""CPU launches run as compiled GPU kernels: the launch used to check memory safety.

With ``JAXMOE_CPU_LAUNCH=gpu`` in the environment, every launch that would run under
Triton's interpreter (JAX on the CPU) instead runs the kernel compiled for the local
CUDA/ROCm GPU through Triton's own launcher, on device copies of the host arrays (PyTorch
tensors), inside the same ``jax.pure_callback``. JAX itself never touches the GPU, so a
memory checker such as ``compute-sanitizer --tool memcheck`` sees only these launches,
each array in an allocation of its own (with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``), and the
CPU test tier (invalid ids, empty experts, M = 1, NaN rows, poisoned outputs) runs the
code the GPU runs. A debugging seam, not a fast path: every launch copies its arrays in
and out. Needs PyTorch with GPU support.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxmoe.backends.launch import KernelLaunch

__all__ = ["enabled", "launch", "run"]

ENV = "JAXMOE_CPU_LAUNCH"
_LOCK = threading.Lock()


def enabled() -> bool:
    """Whether CPU launches go to the GPU (``JAXMOE_CPU_LAUNCH=gpu``)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "interpret", "interpreter"):
        return False
    if value != "gpu":
        raise ValueError(f"{ENV}={value!r}: use 'gpu' (compiled kernels on the local GPU) or 'interpreter'")
    return True


def _torch_dtype(torch: Any, dtype: np.dtype) -> tuple[Any, np.dtype | None]:
    """The torch dtype of a numpy dtype, and the numpy view type it travels as (or None)."""
    name = np.dtype(dtype).name
    special = {"bfloat16": (torch.bfloat16, np.uint16), "float8_e4m3fn": (torch.float8_e4m3fn, np.uint8),
               "float8_e4m3fnuz": (torch.float8_e4m3fnuz, np.uint8), "float8_e5m2": (torch.float8_e5m2, np.uint8)}
    if name in special:
        return special[name]
    return getattr(torch, {"bool": "bool"}.get(name, name)), None


def _to_device(torch: Any, a: np.ndarray) -> Any:
    tdtype, view = _torch_dtype(torch, a.dtype)
    host = torch.from_numpy(np.ascontiguousarray(a if view is None else a.view(view)))
    return host.to("cuda").view(tdtype) if view is not None else host.to("cuda")


def _to_host(torch: Any, t: Any, dtype: np.dtype) -> np.ndarray:
    _, view = _torch_dtype(torch, dtype)
    if view is None:
        return t.cpu().numpy()
    return t.view({np.uint16: torch.uint16, np.uint8: torch.uint8}[view]).cpu().numpy().view(dtype)


def _scratch(size: int, alignment: int, stream: Any) -> Any:
    """Triton's per-launch global scratch (tensor descriptors built on the device): an
    allocation of its own, so that memcheck also sees accesses past it."""
    import torch

    if alignment > 256:  # the CUDA allocator aligns to 256 bytes
        raise RuntimeError(f"global scratch aligned to {alignment} bytes: more than an allocation gives")
    return torch.empty(max(int(size), 1), dtype=torch.int8, device="cuda")


def run(spec: KernelLaunch, arrays: Sequence[np.ndarray], poison: bool) -> list[np.ndarray]:
    """Run ``spec`` compiled on the local GPU; returns the outputs as host arrays."""
    import torch
    import triton

    with _LOCK:
        # the allocator is a context variable: set it in the thread that launches
        triton.set_allocator(_scratch)
        ins = [_to_device(torch, np.asarray(a)) for a in arrays]
        outs = []
        for o in spec.outs:
            tdtype, _ = _torch_dtype(torch, np.dtype(o.dtype))
            t = torch.empty(tuple(o.shape), dtype=tdtype, device="cuda")
            if poison and (t.is_floating_point()):
                t.fill_(float("nan"))
            elif poison:
                t.fill_(-0x5A5A5A5A if t.dtype in (torch.int32, torch.int64) else -1)
            else:
                t.zero_()
            outs.append(t)
        grid = tuple(int(g) for g in spec.grid)
        spec.kernel[grid](*ins, *(int(v) for _, v in spec.scalars), *outs, **dict(spec.constexprs),
                          num_warps=spec.num_warps, num_stages=spec.num_stages)
        torch.cuda.synchronize()
        return [_to_host(torch, t, np.dtype(o.dtype)) for t, o in zip(outs, spec.outs)]


def launch(spec: KernelLaunch, args: Sequence[jax.Array], poison: bool) -> tuple[jax.Array, ...]:
    """The outputs of ``spec`` computed by the compiled kernel on the local GPU, inside ``jax.jit``."""

    def host(*arrays: np.ndarray) -> list[np.ndarray]:
        return run(spec, arrays, poison)

    return tuple(jax.pure_callback(host, list(spec.outs), *args, vmap_method="sequential"))
