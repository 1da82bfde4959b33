"""Argument checks of every op, shared by the public API, the references and the kernels.

Every check runs in plain Python on static shapes and dtypes, before any tracing work,
and raises a ``ValueError`` (bad value or shape) or ``TypeError`` (bad type or dtype)
whose message names the offending argument. Out-of-range expert ids are data, not
static facts: they cannot be checked under ``jax.jit`` (see the public docstrings for
what happens to them).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "FLOAT_DTYPES",
    "ACTIVATIONS",
    "LAYOUTS",
    "resolve_activation",
    "check_layout",
    "layout_shapes",
    "check_biases",
    "check_shared_experts",
    "GroupScoringWarning",
    "SCORINGS",
    "as_ids",
    "check_weights_like_ids",
    "check_sigmoid_top1_args",
    "check_grouped_gemm_args",
    "check_activation",
    "check_top_k",
    "check_block_size",
    "check_route_args",
    "check_experts_args",
    "check_fused_moe_args",
    "check_act_quant",
    "check_align_args",
    "check_moe_gemm_args",
    "check_layer_args",
    "check_params",
]

FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
ACTIVATIONS = ("silu", "gelu", "clamped_swiglu")
SCORINGS = ("softmax", "sigmoid", "topk_softmax")
# How w1 / w2 are stored: "out_in" is w1 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]
# (PyTorch Linear, vLLM); "in_out" is w1 [E, D, 2I], w2 [E, I, D] (x @ w, JAX codebases);
# "_interleaved": the 2I axis alternates gate and up (gate j at 2j, up j at 2j + 1: gpt-oss).
LAYOUTS = ("out_in", "out_in_interleaved", "in_out", "in_out_interleaved")
GROUP_SCORINGS = ("max", "top2_sum")


class GroupScoringWarning(UserWarning):
    """Grouped routing was asked for without ``group_scoring`` and without a correction
    bias: the default rule then is DeepSeek-V2's (``"max"``), which DeepSeek-V3 does not use."""


def resolve_group_scoring(group_scoring: str | None, correction_bias: Any) -> str:
    """The group score rule routing applies: ``group_scoring`` when given, else
    ``"top2_sum"`` with a ``correction_bias`` (DeepSeek-V3) and ``"max"`` without (V2)."""
    if group_scoring is not None:
        return group_scoring
    return "max" if correction_bias is None else "top2_sum"


def _shape_dtype(name: str, x: Any) -> tuple[tuple[int, ...], np.dtype]:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(int(d) for d in shape), jnp.dtype(dtype)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _require_int(name: str, v: Any) -> int:
    if not _is_int(v):
        raise TypeError(f"{name} must be a Python int, got {type(v).__name__} {v!r}")
    return int(v)


def _require_float_dtype(name: str, dtype: np.dtype, allowed=None) -> None:
    if allowed is None:
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {dtype}")
    elif dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {dtype}")


def _require_int_dtype(name: str, dtype: np.dtype) -> None:
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {dtype}")


def _require_ndim(name: str, shape: tuple[int, ...], ndim: int, what: str) -> None:
    if len(shape) != ndim:
        raise ValueError(f"{name} must be {what} ({ndim}-D), got shape {list(shape)}")


def as_ids(ids: Any, name: str = "topk_ids") -> Any:
    """Expert ids as int32, with ids outside the int32 range made invalid (-1) first.

    Narrowing int64 ids by a plain cast would wrap ``2**32 + 1`` to expert 1; the range is
    checked before narrowing, for numpy arrays (which ``jnp.asarray`` would narrow with
    a wrap when x64 is off) and for 64-bit JAX arrays alike.
    """
    import jax.numpy as jnp_

    if isinstance(ids, np.ndarray) or np.isscalar(ids):
        ids = np.asarray(ids)
        if ids.dtype.itemsize > 4 or ids.dtype == np.uint32:
            info = np.iinfo(np.int32)
            ids = np.where((ids < info.min) | (ids > info.max), -1, ids)
        return jnp_.asarray(ids.astype(np.int32))
    ids = jnp_.asarray(ids)
    if ids.dtype == jnp_.int32:
        return ids
    if ids.dtype.itemsize > 4 or ids.dtype == jnp_.uint32:
        info = np.iinfo(np.int32)
        ids = jnp_.where((ids < info.min) | (ids > info.max), -1, ids)
    return ids.astype(jnp_.int32)


def check_weights_like_ids(topk_weights: Any, topk_ids: Any) -> None:
    ws, wd = _shape_dtype("topk_weights", topk_weights)
    ids, _ = _shape_dtype("topk_ids", topk_ids)
    _require_float_dtype("topk_weights", wd)
    if ws != ids:
        raise ValueError(f"topk_weights must have the shape of topk_ids {list(ids)}, got {list(ws)}")


def resolve_activation(activation: Any, *, optional: bool = False) -> Any:
    """The canonical activation: ``"silu"``, ``"gelu"``, a :class:`~jaxmoe.ClampedSwiGLU`
    (also for the name ``"clamped_swiglu"``), or None where ``optional``; raises otherwise."""
    from jaxmoe.types import ClampedSwiGLU

    if optional and activation is None:
        return None
    if isinstance(activation, ClampedSwiGLU):
        return activation
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return ClampedSwiGLU() if activation == "clamped_swiglu" else activation
    allowed = ACTIVATIONS + ((None,) if optional else ())
    raise ValueError(f"activation must be one of {allowed} or a jaxmoe.ClampedSwiGLU, got {activation!r}")


def check_activation(activation: Any, *, optional: bool = False) -> None:
    resolve_activation(activation, optional=optional)


def check_layout(layout: Any) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def layout_shapes(layout: str, e: int, d: int, i: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(w1 shape, w2 shape)`` of ``layout`` for E experts, hidden D, intermediate I."""
    if layout.startswith("in_out"):
        return (e, d, 2 * i), (e, i, d)
    return (e, 2 * i, d), (e, d, i)


def _w1_dims(layout: str, w1s: tuple[int, ...]) -> tuple[int, int, int]:
    """``(E, 2I, D)`` read from a ``w1`` shape stored in ``layout``."""
    return (w1s[0], w1s[2], w1s[1]) if layout.startswith("in_out") else tuple(w1s)


def _w_spec(layout: str, which: str) -> str:
    if layout.startswith("in_out"):
        return "[E, D, 2I]" if which == "w1" else "[E, I, D]"
    return "[E, 2I, D]" if which == "w1" else "[E, D, I]"


def check_biases(b1: Any, b2: Any, e: int, d: int, i: int, in_params: bool = False) -> None:
    """``b1 [E, 2I]`` (in w1's gate/up order) and ``b2 [E, D]``, each optional, any float dtype."""
    for name, b, want in (("b1", b1, (e, 2 * i)), ("b2", b2, (e, d))):
        if b is None:
            continue
        label = f"params['{name}']" if in_params else name
        bs, bd = _shape_dtype(label, b)
        _require_float_dtype(label, bd)
        if bs != want:
            what = "[E, 2I]" if name == "b1" else "[E, D]"
            raise ValueError(f"{label} must be {what} = {list(want)}, got {list(bs)}")


def check_shared_experts(shared_experts: Any, num_experts: int, shared_weights: Any = None, m: int | None = None
                         ) -> int:
    """``shared_experts`` S: an int in ``[0, E)``, the last S of w1/w2's ``E`` experts being
    shared (at least one routed expert stays); ``shared_weights`` None or ``[M, S]`` float."""
    if isinstance(shared_experts, bool) or not isinstance(shared_experts, (int, np.integer)):
        raise TypeError(f"shared_experts must be an int (how many of w1's experts are shared), "
                        f"got {type(shared_experts).__name__}")
    s = int(shared_experts)
    if not 0 <= s < num_experts:
        raise ValueError(f"shared_experts must be in [0, {num_experts}) (w1 holds {num_experts} experts, the routed "
                         f"ones first), got {s}")
    if shared_weights is not None:
        if not s:
            raise ValueError("shared_weights needs shared_experts > 0")
        ws, wd = _shape_dtype("shared_weights", shared_weights)
        _require_float_dtype("shared_weights", wd)
        if m is not None and tuple(ws) != (m, s):
            raise ValueError(f"shared_weights must be [M, shared_experts] = [{m}, {s}], got {list(ws)}")
    return s


def check_top_k(top_k: Any, num_experts: int, name: str = "top_k") -> int:
    k = _require_int(name, top_k)
    if not 1 <= k <= num_experts:
        raise ValueError(f"{name} must be in [1, num_experts={num_experts}], got {k}")
    return k


def check_block_size(block_size: Any) -> int:
    bs = _require_int("block_size", block_size)
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {bs}")
    return bs


def check_route_args(
    logits: Any,
    top_k: Any,
    *,
    scoring: Any = "softmax",
    renormalize: Any = True,
    num_expert_group: Any = None,
    topk_group: Any = None,
    correction_bias: Any = None,
    routed_scaling_factor: Any = 1.0,
    group_scoring: Any = None,
) -> tuple[int, int]:
    """Checks :func:`jaxmoe.route`'s arguments; returns ``(M, E)``."""
    shape, dtype = _shape_dtype("logits", logits)
    _require_ndim("logits", shape, 2, "[M, E]")
    _require_float_dtype("logits", dtype)
    m, e = shape
    if e < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {list(shape)}")
    k = check_top_k(top_k, e)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if not isinstance(renormalize, (bool, np.bool_)):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    if isinstance(routed_scaling_factor, bool) or not (
        isinstance(routed_scaling_factor, numbers.Real)
        or (getattr(routed_scaling_factor, "shape", None) == () and jnp.issubdtype(routed_scaling_factor.dtype, jnp.floating))
    ):
        raise TypeError(
            f"routed_scaling_factor must be a number or a float scalar array, got {type(routed_scaling_factor).__name__}"
        )
    if scoring == "topk_softmax":
        if not renormalize:
            raise ValueError("scoring='topk_softmax' (a softmax over the k chosen logits) always sums to 1: "
                             "renormalize=False has no meaning with it; use scoring='softmax', renormalize=False")
        if num_expert_group is not None or correction_bias is not None:
            raise ValueError("scoring='topk_softmax' takes neither grouped routing (num_expert_group) nor a "
                             "correction_bias; use scoring='softmax' or 'sigmoid' for those")
    if group_scoring is not None and group_scoring not in GROUP_SCORINGS:
        raise ValueError(f"group_scoring must be None or one of {GROUP_SCORINGS}, got {group_scoring!r}")
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError(
            "num_expert_group and topk_group must be given together (grouped routing) or not at all, "
            f"got num_expert_group={num_expert_group!r}, topk_group={topk_group!r}"
        )
    if num_expert_group is not None:
        g = _require_int("num_expert_group", num_expert_group)
        tg = _require_int("topk_group", topk_group)
        if g < 1 or e % g:
            raise ValueError(f"num_expert_group must be >= 1 and divide the number of experts {e}, got {g}")
        if not 1 <= tg <= g:
            raise ValueError(f"topk_group must be in [1, num_expert_group={g}], got {tg}")
        if k > tg * (e // g):
            raise ValueError(
                f"top_k={k} exceeds the experts in the kept groups (topk_group * E / num_expert_group = {tg * (e // g)})"
            )
        if group_scoring is None and correction_bias is None and tg < g and e // g > 1:
            warnings.warn(GroupScoringWarning(
                "grouped routing without group_scoring or a correction_bias scores each group by its best expert "
                "(group_scoring='max', DeepSeek-V2's rule); DeepSeek-V3 sums each group's best two, with or without "
                "a bias: pass group_scoring='top2_sum' or 'max' to say which"), stacklevel=2)
    if correction_bias is not None:
        bshape, bdtype = _shape_dtype("correction_bias", correction_bias)
        if bshape != (e,):
            raise ValueError(f"correction_bias must have shape [E] = [{e}], got {list(bshape)}")
        _require_float_dtype("correction_bias", bdtype)
    return m, e


def check_act_quant(act_quant: Any, w1: Any, w2: Any, x_dtype: Any, w_names: tuple[str, str] = ("w1", "w2"),
                    layout: Any = "out_in") -> None:
    """``act_quant`` is None or an activation quantization that ``w1``'s and ``w2``'s schemes
    multiply against (fp8 with the fp8 schemes, int8 with int8); mxfp4 needs bf16 or fp32
    activations (its e8m0 scales reach past fp16's range)."""
    from jaxmoe.types import ACT_QUANT_SCHEMES, ACT_QUANTS, QuantizedWeights

    schemes = [w.scheme if isinstance(w, QuantizedWeights) else "none" for w in (w1, w2)]
    if any(sch != "none" for sch in schemes) and str(layout).startswith("in_out"):
        raise ValueError(f"quantized {w_names[0]}/{w_names[1]} are stored [out, in]: layout must be 'out_in' or "
                         f"'out_in_interleaved', got {layout!r}")
    if act_quant is not None:
        if act_quant not in ACT_QUANTS:
            raise ValueError(f"act_quant must be None or one of {ACT_QUANTS}, got {act_quant!r}")
        for name, scheme in zip(w_names, schemes):
            if scheme not in ACT_QUANT_SCHEMES[act_quant]:
                raise ValueError(f"act_quant={act_quant!r} needs {name} quantized as one of "
                                 f"{ACT_QUANT_SCHEMES[act_quant]}, got scheme {scheme!r}")
    if "mxfp4" in schemes and jnp.dtype(x_dtype) == jnp.float16:
        raise TypeError("hidden_states must be bfloat16 or float32 with mxfp4 weights (their e8m0 scales "
                        "reach past float16's range), got float16")


def _weights_shape_dtype(name: str, w: Any, x_dtype: Any) -> tuple[tuple[int, ...], Any]:
    """The logical shape of ``w`` and the dtype it multiplies in (quantized: ``x_dtype``)."""
    from jaxmoe.types import QuantizedWeights

    if isinstance(w, QuantizedWeights):
        if not hasattr(w.values, "shape"):
            raise TypeError(f"{name}.values must be an array, got {type(w.values).__name__}")
        return tuple(int(d) for d in w.shape), (jnp.dtype(w.values.dtype) if w.scheme == "none" else x_dtype)
    return _shape_dtype(name, w)


def check_experts_args(hidden_states: Any, w1: Any, w2: Any, *, layout: Any = "out_in", b1: Any = None,
                       b2: Any = None) -> tuple[int, int, int, int]:
    """Checks the tokens, the expert weights (stored in ``layout``) and the optional expert
    biases of a fused MoE; returns ``(M, D, E, I)``. ``w1``/``w2`` may be
    :class:`~jaxmoe.QuantizedWeights` (validated when built; stored ``[out, in]``)."""
    from jaxmoe.types import QuantizedWeights

    layout = check_layout(layout)
    if layout.startswith("in_out") and any(isinstance(w, QuantizedWeights) and w.scheme != "none" for w in (w1, w2)):
        raise ValueError(f"quantized w1/w2 are stored [out, in]: layout must be 'out_in' or 'out_in_interleaved', "
                         f"got {layout!r}")
    xs, xd = _shape_dtype("hidden_states", hidden_states)
    _require_ndim("hidden_states", xs, 2, "[M, D]")
    _require_float_dtype("hidden_states", xd, FLOAT_DTYPES)
    m, d = xs
    if d < 1:
        raise ValueError(f"hidden_states must be [M, D] with D >= 1, got shape {list(xs)}")
    s1, s2 = _w_spec(layout, "w1"), _w_spec(layout, "w2")
    w1s, w1d = _weights_shape_dtype("w1", w1, xd)
    w2s, w2d = _weights_shape_dtype("w2", w2, xd)
    for name, shape, spec in (("w1", w1s, s1), ("w2", w2s, s2)):
        if len(shape) > 3:
            raise ValueError(f"{name} must be one layer's {spec} (3-D), got shape {list(shape)}: for weights "
                             f"stacked over layers, map over the leading axis (jax.lax.scan or jax.vmap)")
        _require_ndim(name, shape, 3, spec)
    for name, dt in (("w1", w1d), ("w2", w2d)):
        if dt != xd:
            raise TypeError(f"{name} must have the dtype of hidden_states ({xd}), got {dt}")
    e, two_i, d1 = _w1_dims(layout, w1s)
    if d1 != d:
        raise ValueError(f"w1 must be {s1} (layout={layout!r}) with D = hidden_states.shape[1] = {d}, "
                         f"got {list(w1s)}")
    if two_i % 2 or two_i == 0:
        raise ValueError(f"w1 must be {s1} (layout={layout!r}): its 2I dim must be even and > 0, got {two_i}")
    i = two_i // 2
    want2 = layout_shapes(layout, e, d, i)[1]
    if w2s != want2:
        raise ValueError(f"w2 must be {s2} = {list(want2)} (layout={layout!r}) to match w1 {list(w1s)}, "
                         f"got {list(w2s)}")
    if e < 1:
        raise ValueError("w1 must hold at least one expert")
    check_biases(b1, b2, e, d, i)
    return m, d, e, i


def check_fused_moe_args(
    hidden_states: Any, w1: Any, w2: Any, topk_weights: Any, topk_ids: Any, activation: Any = "silu", *,
    b1: Any = None, b2: Any = None, layout: Any = "out_in", act_quant: Any = None,
) -> tuple[int, int, int, int, int]:
    """Checks :func:`jaxmoe.fused_moe`'s arguments; returns ``(M, D, E, I, k)``."""
    m, d, e, i = check_experts_args(hidden_states, w1, w2, layout=layout, b1=b1, b2=b2)
    check_act_quant(act_quant, w1, w2, hidden_states.dtype, layout=layout)
    ws, wd = _shape_dtype("topk_weights", topk_weights)
    _require_ndim("topk_weights", ws, 2, "[M, k]")
    _require_float_dtype("topk_weights", wd)
    ids, idd = _shape_dtype("topk_ids", topk_ids)
    _require_ndim("topk_ids", ids, 2, "[M, k]")
    _require_int_dtype("topk_ids", idd)
    if ws[0] != m:
        raise ValueError(f"topk_weights must be [M, k] with M = {m} rows, got {list(ws)}")
    if ids != ws:
        raise ValueError(f"topk_ids must have the shape of topk_weights {list(ws)}, got {list(ids)}")
    k = check_top_k(ws[1], e, "top_k (topk_ids.shape[1])")
    check_activation(activation)
    return m, d, e, i, k


def check_align_args(topk_ids: Any, num_experts: Any, block_size: Any) -> tuple[int, int, int, int]:
    """Checks :func:`jaxmoe.ops.moe_align_block_size`'s arguments; returns ``(M, k, E, block_size)``."""
    ids, idd = _shape_dtype("topk_ids", topk_ids)
    _require_ndim("topk_ids", ids, 2, "[M, k]")
    _require_int_dtype("topk_ids", idd)
    e = _require_int("num_experts", num_experts)
    if e < 1:
        raise ValueError(f"num_experts must be >= 1, got {e}")
    m, k = ids
    if k < 1:
        raise ValueError(f"topk_ids must have at least one column, got shape {list(ids)}")
    return m, k, e, check_block_size(block_size)


def check_moe_gemm_args(
    a: Any,
    b: Any,
    sorted_token_ids: Any,
    expert_ids: Any,
    num_tokens_post_padded: Any,
    *,
    top_k: Any,
    num_rows: Any,
    block_size: Any,
    topk_weights: Any = None,
    activation: Any = None,
) -> tuple[int, int, int, int]:
    """Checks :func:`jaxmoe.ops.moe_gemm`'s arguments; returns ``(E, N, K, N_out)``."""
    as_, ad = _shape_dtype("a", a)
    _require_ndim("a", as_, 2, "[A_rows, K]")
    _require_float_dtype("a", ad, FLOAT_DTYPES)
    bs_, bd = _shape_dtype("b", b)
    _require_ndim("b", bs_, 3, "[E, N, K]")
    if bd != ad:
        raise TypeError(f"b must have the dtype of a ({ad}), got {bd}")
    e, n, kdim = bs_
    if e < 1 or n < 1:
        raise ValueError(f"b must be [E, N, K] with E >= 1 and N >= 1, got {list(bs_)}")
    if kdim != as_[1]:
        raise ValueError(f"b must be [E, N, K] with K = a.shape[1] = {as_[1]}, got {list(bs_)}")
    k = _require_int("top_k", top_k)
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    rows = _require_int("num_rows", num_rows)
    if rows < 0 or rows > as_[0] * k:
        raise ValueError(f"num_rows must be in [0, a.shape[0] * top_k = {as_[0] * k}], got {rows}")
    bsz = check_block_size(block_size)
    ss, sd = _shape_dtype("sorted_token_ids", sorted_token_ids)
    _require_ndim("sorted_token_ids", ss, 1, "[P]")
    _require_int_dtype("sorted_token_ids", sd)
    if ss[0] % bsz:
        raise ValueError(f"sorted_token_ids length {ss[0]} must be a multiple of block_size={bsz}")
    es, ed = _shape_dtype("expert_ids", expert_ids)
    _require_int_dtype("expert_ids", ed)
    if es != (ss[0] // bsz,):
        raise ValueError(f"expert_ids must have shape [P // block_size] = [{ss[0] // bsz}], got {list(es)}")
    ns, nd = _shape_dtype("num_tokens_post_padded", num_tokens_post_padded)
    _require_int_dtype("num_tokens_post_padded", nd)
    if ns != (1,):
        raise ValueError(f"num_tokens_post_padded must have shape [1], got {list(ns)}")
    if topk_weights is not None:
        ws, wd = _shape_dtype("topk_weights", topk_weights)
        _require_ndim("topk_weights", ws, 2, "[M, k]")
        _require_float_dtype("topk_weights", wd)
        if ws[0] * ws[1] != rows:
            raise ValueError(f"topk_weights must hold num_rows = {rows} weights (M * k), got shape {list(ws)}")
    check_activation(activation, optional=True)
    n_out = n
    if activation is not None:
        if n % 2:
            raise ValueError(f"b's N = {n} must be even with activation={activation!r} (gate then up rows)")
        n_out = n // 2
    return e, n, kdim, n_out


def check_params(params: Any, layout: Any = "out_in", shared_experts: int = 0) -> tuple[int, int, int]:
    """Checks a :func:`jaxmoe.init_moe_params` dict (``w1``/``w2`` stored in ``layout``, optional
    ``b1`` [E, 2I], ``b2`` [E, D], ``router_bias`` [E]); returns ``(D, E, I)``, ``E`` the
    router's experts. With ``shared_experts`` S, w1/w2 (and the expert biases) hold
    ``E + S`` experts, the shared ones last."""
    layout = check_layout(layout)
    if not isinstance(params, dict) or not {"router", "w1", "w2"} <= set(params):
        raise TypeError("params must be a dict with keys 'router', 'w1', 'w2' (see jaxmoe.init_moe_params)")
    rs, rd = _shape_dtype("params['router']", params["router"])
    _require_ndim("params['router']", rs, 2, "[D, E]")
    _require_float_dtype("params['router']", rd)
    d, e = rs
    if d < 1 or e < 1:
        raise ValueError(f"params['router'] must be [D, E] with D >= 1 and E >= 1, got {list(rs)}")
    s1, s2 = _w_spec(layout, "w1"), _w_spec(layout, "w2")
    w1s, w1d = _weights_shape_dtype("params['w1']", params["w1"], None)
    _require_ndim("params['w1']", w1s, 3, s1)
    e1, two_i, d1 = _w1_dims(layout, w1s)
    if e1 != e + shared_experts or d1 != d:
        what = f"E={e}" if not shared_experts else f"E={e} + {shared_experts} shared = {e + shared_experts}"
        hint = ""
        if e1 > e and not shared_experts and d1 == d:
            hint = (f"; if its last {e1 - e} experts are shared experts, say so with shared_experts={e1 - e} "
                    "(see jaxmoe.models.stack_shared_experts)")
        raise ValueError(f"params['w1'] must be {s1} (layout={layout!r}) with {what}, D={d} to match "
                         f"params['router'] {list(rs)}, got {list(w1s)}{hint}")
    if two_i % 2 or two_i == 0:
        raise ValueError(f"params['w1'] must be {s1} (layout={layout!r}): its 2I dim must be even and > 0, "
                         f"got {two_i}")
    i = two_i // 2
    w2s, w2d = _weights_shape_dtype("params['w2']", params["w2"], None)
    _require_ndim("params['w2']", w2s, 3, s2)
    want2 = layout_shapes(layout, e1, d, i)[1]
    if w2s != want2:
        raise ValueError(f"params['w2'] must be {s2} = {list(want2)} (layout={layout!r}) to match params['w1'] "
                         f"{list(w1s)}, got {list(w2s)}")
    if w1d is not None and w2d is not None and w2d != w1d:
        raise TypeError(f"params['w2'] must have the dtype of params['w1'] ({w1d}), got {w2d}")
    check_biases(params.get("b1"), params.get("b2"), e1, d, i, in_params=True)
    if params.get("router_bias") is not None:
        bs, bd = _shape_dtype("params['router_bias']", params["router_bias"])
        _require_float_dtype("params['router_bias']", bd)
        if bs != (e,):
            raise ValueError(f"params['router_bias'] must be [E] = [{e}], got {list(bs)}")
    return d, e, i


def check_layer_args(params: Any, x: Any, top_k: Any, layout: Any = "out_in", shared_experts: int = 0
                     ) -> tuple[int, int, int]:
    """Checks :func:`jaxmoe.moe_layer`'s params and input; returns ``(D, E, I)`` (``E``: the
    router's experts; ``shared_experts``: see :func:`check_params`)."""
    d, e, i = check_params(params, layout, shared_experts)
    xs, xd = _shape_dtype("x", x)
    if len(xs) < 1 or xs[-1] != d:
        raise ValueError(f"x must be [..., D] with D = {d} (params['router'].shape[0]), got shape {list(xs)}")
    _require_float_dtype("x", xd, FLOAT_DTYPES)
    for name in ("w1", "w2"):
        _, wd = _weights_shape_dtype(f"params['{name}']", params[name], None)
        if wd is not None and xd != wd:
            raise TypeError(f"x must have the dtype of params['{name}'] ({wd}), got {xd}")
    check_top_k(top_k, e)
    return d, e, i


def check_sigmoid_top1_args(x: Any, w: Any, *, shared_expert: Any = False) -> tuple[int, int, int]:
    """Checks :func:`jaxmoe.ops.router_sigmoid_top1`'s arguments; returns ``(M, D, E)``."""
    xs, xd = _shape_dtype("x", x)
    _require_ndim("x", xs, 2, "[M, D]")
    _require_float_dtype("x", xd, FLOAT_DTYPES)
    ws, wd = _shape_dtype("w", w)
    _require_ndim("w", ws, 2, "[D, E]")
    _require_float_dtype("w", wd, FLOAT_DTYPES)
    if xs[1] != ws[0]:
        raise ValueError(f"x [M, D] and w [D, E] disagree on D: x{list(xs)}, w{list(ws)}")
    if ws[1] < 1:
        raise ValueError(f"w must have at least one expert column, got shape {list(ws)}")
    if not isinstance(shared_expert, (bool, np.bool_)):
        raise TypeError(f"shared_expert must be a bool, got {type(shared_expert).__name__}")
    return xs[0], xs[1], ws[1]


def check_grouped_gemm_args(a: Any, b: Any, routing: Any, *, topk_weights: Any = None, activation: Any = None,
                            tile: Any = None) -> tuple[int, int, int, int]:
    """Checks :func:`jaxmoe.ops.grouped_gemm`'s arguments; returns ``(E, N, K, N_out)``."""
    from jaxmoe.types import RoutingData

    from jaxmoe.ops.gemm.config import GemmTile

    if not isinstance(routing, RoutingData):
        raise TypeError(f"routing must be a jaxmoe.RoutingData (from jaxmoe.ops.align), got {type(routing).__name__}")
    as_, _ = _shape_dtype("a", a)
    _require_ndim("a", as_, 2, "[A_rows, K]")
    if tile is not None and not isinstance(tile, GemmTile):
        raise TypeError(f"tile must be None or a jaxmoe.ops.gemm.GemmTile, got {type(tile).__name__}")
    e, n, kdim, n_out = check_moe_gemm_args(
        a, b, routing.sorted_token_ids, routing.expert_ids, routing.num_tokens_post_padded,
        top_k=routing.top_k if a.shape[0] * routing.top_k == routing.num_rows else 1,
        num_rows=routing.num_rows, block_size=routing.block_size, topk_weights=topk_weights, activation=activation)
    if routing.num_experts != e:
        raise ValueError(f"routing was aligned for {routing.num_experts} experts, b holds {e}")
    if a.shape[0] not in (routing.num_tokens, routing.num_rows):
        raise ValueError(f"a must hold the routing's {routing.num_tokens} tokens (stage 1) or its "
                         f"{routing.num_rows} rows (stage 2), got {a.shape[0]} rows")
    return e, n, kdim, n_out
