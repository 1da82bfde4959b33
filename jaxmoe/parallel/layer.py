"""The MoE layer on a device mesh: experts over one axis, the intermediate dim over another,
tokens over the expert axis and a data axis.

Per device, with ``n`` expert-parallel devices, ``E_loc = E / n`` local experts and
``T`` local tokens::

    allgather:   x [T, D] -all_gather-> [n*T, D] -> router, route (all E experts)
                 -> fused MoE on the local experts (ids of other devices are out of range)
                 -psum_scatter-> [T, D] -psum over tensor-> y
    all_to_all:  x [T, D] -> router, route -> dispatch (all_to_all, T rows per destination)
                 -> fused MoE on the local experts -> combine (all_to_all) -> sum over
                 destinations [T, D] -psum over tensor-> y

The router is replicated, so every token is routed over all ``E`` experts exactly as on
one device. With a tensor axis of ``tp`` devices each device holds, of every local expert,
``I / tp`` gate rows and the matching ``I / tp`` up rows of ``w1`` (and those columns of
``w2``): its partial output is a sum over its slice of the intermediate dim.

Quantized ``w1``/``w2`` (:class:`~jaxmoe.QuantizedWeights`) are sharded array by array
(values, scales, zero points) as the weights they stand for: over the expert axis on the
leading ``E``; over a tensor axis, ``w1``'s values and its per-row scales in the split view
(``[E, 2, I, K]``, scales ``[E, 2, I / group_n, ...]``; a per-expert scale repeated for the
two halves, ``[E, 2]``) on the ``I`` part, ``w2``'s values and its K-group scales on ``I``,
its per-row scales (one per output channel ``D``) replicated. The tensor axis needs whole
scale groups per device (``I / tp`` a multiple of each group along ``I``, and even for the
4-bit schemes). ``act_quant`` rounds ``x`` from its whole row, as on one device, and ``h``
per token from the device's ``I / tp`` slice of it (per 128 channels for ``fp8_block``:
the same groups as on one device where ``I / tp`` is a multiple of 128).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmoe.ops import checks
from jaxmoe.ops.base import check_implementation
from jaxmoe.ops.moe import fused_moe
from jaxmoe.ops.routing import route
from jaxmoe.parallel import comm
from jaxmoe.parallel.dispatch import combine, dispatch, plan_dispatch
from jaxmoe.parallel.mesh import MeshAxes, place, resolve_axes
from jaxmoe.types import WEIGHT_SCHEMES, QuantizedWeights

__all__ = ["sharded_moe_layer", "shard_params", "check_sharded_layer_args"]


def _quantized(w: Any) -> bool:
    return isinstance(w, QuantizedWeights) and w.scheme != "none"


def _has_n_scales(scheme: str) -> bool:
    return "N" in WEIGHT_SCHEMES[scheme].scale_axes


def _q_split_w1(w1: QuantizedWeights) -> QuantizedWeights:
    """Quantized ``w1 [E, 2I, K]`` in the split view ``[E, 2, I, K]``: the values, and the
    scales and zero points along ``N`` (``[E, 2, I / group_n, ...]``; a per-expert scale
    repeated for the two halves, ``[E, 2]``). A QuantizedWeights with ``E`` as a leading
    axis, so it validates as one."""
    if jnp.ndim(w1.values) == 4:
        return w1
    e, two_i = w1.values.shape[:2]

    def split(a):
        if a is None:
            return None
        if _has_n_scales(w1.scheme):
            return a.reshape(e, 2, a.shape[1] // 2, *a.shape[2:])
        return jnp.broadcast_to(a[:, None], (e, 2))

    return QuantizedWeights(values=w1.values.reshape(e, 2, two_i // 2, w1.values.shape[-1]),
                            scales=split(w1.scales), scheme=w1.scheme, zero_points=split(w1.zero_points))


def _q_merge_w1(w1: QuantizedWeights) -> QuantizedWeights:
    """The split view of :func:`_q_split_w1` back as ``[E, 2I, K]`` (a device's local part:
    its gate rows, then its up rows)."""
    if jnp.ndim(w1.values) == 3:
        return w1
    e = w1.values.shape[0]

    def merge(a):
        if a is None:
            return None
        return a.reshape(e, -1, *a.shape[3:]) if _has_n_scales(w1.scheme) else a[:, 0]

    return QuantizedWeights(values=w1.values.reshape(e, -1, w1.values.shape[-1]), scales=merge(w1.scales),
                            scheme=w1.scheme, zero_points=merge(w1.zero_points))


def _q_specs(w: QuantizedWeights, axes: MeshAxes, which: str) -> QuantizedWeights:
    """PartitionSpecs of quantized ``w1`` (its split view) or ``w2``, array by array."""
    ex, tp = axes.expert, axes.tensor
    spec = WEIGHT_SCHEMES[w.scheme]
    if which == "w1" and jnp.ndim(w.values) == 3:  # not split: no tensor axis
        return jax.tree.map(lambda _: P(ex), w)
    if which == "w1":
        values = P(ex, None, tp, None)
        scales = P(ex, None, tp, *[None] * (len(spec.scale_axes) - 2)) if _has_n_scales(w.scheme) else P(ex, None)
    else:
        values = P(ex, None, tp)
        scales = P(ex, None, tp) if "K" in spec.scale_axes else P(ex, *[None] * (len(spec.scale_axes) - 1))
    return QuantizedWeights(values=values, scales=scales if w.scales is not None else None, scheme=w.scheme,
                            zero_points=scales if w.zero_points is not None else None)


def _check_quantized_tensor_split(w1: QuantizedWeights, w2: QuantizedWeights, i: int, axes: MeshAxes) -> None:
    """Each tensor-parallel device must get whole scale groups (and whole bytes) of ``I``."""
    if axes.tp == 1:
        return
    for name, w, group in (("w1", w1, WEIGHT_SCHEMES[w1.scheme].group_n if _has_n_scales(w1.scheme) else None),
                           ("w2", w2, WEIGHT_SCHEMES[w2.scheme].group_k
                            if "K" in WEIGHT_SCHEMES[w2.scheme].scale_axes else None)):
        packed = name == "w2" and WEIGHT_SCHEMES[w.scheme].packed  # w2's 4-bit values pack two of I a byte
        need = max(group or 1, 2 if packed else 1)
        if (i // axes.tp) % need:
            raise ValueError(f"{name} ({w.scheme}) over tensor_axis={axes.tensor!r} of {axes.tp} devices needs "
                             f"I / tp = {i // axes.tp} to be a multiple of {need} (whole scale groups"
                             f"{' and bytes' if packed else ''} per device)")


def _split_w1(w1: Any, tensor: bool = True) -> Any:
    """``w1`` in the split layout ``[E, 2, I, D]`` (gate rows, up rows), a view of ``[E, 2I, D]``
    (quantized: :func:`_q_split_w1`, only for a ``tensor`` axis of more than one device:
    without one, quantized ``w1`` keeps ``[E, 2I, K]``, whatever its scale groups)."""
    if _quantized(w1):
        return _q_split_w1(w1) if tensor else w1
    if isinstance(w1, QuantizedWeights):  # scheme "none": the stored array
        w1 = w1.values
    if w1.ndim == 4:
        return w1
    e, two_i, d = w1.shape
    return w1.reshape(e, 2, two_i // 2, d)


def check_sharded_layer_args(params: Any, x: Any, top_k: Any, axes: MeshAxes, schedule: Any, *, activation: str,
                             act_quant: Any = None, **routing: Any) -> tuple[int, int, int]:
    """Check everything before tracing; returns ``(D, E, I)``.

    ``params['w1']`` may be ``[E, 2I, D]`` or its split view ``[E, 2, I, D]``.
    """
    if not isinstance(params, dict) or not {"router", "w1", "w2"} <= set(params):
        raise TypeError("params must be a dict with keys 'router', 'w1', 'w2' (see jaxmoe.init_moe_params)")
    w1 = params["w1"]
    shape = tuple(getattr(w1, "shape", ()))
    if _quantized(w1) and len(shape) == 4:  # the split view [E, 2, I, D]
        if shape[1] != 2:
            raise ValueError(f"params['w1'] must be [E, 2I, D] or its split view [E, 2, I, D], got {list(shape)}")
        flat = {**params, "w1": _q_merge_w1(w1)}
    elif len(shape) == 4 and not isinstance(w1, QuantizedWeights):
        if shape[1] != 2:
            raise ValueError(f"params['w1'] must be [E, 2I, D] or its split view [E, 2, I, D], got {list(shape)}")
        flat = {**params, "w1": jax.ShapeDtypeStruct((shape[0], 2 * shape[2], shape[3]), w1.dtype)}
    else:
        flat = params
    d, e, i = checks.check_layer_args(flat, x, top_k)
    w2s = tuple(getattr(params["w2"], "shape", ()))
    if w2s != (e, d, i):
        raise ValueError(f"params['w2'] must be [E, D, I] = {[e, d, i]}, got {list(w2s)}")
    if _quantized(w1) or _quantized(params["w2"]):
        if not (_quantized(w1) and _quantized(params["w2"])):
            raise TypeError("on a mesh, w1 and w2 must both be quantized or neither")
        _check_quantized_tensor_split(flat["w1"], params["w2"], w2s[2], axes)
    elif jnp.dtype(params["w2"].dtype) != jnp.dtype(w1.dtype):
        raise TypeError(f"params['w2'] must have the dtype of params['w1'] ({w1.dtype}), got {params['w2'].dtype}")
    checks.check_act_quant(act_quant, flat["w1"], params["w2"], jnp.asarray(x).dtype,
                           ("params['w1']", "params['w2']"))
    checks.check_route_args(jax.ShapeDtypeStruct((1, e), jnp.float32), top_k, **routing)
    checks.check_activation(activation)
    if e % axes.ep:
        raise ValueError(f"the {e} experts cannot be split evenly over expert_axis={axes.expert!r} "
                         f"of {axes.ep} devices")
    if i % axes.tp:
        raise ValueError(f"the intermediate size I={i} cannot be split evenly over tensor_axis={axes.tensor!r} "
                         f"of {axes.tp} devices")
    if schedule is not None and schedule not in comm.SCHEDULES:
        raise ValueError(f"schedule must be None or one of {comm.SCHEDULES}, got {schedule!r}")
    return d, e, i


def shard_params(params: dict[str, Any], mesh: Any, *, expert_axis: str | None = None,
                 tensor_axis: str | None = None) -> dict[str, jax.Array]:
    """``params`` placed for :func:`jaxmoe.moe_layer` on ``mesh``.

    Returns ``{"router": [D, E] replicated, "w1": [E, 2, I, D] sharded
    P(expert_axis, None, tensor_axis, None), "w2": [E, D, I] sharded P(expert_axis, None,
    tensor_axis)}``, dtypes kept, plus what else ``params`` holds: ``b1 [E, 2I]`` and
    ``b2 [E, D]`` sharded P(expert_axis), everything else (``router_bias``, shared experts,
    ``shared_gate``) replicated. ``w1`` comes in its split view (``w1.reshape(E, 2, I, D)``)
    because no sharding of ``[E, 2I, D]`` gives each tensor-parallel device its gate rows
    and its up rows together; ``moe_layer`` takes either form. Quantized ``w1``/``w2``
    stay :class:`~jaxmoe.QuantizedWeights`, ``w1`` in its split view too, each array
    sharded as the module docstring says.
    """
    axes = resolve_axes(mesh, expert_axis, tensor_axis, None) if (expert_axis or tensor_axis) else None
    if axes is None:
        axes = MeshAxes(mesh)
    quantized = _quantized(params["w1"]) or _quantized(params["w2"])
    if quantized:
        flat = _q_merge_w1(params["w1"])
        e, i = flat.shape[0], flat.shape[1] // 2
        _check_quantized_tensor_split(flat, params["w2"], i, axes)
        w1 = _split_w1(flat, axes.tp > 1)
    else:
        w1 = _split_w1(params["w1"])
        e, i = w1.shape[0], w1.shape[2]
    if e % axes.ep:
        raise ValueError(f"the {e} experts cannot be split evenly over expert_axis={expert_axis!r} of {axes.ep} devices")
    if i % axes.tp:
        raise ValueError(f"the intermediate size I={i} cannot be split evenly over tensor_axis={tensor_axis!r} "
                         f"of {axes.tp} devices")

    def put(a, spec):
        return jax.device_put(a, NamedSharding(mesh, spec))

    if quantized:
        placed = {"router": put(params["router"], P())}
        for name, w in (("w1", w1), ("w2", params["w2"])):
            placed[name] = jax.tree.map(put, w, _q_specs(w, axes, name))
    else:
        placed = {"router": put(params["router"], P()), "w1": put(w1, axes.w1_spec),
                  "w2": put(params["w2"], axes.w2_spec)}
    for name, value in params.items():
        if name not in placed and value is not None:
            spec = P(axes.expert) if name in ("b1", "b2") else P()
            placed[name] = jax.tree.map(lambda v, spec=spec: put(v, spec), value)
    return placed


def sharded_moe_layer(params: dict[str, Any], x: Any, *, top_k: int, mesh: Any, expert_axis: str | None = None,
                      tensor_axis: str | None = None, data_axis: str | None = None, schedule: str | None = None,
                      scoring: str = "softmax", renormalize: bool = True, activation: str = "silu",
                      implementation: Any = None, num_expert_group: int | None = None,
                      topk_group: int | None = None, correction_bias: Any = None,
                      routed_scaling_factor: Any = 1.0, group_scoring: str | None = None,
                      return_routing: bool = False, act_quant: str | None = None
                      ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`jaxmoe.moe_layer` on ``mesh``; see there for the arguments and the result.

    Shared experts (``params["shared"]``, ``params["shared_gate"]``) are replicated on every
    device and applied to its own tokens after the routed experts' combine (on a tensor axis,
    after the sum over it): every device of a tensor group computes them in full. Expert
    biases are sharded as the weights are (``b1`` over the expert and tensor axes, ``b2``
    over the expert axis, added by the first device of each tensor group only, so the sum
    over the tensor axis holds it once); a router bias is replicated.
    ``return_routing`` returns the routing of each device's own tokens, sharded as ``y``.
    Quantized weights and ``act_quant``: over the expert and data axes (module docstring).
    """
    from jaxmoe.layer import _check_shared

    check_implementation(implementation)
    axes = resolve_axes(mesh, expert_axis, tensor_axis, data_axis)
    routing = dict(scoring=scoring, renormalize=renormalize, num_expert_group=num_expert_group,
                   topk_group=topk_group, correction_bias=correction_bias,
                   routed_scaling_factor=routed_scaling_factor, group_scoring=group_scoring)
    d, e, i = check_sharded_layer_args(params, x, top_k, axes, schedule, activation=activation,
                                       act_quant=act_quant, **routing)
    activation = checks.resolve_activation(activation)
    _check_shared(params, d, jnp.asarray(x).dtype if _quantized(params["w1"]) else params["w1"].dtype)
    if not isinstance(return_routing, bool):
        raise TypeError(f"return_routing must be a bool, got {type(return_routing).__name__}")
    x = jnp.asarray(x)
    plain = x.ndim == 2 and x.shape[0] % (axes.dp * axes.ep) == 0
    if not plain:
        # Explicit meshes type-check reshapes and uneven slices of sharded dims: an input that
        # needs either is handled replicated (an all-gather where it was sharded).
        x = place(x, mesh, P())
    x2d = x.reshape(-1, d)
    m = x2d.shape[0]
    shards = axes.dp * axes.ep
    m_pad = -(-max(m, 1) // shards) * shards
    if schedule is None:
        schedule = comm.choose_schedule(m_pad, d, top_k, e, ep=axes.ep, tp=axes.tp, dp=axes.dp, dtype=x.dtype)
    if m_pad != m:
        # Zero tokens: their expert outputs are exactly zero (act(0) * 0) and are cut off below.
        x2d = jnp.concatenate([x2d, jnp.zeros((m_pad - m, d), x2d.dtype)])

    # Arrays travel as explicit arguments; static routing options stay in the closure.
    static_scale = isinstance(routed_scaling_factor, numbers.Real)
    arrays = {"x": x2d, "router": params["router"], "w1": _split_w1(params["w1"], axes.tp > 1), "w2": params["w2"]}
    if _quantized(arrays["w1"]) or _quantized(arrays["w2"]):
        specs = {"x": axes.token_spec, "router": P(), "w1": _q_specs(arrays["w1"], axes, "w1"),
                 "w2": _q_specs(arrays["w2"], axes, "w2")}
    else:
        if isinstance(arrays["w2"], QuantizedWeights):  # scheme "none": the stored array
            arrays["w2"] = arrays["w2"].values
        specs = {"x": axes.token_spec, "router": P(), "w1": axes.w1_spec, "w2": axes.w2_spec}
    if correction_bias is not None:
        arrays["bias"], specs["bias"] = jnp.asarray(correction_bias), P()
    if params.get("router_bias") is not None:
        arrays["router_bias"], specs["router_bias"] = jnp.asarray(params["router_bias"]), P()
    if params.get("b1") is not None:  # [E, 2I] in the split view [E, 2, I], sharded as w1 is
        arrays["b1"], specs["b1"] = jnp.asarray(params["b1"]).reshape(e, 2, i), P(axes.expert, None, axes.tensor)
    if params.get("b2") is not None:
        arrays["b2"], specs["b2"] = jnp.asarray(params["b2"]), P(axes.expert, None)
    if not static_scale:
        arrays["scale"], specs["scale"] = jnp.asarray(routed_scaling_factor), P()
    if params.get("shared") is not None:
        arrays["shared"] = {"w1": params["shared"]["w1"], "w2": params["shared"]["w2"]}
        specs["shared"] = {"w1": P(), "w2": P()}
        if "shared_gate" in params:
            arrays["shared_gate"], specs["shared_gate"] = params["shared_gate"], P()
    arrays = jax.tree.map(lambda v, spec: place(v, mesh, spec), arrays, specs)
    options = dict(top_k=top_k, scoring=scoring, renormalize=renormalize, num_expert_group=num_expert_group,
                   topk_group=topk_group, group_scoring=group_scoring, activation=activation,
                   implementation=implementation, return_routing=return_routing, act_quant=act_quant)

    def body(a: dict[str, Any]) -> Any:
        return _local_layer(a, axes, schedule, e, static_scale and routed_scaling_factor, **options)

    out_specs = (axes.token_spec, {"logits": axes.token_spec, "topk_ids": axes.token_spec,
                                   "topk_weights": axes.token_spec}) if return_routing else axes.token_spec
    out = jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=out_specs)(arrays)
    y, info = out if return_routing else (out, None)
    if not plain:
        y = place(y, mesh, P())[:m].reshape(x.shape)
    if not return_routing:
        return y
    if m_pad != m or not plain:
        info = {k: place(v, mesh, P())[:m] for k, v in info.items()}
    return y, info


def _local_layer(a: dict[str, jax.Array], axes: MeshAxes, schedule: str, num_experts: int, static_scale: Any, *,
                 top_k: int, scoring: str, renormalize: bool, num_expert_group: int | None,
                 topk_group: int | None, group_scoring: str | None, activation: Any, implementation: Any,
                 return_routing: bool, act_quant: str | None = None) -> Any:
    """One device's part of the layer (inside shard_map): ``x [T, D]`` to ``y [T, D]`` (and,
    with ``return_routing``, the routing of those ``T`` tokens)."""
    e_loc = num_experts // axes.ep
    w1 = a["w1"]
    if isinstance(w1, QuantizedWeights):  # [E_loc, 2 * I/tp, D]: this device's gate rows, then up rows
        w1 = _q_merge_w1(w1)
    else:
        w1 = w1.reshape(w1.shape[0], -1, w1.shape[-1])
    first = 0 if axes.expert is None else jax.lax.axis_index(axes.expert) * e_loc
    scale = a["scale"] if "scale" in a else static_scale
    b1 = a.get("b1")
    if b1 is not None:
        b1 = b1.reshape(b1.shape[0], -1)  # [E_loc, 2 * I/tp]: this device's gate biases, then up biases
    b2 = a.get("b2")
    if b2 is not None and axes.tensor is not None:
        b2 = jnp.where(jax.lax.axis_index(axes.tensor) == 0, b2, jnp.zeros_like(b2))

    def routed(x):
        logits = jnp.dot(x, a["router"], preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
        if "router_bias" in a:
            logits = logits + a["router_bias"].astype(jnp.float32)
        weights, ids = route(logits, top_k, scoring=scoring, renormalize=renormalize,
                             num_expert_group=num_expert_group, topk_group=topk_group, correction_bias=a.get("bias"),
                             routed_scaling_factor=scale, group_scoring=group_scoring, implementation=implementation)
        return logits, weights, ids

    def experts(x, weights, local_ids):
        k = local_ids.shape[1]
        if k <= e_loc:
            return fused_moe(x, w1, a["w2"], weights, local_ids, activation=activation, b1=b1, b2=b2,
                             act_quant=act_quant, implementation=implementation)
        # More slots than local experts (the op takes k <= E): one row per (token, slot), which
        # rounds each slot's row as the op does, then the op's fp32 sum over the slots.
        rows = fused_moe(jnp.repeat(x, k, axis=0), w1, a["w2"], weights.reshape(-1, 1), local_ids.reshape(-1, 1),
                         activation=activation, b1=b1, b2=b2, act_quant=act_quant, implementation=implementation)
        return rows.reshape(-1, k, rows.shape[-1]).astype(jnp.float32).sum(axis=1).astype(x.dtype)

    x = a["x"]
    t = x.shape[0]
    if schedule == "allgather":
        x_all = x if axes.expert is None else jax.lax.all_gather(x, axes.expert, tiled=True)  # [n*T, D]
        logits, weights, ids = routed(x_all)
        y = experts(x_all, weights, ids - first)  # ids of other devices fall outside [0, E_loc)
        if axes.expert is not None:
            y = jax.lax.psum_scatter(y, axes.expert, scatter_dimension=0, tiled=True)  # [T, D]
            own = jax.lax.axis_index(axes.expert) * t  # this device's tokens within x_all
            logits, weights, ids = (jax.lax.dynamic_slice_in_dim(v, own, t) for v in (logits, weights, ids))
    else:
        logits, weights, ids = routed(x)
        plan = plan_dispatch(ids, e_loc, axes.ep)
        x_recv, w_recv, ids_recv, _ = dispatch(plan, x, weights, axes.expert)
        y = combine(plan, experts(x_recv, w_recv, ids_recv), axes.expert)
    if axes.tensor is not None:
        y = jax.lax.psum(y, axes.tensor)
    if "shared" in a:
        from jaxmoe.layer import _shared_experts

        y = (y.astype(jnp.float32) + _shared_experts(a, x, activation)).astype(y.dtype)
    if return_routing:
        return y, {"logits": logits, "topk_ids": ids, "topk_weights": weights}
    return y
