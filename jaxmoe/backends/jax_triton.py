"""GPU launches through ``jax_triton.triton_call`` (jax-triton 0.3.1 and 0.4.x).

jax-triton is imported lazily: 0.3.1 raises ImportError on a CPU-only jaxlib. What differs
between its versions, and the one patch of its internals, live in
:mod:`jaxmoe._compat.jax_triton`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxmoe._compat import jax_triton as compat
from jaxmoe.backends.launch import KernelLaunch

__all__ = ["launch"]


def launch(spec: KernelLaunch, args: Sequence[jax.Array], poison: bool) -> tuple[jax.Array, ...]:
    """The outputs of ``spec`` run as a jax-triton custom call on ``args``."""
    import jax_triton as jt

    compat.prepare(jt)
    kwargs = dict(spec.constexprs)
    kwargs.update(compat.call_options(jt, spec.outs, dict(spec.amd_options)))
    if poison:
        kwargs["zeroed_outputs"] = tuple(range(len(spec.outs)))
    outs = jt.triton_call(
        *args,
        *(int(v) for _, v in spec.scalars),
        kernel=spec.kernel,
        grid=tuple(int(g) for g in spec.grid),
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        **kwargs,
    )
    return tuple(outs)
