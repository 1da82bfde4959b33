"""Bytes one device sends per MoE layer (forward), for each schedule; and the default choice.

Ring collectives, ``n`` devices in the expert group, ``T = ceil(M / (dp * n))`` tokens per
device, ``s`` bytes per element of the activations, ``k`` experts per token:

* ``allgather``: all-gather the tokens, ``(n-1) * T * D * s``; reduce-scatter the partial
  outputs, ``(n-1) * T * D * s``.
* ``all_to_all`` (dense transport, as implemented): the dispatch sends every other device
  its ``T``-row worst-case chunk, tokens plus ``k`` int32 ids and ``k`` fp32 weights,
  ``(n-1) * T * (D * s + 8k)`` (plus ``n`` int32 counts); the combine ``(n-1) * T * D * s``.
* ``all_to_all_ragged``: what a ragged transport (``jax.lax.ragged_all_to_all``, not run
  here) would send under uniform routing: a token goes to a given other device with
  probability ``p = 1 - C(E - E/n, k) / C(E, k)``, so ``T * p`` rows instead of ``T``.

With a tensor axis of ``tp`` devices the ``[T, D]`` output is all-reduced over it,
``2 (tp-1)/tp * T * D * s``, the same for both schedules. Receive volumes equal the send
volumes. Both schedules hold ``n * T`` rows of ``D`` per device for the group's tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

__all__ = ["CommCost", "communication_bytes", "choose_schedule", "SCHEDULES"]

SCHEDULES = ("all_to_all", "allgather")


@dataclasses.dataclass(frozen=True)
class CommCost:
    """Bytes one device sends in one layer's forward (the backward moves the same again)."""

    schedule: str
    dispatch: int  # bringing tokens to the experts' devices
    combine: int  # bringing the results back
    tensor: int  # the all-reduce over the tensor axis
    buffer_rows: int  # rows of D held per device for the expert group's tokens

    @property
    def total(self) -> int:
        return self.dispatch + self.combine + self.tensor


def _positive(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def communication_bytes(tokens: int, hidden: int, top_k: int, experts: int, *, ep: int, tp: int = 1, dp: int = 1,
                        dtype: Any = jnp.bfloat16) -> dict[str, CommCost]:
    """Per-device bytes of one layer for ``"allgather"``, ``"all_to_all"`` and
    ``"all_to_all_ragged"`` (the last a model only), see the module doc.

    Args:
      tokens: ``M``, tokens of the whole batch; hidden: ``D``; top_k: ``k``; experts: ``E``.
      ep, tp, dp: expert-, tensor- and data-parallel degrees (``ep`` must divide ``E``).
      dtype: the activations' dtype.
    """
    for name, v in (("tokens", tokens), ("hidden", hidden), ("top_k", top_k), ("experts", experts), ("ep", ep),
                    ("tp", tp), ("dp", dp)):
        _positive(name, v)
    if experts % ep:
        raise ValueError(f"ep={ep} must divide experts={experts}")
    if top_k > experts:
        raise ValueError(f"top_k={top_k} must be at most experts={experts}")
    s = jnp.dtype(dtype).itemsize
    t = -(-tokens // (dp * ep))
    n = ep
    row = hidden * s
    meta = 8 * top_k  # int32 id + fp32 weight per slot
    tensor = (2 * (tp - 1) * t * row) // tp
    e_loc = experts // n
    p = 1.0 - math.comb(experts - e_loc, top_k) / math.comb(experts, top_k) if n > 1 else 0.0
    ragged_rows = (n - 1) * t * p
    return {
        "allgather": CommCost("allgather", (n - 1) * t * row, (n - 1) * t * row, tensor, n * t),
        "all_to_all": CommCost("all_to_all", (n - 1) * (t * (row + meta) + 4), (n - 1) * t * row, tensor, n * t),
        "all_to_all_ragged": CommCost("all_to_all_ragged", round(ragged_rows * (row + meta)), round(ragged_rows * row),
                                      tensor, n * t),
    }


def choose_schedule(tokens: int, hidden: int, top_k: int, experts: int, *, ep: int, tp: int = 1, dp: int = 1,
                    dtype: Any = jnp.bfloat16) -> str:
    """The schedule ``moe_layer`` runs when ``schedule=None``: the one of :data:`SCHEDULES`
    sending fewer bytes by :func:`communication_bytes`, ``"allgather"`` on a tie.

    With the dense all_to_all transport the dispatch carries each row's ids and weights on
    top of the allgather's volume, so this is ``"allgather"`` at every size; a ragged
    transport (``all_to_all_ragged``) would win once ``p < 1`` outweighs its metadata,
    roughly for ``ep > top_k``.
    """
    costs = communication_bytes(tokens, hidden, top_k, experts, ep=ep, tp=tp, dp=dp, dtype=dtype)
    return min(SCHEDULES[::-1], key=lambda name: costs[name].total)
