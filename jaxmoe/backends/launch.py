"""The one seam between JAX and Triton: a launch description, and where it runs.

Every kernel launch in jaxmoe is a :class:`KernelLaunch` (kernel, grid, array and scalar
arguments, outputs, compile-time constants, warps, stages), planned from static shapes by
an op's ``triton.py``, and handed to :func:`launch`, which runs it on the platform of the
device jax places the computation on (``jax.default_device``, else the default backend):

* ``cuda`` / ``rocm``: ``jax_triton.triton_call`` (:mod:`jaxmoe.backends.jax_triton`);
* ``cpu``: Triton's interpreter on host memory through ``jax.pure_callback``
  (:mod:`jaxmoe.backends.interpreter`), so the same kernel source runs under ``jax.jit``
  anywhere, slowly.

:mod:`jaxmoe.backends.aot` compiles the same description ahead of time for ``sm_90``,
``gfx942`` and ``gfx950`` on a machine without a GPU.

Kernel parameters follow jax-triton's convention: the input pointers in order, then the
runtime scalars (sizes that vary with the batch, so one compiled kernel serves every
batch size), then the output pointers, then the ``tl.constexpr`` parameters by name.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.custom_batching
import numpy as np

from jaxmoe.backends import platform as _platform

__all__ = ["KernelLaunch", "launch", "next_pow2", "poisoned_outputs", "poison_on"]

_TRITON_PTR_TYPES = {
    "bfloat16": "*bf16",
    "float16": "*fp16",
    "float32": "*fp32",
    "float64": "*fp64",
    "int8": "*i8",
    "int16": "*i16",
    "int32": "*i32",
    "int64": "*i64",
    "uint8": "*u8",
    "uint32": "*u32",
    "bool": "*i1",
    "float8_e4m3fn": "*fp8e4nv",
    "float8_e4m3fnuz": "*fp8e4b8",
    "float8_e5m2": "*fp8e5",
}

INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """A complete, static description of one Triton kernel launch.

    ``args`` and ``outs`` hold the shapes and dtypes of the array parameters (inputs, then
    outputs, in kernel order); ``scalars`` the runtime int32 scalars by name, which the
    kernel takes between its inputs and its outputs; ``constexprs`` the ``tl.constexpr``
    values by name. ``amd_options`` holds AMD-only compiler knobs (``waves_per_eu``,
    ``matrix_instr_nonkdim``, ``kpack``), used where the toolchain accepts them.
    """

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[jax.ShapeDtypeStruct, ...]
    outs: tuple[jax.ShapeDtypeStruct, ...]
    constexprs: tuple[tuple[str, Any], ...] = ()
    scalars: tuple[tuple[str, int], ...] = ()
    num_warps: int = 4
    num_stages: int = 2
    amd_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.grid or any(int(g) < 1 for g in self.grid):
            raise ValueError(f"grid must be positive, got {self.grid}")
        if any(int(g) > INT32_MAX for g in self.grid):
            raise ValueError(f"grid {self.grid} exceeds the launch limit")
        for name, value in self.scalars:
            if not 0 <= int(value) <= INT32_MAX:
                raise ValueError(f"runtime scalar {name}={value} does not fit an int32")

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def signature(self) -> dict[str, str]:
        """The Triton signature: parameter name to type, constexprs marked as such."""
        names = self.kernel.arg_names
        n_in, n_scalar, n_out = len(self.args), len(self.scalars), len(self.outs)
        const = dict(self.constexprs)
        sig: dict[str, str] = {}
        for i, spec in enumerate(self.args):
            sig[names[i]] = _TRITON_PTR_TYPES[np.dtype(spec.dtype).name]
        for j, (name, _) in enumerate(self.scalars):
            if names[n_in + j] != name:
                raise ValueError(f"{self.name}: parameter {n_in + j} is {names[n_in + j]!r}, "
                                 f"the launch passes the scalar {name!r} there")
            sig[name] = "i32"
        for i, spec in enumerate(self.outs):
            sig[names[n_in + n_scalar + i]] = _TRITON_PTR_TYPES[np.dtype(spec.dtype).name]
        first_const = n_in + n_scalar + n_out
        for name in names[first_const:]:
            if name not in const:
                raise ValueError(f"{self.name}: no value for constexpr parameter {name!r}")
            sig[name] = "constexpr"
        unknown = set(const) - set(names[first_const:])
        if unknown:
            raise ValueError(f"{self.name}: unknown constexpr parameters {sorted(unknown)}")
        return sig

    def code_key(self) -> tuple[Any, ...]:
        """What determines the compiled binary: launches with equal keys share one kernel.

        Runtime scalars enter only as "equal to 1", which jax-triton (like Triton) turns
        into a compile-time constant.
        """
        return (self.name, tuple(np.dtype(a.dtype).name for a in (*self.args, *self.outs)), self.constexprs,
                tuple(int(v) == 1 for _, v in self.scalars), self.num_warps, self.num_stages, self.amd_options)


# --------------------------------------------------------------------------- poison

_POISON = threading.local()


def next_pow2(n: int) -> int:
    """The least power of two >= ``n`` (1 for ``n <= 1``): a ``tl.arange`` extent."""
    return 1 << max(0, int(n) - 1).bit_length()


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Trace launches whose outputs start out poisoned, for tests.

    Under the interpreter every output starts as NaN (floats) or -0x5A5A5A5A (ints); on a
    GPU jax-triton zeroes them first (it has no other fill), which on random inputs is as
    good a witness of an unwritten row. Affects functions traced inside the block only.
    """
    prev = getattr(_POISON, "on", False)
    _POISON.on = True
    try:
        yield
    finally:
        _POISON.on = prev


def poison_on() -> bool:
    return getattr(_POISON, "on", False)


# --------------------------------------------------------------------------- launch


def launch(spec: KernelLaunch, *args: jax.Array) -> tuple[jax.Array, ...]:
    """Run ``spec`` on ``args`` (JAX arrays matching ``spec.args``); returns the outputs.

    On a GPU the launch is a jax-triton custom call; on a CPU Triton's interpreter runs the
    kernel on the host. The choice is made while tracing, for the default device.
    """
    if len(args) != len(spec.args):
        raise ValueError(f"{spec.name}: expected {len(spec.args)} arrays, got {len(args)}")
    for i, (a, s) in enumerate(zip(args, spec.args)):
        if tuple(a.shape) != tuple(s.shape) or a.dtype != s.dtype:
            raise ValueError(
                f"{spec.name}: argument {i} is {a.dtype}{list(a.shape)}, "
                f"the launch was planned for {s.dtype}{list(s.shape)}"
            )
    spec.signature()  # validates the parameters against the kernel's
    poison = poison_on()
    if _platform.default_platform() in _platform.GPU_PLATFORMS:
        from jaxmoe.backends import jax_triton

        run = functools.partial(jax_triton.launch, spec, poison=poison)
    else:
        from jaxmoe.backends import cuda_host, interpreter

        # JAXMOE_CPU_LAUNCH=gpu: the compiled kernels on the local GPU, for memory checking
        run = functools.partial((cuda_host if cuda_host.enabled() else interpreter).launch, spec, poison=poison)
    return _batchable(run)(*args)


def _varying(x: Any) -> frozenset:
    """The ``jax.shard_map`` mesh axes ``x`` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.11; "vma" before
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _to_varying(xs: Sequence[Any], axes: set) -> tuple[Any, ...]:
    out = []
    for x in xs:
        missing = tuple(sorted(axes - _varying(x))) if x is not None else ()
        out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return tuple(out)


def _varying_like(args: Sequence[jax.Array], outs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Inside ``jax.shard_map``, outputs vary over the mesh axes their inputs vary over (a
    custom call's outputs carry no such type, and autodiff rules compare them)."""
    axes = set().union(*(_varying(a) for a in args))
    return _to_varying(outs, axes) if axes else outs


def match_varying(*xs: Any) -> tuple[Any, ...]:
    """``xs`` (arrays or None) each cast to vary over every mesh axis any of them varies
    over, for a ``jax.custom_vjp`` inside ``jax.shard_map``: its backward's cotangents vary
    where the data do, and the cast's transpose sums an invariant input's (weights
    replicated over the mesh) over the axes. Outside shard_map: ``xs`` unchanged."""
    axes = set().union(*(_varying(x) for x in xs if x is not None))
    return _to_varying(xs, axes) if axes else tuple(xs)


def _batchable(run: Any) -> Any:
    """``run(args)`` as a function of the arrays with a batching rule: under ``jax.vmap``
    the launch runs once per batch element (``lax.map`` over the batched arguments, the
    others shared), on every platform: jax-triton has no batching rule of its own, and the
    CPU path takes the same rule so that its tests witness the GPU's."""

    @jax.custom_batching.custom_vmap
    def call(*args: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(run(args))

    @call.def_vmap
    def _rule(axis_size: int, in_batched: Any, *args: jax.Array) -> tuple[tuple[jax.Array, ...], Any]:
        batched = [a for a, b in zip(args, in_batched) if b]

        def one(xs: list[jax.Array]) -> tuple[jax.Array, ...]:
            it = iter(xs)
            return call(*[next(it) if b else a for a, b in zip(args, in_batched)])  # nested vmap: again

        outs = jax.lax.map(one, batched)
        return outs, tuple(True for _ in outs)

    return lambda *args: _varying_like(args, call(*args))
