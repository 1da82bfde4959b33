"""Multi-device checks of jaxmoe.parallel, run by tests/test_parallel.py in a subprocess with
8 host CPU devices (XLA_FLAGS must be set before jax is imported, which the test process
has already done with one device).

    python tests/parallel_worker.py OUT.json [CASE ...]

writes ``{case: {"ok": bool, "detail": str, "seconds": float}}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

CASES: dict[str, object] = {}  # name -> check function, filled by @case below


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# --------------------------------------------------------------------------- helpers (jax imported in main)

def _setup():
    global jax, jnp, np, jaxmoe, P, Mesh
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    import jaxmoe


MIXTRAL = dict(experts=8, top_k=2, hidden=32, intermediate=16)
DEEPSEEK = dict(experts=256, top_k=8, hidden=32, intermediate=16)


def _deepseek_routing(bias):
    return dict(scoring="sigmoid", num_expert_group=8, topk_group=4, correction_bias=bias, routed_scaling_factor=2.5)


def _mesh(shape, names):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names)


def _layer(preset, m, seed=0, lead=None):
    params = jaxmoe.init_moe_params(jax.random.key(seed), hidden=preset["hidden"], intermediate=preset["intermediate"],
                                    experts=preset["experts"], dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(seed + 1), (m, preset["hidden"]), jnp.float32)
    return params, x if lead is None else x.reshape(*lead, preset["hidden"])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compare(params, x, mesh, axes, top_k, routing=None, schedules=("allgather", "all_to_all"),
             implementation="reference", tol=1e-5, jit=True):
    routing = routing or {}
    want = jaxmoe.moe_layer(params, x, top_k=top_k, implementation="reference", **routing)
    details = []
    for schedule in schedules:
        def f(p, x):
            return jaxmoe.moe_layer(p, x, top_k=top_k, mesh=mesh, schedule=schedule, implementation=implementation,
                                    **axes, **routing)
        got = (jax.jit(f) if jit else f)(params, x)
        assert got.shape == x.shape and got.dtype == x.dtype, (got.shape, got.dtype)
        err = _rel(got, want)
        details.append(f"{schedule}: rel err {err:.1e}")
        assert err <= tol, details
    return "; ".join(details)


def _skew_bias(e, favoured):
    # A bias used for the selection only: every token picks the favoured experts.
    return jnp.zeros((e,), jnp.float32).at[jnp.asarray(favoured)].set(100.0)


# --------------------------------------------------------------------------- layer equals the single-device layer

@case
def mixtral_ep_1_2_4_8():
    params, x = _layer(MIXTRAL, 24)
    out = []
    for n in (1, 2, 4, 8):
        out.append(f"ep={n}: " + _compare(params, x, _mesh((n,), ("ep",)), dict(expert_axis="ep"), 2))
    return " | ".join(out)


@case
def mixtral_ep4_tp2():
    params, x = _layer(MIXTRAL, 24, seed=2)
    return _compare(params, x, _mesh((4, 2), ("ep", "tp")), dict(expert_axis="ep", tensor_axis="tp"), 2)


@case
def mixtral_dp2_ep4():
    params, x = _layer(MIXTRAL, 24, seed=4)
    return _compare(params, x, _mesh((2, 4), ("dp", "ep")), dict(expert_axis="ep", data_axis="dp"), 2)


@case
def mixtral_dp2_ep2_tp2():
    params, x = _layer(MIXTRAL, 24, seed=6)
    return _compare(params, x, _mesh((2, 2, 2), ("dp", "ep", "tp")),
                    dict(expert_axis="ep", tensor_axis="tp", data_axis="dp"), 2)


@case
def mixtral_tp8_and_dp8_alone():
    params, x = _layer(MIXTRAL, 24, seed=8)
    a = _compare(params, x, _mesh((8,), ("tp",)), dict(tensor_axis="tp"), 2)
    b = _compare(params, x, _mesh((8,), ("dp",)), dict(data_axis="dp"), 2)
    return f"tp=8: {a} | dp=8: {b}"


@case
def mixtral_padded_tokens_and_batch_dims():
    """M = 13 over 8 token shards (padded to 16), and x [3, 5, D]; also without jax.jit."""
    params, x = _layer(MIXTRAL, 13, seed=10)
    mesh = _mesh((8,), ("ep",))
    a = _compare(params, x, mesh, dict(expert_axis="ep"), 2)
    params, x3 = _layer(MIXTRAL, 15, seed=12, lead=(3, 5))
    b = _compare(params, x3, _mesh((2, 4), ("dp", "ep")), dict(expert_axis="ep", data_axis="dp"), 2, jit=False)
    c = _compare(params, x3[:1, :1], mesh, dict(expert_axis="ep"), 2)  # one token, 8 devices
    return f"M=13: {a} | [3,5,D] eager: {b} | M=1: {c}"


@case
def mixtral_explicit_mesh_shard_params():
    """jax.make_mesh (Explicit axes) with params placed by shard_params ([E, 2, I, D] w1)."""
    params, x = _layer(MIXTRAL, 24, seed=14)
    mesh = jax.make_mesh((4, 2), ("ep", "tp"))
    placed = jaxmoe.parallel.shard_params(params, mesh, expert_axis="ep", tensor_axis="tp")
    assert placed["w1"].shape == (8, 2, 16, 32)
    shard = placed["w1"].addressable_shards[1]  # ep 0, tp 1: gate rows 8..15 and up rows 24..31
    np.testing.assert_array_equal(np.asarray(shard.data).reshape(-1, 32),
                                  np.concatenate([params["w1"][:2, 8:16], params["w1"][:2, 24:32]], 1).reshape(-1, 32))
    want = jaxmoe.moe_layer(params, x, top_k=2, implementation="reference")
    out = []
    for schedule in ("allgather", "all_to_all"):
        got = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, mesh=mesh, expert_axis="ep", tensor_axis="tp",
                                                   schedule=schedule, implementation="reference"))(placed, x)
        err = _rel(got, want)
        assert err <= 1e-5 and got.sharding.spec == P("ep", None), (err, got.sharding)
        out.append(f"{schedule}: rel err {err:.1e}, out {got.sharding.spec}")
    return "; ".join(out)


@case
def deepseek_ep8_and_ep4_tp2():
    params, x = _layer(DEEPSEEK, 16, seed=20)
    bias = 0.1 * jax.random.normal(jax.random.key(21), (256,), jnp.float32)
    routing = _deepseek_routing(bias)
    a = _compare(params, x, _mesh((8,), ("ep",)), dict(expert_axis="ep"), 8, routing)
    b = _compare(params, x, _mesh((4, 2), ("ep", "tp")), dict(expert_axis="ep", tensor_axis="tp"), 8, routing,
                 schedules=("all_to_all",))
    return f"ep=8: {a} | ep=4 x tp=2: {b}"


# --------------------------------------------------------------------------- skewed routing, token counts

def _dispatch_counts(x, topk_ids, e, n):
    """Run plan_dispatch/dispatch on an n-device mesh; returns per device (recv_counts, the
    (token, global expert) pairs received)."""
    mesh = _mesh((n,), ("ep",))
    e_loc = e // n

    def body(x, ids):
        plan = jaxmoe.parallel.plan_dispatch(ids, e_loc, n)
        x_recv, _, ids_recv, counts = jaxmoe.parallel.dispatch(plan, x, jnp.ones(ids.shape, jnp.float32), "ep")
        glob = jnp.where(ids_recv >= 0, ids_recv + jax.lax.axis_index("ep") * e_loc, -1)
        return x_recv[None], glob[None], counts[None]

    xs, ids, counts = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), P("ep")),
                                            out_specs=(P("ep"), P("ep"), P("ep"))))(x, topk_ids)
    return np.asarray(xs), np.asarray(ids), np.asarray(counts)


def _count_tokens(topk_ids, e, n):
    """Every (token, slot) arrives exactly once, at the device owning its expert."""
    m, k = topk_ids.shape
    token = (jnp.arange(m, dtype=jnp.float32) + 1)[:, None] * jnp.ones((1, 4), jnp.float32)  # x row = token + 1
    xs, ids, counts = _dispatch_counts(token, topk_ids, e, n)
    t = m // n
    got = []
    for dev in range(n):
        for src in range(n):
            rows = slice(src * t, (src + 1) * t)
            c = counts[dev, src]
            assert (xs[dev, rows][c:] == 0).all() and (ids[dev, rows][c:] == -1).all(), "rows past the count"
            for r in range(src * t, src * t + c):
                tok = int(xs[dev, r, 0]) - 1
                assert 0 <= tok < m
                for ex in ids[dev, r]:
                    if ex >= 0:
                        assert ex // (e // n) == dev, "expert received by a device that does not own it"
                        got.append((tok, int(ex)))
    want = sorted((tok, int(ex)) for tok in range(m) for ex in np.asarray(topk_ids)[tok])
    assert sorted(got) == want, f"{len(got)} (token, expert) pairs arrived, {len(want)} sent"
    return counts.sum(axis=1)  # rows each device received


@case
def token_count_uniform():
    rng = np.random.default_rng(0)
    out = []
    for e, k, n in ((8, 2, 4), (8, 2, 8), (256, 8, 8)):
        m = 32
        ids = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(m)]), jnp.int32)
        recv = _count_tokens(ids, e, n)
        out.append(f"E={e} k={k} ep={n}: {m * k} pairs arrived, rows received per device {recv.tolist()}")
    return " | ".join(out)


@case
def skewed_routing_mixtral():
    """All tokens to device 0's experts (0, 1): three of four devices receive nothing."""
    params, x = _layer(MIXTRAL, 24, seed=30)
    routing = dict(correction_bias=_skew_bias(8, [0, 1]))
    _, ids = jaxmoe.route(x @ params["router"], 2, **routing)
    assert set(np.asarray(ids).ravel().tolist()) == {0, 1}
    recv = _count_tokens(ids, 8, 4)
    assert recv.tolist() == [24, 0, 0, 0], recv
    a = _compare(params, x, _mesh((4,), ("ep",)), dict(expert_axis="ep"), 2, routing)
    b = _compare(params, x, _mesh((4, 2), ("ep", "tp")), dict(expert_axis="ep", tensor_axis="tp"), 2, routing)
    return f"rows received {recv.tolist()}; ep=4: {a} | ep=4 x tp=2: {b}"


@case
def skewed_routing_deepseek():
    """Group 0 (experts 0..31, device 0 of 8) wins every token."""
    params, x = _layer(DEEPSEEK, 16, seed=40)
    routing = _deepseek_routing(_skew_bias(256, list(range(8))))
    _, ids = jaxmoe.route(x @ params["router"], 8, **{k: v for k, v in routing.items()})
    assert (np.asarray(ids) < 32).all()
    recv = _count_tokens(ids, 256, 8)
    assert recv.tolist() == [16] + [0] * 7, recv
    a = _compare(params, x, _mesh((8,), ("ep",)), dict(expert_axis="ep"), 8, routing)
    return f"rows received {recv.tolist()}; ep=8: {a}"


# --------------------------------------------------------------------------- gradients

def _grads(params, x, top_k, routing, **kw):
    def loss(p, x):
        y = jaxmoe.moe_layer(p, x, top_k=top_k, implementation="reference", **routing, **kw)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


def _compare_grads(params, x, top_k, routing, mesh, axes):
    want = _grads(params, x, top_k, routing)
    out = []
    for schedule in ("allgather", "all_to_all"):
        got = _grads(params, x, top_k, routing, mesh=mesh, schedule=schedule, **axes)
        flat_got = dict(jax.tree_util.tree_flatten_with_path(got[0])[0])
        flat_want = dict(jax.tree_util.tree_flatten_with_path(want[0])[0])
        assert flat_got.keys() == flat_want.keys(), (flat_got.keys(), flat_want.keys())
        errs = {jax.tree_util.keystr(path): _rel(flat_got[path].reshape(flat_want[path].shape), w)
                for path, w in flat_want.items()}
        errs["x"] = _rel(got[1], want[1])
        assert max(errs.values()) <= 1e-5, (schedule, errs)
        out.append(f"{schedule}: max rel err {max(errs.values()):.1e}")
    return "; ".join(out)


@case
def grad_mixtral_dp2_ep2_tp2():
    params, x = _layer(MIXTRAL, 16, seed=50)
    return _compare_grads(params, x, 2, {}, _mesh((2, 2, 2), ("dp", "ep", "tp")),
                          dict(expert_axis="ep", tensor_axis="tp", data_axis="dp"))


@case
def grad_deepseek_ep8():
    params, x = _layer(DEEPSEEK, 16, seed=52)
    bias = 0.1 * jax.random.normal(jax.random.key(53), (256,), jnp.float32)
    return _compare_grads(params, x, 8, _deepseek_routing(bias), _mesh((8,), ("ep",)), dict(expert_axis="ep"))


# --------------------------------------------------------------------------- shared experts, routing out, group scoring

def _with_shared(params, seed, gate):
    d = params["w1"].shape[-1]
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    shared = {"w1": jax.random.normal(k1, (2, 24, d), jnp.float32) / np.sqrt(d),
              "w2": jax.random.normal(k2, (2, d, 12), jnp.float32) / np.sqrt(12)}
    out = {**params, "shared": shared}
    if gate:
        out["shared_gate"] = jax.random.normal(k3, (d, 1), jnp.float32) / np.sqrt(d)
    return out


@case
def shared_experts_routing_out_group_scoring():
    """DeepSeek-like with two shared experts (and a Qwen2-style gate), group_scoring="max"
    (not the default with a bias), return_routing: output and routing equal the single device's."""
    params, x = _layer(DEEPSEEK, 20, seed=70)  # 20 tokens: padded to the 8 token shards
    bias = 0.1 * jax.random.normal(jax.random.key(71), (256,), jnp.float32)
    routing = {**_deepseek_routing(bias), "group_scoring": "max"}
    out = []
    for gate in (False, True):
        p = _with_shared(params, 72, gate)
        want, want_r = jaxmoe.moe_layer(p, x, top_k=8, implementation="reference", return_routing=True, **routing)
        for mesh, axes in ((_mesh((2, 2, 2), ("dp", "ep", "tp")), dict(expert_axis="ep", tensor_axis="tp",
                                                                      data_axis="dp")),
                           (_mesh((8,), ("ep",)), dict(expert_axis="ep"))):
            for schedule in ("allgather", "all_to_all"):
                got, got_r = jax.jit(lambda p, x: jaxmoe.moe_layer(
                    p, x, top_k=8, mesh=mesh, schedule=schedule, implementation="reference", return_routing=True,
                    **axes, **routing))(p, x)
                assert got.shape == x.shape, got.shape
                err = _rel(got, want)
                assert err <= 1e-5, (gate, schedule, err)
                np.testing.assert_array_equal(np.asarray(got_r["topk_ids"]), np.asarray(want_r["topk_ids"]))
                np.testing.assert_allclose(np.asarray(got_r["topk_weights"]), np.asarray(want_r["topk_weights"]),
                                           rtol=1e-6)
                np.testing.assert_allclose(np.asarray(got_r["logits"]), np.asarray(want_r["logits"]), rtol=1e-6,
                                           atol=1e-6)
                out.append(f"gate={gate} {tuple(mesh.shape.values())} {schedule}: {err:.1e}")
    # the rule is applied, not ignored: "max" routes differently from the default "top2_sum" here
    _, default_r = jaxmoe.moe_layer(params, x, top_k=8, implementation="reference", return_routing=True,
                                    **_deepseek_routing(bias))
    _, max_r = jaxmoe.moe_layer(params, x, top_k=8, implementation="reference", return_routing=True, **routing)
    assert (np.asarray(default_r["topk_ids"]) != np.asarray(max_r["topk_ids"])).any()
    return "; ".join(out)


@case
def grad_shared_experts_ep4_tp2():
    params, x = _layer(MIXTRAL, 16, seed=74)
    return _compare_grads(_with_shared(params, 75, True), x, 2, {}, _mesh((4, 2), ("ep", "tp")),
                          dict(expert_axis="ep", tensor_axis="tp"))


# --------------------------------------------------------------------------- gpt-oss's features: biases, clamped SwiGLU

def _with_biases(params, seed):
    e, two_i, d = params["w1"].shape
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {**params, "b1": 0.5 * jax.random.normal(k1, (e, two_i), jnp.float32),
            "b2": 0.5 * jax.random.normal(k2, (e, d), jnp.float32),
            "router_bias": jax.random.normal(k3, (e,), jnp.float32)}


def _gpt_oss_routing():
    return dict(scoring="topk_softmax", activation=jaxmoe.ClampedSwiGLU(alpha=1.702, limit=0.5))


@case
def biases_clamped_swiglu_every_mesh():
    """Expert biases b1/b2, a router bias and gpt-oss's clamped SwiGLU (a limit low enough
    to clamp) on dp x ep x tp, ep x tp and tp alone: output equal to the single device's."""
    params, x = _layer(MIXTRAL, 16, seed=80)
    params = _with_biases(params, 81)
    out = []
    for shape, names, axes in (((2, 2, 2), ("dp", "ep", "tp"), dict(expert_axis="ep", tensor_axis="tp", data_axis="dp")),
                               ((4, 2), ("ep", "tp"), dict(expert_axis="ep", tensor_axis="tp")),
                               ((8,), ("tp",), dict(tensor_axis="tp"))):
        out.append(f"{shape}: " + _compare(params, x, _mesh(shape, names), axes, 2, routing=_gpt_oss_routing()))
    # each feature matters here: dropping one changes the single-device output
    want = jaxmoe.moe_layer(params, x, top_k=2, implementation="reference", **_gpt_oss_routing())
    for name in ("b1", "b2", "router_bias"):
        assert _rel(jaxmoe.moe_layer({k: v for k, v in params.items() if k != name}, x, top_k=2,
                                     implementation="reference", **_gpt_oss_routing()), want) > 1e-2, name
    return " | ".join(out)


@case
def biases_shard_params_and_kernels():
    """shard_params keeps and places b1, b2 and router_bias (a shared expert too); the
    interpreted Triton kernels with biases inside shard_map match the reference."""
    params, x = _layer(MIXTRAL, 16, seed=82)
    params = _with_shared(_with_biases(params, 83), 84, True)
    mesh = _mesh((4, 2), ("ep", "tp"))
    placed = jaxmoe.parallel.shard_params(params, mesh, expert_axis="ep", tensor_axis="tp")
    assert set(placed) == set(params), (set(placed), set(params))
    assert placed["b1"].sharding.spec[0] == "ep" and placed["router_bias"].sharding.spec == P()
    want = jaxmoe.moe_layer(params, x, top_k=2, implementation="reference", **_gpt_oss_routing())
    got = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, mesh=mesh, expert_axis="ep", tensor_axis="tp",
                                               implementation="reference", **_gpt_oss_routing()))(placed, x)
    err = _rel(got, want)
    assert err <= 1e-5, err
    kern = _compare(_with_biases(_layer(MIXTRAL, 16, seed=85)[0], 86), _layer(MIXTRAL, 16, seed=85)[1],
                    _mesh((2, 2), ("ep", "tp")), dict(expert_axis="ep", tensor_axis="tp"), 2,
                    routing=_gpt_oss_routing(), implementation="triton", schedules=("all_to_all",), tol=1e-4)
    return f"shard_params: {err:.1e}; kernels ep=2 x tp=2: {kern}"


@case
def grad_biases_clamped_swiglu_dp2_ep2_tp2():
    """Gradients of every parameter (b1, b2 and router_bias included) and of x on a
    dp x ep x tp mesh equal the single device's."""
    params, x = _layer(MIXTRAL, 16, seed=87)
    return _compare_grads(_with_biases(params, 88), x, 2, _gpt_oss_routing(), _mesh((2, 2, 2), ("dp", "ep", "tp")),
                          dict(expert_axis="ep", tensor_axis="tp", data_axis="dp"))


# --------------------------------------------------------------------------- Triton's interpreter inside shard_map

@case
def triton_interpreter_mixtral():
    params, x = _layer(MIXTRAL, 16, seed=60)
    a = _compare(params, x, _mesh((4,), ("ep",)), dict(expert_axis="ep"), 2, implementation="triton")
    b = _compare(params, x, _mesh((2, 2), ("ep", "tp")), dict(expert_axis="ep", tensor_axis="tp"), 2,
                 implementation="triton", schedules=("all_to_all",))
    return f"ep=4: {a} | ep=2 x tp=2: {b}"


@case
def triton_interpreter_grads_ep2_tp2():
    """Gradients through the Triton kernels (their backward kernels, interpreted) inside
    shard_map on an ep=2 x tp=2 mesh equal the reference's on one device, plain and with
    expert and router biases and the clamped SwiGLU."""
    params, x = _layer(MIXTRAL, 12, seed=62)
    out = []
    for params, extra in ((params, {}), (_with_biases(params, 63), _gpt_oss_routing())):  # plain; gpt-oss's features
        def grads(implementation, **kw):
            def loss(p, x):
                y = jaxmoe.moe_layer(p, x, top_k=2, implementation=implementation, **extra, **kw)
                return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
            return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

        want = grads("reference")
        got = grads("triton", mesh=_mesh((2, 2), ("ep", "tp")), expert_axis="ep", tensor_axis="tp",
                    schedule="all_to_all")
        errs = {name: _rel(got[0][name].reshape(want[0][name].shape), want[0][name]) for name in want[0]}
        errs["x"] = _rel(got[1], want[1])
        assert max(errs.values()) <= 1e-4, errs
        out.append(f"{sorted(want[0])}: max rel err {max(errs.values()):.1e}")
    return "; ".join(out)


# --------------------------------------------------------------------------- quantized weights and act_quant

QUANT_CASES = (("fp8", "fp8"), ("fp8_tensor", None), ("fp8_block", "fp8"), ("int8", "int8"), ("int4", None),
               ("int4_zp", None), ("mxfp4", None))


def _quantized(params, scheme):
    return {**params, "w1": jaxmoe.quantize_weights(params["w1"], scheme),
            "w2": jaxmoe.quantize_weights(params["w2"], scheme)}


@case
def quantized_ep_dp_every_scheme():
    """Every weight scheme (with act_quant where it has one) over dp=2 x ep=4 and over ep=8
    (one local expert, fewer than top_k), the weights as given and as placed by shard_params
    (every array over the expert axis on its leading E): each token exactly as on one
    device (its rounding of x and h is the one device's)."""
    params, x = _layer(dict(MIXTRAL, hidden=128, intermediate=128), 24, seed=70)
    out = []
    for scheme, act in QUANT_CASES:
        q = _quantized(params, scheme)
        want = jaxmoe.moe_layer(q, x, top_k=2, act_quant=act, implementation="reference")
        errs = []
        for shape, names, axes, schedules in (
                ((2, 4), ("dp", "ep"), dict(expert_axis="ep", data_axis="dp"), ("allgather", "all_to_all")),
                ((8,), ("ep",), dict(expert_axis="ep"), ("all_to_all",))):
            mesh = _mesh(shape, names)
            placed = jaxmoe.parallel.shard_params(q, mesh, expert_axis="ep")
            for leaf in jax.tree.leaves(placed["w1"]) + jax.tree.leaves(placed["w2"]):
                assert leaf.sharding.spec[0] == "ep" and set(leaf.sharding.spec[1:]) <= {None}, (
                    scheme, leaf.sharding.spec)
            for weights in (q, placed):
                for schedule in schedules:
                    got = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, act_quant=act, mesh=mesh,
                                                               schedule=schedule, implementation="reference",
                                                               **axes))(weights, x)
                    errs.append(_rel(got, want))
        assert max(errs) <= 1e-6, (scheme, errs)
        out.append(f"{scheme}{'+a' + act if act else ''}: max rel err {max(errs):.0e}")
    return "; ".join(out)


@case
def quantized_tensor_axis_every_scheme():
    """Every weight scheme over ep=2 x tp=2 and tp=4 (I = 512: whole 128-groups per
    device), both schedules, as given and as placed by shard_params. Weight-only schemes
    and fp8_block's per-128-channel activation groups: as on one device but for the order
    of the fp32 sums (each device's partial row rounded, then summed over the tensor
    axis). fp8 and int8 per-token activations: h is rounded per token from the device's
    I / tp slice, a scale no larger than the whole row's, so no coarser than one device's
    rounding: the error against the unrounded fp32 layer is held to 1.25 times one
    device's."""
    params, x = _layer(dict(MIXTRAL, hidden=128, intermediate=512), 16, seed=76)
    exact = jaxmoe.moe_layer(params, x, top_k=2, implementation="reference")
    out = []
    for scheme, act in QUANT_CASES:
        q = _quantized(params, scheme)
        want = jaxmoe.moe_layer(q, x, top_k=2, act_quant=act, implementation="reference")
        one_device = _rel(want, exact)
        per_token = act in ("fp8", "int8") and scheme != "fp8_block"
        errs = []
        for shape, names, axes, schedules in (
                ((2, 2), ("ep", "tp"), dict(expert_axis="ep", tensor_axis="tp"), ("allgather", "all_to_all")),
                ((4,), ("tp",), dict(tensor_axis="tp"), ("allgather",))):
            mesh = _mesh(shape, names)
            placed = jaxmoe.parallel.shard_params(q, mesh, **axes)
            assert placed["w1"].values.sharding.spec[2] == "tp" and placed["w2"].values.sharding.spec[2] == "tp"
            for weights in (q, placed):
                for schedule in schedules:
                    got = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, act_quant=act, mesh=mesh,
                                                               schedule=schedule, implementation="reference",
                                                               **axes))(weights, x)
                    assert np.isfinite(np.asarray(got)).all()
                    errs.append(_rel(got, exact) / one_device if per_token else _rel(got, want))
        if per_token:
            assert max(errs) <= 1.25 and min(errs) > 0, (scheme, errs)
            out.append(f"{scheme}+a{act}: error / one device's {min(errs):.2f}-{max(errs):.2f}")
        else:
            assert max(errs) <= 1e-6, (scheme, errs)
            out.append(f"{scheme}{'+a' + act if act else ''}: max rel err {max(errs):.0e}")
    return "; ".join(out)


@case
def quantized_triton_interpreter_ep2_tp2():
    """int4 weights and fp8_block w8a8 through the interpreted Triton kernels inside
    shard_map (ep=2, and ep=2 x tp=2 with I = 256): the same as the kernels on one device
    but for the tensor axis's order of the fp32 sums."""
    params, x = _layer(dict(MIXTRAL, hidden=128, intermediate=256), 16, seed=72)
    out = []
    for scheme, act in (("int4", None), ("fp8_block", "fp8")):
        q = _quantized(params, scheme)
        want = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, act_quant=act, implementation="triton"))(q, x)
        for shape, names, axes in (((2,), ("ep",), dict(expert_axis="ep")),
                                   ((2, 2), ("ep", "tp"), dict(expert_axis="ep", tensor_axis="tp"))):
            got = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, act_quant=act, mesh=_mesh(shape, names),
                                                       schedule="all_to_all", implementation="triton",
                                                       **axes))(q, x)
            err = _rel(got, want)
            assert err <= 1e-6 and np.isfinite(np.asarray(got)).all(), (scheme, names, err)
            out.append(f"{scheme} {'x'.join(names)}: rel err {err:.0e}")
    return "; ".join(out)


@case
def quantized_grads_ep2_tp2():
    """Gradients of x and the router through frozen int4 and fp8 weights, through the
    interpreted kernels on an ep=2 x tp=2 mesh (both schedules), equal to the reference's
    autodiff through dequantize() on one device."""
    params, x = _layer(dict(MIXTRAL, hidden=128, intermediate=256), 12, seed=78)
    out = []
    for scheme in ("int4", "fp8"):
        q = _quantized(params, scheme)

        def grads(implementation, **kw):
            def loss(router, x):
                y = jaxmoe.moe_layer({**q, "router": router}, x, top_k=2, implementation=implementation, **kw)
                return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
            return jax.jit(jax.grad(loss, argnums=(0, 1)))(q["router"], x)

        want = grads("reference")
        for schedule in ("allgather", "all_to_all"):
            got = grads("triton", mesh=_mesh((2, 2), ("ep", "tp")), expert_axis="ep", tensor_axis="tp",
                        schedule=schedule)
            errs = [_rel(g, w) for g, w in zip(got, want)]
            assert max(errs) <= 1e-5, (scheme, schedule, errs)
            out.append(f"{scheme} {schedule}: max rel err {max(errs):.0e}")
    return "; ".join(out)


@case
def quantized_mesh_errors():
    import pytest

    params, x = _layer(dict(MIXTRAL, hidden=128, intermediate=192), 8, seed=74)
    mesh = _mesh((4, 2), ("ep", "tp"))
    for scheme, match in (("int4", "multiple of 128"), ("fp8_block", "multiple of 128")):
        q = _quantized(params, scheme)  # I / tp = 96: no whole 128-group per device
        with pytest.raises(ValueError, match=match):
            jaxmoe.moe_layer(q, x, top_k=2, mesh=mesh, expert_axis="ep", tensor_axis="tp")
        with pytest.raises(ValueError, match=match):
            jaxmoe.parallel.shard_params(q, mesh, expert_axis="ep", tensor_axis="tp")
    half = {**params, "w1": jaxmoe.quantize_weights(params["w1"], "fp8")}
    with pytest.raises(TypeError, match="both be quantized"):
        jaxmoe.moe_layer(half, x, top_k=2, mesh=mesh, expert_axis="ep")
    with pytest.raises(ValueError, match="act_quant"):  # act_quant without 8-bit weights, as on one device
        jaxmoe.moe_layer(params, x, top_k=2, act_quant="fp8", mesh=_mesh((4,), ("ep",)), expert_axis="ep")
    return "6 error cases"


# --------------------------------------------------------------------------- errors, before tracing

@case
def errors():
    import pytest

    params, x = _layer(MIXTRAL, 8)
    mesh = _mesh((4, 2), ("ep", "tp"))
    calls = [
        (ValueError, "expert_axis='experts' is not an axis", dict(mesh=mesh, expert_axis="experts")),
        (ValueError, "different axes", dict(mesh=mesh, expert_axis="ep", tensor_axis="ep")),
        (ValueError, "at least one", dict(mesh=mesh)),
        (TypeError, "jax.sharding.Mesh", dict(mesh="ep", expert_axis="ep")),
        (TypeError, "mesh axis name", dict(mesh=mesh, expert_axis=0)),
        (ValueError, "schedule", dict(mesh=mesh, expert_axis="ep", schedule="ring")),
        (ValueError, "need a mesh", dict(expert_axis="ep")),
    ]
    for err, match, kw in calls:
        with pytest.raises(err, match=match):
            jaxmoe.moe_layer(params, x, top_k=2, **kw)
    p6 = jaxmoe.init_moe_params(jax.random.key(0), hidden=32, intermediate=6, experts=6, dtype=jnp.float32)
    with pytest.raises(ValueError, match="6 experts cannot be split evenly over expert_axis='ep' of 4"):
        jaxmoe.moe_layer(p6, x, top_k=2, mesh=mesh, expert_axis="ep")
    with pytest.raises(ValueError, match="I=6 cannot be split evenly over tensor_axis='tp8' of 8"):
        jaxmoe.moe_layer(p6, x, top_k=2, mesh=_mesh((8,), ("tp8",)), tensor_axis="tp8")
    with pytest.raises(ValueError, match="w2"):
        jaxmoe.moe_layer({**params, "w2": params["w2"][:, :, :8]}, x, top_k=2, mesh=mesh, expert_axis="ep")
    with pytest.raises(ValueError, match="top_k"):
        jaxmoe.moe_layer(params, x, top_k=9, mesh=mesh, expert_axis="ep")
    with pytest.raises(ValueError, match="split evenly"):
        jaxmoe.parallel.shard_params(p6, mesh, expert_axis="ep")
    # raised before tracing: nothing reaches shard_map under jit either
    with pytest.raises(ValueError, match="is not an axis"):
        jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, mesh=mesh, expert_axis="e"))(params, x)
    return f"{len(calls) + 6} error cases"


# --------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # this checkout's jaxmoe, not an installed one (running a script puts tests/ first on sys.path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _setup()
    assert jaxmoe.__file__.startswith(sys.path[0]), jaxmoe.__file__
    assert len(jax.devices()) == 8, jax.devices()
    out, names = argv[0], argv[1:] or list(CASES)
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            detail, ok = str(CASES[name]()), True
        except Exception:  # reported per case by the test process
            detail, ok = traceback.format_exc(limit=6), False
        results[name] = {"ok": ok, "detail": detail, "seconds": round(time.perf_counter() - start, 2)}
        print(f"{name}: {'ok' if ok else 'FAIL'} ({results[name]['seconds']} s) {detail}", flush=True)
        with open(out, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
