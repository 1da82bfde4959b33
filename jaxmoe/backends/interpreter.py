"""CPU launches: Triton's interpreter on host memory, called through ``jax.pure_callback``.

The very kernel source that runs on a GPU runs here, under ``jax.jit``, slowly; the
interpreter's own defects are put right by :mod:`jaxmoe._compat.triton_interpreter`.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe._compat import triton_interpreter
from jaxmoe.backends.launch import KernelLaunch

__all__ = ["launch", "run"]

_LOCK = threading.Lock()


class _HostPointer:
    """A numpy array seen by Triton's interpreter as a tensor argument."""

    def __init__(self, array: np.ndarray, triton_type: str) -> None:
        self.array = array
        self.dtype = triton_type  # what triton's specialisation reads, e.g. "bf16"

    def data_ptr(self) -> int:
        return self.array.ctypes.data


@functools.cache
def _interpreted(kernel: Any) -> Any:
    """The interpreter's version of ``kernel`` (a ``@triton.jit`` function).

    ``triton.jit`` decides at decoration time whether it builds a compiled or an
    interpreted function, so the kernel's module is executed once more with the
    interpreter switched on; helper ``@triton.jit`` functions of that module come along
    interpreted too, and helpers it imports from other kernel modules are replaced by
    their own interpreted versions. Kernel modules therefore import only ``triton``,
    ``triton.language`` and other kernel modules.
    """
    import triton
    from triton.runtime.jit import JITFunction

    module = sys.modules[kernel.fn.__module__]
    name = f"{module.__name__}__interpreted"
    if name not in sys.modules:
        knobs = triton.knobs.runtime
        previous = knobs.interpret
        knobs.interpret = True
        try:
            spec = importlib.util.spec_from_file_location(name, module.__file__)
            copy = importlib.util.module_from_spec(spec)
            copy.__package__ = module.__package__
            sys.modules[name] = copy
            spec.loader.exec_module(copy)
        finally:
            knobs.interpret = previous
        for attr, value in list(vars(copy).items()):
            if isinstance(value, JITFunction) and value.fn.__module__ != name:
                setattr(copy, attr, _interpreted(value))
    return getattr(sys.modules[name], kernel.fn.__name__)


def run(spec: KernelLaunch, arrays: Sequence[np.ndarray], poison: bool) -> list[np.ndarray]:
    """Run ``spec`` on host arrays; returns the outputs (poisoned first when ``poison``)."""
    from triton.runtime import interpreter

    class HostGridExecutor(interpreter.GridExecutor):
        # Our arguments already live in host memory: no torch-style copy in and out.
        def _init_args_hst(self, args_dev, kwargs):
            return list(args_dev), dict(kwargs)

        def _restore_args_dev(self, args_dev, args_hst, kwargs, kwargs_hst):
            return None

    types = list(spec.signature().values())
    inputs = [np.ascontiguousarray(a) for a in arrays]
    outs = [np.empty(o.shape, o.dtype) for o in spec.outs]
    for o in outs:
        if poison:  # NaN (bf16 and fp8 too), else a large negative integer (-1 in 8 and 16 bits)
            if jnp.issubdtype(o.dtype, jnp.floating):
                o.fill(np.nan)
            else:
                o.fill(-0x5A5A5A5A if o.dtype.itemsize >= 4 else -1)
        else:
            o.fill(0)
    n_in, n_scalar = len(inputs), len(spec.scalars)
    in_ptrs = [_HostPointer(a, types[i][1:]) for i, a in enumerate(inputs)]
    out_ptrs = [_HostPointer(a, types[n_in + n_scalar + i][1:]) for i, a in enumerate(outs)]
    scalars = [int(v) for _, v in spec.scalars]
    grid = tuple(int(g) for g in spec.grid)
    # One run at a time, the kernel's interpreted module built under the same lock: host
    # callbacks of several devices (shard_map over CPU devices) run on several threads, and
    # a second thread must not see the module half executed.
    with _LOCK:
        fn = _interpreted(spec.kernel)
        buffers = [(a.ctypes.data, a.nbytes) for a in (*inputs, *outs)]
        with triton_interpreter.patches(buffers, spec.name):
            HostGridExecutor(fn.rewrite(), fn.arg_names, grid)(*in_ptrs, *scalars, *out_ptrs,
                                                               **dict(spec.constexprs))
    return outs


def launch(spec: KernelLaunch, args: Sequence[jax.Array], poison: bool) -> tuple[jax.Array, ...]:
    """The outputs of ``spec`` computed on the host by the interpreter, inside ``jax.jit``."""

    def host(*arrays: np.ndarray) -> list[np.ndarray]:
        return run(spec, arrays, poison)

    return tuple(jax.pure_callback(host, list(spec.outs), *args, vmap_method="sequential"))
