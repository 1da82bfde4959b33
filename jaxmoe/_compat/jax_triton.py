"""jax-triton: the call-signature differences between 0.3.x and 0.4.x, and one patch of 0.3.x.

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
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["prepare", "call_options", "slim_payload_applies", "PATCHED_VERSIONS"]

PATCHED_VERSIONS = ("0.3.",)  # version prefixes whose payload the patch slims

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
    """Apply the payload patch where it applies (idempotent, thread-safe)."""
    if os.environ.get("JAXMOE_LINE_INFO") == "1" or not slim_payload_applies(jt):
        return
    import jax_triton.triton_lib as lib

    with _LOCK:
        if id(lib) in _DONE:
            return
        _DONE.add(id(lib))
        native = lib.triton_kernel_call_lib
        compile_fn = lib.compile_ttir_inplace

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
