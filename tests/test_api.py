"""The public API: dispatch, jax.jit, presets, parameter init, and every bad-input error."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from conftest import moe_inputs, randn, random_ids, rel_err
from jaxmoe import models, ops, reference

BF16, F32 = jnp.bfloat16, jnp.float32


def test_exports():
    for name in ("route", "fused_moe", "moe_layer", "init_moe_params", "ops", "reference", "__version__"):
        assert hasattr(jaxmoe, name)
    for name in ("moe_align_block_size", "moe_gemm", "max_padded_rows"):
        assert hasattr(ops, name)
    for name in ("route", "moe_align_block_size", "moe_gemm", "fused_moe", "moe_layer"):
        assert callable(getattr(reference, name))


@pytest.mark.parametrize("implementation", [None, "reference"])
def test_public_functions_under_jit_match_reference(implementation, rng):
    impl = dict(implementation=implementation)
    m, d, i, e, k, bs = 10, 32, 16, 6, 2, 16
    x, w1, w2, _, _ = moe_inputs(rng, m, d, i, e, k, BF16)
    logits = randn(rng, (m, e), F32)

    w, ids = jax.jit(functools.partial(jaxmoe.route, top_k=k, **impl))(logits)
    rw, rids = reference.route(logits, k)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(rids))
    np.testing.assert_allclose(np.asarray(w), np.asarray(rw), rtol=1e-6)

    y = jax.jit(functools.partial(jaxmoe.fused_moe, **impl))(x, w1, w2, w, ids)
    assert y.dtype == BF16 and rel_err(y, reference.fused_moe(x, w1, w2, w, ids)) <= 1e-2

    align = jax.jit(functools.partial(ops.moe_align_block_size, num_experts=e, block_size=bs, **impl))(ids)
    for got, want in zip(align, reference.moe_align_block_size(ids, e, bs)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    gemm = functools.partial(ops.moe_gemm, top_k=k, num_rows=m * k, block_size=bs, activation="silu", **impl)
    h = jax.jit(gemm)(x, w1, *align)
    want = reference.moe_gemm(x, w1, *align, top_k=k, num_rows=m * k, block_size=bs, activation="silu")
    assert h.shape == (m * k, i) and rel_err(h, want) <= 1e-2

    params = jax.jit(functools.partial(jaxmoe.init_moe_params, hidden=d, intermediate=i, experts=e))(jax.random.key(0))
    xb = randn(rng, (2, 3, d), BF16)
    out = jax.jit(functools.partial(jaxmoe.moe_layer, top_k=k, **impl))(params, xb)
    assert out.shape == xb.shape and out.dtype == BF16
    assert rel_err(out, reference.moe_layer(params, xb, top_k=k)) <= 1e-2


def test_route_traced_scaling_factor(rng):
    logits = randn(rng, (4, 8), F32)
    w = jax.jit(lambda l, s: jaxmoe.route(l, 2, routed_scaling_factor=s)[0])(logits, jnp.float32(2.5))
    np.testing.assert_allclose(np.asarray(w).sum(axis=1), 2.5, rtol=1e-6)


def test_init_moe_params():
    p = jaxmoe.init_moe_params(jax.random.key(1), hidden=64, intermediate=48, experts=4)
    assert {k: (v.shape, v.dtype) for k, v in p.items()} == {
        "router": ((64, 4), BF16),
        "w1": ((4, 96, 64), BF16),
        "w2": ((4, 64, 48), BF16),
    }
    std = float(jnp.std(p["w2"].astype(F32)))
    assert abs(std * np.sqrt(48) - 1) < 0.1
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure({"router": 0, "w1": 0, "w2": 0})
    p32 = jaxmoe.init_moe_params(jax.random.key(1), hidden=8, intermediate=8, experts=2, dtype=F32)
    assert p32["w1"].dtype == F32
    with pytest.raises(ValueError, match="experts"):
        jaxmoe.init_moe_params(jax.random.key(1), hidden=8, intermediate=8, experts=0)


def test_model_presets():
    assert set(models.PRESETS) == {"tiny", "mixtral-8x7b", "mixtral-8x22b", "deepseek-v3", "qwen3-30b-a3b",
                                   "qwen3-235b-a22b", "gpt-oss-120b"}
    ds = models.get_preset("deepseek-v3")
    assert (ds.experts, ds.top_k, ds.hidden, ds.intermediate) == (256, 8, 7168, 2048)
    kw = ds.routing_kwargs()
    assert kw["correction_bias"].shape == (256,) and kw["routed_scaling_factor"] == 2.5
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 256)), F32)
    w, ids = jaxmoe.route(logits, **kw)
    assert ids.shape == (3, 8)
    with pytest.raises(ValueError, match="unknown model"):
        models.get_preset("gpt-5")


# ----------------------------------------------------------------------------- bad input


def _moe(rng, m=4, d=16, i=8, e=4, k=2, dtype=F32):
    return moe_inputs(rng, m, d, i, e, k, dtype)


ROUTE_ERRORS = [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=9), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(scoring="relu"), ValueError, "scoring"),
    (dict(renormalize="yes"), TypeError, "renormalize"),
    (dict(num_expert_group=4), ValueError, "topk_group"),
    (dict(num_expert_group=3, topk_group=1), ValueError, "num_expert_group"),
    (dict(num_expert_group=4, topk_group=5), ValueError, "topk_group"),
    (dict(num_expert_group=4, topk_group=1, top_k=3), ValueError, "top_k"),
    (dict(correction_bias=jnp.zeros(7)), ValueError, "correction_bias"),
    (dict(correction_bias=jnp.zeros(8, jnp.int32)), TypeError, "correction_bias"),
    (dict(routed_scaling_factor="2"), TypeError, "routed_scaling_factor"),
    (dict(implementation="cuda"), ValueError, "implementation"),
]


@pytest.mark.parametrize("kwargs,exc,name", ROUTE_ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(ROUTE_ERRORS)])
def test_route_errors(kwargs, exc, name, rng):
    kwargs = {"top_k": 2, **kwargs}
    top_k = kwargs.pop("top_k")
    logits = randn(rng, (5, 8), F32)
    for fn in (jaxmoe.route, reference.route):
        if fn is reference.route and "implementation" in kwargs:
            continue
        with pytest.raises(exc, match=name):
            fn(logits, top_k, **kwargs)


def test_route_logits_errors(rng):
    with pytest.raises(TypeError, match="logits"):
        jaxmoe.route(jnp.zeros((4, 8), jnp.int32), 2)
    with pytest.raises(ValueError, match="logits"):
        jaxmoe.route(jnp.zeros((4, 2, 8)), 2)
    with pytest.raises(TypeError, match="logits"):
        jaxmoe.route([[1.0, 2.0]], 1)


def _fused_moe_errors(rng):
    x, w1, w2, tw, ti = _moe(rng)
    return [
        ("x-ndim", (x[None], w1, w2, tw, ti), {}, ValueError, "hidden_states"),
        ("x-int", (x.astype(jnp.int32), w1, w2, tw, ti), {}, TypeError, "hidden_states"),
        ("w1-dtype", (x, w1.astype(BF16), w2, tw, ti), {}, TypeError, "w1"),
        ("w2-dtype", (x, w1, w2.astype(BF16), tw, ti), {}, TypeError, "w2"),
        ("w1-D", (x, w1[:, :, :8], w2, tw, ti), {}, ValueError, "w1"),
        ("w1-odd", (x, w1[:, :15], w2, tw, ti), {}, ValueError, "w1"),
        ("w2-shape", (x, w1, w2[:, :, :4], tw, ti), {}, ValueError, "w2"),
        ("w2-E", (x, w1, w2[:3], tw, ti), {}, ValueError, "w2"),
        ("ids-float", (x, w1, w2, tw, tw), {}, TypeError, "topk_ids"),
        ("ids-bool", (x, w1, w2, tw, ti > 0), {}, TypeError, "topk_ids"),
        ("weights-int", (x, w1, w2, ti, ti), {}, TypeError, "topk_weights"),
        ("ids-shape", (x, w1, w2, tw, ti[:, :1]), {}, ValueError, "topk_ids"),
        ("weights-M", (x, w1, w2, tw[:3], ti[:3]), {}, ValueError, "topk_weights"),
        ("k>E", (x, w1, w2, jnp.ones((4, 5)), jnp.zeros((4, 5), jnp.int32)), {}, ValueError, "top_k"),
        ("activation", (x, w1, w2, tw, ti), {"activation": "relu"}, ValueError, "activation"),
        ("implementation", (x, w1, w2, tw, ti), {"implementation": "gpu"}, ValueError, "implementation"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_fused_moe_errors(case, rng):
    label, args, kwargs, exc, name = _fused_moe_errors(rng)[case]
    with pytest.raises(exc, match=name):
        jaxmoe.fused_moe(*args, **kwargs)
    if "implementation" not in kwargs:
        with pytest.raises(exc, match=name):
            reference.fused_moe(*args, **kwargs)


def test_fused_moe_errors_are_raised_before_tracing(rng):
    x, w1, w2, tw, ti = _moe(rng)
    with pytest.raises(TypeError, match="w1"):
        jax.jit(jaxmoe.fused_moe)(x, w1.astype(BF16), w2, tw, ti)


def test_align_errors(rng):
    ids = random_ids(rng, 6, 2, 4)
    with pytest.raises(ValueError, match="block_size"):
        ops.moe_align_block_size(ids, 4, 24)
    with pytest.raises(ValueError, match="block_size"):
        ops.moe_align_block_size(ids, 4, 8)
    with pytest.raises(TypeError, match="topk_ids"):
        ops.moe_align_block_size(ids.astype(F32), 4, 16)
    with pytest.raises(ValueError, match="topk_ids"):
        ops.moe_align_block_size(ids.reshape(-1), 4, 16)
    with pytest.raises(ValueError, match="num_experts"):
        ops.moe_align_block_size(ids, 0, 16)
    with pytest.raises(TypeError, match="num_experts"):
        ops.moe_align_block_size(ids, 4.0, 16)
    with pytest.raises(ValueError, match="implementation"):
        ops.moe_align_block_size(ids, 4, 16, implementation="x")


def test_moe_gemm_errors(rng):
    m, k, e, bs = 6, 2, 4, 16
    ids = random_ids(rng, m, k, e)
    align = reference.moe_align_block_size(ids, e, bs)
    a, b = randn(rng, (m, 16), F32), randn(rng, (e, 10, 16), F32)
    ok = dict(top_k=k, num_rows=m * k, block_size=bs)
    ops.moe_gemm(a, b, *align, **ok)
    bad = [
        ((a, b.astype(BF16), *align), ok, TypeError, "b"),
        ((a.astype(jnp.int32), b, *align), ok, TypeError, "a"),
        ((a, b[:, :, :8], *align), ok, ValueError, "b"),
        ((a, b, align[0].astype(F32), *align[1:]), ok, TypeError, "sorted_token_ids"),
        ((a, b, align[0][:-1], *align[1:]), ok, ValueError, "sorted_token_ids"),
        ((a, b, align[0], align[1][:-1], align[2]), ok, ValueError, "expert_ids"),
        ((a, b, *align[:2], align[2].reshape(())), ok, ValueError, "num_tokens_post_padded"),
        ((a, b, *align), {**ok, "num_rows": m * k + 1}, ValueError, "num_rows"),
        ((a, b, *align), {**ok, "top_k": 0}, ValueError, "top_k"),
        ((a, b, *align), {**ok, "block_size": 32}, ValueError, "sorted_token_ids|expert_ids"),
        ((a, b[:, :9], *align), {**ok, "activation": "silu"}, ValueError, "even"),
        ((a, b, *align), {**ok, "activation": "tanh"}, ValueError, "activation"),
        ((a, b, *align), {**ok, "topk_weights": jnp.ones((m, 3))}, ValueError, "topk_weights"),
        ((a, b, *align), {**ok, "topk_weights": jnp.ones((m, k), jnp.int32)}, TypeError, "topk_weights"),
        ((a, b, *align), {**ok, "implementation": "fast"}, ValueError, "implementation"),
    ]
    for args, kwargs, exc, name in bad:
        with pytest.raises(exc, match=name):
            ops.moe_gemm(*args, **kwargs)


def test_moe_layer_errors(rng):
    p = jaxmoe.init_moe_params(jax.random.key(0), hidden=16, intermediate=8, experts=4, dtype=F32)
    x = randn(rng, (3, 16), F32)
    with pytest.raises(ValueError, match="x"):
        jaxmoe.moe_layer(p, randn(rng, (3, 15), F32), top_k=2)
    with pytest.raises(TypeError, match="x"):
        jaxmoe.moe_layer(p, x.astype(BF16), top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        jaxmoe.moe_layer(p, x, top_k=5)
    with pytest.raises(TypeError, match="params"):
        jaxmoe.moe_layer({"w1": p["w1"]}, x, top_k=2)
    with pytest.raises(ValueError, match="implementation"):
        jaxmoe.moe_layer(p, x, top_k=2, implementation="nope")
    with pytest.raises(ValueError, match="scoring"):
        jaxmoe.moe_layer(p, x, top_k=2, scoring="max")
    with pytest.raises(ValueError, match="activation"):
        jaxmoe.moe_layer(p, x, top_k=2, activation="relu")
