"""Ahead-of-time compiles of a :class:`~jaxmoe.backends.launch.KernelLaunch` for a named
GPU target, on a machine without a GPU (CI proves every planned kernel compiles)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxmoe.backends.launch import KernelLaunch

__all__ = ["AOT_TARGETS", "compile_aot"]

AOT_TARGETS: Mapping[str, tuple[str, int | str, int]] = {
    "sm_90": ("cuda", 90, 32),
    "gfx942": ("hip", "gfx942", 64),
    "gfx950": ("hip", "gfx950", 64),
}


def compile_aot(spec: KernelLaunch, target: str) -> Any:
    """Compile ``spec`` for ``target`` (a key of :data:`AOT_TARGETS`).

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
    # Runtime scalars get no divisibility hint (jax-triton gives them none either).
    n_in, n_scalar = len(spec.args), len(spec.scalars)
    pointers = [*range(n_in), *range(n_in + n_scalar, n_in + n_scalar + len(spec.outs))]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    constexprs = dict(spec.constexprs)
    # a runtime scalar equal to 1 is a compile-time constant on a real launch
    constexprs.update({name: 1 for name, value in spec.scalars if int(value) == 1})
    signature = spec.signature()
    signature.update({name: "constexpr" for name, value in spec.scalars if int(value) == 1})
    src = ASTSource(fn=spec.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget(*AOT_TARGETS[target]), options=options)
