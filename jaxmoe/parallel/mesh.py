"""Which mesh axis carries what: experts, the intermediate dim, tokens; and placing arrays.

Checked before anything is traced, so a wrong axis name or an indivisible size fails with
a message naming it instead of deep inside ``shard_map``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["MeshAxes", "resolve_axes", "place"]


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """The mesh and the names of its expert, tensor and data axes (each None when unused).

    Tokens are sharded over ``data`` and ``expert`` together (the expert-parallel group
    also splits the batch, as in GShard), replicated over ``tensor``; experts are sharded
    over ``expert``; each expert's intermediate dim over ``tensor``. Mesh axes named by
    none of them replicate everything (the work is repeated there).
    """

    mesh: Mesh
    expert: str | None = None
    tensor: str | None = None
    data: str | None = None

    def size(self, name: str | None) -> int:
        return 1 if name is None else int(self.mesh.shape[name])

    @property
    def ep(self) -> int:
        """Expert-parallel degree (devices the experts are spread over)."""
        return self.size(self.expert)

    @property
    def tp(self) -> int:
        """Tensor-parallel degree (devices one expert's intermediate dim is spread over)."""
        return self.size(self.tensor)

    @property
    def dp(self) -> int:
        """Data-parallel degree (token shards outside the expert group)."""
        return self.size(self.data)

    @property
    def token_axes(self) -> tuple[str, ...]:
        """The mesh axes the token dim is sharded over, major first."""
        return tuple(a for a in (self.data, self.expert) if a is not None)

    @property
    def token_spec(self) -> P:
        """PartitionSpec of ``[M, D]`` tokens (and of the layer's output)."""
        axes = self.token_axes
        return P(axes if len(axes) > 1 else (axes[0] if axes else None), None)

    @property
    def w1_spec(self) -> P:
        """PartitionSpec of ``w1`` in the split layout ``[E, 2, I, D]`` (gate/up, then I)."""
        return P(self.expert, None, self.tensor, None)

    @property
    def w2_spec(self) -> P:
        """PartitionSpec of ``w2 [E, D, I]``."""
        return P(self.expert, None, self.tensor)


def resolve_axes(mesh: Any, expert_axis: Any = None, tensor_axis: Any = None, data_axis: Any = None) -> MeshAxes:
    """Check the mesh and the axis names; raises ``TypeError``/``ValueError`` naming the bad one."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh), got {type(mesh).__name__}")
    names = {"expert_axis": expert_axis, "tensor_axis": tensor_axis, "data_axis": data_axis}
    for arg, name in names.items():
        if name is None:
            continue
        if not isinstance(name, str):
            raise TypeError(f"{arg} must be a mesh axis name (str) or None, got {type(name).__name__} {name!r}")
        if name not in mesh.axis_names:
            raise ValueError(f"{arg}={name!r} is not an axis of the mesh; its axes are {tuple(mesh.axis_names)}")
    used = [n for n in names.values() if n is not None]
    if not used:
        raise ValueError("with a mesh, name at least one of expert_axis, tensor_axis, data_axis")
    if len(set(used)) != len(used):
        raise ValueError(f"expert_axis, tensor_axis and data_axis must be different axes, got {names}")
    manual = getattr(jax.sharding.AxisType, "Manual", None)
    for name in used:
        if manual is not None and dict(zip(mesh.axis_names, mesh.axis_types))[name] == manual:
            raise ValueError(f"mesh axis {name!r} is Manual (already inside shard_map); pass a mesh whose "
                             f"axes are Auto or Explicit")
    return MeshAxes(mesh, expert_axis, tensor_axis, data_axis)


def _explicit(mesh: Mesh) -> bool:
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return explicit is not None and any(t == explicit for t in mesh.axis_types)


def place(a: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
    """``a`` laid out as ``spec`` on ``mesh`` where shard_map needs it to be.

    On a mesh with Explicit axes shard_map requires its inputs' sharding types to match its
    ``in_specs``, so ``a`` is resharded (a no-op when the caller placed it so); on an Auto
    mesh shard_map reshards by itself.
    """
    if _explicit(mesh):
        return jax.sharding.reshard(a, NamedSharding(mesh, spec))
    return a
