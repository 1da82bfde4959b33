"""The one seam between JAX and Triton.

Every kernel launch in jaxmoe is described by a :class:`KernelLaunch` (kernel, grid,
argument and output types, compile-time constants, warps, stages) built by a wrapper
from static shapes, and then handed to :func:`launch`, which decides how it runs:

* ``cuda`` / ``rocm`` backends: ``jax_triton.triton_call`` (imported lazily: jax-triton
  0.3.1 raises ImportError on a CPU-only jaxlib). Works with jax-triton 0.3.1 and 0.4.x;
  the AMD knobs go through ``backend_options`` where 0.4 offers it.
* ``cpu``: Triton's interpreter on host memory, called through ``jax.pure_callback``,
  so the very same kernel source runs (slowly) under ``jax.jit`` anywhere.

:func:`compile_aot` compiles the same description ahead of time for a named target
(``sm_90``, ``gfx942``, ``gfx950``) on a machine without a GPU.

Kernel parameters follow jax-triton's convention: the input pointers in order, then the
output pointers, then the ``tl.constexpr`` parameters by name. Kernel modules import only
``triton`` and ``triton.language`` (the interpreter re-executes a kernel's module, see
:func:`_interpreted`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "KernelLaunch",
    "launch",
    "compile_aot",
    "AOT_TARGETS",
    "poisoned_outputs",
    "platform",
    "triton_available",
    "resolve_implementation",
]

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
}


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """A complete, static description of one Triton kernel launch.

    ``args`` and ``outs`` hold the shapes and dtypes of the array parameters, in kernel
    order (inputs first, then outputs); ``constexprs`` the ``tl.constexpr`` values by name.
    ``amd_options`` holds AMD-only compiler knobs (``waves_per_eu``, ``matrix_instr_nonkdim``,
    ``kpack``), used where the toolchain accepts them.
    """

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[jax.ShapeDtypeStruct, ...]
    outs: tuple[jax.ShapeDtypeStruct, ...]
    constexprs: tuple[tuple[str, Any], ...] = ()
    num_warps: int = 4
    num_stages: int = 2
    amd_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.grid or any(int(g) < 1 for g in self.grid):
            raise ValueError(f"grid must be positive, got {self.grid}")
        if any(int(g) >= 2**31 for g in self.grid):
            raise ValueError(f"grid {self.grid} exceeds the launch limit")

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def signature(self) -> dict[str, str]:
        """The Triton signature: parameter name to type, constexprs marked as such."""
        names = self.kernel.arg_names
        n_ptr = len(self.args) + len(self.outs)
        const = dict(self.constexprs)
        sig: dict[str, str] = {}
        for i, spec in enumerate((*self.args, *self.outs)):
            sig[names[i]] = _TRITON_PTR_TYPES[np.dtype(spec.dtype).name]
        for name in names[n_ptr:]:
            if name not in const:
                raise ValueError(f"{self.name}: no value for constexpr parameter {name!r}")
            sig[name] = "constexpr"
        unknown = set(const) - set(names[n_ptr:])
        if unknown:
            raise ValueError(f"{self.name}: unknown constexpr parameters {sorted(unknown)}")
        return sig


def triton_available() -> bool:
    """Whether the ``triton`` package imports here (Linux wheels only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def platform() -> str:
    """``"cuda"``, ``"rocm"`` or ``"cpu"``: where jaxmoe's kernels would run now."""
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    version = getattr(jax.devices()[0].client, "platform_version", "").lower()
    if backend == "rocm" or "rocm" in version or "hip" in version:
        return "rocm"
    return "cuda"


IMPLEMENTATIONS = ("triton", "reference")


def resolve_implementation(implementation: str | None) -> str:
    """Map the public ``implementation`` argument to ``"triton"`` or ``"reference"``.

    ``None`` picks the Triton kernels on a CUDA or ROCm GPU and the jax.numpy reference
    elsewhere; ``"triton"`` forces the kernels (through Triton's interpreter on a CPU).
    """
    if implementation is None:
        return "triton" if platform() != "cpu" and triton_available() else "reference"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation == "triton" and not triton_available():
        raise RuntimeError("implementation='triton' needs the triton package (Linux only); use 'reference'")
    return implementation


# --------------------------------------------------------------------------- poison

_POISON = threading.local()


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


def _poison_on() -> bool:
    return getattr(_POISON, "on", False)


# --------------------------------------------------------------------------- launch


def launch(spec: KernelLaunch, *args: jax.Array) -> tuple[jax.Array, ...]:
    """Run ``spec`` on ``args`` (JAX arrays matching ``spec.args``); returns the outputs."""
    if len(args) != len(spec.args):
        raise ValueError(f"{spec.name}: expected {len(spec.args)} arrays, got {len(args)}")
    for i, (a, s) in enumerate(zip(args, spec.args)):
        if tuple(a.shape) != tuple(s.shape) or a.dtype != s.dtype:
            raise ValueError(
                f"{spec.name}: argument {i} is {a.dtype}{list(a.shape)}, "
                f"the launch was planned for {s.dtype}{list(s.shape)}"
            )
    spec.signature()  # validates the constexprs against the kernel's parameters
    if platform() == "cpu":
        return _launch_interpreted(spec, args)
    return _launch_triton_call(spec, args)


_SLIM_LOCK = threading.Lock()
_SLIMMED: set[int] = set()


def _slim_kernel_calls(lib: Any) -> None:
    """Make jax-triton 0.3.x's custom-call payload small: a cheaper launch.

    jax-triton 0.3.x puts each kernel's PTX *and* its TTIR into the custom call's
    (compressed) opaque, and jaxlib looks the kernel up by hashing and comparing that whole
    opaque on every launch: measured on an H100, about 4 us per launch plus 0.23 us per KB
    of opaque. The TTIR is never read when the kernel runs, and the PTX's line-number
    debug info only serves profilers, so both are dropped here; the code is unchanged.
    Applied once per ``jax_triton.triton_lib`` module, and only where its shapes are the
    ones this was written against (anything else is left alone). ``JAXMOE_LINE_INFO=1``
    keeps both (for a profiler's source view).
    """
    with _SLIM_LOCK:
        if id(lib) in _SLIMMED:
            return
        _SLIMMED.add(id(lib))
        native = getattr(lib, "triton_kernel_call_lib", None)
        compile_fn = getattr(lib, "compile_ttir_inplace", None)
        if native is None or compile_fn is None or not hasattr(native, "TritonKernel"):
            return

        class _NativeWithoutTtir:
            def __getattr__(self, name: str) -> Any:
                return getattr(native, name)

            def TritonKernel(self, *args: Any) -> Any:  # noqa: N802  (jaxlib's name)
                # 0.3.x: (name, num_warps, num_ctas, shared_mem, binary, ttir, compute_capability)
                if len(args) == 7 and isinstance(args[5], str) and "tt.func" in args[5]:
                    args = (*args[:5], "", *args[6:])
                return native.TritonKernel(*args)

        @functools.wraps(compile_fn)
        def compile_without_line_info(*args: Any, **kwargs: Any) -> Any:
            import triton

            knobs = getattr(getattr(triton, "knobs", None), "compilation", None)
            if knobs is None or not hasattr(knobs, "disable_line_info"):
                return compile_fn(*args, **kwargs)
            previous = knobs.disable_line_info
            knobs.disable_line_info = True
            try:
                return compile_fn(*args, **kwargs)
            finally:
                knobs.disable_line_info = previous

        lib.triton_kernel_call_lib = _NativeWithoutTtir()
        lib.compile_ttir_inplace = compile_without_line_info


def _launch_triton_call(spec: KernelLaunch, args: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    import jax_triton as jt

    if str(getattr(jt, "__version__", "")).startswith("0.3.") and os.environ.get("JAXMOE_LINE_INFO") != "1":
        import jax_triton.triton_lib as jt_lib

        _slim_kernel_calls(jt_lib)

    kwargs: dict[str, Any] = dict(spec.constexprs)
    params = inspect.signature(jt.triton_call).parameters
    kwargs["out_type" if "out_type" in params else "out_shape"] = list(spec.outs)
    if spec.amd_options and platform() == "rocm" and "backend_options" in params:
        kwargs["backend_options"] = dict(spec.amd_options)
    if _poison_on():
        kwargs["zeroed_outputs"] = tuple(range(len(spec.outs)))
    outs = jt.triton_call(
        *args,
        kernel=spec.kernel,
        grid=tuple(int(g) for g in spec.grid),
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        **kwargs,
    )
    return tuple(outs)


# --------------------------------------------------------------------------- interpreter


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
    interpreter switched on; helper ``@triton.jit`` functions of that module come
    along interpreted too, and helpers it imports from other kernel modules are
    replaced by their own interpreted versions.
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
            sys.modules[name] = copy
            spec.loader.exec_module(copy)
        finally:
            knobs.interpret = previous
        for attr, value in list(vars(copy).items()):
            if isinstance(value, JITFunction) and value.fn.__module__ != name:
                setattr(copy, attr, _interpreted(value))
    return getattr(sys.modules[name], kernel.fn.__name__)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@contextlib.contextmanager
def _interpreter_patches() -> Iterator[None]:
    """Patch what Triton's interpreter gets wrong when it runs next to compiled Triton.

    * ``tl.dot`` on bf16: the interpreter stores bf16 as raw uint16 and multiplies those
      bit patterns (triton 3.6 through 3.9), so bf16 operands are widened to fp32 first;
      fp16 and fp32 already multiply correctly.
    * ``triton.language``'s own ``@jit`` functions (``tl.sort``, ``tl.cumsum``'s combine,
      ``tl.max``, ...) were built compiled, since ``triton.jit`` decides at import; for the
      run they are swapped for interpreted twins.
    * The interpreter patches the builtins of every ``triton.language`` module that a called
      ``@jit`` helper's globals name, and never undoes that for helpers (``tl.core``, seen
      from ``triton.language.standard``): a later real compile in the same process then
      built interpreter tensors. Every ``triton.language`` namespace is put back afterwards.
    """
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    builder_cls = type(interpreter.interpreter_builder)
    original_dot = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a = interpreter.TensorHandle(_widen(a, tl), tl.float32)
            b = interpreter.TensorHandle(_widen(b, tl), tl.float32)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    try:  # imported lazily by triton's argument specialisation; must see the real functions
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    namespaces = (tl, tl.standard, tl.core, tl.math, tl.core.tensor, tl.core.tensor_descriptor_base)
    saved = [(ns, dict(vars(ns))) for ns in namespaces]  # restored below, twins included
    for module in (tl, tl.standard, tl.core, tl.math):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                vars(module)[name] = _interpreted_twin(value)
    builder_cls.create_dot = create_dot
    try:
        yield
    finally:
        builder_cls.create_dot = original_dot
        for ns, before in saved:
            for name, value in before.items():
                if vars(ns).get(name) is not value:
                    setattr(ns, name, value)


@functools.cache
def _interpreted_twin(fn: Any) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn.fn)


def _widen(handle: Any, tl: Any) -> np.ndarray:
    if handle.dtype == tl.bfloat16:
        return _bf16_to_f32(handle.data)
    return handle.data.astype(np.float32)


_INTERPRETER_LOCK = threading.Lock()


def _run_interpreted(spec: KernelLaunch, arrays: Sequence[np.ndarray], poison: bool) -> list[np.ndarray]:
    from triton.runtime import interpreter

    class HostGridExecutor(interpreter.GridExecutor):
        # Our arguments already live in host memory: no torch-style copy in and out.
        def _init_args_hst(self, args_dev, kwargs):
            return list(args_dev), dict(kwargs)

        def _restore_args_dev(self, args_dev, args_hst, kwargs, kwargs_hst):
            return None

    sig = spec.signature()
    types = list(sig.values())
    inputs = [np.ascontiguousarray(a) for a in arrays]
    outs = [np.empty(o.shape, o.dtype) for o in spec.outs]
    for o in outs:
        if poison:
            o.fill(np.nan if np.issubdtype(o.dtype, np.floating) or o.dtype.name == "bfloat16" else -0x5A5A5A5A)
        else:
            o.fill(0)
    ptrs = [_HostPointer(a, types[i][1:]) for i, a in enumerate([*inputs, *outs])]
    fn = _interpreted(spec.kernel)
    grid = tuple(int(g) for g in spec.grid)
    with _INTERPRETER_LOCK, _interpreter_patches():
        HostGridExecutor(fn.rewrite(), fn.arg_names, grid)(*ptrs, **dict(spec.constexprs))
    return outs


def _launch_interpreted(spec: KernelLaunch, args: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    poison = _poison_on()

    def host(*arrays: np.ndarray) -> list[np.ndarray]:
        return _run_interpreted(spec, arrays, poison)

    outs = jax.pure_callback(host, list(spec.outs), *args, vmap_method="sequential")
    return tuple(outs)


# --------------------------------------------------------------------------- ahead of time

AOT_TARGETS: Mapping[str, tuple[str, int | str, int]] = {
    "sm_90": ("cuda", 90, 32),
    "gfx942": ("hip", "gfx942", 64),
    "gfx950": ("hip", "gfx950", 64),
}


def compile_aot(spec: KernelLaunch, target: str) -> Any:
    """Compile ``spec`` for ``target`` (a key of :data:`AOT_TARGETS`) without a GPU.

    Returns Triton's compiled kernel; its ``asm`` holds the ``cubin`` / ``hsaco`` and its
    ``metadata`` the shared memory and register use.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if target not in AOT_TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {sorted(AOT_TARGETS)}")
    options: dict[str, Any] = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if AOT_TARGETS[target][0] == "hip":
        options.update(dict(spec.amd_options))
    # Every buffer is 16-byte aligned, as jax-triton tells the compiler on a real launch;
    # without it loads are not vectorised and the K loop is not software-pipelined.
    pointers = len(spec.args) + len(spec.outs)
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(pointers)}
    src = ASTSource(fn=spec.kernel, signature=spec.signature(), constexprs=dict(spec.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget(*AOT_TARGETS[target]), options=options)
