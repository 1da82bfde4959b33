"""Token dispatch to the devices owning the experts, and the combine back (inside shard_map).

Each device holds ``T`` tokens and ``n`` is the expert-parallel degree; device ``d`` owns
the experts ``[d * E_loc, (d + 1) * E_loc)``. A token is sent once to every device that
owns at least one of its ``k`` experts, carrying all ``k`` ids: those of the receiving
device as local ids (``global id - d * E_loc``), the others as ``-1``, which the local
fused MoE skips (an id outside ``[0, E_loc)`` contributes nothing).

``jax.lax.ragged_all_to_all`` would move only the rows sent, but XLA:CPU does not implement
it ("HLO opcode ragged-all-to-all is not supported by XLA:CPU"), so the transport here is
a dense ``jax.lax.all_to_all`` of a worst-case buffer: ``T`` rows per destination (a token
goes at most once to each device), so no token can ever be dropped. Rows bound for ``d``
are compacted at the front of ``d``'s chunk and the per-destination counts travel with
them: the layout a ragged transport needs. Memory per device: the send and receive
buffers (and the results' pair) of ``[n * T, D]`` each, the size of the whole
expert-parallel group's tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["DispatchPlan", "plan_dispatch", "dispatch", "combine"]


class DispatchPlan(NamedTuple):
    """Where each (token, destination) pair sits in the send buffer.

    ``position [T, n] int32``: the send-buffer row of token ``t`` bound for device ``d``,
    ``n * T`` where ``t`` has no expert on ``d``. ``source [n * T] int32``: the pair
    ``t * n + d`` a send row holds, ``T * n`` for an empty row. ``send_counts [n] int32``:
    rows bound for each device. ``local_ids [T, n, k] int32``: token ``t``'s ids as seen
    by device ``d`` (``-1`` where the expert is another device's).
    """

    position: jax.Array
    source: jax.Array
    send_counts: jax.Array
    local_ids: jax.Array


def plan_dispatch(topk_ids: jax.Array, experts_per_device: int, num_devices: int) -> DispatchPlan:
    """The send layout of ``topk_ids [T, k]`` (global ids, int32) over ``num_devices`` devices."""
    t, k = topk_ids.shape
    n = num_devices
    ids = topk_ids.astype(jnp.int32)
    valid = (ids >= 0) & (ids < n * experts_per_device)
    dest = jnp.where(valid, ids // experts_per_device, n)  # [T, k]; n: nowhere
    devices = jnp.arange(n, dtype=jnp.int32)
    on_device = dest[:, None, :] == devices[None, :, None]  # [T, n, k]
    hit = on_device.any(axis=-1)  # [T, n]
    # Compacted rows: a token's rank among those bound for the same device.
    rank = jnp.cumsum(hit.astype(jnp.int32), axis=0) - 1
    position = jnp.where(hit, devices[None, :] * t + rank, n * t).astype(jnp.int32)
    pairs = jnp.arange(t * n, dtype=jnp.int32)
    source = jnp.full((n * t,), t * n, jnp.int32).at[position.reshape(-1)].set(pairs, mode="drop")
    local_ids = jnp.where(on_device, ids[:, None, :] - devices[None, :, None] * experts_per_device, -1)
    return DispatchPlan(position, source, hit.sum(axis=0, dtype=jnp.int32), local_ids.astype(jnp.int32))


def _all_to_all(a: jax.Array, axis_name: str | None) -> jax.Array:
    # Chunk d of dim 0 goes to device d; the chunks received are stacked in source order.
    return a if axis_name is None else jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)


def dispatch(plan: DispatchPlan, x: jax.Array, topk_weights: jax.Array, axis_name: str | None
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Send the tokens ``x [T, D]`` to the devices of their experts.

    Returns ``(x [n*T, D] in x's dtype, topk_weights [n*T, k] float32, local ids [n*T, k]
    int32, recv_counts [n] int32)`` as received: chunk ``s`` (rows ``[s*T, (s+1)*T)``) came
    from device ``s``, its first ``recv_counts[s]`` rows are tokens, the rest are zeros
    with ids ``-1``.
    """
    t, k = topk_weights.shape
    n = plan.position.shape[1]
    token = plan.source // n  # T for an empty row: the zero row appended below
    x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    w_pad = jnp.concatenate([topk_weights.astype(jnp.float32), jnp.zeros((1, k), jnp.float32)])
    ids_pad = jnp.concatenate([plan.local_ids.reshape(t * n, k), jnp.full((1, k), -1, jnp.int32)])
    x_send, w_send, ids_send = x_pad[token], w_pad[token], ids_pad[plan.source]
    counts = plan.send_counts.reshape(n, 1)
    return (_all_to_all(x_send, axis_name), _all_to_all(w_send, axis_name), _all_to_all(ids_send, axis_name),
            _all_to_all(counts, axis_name).reshape(n))


def combine(plan: DispatchPlan, y: jax.Array, axis_name: str | None) -> jax.Array:
    """Send the experts' results ``y [n*T, D]`` (rows as :func:`dispatch` received them)
    back and sum each token's results over its destinations (fp32, rounded to y's dtype).
    Returns ``[T, D]``."""
    t, n = plan.position.shape
    back = _all_to_all(y, axis_name)  # [n*T, D] in the send layout
    back = jnp.concatenate([back, jnp.zeros((1, y.shape[1]), y.dtype)])
    per_dest = back[plan.position].astype(jnp.float32)  # [T, n, D]; zeros where not sent
    return per_dest.sum(axis=1).astype(y.dtype)
