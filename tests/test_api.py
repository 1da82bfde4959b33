"""The public API as a whole: exports, the default dispatch under jax.jit, presets and parameter
init. Each op's own cases and bad-input errors live in its family's module (test_routing.py,
test_alignment.py, test_gemm.py, test_moe.py, test_layer.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from conftest import moe_inputs, randn, rel_err
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
