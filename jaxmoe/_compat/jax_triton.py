"""jax-triton: the call-signature differences between 0.3.x and 0.4.x, and the patches of 0.3.x.

Written against jax-triton 0.3.1 and 0.4.1.

* 0.4 renamed ``out_shape=`` to ``out_type=`` and added ``backend_options=`` (the only way
  to pass AMD compiler knobs); both are detected from ``triton_call``'s signature.
* 0.3.x puts each kernel's PTX *and* its TTIR into the custom call's (compressed) opaque,
  and jaxlib looks the kernel up by hashing and comparing that whole opaque on every
  launch: measured on an H100, about 4 us per launch plus 0.23 us per KB of opaque. The
  TTIR is never read when the kernel runs, and the PTX's line-number debug info only
  serves profilers, so :func:`prepare` drops both (``JAXMOE_LINE_INFO=1`` keeps them, for
  a profiler's source view). Applied once per ``jax_triton.triton_lib`` module, and only
  where its internals have the shapes this was written against; anything else is left
  alone. 0.4.x builds another payload and is not touched.
* Triton gives a kernel that builds tensor descriptors on the device (TMA loads, sm_90)
  a per-program global scratch buffer, which its launcher allocates. jaxlib (0.11.1 on)
  allocates it for a ``TritonKernel`` built with ``global_scratch_size`` /
  ``global_scratch_align``; jax-triton 0.4 passes them, 0.3.x drops them (and reads the
  warp count from the caller, not from the compiled kernel). :func:`prepare` passes both
  from the compiled kernel's metadata on 0.3.x, and refuses a kernel that needs scratch
  when the installed jaxlib cannot allocate it, rather than launch it with none.
* Not patched: 0.3.x lowers to jaxlib's legacy custom call ``triton_kernel_call``. jaxlib
  also registers ``triton_kernel_call_ffi`` (an XLA FFI handler, command-buffer
  compatible; jax-triton 0.4 lowers to it). With 0.3.x's calls re-emitted for it (jaxlib
  0.11.2, an H100), a layer at M = 1 and 16 was no faster (Qwen3-30B-A3B M = 1: 52.2 us
  legacy, 57.8 us FFI), and a chain of layers whose GEMMs build tensor descriptors failed
  in XLA's command buffer ("Failed to create a child graph node ...
  CUDA_ERROR_NOT_SUPPORTED"): the per-launch scratch cannot be recorded there. Under
  jax-triton 0.4, set ``JAXMOE_TMA=0``.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["prepare", "patch_lib", "call_options", "slim_payload_applies", "PATCHED_VERSIONS"]

PATCHED_VERSIONS = ("0.3.",)  # version prefixes whose internals the patches rewrite

_LOCK = threading.Lock()
_DONE: set[int] = set()


def slim_payload_applies(jt: Any) -> bool:
    """Whether :func:`prepare` patches this jax-triton (a 0.3.x with the expected internals)."""
    if not str(getattr(jt, "__version__", "")).startswith(PATCHED_VERSIONS):
        return False
    import jax_triton.triton_lib as lib

    native = getattr(lib, "triton_kernel_call_lib", None)
    return (native is not None and hasattr(native, "TritonKernel")
            and callable(getattr(lib, "compile_ttir_inplace", None)))


def prepare(jt: Any) -> None:
    """Apply the 0.3.x patches where they apply (idempotent, thread-safe): the payload
    (unless ``JAXMOE_LINE_INFO=1``) and the global scratch / warp count of each kernel."""
    if not slim_payload_applies(jt):
        return
    import jax_triton.triton_lib as lib

    patch_lib(lib, slim=os.environ.get("JAXMOE_LINE_INFO") != "1")


# Per compiled binary (the PTX or HSACO path jax-triton hands to jaxlib), what its
# ``TritonKernel`` must be told beyond jax-triton 0.3.x's arguments: kept only for kernels
# that need it, and consumed when the kernel object is built.
_LAUNCH_FIXES: dict[str, dict[str, int]] = {}
_CAPTURE = threading.local()


def _fixes_of(metadata: Mapping[str, Any], num_warps: int | None) -> dict[str, int]:
    fixes: dict[str, int] = {}
    size = int(metadata.get("global_scratch_size") or 0)
    if size > 0:
        fixes["global_scratch_size"] = size
        fixes["global_scratch_align"] = int(metadata.get("global_scratch_align") or 1)
    total_warps = metadata.get("num_warps")
    if total_warps is not None and num_warps is not None and int(total_warps) != int(num_warps):
        fixes["num_warps"] = int(total_warps)  # warp-specialised: more warps than asked for
    return fixes


class _MetadataSpy:
    """A compiler backend that notes the metadata dict each compile fills (thread-local)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if name not in ("make_llir", "make_ptx", "make_amdgcn", "make_hsaco") or not callable(attr):
            return attr

        def spied(src: Any, metadata: Any, *args: Any, **kwargs: Any) -> Any:
            _CAPTURE.metadata = metadata
            return attr(src, metadata, *args, **kwargs)

        return spied


def patch_lib(lib: Any, *, slim: bool = True) -> None:
    """Patch jax-triton 0.3.x's ``triton_lib`` module ``lib`` (once per module object)."""
    with _LOCK:
        if id(lib) in _DONE:
            return
        _DONE.add(id(lib))
        native = lib.triton_kernel_call_lib
        compile_fn = lib.compile_ttir_inplace

        class _Native:
            def __getattr__(self, name: str) -> Any:
                return getattr(native, name)

            def TritonKernel(self, *args: Any) -> Any:  # noqa: N802  (jaxlib's name)
                # 0.3.x: (name, num_warps, num_ctas, shared_mem, binary, ttir, compute_capability)
                if len(args) != 7:
                    return native.TritonKernel(*args)
                with _LOCK:
                    fixes = dict(_LAUNCH_FIXES.pop(args[4], {})) if isinstance(args[4], str) else {}
                args = list(args)
                if slim and isinstance(args[5], str) and "tt.func" in args[5]:
                    args[5] = ""
                if "num_warps" in fixes:
                    args[1] = fixes.pop("num_warps")
                if not fixes:
                    return native.TritonKernel(*args)
                try:
                    return native.TritonKernel(*args, **fixes)
                except TypeError as e:
                    raise RuntimeError(
                        f"Triton kernel {args[0]} builds tensor descriptors on the device and needs "
                        f"{fixes['global_scratch_size']} bytes of global scratch per program, which this "
                        "jaxlib cannot allocate (jaxlib >= 0.11.1 can): set JAXMOE_TMA=0, or upgrade jax") from e

        @functools.wraps(compile_fn)
        def compile_patched(ttir: Any, backend: Any, *args: Any, **kwargs: Any) -> Any:
            import triton

            _CAPTURE.metadata = None
            knobs = getattr(getattr(triton, "knobs", None), "compilation", None)
            quiet = slim and knobs is not None and hasattr(knobs, "disable_line_info")
            if quiet:
                previous = knobs.disable_line_info
                knobs.disable_line_info = True
            try:
                result = compile_fn(ttir, _MetadataSpy(backend), *args, **kwargs)
            finally:
                if quiet:
                    knobs.disable_line_info = previous
            metadata = getattr(_CAPTURE, "metadata", None)
            options = args[0] if args else kwargs.get("options")
            fixes = _fixes_of(metadata or {}, getattr(options, "num_warps", None))
            if fixes and isinstance(getattr(result, "binary", None), str):
                with _LOCK:
                    _LAUNCH_FIXES[result.binary] = fixes
            return result

        lib.triton_kernel_call_lib = _Native()
        lib.compile_ttir_inplace = compile_patched


@functools.cache
def _call_parameters(triton_call: Any) -> frozenset[str]:
    return frozenset(inspect.signature(triton_call).parameters)


def call_options(jt: Any, outs: Sequence[Any], amd_options: Mapping[str, Any]) -> dict[str, Any]:
    """The version-dependent keyword arguments of ``triton_call`` for these outputs."""
    params = _call_parameters(jt.triton_call)
    kwargs: dict[str, Any] = {("out_type" if "out_type" in params else "out_shape"): list(outs)}
    if amd_options and "backend_options" in params:
        kwargs["backend_options"] = dict(amd_options)
    return kwargs
