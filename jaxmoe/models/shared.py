"""Shared experts stacked after the routed ones, so a layer takes them in its routed launches.

``params["shared"] = {"w1": [S, 2Is, D], "w2": [S, D, Is]}`` is a dense MLP beside the routed
experts. :func:`stack_shared_experts` appends its experts to ``w1``/``w2`` instead, split
into experts of the routed width ``I`` (an MLP of width ``n * I`` is exactly the sum of its
``n`` slices of width ``I``: gate and up rows ``c*I .. (c+1)*I``, the same columns of
down), and returns how many experts that made: ``moe_layer(params, x,
shared_experts=S', ...)`` then gives every token those experts as ``S'`` more slots, with
weight 1 (or ``sigmoid(x @ shared_gate)``). :func:`unstack_shared_experts` undoes it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.types import QuantizedWeights

__all__ = ["stack_shared_experts", "unstack_shared_experts", "split_to_width"]


def stack_shared_experts(params: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """``(params', S')``: ``params["shared"]`` appended to ``w1 [E, 2I, D]`` / ``w2 [E, D, I]``.

    Args:
      params: a :func:`jaxmoe.moe_layer` params dict in the ``"out_in"`` layout with plain
        (unquantized) ``w1``/``w2`` and ``params["shared"]`` ``{"w1": [S, 2Is, D],
        "w2": [S, D, Is]}`` in their dtype, ``Is`` a multiple of ``I``.

    Returns a new dict (the inputs are not changed) with ``w1 [E + S', 2I, D]``,
    ``w2 [E + S', D, I]``, ``S' = S * Is / I``, no ``"shared"`` key, expert biases (if any)
    extended with zero rows for the shared experts, and every other key as it was
    (``shared_gate`` included); and ``S'``, for ``moe_layer(..., shared_experts=S')``.
    Params without ``"shared"`` come back as they are, with 0. This makes one copy of the
    weights (do it once, at load time).
    """
    shared = params.get("shared")
    if shared is None:
        return params, 0
    w1, w2 = params["w1"], params["w2"]
    if any(isinstance(w, QuantizedWeights) for w in (w1, w2)):
        raise ValueError("stack_shared_experts takes plain w1/w2 arrays; quantized routed experts keep their shared "
                         "experts in params['shared'] (beside the routed launches)")
    sw1, sw2 = jnp.asarray(shared["w1"]), jnp.asarray(shared["w2"])
    e, two_i, d = w1.shape
    i = two_i // 2
    s, two_is, sd = sw1.shape
    i_s = two_is // 2
    if sd != d or sw2.shape != (s, d, i_s):
        raise ValueError(f"params['shared'] must be w1 [S, 2Is, D={d}] and w2 [S, D, Is], got {list(sw1.shape)} "
                         f"and {list(sw2.shape)}")
    if sw1.dtype != w1.dtype or sw2.dtype != w2.dtype:
        raise TypeError(f"params['shared'] must have w1's dtype ({w1.dtype}), got {sw1.dtype} / {sw2.dtype}")
    if i_s % i:
        raise ValueError(f"the shared experts' width Is={i_s} is not a multiple of the routed experts' I={i}: "
                         "they cannot be split into routed-width experts; keep params['shared']")
    gate_up, down = split_to_width(sw1, sw2, i)
    n = gate_up.shape[0] // s
    out = {key: v for key, v in params.items() if key != "shared"}
    out["w1"] = jnp.concatenate([w1, gate_up])
    out["w2"] = jnp.concatenate([w2, down])
    for name, width in (("b1", two_i), ("b2", d)):
        if params.get(name) is not None:
            b = params[name]
            out[name] = jnp.concatenate([b, jnp.zeros((s * n, width), b.dtype)])
    return out, s * n


def split_to_width(w1: Any, w2: Any, i: int) -> tuple[Any, Any]:
    """Shared experts ``w1 [S, 2Is, D]``, ``w2 [S, D, Is]`` (numpy or jax arrays) as ``S * Is / I``
    experts of width ``i``: ``[S', 2I, D]``, ``[S', D, I]`` (slice c: gate and up rows
    ``c*I .. (c+1)*I`` and those columns of down). ``Is`` must be a multiple of ``i``."""
    s, two_is, d = w1.shape
    n = two_is // 2 // i
    if n * i * 2 != two_is:
        raise ValueError(f"the shared width {two_is // 2} is not a multiple of {i}")
    # [S, 2, n, I, D] -> [S, n, 2, I, D] -> [S * n, 2I, D]
    gate_up = w1.reshape(s, 2, n, i, d).transpose(0, 2, 1, 3, 4).reshape(s * n, 2 * i, d)
    down = w2.reshape(s, d, n, i).transpose(0, 2, 1, 3).reshape(s * n, d, i)
    return gate_up, down


def unstack_shared_experts(params: dict[str, Any], shared_experts: int) -> dict[str, Any]:
    """The inverse of :func:`stack_shared_experts`, up to the split: the last
    ``shared_experts`` experts of ``w1``/``w2`` become ``params["shared"]`` (``S'`` experts of
    width ``I``, whose summed output is the original shared MLP's), for the calls that take
    only that form (``moe_layer(mesh=...)``). Expert biases lose their shared rows, which
    must be zero (``params["shared"]`` has no biases)."""
    if not shared_experts:
        return params
    w1, w2 = params["w1"], params["w2"]
    if any(isinstance(w, QuantizedWeights) for w in (w1, w2)):
        raise ValueError("unstack_shared_experts takes plain w1/w2 arrays")
    e = w1.shape[0] - int(shared_experts)
    if e < 1:
        raise ValueError(f"shared_experts={shared_experts} leaves no routed expert of w1's {w1.shape[0]}")
    out = {key: v for key, v in params.items()}
    out["w1"], out["w2"] = w1[:e], w2[:e]
    out["shared"] = {"w1": w1[e:], "w2": w2[e:]}
    for name in ("b1", "b2"):
        if params.get(name) is not None:
            b = params[name]
            try:
                nonzero = bool(jnp.any(b[e:] != 0))
            except jax.errors.ConcretizationTypeError:  # traced: cannot be checked here
                nonzero = False
            if nonzero:
                raise ValueError(f"params['{name}'] has nonzero rows for the shared experts; params['shared'] "
                                 "takes no biases")
            out[name] = b[:e]
    return out
