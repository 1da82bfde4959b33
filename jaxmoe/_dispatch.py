"""How a public op picks between the Triton kernels and the jax.numpy reference."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from jaxmoe import _launch, _validate


def kernel_for(module: str, name: str, implementation: str | None) -> Callable[..., Any] | None:
    """The Triton entry point ``jaxmoe.<module>.<name>`` to call, or None for the reference.

    ``implementation=None`` picks the kernels where :func:`jaxmoe._launch.resolve_implementation`
    says so and quietly falls back to the reference while a kernel does not exist yet;
    ``"triton"`` insists on the kernel and raises NotImplementedError when it is missing.
    """
    _validate.check_implementation(implementation)
    if _launch.resolve_implementation(implementation) == "reference":
        return None
    try:
        mod = importlib.import_module(f"jaxmoe.{module}")
    except ModuleNotFoundError as err:
        if err.name != f"jaxmoe.{module}":
            raise  # a real import error inside the kernel module: surface it
        fn = None
    else:
        fn = getattr(mod, name, None)
    if fn is None and implementation is not None:
        raise NotImplementedError(
            f"implementation='triton': the Triton kernel jaxmoe.{module}.{name} is not available yet; "
            "use implementation='reference' (or None to pick the best available)"
        )
    return fn


def triton_ready(module: str, name: str) -> bool:
    """Whether ``jaxmoe.<module>.<name>`` exists (and Triton imports) in this installation."""
    if not _launch.triton_available():
        return False
    try:
        mod = importlib.import_module(f"jaxmoe.{module}")
    except ModuleNotFoundError as err:
        if err.name != f"jaxmoe.{module}":
            raise
        return False
    return getattr(mod, name, None) is not None
