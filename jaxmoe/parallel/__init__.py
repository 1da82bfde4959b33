"""Expert, tensor and data parallelism of the MoE layer on a ``jax.sharding.Mesh``.

    jaxmoe.moe_layer(params, x, top_k=, mesh=, expert_axis=, tensor_axis=, data_axis=, schedule=)
    jaxmoe.parallel.shard_params(params, mesh, expert_axis=, tensor_axis=)   -> placed params
    jaxmoe.parallel.communication_bytes(tokens, hidden, top_k, experts, ep=, tp=, dp=, dtype=)
    jaxmoe.parallel.choose_schedule(...)                                     -> "allgather" | "all_to_all"
    jaxmoe.parallel.plan_dispatch / dispatch / combine                       (inside shard_map)

See ``docs/parallel.md``.
"""

from jaxmoe.parallel.comm import SCHEDULES, CommCost, choose_schedule, communication_bytes
from jaxmoe.parallel.dispatch import DispatchPlan, combine, dispatch, plan_dispatch
from jaxmoe.parallel.layer import check_sharded_layer_args, shard_params, sharded_moe_layer
from jaxmoe.parallel.mesh import MeshAxes, place, resolve_axes

__all__ = ["SCHEDULES", "CommCost", "choose_schedule", "communication_bytes", "DispatchPlan", "combine", "dispatch",
           "plan_dispatch", "check_sharded_layer_args", "shard_params", "sharded_moe_layer", "MeshAxes", "place",
           "resolve_axes"]
