"""The op model: one object per op holds its checks, its reference and its implementations.

An :class:`Op` is called like the function it stands for, plus ``implementation=``:

* ``None``: the best available for the device jax places the computation on
  (``jax.default_device`` if set, else the default backend's): the kernels on a CUDA or
  ROCm GPU when they serve the arguments, the reference elsewhere (so
  ``with jax.default_device(cpu):`` runs the reference on a GPU machine).
* a name (``"triton"``, ``"reference"``): that implementation, or an error saying why it
  cannot serve these arguments here (``"triton"`` on a CPU runs Triton's interpreter).
* a sequence of names: the first that can serve these arguments.

Every implementation takes exactly the op's arguments and returns the same types (the
reference is the contract). Arguments are checked once, before anything is traced, by
the op's ``check``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxmoe.backends import platform as _platform

__all__ = ["Implementation", "Op", "REFERENCE", "check_implementation"]


def _serves_all(*args: Any, **kwargs: Any) -> str | None:
    return None


def _always_available() -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute an op.

    ``fn`` takes the op's arguments. ``available()`` returns None where it can run in this
    process, else the reason; ``supports(*args, **kwargs)`` returns None when it serves
    these (checked) arguments, else the reason. ``default_on`` lists the platforms where
    ``implementation=None`` prefers it.
    """

    name: str
    fn: Callable[..., Any]
    available: Callable[[], str | None] = _always_available
    supports: Callable[..., str | None] = _serves_all
    default_on: tuple[str, ...] = ()


def _triton_available() -> str | None:
    return None if _platform.triton_available() else "needs the triton package (Linux only)"


def triton_implementation(fn: Callable[..., Any], supports: Callable[..., str | None] = _serves_all
                          ) -> Implementation:
    """The Triton kernels of an op: the default on CUDA and ROCm GPUs."""
    return Implementation("triton", fn, _triton_available, supports, _platform.GPU_PLATFORMS)


REFERENCE = "reference"


def check_implementation(implementation: Any, known: Sequence[str] = ("triton", REFERENCE)) -> None:
    """Raise unless ``implementation`` is None, a known name or a non-empty sequence of them."""
    if implementation is None:
        return
    names = (implementation,) if isinstance(implementation, str) else implementation
    try:
        names = tuple(names)
    except TypeError:
        names = (implementation,)
    if not names or any(n not in known for n in names):
        raise ValueError(f"implementation must be None, one of {tuple(known)} or a sequence of them, "
                         f"got {implementation!r}")


class Op:
    """An op: ``check``, ``reference`` and ``implementations`` (the reference included).

    Args:
      name: the public name, for messages.
      check: raises ``ValueError``/``TypeError`` naming the bad argument; called first.
      reference: the ``jax.numpy`` reference, the default forward and the contract.
      implementations: the other implementations, in order of preference.
      vjp: reserved for the op's backward (a ``(fwd, bwd)`` pair), defined beside it.
    """

    def __init__(self, name: str, *, check: Callable[..., Any], reference: Callable[..., Any],
                 implementations: Sequence[Implementation] = (), vjp: Any = None) -> None:
        self.name = name
        self.check = check
        self.reference = reference
        impls = {impl.name: impl for impl in implementations}
        impls[REFERENCE] = Implementation(REFERENCE, reference)
        self.implementations: Mapping[str, Implementation] = types.MappingProxyType(impls)
        self.vjp = vjp

    def __repr__(self) -> str:
        return f"Op({self.name!r}, implementations={list(self.implementations)})"

    def _unavailable(self, impl: Implementation, args: tuple, kwargs: dict) -> str | None:
        return impl.available() or impl.supports(*args, **kwargs)

    def resolve(self, implementation: Any, *args: Any, **kwargs: Any) -> list[Implementation]:
        """``[the implementation]`` a call with these arguments runs; raises when none can serve."""
        check_implementation(implementation, tuple(self.implementations))
        if implementation is None:
            plat = _platform.default_platform()
            kernels = [impl for impl in self.implementations.values()
                       if plat in impl.default_on and not self._unavailable(impl, args, kwargs)]
            return kernels[:1] or [self.implementations[REFERENCE]]
        names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
        reasons = []
        for name in names:
            impl = self.implementations[name]
            reason = self._unavailable(impl, args, kwargs)
            if reason is None:
                return [impl]
            reasons.append(f"{name}: {reason}")
        hint = "" if REFERENCE in names else f"; implementation=({names[0]!r}, 'reference') falls back"
        raise NotImplementedError(f"{self.name}: no implementation of {list(names)} serves these arguments "
                                  f"({'; '.join(reasons)}){hint}")

    def __call__(self, *args: Any, implementation: Any = None, **kwargs: Any) -> Any:
        check_implementation(implementation, tuple(self.implementations))
        self.check(*args, **kwargs)
        (chosen,) = self.resolve(implementation, *args, **kwargs)
        return chosen.fn(*args, **kwargs)
